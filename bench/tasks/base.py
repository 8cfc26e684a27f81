"""What the evaluation needs from a model: the model, three disjoint data splits and a metric.

Every task keeps its original model untouched; strategies tie copies of it. Calibration data feeds
the curvature costs and healing, validation data the measured choice among candidate plans, and
the evaluation data (never seen by either) the reported metric and loss change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from bench.paired import SampleScores


@dataclass
class Task:
    """One evaluation model.

    ``score(model)`` returns the metric of a (compressed) copy on the evaluation split, and
    ``samples(model)`` the same in per-sample parts (bench/paired.py: for paired intervals between
    rows; None where a task does not offer them);
    ``distill`` is the calibration loss (``hessian_worker.DistillLoss`` value) used for costs,
    the measured choice, healing and the measured loss change.
    """

    name: str
    metric: str
    higher_is_better: bool
    model: nn.Module
    tokenizer: Any | None
    distill: str
    calibration: Any
    validation: Any
    evaluation: Any
    score: Callable[[nn.Module], float]
    heal_lr: float = 5e-5
    samples: Callable[[nn.Module], SampleScores] | None = None
