"""Relaxed decomposition W_ℓ ≈ S + A_ℓ B_ℓ: the closed forms against L-BFGS in float64, the pair
cost against its own fit, and the alternating fit's guarantees."""

from __future__ import annotations

import pytest
import torch

from hessian_worker.errors import PlanError
from hessian_worker.relaxed.decompose import (
    RelaxedFactors,
    _Projection,
    alone_fit,
    alone_spectrum,
    class_fit,
    fit_members,
    merge_shared,
    pair_fit,
    pair_spectrum,
    parallel_sum,
    relaxed_error,
    tail,
)

DAMPING = 0.01


def _class(k: int = 2, d_out: int = 6, d_in: int = 5, rows: int = 9, seed: int = 0, common: float = 0.0):
    """k weights (a ``common`` share of one shared matrix plus their own) and unequal covariances."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    ws = [common * base + torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(k)]
    covs = []
    for i in range(k):
        x = torch.randn(rows, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2 + i, 2.0, d_in,
                                                                                       dtype=torch.float64)
        covs.append(x.T @ x / rows)
    return ws, covs


def _lbfgs(ws, covs, rank: int, *, starts: int = 3, seed: int = 0) -> float:
    """The least E over S and rank-r factor pairs found by L-BFGS in float64 from several random starts."""
    d_out, d_in = ws[0].shape
    eye = torch.eye(d_in, dtype=torch.float64)
    gs = [eye for _ in ws] if covs is None else [c + DAMPING * c.diagonal().mean() * eye for c in covs]
    best = float("inf")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(starts):
        s = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64).requires_grad_()
        a = [(0.3 * torch.randn(d_out, rank, generator=gen, dtype=torch.float64)).requires_grad_() for _ in ws]
        b = [(0.3 * torch.randn(rank, d_in, generator=gen, dtype=torch.float64)).requires_grad_() for _ in ws]
        best = min(best, _run_lbfgs(ws, gs, s, a, b))
    return best


def _run_lbfgs(ws, gs, s, a, b) -> float:
    opt = torch.optim.LBFGS([s, *a, *b], max_iter=1500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        total = sum((((s + ai @ bi - w) @ g) * (s + ai @ bi - w)).sum()
                    for w, g, ai, bi in zip(ws, gs, a, b, strict=True))
        total.backward()
        return total

    for _ in range(2):
        opt.step(loss)
    return float(loss().detach())


def test_parallel_sum_is_the_harmonic_form() -> None:
    _, (g1, g2) = _class()
    h = parallel_sum(g1, g2)
    torch.testing.assert_close(h, torch.linalg.inv(torch.linalg.inv(g1) + torch.linalg.inv(g2)))
    torch.testing.assert_close(h, h.T)


def test_merge_shared_is_the_s_step_minimum() -> None:
    ws, covs = _class(k=3)
    s = merge_shared(ws, covs).requires_grad_()
    total = sum((((s - w) @ g) * (s - w)).sum() for w, g in zip(ws, covs, strict=True))
    (grad,) = torch.autograd.grad(total, s)
    assert float(grad.abs().max()) < 1e-10


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("rank", [1, 2])
def test_pair_closed_form_is_the_joint_optimum(whiten: bool, rank: int) -> None:
    ws, covs = _class(k=2)
    covs = covs if whiten else None
    fit = pair_fit(ws[0], ws[1], rank, *(covs or (None, None)), damping=DAMPING)
    exact = relaxed_error(ws, fit, covs, damping=DAMPING)
    spectrum = pair_spectrum(ws[0], ws[1], *(covs or (None, None)), damping=DAMPING)
    # the fitted factors reach the spectrum's tail, and no optimizer finds less
    assert exact == pytest.approx(tail(spectrum, rank), rel=1e-9, abs=1e-12)
    found = _lbfgs(ws, covs, rank)
    assert found >= exact * (1 - 1e-6)
    assert found == pytest.approx(exact, rel=1e-4)
    assert all(a.shape == (6, rank) for a in fit.left) and all(b.shape == (rank, 5) for b in fit.right)
    assert all(torch.linalg.matrix_rank(a @ b) <= rank for a, b in zip(fit.left, fit.right, strict=True))


def test_pair_without_covariances_is_half_the_difference_tail() -> None:
    ws, _ = _class(k=2)
    s = torch.linalg.svdvals(ws[0] - ws[1])
    assert tail(pair_spectrum(ws[0], ws[1]), 1) == pytest.approx(0.5 * float((s[2:] ** 2).sum()), rel=1e-10)


def test_pair_spectrum_on_both_sides_of_the_shape() -> None:
    """Wide and tall weights take the two Gram forms; both give the fitted pair's error."""
    for d_out, d_in in ((3, 7), (7, 3)):
        ws, covs = _class(k=2, d_out=d_out, d_in=d_in)
        fit = pair_fit(ws[0], ws[1], 1, covs[0], covs[1], damping=DAMPING)
        spectrum = pair_spectrum(ws[0], ws[1], covs[0], covs[1], damping=DAMPING)
        assert spectrum.numel() == min(d_out, d_in)
        assert relaxed_error(ws, fit, covs, damping=DAMPING) == pytest.approx(tail(spectrum, 1), rel=1e-9)


def test_pair_at_full_correction_rank_is_exact() -> None:
    ws, covs = _class(k=2, d_out=4, d_in=4)
    fit = pair_fit(ws[0], ws[1], 2, covs[0], covs[1], damping=DAMPING)
    assert relaxed_error(ws, fit, covs, damping=DAMPING) < 1e-18 * float(sum(w.pow(2).sum() for w in ws)) + 1e-20


def test_singleton_keeps_its_weight() -> None:
    ws, covs = _class(k=1)
    fit = class_fit(ws, 2, covs[:1], damping=DAMPING)
    torch.testing.assert_close(fit.factors.weight(0), ws[0])
    assert fit.history == [0.0]


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_class_fit_reaches_lbfgs_over_all_factors(whiten: bool, seed: int) -> None:
    ws, covs = _class(k=3, common=1.0, seed=seed)
    covs = covs if whiten else None
    fit = class_fit(ws, 1, covs, damping=DAMPING, rounds=50)
    first, last = fit.history
    assert last < first
    assert relaxed_error(ws, fit.factors, covs, damping=DAMPING) == pytest.approx(last, rel=1e-12)
    found = _lbfgs(ws, covs, 1, starts=4)
    # a local method on a non-convex f: within 0.5% of the best of four L-BFGS runs over S, A_l, B_l
    assert last <= found * 1.005
    assert class_fit(ws, 1, covs, damping=DAMPING).history[-1] <= found * 1.05  # the default 20 iterations


def test_projection_gradient_matches_finite_differences() -> None:
    ws, covs = _class(k=3, seed=5)
    eye = torch.eye(5, dtype=torch.float64)
    gs = [c + DAMPING * c.diagonal().mean() * eye for c in covs]
    projection = _Projection(ws, gs, 1)
    s = merge_shared(ws, gs)
    _, grad = projection(s)
    step = torch.randn(s.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-6
    numeric = (projection(s + h * step)[0] - projection(s - h * step)[0]) / (2 * h)
    assert float((grad * step).sum()) == pytest.approx(numeric, rel=1e-6)


def test_class_fit_without_rounds_is_the_merge_with_its_best_corrections() -> None:
    """Start point: the layerwise merge, each member's correction its exact Δ-step."""
    ws, covs = _class(k=4)
    fit = class_fit(ws, 1, covs, damping=DAMPING, rounds=0)
    eye = torch.eye(5, dtype=torch.float64)
    gs = [c + DAMPING * c.diagonal().mean() * eye for c in covs]
    torch.testing.assert_close(fit.factors.shared, merge_shared(ws, gs))
    assert fit.history[0] == pytest.approx(fit.history[1], rel=1e-12)
    assert fit.history[0] < relaxed_error(ws, RelaxedFactors(fit.factors.shared, [torch.zeros(6, 1, dtype=torch.float64)] * 4,
                                                             [torch.zeros(1, 5, dtype=torch.float64)] * 4), covs,
                                          damping=DAMPING)


def test_bad_classes_are_refused() -> None:
    ws, covs = _class(k=2)
    with pytest.raises(PlanError, match="rank"):
        class_fit(ws, 6, covs)
    with pytest.raises(PlanError, match="one shape"):
        class_fit([ws[0], ws[1][:, :4]], 1)
    with pytest.raises(PlanError, match="covariance"):
        class_fit(ws, 1, covs[:1])


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("rank", [1, 3])
def test_alone_fit_is_the_optimum_without_a_shared_tensor(whiten: bool, rank: int) -> None:
    """A layer alone (S = 0): the whitened truncated SVD reaches what L-BFGS over A, B finds, its
    error is the alone spectrum's tail past r, and it is what fit_members installs for it."""
    ws, covs = _class(k=1, seed=3)
    cov = covs[0] if whiten else None
    fit = alone_fit(ws[0], rank, cov, damping=DAMPING)
    assert torch.count_nonzero(fit.shared) == 0 and fit.left[0].shape == (6, rank)
    error = relaxed_error(ws, fit, None if cov is None else [cov], damping=DAMPING)
    assert error == pytest.approx(float(alone_spectrum(ws[0], cov, damping=DAMPING)[rank:].sum()), rel=1e-9)
    d_out, d_in = ws[0].shape
    eye = torch.eye(d_in, dtype=torch.float64)
    g = eye if cov is None else cov + DAMPING * cov.diagonal().mean() * eye
    gen = torch.Generator().manual_seed(1)
    best = float("inf")
    for _ in range(3):
        a = (0.3 * torch.randn(d_out, rank, generator=gen, dtype=torch.float64)).requires_grad_()
        b = (0.3 * torch.randn(rank, d_in, generator=gen, dtype=torch.float64)).requires_grad_()
        zero = torch.zeros(d_out, d_in, dtype=torch.float64)  # S held at 0: only the factors move
        best = min(best, _run_lbfgs(ws, [g], zero, [a], [b]))
    assert error == pytest.approx(best, rel=1e-6, abs=1e-9)
    installed = fit_members(ws, rank, None if cov is None else [cov], alone=True, damping=DAMPING)
    torch.testing.assert_close(installed.weight(0), fit.weight(0), rtol=0, atol=0)
    with pytest.raises(PlanError, match="class of one"):
        fit_members(ws * 2, rank, alone=True)


@pytest.mark.parametrize("fit_kind", ["alone", "pair", "class"])
def test_corrections_are_balanced_and_blind_to_the_whitening_scale(fit_kind: str) -> None:
    """Every correction's factors have ‖a_i‖ = ‖b_i‖, and scaling the covariances (the output
    scales healing never sees) leaves them as they are: healing's per-entry steps then move both
    factors alike."""
    ws, covs = _class(k={"alone": 1, "pair": 2, "class": 3}[fit_kind], seed=4)

    def fit(scale: float):
        scaled = [scale * c for c in covs]
        if fit_kind == "alone":
            return alone_fit(ws[0], 2, scaled[0], damping=DAMPING)
        if fit_kind == "pair":
            return pair_fit(ws[0], ws[1], 2, *scaled, damping=DAMPING)
        return class_fit(ws, 2, scaled, damping=DAMPING, rounds=0).factors

    plain, tiny = fit(1.0), fit(1e-6)
    for a, b in zip(plain.left, plain.right, strict=True):
        torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1), rtol=1e-10, atol=0)
    for got, want in zip(tiny.left + tiny.right, plain.left + plain.right, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
