"""Set-partitioning bound by column generation, for one family with pairwise costs.

The master LP: choose classes (columns) λ_S ≥ 0 so that every unit is covered once and at most k
classes are used, at least cost Σ c_S λ_S. Its optimum is a lower bound on the best partition
with at most k classes, and on these instances a tight one. Columns come from pricing
(`pricing.py`); a family keeps one pool of columns for every k, since a class is a class
whatever the count.

The bound reported is Lagrangian, so it holds at every iteration, not only at LP optimality:
for duals π of the cover rows, any partition into at most k classes costs
Σ_S c_S = Σ π + Σ_S (c_S − π(S)) ≥ Σ π + k·min(0, min_S (c_S − π(S))),
with the minimum proven by `pricing.least_class`. At LP optimality it equals the LP value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import highspy
import numpy as np

from .deadline import Deadline
from .family import UnitProblem, canonical
from .highs import INF, new_highs
from .pricing import class_values, enumerate_classes, greedy_classes, least_class

_SMOOTH = 0.5  # weight of the smoothed duals' past in greedy pricing (Wentges-style)
_RC_TOL = 1e-9  # reduced costs below -this (costs are normalized, max pair in [0.5, 1)) enter


@dataclass
class ColumnPool:
    """Every class generated so far for one family, with its cost."""

    up: UnitProblem
    members: list[np.ndarray] = field(default_factory=list)  # boolean (m,) per column
    costs: list[float] = field(default_factory=list)
    _keys: set[bytes] = field(default_factory=set)
    _labellings: set[bytes] = field(default_factory=set)  # labellings whose classes are all in

    def add(self, member_mask: np.ndarray) -> bool:
        key = np.packbits(member_mask).tobytes()
        if key in self._keys:
            return False
        self._keys.add(key)
        self.members.append(member_mask.copy())
        self.costs.append(float(self.up.class_cost(np.flatnonzero(member_mask))))
        return True

    def add_labels(self, labels: np.ndarray) -> int:
        """Every class of a labelling; returns how many were new. A labelling seen before is
        skipped whole (every cell offers all of its family's incumbents and starts again)."""
        key = np.asarray(canonical(labels), dtype=np.int64).tobytes()
        if key in self._labellings:
            return 0
        self._labellings.add(key)
        return sum(self.add(labels == c) for c in np.unique(labels))

    def __len__(self) -> int:
        return len(self.members)


class Master:
    """The restricted master LP in HiGHS, grown column by column (warm-started re-solves)."""

    def __init__(self, pool: ColumnPool) -> None:
        self.pool = pool
        m = pool.up.m
        self.h = new_highs()
        lower = np.concatenate([np.ones(m), [-INF]])
        upper = np.concatenate([np.ones(m), [float(m)]])
        self.h.addRows(m + 1, lower, upper, 0, np.zeros(m + 2, dtype=np.int32), np.zeros(0, dtype=np.int32), np.zeros(0))
        self.n = 0
        self.centers: dict[int, Center] = {}  # per class count: the duals of its best bound

    def sync(self) -> None:
        """Add the pool's new columns, continuous in [0, ∞): an upper bound of 1 (implied by the
        cover rows anyway) would let a column sit at its bound with a negative reduced cost."""
        m = self.pool.up.m
        for mask, cost in zip(self.pool.members[self.n :], self.pool.costs[self.n :], strict=True):
            rows = np.concatenate([np.flatnonzero(mask), [m]]).astype(np.int32)
            self.h.addCol(cost, 0.0, INF, len(rows), rows, np.ones(len(rows)))
        self.n = len(self.pool)

    def solve(self, k: int, deadline: Deadline) -> tuple[float, np.ndarray, np.ndarray] | None:
        """(LP value, cover duals π, column values) with at most k classes; None if infeasible
        or cut by the deadline."""
        m = self.pool.up.m
        self.sync()
        # HiGHS checks time_limit against its run time summed over every run of this object, not
        # this run's: a limit of the time left alone cut masters that had run longer than that,
        # with time still left (a short limit's steps then were no prefix of a longer one's)
        self.h.setOptionValue("time_limit", self.h.getRunTime() + max(1e-3, min(deadline.left(), 1e6)))
        self.h.changeRowBounds(m, -INF, float(k))
        self.h.run()
        if self.h.getModelStatus() != self.h.getModelStatus().__class__.kOptimal:
            return None
        sol = self.h.getSolution()
        duals = np.asarray(sol.row_dual)
        return self.h.getInfo().objective_function_value, duals[:m], np.asarray(sol.col_value)


@dataclass
class ColgenResult:
    bound: float  # valid lower bound (Lagrangian) for at most k classes, without the constant
    lp_value: float | None  # the master's value at the last iteration
    optimal_lp: bool  # the master reached the LP optimum: bound is the LP bound
    iterations: int
    pi: np.ndarray | None = None  # cover duals of the best Lagrangian bound so far (any π gives one)
    least: float = 0.0  # proven lower bound on min_S (c_S − π(S)) under those duals


@dataclass
class Center:
    """The duals of the best Lagrangian bound at one class count: Σ π + k·min(0, least)."""

    pi: np.ndarray
    least: float
    value: float


def lp_bound(
    up: UnitProblem,
    k: int,
    pool: ColumnPool,
    master: Master,
    deadline: Deadline,
    max_iterations: int = 400,
    node_limit: int = 200_000,
    close: float = 0.0,
) -> ColgenResult:
    """Column generation at class count k until the LP optimum, ``max_iterations``, the deadline,
    or a bound within ``close`` (relative) of the master's value.

    The pool must already hold a partition into at most k classes (the incumbent's classes).
    Greedy pricing first; the exact branch and bound only when greedy finds nothing, which both
    proves a bound and finds the columns greedy missed. The best bound's duals are kept in
    ``master`` from call to call (a later call cut short by its node limit bounds worse).

    Once the master's value stops moving, the exact pricings only raise the bound toward it
    (classes of 10 at 80 units: 4.3%, 1.2%, 0.8%, 0.7%, then 0 below it, 0.5 s each): ``close``
    stops there when the bound is near enough for the caller's round. Pricing exactly at duals
    smoothed toward the best bound's (Wentges) was tried for this tail: every pricing that found
    nothing for the master halved the distance, which took 10 pricings to 1% and 20 to 1e-5.
    """
    lp_value = None
    optimal = False
    center = master.centers.get(k)
    best = center.value if center is not None else 0.0
    smooth: np.ndarray | None = None
    done = 0
    while done < max_iterations:
        done += 1
        if deadline.expired():
            break
        solved = master.solve(k, deadline)
        if solved is None:
            break
        lp_value, pi, x = solved
        if best >= lp_value - close * abs(lp_value):
            optimal = best >= lp_value  # the bound met the LP value: nothing is left to price
            break
        basis = np.array([pool.members[j] for j in np.flatnonzero(x > 1e-9)]).reshape(-1, up.m)
        mu = (lp_value - float(pi.sum())) / k if k else 0.0  # the count row's dual (<= 0)
        below = mu - _RC_TOL
        # the last allowed iteration prices exactly: a truncated run still leaves a bound, and
        # the pool and master carry on from here in the cell's next round
        if done < max_iterations:
            # price first at duals smoothed over the iterations (they jump between extreme
            # points of a degenerate master; classes of 10 took 300 iterations unsmoothed),
            # keeping the classes that are negative at the true duals; then at the true duals
            smooth = pi if smooth is None else _SMOOTH * smooth + (1 - _SMOOTH) * pi
            cols = greedy_classes(up, smooth, np.inf, starts=basis)
            cols = cols[class_values(up, pi, cols) < below] if len(cols) else cols
            if not len(cols):
                cols = greedy_classes(up, pi, below, starts=basis)
            if len(cols) and sum(pool.add(c) for c in cols):
                continue
        least = least_class(up, pi, below, node_limit=node_limit, deadline=deadline,
                            known=float(class_values(up, pi, basis).min()) if len(basis) else np.inf)
        value = float(pi.sum()) + k * min(0.0, least.bound)
        if value > best:
            best = value
            center = master.centers[k] = Center(pi.copy(), least.bound, value)
        if not least.classes or not sum(pool.add(_mask(up.m, c)) for c in least.classes):
            optimal = least.complete
            break
    bound = min(best, lp_value) if lp_value is not None else best
    if center is None:
        return ColgenResult(bound, lp_value, optimal, done)
    return ColgenResult(bound, lp_value, optimal, done, pi=center.pi, least=center.least)


def gap_columns(up: UnitProblem, pool: ColumnPool, result: ColgenResult, k: int, upper: float, cap: int, node_limit: int,
                deadline: Deadline | None = None) -> bool:
    """Add every class that a partition costing at most ``upper`` could use; True if all were.

    A partition x into at most k classes costs Σ π + Σ_{S in x} f(S), f(S) = c_S − π(S) ≥ the
    proven least f. So a class S0 of a partition costing at most ``upper`` has
    f(S0) <= upper − Σ π − (k − 1)·min(0, least f): with every such class in the pool, the
    integer master over the pool is exact (at the LP optimum the threshold is the gap plus μ).
    """
    if result.pi is None:
        return False
    threshold = upper - float(result.pi.sum()) - (k - 1) * min(0.0, result.least)
    threshold += 1e-9 * max(1.0, abs(upper))  # rounding: never leave out a class on the edge
    found, complete = enumerate_classes(up, result.pi, threshold, cap=cap, node_limit=node_limit, deadline=deadline)
    if complete:  # a partial list proves nothing, and thousands of columns slow every later master
        for c in found:
            pool.add(_mask(up.m, c))
    return complete


@dataclass
class IntegerResult:
    labels: np.ndarray | None
    bound: float  # the MIP's bound over the pool's columns (a bound for all partitions only
    # when the pool holds every class that could improve: see gap_columns)
    optimal: bool
    wall_cut: bool = False  # the time limit, not max_nodes, ended it: machine speed decided


def integer_master(pool: ColumnPool, k: int, time_limit_s: float, max_nodes: int = 2000,
                   hint: np.ndarray | None = None) -> IntegerResult:
    """The best partition into at most k classes made of pool columns (a small MIP).

    ``max_nodes`` sizes the work (deterministic); the time limit is the wall-clock backstop.
    """
    up = pool.up
    m = up.m
    # HiGHS's tolerances are absolute: in units of the hint's cost the answer is about 1 (a
    # family's classes can sum to 0.03 in normalized units, where HiGHS stopped 1e-6 short)
    unit = up.partition_cost(hint) if hint is not None else 0.0
    unit = unit if 0 < unit < np.inf else (max(pool.costs) or 1.0)
    h = new_highs(time_limit_s)
    h.setOptionValue("mip_max_nodes", int(max_nodes))
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    lower = np.concatenate([np.ones(m), [-INF]])
    upper = np.concatenate([np.ones(m), [float(k)]])
    h.addRows(m + 1, lower, upper, 0, np.zeros(m + 2, dtype=np.int32), np.zeros(0, dtype=np.int32), np.zeros(0))
    for mask, cost in zip(pool.members, pool.costs, strict=True):
        rows = np.concatenate([np.flatnonzero(mask), [m]]).astype(np.int32)
        h.addCol(cost / unit, 0.0, 1.0, len(rows), rows, np.ones(len(rows)))
    n = len(pool)
    h.changeColsIntegrality(n, np.arange(n, dtype=np.int32), np.full(n, 1, dtype=np.uint8))
    if hint is not None:
        keys = {np.packbits(mk).tobytes(): j for j, mk in enumerate(pool.members)}
        start = np.zeros(n)
        picks = [keys.get(np.packbits(hint == c).tobytes()) for c in np.unique(hint)]
        if all(j is not None for j in picks):
            start[picks] = 1.0
            sol = highspy.HighsSolution()
            sol.col_value = start.tolist()
            sol.value_valid = True
            h.setSolution(sol)
    h.run()
    info = h.getInfo()
    bound = float(info.mip_dual_bound) * unit if np.isfinite(info.mip_dual_bound) else 0.0
    sol = h.getSolution()
    optimal = h.getModelStatus().name == "kOptimal"
    cut = h.getModelStatus().name == "kTimeLimit"
    if not sol.value_valid:
        return IntegerResult(None, bound, optimal, cut)
    x = np.asarray(sol.col_value)
    labels = np.full(m, -1)
    for c, j in enumerate(np.flatnonzero(x > 0.5)):
        labels[pool.members[j]] = c
    if (labels < 0).any():
        return IntegerResult(None, bound, False, cut)
    return IntegerResult(canonical(labels), bound, optimal, cut)


def _mask(m: int, units: np.ndarray) -> np.ndarray:
    mask = np.zeros(m, dtype=bool)
    mask[units] = True
    return mask


__all__ = ["ColumnPool", "Master", "ColgenResult", "IntegerResult", "lp_bound", "gap_columns", "integer_master", "class_values"]
