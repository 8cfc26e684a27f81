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
