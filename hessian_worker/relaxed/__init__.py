"""The ``relaxed`` sharing scheme: a class shares one tensor, each member keeps a low-rank
correction, W_ℓ ≈ S_c + A_ℓ·B_ℓ (Relaxed Recursive Transformers' and DeltaLLM's form, with the
classes chosen by the curvature costs and the solver instead of fixed in advance).

    from hessian_worker import AnalyzeConfig, analyze
    from hessian_worker.relaxed import RelaxedOptions, apply_relaxed_plan
    problem = analyze(model, data, AnalyzeConfig(scheme="relaxed", relaxed=RelaxedOptions(rank=24),
                                                 max_params_ratio=0.5))
    plan = solve(problem, SolveConfig(max_params_ratio=0.5))
    apply_relaxed_plan(model, plan, problem, data=data)

Modules, one job each: ``decompose`` (the math: the pair's closed form, the class fit), ``costs``
(pair spectra -> pair costs at any rank, ranks within a budget), ``analysis`` (the problem, plan
helpers), ``modules`` (RelaxedLinear), ``apply``, ``measure`` (substitutes for measuring candidate
plans), ``candidates`` (the optima at other correction ranks and forms: families alone, families on
shared bases beside the relaxed ones), ``io``. The whitening covariances are the basis scheme's
(basis/scales.py), shrunk by cross-fitting (``holdout``). Names are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "RelaxedOptions": "hessian_worker.options",
    "RelaxedFactors": "hessian_worker.relaxed.decompose",
    "class_fit": "hessian_worker.relaxed.decompose",
    "pair_fit": "hessian_worker.relaxed.decompose",
    "relaxed_error": "hessian_worker.relaxed.decompose",
    "PairSpectra": "hessian_worker.relaxed.costs",
    "analyze_relaxed": "hessian_worker.relaxed.analysis",
    "RelaxedLinear": "hessian_worker.relaxed.modules",
    "apply_relaxed_plan": "hessian_worker.relaxed.apply",
    "RelaxedApplyReport": "hessian_worker.relaxed.apply",
    "RelaxedSubstitutes": "hessian_worker.relaxed.measure",
    "rank_candidates": "hessian_worker.relaxed.candidates",
    "save_relaxed": "hessian_worker.relaxed.io",
    "load_relaxed": "hessian_worker.relaxed.io",
}

__all__ = [
    "PairSpectra",
    "RelaxedApplyReport",
    "RelaxedFactors",
    "RelaxedLinear",
    "RelaxedOptions",
    "RelaxedSubstitutes",
    "analyze_relaxed",
    "apply_relaxed_plan",
    "class_fit",
    "load_relaxed",
    "pair_fit",
    "rank_candidates",
    "relaxed_error",
    "save_relaxed",
]

if TYPE_CHECKING:
    from hessian_worker.options import RelaxedOptions
    from hessian_worker.relaxed.analysis import analyze_relaxed
    from hessian_worker.relaxed.apply import RelaxedApplyReport, apply_relaxed_plan
    from hessian_worker.relaxed.candidates import rank_candidates
    from hessian_worker.relaxed.costs import PairSpectra
    from hessian_worker.relaxed.decompose import RelaxedFactors, class_fit, pair_fit, relaxed_error
    from hessian_worker.relaxed.io import load_relaxed, save_relaxed
    from hessian_worker.relaxed.measure import RelaxedSubstitutes
    from hessian_worker.relaxed.modules import RelaxedLinear


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hessian_worker.relaxed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
