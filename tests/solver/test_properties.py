"""Hypothesis: every plan meets every constraint, bound <= objective, optimal equals brute force."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from solver import BudgetInfeasible, ConstraintInfeasible, SharingProblem, solve
from solver.evaluate import violations

from .brute import brute_optimum


@st.composite
def problems(draw) -> SharingProblem:
    kind = draw(st.sampled_from(["pairwise", "assignment"]))
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    layers = []
    for f, n in enumerate(sizes):
        p = draw(st.integers(1, 5)) * 10
        for i in range(n):
            layers.append({"name": f"l{i}.f{f}", "family": f"f{f}", "params": p, "index": i})
    n_all = len(layers)
    cost = st.one_of(st.none(), st.floats(0, 10, allow_nan=False)) if draw(st.booleans()) else st.floats(0, 10)
    matrix = [[None] * n_all for _ in range(n_all)]
    for a in range(n_all):
        matrix[a][a] = 0.0
        for b in range(n_all):
            if a != b and layers[a]["family"] == layers[b]["family"]:
                if kind == "pairwise" and b < a:
                    matrix[a][b] = matrix[b][a]
                else:
                    matrix[a][b] = draw(cost)
    names = [layer["name"] for layer in layers]
    same_family_pairs = [
        [a["name"], b["name"]] for i, a in enumerate(layers) for b in layers[i + 1 :] if a["family"] == b["family"]
    ]
    cons = {
        "max_params_ratio": draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        "max_group_size": draw(st.one_of(st.none(), st.integers(1, 4))),
        "pinned": draw(st.lists(st.sampled_from(names), max_size=2, unique=True)),
        "contiguous": draw(st.booleans()),
    }
    if same_family_pairs:
        cons["forbid"] = draw(st.lists(st.sampled_from(same_family_pairs), max_size=2, unique_by=tuple))
        cons["require"] = draw(st.lists(st.sampled_from(same_family_pairs), max_size=1, unique_by=tuple))
    data = {"layers": layers, "costs": {"kind": kind, "matrix": matrix}, "constraints": cons, "options": {"time_limit_s": 5, "workers": 1}}
    if draw(st.booleans()):
        data["costs"]["unary"] = draw(st.lists(st.floats(0, 1), min_size=n_all, max_size=n_all))
    return SharingProblem.model_validate(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_plans_are_feasible_bounded_and_optimal(problem):
    expected = brute_optimum(problem)
    try:
        plan = solve(problem)
    except ConstraintInfeasible:
        event("contradictory constraints")
        assert expected is None or math.isinf(expected[0])
        return
    except BudgetInfeasible as err:
        event("budget infeasible")
        assert expected is not None
        assert math.isinf(expected[0])
        assert err.least_params == expected[1]
        return
    event("solved")
    assert expected is not None
    assert violations(problem, plan.coloring) == []
    assert plan.bound <= plan.objective + 1e-9 * max(1.0, plan.objective)
    assert plan.status.value == "optimal"
    assert plan.objective == pytest.approx(expected[0], rel=1e-9, abs=1e-9)
