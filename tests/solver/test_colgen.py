"""Column generation's pieces against brute force: pricing, the LP bound, the exact closure."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from solver import pricing
from solver.colgen import ColumnPool, Master, gap_columns, integer_master, lp_bound
from solver.deadline import Deadline
from solver.exact import exact_curve
from solver.family import UnitProblem
from solver.heuristics import agglomerative
from solver.pricing import (
    _Children,
    _extension_bounds,
    enumerate_classes,
    greedy_classes,
    least_class,
)
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
    # a class the caller holds prunes from the start and changes nothing of the answer
    ranked = sorted(_all_classes(up, p))
    for f_known, _ in (ranked[0], ranked[len(ranked) // 2]):
        warm = least_class(up, p, below=-np.inf, known=f_known)
        assert warm.complete and warm.value == pytest.approx(truth, abs=1e-12) and warm.bound == pytest.approx(truth, abs=1e-12)


@pytest.mark.parametrize("sizes_one_by_one", [16, 2])
@pytest.mark.parametrize("seed", range(4))
def test_cut_short_pricing_bounds_every_class_it_did_not_see(monkeypatch, seed, sizes_one_by_one):
    # the open nodes' extension bounds, not just their negative marginals: still below the truth
    # (2: every size above 2 bounded together, the tail bound)
    monkeypatch.setattr(pricing, "_SIZES", sizes_one_by_one)
    up = _pairwise(12, seed, forbid=2, max_size=6 if seed % 2 else None)
    p = np.random.default_rng(7 + seed).random(12) * 1.5
    truth = min(f for f, _ in _all_classes(up, p))
    for limit in (1, 2, 5, 20):
        cut = least_class(up, p, below=-np.inf, node_limit=limit)
        assert cut.bound <= truth + 1e-12
        assert cut.value >= truth - 1e-12  # a real class's value
    whole = least_class(up, p, below=-np.inf)
    assert whole.complete and whole.value == pytest.approx(truth, abs=1e-12)
    found, complete = enumerate_classes(up, p, truth + 0.1, cap=10_000)
    assert complete and len(found) == sum(f <= truth + 0.1 for f, _ in _all_classes(up, p))


@pytest.mark.parametrize("sizes_one_by_one", [16, 3])
@pytest.mark.parametrize("seed", range(5))
def test_extension_bounds_of_all_children_match_one_at_a_time_and_brute_force(monkeypatch, seed, sizes_one_by_one):
    # 3: sizes above 3 bounded together (the cheaper tail bound) must still hold
    monkeypatch.setattr(pricing, "_SIZES", sizes_one_by_one)
    rng = np.random.default_rng(seed)
    up = _pairwise(9, seed, forbid=3, max_size=4 if seed % 2 else None, sizes=rng.integers(1, 3, 9))
    cand = rng.permutation(9)[:7]
    marg = rng.random(7) * 0.8 - 0.6
    sub = up.pair[np.ix_(cand, cand)]
    f, rest = _Children(up).expand(0.0, cand, marg, sub, room=5, negative_only=False)
    assert (f == marg).all()
    child_marg = marg[None, :] + sub
    batch = _extension_bounds(sub, child_marg, rest)
    for i in range(7):
        allowed = np.flatnonzero(rest[i])
        alone = _extension_bounds(sub[np.ix_(allowed, allowed)], child_marg[i, allowed][None, :], np.ones((1, len(allowed)), dtype=bool))
        assert batch[i] == pytest.approx(alone[0], abs=1e-12)
        # no subset T of the allowed candidates changes f by less (the marginals already hold
        # the pair costs to child i's class)
        changes = [child_marg[i, list(t)].sum() + sub[np.ix_(list(t), list(t))].sum() / 2.0
                   for r in range(len(allowed) + 1) for t in itertools.combinations(allowed, r)]
        assert batch[i] <= min(changes) + 1e-12
        if sizes_one_by_one >= 7:  # every size one by one: exact for T of one or no member
            assert batch[i] <= min(0.0, child_marg[i, allowed].min(initial=0.0)) + 1e-12


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


@pytest.mark.parametrize("seed", [2, 3])
def test_a_bound_stopped_close_to_the_master_is_valid_and_the_next_call_carries_on(seed):
    # two classes of 12 units: the bound meets the master's value only after a tail of exact
    # pricings, which ``close`` cuts
    up = _pairwise(12, seed, forbid=2)
    ex = exact_curve(up)
    agg = agglomerative(up)
    k = 2
    pool = ColumnPool(up)
    for u in range(up.m):
        pool.add(np.arange(up.m) == u)
    pool.add_labels(agg[k])
    master = Master(pool)
    rough = lp_bound(up, k, pool, master, Deadline.after(30), close=0.2)
    assert not rough.optimal_lp and rough.bound < rough.lp_value
    assert (1 - 0.2) * rough.lp_value <= rough.bound <= ex.costs[k - 1] * (1 + 1e-9)
    # the best bound's duals are kept: the next call starts from them and ends at the LP optimum
    assert master.centers[k].value == pytest.approx(rough.bound, abs=1e-12)
    full = lp_bound(up, k, pool, master, Deadline.after(30))
    assert full.optimal_lp and rough.bound <= full.bound + 1e-12
    assert full.bound <= ex.costs[k - 1] * (1 + 1e-9)
    assert float(full.pi.sum()) + k * min(0.0, full.least) == pytest.approx(full.bound, abs=1e-12)


def test_the_master_gets_the_time_left_whatever_it_ran_before():
    # HiGHS checks time_limit against the run time of every run of one object: a limit of the
    # time left alone ended a long-used master at once, with time still left
    up = _pairwise(40, 0)
    pool = ColumnPool(up)
    for u in range(up.m):
        pool.add(np.arange(up.m) == u)
    master = Master(pool)
    for k, labels in sorted(agglomerative(up).items()):
        pool.add_labels(labels)
        assert master.solve(max(k, 2), Deadline.after(30)) is not None
    spent = master.h.getRunTime()
    assert spent > 2e-3  # more than the time left below: the old limit would have cut it
    assert master.solve(4, Deadline.after(2e-3)) is not None
