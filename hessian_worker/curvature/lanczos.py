"""Top eigenpairs of a symmetric operator by Lanczos with full reorthogonalization."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    iters: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """(eigenvalues [k] descending, eigenvectors [dim, k] orthonormal columns).

    Full reorthogonalization (twice, against the whole basis) keeps the Ritz values free of ghost
    copies; it costs iters*dim memory, which callers estimate beforehand. The start vector and any
    restart after an invariant subspace come from ``generator``, so results are reproducible.
    """
    m = max(1, min(iters, dim))
    k = min(k, m)
    basis = torch.zeros(m, dim, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []

    def random_unit() -> Tensor:
        v = torch.randn(dim, generator=generator, dtype=dtype).to(device)
        return v / v.norm()

    v = random_unit()
    used = m
    for j in tqdm(range(m), desc="lanczos", disable=not progress, leave=False):
        basis[j] = v
        w = matvec(v)
        alpha = float(w @ v)
        w = w - alpha * v
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        if j == m - 1:
            break
        beta = float(w.norm())
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if beta <= 1e-10 * max(scale, 1e-30):
            # invariant subspace: continue in a fresh direction orthogonal to the basis
            w = random_unit()
            for _ in range(2):
                w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
            if float(w.norm()) < 1e-8:
                used = j + 1
                break
            betas.append(0.0)
            v = w / w.norm()
        else:
            betas.append(beta)
            v = w / beta
    alphas_t = torch.tensor(alphas[:used], dtype=torch.float64)
    betas_t = torch.tensor(betas[: used - 1], dtype=torch.float64)
    tri = torch.diag(alphas_t) + torch.diag(betas_t, 1) + torch.diag(betas_t, -1)
    evals, evecs = torch.linalg.eigh(tri)
    top = torch.argsort(evals, descending=True)[:k]
    vecs = basis[:used].T @ evecs[:, top].to(dtype=dtype, device=basis.device)
    return evals[top].to(dtype), vecs
