"""analyze_basis(model, data, config) -> SharingProblem for the ``basis`` scheme, and exact
re-scoring of a finished plan (the whitened error of each class's real shared basis).

The curvature is the layerwise one (input covariances from one streaming forward pass), by default
scaled per layer by its output-side curvature (scales.py: one diagonal-GGN estimate), so the costs
are predicted loss changes: the whitening of decompose.py needs the covariances, and they are what
makes the costs cheap. ``config.backend`` therefore does not apply here; it stays the tie scheme's
choice.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from hessian_worker.basis.costs import basis_costs, class_errors, family_ranks, family_sides
from hessian_worker.basis.scales import basis_covariances
from hessian_worker.config import AnalyzeConfig
from hessian_worker.data import DataSource
from hessian_worker.discovery import discover_layers
from hessian_worker.errors import BackendError, PlanError
from hessian_worker.factored.layers import dense_weights
from hessian_worker.losses import TaskLoss
from hessian_worker.prepare import prepare
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


def analyze_basis(
    model: nn.Module | str,
    data: DataSource,
    config: AnalyzeConfig | None = None,
    *,
    tokenizer: Any | None = None,
    loss_fn: TaskLoss | None = None,
) -> SharingProblem:
    """The SharingProblem of sharing one low-rank basis per class (``families`` with scheme
    ``basis``, ``rank``, ``side``, ``class_params`` and ``member_params``, plus ``costs.unary``).

    Side ``out`` shares B (d_out × r): class_params = d_out·r, member_params = r·d_in; side ``in``
    shares B (r × d_in): class_params = r·d_in, member_params = d_out·r. ``config.basis.side``
    (default ``auto``) picks per family the side that saves more.

    Layers are discovered as for ``analyze`` (``targets``/``ignore``/``families``) and must be
    linear; ``config.basis`` sets ranks, whitening, output weighting and damping. With
    ``output_weighting`` (default) the costs are predicted loss changes of the calibration loss
    (``config.distill``), on the tie scheme's scale; without, mean squared layer-output changes. ``params`` of a layer stays its dense
    size, so ``max_params_ratio`` is a share of the dense shareable parameters.

    Raises:
        BackendError: ``loss_fn`` or ``kind='assignment'`` was given (the scheme's costs are the
            layerwise pairwise ones), or a discovered layer is not linear.
        DiscoveryError: nothing shareable, or a rank above min(d_out, d_in).
    """
    config = config or AnalyzeConfig(scheme=Scheme.basis)
    if loss_fn is not None:
        raise BackendError(
            "the basis scheme scores layer output error (layerwise curvature); it takes no task loss"
        )
    if config.kind is not CostKind.pairwise:
        raise BackendError(
            "the basis scheme has pairwise costs only (a shared basis has no representative); use kind='pairwise'"
        )
    prep = prepare(model, data, config, tokenizer=tokenizer)
    layers = discover_layers(prep.model, config.targets, config.ignore, config.families)
    names = [x.name for x in layers]
    options = config.basis
    with torch.no_grad():
        try:
            weights = dense_weights(prep.model, names)
        except PlanError as exc:
            raise BackendError(f"{exc}; the basis scheme needs linear layers") from exc
        covs = (
            basis_covariances(prep.model, prep.data, names, config, progress=config.progress)
            if options.whiten
            else None
        )
        shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
        ranks = family_ranks(layers, shapes, options)
        sides = family_sides(layers, shapes, options)
        matrix, unary = basis_costs(
            layers,
            weights,
            covs,
            ranks,
            damping=options.damping,
            progress=config.progress,
            sides=sides,
        )
    families = {x.family: basis_spec(ranks[x.family], shapes[x.name], sides[x.family]) for x in layers}
    return SharingProblem(
        layers=[
            Layer(name=x.name, family=x.family, params=x.params, index=x.index) for x in layers
        ],
        costs=Costs(kind=CostKind.pairwise, matrix=matrix, unary=unary),
        constraints=Constraints(max_params_ratio=config.max_params_ratio),
        options=Options(seed=config.seed),
        families=families,
    )


class ClassScore(BaseModel):
    """One class: its exact whitened error beside the solver's pairwise figure for it."""

    model_config = ConfigDict(extra="forbid")

    members: list[str]
    rank: int
    side: Side = Side.out
    error: float
    pairwise: float | None = None


class BasisScore(BaseModel):
    """Exact re-scoring of a basis plan: Σ over classes of E*(class); ``objective`` is the
    solver's Σ unary + Σ pair costs (equal when no class has more than two members)."""

    model_config = ConfigDict(extra="forbid")

    total: float
    objective: float | None
    classes: list[ClassScore]


def basis_spec(rank: int, shape: tuple[int, int], side: Side) -> FamilySpec:
    """The FamilySpec of a family sharing a rank-``rank`` basis per class on ``side``: the shared
    factor d_out·r (out) or r·d_in (in) once, each member's coefficients r·d_in (out) or d_out·r (in)."""
    d_out, d_in = shape
    shared, own = (d_out * rank, rank * d_in) if side is Side.out else (rank * d_in, d_out * rank)
    return FamilySpec(scheme=Scheme.basis, rank=rank, side=side, class_params=shared, member_params=own)


def basis_classes(plan: SharingPlan, problem: SharingProblem) -> list[list[str]]:
    """Every class of the plan whose family has scheme ``basis``, singletons included, in plan order.

    Raises:
        PlanError: the plan names layers the problem does not list.
    """
    return split_classes(plan.groups, plan.coloring, problem)[0]


def split_classes(
    groups: Sequence[Sequence[str]],
    coloring: Mapping[str, int],
    problem: SharingProblem,
    scheme: Scheme | Collection[Scheme] = Scheme.basis,
) -> tuple[list[list[str]], list[list[str]]]:
    """(classes of ``scheme`` families (or of any of several schemes), classes of the other
    families) of a plan's ``groups`` plus the layers ``coloring`` names outside them (a plan may
    list only the groups that share).

    Raises:
        PlanError: the plan names layers the problem does not list.
    """
    family = {x.name: x.family for x in problem.layers}
    specs = problem.families or {}
    unknown = [n for n in coloring if n not in family] + [
        n for g in groups for n in g if n not in family
    ]
    if unknown:
        raise PlanError(f"plan names layers the problem does not list: {unknown[:5]}")
    classes = [list(g) for g in groups if g]
    listed = {n for g in classes for n in g}
    extra: dict[int, list[str]] = {}
    for name, color in coloring.items():
        if name not in listed:
            extra.setdefault(color, []).append(name)
    classes += list(extra.values())
    wanted = {scheme} if isinstance(scheme, Scheme) else set(scheme)
    basis, other = [], []
    for group in classes:
        spec = specs.get(family[group[0]])
        (basis if spec is not None and spec.scheme in wanted else other).append(group)
    return basis, other


def has_basis(problem: SharingProblem | None) -> bool:
    """True when some family of ``problem`` uses the ``basis`` scheme."""
    return problem is not None and any(
        s.scheme is Scheme.basis for s in (problem.families or {}).values()
    )


def rank_of(problem: SharingProblem, scheme: Scheme = Scheme.basis) -> dict[str, int]:
    """Layer name -> rank for every layer of a family of ``scheme`` (basis: its basis rank;
    relaxed: its correction rank).

    Raises:
        PlanError: such a family has no rank.
    """
    specs = problem.families or {}
    out = {}
    for x in problem.layers:
        spec = specs.get(x.family)
        if spec is not None and spec.scheme is scheme:
            if spec.rank is None:
                raise PlanError(
                    f"family {x.family!r} has scheme {scheme.value!r} but no rank; set families[...].rank"
                )
            out[x.name] = spec.rank
    return out


def side_of(problem: SharingProblem) -> dict[str, Side]:
    """Layer name -> shared side for every layer of a basis family (out when not given)."""
    specs = problem.families or {}
    out = {}
    for x in problem.layers:
        spec = specs.get(x.family)
        if spec is not None and spec.scheme is Scheme.basis:
            out[x.name] = spec.basis_side
    return out


def rescore_basis_plan(
    model: nn.Module | str,
    data: DataSource,
    plan: SharingPlan,
    problem: SharingProblem,
    config: AnalyzeConfig | None = None,
    *,
    tokenizer: Any | None = None,
) -> BasisScore:
    """The exact step-1 error of every basis class of ``plan`` (no pairwise over-counting).

    ``model`` is the original (dense) model; ``config`` should be the one the problem was built
    with (same data, damping, whitening, output weighting), so errors are in the costs' units.
    """
    config = config or AnalyzeConfig(scheme=Scheme.basis)
    classes = basis_classes(plan, problem)
    ranks = rank_of(problem)
    prep = prepare(model, data, config, tokenizer=tokenizer)
    names = [n for c in classes for n in c]
    with torch.no_grad():
        weights = dense_weights(prep.model, names)
        covs = (
            basis_covariances(prep.model, prep.data, names, config) if config.basis.whiten else None
        )
    return score_classes(
        classes,
        weights,
        covs,
        ranks,
        problem,
        damping=config.basis.damping,
        sides=side_of(problem),
    )


def score_classes(
    classes: Sequence[Sequence[str]],
    weights: Mapping[str, Tensor],
    covs: Mapping[str, Tensor] | None,
    ranks: Mapping[str, int],
    problem: SharingProblem | None = None,
    *,
    damping: float = 0.01,
    sides: Mapping[str, Side] | None = None,
) -> BasisScore:
    """BasisScore from weights and covariances already at hand (pure; what the tests check).

    ``sides`` maps layer names to their side (default: out).
    """
    sides = sides or {}
    errors = class_errors(classes, weights, covs, ranks, damping=damping, side_of=sides)
    pos = {x.name: i for i, x in enumerate(problem.layers)} if problem is not None else {}
    scores = []
    for names, err in zip(classes, errors, strict=True):
        pairwise = None
        if problem is not None:
            idx = [pos[n] for n in names]
            m, u = problem.costs.matrix, problem.costs.unary or [0.0] * len(pos)
            pairwise = sum(u[i] for i in idx) + sum(
                m[a][b] or 0.0 for k, a in enumerate(idx) for b in idx[k + 1 :]
            )
        scores.append(
            ClassScore(
                members=list(names),
                rank=ranks[names[0]],
                side=sides.get(names[0], Side.out),
                error=err,
                pairwise=pairwise,
            )
        )
    objective = (
        sum(s.pairwise for s in scores if s.pairwise is not None) if problem is not None else None
    )
    return BasisScore(total=sum(errors), objective=objective, classes=scores)
