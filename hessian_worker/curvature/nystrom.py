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

    eigenvalues: Tensor  # [k <= s], descending, >= 0 (those the sketch resolves)
    eigenvectors: Tensor  # [dim, k], orthonormal columns
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
    omega = orthonormal_rows(torch.randn(s, dim, generator=generator, dtype=dtype).to(device))  # [s, dim] rows
    image = matmat(omega)  # [s, dim] rows: G ωᵢ
    block_probes = (block_dots(omega, image, blocks) * dim).cpu()
    # every product over dim below comes from one float64 Gram of [Ω; Y]; only the eigenvectors touch dim again
    joint = gram(omega, image)
    omega_gram, core, image_gram = joint[:s, :s], joint[:s, s:], joint[s:, s:]  # ΩᵀΩ (≈ I), ΩᵀY, YᵀY
    core = (core + core.T) / 2
    shift = torch.finfo(dtype).eps * dim**0.5 * float(torch.linalg.eigvalsh(image_gram)[-1].clamp_min(0.0).sqrt())
    chol, info = torch.linalg.cholesky_ex(core + shift * omega_gram)
    if int(info) != 0:  # rounding left ΩᵀGΩ indefinite: shift past its least eigenvalue
        shift = max(10 * shift, 2 * -float(torch.linalg.eigvalsh(core)[0]))
        chol = torch.linalg.cholesky(core + shift * omega_gram)
    # Y_ν = Y + νΩ, so that ΩᵀY_ν = ΩᵀY + νΩᵀΩ = C Cᵀ; Ĝ_ν = Y_ν (CCᵀ)⁻¹ Y_νᵀ = FᵀF with F = C⁻¹Y_νᵀ, whose
    # eigenpairs come from the s x s matrix F Fᵀ = C⁻¹ Y_νᵀY_ν C⁻ᵀ
    shifted_gram = image_gram + 2 * shift * core + shift**2 * omega_gram
    left = torch.linalg.solve_triangular(chol, shifted_gram, upper=False)
    small = torch.linalg.solve_triangular(chol, left.T, upper=False)
    sigma2, w = torch.linalg.eigh((small + small.T) / 2)
    sigma2, w = sigma2.flip(0), w.flip(1)
    # below this the s x s route cannot resolve an eigenvector (its eigenvalue is ~0 anyway): dropped
    keep = sigma2 > shift + torch.finfo(torch.float64).eps ** 0.5 * float(sigma2[0].clamp_min(0.0))
    sigma2, w = sigma2[keep], w[:, keep]
    # eigenvectors Fᵀ w / σ = Y_ν C⁻ᵀ w / σ: one [k, s] x [s, dim] product, returned as columns (a view)
    coeff = torch.linalg.solve_triangular(chol.T, w / sigma2.sqrt(), upper=True)
    image.add_(omega, alpha=shift)
    del omega
    vecs = coeff.T.to(dtype=dtype, device=image.device) @ image
    evals = (sigma2 - shift).clamp_min(0.0)
    return NystromSketch(evals.to(dtype), vecs.T, block_probes)


def gram(*rows: Tensor, block: int = 1 << 18) -> Tensor:
    """The float64 Gram matrix of the stacked rows of ``rows`` ([n_i, d] each), summed over column
    blocks so the float64 copies stay small: over millions of parameters float32 sums would lose
    the small eigenvalues."""
    n = sum(r.shape[0] for r in rows)
    out = torch.zeros(n, n, dtype=torch.float64, device=rows[0].device)
    for i in range(0, rows[0].shape[1], block):
        x = torch.cat([r[:, i : i + block] for r in rows]).double()
        out += x @ x.T
    return out


def orthonormal_rows(x: Tensor) -> Tensor:
    """Rows of L⁻¹x with LLᵀ = x xᵀ (Cholesky QR): orthonormal, and for Gaussian x Haar distributed
    like a QR factor, at the cost of one Gram instead of a Householder pass. Gaussian rows are
    well conditioned, so the Gram may be summed in x's own precision."""
    chol = torch.linalg.cholesky((x @ x.T).double())
    eye = torch.eye(len(chol), dtype=chol.dtype, device=chol.device)
    return torch.linalg.solve_triangular(chol, eye, upper=False).to(x.dtype) @ x
