"""The public verbs: solve a SharingProblem to a SharingPlan, or map its whole frontier.

Flow: split by family -> per-family curves (exact where cheap) -> exact knapsack over the curves
-> spend the time on the (family, k) cells the knapsack picks, for better incumbents and bounds
(column generation and its integer master, tabu, the p-median MIP) -> knapsack again. The bound is the knapsack over lower curves, so
it holds for the whole problem, not just the chosen class counts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import ortools
from pydantic import BaseModel, ConfigDict, Field

from . import evaluate
from .curves import FamilyCurve, improve, initial_curve
from .deadline import Deadline
from .errors import BudgetInfeasible
from .family import FamilyInstance, build_families, coloring_of
from .graph import why_classes
from .knapsack import Point, best_within, pareto
from .scaling import GAP_TOL, relative_gap
from .schema import (
    MAX_COUNT,
    MAX_SEED,
    FamilyResult,
    PlanParams,
    PlanStatus,
    SharingPlan,
    SharingProblem,
    SolverInfo,
)


class SolveConfig(BaseModel):
    """Overrides of the problem's own constraints and options (None keeps the problem's)."""

    model_config = ConfigDict(extra="forbid")

    max_params_ratio: float | None = Field(default=None, gt=0, le=1)
    max_params: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    time_limit_s: float | None = Field(default=None, gt=0, le=3600)
    relative_gap: float | None = Field(default=None, ge=0, le=1)
    workers: int | None = Field(default=None, ge=1, le=64)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


def with_config(problem: SharingProblem, config: SolveConfig | None) -> SharingProblem:
    """A copy of the problem with the config's overrides applied (validated again)."""
    if config is None or not _overrides(problem, config):
        return problem  # nothing to change: skip the copy and its validation (the service's path)
    data = problem.model_dump()
    for key in ("max_params_ratio", "max_params"):
        if getattr(config, key) is not None:
            data["constraints"][key] = getattr(config, key)
    for key in ("time_limit_s", "relative_gap", "workers", "seed"):
        if getattr(config, key) is not None:
            data["options"][key] = getattr(config, key)
    return SharingProblem.model_validate(data)


def _overrides(problem: SharingProblem, config: SolveConfig) -> bool:
    """Whether the config sets anything to a value the problem does not already have."""
    held = {"max_params_ratio": problem.constraints.max_params_ratio, "max_params": problem.constraints.max_params,
            "time_limit_s": problem.options.time_limit_s, "relative_gap": problem.options.relative_gap,
            "workers": problem.options.workers, "seed": problem.options.seed}
    return any(value is not None and value != held[key] for key, value in config.model_dump().items())


def default_workers(problem: SharingProblem) -> int:
    return problem.options.workers or max(1, min(8, os.cpu_count() or 1))


class _Search:
    """State of one solve: curves, clock, and the bookkeeping shared by solve and frontier.

    Costs inside are normalized (see scaling.py); ``to_problem`` turns them back into the
    problem's units for everything a caller sees.
    """

    def __init__(self, problem: SharingProblem, deadline: Deadline | None = None) -> None:
        self.problem = problem
        self.t0 = time.perf_counter()
        self.deadline = Deadline.after(problem.options.time_limit_s) if deadline is None else deadline
        self.limit = min(problem.options.time_limit_s, self.deadline.seconds)  # sizes the work, not the clock
        self.workers = default_workers(problem)
        self.seed = problem.options.seed
        self.fams: list[FamilyInstance] = build_families(problem)
        self.curves: list[FamilyCurve] = [initial_curve(f, self.deadline) for f in self.fams]
        self.hit_limit = False
        self.steps = 0  # cells improved so far
        self.budget: int | None = None  # set by solve: the fronts then hold only points within it
        self._fronts: tuple[list, list, list[Point], list[Point]] | None = None

    def to_problem(self, cost: float) -> float:
        return self.fams[0].to_problem(cost)  # one normalization for all families

    @property
    def limit_hit(self) -> bool:
        """Whether a clock (the deadline, or a stage's wall-clock backstop) shaped the result."""
        return self.hit_limit or self.deadline.expired() or any(c.wall_cut for c in self.curves)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline.left()

    def least_params(self) -> int:
        return sum(c.fam.params_for(c.k_min) for c in self.curves)

    def check_budget(self, budget: int | None) -> None:
        least = self.least_params()
        if budget is not None and budget < least:
            ratio = least / self.problem.original_params
            want = self.problem.constraints.max_params_ratio
            got = f"max_params_ratio={want}" if want is not None else f"max_params={budget}"
            names = [layer.name for layer in self.problem.layers]
            why = [f"family {c.fam.name!r} needs {c.k_min} classes: {r}" for c in self.curves if c.k_min > 1 and (r := why_classes(c.fam, names))]
            raise BudgetInfeasible(
                f"{got} is infeasible: the least reachable is {least} params "
                f"(ratio {ratio:.4f}) with these families, pins and constraints"
                + (f" ({'; '.join(why)})" if why else "")
                + ("; the least class counts were not proven in time, so a longer time_limit_s may reach less"
                   if any("k_min-unproven" in c.methods for c in self.curves) else "")
                + "; raise the budget or drop pins/forbid pairs",
                least_params=least,
                least_ratio=ratio,
            )

    def fronts(self) -> tuple[list[Point], list[Point]]:
        """Upper and lower Pareto fronts, memoized on the curves' options: a solve asks again
        after its last round, and on exact curves the lower front is the upper one."""
        up_opts = [c.options(upper=True) for c in self.curves]
        lo_opts = [c.options(upper=False) for c in self.curves]
        if self._fronts is not None and self._fronts[0] == up_opts and self._fronts[1] == lo_opts:
            return self._fronts[2], self._fronts[3]
        # within a budget, the last best choice still fits and costs no more now: nothing
        # dearer than it can be the best plan or the bound, so the fronts stop there
        cap = None
        if self.budget is not None and self._fronts is not None and (last := best_within(self._fronts[2], self.budget)):
            cap = 0.0
            for opts, k in zip(up_opts, last.choice, strict=True):
                cap += next(o[1] for o in opts if o[2] == k)
        # each front only when its curves moved: a cell worked for the bound alone leaves the
        # upper curves as they were (the fronts took a tenth of a 15 s solve on 7x80 layers)
        if self._fronts is not None and self._fronts[0] == up_opts:
            up = self._fronts[2]
        else:
            up = pareto(up_opts, self.budget, cap)
        if lo_opts == up_opts:
            lo = up
        elif self._fronts is not None and self._fronts[1] == lo_opts:
            lo = self._fronts[3]
        else:
            lo = pareto(lo_opts, self.budget, cap)
        self._fronts = (up_opts, lo_opts, up, lo)
        return up, lo

    def open_cells(self, choice: tuple[int, ...], round_: int) -> list[tuple[int, int]]:
        """Cells of a knapsack choice that are unproven and have had fewer than round_ rounds,
        smallest classes first: pricing grows steeply with the class size (classes of 10 at 80
        units took seconds, classes of 3 a tenth of that), and a short limit then still gets
        every cheap family's incumbent and bound before the one hard family."""
        cells = [
            (fi, k)
            for fi, k in enumerate(choice)
            if not self.curves[fi].exact
            and self.curves[fi].gap_at(k) > GAP_TOL * abs(self.curves[fi].ub.get(k, 0.0))
            and self.curves[fi].tried.get(k, 0) < round_
        ]
        return sorted(cells, key=lambda cell: (self.fams[cell[0]].reduced.m / cell[1], cell[0]))

    def work(self, cells: list[tuple[int, int]], effort: float, after: Callable[[], None] | None = None,
             for_bound: bool = False) -> bool:
        """Improve the given (family, k) cells, calling ``after`` after each; False when the
        clock ran out. ``for_bound``: cells that only the bound's knapsack picks, whose first
        visit is their column generation alone (their bound), later visits the whole work."""
        for fi, k in cells:
            if self.left() <= 0:
                self.hit_limit = True
                return False
            bound_only = for_bound and not self.curves[fi].tried.get(k, 0)
            improve(self.curves[fi], k, effort, self.workers, self.seed, deadline=self.deadline, bound_only=bound_only)
            self.steps += 1
            if after is not None:
                after()
        return True


# The work schedule does not depend on time_limit_s: round r gives each open cell
# _FIRST_EFFORT * 2^(r-1) nominal seconds of deterministic work, and the limit only decides
# where the sequence stops. A longer limit therefore runs a prefix-extension of a shorter one's
# steps and can only end with better curves. Before, the effort per cell was a share of the
# limit, so 600 s took another search path than 30 s and ended 0.2% worse on 7x32 layers.
_FIRST_EFFORT = 0.5
_MAX_ROUNDS = 12  # 0.5 s .. 1024 s per cell: long limits are never cut short by the schedule


def _round_effort(round_: int) -> float:
    return _FIRST_EFFORT * 2 ** (round_ - 1)


class Progress(BaseModel):
    """An improvement during a solve: the best objective found so far and the proven bound.

    ``round`` and ``steps`` (added, optional) say where in the work schedule it came: the
    schedule's round and the (family, class count) cells improved so far.
    """

    objective: float
    bound: float
    gap: float
    elapsed_s: float
    round: int | None = None
    steps: int | None = None


def solve(
    problem: SharingProblem,
    config: SolveConfig | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
    deadline: Deadline | None = None,
) -> SharingPlan:
    """The least-cost coloring within the budget, with a proven lower bound.

    Args:
        progress: called whenever the incumbent or the bound improves (for live streams).
        deadline: when the whole request must end (default: ``time_limit_s`` from now); the
            plan is the best found by then, ``optimal`` only if its gap is proven.

    Raises:
        BudgetInfeasible: the budget is below the least reachable unique-parameter count.
        ConstraintInfeasible: the sharing constraints contradict each other.
    """
    problem = with_config(problem, config)
    search = _Search(problem, deadline)
    budget = problem.budget_params()
    search.check_budget(budget)
    search.budget = budget
    tol = problem.options.relative_gap
    last: tuple[float, float] | None = None
    round_ = 1

    def fronts_and_report() -> tuple[Point, Point]:
        nonlocal last
        up_front, lo_front = search.fronts()
        best, low = best_within(up_front, budget), best_within(lo_front, budget)
        assert best is not None and low is not None  # budget >= least reachable
        if progress is not None and (best.cost, low.cost) != last:
            last = (best.cost, low.cost)
            objective, bound = search.to_problem(best.cost), search.to_problem(min(low.cost, best.cost))
            progress(Progress(objective=objective, bound=bound, gap=relative_gap(objective, bound),
                              elapsed_s=round(search.elapsed(), 4), round=round_, steps=search.steps))
        return best, low

    for round_ in range(1, _MAX_ROUNDS + 1):
        while True:
            best, low = fronts_and_report()
            if relative_gap(best.cost, low.cost) <= tol + GAP_TOL:
                break
            # the chosen plan's cells first (better incumbents, tight local bounds), then the
            # cells the bound knapsack leans on, at first for their bound only (the integer
            # master, closure and tabu of cells no plan used took most of the first round)
            cells = search.open_cells(best.choice, round_)
            for_bound = not cells
            cells = cells or search.open_cells(low.choice, round_)
            if not cells or not search.work(cells, _round_effort(round_), after=fronts_and_report, for_bound=for_bound):
                break
        if search.hit_limit or relative_gap(best.cost, low.cost) <= tol + GAP_TOL:
            break
    up_front, lo_front = search.fronts()
    return _plan(search, best_within(up_front, budget), best_within(lo_front, budget))


def _plan(search: _Search, best: Point, low: Point) -> SharingPlan:
    problem = search.problem
    chosen = [curve.labels[k] for curve, k in zip(search.curves, best.choice, strict=True)]
    families = {
        curve.fam.name: FamilyResult(
            classes=int(labels.max()) + 1,
            objective=search.to_problem(curve.ub[k]),
            bound=search.to_problem(min(curve.lb.get(k, 0.0), curve.ub[k])),
        )
        for curve, k, labels in zip(search.curves, best.choice, chosen, strict=True)
    }
    coloring = _renumber(problem, coloring_of(problem, search.fams, chosen))
    objective = evaluate.objective(problem, coloring)
    bound = min(search.to_problem(low.cost), objective)
    gap = relative_gap(objective, bound)
    status = PlanStatus.optimal if gap <= problem.options.relative_gap + GAP_TOL else PlanStatus.feasible
    shared = evaluate.unique_params(problem, coloring)
    methods = sorted(set().union(*(c.methods for c in search.curves)))
    return SharingPlan(
        status=status,
        coloring=coloring,
        groups=_groups(problem, coloring),
        objective=objective,
        bound=bound,
        gap=gap,
        params=PlanParams(original=problem.original_params, shared=shared, ratio=shared / problem.original_params),
        solver=SolverInfo(
            method="+".join(["knapsack", *methods]),
            time_s=round(search.elapsed(), 4),
            ortools=ortools.__version__,
            seed=problem.options.seed,
            workers=search.workers,
            time_limit_hit=search.limit_hit,
        ),
        families=families,
    )


def _renumber(problem: SharingProblem, coloring: dict[str, int]) -> dict[str, int]:
    """Class ids 0, 1, ... in order of first appearance in the layer list."""
    mapping: dict[int, int] = {}
    return {layer.name: mapping.setdefault(coloring[layer.name], len(mapping)) for layer in problem.layers}


def _groups(problem: SharingProblem, coloring: dict[str, int]) -> list[list[str]]:
    """Every class as its layer names (singletons included), in class-id order."""
    groups: dict[int, list[str]] = {}
    for layer in problem.layers:
        groups.setdefault(coloring[layer.name], []).append(layer.name)
    return [groups[c] for c in sorted(groups)]


def plan_from_coloring(problem: SharingProblem, coloring: dict[str, int], method: str, strategy: str | None = None) -> SharingPlan:
    """Wrap a given coloring (a baseline's) as a plan with its objective and params; no bound."""
    coloring = _renumber(problem, coloring)
    shared = evaluate.unique_params(problem, coloring)
    broken = evaluate.violations(problem, coloring)
    return SharingPlan(
        status=PlanStatus.feasible if not broken else PlanStatus.infeasible,
        coloring=coloring,
        groups=_groups(problem, coloring),
        objective=evaluate.objective(problem, coloring),
        params=PlanParams(original=problem.original_params, shared=shared, ratio=shared / problem.original_params),
        solver=SolverInfo(method=method, time_s=0.0, ortools=ortools.__version__, seed=problem.options.seed),
        strategy=strategy,
        message="; ".join(broken) if broken else None,
    )


class FrontierPoint(BaseModel):
    params: int
    ratio: float
    objective: float
    bound: float
    gap: float
    classes: dict[str, int]


class Frontier(BaseModel):
    """Every reachable budget level: the best coloring found and a bound on the best possible."""

    original: int
    points: list[FrontierPoint]
    solver: SolverInfo


def frontier(problem: SharingProblem, config: SolveConfig | None = None, *, deadline: Deadline | None = None) -> Frontier:
    """The compression-vs-cost frontier in one call, from the same per-family curves, within
    ``time_limit_s`` (or ``deadline``) for the whole of it."""
    problem = with_config(problem, config)
    search = _Search(problem, deadline)
    # every class count of every family, round by round on the same schedule as solve
    for round_ in range(1, _MAX_ROUNDS + 1):
        cells = [(fi, k) for fi, c in enumerate(search.curves) if not c.exact for k in c.ks
                 if c.gap_at(k) > GAP_TOL * abs(c.ub.get(k, 0.0)) and c.tried.get(k, 0) < round_]
        if not cells or not search.work(cells, _round_effort(round_)):
            break
    up_front, lo_front = search.fronts()
    names = [c.fam.name for c in search.curves]
    points = []
    for p in up_front:
        low = best_within(lo_front, p.params)
        objective = search.to_problem(p.cost)
        bound = min(search.to_problem(low.cost) if low else 0.0, objective)
        points.append(
            FrontierPoint(
                params=p.params,
                ratio=p.params / problem.original_params,
                objective=objective,
                bound=bound,
                gap=relative_gap(objective, bound),
                classes=dict(zip(names, p.choice, strict=True)),
            )
        )
    info = SolverInfo(
        method="frontier",
        time_s=round(search.elapsed(), 4),
        ortools=ortools.__version__,
        seed=problem.options.seed,
        workers=search.workers,
        time_limit_hit=search.limit_hit,
    )
    return Frontier(original=problem.original_params, points=points, solver=info)


__all__ = ["Progress", "SolveConfig", "solve", "frontier", "Frontier", "FrontierPoint", "plan_from_coloring"]
