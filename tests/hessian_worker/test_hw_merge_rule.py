"""The default merge: layerwise only when the data gives every tied layer a full-rank input covariance."""

from __future__ import annotations

import torch
from hw_cases import mlp_data, tiny_mlp

from hessian_worker.data import Calibration
from hessian_worker.merge import Merge
from hessian_worker.merge_rule import default_merge, input_rows, input_width

NAMES = ["blocks.0.fc.weight", "blocks.1.fc.weight"]


def test_input_rows_count_masked_tokens_float_rows_and_token_ids():
    masked = Calibration([{"input_ids": torch.ones(2, 5, dtype=torch.long),
                           "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}])
    assert input_rows(masked) == 8
    assert input_rows(Calibration([{"input": torch.zeros(3, 7, 4)}])) == 21
    assert input_rows(Calibration([{"input": torch.zeros(3, 7, dtype=torch.long)}])) == 21


def test_layerwise_needs_as_many_rows_as_the_widest_input():
    model = tiny_mlp()
    assert input_width(model, NAMES) == 4
    assert default_merge(model, mlp_data(n=10), NAMES) is Merge.layerwise
    assert default_merge(model, mlp_data(n=3), NAMES) is Merge.curvature


def test_non_linear_weights_fall_back_to_curvature():
    model = tiny_mlp()
    assert input_width(model, ["blocks.0.fc.bias"]) is None
    assert default_merge(model, mlp_data(n=10), ["blocks.0.fc.bias"]) is Merge.curvature


def test_precomputed_covariances_give_the_same_layerwise_tie_and_measure():
    import copy

    from hessian_worker.apply import apply_plan
    from hessian_worker.config import AnalyzeConfig
    from hessian_worker.curvature.layerwise import LayerwiseCurvature
    from hessian_worker.measure import measure_plans
    from solver.schema import SharingPlan

    cfg = AnalyzeConfig(dtype="float64", device="cpu", progress=False)
    plan = SharingPlan(status="feasible", coloring={NAMES[0]: 0, NAMES[1]: 0}, groups=[NAMES],
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})
    model, data = tiny_mlp(), mlp_data(n=10)
    covs = LayerwiseCurvature.collect(model, data, NAMES)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(a, plan, "layerwise", data=data, config=cfg)
    apply_plan(b, plan, "layerwise", layerwise=covs, config=cfg)  # no data needed
    torch.testing.assert_close(a.blocks[0].fc.weight, b.blocks[0].fc.weight)
    mean = copy.deepcopy(model)
    apply_plan(mean, plan, "mean", layerwise=covs, config=cfg)  # ignored for other merges
    torch.testing.assert_close(mean.blocks[0].fc.weight, (model.blocks[0].fc.weight + model.blocks[1].fc.weight) / 2)
    got = measure_plans(model, data, [plan], cfg, merge="layerwise", layerwise=covs)
    assert got == measure_plans(model, data, [plan], cfg, merge="layerwise")
