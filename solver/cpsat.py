"""CP-SAT model of one family's pairwise coloring at a fixed class count.

Asymmetric representatives: x[i, j] (i <= j) says unit j sits in the class whose smallest unit is
i; x[i, i] says i leads a class. This removes the relabelling symmetry. Same-class literals y[i, j]
are forced by clauses x[r, i] & x[r, j] -> y[i, j] and carry the pair cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from .family import UnitProblem, canonical
from .scaling import Scale, scale_for
from .schema import CostKind


@dataclass
class CpsatModel:
    model: cp_model.CpModel
    x: dict[tuple[int, int], cp_model.IntVar]
    scale: Scale


@dataclass
class CpsatResult:
    labels: np.ndarray | None
    objective: float | None  # float cost of labels (exact, not scaled)
    bound: float  # valid lower bound on the float cost
    status: str
    wall_cut: bool = False  # the wall-clock backstop, not deterministic time, ended the search


def build_model(up: UnitProblem, k: int, hint: np.ndarray | None = None) -> CpsatModel:
    """The representatives model for at most k classes (pure: no solving)."""
    if up.kind is not CostKind.pairwise:
        raise ValueError("the CP-SAT model here is for pairwise costs")
    m = up.m
    model = cp_model.CpModel()
    x = {(i, j): model.new_bool_var(f"x_{i}_{j}") for j in range(m) for i in range(j + 1)}
    # each unit belongs to exactly one representative
    for j in range(m):
        model.add_exactly_one(x[i, j] for i in range(j + 1))
    # a unit can only join a class whose representative leads it
    for j in range(m):
        for i in range(j):
            model.add_implication(x[i, j], x[i, i])
    # at most k classes
    model.add(sum(x[i, i] for i in range(m)) <= k)
    # class size cap (in layers)
    if up.max_size is not None:
        for i in range(m):
            model.add(sum(int(up.sizes[j]) * x[i, j] for j in range(i, m)) <= up.max_size)
    # forbidden pairs never share a representative
    for a in range(m):
        for b in range(a + 1, m):
            if up.forbidden[a, b]:
                for r in range(a + 1):
                    model.add_bool_or([x[r, a].Not(), x[r, b].Not()])
    # same-class literals carry the cost
    scale = scale_for(np.triu(up.pair, 1))
    w = scale.to_int(up.pair)
    terms = []
    for a in range(m):
        for b in range(a + 1, m):
            if w[a, b] <= 0 or up.forbidden[a, b]:
                continue
            y = model.new_bool_var(f"y_{a}_{b}")
            for r in range(a + 1):
                model.add_bool_or([x[r, a].Not(), x[r, b].Not(), y])
            terms.append(int(w[a, b]) * y)
    model.minimize(sum(terms))
    if hint is not None:
        lab = canonical(np.asarray(hint))
        lead = {c: int(np.flatnonzero(lab == c)[0]) for c in np.unique(lab)}
        for (i, j), var in x.items():
            model.add_hint(var, lead[lab[j]] == i)
    return CpsatModel(model, x, scale)


def cpsat_seed(seed: int) -> int:
    """CP-SAT's random_seed is a 32-bit int; the contract's seeds are any int64 >= 0, so CP-SAT
    gets the seed modulo 2^31 (seeds below 2^31 pass unchanged)."""
    return seed % 2**31


def solve_model(
    built: CpsatModel,
    up: UnitProblem,
    time_limit_s: float,
    workers: int,
    seed: int,
    wall_limit_s: float | None = None,
) -> CpsatResult:
    """Solve with fixed seed and workers; LP-based subsolvers are what give real bounds."""
    solver = cp_model.CpSolver()
    p = solver.parameters
    # deterministic time makes equal inputs give equal results; the wall clock is only a backstop
    p.max_deterministic_time = time_limit_s
    p.max_time_in_seconds = 3 * time_limit_s + 1 if wall_limit_s is None else wall_limit_s
    p.num_workers = workers
    p.interleave_search = True
    p.random_seed = cpsat_seed(seed)
    p.linearization_level = 2
    if workers <= 8:
        p.extra_subsolvers.append("max_lp")
    status = solver.solve(built.model)
    result = read_result(solver, status, built, up)
    # deterministic time left over while the wall clock ran out: the machine's speed decided
    result.wall_cut = status != cp_model.OPTIMAL and solver.wall_time >= 0.99 * p.max_time_in_seconds
    return result


def read_result(solver: cp_model.CpSolver, status: int, built: CpsatModel, up: UnitProblem) -> CpsatResult:
    name = solver.status_name(status)
    bound = built.scale.to_float(solver.best_objective_bound) if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else 0.0
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpsatResult(None, None, max(bound, 0.0), name)
    m = up.m
    labels = np.empty(m, dtype=int)
    for (i, j), var in built.x.items():
        if solver.boolean_value(var):
            labels[j] = i
    labels = canonical(labels)
    return CpsatResult(labels, up.partition_cost(labels), max(bound, 0.0), name)
