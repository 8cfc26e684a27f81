"""Shrinkage of input covariances toward a scaled identity, with the intensity estimated from the data.

The layerwise merge W* = (Σ W_k G_k)(Σ G_k)⁻¹ and the layerwise / basis costs use each layer's
input second moment G = XᵀX/N from a few hundred calibration samples. Directions the calibration
data barely visits get tiny, noisy eigenvalues, and the merge is then free to spend the shared
weight's error there, where another domain's inputs do lie. Shrinking G toward μI (μ = tr G/d)

    Ĝ = (1 − ρ) G + ρ μ I

keeps the trace and pulls the spectrum together, so no direction is trusted more than the data
supports. ρ comes from the data:

- ``ledoit-wolf``: ρ = min(β̄², δ²)/δ² with δ² = ‖G − μI‖²_F and β̄² the estimated sum of the
  entries' variances (Ledoit & Wolf 2004). Tokens of one sample are not independent, so the unit
  of independence is the sample: with C_u = X_uᵀX_u the sum over sample u's rows (U samples,
  N rows), β̄² = Σ_u ‖C_u‖²_F / N² − ‖G‖²_F / U. With one row per sample this is the textbook
  estimator, Σ‖x‖⁴/N² − ‖G‖²_F/N.
- ``oas``: Oracle-Approximating Shrinkage (Chen et al. 2010) for Gaussian samples, with n = U,
  ρ = min(1, ((1 − 2/d) tr G² + tr² G) / ((U + 1 − 2/d)(tr G² − tr² G/d))).
- a number in [0, 1]: that ρ for every layer.
- ``held-out``: ρ = 0 here; compress measures the layerwise merge at a few intensities on the
  choice's held-out samples and installs the best (hessian_worker.intensity_choice).

Everything is computed in float64 (the sums of fourth powers overflow float32 precision first).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from hessian_worker.options import Shrinkage, ShrinkageSetting


@dataclass
class SecondMoments:
    """What one pass over the data keeps per layer: Σ x xᵀ over the N rows, and over the U samples
    Σ_u ‖C_u‖²_F (C_u = X_uᵀX_u), which the Ledoit–Wolf intensity needs."""

    total: Tensor
    rows: int = 0
    units: int = 0
    unit_square: float = 0.0

    @property
    def covariance(self) -> Tensor:
        """G = Σ x xᵀ / N."""
        return self.total / max(self.rows, 1)


def unit_squares(x: Tensor) -> tuple[int, float]:
    """(U, Σ_u ‖X_uᵀX_u‖²_F) of one batch of layer inputs: a 3-D [b, t, d] batch (padding rows
    zeroed) has one unit per sample, a 2-D [n, d] batch one per row. ‖XᵀX‖_F = ‖XXᵀ‖_F, so the
    t × t Gram of each sample suffices."""
    x = x.double()
    if x.dim() == 2:
        return x.shape[0], float(x.pow(2).sum(-1).pow(2).sum())
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    gram = x @ x.transpose(-1, -2)
    return x.shape[0], float(gram.pow(2).sum())


def ledoit_wolf_intensity(moments: SecondMoments) -> float:
    """ρ in [0, 1] of the module docstring's Ledoit–Wolf estimator (0 without data)."""
    if moments.rows == 0 or moments.units == 0:
        return 0.0
    g = moments.covariance.double()
    mu = float(g.diagonal().mean())
    g_sq = float(g.pow(2).sum())
    delta = g_sq - g.shape[0] * mu * mu  # ‖G − μI‖²_F
    if delta <= 0.0:
        return 0.0  # G is already a multiple of I
    beta = moments.unit_square / float(moments.rows) ** 2 - g_sq / moments.units
    return min(max(beta, 0.0), delta) / delta


def oas_intensity(cov: Tensor, samples: int) -> float:
    """ρ in [0, 1] of Oracle-Approximating Shrinkage for ``samples`` Gaussian samples."""
    g = cov.double()
    d = g.shape[0]
    tr, tr_sq = float(g.diagonal().sum()), float(g.pow(2).sum())
    den = (samples + 1.0 - 2.0 / d) * (tr_sq - tr * tr / d)
    if den <= 0.0:
        return 1.0 if samples > 0 else 0.0
    return min(1.0, ((1.0 - 2.0 / d) * tr_sq + tr * tr) / den)


def intensity(moments: SecondMoments, setting: ShrinkageSetting) -> float:
    """ρ for one layer under ``setting`` (an estimator or a fixed number)."""
    if isinstance(setting, Shrinkage):
        if setting in (Shrinkage.none, Shrinkage.held_out):  # held-out: chosen later, by measurement
            return 0.0
        if setting is Shrinkage.ledoit_wolf:
            return ledoit_wolf_intensity(moments)
        if setting is Shrinkage.oas:
            return oas_intensity(moments.covariance, moments.units)
        raise ValueError(f"no intensity rule for shrinkage {setting.value!r}")
    return float(setting)


def shrink(cov: Tensor, rho: float) -> Tensor:
    """(1 − ρ) G + ρ (tr G/d) I, in G's dtype."""
    if rho == 0.0:
        return cov
    mu = cov.diagonal().mean()
    out = (1.0 - rho) * cov
    out.diagonal().add_(rho * mu)
    return out


def shrunk_covariance(moments: SecondMoments, setting: ShrinkageSetting) -> tuple[Tensor, float]:
    """(Ĝ, ρ) of one layer."""
    rho = intensity(moments, setting)
    return shrink(moments.covariance, rho), rho


def needs_unit_squares(setting: ShrinkageSetting) -> bool:
    """Whether the pass must keep Σ_u ‖C_u‖²_F (only Ledoit–Wolf reads it)."""
    return setting is Shrinkage.ledoit_wolf
