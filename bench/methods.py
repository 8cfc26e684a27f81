"""The methods the solver bench compares: Geo-Sharing's solve and three references."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from solver import SharingProblem, SolveConfig, solve
from solver.curves import FamilyCurve
from solver.evaluate import objective as score
from solver.family import build_families, coloring_of
from solver.heuristics import agglomerative
from solver.interval import interval_curve
from solver.knapsack import best_within, pareto
from solver.scaling import scale_for


@dataclass
class Result:
    method: str
    objective: float | None
    bound: float | None
    time_s: float
    status: str


def geo(problem: SharingProblem, time_limit_s: float) -> Result:
    t = time.perf_counter()
    plan = solve(problem, SolveConfig(time_limit_s=time_limit_s))
    return Result("geo-sharing", plan.objective, plan.bound, time.perf_counter() - t, plan.status.value)


def _knapsack_of(problem: SharingProblem, offer) -> Result:
    """Per-family incumbents from `offer(curve)`, combined by the exact knapsack."""
    t = time.perf_counter()
    fams = build_families(problem)
    curves = []
    for fam in fams:
        curve = FamilyCurve(fam, k_min=1)
        offer(curve)
        curves.append(curve)
    point = best_within(pareto([c.options(upper=True) for c in curves]), problem.budget_params())
    if point is None:
        return Result("", None, None, time.perf_counter() - t, "infeasible")
    coloring = coloring_of(problem, fams, [curve.labels[k] for curve, k in zip(curves, point.choice, strict=True)])
    return Result("", score(problem, coloring), None, time.perf_counter() - t, "feasible")


def agglomerative_alone(problem: SharingProblem) -> Result:
    def offer(curve: FamilyCurve) -> None:
        for lab in agglomerative(curve.fam.reduced).values():
            curve.offer(curve.fam.layer_labels(lab), "agglomerative")

    r = _knapsack_of(problem, offer)
    r.method = "agglomerative"
    return r


def interval_alone(problem: SharingProblem) -> Result:
    def offer(curve: FamilyCurve) -> None:
        for lab in interval_curve(curve.fam)[1]:
            if lab is not None:
                curve.offer(lab, "interval-dp")

    r = _knapsack_of(problem, offer)
    r.method = "interval-dp"
    return r


def naive_cpsat(problem: SharingProblem, time_limit_s: float, workers: int = 2) -> Result:
    """One CP-SAT model of the whole problem: unit u in class slot c, no hints, no decomposition."""
    t = time.perf_counter()
    model = cp_model.CpModel()
    fams = build_families(problem)
    budget = problem.budget_params()
    slots_used, x_all, obj = [], [], []
    allw = np.concatenate([np.triu(f.reduced.pair, 1).ravel() for f in fams])
    scale = scale_for(allw)
    for f in fams:
        n = f.n
        x = [[model.new_bool_var(f"x_{f.name}_{u}_{c}") for c in range(n)] for u in range(n)]
        used = [model.new_bool_var(f"used_{f.name}_{c}") for c in range(n)]
        for u in range(n):
            model.add_exactly_one(x[u])
            for c in range(n):
                model.add_implication(x[u][c], used[c])
        w = scale.to_int(f.reduced.pair)
        for a in range(n):
            for b in range(a + 1, n):
                if w[a, b] <= 0:
                    continue
                y = model.new_bool_var(f"y_{f.name}_{a}_{b}")
                for c in range(n):
                    model.add_bool_or([x[a][c].Not(), x[b][c].Not(), y])
                obj.append(int(w[a, b]) * y)
        slots_used.append(f.class_params * sum(used))
        x_all.append((f, x))
    if budget is not None:
        model.add(sum(slots_used) <= budget)
    model.minimize(sum(obj))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    elapsed = time.perf_counter() - t
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return Result("naive-cpsat", None, None, elapsed, solver.status_name(status))
    coloring, nxt = {}, 0
    for f, x in x_all:
        for u in range(f.n):
            c = next(c for c in range(f.n) if solver.boolean_value(x[u][c]))
            coloring[problem.layers[f.layer_ids[u]].name] = nxt + c
        nxt += f.n
    # the model's costs are the solver's normalized ones (2^-scale_exp of the problem's, one
    # exponent per problem) plus each family's constant (unary costs, contracted pairs)
    normalized = scale.to_float(solver.best_objective_bound) + sum(f.reduced.constant for f in fams)
    bound = fams[0].to_problem(normalized)
    return Result("naive-cpsat", score(problem, coloring), max(0.0, bound), elapsed, solver.status_name(status).lower())


def rel(value: float | None, ref: float) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return (value - ref) / max(abs(ref), 1e-12)
