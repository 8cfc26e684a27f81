"""Covariance shrinkage: the estimators against float64 references and known covariances, the
sample unit of the Ledoit–Wolf intensity, and the merge at intensities 0 and 1."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from hw_cases import mlp_data, tiny_mlp
from sklearn.covariance import ledoit_wolf, oas

from geoshare.cli.model_flags import shrinkage_setting
from hessian_worker.curvature.layerwise import LayerwiseCurvature, layerwise_merge
from hessian_worker.curvature.shrinkage import (
    SecondMoments,
    intensity,
    ledoit_wolf_intensity,
    oas_intensity,
    shrink,
    shrunk_covariance,
    unit_squares,
)
from hessian_worker.options import AnalyzeConfig, Shrinkage


def _moments(x: torch.Tensor) -> SecondMoments:
    """Row-unit moments of samples x [n, d] (each row its own sample)."""
    units, square = unit_squares(x)
    return SecondMoments(x.T @ x, x.shape[0], units, square)


def _true_cov(d: int, seed: int) -> torch.Tensor:
    """A covariance with a spread spectrum (eigenvalues 0.5 to 5) in a random basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.linspace(0.5, 5.0, d, dtype=torch.float64)) @ q.T


def _samples(cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cov.shape[0], generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T


@pytest.mark.parametrize("n,d", [(30, 60), (200, 20), (1000, 8)])
def test_ledoit_wolf_matches_sklearn(n: int, d: int) -> None:
    x = _samples(_true_cov(d, 0), n, 1)
    shrunk, rho = shrunk_covariance(_moments(x), Shrinkage.ledoit_wolf)
    ref_cov, ref_rho = ledoit_wolf(x.numpy(), assume_centered=True)
    assert rho == pytest.approx(ref_rho, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(shrunk.numpy(), ref_cov, rtol=1e-10, atol=1e-12)


def test_oas_follows_its_closed_form_and_sklearn_for_large_d() -> None:
    d, n = 200, 50
    x = _samples(_true_cov(d, 2), n, 3)
    s = (x.T @ x / n).numpy()
    tr, tr_sq = np.trace(s), (s * s).sum()
    closed = min(1.0, ((1 - 2 / d) * tr_sq + tr**2) / ((n + 1 - 2 / d) * (tr_sq - tr**2 / d)))
    rho = oas_intensity(torch.from_numpy(s), n)
    assert rho == pytest.approx(closed, rel=1e-12)
    # sklearn drops the 2/d terms (its docs): equal up to O(1/d)
    assert rho == pytest.approx(oas(x.numpy(), assume_centered=True)[1], rel=0.02)


@pytest.mark.parametrize("setting", [Shrinkage.ledoit_wolf, Shrinkage.oas])
def test_shrunk_is_closer_to_the_truth_than_the_sample_covariance_when_n_below_d(setting: Shrinkage) -> None:
    d, n = 40, 20
    truth = _true_cov(d, 4)
    for seed in range(5):
        x = _samples(truth, n, 10 + seed)
        m = _moments(x)
        shrunk, rho = shrunk_covariance(m, setting)
        assert 0.0 < rho <= 1.0
        assert torch.linalg.norm(shrunk - truth) < 0.8 * torch.linalg.norm(m.covariance - truth)


@pytest.mark.parametrize("setting", [Shrinkage.ledoit_wolf, Shrinkage.oas])
def test_equals_the_sample_covariance_when_n_far_above_d(setting: Shrinkage) -> None:
    x = _samples(_true_cov(6, 5), 200_000, 6)
    m = _moments(x)
    shrunk, rho = shrunk_covariance(m, setting)
    assert 0.0 <= rho < 1e-3
    torch.testing.assert_close(shrunk, m.covariance, rtol=1e-3, atol=1e-3)


def test_intensities_stay_in_unit_interval_and_fixed_settings_pass_through() -> None:
    for seed, (n, d) in enumerate([(2, 50), (3, 3), (50, 5), (7, 100)]):
        m = _moments(_samples(_true_cov(d, seed), n, seed + 20))
        for setting in (Shrinkage.ledoit_wolf, Shrinkage.oas):
            assert 0.0 <= intensity(m, setting) <= 1.0
        assert intensity(m, Shrinkage.none) == 0.0
        assert intensity(m, 0.25) == 0.25
    # a multiple of the identity has nothing to shrink
    eye = SecondMoments(torch.eye(4, dtype=torch.float64) * 8, 4, 4, 4 * 4.0)
    assert ledoit_wolf_intensity(eye) == 0.0


def test_shrink_keeps_the_trace_and_reaches_the_scaled_identity() -> None:
    cov = _true_cov(5, 7)
    torch.testing.assert_close(shrink(cov, 0.0), cov)
    mu = cov.trace() / 5
    torch.testing.assert_close(shrink(cov, 1.0), mu * torch.eye(5, dtype=torch.float64))
    half = shrink(cov, 0.5)
    torch.testing.assert_close(half.trace(), cov.trace())
    torch.testing.assert_close(half, 0.5 * cov + 0.5 * mu * torch.eye(5, dtype=torch.float64))


def test_sample_units_count_a_samples_rows_together() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    units, square = unit_squares(x)
    assert units == 3
    assert square == pytest.approx(sum(float((s.T @ s).pow(2).sum()) for s in x))
    # one row per sample: the textbook Σ‖x‖⁴
    rows = x.reshape(-1, 4)
    assert unit_squares(rows[:, None, :]) == pytest.approx(unit_squares(rows))


def test_correlated_rows_within_a_sample_shrink_more_than_independent_rows() -> None:
    """Rows repeated within a sample carry no new information: counting samples, not rows, as the
    units of independence gives the intensity of the distinct rows alone."""
    x = _samples(_true_cov(30, 9), 20, 11)
    alone = ledoit_wolf_intensity(_moments(x))
    repeated = x[:, None, :].expand(20, 4, 30)  # every sample is one row seen 4 times
    units, square = unit_squares(repeated)
    m = SecondMoments(4 * (x.T @ x), 80, units, square)
    assert ledoit_wolf_intensity(m) == pytest.approx(alone, rel=1e-10)
    rows_as_units = SecondMoments(m.total, 80, *unit_squares(repeated.reshape(80, 30)))
    assert ledoit_wolf_intensity(rows_as_units) < alone


def test_merge_reduces_to_the_layerwise_merge_at_0_and_a_trace_weighted_mean_at_1() -> None:
    model, data = tiny_mlp(), mlp_data(n=12)
    names = [f"blocks.{i}.fc.weight" for i in range(3)]
    params = {n: p.detach() for n, p in model.named_parameters()}
    plain = LayerwiseCurvature.collect(model, data, names)
    at0 = LayerwiseCurvature.collect(model, data, names, shrinkage=0.0)
    torch.testing.assert_close(at0.merge(names, params, 0.0), plain.merge(names, params, 0.0))
    torch.testing.assert_close(at0.merge(names, params, 0.0),
                               layerwise_merge([params[n] for n in names], [plain.cov[n] for n in names], damping=0.0))
    at1 = LayerwiseCurvature.collect(model, data, names, shrinkage=1.0)
    mus = [float(plain.cov[n].trace()) / 4 for n in names]
    expected = sum(mu * params[n] for mu, n in zip(mus, names, strict=True)) / sum(mus)
    torch.testing.assert_close(at1.merge(names, params, 0.0), expected)
    # estimated intensities are reported per layer and lie strictly between the two
    lw = LayerwiseCurvature.collect(model, data, names, shrinkage=Shrinkage.ledoit_wolf)
    assert set(lw.intensities) == set(names)
    assert all(0.0 <= r <= 1.0 for r in lw.intensities.values())


def test_config_and_cli_accept_estimators_and_intensities() -> None:
    assert AnalyzeConfig(shrinkage="oas").shrinkage is Shrinkage.oas
    assert AnalyzeConfig(shrinkage=0.3).shrinkage == 0.3
    with pytest.raises(ValueError):
        AnalyzeConfig(shrinkage=1.5)
    assert shrinkage_setting("ledoit-wolf") is Shrinkage.ledoit_wolf
    assert shrinkage_setting("0.2") == 0.2
    for bad in ("1.2", "lw", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match="number in"):
            shrinkage_setting(bad)


def test_streamed_decoders_refuse_shrinkage_they_do_not_apply() -> None:
    from hessian_worker.errors import BackendError
    from hessian_worker.llm.analyze import check_streamed_backend

    check_streamed_backend(AnalyzeConfig(backend="kfac"))
    check_streamed_backend(AnalyzeConfig(backend="kfac", shrinkage=0.0))
    with pytest.raises(BackendError, match="--shrinkage none"):
        check_streamed_backend(AnalyzeConfig(backend="layerwise", shrinkage="ledoit-wolf"))
