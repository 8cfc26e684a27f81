"""Smoke test on the real packaged MiniLM, loaded offline (slow)."""

from __future__ import annotations

import copy

import pytest
import torch

from hessian_worker import (
    AnalyzeConfig,
    analyze,
    apply_plan,
    load_model,
    measure_loss,
    predict_plan_loss,
)
from hessian_worker.data import DEFAULT_SENTENCES, load_calibration
from solver.schema import SharingPlan

pytestmark = pytest.mark.slow
FAMILIES = ["re:.*attention\\.self\\.query\\.weight", "re:.*intermediate\\.dense\\.weight"]


@pytest.fixture(autouse=True)
def _float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def test_minilm_two_families_on_four_sentences() -> None:
    loaded = load_model("minilm")
    assert loaded.model.config._attn_implementation == "eager"
    data = load_calibration(DEFAULT_SENTENCES[:4], tokenizer=loaded.tokenizer, batch_size=4)
    cfg = AnalyzeConfig(targets=FAMILIES, device="cpu", progress=False, max_params_ratio=0.5)
    problem = analyze(loaded.model, data, cfg)
    assert {x.family for x in problem.layers} == {"attention.self.query.weight", "intermediate.dense.weight"}
    assert len(problem.layers) == 12 and problem.layers[0].params == 384 * 384
    m = problem.costs.matrix
    same = [m[i][j] for i in range(12) for j in range(12)
            if i != j and problem.layers[i].family == problem.layers[j].family]
    assert all(v is not None and v > 0 for v in same)

    # adjacent pairs of the query family: predicted vs measured on held-out sentences
    q = [x.name for x in problem.layers if x.family == "attention.self.query.weight"]
    groups = [[q[0], q[1]], [q[2], q[3]], [q[4], q[5]]]
    plan = SharingPlan(status="feasible", coloring={n: i // 2 for i, n in enumerate(q)}, groups=groups,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})
    predicted = predict_plan_loss(loaded.model, data, plan, cfg)
    reference = copy.deepcopy(loaded.model)
    report = apply_plan(loaded.model, plan, "mean")
    held = load_calibration(DEFAULT_SENTENCES[4:12], tokenizer=loaded.tokenizer, batch_size=8)
    measured = measure_loss(loaded.model, reference, held, cfg)
    assert report.unique_params_before - report.unique_params_after == 3 * 384 * 384
    assert predicted > 0 and measured > 0
    assert 0.05 < predicted / measured < 20  # the quadratic model is rough, not wild


def test_analyze_accepts_a_spec_string() -> None:
    cfg = AnalyzeConfig(targets=["re:.*attention\\.self\\.key\\.weight"], device="cpu", progress=False,
                        backend="diagonal", probes=4)
    problem = analyze("minilm", DEFAULT_SENTENCES[:2], cfg)
    assert [x.index for x in problem.layers] == list(range(6))


def test_minilm_compress_picks_the_best_measured_candidate() -> None:
    from hessian_worker.pipeline import CompressConfig, compress

    loaded = load_model("minilm")
    report = compress(loaded.model, DEFAULT_SENTENCES, CompressConfig(ratio=0.84, device="cpu", progress=False, holdout=4),
                      tokenizer=loaded.tokenizer)
    assert report.params_ratio <= 0.84
    assert len(report.candidates) >= 3
    chosen = next(c for c in report.candidates if c.strategy == report.chosen)
    assert chosen.measured == min(c.measured for c in report.candidates)
    assert report.measured_loss_change is not None and report.measured_loss_change > 0
