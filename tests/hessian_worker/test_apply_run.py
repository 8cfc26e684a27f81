"""The verbs behind ``geoshare apply`` and the end of ``geoshare compress``, called as a library:
apply_and_save gives the CLI's report, and save_compressed_run writes what the CLI and a service
compress job each leave in their directory."""

from __future__ import annotations

import json

import pytest
import torch
from hw_cases import factory

from geoshare.cli import main
from hessian_worker.apply_run import ApplyRunConfig, apply_and_save
from hessian_worker.compress_run import save_compressed_run
from hessian_worker.io import load_shared
from hessian_worker.model_card import README
from hessian_worker.options import CompressConfig
from hessian_worker.pipeline import compress
from solver.schema import SharingPlan


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), path)
    return path


def test_apply_and_save_is_what_the_cli_reports(tmp_path, calib, capsys):
    names = [f"blocks.{i}.fc.weight" for i in range(3)]
    plan = SharingPlan(status="feasible", coloring={names[0]: 0, names[1]: 0, names[2]: 1},
                       groups=[names[:2], names[2:]], solver={"method": "test", "time_s": 0.0, "ortools": "none",
                                                              "seed": 0})
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.model_dump_json())
    config = ApplyRunConfig(merge="curvature", holdout=6, heal_steps=5, heal_lr=1e-2, device="cpu",
                            dtype="float64", progress=False)
    done = apply_and_save("hw_cases:factory", plan, tmp_path / "lib", data=str(calib), config=config)
    assert done.predicted_loss_change > 0 and done.measured_loss_change > 0 and done.heal["steps"] == 5
    argv = ["apply", "--model", "hw_cases:factory", "--data", str(calib), "--dtype", "float64", "--device", "cpu",
            "--quiet", "--plan", str(plan_path), "--merge", "curvature", "--holdout-samples", "6", "--heal", "5",
            "--heal-lr", "1e-2", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps({**done.to_json(), "out": str(tmp_path / "cli")}))
    assert (tmp_path / "lib" / "model.safetensors").read_bytes() == (tmp_path / "cli" / "model.safetensors").read_bytes()
    model = factory()
    load_shared(model, tmp_path / "lib")
    assert model.blocks[0].fc.weight is model.blocks[1].fc.weight


def test_apply_and_save_refuses_a_data_merge_without_data(tmp_path):
    names = [f"blocks.{i}.fc.weight" for i in range(3)]
    plan = SharingPlan(status="feasible", coloring={n: 0 for n in names}, groups=[names],
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})
    with pytest.raises(ValueError, match="needs calibration data"):
        apply_and_save("hw_cases:factory", plan, tmp_path / "out", config=ApplyRunConfig(merge="layerwise"))
    assert not (tmp_path / "out").exists()


def test_save_compressed_run_writes_the_cli_set_or_the_job_set(tmp_path, calib):
    model = factory().double()
    config = CompressConfig(ratio=0.7, top=2, normalized_top=0, per_pattern=1, device="cpu", progress=False)
    report = compress(model, str(calib), config)
    text = save_compressed_run(tmp_path / "cli", report, model=model, source="hw_cases:factory",
                               command="geoshare compress --ratio 0.7")
    assert json.loads(text) == json.loads((tmp_path / "cli" / "report.json").read_text())
    assert "plan" not in json.loads(text) and json.loads(text)["chosen"] == report.chosen
    assert (tmp_path / "cli" / "problem.json").is_file()
    card = json.loads((tmp_path / "cli" / "plan.json").read_text())["card"]
    assert card["command"] == "geoshare compress --ratio 0.7" and card["compress"]["chosen"] == report.chosen
    # a service compress job: the model and report.json, neither costs nor figures (docs/contract.md)
    job = save_compressed_run(tmp_path / "job", report, model=model, source="hw_cases:factory", costs=False,
                              card=False)
    assert job == text and not (tmp_path / "job" / "problem.json").exists()
    assert "card" not in json.loads((tmp_path / "job" / "plan.json").read_text())
    assert (tmp_path / "job" / README).is_file()  # every save renders the card from plan.json
    assert (tmp_path / "job" / "model.safetensors").read_bytes() == (tmp_path / "cli" / "model.safetensors").read_bytes()
