"""Healing's held-out check: the best step is kept (step 0 included), also in the heal-aware choice."""

from __future__ import annotations

import copy

import pytest
import torch
from hw_cases import mlp_data, tiny_mlp

from hessian_worker.apply import apply_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.data import holdout_size
from hessian_worker.healing import HealConfig, heal, heal_parts
from hessian_worker.measure import measure_loss
from hessian_worker.tying import unique_params
from solver.schema import SharingPlan

CPU = AnalyzeConfig(device="cpu", progress=False)
NAMES = ["blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.2.fc.weight"]


def _plan(groups: list[list[str]], strategy: str | None = None) -> SharingPlan:
    coloring = {n: c for c, g in enumerate(groups) for n in g}
    return SharingPlan(status="feasible", coloring=coloring, groups=groups, strategy=strategy,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


def _tied(groups: list[list[str]] = [NAMES]):  # noqa: B006 (read only)
    reference = tiny_mlp().float()
    model = copy.deepcopy(reference)
    apply_plan(model, _plan(groups), "mean")
    return reference, model


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_holdout_size_rule() -> None:
    assert holdout_size(0.2, 20) == 4
    assert holdout_size(0.0, 20) == 0
    assert holdout_size(0.2, 2) == 0  # round(0.4) = 0: nothing held out
    assert holdout_size(0.9, 2) == 0  # would leave no training sample
    assert holdout_size(0.5, 3) == 2


def test_heal_keeps_the_best_held_out_step_and_reports_its_loss() -> None:
    reference, model = _tied()
    data = mlp_data(n=40, batch=4)
    config = HealConfig(steps=40, lr=1e-2, batch_size=4, holdout=0.25, check_every=10, device="cpu", progress=False)
    report = heal(model, reference, data, config)
    _, held = heal_parts(data, config)
    assert held is not None and held.num_samples == 10
    assert sorted(report.held_losses) == [0, 10, 20, 30, 40]
    assert report.best_step == min(report.held_losses, key=report.held_losses.__getitem__)
    assert report.best_step > 0  # here healing helps
    # the kept weights are the best step's: an independent measure on the held-out part agrees
    kept = report.held_losses[report.best_step]
    assert measure_loss(model, reference, held, CPU) == pytest.approx(kept, rel=1e-5)
    assert kept < report.held_losses[0]
    assert model.blocks[0].fc.weight is model.blocks[1].fc.weight is model.blocks[2].fc.weight


def test_heal_that_only_hurts_leaves_the_tie_as_it_was() -> None:
    reference, model = _tied()
    before = _weights(model)
    data = mlp_data(n=40, batch=4)
    # a learning rate that throws the weights far off: every later check is worse than step 0
    config = HealConfig(steps=20, lr=10.0, batch_size=4, holdout=0.25, check_every=5, device="cpu", progress=False)
    report = heal(model, reference, data, config)
    assert report.best_step == 0
    assert max(report.held_losses.values()) > 10 * report.held_losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    assert model.blocks[0].fc.weight is model.blocks[2].fc.weight
    assert report.unique_params == unique_params(model)


def test_heal_without_holdout_trains_on_all_and_keeps_the_last_step() -> None:
    data = mlp_data(n=40, batch=4)
    runs = {}
    for holdout in (0.0, 0.25):
        reference, model = _tied()
        config = HealConfig(steps=20, lr=10.0, batch_size=4, holdout=holdout, device="cpu", progress=False)
        runs[holdout] = (heal(model, reference, data, config), _weights(model))
    report, weights = runs[0.0]
    assert report.best_step is None and report.held_losses is None
    assert not all(torch.equal(a, b) for a, b in zip(weights, runs[0.25][1], strict=True))


def test_choose_healed_heals_with_the_holdout_and_compares_on_the_choice_data() -> None:
    from hessian_worker.choose import choose_healed

    reference = tiny_mlp().float()
    plans = [_plan([NAMES], "top-1"), _plan([NAMES[:2], NAMES[2:]], "sequence"), _plan([[NAMES[0]], NAMES[1:]], "top-2")]
    heal_data, choice_data = mlp_data(n=40, seed=1), mlp_data(n=16, seed=2)
    config = HealConfig(steps=20, lr=1e-2, batch_size=4, holdout=0.25, check_every=5, device="cpu", progress=False)
    choice = choose_healed(reference, plans, [0.3, 0.2, 0.1], heal_data, choice_data, config, CPU, best=1)
    assert sorted(choice.healed) == [1, 2]
    real = {}
    for i in (1, 2):
        model = copy.deepcopy(reference)
        apply_plan(model, plans[i], "mean")
        heal(model, reference, heal_data, config)  # the same heal: best held-out step kept
        real[i] = measure_loss(model, reference, choice_data, CPU)
        assert choice.healed[i] == pytest.approx(real[i], rel=1e-5)
    assert choice.index == min(real, key=real.__getitem__)
    assert choice.heal.best_step is not None
    assert measure_loss(choice.model, reference, choice_data, CPU) == pytest.approx(real[choice.index], rel=1e-5)


def test_heal_checks_the_last_step_too() -> None:
    reference, model = _tied()
    config = HealConfig(steps=25, lr=1e-2, batch_size=4, holdout=0.25, check_every=10, device="cpu", progress=False)
    report = heal(model, reference, mlp_data(n=40, batch=4), config)
    assert sorted(report.held_losses) == [0, 10, 20, 25]
