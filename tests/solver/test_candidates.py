"""The candidate pool: the optimum first, distinct plans, all within the budget."""

from __future__ import annotations

from solver import solve
from solver.candidates import candidate_plans
from solver.evaluate import violations

from .cases import random_problem


def test_pool_holds_the_optimum_first_and_distinct_feasible_plans():
    problem = random_problem([6, 6, 5], seed=3, ratio=0.6)
    pool = candidate_plans(problem)
    assert pool[0].objective == solve(problem).objective
    keys = [tuple(sorted(tuple(g) for g in p.groups)) for p in pool]
    assert len(set(keys)) == len(keys) >= 2
    assert all(violations(problem, p.coloring) == [] for p in pool)
    assert all(p.objective >= pool[0].objective - 1e-12 for p in pool)
    top = [p for p in pool if p.strategy is None or p.strategy.startswith("top-")]
    assert [p.objective for p in top] == sorted(p.objective for p in top)
