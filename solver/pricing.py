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
_SIZES = 16  # class sizes the extension bound takes one by one (larger ones together; >= 2)


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
    # w(j, S), forbidden partners and size per set, kept up to date row by row as units join or
    # leave (a product of the whole membership matrix per step, integer for the forbidden
    # pairs, took most of the time)
    x = inside.astype(float)
    load = x @ w
    forbid = up.forbidden.astype(float)
    clash = x @ forbid
    size = x @ up.sizes
    for _ in range(rounds):
        changed = False
        while True:  # add the best allowed unit while it lowers f
            blocked = inside | (clash > 0) | (size[:, None] + up.sizes[None, :] > cap)
            marg = np.where(blocked, np.inf, load - p[None, :])
            j = np.argmin(marg, axis=1)
            grow = marg[rows, j] < 0
            if not grow.any():
                break
            r, u = rows[grow], j[grow]
            inside[r, u] = True
            load[r] += w[u]
            clash[r] += forbid[u]
            size[r] += up.sizes[u]
            changed = True
        worth = np.where(inside, load - p[None, :], -np.inf)  # what removing each member saves
        j = np.argmax(worth, axis=1)
        drop = (worth[rows, j] > 0) & (inside.sum(axis=1) > 1)
        if drop.any():
            r, u = rows[drop], j[drop]
            inside[r, u] = False
            load[r] -= w[u]
            clash[r] -= forbid[u]
            size[r] -= up.sizes[u]
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
                deadline: Deadline | None = None, known: float = np.inf) -> Least:
    """Branch and bound over classes (units in a fixed order, each node adds one later unit).

    A node's bound is f(S) plus the size-aware `_extension_bounds` of its remaining candidates,
    computed for all children of a node at once. Classes with f(S) < ``below`` are collected for the master;
    the search stops once ``keep`` are found (the master wants columns, and the proof is only
    needed when there are none), after ``node_limit`` nodes, or at ``deadline``; the bound is
    then the least bound of the nodes left unexplored. ``known`` is the f of a class the caller
    holds (the master's basis): it prunes from the first node, where the search would otherwise
    start from a singleton.
    """
    m = up.m
    w = up.pair
    cap = up.max_size if up.max_size is not None else int(up.sizes.sum())
    # a unit with p_u <= 0 never lowers f: the best class holding it is no better than the
    # singleton of least -p, or the same class without it
    single = float((-p).min()) if m else 0.0
    best = min(single, known)
    found: list[np.ndarray] = []
    if single < below:
        found.append(np.array([int(np.argmin(-p))]))
    pos = np.flatnonzero(p > 0)
    order = pos[np.argsort(-p[pos], kind="stable")]
    nodes = 0
    open_min = np.inf
    grow = _Children(up)
    # stack of (members, f, candidates, their marginals, room, bound on the subtree's f)
    stack: list[tuple[list[int], float, np.ndarray, np.ndarray, int, float]] = [
        ([], 0.0, order, -p[order], cap, float(_extension_bounds(w[np.ix_(order, order)], -p[order][None, :], np.ones((1, len(order)), dtype=bool))[0]))]
    while stack:
        members, f, cand, marg, room, low = stack.pop()
        if low >= best:
            continue
        stop = nodes >= node_limit or len(found) >= keep
        if stop or nodes % _CHECK_EVERY == 0 and deadline is not None and deadline.expired():
            # out of nodes, out of time, or enough columns found (the master wants columns,
            # the proof only when there are none): every node left counts by its bound
            node_limit = nodes
            open_min = min(open_min, low)
            continue
        nodes += 1
        sub = w[np.ix_(cand, cand)]
        fj, rest = grow.expand(f, cand, marg, sub, room, negative_only=True)
        best = min(best, float(fj.min()))
        for i in np.flatnonzero(fj < below)[: max(0, keep - len(found))]:
            found.append(np.array([*members, int(cand[i])]))
        # children that can still beat the best: the sum of their negative marginals first
        # (cheap), then the extension bound of all of them at once
        kids = np.flatnonzero(rest.any(axis=1) & (fj + np.where(rest, grow.marg, 0.0).sum(axis=1) < best))
        lows = fj[kids] + _extension_bounds(sub, grow.marg[kids], rest[kids])
        for i, lo in zip(reversed(kids), reversed(lows), strict=True):  # most negative marginal on top
            if lo < best:
                stack.append(([*members, int(cand[i])], float(fj[i]), cand[rest[i]], grow.marg[i, rest[i]],
                              room - int(up.sizes[cand[i]]), float(lo)))
    complete = not np.isfinite(open_min)
    return Least(best, best if complete else min(best, open_min), found, complete)


class _Children:
    """A node's children at once (numpy over the candidates): child i adds candidate i, and its
    candidates are the later ones still allowed with it, at marginals raised by their pair cost
    to i. One matrix per node, where a loop over the children cost a dozen small numpy calls
    each (most of the 0.4 s per exact pricing on classes of 10 at 80 units)."""

    def __init__(self, up: UnitProblem) -> None:
        self.up = up
        self.later = np.triu(np.ones((up.m, up.m), dtype=bool), 1)
        self.forbids = bool(up.forbidden.any())
        self.capped = up.max_size is not None
        self.marg = np.zeros((0, 0))

    def expand(self, f: float, cand: np.ndarray, marg: np.ndarray, sub: np.ndarray, room: int,
               negative_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """(f of each child, its allowed candidates as a (c, c) mask); the children's
        marginals are left in ``self.marg`` (row i: child i's, over all c candidates)."""
        c = len(cand)
        self.marg = marg[None, :] + sub
        rest = self.later[:c, :c].copy()
        if negative_only:
            rest &= self.marg < 0
        if self.forbids:
            rest &= ~self.up.forbidden[np.ix_(cand, cand)]
        if self.capped:
            s = self.up.sizes[cand]
            rest &= s[None, :] <= (room - s)[:, None]
        return f + marg, rest


def _extension_bounds(sub: np.ndarray, marg: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Least change of f from adding any subset T of its allowed candidates to each of r classes.

    Class r may add the candidates in row r of ``allowed`` (r, c) at the marginals in row r of
    ``marg``; ``sub`` holds the pair costs among all c candidates. Adding T changes f by
    Σ_{j in T} marg_j + w(T), and w(T) is at least half of each member's |T| − 1 cheapest
    partners among the candidates; minimized over |T| (0 included). Without the w(T) term (the
    sum of negative marginals) the tree grew past 70 000 nodes on classes of 8. All children of
    a node in one numpy pass: one call per child spent most of a pricing in call overhead.

    Sizes up to ``_SIZES`` are bounded one by one; every larger size at once, by the negative
    parts of the bound's terms at that size (each term only grows with the size): near the root
    the candidates are many, and sorting every pair row in full took most of the time.
    """
    r, c = allowed.shape
    if r == 0 or c == 0:
        return np.zeros(r)
    both = allowed[:, :, None] & allowed[:, None, :]
    diag = np.arange(c)
    both[:, diag, diag] = False
    pair = np.where(both, sub[None, :, :], np.inf)
    t = min(c, _SIZES)  # sizes 1..t one by one
    # each candidate's t-1 cheapest partners, in order (a partial sort when t < c)
    near = np.sort(np.partition(pair, t - 2, axis=2)[:, :, : t - 1] if t < c else pair, axis=2)[:, :, : t - 1]
    cheap = np.cumsum(near, axis=2)  # (r, c, t-1): j's s-1 cheapest partners, s = 2..t
    own = np.where(allowed, marg, np.inf)[:, :, None]  # a candidate not allowed never joins
    per = np.concatenate([own, own + cheap / 2.0], axis=2)  # [child, j, s-1]: j in a set of size s
    sizes = np.arange(t)
    best = np.cumsum(np.sort(per, axis=1), axis=1)[:, sizes, sizes].min(axis=1)  # the s smallest for size s
    if t < c:  # any larger size: its s smallest terms are at least the negative ones at size t
        best = np.minimum(best, np.minimum(per[:, :, t - 1], 0.0).sum(axis=1))
    return np.minimum(0.0, best)


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
    grow = _Children(up)
    stack = [([], 0.0, order, -p[order], room0)]
    nodes = 0
    complete = True
    while stack:
        members, f, cand, marg, room = stack.pop()
        if nodes >= node_limit or len(found) > cap or nodes % _CHECK_EVERY == 0 and deadline is not None and deadline.expired():
            complete = False
            break
        nodes += 1
        sub = w[np.ix_(cand, cand)]
        fj, rest = grow.expand(f, cand, marg, sub, room, negative_only=False)
        # nothing in child i's subtree is under the threshold when its negative marginals
        # cannot bring it there, nor when its extension bound cannot
        reach = fj + np.where(rest, np.minimum(grow.marg, 0.0), 0.0).sum(axis=1) <= below
        for i in np.flatnonzero(reach & (fj <= below)):
            found.append(np.array([*members, int(cand[i])]))
        kids = np.flatnonzero(reach & rest.any(axis=1))
        kids = kids[fj[kids] + _extension_bounds(sub, grow.marg[kids], rest[kids]) <= below]
        for i in reversed(kids):
            stack.append(([*members, int(cand[i])], float(fj[i]), cand[rest[i]], grow.marg[i, rest[i]], room - int(up.sizes[cand[i]])))
    return found[:cap], complete and len(found) <= cap
