"""apply_relaxed_plan: replace each relaxed class's linear layers by RelaxedLinear modules that share
ONE S Parameter and keep their own correction factors and bias, in place.

A layer in a class of one keeps its dense weight unchanged (S = W_ℓ, no correction: nothing is lost),
so it stores d_out·d_in where the solver's accounting counts d_out·d_in + r·(d_out + d_in): the plan's
unique parameters are at most the solver's count, equal when every class shares. A layer of an
``alone`` family keeps no S: its rank-r factors alone (decompose.alone_fit), r·(d_out + d_in), as
counted. Classes of ``tie`` families in the same plan go through the ordinary ``tying.apply_tie``;
classes of ``basis`` families beside the relaxed ones are fitted as the basis scheme fits them
(``basis.apply.install_basis_classes``), whitened as a layer alone is (their fit is a truncated SVD
of the stacked whitened weights, as a layer alone's is of one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hessian_worker.basis.analysis import basis_classes, side_of
from hessian_worker.basis.analysis import rank_of as basis_rank_of
from hessian_worker.basis.apply import install_basis_classes
from hessian_worker.basis.modules import BasisLinear
from hessian_worker.config import AnalyzeConfig, config_where
from hessian_worker.data import DataSource
from hessian_worker.factored.apply import begin_apply, require_covs
from hessian_worker.factored.layers import dense_weights
from hessian_worker.merge import Merge
from hessian_worker.prepare import prepare
from hessian_worker.relaxed.analysis import (
    alone_layers,
    rank_of,
    relaxed_classes,
    relaxed_covariances,
)
from hessian_worker.relaxed.costs import alone_cov, class_covs
from hessian_worker.relaxed.decompose import fit_members, relaxed_error
from hessian_worker.relaxed.modules import RelaxedLinear, install_alone, install_class
from hessian_worker.tying import ApplyReport
from solver.schema import Scheme, SharingPlan, SharingProblem


class RelaxedApplyReport(ApplyReport):
    """ApplyReport plus what the relaxed scheme did (``merge`` applies to tie families only)."""

    scheme: Scheme = Scheme.relaxed
    relaxed_classes: int
    alone_layers: int = 0  # layers of alone families: rank-r factors, no shared tensor
    basis_classes: int = 0  # classes of basis families beside the relaxed ones (one shared basis each)
    ranks: dict[str, int]
    whitened: bool
    whitened_error: float | None = None


def apply_relaxed_plan(model: nn.Module, plan: SharingPlan, problem: SharingProblem, merge: Merge | str = Merge.mean,
                       *, data: DataSource | None = None, config: AnalyzeConfig | None = None,
                       tokenizer: Any | None = None, covs: dict[str, Tensor] | None = None,
                       diag: dict[str, Tensor] | None = None) -> RelaxedApplyReport:
    """Applies ``plan`` in place; correction ranks come from ``problem.families`` (scheme ``relaxed``),
    and the ranks and sides of any ``basis`` families beside them too.

    The classes are fitted under the whitening covariances ``covs`` (name -> G, from
    ``relaxed_covariances``, e.g. the ones the candidates were measured with), else measured on
    ``data`` (``config.relaxed.whiten``), else unwhitened; ``whitened_error`` is Σ_class E then (a
    predicted loss change when output-weighted). ``diag`` passes curvature-merge weights for the
    classes of ``tie`` families (see tying.apply_tie).

    Raises:
        PlanError: the plan names unknown or non-linear layers, a rank does not fit, or ``covs``
            misses a layer.
    """
    merge = Merge(merge)
    config = config or AnalyzeConfig(progress=False, scheme=Scheme.relaxed)
    options = config.relaxed
    classes = relaxed_classes(plan, problem)
    ranks = rank_of(problem)
    alone = alone_layers(problem)
    fams_of = {x.name: x.family for x in problem.layers}
    fitted = [c for c in classes if len(c) > 1 or c[0] in alone]  # a dense singleton stays as it is
    bases, basis_ranks = basis_classes(plan, problem), basis_rank_of(problem, Scheme.basis)
    based = [n for c in bases for n in c]
    names = [n for c in fitted for n in c] + based
    require_covs(covs, names)
    frame = begin_apply(model, plan, {n for c in [*classes, *bases] for n in c}, merge, data=data, config=config,
                        tokenizer=tokenizer, diag=diag)

    weights = dense_weights(model, names)
    if covs is None and options.whiten and data is not None and names:
        cfg = config_where(config, weights[names[0]])
        prep = prepare(model, data, cfg, tokenizer=tokenizer)
        with torch.no_grad():
            covs = relaxed_covariances(model, prep.data, names, cfg, progress=config.progress)
    covs_used = covs if options.whiten else None
    whitened = covs_used is not None or (options.whiten and not names)  # nothing to fit: nothing lost
    basis_error = install_basis_classes(
        model, bases, weights, basis_ranks, side_of(problem),
        None if covs_used is None else {n: alone_cov(covs_used, n) for n in based}, damping=options.damping,
        progress=config.progress)

    error = 0.0 if whitened else None
    for group in tqdm(fitted, desc="relaxed classes", disable=not config.progress, leave=False):
        ws = [weights[n] for n in group]
        cs = class_covs(covs_used, group, group[0] in alone)
        with torch.no_grad():
            factors = fit_members(ws, ranks[group[0]], cs, alone=group[0] in alone, damping=options.damping,
                                  rounds=options.rounds)
            if error is not None:
                error += relaxed_error(ws, factors, cs, damping=options.damping)
            if group[0] in alone:
                install_alone(model, group[0], factors.left[0], factors.right[0])
            else:
                install_class(model, group, factors.shared, factors.left, factors.right)

    return RelaxedApplyReport(
        **frame.counts(model, merge, [*classes, *bases], _factors),
        relaxed_classes=sum(len(c) > 1 for c in classes),
        alone_layers=len(alone & set(names)),
        basis_classes=len(bases),
        ranks={fams_of[n]: ranks.get(n) or basis_ranks[n] for n in names},
        whitened=whitened,
        whitened_error=None if error is None else error + (basis_error or 0.0),
    )


def _factors(module: nn.Module) -> tuple[nn.Parameter, ...] | None:
    """A relaxed layer's S and correction factors, a basis layer's basis and coefficients (None for
    any other module)."""
    if isinstance(module, BasisLinear):
        return module.basis, module.coef
    if not isinstance(module, RelaxedLinear):
        return None
    return (module.left, module.right) if module.alone else (module.shared, module.left, module.right)
