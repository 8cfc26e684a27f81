"""The torch side of the configs: a config's device and seeded generator, a DType's torch.dtype.

The configs themselves (AnalyzeConfig, KFACOptions, Backend, DType, ...) are defined torch-free
in hessian_worker.options and re-exported here, so ``hessian_worker.config.AnalyzeConfig`` is
the same class.
"""

from __future__ import annotations

import torch

from hessian_worker.options import AnalyzeConfig, Backend, DType, KFACOptions

__all__ = ["AnalyzeConfig", "Backend", "DType", "KFACOptions", "config_where", "generator", "torch_device", "torch_dtype"]


def torch_dtype(dtype: DType) -> torch.dtype | None:
    """The torch dtype of ``dtype``; None for ``auto`` (keep the model's)."""
    return None if dtype is DType.auto else getattr(torch, dtype.value)


def torch_device(config: AnalyzeConfig) -> torch.device:
    """The device of a config's ``device`` field: ``auto`` is CUDA when available, else CPU."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def generator(config: AnalyzeConfig) -> torch.Generator:
    """The one seeded source of randomness (CPU, so a seed means the same on every device)."""
    return torch.Generator().manual_seed(config.seed)


def config_where(config: AnalyzeConfig, tensor: torch.Tensor) -> AnalyzeConfig:
    """``config`` on ``tensor``'s device, computing in float64 when it is float64 and float32 otherwise:
    statistics are measured where the weights already live, never in half precision."""
    return AnalyzeConfig.model_validate({  # model_copy would skip validation of the enums
        **config.model_dump(), "device": str(tensor.device),
        "dtype": "float64" if tensor.dtype == torch.float64 else "float32"})
