"""Applying basis plans: accounting against brute force, the shared Parameter, re-scoring, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hw_cases import TinyMLP, mlp_data

from hessian_worker.analysis import analyze
from hessian_worker.apply import apply_plan
from hessian_worker.basis.analysis import rescore_basis_plan
from hessian_worker.basis.apply import BasisApplyReport
from hessian_worker.basis.modules import BasisLinear
from hessian_worker.config import AnalyzeConfig
from hessian_worker.errors import PlanError
from hessian_worker.tying import unique_params
from solver import evaluate
from solver.schema import SharingPlan, SharingProblem

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.solver.brute import family_table, set_partitions  # noqa: E402


def cfg(rank: int = 1, **basis) -> AnalyzeConfig:
    return AnalyzeConfig(
        scheme="basis", basis={"rank": rank, **basis}, dtype="float64", device="cpu", progress=False
    )


def deep_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(depth=4).double().eval()


def plan_of(groups: list[list[str]]) -> SharingPlan:
    coloring = {n: c for c, g in enumerate(groups) for n in g}
    return SharingPlan(
        status="feasible",
        coloring=coloring,
        groups=groups,
        solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0},
    )


@pytest.fixture
def problems() -> dict[int, SharingProblem]:
    return {r: analyze(deep_mlp(), mlp_data(), cfg(r)) for r in (1, 2)}


@pytest.mark.parametrize("rank", [1, 2])
def test_unique_params_equal_the_solver_count_for_every_partition(rank: int, problems) -> None:
    problem = problems[rank]
    names = [x.name for x in problem.layers]
    assert len(names) == 4
    spec = problem.families["fc.weight"]
    assert (spec.scheme.value, spec.rank, spec.class_params, spec.member_params) == (
        "basis",
        rank,
        4 * rank,
        rank * 4,
    )
    table = family_table(problem)["fc.weight"]  # brute force: classes -> (least cost, params)
    data = mlp_data()
    x = data.rows()["input"]
    for part in set_partitions(list(range(4))):
        groups = [[names[i] for i in cls] for cls in part]
        plan = plan_of(groups)
        model = deep_mlp()
        before = unique_params(model)
        report = apply_plan(model, plan, data=data, config=cfg(rank), problem=problem)
        assert isinstance(report, BasisApplyReport)
        expected = evaluate.unique_params(problem, plan.coloring)
        assert report.plan_params_shared == expected == table[len(part)][1]
        assert before - report.unique_params_after == 4 * 16 - expected
        assert unique_params(model) == report.unique_params_after
        # one basis Parameter per class, own coefficients per member
        for group in groups:
            mods = [model.get_submodule(n[: -len(".weight")]) for n in group]
            assert all(isinstance(m, BasisLinear) and m.rank == rank for m in mods)
            assert all(m.basis is mods[0].basis for m in mods)
            assert len({id(m.coef) for m in mods}) == len(mods)
        # the forward is the low-rank weight's
        with torch.no_grad():
            block = model.blocks[0].fc
            h = torch.randn(3, 4)
            torch.testing.assert_close(block(h), h @ block.weight.T + block.bias)
        # exact re-scoring equals the applied bases' error and the pairwise objective on classes <= 2
        score = rescore_basis_plan(deep_mlp(), data, plan, problem, cfg(rank))
        assert score.total == pytest.approx(report.whitened_error, rel=1e-9)
        assert score.objective == pytest.approx(
            evaluate.objective(problem, plan.coloring), rel=1e-9
        )
        if max(len(c) for c in part) <= 2:
            assert score.total == pytest.approx(score.objective, rel=1e-9)
        assert model(x).shape == (10, 3)


def test_singletons_get_their_own_low_rank_basis(problems) -> None:
    problem = problems[2]
    names = [x.name for x in problem.layers]
    model = deep_mlp()
    apply_plan(
        model, plan_of([[n] for n in names]), data=mlp_data(), config=cfg(2), problem=problem
    )
    bases = {id(model.get_submodule(n[:-7]).basis) for n in names}
    assert len(bases) == 4
    assert unique_params(deep_mlp()) - unique_params(model) == 4 * (
        16 - 16
    )  # rank 2 of 4x4: no saving


def test_plain_svd_without_data(problems) -> None:
    problem = problems[1]
    names = [x.name for x in problem.layers]
    model = deep_mlp()
    w = [model.get_submodule(n[:-7]).weight.detach().clone() for n in names[:2]]
    report = apply_plan(model, plan_of([names[:2], names[2:]]), problem=problem)
    assert not report.whitened and report.whitened_error is None
    u, _, _ = torch.linalg.svd(torch.cat(w, dim=1))
    basis = model.blocks[0].fc.basis.detach()
    torch.testing.assert_close(basis @ basis.T, u[:, :1] @ u[:, :1].T)


def test_correction_in_apply(problems) -> None:
    problem = problems[2]
    names = [x.name for x in problem.layers]
    plan = plan_of([names])
    model = deep_mlp()
    report = apply_plan(
        model, plan, data=mlp_data(), config=cfg(2, refine_rounds=2, trust=0.2), problem=problem
    )
    assert report.refined and model.blocks[0].fc.basis is model.blocks[3].fc.basis
    plain = apply_plan(deep_mlp(), plan, data=mlp_data(), config=cfg(2), problem=problem)
    # the correction trades the whitened error for the output-weighted one, within the trust region
    assert report.whitened_error >= plain.whitened_error * (1 - 1e-9)
    with pytest.raises(PlanError, match="data"):
        apply_plan(deep_mlp(), plan, config=cfg(2, refine_rounds=1), problem=problem)


def test_bad_basis_plans_are_refused(problems) -> None:
    problem = problems[1]
    names = [x.name for x in problem.layers]
    model = deep_mlp()
    apply_plan(model, plan_of([names]), problem=problem)
    with pytest.raises(PlanError, match="already basis"):
        apply_plan(model, plan_of([names]), problem=problem)
    with pytest.raises(PlanError, match="does not list"):
        apply_plan(deep_mlp(), plan_of([[*names, "out.weight"]]), problem=problem)
    data = problem.model_dump()
    data["families"]["fc.weight"]["rank"] = None
    with pytest.raises(PlanError, match="no rank"):
        apply_plan(deep_mlp(), plan_of([names]), problem=SharingProblem.model_validate(data))
