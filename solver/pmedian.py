"""The budgeted p-median (assignment costs) as a MIP in HiGHS, proven optimal in well under a second.

Units choose a representative layer r of their class (x[u, r]); an open representative (y[r])
serves its own unit; at most k are open. The full model has a variable and a row per (unit,
layer) pair, and HiGHS took 7 s on 288 layers. Almost all of those pairs are useless: the model
starts from each unit's `_NEAR` cheapest representatives and adds pairs by pricing. A missing
pair x[u, r] has reduced cost take[u, r] − α_u − size_u·δ_r under the duals of the restricted LP
(α: a unit's assignment row, δ: r's size row), the rows it would bring carrying dual 0; once
none is negative, the restricted LP's optimum is the full LP's. The bound itself is the
Lagrangian at α, computed here (valid for any α, equal to the LP value at its optimum without
side constraints). The LP is nearly
always integral here; when the restricted MIP still stops above it, every pair whose reduced
cost is below the gap is added (reduced-cost fixing: no better solution uses another pair) and
the MIP's own bound then holds for the whole problem.
"""

from __future__ import annotations

import numpy as np

from .deadline import Deadline
from .family import UnitProblem, canonical
from .highs import INF, new_highs
from .mip import MipResult
from .schema import CostKind

_NEAR = 12  # representatives per unit in the first restricted model
_RC_TOL = 1e-9  # costs are normalized (largest entry in [0.5, 1))


def p_median(up: UnitProblem, k: int, time_limit_s: float, hint: np.ndarray | None = None) -> MipResult:
    """Least-cost assignment labelling with at most k classes, with a proven bound.

    ``hint`` (a unit labelling) warm-starts the MIP; its pairs join the restricted model.
    """
    if up.kind is not CostKind.assignment:
        raise ValueError("p_median is for assignment costs")
    deadline = Deadline.after(time_limit_s)
    m, nl = up.m, len(up.home)
    if m == 0:
        return MipResult(np.zeros(0, dtype=int), 0.0, 0.0, True)
    ok = ~up.forbidden[:, up.home]  # rep r may serve unit u unless they are forbidden together
    ok[up.home, np.arange(nl)] = True
    near = np.argsort(np.where(ok, up.take, np.inf), axis=1, kind="stable")[:, :_NEAR]
    used = np.zeros_like(ok)
    used[np.arange(m)[:, None], near] = True
    used &= ok
    used[up.home, np.arange(nl)] = True
    start = _hint_pairs(up, hint)
    if start is not None:
        used[np.arange(m), start] = True
    # HiGHS's tolerances are absolute: solve in units where the answer is at least 1 and near
    # it, the simple bound (the m-k cheapest moves of a unit to another representative), else
    # the hint's cost
    other = np.where(ok & (up.home[None, :] != np.arange(m)[:, None]), up.take, np.inf).min(axis=1)
    unit = float(np.sort(np.where(np.isfinite(other), other, 0.0))[: max(0, m - k)].sum())
    if not unit > 0:
        unit = up.partition_cost(hint) if hint is not None else 0.0
        unit = unit if 0 < unit < np.inf else float(up.take.max()) or 1.0
    res = _solve(up, k, ok, used, start, deadline, unit)
    every_k = None if res.every_k is None else res.every_k * unit
    bound = res.bound * unit if res.labels is None else min(res.bound * unit, res.objective)
    return MipResult(res.labels, res.objective, bound, res.proven, every_k)


def _solve(up: UnitProblem, k: int, ok: np.ndarray, used: np.ndarray, start: np.ndarray | None, deadline: Deadline, unit: float) -> MipResult:
    """`p_median` on costs divided by ``unit``: bounds in those units, objectives in the caller's."""
    m, nl = up.m, len(up.home)
    take = up.take / unit
    # restricted LP, priced until no missing pair has a negative reduced cost
    while True:
        lp = _model(up, take, k, used, integer=False, time_limit_s=deadline.left())
        lp.run()
        if _status(lp) != "kOptimal":
            if _status(lp) == "kInfeasible":
                return MipResult(None, None, float("inf"), True)
            return MipResult(None, None, 0.0, False)
        duals = np.asarray(lp.getSolution().row_dual)
        rc = take - duals[:m, None]
        if up.max_size is not None:
            rc -= up.sizes[:, None] * duals[m + 1 : m + 1 + nl][None, :]
        enter = ok & ~used & (rc < -_RC_TOL)
        if not enter.any():
            break
        used |= enter
    every_k = _lagrangian(take, ok, duals[:m])
    lp_bound = float(every_k[min(k, m) - 1]) if k >= 1 else 0.0
    # an integral LP optimum is the MIP's optimum: skip building the MIP (half the time)
    x = np.asarray(lp.getSolution().col_value)[nl:]
    if np.all((x < 1e-9) | (x > 1 - 1e-9)):
        labels = _labels(up, used, x)
        obj = up.partition_cost(labels)
        if obj / unit <= lp_bound * (1 + 1e-9):
            return MipResult(labels, obj, lp_bound, True, every_k)
    mip = _model(up, take, k, used, integer=True, time_limit_s=deadline.left(), hint=start)
    mip.run()
    res = _read(up, mip, used, unit)
    if res.labels is None or res.objective / unit <= lp_bound * (1 + 1e-9):
        return MipResult(res.labels, res.objective, lp_bound, res.labels is not None, every_k)
    # an integrality gap: widen to every pair that could still improve, then the MIP bound holds
    gap = res.objective / unit - lp_bound
    used |= ok & (rc <= gap + _RC_TOL)
    labels = np.empty(m, dtype=int)
    labels[:] = res.labels
    wide = _model(up, take, k, used, integer=True, time_limit_s=deadline.left(), hint=_hint_pairs(up, labels))
    wide.run()
    full = _read(up, wide, used, unit)
    best = full if full.objective is not None and full.objective < res.objective else res
    bound = max(lp_bound, min(full.bound, best.objective / unit))
    return MipResult(best.labels, best.objective, bound, bound >= best.objective / unit * (1 - 1e-9), every_k)


def _lagrangian(take: np.ndarray, ok: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Σ α + the k most negative Σ_u min(0, take[u, r] − α_u), for every k = 1..m.

    The assignment rows relaxed with multipliers α (the side constraints dropped): a bound for
    any α and any k, so the duals of one solve bound the whole curve. Computed here from HiGHS's
    duals rather than read as its LP value, so its tolerances can never make a bound too high.
    """
    gain = np.where(ok, np.minimum(0.0, take - alpha[:, None]), 0.0).sum(axis=0)
    picked = np.cumsum(np.sort(gain))[: len(alpha)]
    return np.maximum(0.0, alpha.sum() + picked)


def _labels(up: UnitProblem, used: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Unit labels from the x values of the used pairs (each unit's representative)."""
    us, rs = np.nonzero(used)
    labels = np.empty(up.m, dtype=int)
    labels[us[x > 0.5]] = rs[x > 0.5]
    return canonical(labels)


def _status(h) -> str:
    return h.getModelStatus().name


def _hint_pairs(up: UnitProblem, hint: np.ndarray | None) -> np.ndarray | None:
    """Each unit's representative under a labelling: per class, the cheapest layer inside it."""
    if hint is None:
        return None
    rep = np.empty(up.m, dtype=int)
    for c in np.unique(hint):
        units = np.flatnonzero(hint == c)
        reps = np.flatnonzero(np.isin(up.home, units))
        rep[units] = reps[np.argmin(up.take[np.ix_(units, reps)].sum(axis=0))]
    return rep


def _model(up: UnitProblem, take: np.ndarray, k: int, used: np.ndarray, integer: bool, time_limit_s: float, hint: np.ndarray | None = None):
    """Variables: y (one per layer), then x for the used pairs. Rows: one assignment row per unit,
    the count row, one size row per layer (with max_size), x <= y, forbidden pairs apart."""
    m, nl = up.m, len(up.home)
    h = new_highs(max(1e-3, time_limit_s))
    us, rs = np.nonzero(used)
    nx = len(us)
    nv = nl + nx
    h.addVars(nv, np.zeros(nv), np.ones(nv))
    h.changeColsCost(nv, np.arange(nv, dtype=np.int32), np.concatenate([np.zeros(nl), take[us, rs]]))
    if integer:
        h.changeColsIntegrality(nv, np.arange(nv, dtype=np.int32), np.ones(nv, dtype=np.uint8))
    # every unit takes exactly one representative
    order = np.argsort(us, kind="stable")
    starts = np.searchsorted(us[order], np.arange(m)).astype(np.int32)
    h.addRows(m, np.ones(m), np.ones(m), nx, starts, (nl + order).astype(np.int32), np.ones(nx))
    # at most k representatives open
    h.addRow(-INF, float(k), nl, np.arange(nl, dtype=np.int32), np.ones(nl))
    if up.max_size is not None:
        # a class holds at most max_size layers: sum size_u x[u, r] - max_size y[r] <= 0
        by_rep = np.argsort(rs, kind="stable")
        idx, val, st = [], [], []
        for r in range(nl):
            st.append(len(idx))
            cols = by_rep[np.searchsorted(rs[by_rep], r, "left") : np.searchsorted(rs[by_rep], r, "right")]
            idx += [nl + int(c) for c in cols] + [r]
            val += [float(up.sizes[us[c]]) for c in cols] + [-float(up.max_size)]
        h.addRows(nl, np.full(nl, -INF), np.zeros(nl), len(idx), np.array(st, dtype=np.int32), np.array(idx, dtype=np.int32), np.array(val))
    # a unit only takes an open representative; an open representative serves its own unit
    idx = np.stack([nl + np.arange(nx), rs], axis=1).ravel().astype(np.int32)
    h.addRows(nx, np.full(nx, -INF), np.zeros(nx), 2 * nx, (2 * np.arange(nx)).astype(np.int32), idx, np.tile([1.0, -1.0], nx))
    own = np.flatnonzero(us == up.home[rs])
    idx = np.stack([rs[own], nl + own], axis=1).ravel().astype(np.int32)
    h.addRows(len(own), np.full(len(own), -INF), np.zeros(len(own)), 2 * len(own), (2 * np.arange(len(own))).astype(np.int32), idx, np.tile([1.0, -1.0], len(own)))
    # forbidden units never share a representative
    col = {(int(u), int(r)): nl + i for i, (u, r) in enumerate(zip(us, rs, strict=True))}
    for a, b in zip(*np.nonzero(np.triu(up.forbidden, 1)), strict=True):
        for r in np.flatnonzero(used[a] & used[b]):
            h.addRow(-INF, 1.0, 2, np.array([col[int(a), int(r)], col[int(b), int(r)]], dtype=np.int32), np.ones(2))
    if hint is not None and integer and used[np.arange(m), hint].all():
        x = np.zeros(nv)
        x[np.unique(hint)] = 1.0
        x[[col[u, int(r)] for u, r in enumerate(hint)]] = 1.0
        h.setSolution(_solution(h, x))
    return h


def _solution(h, values: np.ndarray):
    import highspy

    sol = highspy.HighsSolution()
    sol.col_value = values.tolist()
    sol.value_valid = True
    return sol


def _read(up: UnitProblem, h, used: np.ndarray, unit: float) -> MipResult:
    """The MIP's labelling, its exact objective (caller's units) and its bound (scaled units)."""
    info = h.getInfo()
    sol = h.getSolution()
    bound = max(0.0, float(info.mip_dual_bound)) if np.isfinite(info.mip_dual_bound) else 0.0
    if not sol.value_valid:
        return MipResult(None, None, bound, False)
    labels = _labels(up, used, np.asarray(sol.col_value)[len(up.home):])
    obj = up.partition_cost(labels)
    return MipResult(labels, obj, min(bound, obj / unit), _status(h) == "kOptimal")
