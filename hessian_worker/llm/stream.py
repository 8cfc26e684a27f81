"""K-FAC statistics of a decoder streamed block by block.

Forward sweep: the calibration batches' hidden states go through one block at a time; hooks add
each linear layer's inputs to its factor sums. With the output factor, every block's input is kept
for the gradient samples (``gradient_batches``; on the device when they fit, else on the host), a
label is drawn per token from the model's own next-token distribution at the head, and a backward
sweep runs the blocks in reverse: each block recomputes its forward from its kept input and
backpropagates the carried gradient, hooks adding each linear layer's output gradients. Weights
never take gradients (only activations do), so the backward costs about one forward of those
samples. The draws are the same, in the same order, as the in-memory ``collect_factors``, so both
give the same statistics. A process of a distributed job runs only its batches (``batches``) and
skips the draws of the others', so each batch gets the draws it gets in one process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hessian_worker.curvature.kfac import (
    FactorStats,
    OutputFactor,
    gradient_batches,
    head_rows,
    linear_hooks,
    new_stats,
    output_gradient_sample,
    skip_output_draws,
)
from hessian_worker.curvature.layerwise import linear_modules
from hessian_worker.data import Calibration
from hessian_worker.discovery import LayerInfo
from hessian_worker.llm.decoder import Decoder, run_block
from hessian_worker.losses import row_mask


def layers_by_block(decoder: Decoder, layers: Sequence[LayerInfo]) -> dict[int, dict[str, str]]:
    """Block -> {name inside the block: full name} of the analysed layers."""
    out: dict[int, dict[str, str]] = {}
    for i in range(decoder.num_blocks):
        prefix = decoder.block_prefix(i)
        out[i] = {x.name[len(prefix):]: x.name for x in layers if x.name.startswith(prefix)}
    return out


def keep_device(decoder: Decoder, nbytes: int) -> torch.device:
    """Where kept block inputs live: the device when they fit in half its free memory, else the host."""
    if decoder.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(decoder.device)
        if nbytes < free // 2:
            return decoder.device
        return torch.device("cpu")
    return decoder.device


def stream_factors(decoder: Decoder, data: Calibration, layers: Sequence[LayerInfo], *, rank: int | None,
                   oversample: int, output: OutputFactor, seed: int, gradient_samples: int | None = None,
                   reduce: bool = False, loss: str = "kl", token_inputs: dict[str, FactorStats] | None = None,
                   batches: Sequence[int] | None = None, progress: bool = False) -> dict[str, FactorStats]:
    """Factor sums of every analysed layer from one forward sweep (and a backward sweep for the
    diagonal output factor) over the decoder's blocks; ``reduce``: per sample (see Approximation;
    a decoder's loss is per token, so ``expand`` is its natural form); ``loss``: the distillation
    loss whose output gradients are sampled (kl on logits). With ``reduce``, ``token_inputs`` (when
    given) is filled with every token's input sums as well: the layerwise merge's covariances, which
    are per token whatever the costs' approximation. ``batches``: the calibration batches this process
    runs (None: all); the sums are then its share, to be added up with the other processes'."""
    names = layers_by_block(decoder, layers)
    backward = output is OutputFactor.diagonal
    stats: dict[str, FactorStats] = {}
    current: dict[str, Tensor | None] = {"mask": None}
    own = list(range(len(data.batches))) if batches is None else sorted(set(batches))
    slot = {b: s for s, b in enumerate(own)}  # batch index -> its place in hidden, kwargs, masks
    masks = [data.batches[b].get("attention_mask") for b in own]
    hidden, kwargs = [], []
    for b in own:
        h, kw = decoder.inputs(data.batches[b])
        hidden.append(h)
        kwargs.append(kw)
    plan = gradient_batches(data, gradient_samples) if backward else []  # every process's, in draw order
    mine = [(slot[b], rows) for b, rows in plan if b in slot]
    row_bytes = hidden[0][0].numel() * hidden[0].element_size() if hidden else 0
    keep_on = keep_device(decoder, sum(rows for _, rows in mine) * row_bytes * decoder.num_blocks)
    kept: list[list[Tensor] | None] = []
    steps = decoder.num_blocks * (2 if backward else 1)
    bar = tqdm(total=steps, desc="blocks (inputs)", unit="block", disable=not progress, leave=False)
    for i in range(decoder.num_blocks):
        block = decoder.load_block(i)
        modules = block_modules(block, names[i])
        for full, (module, transposed) in modules.items():
            stats[full] = new_stats(int(module.weight.shape[0 if transposed else 1]), rank=rank,
                                    oversample=oversample, seed=seed, dtype=decoder.dtype, device=decoder.device)
            if backward:  # zeros + the first sum is that sum; a process without gradient batches adds zeros
                stats[full].b = torch.zeros(int(module.weight.shape[1 if transposed else 0]),
                                            dtype=stats[full].a.dtype, device=decoder.device)
        handles = linear_hooks(modules, stats, lambda: current["mask"], inputs=True, outputs=False, reduce=reduce)
        if reduce and token_inputs is not None:
            for full, (module, transposed) in modules.items():
                token_inputs[full] = new_stats(int(module.weight.shape[0 if transposed else 1]), rank=rank,
                                               oversample=oversample, seed=seed, dtype=decoder.dtype,
                                               device=decoder.device)
            handles += linear_hooks(modules, token_inputs, lambda: current["mask"], inputs=True, outputs=False)
        if backward:
            kept.append([hidden[s][:rows].to(keep_on) for s, rows in mine])
        try:
            with torch.no_grad():
                for b, h in enumerate(hidden):
                    current["mask"] = _on(masks[b], decoder.device)
                    hidden[b] = run_block(block, h, kwargs[b])
        finally:
            for handle in handles:
                handle.remove()
            decoder.release(block)
        bar.update()
    if backward:
        bar.set_description("blocks (output gradients)")
        grads = _head_gradients(decoder, data, hidden, plan, slot, seed, loss)
        hidden.clear()
        plan_kwargs = [_head_kwargs(kwargs[s], rows) for s, rows in mine]
        plan_masks = [None if masks[s] is None else masks[s][:rows] for s, rows in mine]
        for i in reversed(range(decoder.num_blocks)):
            block = decoder.load_block(i)
            modules = block_modules(block, names[i])
            handles = linear_hooks(modules, stats, lambda: current["mask"], inputs=False, outputs=True,
                                   reduce=reduce)
            inputs = kept[i]
            assert inputs is not None
            try:
                for p, h in enumerate(inputs):
                    current["mask"] = _on(plan_masks[p], decoder.device)
                    x = h.to(decoder.device).requires_grad_(True)
                    with torch.enable_grad():
                        out = run_block(block, x, plan_kwargs[p])
                        grads[p] = torch.autograd.grad(out, x, grads[p])[0]
            finally:
                for handle in handles:
                    handle.remove()
                decoder.release(block)
            kept[i] = None
            bar.update()
    bar.close()
    return stats


def block_modules(block: torch.nn.Module, names: Mapping[str, str]) -> dict[str, tuple[torch.nn.Module, bool]]:
    local = linear_modules(block, list(names))
    return {names[k]: v for k, v in local.items()}


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device)


def _head_kwargs(kwargs: dict, rows: int) -> dict:
    """A block's keyword arguments for the first ``rows`` samples (per-sample masks sliced; the
    positions and rotary tables broadcast over samples)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[0] > 1:
        return {**kwargs, "attention_mask": mask[:rows]}
    return kwargs


def _head_gradients(decoder: Decoder, data: Calibration, hidden: list[Tensor], plan: list[tuple[int, int]],
                    slot: Mapping[int, int], seed: int, loss: str) -> list[Tensor]:
    """The gradient of each of this process's gradient batches' sampled pseudo-loss at the last
    block's output (``slot``: its batches' places in ``hidden``). Weights and draws are those of
    the whole plan: another process's batch is skipped by drawing its numbers."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(rows for _, rows in plan)
    last = max((p for p, (b, _) in enumerate(plan) if b in slot), default=-1)
    grads = []
    for b, rows in plan[: last + 1]:
        batch = head_rows(data.batches[b], rows)
        if b not in slot:
            skip_output_draws(_output_shape(decoder, batch), loss, generator)
            continue
        mask = batch.get("attention_mask")
        mask = None if mask is None else mask.to(decoder.device)
        x = hidden[slot[b]][:rows].detach().requires_grad_(True)
        with torch.enable_grad():
            y = decoder.output(x, mask)
            g = output_gradient_sample(y, loss, rows / total, row_mask(y, {} if mask is None else {"attention_mask": mask}),
                                       generator)
            grads.append(torch.autograd.grad(y, x, g)[0])
    return grads


def _output_shape(decoder: Decoder, batch: Mapping[str, Tensor]) -> tuple[int, ...]:
    """The shape of the loss's output over a batch this process does not run: its first sample's
    embedding, zeroed, through the head (blocks keep the hidden shape; values do not matter)."""
    one = head_rows(batch, 1)
    mask = one.get("attention_mask")
    with torch.no_grad():
        h, _ = decoder.inputs(one)
        y = decoder.output(torch.zeros_like(h), None if mask is None else mask.to(decoder.device))
    return (int(next(iter(batch.values())).shape[0]), *y.shape[1:])
