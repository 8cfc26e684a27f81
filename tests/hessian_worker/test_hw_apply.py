"""apply_plan / save_shared / load_shared round trip and measure_loss."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hw_cases import bert_data, mlp_data, tiny_bert, tiny_mlp
from safetensors import safe_open

from hessian_worker.apply import apply_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.errors import PlanError
from hessian_worker.io import load_shared, save_shared
from hessian_worker.measure import measure_loss
from hessian_worker.tying import unique_params
from solver.schema import SharingPlan

CPU64 = AnalyzeConfig(dtype="float64", device="cpu", progress=False, probes=8)


def _plan(groups: list[list[str]], singles: list[str] = ()) -> SharingPlan:
    coloring = {n: c for c, g in enumerate(groups) for n in g}
    coloring.update({n: len(groups) + i for i, n in enumerate(singles)})
    return SharingPlan(status="feasible", coloring=coloring, groups=[*groups, *([s] for s in singles)],
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


MLP_PLAN = _plan([["blocks.2.fc.weight", "blocks.0.fc.weight"]], ["blocks.1.fc.weight"])


@pytest.mark.parametrize("merge", ["mean", "representative", "curvature", "layerwise"])
def test_apply_ties_one_parameter_with_merged_value(merge: str) -> None:
    model = tiny_mlp()
    w2, w0 = model.blocks[2].fc.weight.detach().clone(), model.blocks[0].fc.weight.detach().clone()
    report = apply_plan(model, MLP_PLAN, merge, data=mlp_data(), config=CPU64)
    assert model.blocks[0].fc.weight is model.blocks[2].fc.weight
    assert model.blocks[1].fc.weight is not model.blocks[0].fc.weight
    value = model.blocks[0].fc.weight.detach()
    if merge == "mean":
        torch.testing.assert_close(value, (w0 + w2) / 2)
    elif merge == "representative":
        torch.testing.assert_close(value, w2)  # the first layer of the group
    else:
        assert not torch.allclose(value, (w0 + w2) / 2)
    assert report.unique_params_before - report.unique_params_after == 16
    assert report.plan_params_original == 48 and report.plan_params_shared == 32
    assert report.ratio == pytest.approx(2 / 3)
    assert unique_params(model) == report.unique_params_after


def test_curvature_merge_is_elementwise_weighted() -> None:
    """Σ F_k⊙W_k / Σ F_k: each element lies between the members' values."""
    model = tiny_mlp()
    w2, w0 = model.blocks[2].fc.weight.detach().clone(), model.blocks[0].fc.weight.detach().clone()
    apply_plan(model, MLP_PLAN, "curvature", data=mlp_data(), config=CPU64)
    v = model.blocks[0].fc.weight.detach()
    lo, hi = torch.minimum(w0, w2), torch.maximum(w0, w2)
    assert bool(((v >= lo - 1e-12) & (v <= hi + 1e-12)).all())


def test_curvature_merge_needs_data() -> None:
    with pytest.raises(PlanError, match="data"):
        apply_plan(tiny_mlp(), MLP_PLAN, "curvature")


def test_bad_plans_are_refused() -> None:
    with pytest.raises(PlanError, match="does not have"):
        apply_plan(tiny_mlp(), _plan([["blocks.0.fc.weight", "blocks.9.fc.weight"]]))
    with pytest.raises(PlanError, match="mixes shapes"):
        apply_plan(tiny_mlp(), _plan([["blocks.0.fc.weight", "inp.weight"]]))


def test_save_load_round_trip_mlp(tmp_path) -> None:
    model = tiny_mlp()
    apply_plan(model, MLP_PLAN, "mean")
    x = mlp_data().rows()["input"]
    expected = model(x)
    save_shared(model, MLP_PLAN, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    shared = {"blocks.0.fc.weight", "blocks.2.fc.weight"}
    assert len(keys & shared) == 1  # the shared tensor is stored once
    meta = json.loads((tmp_path / "plan.json").read_text())
    assert meta["unique_params"] == unique_params(model)
    assert set(meta["aliases"]) | (keys & shared) == shared

    fresh = tiny_mlp(seed=123)
    assert not torch.allclose(fresh(x), expected)
    plan = load_shared(fresh, tmp_path)
    assert plan.groups == MLP_PLAN.groups
    assert fresh.blocks[0].fc.weight is fresh.blocks[2].fc.weight
    assert unique_params(fresh) == unique_params(model)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_save_load_round_trip_bert(tmp_path) -> None:
    model = tiny_bert()
    plan = _plan([[f"encoder.layer.{i}.{r}" for i in range(2)]
                  for r in ("attention.self.query.weight", "intermediate.dense.weight")])
    apply_plan(model, plan, "mean")
    batch = bert_data().batches[0]
    expected = model(**batch).last_hidden_state
    save_shared(model, plan, tmp_path)
    fresh = tiny_bert(seed=9)
    load_shared(fresh, tmp_path)
    assert fresh.encoder.layer[0].intermediate.dense.weight is fresh.encoder.layer[1].intermediate.dense.weight
    torch.testing.assert_close(fresh(**batch).last_hidden_state, expected, rtol=0, atol=0)
    with pytest.raises(PlanError, match="needs"):
        load_shared(fresh, tmp_path / "missing")


def test_measure_loss_is_zero_for_reference_and_positive_after_sharing() -> None:
    model = tiny_mlp()
    reference = copy.deepcopy(model)
    data = mlp_data(seed=7)
    assert measure_loss(model, reference, data, CPU64) == 0.0
    apply_plan(model, MLP_PLAN, "mean")
    change = measure_loss(model, reference, data, CPU64)
    x = data.rows()["input"]
    expected = float((model(x) - reference(x)).pow(2).mean())
    assert change == pytest.approx(expected, rel=1e-10) and change > 0


@pytest.mark.parametrize("merge", ["mean", "curvature", "layerwise"])
def test_measure_plans_equals_apply_then_measure(merge: str) -> None:
    from hessian_worker import measure_plans

    data = mlp_data(seed=7)
    other = _plan([["blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.2.fc.weight"]])
    model = tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    scores = measure_plans(model, data, [MLP_PLAN, other], CPU64, merge=merge)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # untouched
    for plan, score in zip([MLP_PLAN, other], scores, strict=True):
        shared = tiny_mlp()
        reference = copy.deepcopy(shared)
        apply_plan(shared, plan, merge, data=data, config=CPU64)
        assert score == pytest.approx(measure_loss(shared, reference, data, CPU64), rel=1e-9)
    assert scores[1] > 0 and scores[0] > 0
