"""Exact GGN pair costs of a decoder streamed block by block.

The in-memory exact backend prices pair (a, b) of a family by ½δᵀGδ, G = Σ_b w_b J_bᵀ H_out,b J_b,
with δ = (α·d at a, β·d at b), d = W_b − W_a (pairwise α, β = ½, −½; assignment 1, 0): one JVP of
the whole model per direction, then the output loss's Hessian at the reference logits. A JVP is a
forward pass that carries a tangent beside the activations, so it streams like one: the tangent of a
direction is zero before the first block it moves, so its sweep starts there, from that block's
reference input (kept per block from one forward sweep), perturbing the block's weights where the
direction moves them and carrying (hidden, tangent) through the later blocks. ``chunk`` directions
go together, vmapped, each joining the sweep at its own first block, so every block is read once per
chunk. Weights never take gradients (forward mode only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from hessian_worker.config import AnalyzeConfig
from hessian_worker.costs import families_of, pairs_of
from hessian_worker.curvature.base import CurvatureKind
from hessian_worker.data import Calibration
from hessian_worker.discovery import LayerInfo
from hessian_worker.errors import BackendError
from hessian_worker.llm.decoder import Decoder, MemoryEstimate, estimate_memory, run_block
from hessian_worker.losses import resolve_distill
from solver.schema import CostKind

OutputLoss = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]


@dataclass(frozen=True)
class Direction:
    """One pair's direction: each ``moved`` layer moves by its coefficient times W_b − W_a."""

    cell: tuple[int, int]  # (a, b): the cost matrix entry
    a: str
    b: str
    moved: tuple[tuple[str, float], ...]
    start: int  # the first block it moves: its tangent is zero before
    stop: int  # the last block it moves: W_b − W_a is not needed after


@dataclass
class Reference:
    """The reference sweep: every block's input per batch (``inputs[num_blocks]``: the last block's
    output) and the keyword arguments each batch's blocks take."""

    inputs: list[list[Tensor]]
    kwargs: list[dict[str, Any]]


def block_of(decoder: Decoder, name: str) -> tuple[int, str]:
    """(block index, name inside the block) of an analysed layer.

    Raises:
        BackendError: the layer is outside the decoder blocks (the embeddings, the head).
    """
    for i in range(decoder.num_blocks):
        prefix = decoder.block_prefix(i)
        if name.startswith(prefix):
            return i, name[len(prefix):]
    raise BackendError(f"layer {name!r} is not in a decoder block; the streamed exact backend prices block "
                       "layers only (drop it with ignore, or analyse the model in memory)")


def directions(decoder: Decoder, layers: Sequence[LayerInfo], kind: CostKind) -> list[Direction]:
    """Every same-family pair's direction, as the in-memory backend forms it (FamilyPairs.dense),
    sorted by first block so a chunk's directions join one sweep."""
    alpha, beta = (0.5, -0.5) if kind is CostKind.pairwise else (1.0, 0.0)
    out = []
    for members in families_of(layers).values():
        for a, b in pairs_of(members, kind):
            na, nb = layers[a].name, layers[b].name
            moved = ((na, alpha), (nb, beta)) if beta else ((na, alpha),)
            blocks = [block_of(decoder, n)[0] for n, _ in moved]
            out.append(Direction((a, b), na, nb, moved, min(blocks), max(blocks)))
    return sorted(out, key=lambda d: d.start)


def reference_sweep(decoder: Decoder, data: Calibration, *, progress: bool = False) -> Reference:
    """One plain forward sweep, keeping every block's input so each chunk starts where it must."""
    hidden, kwargs = [], []
    for batch in data.batches:
        h, kw = decoder.inputs(batch)
        hidden.append(h)
        kwargs.append(kw)
    row_bytes = sum(h.numel() * h.element_size() for h in hidden)
    keep_on = _kept_on(decoder, row_bytes * (decoder.num_blocks + 1))
    inputs = [[h.to(keep_on) for h in hidden]]
    for i in tqdm(range(decoder.num_blocks), desc="exact: reference sweep", unit="block", disable=not progress,
                  leave=False):
        block = decoder.load_block(i)
        try:
            with torch.no_grad():
                hidden = [run_block(block, h, kw) for h, kw in zip(hidden, kwargs, strict=True)]
        finally:
            decoder.release(block)
        inputs.append([h.to(keep_on) for h in hidden])
    return Reference(inputs, kwargs)


def _kept_on(decoder: Decoder, nbytes: int) -> torch.device:
    """Where the kept block inputs live: the device when they fit in half its free memory, else the host."""
    if decoder.device.type == "cuda" and nbytes >= torch.cuda.mem_get_info(decoder.device)[0] // 2:
        return torch.device("cpu")
    return decoder.device


def _weight(decoder: Decoder, block: nn.Module, index: int, name: str) -> Tensor:
    """A layer's weight in the compute dtype: from the loaded block when it is there, else read."""
    i, local = block_of(decoder, name)
    if i == index:
        return block.get_parameter(local).detach()
    return decoder.checkpoint.tensor(name, dtype=decoder.dtype, device=decoder.device)


def _weight_tangents(decoder: Decoder, index: int, active: Sequence[Direction],
                     diffs: Mapping[int, Tensor]) -> dict[str, Tensor]:
    """{name inside block ``index``: [n, *shape]} for the layers of that block the active directions
    move (zero rows for the directions that do not move it)."""
    out: dict[str, Tensor] = {}
    for k, direction in enumerate(active):
        for name, coef in direction.moved:
            i, local = block_of(decoder, name)
            if i != index:
                continue
            d = diffs[k]
            if local not in out:
                out[local] = torch.zeros(len(active), *d.shape, dtype=d.dtype, device=d.device)
            out[local][k] += coef * d
    return out


def _block_jvp(block: nn.Module, hidden: Tensor, kwargs: dict[str, Any], tangent: Tensor,
               weights: Mapping[str, Tensor]) -> Tensor:
    """The block's output tangents [n, ...] for n (hidden, weight) tangents, the primal shared."""
    params = {name: block.get_parameter(name).detach() for name in weights}

    def forward(x: Tensor, p: dict[str, Tensor]) -> Tensor:
        out = functional_call(block, p, (x,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    def one(t: Tensor, w: dict[str, Tensor]) -> Tensor:
        return jvp(forward, (hidden, params), (t, w))[1]

    if tangent.shape[0] == 1:  # chunk 1: a plain call (operators without vmap rules)
        return one(tangent[0], {k: v[0] for k, v in weights.items()}).unsqueeze(0)
    return vmap(one)(tangent, dict(weights))


def _head_quads(decoder: Decoder, hidden: Tensor, tangent: Tensor, loss: OutputLoss,
                batch: Mapping[str, Tensor], acc: torch.dtype) -> Tensor:
    """vᵀ H_out v per direction, v the output's tangent, H_out the output loss's Hessian at the
    reference output (a JVP of its gradient: exact for any output loss)."""
    mask = {k: v.to(decoder.device) for k, v in batch.items() if k == "attention_mask"}
    rows = mask.get("attention_mask")

    def head(h: Tensor) -> Tensor:
        return decoder.output(h, rows)

    logits = head(hidden)

    def one(t: Tensor) -> Tensor:
        v = jvp(head, (hidden,), (t,))[1]
        hv = jvp(grad(lambda z: loss(z, logits, mask)), (logits,), (v,))[1]
        return (v.to(acc) * hv.to(acc)).sum()

    if tangent.shape[0] == 1:
        return one(tangent[0]).reshape(1)
    return vmap(one)(tangent)


def chunk_quads(decoder: Decoder, data: Calibration, ref: Reference, chunk: Sequence[Direction],
                loss: OutputLoss, bar: tqdm) -> Tensor:
    """δᵀGδ of each direction of ``chunk`` (sorted by first block), one sweep from the first."""
    acc = torch.float64 if decoder.dtype == torch.float64 else torch.float32
    tangents: list[Tensor | None] = [None] * len(data.batches)
    diffs: dict[int, Tensor] = {}
    active = 0
    for i in range(chunk[0].start, decoder.num_blocks):
        block = decoder.load_block(i)
        try:
            while active < len(chunk) and chunk[active].start == i:
                d = chunk[active]
                diffs[active] = _weight(decoder, block, i, d.b) - _weight(decoder, block, i, d.a)
                active += 1
            weights = _weight_tangents(decoder, i, chunk[:active], diffs)
            for b, kwargs in enumerate(ref.kwargs):
                h = ref.inputs[i][b].to(decoder.device)
                t = _joined(tangents[b], active, h)
                tangents[b] = _block_jvp(block, h, kwargs, t, weights)
            del weights
        finally:
            decoder.release(block)
        for k in [k for k in diffs if chunk[k].stop <= i]:
            del diffs[k]
        bar.update()
    total = torch.zeros(len(chunk), dtype=acc, device=decoder.device)
    for b, size in enumerate(data.sizes):
        t = tangents[b]
        assert t is not None
        h = ref.inputs[decoder.num_blocks][b].to(decoder.device)
        total += size / data.num_samples * _head_quads(decoder, h, t, loss, data.batches[b], acc)
    return total


def _joined(tangent: Tensor | None, active: int, hidden: Tensor) -> Tensor:
    """The carried tangents with zero rows for the directions that join at this block."""
    have = 0 if tangent is None else tangent.shape[0]
    fresh = torch.zeros(active - have, *hidden.shape, dtype=hidden.dtype, device=hidden.device)
    return fresh if tangent is None else torch.cat([tangent, fresh])


def streamed_exact_costs(decoder: Decoder, data: Calibration, layers: Sequence[LayerInfo], config: AnalyzeConfig,
                         *, progress: bool = False) -> list[list[float | None]]:
    """The exact backend's cost matrix (½δᵀGδ per pair, distillation loss on the logits), with one
    block in memory at a time; diagonal 0, None across families.

    Raises:
        BackendError: ``curvature='hessian'`` (the full Hessian needs reverse mode through the whole
            model) or a layer outside the decoder blocks.
    """
    if config.curvature is not CurvatureKind.ggn:
        raise BackendError("a streamed decoder's exact costs use the Gauss-Newton matrix (forward mode): "
                           "curvature='ggn', or the full Hessian on a model loaded whole")
    n = len(layers)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        matrix[i][i] = 0.0
    todo = directions(decoder, layers, config.kind)
    if not todo:
        return matrix
    loss = resolve_distill(config.distill, decoder.is_logits)
    chunks = [todo[i:i + config.chunk] for i in range(0, len(todo), config.chunk)]
    # the fused attention kernels have no forward-mode derivative; the math one is plain ops (float64 runs eager)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref = reference_sweep(decoder, data, progress=progress)
        steps = sum(decoder.num_blocks - c[0].start for c in chunks)
        with tqdm(total=steps, desc="exact pair costs", unit="block", disable=not progress) as bar:
            for chunk in chunks:
                # ΔL ≈ ½δᵀGδ (distillation: no first-order term); a PSD form, so negatives are float noise
                values = (0.5 * chunk_quads(decoder, data, ref, chunk, loss, bar)).clamp_min(0.0).tolist()
                for direction, v in zip(chunk, values, strict=True):
                    a, b = direction.cell
                    matrix[a][b] = v
                    if config.kind is CostKind.pairwise:
                        matrix[b][a] = v
    return matrix


def exact_memory(decoder: Decoder, data: Calibration, chunk: int) -> MemoryEstimate:
    """A modest peak estimate of the streamed exact pricing: one block, the kept input of every
    block, a chunk's hidden tangents (and the MLP's under the JVP), its weight differences and
    tangents, and its logit tangents with the output Hessian's temporaries."""
    checkpoint = decoder.checkpoint
    config = checkpoint.config
    tokens = sum(int(next(iter(b.values())).numel()) for b in data.batches)
    widest_batch = max(int(next(iter(b.values())).numel()) for b in data.batches)
    base = estimate_memory(checkpoint, dtype=decoder.dtype, tokens=tokens, rank=0, oversample=0, kept_tokens=0)
    size = torch.empty((), dtype=decoder.dtype).element_size()
    hidden, ffn = int(config["hidden_size"]), int(config["intermediate_size"])
    vocab, blocks = int(config["vocab_size"]), decoder.num_blocks
    layer = max(hidden * hidden, hidden * ffn) * size
    kept = (blocks + 1) * tokens * hidden * size
    carried = chunk * (2 * tokens * hidden + 4 * widest_batch * ffn) * size
    logits = chunk * widest_batch * vocab * 4 * 4
    return dataclasses.replace(base, activations=kept + carried, statistics=0, pricing=chunk * layer * 2 + logits)
