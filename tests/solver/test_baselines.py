"""Named strategies: the patterns they promise, the same budget, and honest scores."""

from __future__ import annotations

import numpy as np
import pytest

from solver import solve
from solver.baselines import Strategy, baseline, pattern_labels
from solver.evaluate import objective, violations

from .cases import random_problem


def test_patterns_match_takase_kiyono():
    assert pattern_labels(Strategy.sequence, 6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert pattern_labels(Strategy.cycle, 6, 3).tolist() == [0, 1, 2, 0, 1, 2]
    assert pattern_labels(Strategy.cycle_rev, 6, 3).tolist() == [0, 1, 2, 2, 1, 0]
    assert pattern_labels(Strategy.adjacent_pairs, 6, 4).tolist() == [0, 0, 1, 1, 2, 3]
    assert pattern_labels(Strategy.adjacent_pairs, 6, 2) is None
    assert pattern_labels(Strategy.all_share, 4, 1).tolist() == [0, 0, 0, 0]
    lab = pattern_labels(Strategy.random, 9, 4, np.random.default_rng(0))
    assert len(set(lab.tolist())) == 4


@pytest.mark.parametrize("strategy", ["sequence", "cycle", "cycle-rev", "adjacent-pairs", "random"])
def test_strategies_meet_budget_and_never_beat_the_optimum(strategy):
    problem = random_problem([6, 6, 4], seed=9, ratio=0.6, pinned=["block1.f1.weight"])
    best = solve(problem)
    plan = baseline(problem, strategy)
    assert plan.status.value == "feasible", plan.message
    assert violations(problem, plan.coloring) == []
    assert plan.objective == pytest.approx(objective(problem, plan.coloring))
    assert plan.objective >= best.objective - 1e-12


def test_all_share_needs_a_budget_that_allows_it():
    problem = random_problem([4, 4], ratio=0.1)
    plan = baseline(problem, "all-share")
    assert plan.status.value == "infeasible" and "budget" in plan.message
    problem = random_problem([4, 4], ratio=0.5)
    plan = baseline(problem, "all-share")
    assert len(plan.groups) == 2


def test_weight_distance_clusters_on_distances():
    problem = random_problem([6], seed=1, ratio=0.5)
    # distances that make {0,1,2} and {3,4,5} the obvious clusters
    dist = [[0.0 if (i < 3) == (j < 3) else 10.0 for j in range(6)] for i in range(6)]
    plan = baseline(problem, "weight-distance", distances=dist)
    assert plan.coloring["block0.f0.weight"] == plan.coloring["block2.f0.weight"]
    assert plan.coloring["block0.f0.weight"] != plan.coloring["block3.f0.weight"]
    assert plan.objective == pytest.approx(objective(problem, plan.coloring))
    with pytest.raises(ValueError, match="distance matrix"):
        baseline(problem, "weight-distance")
