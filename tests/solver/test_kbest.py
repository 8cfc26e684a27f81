"""K best plans against brute force over every plan of small instances."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from solver import kbest
from solver.candidates import candidate_plans, pattern_plans, solve_with_alternatives, top_plans
from solver.evaluate import objective, unique_params, violations
from solver.kbest import k_best_combinations, plan_distance, set_partitions
from solver.schema import SharingProblem

from .brute import _class_cost, _feasible
from .brute import set_partitions as brute_partitions
from .cases import random_problem


def all_plans(problem: SharingProblem) -> list[tuple[float, list[list[str]]]]:
    """(objective, groups) of every feasible plan within the budget, cheapest first."""
    names = [layer.name for layer in problem.layers]
    fams: dict[str, list[int]] = {}
    for i, layer in enumerate(problem.layers):
        fams.setdefault(layer.family, []).append(i)
    unary = problem.costs.unary or [0.0] * len(names)
    per_family = []
    for fam, ids in fams.items():
        order = sorted(ids, key=lambda i: (problem.layers[i].index, i))
        cp, mp = problem.family_accounting(fam)
        options = []
        for part in brute_partitions(order):
            cost = sum(_class_cost(problem, c) for c in part) + sum(unary[i] for i in ids)
            if _feasible(problem, part, order) and math.isfinite(cost):
                options.append((cost, cp * len(part) + mp * len(ids), part))
        per_family.append(options)
    budget = problem.budget_params()
    out = []
    for combo in itertools.product(*per_family):
        if budget is None or sum(p for _, p, _ in combo) <= budget:
            groups = [[names[i] for i in c] for _, _, part in combo for c in part]
            out.append((sum(c for c, _, _ in combo), groups))
    out.sort(key=lambda t: t[0])
    return out


def test_set_partitions_are_all_restricted_growth_strings():
    for m, bell in [(0, 1), (1, 1), (2, 2), (3, 5), (5, 52), (7, 877)]:
        rows = set_partitions(m)
        assert rows.shape == (bell, m)
        assert len({tuple(r) for r in rows.tolist()}) == bell
        if m:
            assert (rows[:, 0] == 0).all()
            assert all((np.maximum.accumulate(r)[:-1] + 1 >= r[1:]).all() for r in rows)


CASES = [
    ({"families": [4, 4, 3], "seed": 1, "ratio": 0.6}, {}),
    ({"families": [5, 4], "seed": 2, "ratio": 0.5, "unary": True}, {}),
    ({"families": [4, 4, 3], "seed": 3, "ratio": 0.55, "kind": "assignment"}, {}),
    ({"families": [5, 4], "seed": 4, "ratio": 0.6, "max_group_size": 2}, {}),
    ({"families": [5, 4], "seed": 5, "ratio": 0.6, "null_prob": 0.2}, {}),
    ({"families": [6, 3], "seed": 6, "ratio": 0.6, "contiguous": True}, {}),
    ({"families": [5, 4], "seed": 7, "ratio": 0.7},
     {"pinned": ["block1.f0.weight"], "require": [["block2.f0.weight", "block3.f0.weight"]],
      "forbid": [["block0.f1.weight", "block1.f1.weight"]]}),
]


@pytest.mark.parametrize(("spec", "extra"), CASES)
def test_top_plans_are_the_brute_force_k_best(spec, extra):
    problem = random_problem(**spec)
    if extra:
        data = problem.model_dump()
        data["constraints"].update(extra)
        problem = SharingProblem.model_validate(data)
    truth = all_plans(problem)
    k = min(12, len(truth))
    plans = top_plans(problem, k)
    assert len(plans) == k
    got = [p.objective for p in plans]
    assert got == sorted(got)
    assert got == pytest.approx([t[0] for t in truth[:k]], rel=1e-9, abs=1e-12)
    assert len({tuple(sorted(map(tuple, p.groups))) for p in plans}) == k
    budget = problem.budget_params()
    for p in plans:
        assert violations(problem, p.coloring) == []
        assert p.objective == pytest.approx(objective(problem, p.coloring))
        assert budget is None or unique_params(problem, p.coloring) <= budget


def test_min_distance_keeps_plans_apart_and_is_the_greedy_choice():
    problem = random_problem([4, 4, 3], seed=11, ratio=0.6)
    plans = top_plans(problem, 6, min_distance=3)
    for a, b in itertools.combinations(plans, 2):
        assert plan_distance(a.groups, b.groups) >= 3
    kept: list[tuple[float, list[list[str]]]] = []
    for cost, groups in all_plans(problem):
        if len(kept) == 6:
            break
        if all(plan_distance(groups, g) >= 3 for _, g in kept):
            kept.append((cost, groups))
    assert [p.objective for p in plans] == pytest.approx([c for c, _ in kept])


def test_neighbourhood_path_gives_distinct_feasible_plans_no_better_than_possible(monkeypatch):
    monkeypatch.setattr(kbest, "ENUM_MAX_UNITS", 2)  # force the heuristic path on small families
    problem = random_problem([5, 5, 4], seed=12, ratio=0.6)
    truth = all_plans(problem)
    plans = top_plans(problem, 8)
    assert plans[0].objective == pytest.approx(truth[0][0])
    assert len({tuple(sorted(map(tuple, p.groups))) for p in plans}) == len(plans) >= 4
    for i, p in enumerate(plans):
        assert violations(problem, p.coloring) == []
        assert p.objective >= truth[i][0] - 1e-12
    assert "neighbourhood" in plans[1].solver.method


def test_k_best_combinations_match_brute_force_sums():
    rng = np.random.default_rng(0)
    tables, params = [], []
    for _ in range(3):
        table = {k: [kbest.FamilyOption(float(c), (k, j)) for j, c in enumerate(sorted(rng.random(4)))] for k in (1, 2, 3)}
        tables.append(table)
        params.append({1: 10, 2: 20, 3: 30})
    combos = k_best_combinations(tables, params, 60, 15)
    brute = sorted(
        sum(tables[f][k][j].cost for f, (k, j) in enumerate(pick))
        for pick in itertools.product(*[[(k, j) for k in (1, 2, 3) for j in range(4)]] * 3)
        if sum(params[f][k] for f, (k, _) in enumerate(pick)) <= 60
    )
    assert [c.cost for c in combos] == pytest.approx(brute[:15])
    assert all(c.params <= 60 for c in combos)


def test_pattern_plans_fill_the_budget():
    problem = random_problem([6, 6, 5], seed=3, ratio=0.6)
    plans = pattern_plans(problem, per_pattern=3)
    budget = problem.budget_params()
    assert plans and all(p.strategy for p in plans)
    names = [p.strategy for p in plans]
    assert "sequence" in names and "sequence#2" in names
    for p in plans:
        assert unique_params(problem, p.coloring) <= budget
        assert violations(problem, p.coloring) == []


def test_candidate_pool_holds_top_plans_then_patterns_without_duplicates():
    problem = random_problem([6, 6, 5], seed=3, ratio=0.6)
    pool = candidate_plans(problem, top=5)
    keys = [tuple(sorted(map(tuple, p.groups))) for p in pool]
    assert len(set(keys)) == len(keys) >= 6
    assert pool[0].strategy is None and pool[1].strategy == "top-2"
    assert [p.objective for p in pool[:5]] == sorted(p.objective for p in pool[:5])


def test_options_top_adds_alternatives_to_the_plan():
    problem = random_problem([5, 4], seed=9, ratio=0.6)
    data = problem.model_dump()
    data["options"]["top"] = 4
    plan = solve_with_alternatives(SharingProblem.model_validate(data))
    assert plan.status.value == "optimal"
    assert plan.alternatives and [a.strategy for a in plan.alternatives[:3]] == ["top-2", "top-3", "top-4"]
    assert all(a.objective >= plan.objective for a in plan.alternatives)
    assert solve_with_alternatives(problem).alternatives is None
    assert SharingProblem.model_validate(data).model_dump()["options"]["top"] == 4


def _normalized(problem: SharingProblem, groups: list[list[str]]) -> float:
    pos = {layer.name: i for i, layer in enumerate(problem.layers)}
    m = problem.costs.matrix
    total = sum(problem.costs.unary or [0.0])
    for g in groups:
        if len(g) > 1:
            total += 2.0 / len(g) * sum(m[pos[a]][pos[b]] for a, b in itertools.combinations(g, 2))
    return total


def test_normalized_top_plans_rank_by_size_normalized_costs():
    problem = random_problem([5, 4, 4], seed=21, ratio=0.5, unary=True)
    truth = sorted(_normalized(problem, g) for _, g in all_plans(problem))
    plans = top_plans(problem, 10, normalized=True)
    assert [p.strategy for p in plans] == [f"norm-{i}" for i in range(1, 11)]
    assert [_normalized(problem, p.groups) for p in plans] == pytest.approx(truth[:10])
    assert all(p.objective == pytest.approx(objective(problem, p.coloring)) for p in plans)
    pool = candidate_plans(problem, top=3, normalized_top=3)
    assert any(p.strategy.startswith("norm-") for p in pool if p.strategy)


def test_per_pattern_zero_lists_no_pattern_plans():
    # `geoshare compress --per-pattern 0` raised IndexError: n=0 left a family's list empty
    problem = random_problem([6, 6, 5], seed=3, ratio=0.6)
    assert pattern_plans(problem, per_pattern=0) == []
    pool = candidate_plans(problem, top=3, per_pattern=0)
    assert len(pool) == 3 and all(p.strategy is None or p.strategy.startswith("top-") for p in pool)
    tables = [{1: [kbest.FamilyOption(1.0, (0,))]}] * 2
    assert k_best_combinations(tables, [{1: 10}] * 2, None, 0) == []
