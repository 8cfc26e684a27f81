"""Models and losses the evaluate and model-card tests name as ``module:factory`` specs (this
folder is on sys.path, see conftest.py): a tiny untrained copy of the bench's byte-level GPT."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.tasks.gpt import GPT, GPTConfig

GPT_CONFIG = GPTConfig(blocks=4, d_model=32, heads=4, context=16)


def tiny_gpt() -> nn.Module:
    """The bench's GPT (``bench/tasks/gpt.py``) at 4 blocks of width 32, seeded, float64."""
    torch.manual_seed(0)
    return GPT(GPT_CONFIG).double().eval()


def next_byte_loss(logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """The GPT's training loss as a task loss: next-byte cross-entropy over every position."""
    ids = batch["input"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
