"""Named heuristic strategies at the same budget, for comparisons.

Each strategy says how a family's layers form k classes (ALBERT's all-share; Takase & Kiyono's
sequence, cycle and cycle-rev; adjacent pairs; random; weight-distance clustering). The class
count per family is then chosen by the same exact knapsack the solver uses, over the pattern's own
costs, so every strategy gets its best allocation of the same budget.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np

from .family import FamilyInstance, build_families, canonical, coloring_of
from .knapsack import best_within, pareto
from .planning import SolveConfig, plan_from_coloring, solve, with_config
from .schema import CostKind, PlanStatus, SharingPlan, SharingProblem


class Strategy(str, Enum):
    all_share = "all-share"
    sequence = "sequence"
    cycle = "cycle"
    cycle_rev = "cycle-rev"
    adjacent_pairs = "adjacent-pairs"
    random = "random"
    weight_distance = "weight-distance"


PATTERNS = (Strategy.sequence, Strategy.cycle, Strategy.cycle_rev)


def pattern_labels(strategy: Strategy, n: int, k: int, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """Class of each of n layers (depth order) for k classes; None if the strategy can't make k."""
    if not 1 <= k <= n:
        return None
    i = np.arange(n)
    if strategy is Strategy.all_share:
        return np.zeros(n, dtype=int) if k == 1 else None
    if strategy is Strategy.sequence:
        return canonical(i * k // n)
    if strategy is Strategy.cycle:
        return canonical(i % k)
    if strategy is Strategy.cycle_rev:
        # cycle through the first n-k layers, then the last k layers in reverse order
        lab = i % k
        lab[n - k :] = k - 1 - np.arange(k)
        return canonical(lab)
    if strategy is Strategy.adjacent_pairs:
        merges = n - k
        if merges > n // 2:
            return None
        lab = i.copy()
        for p in range(merges):
            lab[2 * p + 1] = lab[2 * p]
        return canonical(lab)
    if strategy is Strategy.random:
        assert rng is not None
        order = rng.permutation(n)
        lab = np.empty(n, dtype=int)
        lab[order[:k]] = np.arange(k)
        lab[order[k:]] = rng.integers(0, k, n - k)
        return canonical(lab)
    raise ValueError(f"{strategy.value} is not a pattern strategy")


def pattern_options(fam: FamilyInstance, strategy: Strategy, rng: np.random.Generator) -> tuple[list, dict]:
    """Knapsack options (params, cost, k) of the strategy on one family, and its labels per k."""
    free = [j for j in range(fam.n) if j not in fam.pinned]
    options, labels = [], {}
    for k in range(len(fam.pinned) + 1 if free else len(fam.pinned), fam.n + 1):
        kf = k - len(fam.pinned)
        lab_free = pattern_labels(strategy, len(free), kf, rng) if free else np.zeros(0, dtype=int)
        if lab_free is None:
            continue
        lab = np.empty(fam.n, dtype=int)
        lab[free] = lab_free
        for i, p in enumerate(fam.pinned):
            lab[p] = kf + i
        lab = canonical(lab)
        cost = fam.layer_partition_cost(lab)
        if math.isfinite(cost):
            options.append((fam.params_for(k), cost, k))
            labels[k] = lab
    return options, labels


def baseline(
    problem: SharingProblem,
    strategy: Strategy | str,
    config: SolveConfig | None = None,
    *,
    distances: list[list[float | None]] | None = None,
    seed: int | None = None,
) -> SharingPlan:
    """The strategy's plan within the problem's budget, scored with the problem's costs.

    Args:
        distances: for weight-distance clustering, an n x n matrix (e.g. ||W_l - W_m||^2) that
            the solver clusters on instead of the costs.
        seed: for random; defaults to the problem's seed.
    """
    strategy = Strategy(strategy)
    problem = with_config(problem, config)
    if strategy is Strategy.weight_distance:
        return _weight_distance(problem, distances)
    rng = np.random.default_rng(problem.options.seed if seed is None else seed)
    fams = build_families(problem)
    per = [pattern_options(f, strategy, rng) for f in fams]
    point = best_within(pareto([opts for opts, _ in per]), problem.budget_params())
    if point is None:
        return _infeasible(problem, strategy, "the strategy cannot meet this budget under these constraints")
    coloring = coloring_of(problem, fams, [labels[k] for (_, labels), k in zip(per, point.choice, strict=True)])
    return plan_from_coloring(problem, coloring, method=f"baseline:{strategy.value}", strategy=strategy.value)


def _weight_distance(problem: SharingProblem, distances: list[list[float | None]] | None) -> SharingPlan:
    if distances is None:
        raise ValueError("weight-distance needs a distance matrix (n x n, e.g. ||W_l - W_m||^2): pass distances=")
    data = problem.model_dump()
    data["costs"] = {"kind": CostKind.pairwise.value, "matrix": distances}
    clustered = solve(SharingProblem.model_validate(data))
    plan = plan_from_coloring(problem, clustered.coloring, method="baseline:weight-distance", strategy=Strategy.weight_distance.value)
    return plan


def _infeasible(problem: SharingProblem, strategy: Strategy, why: str) -> SharingPlan:
    plan = plan_from_coloring(problem, {layer.name: i for i, layer in enumerate(problem.layers)}, method=f"baseline:{strategy.value}", strategy=strategy.value)
    return plan.model_copy(update={"status": PlanStatus.infeasible, "coloring": {}, "groups": [], "objective": None, "params": None, "message": f"{strategy.value}: {why}"})
