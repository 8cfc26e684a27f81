"""The basis scheme from the command line: analyze -> solve -> apply -> load, compress, and errors."""

from __future__ import annotations

import json

from hw_cases import factory

from geoshare.cli import main
from hessian_worker.basis.config import SideChoice
from hessian_worker.basis.modules import BasisLinear
from hessian_worker.io import load_shared
from hessian_worker.tying import unique_params
from solver.schema import SharingPlan, SharingProblem, Side


def test_analyze_solve_apply_load(tmp_path, factory_cli, capsys) -> None:
    problem_path, plan_path, out = tmp_path / "problem.json", tmp_path / "plan.json", tmp_path / "out"
    assert main(["analyze", *factory_cli, "--scheme", "basis", "--rank", "1", "-o", str(problem_path)]) == 0
    problem = SharingProblem.model_validate_json(problem_path.read_text())
    spec = problem.families["fc.weight"]
    assert (spec.scheme.value, spec.rank, spec.side, spec.class_params, spec.member_params) == (
        "basis", 1, Side.out, 4, 4)  # square 4x4 blocks: auto keeps the out side
    assert len(problem.costs.unary) == 3
    assert main(["solve", str(problem_path), "--ratio", "0.45", "-o", str(plan_path)]) == 0
    plan = SharingPlan.model_validate_json(plan_path.read_text())
    assert plan.params.shared <= 0.45 * 48 and any(len(g) > 1 for g in plan.groups)
    assert plan.params.shared != 16 * len(plan.groups)  # not what tying the classes would keep
    capsys.readouterr()

    # without the problem the plan cannot be applied right: a clear error, nothing written
    rc = main(["apply", *factory_cli, "--plan", str(plan_path), "--out", str(out)])
    assert rc == 2 and "--problem" in capsys.readouterr().err and not out.exists()

    rc = main(["apply", *factory_cli, "--plan", str(plan_path), "--problem", str(problem_path), "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scheme"] == "basis" and report["sides"] == {"fc.weight": "out"}
    assert report["plan_params_shared"] == plan.params.shared
    assert report["predicted_loss_change"] == report["whitened_error"] > 0
    assert report["measured_loss_change"] > 0

    model = factory()
    before = unique_params(model)
    load_shared(model, out)
    blocks = [model.blocks[i].fc for i in range(3)]
    assert all(isinstance(b, BasisLinear) for b in blocks)
    for group in plan.groups:
        mods = [model.get_submodule(n.removesuffix(".weight")) for n in group]
        assert all(m.basis is mods[0].basis for m in mods)
    assert before - unique_params(model) == 48 - plan.params.shared


def test_side_and_rank_ratio_options(tmp_path, factory_cli, capsys) -> None:
    path = tmp_path / "problem.json"
    args = ["analyze", *factory_cli, "--scheme", "basis", "--rank-ratio", "0.5", "--side", "in", "-o", str(path)]
    assert main(args) == 0
    spec = SharingProblem.model_validate_json(path.read_text()).families["fc.weight"]
    assert (spec.rank, spec.side, spec.class_params, spec.member_params) == (2, Side.in_, 8, 8)
    capsys.readouterr()
    assert main(["analyze", *factory_cli, "--side", "in", "-o", str(path)]) == 2
    assert "--scheme basis" in capsys.readouterr().err
    assert main(["analyze", *factory_cli, "--scheme", "basis", "--rank", "1", "--rank-ratio", "0.5", "-o", str(path)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["compress", *factory_cli, "--ratio", "0.5", "--rank", "1", "--out", str(tmp_path / "o")]) == 2
    assert "--scheme basis" in capsys.readouterr().err


def test_output_weighting_can_be_turned_off(tmp_path, factory_cli, capsys) -> None:
    costs = []
    for i, flag in enumerate(([], ["--no-output-weighting"])):
        path = tmp_path / f"problem{i}.json"
        assert main(["analyze", *factory_cli, "--scheme", "basis", "--rank", "1", *flag, "-o", str(path)]) == 0
        costs.append(SharingProblem.model_validate_json(path.read_text()).costs.unary)
    # output-weighted costs are loss changes: another scale per layer, not one factor for all
    ratios = [a / b for a, b in zip(costs[0], costs[1], strict=True)]
    assert max(ratios) > 1.5 * min(ratios)
    capsys.readouterr()
    assert main(["analyze", *factory_cli, "--no-output-weighting", "-o", str(tmp_path / "p.json")]) == 2
    assert "--scheme basis" in capsys.readouterr().err


def test_compress_with_shared_bases(tmp_path, factory_cli, capsys) -> None:
    out = tmp_path / "out"
    args = ["compress", *factory_cli, "--ratio", "0.6", "--scheme", "basis", "--rank", "1", "--top", "4",
            "--out", str(out)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_ratio"] <= 0.6 and report["measured_loss_change"] > 0
    chosen = next(c for c in report["candidates"] if c["strategy"] == report["chosen"])
    assert chosen["measured"] == min(c["measured"] for c in report["candidates"])
    problem = SharingProblem.model_validate_json((out / "problem.json").read_text())
    assert problem.families["fc.weight"].scheme.value == "basis"
    model = factory()
    plan = load_shared(model, out)
    assert all(isinstance(model.blocks[i].fc, BasisLinear) for i in range(3))
    assert unique_params(factory()) - unique_params(model) == 48 - plan.params.shared


def test_service_takes_the_side_choice() -> None:
    from service.compress import CompressSpec

    assert CompressSpec.model_fields["side"].annotation == SideChoice | None


def test_compress_measures_basis_candidates_on_samples_the_bases_did_not_see() -> None:
    from hw_cases import mlp_data

    from hessian_worker.options import CompressConfig
    from hessian_worker.schemes import scheme_for

    fit = mlp_data(n=10)
    parts = scheme_for("basis").parts(fit, CompressConfig(ratio=0.5, scheme="basis"))
    rows = {tuple(r.tolist()) for r in parts.costs.rows()["input"]}
    others = {tuple(r.tolist()) for r in parts.choice.rows()["input"]}
    assert len(rows) == len(others) == 5 and not rows & others
    assert parts.apply is fit  # the chosen plan is fitted again on every sample (refit)
    unrefitted = scheme_for("basis").parts(fit, CompressConfig(ratio=0.5, scheme="basis", refit=False))
    assert unrefitted.apply is unrefitted.costs  # else applied with the covariances the candidates were fitted by
    parts = scheme_for("basis").parts(fit, CompressConfig(ratio=0.5, scheme="basis", curvature_samples=3))
    assert (parts.costs.num_samples, parts.choice.num_samples) == (3, 7)
    parts = scheme_for("tie").parts(fit, CompressConfig(ratio=0.5))  # tie: all of fit for the choice
    assert parts.choice is fit and parts.costs is fit and parts.apply is fit
