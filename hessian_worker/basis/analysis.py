"""analyze_basis(model, data, config) -> SharingProblem for the ``basis`` scheme, and exact
re-scoring of a finished plan (the whitened error of each class's real shared basis).

The curvature is always the layerwise one (input covariances from one streaming forward pass):
the whitening of decompose.py needs it, and it is what makes the costs cheap. ``config.backend``
therefore does not apply here; it stays the tie scheme's choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from hessian_worker.analysis import prepare
from hessian_worker.basis.costs import basis_costs, class_errors, family_ranks
from hessian_worker.basis.modules import dense_weights
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import input_covariances
from hessian_worker.data import DataSource
from hessian_worker.discovery import discover_layers
from hessian_worker.errors import BackendError, PlanError
from hessian_worker.losses import TaskLoss
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
    ``basis``, ``rank``, ``class_params`` = d_out·r, ``member_params`` = r·d_in, plus ``costs.unary``).

    Layers are discovered as for ``analyze`` (``targets``/``ignore``/``families``) and must be
    linear; ``config.basis`` sets ranks, whitening and damping. ``params`` of a layer stays its dense
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
            input_covariances(prep.model, prep.data, names, progress=config.progress)
            if options.whiten
            else None
        )
        shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
        ranks = family_ranks(layers, shapes, options)
        matrix, unary = basis_costs(
            layers, weights, covs, ranks, damping=options.damping, progress=config.progress
        )
    families = {}
    for x in layers:
        d_out, d_in = shapes[x.name]
        r = ranks[x.family]
        families[x.family] = FamilySpec(
            scheme=Scheme.basis, rank=r, class_params=d_out * r, member_params=r * d_in
        )
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
    error: float
    pairwise: float | None = None


class BasisScore(BaseModel):
    """Exact re-scoring of a basis plan: Σ over classes of E*(class); ``objective`` is the
    solver's Σ unary + Σ pair costs (equal when no class has more than two members)."""

    model_config = ConfigDict(extra="forbid")

    total: float
    objective: float | None
    classes: list[ClassScore]


def basis_classes(plan: SharingPlan, problem: SharingProblem) -> list[list[str]]:
    """Every class of the plan whose family has scheme ``basis``, singletons included, in plan order.

    Raises:
        PlanError: the plan names layers the problem does not list.
    """
    family = {x.name: x.family for x in problem.layers}
    specs = problem.families or {}
    unknown = [n for n in plan.coloring if n not in family] + [
        n for g in plan.groups for n in g if n not in family
    ]
    if unknown:
        raise PlanError(f"plan names layers the problem does not list: {unknown[:5]}")
    classes = [list(g) for g in plan.groups]
    listed = {n for g in classes for n in g}
    extra: dict[int, list[str]] = {}
    for name, color in plan.coloring.items():
        if name not in listed:
            extra.setdefault(color, []).append(name)
    classes += list(extra.values())
    out = []
    for group in classes:
        spec = specs.get(family[group[0]])
        if group and spec is not None and spec.scheme is Scheme.basis:
            out.append(group)
    return out


def rank_of(problem: SharingProblem) -> dict[str, int]:
    """Layer name -> rank for every layer of a basis family.

    Raises:
        PlanError: a basis family has no rank.
    """
    specs = problem.families or {}
    out = {}
    for x in problem.layers:
        spec = specs.get(x.family)
        if spec is not None and spec.scheme is Scheme.basis:
            if spec.rank is None:
                raise PlanError(
                    f"family {x.family!r} has scheme 'basis' but no rank; set families[...].rank"
                )
            out[x.name] = spec.rank
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
    with (same data, damping, whitening).
    """
    config = config or AnalyzeConfig(scheme=Scheme.basis)
    classes = basis_classes(plan, problem)
    ranks = rank_of(problem)
    prep = prepare(model, data, config, tokenizer=tokenizer)
    names = [n for c in classes for n in c]
    with torch.no_grad():
        weights = dense_weights(prep.model, names)
        covs = input_covariances(prep.model, prep.data, names) if config.basis.whiten else None
    return score_classes(classes, weights, covs, ranks, problem, damping=config.basis.damping)


def score_classes(
    classes: Sequence[Sequence[str]],
    weights: Mapping[str, Tensor],
    covs: Mapping[str, Tensor] | None,
    ranks: Mapping[str, int],
    problem: SharingProblem | None = None,
    *,
    damping: float = 0.01,
) -> BasisScore:
    """BasisScore from weights and covariances already at hand (pure; what the tests check)."""
    errors = class_errors(classes, weights, covs, ranks, damping=damping)
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
            ClassScore(members=list(names), rank=ranks[names[0]], error=err, pairwise=pairwise)
        )
    objective = (
        sum(s.pairwise for s in scores if s.pairwise is not None) if problem is not None else None
    )
    return BasisScore(total=sum(errors), objective=objective, classes=scores)
