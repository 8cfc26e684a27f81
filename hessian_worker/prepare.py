"""prepare(model, data, config): the model on the config's device and dtype, and its calibration there.

Every stage that runs the model on calibration data starts here (costs of every scheme, the
merges, the measured choice, healing), so it sits below them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from hessian_worker.config import AnalyzeConfig, torch_device, torch_dtype
from hessian_worker.data import Calibration, DataSource, load_calibration
from hessian_worker.models import load_model


@dataclass
class Prepared:
    """A model on the config's device and dtype, with its calibration batches there too."""

    model: nn.Module
    data: Calibration
    tokenizer: Any | None


def prepare(model: nn.Module | str, data: DataSource, config: AnalyzeConfig, *,
            tokenizer: Any | None = None) -> Prepared:
    """Loads a spec if given, moves the model (in place) to the device and dtype, reads the data."""
    if isinstance(model, str):
        loaded = load_model(model)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    device, dtype = torch_device(config), torch_dtype(config.dtype)
    model.to(device=device, dtype=dtype)
    model.eval()
    calib = load_calibration(data, tokenizer=tokenizer, samples=config.samples, batch_size=config.batch_size,
                             seed=config.seed, max_length=config.max_length)
    return Prepared(model, calib.to(device, dtype), tokenizer)
