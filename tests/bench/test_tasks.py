"""Evaluation tasks: disjoint seeded splits, sensible original scores, discoverable families,
scores that notice damage, and a cache that returns the same weights."""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch

from bench import corpus
from bench.tasks import TASKS, load_task
from bench.tasks import digits as digits_mod
from bench.tasks import gpt as gpt_mod
from hessian_worker import discover_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def families(model: torch.nn.Module) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for layer in discover_layers(model):
        out.setdefault(layer.family, []).append(layer.index)
    return out


def add_noise(model: torch.nn.Module, block: str) -> torch.nn.Module:
    """A copy whose ``block`` weights are replaced by noise of their own scale."""
    damaged = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in damaged.named_parameters():
            if name.startswith(block + ".") and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.std() * 3)
    return damaged


def rows(t: torch.Tensor) -> set[tuple]:
    return {tuple(r.tolist()) for r in t}


def test_unknown_task_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="minilm, gpt, digits"):
        load_task("resnet")
    assert TASKS == ("minilm", "gpt", "digits")


# --- corpus and MiniLM --------------------------------------------------------------------------


def test_corpus_split_is_unchanged_and_splits_are_disjoint_and_seeded() -> None:
    pool = list(corpus.sentences())
    random.Random(3).shuffle(pool)
    assert corpus.split(5, 7, 3) == (pool[:5], pool[5:12])  # what choice_study.py relies on
    a, b, c = corpus.splits((16, 64, 128), seed=1)
    assert (len(a), len(b), len(c)) == (16, 64, 128)
    assert not (set(a) & set(b) or set(a) & set(c) or set(b) & set(c))
    assert corpus.splits((16, 64, 128), seed=1) == [a, b, c]
    assert corpus.splits((16, 64, 128), seed=2) != [a, b, c]
    with pytest.raises(ValueError, match="the docstrings corpus has"):
        corpus.splits((10**6,))


@pytest.mark.slow
def test_minilm_task_scores_the_original_as_one_and_noise_lower() -> None:
    task = load_task("minilm", seed=0)
    assert (task.distill, task.higher_is_better) == ("cosine", True)
    assert (len(task.calibration), len(task.validation), len(task.evaluation)) == (16, 128, 64)
    assert not set(task.calibration) & set(task.evaluation)
    assert not set(task.validation) & (set(task.calibration) | set(task.evaluation))
    assert (task.calibration, task.evaluation) == tuple(corpus.split(16, 64, 0))
    assert task.score(task.model) == pytest.approx(1.0, abs=1e-5)
    assert task.score(add_noise(task.model, "encoder.layer.2")) < 0.9
    fams = families(task.model)
    assert len(fams) == 6 and all(v == list(range(6)) for v in fams.values())


# --- digits ------------------------------------------------------------------------------------


def test_digits_splits_are_disjoint_and_seeded() -> None:
    parts = digits_mod.partition()
    calib, valid = digits_mod.pool_samples(128, 200, seed=0)
    sets = [
        set(parts["train"].tolist()),
        set(parts["test"].tolist()),
        set(calib.tolist()),
        set(valid.tolist()),
    ]
    assert sum(len(s) for s in sets[:2]) + digits_mod.POOL == 1797
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]
    assert torch.equal(digits_mod.pool_samples(128, 200, seed=0)[0], calib)
    assert not torch.equal(digits_mod.pool_samples(128, 200, seed=1)[0], calib)
    with pytest.raises(ValueError, match="exceeds the pool"):
        digits_mod.pool_samples(300, 100, seed=0)


def test_digits_families_one_member_per_block() -> None:
    model = digits_mod.DigitsNet(digits_mod.DigitsConfig())
    assert families(model) == {"fc_in.weight": list(range(6)), "fc_out.weight": list(range(6))}


def test_digits_task_is_accurate_and_noise_hurts() -> None:
    task = load_task("digits")
    assert (task.distill, task.higher_is_better, task.tokenizer) == ("kl", True, None)
    assert task.calibration.shape == (128, 64) and task.evaluation.shape == (digits_mod.TEST, 64)
    accuracy = task.score(task.model)
    assert accuracy > 0.9
    assert task.score(add_noise(task.model, "blocks.2")) < accuracy - 0.05


@pytest.mark.slow
def test_digits_cache_returns_the_trained_weights(tmp_path) -> None:
    first, record = digits_mod.build_digits(cache_dir=tmp_path)
    assert len(list(tmp_path.glob("digits-*.pt"))) == 1
    second, again = digits_mod.build_digits(cache_dir=tmp_path)
    assert again == record
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


# --- GPT ---------------------------------------------------------------------------------------


def test_gpt_files_are_disjoint_and_windows_seeded() -> None:
    files = gpt_mod.file_splits()
    train, valid, evaluation = (set(files[k]) for k in ("train", "validation", "evaluation"))
    assert valid and evaluation and not (train & valid or train & evaluation or valid & evaluation)
    stream = torch.arange(1000)
    w = gpt_mod.windows(stream, 10, 64, seed=0)
    assert w.shape == (10, 64) and len(set(w.flatten().tolist())) == 640  # no overlap
    assert torch.equal(gpt_mod.windows(stream, 10, 64, seed=0), w)
    assert not torch.equal(gpt_mod.windows(stream, 10, 64, seed=1), w)
    with pytest.raises(ValueError, match="holds 15"):
        gpt_mod.windows(stream, 16, 64, seed=0)


def test_gpt_families_one_member_per_block() -> None:
    model = gpt_mod.GPT(gpt_mod.QUICK[0])
    blocks = list(range(gpt_mod.QUICK[0].blocks))
    assert families(model) == {
        "attn.qkv.weight": blocks,
        "attn.out.weight": blocks,
        "mlp.fc_in.weight": blocks,
        "mlp.fc_out.weight": blocks,
    }


@pytest.fixture(scope="module")
def gpt_task():
    return load_task("gpt", quick=True)


@pytest.mark.slow
def test_gpt_task_learned_and_noise_hurts(gpt_task) -> None:
    task = gpt_task
    assert (task.distill, task.higher_is_better) == ("kl", False)
    t = gpt_mod.QUICK[0].context
    assert task.calibration.shape == (16, t) and task.evaluation.shape == (64, t)
    assert not rows(task.evaluation) & (rows(task.calibration) | rows(task.validation))
    ppl = task.score(task.model)
    unigram = gpt_mod.unigram_perplexity(gpt_mod.streams()["train"], task.evaluation)
    assert ppl < 0.5 * unigram < 256
    assert task.score(add_noise(task.model, "blocks.1")) > 1.2 * ppl


@pytest.mark.slow
def test_gpt_cache_returns_the_trained_weights(gpt_task) -> None:
    again, _ = gpt_mod.build_gpt(quick=True)
    for (name, a), (_, b) in zip(
        gpt_task.model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_gpt_runs_through_analyze_apply_and_heal(gpt_task) -> None:
    from hessian_worker import AnalyzeConfig, HealConfig, analyze, apply_plan, heal, measure_loss
    from solver import SolveConfig, solve

    task = gpt_task
    calibration = task.calibration[:4]
    problem = analyze(
        copy.deepcopy(task.model),
        calibration,
        AnalyzeConfig(backend="exact", distill="kl", batch_size=4, progress=False),
    )
    assert len(problem.layers) == 4 * gpt_mod.QUICK[0].blocks
    assert all(c is None or c >= -1e-6 for row in problem.costs.matrix for c in row)
    plan = solve(problem, SolveConfig(max_params_ratio=0.75, time_limit_s=5, seed=0))
    tied = copy.deepcopy(task.model)
    apply_plan(tied, plan)
    config = AnalyzeConfig(distill="kl", progress=False)
    before = measure_loss(tied, task.model, calibration, config)
    report = heal(
        tied,
        task.model,
        calibration,
        HealConfig(steps=5, lr=task.heal_lr, distill="kl", progress=False),
    )
    assert report.unique_params < sum(p.numel() for p in task.model.parameters())
    assert measure_loss(tied, task.model, calibration, config) < before
