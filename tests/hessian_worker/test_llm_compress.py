"""A decoder compressed block by block: the same candidates, choice, held-out figure and saved model
as the in-memory pipeline (float64, whole input statistics), the saved files readable by
``load_shared``, the streamed writer, the sketch-based merge, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hessian_worker.curvature.kfac import FactorStats, new_stats
from hessian_worker.curvature.layerwise import layerwise_merge
from hessian_worker.errors import BackendError, PlanError
from hessian_worker.io import load_shared, save_shared
from hessian_worker.llm import compress_checkpoint
from hessian_worker.llm.merge import covariance, difference, merged_value
from hessian_worker.llm.save import write_safetensors
from hessian_worker.llm.synthetic import (
    SHAPES,
    decoder_config,
    random_tokens,
    write_random_checkpoint,
)
from hessian_worker.merge import Merge
from hessian_worker.models import load_model
from hessian_worker.pipeline import CompressConfig, compress

TINY = SHAPES["tiny"]


def _write(folder: Path, arch: str, *, padded: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    write_random_checkpoint(decoder_config(arch, **TINY), folder, dtype=dtype, shard_bytes=40_000, std=0.2)
    ids = random_tokens(TINY["vocab_size"], 16, 12, seed=1)
    if padded:  # right padding of different lengths, as a tokenizer gives a batch of texts
        mask = torch.ones_like(ids)
        for i in range(ids.shape[0]):
            mask[i, 12 - (i % 5):] = 0
        torch.save({"input_ids": ids, "attention_mask": mask}, folder / "calib.pt")
    else:
        torch.save(ids, folder / "calib.pt")
    return folder


def _config(**fields) -> CompressConfig:
    # shrinkage none: the streamed path chooses no intensity (held-out, the default, is none there)
    base = {"ratio": 0.7, "backend": "kfac", "merge": "layerwise", "dtype": "float64", "batch_size": 4,
            "progress": False, "device": "cpu", "kfac": {"rank": None}, "top": 4, "normalized_top": 2,
            "per_pattern": 1, "shrinkage": "none"}
    return CompressConfig(**{**base, **fields})


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.parametrize(("arch", "padded", "fields"), [
    ("llama", False, {}),
    ("qwen2", True, {}),  # q/k/v biases, padded batches
    ("mistral", False, {"choice_holdout": 0.0, "kind": None}),
])
def test_streamed_compress_is_the_in_memory_pipeline(tmp_path, arch, padded, fields):
    fields = {k: v for k, v in fields.items() if k != "kind"}
    folder = _write(tmp_path / arch, arch, padded=padded)
    config = _config(**fields)
    streamed = compress_checkpoint(folder, folder / "calib.pt", config, tmp_path / "streamed")
    model = load_model(str(folder)).model
    whole = compress(model, folder / "calib.pt", config)
    save_shared(model, whole.plan, tmp_path / "whole")

    assert [c.strategy for c in streamed.candidates] == [c.strategy for c in whole.candidates]
    for a, b in zip(streamed.candidates, whole.candidates, strict=True):
        assert _rel(a.measured, b.measured) < 1e-6, (a, b)
        assert _rel(a.predicted, b.predicted) < 1e-6
    assert streamed.plan.groups == whole.plan.groups and streamed.chosen == whole.chosen
    assert _rel(streamed.measured_loss_change, whole.measured_loss_change) < 1e-6
    assert streamed.unique_params == whole.unique_params
    ours, theirs = load_file(tmp_path / "streamed" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype == torch.float64
        torch.testing.assert_close(ours[name], t, rtol=1e-9, atol=1e-9 * float(t.abs().max()))
    plan_s = json.loads((tmp_path / "streamed" / "plan.json").read_text())
    plan_w = json.loads((tmp_path / "whole" / "plan.json").read_text())
    assert plan_s["aliases"] == plan_w["aliases"] and plan_s["aliases"]
    assert plan_s["unique_params"] == plan_w["unique_params"]
    assert streamed.problem.source["streamed"] is True
    assert {"statistics", "choice", "held_out", "save"} <= set(streamed.problem.source["seconds"])


def test_the_saved_model_loads_tied_and_gives_the_in_memory_outputs(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _write(tmp_path / "m", "llama")
    config = _config()
    compress_checkpoint(folder, folder / "calib.pt", config, tmp_path / "out")
    model = load_model(str(folder)).model
    compress(model, folder / "calib.pt", config)
    # eager attention, as load_model builds it (fused attention in float64 differs at 1e-6)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), attn_implementation="eager").double()
    plan = load_shared(fresh, tmp_path / "out")
    tied = [g for g in plan.groups if len(g) > 1]
    params = dict(fresh.named_parameters(remove_duplicate=False))
    assert all(params[g[0]].data_ptr() == params[n].data_ptr() for g in tied for n in g)
    ids = random_tokens(TINY["vocab_size"], 3, 12, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model.double()(ids).logits, rtol=1e-7, atol=1e-9)


def test_a_bfloat16_checkpoint_is_compressed_and_saved_in_bfloat16(tmp_path):
    folder = _write(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    report = compress_checkpoint(folder, folder / "calib.pt", _config(dtype="auto", kfac={"rank": 8}), tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert report.problem.source["dtype"] == "bfloat16"
    assert report.measured_loss_change is not None and report.measured_loss_change >= 0
    assert abs(report.params_ratio - 0.7) < 0.05
    assert min(c.measured for c in report.candidates) == next(
        c.measured for c in report.candidates if c.strategy == report.chosen)


@pytest.mark.parametrize(("fields", "match"), [
    ({"scheme": "basis"}, "scheme='tie'"),
    ({"scheme": "auto"}, "scheme='tie'"),
    ({"curvature_samples": 4}, "curvature-samples"),
    ({"merge": "curvature"}, "layerwise"),
    ({"backend": "projected"}, "whole model"),
])
def test_what_the_streamed_path_cannot_do_is_refused_before_any_work(tmp_path, fields, match):
    folder = _write(tmp_path / "m", "llama")
    with pytest.raises(BackendError, match=match):
        compress_checkpoint(folder, folder / "calib.pt", _config(**fields), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_mean_merge_streams_too(tmp_path):
    folder = _write(tmp_path / "m", "llama")
    config = _config(merge="mean")
    streamed = compress_checkpoint(folder, folder / "calib.pt", config, tmp_path / "out")
    model = load_model(str(folder)).model
    whole = compress(model, folder / "calib.pt", config)
    assert streamed.plan.groups == whole.plan.groups
    assert all(_rel(a.measured, b.measured) < 1e-6 for a, b in zip(streamed.candidates, whole.candidates, strict=True))


def _stats(x: torch.Tensor, rank: int | None, oversample: int) -> FactorStats:
    s = new_stats(x.shape[1], rank=rank, oversample=oversample, seed=3, dtype=torch.float64, device="cpu")
    s.add_inputs(x)
    return s


def test_a_sketch_of_low_rank_inputs_gives_the_exact_covariance_and_merge():
    gen = torch.Generator().manual_seed(0)
    dim, true_rank = 40, 6
    basis = torch.randn(true_rank, dim, generator=gen, dtype=torch.float64)
    xs = {n: torch.randn(50, true_rank, generator=gen, dtype=torch.float64) @ basis for n in "ab"}
    whole = {n: _stats(x, None, 0) for n, x in xs.items()}
    sketch = {n: _stats(x, 8, 8) for n, x in xs.items()}  # 16 columns > the inputs' rank: Nyström is exact
    for n in xs:
        torch.testing.assert_close(covariance(sketch[n], 8), covariance(whole[n], None), rtol=1e-8, atol=1e-8)
    weights = {n: torch.randn(5, dim, generator=gen, dtype=torch.float64) for n in xs}
    want = layerwise_merge([weights[n] for n in "ab"], [xs[n].T @ xs[n] / 50 for n in "ab"], damping=0.01)
    got = merged_value(("a", "b"), weights.__getitem__, Merge.layerwise, sketch, rank=8, damping=0.01)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_statistics_of_the_other_samples_are_the_difference_of_sums():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 12, generator=gen, dtype=torch.float64)
    total, part, rest = _stats(x, None, 0), _stats(x[:10], None, 0), _stats(x[10:], None, 0)
    got = difference(total, part)
    assert got.tokens == 20
    torch.testing.assert_close(covariance(got, None), covariance(rest, None))


def test_the_streamed_writer_writes_what_safetensors_reads(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, 2, dtype=torch.float64), "d": torch.zeros(0, 3)}
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", entries, tensors.__getitem__, {"k": "v"})
    back = load_file(tmp_path / "x.safetensors")
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="header says"):
        write_safetensors(tmp_path / "y.safetensors", [("a", (2, 2), torch.float32)], lambda _: torch.zeros(3),
                          {})
    assert not (tmp_path / "y.safetensors").exists()


def test_cli_compresses_a_decoder_checkpoint_streamed_and_reuses_the_statistics(tmp_path, capsys):
    from geoshare.cli import main

    folder = _write(tmp_path / "m", "llama")
    args = ["compress", "--model", str(folder), "--data", str(folder / "calib.pt"), "--ratio", "0.7", "--quiet",
            "--top", "2", "--normalized-top", "1", "--per-pattern", "1", "--batch-size", "4",
            "--stats-cache", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    problem = json.loads((tmp_path / "a" / "problem.json").read_text())
    assert problem["source"]["streamed"] is True and problem["source"]["backend"] == "kfac"
    assert problem["source"]["statistics_cached"] is False
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["measured_loss_change"] is not None and (tmp_path / "a" / "model.safetensors").is_file()
    assert main([*args[:6], "0.5", *args[7:], "--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "b" / "problem.json").read_text())
    assert again["source"]["statistics_cached"] is True  # another ratio: no new pass over the model
    assert json.loads((tmp_path / "b" / "report.json").read_text())["params_ratio"] < report["params_ratio"]


def test_the_low_rank_merge_solves_with_the_factors_it_is_given():
    """Full-rank inputs, a rank-4 sketch: the merge without d x d matrices equals the dense solve with
    the same (low-rank plus bulk) covariances."""
    gen = torch.Generator().manual_seed(2)
    xs = {n: torch.randn(80, 30, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 30, dtype=torch.float64)
          for n in "abc"}
    sketch = {n: _stats(x, 4, 4) for n, x in xs.items()}
    weights = {n: torch.randn(7, 30, generator=gen, dtype=torch.float64) for n in xs}
    want = layerwise_merge([weights[n] for n in "abc"], [covariance(sketch[n], 4) for n in "abc"], damping=0.05)
    got = merged_value(("a", "b", "c"), weights.__getitem__, Merge.layerwise, sketch, rank=4, damping=0.05)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_a_compress_that_cannot_fit_is_refused_with_its_estimate(tmp_path):
    from hessian_worker.errors import MemoryBudgetError

    folder = _write(tmp_path / "m", "llama")
    with pytest.raises(MemoryBudgetError, match="streamed compress needs about .*choice and tie"):
        compress_checkpoint(folder, folder / "calib.pt", _config(), tmp_path / "out", memory_limit_gb=1e-6)
    assert not (tmp_path / "out").exists()


def test_a_large_model_is_saved_in_shards_with_an_index_and_loads_the_same(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hessian_worker.llm import analyze as llm_analyze
    from hessian_worker.llm.save import save_streamed

    folder = _write(tmp_path / "m", "llama")
    report = compress_checkpoint(folder, folder / "calib.pt", _config(), tmp_path / "one")
    opened = llm_analyze.open_checkpoint(folder, folder / "calib.pt", _config().analyze_config("float64"))
    one = load_file(tmp_path / "one" / "model.safetensors")
    # the same tensors through the sharded writer (the merged values as saved in one file)
    save_streamed(opened.decoder, report.plan, lambda c: one[c[0]], tmp_path / "one", shard_bytes=20_000)
    shards = sorted((tmp_path / "one").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "one" / "model.safetensors").exists()
    index = json.loads((tmp_path / "one" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(one) and {Path(f).name for f in index["weight_map"].values()} == {
        s.name for s in shards}
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), attn_implementation="eager").double()
    load_shared(fresh, tmp_path / "one")
    state = fresh.state_dict()
    assert all(torch.equal(state[k], t) for k, t in one.items())
    shards[0].unlink()
    with pytest.raises(PlanError, match="missing"):
        load_shared(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).double(), tmp_path / "one")
