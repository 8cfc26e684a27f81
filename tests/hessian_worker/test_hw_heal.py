"""Healing: loss goes down, ties stay, the seed fixes the run."""

from __future__ import annotations

import copy

import pytest
import torch
from hw_cases import bert_data, mlp_data, tiny_mlp

from hessian_worker.apply import apply_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.healing import HealConfig, heal
from hessian_worker.measure import measure_loss
from hessian_worker.tying import unique_params
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


def _named(plan: SharingPlan, strategy: str) -> SharingPlan:
    return plan.model_copy(update={"strategy": strategy})


def test_shortlist_keeps_the_best_and_each_patterns_best() -> None:
    from hessian_worker.choose import pattern_family, shortlist

    base = _plan([["blocks.0.fc.weight"]])
    plans = [_named(base, s) for s in ("top-1", "sequence", "top-2", "cycle#2", "sequence#2", "norm-1", "cycle")]
    measured = [0.1, 0.5, 0.2, 0.4, 0.3, 0.05, 0.6]
    assert [pattern_family(p) for p in plans] == [None, "sequence", None, "cycle", "sequence", None, "cycle"]
    # the two least-loss (norm-1, top-1), then the best sequence (#2, 0.3) and the best cycle (#2, 0.4)
    assert shortlist(plans, measured, 2) == [5, 0, 4, 3]
    assert shortlist(plans, measured, 0) == [4, 3]
    assert sorted(shortlist(plans, measured, 10)) == list(range(7))


def test_choose_healed_keeps_the_least_healed_loss_and_returns_that_model() -> None:
    from hessian_worker.choose import choose_healed

    reference = tiny_mlp().float()
    names = ["blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.2.fc.weight"]
    plans = [_named(_plan([names]), "top-1"), _named(_plan([names[:2], names[2:]]), "sequence"),
             _named(_plan([[names[0]], names[1:]]), "top-2")]
    heal_data, choice_data = mlp_data(n=16, seed=1), mlp_data(n=16, seed=2)
    # holdout 0: healed on all of heal_data, compared on choice_data (test_hw_heal_holdout: the default)
    config = HealConfig(steps=15, lr=1e-2, batch_size=4, holdout=0, device="cpu", progress=False)
    choice = choose_healed(reference, plans, [0.3, 0.2, 0.1], heal_data, choice_data, config, CPU, best=1)
    assert sorted(choice.healed) == [1, 2]  # top-2 is the best zero-shot; sequence is a pattern
    real = {}
    for i in (1, 2):
        model = copy.deepcopy(reference)
        apply_plan(model, plans[i], "mean")
        heal(model, reference, heal_data, config)
        real[i] = measure_loss(model, reference, choice_data, CPU)
        assert choice.healed[i] == pytest.approx(real[i], rel=1e-5)
    assert choice.index == min(real, key=real.__getitem__)
    assert choice.plan == plans[choice.index]
    # the returned model is the winner, tied and healed: nothing to heal again
    assert measure_loss(choice.model, reference, choice_data, CPU) == pytest.approx(real[choice.index], rel=1e-5)
    assert unique_params(choice.model) < unique_params(reference)
    assert choice.heal.steps == 15 and choice.heal.unique_params == unique_params(choice.model)
    assert choice.apply.unique_params_after == unique_params(choice.model)
