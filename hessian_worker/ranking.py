"""Spearman rank correlation: how well predicted losses order candidates as their measured losses do."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """0-based ranks, tied values sharing the mean of the ranks they span."""
    a = np.asarray(values, dtype=float)
    order = a.argsort(kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a), dtype=float)
    for value in np.unique(a):
        tied = a == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of the average ranks; None when it is undefined (fewer than two pairs, or
    one side constant) or a value is not finite.

    Raises:
        ValueError: ``x`` and ``y`` differ in length.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs: got {len(x)} predicted and {len(y)} measured values")
    if len(x) < 2 or not all(math.isfinite(v) for v in (*x, *y)):
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])
