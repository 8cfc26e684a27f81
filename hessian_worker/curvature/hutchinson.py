"""Hutchinson estimators (seeded Rademacher probes): trace and diagonal of a curvature matrix."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hessian_worker.curvature.base import Params, map_directions


def rademacher(shapes: Mapping[str, torch.Size], n: int | None, generator: torch.Generator, *,
               dtype: torch.dtype, device: torch.device | str) -> Params:
    """±1 entries from ``generator`` (drawn on CPU so the seed means the same on every device)."""
    lead = () if n is None else (n,)
    out = {}
    for name, shape in shapes.items():
        bits = torch.randint(0, 2, (*lead, *shape), generator=generator)
        out[name] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return out


def trace(quad: Callable[[Params], Tensor], params0: Mapping[str, Tensor], probes: int,
          generator: torch.Generator, *, chunk: int = 8) -> tuple[float, float]:
    """(estimate, standard error) of tr H = E[zᵀHz] from ``probes`` quadratic forms."""
    shapes = {n: p.shape for n, p in params0.items()}
    any_p = next(iter(params0.values()))
    values = []
    for i in range(0, probes, chunk):
        z = rademacher(shapes, min(chunk, probes - i), generator, dtype=any_p.dtype, device=any_p.device)
        values.append(map_directions(quad, z, chunk).detach())
    v = torch.cat(values).to(torch.float64)
    err = float(v.std() / v.numel() ** 0.5) if v.numel() > 1 else float("inf")
    return float(v.mean()), err


def diagonal(hvp: Callable[[Params], Params], params0: Mapping[str, Tensor], probes: int,
             generator: torch.Generator, *, progress: bool = False) -> Params:
    """diag(H) ≈ mean of z ⊙ Hz over ``probes`` Rademacher vectors."""
    shapes = {n: p.shape for n, p in params0.items()}
    any_p = next(iter(params0.values()))
    acc = {n: torch.zeros_like(p) for n, p in params0.items()}
    for _ in tqdm(range(probes), desc="hutchinson diag", disable=not progress, leave=False):
        z = rademacher(shapes, None, generator, dtype=any_p.dtype, device=any_p.device)
        hz = hvp(z)
        for n in acc:
            acc[n] += z[n] * hz[n].detach()
    return {n: a / probes for n, a in acc.items()}
