"""Interval DP over a family's layers in depth order: exact for contiguous mode.

A class is a run of consecutive layers. dp[k][j] = least cost of the first j layers in at most
k runs. Every constraint is checked per run, so the result is also a valid (often good) starting
point for the unrestricted problem.
"""

from __future__ import annotations

import numpy as np

from .family import FamilyInstance, canonical
from .schema import CostKind


def run_costs(fam: FamilyInstance) -> np.ndarray:
    """cost[i, j] of making layers i..j (inclusive) one class; inf where a constraint is broken."""
    n = fam.n
    c = fam.cost
    out = np.full((n, n), np.inf)
    pinned = np.zeros(n, dtype=bool)
    pinned[fam.pinned] = True
    for i in range(n):
        out[i, i] = 0.0
        for j in range(i + 1, n):
            if pinned[i] or pinned[j] or (fam.max_size is not None and j - i + 1 > fam.max_size):
                break
            block = c[i : j + 1, i : j + 1]
            if fam.kind is CostKind.pairwise:
                col = c[i:j, j]
                if np.isinf(col).any():
                    break
                out[i, j] = out[i, j - 1] + col.sum()
            else:
                off = block[~np.eye(j - i + 1, dtype=bool)]
                if np.isinf(off).any():
                    break
                b = block.copy()
                np.fill_diagonal(b, 0.0)
                out[i, j] = b.sum(axis=0).min()
    # a required pair must not be cut by a run boundary
    for a, b in fam.required:
        lo, hi = min(a, b), max(a, b)
        for i in range(n):
            for j in range(i, n):
                if (i <= lo <= j) != (i <= hi <= j):
                    out[i, j] = np.inf
    return out


def interval_curve(fam: FamilyInstance) -> tuple[list[float], list[np.ndarray | None]]:
    """Best contiguous partition of the family's layers for at most k runs, k = 1..n.

    Costs exclude the unary terms (they are the same for every partition).
    """
    n = fam.n
    rc = run_costs(fam)
    dp = np.full((n + 1, n + 1), np.inf)  # dp[k, j]
    arg = np.zeros((n + 1, n + 1), dtype=int)
    dp[0, 0] = 0.0
    for k in range(1, n + 1):
        dp[k, 0] = 0.0
        for j in range(1, n + 1):
            vals = dp[k - 1, :j] + rc[:j, j - 1]
            i = int(np.argmin(vals))
            dp[k, j], arg[k, j] = vals[i], i
    costs, labels = [], []
    for k in range(1, n + 1):
        costs.append(float(dp[k, n]))
        if not np.isfinite(dp[k, n]):
            labels.append(None)
            continue
        lab = np.empty(n, dtype=int)
        j, kk, c = n, k, 0
        while j > 0:
            i = arg[kk, j]
            lab[i:j] = c
            c += 1
            j, kk = i, kk - 1
        labels.append(canonical(lab))
    return costs, labels
