"""Per-sample scores and the paired bootstrap (bench/paired.py), and the tasks' per-sample parts
against their metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.paired import PairedDifference, SampleScores, paired_difference
from bench.relaxed_eval import against_geo, markdown
from bench.tasks import gpt as gpt_mod
from bench.tasks import load_task


def test_metric_is_the_link_of_the_ratio_of_sums() -> None:
    assert SampleScores(np.array([1.0, 0.0, 1.0, 1.0])).metric() == pytest.approx(0.75)
    nll, tokens = np.array([3.0, 5.0, 1.0]), np.array([2.0, 4.0, 2.0])
    assert SampleScores(nll, tokens, exp=True).metric() == pytest.approx(math.exp(9.0 / 8.0))
    with pytest.raises(ValueError, match="denominators"):
        SampleScores(nll, tokens[:2])


def test_paired_difference_is_the_percentile_interval_of_the_same_resamples() -> None:
    rng = np.random.default_rng(1)
    common = rng.normal(size=50)  # what both rows share: cancels in the paired difference
    a = SampleScores(common + 0.02 + 0.01 * rng.normal(size=50))
    b = SampleScores(common)
    got = paired_difference(a, b, draws=500, seed=3)
    idx = np.random.default_rng(3).integers(0, 50, size=(500, 50))
    diffs = [a.numerators[i].mean() - b.numerators[i].mean() for i in idx]
    assert got.difference == pytest.approx(a.metric() - b.metric())
    assert (got.low, got.high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
    assert got.resolved() and got.low > 0.0
    # unpaired, the shared part would swamp the 0.02: each row's own spread is ~0.14
    assert got.high - got.low < 0.02


def test_a_difference_the_samples_do_not_resolve_is_not_starred() -> None:
    x = np.random.default_rng(2).normal(size=40)
    tie = paired_difference(SampleScores(x), SampleScores(x[::-1].copy()))
    assert tie.difference == pytest.approx(0.0, abs=1e-12)
    assert tie.low < 0.0 < tie.high and not tie.resolved() and not tie.cell().endswith("*")
    shift = paired_difference(SampleScores(x - 0.01), SampleScores(x))
    assert shift.low == pytest.approx(-0.01) and shift.high == pytest.approx(-0.01) and shift.cell().endswith("*")
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(SampleScores(x), SampleScores(x[:10]))


def test_perplexity_from_window_sums_is_the_mean_token_nll() -> None:
    torch.manual_seed(0)
    model = gpt_mod.GPT(gpt_mod.QUICK[0]).eval()
    ids = torch.randint(0, gpt_mod.VOCAB, (5, gpt_mod.QUICK[0].context))
    with torch.no_grad():
        logits = model(ids)[:, :-1].double()
        direct = math.exp(float(F.cross_entropy(logits.reshape(-1, gpt_mod.VOCAB), ids[:, 1:].reshape(-1))))
    parts = gpt_mod.window_nll(model, ids, batch_size=2)
    assert len(parts.numerators) == 5 and parts.exp
    assert parts.metric() == pytest.approx(direct, rel=1e-9)
    assert gpt_mod.perplexity(model, ids) == pytest.approx(direct, rel=1e-9)


def test_digits_samples_are_its_accuracy_per_test_sample() -> None:
    task = load_task("digits")
    parts = task.samples(task.model)
    assert len(parts.numerators) == len(task.evaluation)
    assert set(np.unique(parts.numerators)) <= {0.0, 1.0}
    assert parts.metric() == task.score(task.model)


def _row(strategy: str, regime: str, measured: float, **extra) -> dict:
    return {"ratio": 0.5, "regime": regime, "strategy": strategy, "scheme": "x", "measured": measured, "loss": 0.1,
            "unique_params": 1, "params_ratio": 0.5, "rank": "", "classes": 1, "predicted": None, "chosen": "c",
            **extra}


def test_rows_carry_the_paired_difference_to_relaxed_geo_and_the_markdown_shows_it() -> None:
    x = np.linspace(0.5, 0.9, 30)
    samples = {("relaxed-geo", "zero-shot"): SampleScores(x), ("svd", "zero-shot"): SampleScores(x + 0.001)}
    assert against_geo(samples, "relaxed-geo", "zero-shot") == {}
    assert against_geo(samples, "tie", "zero-shot") == {}  # no samples: no interval
    vs = against_geo(samples, "svd", "zero-shot")["vs_geo"]
    assert vs == pytest.approx([0.001, 0.001, 0.001])
    result = {"meta": {"command": "c", "machine": "m", "seconds": 1, "heal_steps": 0, "top": 4},
              "toy": {"metric": "cosine", "higher_is_better": True, "original": 1.0, "dense_params": 2,
                      "families": {}, "splits": {}, "tie_merge": "l", "rank_ratios": [], "seconds": {},
                      "results": [_row("relaxed-geo", "zero-shot", 0.7), _row("svd", "zero-shot", 0.701, vs_geo=vs)]}}
    text = markdown(result)
    assert "minus relaxed-geo's, paired 95% bootstrap interval" in text
    assert f"| svd | {PairedDifference(*vs).cell()} |" in text
