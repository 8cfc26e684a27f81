"""Exact per-family curves by dynamic programming over subsets of units.

f_k[mask] = least cost of splitting the units in ``mask`` into at most k classes
          = min over classes S that hold the lowest unit of mask of cost(S) + f_{k-1}[mask \\ S].
All (mask, S) pairs are enumerated once, (3^m - 1)/2 of them, vectorized with numpy; the
enumeration depends only on m and is cached. Practical up to m = 16 units (21.5M pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .family import UnitProblem
from .schema import CostKind

EXACT_MAX_UNITS = 16
_ALWAYS_UNITS = 14  # (3^14 - 1)/2 = 2.4M pairs: well under a second
_PAIRS_PER_SECOND = 5e6  # about what one core enumerates here, first call's cache build included


def exact_affordable(m: int, seconds: float) -> bool:
    """Whether the DP over m units fits a request of ``seconds``: always up to 14 units, 15 and
    16 units (7.2M and 21.5M pairs, seconds of work) only when the time limit leaves room.

    Decided on the nominal limit, not the clock, so equal requests take the same path.
    """
    if m <= _ALWAYS_UNITS:
        return True
    return m <= EXACT_MAX_UNITS and (3**m - 1) / 2 <= _PAIRS_PER_SECOND * seconds


@lru_cache(maxsize=2)
def _all_submask_pairs(r: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (h, s) with s a submask of h over r bits, grouped by h ascending.

    Returns (offsets of length 2^r + 1, flat submasks).
    """
    offsets = np.array([0, 1], dtype=np.int64)
    flat = np.zeros(1, dtype=np.int32)
    for bit in range(r):
        counts = np.diff(offsets)
        group = np.repeat(np.arange(len(counts)), counts)
        base = np.arange(len(flat)) + offsets[group]
        upper = np.empty(2 * len(flat), dtype=np.int32)
        upper[base] = flat
        upper[base + counts[group]] = flat | (1 << bit)
        flat = np.concatenate([flat, upper])
        offsets = np.concatenate([offsets, offsets[-1] + 2 * offsets[1:]])
    return offsets, flat


@lru_cache(maxsize=2)
def _class_pairs(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group_mask, group_offsets, sub) for all masks over m bits and subsets S holding the lowest bit."""
    masks, offs, subs = [], [np.zeros(1, dtype=np.int64)], []
    total = 0
    for t in range(m):
        r = m - t - 1
        h_off, h_sub = _all_submask_pairs(r)
        low = np.int32(1 << t)
        masks.append((np.arange(1 << r, dtype=np.int64) << (t + 1)) | low)
        subs.append((h_sub.astype(np.int64) << (t + 1)).astype(np.int32) | low)
        offs.append(total + h_off[1:])
        total += int(h_off[-1])
    gmask = np.concatenate(masks).astype(np.int32)
    offsets = np.concatenate(offs)
    sub = np.concatenate(subs)
    # groups with more units first: level k only needs masks of more than k units (see below)
    pop = _popcount(gmask)
    order = np.argsort(-pop, kind="stable")
    counts = np.diff(offsets)[order]
    new_off = np.concatenate([[0], np.cumsum(counts)])
    idx = np.repeat(offsets[:-1][order] - new_off[:-1], counts) + np.arange(int(new_off[-1]))
    return gmask[order], new_off, sub[idx]


def _popcount(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    count = np.zeros_like(x)
    while x.any():
        count += x & 1
        x >>= 1
    return count


def class_costs(up: UnitProblem) -> np.ndarray:
    """Cost of every subset of units as one class; inf where a constraint is broken."""
    m = up.m
    bits = ((np.arange(1 << m)[:, None] >> np.arange(m)[None, :]) & 1).astype(np.float64)
    if up.kind is CostKind.pairwise:
        cost = 0.5 * np.einsum("si,ij,sj->s", bits, up.pair, bits)
    else:
        colsum = bits @ up.take  # (2^m, L)
        member = bits[:, up.home] > 0
        cost = np.where(member, colsum, np.inf).min(axis=1)
        cost[0] = 0.0
    bad = np.einsum("si,ij,sj->s", bits, up.forbidden.astype(np.float64), bits) > 0
    if up.max_size is not None:
        bad |= bits @ up.sizes > up.max_size
    cost[bad] = np.inf
    return cost


@dataclass
class ExactCurve:
    """Optimal cost and labelling of the free units for each class count 1..m."""

    costs: list[float]  # costs[k-1] for at most k classes
    labels: list[np.ndarray | None]


def exact_curve(up: UnitProblem) -> ExactCurve:
    """Optimal partitions of the units into at most k classes, for every k."""
    m = up.m
    if m == 0:
        return ExactCurve([], [])
    if m > EXACT_MAX_UNITS:
        raise ValueError(f"exact DP handles at most {EXACT_MAX_UNITS} units, got {m}")
    ccost = class_costs(up)
    gmask, goff, sub = _class_pairs(m)
    csub = ccost[sub]
    keep = np.isfinite(csub)
    # the singleton {lowest unit} is always feasible, so no group becomes empty
    counts = np.add.reduceat(keep.astype(np.int64), goff[:-1])
    sub_k, csub_k = sub[keep], csub[keep]
    comp = np.repeat(gmask, counts) ^ sub_k
    new_off = np.concatenate([[0], np.cumsum(counts)])
    full = (1 << m) - 1
    # When every unit alone costs nothing (always for pairwise, and for assignment when units
    # are single layers), a mask of at most k units costs 0 with k classes: skip those groups.
    singles_free = all(ccost[1 << u] == 0.0 for u in range(m))
    pop_desc = _popcount(gmask)
    levels = [ccost.copy()]
    levels[0][0] = 0.0
    for k in range(2, m + 1):
        prev = levels[-1]
        if singles_free:
            cur = np.zeros(1 << m)
            g_end = int(np.searchsorted(-pop_desc, -k, side="left"))  # groups with > k units
        else:
            cur = np.full(1 << m, np.inf)
            cur[0] = 0.0
            g_end = len(gmask)
        e_end = int(new_off[g_end])
        if g_end:
            cur[gmask[:g_end]] = np.minimum.reduceat(csub_k[:e_end] + prev[comp[:e_end]], new_off[:g_end])
        levels.append(cur)
    costs = [float(level[full]) for level in levels]
    labels = [_backtrack(k, levels, ccost, m) if math.isfinite(costs[k - 1]) else None for k in range(1, m + 1)]
    return ExactCurve(costs, labels)


def _backtrack(k: int, levels: list[np.ndarray], ccost: np.ndarray, m: int) -> np.ndarray:
    """Recover an optimal labelling for at most k classes of all units."""
    labels = np.empty(m, dtype=int)
    mask, label = (1 << m) - 1, 0
    while mask:
        low = mask & -mask
        rest = mask ^ low
        subs = _submasks(rest) | low
        if k == 1:
            choice = mask
        else:
            vals = ccost[subs] + levels[k - 2][mask ^ subs]
            choice = int(subs[int(np.argmin(vals))])
        for i in range(m):
            if choice >> i & 1:
                labels[i] = label
        label += 1
        mask ^= choice
        k -= 1
    return labels


_CACHED_SUBMASK_BITS = 10  # cached submask lists hold at most 1024 entries (8 KiB; 1024 kept: 8 MiB)


def _submasks(mask: int) -> np.ndarray:
    """Every submask of ``mask``, read-only. Small ones come from a cache: backtracking asks for
    the same masks for every k and every family of the same size."""
    if mask.bit_count() <= _CACHED_SUBMASK_BITS:
        return _small_submasks(mask)
    return _make_submasks(mask)


@lru_cache(maxsize=1 << 10)
def _small_submasks(mask: int) -> np.ndarray:
    return _make_submasks(mask)


def _make_submasks(mask: int) -> np.ndarray:
    bits = [1 << i for i in range(mask.bit_length()) if mask >> i & 1]
    subs = np.zeros(1, dtype=np.int64)
    for b in bits:
        subs = np.concatenate([subs, subs | b])
    subs.setflags(write=False)
    return subs
