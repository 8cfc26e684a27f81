"""CUDA agrees with CPU (runs only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch
from hw_cases import mlp_data, tiny_mlp

from hessian_worker import AnalyzeConfig, analyze

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["exact", "projected", "diagonal", "layerwise"])
def test_cuda_costs_match_cpu(backend: str) -> None:
    common = {"backend": backend, "dtype": "float64", "progress": False, "rank": 48, "probes": 8}
    cpu = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(device="cpu", **common))
    gpu = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(device="cuda", **common))
    torch.testing.assert_close(torch.tensor(gpu.costs.matrix), torch.tensor(cpu.costs.matrix), rtol=1e-6, atol=1e-12)


def test_cuda_sign_sketch_and_pair_route_match_cpu() -> None:
    """Five layers in a family (dim 80, a sketch of 10): the sign test vectors and the per-family
    pair route, both drawn and computed the same way on the GPU."""
    from hw_cases import TinyMLP

    def model() -> TinyMLP:
        torch.manual_seed(3)
        return TinyMLP(depth=5).double().eval()

    common = {"backend": "projected", "dtype": "float64", "progress": False, "rank": 6}
    cpu = analyze(model(), mlp_data(), AnalyzeConfig(device="cpu", **common))
    gpu = analyze(model(), mlp_data(), AnalyzeConfig(device="cuda", **common))
    torch.testing.assert_close(torch.tensor(gpu.costs.matrix), torch.tensor(cpu.costs.matrix), rtol=1e-6, atol=1e-12)


def test_cuda_kfac_in_memory_matches_cpu() -> None:
    common = {"backend": "kfac", "dtype": "float64", "progress": False, "kfac": {"rank": 2, "oversample": 1}}
    cpu = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(device="cpu", **common))
    gpu = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(device="cuda", **common))
    torch.testing.assert_close(torch.tensor(gpu.costs.matrix), torch.tensor(cpu.costs.matrix), rtol=1e-6, atol=1e-12)


def test_cuda_streamed_decoder_matches_cpu(tmp_path) -> None:
    """A tiny sharded LLaMA streamed block by block on the GPU: the same costs as on the CPU."""
    from hessian_worker.llm import analyze_checkpoint
    from hessian_worker.llm.synthetic import (
        SHAPES,
        decoder_config,
        random_tokens,
        write_random_checkpoint,
    )

    write_random_checkpoint(decoder_config("llama", **SHAPES["tiny"]), tmp_path, dtype=torch.float32,
                            shard_bytes=40_000, std=0.2)
    data = random_tokens(SHAPES["tiny"]["vocab_size"], 10, 12, seed=1)
    common = {"backend": "kfac", "dtype": "float64", "progress": False, "batch_size": 4, "kfac": {"rank": 8}}
    cpu = analyze_checkpoint(tmp_path, data, AnalyzeConfig(device="cpu", **common))
    gpu = analyze_checkpoint(tmp_path, data, AnalyzeConfig(device="cuda", **common))
    as_tensor = lambda p: torch.tensor([[float("nan") if v is None else v for v in r] for r in p.costs.matrix])  # noqa: E731
    torch.testing.assert_close(as_tensor(gpu), as_tensor(cpu), rtol=1e-6, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", ["exact", "kfac"])
def test_cuda_streamed_compress_matches_cpu(tmp_path, backend: str) -> None:
    """A tiny LLaMA compressed block by block on the GPU (exact costs streamed, or kfac with
    block-wise healing): the same plan, measured losses and saved tensors as on the CPU."""
    from safetensors.torch import load_file

    from hessian_worker.llm import analyze_checkpoint, compress_checkpoint
    from hessian_worker.llm.synthetic import (
        SHAPES,
        decoder_config,
        random_tokens,
        write_random_checkpoint,
    )
    from hessian_worker.pipeline import CompressConfig

    model = tmp_path / "model"
    write_random_checkpoint(decoder_config("llama", **SHAPES["tiny"]), model, dtype=torch.float32,
                            shard_bytes=40_000, std=0.2)
    data = random_tokens(SHAPES["tiny"]["vocab_size"], 16, 12, seed=1)
    if backend == "exact":
        common = {"backend": "exact", "dtype": "float64", "progress": False, "batch_size": 4}
        cpu = analyze_checkpoint(model, data, AnalyzeConfig(device="cpu", **common))
        gpu = analyze_checkpoint(model, data, AnalyzeConfig(device="cuda", **common))
        as_tensor = lambda p: torch.tensor([[float("nan") if v is None else v for v in r] for r in p.costs.matrix])  # noqa: E731
        torch.testing.assert_close(as_tensor(gpu), as_tensor(cpu), rtol=1e-6, atol=1e-12, equal_nan=True)
        return
    common = {"ratio": 0.7, "backend": "kfac", "dtype": "float64", "progress": False, "batch_size": 4, "top": 3,
              "normalized_top": 1, "per_pattern": 1, "heal_steps": 6, "heal_lr": 3e-3, "kfac": {"rank": 8}}
    cpu = compress_checkpoint(model, data, CompressConfig(device="cpu", **common), tmp_path / "cpu")
    gpu = compress_checkpoint(model, data, CompressConfig(device="cuda", **common), tmp_path / "gpu")
    assert gpu.plan.groups == cpu.plan.groups
    for a, b in zip(gpu.candidates, cpu.candidates, strict=True):
        assert abs(a.measured - b.measured) <= 1e-6 * abs(b.measured)
    ours, theirs = load_file(tmp_path / "gpu" / "model.safetensors"), load_file(tmp_path / "cpu" / "model.safetensors")
    for key, t in theirs.items():
        torch.testing.assert_close(ours[key], t, rtol=1e-6, atol=1e-8)
