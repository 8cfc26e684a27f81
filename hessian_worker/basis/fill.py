"""Ranks that spend the budget: a basis plan at the per-family ranks of least predicted loss that fit.

A plan's unique parameters are linear in its families' ranks: family f with k_f classes of n_f
layers keeps r_f·(k_f·a_f + n_f·b_f), a_f the shared and b_f the per-member parameters of one rank
(d_out and d_in for side out). The solver picks the partition at the problem's ranks, where the
plan may keep far less than the budget (MiniLM at ratio 0.5 and the default rank 0.25: every plan
keeps 0.36-0.375 while per-layer SVD, at higher ranks, keeps 0.5), so the choice was never between
plans of equal size. Here the partition stays and the ranks rise until the budget is spent.

Which ranks: for a fixed partition the predicted loss is Σ_S E(S, r_f), each class's least
whitened (output-scaled) error at rank r: the tail of one spectrum, so E(S, ·) comes for every r
from one decomposition (``error_curve``) and falls by λ_{r+1}(S) per rank, convex in r. Raising
family f by one rank costs c_f = k_f·a_f + n_f·b_f parameters and gains Σ_S λ_{r_f+1}(S), so the
least-loss ranks under the budget are a knapsack over concave gains, and the greedy step of most
gain per parameter is optimal for its fractional relaxation and within one step's gain of the
integer optimum (tests check it against enumeration). Two starts:

- ``uniform``: the problem's ranks scaled by the largest common factor that fits (the solver chose
  the partition at those proportions), then greedy steps for the rest;
- ``allocated``: every family from rank 1, all by greedy steps (the ranks the cost model prefers).

Spending stops when no family's next step fits; what is left is less than the smallest step c_f
(one rank of one family), or every family is at its cap min(d_out, d_in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from hessian_worker.basis.analysis import side_of, split_classes
from hessian_worker.basis.costs import family_errors
from solver.evaluate import unique_params
from solver.planning import plan_from_coloring
from solver.schema import Scheme, SharingPlan, SharingProblem

UNIFORM, ALLOCATED = "uniform", "allocated"


@dataclass(frozen=True)
class FamilyCost:
    """One family under a plan: parameters per rank step and the classes' error curves."""

    step: int  # unique parameters one more rank costs: k·a + n·b
    cap: int  # min(d_out, d_in)
    groups: tuple[tuple[str, ...], ...]  # the family's classes
    curves: tuple[tuple[float, ...], ...]  # per class: E(S, r) for r = 0..cap

    def error(self, rank: int) -> float:
        return sum(c[rank] for c in self.curves)

    def gain(self, rank: int) -> float:
        """Predicted loss saved by raising the family from ``rank`` to ``rank + 1``."""
        return self.error(rank) - self.error(rank + 1)


def greedy_ranks(costs: Mapping[str, FamilyCost], start: Mapping[str, int], room: int) -> dict[str, int]:
    """Raise ranks from ``start`` one step at a time, the most gain per parameter first, while a step
    fits in ``room`` parameters (``start`` itself must fit). Ties go to the family named first."""
    ranks = dict(start)
    while True:
        best, best_rate = None, -1.0
        for fam, cost in costs.items():
            if ranks[fam] < cost.cap and cost.step <= room:
                rate = cost.gain(ranks[fam]) / cost.step
                if rate > best_rate:
                    best, best_rate = fam, rate
        if best is None:
            return ranks
        ranks[best] += 1
        room -= costs[best].step


def uniform_start(costs: Mapping[str, FamilyCost], ranks: Mapping[str, int], room: int) -> dict[str, int] | None:
    """``ranks`` scaled by the largest common factor k (r'_f = ⌊k·r_f / max r⌋, within 1..cap) whose
    count fits in ``room``; None when even rank 1 everywhere does not fit."""
    top = max(ranks.values())

    def at(k: int) -> dict[str, int]:
        return {f: min(c.cap, max(1, k * ranks[f] // top)) for f, c in costs.items()}

    def count(r: Mapping[str, int]) -> int:
        return sum(c.step * r[f] for f, c in costs.items())

    if count(at(1)) > room:
        return None
    lo, hi = 1, max(-(-c.cap * top // ranks[f]) for f, c in costs.items())
    while lo < hi:  # count(at(k)) is non-decreasing in k
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(at(mid)) <= room else (lo, mid - 1)
    return at(lo)


def family_costs(
    classes: Sequence[Sequence[str]],
    problem: SharingProblem,
    weights: Mapping[str, Tensor],
    covs: Mapping[str, Tensor] | None,
    *,
    damping: float = 0.01,
    curves: dict[tuple[str, ...], tuple[float, ...]] | None = None,
) -> dict[str, FamilyCost]:
    """Family -> FamilyCost of the basis ``classes`` of one plan, under the problem's accounting;
    ``curves`` caches error curves by class across the plans of one pool (they share most classes)."""
    curves = {} if curves is None else curves
    family = {x.name: x.family for x in problem.layers}
    sides = side_of(problem)
    by_family: dict[str, list[Sequence[str]]] = {}
    for group in classes:
        by_family.setdefault(family[group[0]], []).append(group)
    out = {}
    for fam, groups in by_family.items():
        spec = problem.families[fam]
        shared, own = spec.class_params // spec.rank, spec.member_params // spec.rank
        for group in groups:
            if tuple(group) not in curves:
                oracle = family_errors([weights[n] for n in group], None if covs is None else [covs[n] for n in group],
                                       sides[group[0]], damping=damping)
                curves[tuple(group)] = tuple(oracle.error_curve(range(len(group))))
        out[fam] = FamilyCost(step=len(groups) * shared + sum(map(len, groups)) * own, cap=min(shared, own),
                              groups=tuple(tuple(g) for g in groups), curves=tuple(curves[tuple(g)] for g in groups))
    return out


def filled_problem(
    problem: SharingProblem,
    costs: Mapping[str, FamilyCost],
    ranks: Mapping[str, int],
    alone: Mapping[str, float],
) -> SharingProblem:
    """The plan's own problem: every basis family at ``ranks`` (class and member params rescaled),
    each layer's unary its own error at its rank (``alone``), each class's pairs sharing evenly the
    class's error beyond its members' own (so the plan's objective is Σ_S E(S, r_f)), and the other
    pairs of basis families forbidden (null): they were not priced at these ranks."""
    data = problem.model_dump(mode="json")
    for fam, rank in ranks.items():
        spec = data["families"][fam]
        old = spec["rank"]
        spec.update(rank=rank, class_params=spec["class_params"] // old * rank,
                    member_params=spec["member_params"] // old * rank)
    pos = {x.name: i for i, x in enumerate(problem.layers)}
    in_basis = {x.name for x in problem.layers if x.family in ranks}
    matrix = [list(row) for row in data["costs"]["matrix"]]
    unary = list(data["costs"].get("unary") or [0.0] * len(pos))
    for name in in_basis:
        i = pos[name]
        unary[i] = alone[name]
        for j, other in enumerate(problem.layers):
            if j != i and other.name in in_basis:
                matrix[i][j] = None
    for fam, cost in costs.items():
        for group, curve in zip(cost.groups, cost.curves, strict=True):
            if len(group) < 2:
                continue
            extra = max(curve[ranks[fam]] - sum(alone[n] for n in group), 0.0)
            share = extra / (len(group) * (len(group) - 1) // 2)
            for a, x in enumerate(group):
                for y in group[a + 1:]:
                    matrix[pos[x]][pos[y]] = matrix[pos[y]][pos[x]] = share
    data["costs"]["matrix"], data["costs"]["unary"] = matrix, unary
    return SharingProblem.model_validate(data)


@dataclass(frozen=True)
class Filled:
    """A plan at the ranks that spend the budget, with its own problem."""

    plan: SharingPlan
    problem: SharingProblem
    ranks: dict[str, int]


def fill_plan(
    plan: SharingPlan,
    problem: SharingProblem,
    budget: int,
    weights: Mapping[str, Tensor],
    covs: Mapping[str, Tensor] | None,
    *,
    start: str = UNIFORM,
    damping: float = 0.01,
    suffix: str = "",
    curves: dict[tuple[str, ...], tuple[float, ...]] | None = None,
) -> Filled | None:
    """``plan`` (its partition) at the ranks of least predicted loss within ``budget`` unique
    parameters, from the ``uniform`` or ``allocated`` start (module docstring); None when even rank 1
    in every basis family does not fit beside the plan's other families, or the plan has no basis class.

    Args:
        weights: name -> dense weight [d_out, d_in] of every basis layer.
        covs: the whitening covariances the plan is measured and applied with (None: plain SVD).
        suffix: appended to the plan's strategy (so filled variants of one plan stay apart).
        curves: a cache of class error curves shared by the plans of one pool.
    """
    classes, _ = split_classes(plan.groups, plan.coloring, problem)
    if not classes:
        return None
    curves = {} if curves is None else curves
    costs = family_costs(classes, problem, weights, covs, damping=damping, curves=curves)
    specs = problem.families or {}
    fixed = unique_params(problem, plan.coloring) - sum(c.step * specs[f].rank for f, c in costs.items())
    room = budget - fixed
    if start == UNIFORM:
        begin = uniform_start(costs, {f: specs[f].rank for f in costs}, room)
    else:
        begin = {f: 1 for f in costs}
        if sum(c.step for c in costs.values()) > room:
            begin = None
    if begin is None:
        return None
    ranks = greedy_ranks(costs, begin, room - sum(c.step * begin[f] for f, c in costs.items()))
    alone = _alone_errors(problem, costs, ranks, weights, covs, damping, curves)
    own = filled_problem(problem, costs, ranks, alone)
    label = (plan.strategy or "optimum") + suffix
    filled = plan_from_coloring(own, plan.coloring, method=f"{plan.solver.method}+fill:{start}", strategy=label)
    return Filled(filled, own, ranks)


def _alone_errors(
    problem: SharingProblem,
    costs: Mapping[str, FamilyCost],
    ranks: Mapping[str, int],
    weights: Mapping[str, Tensor],
    covs: Mapping[str, Tensor] | None,
    damping: float,
    curves: dict[tuple[str, ...], tuple[float, ...]],
) -> dict[str, float]:
    """Each basis layer's own error at its family's rank (a class of one's curve is already known)."""
    sides = side_of(problem)
    out = {}
    for fam, cost in costs.items():
        for group, curve in zip(cost.groups, cost.curves, strict=True):
            if len(group) == 1:
                out[group[0]] = curve[ranks[fam]]
                continue
            for name in group:
                if (name,) not in curves:
                    oracle = family_errors([weights[name]], None if covs is None else [covs[name]], sides[name],
                                           damping=damping)
                    curves[(name,)] = tuple(oracle.error_curve([0]))
                out[name] = curves[(name,)][ranks[fam]]
    return out


def basis_budget_note(ratio_reached: float, ratio: float, problem: SharingProblem) -> str | None:
    """Why a basis plan keeps less than ``ratio`` (more than 1% below), or None when it spends it."""
    if ratio_reached >= ratio * 0.99:
        return None
    specs = [s for s in (problem.families or {}).values() if s.scheme is Scheme.basis]
    full = all(s.rank == min(s.class_params // s.rank, s.member_params // s.rank) for s in specs)
    why = ("every basis family is at full rank min(d_out, d_in), the most a low-rank basis keeps"
           if full else "the next rank step of every family would exceed the budget")
    return f"keeps {ratio_reached:.4f} of the requested {ratio:g}: {why}"
