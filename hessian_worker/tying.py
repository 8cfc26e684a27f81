"""The tie scheme: every class of a plan becomes ONE nn.Parameter, in place, holding the merged value."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from hessian_worker.config import AnalyzeConfig, config_where, generator
from hessian_worker.curvature.diagonal import estimate_diagonal
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import DataSource
from hessian_worker.errors import PlanError
from hessian_worker.merge import Merge, merge_weights, plan_groups
from hessian_worker.objective import Objective
from hessian_worker.prepare import prepare
from hessian_worker.shared_params import tie, unique_params
from hessian_worker.weights_file import PLAN, load_tensors
from solver.schema import SharingPlan


class ApplyReport(BaseModel):
    """What tying did: unique parameters before and after, over the model and the plan's layers."""

    model_config = ConfigDict(extra="forbid")

    merge: Merge
    groups: int
    unique_params_before: int
    unique_params_after: int
    plan_params_original: int
    plan_params_shared: int
    ratio: float


def curvature_weights(
    model: nn.Module,
    data: DataSource,
    names: Sequence[str],
    config: AnalyzeConfig | None = None,
    *,
    tokenizer: Any | None = None,
) -> dict[str, Tensor]:
    """Per-element diagonal curvature (diagonal GGN by default) of ``names`` on ``data``: the
    weights of the curvature merge. Measured once, it serves every candidate plan and the apply."""
    config = config_where(config or AnalyzeConfig(progress=False), model.get_parameter(names[0]))
    prep = prepare(model, data, config, tokenizer=tokenizer)
    obj = Objective(prep.model, prep.data, list(names), config.distill)
    with torch.no_grad():
        return estimate_diagonal(obj, config.diagonal_method, probes=config.probes,
                                 generator=generator(config), kind=config.curvature)


def plan_names(plan: SharingPlan) -> list[str]:
    """Every layer a plan names: its coloring's, then any its groups add."""
    names = list(plan.coloring)
    for group in plan.groups:
        names.extend(n for n in group if n not in plan.coloring)
    return names


def apply_tie(
    model: nn.Module,
    plan: SharingPlan,
    merge: Merge | str = Merge.mean,
    *,
    data: DataSource | None = None,
    config: AnalyzeConfig | None = None,
    tokenizer: Any | None = None,
    diag: dict[str, Tensor] | None = None,
    layerwise: LayerwiseCurvature | None = None,
) -> ApplyReport:
    """Ties each class of ``plan`` to one Parameter, in place (like ``quantize_(model, config)``).

    The shared value is the mean, the representative (first layer of the group), ``curvature``
    (per-element Σ F_k⊙W_k / Σ F_k with F the diagonal GGN from ``data``), or ``layerwise``
    (the closed form (Σ W_k G_k)(Σ G_k)⁻¹ from layer input covariances on ``data``). ``diag``
    passes curvature weights measured already (see ``curvature_weights``), ``layerwise`` input
    covariances measured already; either way no data is needed.

    Raises:
        PlanError: the plan names unknown parameters or mixes shapes, or a curvature merge lacks data.
    """
    merge = Merge(merge)
    config = config or AnalyzeConfig(progress=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    groups = plan_groups(plan.groups, params)
    names = plan_names(plan)
    original = sum(params[n].numel() for n in names if n in params)
    before = unique_params(model)
    shared_names = [n for g in groups for n in g]
    if merge is not Merge.layerwise:
        layerwise = None
    needs_data = (merge is Merge.curvature and diag is None) or (merge is Merge.layerwise and layerwise is None)
    if needs_data and groups:
        if data is None:
            raise PlanError(f"merge={merge.value!r} needs calibration data (data=...) to measure curvature")
        if merge is Merge.curvature:
            diag = curvature_weights(model, data, shared_names, config, tokenizer=tokenizer)
        else:
            prep = prepare(model, data, config_where(config, model.get_parameter(shared_names[0])), tokenizer=tokenizer)
            layerwise = LayerwiseCurvature.collect(model, prep.data, shared_names, shrinkage=config.shrinkage)
    merged: list[Tensor] = []
    with torch.no_grad():
        for group in groups:
            ws = [params[n].detach() for n in group]
            if layerwise is not None:
                merged.append(layerwise.merge(group, {n: params[n].detach() for n in group},
                                              config.layerwise_damping))
            else:
                merged.append(merge_weights(ws, merge, diag=[diag[n] for n in group] if diag else None))
        tie(model, groups)
        for group, value in zip(groups, merged, strict=True):
            params[group[0]].copy_(value)
    after_params = dict(model.named_parameters(remove_duplicate=False))
    shared = sum(p.numel() for p in {id(after_params[n]): after_params[n] for n in names}.values())
    return ApplyReport(merge=merge, groups=len(groups), unique_params_before=before,
                       unique_params_after=unique_params(model), plan_params_original=original,
                       plan_params_shared=shared, ratio=shared / original if original else 1.0)


def load_tied(model: nn.Module, src: Path) -> SharingPlan:
    """The tie scheme's ``load_shared``: ties a fresh ``model`` by the saved plan, then loads the
    saved tensors into it (in place).

    Raises:
        PlanError: the model's names do not fit the saved ones.
    """
    meta = json.loads((src / PLAN).read_text(encoding="utf-8"))
    plan = SharingPlan.model_validate(meta["plan"])
    params = dict(model.named_parameters(remove_duplicate=False))
    tie(model, plan_groups(plan.groups, params))
    load_tensors(model, src, meta.get("aliases", {}), "load_shared")
    return plan
