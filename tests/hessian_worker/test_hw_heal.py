"""Healing: loss goes down, ties stay, the seed fixes the run."""

from __future__ import annotations

import copy

import pytest
import torch
from hw_cases import bert_data, mlp_data, tiny_mlp

from hessian_worker.apply import apply_plan, unique_params
from hessian_worker.config import AnalyzeConfig
from hessian_worker.healing import HealConfig, heal
from hessian_worker.measure import measure_loss
from solver.schema import SharingPlan

CPU = AnalyzeConfig(device="cpu", progress=False)


def _plan(groups: list[list[str]]) -> SharingPlan:
    coloring = {n: c for c, g in enumerate(groups) for n in g}
    return SharingPlan(status="feasible", coloring=coloring, groups=groups,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


def _tied_mlp():
    reference = tiny_mlp().float()
    model = copy.deepcopy(reference)
    apply_plan(model, _plan([["blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.2.fc.weight"]]), "mean")
    return reference, model


def test_heal_lowers_the_loss_and_keeps_ties() -> None:
    reference, model = _tied_mlp()
    data = mlp_data(n=16)
    before = measure_loss(model, reference, data, CPU)
    params_before = unique_params(model)
    report = heal(model, reference, data, HealConfig(steps=60, lr=1e-2, device="cpu", progress=False))
    after = measure_loss(model, reference, data, CPU)
    assert after < 0.5 * before
    assert report.last_loss < report.first_loss
    assert model.blocks[0].fc.weight is model.blocks[1].fc.weight is model.blocks[2].fc.weight
    assert unique_params(model) == params_before == report.unique_params


def test_heal_is_seeded() -> None:
    results = []
    for _ in range(2):
        reference, model = _tied_mlp()
        heal(model, reference, mlp_data(n=16), HealConfig(steps=10, lr=1e-2, seed=3, device="cpu", progress=False))
        results.append(model.blocks[0].fc.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_heal_on_a_tied_bert() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # weights large enough that tying every family across the two layers changes the outputs
    cfg = BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, vocab_size=40,
                     max_position_embeddings=32, attn_implementation="eager", hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.3)
    reference = BertModel(cfg).eval()
    model = copy.deepcopy(reference)
    roles = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    groups = [[f"encoder.layer.{i}.{r}.weight" for i in range(2)] for r in roles]
    apply_plan(model, _plan(groups), "mean")
    data = bert_data()
    before = measure_loss(model, reference, data, CPU)
    assert before > 1e-6
    heal(model, reference, data, HealConfig(steps=40, lr=3e-3, device="cpu", progress=False))
    assert measure_loss(model, reference, data, CPU) < 0.5 * before
    assert model.encoder.layer[0].attention.self.query.weight is model.encoder.layer[1].attention.self.query.weight


def test_choose_plan_picks_the_least_measured_loss() -> None:
    from hessian_worker.choose import choose_plan

    reference = tiny_mlp().float()
    names = ["blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.2.fc.weight"]
    plans = [_plan([names]), _plan([names[:2], names[2:]]), _plan([[names[0]], names[1:]])]
    data = mlp_data(n=16)
    choice = choose_plan(reference, data, plans, CPU)
    real = []
    for plan in plans:
        model = copy.deepcopy(reference)
        apply_plan(model, plan, "mean")
        real.append(measure_loss(model, reference, data, CPU))
    assert choice.index == min(range(3), key=real.__getitem__)
    assert choice.measured == [pytest.approx(x, rel=1e-4, abs=1e-9) for x in real]
