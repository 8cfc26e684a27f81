"""Pricing for column generation: the class S with the least f(S) = pair costs inside S − p(S).

A column of the set-partitioning master is one class; its reduced cost is f(S) − μ with p the
duals of the cover rows and μ the dual of the class-count row. `greedy_classes` finds many
negative classes fast (every unit grows a class greedily, then add/drop moves); `least_class`
proves the least f over all allowed classes by branch and bound, which is what makes the
master's Lagrangian bound valid. Pair costs are non-negative, so a unit's marginal cost
w(j, S) − p_j only grows as S grows: a candidate with a non-negative marginal is dropped from
the whole subtree, and the sum of the negative marginals bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .deadline import Deadline
from .family import UnitProblem

_CHECK_EVERY = 256  # nodes between looks at the clock


def class_values(up: UnitProblem, p: np.ndarray, members: np.ndarray) -> np.ndarray:
    """f(S) for each row of a boolean (sets × units) matrix."""
    x = members.astype(float)
    return 0.5 * np.einsum("si,ij,sj->s", x, up.pair, x) - x @ p


def greedy_classes(up: UnitProblem, p: np.ndarray, below: float, rounds: int = 3, starts: np.ndarray | None = None) -> np.ndarray:
    """Distinct classes with f(S) < ``below``, as a boolean (sets × units) matrix.

    Every unit with p_u > 0 seeds a class, and so does every row of ``starts`` (the master's
    current classes: re-fitted to new duals they are often a step from a negative class); all
    grow at once (numpy over the seeds): add the allowed unit of least marginal while it is
    negative, then drop members whose marginal is positive, ``rounds`` times.
    """
    m = up.m
    seeds = np.flatnonzero(p > 0)
    inside = np.zeros((len(seeds), m), dtype=bool)
    inside[np.arange(len(seeds)), seeds] = True
    if starts is not None and len(starts):
        inside = np.vstack([inside, starts])
    if len(inside) == 0:
        return np.zeros((0, m), dtype=bool)
    s = len(inside)
    rows = np.arange(s)
    w = up.pair
    cap = up.max_size if up.max_size is not None else int(up.sizes.sum())
    for _ in range(rounds):
        changed = False
        while True:  # add the best allowed unit while it lowers f
            load = inside.astype(float) @ w  # w(j, S) per set
            blocked = inside | (inside.astype(np.int64) @ up.forbidden.astype(np.int64) > 0)
            blocked |= (inside @ up.sizes)[:, None] + up.sizes[None, :] > cap
            marg = np.where(blocked, np.inf, load - p[None, :])
            j = np.argmin(marg, axis=1)
            grow = marg[rows, j] < 0
            if not grow.any():
                break
            inside[rows[grow], j[grow]] = True
            changed = True
        load = inside.astype(float) @ w
        worth = np.where(inside, load - p[None, :], -np.inf)  # what removing each member saves
        j = np.argmax(worth, axis=1)
        drop = (worth[rows, j] > 0) & (inside.sum(axis=1) > 1)
        if drop.any():
            inside[rows[drop], j[drop]] = False
            changed = True
        if not changed:
            break
    inside = np.unique(inside, axis=0)
    return inside[class_values(up, p, inside) < below]


@dataclass
class Least:
    """The least f(S) found, a proven lower bound on it, and the classes found below a threshold."""

    value: float
    bound: float
    classes: list[np.ndarray]  # unit index arrays with f(S) below the caller's threshold
    complete: bool  # the search ended before its node limit: bound == value


def least_class(up: UnitProblem, p: np.ndarray, below: float, node_limit: int = 200_000, keep: int = 20,
                deadline: Deadline | None = None) -> Least:
    """Branch and bound over classes (units in a fixed order, each node adds one later unit).

    A node's bound is f(S) plus the negative marginals of its remaining candidates, then the
    size-aware `_extension_bound`. Classes with f(S) < ``below`` are collected for the master;
    the search stops once ``keep`` are found (the master wants columns, and the proof is only
    needed when there are none), after ``node_limit`` nodes, or at ``deadline``; the bound is
    then the least bound of the nodes left unexplored.
    """
    m = up.m
    w = up.pair
    cap = up.max_size if up.max_size is not None else int(up.sizes.sum())
    # a unit with p_u <= 0 never lowers f: the best class holding it is no better than the
    # singleton of least -p, or the same class without it
    single = float((-p).min()) if m else 0.0
    best = single
    found: list[np.ndarray] = []
    if single < below:
        found.append(np.array([int(np.argmin(-p))]))
    pos = np.flatnonzero(p > 0)
    order = pos[np.argsort(-p[pos], kind="stable")]
    nodes = 0
    open_min = np.inf
    # stack of (members, f, candidates, their marginals, room)
    stack: list[tuple[list[int], float, np.ndarray, np.ndarray, int]] = [([], 0.0, order, -p[order], cap)]
    while stack:
        members, f, cand, marg, room = stack.pop()
        cheap = f + float(marg.sum())  # candidates are kept only with negative marginals
        if cheap >= best:
            continue
        stop = nodes >= node_limit or len(found) >= keep
        if stop or nodes % _CHECK_EVERY == 0 and deadline is not None and deadline.expired():
            # out of nodes, out of time, or enough columns found (the master wants columns,
            # the proof only when there are none): every node left counts by its bound
            node_limit = nodes
            open_min = min(open_min, cheap)
            continue
        low = f + _extension_bound(w, cand, marg)
        if low >= best:
            continue
        nodes += 1
        children = []
        for i in range(len(cand)):
            j = int(cand[i])
            fj = f + float(marg[i])
            rest = cand[i + 1 :]
            rmarg = marg[i + 1 :] + w[j, rest]
            keep_mask = (rmarg < 0) & ~up.forbidden[j, rest] & (up.sizes[rest] <= room - up.sizes[j])
            rest, rmarg = rest[keep_mask], rmarg[keep_mask]
            new = [*members, j]
            if fj < best:
                best = fj
            if fj < below and len(found) < keep:
                found.append(np.array(new))
            if len(rest) and fj + rmarg.sum() < best:
                children.append((new, fj, rest, rmarg, room - int(up.sizes[j])))
        stack.extend(reversed(children))  # most negative first
    complete = not np.isfinite(open_min)
    return Least(best, best if complete else min(best, open_min), found, complete)


def _extension_bound(w: np.ndarray, cand: np.ndarray, marg: np.ndarray) -> float:
    """Least change of f from adding any subset T of the candidates to the class.

    Adding T changes f by Σ_{j in T} marg_j + w(T), and w(T) is at least half of each member's
    |T| − 1 cheapest partners among the candidates; minimized over |T| (0 included). Without the
    w(T) term (the sum of negative marginals) the tree grew past 70 000 nodes on classes of 8.
    """
    c = len(cand)
    if c == 0:
        return 0.0
    if c == 1:
        return min(0.0, float(marg[0]))
    sub = w[np.ix_(cand, cand)].copy()
    np.fill_diagonal(sub, np.inf)
    cheap = np.cumsum(np.sort(sub, axis=1)[:, : c - 1], axis=1)  # (c, c-1): j's t-1 cheapest, t = 2..c
    per = np.concatenate([marg[:, None], marg[:, None] + cheap / 2.0], axis=1)  # column t-1: size t
    best_t = np.cumsum(np.sort(per, axis=0), axis=0)[np.arange(c), np.arange(c)]  # t smallest for size t
    return min(0.0, float(best_t.min()))


def enumerate_classes(up: UnitProblem, p: np.ndarray, below: float, cap: int, node_limit: int = 200_000,
                      deadline: Deadline | None = None) -> tuple[list[np.ndarray], bool]:
    """Every allowed class with f(S) <= ``below``, and whether that is all of them (False past
    ``cap`` classes or ``node_limit`` nodes). The same tree as `least_class`, pruned at ``below`` instead of the
    best value, so nothing under the threshold is cut."""
    w = up.pair
    room0 = up.max_size if up.max_size is not None else int(up.sizes.sum())
    found: list[np.ndarray] = []
    # units with p <= 0 can still sit in a class under the threshold: all units are candidates
    order = np.argsort(-p, kind="stable")
    stack = [([], 0.0, order, -p[order], room0)]
    nodes = 0
    complete = True
    while stack:
        members, f, cand, marg, room = stack.pop()
        if members and f + _extension_bound(w, cand, marg) > below:
            continue  # no extension of this class gets under the threshold
        if nodes >= node_limit or len(found) > cap or nodes % _CHECK_EVERY == 0 and deadline is not None and deadline.expired():
            complete = False
            break
        nodes += 1
        children = []
        for i in range(len(cand)):
            j = int(cand[i])
            fj = f + float(marg[i])
            rest = cand[i + 1 :]
            rmarg = marg[i + 1 :] + w[j, rest]
            ok = ~up.forbidden[j, rest] & (up.sizes[rest] <= room - up.sizes[j])
            rest, rmarg = rest[ok], rmarg[ok]
            if fj + np.minimum(rmarg, 0.0).sum() > below:
                continue  # nothing in this subtree is under the threshold
            new = [*members, j]
            if fj <= below:
                found.append(np.array(new))
            if len(rest):
                children.append((new, fj, rest, rmarg, room - int(up.sizes[j])))
        stack.extend(reversed(children))
    return found[:cap], complete and len(found) <= cap
