"""The measured choice of a streamed decoder: each candidate plan's real loss change, block by block.

One reference pass runs the original blocks over the scoring samples and keeps every block's
input (on the device when they fit, else on the host) and the last block's output; it can add the
layers' input sums on the way (the merge statistics of those samples, at no extra pass). Each
candidate then starts at the first block it changes, from the reference's input there (the blocks
before are the original's), runs the rest with its merged weights substituted
(``functional_call``: the loaded block is never modified) and is scored against the reference's
outputs with the distillation loss, batch weights and padding masks of the in-memory ``Objective``.
A class's merged tensor is formed when its first member's block is reached and dropped after its
last, so a candidate holds only the classes that span the current block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from hessian_worker.curvature.kfac import FactorStats, linear_hooks, new_stats
from hessian_worker.data import Calibration, batch_size
from hessian_worker.discovery import LayerInfo
from hessian_worker.llm.decoder import Decoder, run_block
from hessian_worker.llm.stream import block_modules, keep_device, layers_by_block
from hessian_worker.losses import DistillLoss, resolve_distill, row_mask

Groups = Sequence[Sequence[str]]
MergedOf = Callable[[tuple[str, ...]], Tensor]
"""A class (its names, in plan order) -> its shared [out, in] weight."""

_LOSS_ROWS = 2048  # tokens whose vocabulary-wide logits are formed at once when scoring


@dataclass
class ReferenceRun:
    """The original model over some samples: each block's input per batch, the last block's output,
    and what the loss needs (keyword arguments, attention masks, batch weights)."""

    inputs: list[list[Tensor]]  # [block][batch]
    outputs: list[Tensor]  # [batch]
    kwargs: list[dict[str, Any]]
    masks: list[Tensor | None]
    weights: list[float]


@dataclass(frozen=True)
class InputStatsSpec:
    """Which input sums to collect on the reference pass, and their sketch (as the analysis's)."""

    layers: Sequence[LayerInfo]
    rank: int | None
    oversample: int
    seed: int
    reduce: bool = False


def reference_run(decoder: Decoder, data: Calibration, *, stats: InputStatsSpec | None = None,
                  batches: Sequence[int] | None = None,
                  progress: bool = False) -> tuple[ReferenceRun, dict[str, FactorStats]]:
    """The reference pass over ``data`` (and the input sums of ``stats.layers`` on it).

    ``batches``: the batches this process runs (None: all); their weights stay shares of all of
    ``data``, so the losses and sums are this process's part of the whole, to be added up with the
    other processes' (torch.distributed)."""
    own = [data.batches[b] for b in (range(len(data.batches)) if batches is None else sorted(set(batches)))]
    hidden, kwargs = [], []
    for batch in own:
        h, kw = decoder.inputs(batch)
        hidden.append(h)
        kwargs.append(kw)
    masks = [b.get("attention_mask") for b in own]
    row_bytes = sum(h.numel() * h.element_size() for h in hidden)
    keep_on = keep_device(decoder, row_bytes * decoder.num_blocks)
    names = layers_by_block(decoder, stats.layers) if stats is not None else {}
    sums: dict[str, FactorStats] = {}
    current: dict[str, Tensor | None] = {"mask": None}
    inputs: list[list[Tensor]] = []
    for i in tqdm(range(decoder.num_blocks), desc="reference (blocks)", unit="block", disable=not progress,
                  leave=False):
        inputs.append([h.to(keep_on) for h in hidden])
        block = decoder.load_block(i)
        handles = []
        if stats is not None and names.get(i):
            modules = block_modules(block, names[i])
            for full, (module, _) in modules.items():
                sums[full] = new_stats(int(module.weight.shape[1]), rank=stats.rank, oversample=stats.oversample,
                                       seed=stats.seed, dtype=decoder.dtype, device=decoder.device)
            handles = linear_hooks(modules, sums, lambda: current["mask"], inputs=True, outputs=False,
                                   reduce=stats.reduce)
        try:
            with torch.no_grad():
                for b, h in enumerate(hidden):
                    current["mask"] = None if masks[b] is None else masks[b].to(decoder.device)
                    hidden[b] = run_block(block, h, kwargs[b])
        finally:
            for handle in handles:
                handle.remove()
            decoder.release(block)
    total = sum(data.sizes)
    return ReferenceRun(inputs, hidden, kwargs, masks, [batch_size(b) / total for b in own]), sums


def plan_losses(decoder: Decoder, reference: ReferenceRun, plans: Sequence[Groups], merged: MergedOf, *,
                distill: DistillLoss = DistillLoss.auto, progress: bool = False) -> list[float]:
    """Each plan's loss change against the reference (the in-memory ``measure_plans`` figure)."""
    return [plan_loss(decoder, reference, groups, merged, distill=distill)
            for groups in tqdm(plans, desc="candidates (streamed)", unit="plan", disable=not progress, leave=False)]


def plan_loss(decoder: Decoder, reference: ReferenceRun, groups: Groups, merged: MergedOf, *,
              distill: DistillLoss = DistillLoss.auto) -> float:
    """One plan's loss change: its blocks from the first one it changes, then the head."""
    if not reference.outputs:  # a process of a distributed job without batches here adds nothing
        return 0.0
    classes = [tuple(g) for g in groups if len(g) >= 2]
    block_of = {name: _block_index(decoder, name) for c in classes for name in c}
    last = {c: max(block_of[n] for n in c) for c in classes}
    start = min(block_of.values(), default=decoder.num_blocks)
    hidden = [h.to(decoder.device) for h in reference.inputs[start]] if start < decoder.num_blocks else \
        list(reference.outputs)
    live: dict[tuple[str, ...], Tensor] = {}
    with torch.no_grad():
        for i in range(start, decoder.num_blocks):
            prefix = decoder.block_prefix(i)
            block = decoder.load_block(i)
            subs: dict[str, Tensor] = {}
            for c in classes:
                here = [n for n in c if block_of[n] == i]
                if not here:
                    continue
                if c not in live:
                    live[c] = merged(c).to(device=decoder.device, dtype=decoder.dtype)
                subs.update({n[len(prefix):]: live[c] for n in here})
            try:
                for b, h in enumerate(hidden):
                    out = functional_call(block, subs, (h,), reference.kwargs[b])
                    hidden[b] = out[0] if isinstance(out, tuple) else out
            finally:
                decoder.release(block)
            for c in [c for c in live if last[c] == i]:
                del live[c]
        return sum(w * distill_loss(decoder, h, reference.outputs[b], reference.masks[b], distill)
                   for b, (h, w) in enumerate(zip(hidden, reference.weights, strict=True)))


def distill_loss(decoder: Decoder, hidden: Tensor, target: Tensor, mask: Tensor | None, distill: DistillLoss) -> float:
    """The distillation loss of one batch at the head, as the in-memory ``Objective`` computes it on
    the whole model's logits (a mean over real tokens), formed a few samples at a time so the
    vocabulary-wide logits never exist for the whole batch; in float32 at least."""
    loss_fn = resolve_distill(distill, decoder.is_logits)
    dtype = torch.float64 if decoder.dtype == torch.float64 else torch.float32
    chunk = max(1, _LOSS_ROWS // max(hidden.shape[1], 1))
    total, count = 0.0, 0.0
    for s in range(0, hidden.shape[0], chunk):
        rows = slice(s, s + chunk)
        part = None if mask is None else mask[rows].to(decoder.device)
        y = decoder.output(hidden[rows], part).to(dtype)
        t = decoder.output(target[rows].to(decoder.device), part).to(dtype)
        batch = {} if part is None else {"attention_mask": part}
        weight = _rows_weight(loss_fn, y, batch)
        total += float(loss_fn(y, t, batch)) * weight
        count += weight
    return total / max(count, 1.0)


def _rows_weight(loss_fn: Callable[..., Tensor], y: Tensor, batch: dict[str, Tensor]) -> float:
    """What one chunk's mean loss stands for in the batch's mean: its elements (mse), else its real
    rows (tokens of a per-token output under the mask, or samples)."""
    if loss_fn.__name__ == "mse":
        return float(y.numel())
    mask = row_mask(y, batch)
    return float(mask.sum()) if mask is not None else float(y.reshape(-1, y.shape[-1]).shape[0])


def _block_index(decoder: Decoder, name: str) -> int:
    parts = name.split(".")
    prefix = decoder.block_prefix(0).split(".")[:-2]
    if parts[: len(prefix)] != prefix:
        raise ValueError(f"{name!r} is not inside a decoder block; streamed sharing ties block layers only")
    return int(parts[len(prefix)])

