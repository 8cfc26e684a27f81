"""A pool of good, diverse plans for one budget: the optimum plus the pattern strategies.

The quadratic cost model ranks plans only roughly (DESIGN.md: choosing among a diverse pool by a
real forward pass on calibration data beats trusting the model's optimum), so the pipeline hands
the worker several candidates to measure. Each pattern gets its best class allocation under the
same costs and budget.
"""

from __future__ import annotations

from .baselines import Strategy, baseline
from .planning import SolveConfig, solve, with_config
from .schema import SharingPlan, SharingProblem

DEFAULT_PATTERNS = (Strategy.sequence, Strategy.cycle, Strategy.cycle_rev, Strategy.adjacent_pairs)


def candidate_plans(
    problem: SharingProblem,
    config: SolveConfig | None = None,
    patterns: tuple[Strategy | str, ...] = DEFAULT_PATTERNS,
) -> list[SharingPlan]:
    """Distinct feasible plans within the budget, best objective first; the optimum is first.

    Raises:
        BudgetInfeasible, ConstraintInfeasible: as `solve`.
    """
    problem = with_config(problem, config)
    plans = [solve(problem)]
    for strategy in patterns:
        plan = baseline(problem, strategy)
        if plan.status.value != "infeasible":
            plans.append(plan)
    seen, out = set(), []
    for plan in plans:
        key = tuple(sorted(tuple(g) for g in plan.groups))
        if key not in seen:
            seen.add(key)
            out.append(plan)
    first, rest = out[0], sorted(out[1:], key=lambda p: p.objective)
    return [first, *rest]
