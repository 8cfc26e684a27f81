"""What every curvature backend provides, and the helpers they share."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.func import vmap

from hessian_worker.options import CurvatureKind as CurvatureKind  # defined there, re-exported here

if TYPE_CHECKING:
    from hessian_worker.costs import FamilyPairs

Params = dict[str, Tensor]


class Curvature(Protocol):
    """A quadratic form over perturbations of the shareable parameters."""

    def quad(self, deltas: Mapping[str, Tensor]) -> Tensor:
        """δᵀHδ for n directions; ``deltas[name]`` has shape [n, *param.shape]; absent names are 0."""
        ...


@runtime_checkable
class PairCurvature(Curvature, Protocol):
    """A form that also prices every pair of a family at once, from per-layer quantities of the
    differences W_j − W_l, instead of one dense direction over the family per pair."""

    def quad_pairs(self, family: FamilyPairs) -> Tensor:
        """``quad(family.dense())``, the same numbers."""
        ...


def num_directions(deltas: Mapping[str, Tensor]) -> int:
    return int(next(iter(deltas.values())).shape[0])


def map_directions(fn: Callable[[Params], Tensor], deltas: Mapping[str, Tensor], chunk: int) -> Tensor:
    """Applies a one-direction function to every direction, ``chunk`` at a time under vmap.

    ``chunk=1`` runs a plain loop, for models with operators that have no vmap batching rule.
    """
    n = num_directions(deltas)
    out = []
    for i in range(0, n, chunk):
        part = {k: v[i : i + chunk] for k, v in deltas.items()}
        if chunk == 1:
            out.append(fn({k: v[0] for k, v in part.items()}).reshape(1))
        else:
            out.append(vmap(fn)(part))
    return torch.cat(out)


def flat_dim(shapes: Mapping[str, torch.Size]) -> int:
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def flatten(params: Mapping[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([params[n].reshape(-1) for n in names])


def unflatten(vec: Tensor, shapes: Mapping[str, torch.Size]) -> Params:
    out, i = {}, 0
    for name, shape in shapes.items():
        size = int(torch.Size(shape).numel())
        out[name] = vec[i : i + size].reshape(shape)
        i += size
    return out


def map_products(fn: Callable[[Params], Params], rows: Tensor, shapes: Mapping[str, torch.Size],
                 chunk: int, dtype: torch.dtype | None = None, *, out: Tensor | None = None,
                 weight: float = 1.0) -> Tensor:
    """Applies an operator (e.g. an HVP) to every row of ``rows`` [n, d], ``chunk`` rows per vmap call.

    Rows are flat vectors over ``shapes`` in order; results come back flat the same way, in
    ``dtype`` (default: the rows'; an operator run in bfloat16 may keep its results so, which
    halves the copy and its memory without losing anything it computed), times ``weight``; with
    ``out`` given they are added to it instead (a sum of operators without a second [n, d] buffer).
    ``chunk=1`` runs a plain loop, for models with operators that have no vmap batching rule.
    """
    names = list(shapes)
    sizes = block_sizes(shapes)
    accumulate = out is not None
    # filled in place: over millions of parameters a copy costs like a product
    if out is None:
        out = torch.empty(rows.shape, dtype=dtype or rows.dtype, device=rows.device)
    for i in range(0, rows.shape[0], chunk):
        part = rows[i : i + chunk]
        if chunk == 1:
            res = {n: r[None] for n, r in fn(unflatten(part[0], shapes)).items()}
        else:
            split = {n: x.reshape(part.shape[0], *shapes[n]) for n, x in zip(names, part.split(sizes, dim=1), strict=True)}
            res = vmap(fn)(split)
        for n, dest in zip(names, out[i : i + chunk].split(sizes, dim=1), strict=True):
            value = res[n].detach().reshape(part.shape[0], -1)
            if accumulate:
                dest.add_(value, alpha=weight)
            else:
                dest.copy_(value if weight == 1.0 else value * weight)
    return out


def block_sizes(shapes: Mapping[str, torch.Size]) -> list[int]:
    """Element counts of the parameters, in order: the blocks of a flat vector over ``shapes``."""
    return [int(torch.Size(s).numel()) for s in shapes.values()]


def block_dots(a: Tensor, b: Tensor, sizes: Sequence[int]) -> Tensor:
    """[blocks, n] float64: for each row pair of a and b [n, d], the dot product within each block
    of consecutive columns (``sizes``); with b = G·a, Hutchinson terms of every diagonal block."""
    if not sizes:
        return torch.zeros(0, a.shape[0], dtype=torch.float64, device=a.device)
    pairs = zip(a.split(list(sizes), dim=1), b.split(list(sizes), dim=1), strict=True)
    return torch.stack([torch.linalg.vecdot(x, y, dim=1) for x, y in pairs]).double()
