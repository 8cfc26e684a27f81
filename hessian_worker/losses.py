"""Calibration losses on a model's output.

Self-distillation compares the model with its own reference outputs, so the gradient is zero at the
reference and the Hessian there is the Gauss-Newton matrix (PSD): predicted costs are >= 0.
Every loss here is a mean over its batch; batches are weighted by their sample counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from hessian_worker.errors import BackendError
from hessian_worker.options import DistillLoss

TaskLoss = Callable[[Tensor, Mapping[str, Tensor]], Tensor]
"""A user task loss: (extracted output, batch) -> scalar mean over the batch."""


def _get(out: Any, key: str) -> Tensor | None:
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None)


def extract_output(out: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, bool]:
    """(output tensor, is_logits): logits, or the mean-pooled last hidden state, or the tensor itself.

    Mean pooling over the attention mask is what sentence-embedding encoders (MiniLM) serve, so it
    is the output whose change matters for them.
    """
    logits = _get(out, "logits")
    if logits is not None:
        return logits, True
    hidden = _get(out, "last_hidden_state")
    if hidden is not None:
        mask = batch.get("attention_mask")
        if mask is None:
            return hidden.mean(dim=1), False
        w = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0), False
    if isinstance(out, Tensor):
        return out, False
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0], False
    raise BackendError(
        f"cannot find an output tensor in a {type(out).__name__}; return a tensor, logits, or last_hidden_state"
    )


def mse(y: Tensor, target: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean squared error over all elements."""
    return (y - target).pow(2).mean()


def row_mask(y: Tensor, batch: Mapping[str, Tensor]) -> Tensor | None:
    mask = batch.get("attention_mask")
    if mask is not None and y.dim() == 3 and tuple(mask.shape) == tuple(y.shape[:2]):
        return mask.reshape(-1).to(y.dtype)
    return None


def kl(y: Tensor, target: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """KL(p_ref || p) per row (token), averaged over real (unpadded) rows."""
    logp = F.log_softmax(y.reshape(-1, y.shape[-1]), dim=-1)
    logq = F.log_softmax(target.reshape(-1, y.shape[-1]), dim=-1)
    per_row = (logq.exp() * (logq - logp)).sum(dim=-1)
    mask = row_mask(y, batch)
    if mask is None:
        return per_row.mean()
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)


def cosine(y: Tensor, target: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """1 - cosine similarity per row (sample, or token for 3-D outputs), averaged over real rows.

    Sentence-embedding models are used through cosine similarity, so a change of norm that MSE
    charges is free here; at the reference the loss is 0 with zero gradient (GGN curvature).
    """
    per_row = 1.0 - F.cosine_similarity(y.reshape(-1, y.shape[-1]), target.reshape(-1, y.shape[-1]), dim=-1, eps=1e-8)
    mask = row_mask(y, batch)
    if mask is None:
        return per_row.mean()
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)


def resolve_distill(kind: DistillLoss, is_logits: bool) -> Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]:
    if kind is DistillLoss.auto:
        kind = DistillLoss.kl if is_logits else DistillLoss.mse
    return {DistillLoss.kl: kl, DistillLoss.mse: mse, DistillLoss.cosine: cosine}[kind]

