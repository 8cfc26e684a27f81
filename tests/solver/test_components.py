"""The per-family algorithms one by one, against the exact subset DP and brute force."""

from __future__ import annotations

import numpy as np
import pytest

from solver.bounds import assignment_all_k, pairwise_all_k
from solver.exact import exact_curve
from solver.family import UnitProblem
from solver.heuristics import agglomerative, tabu_search
from solver.knapsack import best_within, pareto
from solver.mip import min_classes
from solver.pmedian import p_median
from solver.schema import CostKind


def _pairwise(m, seed, forbid=0, max_size=None):
    rng = np.random.default_rng(seed)
    w = rng.random((m, m)) ** 3
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0)
    f = np.zeros((m, m), dtype=bool)
    for _ in range(forbid):
        a, b = rng.choice(m, 2, replace=False)
        f[a, b] = f[b, a] = True
    return UnitProblem(CostKind.pairwise, np.ones(m, dtype=int), f, max_size, pair=np.where(f, 0, w))


def _assignment(m, seed):
    rng = np.random.default_rng(seed)
    c = rng.random((m, m))
    np.fill_diagonal(c, 0)
    return UnitProblem(CostKind.assignment, np.ones(m, dtype=int), np.zeros((m, m), dtype=bool), None, take=c, home=np.arange(m))


@pytest.mark.parametrize("seed", range(3))
def test_tabu_reaches_the_exact_optimum_on_12_units(seed):
    up = _pairwise(12, seed, forbid=3, max_size=5)
    ex = exact_curve(up)
    agg = agglomerative(up)
    for k in range(3, 11):
        if k not in agg:
            continue
        _, cost = tabu_search(up, agg[k], k, 3000, seed=0)
        assert cost == pytest.approx(ex.costs[k - 1], rel=1e-9, abs=1e-12)


def test_p_median_is_exact():
    up = _assignment(11, 2)
    ex = exact_curve(up)
    for k in (1, 3, 6, 10):
        res = p_median(up, k, time_limit_s=20)
        assert res.proven
        assert res.objective == pytest.approx(ex.costs[k - 1], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_lower_bounds_are_valid(seed):
    up = _pairwise(11, seed, forbid=2, max_size=6)
    ex = exact_curve(up)
    lb = pairwise_all_k(up)
    for k in range(1, 12):
        if np.isfinite(ex.costs[k - 1]):
            assert lb[k - 1] <= ex.costs[k - 1] + 1e-12
    upa = _assignment(10, seed)
    exa = exact_curve(upa)
    lba = assignment_all_k(upa)
    assert all(lba[k] <= exa.costs[k] + 1e-12 for k in range(10))


def test_min_classes_sees_cliques_and_sizes():
    up = _pairwise(6, 0, max_size=2)
    assert min_classes(up, 6, 10) == (3, True)
    f = np.zeros((6, 6), dtype=bool)
    f[np.ix_(range(4), range(4))] = True
    np.fill_diagonal(f, False)
    up = UnitProblem(CostKind.pairwise, np.ones(6, dtype=int), f, None, pair=np.zeros((6, 6)))
    assert min_classes(up, 6, 10) == (4, True)


def test_knapsack_matches_enumeration():
    rng = np.random.default_rng(0)
    fams = [[(int(p), float(c), k) for k, (p, c) in enumerate(zip(rng.integers(1, 20, 5), rng.random(5), strict=True))] for _ in range(3)]
    front = pareto(fams)
    import itertools

    for budget in range(3, 60, 4):
        combos = [c for c in itertools.product(*fams) if sum(o[0] for o in c) <= budget]
        point = best_within(front, budget)
        if not combos:
            assert point is None
            continue
        assert point.cost == pytest.approx(min(sum(o[1] for o in c) for c in combos))


@pytest.mark.parametrize("seed", range(3))
def test_p_median_is_exact_with_forbidden_pairs_and_a_size_cap(seed):
    # 14 units: more than the 12 nearest representatives the restricted model starts from,
    # so pricing has to bring the rest in when they pay
    rng = np.random.default_rng(seed)
    up = _assignment(14, seed)
    up.take = up.take * rng.random(14)[None, :] ** 4  # a few cheap hubs: big classes pay
    for _ in range(4):
        a, b = rng.choice(14, 2, replace=False)
        up.forbidden[a, b] = up.forbidden[b, a] = True
    up.max_size = 6
    ex = exact_curve(up)
    for k in (3, 5, 9):
        res = p_median(up, k, time_limit_s=20, hint=agglomerative(up).get(k))
        if not np.isfinite(ex.costs[k - 1]):
            continue
        assert res.proven and res.bound <= ex.costs[k - 1] * (1 + 1e-9)
        assert res.objective == pytest.approx(ex.costs[k - 1], rel=1e-9, abs=1e-12)
        # the same duals bound every class count
        assert all(b <= c * (1 + 1e-9) + 1e-15 for b, c in zip(res.every_k, ex.costs, strict=True))
