"""Block-wise healing of a streamed decoder: no steps change nothing, healing lowers each tied
block's reconstruction error and never raises it, a class shared by two blocks is trained by both,
padding is left out, and compress_checkpoint heals, scores and saves the healed (still tied) model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hessian_worker.config import DType
from hessian_worker.data import Calibration, load_calibration
from hessian_worker.io import load_shared
from hessian_worker.llm import Checkpoint, Decoder, compress_checkpoint
from hessian_worker.llm.heal import BlockHealReport, heal_blockwise
from hessian_worker.llm.measure import plan_loss, reference_run
from hessian_worker.llm.synthetic import (
    SHAPES,
    decoder_config,
    random_tokens,
    write_random_checkpoint,
)
from hessian_worker.measure import measure_loss
from hessian_worker.models import load_model
from hessian_worker.pipeline import CompressConfig, split_holdout

TINY = SHAPES["tiny"]
# block 0 holds two classes, the gate class spans blocks 0 and 2, block 3 only shares with block 2
GROUPS = [["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"],
          ["model.layers.0.mlp.gate_proj.weight", "model.layers.2.mlp.gate_proj.weight"],
          ["model.layers.2.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"],
          ["model.layers.1.mlp.up_proj.weight"]]
CLASSES = [tuple(g) for g in GROUPS if len(g) > 1]
SPANNING = CLASSES[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama")
    write_random_checkpoint(decoder_config("llama", **TINY), out, dtype=torch.float32, std=0.2)
    torch.save(random_tokens(TINY["vocab_size"], 16, 12, seed=1), out / "calib.pt")
    return out


@pytest.fixture(scope="module")
def decoder(folder) -> Decoder:
    return Decoder(Checkpoint(folder), torch.float64)


def _data(padded: bool = False, pad_token: int = 0) -> Calibration:
    """Four batches of four; padded: right padding of different lengths, pads set to ``pad_token``."""
    ids = random_tokens(TINY["vocab_size"], 16, 12, seed=3)
    if not padded:
        return Calibration([{"input_ids": ids[i:i + 4]} for i in range(0, 16, 4)])
    mask = torch.ones_like(ids)
    for i in range(ids.shape[0]):
        mask[i, 12 - (i % 5):] = 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token))
    return Calibration([{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]} for i in range(0, 16, 4)])


def _mean_merge(decoder: Decoder):
    """The members' mean: a plain starting value, far enough from each member to heal."""
    def merged(c: tuple[str, ...]) -> torch.Tensor:
        return torch.stack([decoder.checkpoint.tensor(n, dtype=torch.float64) for n in c]).mean(0)
    return merged


def _heal(decoder: Decoder, data: Calibration, steps: int, lr: float = 3e-3,
          rank: int | None = None) -> tuple[dict, BlockHealReport]:
    return heal_blockwise(decoder, data, GROUPS, _mean_merge(decoder), steps=steps, lr=lr, seed=0, rank=rank,
                          oversample=4)


def test_no_steps_leave_the_merged_values_and_the_outputs_as_they_were(decoder):
    merged = _mean_merge(decoder)
    healed, report = _heal(decoder, _data(), steps=0)
    assert sorted(healed) == sorted(CLASSES)
    assert all(torch.equal(healed[c], merged(c)) for c in CLASSES)
    assert all(b.before == b.after and b.best_step == 0 for b in report.blocks)
    reference, _ = reference_run(decoder, _data())
    assert plan_loss(decoder, reference, GROUPS, healed.__getitem__) == plan_loss(decoder, reference, GROUPS, merged)


def test_healing_lowers_every_tied_blocks_reconstruction_error_and_never_raises_it(decoder):
    healed, report = _heal(decoder, _data(padded=True), steps=12, rank=4)  # anchors from sketches
    assert [b.block for b in report.blocks] == [0, 1, 2, 3]
    for b in report.blocks:
        assert b.after < b.before and b.best_step > 0 and b.steps == 12, b
    # a learning rate that diverges keeps the merged values (step 0) rather than worse ones
    _, wild = _heal(decoder, _data(padded=True), steps=4, lr=50.0)
    assert all(b.after <= b.before for b in wild.blocks)
    assert any(b.best_step == 0 for b in wild.blocks)
    summary = report.summary()
    assert summary["method"] == "blockwise" and len(summary["blocks"]) == 4


def test_a_class_spanning_two_blocks_is_trained_by_both(decoder):
    healed, report = _heal(decoder, _data(), steps=12)
    by_block = {b.block: b for b in report.blocks}
    assert SPANNING[0] in by_block[0].classes and SPANNING[0] in by_block[2].classes
    assert by_block[0].moved[SPANNING[0]] > 0 and by_block[2].moved[SPANNING[0]] > 0
    assert SPANNING[0] not in by_block[1].classes
    # block 2 moved a class block 0 uses: its anchor priced that, block 0 had nothing earlier to spare
    assert by_block[2].earlier > 0 and by_block[0].earlier == 0


def test_padded_tokens_do_not_steer_the_healing(decoder):
    a, _ = _heal(decoder, _data(padded=True, pad_token=0), steps=6)
    b, _ = _heal(decoder, _data(padded=True, pad_token=5), steps=6)
    for c in CLASSES:
        torch.testing.assert_close(a[c], b[c], rtol=1e-9, atol=1e-12)


def _config(**fields) -> CompressConfig:
    base = {"ratio": 0.7, "backend": "kfac", "merge": "layerwise", "dtype": "float64", "batch_size": 4,
            "progress": False, "device": "cpu", "kfac": {"rank": None}, "top": 2, "normalized_top": 1,
            "per_pattern": 1}
    return CompressConfig(**{**base, **fields})


def test_compress_heals_the_winner_scores_it_held_out_and_saves_it_tied(folder, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = compress_checkpoint(folder, folder / "calib.pt", _config(), tmp_path / "plain")
    config = _config(heal_steps=12, heal_lr=3e-3)
    healed = compress_checkpoint(folder, folder / "calib.pt", config, tmp_path / "healed")
    assert healed.plan.groups == plain.plan.groups
    assert healed.measured_loss_change <= plain.measured_loss_change
    heal = healed.problem.source["heal"]
    assert heal["steps"] == 12 and all(b["after"] <= b["before"] for b in heal["blocks"])
    assert "heal" in healed.problem.source["seconds"]

    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), attn_implementation="eager").double()
    plan = load_shared(fresh, tmp_path / "healed")
    params = dict(fresh.named_parameters(remove_duplicate=False))
    tied = [g for g in plan.groups if len(g) > 1]
    assert tied and all(params[g[0]].data_ptr() == params[n].data_ptr() for g in tied for n in g)
    # the saved model gives the held-out figure the streamed healed model was scored with
    calib = load_calibration(folder / "calib.pt", batch_size=4, seed=config.seed)
    held = split_holdout(calib, config)[1]
    acfg = config.analyze_config(DType.float64)
    original = load_model(str(folder)).model
    change = measure_loss(fresh, original, held, acfg)
    assert abs(change - healed.measured_loss_change) <= 1e-6 * abs(healed.measured_loss_change)
