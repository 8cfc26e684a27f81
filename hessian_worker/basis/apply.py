"""apply_basis_plan: replace each basis class's linear layers by BasisLinear modules that share ONE
basis Parameter and keep their own coefficients and bias, in place.

A layer in a class of one gets its own rank-r basis (plain low rank), so the unique parameters of
the plan's layers are exactly the solver's count: class_params per class + member_params per layer.
Classes of ``tie`` families in the same plan go through the ordinary ``tying.apply_tie``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from hessian_worker.basis.analysis import basis_classes, rank_of, side_of
from hessian_worker.basis.decompose import (
    output_weights,
    refine,
    shared_basis,
    whitened_error,
)
from hessian_worker.basis.modules import BasisLinear, install_class
from hessian_worker.basis.scales import basis_covariances
from hessian_worker.config import AnalyzeConfig, config_where, generator
from hessian_worker.curvature.diagonal import estimate_diagonal
from hessian_worker.curvature.layerwise import linear_modules
from hessian_worker.data import DataSource
from hessian_worker.errors import PlanError
from hessian_worker.factored.apply import begin_apply, require_covs
from hessian_worker.factored.layers import dense_weights
from hessian_worker.merge import Merge
from hessian_worker.objective import Objective
from hessian_worker.prepare import prepare
from hessian_worker.tying import ApplyReport
from solver.schema import Scheme, SharingPlan, SharingProblem, Side


class BasisApplyReport(ApplyReport):
    """ApplyReport plus what the basis scheme did (``merge`` applies to tie families only)."""

    scheme: Scheme = Scheme.basis
    basis_classes: int
    ranks: dict[str, int]
    sides: dict[str, Side] = Field(default_factory=dict)
    whitened: bool
    refined: bool
    whitened_error: float | None = None


def apply_basis_plan(
    model: nn.Module,
    plan: SharingPlan,
    problem: SharingProblem,
    merge: Merge | str = Merge.mean,
    *,
    data: DataSource | None = None,
    config: AnalyzeConfig | None = None,
    tokenizer: Any | None = None,
    covs: dict[str, Tensor] | None = None,
    diag: dict[str, Tensor] | None = None,
) -> BasisApplyReport:
    """Applies ``plan`` in place; ranks and sides come from ``problem.families`` (scheme ``basis``).

    With ``data`` the bases are whitened by the layer input covariances, scaled by the output
    scales when ``config.basis.output_weighting`` (scales.basis_covariances, as in
    ``analyze_basis``), and ``whitened_error`` reports Σ_class E (a predicted loss change when
    scaled); without it they are the plain SVD. With ``config.basis.refine_rounds`` > 0 the
    correction of decompose.py runs, its output weights from the diagonal GGN on ``data`` (its
    objective does not depend on the covariances' scale). ``covs`` passes whitening covariances
    measured already (name -> G, from ``basis_covariances``, e.g. the ones the candidate plans were
    measured with), so no data is needed to whiten;
    ``diag`` passes curvature-merge weights for the classes of ``tie`` families (see tying.apply_tie).

    Raises:
        PlanError: the plan names unknown or non-linear layers, a rank does not fit, or the
            correction lacks data or meets a side-in family.
    """
    merge = Merge(merge)
    config = config or AnalyzeConfig(progress=False, scheme=Scheme.basis)
    options = config.basis
    classes = basis_classes(plan, problem)
    ranks = rank_of(problem)
    sides = side_of(problem)
    fams_of = {x.name: x.family for x in problem.layers}
    names = [n for c in classes for n in c]
    if options.refine_rounds and data is None:
        raise PlanError(
            "basis refine_rounds > 0 needs calibration data (data=...) for the output-side curvature"
        )
    inside = sorted({fams_of[n] for n in names if sides[n] is Side.in_})
    if options.refine_rounds and inside:
        raise PlanError(
            f"basis refine_rounds > 0 supports side 'out' only; families {inside} share the input "
            "side: set refine_rounds=0, or side='out'"
        )
    require_covs(covs, names)
    frame = begin_apply(model, plan, set(names), merge, data=data, config=config, tokenizer=tokenizer, diag=diag)

    weights = dense_weights(model, names)
    out_w: dict[str, Tensor] | None = None
    needs_covs = covs is None and (options.whiten or options.refine_rounds)
    if data is not None and names and (needs_covs or options.refine_rounds):
        cfg = config_where(config, weights[names[0]])
        prep = prepare(model, data, cfg, tokenizer=tokenizer)
        with torch.no_grad():
            if needs_covs:
                covs = basis_covariances(model, prep.data, names, cfg, progress=config.progress)
            if options.refine_rounds:
                out_w = _output_weights(model, prep, names, covs, cfg)
    covs_used = covs if options.whiten else None

    error = install_basis_classes(model, classes, weights, ranks, sides, covs_used, damping=options.damping,
                                  out_w=out_w, rounds=options.refine_rounds, trust=options.trust,
                                  progress=config.progress)

    return BasisApplyReport(
        **frame.counts(model, merge, classes, _factors),
        basis_classes=len(classes),
        ranks={fams_of[n]: ranks[n] for n in names},
        sides={fams_of[n]: sides[n] for n in names},
        whitened=covs_used is not None,
        refined=out_w is not None,
        whitened_error=error,
    )


def install_basis_classes(model: nn.Module, classes: Sequence[Sequence[str]], weights: Mapping[str, Tensor],
                          ranks: Mapping[str, int], sides: Mapping[str, Side],
                          covs: Mapping[str, Tensor] | None, *, damping: float,
                          out_w: Mapping[str, Tensor] | None = None, rounds: int = 0, trust: float = 0.1,
                          progress: bool = False) -> float | None:
    """Fits every class's shared basis (whitened by ``covs``, name -> G; None: the plain SVD),
    corrected (``refine``) when output weights ``out_w`` are given, and installs its BasisLinear
    modules; returns Σ_class whitened error (None unwhitened).

    Shared by ``apply_basis_plan`` and the relaxed scheme's plans with basis families beside them.
    """
    error = 0.0 if covs is not None else None
    for group in tqdm(classes, desc="basis classes", disable=not progress, leave=False):
        ws = [weights[n] for n in group]
        cs = None if covs is None else [covs[n] for n in group]
        factors = shared_basis(ws, ranks[group[0]], cs, damping=damping, side=sides[group[0]])
        if out_w is not None:
            factors = refine(ws, factors, cs, out_weights=[out_w[n] for n in group], damping=damping,
                             rounds=rounds, trust=trust).factors
        if error is not None:
            error += whitened_error(ws, factors, cs, damping=damping)
        with torch.no_grad():
            install_class(model, list(group), factors.basis, factors.coefs, factors.side)
    return error


def _output_weights(
    model: nn.Module, prep: Any, names: list[str], covs: dict[str, Tensor], cfg: AnalyzeConfig
) -> dict[str, Tensor]:
    """a_ℓ from the diagonal GGN of each weight (decompose.output_weights), in [out, in] orientation."""
    obj = Objective(model, prep.data, names, cfg.distill)
    diag = estimate_diagonal(
        obj, cfg.diagonal_method, probes=cfg.probes, generator=generator(cfg), kind=cfg.curvature
    )
    layers = linear_modules(model, names)
    return {n: output_weights(diag[n].T if layers[n][1] else diag[n], covs[n]) for n in names}


def _factors(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter] | None:
    """A basis layer's basis and coefficients (None for any other module)."""
    return (module.basis, module.coef) if isinstance(module, BasisLinear) else None
