"""Saving and loading basis-shared models: each basis stored once, bit-exact outputs after loading."""

from __future__ import annotations

import json

import pytest
import torch
from hw_cases import bert_data, tiny_bert
from safetensors import safe_open

from hessian_worker.analysis import analyze
from hessian_worker.apply import apply_plan
from hessian_worker.basis.io import load_basis, save_basis
from hessian_worker.basis.modules import BasisLinear
from hessian_worker.config import AnalyzeConfig
from hessian_worker.errors import PlanError
from hessian_worker.io import load_shared, save_shared
from hessian_worker.tying import unique_params
from solver.schema import SharingPlan, SharingProblem

FFN = ["re:.*intermediate.dense.weight", "re:.*output.dense.weight"]
QUERY = [f"encoder.layer.{i}.attention.self.query.weight" for i in range(2)]
CFG = AnalyzeConfig(
    scheme="basis",
    targets=FFN,
    ignore=["re:.*attention.*"],
    dtype="float64",
    device="cpu",
    progress=False,
)


def plan_of(groups: list[list[str]]) -> SharingPlan:
    coloring = {n: c for c, g in enumerate(groups) for n in g}
    return SharingPlan(
        status="feasible",
        coloring=coloring,
        groups=groups,
        solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0},
    )


def with_tied_queries(problem: SharingProblem) -> SharingProblem:
    """The basis problem plus a ``tie`` family of the two query weights (a mixed-scheme problem)."""
    data = problem.model_dump()
    n = len(data["layers"])
    data["layers"] += [
        {"name": q, "family": "attention.self.query.weight", "params": 64, "index": i}
        for i, q in enumerate(QUERY)
    ]
    data["costs"]["matrix"] = [row + [None, None] for row in data["costs"]["matrix"]]
    data["costs"]["matrix"] += [[None] * n + [0.0, 1.0], [None] * n + [1.0, 0.0]]
    data["costs"]["unary"] += [0.0, 0.0]
    return SharingProblem.model_validate(data)


@pytest.fixture
def shared_bert():
    model, data = tiny_bert(), bert_data()
    problem = with_tied_queries(analyze(model, data, CFG))
    fams = {
        x.family: [y.name for y in problem.layers if y.family == x.family] for x in problem.layers
    }
    assert set(fams) == {
        "intermediate.dense.weight",
        "output.dense.weight",
        "attention.self.query.weight",
    }
    # one shared basis for the intermediate pair, singletons for output.dense, tied queries
    out = fams["output.dense.weight"]
    plan = plan_of([fams["intermediate.dense.weight"], [out[0]], [out[1]], QUERY])
    apply_plan(model, plan, "mean", data=data, config=CFG, problem=problem)
    return model, plan


@pytest.mark.parametrize("via_shared", [False, True])
def test_round_trip_is_bit_exact(shared_bert, tmp_path, via_shared: bool) -> None:
    model, plan = shared_bert
    batch = bert_data().batches[0]
    expected = model(**batch).last_hidden_state
    (save_shared if via_shared else save_basis)(model, plan, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    bases = {k for k in keys if k.endswith("intermediate.dense.basis")}
    assert len(bases) == 1  # the shared basis stored once
    assert {k for k in keys if k.endswith("output.dense.basis")} == {
        f"encoder.layer.{i}.output.dense.basis" for i in range(2)
    }
    assert len(keys & set(QUERY)) == 1  # the tied query too
    meta = json.loads((tmp_path / "plan.json").read_text())
    assert meta["scheme"] == "basis" and meta["unique_params"] == unique_params(model)
    assert (
        meta["basis"]["encoder.layer.1.intermediate.dense"]["basis"]
        == "encoder.layer.0.intermediate.dense"
    )

    fresh = tiny_bert(seed=7)
    assert not torch.equal(fresh(**batch).last_hidden_state, expected)
    loaded = (load_shared if via_shared else load_basis)(fresh, tmp_path)
    assert loaded.groups == plan.groups
    layers = fresh.encoder.layer
    assert isinstance(layers[0].intermediate.dense, BasisLinear)
    assert layers[0].intermediate.dense.basis is layers[1].intermediate.dense.basis
    assert layers[0].output.dense.basis is not layers[1].output.dense.basis
    assert layers[0].attention.self.query.weight is layers[1].attention.self.query.weight
    assert unique_params(fresh) == unique_params(model)
    torch.testing.assert_close(fresh(**batch).last_hidden_state, expected, rtol=0, atol=0)


def test_load_refuses_what_does_not_fit(shared_bert, tmp_path) -> None:
    model, plan = shared_bert
    save_basis(model, plan, tmp_path)
    with pytest.raises(PlanError, match="needs"):
        load_basis(tiny_bert(), tmp_path / "missing")
    from transformers import BertConfig, BertModel

    wider = BertModel(
        BertConfig(
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            vocab_size=40,
            max_position_embeddings=32,
        )
    ).double()
    with pytest.raises(PlanError, match="when saved"):
        load_basis(wider, tmp_path)
    plain = tmp_path / "plain"
    save_shared(tiny_bert(), plan_of([QUERY]), plain)
    with pytest.raises(PlanError, match="not a basis save"):
        load_basis(tiny_bert(), plain)


def test_gpt2_conv1d_layers_round_trip(tmp_path) -> None:
    """GPT-2's Conv1D stores [in, out]: the basis works on the transposed weight, same function."""
    from transformers import GPT2Config, GPT2Model

    from hessian_worker.data import Calibration

    def gpt2(seed: int) -> GPT2Model:
        torch.manual_seed(seed)
        config = GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=20, n_positions=16)
        return GPT2Model(config).double().eval()

    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    data = Calibration([{"input_ids": ids}])
    model = gpt2(0)
    config = AnalyzeConfig(
        scheme="basis",
        targets=["re:h.\\d+.mlp.c_fc.weight"],
        basis={"rank": 3},
        dtype="float64",
        device="cpu",
        progress=False,
    )
    problem = analyze(model, data, config)
    spec = problem.families["mlp.c_fc.weight"]
    assert (spec.class_params, spec.member_params) == (32 * 3, 3 * 8)  # d_out = 32, d_in = 8
    names = [x.name for x in problem.layers]
    dense = [model.h[i].mlp.c_fc.weight.detach().clone() for i in range(2)]
    apply_plan(model, plan_of([names]), data=data, config=config, problem=problem)
    fc = [model.h[i].mlp.c_fc for i in range(2)]
    assert fc[0].basis is fc[1].basis and fc[0].weight.shape == (32, 8)
    reference = gpt2(0)
    for i in range(2):  # the same function as a Conv1D holding the low-rank weight, transposed
        reference.h[i].mlp.c_fc.weight.data.copy_(fc[i].weight.detach().T)
        assert not torch.allclose(fc[i].weight.detach().T, dense[i])
    expected = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(reference(input_ids=ids).last_hidden_state, expected)
    save_shared(model, plan_of([names]), tmp_path)
    fresh = gpt2(3)
    load_shared(fresh, tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)
