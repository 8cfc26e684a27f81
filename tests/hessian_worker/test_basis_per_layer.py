"""Plain per-layer SVD as a candidate of the basis scheme: its ranks fill the budget, its problem
scores and applies it exactly, and compress picks it when it really loses least."""

from __future__ import annotations

import copy

import pytest
import torch
from hw_cases import TinyMLP, mlp_data, rank_one_mlp

from hessian_worker.analysis import analyze
from hessian_worker.basis.analysis import score_classes, side_of
from hessian_worker.basis.apply import apply_basis_plan
from hessian_worker.basis.fill import ALLOCATED, UNIFORM, family_costs, fill_plan, uniform_start
from hessian_worker.basis.modules import BasisLinear
from hessian_worker.basis.per_layer import STRATEGY, per_layer_candidate
from hessian_worker.basis.scales import basis_covariances
from hessian_worker.config import AnalyzeConfig
from hessian_worker.factored.layers import dense_weights
from hessian_worker.measure import measure_loss, measure_plans
from hessian_worker.pipeline import CompressConfig, compress
from hessian_worker.tying import unique_params
from solver import SolveConfig
from solver.evaluate import unique_params as plan_params
from solver.planning import plan_from_coloring
from solver.schema import SharingProblem


def _spec(d_out: int, d_in: int, rank: int, side: str = "out") -> dict:
    shared, own = (d_out * rank, rank * d_in) if side == "out" else (rank * d_in, d_out * rank)
    return {"scheme": "basis", "rank": rank, "side": side, "class_params": shared, "member_params": own}


def _problem(ratio: float, ranks: tuple[int, int] = (2, 2)) -> SharingProblem:
    """Three 8x4 layers (side out), two 6x12 layers (side in) and two tied 5x5 layers."""
    layers = [{"name": f"a{i}", "family": "a", "params": 32, "index": i} for i in range(3)]
    layers += [{"name": f"b{i}", "family": "b", "params": 72, "index": i} for i in range(2)]
    layers += [{"name": f"t{i}", "family": "t", "params": 25, "index": i} for i in range(2)]
    n = len(layers)
    return SharingProblem.model_validate({
        "layers": layers,
        "costs": {"kind": "pairwise", "matrix": [[0.0] * n for _ in range(n)], "unary": [0.0] * n},
        "constraints": {"max_params_ratio": ratio},
        "families": {"a": _spec(8, 4, ranks[0]), "b": _spec(6, 12, ranks[1], "in"), "t": {"scheme": "tie"}},
    })


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"a{i}": torch.randn(8, 4, generator=g, dtype=torch.float64) for i in range(3)}
    return out | {f"b{i}": torch.randn(6, 12, generator=g, dtype=torch.float64) for i in range(2)}


@pytest.mark.parametrize("budget", [122, 200, 266, 300, 400, 1000])
@pytest.mark.parametrize("start", [UNIFORM, ALLOCATED])
def test_all_alone_ranks_spend_the_budget(budget: int, start: str) -> None:
    problem = _problem(0.5)
    alone = plan_from_coloring(problem, {x.name: i for i, x in enumerate(problem.layers)}, method="t")

    def count(ra: int, rb: int) -> int:  # brute force: every layer alone, a capped at rank 4, b at 6
        return 3 * ra * (8 + 4) + 2 * rb * (12 + 6) + 2 * 25

    filled = fill_plan(alone, problem, budget, _weights(), None, start=start)
    ra, rb = filled.ranks["a"], filled.ranks["b"]
    assert filled.plan.params.shared == count(ra, rb) <= budget
    assert (ra == 4 or count(ra + 1, rb) > budget) and (rb == 6 or count(ra, rb + 1) > budget)
    assert fill_plan(alone, problem, count(1, 1) - 1, _weights(), None, start=start) is None  # rank 1 does not fit


def test_uniform_fill_keeps_the_problems_proportions() -> None:
    problem = _problem(0.9, ranks=(1, 2))
    alone = plan_from_coloring(problem, {x.name: i for i, x in enumerate(problem.layers)}, method="t")
    start = uniform_start(family_costs([[n] for n in _weights()], problem, _weights(), None),
                          {"a": 1, "b": 2}, problem.budget_params() - 50)
    assert start is not None and 2 * start["a"] in (start["b"], start["b"] - 1)
    assert fill_plan(alone, problem, problem.budget_params(), _weights(), None) is not None


def cfg(rank: int = 2) -> AnalyzeConfig:
    return AnalyzeConfig(scheme="basis", basis={"rank": rank}, dtype="float64", device="cpu", progress=False)


def test_per_layer_plan_is_scored_and_applied_exactly() -> None:
    torch.manual_seed(0)
    model, data = TinyMLP(depth=4).double().eval(), mlp_data(n=24)
    problem = analyze(copy.deepcopy(model), data, cfg())
    names = [x.name for x in problem.layers]
    covs = basis_covariances(model, data, names, cfg())
    config = SolveConfig(max_params_ratio=0.6)
    plan, alone = per_layer_candidate(model, problem, config, covs)
    assert plan.strategy == STRATEGY and all(len(g) == 1 for g in plan.groups)
    assert alone.families["fc.weight"].rank == 1  # rank 2 alone keeps everything: 4·2·8 > 0.6·64
    assert plan.params.shared == plan_params(alone, plan.coloring) <= 0.6 * problem.original_params
    # the objective is the exact error of each layer's own basis, under the pool's whitening
    exact = score_classes([[n] for n in names], dense_weights(model, names), covs, dict.fromkeys(names, 1),
                          sides=side_of(alone))
    assert plan.objective == pytest.approx(exact.total, rel=1e-10)
    # applied: the unique params are the plan's, and the measured loss is the applied model's
    shared = copy.deepcopy(model)
    report = apply_basis_plan(shared, plan, alone, config=cfg(), covs=covs)
    assert report.plan_params_shared == plan.params.shared
    assert all(shared.blocks[i].fc.rank == 1 for i in range(4))
    held = mlp_data(n=8, seed=7)
    measured = measure_plans(model, held, [plan], cfg(), problem=alone, covs=covs)[0]
    assert measured == pytest.approx(measure_loss(shared, model, held, cfg()), rel=1e-9)
    # a budget that requires a pair to share has no per-layer plan
    required = problem.model_copy(update={"constraints": problem.constraints.model_copy(
        update={"require": [(names[0], names[1])]})})
    assert per_layer_candidate(model, required, config, covs) is None


def test_compress_picks_per_layer_svd_when_it_loses_least() -> None:
    model = rank_one_mlp()
    reference = copy.deepcopy(model)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    config = CompressConfig(ratio=0.65, scheme="basis", rank=2, top=4, device="cpu", progress=False)
    report = compress(model, x, config)
    # at rank 2 only one class of all four fits 0.65 (8 + 4·8 = 40 <= 41); alone, rank 1 fits (32)
    assert report.chosen == STRATEGY
    measured = {c.strategy: c.measured for c in report.candidates}
    assert len(report.candidates) > 1 and measured[STRATEGY] == min(measured.values())
    assert measured[STRATEGY] < 1e-6 < min(m for s, m in measured.items() if s != STRATEGY)
    assert report.problem.families["fc.weight"].rank == 1
    bases = [model.blocks[i].fc for i in range(4)]
    assert all(isinstance(b, BasisLinear) and b.rank == 1 for b in bases)
    assert len({id(b.basis) for b in bases}) == 4
    assert report.params_ratio <= 0.65
    assert unique_params(reference) - unique_params(model) == 64 - report.plan.params.shared
    assert report.measured_loss_change < 1e-6
