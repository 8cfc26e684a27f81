"""The model card of a compressed directory (issue 19): README.md and sharing.png written by every
save from plan.json, the same bytes on a re-save, the compress command and figures recorded by the
CLI, the command re-parsing to the run's own arguments, and the plan drawn as families by depth."""

from __future__ import annotations

import argparse
import json
import shlex

import pytest
import torch

from geoshare.cli import add_model_commands as add_commands
from geoshare.cli import main
from geoshare.cli.record import command_line
from hessian_worker.apply import apply_plan
from hessian_worker.basis.modules import install_class
from hessian_worker.io import load_compressed, save_shared
from hessian_worker.model_card import PICTURE, README, sharing_rows, write_card
from solver.schema import SharingPlan

PNG = b"\x89PNG\r\n\x1a\n"


def plan_of(groups: list[list[str]]) -> SharingPlan:
    return SharingPlan(status="feasible", coloring={n: c for c, g in enumerate(groups) for n in g}, groups=groups,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


def test_every_save_writes_the_card_and_a_resave_writes_the_same_bytes(tmp_path):
    from hw_cases import tiny_bert

    bert = tiny_bert()
    queries = [f"encoder.layer.{i}.attention.self.query.weight" for i in range(2)]
    ffn = [f"encoder.layer.{i}.intermediate.dense.weight" for i in range(2)]
    plan = plan_of([queries, [ffn[0]], [ffn[1]]])
    apply_plan(bert, plan, "mean")
    out = save_shared(bert, plan, tmp_path / "out")

    card = (out / README).read_text()
    assert (out / PICTURE).read_bytes().startswith(PNG)
    assert f"![sharing]({PICTURE})" in card and "BertModel, layers sharing weights" in card
    assert "| `attention.self.query.weight` | 2 | 1 | `AA` |" in card  # one class over both layers
    assert "| `intermediate.dense.weight` | 2 | 0 | `..` |" in card  # each layer its own
    meta = json.loads((out / "plan.json").read_text())
    assert f"| unique parameters stored | {meta['unique_params']:,} |" in card
    assert "card" not in meta and "## Command" not in card  # nothing measured yet

    loaded = load_compressed(out)
    loaded.save_pretrained(tmp_path / "again")
    for name in (README, PICTURE):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


def test_basis_scheme_card_on_a_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2Model

    from hessian_worker.curvature.layerwise import linear_modules

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=16, n_layer=4, n_head=2, vocab_size=50, n_positions=32)).double().eval()
    names = [f"h.{i}.mlp.c_fc.weight" for i in range(4)]
    layers = linear_modules(model, names)
    for group in (names[:2], names[2:]):
        weights = [layers[n][0].weight.detach().T for n in group]
        u = torch.linalg.svd(torch.cat(weights, dim=1), full_matrices=False)[0][:, :6]
        install_class(model, group, u, [u.T @ w for w in weights], side="out")
    out = save_shared(model, plan_of([names[:2], names[2:]]), tmp_path / "out")
    card = (out / README).read_text()
    assert "GPT2Model, layers sharing low-rank bases" in card
    assert "| `mlp.c_fc.weight` | 4 | 2 | `AABB` |" in card
    assert (out / PICTURE).read_bytes().startswith(PNG)


def test_compress_records_the_command_and_the_measured_figures(tmp_path, capsys):
    from hw_cases import tiny_bert

    source = tmp_path / "bert"
    tiny_bert().save_pretrained(source)
    ids = torch.randint(1, 40, (12, 6), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "calib.pt")
    out = tmp_path / "out"
    argv = ["compress", "--model", str(source), "--data", str(tmp_path / "calib.pt"), "--ratio", "0.7",
            "--dtype", "float64", "--device", "cpu", "--quiet", "--top", "2", "--normalized-top", "0",
            "--per-pattern", "1", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    meta = json.loads((out / "plan.json").read_text())
    card = (out / README).read_text()

    # the command: the flags given, none of the defaults, and it parses back to the same run
    command = meta["card"]["command"]
    assert f"```\n{command}\n```" in card
    words = shlex.split(command)
    assert words[:2] == ["geoshare", "compress"] and "--top" in words and "--merge" not in words
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    assert vars(parser.parse_args(words[1:])) == vars(parser.parse_args(argv))

    # the figures: the report's, on the card
    assert meta["card"]["compress"]["measured_loss_change"] == report["measured_loss_change"]
    assert meta["card"]["compress"]["candidates"] == len(report["candidates"])
    assert f"| measured loss change (held-out samples) | {report['measured_loss_change']:.4g} |" in card
    assert f"| plan chosen | {report['chosen']} |" in card
    assert f"of {meta['plan']['params']['original']:,}" in card  # report.json leaves the plan to plan.json

    # the recorded figures survive a re-save; an evaluation adds its own beside them
    load_compressed(out).save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / README).read_text() == card
    evaluation = {"metric": "cosine", "samples": 3, "tokens": None, "quality": {"mean_cosine": 0.5},
                  "model": {"spec": str(out), "score": 0.5, "storage": {"unique_params": 10}, "disk_bytes": 2e6,
                            "memory": {"load_forward_bytes": 3e6}},
                  "reference": {"spec": str(source), "score": 1.0, "storage": {"unique_params": 20}, "disk_bytes": 4e6,
                                "memory": None}}
    write_card(tmp_path / "again", evaluation=evaluation)
    again = (tmp_path / "again" / README).read_text()
    assert "## Measured at compress time" in again and "| cosine | 0.5000 | 1.0000 |" in again
    assert "| weights on disk | 2.0 MB | 4.0 MB |" in again and "peak memory" not in again  # the reference's is unknown


def test_sharing_rows_put_layers_by_family_and_depth():
    meta = {"layers": {"h.0.fc.weight": {"class": 0}, "h.1.fc.weight": {"class": 1}, "h.2.fc.weight": {"class": 0},
                       "h.0.attn.weight": {"class": 2}, "lm_head.weight": {"class": 3}}}
    assert sharing_rows(meta) == {"fc.weight": {0: 0, 1: 1, 2: 0}, "attn.weight": {0: 2}, "lm_head.weight": {0: 3}}


def test_command_line_keeps_repeated_and_boolean_flags():
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    argv = ["analyze", "--model", "minilm", "-o", "p.json", "--targets", "re:.*query.*", "--targets", "x y",
            "--no-stats-cache", "--ratio", "0.5"]
    args = parser.parse_args(argv)
    assert vars(parser.parse_args(shlex.split(command_line(args, parser))[1:])) == vars(args)


def test_card_of_a_folder_without_a_plan_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="plan.json"):
        write_card(tmp_path)
