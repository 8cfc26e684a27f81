"""The tie scheme's costs: the predicted loss change of sharing each same-family pair, and of a
whole plan, from a second-order model of the loss (docs/design.md §The cost model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hessian_worker.config import AnalyzeConfig, Backend, generator, torch_device
from hessian_worker.costs import FamilyPairs, PairPredict, cost_matrix
from hessian_worker.curvature.base import Curvature, PairCurvature, Params
from hessian_worker.curvature.diagonal import DiagonalCurvature, estimate_diagonal
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.curvature.functional import gradient
from hessian_worker.curvature.kfac import collect_factors
from hessian_worker.curvature.layerwise import LayerwiseCurvature, input_moments, linear_modules
from hessian_worker.curvature.projected import ProjectedCurvature
from hessian_worker.curvature.shrinkage import SecondMoments, needs_unit_squares, shrunk_covariance
from hessian_worker.data import Calibration, DataSource
from hessian_worker.discovery import LayerInfo, discover_layers
from hessian_worker.distributed import (
    SHARDING,
    Group,
    SummedForm,
    all_reduce_sums,
    broadcast,
    in_job,
    is_writer,
    join,
    shard,
    step,
)
from hessian_worker.errors import BackendError, DataError
from hessian_worker.losses import TaskLoss
from hessian_worker.merge import Merge, merge_weights, plan_groups
from hessian_worker.objective import Objective
from hessian_worker.prepare import Prepared, prepare
from solver.schema import Constraints, Costs, Layer, Options, Scheme, SharingPlan, SharingProblem

DATA_PARALLEL = (Backend.exact, Backend.layerwise)
"""In-memory backends whose forms are sums over the calibration batches, so a torch.distributed job
splits the batches and adds up the sums exactly. The others draw random probes or output labels
over the whole data (projected, diagonal, kfac in memory) and are run in one process."""


def build_curvature(obj: Objective, config: AnalyzeConfig, group: Group | None = None) -> Curvature:
    """The configured backend over the objective's names; with a ``group`` of several processes,
    ``obj`` holds this rank's batches and the form is summed over the ranks (DATA_PARALLEL only)."""
    gen = generator(config)
    if group is not None and group.world_size > 1:
        check_data_parallel(config)
        if config.backend is Backend.exact:
            return SummedForm(ExactCurvature(obj, config.curvature, chunk=config.chunk), group)
        return _summed_layerwise(obj, group, config)
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


def make_predict(obj: Objective, curvature: Curvature, group: Group | None = None) -> Predictor:
    """The predicted loss change under ``curvature``, with the first-order term of a task loss
    (with a ``group``: ``obj`` holds this rank's batches and the gradient is summed over the ranks)."""
    if obj.is_distill:
        return Predictor(curvature, None)
    with step(group, "the gradient"):
        grads = gradient(obj, obj.names)
    all_reduce_sums(group, list(grads.values()), "the gradient")
    return Predictor(curvature, grads)


def _summed_layerwise(obj: Objective, group: Group, config: AnalyzeConfig) -> LayerwiseCurvature:
    """The layerwise form from every rank's input moments (sums, row and sample counts, and the
    Ledoit–Wolf squares when the shrinkage needs them), added up before dividing and shrinking."""
    squares = needs_unit_squares(config.shrinkage)
    with step(group, "the layer input sums"):
        moments = input_moments(obj.model, obj.data, obj.names, squares=squares, progress=config.progress)
    all_reduce_sums(group, [moments[n].total for n in obj.names], "the layer input sums")
    counts = torch.tensor([[moments[n].rows, moments[n].units, moments[n].unit_square] for n in obj.names],
                          dtype=torch.float64)
    all_reduce_sums(group, [counts], "the layer input counts")
    covs, rhos = {}, {}
    for name, (rows, units, square) in zip(obj.names, counts.tolist(), strict=True):
        summed = SecondMoments(moments[name].total, rows=int(rows), units=int(units), unit_square=square)
        covs[name], rhos[name] = shrunk_covariance(summed, config.shrinkage)
    return LayerwiseCurvature(covs, {n: t for n, (_, t) in linear_modules(obj.model, obj.names).items()}, rhos)


def check_data_parallel(config: AnalyzeConfig) -> None:
    """Raises BackendError, before any work, for in-memory costs a torch.distributed job cannot split."""
    if config.scheme is not Scheme.tie or config.backend not in DATA_PARALLEL:
        raise BackendError(f"the in-memory analysis with scheme={config.scheme.value!r} and backend="
                           f"{config.backend.value!r} runs in one process; under torchrun use scheme 'tie' with "
                           f"backend {' or '.join(repr(b.value) for b in DATA_PARALLEL)} (the default is exact), "
                           "or run it without torchrun")


def to_problem(layers: Sequence[LayerInfo], matrix: list[list[float | None]], config: AnalyzeConfig) -> SharingProblem:
    return SharingProblem(
        layers=[Layer(name=x.name, family=x.family, params=x.params, index=x.index) for x in layers],
        costs=Costs(kind=config.kind, matrix=matrix),
        constraints=Constraints(max_params_ratio=config.max_params_ratio),
        options=Options(seed=config.seed),
    )


def tie_costs(model: nn.Module | str, data: DataSource, config: AnalyzeConfig, *, tokenizer: Any | None = None,
              loss_fn: TaskLoss | None = None) -> SharingProblem:
    """``analyze`` for the tie scheme (see hessian_worker.analysis.analyze).

    In a torch.distributed job (torchrun, or a process group initialized before the call) every
    rank loads the model, runs its share of the calibration batches (batch b on rank b % world_size)
    and the forms are summed over the ranks (DATA_PARALLEL backends); every rank returns rank 0's
    problem, its ``source`` recording world_size and each rank's samples.

    Raises:
        BackendError: a backend or scheme that does not split, under torchrun (before any work).
        DistributedError: another rank failed, or the ranks stopped answering within the timeout.
    """
    if in_job():
        check_data_parallel(config)
    group = join(torch_device(config))
    if not is_writer(group):
        config = config.model_copy(update={"progress": False})
    with step(group, "preparing the model and data"):
        prep = prepare(model, data, config, tokenizer=tokenizer)
    if group is not None and len(prep.data.batches) < group.world_size:
        raise DataError(f"{len(prep.data.batches)} calibration batches for {group.world_size} processes: every "
                        "process runs whole batches; give more samples, a smaller batch size, or fewer processes")
    with torch.no_grad():  # torch.func transforms differentiate anyway; no stray autograd graphs
        return broadcast(group, pair_costs(prep, config, loss_fn, group))


def pair_costs(prep: Prepared, config: AnalyzeConfig, loss_fn: TaskLoss | None,
               group: Group | None = None) -> SharingProblem:
    """The tie scheme's problem: the predicted loss change of sharing each same-family pair (with a
    ``group``: this rank's batches, the forms summed over the ranks)."""
    layers = discover_layers(prep.model, config.targets, config.ignore, config.families)
    names = [x.name for x in layers]
    sizes = prep.data.sizes
    data = prep.data if group is None else Calibration([prep.data.batches[b] for b in group.batches(len(sizes))])
    with step(group, "the reference outputs"):
        obj = Objective(prep.model, data, names, config.distill, loss_fn, total=prep.data.num_samples)
    predict = make_predict(obj, build_curvature(obj, config, group), group)
    matrix = cost_matrix(layers, obj.params0, predict, config.kind, predict_pairs=predict.pair_route,
                         chunk=config.chunk, progress=config.progress)
    problem = to_problem(layers, matrix, config)
    if group is None:
        return problem
    return problem.model_copy(update={"source": {
        "world_size": group.world_size, "sharding": SHARDING,
        "rank_samples": [sum(sizes[b] for b in shard(len(sizes), r, group.world_size))
                         for r in range(group.world_size)]}})


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
