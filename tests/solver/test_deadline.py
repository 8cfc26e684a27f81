"""time_limit_s bounds a whole request, alternatives and frontier included (issue 15, item 3).

Before: ``top: 1000, time_limit_s: 1`` on 24 layers ran 9.1 s, and ``top: 5, min_distance:
10**15`` ran 29 s against a 3 s limit. The contract now: a request ends within time_limit_s + 1 s
with the best found so far, and says when the clock cut it.
"""

from __future__ import annotations

import time

import pytest

from solver import SharingProblem, frontier, solve
from solver.candidates import solve_with_alternatives
from solver.deadline import Deadline
from solver.evaluate import violations

from .cases import random_problem

SLACK_S = 1.0  # the contract's allowance past time_limit_s


def _problem(sizes: list[int], **options) -> SharingProblem:
    data = random_problem(sizes, seed=0, ratio=0.5).model_dump(mode="json")
    data["options"].update(options)
    return SharingProblem.model_validate(data)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def test_top_1000_in_one_second():
    problem = _problem([24], top=1000, time_limit_s=1.0)
    plan, took = _timed(solve_with_alternatives, problem)
    assert took < 1.0 + SLACK_S
    assert violations(problem, plan.coloring) == []
    assert all(violations(problem, alt.coloring) == [] for alt in plan.alternatives or [])
    if len(plan.alternatives or []) < 999:  # the clock cut the list: the plan says so
        assert plan.solver.time_limit_hit is True and "time_limit_s=1" in plan.message


def test_unreachable_min_distance_is_quick():
    """No two plans of 24 layers differ in 10^15 sharing pairs: nothing to search for."""
    problem = _problem([24], top=5, min_distance=10**15, time_limit_s=3.0)
    plan, took = _timed(solve_with_alternatives, problem)
    assert took < 3.0 + SLACK_S
    assert not any(alt.strategy.startswith("top-") for alt in plan.alternatives)
    assert {"sequence", "cycle"} <= {alt.strategy for alt in plan.alternatives}


def test_deep_min_distance_is_cut_and_says_so():
    """A reachable but deep distance widens the pool up to 20,000 combinations: the clock stops it."""
    problem = _problem([24], top=5, min_distance=30, time_limit_s=2.0)
    plan, took = _timed(solve_with_alternatives, problem)
    assert took < 2.0 + SLACK_S
    tops = [alt for alt in plan.alternatives if alt.strategy.startswith("top-")]
    if len(tops) < 4:
        assert plan.solver.time_limit_hit is True and plan.message


def test_exact_dp_that_does_not_fit_is_skipped():
    """A 16-layer family's DP takes seconds; a 0.05 s request gets heuristics and an honest status."""
    problem = _problem([16], time_limit_s=0.05)
    plan, took = _timed(solve, problem)
    assert took < 0.05 + SLACK_S
    assert "subset-dp" not in plan.solver.method
    assert plan.bound <= plan.objective
    assert (plan.status.value == "optimal") == (plan.gap <= 1e-7)


def test_frontier_within_its_limit():
    problem = _problem([30, 26], time_limit_s=1.0)
    front, took = _timed(frontier, problem)
    assert took < 1.0 + SLACK_S
    assert front.points and all(p.bound <= p.objective for p in front.points)


def test_a_shorter_deadline_wins_over_the_problem_limit():
    # two 80-layer families take 2.8 s to prove (one of 40 is proven in 0.1 s since column
    # generation, so it no longer tested the cut)
    problem = _problem([80, 80], time_limit_s=60.0)
    plan, took = _timed(lambda: solve(problem, deadline=Deadline.after(0.5)))
    assert took < 0.5 + SLACK_S
    assert plan.solver.time_limit_hit is True and plan.status.value == "feasible"


def test_unhurried_alternatives_are_complete_and_unflagged():
    problem = _problem([6, 5, 4], top=8, time_limit_s=10.0)
    plan = solve_with_alternatives(problem)
    assert plan.status.value == "optimal" and plan.solver.time_limit_hit is False and plan.message is None
    assert [a.strategy for a in plan.alternatives if a.strategy.startswith("top-")] == [f"top-{i}" for i in range(2, 9)]


@pytest.mark.parametrize("fraction", [0.25, 0.7])
def test_deadline_shares_never_outlast_the_whole(fraction):
    whole = Deadline.after(2.0)
    part = whole.share(fraction)
    assert part.end <= whole.end and part.seconds == pytest.approx(fraction * 2.0)
    assert Deadline.after(0.0).expired() and Deadline.never().left() == float("inf")
