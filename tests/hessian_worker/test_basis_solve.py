"""The basis scheme end to end: analyze -> solve -> apply meets the budget; healing keeps the sharing."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from hw_cases import TinyMLP, bert_data, mlp_data, tiny_bert, tiny_mlp

from hessian_worker.analysis import analyze
from hessian_worker.apply import apply_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.errors import BackendError
from hessian_worker.healing import HealConfig, heal
from hessian_worker.measure import measure_loss
from hessian_worker.tying import unique_params
from solver import SolveConfig, solve
from solver.planning import with_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.solver.brute import brute_optimum  # noqa: E402


def cfg(**kw) -> AnalyzeConfig:
    return AnalyzeConfig(scheme="basis", dtype="float64", device="cpu", progress=False, **kw)


@pytest.mark.parametrize("ratio", [0.35, 0.4, 0.45, 0.6])
def test_solved_plan_meets_the_budget_when_applied(ratio: float) -> None:
    torch.manual_seed(0)
    model, data = TinyMLP(depth=4).double().eval(), mlp_data()
    problem = analyze(model, data, cfg(basis={"rank": 1}))
    assert problem.costs.unary is not None and all(u >= 0 for u in problem.costs.unary)
    solve_cfg = SolveConfig(max_params_ratio=ratio, time_limit_s=5, seed=0)
    plan = solve(problem, solve_cfg)
    budget = with_config(problem, solve_cfg).budget_params()
    best, _ = brute_optimum(with_config(problem, solve_cfg))
    assert plan.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    report = apply_plan(model, plan, data=data, config=cfg(basis={"rank": 1}), problem=problem)
    assert report.plan_params_shared == plan.params.shared <= budget
    assert report.plan_params_original == problem.original_params


def test_bert_ffn_problem_and_apply_meet_the_budget() -> None:
    model, data = tiny_bert(), bert_data()
    config = cfg(
        targets=["re:.*intermediate.dense.weight", "re:encoder.layer.\\d+.output.dense.weight"]
    )
    problem = analyze(model, data, config)
    specs = problem.families
    assert specs["intermediate.dense.weight"].rank == 2  # 0.25 * min(16, 8)
    assert specs["intermediate.dense.weight"].class_params == 16 * 2
    assert specs["intermediate.dense.weight"].member_params == 2 * 8
    assert specs["intermediate.dense.weight"].side.value == "out"  # d_out = 16 > d_in = 8
    # output.dense is 8x16: side auto shares the larger input side, B is r x d_in
    assert specs["output.dense.weight"].side.value == "in"
    assert specs["output.dense.weight"].class_params == 2 * 16
    assert specs["output.dense.weight"].member_params == 8 * 2
    solve_cfg = SolveConfig(max_params_ratio=0.3, time_limit_s=5)
    plan = solve(problem, solve_cfg)
    before = unique_params(model)
    report = apply_plan(model, plan, data=data, config=config, problem=problem)
    assert (
        report.plan_params_shared
        == plan.params.shared
        <= with_config(problem, solve_cfg).budget_params()
    )
    assert before - unique_params(model) == problem.original_params - plan.params.shared
    assert model(**data.batches[0]).last_hidden_state.shape[-1] == 8


def test_basis_analysis_refuses_what_it_cannot_score() -> None:
    with pytest.raises(BackendError, match="pairwise"):
        analyze(tiny_mlp(), mlp_data(), cfg(kind="assignment"))
    with pytest.raises(BackendError, match="task loss"):
        analyze(tiny_mlp(), mlp_data(), cfg(), loss_fn=lambda y, b: y.pow(2).mean())


def test_heal_keeps_the_shared_basis() -> None:
    reference = tiny_mlp().float()
    model = copy.deepcopy(reference)
    data = mlp_data(n=16)
    config = AnalyzeConfig(scheme="basis", basis={"rank": 1}, device="cpu", progress=False)
    problem = analyze(copy.deepcopy(reference), data, config)
    names = [x.name for x in problem.layers]
    plan = solve(problem, SolveConfig(max_params_ratio=0.4, time_limit_s=2))
    assert any(len(g) > 1 for g in plan.groups)
    apply_plan(model, plan, data=data, config=config, problem=problem)
    shared = {n: model.get_submodule(n[:-7]).basis for n in names}
    before_params = unique_params(model)
    before = measure_loss(model, reference, data, config)
    report = heal(
        model, reference, data, HealConfig(steps=60, lr=1e-2, device="cpu", progress=False)
    )
    after = measure_loss(model, reference, data, config)
    assert after < before and report.last_loss < report.first_loss
    assert unique_params(model) == before_params == report.unique_params
    for group in plan.groups:
        mods = [model.get_submodule(n[:-7]) for n in group]
        assert all(
            m.basis is mods[0].basis is shared[group[0]] for m in mods
        )  # same Parameter, trained
    assert not torch.equal(shared[names[0]].detach(), torch.zeros_like(shared[names[0]]))
