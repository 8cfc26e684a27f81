"""Projected backend (the seed paper's criterion): top-k eigenpairs plus a bulk curvature.

δᵀHδ ≈ Σᵢ λᵢ (uᵢᵀδ)² + λ̄ ‖δ − UUᵀδ‖², λ̄ = (tr H − Σλᵢ)/(d − k). After k Lanczos HVPs and a
Hutchinson trace, every pair costs only projections onto U.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from hessian_worker.curvature.base import CurvatureKind, flat_dim, flatten, unflatten
from hessian_worker.curvature.functional import (
    ggn_hvp,
    ggn_quad_form,
    hessian_hvp,
    hessian_quad_form,
)
from hessian_worker.curvature.hutchinson import trace
from hessian_worker.curvature.lanczos import lanczos
from hessian_worker.errors import MemoryBudgetError
from hessian_worker.objective import Objective

GIB = 1024**3


def lanczos_iters(rank: int, dim: int, iters: int | None) -> int:
    """Default Krylov size: twice the rank plus slack, so the top-k Ritz values converge."""
    return min(dim, iters if iters is not None else 2 * rank + 10)


def memory_bytes(dim: int, rank: int, iters: int, itemsize: int) -> int:
    """Lanczos basis (iters·d) plus the kept eigenvectors (k·d) plus a few work vectors."""
    return (iters + rank + 4) * dim * itemsize


def check_memory(dim: int, rank: int, iters: int, itemsize: int, limit_gb: float) -> int:
    """Refuses before any work when the projected backend would not fit.

    Raises:
        MemoryBudgetError: the estimate exceeds ``limit_gb``; the message names backends that fit.
    """
    need = memory_bytes(dim, rank, iters, itemsize)
    limit = int(limit_gb * GIB)
    if need > limit:
        fit_rank = max(0, (limit // (itemsize * dim) - 4) // 3)
        hint = f"lower rank to {fit_rank} (and lanczos_iters), or " if fit_rank >= 1 else ""
        raise MemoryBudgetError(
            f"projected backend needs about {need / GIB:.2f} GiB ({iters} Lanczos vectors + rank {rank} "
            f"eigenvectors over d={dim} parameters), over memory_limit_gb={limit_gb}; {hint}"
            "use backend='diagonal' (2·d floats) or 'layerwise' (one in×in matrix per layer)",
            need,
            limit,
        )
    return need


class ProjectedCurvature:
    """Top-k eigenspace of H over the stacked shareable parameters, plus isotropic bulk."""

    def __init__(
        self,
        obj: Objective,
        *,
        rank: int,
        generator: torch.Generator,
        kind: CurvatureKind = CurvatureKind.ggn,
        iters: int | None = None,
        probes: int = 32,
        memory_limit_gb: float = 4.0,
        chunk: int = 8,
        progress: bool = False,
    ) -> None:
        self.names = list(obj.names)
        self.shapes = {n: obj.params0[n].shape for n in self.names}
        dim = flat_dim(self.shapes)
        any_p = obj.params0[self.names[0]]
        m = lanczos_iters(rank, dim, iters)
        check_memory(dim, rank, m, any_p.element_size(), memory_limit_gb)
        hvp = ggn_hvp(obj) if kind is CurvatureKind.ggn else hessian_hvp(obj)

        def matvec(v: Tensor) -> Tensor:
            return flatten(hvp(unflatten(v, self.shapes)), self.names).detach()

        evals, vecs = lanczos(matvec, dim, rank, m, generator, dtype=any_p.dtype, device=any_p.device,
                              progress=progress)
        self.eigenvalues = evals
        self.rank = int(evals.numel())
        quad = ggn_quad_form(obj) if kind is CurvatureKind.ggn else hessian_quad_form(obj)
        if self.rank >= dim:
            self.trace, self.trace_err = float(evals.sum()), 0.0
        else:
            self.trace, self.trace_err = trace(quad, obj.params0, probes, generator, chunk=chunk)
        bulk = (self.trace - float(evals.sum())) / max(dim - self.rank, 1)
        # the GGN is PSD: a negative bulk is estimator noise
        self.bulk = max(bulk, 0.0) if kind is CurvatureKind.ggn else bulk
        self.dim = dim
        # per-layer slices of U (k x shape), so a pair projects only its two layers
        self.blocks = {n: b.T.reshape(self.rank, *self.shapes[n])
                       for n, b in unflatten_rows(vecs, self.shapes).items()}

    def quad(self, deltas: Mapping[str, Tensor]) -> Tensor:
        proj = None
        sq = None
        for name, d in deltas.items():
            u = self.blocks[name]
            p = torch.einsum("k...,n...->nk", u, d)
            s = d.reshape(d.shape[0], -1).pow(2).sum(dim=1)
            proj = p if proj is None else proj + p
            sq = s if sq is None else sq + s
        assert proj is not None and sq is not None
        lam = self.eigenvalues.to(device=proj.device, dtype=proj.dtype)
        top = (proj.pow(2) * lam).sum(dim=1)
        rest = (sq - proj.pow(2).sum(dim=1)).clamp_min(0.0)
        return top + self.bulk * rest


def unflatten_rows(vecs: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Splits a [d, k] matrix into per-parameter [size, k] row blocks."""
    out, i = {}, 0
    for name, shape in shapes.items():
        size = int(torch.Size(shape).numel())
        out[name] = vecs[i : i + size]
        i += size
    return out
