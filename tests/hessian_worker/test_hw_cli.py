"""The analyze/apply subcommands, end to end on the tiny MLP, and the no-torch import rule."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from geoshare.cli import main
from solver.schema import SharingPlan, SharingProblem


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, geoshare.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_analyze_then_apply(tmp_path, capsys) -> None:
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), data)
    problem_path = tmp_path / "problem.json"
    common = ["--model", "hw_cases:factory", "--data", str(data), "--dtype", "float64", "--device", "cpu", "--quiet"]
    rc = main(["analyze", *common, "--ratio", "0.7", "--samples", "8", "-o", str(problem_path)])
    assert rc == 0
    problem = SharingProblem.model_validate_json(problem_path.read_text())
    assert len(problem.layers) == 3 and problem.constraints.max_params_ratio == 0.7
    capsys.readouterr()

    names = [x.name for x in problem.layers]
    plan = SharingPlan(status="feasible", coloring={names[0]: 0, names[1]: 0, names[2]: 1},
                       groups=[[names[0], names[1]], [names[2]]],
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.model_dump_json())
    rc = main(["apply", *common, "--plan", str(plan_path), "--out", str(tmp_path / "out"), "--merge", "curvature"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan_params_shared"] == 32 and report["plan_params_original"] == 48
    assert report["predicted_loss_change"] > 0 and report["measured_loss_change"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "plan.json").is_file()


def test_bad_spec_is_a_clear_error(tmp_path, capsys) -> None:
    rc = main(["analyze", "--model", "no_such_model_xyz", "-o", str(tmp_path / "p.json"), "--quiet"])
    assert rc == 2
    assert "module:factory" in capsys.readouterr().err


def test_apply_heal_lowers_the_measured_loss(tmp_path, capsys) -> None:
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), data)
    common = ["--model", "hw_cases:factory", "--data", str(data), "--dtype", "float64", "--device", "cpu", "--quiet"]
    problem_path = tmp_path / "problem.json"
    assert main(["analyze", *common, "-o", str(problem_path)]) == 0
    names = [x.name for x in SharingProblem.model_validate_json(problem_path.read_text()).layers]
    plan = SharingPlan(status="feasible", coloring={n: 0 for n in names}, groups=[names],
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.model_dump_json())
    capsys.readouterr()
    measured = []
    for steps in (0, 80):
        out = tmp_path / f"out{steps}"
        assert main(["apply", *common, "--plan", str(plan_path), "--out", str(out), "--heal", str(steps), "--heal-lr", "1e-2"]) == 0
        report = json.loads(capsys.readouterr().out)
        measured.append(report["measured_loss_change"])
        assert (report["heal"] is None) == (steps == 0)
    assert measured[1] < measured[0]
    # --heal-holdout: 0 trains on all and keeps the last step; the default reports its checks
    assert report["heal"]["best_step"] is not None and "0" in report["heal"]["held_losses"]
    assert main(["apply", *common, "--plan", str(plan_path), "--out", str(tmp_path / "all"), "--heal", "20",
                 "--heal-holdout", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["heal"]["best_step"] is None
    assert main(["apply", *common, "--plan", str(plan_path), "--out", str(tmp_path / "bad"), "--heal", "20",
                 "--heal-holdout", "1.5"]) != 0
    assert "holdout" in capsys.readouterr().err


def test_compress_end_to_end(tmp_path, capsys) -> None:
    from hessian_worker.io import load_shared

    data = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), data)
    out = tmp_path / "out"
    common = ["--model", "hw_cases:factory", "--data", str(data), "--dtype", "float64", "--device", "cpu", "--quiet"]
    assert main(["compress", *common, "--ratio", "0.7", "--out", str(out), "--heal", "20", "--heal-lr", "1e-2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_ratio"] <= 0.7 and report["measured_loss_change"] is not None
    measured = [c["measured"] for c in report["candidates"]]
    # with --heal the choice heals a shortlist (the zero-shot best among them) and keeps the least healed
    healed = {c["strategy"]: c["healed"] for c in report["candidates"] if c["healed"] is not None}
    assert report["chosen"] in healed and healed[report["chosen"]] == min(healed.values())
    assert any(c["healed"] is not None and c["measured"] == min(measured) for c in report["candidates"])
    assert report["heal"]["steps"] == 20
    assert (out / "report.json").is_file() and (out / "problem.json").is_file()
    assert report["merge"] == "layerwise"  # the default merge: 12 fit rows >= 4-wide inputs
    names = [c["strategy"] for c in report["candidates"]]
    assert names[0] == "optimum" and "top-2" in names  # patterns here duplicate top plans (3 layers)
    from hw_cases import factory

    model = factory().double()
    plan = load_shared(model, out)
    tied = [g for g in plan.groups if len(g) > 1]
    assert tied and all(model.get_parameter(g[0]) is model.get_parameter(n) for g in tied for n in g)
    # --no-heal-choice: the zero-shot measured choice, then healing
    assert main(["compress", *common, "--ratio", "0.7", "--out", str(tmp_path / "plain"), "--heal", "20",
                 "--heal-lr", "1e-2", "--no-heal-choice"]) == 0
    plain = json.loads(capsys.readouterr().out)
    chosen = next(c for c in plain["candidates"] if c["strategy"] == plain["chosen"])
    assert chosen["measured"] == min(c["measured"] for c in plain["candidates"])
    assert all(c["healed"] is None for c in plain["candidates"]) and plain["heal"]["steps"] == 20


def test_apply_merge_default_stays_mean_and_auto_takes_compress_rule(tmp_path, capsys) -> None:
    """apply's default merge is still mean (the same saved bytes as --merge mean); --merge auto
    picks what compress would: layerwise when the fit rows pin the 4-wide input covariances
    down, curvature when they do not."""
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), data)
    common = ["--model", "hw_cases:factory", "--data", str(data), "--dtype", "float64", "--device", "cpu", "--quiet"]
    names = [f"blocks.{i}.fc.weight" for i in range(3)]
    plan = SharingPlan(status="feasible", coloring={n: 0 for n in names}, groups=[names],
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.model_dump_json())
    merges = {}
    for name, flags in {"default": [], "mean": ["--merge", "mean"], "auto": ["--merge", "auto"],
                        "auto-few": ["--merge", "auto", "--samples", "4"]}.items():
        assert main(["apply", *common, *flags, "--plan", str(plan_path), "--out", str(tmp_path / name)]) == 0
        merges[name] = json.loads(capsys.readouterr().out)["merge"]
    assert merges == {"default": "mean", "mean": "mean", "auto": "layerwise", "auto-few": "curvature"}
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("default", "mean", "auto")]
    assert weights[0] == weights[1] != weights[2]
