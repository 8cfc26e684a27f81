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
  trained by both, in that order. Trained on block 17's error alone, it would undo block 3's fit
  (which blocks 4..16 were healed around): on the 4-block test model with classes spanning blocks
  (30-120 steps, lr 3e-3 to 1e-2), plain sequential healing brought every block's own error down
  and still left the held-out loss change *above* the merged model's (0.80-0.97 vs 0.74; fit up
  to 1.03 vs 0.81; block 0 fitted to 0.02 ended at 0.85 once blocks 1-3 had moved its classes). So
  each earlier member is an anchor: while block 17 trains the class W, the loss adds
  |(W - W₀) X₃ᵀ|² / E₃, the quadratic estimate of block 3's relative error rise (X₃: that layer's
  inputs on the tied model, collected when the tied stream passed block 3; E₃: block 3's target
  energy; W₀: the value block 17 started from). The same settings then gave fit 0.34-0.36,
  held-out 0.56-0.60, improving with steps and lr instead of diverging (a second class layout,
  fit / held-out: 0.53-0.59 / 0.73-0.77 against 0.98-1.16 / 0.95-1.15 without anchors, from
  1.10 / 0.96 merged). The anchor is
  the layerwise merge's own metric (the layer's output error on its inputs); it is exact for the
  layer's output and a proxy for the block's (the rest of the block is nonlinear), and it anchors
  to the latest value rather than each block's own. Its covariance is kept to ``rank`` eigenpairs
  plus a bulk, sketched as the K-FAC statistics are (rank 8 of 32-64 input dimensions: within
  0.07 of whole covariances on the figures above).
- One optimizer step is one calibration batch (seeded order, reshuffled every pass): the same
  meaning ``heal_steps`` has for the in-memory healing, and for the same compute it makes as many
  times more updates as there are batches than full-pass steps would (block-wise methods train on
  minibatches: OmniQuant one sample, BRECQ 32). Measured on the test model (6 batches, before the
  anchors were added, at equal compute): best held-out loss change 0.68 with batch steps against
  0.72 with full-pass steps, fit 0.51 against 0.55. The loss is the batch's squared error over its
  real tokens (a padding mask drops the rest) relative to the targets' squared norm over all
  batches, times their number (its mean over the batches is the whole-data error): scale-free
  across blocks, whose residual stream grows with depth.
- The objective (the block's whole-data error plus its anchors) is checked at step 0, after every
  pass over the batches and at the last step; the best check's values are kept. The anchors are
  0 at step 0, so healing never leaves a block's own reconstruction worse on its data than the
  merge did (a diverging learning rate just keeps step 0). A check costs one forward per batch,
  a third of a pass of steps.
- Adam starts afresh at every block: the moments of the last block's problem do not describe the
  next, and no optimizer state outlives the block.
- Healed values are handed back on the host in the model's dtype (what every consumer, the
  streamed forward and the writer, casts them to anyway); their total is the tied classes' storage,
  once each.

Memory on the device: one block's weights, the classes alive at the block (master, Adam's two
moments, the step-0 and best copies), each live class's anchors (in x (rank + 1) per earlier
member; in x in with ``rank=None``), the two activation streams and one batch's backward.
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

from hessian_worker.curvature.kfac import FactorStats, input_factor, linear_hooks, new_stats
from hessian_worker.data import Calibration, batch_size
from hessian_worker.distributed import (
    ROW_SHARDING,
    Group,
    all_reduce_stats,
    all_reduce_sums,
    broadcast_tensors,
    row_share,
    step,
)
from hessian_worker.llm.decoder import Decoder, run_block
from hessian_worker.llm.measure import MergedOf, _block_index
from hessian_worker.llm.stream import block_modules

Class = tuple[str, ...]


class BlockHeal(BaseModel):
    """One block's healing: its reconstruction error (squared error of its outputs over real
    tokens, relative to the original outputs' squared norm) before and after."""

    block: int
    classes: list[str] = Field(description="The classes trained here, each by its first name.")
    before: float = Field(description="Relative error with the values the block started from (step 0).")
    after: float = Field(description="Relative error with the kept values (never above ``before``).")
    earlier: float = Field(description="The anchors' estimate of how much the kept values raised the relative "
                           "errors of the earlier blocks sharing these classes (summed).")
    best_step: int = Field(description="The step whose values were kept (0: the values it started from).")
    steps: int
    seconds: float
    moved: dict[str, float] = Field(description="Class (first name) -> |change made here| / |value before|.")


class BlockHealReport(BaseModel):
    steps: int = Field(description="Optimizer steps per healed block, one calibration batch each.")
    lr: float
    seconds: float
    blocks: list[BlockHeal] = Field(description="The blocks with a tied layer, in order.")
    rank_samples: list[int] | None = Field(default=None, description="In a torch.distributed job: the samples "
                                           "each rank healed on, by rank (every batch's rows split).")

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest (what ``compress_checkpoint`` puts in the problem's source)."""
        out = {"method": "blockwise", "steps": self.steps, "lr": self.lr, "seconds": round(self.seconds, 3),
               "blocks": [{"block": b.block, "before": b.before, "after": b.after, "earlier": b.earlier,
                           "best_step": b.best_step}
                          for b in self.blocks]}
        if self.rank_samples is not None:
            out.update(sharding=ROW_SHARDING, rank_samples=self.rank_samples)
        return out


@dataclass
class _Batches:
    """What every block of a batch shares: the block keyword arguments and the real-token masks of
    this process's rows of each batch (``slot``: batch index -> its place in these lists; a batch
    with no rows here has none), out of ``count`` batches in all, in ``group``."""

    kwargs: list[dict[str, Any]]
    masks: list[Tensor | None]
    slot: dict[int, int]
    count: int
    group: Group | None = None


def _rows(batch: dict[str, Tensor], rows: slice) -> dict[str, Tensor] | None:
    """The batch's ``rows`` (every tensor's dim 0), or None when there are none."""
    if rows.stop <= rows.start:
        return None
    if rows.start == 0 and rows.stop >= batch_size(batch):
        return batch
    return {k: v[rows] for k, v in batch.items()}


def heal_blockwise(decoder: Decoder, data: Calibration, groups: Sequence[Sequence[str]], merged: MergedOf, *,
                   steps: int, lr: float, seed: int, rank: int | None = None, oversample: int = 64,
                   progress: bool = False, group: Group | None = None) -> tuple[dict[Class, Tensor], BlockHealReport]:
    """(healed value of every class of ``groups``, report): each tied block trained in turn on
    ``data`` to reproduce the original block's outputs, starting from ``merged``'s values.

    Args:
        decoder: the streamed model (its blocks are loaded one at a time, never modified).
        groups: the plan's groups; those of two or more names are the classes healed.
        merged: a class -> its merged [out, in] weight (the starting values).
        steps: optimizer steps per block with a tied layer (0: measure only, values unchanged).
        lr: Adam's learning rate.
        seed: orders the batches (and draws the anchors' sketches).
        rank, oversample: the anchors' input covariances kept to ``rank`` eigenpairs plus a bulk,
            from a sketch of rank + oversample columns (None: whole, in x in per anchor).
        group: a torch.distributed job (None: this process alone). Every batch's rows are split
            over the ranks (``row_share``); each step's gradient is the sum of the ranks' gradients
            on their rows (all-reduced, as DDP does), so every step is the one-process step on the
            whole batch; the errors, target energies and anchor sums are added up likewise, and
            every rank ends with rank 0's values.

    Raises:
        DistributedError: another rank failed, or the ranks stopped answering within the timeout.
    """
    start = time.perf_counter()
    classes = [tuple(g) for g in groups if len(g) >= 2]
    class_of = {n: c for c in classes for n in c}
    block_of = {n: _block_index(decoder, n) for n in class_of}
    last = {c: max(block_of[n] for n in c) for c in classes}
    acc = _wide(decoder.dtype)
    count = len(data.batches)
    world = 1 if group is None else group.world_size
    me = 0 if group is None else group.rank
    rows = {b: _rows(batch, row_share(batch_size(batch), me, world)) for b, batch in enumerate(data.batches)}
    mine = {b: batch for b, batch in rows.items() if batch is not None}
    with step(group, "the healing inputs"), torch.no_grad():
        inputs = [decoder.inputs(b) for b in mine.values()]
    batches = _Batches([kw for _, kw in inputs], [_real_tokens(b, decoder.device) for b in mine.values()],
                       {b: s for s, b in enumerate(mine)}, count, group)
    ref = [h for h, _ in inputs]
    tied = ref  # one stream until the first tied block
    del inputs
    masters: dict[Class, Tensor] = {}
    anchors: dict[Class, list[_Anchor]] = {}
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
        with step(group, f"loading block {i} for healing"):
            block = decoder.load_block(i)
        try:
            with step(group, f"the targets of block {i}") as targets:
                with torch.no_grad():
                    for b, h in enumerate(ref):
                        ref[b] = run_block(block, h, batches.kwargs[b])  # the targets, then the next inputs
                if tied is not ref:
                    targets.share = sum(_energy(t, m) for t, m in zip(ref, batches.masks, strict=True))
            if tied is not ref:
                energy = sum(targets.shared) or 1.0  # in rank order: the same float on every rank
                if here:
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
                    records.append(_heal_block(block, i, here, masters, anchors, (tied, ref, energy), batches,
                                               steps=steps, lr=lr, gen=gen, dtype=decoder.dtype))
                    broadcast_tensors(group, [masters[c] for c in here], f"the healed values of block {i}")
                later = {n: prefix + n for c, local in here.items() if last[c] > i for n in local}
                modules = block_modules(block, later)
                sums = {full: new_stats(_in_dim(module, transposed), rank=rank, oversample=oversample, seed=seed,
                                        dtype=decoder.dtype, device=decoder.device)
                        for full, (module, transposed) in modules.items()}
                with step(group, f"the tied stream through block {i}"):
                    _advance(block, _subs(here, masters, decoder.dtype), tied, batches, modules, sums)
                all_reduce_stats(group, sums)
                for full, stats in sums.items():
                    anchors.setdefault(class_of[full], []).append(
                        _anchor(stats, rank, energy, transposed=modules[full][1]))
        finally:
            decoder.release(block)
        for c in [c for c in masters if last[c] == i]:
            healed[c] = masters.pop(c).to(device="cpu", dtype=decoder.dtype)
            anchors.pop(c, None)
    shares = None if group is None else [sum(len(range(n)[row_share(n, r, world)]) for n in data.sizes)
                                         for r in range(world)]
    return healed, BlockHealReport(steps=steps, lr=lr, seconds=time.perf_counter() - start, blocks=records,
                                   rank_samples=shares)


def _heal_block(block: nn.Module, index: int, here: dict[Class, list[str]], masters: dict[Class, Tensor],
                anchors: dict[Class, list[_Anchor]], streams: tuple[list[Tensor], list[Tensor], float],
                batches: _Batches, *, steps: int, lr: float, gen: torch.Generator, dtype: torch.dtype) -> BlockHeal:
    """Trains the classes of ``here`` (in place in ``masters``) for ``steps`` batches on the block's
    error plus its earlier members' anchors, and keeps the best checked values.

    ``streams``: the tied inputs, the original outputs and their squared norm over real tokens."""
    clock = time.perf_counter()
    inputs, targets, energy = streams
    params = [masters[c] for c in here]
    started = [p.clone() for p in params]
    held = [(k, a) for k, c in enumerate(here) for a in anchors.get(c, [])]

    def drift() -> Tensor:
        zero = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        return sum((a.penalty(params[k] - started[k]) for k, a in held), zero)

    group, count = batches.group, batches.count
    anchored = group is None or group.rank == 0  # the anchors' term is added once, by rank 0

    def error() -> float:
        subs = _subs(here, masters, dtype)
        with step(group, f"the error of block {index}") as local, torch.no_grad():
            local.share = sum(float(_sq_error(_output(functional_call(block, subs, (x,), batches.kwargs[b])),
                                              targets[b], batches.masks[b])) for b, x in enumerate(inputs))
        return sum(local.shared) / energy  # in rank order: the same float on every rank

    before = error()
    best = (before, 0.0, 0, started)  # own error, anchors' estimate, step, values
    checks = {steps, *range(count, steps, count)}
    order: list[int] = []
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for number in range(1, steps + 1):
            if not order:  # the same draws on every rank
                order = torch.randperm(count, generator=gen).tolist()
            b = batches.slot.get(order.pop())
            with step(group, f"healing block {index}"):
                loss = drift() if anchored else None
                if b is not None:
                    out = _output(functional_call(block, _subs(here, masters, dtype), (inputs[b],),
                                                  batches.kwargs[b]))
                    part = _sq_error(out, targets[b], batches.masks[b]) * (count / energy)
                    loss = part if loss is None else part + loss
                # gradients of the classes only: a block held in memory may have weights that take them
                grads = [torch.zeros_like(p) if g is None else g for p, g in
                         zip(params, _grads(loss, params), strict=True)]
            # the ranks' gradients on their rows add up to the whole batch's (DDP's all_reduce)
            all_reduce_sums(group, grads, f"the healing gradients of block {index}")
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            if number in checks:
                own = error()
                with torch.no_grad():
                    rise = float(drift())
                if own + rise < best[0] + best[1]:  # a NaN never wins
                    best = (own, rise, number, [p.detach().clone() for p in params])
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    after, rise, best_step, kept = best
    with torch.no_grad():
        for p, value in zip(params, kept, strict=True):
            p.copy_(value)
    moved = {c[0]: float((p - s).norm() / s.norm().clamp_min(1e-30)) for c, p, s in zip(here, params, started,
                                                                                      strict=True)}
    return BlockHeal(block=index, classes=[c[0] for c in here], before=before, after=after, earlier=rise,
                     best_step=best_step, steps=steps, seconds=time.perf_counter() - clock, moved=moved)


def _grads(loss: Tensor | None, params: list[Tensor]) -> Sequence[Tensor | None]:
    """d loss / d params (None where a parameter does not reach the loss, or there is no loss)."""
    if loss is None or not loss.requires_grad:
        return [None] * len(params)
    return torch.autograd.grad(loss, params, allow_unused=True)


def _advance(block: nn.Module, subs: dict[str, Tensor], tied: list[Tensor], batches: _Batches,
             modules: dict[str, tuple[nn.Module, bool]], sums: dict[str, FactorStats]) -> None:
    """The tied stream through the healed block (in place), adding the inputs of ``modules`` (real
    tokens) to ``sums`` on the way."""
    current: dict[str, Tensor | None] = {"mask": None}
    handles = linear_hooks(modules, sums, lambda: current["mask"], inputs=True, outputs=False)
    try:
        with torch.no_grad():
            for b, h in enumerate(tied):
                current["mask"] = batches.masks[b]
                tied[b] = _output(functional_call(block, subs, (h,), batches.kwargs[b]))
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Anchor:
    """An earlier member layer of a class, as the quadratic estimate of its block's relative error
    rise when the class moves by D: |D Xᵀ|² / E (X its inputs on the tied model, E the block's
    target energy) = weight · (|D U √(λ − σ)|² + σ |D|²) with A = XᵀX / N ≈ U λ Uᵀ + σ (I − U Uᵀ)."""

    scaled: Tensor  # U √(λ − σ): [in, r]
    bulk: float
    weight: float  # N / E
    transposed: bool  # a Conv1D weight is [in, out]

    def penalty(self, delta: Tensor) -> Tensor:
        d = delta.T if self.transposed else delta
        return self.weight * ((d @ self.scaled).pow(2).sum() + self.bulk * d.pow(2).sum())


def _anchor(stats: FactorStats, rank: int | None, energy: float, *, transposed: bool) -> _Anchor:
    f = input_factor(stats, rank)
    return _Anchor(f.vectors * f.weights.clamp_min(0).sqrt(), f.bulk, stats.tokens / energy, transposed)


def _in_dim(module: nn.Module, transposed: bool) -> int:
    return int(module.weight.shape[0 if transposed else 1])


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
