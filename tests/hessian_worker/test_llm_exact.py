"""Exact GGN pair costs of a decoder streamed block by block: the in-memory exact backend's costs
and plans, with padded batches, chunks whose directions join the sweep at later blocks, and the CLI
routing ``--backend exact`` on a decoder directory to the streamed path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hessian_worker import AnalyzeConfig, analyze
from hessian_worker.errors import BackendError
from hessian_worker.llm import analyze_checkpoint
from hessian_worker.llm.synthetic import (
    SHAPES,
    decoder_config,
    random_tokens,
    write_random_checkpoint,
)
from solver import SolveConfig, solve

ARCHS = ("llama", "mistral", "qwen2")
VOCAB = SHAPES["tiny"]["vocab_size"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exact")
    out = {}
    for arch in ARCHS:
        folder = root / arch
        # small shards: a block's tensors span files, as in a real sharded checkpoint
        write_random_checkpoint(decoder_config(arch, **SHAPES["tiny"]), folder, dtype=torch.float32,
                                shard_bytes=40_000, std=0.2)
        # 6 samples in batches of 4: unequal batch weights
        torch.save(random_tokens(VOCAB, 6, 10, seed=1), folder / "calib.pt")
        out[arch] = folder
    return out


@pytest.fixture(scope="module")
def whole_costs() -> dict:
    """In-memory problems shared between tests (the slow side of every comparison)."""
    return {}


def _config(**fields) -> AnalyzeConfig:
    base = {"backend": "exact", "dtype": "float64", "batch_size": 4, "progress": False}
    return AnalyzeConfig(**{**base, **fields})


def _matrix(matrix) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in matrix])


def _assert_same(streamed: np.ndarray, whole: np.ndarray) -> None:
    assert np.array_equal(np.isnan(streamed), np.isnan(whole))
    finite = ~np.isnan(whole)
    assert np.nanmax(whole) > 0
    np.testing.assert_allclose(streamed[finite], whole[finite], rtol=1e-6, atol=1e-12 * np.nanmax(whole))


def _padded() -> dict[str, torch.Tensor]:
    ids = random_tokens(VOCAB, 6, 10, seed=4)
    mask = torch.ones_like(ids)
    for row, length in enumerate([10, 6, 3, 10, 8, 5]):
        mask[row, length:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["pairwise", "assignment"])
def test_streamed_exact_costs_and_plan_equal_the_whole_model(checkpoints, whole_costs, arch, kind):
    folder = checkpoints[arch]
    config = _config(kind=kind)
    streamed = analyze_checkpoint(folder, folder / "calib.pt", config)
    whole = whole_costs[arch, kind] = analyze(str(folder), folder / "calib.pt", config)
    _assert_same(_matrix(streamed.costs.matrix), _matrix(whole.costs.matrix))
    assert streamed.source["streamed"] is True and streamed.source["backend"] == "exact"
    solve_config = SolveConfig(max_params_ratio=0.75, time_limit_s=10, seed=0)
    assert solve(streamed, solve_config).coloring == solve(whole, solve_config).coloring


@pytest.mark.parametrize("kind", ["pairwise", "assignment"])
def test_padded_batches_and_directions_joining_later_blocks(checkpoints, kind):
    """Right-padded samples (the KL's masked rows) and chunks of 3 directions, so chunks mix pairs
    whose tangents start at different blocks."""
    folder = checkpoints["mistral"]
    config = _config(kind=kind, chunk=3)
    streamed = analyze_checkpoint(folder, _padded(), config)
    whole = analyze(str(folder), _padded(), config)
    _assert_same(_matrix(streamed.costs.matrix), _matrix(whole.costs.matrix))


def test_cli_streams_backend_exact_on_a_decoder_directory(checkpoints, whole_costs, tmp_path, capsys):
    from geoshare.cli import main

    folder = checkpoints["qwen2"]
    out = tmp_path / "problem.json"
    code = main(["analyze", "--model", str(folder), "--data", str(folder / "calib.pt"), "--backend", "exact",
                 "--dtype", "float64", "--batch-size", "4", "--quiet", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    problem = json.loads(out.read_text())
    assert problem["source"]["streamed"] is True and problem["source"]["backend"] == "exact"
    whole = whole_costs.get(("qwen2", "pairwise")) or analyze(str(folder), folder / "calib.pt", _config())
    _assert_same(_matrix(problem["costs"]["matrix"]), _matrix(whole.costs.matrix))


def test_streamed_exact_refuses_the_full_hessian(checkpoints):
    folder = checkpoints["llama"]
    with pytest.raises(BackendError, match="curvature='ggn'"):
        analyze_checkpoint(folder, folder / "calib.pt", _config(curvature="hessian"))


def test_float32_blocks_take_forward_mode_through_fused_attention(checkpoints, whole_costs):
    """Below float64 the blocks run SDPA attention, whose fused CPU kernel has no forward-mode rule:
    the math kernel is used, and float32 costs agree with the float64 ones to float32 precision."""
    folder = checkpoints["llama"]
    streamed = analyze_checkpoint(folder, folder / "calib.pt", _config(dtype="float32"))
    whole = whole_costs.get(("llama", "pairwise")) or analyze(str(folder), folder / "calib.pt", _config())
    a, b = _matrix(streamed.costs.matrix), _matrix(whole.costs.matrix)
    finite = ~np.isnan(b)
    assert streamed.source["dtype"] == "float32"
    np.testing.assert_allclose(a[finite], b[finite], rtol=1e-4, atol=1e-7 * np.nanmax(b))


def test_streamed_compress_still_refuses_exact(checkpoints, tmp_path):
    """Streamed compression prices from its K-FAC statistics: backend exact there is refused, never
    silently priced by another cost model."""
    from hessian_worker.llm import compress_checkpoint
    from hessian_worker.pipeline import CompressConfig

    folder = checkpoints["llama"]
    with pytest.raises(BackendError, match="'exact'"):
        compress_checkpoint(folder, folder / "calib.pt", CompressConfig(ratio=0.75, backend="exact"), tmp_path / "out")
