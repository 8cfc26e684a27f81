"""The solver at LLM depth (issue 20): assignment kind proven fast, column-generation bounds,
more time never a worse plan."""

from __future__ import annotations

import time

import numpy as np
import pytest

from solver import curves, solve
from solver.evaluate import violations
from solver.family import build_families
from solver.heuristics import agglomerative
from solver.knapsack import pareto

from .brute import brute_optimum
from .cases import random_problem
from .test_optimality import CASES


def _assignment_problem(n: int, seed: int, ratio: float = 0.5):
    """One family of n layers with curvature-like assignment costs (weights drifting with depth)."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(n, 8)), axis=0)
    h = rng.lognormal(sigma=0.7, size=n)
    take = 0.5 * h[:, None] * ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    problem = random_problem([n], seed=seed, kind="assignment", ratio=ratio)
    data = problem.model_dump()
    data["costs"]["matrix"] = take.tolist()
    return type(problem).model_validate(data)


def test_assignment_kind_is_proven_optimal_fast_at_288_layers():
    # before: agglomerative alone took 20 s (every pair recomputed per merge) and the SCIP
    # p-median stopped with gap 0.15 at 20 s; now the whole solve is proven in under a second
    problem = _assignment_problem(288, seed=5)
    t = time.perf_counter()
    plan = solve(problem)
    took = time.perf_counter() - t
    assert plan.status.value == "optimal" and plan.gap <= 1e-7
    assert took < 5.0  # 0.7 s on a shared 2-core machine; generous for slower CI


def test_assignment_agglomerative_matches_the_pairwise_recomputation():
    # the incremental merge-cost rows give the same merges as recomputing every pair
    problem = _assignment_problem(30, seed=2)
    up = build_families(problem)[0].reduced
    out = agglomerative(up)
    assert sorted(out) == list(range(1, 31))
    for k, lab in out.items():
        assert int(lab.max()) + 1 == k
    # the first merge is the cheapest pair either way round
    two = np.minimum(up.take, up.take.T)
    np.fill_diagonal(two, np.inf)
    a, b = np.unravel_index(np.argmin(two), two.shape)
    assert out[29][a] == out[29][b]


LARGE_PATH = [c for c in CASES if not c[3].get("contiguous")]


@pytest.mark.parametrize("families,kind,ratio,cons", LARGE_PATH)
def test_the_large_family_path_is_exact_against_brute_force(monkeypatch, make_problem, families, kind, ratio, cons):
    # the subset DP would take these small families; without it they go the way a 48- or
    # 80-layer family goes (column generation and its exact closure, or the p-median MIP)
    monkeypatch.setattr(curves, "exact_affordable", lambda *_: False)
    problem = make_problem(families, seed=sum(families), kind=kind, ratio=ratio, **cons)
    best, _ = brute_optimum(problem)
    plan = solve(problem)
    assert "subset-dp" not in plan.solver.method
    assert violations(problem, plan.coloring) == []
    assert plan.bound <= best * (1 + 1e-9) + 1e-12
    assert plan.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert plan.status.value == "optimal"


def test_a_longer_limit_runs_a_prefix_extension_of_a_shorter_ones_steps(monkeypatch):
    # 600 s once ended 0.2% worse than 30 s on 7x32 layers: the effort per cell was a share of
    # the limit, so the two limits searched along different paths. Now the schedule is fixed
    # and the limit only decides where it stops.
    from solver import planning

    calls: list[list[tuple[str, int, float]]] = []
    real = planning.improve

    def recording(curve, k, effort, *args, **kwargs):
        calls[-1].append((curve.fam.name, k, effort))
        real(curve, k, effort, *args, **kwargs)

    monkeypatch.setattr(planning, "improve", recording)
    problem = random_problem([80, 80, 70], seed=4, ratio=0.4, time_limit_s=60)
    plans = []
    for seconds in (1.5, 5.0):
        calls.append([])
        plans.append(solve(problem, deadline=planning.Deadline.after(seconds)))
    short, long = calls
    assert short and long[: len(short)] == short
    assert plans[1].objective <= plans[0].objective
    assert plans[1].bound >= plans[0].bound * (1 - 1e-12)


def test_progress_shows_objective_and_bound_closing_over_time():
    problem = random_problem([40, 36, 30], seed=7, ratio=0.45, time_limit_s=30)
    events = []
    plan = solve(problem, progress=events.append)
    assert len(events) >= 2
    assert all(a.objective >= b.objective - 1e-12 and a.bound <= b.bound + 1e-12 for a, b in zip(events, events[1:], strict=False))
    assert all(a.elapsed_s <= b.elapsed_s and a.steps <= b.steps for a, b in zip(events, events[1:], strict=False))
    assert events[0].steps == 0 and events[0].round == 1
    assert events[-1].objective == pytest.approx(plan.objective, rel=1e-9)
    assert events[-1].bound == pytest.approx(plan.bound, rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_within_a_budget_is_the_full_front_cut_at_it(seed):
    rng = np.random.default_rng(seed)
    options = [[(int(rng.integers(1, 40)), float(rng.integers(0, 9)), k) for k in range(1, int(rng.integers(2, 9)))]
               for _ in range(int(rng.integers(2, 6)))]
    full = pareto(options)
    for budget in (0, 20, 45, 80, 10_000):
        assert pareto(options, budget) == [p for p in full if p.params <= budget]
        for cap in (0.0, 7.0, 15.0):
            assert pareto(options, budget, cap) == [p for p in full if p.params <= budget and p.cost <= cap]


@pytest.mark.slow
@pytest.mark.parametrize("model,seconds", [("llama-8b", 30.0), ("llama-70b", 30.0)])
def test_llm_depth_reaches_a_gap_of_one_percent_in_30_s(model, seconds):
    # issue 20's goal on the bench's instances: 7 x 32 and 7 x 80 layers, GQA sizes, ratio 0.5
    # (the release ended with gaps of 21% and 26% here); both are proven optimal on 2 cores
    from bench.instances import llm_problem

    problem = llm_problem(model, seed=1, ratio=0.5, time_limit_s=seconds)
    plan = solve(problem)
    assert plan.gap <= 0.01
    assert violations(problem, plan.coloring) == []


def test_a_cell_worked_for_the_bound_only_raises_its_bound_and_keeps_its_plan(monkeypatch):
    # the first visit of a cell that only the bound's knapsack picks: column generation alone
    from solver.exact import exact_curve

    monkeypatch.setattr(curves, "exact_affordable", lambda *_: False)
    fam = build_families(random_problem([14], seed=3, ratio=0.5))[0]
    curve = curves.initial_curve(fam)
    optimum = exact_curve(fam.reduced).costs
    k = 5
    ub, labels, lb = dict(curve.ub), {kk: v.copy() for kk, v in curve.labels.items()}, dict(curve.lb)
    curves.improve(curve, k, 0.5, 1, 0, bound_only=True)
    assert curve.ub == ub and all((curve.labels[kk] == v).all() for kk, v in labels.items())
    assert curve.lb[k] > lb[k]
    for kk in curve.ks:  # its duals' lines lift the other counts too, never past their optimum
        assert lb[kk] <= curve.lb[kk] <= optimum[kk - 1] + fam.reduced.constant + 1e-12
    assert curve.tried[k] == 1 and "colgen-mip" not in curve.methods
    curves.improve(curve, k, 0.5, 1, 0)  # the next visit does the whole work
    assert curve.ub[k] == pytest.approx(optimum[k - 1] + fam.reduced.constant, rel=1e-9)
