"""Pick the plan that really loses least: measure every candidate on calibration data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from hessian_worker.config import AnalyzeConfig
from hessian_worker.data import DataSource
from hessian_worker.measure import measure_plans
from hessian_worker.merge import Merge
from solver.schema import SharingPlan, SharingProblem


class Choice(BaseModel):
    """The chosen plan and every candidate's measured calibration-loss change (same order)."""

    plan: SharingPlan
    index: int
    measured: list[float]


def choose_plan(
    model: Any,
    data: DataSource,
    plans: Sequence[SharingPlan],
    config: AnalyzeConfig | None = None,
    *,
    merge: Merge | str = Merge.mean,
    tokenizer: Any | None = None,
    diag: dict[str, Any] | None = None,
    problem: SharingProblem | None = None,
    covs: dict[str, Any] | None = None,
    layerwise: Any | None = None,
) -> Choice:
    """The candidate with the least measured loss change after merging (ties: the earlier one).

    The model is not changed: merged weights are substituted per candidate (see measure_plans);
    ``diag`` and ``layerwise`` pass merge curvature measured already; ``problem`` (and ``covs``) make the
    classes of ``basis`` families their low-rank weights.
    """
    if not plans:
        raise ValueError("choose_plan needs at least one candidate plan")
    measured = measure_plans(model, data, list(plans), config, merge=merge, tokenizer=tokenizer, diag=diag,
                             problem=problem, covs=covs, layerwise=layerwise)
    index = min(range(len(plans)), key=lambda i: (measured[i], i))
    return Choice(plan=plans[index], index=index, measured=measured)
