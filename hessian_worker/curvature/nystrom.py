"""Randomized Nyström approximation of a PSD operator from one batched sketch.

Lanczos needs its matrix-vector products one after another; a Nyström sketch asks for all of them
at once, so they run batched under vmap (one primal forward per chunk instead of one per vector).
The same sketch also estimates the trace of every diagonal block (Hutchinson with the sketch's test
vectors), which the projected backend needs for its per-layer bulk curvature.

Tropp, Yurtsever, Udell & Cevher, "Fixed-rank approximation of a positive-semidefinite matrix from
streaming data" (NeurIPS 2017), Algorithm 3: the shift ν keeps the Cholesky factorization stable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hessian_worker.curvature.base import block_dots


@dataclass
class NystromSketch:
    """Eigenpairs of the Nyström approximation Ĝ = Y (ΩᵀY)⁺ Yᵀ, and block traces of G itself."""

    eigenvalues: Tensor  # [s], descending, >= 0
    eigenvectors: Tensor  # [dim, s], orthonormal columns
    block_probes: Tensor  # [blocks, s] float64: dim·ωᵢ,bᵀ(Gωᵢ)_b, each an estimate of tr G_bb

    @property
    def block_traces(self) -> Tensor:
        return self.block_probes.mean(dim=1)


def memory_bytes(dim: int, sketch: int, itemsize: int) -> int:
    """Test vectors, their images, the factor and its singular vectors: four [dim, s] matrices."""
    return (4 * sketch + 4) * dim * itemsize


def nystrom(
    matmat: Callable[[Tensor], Tensor],
    dim: int,
    sketch: int,
    generator: torch.Generator,
    *,
    blocks: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> NystromSketch:
    """Sketches a PSD operator with ``sketch`` orthonormal Gaussian test vectors.

    Args:
        matmat: rows -> rows: ``matmat(X)[i] = G @ X[i]`` for X of shape [n, dim].
        blocks: sizes of consecutive diagonal blocks (summing to ``dim``) whose traces to estimate.

    The test vectors are the Q factor of a Gaussian [dim, s] matrix, Haar distributed, so
    E[ΩΩᵀ] = (s/dim)·I and dim·ωᵢ,bᵀ(Gωᵢ)_b is an unbiased estimate of tr G_bb for every i.
    """
    if sum(blocks) != dim:
        raise ValueError(f"block sizes sum to {sum(blocks)}, not dim={dim}")
    s = max(1, min(sketch, dim))
    # drawn on CPU so a seed means the same on every device
    gauss = torch.randn(dim, s, generator=generator, dtype=dtype)
    omega = torch.linalg.qr(gauss)[0].T.contiguous().to(device)  # [s, dim] rows
    del gauss
    image = matmat(omega)  # [s, dim] rows: G ωᵢ
    block_probes = (block_dots(omega, image, blocks) * dim).cpu()
    core = (omega @ image.T).double()
    core = (core + core.T) / 2
    eye = torch.eye(s, dtype=core.dtype, device=core.device)
    shift = torch.finfo(dtype).eps * dim**0.5 * float(torch.linalg.matrix_norm(image, 2))
    chol, info = torch.linalg.cholesky_ex(core + shift * eye)
    if int(info) != 0:  # rounding left ΩᵀGΩ indefinite: shift past its least eigenvalue
        shift = max(10 * shift, 2 * -float(torch.linalg.eigvalsh(core)[0]))
        chol = torch.linalg.cholesky(core + shift * eye)
    image.add_(omega, alpha=shift)  # Y_ν = Y + νΩ, so that ΩᵀY_ν = ΩᵀY + νI = C Cᵀ
    del omega
    # Fᵀ = C⁻¹ Y_νᵀ, Ĝ_ν = F Fᵀ: the eigenpairs are F's left singular pairs
    factor_rows = torch.linalg.solve_triangular(chol.to(dtype=dtype, device=image.device), image, upper=False)
    del image
    vecs, sigma, _ = torch.linalg.svd(factor_rows.T, full_matrices=False)
    evals = (sigma.double().pow(2) - shift).clamp_min(0.0)
    return NystromSketch(evals.to(dtype), vecs, block_probes)
