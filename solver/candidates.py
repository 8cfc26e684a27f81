"""A pool of good, diverse plans for one budget: the K best colorings plus the pattern strategies.

The quadratic cost model ranks plans only roughly (docs/design.md §Why measure: choosing among
a diverse pool by a
real forward pass on calibration data beats trusting the model's optimum), so the pipeline hands
the worker several candidates to measure: the optimum, the next best colorings by the objective
(each at least ``min_distance`` sharing pairs away from every better one kept), and the pattern
strategies at their best class allocations that use the budget fully.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .baselines import PATTERNS, Strategy, pattern_options
from .deadline import Deadline
from .family import FamilyInstance, build_families, canonical, coloring_of
from .kbest import (
    Combination,
    FamilyOption,
    FamilyTable,
    coloring_pairs,
    family_table,
    k_best_combinations,
)
from .planning import Progress, SolveConfig, plan_from_coloring, solve, with_config
from .scaling import relative_gap
from .schema import SharingPlan, SharingProblem

DEFAULT_PATTERNS = (*PATTERNS, Strategy.adjacent_pairs)
_MAX_POOL = 20_000  # combinations scanned at most for diverse plans
_PATTERN_SCAN = 40  # combinations scanned per pattern plan wanted (most do not fill the budget)
# With alternatives, one time_limit_s covers it all: the optimum's search ends by this share of
# it, the next best plans by the second, and the (cheap) pattern plans take the rest.
_SOLVE_SHARE, _TOP_SHARE = 0.7, 0.9


def top_plans(
    problem: SharingProblem,
    top: int,
    config: SolveConfig | None = None,
    *,
    min_distance: int = 1,
    optimum: SharingPlan | None = None,
    normalized: bool = False,
    deadline: Deadline | None = None,
) -> list[SharingPlan]:
    """Up to ``top`` plans within the budget, cheapest first, the solver's optimum first.

    With a ``deadline``, the plans found by then (fewer than ``top`` when it cut the search).

    ``normalized`` ranks by size-normalized pairwise costs instead (a class S costs
    (2/|S|)·Σ its pair costs, closer to a real mean merge; see ``kbest._partition_costs``): the
    plans are then named ``norm-1``, ``norm-2``, ..., carry the contract's objective, and the
    optimum is not forced first.

    Greedy in objective order: a plan is kept when it differs from every plan kept before it in
    at least ``min_distance`` sharing pairs (see ``kbest.plan_distance``). Exact (the true K best)
    when every family has at most ``kbest.ENUM_MAX_UNITS`` free units; larger families contribute
    their incumbents' neighbourhoods, and the plans' method says so.

    Raises:
        BudgetInfeasible, ConstraintInfeasible: as `solve`.
    """
    return _top_plans(problem, top, config, min_distance=min_distance, optimum=optimum, normalized=normalized, deadline=deadline)[0]


def _top_plans(
    problem: SharingProblem,
    top: int,
    config: SolveConfig | None = None,
    *,
    min_distance: int = 1,
    optimum: SharingPlan | None = None,
    normalized: bool = False,
    deadline: Deadline | None = None,
) -> tuple[list[SharingPlan], bool]:
    """`top_plans`, and whether the clock cut the search short."""
    if top < 1 or min_distance < 1:
        raise ValueError(f"top and min_distance must be >= 1 (got top={top}, min_distance={min_distance})")
    problem = with_config(problem, config)
    optimum = optimum or solve(problem, deadline=deadline)
    fams = build_families(problem)
    base = [] if normalized else [optimum]
    if min_distance > sum(f.n * (f.n - 1) // 2 for f in fams):
        top = len(base)  # no two plans differ in more pairs than could ever share: nothing to search
    seeds = _family_labels(problem, fams, optimum.coloring)
    pool = top if min_distance == 1 else max(4 * top, 50)
    reach = _max_classes(fams, problem.budget_params())
    kept, cut = list(base), False
    while len(kept) < top:  # far-apart plans may lie deep in the ranking: widen the pool until enough are kept
        if deadline is not None and deadline.expired():
            cut = True
            break
        tables_by = None if deadline is None else deadline.split(0.5)  # half the time left combines and scores
        built = [
            family_table(fam, pool, [seed], normalized=normalized, deadline=tables_by, max_classes=most)
            for fam, seed, most in zip(fams, seeds, reach, strict=True)
        ]
        tables = [table for table, _ in built]
        method = "k-best:" + ("enumerated" if all(exact for _, exact in built) else "enumerated+neighbourhood")
        combos = k_best_combinations(tables, _params(fams, tables), problem.budget_params(), pool, deadline)
        found = _diverse(problem, fams, tables, combos, list(base), top, min_distance, method, deadline)
        cut = tables_by is not None and tables_by.expired() or deadline is not None and deadline.expired()
        if len(found) >= len(kept):  # a wider pool cut short may find fewer than the last one
            kept = found
        if cut or len(kept) == top or len(combos) < pool or pool >= _MAX_POOL:
            break
        pool = min(4 * pool, _MAX_POOL)
    if normalized:
        return [p.model_copy(update={"strategy": f"norm-{i}"}) for i, p in enumerate(kept, start=1)], cut
    kept.sort(key=lambda p: p.objective)  # a neighbourhood may beat a time-limited optimum
    return [p if p is optimum else p.model_copy(update={"strategy": f"top-{i}"}) for i, p in enumerate(kept, start=1)], cut


def _diverse(
    problem: SharingProblem,
    fams: Sequence[FamilyInstance],
    tables: Sequence[FamilyTable],
    combos: Sequence[Combination],
    kept: list[SharingPlan],
    top: int,
    min_distance: int,
    method: str,
    deadline: Deadline | None,
) -> list[SharingPlan]:
    """Greedy in the combinations' order: keep a plan at least ``min_distance`` pairs from every
    plan kept before it, until ``top`` are kept or the deadline passes."""
    pairs = [coloring_pairs(p.coloring) for p in kept]
    seen = set(pairs)  # distance >= 1 is only "a different partition"
    for combo in combos:
        if len(kept) == top or deadline is not None and deadline.expired():
            break
        labels = [np.asarray(table[k][j].labels) for table, (k, j) in zip(tables, combo.picks, strict=True)]
        coloring = coloring_of(problem, fams, labels)
        these = coloring_pairs(coloring)  # compared before a plan is built: most combinations are dropped
        if these in seen if min_distance == 1 else any(len(these ^ other) < min_distance for other in pairs):
            continue
        kept.append(plan_from_coloring(problem, coloring, method=method))
        pairs.append(these)
        seen.add(these)
    return kept


def pattern_plans(
    problem: SharingProblem,
    config: SolveConfig | None = None,
    *,
    patterns: Sequence[Strategy | str] = DEFAULT_PATTERNS,
    per_pattern: int = 1,
    deadline: Deadline | None = None,
) -> list[SharingPlan]:
    """Each pattern's ``per_pattern`` cheapest class allocations that fill the budget (no family
    could take one more class), cheapest first per pattern; patterns that cannot meet the budget
    give nothing, and those not reached by ``deadline`` neither; ``per_pattern`` 0 gives none."""
    if per_pattern < 1:
        return []
    problem = with_config(problem, config)
    fams = build_families(problem)
    budget = problem.budget_params()
    out = []
    for strategy in map(Strategy, patterns):
        if deadline is not None and deadline.expired():
            break
        rng = np.random.default_rng(problem.options.seed)
        tables: list[FamilyTable] = []
        for fam in fams:
            options, labels = pattern_options(fam, strategy, rng)
            tables.append({k: [FamilyOption(cost, tuple(labels[k].tolist()))] for _, cost, k in options})
        if any(not t for t in tables):
            continue
        params = _params(fams, tables)
        rank = 0
        for combo in k_best_combinations(tables, params, budget, _PATTERN_SCAN * per_pattern):
            if not _fills(combo.picks, combo.params, params, budget):
                continue
            labels = [np.asarray(table[k][0].labels) for table, (k, _) in zip(tables, combo.picks, strict=True)]
            rank += 1
            name = strategy.value if rank == 1 else f"{strategy.value}#{rank}"
            out.append(plan_from_coloring(problem, coloring_of(problem, fams, labels), method=f"baseline:{strategy.value}", strategy=name))
            if rank == per_pattern:
                break
    return out


def candidate_plans(
    problem: SharingProblem,
    config: SolveConfig | None = None,
    *,
    top: int = 8,
    min_distance: int = 1,
    patterns: Sequence[Strategy | str] = DEFAULT_PATTERNS,
    per_pattern: int = 1,
    normalized_top: int = 0,
) -> list[SharingPlan]:
    """The pool the worker measures: ``top_plans`` (optimum first), the ``normalized_top`` best
    by size-normalized pair costs, then the pattern plans, with duplicates dropped.

    Raises:
        BudgetInfeasible, ConstraintInfeasible: as `solve`.
    """
    plans = top_plans(problem, top, config, min_distance=min_distance)
    if normalized_top:
        plans += top_plans(problem, normalized_top, config, min_distance=min_distance, optimum=plans[0], normalized=True)
    plans += pattern_plans(problem, config, patterns=patterns, per_pattern=per_pattern)
    return distinct_plans(plans)


def solve_with_alternatives(
    problem: SharingProblem,
    config: SolveConfig | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
    deadline: Deadline | None = None,
) -> SharingPlan:
    """`solve`, plus ``plan.alternatives`` when the problem's ``options.top`` asks for more than one
    plan: the next best diverse colorings and the pattern plans, each with its objective.

    ``time_limit_s`` (or ``deadline``) bounds the whole of it: the optimum's search gets the first
    70%, the next best plans run to 90%, the pattern plans take the rest. Alternatives the clock
    cut are missing; the plan then says so (``solver.time_limit_hit`` and ``message``).
    """
    problem = with_config(problem, config)
    deadline = Deadline.after(problem.options.time_limit_s) if deadline is None else deadline
    top = problem.options.top or 1
    if top <= 1:
        return solve(problem, progress=progress, deadline=deadline)
    top_deadline = deadline.share(_TOP_SHARE)
    plan = solve(problem, progress=progress, deadline=deadline.share(_SOLVE_SHARE))
    best, cut = _top_plans(problem, top, min_distance=problem.options.min_distance, optimum=plan, deadline=top_deadline)
    head = best[0]
    if head is not plan:  # a neighbourhood beat the time-limited optimum; the bound still holds
        gap = relative_gap(head.objective, plan.bound) if plan.bound is not None else None
        head = head.model_copy(update={"bound": plan.bound, "gap": gap, "families": None})
    patterns = pattern_plans(problem, per_pattern=1, deadline=deadline)
    pattern_cut = deadline.expired()  # checked before each pattern: an expired clock may have skipped some
    alternatives = distinct_plans([head, *best[1:], *patterns])[1:]
    update: dict = {"alternatives": alternatives}
    if cut or deadline.expired():  # the clock shaped the alternatives: not reproducible, maybe not all
        update["solver"] = head.solver.model_copy(update={"time_limit_hit": True})
        if len(best) < top or pattern_cut:
            update["message"] = (
                f"time_limit_s={problem.options.time_limit_s:g} ran out while listing alternatives: {len(best) - 1} of the "
                f"{top - 1} next best plans and {len(patterns)} pattern plans are listed; raise time_limit_s for more"
            )
    return head.model_copy(update=update)


def distinct_plans(plans: Sequence[SharingPlan]) -> list[SharingPlan]:
    """The plans in order, each partition of the layers kept once (its first plan)."""
    seen: set[tuple[tuple[str, ...], ...]] = set()
    out = []
    for plan in plans:
        key = tuple(sorted(tuple(g) for g in plan.groups))
        if key not in seen:
            seen.add(key)
            out.append(plan)
    return out


def _params(fams: Sequence[FamilyInstance], tables: Sequence[FamilyTable]) -> list[dict[int, int]]:
    return [{k: fam.params_for(k) for k in table} for fam, table in zip(fams, tables, strict=True)]


def _max_classes(fams: Sequence[FamilyInstance], budget: int | None) -> list[int | None]:
    """Per family, the most classes any plan within the budget can give it (the others at one
    class each, or their pinned singletons: a count never below what they need)."""
    if budget is None:
        return [None] * len(fams)
    least = [f.params_for(max(1, len(f.pinned) + (1 if f.units else 0))) for f in fams]
    out: list[int | None] = []
    for f, own in zip(fams, least, strict=True):
        room = budget - (sum(least) - own) - f.member_params * f.n
        out.append(max(1, room // f.class_params) if f.class_params > 0 else None)
    return out


def _fills(picks: tuple[tuple[int, int], ...], total: int, params: list[dict[int, int]], budget: int | None) -> bool:
    """No family could move to a larger class count of its own and stay within the budget."""
    if budget is None:
        return all(k == max(p) for (k, _), p in zip(picks, params, strict=True))
    for (k, _), p in zip(picks, params, strict=True):
        if any(kk > k and total - p[k] + p[kk] <= budget for kk in p):
            return False
    return True


def _family_labels(problem: SharingProblem, fams: Sequence[FamilyInstance], coloring: dict[str, int]) -> list[np.ndarray]:
    """Each family's layer labels (depth order) under a problem-wide coloring."""
    return [canonical(np.array([coloring[problem.layers[g].name] for g in fam.layer_ids], dtype=int)) for fam in fams]


__all__ = ["candidate_plans", "top_plans", "pattern_plans", "distinct_plans", "solve_with_alternatives",
           "DEFAULT_PATTERNS"]
