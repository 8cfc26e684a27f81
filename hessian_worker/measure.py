"""measure_loss: the real calibration-loss change of a (shared) model against its reference."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hessian_worker.config import AnalyzeConfig, generator, torch_device, torch_dtype
from hessian_worker.curvature.diagonal import estimate_diagonal
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import DataSource, call_model
from hessian_worker.losses import TaskLoss, extract_output
from hessian_worker.merge import Merge, merge_weights, plan_groups
from hessian_worker.objective import Objective
from hessian_worker.pair_costs import make_predict
from hessian_worker.prepare import prepare
from hessian_worker.schemes import scheme_of
from solver.schema import SharingPlan, SharingProblem


def measure_loss(
    model: nn.Module,
    reference: nn.Module,
    data: DataSource,
    config: AnalyzeConfig | None = None,
    *,
    tokenizer: Any | None = None,
    loss_fn: TaskLoss | None = None,
) -> float:
    """L(model) − L(reference) on ``data`` (use held-out samples): the measured figure beside the
    predicted one.

    Under self-distillation the reference's loss against itself is 0, so this is the distillation
    loss of ``model`` against the reference's outputs.
    """
    config = config or AnalyzeConfig(progress=False)
    prep = prepare(reference, data, config, tokenizer=tokenizer)
    model.to(device=torch_device(config), dtype=torch_dtype(config.dtype))
    return objective_loss(model, Objective(prep.model, prep.data, [], config.distill, loss_fn))


def objective_loss(model: nn.Module, reference: Objective) -> float:
    """L(model) − L(reference) on the reference objective's data, whose reference outputs are
    computed once: for a model checked many times against the same samples (healing's checks)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for b, (batch, w) in enumerate(zip(reference.data.batches, reference.weights, strict=True)):
            y = extract_output(call_model(model, batch), batch)[0]
            change = reference.loss_on_output(y, b)
            if not reference.is_distill:
                change = change - reference.loss_on_output(reference.targets[b], b)
            total += w * float(change)
    return total


def measure_plans(
    model: nn.Module | str,
    data: DataSource,
    plans: Sequence[SharingPlan | Sequence[Sequence[str]]],
    config: AnalyzeConfig | None = None,
    *,
    merge: Merge | str = Merge.mean,
    tokenizer: Any | None = None,
    loss_fn: TaskLoss | None = None,
    diag: dict[str, Tensor] | None = None,
    problem: SharingProblem | None = None,
    covs: dict[str, Tensor] | None = None,
    layerwise: LayerwiseCurvature | None = None,
) -> list[float]:
    """Real calibration-loss change of each candidate plan, without touching the model.

    Each plan's merged weights are substituted with ``functional_call``, so one model and one set
    of reference outputs serve every candidate: this is how the pipeline picks among the solver's
    diverse good plans by a real forward pass (docs/design.md §Why measure).
    Curvature weights for ``merge=curvature``
    are measured once over the union of the plans' layers (or passed in as ``diag``); so are the
    input covariances of ``merge=layerwise`` (or passed in as ``layerwise``: give the ones the final
    apply uses, so the plan measured is the plan applied).

    With a ``problem`` whose families use another scheme than ``tie``, that scheme's classes hold
    what ``apply_plan(..., problem=problem)`` installs (hessian_worker.schemes: ``substitutes``);
    ``merge`` then applies to the other families. ``basis``: each class's low-rank weights B_c·C_ℓ
    (singletons too), whitened (``config.basis.whiten``) by the scheme's covariances measured on
    ``data`` (``basis.scales.basis_covariances``: output-scaled unless
    ``config.basis.output_weighting`` is off), or by ``covs`` (pass the ones apply will use, so the
    measured plan is the applied one).
    """
    return [m for m, _ in _outcomes(model, data, plans, config, merge=merge, tokenizer=tokenizer, loss_fn=loss_fn,
                                    diag=diag, problem=problem, covs=covs, layerwise=layerwise, predict=False)]


def measure_and_predict(
    model: nn.Module | str,
    data: DataSource,
    plans: Sequence[SharingPlan | Sequence[Sequence[str]]],
    config: AnalyzeConfig | None = None,
    *,
    merge: Merge | str = Merge.mean,
    tokenizer: Any | None = None,
    loss_fn: TaskLoss | None = None,
    diag: dict[str, Tensor] | None = None,
    problem: SharingProblem | None = None,
    covs: dict[str, Tensor] | None = None,
    layerwise: LayerwiseCurvature | None = None,
) -> list[tuple[float, float | None]]:
    """(measured, predicted) loss change of each candidate on ``data`` (arguments as ``measure_plans``).

    The prediction is the second-order model of the whole calibration loss, gᵀδ + ½δᵀGδ with the
    exact GGN (one forward-mode pass per candidate), at the candidate's real perturbation δ (the
    weights ``measure_plans`` substitutes minus the reference's), whatever the scheme: one scale
    for tied, low-rank and any other candidates. The schemes' own costs are not: the basis costs
    score a basis under the covariances it was fitted to (on MiniLM the same perturbation predicts
    0.11 there and 0.9 on other samples), and summed pair costs over-count classes of more than two.
    Give ``data`` the candidates were not fitted on. A model with an operation that has no
    forward-mode derivative gets None predictions (with a warning) and its measured losses.
    """
    return _outcomes(model, data, plans, config, merge=merge, tokenizer=tokenizer, loss_fn=loss_fn, diag=diag,
                     problem=problem, covs=covs, layerwise=layerwise, predict=True)


def _outcomes(
    model: nn.Module | str,
    data: DataSource,
    plans: Sequence[SharingPlan | Sequence[Sequence[str]]],
    config: AnalyzeConfig | None,
    *,
    merge: Merge | str,
    tokenizer: Any | None,
    loss_fn: TaskLoss | None,
    diag: dict[str, Tensor] | None,
    problem: SharingProblem | None,
    covs: dict[str, Tensor] | None,
    layerwise: LayerwiseCurvature | None,
    predict: bool,
) -> list[tuple[float, float | None]]:
    config = config or AnalyzeConfig(progress=False)
    merge = Merge(merge)
    prep = prepare(model, data, config, tokenizer=tokenizer)
    params = {n: p.detach() for n, p in prep.model.named_parameters()}
    basis = scheme_of(problem).substitutes(prep, problem, config, covs) if problem is not None else None
    split = [basis.split(plan) if basis is not None else ([], _groups(plan)) for plan in plans]
    all_groups = [other for _, other in split]
    union = sorted({n for groups in all_groups for g in plan_groups(groups, params) for n in g})
    if predict and basis is not None:  # the prediction differentiates every substituted weight
        union = sorted(set(union) | {n for classes, _ in split for c in classes for n in c})
    obj = Objective(prep.model, prep.data, union, config.distill, loss_fn)
    second_order = make_predict(obj, ExactCurvature(obj, config.curvature, chunk=1)) if predict else None
    out: list[tuple[float, float | None]] = []
    with torch.no_grad():
        if merge is Merge.curvature and union and diag is None:
            diag = estimate_diagonal(obj, config.diagonal_method, probes=config.probes,
                                     generator=generator(config), kind=config.curvature)
        if merge is not Merge.layerwise or not union:
            layerwise = None
        elif layerwise is None:
            layerwise = LayerwiseCurvature.collect(prep.model, prep.data, union, shrinkage=config.shrinkage)
        base = float(obj.loss({})) if loss_fn is not None else 0.0
        for classes, groups in tqdm(split, desc="plans", disable=not config.progress, leave=False):
            merged: dict[str, Tensor] = basis.weights_of(classes) if basis is not None else {}
            for group in plan_groups(groups, params):
                if layerwise is not None:
                    value = layerwise.merge(group, params, config.layerwise_damping)
                else:
                    value = merge_weights([params[n] for n in group], merge,
                                          diag=[diag[n] for n in group] if diag is not None else None)
                merged.update(dict.fromkeys(group, value))
            predicted = None
            if second_order is not None:
                delta = {n: (w - params[n]).unsqueeze(0) for n, w in merged.items()}
                try:
                    predicted = float(second_order(delta)[0]) if delta else 0.0
                except (RuntimeError, NotImplementedError) as exc:  # an op without forward-mode AD
                    warnings.warn(f"no second-order prediction for this model ({exc}); measuring only",
                                  stacklevel=2)
                    second_order = None
            out.append((float(obj.loss(merged)) - base, predicted))
    return out


def _groups(plan: SharingPlan | Sequence[Sequence[str]]) -> Sequence[Sequence[str]]:
    return plan.groups if isinstance(plan, SharingPlan) else plan
