"""Exact multiple-choice knapsack over per-family curves.

Each family offers options (params, cost, k); pick one per family. Merging families one at a
time and keeping only Pareto-optimal (params, cost) points is exact, and the final Pareto list is
the whole compression-vs-cost frontier at once.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

Option = tuple[int, float, int]  # (params, cost, classes)


@dataclass(frozen=True)
class Point:
    params: int
    cost: float
    choice: tuple[int, ...]  # classes per family, in family order


def pareto(options: list[list[Option]]) -> list[Point]:
    """All Pareto-optimal combinations: params ascending, cost strictly descending.

    Works on plain (params, cost, choice) tuples, whose natural order is the (params, cost,
    choice) order ties are broken by, and makes Points only for the final front: most merged
    combinations are dominated, and this runs on every request the service answers.
    """
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for family_opts in options:
        finite = [o for o in family_opts if o[1] != math.inf]
        merged = [(params + o[0], cost + o[1], (*choice, o[2])) for params, cost, choice in front for o in finite]
        merged.sort()
        front = []
        for q in merged:
            if not front or q[1] < front[-1][1]:
                if front and front[-1][0] == q[0]:
                    front[-1] = q
                else:
                    front.append(q)
    return [Point(params, cost, choice) for params, cost, choice in front]


def best_within(front: list[Point], budget: int | None) -> Point | None:
    """The cheapest point with params <= budget (None when nothing fits)."""
    if not front:
        return None
    if budget is None:
        return front[-1]
    i = bisect.bisect_right([p.params for p in front], budget)
    return front[i - 1] if i else None
