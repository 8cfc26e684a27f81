"""Merging evaluation runs: whole tasks added, a later partial run's cells replacing earlier ones."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.evaluate import merge_runs  # noqa: E402


def _row(ratio: float, regime: str, strategy: str, measured: float) -> dict:
    return {"ratio": ratio, "regime": regime, "strategy": strategy, "measured": measured}


def _meta(command: str, seconds: float) -> dict:
    return {"command": command, "seconds": seconds, "heal_steps": 100, "random_seeds": 10}


def test_merge_adds_tasks_and_later_cells_replace_earlier_ones() -> None:
    full = {"minilm": {"results": [_row(0.8, "zero-shot", "geo", 0.9), _row(0.8, "zero-shot", "geo-projected", 0.5),
                                   _row(0.8, "healed", "geo-projected", 0.6)],
                       "rank_agreement": {"projected": 0.7, "exact": 0.9}},
            "meta": _meta("full", 100.0)}
    other = {"gpt": {"results": [_row(0.8, "zero-shot", "geo", 5.3)], "rank_agreement": {}}, "meta": _meta("gpt", 50.0)}
    patch = {"minilm": {"results": [_row(0.8, "zero-shot", "geo-projected", 0.55), _row(0.5, "zero-shot", "geo-projected", 0.4)],
                        "rank_agreement": {"projected": 0.8, "exact": 0.9}},
             "meta": _meta("patch", 20.0)}
    merged = merge_runs([full, other, patch])
    rows = {(r["ratio"], r["regime"], r["strategy"]): r["measured"] for r in merged["minilm"]["results"]}
    assert rows == {(0.8, "zero-shot", "geo"): 0.9, (0.8, "zero-shot", "geo-projected"): 0.55,
                    (0.8, "healed", "geo-projected"): 0.6, (0.5, "zero-shot", "geo-projected"): 0.4}
    assert [r["strategy"] for r in merged["minilm"]["results"]][:3] == ["geo", "geo-projected", "geo-projected"]
    assert merged["minilm"]["rank_agreement"]["projected"] == 0.8
    assert merged["gpt"]["results"] == other["gpt"]["results"]
    assert merged["meta"]["command"] == "full ; gpt ; patch" and merged["meta"]["seconds"] == 100.0
    assert merged["minilm"]["heal_steps"] == 100


def test_a_run_without_rank_agreement_keeps_the_earlier_one() -> None:
    full = {"minilm": {"results": [_row(0.8, "healed", "geo", 0.9)], "rank_agreement": {"exact": 0.9}},
            "meta": _meta("full", 100.0)}
    # a --jobs run with --rank-plans 0 carries the key with None; a plain one leaves it out
    for patch_task in ({"results": [_row(0.8, "healed", "geo", 0.95)], "rank_agreement": None},
                       {"results": [_row(0.8, "healed", "geo", 0.95)]}):
        merged = merge_runs([full, {"minilm": patch_task, "meta": _meta("geo", 10.0)}])
        assert merged["minilm"]["rank_agreement"] == {"exact": 0.9}
        assert merged["minilm"]["results"][0]["measured"] == 0.95
