"""Column generation's pieces against brute force: pricing, the LP bound, the exact closure."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from solver.colgen import ColumnPool, Master, gap_columns, integer_master, lp_bound
from solver.deadline import Deadline
from solver.exact import exact_curve
from solver.family import UnitProblem
from solver.heuristics import agglomerative
from solver.pricing import enumerate_classes, greedy_classes, least_class
from solver.schema import CostKind


def _pairwise(m: int, seed: int, forbid: int = 0, max_size: int | None = None, sizes: np.ndarray | None = None) -> UnitProblem:
    rng = np.random.default_rng(seed)
    w = rng.random((m, m)) ** 2
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0)
    f = np.zeros((m, m), dtype=bool)
    for _ in range(forbid):
        a, b = rng.choice(m, 2, replace=False)
        f[a, b] = f[b, a] = True
    sizes = np.ones(m, dtype=int) if sizes is None else sizes
    return UnitProblem(CostKind.pairwise, sizes, f, max_size, pair=np.where(f, 0, w))


def _all_classes(up: UnitProblem, p: np.ndarray) -> list[tuple[float, tuple[int, ...]]]:
    """(f(S), S) for every allowed nonempty class."""
    out = []
    for r in range(1, up.m + 1):
        for s in itertools.combinations(range(up.m), r):
            cost = up.class_cost(list(s))
            if np.isfinite(cost):
                out.append((cost - float(p[list(s)].sum()), s))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_least_class_is_the_brute_force_minimum(seed):
    up = _pairwise(11, seed, forbid=4, max_size=5 if seed % 2 else None, sizes=np.array([1, 2] * 5 + [1]))
    rng = np.random.default_rng(100 + seed)
    p = rng.random(11) * rng.choice([0.3, 1.0, 3.0]) - 0.1  # some duals negative
    truth = min(f for f, _ in _all_classes(up, p))
    least = least_class(up, p, below=-np.inf)  # nothing to collect: the whole proof
    assert least.complete and least.value == pytest.approx(truth, abs=1e-12)
    assert least.bound == pytest.approx(truth, abs=1e-12)
    cut = least_class(up, p, below=-np.inf, node_limit=3)  # cut short: still a valid bound
    assert cut.bound <= truth + 1e-12
    some = least_class(up, p, below=0.0, keep=3)  # stops at 3 columns: still a valid bound
    assert some.bound <= truth + 1e-12
    assert all(up.class_cost(c) - p[c].sum() < 0 for c in some.classes)
    for cls in greedy_classes(up, p, below=0.0):  # greedy finds only real classes below 0
        s = np.flatnonzero(cls)
        assert np.isfinite(up.class_cost(s)) and up.class_cost(s) - p[s].sum() < 0


@pytest.mark.parametrize("seed", range(4))
def test_enumerate_classes_lists_exactly_those_below_the_threshold(seed):
    up = _pairwise(10, seed, forbid=3, max_size=4)
    p = np.random.default_rng(seed).random(10) * 0.8
    every = _all_classes(up, p)
    threshold = sorted(f for f, _ in every)[40]
    found, complete = enumerate_classes(up, p, threshold, cap=10_000)
    assert complete
    assert sorted(tuple(sorted(int(u) for u in c)) for c in found) == sorted(s for f, s in every if f <= threshold)
    few, complete = enumerate_classes(up, p, threshold, cap=5)
    assert not complete and len(few) == 5


@pytest.mark.parametrize("scale", [1.0, 1e-5])
@pytest.mark.parametrize("seed", range(5))
def test_lp_bound_is_below_the_optimum_and_the_closure_reaches_it(seed, scale):
    # scale 1e-5: a family whose classes sum to little (HiGHS's tolerances are absolute; on the
    # bench's 7x32 instance they once ended an integer master 1e-6 above the optimum)
    up = _pairwise(12, seed, forbid=3, max_size=5 if seed % 2 else None)
    up.pair = up.pair * scale
    ex = exact_curve(up)
    agg = agglomerative(up)
    pool = ColumnPool(up)
    for u in range(up.m):
        pool.add(np.arange(up.m) == u)
    master = Master(pool)
    for k in (2, 4, 6, 9):
        if not np.isfinite(ex.costs[k - 1]) or k not in agg:
            continue
        pool.add_labels(agg[k])
        res = lp_bound(up, k, pool, master, Deadline.after(30))
        assert res.optimal_lp
        assert res.bound <= ex.costs[k - 1] * (1 + 1e-9)
        # lines from the duals bound every other count too
        for k2 in range(1, 13):
            if np.isfinite(ex.costs[k2 - 1]):
                assert float(res.pi.sum()) + k2 * min(0.0, res.least) <= ex.costs[k2 - 1] * (1 + 1e-9) + 1e-15
        upper = up.partition_cost(agg[k])
        assert gap_columns(up, pool, res, k, upper, cap=100_000, node_limit=1_000_000)
        exact = integer_master(pool, k, 30, max_nodes=100_000, hint=agg[k])
        assert exact.optimal and up.partition_cost(exact.labels) == pytest.approx(ex.costs[k - 1], rel=1e-9)
        assert exact.bound <= ex.costs[k - 1] * (1 + 1e-9)
        assert int(exact.labels.max()) + 1 <= k
