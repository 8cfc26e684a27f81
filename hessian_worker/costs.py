"""Cost matrices from a predicted-loss function: pairwise (both move to their mean) or assignment
(one takes the other's weight). Only same-family pairs get numbers; the rest are None."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class FamilyPairs:
    """The pair directions of one family: for pair (a, b) and d = W_b − W_a, layer a moves by
    ``coef[0]``·d and layer b by ``coef[1]``·d; pairwise (½, −½): both to their mean, so the cross
    block H_ab counts; assignment (1, 0): a takes b's weight.

    Each direction moves two of the family's layers. Backends whose quadratic form splits by layer,
    or passes through a few numbers per layer (projections), price all pairs from per-layer
    quantities of the differences W_j − W_l (``differences``); the rest take ``dense`` directions.
    """

    names: list[str]
    weights: list[Tensor]
    pairs: list[tuple[int, int]]  # positions in names
    coef: tuple[float, float]

    @classmethod
    def of(cls, names: Sequence[str], weights: Mapping[str, Tensor], pairs: Sequence[tuple[int, int]],
           kind: CostKind) -> FamilyPairs:
        return cls(list(names), [weights[n] for n in names], list(pairs),
                   (0.5, -0.5) if kind is CostKind.pairwise else (1.0, 0.0))

    def differences(self, layer: int, rows: slice = slice(None)) -> Tensor:
        """[m, *shape]: W_j − W_layer for the members j in ``rows`` (all by default), written
        straight into the result (no stacked copy of the family's weights)."""
        members = self.weights[rows]
        base = self.weights[layer]
        out = torch.empty(len(members), *base.shape, dtype=base.dtype, device=base.device)
        for row, w in zip(out, members, strict=True):
            torch.sub(w, base, out=row)
        return out

    def table(self, fn: Callable[[str, Tensor], Tensor], chunk: int) -> Tensor:
        """[m, m, ...]: table[l, j] = fn(name_l, W_j − W_l); ``fn`` takes a layer's name and its
        differences to ``chunk`` members at a time ([rows, *shape]) and returns [rows, ...]."""
        m = len(self.names)
        return torch.stack([
            torch.cat([fn(name, self.differences(layer, slice(i, i + chunk))) for i in range(0, m, chunk)])
            for layer, name in enumerate(self.names)
        ])

    def sides(self, table: Tensor) -> tuple[Tensor, Tensor]:
        """From table[l, j] = f(W_j − W_l) (any trailing shape), each pair's (f(d) at a, f(−d) at b)."""
        return pair_sides(table, self.pairs)

    def dense(self, rows: slice = slice(None)) -> dict[str, Tensor]:
        """The directions of ``pairs[rows]`` stacked over all the family's layers, zero where a pair
        does not move one (a stride-0 zero for layers no pair in ``rows`` moves, so they cost no memory)."""
        pairs = self.pairs[rows]
        alpha, beta = self.coef
        moved = {i for a, b in pairs for i in ((a, b) if beta else (a,))}
        out = {}
        for i, (n, w) in enumerate(zip(self.names, self.weights, strict=True)):
            if i in moved:
                out[n] = torch.zeros(len(pairs), *w.shape, dtype=w.dtype, device=w.device)
            else:
                out[n] = torch.zeros((1,) * (w.dim() + 1), dtype=w.dtype, device=w.device).expand(len(pairs), *w.shape)
        for row, (a, b) in enumerate(pairs):
            diff = self.weights[b] - self.weights[a]
            out[self.names[a]][row] = alpha * diff
            if beta:
                out[self.names[b]][row] = beta * diff
        return out

    def linear(self, grads: Mapping[str, Tensor]) -> Tensor:
        """gᵀδ for every pair: the first-order term of a task loss."""
        alpha, beta = self.coef
        values = []
        for a, b in self.pairs:
            diff = self.weights[b] - self.weights[a]
            values.append(alpha * (grads[self.names[a]] * diff).sum() + beta * (grads[self.names[b]] * diff).sum())
        return torch.stack(values)


def pair_sides(table: Tensor, pairs: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """From table[l, j] = f(W_j − W_l), each pair (a, b)'s (f(d) at a, f(−d) at b)."""
    a = torch.tensor([p[0] for p in pairs], device=table.device, dtype=torch.long)
    b = torch.tensor([p[1] for p in pairs], device=table.device, dtype=torch.long)
    return table[a, b], table[b, a]


PairPredict = Callable[[FamilyPairs], Tensor]
"""Predicted loss change of every pair of one family, straight from the family's weights."""


def block_pair_quads(quad: Callable[[Mapping[str, Tensor]], Tensor], family: FamilyPairs, chunk: int = 8) -> Tensor:
    """δᵀHδ of every pair for an H with no curvature between layers (diagonal, layerwise).

    Such a form is the sum of its layers' own forms, so the pair (a, b) costs
    α²·q_a(d) + β²·q_b(−d): every q_l(W_j − W_l) comes from single-layer directions,
    m per layer (``chunk`` at a time), instead of one direction over the whole family per pair.
    """
    at_a, at_b = family.sides(family.table(lambda name, d: quad({name: d}), chunk))
    alpha, beta = family.coef
    return alpha**2 * at_a + beta**2 * at_b


def cost_matrix(
    layers: Sequence[LayerInfo],
    weights: Mapping[str, Tensor],
    predict: Predict,
    kind: CostKind,
    *,
    predict_pairs: PairPredict | None = None,
    chunk: int = 32,
    clip_negative: bool = True,
    progress: bool = False,
) -> list[list[float | None]]:
    """The n×n matrix of predicted loss changes; None across families, 0 on the diagonal.

    ``predict_pairs`` (where the backend has one) prices a whole family at once from its weights;
    else ``predict`` takes the pairs' dense directions, ``chunk`` pairs at a time.

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
        pairs = pairs_of(members, kind)
        position = {layer: i for i, layer in enumerate(members)}
        family = FamilyPairs.of([layers[i].name for i in members], weights,
                                [(position[a], position[b]) for a, b in pairs], kind)
        step = max(len(pairs), 1) if predict_pairs is not None else chunk
        for start in range(0, len(pairs), step):
            rows = slice(start, start + step)
            part = pairs[rows]
            values = (predict_pairs(family) if predict_pairs is not None else predict(family.dense(rows))).detach().cpu()
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
            f"{len(clipped)} predicted costs were negative (least {min(clipped):.3g}) and were "
            f"{'clipped to 0' if clip_negative else 'kept'}; with a task loss or the full Hessian the "
            "quadratic model can predict gains",
            stacklevel=2,
        )
    return matrix
