"""Basis candidates spend the budget: error curves against rank-by-rank errors, the greedy ranks
against enumeration, and the parameter accounting of filled plans against counting and apply."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hw_cases import TinyMLP, mlp_data

from hessian_worker.analysis import analyze
from hessian_worker.basis.analysis import score_classes, side_of
from hessian_worker.basis.apply import apply_basis_plan
from hessian_worker.basis.costs import FamilyGrams, InputSideFamily
from hessian_worker.basis.fill import (
    ALLOCATED,
    UNIFORM,
    FamilyCost,
    basis_budget_note,
    fill_plan,
    greedy_ranks,
    uniform_start,
)
from hessian_worker.basis.per_layer import STRATEGY, per_layer_candidate
from hessian_worker.basis.scales import basis_covariances
from hessian_worker.config import AnalyzeConfig
from hessian_worker.factored.layers import dense_weights
from hessian_worker.measure import measure_loss, measure_plans
from solver import SolveConfig
from solver.candidates import candidate_plans
from solver.planning import with_config


@pytest.mark.parametrize("oracle", [FamilyGrams, InputSideFamily])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
@pytest.mark.parametrize("whiten", [True, False])
def test_error_curve_is_the_error_at_every_rank(oracle, shape, whiten) -> None:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [torch.randn(20, shape[1], generator=g, dtype=torch.float64) for _ in range(3)]
    covs = [x.T @ x / 20 for x in xs] if whiten else None
    family = oracle(ws, covs)
    for members in ([1], [0, 2], [0, 1, 2]):
        curve = family.error_curve(members)
        assert len(curve) == min(shape) + 1
        assert curve[0] == pytest.approx(family.energy(members), rel=1e-10)
        for r in range(1, min(shape) + 1):
            assert curve[r] == pytest.approx(family.error(members, r), rel=1e-9, abs=1e-9)


def _random_costs(seed: int, steps: tuple[int, ...], cap: int = 5) -> dict[str, FamilyCost]:
    """Families whose classes have decreasing, convex error curves (tails of sorted spectra)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, step in enumerate(steps):
        curves = []
        for _ in range(2):
            spectrum = sorted(torch.rand(cap, generator=g, dtype=torch.float64).tolist(), reverse=True)
            curves.append(tuple(sum(spectrum[r:]) for r in range(cap + 1)))
        out[f"f{i}"] = FamilyCost(step=step, cap=cap, groups=(("a",), ("b",)), curves=tuple(curves))
    return out


def _enumerate(costs: dict[str, FamilyCost], room: int) -> tuple[float, list[dict[str, int]]]:
    """The least total error over every rank vector within ``room``, and the vectors reaching it."""
    names = list(costs)
    best, arg = float("inf"), []
    for ranks in itertools.product(*(range(1, costs[f].cap + 1) for f in names)):
        if sum(costs[f].step * r for f, r in zip(names, ranks, strict=True)) > room:
            continue
        value = sum(costs[f].error(r) for f, r in zip(names, ranks, strict=True))
        if value < best - 1e-12:
            best, arg = value, [dict(zip(names, ranks, strict=True))]
        elif abs(value - best) <= 1e-12:
            arg.append(dict(zip(names, ranks, strict=True)))
    return best, arg


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("steps", [(4, 4, 4), (3, 5, 7)])
def test_greedy_ranks_against_enumeration(seed: int, steps: tuple[int, ...]) -> None:
    costs = _random_costs(seed, steps)
    for room in range(sum(steps), sum(steps) * 5 + 1, 3):
        ranks = greedy_ranks(costs, dict.fromkeys(costs, 1), room - sum(steps))
        used = sum(costs[f].step * r for f, r in ranks.items())
        assert used <= room
        # spent: no family can take one more step
        assert all(ranks[f] == c.cap or used + c.step > room for f, c in costs.items())
        best, _ = _enumerate(costs, room)
        value = sum(costs[f].error(r) for f, r in ranks.items())
        # concave gains: within one step's gain of the integer optimum, and exact when steps are equal
        largest_step_gain = max(c.gain(r) for f, c in costs.items() for r in range(c.cap))
        assert best - 1e-12 <= value <= best + largest_step_gain + 1e-12
        if len(set(steps)) == 1:
            assert value == pytest.approx(best, abs=1e-12)


def test_uniform_start_scales_the_ranks_by_the_largest_factor_that_fits() -> None:
    costs = _random_costs(0, (3, 5), cap=8)
    for room in range(8, 70):
        start = uniform_start(costs, {"f0": 2, "f1": 4}, room)
        if room < 3 * 1 + 5 * 1:
            assert start is None
            continue
        # brute force over k: ranks ⌊k·r/4⌋ clipped to 1..8
        fits = [k for k in range(1, 40) if 3 * min(8, max(1, k * 2 // 4)) + 5 * min(8, max(1, k * 4 // 4)) <= room]
        k = max(fits)
        assert start == {"f0": min(8, max(1, k * 2 // 4)), "f1": min(8, max(1, k))}


def cfg(rank: int = 2) -> AnalyzeConfig:
    return AnalyzeConfig(scheme="basis", basis={"rank": rank}, dtype="float64", device="cpu", progress=False)


def _wide_case(ratio: float):
    """Four 8x8 layers (one family), a basis problem at rank 2 with its covariances."""
    torch.manual_seed(0)
    model = TinyMLP(width=8, depth=4).double().eval()
    data = mlp_data(n=40)
    problem = with_config(analyze(copy.deepcopy(model), data, cfg()), SolveConfig(max_params_ratio=ratio))
    names = [x.name for x in problem.layers]
    covs = basis_covariances(model, data, names, cfg())
    return model, data, problem, names, covs


def _count(groups: list[list[str]], rank: int, d: int = 8) -> int:
    """Brute-force accounting: a class keeps its basis (d·r) and r·d coefficients per member."""
    return sum(d * rank + len(g) * rank * d for g in groups)


@pytest.mark.parametrize("ratio", [0.35, 0.5, 0.7])
def test_filled_plans_spend_the_budget_and_count_as_applied(ratio: float) -> None:
    model, data, problem, names, covs = _wide_case(ratio)
    budget = problem.budget_params()
    weights = dense_weights(model, names)
    pool = candidate_plans(problem, SolveConfig(max_params_ratio=ratio), top=4, per_pattern=1, normalized_top=0)
    for plan in pool:
        for start in (UNIFORM, ALLOCATED):
            filled = fill_plan(plan, problem, budget, weights, covs, start=start)
            assert filled is not None and filled.plan.coloring == plan.coloring
            rank = filled.ranks["fc.weight"]
            groups = [list(g) for g in filled.plan.groups]
            listed = {n for g in groups for n in g}
            groups += [[n] for n in names if n not in listed]
            # the count is the brute-force one, within the budget, and one more rank would not fit
            assert filled.plan.params.shared == _count(groups, rank) <= budget
            assert rank == 8 or _count(groups, rank + 1) > budget
            # the objective is the exact error of every class at the new rank, under the same covariances
            exact = score_classes(groups, weights, covs, dict.fromkeys(names, rank), sides=side_of(filled.problem))
            assert filled.plan.objective == pytest.approx(exact.total, rel=1e-9)
            # applied, the model keeps the plan's count, and it measures what was measured
            shared = copy.deepcopy(model)
            report = apply_basis_plan(shared, filled.plan, filled.problem, config=cfg(), covs=covs)
            assert report.plan_params_shared == filled.plan.params.shared
            held = mlp_data(n=8, seed=7)
            measured = measure_plans(model, held, [filled.plan], cfg(), problem=filled.problem, covs=covs)[0]
            assert measured == pytest.approx(measure_loss(shared, model, held, cfg()), rel=1e-9)


def test_per_layer_candidate_fills_and_says_why_not() -> None:
    model, _, problem, names, covs = _wide_case(0.5)
    plan, alone = per_layer_candidate(model, problem, SolveConfig(max_params_ratio=0.5), covs)
    assert plan.strategy == STRATEGY and all(len(g) == 1 for g in plan.groups)
    # four 8x8 layers alone at rank r keep 4·16·r: r = 2 fills 0.5 of 256 exactly
    assert alone.families["fc.weight"].rank == 2 and plan.params.ratio == 0.5
    assert basis_budget_note(plan.params.ratio, 0.5, alone) is None
    # at 0.55 the next rank (3: 192 > 140) does not fit: the note says so
    plan, alone = per_layer_candidate(model, problem, SolveConfig(max_params_ratio=0.55), covs)
    assert plan.params.ratio == 0.5
    assert "next rank step" in basis_budget_note(plan.params.ratio, 0.55, alone)
    at_full = alone.model_copy(deep=True)
    at_full.families["fc.weight"] = at_full.families["fc.weight"].model_copy(
        update={"rank": 8, "class_params": 64, "member_params": 64})
    assert "full rank" in basis_budget_note(0.5, 0.9, at_full)
