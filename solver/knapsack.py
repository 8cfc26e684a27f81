"""Exact multiple-choice knapsack over per-family curves.

Each family offers options (params, cost, k); pick one per family. Merging families one at a
time and keeping only Pareto-optimal (params, cost) points is exact, and the final Pareto list is
the whole compression-vs-cost frontier at once.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

Option = tuple[int, float, int]  # (params, cost, classes)


@dataclass(frozen=True)
class Point:
    params: int
    cost: float
    choice: tuple[int, ...]  # classes per family, in family order


def pareto(options: list[list[Option]]) -> list[Point]:
    """All Pareto-optimal combinations: params ascending, cost strictly descending."""
    front = [Point(0, 0.0, ())]
    for family_opts in options:
        merged = [
            Point(p.params + o[0], p.cost + o[1], (*p.choice, o[2]))
            for p in front
            for o in family_opts
            if o[1] != float("inf")
        ]
        merged.sort(key=lambda q: (q.params, q.cost, q.choice))
        front = []
        for q in merged:
            if not front or q.cost < front[-1].cost:
                if front and front[-1].params == q.params:
                    front[-1] = q
                else:
                    front.append(q)
    return front


def best_within(front: list[Point], budget: int | None) -> Point | None:
    """The cheapest point with params <= budget (None when nothing fits)."""
    if not front:
        return None
    if budget is None:
        return front[-1]
    i = bisect.bisect_right([p.params for p in front], budget)
    return front[i - 1] if i else None
