"""The tie scheme's costs: the predicted loss change of sharing each same-family pair, and of a
whole plan, from a second-order model of the loss (docs/design.md §The cost model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hessian_worker.config import AnalyzeConfig, Backend, generator
from hessian_worker.costs import FamilyPairs, PairPredict, cost_matrix
from hessian_worker.curvature.base import Curvature, PairCurvature, Params
from hessian_worker.curvature.diagonal import DiagonalCurvature, estimate_diagonal
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.curvature.functional import gradient
from hessian_worker.curvature.kfac import collect_factors
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.curvature.projected import ProjectedCurvature
from hessian_worker.data import DataSource
from hessian_worker.discovery import LayerInfo, discover_layers
from hessian_worker.errors import BackendError
from hessian_worker.losses import TaskLoss
from hessian_worker.merge import Merge, merge_weights, plan_groups
from hessian_worker.objective import Objective
from hessian_worker.prepare import Prepared, prepare
from solver.schema import Constraints, Costs, Layer, Options, SharingPlan, SharingProblem


def build_curvature(obj: Objective, config: AnalyzeConfig) -> Curvature:
    """The configured backend over the objective's names."""
    gen = generator(config)
    if config.backend is Backend.exact:
        return ExactCurvature(obj, config.curvature, chunk=config.chunk)
    if config.backend is Backend.projected:
        return ProjectedCurvature(obj, rank=config.rank, generator=gen, kind=config.curvature,
                                  eigensolver=config.eigensolver, bulk=config.bulk, oversample=config.oversample,
                                  precision=config.sketch_precision,
                                  iters=config.lanczos_iters, probes=config.probes,
                                  memory_limit_gb=config.memory_limit_gb, chunk=config.chunk,
                                  progress=config.progress)
    if config.backend is Backend.diagonal:
        return DiagonalCurvature(estimate_diagonal(obj, config.diagonal_method, probes=config.probes,
                                                   generator=gen, kind=config.curvature,
                                                   progress=config.progress))
    if config.backend is Backend.kfac:
        if not obj.is_distill:
            raise BackendError("the kfac backend samples the distillation loss's output curvature; with a task "
                               "loss use backend='exact', 'diagonal' or 'layerwise'")
        k = config.kfac
        return collect_factors(obj.model, obj.data, obj.names, loss=obj.out_loss.__name__, rank=k.rank,
                               oversample=k.oversample, output=k.output, seed=config.seed,
                               gradient_samples=k.gradient_samples, approximation=k.approximation,
                               progress=config.progress)
    return LayerwiseCurvature.collect(obj.model, obj.data, obj.names, shrinkage=config.shrinkage,
                                      progress=config.progress)


@dataclass
class Predictor:
    """δ -> gᵀδ + ½δᵀHδ; ``grads`` is None under self-distillation (zero gradient at the reference)."""

    curvature: Curvature
    grads: Params | None

    def __call__(self, deltas: Mapping[str, Tensor]) -> Tensor:
        value = 0.5 * self.curvature.quad(deltas)
        if self.grads is not None:
            for name, d in deltas.items():
                value = value + (d * self.grads[name]).reshape(d.shape[0], -1).sum(dim=1)
        return value

    def family_pairs(self, family: FamilyPairs) -> Tensor:
        """The same for every pair of a family, through the backend's ``quad_pairs``."""
        if not isinstance(self.curvature, PairCurvature):
            raise TypeError(f"{type(self.curvature).__name__} has no pair route: use pair_route, which is None for it")
        value = 0.5 * self.curvature.quad_pairs(family)
        return value + family.linear(self.grads) if self.grads is not None else value

    @property
    def pair_route(self) -> PairPredict | None:
        """``family_pairs`` where the backend prices pairs from per-layer quantities, else None
        (the pairs then go as dense directions through ``__call__``)."""
        return self.family_pairs if isinstance(self.curvature, PairCurvature) else None


def make_predict(obj: Objective, curvature: Curvature) -> Predictor:
    """The predicted loss change under ``curvature``, with the first-order term of a task loss."""
    return Predictor(curvature, None if obj.is_distill else gradient(obj, obj.names))


def to_problem(layers: Sequence[LayerInfo], matrix: list[list[float | None]], config: AnalyzeConfig) -> SharingProblem:
    return SharingProblem(
        layers=[Layer(name=x.name, family=x.family, params=x.params, index=x.index) for x in layers],
        costs=Costs(kind=config.kind, matrix=matrix),
        constraints=Constraints(max_params_ratio=config.max_params_ratio),
        options=Options(seed=config.seed),
    )


def tie_costs(model: nn.Module | str, data: DataSource, config: AnalyzeConfig, *, tokenizer: Any | None = None,
              loss_fn: TaskLoss | None = None) -> SharingProblem:
    """``analyze`` for the tie scheme (see hessian_worker.analysis.analyze)."""
    prep = prepare(model, data, config, tokenizer=tokenizer)
    with torch.no_grad():  # torch.func transforms differentiate anyway; no stray autograd graphs
        return pair_costs(prep, config, loss_fn)


def pair_costs(prep: Prepared, config: AnalyzeConfig, loss_fn: TaskLoss | None) -> SharingProblem:
    """The tie scheme's problem: the predicted loss change of sharing each same-family pair."""
    layers = discover_layers(prep.model, config.targets, config.ignore, config.families)
    names = [x.name for x in layers]
    obj = Objective(prep.model, prep.data, names, config.distill, loss_fn)
    predict = make_predict(obj, build_curvature(obj, config))
    matrix = cost_matrix(layers, obj.params0, predict, config.kind, predict_pairs=predict.pair_route,
                         chunk=config.chunk, progress=config.progress)
    return to_problem(layers, matrix, config)


def plan_perturbation(params: Mapping[str, Tensor], groups: Sequence[Sequence[str]], merge: Merge,
                      diag: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """δ_k = W*_S − W_k for every member of every sharing group (one joint perturbation)."""
    delta = {}
    for group in plan_groups(groups, params):
        ws = [params[n] for n in group]
        fs = [diag[n] for n in group] if diag is not None else None
        merged = merge_weights(ws, merge, diag=fs)
        for n, w in zip(group, ws, strict=True):
            delta[n] = merged - w
    return delta


def predict_plan_loss(
    model: nn.Module | str,
    data: DataSource,
    plan: SharingPlan | Sequence[Sequence[str]],
    config: AnalyzeConfig | None = None,
    *,
    merge: Merge | str = Merge.mean,
    tokenizer: Any | None = None,
    loss_fn: TaskLoss | None = None,
) -> float:
    """Predicted ΔL of a whole plan: one quadratic form over all classes' real merged perturbations.

    Unlike summing pair costs, this has no over-counting of large classes and includes the
    curvature between classes. The backend comes from ``config`` (``exact`` by default).
    """
    config = config or AnalyzeConfig()
    merge = Merge(merge)
    groups = plan.groups if isinstance(plan, SharingPlan) else plan
    prep = prepare(model, data, config, tokenizer=tokenizer)
    with torch.no_grad():
        return _predict_plan(prep, groups, config, merge, loss_fn)


def _predict_plan(prep: Prepared, groups: Sequence[Sequence[str]], config: AnalyzeConfig, merge: Merge,
                  loss_fn: TaskLoss | None) -> float:
    params = {n: p.detach() for n, p in prep.model.named_parameters()}
    shared = [n for g in plan_groups(groups, params) for n in g]
    if not shared:
        return 0.0
    obj = Objective(prep.model, prep.data, shared, config.distill, loss_fn)
    diag = None
    if merge is Merge.curvature:
        diag = estimate_diagonal(obj, config.diagonal_method, probes=config.probes,
                                 generator=generator(config), kind=config.curvature)
    if merge is Merge.layerwise:
        lw = LayerwiseCurvature.collect(prep.model, prep.data, shared, shrinkage=config.shrinkage)
        delta = {}
        for group in plan_groups(groups, params):
            merged = lw.merge(group, params, config.layerwise_damping)
            delta.update({n: merged - params[n] for n in group})
    else:
        delta = plan_perturbation(params, groups, merge, diag)
    predict = make_predict(obj, build_curvature(obj, config))
    return float(predict({n: d.unsqueeze(0) for n, d in delta.items()})[0])
