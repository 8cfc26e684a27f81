"""Held-out errors of relaxed pair fits: the closed form against fitting the pair and scoring its
residuals directly (float64), and the cross-fitted choice of the shrinkage intensity."""

from __future__ import annotations

import pytest
import torch
from hw_cases import TinyMLP, mlp_data

from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.shrinkage import shrink
from hessian_worker.data import Calibration
from hessian_worker.discovery import LayerInfo, discover_layers
from hessian_worker.errors import DataError
from hessian_worker.prepare import prepare
from hessian_worker.relaxed.analysis import relaxed_covariances
from hessian_worker.relaxed.costs import alone_cov, alone_key
from hessian_worker.relaxed.decompose import (
    alone_fit,
    alone_spectrum,
    pair_fit,
    pair_spectrum,
    tail,
)
from hessian_worker.relaxed.holdout import (
    ALONE_SHARES,
    choose_alone_intensities,
    choose_intensities,
    consecutive_pairs,
    cross_fitted_covariances,
    full_data_intensity,
    halves,
    heldout_alone_error,
    heldout_alone_terms,
    heldout_error,
    heldout_pair_error,
    heldout_pair_terms,
)

DAMPING = 0.01


def _cov(rows: int, d: int, gen: torch.Generator, tilt: float = 1.0) -> torch.Tensor:
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2.0 * tilt, d,
                                                                                   dtype=torch.float64)
    return x.T @ x / rows


@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(6, 5, 1), (5, 7, 2), (8, 8, 3)])
def test_heldout_pair_error_is_the_fitted_pair_scored_directly(d_out: int, d_in: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(d_out * 10 + d_in)
    w1, w2 = (torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for _ in range(2))
    fit1, fit2 = _cov(3, d_in, gen), _cov(4, d_in, gen, 1.5)  # rank-deficient, as few tokens give
    test1, test2 = _cov(50, d_in, gen, 0.7), _cov(50, d_in, gen, 1.2)
    f = pair_fit(w1, w2, rank, fit1, fit2, damping=DAMPING)
    direct = heldout_error({"a": w1, "b": w2}, {"a": f.weight(0), "b": f.weight(1)}, {"a": test1, "b": test2})
    closed = heldout_pair_error(heldout_pair_terms(w1, w2, fit1, fit2, test1, test2, damping=DAMPING), rank)
    assert closed == pytest.approx(direct, rel=1e-9, abs=1e-12)
    # scored under its own damped covariances it is the in-sample pair cost
    eye = torch.eye(d_in, dtype=torch.float64)
    own = [c + DAMPING * c.diagonal().mean() * eye for c in (fit1, fit2)]
    in_sample = heldout_pair_error(heldout_pair_terms(w1, w2, fit1, fit2, *own, damping=DAMPING), rank)
    assert in_sample == pytest.approx(tail(pair_spectrum(w1, w2, fit1, fit2, damping=DAMPING), rank), rel=1e-9)


def test_held_out_error_exceeds_in_sample_for_a_rank_deficient_fit() -> None:
    gen = torch.Generator().manual_seed(3)
    d = 12
    w1, w2 = (torch.randn(d, d, generator=gen, dtype=torch.float64) for _ in range(2))
    truth = _cov(4000, d, gen)
    fit1, fit2 = _cov(4, d, gen), _cov(4, d, gen)
    terms = heldout_pair_terms(w1, w2, fit1, fit2, truth, truth, damping=DAMPING)
    spectrum = pair_spectrum(w1, w2, fit1, fit2, damping=DAMPING)
    assert heldout_pair_error(terms, 2) > 3 * tail(spectrum, 2)


def test_choose_intensities_is_the_brute_force_argmin_and_shrinks_for_few_samples() -> None:
    gen = torch.Generator().manual_seed(5)
    d = 10
    names = ["l0", "l1", "l2", "l3"]
    base = torch.randn(d, d, generator=gen, dtype=torch.float64)
    weights = {n: base + torch.randn(d, d, generator=gen, dtype=torch.float64) for n in names}
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)

    def fold(rows: int) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            x = torch.randn(rows, d, generator=gen, dtype=torch.float64) @ mix
            out[n] = x.T @ x / rows
        return out

    folds = (fold(3), fold(3))
    pairs = {"f": [("l0", "l1"), ("l2", "l3")]}
    grid = (0.0, 0.1, 0.4, 0.8)
    chosen = choose_intensities(weights, folds, pairs, {"f": 1}, intensities=grid, damping=DAMPING)
    rho, errors = chosen["f"]
    brute = {}
    for r in grid:
        total = 0.0
        for fit, test in (folds, folds[::-1]):
            for a, b in pairs["f"]:
                f = pair_fit(weights[a], weights[b], 1, shrink(fit[a], r), shrink(fit[b], r), damping=DAMPING)
                total += heldout_error({a: weights[a], b: weights[b]}, {a: f.weight(0), b: f.weight(1)}, test)
        brute[r] = total
    assert errors == pytest.approx(brute, rel=1e-9)
    assert rho == min(brute, key=brute.__getitem__)
    assert rho > 0.0  # 3 samples in 10 dimensions: the raw covariance overfits


@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(6, 5, 1), (5, 7, 2), (8, 8, 3)])
def test_heldout_alone_error_is_the_fitted_layer_scored_directly(d_out: int, d_in: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(d_out + 7 * d_in)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    fit, test = _cov(3, d_in, gen), _cov(50, d_in, gen, 0.7)
    f = alone_fit(w, rank, fit, damping=DAMPING)
    direct = heldout_error({"a": w}, {"a": f.weight(0)}, {"a": test})
    closed = heldout_alone_error(heldout_alone_terms(w, fit, test, damping=DAMPING), rank)
    assert closed == pytest.approx(direct, rel=1e-9, abs=1e-12)
    own = fit + DAMPING * fit.diagonal().mean() * torch.eye(d_in, dtype=torch.float64)
    in_sample = heldout_alone_error(heldout_alone_terms(w, fit, own, damping=DAMPING), rank)
    assert in_sample == pytest.approx(float(alone_spectrum(w, fit, damping=DAMPING)[rank:].sum()), rel=1e-9)


def test_choose_alone_intensities_is_the_brute_force_argmin_over_the_alone_ranks() -> None:
    gen = torch.Generator().manual_seed(8)
    d = 10
    names = ["l0", "l1", "l2"]
    weights = {n: torch.randn(d, d, generator=gen, dtype=torch.float64) for n in names}
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    folds = tuple({n: (x := torch.randn(3, d, generator=gen, dtype=torch.float64) @ mix).T @ x / 3 for n in names}
                  for _ in range(2))
    grid = (0.0, 0.1, 0.4, 0.8)
    rho, errors = choose_alone_intensities(weights, folds, {"f": names}, intensities=grid, damping=DAMPING)["f"]
    brute = {}
    for r in grid:
        total = 0.0
        for fit, test in (folds, folds[::-1]):
            for n in names:
                for rank in (2, 3, 4):  # ALONE_SHARES of 10
                    f = alone_fit(weights[n], rank, shrink(fit[n], r), damping=DAMPING)
                    total += heldout_error({n: weights[n]}, {n: f.weight(0)}, test)
        brute[r] = total
    assert [max(1, round(s * d)) for s in ALONE_SHARES] == [2, 3, 4]
    assert errors == pytest.approx(brute, rel=1e-9)
    assert rho == min(brute, key=brute.__getitem__)


def test_consecutive_pairs_by_index_within_names() -> None:
    layers = [LayerInfo(name=f"l{i}", family="f" if i < 5 else "g", index=i, shape=(2, 2)) for i in range(7)]
    pairs = consecutive_pairs(list(reversed(layers)), [f"l{i}" for i in range(7) if i != 2])
    assert pairs == {"f": [("l0", "l1"), ("l3", "l4")], "g": [("l5", "l6")]}


def test_halves_alternate_over_all_samples_and_refuse_one_sample() -> None:
    data = Calibration([{"x": torch.arange(5).view(5, 1)}, {"x": torch.arange(5, 6).view(1, 1)},
                        {"x": torch.arange(6, 7).view(1, 1)}])
    a, b = halves(data)
    assert [t["x"].flatten().tolist() for t in a.batches] == [[0, 2, 4], [6]]
    assert [t["x"].flatten().tolist() for t in b.batches] == [[1, 3], [5]]
    ones = Calibration([{"x": torch.full((1, 1), i)} for i in range(3)])  # batches of one sample
    a, b = halves(ones)
    assert [int(t["x"]) for t in a.batches] == [0, 2] and [int(t["x"]) for t in b.batches] == [1]
    with pytest.raises(DataError, match="two calibration samples"):
        halves(Calibration([{"x": torch.zeros(1, 1)}]))


def test_cross_fitted_whitening_is_the_output_scaled_covariance_shrunk_by_the_chosen_intensity() -> None:
    torch.manual_seed(0)
    model = TinyMLP(depth=4).double().eval()

    def config(grid: list[float]) -> AnalyzeConfig:
        return AnalyzeConfig(scheme="relaxed", relaxed={"rank": 1, "shrinkage": grid}, dtype="float64",
                             device="cpu", progress=False)

    prep = prepare(model, mlp_data(n=6, batch=3), config([]))
    names = [x.name for x in discover_layers(prep.model)]
    plain = relaxed_covariances(prep.model, prep.data, names, config([]))
    fitted = cross_fitted_covariances(prep.model, prep.data, names, config([0.0, 0.5, 0.9]))
    family = {x.name: x.family for x in discover_layers(prep.model)}
    assert set(fitted.folds) == set(fitted.intensity) == set(family.values())
    for fam, (rho, errors) in fitted.folds.items():
        assert set(errors) == {0.0, 0.5, 0.9}
        assert errors[rho] == min(errors.values())
        # 6 samples, folds of 3: the ridge λ = ρ/(1 − ρ) halves
        assert fitted.intensity[fam] == pytest.approx(rho / (2 - rho) if rho else 0.0, rel=1e-12)
    for n in names:
        torch.testing.assert_close(fitted.covs[n], shrink(plain[n], fitted.intensity[family[n]]), rtol=1e-12,
                                   atol=1e-14)
        # a layer alone: its own cross-fitted intensity, carried to all the data the same way
        alone_rho = fitted.alone_folds[family[n]][0]
        assert fitted.alone_intensity[family[n]] == pytest.approx(alone_rho / (2 - alone_rho) if alone_rho else 0.0)
        torch.testing.assert_close(fitted.alone_covs[n], shrink(plain[n], fitted.alone_intensity[family[n]]),
                                   rtol=1e-12, atol=1e-14)
        state = fitted.whitening()
        differs = fitted.alone_intensity[family[n]] != fitted.intensity[family[n]]
        assert (alone_key(n) in state) == differs
        assert alone_cov(state, n) is (fitted.alone_covs[n] if differs else fitted.covs[n])
    # the grid {0} is the unshrunk whitening; relaxed_covariances takes the cross-fitted path
    same = relaxed_covariances(prep.model, prep.data, names, config([0.0]))
    for n in names:
        torch.testing.assert_close(same[n], plain[n], rtol=1e-12, atol=1e-14)


def test_full_data_intensity_scales_the_ridge_by_the_sample_ratio() -> None:
    # Ĝ = (1 − ρ)G + ρμI ∝ G + λμI, λ = ρ/(1 − ρ): halves at ρ = 0.5 (λ = 1) -> λ = 0.5 -> ρ = 1/3
    assert full_data_intensity(0.5, 8, 16) == pytest.approx(1 / 3)
    assert full_data_intensity(0.0, 8, 16) == 0.0
    assert full_data_intensity(0.4, 16, 16) == pytest.approx(0.4)


def test_one_calibration_sample_leaves_the_whitening_unshrunk() -> None:
    torch.manual_seed(0)
    model = TinyMLP(depth=2).double().eval()
    config = AnalyzeConfig(scheme="relaxed", relaxed={"rank": 1}, dtype="float64", device="cpu", progress=False)
    prep = prepare(model, mlp_data(n=1, batch=1), config)
    names = [x.name for x in discover_layers(prep.model)]
    fitted = cross_fitted_covariances(prep.model, prep.data, names, config)
    plain = relaxed_covariances(prep.model, prep.data, names,
                                config.model_copy(update={"relaxed": config.relaxed.model_copy(update={"shrinkage": []})}))
    assert set(fitted.intensity.values()) == {0.0}
    for n in names:
        torch.testing.assert_close(fitted.covs[n], plain[n], rtol=1e-12, atol=1e-14)
