"""Splitting the evaluation into parallel units: one per (task, budget), the rank agreement once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.eval_jobs import Unit, common_options, plan_units  # noqa: E402
from hessian_worker.options import Shrinkage  # noqa: E402


def test_plan_units_covers_every_cell_once_with_one_rank_agreement_per_task() -> None:
    budgets = {"digits": [0.9, 0.5], "minilm": [0.9, 0.84, 0.5], "gpt": [0.8]}
    units = plan_units(["digits", "minilm", "gpt"], budgets, rank_plans=50)
    assert sorted((u.task, u.budget) for u in units) == sorted((t, b) for t, bs in budgets.items() for b in bs)
    assert {u.task for u in units if u.rank_plans} == set(budgets)
    assert sum(u.rank_plans for u in units) == 50 * len(budgets)
    assert [u.task for u in units] == ["minilm"] * 3 + ["gpt"] + ["digits"] * 2  # heaviest tasks start first


def test_unit_command_lines() -> None:
    args = argparse.Namespace(quick=True, seed=1, top=8, normalized_top=4, per_pattern=1, random_seeds=3, heal_steps=0,
                              heal_shortlist=2, choice_holdout=0.5, heal_holdout=0.2, shrinkage=Shrinkage.held_out,
                              strategies=["geo", "cycle"])
    common = common_options(args)
    assert common[0] == "--quick" and common[-3:] == ["--strategies", "geo", "cycle"]
    assert common[common.index("--seed") + 1] == "1" and "--heal-choice-holdout" not in common
    assert common[common.index("--shrinkage") + 1] == "held-out"  # as the flag takes it, not the enum's repr
    argv = Unit("minilm", 0.84, 0).argv(common, Path("/tmp/u"))
    assert argv[argv.index("--budgets") + 1] == "0.84" and argv[argv.index("--rank-plans") + 1] == "0"
    assert argv[argv.index("--threads") + 1] == "1" and argv[-2:] == ["--out", "/tmp/u"]
    assert "--prepare" in Unit("gpt", None, 0).argv(common, Path("/tmp/p")) and "--budgets" not in Unit("gpt", None, 0).argv(common, Path("/tmp/p"))
