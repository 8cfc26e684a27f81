"""Per-family cost curves: best known cost and a proven lower bound for each class count.

A curve is indexed by k, the family's number of classes (pinned singletons included), and means
"at most k classes": the upper curve is made non-increasing and the lower curve
non-increasing from the right, so both stay valid for the knapsack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .bounds import all_k
from .colgen import ColumnPool, Master, gap_columns, integer_master, lp_bound
from .deadline import Deadline
from .errors import ConstraintInfeasible
from .exact import exact_affordable, exact_curve
from .family import FamilyInstance, canonical
from .heuristics import agglomerative, tabu_search
from .interval import interval_curve
from .mip import labels_from_bins, min_classes
from .pmedian import p_median
from .scaling import GAP_TOL
from .schema import CostKind

# an incumbent is replaced only by a relatively cheaper one: sums of the same pair costs in
# another order differ in the last bits, and such a "gain" must not change the plan
_BETTER = 1e-13


@dataclass
class FamilyCurve:
    fam: FamilyInstance
    k_min: int
    ub: dict[int, float] = field(default_factory=dict)
    lb: dict[int, float] = field(default_factory=dict)
    labels: dict[int, np.ndarray] = field(default_factory=dict)  # layer labels per k
    exact: bool = False
    tried: dict[int, int] = field(default_factory=dict)  # improvement rounds spent per k
    starts: dict[int, list[np.ndarray]] = field(default_factory=dict)  # diverse unit labellings per k
    methods: set[str] = field(default_factory=set)
    wall_cut: bool = False  # a wall-clock cap (not the deterministic budget) cut some search
    columns: tuple[ColumnPool, Master] | None = None  # column generation's pool and master (pairwise)

    @property
    def ks(self) -> range:
        return range(self.k_min, self.fam.k_max + 1)

    def offer(self, layer_labels: np.ndarray, method: str) -> None:
        """Record a layer labelling if it beats the incumbent at its class count."""
        cost = self.fam.layer_partition_cost(layer_labels)
        if not math.isfinite(cost):
            return
        k = int(layer_labels.max()) + 1
        for kk in range(max(k, self.k_min), self.fam.k_max + 1):
            if cost < self.ub.get(kk, math.inf) * (1.0 - _BETTER):
                self.ub[kk] = cost
                self.labels[kk] = layer_labels.copy()
                self.methods.add(method)

    def raise_lb(self, k: int, bound: float) -> None:
        """Record a lower bound for at most k classes (also valid for fewer)."""
        for kk in range(self.k_min, k + 1):
            self.lb[kk] = max(self.lb.get(kk, 0.0), bound)

    def options(self, upper: bool) -> list[tuple[int, float, int]]:
        """Knapsack options (params, cost, k) from the upper or the lower curve."""
        curve = self.ub if upper else self.lb
        return [(self.fam.params_for(k), min(curve.get(k, math.inf if upper else 0.0), self.ub.get(k, math.inf)), k) for k in self.ks]

    def column_pool(self) -> tuple[ColumnPool, Master]:
        """The family's pool of classes and its master LP, made on first use (one for every k:
        a class is a class whatever the count), seeded with the singletons."""
        if self.columns is None:
            pool = ColumnPool(self.fam.reduced)
            for u in range(pool.up.m):
                pool.add(np.arange(pool.up.m) == u)
            self.columns = (pool, Master(pool))
        return self.columns

    def gap_at(self, k: int) -> float:
        return self.ub.get(k, math.inf) - self.lb.get(k, 0.0)


def _offset(fam: FamilyInstance) -> float:
    """What every partition pays: unary terms plus pair costs inside required units."""
    return fam.reduced.constant


def initial_curve(fam: FamilyInstance, deadline: Deadline | None = None) -> FamilyCurve:
    """Exact curves where they are cheap, fast incumbents and k_min elsewhere.

    ``deadline`` caps the MIP that proves k_min, and its nominal seconds decide whether the
    exact DP fits (a 16-unit DP takes seconds; a 1 s request cannot afford it).
    """
    deadline = Deadline.never() if deadline is None else deadline
    up = fam.reduced
    p = len(fam.pinned)
    if fam.contiguous:
        costs, labels = interval_curve(fam)
        base = float(fam.unary.sum())
        finite = [k for k, c in enumerate(costs, start=1) if math.isfinite(c)]
        if not finite:
            raise ConstraintInfeasible(
                f"family {fam.name!r}: in contiguous mode a required pair needs one run of "
                "consecutive layers, and every such run breaks a constraint (a forbidden or "
                "null pair, a pinned layer, or max_group_size); drop contiguous or the pair"
            )
        curve = FamilyCurve(fam, k_min=finite[0], exact=True, methods={"interval-dp"})
        for k in curve.ks:
            curve.ub[k] = costs[k - 1] + base
            curve.labels[k] = labels[k - 1]
            curve.lb[k] = curve.ub[k]
        return curve
    if exact_affordable(up.m, deadline.seconds):
        ex = exact_curve(up)
        finite = [k for k, c in enumerate(ex.costs, start=1) if math.isfinite(c)]
        k_min = (finite[0] if finite else 0) + p
        curve = FamilyCurve(fam, k_min=k_min, exact=True, methods={"subset-dp"})
        for k in curve.ks:
            kk = k - p
            if kk == 0:
                labels = fam.layer_labels(np.zeros(0, dtype=int))
                cost = 0.0
            else:
                labels = fam.layer_labels(ex.labels[kk - 1])
                cost = ex.costs[kk - 1]
            curve.ub[k] = cost + _offset(fam)
            curve.labels[k] = labels
            curve.lb[k] = curve.ub[k]
        return curve
    # large family: feasibility floor, then greedy incumbents for every k
    bins = labels_from_bins(up)
    k_units = int(bins.max()) + 1
    proven = True
    if up.forbidden.any() or up.max_size is not None:
        # at least half a second even past the deadline: an unproven k_min can make a reachable
        # budget look infeasible, which is worse than a late answer
        k_units, proven = min_classes(up, k_units, time_limit_s=max(0.5, deadline.cap(10.0)))
    curve = FamilyCurve(fam, k_min=k_units + p)
    if not proven:
        curve.methods.add("k_min-unproven")
    curve.offer(fam.layer_labels(bins), "first-fit")
    for kk, lab in agglomerative(up).items():
        curve.offer(fam.layer_labels(lab), "agglomerative")
        curve.starts.setdefault(kk + p, []).append(lab)
    # runs of consecutive layers seed tabu for pairwise costs; the p-median MIP needs no seeds,
    # and the interval DP's O(n^2) runs took 1.8 s at 288 layers
    _, ilabels = interval_curve(fam) if up.kind is CostKind.pairwise else (None, [])
    for lab in ilabels:
        if lab is not None:
            curve.offer(lab, "interval-dp")
            curve.starts.setdefault(int(lab.max()) + 1, []).append(_unit_labels(fam, lab))
    cheap = all_k(up)
    for k in curve.ks:
        curve.lb[k] = _offset(fam) + (float(cheap[k - p - 1]) if k - p >= 1 else 0.0)
    curve.lb[fam.k_max] = curve.ub.get(fam.k_max, curve.lb[fam.k_max])
    return curve


def improve(curve: FamilyCurve, k: int, effort: float, workers: int, seed: int, deadline: Deadline | None = None,
            bound_only: bool = False) -> None:
    """Spend one round of work on class count k: better incumbent and better bound.

    `effort` is in seconds of intended work; tabu iterations, pricing nodes and MIP nodes are
    derived from it, so equal inputs give equal results. `deadline` caps the wall clock of every
    stage (a backstop: when it bites, results depend on machine speed, and the curve says so).
    `bound_only` (pairwise): only the column generation, for a cell that the bound's knapsack
    leans on but the plan does not use.
    """
    deadline = Deadline.never() if deadline is None else deadline
    wall = max(0.01, deadline.cap(3 * effort + 1))
    if curve.exact or k not in curve.ks:
        return
    fam, up = curve.fam, curve.fam.reduced
    p = len(fam.pinned)
    kk = k - p
    rounds = curve.tried.get(k, 0)
    curve.tried[k] = rounds + 1
    start = _unit_labels(fam, curve.labels.get(k))
    if up.kind is CostKind.assignment:
        res = p_median(up, kk, time_limit_s=deadline.cap(min(wall, max(1.0, effort))), hint=start)
        if res.labels is not None:
            curve.offer(fam.layer_labels(res.labels), "p-median-mip")
        curve.raise_lb(k, res.bound + _offset(fam))
        if res.every_k is not None:  # the same duals bound every class count
            for k2 in curve.ks:
                if 1 <= k2 - p <= len(res.every_k):
                    curve.lb[k2] = max(curve.lb.get(k2, 0.0), float(res.every_k[k2 - p - 1]) + _offset(fam))
        return
    _improve_pairwise(curve, k, effort, seed, deadline, rounds, bound_only)


# work per nominal second of effort: tabu iterations, nodes of the integer master, nodes of the
# exact pricing tree; all deterministic, so equal inputs give equal curves
_TABU_PER_S = 4000
_MIP_NODES_PER_S = 2000
_MASTER_ITERATIONS_PER_S = 160  # column generation's iterations (classes of 10 at 80 units: 20-30 ms
# each with greedy pricing; their master needs ~70 from the heuristics' columns, and at 60 per
# second its first round stopped at 30, where the bound was still the heuristics' one)
_CLOSE_PER_S2 = 6.25e-4  # column generation stops once its bound is within this / effort² of the
# master's value (relative; 0.25% at a first round's half second, a quarter of that each round
# after): the last exact pricings of a master that no longer moves only close the last percent
_PRICING_NODES_PER_S = 20_000  # about what the Python tree visits in a second at 80 units
_GAP_COLUMNS = 5_000  # classes at most in the exact closure (the integer master stays fast)


def _improve_pairwise(curve: FamilyCurve, k: int, effort: float, seed: int, deadline: Deadline, rounds: int,
                      bound_only: bool = False) -> None:
    """Column generation (bound and columns), the integer master over its columns, the exact
    closure over every class that could still improve, and tabu from every distinct start
    while a gap is left (docs/design.md §Per-family search)."""
    fam, up = curve.fam, curve.fam.reduced
    kk = k - len(fam.pinned)
    offset = _offset(fam)
    pool, master = curve.column_pool()
    for labels in [*curve.labels.values(), *(fam.layer_labels(s) for ss in curve.starts.values() for s in ss)]:
        pool.add_labels(_unit_labels(fam, labels))
    nodes = int(_PRICING_NODES_PER_S * effort)
    close = _CLOSE_PER_S2 / effort**2
    res = lp_bound(up, kk, pool, master, deadline, max_iterations=int(_MASTER_ITERATIONS_PER_S * effort), node_limit=nodes,
                   close=close)
    curve.raise_lb(k, res.bound + offset)
    curve.methods.add("column-generation")
    if res.pi is not None:
        # the same duals bound every class count: Σ π + k'·min(0, least f) is a supporting line
        # of the LP value in k', so one solved k lifts the whole lower curve
        for k2 in curve.ks:
            if k2 - len(fam.pinned) >= 1:
                line = float(res.pi.sum()) + (k2 - len(fam.pinned)) * min(0.0, res.least)
                curve.lb[k2] = max(curve.lb.get(k2, 0.0), line + offset)
    if bound_only:
        return
    wall = max(0.01, deadline.cap(3 * effort + 1))
    mip_nodes = int(_MIP_NODES_PER_S * effort)
    inc = integer_master(pool, kk, wall, max_nodes=mip_nodes, hint=_unit_labels(fam, curve.labels.get(k)))
    curve.wall_cut |= inc.wall_cut
    if inc.labels is not None:
        curve.offer(fam.layer_labels(inc.labels), "colgen-mip")
    # exact closure: every class a cheaper partition could use, then the integer master is exact
    upper = curve.ub.get(k, math.inf) - offset
    if _open(curve, k) and math.isfinite(upper) and not deadline.expired() and gap_columns(up, pool, res, kk, upper, cap=_GAP_COLUMNS, node_limit=nodes, deadline=deadline):
        exact = integer_master(pool, kk, max(0.01, deadline.cap(wall)), max_nodes=mip_nodes, hint=_unit_labels(fam, curve.labels.get(k)))
        if exact.labels is not None:
            curve.offer(fam.layer_labels(exact.labels), "colgen-exact")
        curve.raise_lb(k, min(exact.bound, upper) + offset)
    if not _open(curve, k) or deadline.expired():
        return
    # tabu from every distinct start: local search is sensitive to where it begins
    starts = [s for s in [_unit_labels(fam, curve.labels.get(k)), *curve.starts.get(k, [])] if s is not None]
    starts = list({tuple(canonical(s).tolist()): canonical(s) for s in starts}.values())
    iters = int(min(200_000, max(500, effort * _TABU_PER_S / max(1, len(starts)))))
    for i, s in enumerate(starts):
        lab, _ = tabu_search(up, s, kk, iters, seed=seed + 7919 * rounds + 131 * i + k, deadline=deadline)
        curve.offer(fam.layer_labels(lab), "tabu")


def _open(curve: FamilyCurve, k: int) -> bool:
    return curve.gap_at(k) > GAP_TOL * abs(curve.ub.get(k, 0.0))


def _unit_labels(fam: FamilyInstance, layer_labels: np.ndarray | None) -> np.ndarray | None:
    if layer_labels is None:
        return None
    return np.array([layer_labels[u[0]] for u in fam.units], dtype=int)
