"""The relaxed scheme from the command line: analyze -> solve -> apply -> load, compress end to end
(a tiny model here; MiniLM in the slow test), and the flag errors."""

from __future__ import annotations

import json

import pytest
import torch
from hw_cases import factory

from geoshare.cli import main
from hessian_worker.basis.modules import BasisLinear
from hessian_worker.io import load_shared
from hessian_worker.relaxed.modules import RelaxedLinear
from hessian_worker.tying import unique_params
from solver.schema import SharingPlan, SharingProblem


def test_analyze_solve_apply_load(tmp_path, factory_cli, capsys) -> None:
    problem_path, plan_path, out = tmp_path / "problem.json", tmp_path / "plan.json", tmp_path / "out"
    assert main(["analyze", *factory_cli, "--scheme", "relaxed", "--correction-rank", "1", "-o", str(problem_path)]) == 0
    problem = SharingProblem.model_validate_json(problem_path.read_text())
    spec = problem.families["fc.weight"]
    assert (spec.scheme.value, spec.rank, spec.class_params, spec.member_params) == ("relaxed", 1, 16, 8)
    assert main(["solve", str(problem_path), "--ratio", "0.9", "-o", str(plan_path)]) == 0
    plan = SharingPlan.model_validate_json(plan_path.read_text())
    assert plan.params.shared == 16 + 3 * 8  # one class of three: the only plan within 43
    capsys.readouterr()

    rc = main(["apply", *factory_cli, "--plan", str(plan_path), "--out", str(out)])  # no problem: refused
    assert rc == 2 and "--problem" in capsys.readouterr().err and not out.exists()
    rc = main(["apply", *factory_cli, "--plan", str(plan_path), "--problem", str(problem_path), "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scheme"] == "relaxed" and report["ranks"] == {"fc.weight": 1}
    assert report["plan_params_shared"] == plan.params.shared
    assert report["predicted_loss_change"] == report["whitened_error"] > 0
    assert report["measured_loss_change"] > 0

    model = factory()
    before = unique_params(model)
    load_shared(model, out)
    blocks = [model.blocks[i].fc for i in range(3)]
    assert all(isinstance(b, RelaxedLinear) for b in blocks)
    assert blocks[0].shared is blocks[1].shared is blocks[2].shared
    assert before - unique_params(model) == 48 - plan.params.shared


@pytest.mark.parametrize("pricing", ["kronecker", "exact"])
def test_compress_with_relaxed_sharing(tmp_path, factory_cli, capsys, pricing: str) -> None:
    out = tmp_path / "out"
    args = ["compress", *factory_cli, "--ratio", "0.9", "--scheme", "relaxed", "--correction-rank", "1", "--top", "4",
            "--relaxed-pricing", pricing, "--out", str(out)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_ratio"] <= 0.9 and report["measured_loss_change"] > 0
    chosen = next(c for c in report["candidates"] if c["strategy"] == report["chosen"])
    assert chosen["measured"] == min(c["measured"] for c in report["candidates"])
    problem = SharingProblem.model_validate_json((out / "problem.json").read_text())
    assert problem.source["relaxed"]["pricing"] == pricing
    # the chosen plan keeps the family relaxed, or as shared bases (a relaxed candidate too), and the
    # save is in the layout of the modules installed
    kind = json.loads((out / "plan.json").read_text())["scheme"]
    assert kind in ("relaxed", "basis")
    model = factory()  # a module:factory model has no config.json: load_shared into a fresh one
    load_shared(model, out)
    assert all(isinstance(model.blocks[i].fc, RelaxedLinear if kind == "relaxed" else BasisLinear) for i in range(3))
    x = torch.randn(5, 3, dtype=torch.float64)
    reference = factory()
    with torch.no_grad():
        assert 0 < float((model(x) - reference(x)).abs().max()) < 1.0


def test_correction_rank_needs_the_relaxed_scheme(factory_cli, capsys, tmp_path) -> None:
    rc = main(["analyze", *factory_cli, "--correction-rank", "2", "-o", str(tmp_path / "p.json")])
    assert rc == 2 and "--scheme relaxed" in capsys.readouterr().err
    rc = main(["analyze", *factory_cli, "--scheme", "relaxed", "--correction-rank", "2", "--rank-ratio", "0.1",
               "-o", str(tmp_path / "p.json")])
    assert rc == 2 and "not both" in capsys.readouterr().err
    # --rank-ratio and --no-output-weighting are the relaxed scheme's too
    assert main(["analyze", *factory_cli, "--scheme", "relaxed", "--rank-ratio", "0.5", "--no-output-weighting",
                 "-o", str(tmp_path / "p.json")]) == 0
    problem = SharingProblem.model_validate_json((tmp_path / "p.json").read_text())
    assert problem.families["fc.weight"].rank == 2
    assert problem.source["relaxed"]["output_weighting"] is False


def test_relaxed_pricing_flag(factory_cli, capsys, tmp_path) -> None:
    rc = main(["analyze", *factory_cli, "--relaxed-pricing", "exact", "-o", str(tmp_path / "p.json")])
    assert rc == 2 and "--relaxed-pricing applies to --scheme relaxed only" in capsys.readouterr().err
    costs = {}
    for pricing in ("kronecker", "exact"):
        path = tmp_path / f"{pricing}.json"
        assert main(["analyze", *factory_cli, "--scheme", "relaxed", "--correction-rank", "1", "--relaxed-pricing",
                     pricing, "-o", str(path)]) == 0
        problem = SharingProblem.model_validate_json(path.read_text())
        assert problem.source["relaxed"]["pricing"] == pricing
        costs[pricing] = problem.costs.matrix
    assert costs["kronecker"] != costs["exact"]  # same fits, another price


def test_no_relaxed_bases_keeps_every_family_relaxed(tmp_path, factory_cli, capsys) -> None:
    """--no-relaxed-bases: compress's relaxed candidates keep every family relaxed (the exact-priced
    toy otherwise chooses shared bases, test_compress_with_relaxed_sharing), and the flag needs the
    relaxed scheme."""
    rc = main(["compress", *factory_cli, "--ratio", "0.9", "--no-relaxed-bases", "--out", str(tmp_path / "tie")])
    assert rc == 2 and "--no-relaxed-bases applies to --scheme relaxed only" in capsys.readouterr().err
    out = tmp_path / "out"
    args = ["compress", *factory_cli, "--ratio", "0.9", "--scheme", "relaxed", "--correction-rank", "1", "--top", "4",
            "--relaxed-pricing", "exact", "--no-relaxed-bases", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert not any("bases" in c["strategy"] or "basis" in c["strategy"] for c in report["candidates"])
    assert json.loads((out / "plan.json").read_text())["scheme"] == "relaxed"
    model = factory()
    load_shared(model, out)
    assert all(isinstance(model.blocks[i].fc, RelaxedLinear) for i in range(3))


def test_compress_with_healing_chooses_the_relaxed_candidate_that_heals_best(tmp_path, factory_cli, capsys) -> None:
    """With --heal-steps the relaxed scheme heals a shortlist (the best zero-shot candidate and each
    form of sharing's best) and installs the one of least loss after healing, healed again after
    its refit."""
    args = ["compress", *factory_cli, "--ratio", "0.9", "--scheme", "relaxed", "--correction-rank", "1", "--top", "4",
            "--heal", "5", "--heal-lr", "1e-2", "--heal-shortlist", "1", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    healed = {c["strategy"]: c["healed"] for c in report["candidates"] if c["healed"] is not None}
    assert len(healed) >= 2  # the zero-shot best and another form's best
    assert healed[report["chosen"]] == min(healed.values())
    zero_shot_best = min(report["candidates"], key=lambda c: c["measured"])["strategy"]
    assert zero_shot_best in healed
    assert report["heal"]["steps"] == 5
