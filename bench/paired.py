"""Per-sample scores and the paired bootstrap: is one row's metric really ahead of another's?

The evaluation tables compare plans scored on the same evaluation samples (64 MiniLM sentences, 64
GPT windows, 360 digits), and neighbouring rows often differ by less than those samples resolve.
Every task's metric is a ratio of per-sample sums, link(Σ numerator / Σ denominator): mean cosine
and accuracy (denominators 1, link identity), perplexity (NLL sums and token counts per window,
link exp). Resampling the samples with replacement, the same draws for both rows (they were scored
on the same samples, so their errors are correlated and the paired difference is far tighter than
either row's own spread), gives the interval of the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DRAWS = 4000  # bootstrap resamples: the 2.5% / 97.5% quantiles settle to about 1e-4 of the spread
LEVEL = 0.95


@dataclass(frozen=True)
class SampleScores:
    """One model's metric in per-sample parts: link(Σ numerators / Σ denominators)."""

    numerators: np.ndarray
    denominators: np.ndarray | None = None  # None: one per sample
    exp: bool = False  # link exp (perplexity from NLL sums) instead of identity

    def __post_init__(self) -> None:
        if self.denominators is not None and self.denominators.shape != self.numerators.shape:
            raise ValueError(f"{self.numerators.shape} numerators against {self.denominators.shape} denominators")

    def metric(self) -> float:
        """The metric on all the samples."""
        return float(self._link(self._ratio(None))[()])

    def resampled(self, draws: np.ndarray) -> np.ndarray:
        """The metric on each row of ``draws`` (sample indices, [n_draws, n_samples])."""
        return self._link(self._ratio(draws))

    def _ratio(self, draws: np.ndarray | None) -> np.ndarray:
        num = self.numerators.astype(np.float64)
        den = np.ones_like(num) if self.denominators is None else self.denominators.astype(np.float64)
        if draws is None:
            return np.asarray(num.sum() / den.sum())
        return num[draws].sum(-1) / den[draws].sum(-1)

    def _link(self, ratio: np.ndarray) -> np.ndarray:
        return np.exp(ratio) if self.exp else ratio


@dataclass(frozen=True)
class PairedDifference:
    """metric(a) − metric(b) on all the samples and its paired bootstrap interval."""

    difference: float
    low: float
    high: float

    def resolved(self) -> bool:
        """The interval excludes zero: the samples tell the two apart."""
        return self.low > 0.0 or self.high < 0.0

    def cell(self) -> str:
        """``+0.0012 [+0.0001, +0.0024]``, starred when resolved."""
        star = "*" if self.resolved() else ""
        return f"{self.difference:+.4g} [{self.low:+.3g}, {self.high:+.3g}]{star}"


def paired_difference(a: SampleScores, b: SampleScores, *, draws: int = DRAWS, level: float = LEVEL,
                      seed: int = 0) -> PairedDifference:
    """metric(a) − metric(b) with the percentile interval at ``level`` over ``draws`` resamples of the
    samples, the same resample for both.

    Raises:
        ValueError: the two were not scored on the same number of samples.
    """
    n = len(a.numerators)
    if len(b.numerators) != n:
        raise ValueError(f"paired scores need the same samples: {n} against {len(b.numerators)}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(draws, n))
    diffs = a.resampled(idx) - b.resampled(idx)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    diff = a.metric() - b.metric()
    if not math.isfinite(diff):
        raise ValueError("a metric is not finite")
    return PairedDifference(diff, float(low), float(high))
