"""apply_plan: install a plan in a model, in place, by the scheme its problem's families use."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import DataSource
from hessian_worker.merge import Merge
from hessian_worker.schemes import State, scheme_of
from hessian_worker.tying import ApplyReport, curvature_weights, tie, unique_params
from solver.schema import SharingPlan, SharingProblem

__all__ = ["ApplyReport", "apply_plan", "curvature_weights", "tie", "unique_params"]


def apply_plan(
    model: nn.Module,
    plan: SharingPlan,
    merge: Merge | str = Merge.mean,
    *,
    data: DataSource | None = None,
    config: AnalyzeConfig | None = None,
    tokenizer: Any | None = None,
    problem: SharingProblem | None = None,
    diag: dict[str, Tensor] | None = None,
    layerwise: LayerwiseCurvature | None = None,
    state: State = None,
) -> ApplyReport:
    """Installs ``plan`` in ``model``, in place (like ``quantize_(model, config)``).

    Without ``problem``, or when its families all use ``tie``, each class becomes one Parameter
    holding the merge of its members (``tying.apply_tie``: mean, representative, ``curvature`` or
    ``layerwise``; ``diag`` and ``layerwise`` pass merge curvature measured already). A problem
    whose families use another scheme installs that scheme's classes (``basis``: shared low-rank
    bases, ranks from the problem; ``state``: its whitening covariances measured already).

    Raises:
        PlanError: the plan names unknown parameters or mixes shapes, or a merge lacks data.
    """
    return scheme_of(problem).apply(model, plan, problem, merge, data=data, config=config, tokenizer=tokenizer,
                                    state=state, diag=diag, layerwise=layerwise)
