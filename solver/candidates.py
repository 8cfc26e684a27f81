"""A pool of good, diverse plans for one budget: the K best colorings plus the pattern strategies.

The quadratic cost model ranks plans only roughly (DESIGN.md: choosing among a diverse pool by a
real forward pass on calibration data beats trusting the model's optimum), so the pipeline hands
the worker several candidates to measure: the optimum, the next best colorings by the objective
(each at least ``min_distance`` sharing pairs away from every better one kept), and the pattern
strategies at their best class allocations that use the budget fully.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .baselines import PATTERNS, Strategy, pattern_options
from .family import FamilyInstance, build_families, canonical, coloring_of
from .kbest import FamilyOption, FamilyTable, family_table, k_best_combinations, plan_distance
from .planning import Progress, SolveConfig, plan_from_coloring, solve, with_config
from .schema import SharingPlan, SharingProblem

DEFAULT_PATTERNS = (*PATTERNS, Strategy.adjacent_pairs)
_MAX_POOL = 20_000  # combinations scanned at most for diverse plans
_PATTERN_SCAN = 40  # combinations scanned per pattern plan wanted (most do not fill the budget)


def top_plans(
    problem: SharingProblem,
    top: int,
    config: SolveConfig | None = None,
    *,
    min_distance: int = 1,
    optimum: SharingPlan | None = None,
    normalized: bool = False,
) -> list[SharingPlan]:
    """Up to ``top`` plans within the budget, cheapest first, the solver's optimum first.

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
    if top < 1 or min_distance < 1:
        raise ValueError(f"top and min_distance must be >= 1 (got top={top}, min_distance={min_distance})")
    problem = with_config(problem, config)
    optimum = optimum or solve(problem)
    fams = build_families(problem)
    seeds = _family_labels(problem, fams, optimum.coloring)
    pool = top if min_distance == 1 else max(4 * top, 50)
    while True:  # far-apart plans may lie deep in the ranking: widen the pool until enough are kept
        built = [family_table(fam, pool, [seed], normalized=normalized) for fam, seed in zip(fams, seeds, strict=True)]
        tables = [table for table, _ in built]
        method = "k-best:" + ("enumerated" if all(exact for _, exact in built) else "enumerated+neighbourhood")
        combos = k_best_combinations(tables, _params(fams, tables), problem.budget_params(), pool)
        kept = [] if normalized else [optimum]
        for combo in combos:
            if len(kept) == top:
                break
            labels = [np.asarray(table[k][j].labels) for table, (k, j) in zip(tables, combo.picks, strict=True)]
            plan = plan_from_coloring(problem, coloring_of(problem, fams, labels), method=method)
            if all(plan_distance(plan.groups, other.groups) >= min_distance for other in kept):
                kept.append(plan)
        if len(kept) == top or len(combos) < pool or pool >= _MAX_POOL:
            break
        pool = min(4 * pool, _MAX_POOL)
    if normalized:
        return [p.model_copy(update={"strategy": f"norm-{i}"}) for i, p in enumerate(kept, start=1)]
    kept.sort(key=lambda p: p.objective)  # a neighbourhood may beat a time-limited optimum
    return [p if p is optimum else p.model_copy(update={"strategy": f"top-{i}"}) for i, p in enumerate(kept, start=1)]


def pattern_plans(
    problem: SharingProblem,
    config: SolveConfig | None = None,
    *,
    patterns: Sequence[Strategy | str] = DEFAULT_PATTERNS,
    per_pattern: int = 1,
) -> list[SharingPlan]:
    """Each pattern's ``per_pattern`` cheapest class allocations that fill the budget (no family
    could take one more class), cheapest first per pattern; patterns that cannot meet the budget
    give nothing."""
    problem = with_config(problem, config)
    fams = build_families(problem)
    budget = problem.budget_params()
    out = []
    for strategy in map(Strategy, patterns):
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
    return _distinct(plans)


def solve_with_alternatives(
    problem: SharingProblem,
    config: SolveConfig | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
) -> SharingPlan:
    """`solve`, plus ``plan.alternatives`` when the problem's ``options.top`` asks for more than one
    plan: the next best diverse colorings and the pattern plans, each with its objective."""
    problem = with_config(problem, config)
    plan = solve(problem, progress=progress)
    top = problem.options.top or 1
    if top <= 1:
        return plan
    best = top_plans(problem, top, min_distance=problem.options.min_distance, optimum=plan)
    head = best[0]
    if head is not plan:  # a neighbourhood beat the time-limited optimum; the bound still holds
        gap = max(0.0, head.objective - plan.bound) / max(abs(head.objective), 1e-12) if plan.bound is not None else None
        head = head.model_copy(update={"bound": plan.bound, "gap": gap, "families": None})
    alternatives = _distinct([head, *best[1:], *pattern_plans(problem, per_pattern=1)])[1:]
    return head.model_copy(update={"alternatives": alternatives})


def _distinct(plans: Sequence[SharingPlan]) -> list[SharingPlan]:
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


__all__ = ["candidate_plans", "top_plans", "pattern_plans", "solve_with_alternatives", "DEFAULT_PATTERNS"]
