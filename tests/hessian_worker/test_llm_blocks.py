"""The streamed path on the small models the in-memory path runs on: MiniLM (an encoder whose loss
sees the mean-pooled embedding: K-FAC pools per sample) and the bench's GPT (per-token outputs the
in-memory path takes for a plain tensor: mse). Same costs for every streamed backend, same
candidates, choice, held-out figure and saved model (float64, whole input factors)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench.tasks.gpt import GPT, GPTConfig, gpt_blocks
from hessian_worker import AnalyzeConfig, analyze
from hessian_worker.data import DEFAULT_SENTENCES
from hessian_worker.io import save_shared
from hessian_worker.llm.analyze import analyze_blocks
from hessian_worker.llm.blocks import bert_blocks
from hessian_worker.llm.compress import compress_blocks
from hessian_worker.models import load_model
from hessian_worker.pipeline import CompressConfig, compress


def _minilm():
    loaded = load_model("minilm")
    return loaded.model.double(), DEFAULT_SENTENCES, loaded.tokenizer, bert_blocks


def _gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(blocks=4, d_model=32, heads=4, context=16)).double().eval()
    ids = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(1))
    return model, ids, None, gpt_blocks


MODELS = {"minilm": _minilm, "gpt": _gpt}


def _matrix(problem) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in problem.costs.matrix])


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("backend", "kind"), [("kfac", "pairwise"), ("layerwise", "pairwise"),
                                               ("kfac", "assignment")])
def test_streamed_costs_equal_the_in_memory_backend(name, backend, kind):
    model, data, tokenizer, blocks_of = MODELS[name]()
    config = AnalyzeConfig(backend=backend, kind=kind, dtype="float64", batch_size=4, samples=8, device="cpu",
                           progress=False, kfac={"rank": None})
    streamed = analyze_blocks(blocks_of(model), data, config, tokenizer=tokenizer)
    whole = analyze(model, data, config, tokenizer=tokenizer)
    a, b = _matrix(streamed), _matrix(whole)
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.nanmax(b) > 0
    finite = ~np.isnan(b)
    np.testing.assert_allclose(a[finite], b[finite], rtol=1e-6, atol=1e-12 * np.nanmax(b))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_streamed_exact_costs_equal_the_in_memory_exact_backend(name):
    model, data, tokenizer, blocks_of = MODELS[name]()
    config = AnalyzeConfig(backend="exact", dtype="float64", batch_size=8, samples=6, device="cpu", progress=False,
                           targets=["re:.*(value|attn\\.out)\\.weight$"])
    streamed = analyze_blocks(blocks_of(model), data, config, tokenizer=tokenizer)
    whole = analyze(model, data, config, tokenizer=tokenizer)
    a, b = _matrix(streamed), _matrix(whole)
    finite = ~np.isnan(b)
    assert finite.sum() > len(b) and np.nanmax(b) > 0
    np.testing.assert_allclose(a[finite], b[finite], rtol=1e-6, atol=1e-12 * np.nanmax(b))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_streamed_compress_is_the_in_memory_pipeline(name, tmp_path: Path):
    model, data, tokenizer, blocks_of = MODELS[name]()
    # shrinkage none: the streamed path merges with its K-FAC sums and chooses no intensity (held-out is none there)
    config = CompressConfig(ratio=0.7, backend="kfac", merge="layerwise", dtype="float64", batch_size=4, samples=16,
                            progress=False, device="cpu", kfac={"rank": None}, top=3, normalized_top=2, per_pattern=1,
                            shrinkage="none")
    reference = copy.deepcopy(model)
    streamed = compress_blocks(blocks_of(model), data, config, tmp_path / "streamed", tokenizer=tokenizer)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the streamed path never changes the model
    whole = compress(model, data, config, tokenizer=tokenizer)
    save_shared(model, whole.plan, tmp_path / "whole")
    assert [c.strategy for c in streamed.candidates] == [c.strategy for c in whole.candidates]
    for a, b in zip(streamed.candidates, whole.candidates, strict=True):
        assert abs(a.measured - b.measured) <= 1e-6 * abs(b.measured)
    assert streamed.plan.groups == whole.plan.groups
    assert abs(streamed.measured_loss_change - whole.measured_loss_change) <= 1e-6 * abs(whole.measured_loss_change)
    ours, theirs = load_file(tmp_path / "streamed" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        torch.testing.assert_close(ours[key], t, rtol=1e-9, atol=1e-9 * float(t.abs().max().clamp_min(1e-30)))
    meta = [json.loads((tmp_path / d / "plan.json").read_text()) for d in ("streamed", "whole")]
    assert meta[0]["aliases"] == meta[1]["aliases"] and meta[0]["unique_params"] == meta[1]["unique_params"]

