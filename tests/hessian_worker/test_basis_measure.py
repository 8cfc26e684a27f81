"""Measuring basis plans without touching the model: the substituted low-rank weights compute what
the applied model computes."""

from __future__ import annotations

import copy

import pytest
import torch
from hw_cases import TinyMLP, mlp_data

from hessian_worker.analysis import analyze
from hessian_worker.basis.apply import apply_basis_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import input_covariances
from hessian_worker.measure import measure_loss, measure_plans
from solver import SolveConfig
from solver.candidates import candidate_plans


@pytest.mark.parametrize("side", ["out", "in"])
def test_measured_plan_loss_is_the_applied_models(side: str) -> None:
    torch.manual_seed(0)
    reference = TinyMLP(depth=4).double().eval()
    calib, held = mlp_data(), mlp_data(n=12, seed=4)
    config = AnalyzeConfig(scheme="basis", basis={"rank": 1, "side": side}, dtype="float64",
                           device="cpu", progress=False)
    problem = analyze(copy.deepcopy(reference), calib, config)
    plans = candidate_plans(problem, SolveConfig(max_params_ratio=0.45, time_limit_s=2), top=3, per_pattern=1)
    names = [x.name for x in problem.layers]
    covs = input_covariances(reference, calib, names)
    measured = measure_plans(reference, held, plans, config, problem=problem, covs=covs)
    assert len(measured) == len(plans) >= 2
    for plan, value in zip(plans, measured, strict=True):
        model = copy.deepcopy(reference)
        apply_basis_plan(model, plan, problem, config=config, covs=covs)
        assert value == pytest.approx(measure_loss(model, reference, held, config), rel=1e-9, abs=1e-15)
    # the reference is untouched, and without covs the measuring data whitens the bases
    assert all(type(m).__name__ == "Linear" for m in reference.modules() if hasattr(m, "weight"))
    own = measure_plans(reference, held, plans[:1], config, problem=problem)
    model = copy.deepcopy(reference)
    apply_basis_plan(model, plans[0], problem, data=held, config=config)
    assert own[0] == pytest.approx(measure_loss(model, reference, held, config), rel=1e-9, abs=1e-15)
