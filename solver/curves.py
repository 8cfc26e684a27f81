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
from .cpsat import build_model, solve_model
from .deadline import Deadline
from .errors import ConstraintInfeasible
from .exact import exact_affordable, exact_curve
from .family import FamilyInstance, canonical
from .heuristics import agglomerative, matching_start, tabu_search
from .interval import interval_curve
from .mip import cheapest_edges_bound, labels_from_bins, min_classes
from .pmedian import p_median
from .schema import CostKind

# CP-SAT's representatives model helps up to about this many units; past it, its bound stays
# far below the cheapest-partners bound and it rarely beats tabu, so the time goes to tabu
CPSAT_MAX_UNITS = 32
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


def improve(curve: FamilyCurve, k: int, effort: float, workers: int, seed: int, deadline: Deadline | None = None) -> None:
    """Spend one round of work on class count k: better incumbent and better bound.

    `effort` is in seconds of intended work; tabu iterations and CP-SAT deterministic time are
    derived from it, so equal inputs give equal results. `deadline` caps the wall clock of tabu
    and the OR-Tools calls (a backstop: when it bites, results depend on machine speed).
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
        return
    if rounds == 0 and (matched := matching_start(up, kk)) is not None:
        curve.offer(fam.layer_labels(matched), "matching")
        curve.starts.setdefault(k, []).append(matched)
    # past CPSAT_MAX_UNITS, CP-SAT only joins from the second round on: its LP bound can still
    # close near-matching instances once tabu has had its share of the time
    use_cpsat = up.m <= CPSAT_MAX_UNITS or rounds >= 1
    # tabu from every distinct start: local search is sensitive to where it begins
    pool = [s for s in [_unit_labels(fam, curve.labels.get(k)), *curve.starts.get(k, [])] if s is not None]
    pool = list({tuple(canonical(s).tolist()): canonical(s) for s in pool}.values())
    if pool:
        total = effort * (4000 if up.m <= CPSAT_MAX_UNITS else 8000)
        iters = int(min(200_000, max(500, total / len(pool))))
        for i, s in enumerate(pool):
            lab, _ = tabu_search(up, s, kk, iters, seed=seed + 7919 * rounds + 131 * i + k, deadline=deadline)
            curve.offer(fam.layer_labels(lab), "tabu")
    if rounds == 0 and not deadline.expired():
        curve.raise_lb(k, cheapest_edges_bound(up, kk, time_limit_s=deadline.cap(min(wall, max(1.0, effort / 2)))) + _offset(fam))
    if not use_cpsat or deadline.expired():
        return
    hint = _unit_labels(fam, curve.labels.get(k))
    built = build_model(up, kk, hint=hint)
    res = solve_model(built, up, time_limit_s=effort, workers=workers, seed=seed, wall_limit_s=max(0.01, deadline.cap(wall)))
    curve.wall_cut |= res.wall_cut
    if res.labels is not None:
        curve.offer(fam.layer_labels(res.labels), "cp-sat")
    curve.raise_lb(k, res.bound + _offset(fam))


def _unit_labels(fam: FamilyInstance, layer_labels: np.ndarray | None) -> np.ndarray | None:
    if layer_labels is None:
        return None
    return np.array([layer_labels[u[0]] for u in fam.units], dtype=int)
