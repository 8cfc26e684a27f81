"""Cost matrices from a predicted-loss function: pairwise (both move to their mean) or assignment
(one takes the other's weight). Only same-family pairs get numbers; the rest are None."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hessian_worker.discovery import LayerInfo
from solver.schema import CostKind

Predict = Callable[[Mapping[str, Tensor]], Tensor]
"""Predicted loss change ΔL ≈ gᵀδ + ½δᵀHδ for n stacked directions."""

# relative size below which a negative cost is float noise of a PSD form
NOISE_TOL = 1e-6


def families_of(layers: Sequence[LayerInfo]) -> dict[str, list[int]]:
    """Family -> positions in ``layers`` (in layer order)."""
    out: dict[str, list[int]] = defaultdict(list)
    for i, layer in enumerate(layers):
        out[layer.family].append(i)
    return dict(out)


def pairs_of(members: Sequence[int], kind: CostKind) -> list[tuple[int, int]]:
    if kind is CostKind.pairwise:
        return [(a, b) for ai, a in enumerate(members) for b in members[ai + 1 :]]
    return [(a, b) for a in members for b in members if a != b]


def pair_directions(
    layers: Sequence[LayerInfo], weights: Mapping[str, Tensor], pairs: Sequence[tuple[int, int]],
    names: Sequence[str], kind: CostKind,
) -> dict[str, Tensor]:
    """Stacked perturbations over ``names`` (zero where a pair does not move a layer).

    pairwise: δ_l = (W_m − W_l)/2, δ_m = −δ_l (the joint move, so the cross block H_lm counts);
    assignment: δ_l = W_m − W_l. Names no pair in this chunk touches get a stride-0 expanded zero,
    so a chunk costs memory only for the layers it moves.
    """
    touched = {layers[i].name for pair in pairs for i in pair[: 2 if kind is CostKind.pairwise else 1]}
    out = {}
    for n in names:
        w = weights[n]
        if n in touched:
            out[n] = torch.zeros(len(pairs), *w.shape, dtype=w.dtype, device=w.device)
        else:
            out[n] = torch.zeros((1,) * (w.dim() + 1), dtype=w.dtype, device=w.device).expand(len(pairs), *w.shape)
    for row, (a, b) in enumerate(pairs):
        la, lb = layers[a].name, layers[b].name
        diff = weights[lb] - weights[la]
        if kind is CostKind.pairwise:
            out[la][row] = diff / 2
            out[lb][row] = -diff / 2
        else:
            out[la][row] = diff
    return out


def cost_matrix(
    layers: Sequence[LayerInfo],
    weights: Mapping[str, Tensor],
    predict: Predict,
    kind: CostKind,
    *,
    chunk: int = 32,
    clip_negative: bool = True,
    progress: bool = False,
) -> list[list[float | None]]:
    """The n×n matrix of predicted loss changes; None across families, 0 on the diagonal.

    Negative entries are clipped to 0: tiny ones are float or estimator noise of a PSD form; larger
    ones (possible with a task loss or the full Hessian) are reported in a warning, since the
    solver's contract needs costs >= 0.
    """
    n = len(layers)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        matrix[i][i] = 0.0
    fams = families_of(layers)
    total = sum(len(pairs_of(m, kind)) for m in fams.values())
    bar = tqdm(total=total, desc=f"{kind.value} costs", disable=not progress, leave=False)
    clipped: list[float] = []
    for members in fams.values():
        names = [layers[i].name for i in members]
        pairs = pairs_of(members, kind)
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            values = predict(pair_directions(layers, weights, part, names, kind)).detach().cpu()
            scale = float(values.abs().max()) if values.numel() else 0.0
            for (a, b), v in zip(part, values.tolist(), strict=True):
                if v < 0:
                    if v < -NOISE_TOL * max(scale, 1e-30):
                        clipped.append(v)
                    v = 0.0 if clip_negative else v
                matrix[a][b] = v
                if kind is CostKind.pairwise:
                    matrix[b][a] = v
            bar.update(len(part))
    bar.close()
    if clipped:
        warnings.warn(
            f"{len(clipped)} predicted costs were negative (least {min(clipped):.3g}) and were clipped "
            "to 0; with a task loss or the full Hessian the quadratic model can predict gains",
            stacklevel=2,
        )
    return matrix
