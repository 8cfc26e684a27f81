"""Benchmark baselines report numbers in the problem's own units (the solver normalizes costs)."""

from __future__ import annotations

import math

import pytest

from bench.instances import make_problem
from bench.methods import naive_cpsat
from solver import SharingProblem
from solver.family import build_families


def _scaled(problem: SharingProblem, factor: float) -> SharingProblem:
    data = problem.model_dump(mode="json")
    data["costs"]["matrix"] = [[None if v is None else v * factor for v in row] for row in data["costs"]["matrix"]]
    return SharingProblem.model_validate(data)


@pytest.mark.parametrize("factor", [1.0, 2.0**-30, 2.0**20])
def test_naive_cpsat_bound_is_in_the_problems_units(factor):
    """Solved to optimality on 2 x 6 layers, its bound meets its objective whatever the cost unit
    (the bound was read in the normalized units: 2^-9 of the objective on the bench instance)."""
    problem = _scaled(make_problem([6, 6], seed=12, ratio=0.5, workers=1), factor)
    assert build_families(problem)[0].scale_exp != 0  # the case that needs the scale back
    result = naive_cpsat(problem, time_limit_s=20.0, workers=1)
    assert result.status == "optimal" and result.objective is not None and result.bound is not None
    assert result.bound <= result.objective * (1 + 1e-9)
    assert math.isclose(result.bound, result.objective, rel_tol=1e-6), (result.bound, result.objective)
