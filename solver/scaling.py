"""Numbers in one place: cost normalization, float costs to integers, and relative gaps.

Plans must not depend on the unit the costs come in (a loss change of 1e-7 or of 1e7 per pair
is the same problem). So the solver never compares costs against absolute epsilons: the costs
are first normalized by a power of two (exact in binary floating point, so a problem scaled by
a power of two is solved bit for bit alike, and any other factor only moves the last bit), and
every tolerance that is left is relative.

Costs are floored after integer scaling, so any bound CP-SAT proves on the integer objective,
scaled back, is still a valid lower bound on the float objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_TARGET_TOTAL_EXP = 40  # integer costs sum to about 2^40: far below 2^63, ~1e-12 resolution

# status `optimal` allows this relative gap on top of options.relative_gap: floors in the
# integer scaling leave ~1e-8 relative slack in CP-SAT bounds, and MIP solvers' tolerances some more
GAP_TOL = 1e-7


@dataclass(frozen=True)
class Scale:
    """Integer cost = floor(cost * 2^exponent); an exponent, not a factor, so tiny or huge
    costs never overflow the factor itself."""

    exponent: int

    @property
    def factor(self) -> float:
        return math.ldexp(1.0, self.exponent)

    def to_int(self, values: np.ndarray) -> np.ndarray:
        return np.floor(np.ldexp(np.asarray(values, dtype=float), self.exponent)).astype(np.int64)

    def to_float(self, value: float) -> float:
        return math.ldexp(float(value), -self.exponent)


def scale_for(values: np.ndarray) -> Scale:
    """A power-of-two scale so the sum of all costs maps to about 2^40."""
    total = float(np.abs(np.asarray(values, dtype=float)).sum())
    if total <= 0 or not math.isfinite(total):
        return Scale(0)
    mantissa, exp = math.frexp(total)  # total = mantissa * 2^exp, mantissa in [0.5, 1)
    return Scale(_TARGET_TOTAL_EXP - exp + (1 if mantissa == 0.5 else 0))


_NORMAL_MIN_EXP = -1021  # 2^-1022, the least normal double, is 0.5 * 2^-1021 in frexp's terms


def normalizing_exponent(values: np.ndarray) -> int:
    """e such that the largest finite |value| times 2^-e lies in [0.5, 1) (0 when all are 0).

    Dividing by a power of two is exact, so normalized costs keep every bit of the input, as long
    as none falls into the subnormal range: a 5e-324 cost beside a cost of 1 would round to 0 when
    halved, and the solver would take that share as free. Then e is capped so the least nonzero
    value stays normal (the largest then lies above 1, which relative tolerances do not mind).
    """
    arr = np.abs(np.asarray(values, dtype=float))
    finite = arr[np.isfinite(arr)]
    top = float(finite.max()) if finite.size else 0.0
    if top <= 0.0:
        return 0
    exponent = math.frexp(top)[1]
    least = float(finite[finite > 0].min())
    headroom = math.frexp(least)[1] - _NORMAL_MIN_EXP  # how far down the least value may go and stay normal
    return exponent if exponent <= max(headroom, 0) else max(min(exponent, headroom), 0)


def relative_gap(objective: float, bound: float) -> float:
    """(objective - bound) / objective, 0 when the bound meets the objective.

    No absolute floor in the denominator: costs of 1e-300 have gaps as real as costs of 1.
    Costs are non-negative, so objective > bound implies objective > 0.
    """
    if not objective > bound:
        return 0.0
    return (objective - bound) / abs(objective)
