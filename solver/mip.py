"""Small MIPs: the fewest classes (the p-median is in pmedian.py).

It goes through OR-Tools' linear solver wrapper with SCIP (single-threaded, deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import pywraplp

from .family import UnitProblem, canonical


@dataclass
class MipResult:
    labels: np.ndarray | None
    objective: float | None
    bound: float
    proven: bool
    every_k: np.ndarray | None = None  # a bound for at most k classes, k = 1..m, from the same duals


def _solver(time_limit_s: float) -> pywraplp.Solver:
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:  # pragma: no cover - every OR-Tools wheel ships SCIP today
        solver = pywraplp.Solver.CreateSolver("CBC")
    solver.SetTimeLimit(max(1, int(time_limit_s * 1000)))
    solver.SetNumThreads(1)
    return solver


def min_classes(up: UnitProblem, upper: int, time_limit_s: float) -> tuple[int, bool]:
    """Fewest classes any feasible partition of the units uses: (count, proven).

    Bin packing with conflicts (sizes under max_size, forbidden pairs apart), solved as a MIP.
    """
    m = up.m
    if m == 0:
        return 0, True
    solver = _solver(time_limit_s)
    bins = range(upper)
    a = {(u, b): solver.BoolVar(f"a_{u}_{b}") for u in range(m) for b in bins}
    used = [solver.BoolVar(f"used_{b}") for b in bins]
    for u in range(m):
        solver.Add(solver.Sum([a[u, b] for b in bins]) == 1)
    cap = up.max_size if up.max_size is not None else int(up.sizes.sum())
    for b in bins:
        solver.Add(solver.Sum([int(up.sizes[u]) * a[u, b] for u in range(m)]) <= cap * used[b])
        if b:
            solver.Add(used[b] <= used[b - 1])  # symmetry breaking: use bins in order
    for u in range(m):
        for v in range(u + 1, m):
            if up.forbidden[u, v]:
                for b in bins:
                    solver.Add(a[u, b] + a[v, b] <= 1)
    solver.Minimize(solver.Sum(used))
    status = solver.Solve()
    if status == pywraplp.Solver.OPTIMAL:
        return int(round(solver.Objective().Value())), True
    return upper, False


def labels_from_bins(up: UnitProblem) -> np.ndarray:
    """A feasible labelling with few classes by first-fit decreasing with conflicts."""
    order = sorted(range(up.m), key=lambda u: (-int(up.forbidden[u].sum()), -int(up.sizes[u]), u))
    classes: list[list[int]] = []
    labels = np.empty(up.m, dtype=int)
    cap = up.max_size if up.max_size is not None else int(up.sizes.sum())
    for u in order:
        for c, members in enumerate(classes):
            if sum(int(up.sizes[v]) for v in members) + int(up.sizes[u]) <= cap and not up.forbidden[u, members].any():
                members.append(u)
                labels[u] = c
                break
        else:
            classes.append([u])
            labels[u] = len(classes) - 1
    return canonical(labels)
