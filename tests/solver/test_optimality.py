"""The solver's plans against brute-force enumeration of set partitions."""

from __future__ import annotations

import math

import pytest

from solver import BudgetInfeasible, ConstraintInfeasible, solve
from solver.evaluate import objective, unique_params, violations

from .brute import brute_optimum

CASES = [
    # (families, kind, ratio, extra constraints)
    ([5, 4], "pairwise", 0.5, {}),
    ([6, 6, 3], "pairwise", 0.6, {}),
    ([7], "pairwise", 0.3, {}),
    ([8], "pairwise", 0.5, {}),
    ([5, 4], "assignment", 0.5, {}),
    ([6, 5], "assignment", 0.4, {}),
    ([8], "assignment", 0.5, {}),
    ([6, 4], "pairwise", 0.5, {"max_group_size": 2}),
    ([6, 4], "assignment", 0.5, {"max_group_size": 3}),
    ([6, 4], "pairwise", 0.6, {"pinned": ["block0.f0.weight", "block3.f1.weight"]}),
    ([6], "pairwise", 0.5, {"forbid": [["block0.f0.weight", "block1.f0.weight"], ["block2.f0.weight", "block3.f0.weight"]]}),
    ([6], "assignment", 0.5, {"forbid": [["block0.f0.weight", "block5.f0.weight"]]}),
    ([6, 4], "pairwise", 0.6, {"require": [["block0.f0.weight", "block4.f0.weight"], ["block1.f1.weight", "block2.f1.weight"]]}),
    ([6], "assignment", 0.5, {"require": [["block1.f0.weight", "block4.f0.weight"], ["block4.f0.weight", "block5.f0.weight"]]}),
    ([7, 5], "pairwise", 0.5, {"contiguous": True}),
    ([7, 5], "assignment", 0.5, {"contiguous": True}),
    ([6, 5], "pairwise", 0.5, {"contiguous": True, "max_group_size": 3, "pinned": ["block2.f0.weight"]}),
]


@pytest.mark.parametrize("families,kind,ratio,cons", CASES)
def test_matches_brute_force(make_problem, families, kind, ratio, cons):
    problem = make_problem(families, seed=sum(families), kind=kind, ratio=ratio, **cons)
    best, least = brute_optimum(problem)
    plan = solve(problem)
    assert violations(problem, plan.coloring) == []
    assert plan.status.value == "optimal"
    assert plan.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert plan.objective == pytest.approx(objective(problem, plan.coloring), rel=1e-12)
    assert plan.bound <= plan.objective + 1e-12
    assert plan.params.shared == unique_params(problem, plan.coloring) <= problem.budget_params()
    assert sorted(n for g in plan.groups for n in g) == sorted(layer.name for layer in problem.layers)


@pytest.mark.parametrize("kind", ["pairwise", "assignment"])
def test_null_entries_forbid_sharing(make_problem, kind):
    problem = make_problem([6, 5], seed=3, kind=kind, ratio=0.6, null_prob=0.3)
    best, _ = brute_optimum(problem)
    plan = solve(problem)
    assert violations(problem, plan.coloring) == []
    assert plan.objective == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_unary_costs_are_added_for_every_layer(make_problem):
    problem = make_problem([5, 4], seed=1, unary=True)
    best, _ = brute_optimum(problem)
    plan = solve(problem)
    assert plan.objective == pytest.approx(best, rel=1e-9)
    assert plan.objective >= sum(problem.costs.unary) - 1e-12


def test_basis_scheme_accounting(make_problem):
    problem = make_problem([6, 4], seed=2, unary=True, ratio=0.7)
    data = problem.model_dump(mode="json")
    data["families"] = {"f0": {"scheme": "basis", "rank": 2, "class_params": 4, "member_params": 3}}
    from solver import SharingProblem

    problem = SharingProblem.model_validate(data)
    best, _ = brute_optimum(problem)
    plan = solve(problem)
    assert plan.objective == pytest.approx(best, rel=1e-9)
    assert plan.params.shared == unique_params(problem, plan.coloring) <= problem.budget_params()


def test_relaxed_alone_family_accounting(make_problem):
    """An alone relaxed family keeps every layer apart and pays member_params a layer, no class
    tensor: its budget goes to the other family (brute force from the contract)."""
    problem = make_problem([6, 4], seed=4, unary=True, ratio=0.55)
    data = problem.model_dump(mode="json")
    data["families"] = {"f0": {"scheme": "relaxed", "rank": 1, "class_params": 10, "member_params": 3},
                        "f1": {"scheme": "relaxed", "rank": 1, "class_params": 10, "member_params": 3,
                               "alone": True}}
    from solver import SharingProblem

    problem = SharingProblem.model_validate(data)
    best, least = brute_optimum(problem)
    plan = solve(problem)
    assert violations(problem, plan.coloring) == []
    assert plan.objective == pytest.approx(best, rel=1e-9)
    f1 = [layer.name for layer in problem.layers if layer.family == "f1"]
    assert all([n] in plan.groups for n in f1)
    assert plan.params.shared == unique_params(problem, plan.coloring) <= problem.budget_params()
    assert least == 10 + 6 * 3 + 4 * 3  # one class in f0; f1's four layers pay their factors only
    shared_f1 = {**plan.coloring, f1[1]: plan.coloring[f1[0]]}
    assert any("alone family" in v for v in violations(problem, shared_f1))


def test_relaxed_beside_basis_family_accounting(make_problem):
    """A plan may keep a relaxed family beside a basis family (the relaxed scheme fits both): each
    family is counted by its own spec and the optimum matches brute force from the contract."""
    problem = make_problem([5, 4], seed=7, unary=True, ratio=0.6)
    data = problem.model_dump(mode="json")
    data["families"] = {"f0": {"scheme": "relaxed", "rank": 1, "class_params": 10, "member_params": 3},
                        "f1": {"scheme": "basis", "rank": 1, "class_params": 4, "member_params": 2}}
    from solver import SharingProblem

    problem = SharingProblem.model_validate(data)
    best, least = brute_optimum(problem)
    plan = solve(problem)
    assert violations(problem, plan.coloring) == []
    assert plan.objective == pytest.approx(best, rel=1e-9)
    assert plan.params.shared == unique_params(problem, plan.coloring) <= problem.budget_params()
    assert least == (10 + 5 * 3) + (4 + 4 * 2)  # one class in each family


def test_alone_is_for_relaxed_families_only(make_problem):
    data = make_problem([3], seed=0).model_dump(mode="json")
    data["families"] = {"f0": {"scheme": "basis", "rank": 1, "class_params": 4, "member_params": 3, "alone": True}}
    from pydantic import ValidationError

    from solver import SharingProblem

    with pytest.raises(ValidationError, match="alone=true applies to scheme 'relaxed' only"):
        SharingProblem.model_validate(data)


def test_budget_below_least_reachable_names_the_least_ratio(make_problem):
    problem = make_problem([4, 4], seed=0, ratio=0.5, forbid=[["block0.f0.weight", "block1.f0.weight"]], max_group_size=2)
    _, least = brute_optimum(problem)
    ratio = least / problem.original_params
    with pytest.raises(BudgetInfeasible) as err:
        solve(problem.model_copy(update={"constraints": problem.constraints.model_copy(update={"max_params_ratio": ratio * 0.9})}))
    assert err.value.least_params == least
    assert f"{ratio:.4f}" in str(err.value)
    plan = solve(problem.model_copy(update={"constraints": problem.constraints.model_copy(update={"max_params_ratio": ratio})}))
    assert plan.params.shared == least


def test_forbid_clique_raises_least_reachable(make_problem):
    names = [f"block{i}.f0.weight" for i in range(4)]
    forbid = [[a, b] for i, a in enumerate(names) for b in names[i + 1 :]]
    problem = make_problem([4], ratio=0.5, forbid=forbid)
    with pytest.raises(BudgetInfeasible) as err:
        solve(problem)
    assert err.value.least_ratio == 1.0


@pytest.mark.parametrize(
    "cons",
    [
        {"require": [["block0.f0.weight", "block0.f1.weight"]]},
        {"require": [["block0.f0.weight", "block1.f0.weight"]], "forbid": [["block0.f0.weight", "block1.f0.weight"]]},
        {"require": [["block0.f0.weight", "block1.f0.weight"]], "pinned": ["block1.f0.weight"]},
        {"require": [["block0.f0.weight", "block1.f0.weight"], ["block1.f0.weight", "block2.f0.weight"]], "max_group_size": 2},
    ],
)
def test_contradictory_constraints_are_explained(make_problem, cons):
    problem = make_problem([4, 4], ratio=0.9, **cons)
    assert brute_optimum(problem) is None or math.isinf(brute_optimum(problem)[0])
    with pytest.raises(ConstraintInfeasible):
        solve(problem)


def test_no_budget_keeps_every_layer(make_problem):
    problem = make_problem([4, 3], ratio=None)
    plan = solve(problem)
    assert plan.objective == 0.0 and plan.params.ratio == 1.0


def test_deterministic_for_fixed_seed_and_workers(make_problem):
    problem = make_problem([20, 18], seed=5, ratio=0.5, time_limit_s=4)
    a, b = solve(problem), solve(problem)
    if not (a.solver.time_limit_hit or b.solver.time_limit_hit):
        assert a.coloring == b.coloring
        assert a.objective == b.objective and a.bound == b.bound


def test_infeasible_message_explains_the_conflict_clique(make_problem):
    names = [f"block{i}.f0.weight" for i in range(3)]
    forbid = [[a, b] for i, a in enumerate(names) for b in names[i + 1 :]]
    problem = make_problem([5], ratio=0.3, forbid=forbid)
    with pytest.raises(BudgetInfeasible) as err:
        solve(problem)
    msg = str(err.value)
    assert "needs 3 classes" in msg and "3 layers may not share pairwise" in msg


def test_progress_reports_improvements_in_order(make_problem):
    from solver.planning import Progress

    seen: list[Progress] = []
    plan = solve(make_problem([30], seed=2, ratio=0.4, time_limit_s=3), progress=seen.append)
    assert seen
    assert all(a.objective >= b.objective for a, b in zip(seen, seen[1:], strict=False))
    assert all(a.bound <= b.bound for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1].objective == pytest.approx(plan.objective)
    assert all(p.bound <= p.objective for p in seen)
