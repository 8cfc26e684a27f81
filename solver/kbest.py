"""The K best colorings for one budget, not just the best one.

The quadratic cost model ranks plans only roughly (docs/design.md §Why measure), so the product
measures several
good plans and keeps the one that really loses least. Per family, the best partitions at each
class count are listed: all of them for small families (every set partition of the free units is
scored at once with numpy, exact up to ``ENUM_MAX_UNITS`` units), the incumbent and its best
one-move and swap neighbours for larger ones (a heuristic; plans say so in their method). The
families are then combined by a K-best multiple-choice knapsack: K shortest paths through a
layered graph whose nodes are the unique-parameter totals after each family. A family option
ranked r can only be in the overall top r, so listing ``pool`` options per class count keeps the
combination exact whenever the per-family lists are.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .curves import initial_curve
from .deadline import Deadline
from .family import FamilyInstance, UnitProblem, canonical
from .schema import CostKind

ENUM_MAX_UNITS = 10  # Bell(10) = 115,975 partitions; Bell(11) would be 678,570


@dataclass(frozen=True)
class FamilyOption:
    """One partition of a family's layers: its exact cost and layer labels (depth order)."""

    cost: float
    labels: tuple[int, ...]


FamilyTable = dict[int, list[FamilyOption]]  # class count -> options, cheapest first


@lru_cache(maxsize=16)
def set_partitions(m: int) -> np.ndarray:
    """Every set partition of m items as restricted growth strings, shape (Bell(m), m)."""
    rows = np.zeros((1, min(m, 1)), dtype=np.int8)
    top = np.zeros(1, dtype=np.int8)
    for _ in range(1, m):
        branches = top.astype(np.int64) + 2  # a row may reuse any class so far or open one
        parent = np.repeat(np.arange(len(rows)), branches)
        label = (np.arange(len(parent)) - np.repeat(np.cumsum(branches) - branches, branches)).astype(np.int8)
        rows = np.concatenate([rows[parent], label[:, None]], axis=1)
        top = np.maximum(top[parent], label)
    rows.flags.writeable = False
    return rows


def _partition_costs(up: UnitProblem, rows: np.ndarray, normalized: bool = False) -> np.ndarray:
    """Cost of every labelling in ``rows`` (inf where a constraint breaks), vectorized.

    ``normalized`` (pairwise only) scores a class S by (2/|S|)·Σ its pair costs instead of the
    sum: what a mean merge really costs under isotropic curvature (docs/design.md §Cost kinds),
    since the plain
    pairwise sum over-counts large classes. Used to rank extra candidates, never as the objective.
    """
    m = up.m
    cost = np.zeros(len(rows))
    if m < 2:
        return cost
    onehots = [rows == c for c in range(m)]
    if up.max_size is not None:
        for mask in onehots:
            cost[mask.astype(np.int64) @ up.sizes > up.max_size] = math.inf
    iu, iv = np.triu_indices(m, 1)
    same = rows[:, iu] == rows[:, iv]
    if up.forbidden.any():
        cost[(same & up.forbidden[iu, iv]).any(axis=1)] = math.inf
    if up.kind is CostKind.pairwise:
        assert up.pair is not None
        if not normalized:
            return cost + same.astype(float) @ up.pair[iu, iv]
        for mask in onehots:
            m = mask.astype(float)
            within = 0.5 * ((m @ up.pair) * m).sum(axis=1)
            size = m @ up.sizes
            cost += np.where(size >= 2, 2.0 * within / np.maximum(size, 1.0), 0.0)
        return cost
    assert up.take is not None and up.home is not None
    for mask in onehots:
        sums = mask.astype(float) @ up.take  # (P, L): the class's cost with representative r
        sums[~mask[:, up.home]] = math.inf  # r must be inside the class
        cost += np.where(mask.any(axis=1), sums.min(axis=1), 0.0)
    return cost


def _enumerated(fam: FamilyInstance, pool: int, normalized: bool = False) -> FamilyTable:
    """Exact: the ``pool`` cheapest feasible partitions at every class count (by the normalized
    class costs when asked; see ``_partition_costs``)."""
    up = fam.reduced
    if up.m == 0:
        labels = fam.layer_labels(np.zeros(0, dtype=int))
        return {len(fam.pinned): [FamilyOption(fam.layer_partition_cost(labels), tuple(labels.tolist()))]}
    rows = set_partitions(up.m)
    costs = _partition_costs(up, rows, normalized)
    counts = rows.max(axis=1).astype(int) + 1
    table: FamilyTable = {}
    for c in np.unique(counts):
        idx = np.flatnonzero((counts == c) & np.isfinite(costs))
        options = []
        for i in idx[np.argsort(costs[idx], kind="stable")]:
            labels = fam.layer_labels(rows[i].astype(int))
            cost = fam.layer_partition_cost(labels)  # also checks contiguity
            if math.isfinite(cost):
                rank_by = costs[i] + up.constant if normalized else cost
                options.append(FamilyOption(float(rank_by), tuple(labels.tolist())))
                if len(options) == pool:
                    break
        if options:
            table[int(c) + len(fam.pinned)] = options
    return table


def _unit_labels(fam: FamilyInstance, layer_labels: np.ndarray) -> np.ndarray:
    return canonical(np.array([layer_labels[u[0]] for u in fam.units], dtype=int))


def _neighbours(up: UnitProblem, lab: np.ndarray) -> list[np.ndarray]:
    """Labellings one move or one swap away from ``lab``, cheapest first (pairwise: by exact
    delta; assignment: moves only, scored class by class)."""
    m, k = up.m, int(lab.max()) + 1
    onehot = np.eye(k, dtype=float)[lab]  # (m, k)
    blocked = (up.forbidden.astype(float) @ onehot) > 0  # u may not join class c
    if up.max_size is not None:
        load = onehot.T @ up.sizes
        blocked |= load[None, :] + up.sizes[:, None] > up.max_size
    found: list[tuple[float, int, np.ndarray]] = []
    if up.kind is CostKind.pairwise:
        assert up.pair is not None
        s = up.pair @ onehot  # s[u, c]: u's cost with class c
        own = s[np.arange(m), lab]
        move = s - own[:, None]
        move[blocked] = math.inf
        move[np.arange(m), lab] = math.inf
        for u, c in zip(*np.nonzero(np.isfinite(move)), strict=True):
            new = lab.copy()
            new[u] = c
            found.append((float(move[u, c]), len(found), new))
        for u in range(m):
            for v in range(u + 1, m):
                a, b = lab[u], lab[v]
                if a == b:
                    continue
                # u leaves a for b (minus v), v leaves b for a (minus u)
                delta = (s[u, b] - up.pair[u, v] - own[u]) + (s[v, a] - up.pair[u, v] - own[v])
                if not math.isfinite(delta) or _swap_blocked(up, lab, u, v):
                    continue
                new = lab.copy()
                new[u], new[v] = b, a
                found.append((float(delta), len(found), new))
    else:
        base = {c: up.class_cost(np.flatnonzero(lab == c)) for c in range(k)}
        for u in range(m):
            for c in range(k):
                if c == lab[u] or blocked[u, c]:
                    continue
                new = lab.copy()
                new[u] = c
                delta = (up.class_cost(np.flatnonzero(new == c)) + up.class_cost(np.flatnonzero(new == lab[u]))
                         - base[c] - base[lab[u]])
                if math.isfinite(delta):
                    found.append((delta, len(found), new))
    found.sort(key=lambda t: (t[0], t[1]))
    return [new for _, _, new in found]


def _swap_blocked(up: UnitProblem, lab: np.ndarray, u: int, v: int) -> bool:
    a, b = lab[u], lab[v]
    in_a = np.flatnonzero((lab == a) & (np.arange(up.m) != u))
    in_b = np.flatnonzero((lab == b) & (np.arange(up.m) != v))
    if up.forbidden[u, in_b].any() or up.forbidden[v, in_a].any():
        return True
    if up.max_size is not None:
        return bool(up.sizes[in_a].sum() + up.sizes[v] > up.max_size or up.sizes[in_b].sum() + up.sizes[u] > up.max_size)
    return False


def _neighbourhood(
    fam: FamilyInstance,
    pool: int,
    seeds: Sequence[np.ndarray],
    deadline: Deadline | None = None,
    max_classes: int | None = None,
) -> FamilyTable:
    """Heuristic: the best known partition per class count and its cheapest neighbours.

    The seeds (the optimum's labels) go first and then the curve's incumbents from the most
    classes down, so a deadline cuts the least useful starts. Starts above ``max_classes`` + 1
    are skipped: neither they nor their neighbours (one class fewer at most) fit the budget.
    """
    curve = initial_curve(fam, deadline)
    starts = [np.asarray(s, dtype=int) for s in seeds]
    starts += [lab for k, lab in sorted(curve.labels.items(), reverse=True) if int(lab.max()) + 1 == k]
    if max_classes is not None:
        starts = [lab for lab in starts if int(lab.max()) + 1 <= max_classes + 1]
    table: dict[int, dict[tuple[int, ...], float]] = defaultdict(dict)

    def offer(labels: np.ndarray) -> None:
        labels = canonical(labels)
        cost = fam.layer_partition_cost(labels)
        if math.isfinite(cost):
            table[int(labels.max()) + 1].setdefault(tuple(labels.tolist()), cost)

    for start in starts:
        if deadline is not None and deadline.expired():
            break
        offer(start)
        if fam.reduced.m < 2:
            continue
        units = _unit_labels(fam, start)
        for i, new in enumerate(_neighbours(fam.reduced, units)[: 4 * pool]):
            if deadline is not None and i % 64 == 63 and deadline.expired():
                break
            offer(fam.layer_labels(new))
    return {
        k: [FamilyOption(c, lab) for lab, c in sorted(opts.items(), key=lambda t: (t[1], t[0]))[:pool]]
        for k, opts in sorted(table.items())
    }


def family_table(
    fam: FamilyInstance,
    pool: int,
    seeds: Sequence[np.ndarray] = (),
    *,
    normalized: bool = False,
    deadline: Deadline | None = None,
    max_classes: int | None = None,
) -> tuple[FamilyTable, bool]:
    """The ``pool`` best options per class count, and whether the lists are exact.

    ``normalized`` ranks by size-normalized class costs where every partition is enumerated
    (pairwise costs); larger families keep the plain objective's neighbourhood, whose search
    stops at ``deadline`` and skips class counts past ``max_classes`` (the budget's reach).
    """
    if fam.reduced.m <= ENUM_MAX_UNITS:
        return _enumerated(fam, pool, normalized and fam.kind is CostKind.pairwise), True
    return _neighbourhood(fam, pool, seeds, deadline, max_classes), False


@dataclass(frozen=True)
class Combination:
    """One option per family: (class count, rank in that count's list) in family order."""

    cost: float
    params: int
    picks: tuple[tuple[int, int], ...]


def k_best_combinations(
    tables: Sequence[FamilyTable],
    params: Sequence[dict[int, int]],
    budget: int | None,
    n: int,
    deadline: Deadline | None = None,
) -> list[Combination]:
    """The n cheapest combinations with total params <= budget (ties: fewer params, then order).

    K shortest paths layer by layer: after each family, every reachable params total keeps its
    n cheapest partial sums, each found lazily as a k-best sum of two sorted lists. Nothing
    (an empty list) when ``deadline`` passes before the last family: partial layers rank nothing,
    and none when ``n`` < 1 (a later family would find no partial sum to extend).
    """
    if n < 1:
        return []
    rest_min = [0] * (len(tables) + 1)
    for f in range(len(tables) - 1, -1, -1):
        rest_min[f] = rest_min[f + 1] + min(params[f][k] for k in tables[f])
    # node lists: params total -> [(cost, back)], back = (previous total, its rank, count, option rank)
    layers: list[dict[int, list[tuple[float, tuple[int, int, int, int] | None]]]] = [{0: [(0.0, None)]}]
    for f, table in enumerate(tables):
        prev = layers[-1]
        sources: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for total in prev:
            for k in table:
                t = total + params[f][k]
                if budget is None or t + rest_min[f + 1] <= budget:
                    sources[t].append((total, k))
        layer = {}
        for t, srcs in sources.items():
            if deadline is not None and deadline.expired():
                return []
            heap = [(prev[total][0][0] + table[k][0].cost, total, k, 0, 0) for total, k in srcs]
            heapq.heapify(heap)
            seen = {(total, k, 0, 0) for total, k in srcs}
            out = []
            while heap and len(out) < n:
                cost, total, k, i, j = heapq.heappop(heap)
                out.append((cost, (total, i, k, j)))
                for ii, jj in ((i + 1, j), (i, j + 1)):
                    if ii < len(prev[total]) and jj < len(table[k]) and (total, k, ii, jj) not in seen:
                        seen.add((total, k, ii, jj))
                        heapq.heappush(heap, (prev[total][ii][0] + table[k][jj].cost, total, k, ii, jj))
            layer[t] = out
        layers.append(layer)
    ends = sorted(((cost, t, r) for t, lst in layers[-1].items() for r, (cost, _) in enumerate(lst)))[:n]
    out = []
    for cost, t, r in ends:
        picks = []
        total, rank = t, r
        for f in range(len(tables), 0, -1):
            back = layers[f][total][rank][1]
            assert back is not None
            total, rank, k, j = back
            picks.append((k, j))
        out.append(Combination(cost, t, tuple(reversed(picks))))
    return out


def sharing_pairs(groups: Sequence[Sequence[str]]) -> set[tuple[str, str]]:
    """Every pair of layers that share a tensor."""
    return {(a, b) if a < b else (b, a) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]}


def plan_distance(a: Sequence[Sequence[str]], b: Sequence[Sequence[str]]) -> int:
    """Layer pairs that share in exactly one of the two plans (0 iff the plans are the same)."""
    return len(sharing_pairs(a) ^ sharing_pairs(b))


def coloring_pairs(coloring: dict[str, int]) -> frozenset[tuple[str, str]]:
    """``sharing_pairs`` straight from a coloring, to compare candidates before building plans."""
    classes: dict[int, list[str]] = defaultdict(list)
    for name, c in coloring.items():
        classes[c].append(name)
    return frozenset(sharing_pairs(list(classes.values())))
