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
