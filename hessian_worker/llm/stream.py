"""K-FAC statistics of a decoder streamed block by block.

Forward sweep: the calibration batches' hidden states go through one block at a time; hooks add
each linear layer's inputs to its factor sums. With the output factor, every block's input is kept
(on the device when it fits, else on the host), a label is drawn per token from the model's own
next-token distribution at the head, and a backward sweep runs the blocks in reverse: each block
recomputes its forward from its kept input and backpropagates the carried gradient, hooks adding
each linear layer's output gradients. Weights never take gradients (only activations do), so the
backward costs about one forward. The draws are the same, in the same order, as the in-memory
``collect_factors``, so both give the same statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hessian_worker.curvature.kfac import (
    FactorStats,
    OutputFactor,
    linear_hooks,
    new_stats,
    output_gradient_sample,
)
from hessian_worker.curvature.layerwise import linear_modules
from hessian_worker.data import Calibration, batch_size
from hessian_worker.discovery import LayerInfo
from hessian_worker.llm.decoder import Decoder, run_block
from hessian_worker.losses import row_mask


def _by_block(decoder: Decoder, layers: Sequence[LayerInfo]) -> dict[int, dict[str, str]]:
    """Block -> {name inside the block: full name} of the analysed layers."""
    out: dict[int, dict[str, str]] = {}
    for i in range(decoder.num_blocks):
        prefix = decoder.block_prefix(i)
        out[i] = {x.name[len(prefix):]: x.name for x in layers if x.name.startswith(prefix)}
    return out


def _keep_device(decoder: Decoder, nbytes: int) -> torch.device:
    """Where kept block inputs live: the device when they fit in half its free memory, else the host."""
    if decoder.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(decoder.device)
        if nbytes < free // 2:
            return decoder.device
        return torch.device("cpu")
    return decoder.device


def stream_factors(decoder: Decoder, data: Calibration, layers: Sequence[LayerInfo], *, rank: int | None,
                   oversample: int, output: OutputFactor, seed: int, progress: bool = False) -> dict[str, FactorStats]:
    """Factor sums of every analysed layer from one forward sweep (and a backward sweep for the
    diagonal output factor) over the decoder's blocks."""
    names = _by_block(decoder, layers)
    backward = output is OutputFactor.diagonal
    stats: dict[str, FactorStats] = {}
    current: dict[str, Tensor | None] = {"mask": None}
    batches = data.batches
    masks = [b.get("attention_mask") for b in batches]
    hidden, kwargs = [], []
    for batch in batches:
        h, kw = decoder.inputs(batch)
        hidden.append(h)
        kwargs.append(kw)
    keep_on = _keep_device(decoder, sum(h.numel() * h.element_size() for h in hidden) * decoder.num_blocks)
    kept: list[list[Tensor] | None] = []
    steps = decoder.num_blocks * (2 if backward else 1)
    bar = tqdm(total=steps, desc="blocks (inputs)", unit="block", disable=not progress, leave=False)
    for i in range(decoder.num_blocks):
        block = decoder.load_block(i)
        modules = _modules(block, names[i])
        for full, (module, transposed) in modules.items():
            stats[full] = new_stats(int(module.weight.shape[0 if transposed else 1]), rank=rank,
                                    oversample=oversample, seed=seed, dtype=decoder.dtype, device=decoder.device)
        handles = linear_hooks(modules, stats, lambda: current["mask"], inputs=True, outputs=False)
        if backward:
            kept.append([h.to(keep_on) for h in hidden])
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
        grads = _head_gradients(decoder, data, hidden, seed)
        hidden.clear()
        for i in reversed(range(decoder.num_blocks)):
            block = decoder.load_block(i)
            modules = _modules(block, names[i])
            handles = linear_hooks(modules, stats, lambda: current["mask"], inputs=False, outputs=True)
            inputs = kept[i]
            assert inputs is not None
            try:
                for b, h in enumerate(inputs):
                    current["mask"] = _on(masks[b], decoder.device)
                    x = h.to(decoder.device).requires_grad_(True)
                    with torch.enable_grad():
                        out = run_block(block, x, kwargs[b])
                        grads[b] = torch.autograd.grad(out, x, grads[b])[0]
            finally:
                for handle in handles:
                    handle.remove()
                decoder.release(block)
            kept[i] = None
            bar.update()
    bar.close()
    return stats


def _modules(block: torch.nn.Module, names: Mapping[str, str]) -> dict[str, tuple[torch.nn.Module, bool]]:
    local = linear_modules(block, list(names))
    return {names[k]: v for k, v in local.items()}


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device)


def _head_gradients(decoder: Decoder, data: Calibration, hidden: list[Tensor], seed: int) -> list[Tensor]:
    """The gradient of each batch's sampled pseudo-loss at the last block's output."""
    generator = torch.Generator().manual_seed(seed)
    total = data.num_samples
    grads = []
    for b, batch in enumerate(data.batches):
        x = hidden[b].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = decoder.logits(x)
            mask_batch = {k: v.to(decoder.device) for k, v in batch.items() if k == "attention_mask"}
            g = output_gradient_sample(logits, "kl", batch_size(batch) / total, row_mask(logits, mask_batch),
                                       generator)
            grads.append(torch.autograd.grad(logits, x, g)[0])
    return grads
