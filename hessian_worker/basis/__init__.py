"""The ``basis`` sharing scheme: the layers of a class share a low-rank basis, W_ℓ ≈ B_c·C_ℓ.

    from hessian_worker import AnalyzeConfig, analyze
    from hessian_worker.basis import BasisOptions, apply_basis_plan, save_basis
    problem = analyze(model, data, AnalyzeConfig(scheme="basis", basis=BasisOptions(rank=64)))
    plan = solve(problem, SolveConfig(max_params_ratio=0.4))
    apply_basis_plan(model, plan, problem, data=data)

Modules, one job each: ``config`` (options), ``decompose`` (the math, both sides), ``scales``
(output-side curvature scales: the whitening covariances every step uses), ``costs`` (unary and
pair costs), ``modules`` (BasisLinear), ``analysis`` (problem and re-scoring), ``per_layer`` (plain
per-layer SVD at the budget, a candidate beside the solver's pool), ``apply``, ``measure``
(low-rank substitutes for measuring candidate plans), ``io``.
Names are imported lazily, so ``hessian_worker.config`` can import the options without a cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BasisOptions": "hessian_worker.basis.config",
    "SideChoice": "hessian_worker.basis.config",
    "BasisSubstitutes": "hessian_worker.basis.measure",
    "BasisFactors": "hessian_worker.basis.decompose",
    "shared_basis": "hessian_worker.basis.decompose",
    "refine": "hessian_worker.basis.decompose",
    "whitened_error": "hessian_worker.basis.decompose",
    "basis_costs": "hessian_worker.basis.costs",
    "BasisLinear": "hessian_worker.basis.modules",
    "analyze_basis": "hessian_worker.basis.analysis",
    "rescore_basis_plan": "hessian_worker.basis.analysis",
    "BasisScore": "hessian_worker.basis.analysis",
    "apply_basis_plan": "hessian_worker.basis.apply",
    "BasisApplyReport": "hessian_worker.basis.apply",
    "save_basis": "hessian_worker.basis.io",
    "load_basis": "hessian_worker.basis.io",
    "basis_covariances": "hessian_worker.basis.scales",
    "output_scales": "hessian_worker.basis.scales",
    "per_layer_candidate": "hessian_worker.basis.per_layer",
}

__all__ = [
    "BasisApplyReport",
    "BasisFactors",
    "BasisLinear",
    "BasisOptions",
    "BasisScore",
    "BasisSubstitutes",
    "SideChoice",
    "analyze_basis",
    "apply_basis_plan",
    "basis_costs",
    "basis_covariances",
    "load_basis",
    "output_scales",
    "per_layer_candidate",
    "refine",
    "rescore_basis_plan",
    "save_basis",
    "shared_basis",
    "whitened_error",
]

if TYPE_CHECKING:
    from hessian_worker.basis.analysis import BasisScore, analyze_basis, rescore_basis_plan
    from hessian_worker.basis.apply import BasisApplyReport, apply_basis_plan
    from hessian_worker.basis.config import BasisOptions, SideChoice
    from hessian_worker.basis.costs import basis_costs
    from hessian_worker.basis.decompose import BasisFactors, refine, shared_basis, whitened_error
    from hessian_worker.basis.io import load_basis, save_basis
    from hessian_worker.basis.measure import BasisSubstitutes
    from hessian_worker.basis.modules import BasisLinear
    from hessian_worker.basis.per_layer import per_layer_candidate
    from hessian_worker.basis.scales import basis_covariances, output_scales


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hessian_worker.basis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
