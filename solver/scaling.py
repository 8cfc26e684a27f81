"""Float costs to integers for CP-SAT, in one place, with the scale recorded.

Costs are floored after scaling, so any bound CP-SAT proves on the integer objective, divided by
the scale, is still a valid lower bound on the float objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_TARGET_TOTAL = 2.0**40  # keeps every sum far below 2^63


@dataclass(frozen=True)
class Scale:
    factor: float

    def to_int(self, values: np.ndarray) -> np.ndarray:
        return np.floor(np.asarray(values, dtype=float) * self.factor).astype(np.int64)

    def to_float(self, value: float) -> float:
        return float(value) / self.factor


def scale_for(values: np.ndarray) -> Scale:
    """A power-of-two scale so the sum of all costs maps to about 2^40."""
    total = float(np.abs(np.asarray(values, dtype=float)).sum())
    if total <= 0 or not math.isfinite(total):
        return Scale(1.0)
    return Scale(2.0 ** math.floor(math.log2(_TARGET_TOTAL / total)))
