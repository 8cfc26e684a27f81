"""One shared low-rank basis for a class of same-shape linear layers: W_ℓ ≈ B·C_ℓ.

Objective (the layerwise curvature of curvature/layerwise.py): a layer y = W x with calibration
inputs X changes its outputs by ‖δX‖²/N = tr(δ G δᵀ), G = XᵀX/N, which is also the layerwise
backend's predicted loss change ½δᵀ(2G⊗I)δ. For a class we minimize

    E(B, {C_ℓ}) = Σ_ℓ tr((W_ℓ − B C_ℓ) G̃_ℓ (W_ℓ − B C_ℓ)ᵀ),   G̃ = G + λ·mean(diag G)·I,

over rank-r bases B. λ (``damping``, GPTQ's 1%) keeps G̃ positive definite when the calibration
rows span fewer than d_in directions, and stands in for inputs the calibration set never showed.

Step 1, the whitened SVD (Basis Sharing with SVD-LLM's whitening). With G̃_ℓ = L_ℓ L_ℓᵀ (Cholesky),
E = Σ_ℓ ‖(W_ℓ − B C_ℓ) L_ℓ‖². For an orthonormal B the best C_ℓ is Bᵀ W_ℓ whatever G̃_ℓ is (the
normal equations Bᵀ(W_ℓ − B C) G̃_ℓ = 0), so E = ‖(I − BBᵀ) M‖² with M = [W_1 L_1, …, W_k L_k],
and by Eckart–Young the top-r left singular vectors of M are the exact global minimizer, with
minimum Σ_{i>r} σ_i(M)². The perturbation δ_ℓ = B C_ℓ − W_ℓ is left only in the directions of
least whitened energy: the paper's "project the perturbation onto the low-curvature subspace",
done exactly for this curvature.

Step 2, the correction (``refine``, optional). Step 1 is already optimal under G̃ alone, so
alternating least squares in that norm cannot improve it (a test checks it stays put). The
correction adds the output side of the curvature instead: K-FAC's H_ℓ ≈ A_ℓ ⊗ G_ℓ with A_ℓ
diagonal, a_ℓ fitted to the diagonal GGN F_ℓ by least squares (``output_weights``), and minimizes

    E_a = Σ_ℓ tr(diag(a_ℓ) δ_ℓ G̃_ℓ δ_ℓᵀ)        (E_a = E when a ≡ 1)

by block coordinate descent from the step-1 solution:
  - C-step (exact): C_ℓ = (Bᵀ D_ℓ B)⁻¹ Bᵀ D_ℓ W_ℓ, D_ℓ = diag(a_ℓ);
  - B-step (exact per output row i, then clipped): b_i · Σ_ℓ a_ℓi C_ℓ G̃_ℓ C_ℓᵀ = Σ_ℓ a_ℓi w_ℓi G̃_ℓ C_ℓᵀ,
    and the step ΔB = B* − B is scaled to ‖ΔB‖_F ≤ τ‖B‖_F (trust region: the diagonal K-FAC fit
    is rough, so the basis stays near the whitened-SVD one). E_a is convex in B, so every point of
    the segment from B to B* is no worse than B.
A step is kept only if E_a does not rise (a guard against round-off in the solves), so the
correction never increases the objective it refines.

Side "in" (``side=Side.in_``): the class shares the INPUT factor, W_ℓ ≈ C_ℓ·B with B (r × d_in)
shared and C_ℓ (d_out × r) per member; it saves more when d_in > d_out (see BasisOptions). Same
objective E = Σ_ℓ ‖(C_ℓ B − W_ℓ) L_ℓ‖², but now the whitening multiplies the SHARED factor:
(C_ℓ B) L_ℓ = C_ℓ (B L_ℓ), so what member ℓ sees is the row space of B L_ℓ, which differs between
members unless their L_ℓ agree.
  - Given B, the coefficients are exact per member (normal equations (C B − W) G̃ Bᵀ = 0):
    C_ℓ = W_ℓ G̃_ℓ Bᵀ (B G̃_ℓ Bᵀ)⁻¹ (``input_coef``).
  - With ONE covariance G̃ = L Lᵀ for all members, substitute B̂ = B L: E = Σ_ℓ ‖C_ℓ B̂ − W_ℓ L‖²,
    the vertical stack N = [W_1 L; …; W_k L] (k·d_out × d_in) approximated at rank r, so by
    Eckart–Young B̂ = V_rᵀ (top-r right singular vectors of N), B = V_rᵀ L⁻¹, C_ℓ = W_ℓ L V_r, and
    the minimum is Σ_{i>r} σ_i(N)²: the transpose of the out-side problem.
  - With different G̃_ℓ the top-r right singular vectors V of [W_1 L_1; …; W_k L_k] would give each
    member its own basis V_rᵀ L_ℓ⁻¹, not a shared one, and E has no closed-form minimizer. We take
    B from the pooled covariance Ḡ = mean_ℓ G̃_ℓ (Basis Sharing's whitening by the concatenated
    inputs of the class) as above, scale its rows to unit norm (only its row space matters), then
    refit every C_ℓ exactly under its own G̃_ℓ. That is exact
    for a class of one (so unary costs are exact) and for members with equal input covariances;
    otherwise it is a feasible point: E ≥ the class's optimum ≥ Σ of the members' own optima.
Costs, re-scoring and apply all use this same decomposition, so the predicted error is the
error of what is installed. The correction (``refine``) is the out side's only: its B-step for
side "in" is a generalized Sylvester equation Σ_ℓ C_ℓᵀ A_ℓ C_ℓ B G̃_ℓ = Σ_ℓ C_ℓᵀ A_ℓ W_ℓ G̃_ℓ
(r·d_in unknowns), which has no cheap exact solve.

All arithmetic runs in float64; callers cast the factors back to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hessian_worker.errors import PlanError
from solver.schema import Side

DTYPE = torch.float64
# LAPACK on matrices up to this size runs on one thread: MKL's threaded eigensolvers sync at
# thousands of barriers, so on a busy machine they slow down by orders of magnitude (measured on
# 2 shared cores: eigvalsh of 768x768 took 12 s on 2 threads, 0.05 s on 1), and at these sizes a
# second thread gains little anyway.
SINGLE_THREAD_MAX_N = 4096
_RIDGE = 1e-12  # relative ridge on the normal equations of the correction
_FLOOR = 1e-6  # share of the mean output weight added to every weight, so Bᵀ D B stays invertible


@contextmanager
def lapack_threads(n: int) -> Iterator[None]:
    """One intra-op thread while factoring an n-sized matrix (n ≤ SINGLE_THREAD_MAX_N)."""
    old = torch.get_num_threads()
    if n > SINGLE_THREAD_MAX_N or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class BasisFactors:
    """The shared B and one C_ℓ per member, in member order.

    Side ``out``: B is d_out × r and C_ℓ r × d_in (W_ℓ ≈ B C_ℓ); side ``in``: B is r × d_in and
    C_ℓ d_out × r (W_ℓ ≈ C_ℓ B).
    """

    basis: Tensor
    coefs: list[Tensor]
    side: Side = Side.out

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1] if self.side is Side.out else self.basis.shape[0])

    def weight(self, i: int) -> Tensor:
        """The dense weight (B·C_i, or C_i·B for side in) that member i computes with."""
        if self.side is Side.out:
            return self.basis @ self.coefs[i]
        return self.coefs[i] @ self.basis


@dataclass
class Refinement:
    """The corrected factors and E_a after the start and after every round."""

    factors: BasisFactors
    history: list[float] = field(default_factory=list)


def damped(cov: Tensor, damping: float) -> Tensor:
    """G̃ = G + λ·mean(diag G)·I in float64 (the floor keeps an all-zero G positive definite)."""
    g = cov.to(DTYPE)
    scale = max(float(g.diagonal().mean()), 1e-30)
    return g + damping * scale * torch.eye(g.shape[0], dtype=DTYPE, device=g.device)


def whitening(cov: Tensor, damping: float) -> Tensor:
    """L with L Lᵀ = G̃: Cholesky, or the symmetric square root where round-off breaks Cholesky."""
    g = damped(cov, damping)
    with lapack_threads(g.shape[0]):
        factor, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            return factor
        vals, vecs = torch.linalg.eigh(g)
    return vecs * vals.clamp_min(0.0).sqrt()


def check_class(weights: Sequence[Tensor], rank: int, covs: Sequence[Tensor] | None = None) -> None:
    """Raises PlanError unless the class is non-empty, of one 2-D shape, and r ≤ min(d_out, d_in)."""
    if not weights:
        raise PlanError("a basis class needs at least one weight")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) > 1 or len(next(iter(shapes))) != 2:
        raise PlanError(f"a basis class needs 2-D weights of one shape, got {sorted(shapes)}")
    d_out, d_in = weights[0].shape
    if not 1 <= rank <= min(d_out, d_in):
        raise PlanError(
            f"basis rank {rank} must be between 1 and min(d_out, d_in) = {min(d_out, d_in)} for "
            f"{d_out}x{d_in} weights; lower the rank (a rank that high saves nothing anyway)"
        )
    if covs is not None and (
        len(covs) != len(weights) or any(tuple(c.shape) != (d_in, d_in) for c in covs)
    ):
        raise PlanError(f"need one {d_in}x{d_in} input covariance per member")


def whitened(
    weights: Sequence[Tensor], covs: Sequence[Tensor] | None, damping: float
) -> list[Tensor]:
    """Y_ℓ = W_ℓ L_ℓ (float64); W_ℓ itself when ``covs`` is None (the plain, unwhitened SVD)."""
    if covs is None:
        return [w.to(DTYPE) for w in weights]
    return [w.to(DTYPE) @ whitening(c, damping) for w, c in zip(weights, covs, strict=True)]


def shared_basis(
    weights: Sequence[Tensor],
    rank: int,
    covs: Sequence[Tensor] | None = None,
    *,
    damping: float = 0.01,
    side: Side | str = Side.out,
) -> BasisFactors:
    """Step 1. Side out: B = top-r left singular vectors of [W_1 L_1, …, W_k L_k], C_ℓ = Bᵀ W_ℓ.
    Side in: B = V_rᵀ L̄⁻¹ from the pooled covariance, C_ℓ refit per member (module docstring).

    A class of one is the layer's own whitened truncated SVD (plain low rank) on either side.

    Raises:
        PlanError: mixed shapes, or a rank outside 1..min(d_out, d_in).
    """
    check_class(weights, rank, covs)
    if Side(side) is Side.in_:
        return _input_basis(weights, rank, covs, damping)
    m = torch.cat(whitened(weights, covs, damping), dim=1)
    with lapack_threads(min(m.shape)):
        u, _, _ = torch.linalg.svd(m, full_matrices=False)
    basis = u[:, :rank].contiguous()
    return BasisFactors(basis, [basis.T @ w.to(DTYPE) for w in weights])


def _input_basis(
    weights: Sequence[Tensor], rank: int, covs: Sequence[Tensor] | None, damping: float
) -> BasisFactors:
    """Side in: Eckart–Young on the vertical stack under the pooled whitening L̄ (L̄ L̄ᵀ = mean G̃_ℓ,
    which equals the damped mean of the G_ℓ), then the exact coefficients under each G̃_ℓ."""
    ws = [w.to(DTYPE) for w in weights]
    factor = None if covs is None else whitening(sum(c.to(DTYPE) for c in covs) / len(covs), damping)
    stack = torch.cat(ws if factor is None else [w @ factor for w in ws], dim=0)
    with lapack_threads(min(stack.shape)):
        _, _, vh = torch.linalg.svd(stack, full_matrices=False)
        v = vh[:rank].T  # d_in × r, orthonormal columns
        if factor is None:
            basis = v.T.contiguous()
            return BasisFactors(basis, [w @ v for w in ws], Side.in_)
        basis = torch.linalg.solve(factor.T, v).T  # Vᵀ L̄⁻¹
    # unit-norm rows, like the out side's orthonormal columns: the row space (all that matters) is
    # unchanged, but the factors no longer scale with the inputs (1/√s for a covariance s·G), which
    # would leave tiny coefficients and a huge basis for an optimizer to heal
    basis = (basis / basis.norm(dim=1, keepdim=True)).contiguous()
    coefs = [input_coef(basis, w, damped(c, damping)) for w, c in zip(ws, covs, strict=True)]
    return BasisFactors(basis, coefs, Side.in_)


def input_coef(basis: Tensor, weight: Tensor, cov: Tensor | None) -> Tensor:
    """Side in, exact for a given B: C = W G̃ Bᵀ (B G̃ Bᵀ)⁻¹ (``cov`` already damped; None: G̃ = I)."""
    gb = basis.T if cov is None else cov @ basis.T  # d_in × r
    with lapack_threads(basis.shape[0]):
        return torch.linalg.solve(_ridged(basis @ gb), (weight.to(DTYPE) @ gb).T).T


def whitened_error(
    weights: Sequence[Tensor],
    factors: BasisFactors,
    covs: Sequence[Tensor] | None = None,
    *,
    damping: float = 0.01,
    out_weights: Sequence[Tensor] | None = None,
) -> float:
    """E (or E_a with ``out_weights``) = Σ_ℓ tr(diag(a_ℓ) δ_ℓ G̃_ℓ δ_ℓᵀ), δ_ℓ = B C_ℓ − W_ℓ (side out)
    or C_ℓ B − W_ℓ (side in), each member under its own G̃_ℓ."""
    factor = [whitening(c, damping) for c in covs] if covs is not None else None
    return _objective(weights, factors, factor, out_weights)


def _objective(
    weights: Sequence[Tensor],
    factors: BasisFactors,
    factor: Sequence[Tensor] | None,
    out_weights: Sequence[Tensor] | None,
) -> float:
    total = 0.0
    for i, w in enumerate(weights):
        r = factors.weight(i) - w.to(DTYPE)
        if factor is not None:
            r = r @ factor[i]
        sq = r.pow(2)
        total += float(
            (sq * out_weights[i][:, None]).sum() if out_weights is not None else sq.sum()
        )
    return total


def output_weights(diag_ggn: Tensor, cov: Tensor) -> Tensor:
    """a with F ≈ a gᵀ (F the diagonal GGN of W, g = diag G): a_i = Σ_j F_ij g_j / Σ_j g_j².

    The least-squares fit of the diagonal of K-FAC's A ⊗ G to the measured diagonal; clipped at 0,
    since the GGN is PSD.
    """
    g = cov.to(DTYPE).diagonal()
    f = diag_ggn.to(DTYPE)
    return ((f @ g) / max(float(g @ g), 1e-300)).clamp_min(0.0)


def refine(
    weights: Sequence[Tensor],
    factors: BasisFactors,
    covs: Sequence[Tensor] | None = None,
    *,
    out_weights: Sequence[Tensor] | None = None,
    damping: float = 0.01,
    rounds: int = 3,
    trust: float = 0.1,
    tol: float = 1e-10,
) -> Refinement:
    """Step 2: trust-region block coordinate descent on E_a from ``factors`` (see module docstring).

    Without ``out_weights`` (a ≡ 1) the objective is E itself, where the whitened SVD is already the
    global optimum: the rounds then only polish a start that is not (e.g. healed factors).

    Args:
        out_weights: a_ℓ (length d_out) per member; floored at 1e-6·mean so Bᵀ D B stays invertible.
        rounds: C-step + B-step pairs; stops early when a round gains less than ``tol`` relatively.
        trust: τ in ‖ΔB‖_F ≤ τ‖B‖_F.

    Raises:
        PlanError: mixed shapes, a bad rank, or side-in factors (the correction is the out side's).
    """
    check_class(weights, factors.rank, covs)
    if factors.side is not Side.out:
        raise PlanError(
            "the basis correction (refine_rounds > 0) supports side 'out' only; set "
            "refine_rounds=0 or side='out' for this family"
        )
    ws = [w.to(DTYPE) for w in weights]
    gs = [damped(c, damping) for c in covs] if covs is not None else None
    factor = [whitening(c, damping) for c in covs] if covs is not None else None
    a = None
    if out_weights is not None:
        a = [x.to(DTYPE).clamp_min(0.0) for x in out_weights]
        a = [x + _FLOOR * max(float(x.mean()), 1e-30) for x in a]
    basis = factors.basis.to(DTYPE)
    coefs = [c.to(DTYPE) for c in factors.coefs]
    best = _objective(ws, BasisFactors(basis, coefs), factor, a)
    history = [best]
    for _ in range(rounds):
        start = best
        # C-step: exact per member
        new_coefs = [_solve_coef(basis, w, None if a is None else a[i]) for i, w in enumerate(ws)]
        value = _objective(ws, BasisFactors(basis, new_coefs), factor, a)
        if value <= best:
            coefs, best = new_coefs, value
        # B-step: exact minimizer, clipped to the trust region
        target = _solve_basis(ws, coefs, gs, a)
        step = target - basis
        limit = trust * float(basis.norm())
        norm = float(step.norm())
        if norm > limit > 0:
            step = step * (limit / norm)
        candidate = basis + step
        value = _objective(ws, BasisFactors(candidate, coefs), factor, a)
        if value <= best:
            basis, best = candidate, value
        history.append(best)
        if start - best <= tol * max(abs(start), 1e-300):
            break
    return Refinement(BasisFactors(basis, coefs), history)


def _solve_coef(basis: Tensor, w: Tensor, a: Tensor | None) -> Tensor:
    """argmin_C tr(D (W − BC) G̃ (W − BC)ᵀ) = (Bᵀ D B)⁻¹ Bᵀ D W (G̃ positive definite drops out)."""
    bd = basis.T if a is None else basis.T * a[None, :]
    with lapack_threads(basis.shape[1]):
        return torch.linalg.solve(_ridged(bd @ basis), bd @ w)


def _solve_basis(
    ws: Sequence[Tensor],
    coefs: Sequence[Tensor],
    gs: Sequence[Tensor] | None,
    a: Sequence[Tensor] | None,
) -> Tensor:
    """Row i: b_i Σ_ℓ a_ℓi K_ℓ = Σ_ℓ a_ℓi (W_ℓ G̃_ℓ C_ℓᵀ)_i, K_ℓ = C_ℓ G̃_ℓ C_ℓᵀ (one solve if a ≡ 1)."""
    ks, rs = [], []
    for i, (w, c) in enumerate(zip(ws, coefs, strict=True)):
        gc = c.T if gs is None else gs[i] @ c.T  # G̃ Cᵀ, d_in × r
        ks.append(c @ gc)
        rs.append(w @ gc)
    if a is None:
        with lapack_threads(ks[0].shape[0]):
            return torch.linalg.solve(_ridged(sum(ks)), sum(rs).T).T
    lhs = sum(ai[:, None, None] * k[None] for ai, k in zip(a, ks, strict=True))  # d_out × r × r
    rhs = sum(ai[:, None] * r for ai, r in zip(a, rs, strict=True))  # d_out × r
    with lapack_threads(ks[0].shape[0]):
        return torch.linalg.solve(_ridged(lhs), rhs.unsqueeze(-1)).squeeze(-1)


def _ridged(m: Tensor) -> Tensor:
    """m + 1e-12·mean(diag m)·I: keeps rank-deficient normal equations solvable; the accept-only-if-
    no-worse guard in ``refine`` absorbs the (negligible) change of the minimizer."""
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    scale = m.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-300)
    return m + _RIDGE * scale[..., None, None] * eye
