"""The cross-domain evaluation: two corpora per model, disjoint and deterministic splits, and the
shift and lead figures of its table."""

from __future__ import annotations

import pytest

from bench import corpus
from bench.cross_domain import DOMAINS, MIXED, done_key, markdown, mixed_task, shift
from bench.tasks import gpt as gpt_mod


def test_prose_corpus_is_its_own_domain() -> None:
    prose, docs = corpus.corpus_sentences("prose"), corpus.corpus_sentences("docstrings")
    assert len(prose) >= 300 and len(set(prose)) == len(prose)
    assert not set(prose) & set(docs)
    # general prose: no code-like tokens, which most docstrings carry
    def code_like(s: str) -> bool:
        return any(t in s for t in ("(", "_", "`", "=", "None", "True", "object"))
    assert sum(map(code_like, prose)) == 0
    assert sum(map(code_like, docs)) > 0.2 * len(docs)
    with pytest.raises(ValueError, match="docstrings, prose"):
        corpus.corpus_sentences("news")


@pytest.mark.parametrize("name", corpus.CORPORA)
def test_corpus_splits_are_disjoint_and_deterministic(name: str) -> None:
    a, b, c = corpus.splits((16, 64, 128), seed=0, corpus=name)
    assert (len(a), len(b), len(c)) == (16, 64, 128)
    assert not (set(a) & set(b) or set(a) & set(c) or set(b) & set(c))
    assert corpus.splits((16, 64, 128), seed=0, corpus=name) == [a, b, c]
    assert corpus.splits((16, 64, 128), seed=1, corpus=name) != [a, b, c]
    # the first splits do not depend on how many more are asked for
    assert corpus.splits((16, 64), seed=0, corpus=name) == [a, b]
    with pytest.raises(ValueError, match=f"the {name} corpus has"):
        corpus.splits((10**6,), corpus=name)


def test_gpt_sources_are_disjoint_and_keep_the_held_out_files_held_out() -> None:
    assert not gpt_mod.SOURCES["text"] & gpt_mod.SOURCES["system"]
    every = gpt_mod.file_splits()
    parts = {s: gpt_mod.source_files(s) for s in gpt_mod.SOURCES}
    for source, split in parts.items():
        for k, files in split.items():
            assert files and set(files) <= set(every[k]), (source, k)
            assert all(gpt_mod.source_of(f) == source for f in files)
    for k in every:
        assert not set(parts["text"][k]) & set(parts["system"][k])
    assert gpt_mod.source_files("text") == parts["text"]  # deterministic
    with pytest.raises(ValueError, match="text, system"):
        gpt_mod.source_files("poetry")
    assert set(DOMAINS["gpt"]) == set(gpt_mod.SOURCES)


def _row(cal: str, ev: str, strategy: str, score: float, ratio: float = 0.67) -> dict:
    return {"model": "minilm", "shrinkage": "none", "calibrated_on": cal, "evaluated_on": ev, "ratio": ratio,
            "strategy": strategy, "merge": "layerwise", "score": score, "plans": 1, "params_ratio": ratio,
            "intensity": None}


def test_shift_and_lead_in_the_table() -> None:
    rows = [_row("docstrings", "docstrings", "geo", 0.80), _row("docstrings", "prose", "geo", 0.70),
            _row("prose", "prose", "geo", 0.75), _row("prose", "docstrings", "geo", 0.78),
            _row("docstrings", "prose", "sequence", 0.72), _row("prose", "docstrings", "sequence", 0.60),
            _row("docstrings", "docstrings", "sequence", 0.7), _row("prose", "prose", "sequence", 0.7)]
    assert shift(rows, "minilm", "none", "geo", 0.67, "docstrings", "prose") == pytest.approx(0.70 - 0.75)
    assert shift(rows, "minilm", "none", "geo", 0.67, "prose", "docstrings") == pytest.approx(0.78 - 0.80)
    assert shift(rows, "minilm", "none", "geo", 0.5, "prose", "docstrings") is None
    meta = {"command": "x", "machine": "m", "seconds": 1, "top": 1, "normalized_top": 1, "per_pattern": 1,
            "random_seeds": 1, "choice_holdout": 0.5}
    text = markdown({"meta": meta, "rows": rows, "higher_is_better": {"minilm": True},
                     "metric": {"minilm": "cosine"}})
    # shifts -0.05 (on prose) and -0.02 (on docstrings); leads -0.02 (behind sequence) and +0.18
    assert "| none | 0.67 | -0.0500 | -0.0200 | -0.0200 | +0.1800 |" in text
    assert "healed" not in text

    # healed cells: their own tables and shift/lead, the zero-shot text kept as it was
    heal = {"heal_steps": 100, "heal_holdout": 0.2}
    healed = [{**r, **heal, "score": r["score"] + 0.1 * (r["strategy"] == "geo")} for r in rows]
    both = markdown({"meta": meta, "rows": rows, "healed": healed, "higher_is_better": {"minilm": True},
                     "metric": {"minilm": "cosine"}})
    assert both.startswith(text.split("## minilm")[0].rstrip("\n"))
    assert text.split("## minilm")[1] in both
    assert "### healed 100 steps (held-out 0.2), shrinkage none" in both
    # healed geo +0.1 on every cell: shifts unchanged, leads +0.08 and +0.28
    assert "| none | 0.67 | -0.0500 | -0.0200 | +0.0800 | +0.2800 |" in both
    # --resume tells a healed cell from its zero-shot one, and heal lengths apart
    assert len({done_key(r) for r in rows + healed}) == 2 * len({done_key(r) for r in rows})
    assert done_key(healed[0]) != done_key({**healed[0], "heal_steps": 10})


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "heal_steps"), [("none", 4), ("held-out", 0)])
def test_gpt_cells_are_scored_on_both_sources(tmp_path, setting: str, heal_steps: int) -> None:
    """One budget, one heuristic, both calibrations: four cells, each scored on its evaluation
    split; the tied model is worse than the original everywhere and the json is written. With
    held-out, each cell records the intensity chosen for its plan, one of the grid's. Healed, the
    four cells again, from healed models: better than zero-shot on their calibration domain."""
    import argparse
    import json
    import time

    from bench.cross_domain import domain_task, run_model
    from hessian_worker.intensity_choice import INTENSITIES
    from hessian_worker.options import Shrinkage

    args = argparse.Namespace(budgets=[0.67], strategies=["sequence"], shrinkage=[Shrinkage(setting)], seed=0, top=2,
                              normalized_top=0, per_pattern=0, random_seeds=1, choice_holdout=0.5,
                              heal_steps=heal_steps, heal_holdout=0.2, mixed=False,
                              started=time.perf_counter(), earlier=[], earlier_seconds=0.0)
    rows: list[dict] = []
    healed: list[dict] = []
    run_model("gpt", args, set(), rows, tmp_path / "cd", healed)
    assert {(r["calibrated_on"], r["evaluated_on"]) for r in rows} == {
        (a, b) for a in DOMAINS["gpt"] for b in DOMAINS["gpt"]}
    for source in DOMAINS["gpt"]:
        original = domain_task("gpt", source, 0)
        base = original.score(original.model)
        assert all(r["score"] > base for r in rows if r["evaluated_on"] == source)
    for r in rows:
        assert r["shrinkage"] == setting and r["intensity"]["min"] == r["intensity"]["max"]
        assert r["intensity"]["mean"] in (INTENSITIES if setting == "held-out" else (0.0,))
    saved = json.loads((tmp_path / "cd.json").read_text())
    assert saved["rows"] == rows
    if not heal_steps:
        assert not healed and "healed" not in saved
        return
    assert saved["healed"] == healed
    assert [done_key(r)[2:] for r in healed] == [done_key(r) for r in rows]
    assert all(r["heal_steps"] == heal_steps for r in healed)
    for h, z in zip(healed, rows, strict=True):
        if h["calibrated_on"] == h["evaluated_on"]:
            assert h["score"] < z["score"], (h, z)  # perplexity: healing on its own domain helps there


def test_mixed_calibration_takes_half_of_each_corpus_and_gets_its_own_tables() -> None:
    import torch

    from bench.tasks.base import Task

    def task(name: str, calibration, validation) -> Task:
        return Task(name=name, metric="cosine", higher_is_better=True, model=torch.nn.Linear(1, 1), tokenizer=None,
                    distill="cosine", calibration=calibration, validation=validation, evaluation=[f"{name} eval"],
                    score=lambda m: 0.0)

    docs = task("minilm", [f"d{i}" for i in range(16)], [f"dv{i}" for i in range(7)])
    prose = task("minilm-prose", [f"p{i}" for i in range(16)], [f"pv{i}" for i in range(7)])
    mixed = mixed_task("minilm", {"docstrings": docs, "prose": prose})
    assert mixed.name == "minilm-mixed"  # its own cost cache
    assert mixed.calibration == [f"d{i}" for i in range(8)] + [f"p{i}" for i in range(8)]
    assert mixed.validation == ["dv0", "dv1", "dv2", "pv0", "pv1", "pv2", "pv3"]  # the size of one corpus's
    windows = mixed_task("gpt", {"text": task("gpt-text", torch.zeros(4, 3), torch.zeros(6, 3)),
                                 "system": task("gpt-system", torch.ones(4, 3), torch.ones(6, 3))})
    assert windows.calibration.tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2  # token windows: stacked

    rows = [_row("docstrings", "docstrings", "geo", 0.80), _row("prose", "prose", "geo", 0.75),
            _row(MIXED, "docstrings", "geo", 0.79), _row(MIXED, "prose", "geo", 0.73),
            _row(MIXED, "docstrings", "sequence", 0.70), _row(MIXED, "prose", "sequence", 0.74)]
    meta = {"command": "x", "machine": "m", "seconds": 1, "top": 1, "normalized_top": 1, "per_pattern": 1,
            "random_seeds": 1, "choice_holdout": 0.5}
    text = markdown({"meta": meta, "rows": rows, "higher_is_better": {"minilm": True}, "metric": {"minilm": "cosine"}})
    assert "calibrated on both corpora (mixed) beside in-domain, shrinkage none" in text
    # shifts mixed→prose 0.73-0.75, mixed→docstrings 0.79-0.80; leads -0.01 (behind sequence) and +0.09
    assert "| lead mixed→prose | lead mixed→docstrings |" in text
    assert "| none | 0.67 | -0.0200 | -0.0100 | -0.0100 | +0.0900 |" in text
