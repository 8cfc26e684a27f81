"""One shared tensor plus a low-rank correction per member: W_ℓ ≈ S + A_ℓ B_ℓ for a class of layers.

Objective: the basis scheme's (basis/decompose.py), the whitened error

    E(S, {Δ_ℓ}) = Σ_ℓ tr((W_ℓ − S − Δ_ℓ) G̃_ℓ (W_ℓ − S − Δ_ℓ)ᵀ),   rank Δ_ℓ ≤ r,

with G̃_ℓ the damped input covariance (scaled by the output-side curvature, basis/scales.py, so E is a
predicted loss change). Two exact partial minimizers:

- S-step, Δ fixed: ∂E/∂S = 0 gives S = (Σ_ℓ (W_ℓ − Δ_ℓ) G̃_ℓ)(Σ_ℓ G̃_ℓ)⁻¹ (the layerwise merge of
  the corrected weights; with r = 0 it is the tie scheme's layerwise merge).
- Δ-step, S fixed: the members separate, and with G̃_ℓ = L_ℓ L_ℓᵀ, tr(R G̃ Rᵀ) = ‖R L_ℓ‖², so by
  Eckart–Young Δ_ℓ = [(W_ℓ − S) L_ℓ]_r L_ℓ⁻¹ (the whitened truncated SVD of the residual), leaving
  Σ_{i>r} σ_i((W_ℓ − S) L_ℓ)².

A class of one: S = W_ℓ, E = 0 (the layer keeps its dense weight; see apply.py). A layer of an
``alone`` family (solver.schema.FamilySpec.alone) keeps no S at all: W_ℓ ≈ A_ℓ B_ℓ, and the Δ-step with
S = 0 is its optimum, Δ_ℓ = [W_ℓ L_ℓ]_r L_ℓ⁻¹ with E = Σ_{i>r} σ_i(W_ℓ L_ℓ)² (``alone_fit``,
``alone_spectrum``): per-layer low rank as the basis scheme's class of one fits it, on the same scale
as the pair costs.

A pair has a closed form (the joint optimum, not just a partial one). Minimizing over S first,
min_S ‖X₁ − S‖²_{G̃₁} + ‖X₂ − S‖²_{G̃₂} = tr((X₁ − X₂) H (X₁ − X₂)ᵀ) with the parallel sum
H = G̃₁ (G̃₁ + G̃₂)⁻¹ G̃₂ = (G̃₁⁻¹ + G̃₂⁻¹)⁻¹ (symmetric positive definite). With X_ℓ = W_ℓ − Δ_ℓ the
pair error is tr((D − E) H (D − E)ᵀ), D = W₁ − W₂, E = Δ₁ − Δ₂, and the differences of two rank-r
matrices are exactly the matrices of rank ≤ 2r. So, with H = L_H L_Hᵀ,

    E*({1, 2}) = Σ_{i>2r} σ_i(D L_H)²,   E = [D L_H]_{2r} L_H⁻¹,

split into Δ₁ (the even-numbered singular triplets) and −Δ₂ (the odd ones; any split is optimal),
and S from the S-step. This is the pair cost the solver gets (costs.py): one eigenvalue problem per
pair, and its spectrum gives the cost at every rank at once.

Three or more members: the joint optimum has no closed form (each Δ_ℓ is constrained to rank r
separately, so it is no longer one truncated SVD). Eliminating the corrections exactly (variable
projection) leaves a function of S alone,

    f(S) = min_Δ E(S, Δ) = Σ_ℓ Σ_{i>r} σ_i((W_ℓ − S) L_ℓ)²,   ∇f(S) = −2 Σ_ℓ (W_ℓ − S − Δ_ℓ*) G̃_ℓ

(Δ_ℓ* is optimal for S, so its own variation drops out of the gradient: the envelope theorem), and
``class_fit`` minimizes f by L-BFGS from S⁰ = the layerwise merge of the W_ℓ (the r = 0 optimum).
Plain alternation of the two exact steps also descends, but it crawls (measured on 3-member
classes: 10-15% above the optimum after 30 rounds, ~1% after 500), while L-BFGS on f reaches the
best of several L-BFGS runs over all factors within 50 iterations; f is not convex, so this is a
local method, and the tests compare it with that reference. The default is 20 iterations
(``RelaxedOptions.rounds``): on a 6-member class of correlated 384x384 weights 0.04% above 50
iterations at 40% of the time (1-2% above on the tests' small random classes); candidates are fitted
by the hundreds while measured, so the time counts.

All arithmetic runs in float64; callers cast the factors back to the model's dtype. Each correction
is stored as factors A_ℓ = U_r Σ_r^½ (d_out × r) and B_ℓ = Σ_r^½ V_rᵀ L_ℓ⁻¹ (r × d_in), balanced so
neither factor's scale depends on the other's (what healing's optimizer sees).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hessian_worker.basis.decompose import DTYPE, damped, lapack_threads, whitening
from hessian_worker.errors import PlanError


@dataclass
class RelaxedFactors:
    """The class's shared S (d_out × d_in) and each member's correction factors A_ℓ (d_out × r) and
    B_ℓ (r × d_in), in member order."""

    shared: Tensor
    left: list[Tensor]
    right: list[Tensor]

    @property
    def rank(self) -> int:
        return int(self.left[0].shape[1])

    def weight(self, i: int) -> Tensor:
        """The dense weight S + A_i B_i that member i computes with."""
        return self.shared + self.left[i] @ self.right[i]


def check_class(weights: Sequence[Tensor], rank: int, covs: Sequence[Tensor] | None = None) -> None:
    """Raises PlanError unless the class is non-empty, of one 2-D shape, 1 ≤ r ≤ min(d_out, d_in), and
    ``covs`` holds one d_in × d_in covariance per member."""
    if not weights:
        raise PlanError("a relaxed class needs at least one weight")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) > 1 or len(next(iter(shapes))) != 2:
        raise PlanError(f"a relaxed class needs 2-D weights of one shape, got {sorted(shapes)}")
    d_out, d_in = weights[0].shape
    if not 1 <= rank <= min(d_out, d_in):
        raise PlanError(
            f"relaxed correction rank {rank} must be between 1 and min(d_out, d_in) = {min(d_out, d_in)} "
            f"for {d_out}x{d_in} weights; lower the rank"
        )
    if covs is not None and (len(covs) != len(weights) or any(tuple(c.shape) != (d_in, d_in) for c in covs)):
        raise PlanError(f"need one {d_in}x{d_in} input covariance per member")


def _damped_all(covs: Sequence[Tensor] | None, n: int, d_in: int, damping: float) -> list[Tensor]:
    """G̃_ℓ per member (the identity for every member when ``covs`` is None: the plain Frobenius error)."""
    if covs is None:
        return [torch.eye(d_in, dtype=DTYPE) for _ in range(n)]
    return [damped(c, damping) for c in covs]


def parallel_sum(g1: Tensor, g2: Tensor) -> Tensor:
    """H = G₁ (G₁ + G₂)⁻¹ G₂ = (G₁⁻¹ + G₂⁻¹)⁻¹, symmetrized against round-off."""
    with lapack_threads(g1.shape[0]):
        h = g1 @ torch.linalg.solve(g1 + g2, g2)
    return 0.5 * (h + h.T)


def merge_shared(targets: Sequence[Tensor], gs: Sequence[Tensor]) -> Tensor:
    """The S-step: argmin_S Σ_ℓ tr((X_ℓ − S) G̃_ℓ (X_ℓ − S)ᵀ) = (Σ X_ℓ G̃_ℓ)(Σ G̃_ℓ)⁻¹."""
    total = sum(gs)
    rhs = sum(x @ g for x, g in zip(targets, gs, strict=True))
    with lapack_threads(total.shape[0]):
        return torch.linalg.solve(total, rhs.T).T  # Σ G̃ is symmetric


def pair_spectrum(
    w1: Tensor, w2: Tensor, cov1: Tensor | None = None, cov2: Tensor | None = None, *, damping: float = 0.01
) -> Tensor:
    """σ_i(D L_H)², descending: the pair error at correction rank r is the sum past the first 2r.

    Computed as the eigenvalues of D H Dᵀ (d_out ≤ d_in) or L_Hᵀ Dᵀ D L_H, whichever is smaller
    (same non-zero eigenvalues); negative round-off is clipped to 0.
    """
    d = w1.to(DTYPE) - w2.to(DTYPE)
    gs = _damped_all(None if cov1 is None else [cov1, cov2], 2, d.shape[1], damping)
    h = parallel_sum(*gs)
    if d.shape[0] <= d.shape[1]:
        gram = d @ h @ d.T
    else:
        lh = whitening(h, 0.0)
        dl = d @ lh
        gram = dl.T @ dl
    with lapack_threads(gram.shape[0]):
        values = torch.linalg.eigvalsh(0.5 * (gram + gram.T))
    return values.flip(0).clamp_min(0.0)


def tail(spectrum: Tensor, rank: int) -> float:
    """Σ_{i>2r} of a pair spectrum: E*({1, 2}) at correction rank r."""
    return float(spectrum[2 * rank:].sum())


def alone_spectrum(w: Tensor, cov: Tensor | None = None, *, damping: float = 0.01) -> Tensor:
    """σ_i(W L)², descending: a layer alone at rank r (S = 0) leaves the sum past the first r."""
    w = w.to(DTYPE)
    lower = whitening(_damped_all(None if cov is None else [cov], 1, w.shape[1], damping)[0], 0.0)
    y = w @ lower
    gram = y @ y.T if y.shape[0] <= y.shape[1] else y.T @ y
    with lapack_threads(gram.shape[0]):
        values = torch.linalg.eigvalsh(0.5 * (gram + gram.T))
    return values.flip(0).clamp_min(0.0)


def alone_fit(w: Tensor, rank: int, cov: Tensor | None = None, *, damping: float = 0.01) -> RelaxedFactors:
    """A layer alone (no shared tensor): ``shared`` is zero and A B = [W L]_r L⁻¹, the whitened
    truncated SVD, optimal for E = tr((W − A B) G̃ (W − A B)ᵀ) (Eckart–Young).

    Raises:
        PlanError: not 2-D or a bad rank.
    """
    check_class([w], rank, None if cov is None else [cov])
    w = w.to(DTYPE)
    lower = whitening(_damped_all(None if cov is None else [cov], 1, w.shape[1], damping)[0], 0.0)
    a, b = correction(w, lower, rank)
    return RelaxedFactors(torch.zeros_like(w), [a], [b])


def _split_svd(u: Tensor, s: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Factors (A, B) of Σ_i s_i u_i rows_i with ‖a_i‖ = ‖b_i‖ = √(s_i‖rows_i‖) (u_i unit).

    Why not (U Σ^½, Σ^½ rows): rows_i = v_iᵀ L⁻¹ carries the whitening's scale, so under an
    output-scaled covariance s·G (s ~ 1e-4 on the bench models) that split leaves B 10-200x larger
    than A, and healing's Adam steps, alike per entry, then jolt the small factor: on the quick GPT
    every family alone at 0.5 rose from 0.0083 to 0.0126 held-out loss in its first 20 steps and
    ended at 0.0052; balanced in the weight space it fell to 0.0072 and ended at 0.0044.
    Balanced this way the factors do not depend on the whitening's scale at all."""
    s = s.clamp_min(0.0)
    norms = rows.norm(dim=1).clamp_min(torch.finfo(rows.dtype).tiny)
    return (u * (s * norms).sqrt()).contiguous(), ((s / norms).sqrt()[:, None] * rows).contiguous()


def _padded(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factors padded with zero columns/rows to exactly ``rank`` (when fewer triplets exist)."""
    short = rank - a.shape[1]
    if short <= 0:
        return a, b
    return (torch.cat([a, a.new_zeros(a.shape[0], short)], dim=1),
            torch.cat([b, b.new_zeros(short, b.shape[1])], dim=0))


def pair_fit(
    w1: Tensor, w2: Tensor, rank: int, cov1: Tensor | None = None, cov2: Tensor | None = None, *,
    damping: float = 0.01,
) -> RelaxedFactors:
    """The joint optimum of a pair (module docstring): E = [D L_H]_{2r} L_H⁻¹ split into Δ₁ − Δ₂,
    then S from the S-step.

    Raises:
        PlanError: mixed shapes or a bad rank.
    """
    check_class([w1, w2], rank, None if cov1 is None else [cov1, cov2])
    ws = [w1.to(DTYPE), w2.to(DTYPE)]
    gs = _damped_all(None if cov1 is None else [cov1, cov2], 2, ws[0].shape[1], damping)
    lh = whitening(parallel_sum(*gs), 0.0)
    with lapack_threads(min(ws[0].shape)):
        u, s, vh = torch.linalg.svd((ws[0] - ws[1]) @ lh, full_matrices=False)
        keep = min(2 * rank, s.numel())
        rows = torch.linalg.solve(lh.T, vh[:keep].T).T  # v_iᵀ L_H⁻¹
    first, second = slice(0, keep, 2), slice(1, keep, 2)
    a1, b1 = _padded(*_split_svd(u[:, first], s[first], rows[first]), rank)
    a2, b2 = _padded(*_split_svd(-u[:, second], s[second], rows[second]), rank)
    shared = merge_shared([ws[0] - a1 @ b1, ws[1] - a2 @ b2], gs)
    return RelaxedFactors(shared, [a1, a2], [b1, b2])


def correction(residual: Tensor, factor: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The Δ-step of one member: factors of [R L]_r L⁻¹, the best rank-r Δ in ‖(R − Δ) L‖."""
    with lapack_threads(min(residual.shape)):
        u, s, vh = torch.linalg.svd(residual @ factor, full_matrices=False)
        rows = torch.linalg.solve(factor.T, vh[:rank].T).T
    return _padded(*_split_svd(u[:, :rank], s[:rank], rows), rank)


def relaxed_error(
    weights: Sequence[Tensor], factors: RelaxedFactors, covs: Sequence[Tensor] | None = None, *,
    damping: float = 0.01,
) -> float:
    """E = Σ_ℓ tr(δ_ℓ G̃_ℓ δ_ℓᵀ), δ_ℓ = S + A_ℓ B_ℓ − W_ℓ, each member under its own G̃_ℓ."""
    gs = _damped_all(covs, len(weights), weights[0].shape[1], damping)
    total = 0.0
    for i, (w, g) in enumerate(zip(weights, gs, strict=True)):
        r = factors.weight(i) - w.to(DTYPE)
        total += float(((r @ g) * r).sum())
    return total


@dataclass
class ClassFit:
    """The factors of a class and E at the start and after the fit (one value for closed forms)."""

    factors: RelaxedFactors
    history: list[float]


def class_fit(
    weights: Sequence[Tensor], rank: int, covs: Sequence[Tensor] | None = None, *, damping: float = 0.01,
    rounds: int = 20, tol: float = 1e-10,
) -> ClassFit:
    """The factors of one class: exact for one and two members; for more, S minimizes the variable
    projection f(S) = min_Δ E(S, Δ) (module docstring) by L-BFGS from the layerwise merge.

    Raises:
        PlanError: mixed shapes, a bad rank, or covariances that do not fit.
    """
    check_class(weights, rank, covs)
    ws = [w.to(DTYPE) for w in weights]
    d_out, d_in = ws[0].shape
    if len(ws) == 1:
        zeros = RelaxedFactors(ws[0].clone(), [ws[0].new_zeros(d_out, rank)], [ws[0].new_zeros(rank, d_in)])
        return ClassFit(zeros, [0.0])
    if len(ws) == 2:
        pair = pair_fit(ws[0], ws[1], rank, *(covs or (None, None)), damping=damping)
        return ClassFit(pair, [relaxed_error(ws, pair, covs, damping=damping)])
    gs = _damped_all(covs, len(ws), d_in, damping)
    projection = _Projection(ws, gs, rank)
    start = merge_shared(ws, gs)
    first = projection(start)
    best = _descend(projection, start, first, rounds, tol) if rounds else start
    factors = projection.factors(best)
    return ClassFit(factors, [first[0], relaxed_error(ws, factors, covs, damping=damping)])


def fit_members(weights: Sequence[Tensor], rank: int, covs: Sequence[Tensor] | None = None, *, alone: bool = False,
                damping: float = 0.01, rounds: int = 20) -> RelaxedFactors:
    """The factors apply installs for one class: ``alone_fit`` for a layer of an alone family, else
    ``class_fit``.

    Raises:
        PlanError: as those, or a class of several layers marked alone.
    """
    if alone:
        if len(weights) != 1:
            raise PlanError(f"a layer alone is a class of one; got a class of {len(weights)}")
        return alone_fit(weights[0], rank, None if covs is None else covs[0], damping=damping)
    return class_fit(weights, rank, covs, damping=damping, rounds=rounds).factors


class _Projection:
    """f(S) = Σ_ℓ min_{rank Δ ≤ r} tr((W_ℓ − S − Δ) G̃_ℓ (…)ᵀ) = Σ_ℓ Σ_{i>r} σ_i((W_ℓ − S) L_ℓ)², and
    its gradient −2 Σ_ℓ (W_ℓ − S − Δ_ℓ*) G̃_ℓ (Δ_ℓ* optimal, so its own variation drops out)."""

    def __init__(self, ws: Sequence[Tensor], gs: Sequence[Tensor], rank: int) -> None:
        self.ws, self.gs, self.rank = ws, gs, rank
        self.lower = [whitening(g, 0.0) for g in gs]

    def factors(self, shared: Tensor) -> RelaxedFactors:
        pairs = [correction(w - shared, f, self.rank) for w, f in zip(self.ws, self.lower, strict=True)]
        return RelaxedFactors(shared, [a for a, _ in pairs], [b for _, b in pairs])

    def __call__(self, shared: Tensor) -> tuple[float, Tensor]:
        """(f(S), ∇f(S)) from the whitened residuals Y_ℓ = (W_ℓ − S)L_ℓ: with Y_ℓ^r its best rank-r part,
        f = Σ‖Y_ℓ − Y_ℓ^r‖² and (W_ℓ − S − Δ_ℓ*)G̃_ℓ = (Y_ℓ − Y_ℓ^r)L_ℓᵀ. Y_ℓ^r is the projection on the
        top-r eigenvectors of the smaller Gram matrix (YᵀY or YYᵀ): an eigenproblem of min(d_out, d_in),
        several times cheaper than the SVD of Y it replaces."""
        value, grad = 0.0, torch.zeros_like(shared)
        for w, lower in zip(self.ws, self.lower, strict=True):
            y = (w - shared) @ lower
            rest = y - top_part(y, self.rank)
            value += float(rest.pow(2).sum())
            grad -= 2.0 * rest @ lower.T
        return value, grad


def top_part(y: Tensor, rank: int) -> Tensor:
    """The best rank-r approximation of y (Eckart–Young), projected on the top-r eigenvectors of
    yᵀy (y V Vᵀ) or of y yᵀ (U Uᵀ y), whichever is smaller."""
    right = y.shape[1] <= y.shape[0]
    gram = y.T @ y if right else y @ y.T
    with lapack_threads(gram.shape[0]):
        _, vecs = torch.linalg.eigh(gram)
    top = vecs[:, -rank:]
    return (y @ top) @ top.T if right else top @ (top.T @ y)


def _descend(projection: _Projection, start: Tensor, first: tuple[float, Tensor], rounds: int,
             tol: float) -> Tensor:
    """L-BFGS (strong Wolfe) on f(S), scaled by f(S⁰) so the tolerances are relative; the start is
    kept if round-off leaves the result no better."""
    scale = max(first[0], 1e-300)
    shared = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([shared], max_iter=rounds, tolerance_grad=1e-12, tolerance_change=tol,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        value, grad = projection(shared.detach())
        shared.grad = grad / scale
        return torch.tensor(value / scale, dtype=DTYPE)

    opt.step(closure)
    found = shared.detach()
    return found if projection(found)[0] <= first[0] else start
