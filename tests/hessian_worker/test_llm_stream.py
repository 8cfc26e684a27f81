"""Decoder LLMs streamed block by block: the same costs and plans as the whole model in memory,
GQA families, dtypes, the statistics cache, the memory check, and clear errors for broken
checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hessian_worker import AnalyzeConfig, analyze
from hessian_worker.errors import MemoryBudgetError
from hessian_worker.llm import CheckpointError, analyze_checkpoint, is_streamable
from hessian_worker.llm import analyze as llm_analyze
from hessian_worker.llm.synthetic import (
    SHAPES,
    decoder_config,
    random_tokens,
    write_random_checkpoint,
)
from solver import SolveConfig, solve

ARCHS = ("llama", "mistral", "qwen2")


def _write(folder: Path, arch: str, dtype: torch.dtype = torch.float32) -> Path:
    config = decoder_config(arch, **SHAPES["tiny"])
    # small shards: every block spans files, as in a real sharded checkpoint
    write_random_checkpoint(config, folder, dtype=dtype, shard_bytes=40_000, std=0.2)
    torch.save(random_tokens(SHAPES["tiny"]["vocab_size"], 10, 12, seed=1), folder / "calib.pt")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {arch: _write(root / arch, arch) for arch in ARCHS}


def _matrix(problem) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in problem.costs.matrix])


def _config(**fields) -> AnalyzeConfig:
    base = {"backend": "kfac", "dtype": "float64", "batch_size": 4, "progress": False, "kfac": {"rank": None}}
    return AnalyzeConfig(**{**base, **fields})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["pairwise", "assignment"])
def test_streamed_costs_and_plan_equal_the_whole_model(checkpoints, arch, kind):
    folder = checkpoints[arch]
    config = _config(kind=kind)
    streamed = analyze_checkpoint(folder, folder / "calib.pt", config)
    whole = analyze(str(folder), folder / "calib.pt", config)
    a, b = _matrix(streamed), _matrix(whole)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    finite = ~np.isnan(b)
    assert np.nanmax(b) > 0
    np.testing.assert_allclose(a[finite], b[finite], rtol=1e-6, atol=1e-12 * np.nanmax(b))
    assert streamed.source["streamed"] is True
    solve_config = SolveConfig(max_params_ratio=0.75, time_limit_s=10, seed=0)
    assert solve(streamed, solve_config).coloring == solve(whole, solve_config).coloring


def test_low_rank_factors_stream_alike(checkpoints):
    folder = checkpoints["llama"]
    config = _config(kfac={"rank": 4, "oversample": 4})
    streamed = analyze_checkpoint(folder, folder / "calib.pt", config)
    whole = analyze(str(folder), folder / "calib.pt", config)
    np.testing.assert_allclose(_matrix(streamed), _matrix(whole), rtol=1e-6)


def test_streamed_layerwise_is_the_layerwise_backend(checkpoints):
    """Without the output factor the streamed form is the in-memory layerwise backend's, exactly."""
    folder = checkpoints["llama"]
    streamed = analyze_checkpoint(folder, folder / "calib.pt", _config(backend="layerwise"))
    whole = analyze(str(folder), folder / "calib.pt", _config(backend="layerwise"))
    np.testing.assert_allclose(_matrix(streamed), _matrix(whole), rtol=1e-6)


def test_gqa_families_are_found_and_tied(checkpoints):
    folder = checkpoints["llama"]
    problem = analyze_checkpoint(folder, folder / "calib.pt", _config())
    shapes = {x.family: x.params for x in problem.layers}
    hidden, heads, kv = SHAPES["tiny"]["hidden_size"], SHAPES["tiny"]["num_attention_heads"], SHAPES["tiny"]["num_key_value_heads"]
    assert len(shapes) == 7 and len(problem.layers) == 7 * SHAPES["tiny"]["num_hidden_layers"]
    assert shapes["self_attn.k_proj.weight"] == hidden * hidden * kv // heads
    assert shapes["self_attn.q_proj.weight"] == hidden * hidden
    plan = solve(problem, SolveConfig(max_params_ratio=0.6, time_limit_s=10, seed=0))
    tied_k = [g for g in plan.groups if len(g) > 1 and "k_proj" in g[0]]
    assert plan.status.value in ("optimal", "feasible") and tied_k


def test_dtype_auto_keeps_the_checkpoint_dtype(tmp_path):
    folder = _write(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    auto = analyze_checkpoint(folder, folder / "calib.pt", _config(dtype="auto", kfac={"rank": 8}))
    assert auto.source["dtype"] == "bfloat16"
    wide = analyze_checkpoint(folder, folder / "calib.pt", _config(dtype="float32", kfac={"rank": 8}))
    assert wide.source["dtype"] == "float32"
    # bfloat16 blocks with float32 statistics rank pairs as the float32 run does
    a, b = _matrix(auto), _matrix(wide)
    finite = ~np.isnan(a)
    assert np.corrcoef(a[finite], b[finite])[0, 1] > 0.98


def test_statistics_are_cached_for_the_next_analysis(checkpoints, tmp_path, monkeypatch):
    folder = checkpoints["llama"]
    first = analyze_checkpoint(folder, folder / "calib.pt", _config(), cache_dir=tmp_path)
    assert list(tmp_path.glob("*/stats.safetensors"))

    def no_pass(*args, **kwargs):
        raise AssertionError("the cached statistics should have been used")

    monkeypatch.setattr(llm_analyze, "stream_factors", no_pass)
    again = analyze_checkpoint(folder, folder / "calib.pt", _config(kind="assignment"), cache_dir=tmp_path)
    assignment = analyze(str(folder), folder / "calib.pt", _config(kind="assignment"))
    np.testing.assert_allclose(_matrix(again), _matrix(assignment), rtol=1e-6)
    assert first.costs.kind.value == "pairwise"
    with pytest.raises(AssertionError, match="cached"):  # other data: a new pass
        analyze_checkpoint(folder, folder / "calib.pt", _config(samples=5), cache_dir=tmp_path)


def test_a_run_that_cannot_fit_is_refused_with_the_estimate(checkpoints):
    folder = checkpoints["llama"]
    with pytest.raises(MemoryBudgetError, match="streamed analysis needs about .* GiB"):
        analyze_checkpoint(folder, folder / "calib.pt", _config(), memory_limit_gb=1e-6)


def test_backends_that_need_the_whole_model_are_refused_when_streaming(checkpoints):
    folder = checkpoints["llama"]
    with pytest.raises(ValueError, match="kfac"):
        analyze_checkpoint(folder, folder / "calib.pt", _config(backend="projected"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_missing_shard_is_named(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        analyze_checkpoint(folder, folder / "calib.pt", _config())


def test_a_config_that_does_not_match_the_weights_is_named(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight.* is \[64, 32\] in the checkpoint but config.json implies \[48, 32\]"):
        analyze_checkpoint(folder, folder / "calib.pt", _config())


def test_a_tensor_missing_from_the_index_is_named(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.down_proj.weight"):
        analyze_checkpoint(folder, folder / "calib.pt", _config())


def test_an_unknown_architecture_is_refused_by_name(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    assert not is_streamable(folder)
    with pytest.raises(CheckpointError, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        analyze_checkpoint(folder, folder / "calib.pt", _config())


def test_cli_streams_a_decoder_checkpoint_by_default(checkpoints, tmp_path, capsys):
    from geoshare.cli import main

    folder = checkpoints["qwen2"]
    out = tmp_path / "problem.json"
    code = main(["analyze", "--model", str(folder), "--data", str(folder / "calib.pt"), "--quiet",
                 "--no-stats-cache", "--kfac-rank", "0", "--dtype", "float64", "--batch-size", "4", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    problem = json.loads(out.read_text())
    assert problem["source"]["streamed"] is True and problem["source"]["backend"] == "kfac"
    whole = analyze(str(folder), folder / "calib.pt", _config())
    got = np.array([[np.nan if v is None else v for v in row] for row in problem["costs"]["matrix"]])
    np.testing.assert_allclose(got, _matrix(whole), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_checkpoint_reads_tensors_and_row_slices_as_safetensors_does(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from hessian_worker.llm.checkpoint import Checkpoint

    tensors = {"a.weight": torch.randn(7, 5).to(dtype), "b.weight": torch.randn(3).to(dtype),
               "empty": torch.zeros(0, 4, dtype=dtype)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path)
    want = load_file(str(tmp_path / "model.safetensors"))
    for name, t in want.items():
        assert checkpoint.dtype(name) == dtype and checkpoint.shape(name) == tuple(t.shape)
        assert torch.equal(checkpoint.tensor(name), t)
    assert torch.equal(checkpoint.rows("a.weight", slice(2, 6)), want["a.weight"][2:6])
    assert torch.equal(checkpoint.rows("a.weight", slice(5, 100)), want["a.weight"][5:])
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-16])  # the last tensor's data is cut
    broken = Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="truncated"):
        for name in want:
            broken.tensor(name)


def test_padded_batches_and_a_gradient_subset_stream_alike(checkpoints):
    """Right-padded samples (attention mask) and an output factor from 5 of 10 samples (a batch cut
    in two): the streamed path takes the same rows, tokens and draws as the whole model."""
    folder = checkpoints["mistral"]
    ids = random_tokens(SHAPES["tiny"]["vocab_size"], 10, 12, seed=4)
    mask = torch.ones_like(ids)
    for row, length in enumerate([12, 7, 12, 3, 9, 12, 5, 12, 10, 8]):
        mask[row, length:] = 0
    data = {"input_ids": ids * mask, "attention_mask": mask}
    config = _config(kfac={"rank": None, "gradient_samples": 5})
    streamed = analyze_checkpoint(folder, data, config)
    whole = analyze(str(folder), data, config)
    np.testing.assert_allclose(_matrix(streamed), _matrix(whole), rtol=1e-6)
    everything = analyze(str(folder), data, _config())
    assert not np.allclose(_matrix(everything), _matrix(whole), rtol=1e-3)  # the subset is not all of it


def test_cli_refuses_a_whole_model_backend_that_cannot_fit_and_names_kfac(checkpoints, tmp_path, capsys):
    from geoshare.cli import main

    folder = checkpoints["llama"]
    code = main(["analyze", "--model", str(folder), "--data", str(folder / "calib.pt"), "--backend", "projected",
                 "--memory-limit-gb", "1e-6", "--quiet", "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2 and "holds the whole model" in err and "--backend kfac" in err
    assert not (tmp_path / "p.json").exists()
    # with room, the whole-model backend runs on the same checkpoint
    code = main(["analyze", "--model", str(folder), "--data", str(folder / "calib.pt"), "--backend", "layerwise",
                 "--kfac-rank", "0", "--quiet", "--no-stats-cache", "-o", str(tmp_path / "p.json")])
    assert code == 0 and json.loads((tmp_path / "p.json").read_text())["source"]["streamed"] is True


def test_reduce_approximation_streams_alike(checkpoints):
    folder = checkpoints["llama"]
    ids = random_tokens(SHAPES["tiny"]["vocab_size"], 10, 12, seed=4)
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    data = {"input_ids": ids * mask, "attention_mask": mask}
    config = _config(kfac={"rank": None, "approximation": "reduce"})
    streamed = analyze_checkpoint(folder, data, config)
    whole = analyze(str(folder), data, config)
    np.testing.assert_allclose(_matrix(streamed), _matrix(whole), rtol=1e-6)
    expand = analyze(str(folder), data, _config())
    assert not np.allclose(_matrix(expand), _matrix(whole), rtol=1e-3)
