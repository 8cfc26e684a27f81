"""The measured choice of compress with the layerwise merge: candidates merged with covariances of
one part of the choice samples and scored on the other; the final tie uses all of them."""

from __future__ import annotations

import copy

import pytest
import torch
from hw_cases import tiny_mlp

from hessian_worker.apply import apply_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.data import load_calibration
from hessian_worker.measure import measure_plans
from hessian_worker.pipeline import (
    CompressConfig,
    choice_parts,
    compress,
    merge_covariances,
    split_holdout,
)
from solver.candidates import candidate_plans
from solver.planning import SolveConfig

CPU = AnalyzeConfig(device="cpu", progress=False)


def _inputs(n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _rows(calib) -> set[tuple[float, ...]]:
    return {tuple(r.tolist()) for b in calib.batches for r in b["input"]}


def test_choice_parts_split_the_choice_samples_disjointly() -> None:
    calib = load_calibration(_inputs(20), batch_size=4)
    merge_part, score_part = choice_parts(calib, CompressConfig(ratio=0.5))
    assert score_part is not None
    assert (merge_part.num_samples, score_part.num_samples) == (10, 10)
    assert not _rows(merge_part) & _rows(score_part) and _rows(merge_part) | _rows(score_part) == _rows(calib)
    quarter = choice_parts(calib, CompressConfig(ratio=0.5, choice_holdout=0.25))[1]
    assert quarter is not None and quarter.num_samples == 5
    assert choice_parts(calib, CompressConfig(ratio=0.5, choice_holdout=0))[1] is None
    one = load_calibration(_inputs(1), batch_size=4)  # nothing to split
    assert choice_parts(one, CompressConfig(ratio=0.5))[1] is None


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_compress_scores_candidates_out_of_sample_and_ties_with_all_choice_samples(share: float) -> None:
    reference = tiny_mlp().double()
    model = copy.deepcopy(reference)
    x = _inputs(32)
    # unshrunk covariances: the intensity chosen on top (the default, held-out) is test_intensity_choice's
    config = CompressConfig(ratio=0.7, device="cpu", progress=False, choice_holdout=share, shrinkage="none")
    report = compress(model, x, config)
    assert report.merge.value == "layerwise"

    fit, _ = split_holdout(load_calibration(x, batch_size=config.batch_size, seed=config.seed), config)
    names = [layer.name for layer in report.problem.layers]
    merge_part, score_part = choice_parts(fit, config)
    assert (score_part is None) == (share == 0)
    pool = candidate_plans(report.problem, SolveConfig(max_params_ratio=0.7, time_limit_s=config.time_limit_s, seed=0),
                           top=config.top, min_distance=config.min_distance, per_pattern=config.per_pattern,
                           normalized_top=config.normalized_top)
    expected = measure_plans(reference, score_part or fit, pool, CPU, merge="layerwise",
                             layerwise=merge_covariances(reference, merge_part, names, CPU, None))
    assert [c.measured for c in report.candidates] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert report.plan.coloring == pool[min(range(len(pool)), key=lambda i: (expected[i], i))].coloring
    if share:  # the merge fitted on the scored samples would score them differently
        in_sample = measure_plans(reference, score_part, pool, CPU, merge="layerwise",
                                  layerwise=merge_covariances(reference, fit, names, CPU, None))
        assert in_sample != pytest.approx(expected, rel=1e-6)

    # the installed weights are the chosen plan merged with the covariances of every choice sample
    final = copy.deepcopy(reference)
    apply_plan(final, report.plan, "layerwise", data=fit, config=CPU, layerwise=merge_covariances(reference, fit, names, CPU, None))
    for name, value in final.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
