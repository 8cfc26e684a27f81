"""analyze_relaxed(model, data, config) -> SharingProblem for the ``relaxed`` scheme, and the plan
helpers every step shares (which classes are relaxed, each layer's correction rank).

The fits are whitened by the basis scheme's curvature: input covariances from one streaming forward
pass, scaled per layer by its output-side curvature (basis/scales.py), so the costs are predicted
loss changes. They are priced by that same Kronecker model, or with ``config.relaxed.pricing =
exact`` by the exact GGN's per-layer blocks (exact_costs.py); ``config.backend`` does not apply (it
stays the tie scheme's choice).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hessian_worker.basis.analysis import basis_spec, split_classes
from hessian_worker.basis.analysis import rank_of as basis_rank_of
from hessian_worker.basis.scales import basis_covariances
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.data import Calibration, DataSource
from hessian_worker.discovery import LayerInfo, discover_layers
from hessian_worker.errors import BackendError, PlanError
from hessian_worker.factored.layers import dense_weights
from hessian_worker.losses import TaskLoss
from hessian_worker.objective import Objective
from hessian_worker.options import RelaxedPricing
from hessian_worker.prepare import prepare
from hessian_worker.relaxed.costs import (
    PairPricer,
    PairSpectra,
    family_ranks,
    pair_matrix,
    ranks_within,
)
from hessian_worker.relaxed.exact_costs import ExactPairCosts
from hessian_worker.relaxed.holdout import cross_fitted_covariances
from solver.schema import (
    Constraints,
    CostKind,
    Costs,
    FamilySpec,
    Layer,
    Options,
    Scheme,
    SharingPlan,
    SharingProblem,
    Side,
)


def relaxed_covariances(model: nn.Module, data: Calibration, names: Sequence[str], config: AnalyzeConfig, *,
                        progress: bool = False) -> dict[str, Tensor] | None:
    """The whitening covariances of ``names`` on prepared ``data``: output-scaled unless
    ``config.relaxed.output_weighting`` is off, shrunk by the cross-fitted intensity of
    ``config.relaxed.shrinkage`` per family (holdout.py; a layer fitted alone may get its own, under
    ``costs.alone_key``), or with that list empty the basis scheme's (``config.shrinkage``); None
    when ``config.relaxed.whiten`` is off."""
    options = config.relaxed
    if not options.whiten:
        return None
    if options.shrinkage:
        return cross_fitted_covariances(model, data, names, config, progress=progress).whitening()
    return basis_covariances(model, data, list(names), config, progress=progress,
                             output_weighting=options.output_weighting)


def analyze_relaxed(model: nn.Module | str, data: DataSource, config: AnalyzeConfig | None = None, *,
                    tokenizer: Any | None = None, loss_fn: TaskLoss | None = None) -> SharingProblem:
    """The SharingProblem of sharing one tensor per class plus a rank-r correction per member
    (``families`` with scheme ``relaxed``, ``rank``, class_params = d_out·d_in and member_params =
    r·(d_out + d_in)), pairwise costs (costs.py) and zero unary costs.

    Layers are discovered as for ``analyze`` and must be linear; ``config.relaxed`` sets ranks,
    whitening, output weighting and damping. With ``config.max_params_ratio`` the ranks are lowered
    (costs.ranks_within) until one class per family fits that budget. ``params`` of a layer stays
    its dense size, so ``max_params_ratio`` is a share of the dense shareable parameters.

    Raises:
        BackendError: ``loss_fn`` or ``kind='assignment'`` was given, or a layer is not linear.
        DiscoveryError: nothing shareable, or a rank above min(d_out, d_in).
    """
    config = config or AnalyzeConfig(scheme=Scheme.relaxed)
    if loss_fn is not None:
        raise BackendError("the relaxed scheme scores layer output error (layerwise curvature); it takes no task loss")
    if config.kind is not CostKind.pairwise:
        raise BackendError("the relaxed scheme has pairwise costs only; use kind='pairwise'")
    prep = prepare(model, data, config, tokenizer=tokenizer)
    layers = discover_layers(prep.model, config.targets, config.ignore, config.families)
    names = [x.name for x in layers]
    with torch.no_grad():
        try:
            weights = dense_weights(prep.model, names)
        except PlanError as exc:
            raise BackendError(f"{exc}; the relaxed scheme needs linear layers") from exc
        covs = relaxed_covariances(prep.model, prep.data, names, config, progress=config.progress)
        spectra = pair_pricer(prep.model, prep.data, layers, weights, covs, config)
    shapes = {x.name: (int(weights[x.name].shape[0]), int(weights[x.name].shape[1])) for x in layers}
    ranks = family_ranks(layers, shapes, config.relaxed)
    # no pair priced yet: the budget may lower the ranks, and relaxed_problem prices at the final ones
    matrix, unary = pair_matrix(len(layers), {})
    base = SharingProblem(
        layers=[Layer(name=x.name, family=x.family, params=x.params, index=x.index) for x in layers],
        costs=Costs(kind=CostKind.pairwise, matrix=matrix, unary=unary),
        constraints=Constraints(max_params_ratio=config.max_params_ratio),
        options=Options(seed=config.seed),
    )
    budget = base.budget_params()
    if budget is not None:
        ranks = ranks_within(family_shapes(base, shapes), family_sizes(base), ranks, budget)
    return relaxed_problem(base, spectra, ranks, shapes)


def pair_pricer(model: nn.Module, data: Calibration, layers: Sequence[LayerInfo | Layer], weights: Mapping[str, Tensor],
                covs: Mapping[str, Tensor] | None, config: AnalyzeConfig) -> PairPricer:
    """The pair costs ``config.relaxed.pricing`` asks for, of the (prepared) ``model`` on prepared
    ``data``: fits whitened by ``covs`` either way, priced by them (kronecker) or by the exact GGN's
    per-layer blocks on ``data`` (exact)."""
    options = config.relaxed
    if options.pricing is RelaxedPricing.exact:
        objective = Objective(model, data, [x.name for x in layers], config.distill)
        curvature = ExactCurvature(objective, config.curvature, chunk=config.chunk)
        return ExactPairCosts(layers, weights, covs, curvature, damping=options.damping, progress=config.progress)
    return PairSpectra(layers, weights, covs, damping=options.damping, progress=config.progress)


def candidate_pricer(model: nn.Module, data: Calibration, layers: Sequence[LayerInfo | Layer],
                     covs: Mapping[str, Tensor] | None, config: AnalyzeConfig, tokenizer: Any | None = None) -> PairPricer:
    """``pair_pricer`` of ``layers`` (a problem's) on raw ``data`` (prepared here): the costs of the
    plans at other ranks, priced as ``analyze_relaxed`` priced the problem's."""
    prep = prepare(model, data, config, tokenizer=tokenizer)
    with torch.no_grad():
        weights = dense_weights(prep.model, [x.name for x in layers])
    return pair_pricer(prep.model, prep.data, layers, weights, covs, config)


def family_shapes(problem: SharingProblem, shapes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Family -> (d_out, d_in) from layer name -> shape."""
    return {x.family: shapes[x.name] for x in problem.layers}


def family_sizes(problem: SharingProblem) -> dict[str, int]:
    """Family -> number of layers."""
    sizes: dict[str, int] = {}
    for x in problem.layers:
        sizes[x.family] = sizes.get(x.family, 0) + 1
    return sizes


def relaxed_problem(problem: SharingProblem, spectra: PairPricer, ranks: Mapping[str, int],
                    shapes: Mapping[str, tuple[int, int]], alone: Collection[str] = (),
                    basis: Mapping[str, Side] | None = None) -> SharingProblem:
    """``problem`` (its layers, constraints and options) with every family relaxed at ``ranks``
    (family -> correction rank) and the pair costs at those ranks; the families in ``alone`` keep no
    shared tensor (``FamilySpec.alone``: each layer its rank-r factors, its cost a unary), and those
    in ``basis`` (family -> shared side) share a basis of rank ``ranks[f]`` per class instead, with
    the basis scheme's costs under the same pricing (``PairPricer.basis``)."""
    basis = dict(basis or {})
    matrix, unary = spectra.costs({f: r for f, r in ranks.items() if f not in basis})
    for i, cost in spectra.alone(ranks, alone).items():
        unary[i] = cost
    if basis:
        excess, own = spectra.basis(ranks, basis)
        for (i, j), cost in excess.items():
            matrix[i][j] = matrix[j][i] = cost
        for i, cost in own.items():
            unary[i] = cost
    fam_shapes = family_shapes(problem, shapes)
    families = {
        fam: (basis_spec(ranks[fam], shape, basis[fam]) if fam in basis else
              FamilySpec(scheme=Scheme.relaxed, rank=ranks[fam], class_params=shape[0] * shape[1],
                         member_params=ranks[fam] * sum(shape), alone=True if fam in alone else None))
        for fam, shape in fam_shapes.items()
    }
    return problem.model_copy(update={"costs": Costs(kind=CostKind.pairwise, matrix=matrix, unary=unary),
                                      "families": families})


def has_relaxed(problem: SharingProblem | None) -> bool:
    """True when some family of ``problem`` uses the ``relaxed`` scheme."""
    return problem is not None and any(s.scheme is Scheme.relaxed for s in (problem.families or {}).values())


def relaxed_classes(plan: SharingPlan, problem: SharingProblem) -> list[list[str]]:
    """Every class of the plan whose family is relaxed, singletons included, in plan order.

    Raises:
        PlanError: the plan names layers the problem does not list.
    """
    return split_classes(plan.groups, plan.coloring, problem, Scheme.relaxed)[0]


def alone_layers(problem: SharingProblem) -> set[str]:
    """The layers of ``problem``'s alone families (no shared tensor, each its rank-r factors)."""
    families = problem.alone_families()
    return {x.name for x in problem.layers if x.family in families}


def rank_of(problem: SharingProblem) -> dict[str, int]:
    """Layer name -> correction rank for every layer of a relaxed family.

    Raises:
        PlanError: a relaxed family has no rank.
    """
    return basis_rank_of(problem, Scheme.relaxed)


def fitted_layers(problem: SharingProblem) -> list[str]:
    """Every layer the relaxed scheme fits in ``problem``, in problem order: its own families' and
    those of ``basis`` families beside them (a plan may keep some families as shared bases, which
    the relaxed scheme fits and installs under the same whitening; docs/design.md §Relaxed)."""
    fitted = {*rank_of(problem), *basis_rank_of(problem, Scheme.basis)}
    return [x.name for x in problem.layers if x.name in fitted]
