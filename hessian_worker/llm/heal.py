"""Block-wise healing of a streamed decoder: each tied block trained to reproduce the original
block's outputs on the calibration activations (local distillation, the reconstruction that
GPTQ/OmniQuant-style methods use), with one block in memory at a time.

One forward sweep over the blocks carries two activation streams per calibration batch: the
original model's (block inputs, and outputs that become the targets) and the tied model's (what
the healed prefix gives). At block ``i`` the original block is loaded once; its outputs on the
original inputs are the targets; the classes with a member in the block are trained so that the
block run on the *tied* inputs reproduces them. Training on the tied inputs (GPTQ's sequential
mode) lets a block make up for the error its healed prefix left, rather than fit inputs the tied
model never sees. Then both streams advance, the tied one through the block with its healed
weights. Weights that are not tied stay frozen (the loaded block never takes gradients; its tied
weights are substituted with ``functional_call``, as ``llm.measure`` scores plans).

Choices, and why:

- A class's master copy (float32, or float64 for a float64 model) is formed from the merged value
  at its first member's block and kept until its last, so a class shared by blocks 3 and 17 is
  trained by both, in that order. The later block's training moves the weight block 3 already
  uses: the figures of block 3 in the report are those of its own turn (the healed model is one
  tensor per class; fitting both blocks at once would need block 3 and its activations again).
- One optimizer step is one calibration batch (seeded order, reshuffled every pass): the same
  meaning ``heal_steps`` has for the in-memory healing, and for the same compute it makes as many
  times more updates as there are batches than full-pass steps would (block-wise methods train on
  minibatches: OmniQuant one sample, BRECQ 32). The loss is the batch's squared error over its real
  tokens (a padding mask drops the rest) relative to the targets' squared norm over all batches,
  times their number (its mean over the batches is the whole-data error): scale-free across
  blocks, whose residual stream grows with depth.
- The whole-data error is checked at step 0, after every pass over the batches and at the last
  step; the best check's weights are kept. Healing thus never leaves a block's reconstruction
  worse on its data than the merge did (a diverging learning rate just keeps step 0). A check
  costs one forward per batch, a third of a pass of steps.
- Adam starts afresh at every block: the moments of the last block's problem do not describe the
  next, and no optimizer state outlives the block.
- Healed values are handed back on the host in the model's dtype (what every consumer, the
  streamed forward and the writer, casts them to anyway); their total is the tied classes' storage,
  once each.

Memory on the device: one block's weights, the classes alive at the block (master, Adam's two
moments, the step-0 and best copies), the two activation streams and one batch's backward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from hessian_worker.data import Calibration
from hessian_worker.llm.decoder import Decoder, run_block
from hessian_worker.llm.measure import MergedOf, _block_index

Class = tuple[str, ...]


class BlockHeal(BaseModel):
    """One block's healing: its reconstruction error (squared error of its outputs over real
    tokens, relative to the original outputs' squared norm) before and after."""

    block: int
    classes: list[str] = Field(description="The classes trained here, each by its first name.")
    before: float = Field(description="Relative error with the values the block started from (step 0).")
    after: float = Field(description="Relative error with the kept values (never above ``before``).")
    best_step: int = Field(description="The step whose values were kept (0: the values it started from).")
    steps: int
    seconds: float
    moved: dict[str, float] = Field(description="Class (first name) -> |change made here| / |value before|.")


class BlockHealReport(BaseModel):
    steps: int = Field(description="Optimizer steps per healed block, one calibration batch each.")
    lr: float
    seconds: float
    blocks: list[BlockHeal] = Field(description="The blocks with a tied layer, in order.")

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest (what ``compress_checkpoint`` puts in the problem's source)."""
        return {"method": "blockwise", "steps": self.steps, "lr": self.lr, "seconds": round(self.seconds, 3),
                "blocks": [{"block": b.block, "before": b.before, "after": b.after, "best_step": b.best_step}
                           for b in self.blocks]}


@dataclass
class _Batches:
    """What every block of a batch shares: the block keyword arguments and the real-token masks."""

    kwargs: list[dict[str, Any]]
    masks: list[Tensor | None]


def heal_blockwise(decoder: Decoder, data: Calibration, groups: Sequence[Sequence[str]], merged: MergedOf, *,
                   steps: int, lr: float, seed: int, progress: bool = False) -> tuple[dict[Class, Tensor],
                                                                                    BlockHealReport]:
    """(healed value of every class of ``groups``, report): each tied block trained in turn on
    ``data`` to reproduce the original block's outputs, starting from ``merged``'s values.

    Args:
        decoder: the streamed model (its blocks are loaded one at a time, never modified).
        groups: the plan's groups; those of two or more names are the classes healed.
        merged: a class -> its merged [out, in] weight (the starting values).
        steps: optimizer steps per block with a tied layer (0: measure only, values unchanged).
        lr: Adam's learning rate.
        seed: orders the batches.
    """
    start = time.perf_counter()
    classes = [tuple(g) for g in groups if len(g) >= 2]
    block_of = {n: _block_index(decoder, n) for c in classes for n in c}
    last = {c: max(block_of[n] for n in c) for c in classes}
    acc = _wide(decoder.dtype)
    with torch.no_grad():
        inputs = [decoder.inputs(b) for b in data.batches]
    batches = _Batches([kw for _, kw in inputs], [_real_tokens(b, decoder.device) for b in data.batches])
    ref = [h for h, _ in inputs]
    tied = ref  # one stream until the first tied block
    del inputs
    masters: dict[Class, Tensor] = {}
    healed: dict[Class, Tensor] = {}
    records: list[BlockHeal] = []
    for i in tqdm(range(decoder.num_blocks), desc="heal (blocks)", unit="block", disable=not progress, leave=False):
        prefix = decoder.block_prefix(i)
        here = {c: local for c in classes if (local := [n[len(prefix):] for n in c if block_of[n] == i])}
        for c in here:
            if c not in masters:
                masters[c] = merged(c).detach().to(device=decoder.device, dtype=acc).clone()
        if masters and tied is ref:
            tied = list(ref)  # the streams part: ref's tensors are replaced below, tied keeps them
        block = decoder.load_block(i)
        try:
            with torch.no_grad():
                for b, h in enumerate(ref):
                    ref[b] = run_block(block, h, batches.kwargs[b])  # the targets, then the next inputs
            if tied is not ref:
                if here:
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
                    records.append(_heal_block(block, i, here, masters, tied, ref, batches, steps=steps, lr=lr,
                                               gen=gen, dtype=decoder.dtype))
                subs = _subs(here, masters, decoder.dtype)
                with torch.no_grad():
                    for b, h in enumerate(tied):
                        tied[b] = _output(functional_call(block, subs, (h,), batches.kwargs[b]))
        finally:
            decoder.release(block)
        for c in [c for c in masters if last[c] == i]:
            healed[c] = masters.pop(c).to(device="cpu", dtype=decoder.dtype)
    return healed, BlockHealReport(steps=steps, lr=lr, seconds=time.perf_counter() - start, blocks=records)


def _heal_block(block: nn.Module, index: int, here: dict[Class, list[str]], masters: dict[Class, Tensor],
                inputs: list[Tensor], targets: list[Tensor], batches: _Batches, *, steps: int, lr: float,
                gen: torch.Generator, dtype: torch.dtype) -> BlockHeal:
    """Trains the classes of ``here`` (in place in ``masters``) for ``steps`` batches and keeps the
    best checked values."""
    clock = time.perf_counter()
    params = [masters[c] for c in here]
    started = [p.clone() for p in params]
    total = sum(_energy(t, m) for t, m in zip(targets, batches.masks, strict=True)) or 1.0

    def error() -> float:
        subs = _subs(here, masters, dtype)
        with torch.no_grad():
            return sum(float(_sq_error(_output(functional_call(block, subs, (x,), batches.kwargs[b])), targets[b],
                                       batches.masks[b])) for b, x in enumerate(inputs)) / total

    before = best_error = error()
    best_step, best = 0, started
    checks = {steps, *range(len(inputs), steps, len(inputs))}
    order: list[int] = []
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for step in range(1, steps + 1):
            if not order:
                order = torch.randperm(len(inputs), generator=gen).tolist()
            b = order.pop()
            out = _output(functional_call(block, _subs(here, masters, dtype), (inputs[b],), batches.kwargs[b]))
            loss = _sq_error(out, targets[b], batches.masks[b]) * (len(inputs) / total)  # E over b: the error
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in checks:
                now = error()
                if now < best_error:  # a NaN never wins
                    best_error, best_step, best = now, step, [p.detach().clone() for p in params]
    finally:
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad():
        for p, kept in zip(params, best, strict=True):
            p.copy_(kept)
    moved = {c[0]: float((p - s).norm() / s.norm().clamp_min(1e-30)) for c, p, s in zip(here, params, started,
                                                                                      strict=True)}
    return BlockHeal(block=index, classes=[c[0] for c in here], before=before, after=best_error, best_step=best_step,
                     steps=steps, seconds=time.perf_counter() - clock, moved=moved)


def _subs(here: dict[Class, list[str]], masters: dict[Class, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Block-local name -> the class's value in the block's dtype (a differentiable cast)."""
    return {name: masters[c].to(dtype) for c, names in here.items() for name in names}


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _real_tokens(batch: dict[str, Tensor], device: torch.device) -> Tensor | None:
    mask = batch.get("attention_mask")
    return None if mask is None else mask.to(device=device).bool()


def _sq_error(out: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Squared error summed over the real tokens, in float32 at least."""
    acc = _wide(out.dtype)
    return _over_tokens((out.to(acc) - target.to(acc)).pow(2).sum(-1), mask)


def _energy(target: Tensor, mask: Tensor | None) -> float:
    """The targets' squared norm over the real tokens (what errors are relative to)."""
    return float(_over_tokens(target.to(_wide(target.dtype)).pow(2).sum(-1), mask))


def _over_tokens(per_token: Tensor, mask: Tensor | None) -> Tensor:
    return per_token[mask].sum() if mask is not None else per_token.sum()


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
