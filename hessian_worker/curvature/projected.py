"""Projected backend (the seed paper's criterion): top-k eigenpairs plus a bulk curvature.

δᵀHδ ≈ Σᵢ λᵢ (uᵢᵀδ)² + Σ_ℓ λ̄_ℓ ‖δ_ℓ − U_ℓUᵀδ‖²: the top-k eigenspace exactly, and the rest of
the curvature as one scalar per layer ℓ, λ̄_ℓ = (tr H_ℓℓ − Σᵢ λᵢ‖uᵢ,ℓ‖²)/(d_ℓ − Σᵢ‖uᵢ,ℓ‖²)
(``bulk='layer'``), or as the paper's single scalar λ̄ = (tr H − Σλᵢ)/(d − k) (``'isotropic'``).
Layers differ in curvature by orders of magnitude, so one scalar ranks pairs by plain weight
distance; the per-layer bulk keeps the layers' scales (MiniLM: Spearman vs exact 0.46 -> 0.86).

Eigenpairs come from a Nyström sketch (default for the GGN: every HVP of the sketch in one batched
pass, and the same pass estimates the per-layer traces) or from Lanczos (sequential HVPs, sharper
eigenpairs, any symmetric H) with Hutchinson probes for the traces. After that, every pair costs
only projections onto U. The sketch's HVPs may run in bfloat16 (``SketchPrecision``) while its
vectors and algebra stay in the model's precision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hessian_worker.curvature.base import (
    CurvatureKind,
    block_dots,
    block_sizes,
    flat_dim,
    map_products,
)
from hessian_worker.curvature.functional import ggn_hvp, ggn_matmat, hessian_hvp
from hessian_worker.curvature.lanczos import lanczos
from hessian_worker.curvature.nystrom import memory_bytes as nystrom_bytes
from hessian_worker.curvature.nystrom import nystrom
from hessian_worker.errors import MemoryBudgetError
from hessian_worker.objective import Objective
from hessian_worker.options import Bulk, Eigensolver, SketchPrecision

if TYPE_CHECKING:
    from hessian_worker.costs import FamilyPairs


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (else it emulates them, slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe()) if probe is not None else False
    return False


def sketch_dtype(precision: SketchPrecision, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the sketch's HVPs run in."""
    if precision is SketchPrecision.bfloat16:
        return torch.bfloat16
    if precision is SketchPrecision.auto and model_dtype == torch.float32 and native_bfloat16(device):
        return torch.bfloat16
    return model_dtype


GIB = 1024**3


def lanczos_iters(rank: int, dim: int, iters: int | None) -> int:
    """Default Krylov size: twice the rank plus slack, so the top-k Ritz values converge."""
    return min(dim, iters if iters is not None else 2 * rank + 10)


def memory_bytes(dim: int, rank: int, iters: int, itemsize: int) -> int:
    """Lanczos basis (iters·d) plus the kept eigenvectors (k·d) plus a few work vectors."""
    return (iters + rank + 4) * dim * itemsize


def check_memory(dim: int, rank: int, iters: int, itemsize: int, limit_gb: float, *,
                 sketch: int | None = None) -> int:
    """Refuses before any work when the projected backend would not fit.

    ``sketch`` given: the Nyström path (``sketch`` = rank + oversample vectors); else Lanczos
    (``iters`` vectors).

    Raises:
        MemoryBudgetError: the estimate exceeds ``limit_gb``; the message names backends that fit.
    """
    if sketch is not None:
        need, per_rank, what = nystrom_bytes(dim, sketch, itemsize), 4, f"a Nyström sketch of {sketch} vectors"
    else:
        need, per_rank, what = memory_bytes(dim, rank, iters, itemsize), 3, f"{iters} Lanczos vectors + rank {rank} eigenvectors"
    limit = int(limit_gb * GIB)
    if need > limit:
        fit_rank = max(0, (limit // (itemsize * dim) - 4) // per_rank)
        if sketch is not None:  # the sketch that fits, less the same oversampling
            fit_rank -= sketch - rank
        hint = f"lower rank to {fit_rank}, or " if fit_rank >= 1 else ""
        raise MemoryBudgetError(
            f"projected backend needs about {need / GIB:.2f} GiB ({what} over d={dim} parameters), over "
            f"memory_limit_gb={limit_gb}; {hint}use backend='diagonal' (2·d floats) or 'layerwise' "
            "(one in×in matrix per layer)",
            need,
            limit,
        )
    return need


class ProjectedCurvature:
    """Top-k eigenspace of H over the stacked shareable parameters, plus a per-layer (or one) bulk."""

    def __init__(
        self,
        obj: Objective,
        *,
        rank: int,
        generator: torch.Generator,
        kind: CurvatureKind = CurvatureKind.ggn,
        eigensolver: Eigensolver = Eigensolver.auto,
        bulk: Bulk = Bulk.layer,
        oversample: int = 4,
        precision: SketchPrecision = SketchPrecision.model,
        iters: int | None = None,
        probes: int = 32,
        memory_limit_gb: float = 4.0,
        chunk: int = 8,
        progress: bool = False,
    ) -> None:
        self.names = list(obj.names)
        self.shapes = {n: obj.params0[n].shape for n in self.names}
        dim = flat_dim(self.shapes)
        sizes = block_sizes(self.shapes)
        any_p = obj.params0[self.names[0]]
        if eigensolver is Eigensolver.auto:
            eigensolver = Eigensolver.nystrom if kind is CurvatureKind.ggn else Eigensolver.lanczos
        if eigensolver is Eigensolver.nystrom and kind is not CurvatureKind.ggn:
            raise ValueError("the Nyström sketch needs a PSD operator: use curvature='ggn' or eigensolver='lanczos'")
        if precision is SketchPrecision.bfloat16 and eigensolver is not Eigensolver.nystrom:
            raise ValueError("sketch precision bfloat16 applies to the Nyström sketch: use eigensolver='nystrom' "
                             "(GGN) or precision 'model'")
        # the products may run in a lower precision (nystrom only); the sketch's vectors stay in the model's
        nystrom_sketch = eigensolver is Eigensolver.nystrom
        low = sketch_dtype(precision, any_p.dtype, any_p.device) if nystrom_sketch else any_p.dtype
        self.sketch_dtype = low
        op = obj if low == any_p.dtype else obj.to_dtype(low)
        hvp = ggn_hvp(op) if kind is CurvatureKind.ggn else hessian_hvp(op)
        # batched products: the sketch's images stay in the products' precision
        if kind is CurvatureKind.ggn:
            matmat = ggn_matmat(op, self.shapes, chunk, low)
        else:
            def matmat(rows: Tensor) -> Tensor:
                return map_products(hvp, rows, self.shapes, chunk)

        opts = {"dtype": any_p.dtype, "device": any_p.device}
        if eigensolver is Eigensolver.nystrom:
            sketch = min(dim, rank + oversample)
            check_memory(dim, rank, 0, any_p.element_size(), memory_limit_gb, sketch=sketch)
            found = nystrom(matmat, dim, sketch, generator, blocks=sizes, rank=rank, **opts)
            evals, vecs = found.eigenvalues[:rank], found.eigenvectors[:, :rank]
            block_probes = found.block_probes
        else:
            m = lanczos_iters(rank, dim, iters)
            check_memory(dim, rank, m, any_p.element_size(), memory_limit_gb)
            evals, vecs = lanczos(lambda v: map_products(hvp, v[None], self.shapes, 1)[0], dim, rank, m, generator,
                                  progress=progress, **opts)
            block_probes = None if rank >= dim else rademacher_block_probes(matmat, sizes, probes, generator,
                                                                             chunk=chunk, **opts)
        self.eigensolver = eigensolver
        self.chunk = chunk
        self.eigenvalues = evals
        self.rank = int(evals.numel())
        self.dim = dim
        self.kind = kind
        u_rows = unflatten_rows(vecs, self.shapes)
        # per-layer slices of U (k x shape), so a pair projects only its two layers
        self.blocks = {n: b.T.reshape(self.rank, *self.shapes[n]) for n, b in u_rows.items()}
        block_grams = {n: (b.T @ b).double().cpu() for n, b in u_rows.items()}  # U_ℓᵀU_ℓ, k x k
        weight = {n: g.diagonal() for n, g in block_grams.items()}  # ‖uᵢ,ℓ‖² per i
        lam = evals.double().cpu()
        if block_probes is None or self.rank >= dim:
            traces = {n: float((weight[n] * lam).sum()) for n in self.names}
            self.trace, self.trace_err = float(lam.sum()), 0.0
        else:
            traces = dict(zip(self.names, block_probes.mean(dim=1).tolist(), strict=True))
            totals = block_probes.sum(dim=0)
            self.trace = float(totals.mean())
            self.trace_err = float(totals.std() / totals.numel() ** 0.5) if totals.numel() > 1 else float("inf")
        bulk_all = (self.trace - float(lam.sum())) / max(dim - self.rank, 1)
        self.layer_traces = traces
        if bulk is Bulk.isotropic:
            per_layer = dict.fromkeys(self.names, bulk_all)
        else:
            per_layer = {}
            for n, size in zip(self.names, sizes, strict=True):
                rest_dim = size - float(weight[n].sum())
                rest = traces[n] - float((weight[n] * lam).sum())
                per_layer[n] = rest / rest_dim if rest_dim > 0.5 else 0.0
        # the GGN is PSD: a negative bulk is estimator noise
        clip = kind is CurvatureKind.ggn
        self.bulk = max(bulk_all, 0.0) if clip else bulk_all
        self.layer_bulk = {n: max(v, 0.0) if clip else v for n, v in per_layer.items()}
        # Σ_ℓ λ̄_ℓ U_ℓᵀU_ℓ: what layers a direction does not touch add through its projection
        mix = torch.zeros(self.rank, self.rank, dtype=torch.float64)
        for n, g in block_grams.items():
            mix += self.layer_bulk[n] * g
        self.mix = mix.to(dtype=any_p.dtype, device=any_p.device)

    def quad(self, deltas: Mapping[str, Tensor]) -> Tensor:
        """Σᵢλᵢcᵢ² + Σ_ℓ λ̄_ℓ‖δ_ℓ − U_ℓc‖², c = Uᵀδ, expanded so untouched layers cost nothing."""
        moves = []
        for name, d in deltas.items():
            part = torch.einsum("k...,n...->nk", self.blocks[name], d)
            moves.append((self.layer_bulk[name], part, d.reshape(d.shape[0], -1).pow(2).sum(dim=1)))
        return self._form(moves)

    def quad_pairs(self, family: FamilyPairs) -> Tensor:
        """quad(family.dense()) for all of a family's pairs from k projections per ordered pair of
        layers, U_lᵀ(W_j − W_l) (one [k, d_l] x [d_l, m] product per layer), instead of a
        direction over every layer of the family per pair, of which it moves two."""
        m = len(family.names)

        def projected(name: str, d: Tensor) -> Tensor:  # [rows, k + 1]: U_lᵀd, then ‖d‖²
            sq = d.reshape(d.shape[0], -1).pow(2).sum(dim=1, keepdim=True)
            return torch.cat([torch.einsum("k...,n...->nk", self.blocks[name], d), sq], dim=1)

        # over the ordered pairs of layers; sides() picks U_aᵀd and U_bᵀ(−d), and ‖d‖², for each pair
        table = family.table(projected, self.chunk)
        at_a, at_b = family.sides(table[..., :-1])
        dist, _ = family.sides(table[..., -1])
        bulk = torch.tensor([self.layer_bulk[n] for n in family.names], dtype=dist.dtype, device=dist.device)
        bulk_a, bulk_b = family.sides(bulk[:, None].expand(m, m))
        alpha, beta = family.coef
        return self._form([(bulk_a, alpha * at_a, alpha**2 * dist), (bulk_b, -beta * at_b, beta**2 * dist)])

    def _form(self, moves: Sequence[tuple[float | Tensor, Tensor, Tensor]]) -> Tensor:
        """The form from each moved layer's (λ̄_ℓ, U_ℓᵀδ_ℓ [n, k], ‖δ_ℓ‖² [n]):
        Σᵢλᵢcᵢ² + cᵀ(Σ_ℓ λ̄_ℓU_ℓᵀU_ℓ)c + Σ_moved λ̄_ℓ(‖δ_ℓ‖² − 2cᵀU_ℓᵀδ_ℓ), c = Σ_ℓ U_ℓᵀδ_ℓ."""
        c = sum(part for _, part, _ in moves)
        assert isinstance(c, Tensor)
        lam = self.eigenvalues.to(device=c.device, dtype=c.dtype)
        value = (c.pow(2) * lam).sum(dim=1) + ((c @ self.mix) * c).sum(dim=1)
        for bulk, part, sq in moves:
            value = value + bulk * (sq - 2 * (c * part).sum(dim=1))
        return value.clamp_min(0.0) if self.kind is CurvatureKind.ggn else value


def rademacher_block_probes(matmat: Callable[[Tensor], Tensor], sizes: list[int], probes: int,
                            generator: torch.Generator, *, chunk: int, dtype: torch.dtype,
                            device: torch.device | str) -> Tensor:
    """[blocks, probes] float64: z_bᵀ(Gz)_b per Rademacher probe z, each an estimate of tr G_bb."""
    dim = sum(sizes)
    columns = []
    for i in range(0, probes, chunk):
        n = min(chunk, probes - i)
        # drawn on CPU so a seed means the same on every device
        z = (torch.randint(0, 2, (n, dim), generator=generator) * 2 - 1).to(dtype=dtype, device=device)
        columns.append(block_dots(z, matmat(z), sizes).cpu())
    return torch.cat(columns, dim=1)


def unflatten_rows(vecs: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Splits a [d, k] matrix into per-parameter [size, k] row blocks."""
    return dict(zip(shapes, vecs.split(block_sizes(shapes), dim=0), strict=True))
