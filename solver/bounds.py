"""Lower bounds for every class count at once, in milliseconds.

Used to seed each large family's lower curve so the bound knapsack never faces a curve of
zeros. Both are weak-duality bounds of relaxations, hence valid; column generation and the MIP rounds
tighten the cells that matter.
"""

from __future__ import annotations

import numpy as np

from .family import UnitProblem
from .schema import CostKind


def cheapest_partners(up: UnitProblem) -> np.ndarray:
    """cheap[u, t]: sum of the t-1 cheapest allowed partner costs of unit u (inf if too few)."""
    m = up.m
    cheap = np.full((m, m + 1), np.inf)
    for u in range(m):
        allowed = [up.pair[u, v] for v in range(m) if v != u and not up.forbidden[u, v]]
        cum = np.concatenate([[0.0], np.cumsum(np.sort(allowed))])
        cheap[u, 1 : len(cum) + 1] = cum
    if up.max_size is not None:
        cheap[:, up.max_size + 1 :] = np.inf
    return cheap


def pairwise_all_k(up: UnitProblem) -> np.ndarray:
    """lb[k-1] for at most k classes of units, k = 1..m.

    A unit in a class of t units pays at least half its t-1 cheapest partners, and the number of
    classes is the sum over units of 1/t. Relaxing that count with a multiplier lam gives
    lb(k) = max_lam sum_u min_t (cheap[u, t]/2 + lam/t) - lam*k, evaluated on a grid of lam.
    """
    m = up.m
    if m == 0:
        return np.zeros(0)
    half = cheapest_partners(up)[:, 1:] / 2.0  # (m, T) for t = 1..m
    finite = half[np.isfinite(half) & (half > 0)]
    hi = float(finite.max()) * m if finite.size else 1.0
    lo = float(finite.min()) / m if finite.size else 1.0
    lams = np.concatenate([[0.0], np.geomspace(lo, hi, 600)])
    t = np.arange(1, m + 1, dtype=float)
    g = np.array([np.min(half + lam / t[None, :], axis=1).sum() for lam in lams])
    ks = np.arange(1, m + 1, dtype=float)
    lb = np.max(g[:, None] - lams[:, None] * ks[None, :], axis=0)
    lb[-1] = 0.0
    return np.maximum(lb, 0.0)


def assignment_all_k(up: UnitProblem) -> np.ndarray:
    """lb[k-1] for at most k classes: at least m-k units are not representatives' own units,
    and each of them pays at least its cheapest allowed representative elsewhere."""
    m = up.m
    if m == 0:
        return np.zeros(0)
    other = up.home[None, :] != np.arange(m)[:, None]
    allowed = other & ~up.forbidden[:, up.home]
    cheapest = np.where(allowed, up.take, np.inf).min(axis=1)
    cheapest = np.sort(np.where(np.isfinite(cheapest), cheapest, 0.0))
    cum = np.concatenate([[0.0], np.cumsum(cheapest)])
    return np.array([cum[m - k] for k in range(1, m + 1)])


def all_k(up: UnitProblem) -> np.ndarray:
    return pairwise_all_k(up) if up.kind is CostKind.pairwise else assignment_all_k(up)
