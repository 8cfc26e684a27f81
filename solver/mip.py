"""Small MIPs: the cheapest-edges bound and the fewest classes (the p-median is in pmedian.py).

Both go through OR-Tools' linear solver wrapper with SCIP (single-threaded, deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import pywraplp

from .family import UnitProblem, canonical
from .schema import CostKind


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


def cheapest_edges_bound(up: UnitProblem, k: int, time_limit_s: float) -> float:
    """Lower bound for pairwise costs with at most k classes.

    A unit in a class of t units pays at least half the sum of its t-1 cheapest allowed pair
    costs. Choosing how many classes have each size and which units sit in them is a small MIP;
    its best bound (even when cut short) is a valid lower bound on the true optimum.
    """
    if up.kind is not CostKind.pairwise:
        raise ValueError("cheapest_edges_bound is for pairwise costs")
    m = up.m
    if m == 0 or k >= m:
        return 0.0
    tmax = m if up.max_size is None else min(m, up.max_size)
    cheap = np.full((m, tmax + 1), np.inf)  # cheap[u, t]: t-1 cheapest partners
    for u in range(m):
        others = np.array([up.pair[u, v] for v in range(m) if v != u and not up.forbidden[u, v]])
        others.sort()
        cum = np.concatenate([[0.0], np.cumsum(others)])
        for t in range(1, tmax + 1):
            if t - 1 < len(cum):
                cheap[u, t] = cum[t - 1]
    solver = _solver(time_limit_s)
    sizes = range(1, tmax + 1)
    z = {(u, t): solver.BoolVar(f"z_{u}_{t}") for u in range(m) for t in sizes if np.isfinite(cheap[u, t])}
    cnt = {t: solver.IntVar(0, m // t, f"classes_of_{t}") for t in sizes}
    for u in range(m):
        solver.Add(solver.Sum([z[u, t] for t in sizes if (u, t) in z]) == 1)
    for t in sizes:
        solver.Add(solver.Sum([z[u, t] for u in range(m) if (u, t) in z]) == t * cnt[t])
    solver.Add(solver.Sum(cnt.values()) <= k)
    solver.Minimize(solver.Sum([0.5 * float(cheap[u, t]) * var for (u, t), var in z.items()]))
    status = solver.Solve()
    if status == pywraplp.Solver.INFEASIBLE:
        return float("inf")
    return max(0.0, solver.Objective().BestBound()) if status in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE) else 0.0


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
