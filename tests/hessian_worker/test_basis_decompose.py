"""Basis decomposition: whitened SVD against numpy, optimality of C, and the correction's guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessian_worker.basis.decompose import (
    BasisFactors,
    damped,
    output_weights,
    refine,
    shared_basis,
    whitened_error,
    whitening,
)
from hessian_worker.errors import PlanError


def _class(k: int = 3, d_out: int = 5, d_in: int = 4, rows: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(d_out, d_in, generator=g) for _ in range(k)]
    covs = []
    for _ in range(k):
        x = torch.randn(rows, d_in, generator=g) * torch.linspace(0.2, 2.0, d_in)
        covs.append(x.T @ x / rows)
    return ws, covs


def _numpy_basis(ws, covs, rank: int, damping: float):
    """The reference: numpy Cholesky + SVD of the whitened concatenation."""
    blocks = []
    for i, w in enumerate(ws):
        w = w.numpy()
        if covs is None:
            blocks.append(w)
            continue
        c = covs[i].numpy()
        c = c + damping * np.mean(np.diag(c)) * np.eye(c.shape[0])
        blocks.append(w @ np.linalg.cholesky(c))
    u, s, _ = np.linalg.svd(np.concatenate(blocks, axis=1), full_matrices=False)
    return u[:, :rank], float((s[rank:] ** 2).sum())


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_shared_basis_matches_numpy(whiten: bool, rank: int) -> None:
    ws, covs = _class()
    covs = covs if whiten else None
    f = shared_basis(ws, rank, covs, damping=0.01)
    b_ref, tail = _numpy_basis(ws, covs, rank, 0.01)
    assert f.basis.shape == (5, rank) and all(c.shape == (rank, 4) for c in f.coefs)
    # the same subspace (singular vectors are defined up to sign)
    np.testing.assert_allclose((f.basis @ f.basis.T).numpy(), b_ref @ b_ref.T, atol=1e-10)
    torch.testing.assert_close(f.basis.T @ f.basis, torch.eye(rank, dtype=torch.float64))
    for w, c in zip(ws, f.coefs, strict=True):
        torch.testing.assert_close(c, f.basis.T @ w)
    # the error is the tail of the singular values: Eckart-Young
    assert whitened_error(ws, f, covs, damping=0.01) == pytest.approx(tail, rel=1e-10, abs=1e-12)


def test_whitened_error_is_the_output_error_plus_damping() -> None:
    ws, covs = _class(k=2)
    f = shared_basis(ws, 2, covs)
    expected = sum(
        torch.trace((f.weight(i) - w) @ damped(c, 0.01) @ (f.weight(i) - w).T)
        for i, (w, c) in enumerate(zip(ws, covs, strict=True))
    )
    assert whitened_error(ws, f, covs) == pytest.approx(float(expected), rel=1e-12)


def test_coefficients_are_optimal_for_the_basis() -> None:
    """C = BᵀW minimizes tr((W − BC) G̃ (W − BC)ᵀ) for an orthonormal B, whatever G̃ is."""
    ws, covs = _class(k=2)
    f = shared_basis(ws, 2, covs)
    base = whitened_error(ws, f, covs)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        moved = BasisFactors(
            f.basis, [c + 1e-3 * torch.randn(c.shape, generator=g) for c in f.coefs]
        )
        assert whitened_error(ws, moved, covs) > base


def test_whitening_factor_and_rank_deficient_inputs() -> None:
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    cov = x.T @ x / 2  # rank 2 of 5: only the damping makes it definite
    factor = whitening(cov, 0.01)
    torch.testing.assert_close(factor @ factor.T, damped(cov, 0.01))
    zero = whitening(torch.zeros(3, 3), 0.01)  # a layer that never saw input still factors
    assert torch.isfinite(zero).all()


def test_bad_classes_are_refused() -> None:
    ws, covs = _class()
    with pytest.raises(PlanError, match="min"):
        shared_basis(ws, 5, covs)
    with pytest.raises(PlanError, match="one shape"):
        shared_basis([ws[0], ws[1].T], 1)
    with pytest.raises(PlanError, match="covariance"):
        shared_basis(ws, 1, covs[:2])


def test_correction_keeps_the_svd_optimum() -> None:
    """With a ≡ 1 the whitened SVD is the global optimum: the rounds cannot lower E, nor raise it."""
    ws, covs = _class()
    f = shared_basis(ws, 2, covs)
    start = whitened_error(ws, f, covs)
    out = refine(ws, f, covs, rounds=5, trust=1.0)
    assert all(b <= a for a, b in zip(out.history, out.history[1:], strict=False))
    end = whitened_error(ws, out.factors, covs)
    assert end <= start
    assert end == pytest.approx(start, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correction_never_increases_its_objective(seed: int) -> None:
    ws, covs = _class(seed=seed)
    g = torch.Generator().manual_seed(10 + seed)
    # from a poor start (a random basis): strictly better, monotone round by round
    start = BasisFactors(
        torch.randn(5, 2, generator=g), [torch.randn(2, 4, generator=g) for _ in ws]
    )
    out = refine(ws, start, covs, rounds=8, trust=0.5)
    assert all(b <= a for a, b in zip(out.history, out.history[1:], strict=False))
    assert out.history[-1] < out.history[0]
    assert whitened_error(ws, out.factors, covs) == pytest.approx(out.history[-1], rel=1e-12)
    # under output weights a_ℓ: monotone in E_a from the whitened SVD start
    a = [torch.rand(5, generator=g) + 0.1 for _ in ws]
    f = shared_basis(ws, 2, covs)
    weighted = refine(ws, f, covs, out_weights=a, rounds=6, trust=0.2)
    assert all(y <= x for x, y in zip(weighted.history, weighted.history[1:], strict=False))
    assert weighted.history[-1] < weighted.history[0]
    floored = [x + 1e-6 * float(x.mean()) for x in a]
    assert whitened_error(ws, weighted.factors, covs, out_weights=floored) == pytest.approx(
        weighted.history[-1], rel=1e-12
    )


def test_correction_step_stays_in_the_trust_region() -> None:
    ws, covs = _class(seed=4)
    g = torch.Generator().manual_seed(5)
    basis = torch.randn(5, 2, generator=g)
    start = BasisFactors(basis, [torch.randn(2, 4, generator=g) for _ in ws])
    out = refine(ws, start, covs, rounds=1, trust=0.05)
    assert float((out.factors.basis - basis).norm()) <= 0.05 * float(basis.norm()) * (1 + 1e-12)


def test_output_weights_recover_a_kronecker_diagonal() -> None:
    a = torch.tensor([0.5, 2.0, 1.0])
    cov = torch.diag(torch.tensor([1.0, 3.0, 0.5, 2.0]))
    diag_ggn = a[:, None] * cov.diagonal()[None, :]
    torch.testing.assert_close(output_weights(diag_ggn, cov), a)
