"""The evaluation as parallel single-threaded processes: ``bench/evaluate.py --jobs N``.

The evaluation's models are small, so their kernels gain little from a second thread while two
processes side by side run almost twice as fast; the full run only fits its time budget on two
cores that way. The work splits into units, one per (task, budget); the first unit of a task
also measures its rank agreement. Each task's curvature costs are computed first, once, by one
``--prepare`` process per task (the units then read them from the cache), then the units run
``jobs`` at a time, heaviest tasks first, and their results are merged as ``--combine`` would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from tqdm import tqdm

EVALUATE = Path(__file__).resolve().parent / "evaluate.py"
WEIGHT = {"minilm": 3, "gpt": 2, "digits": 1}  # relative time per budget, for the order only
PASSED = ("seed", "top", "normalized_top", "per_pattern", "random_seeds", "heal_steps", "heal_shortlist", "heal_holdout",
          "choice_holdout", "shrinkage")  # options every unit gets as given


@dataclass(frozen=True)
class Unit:
    """One process: one task at one budget (``None``: prepare the task's costs)."""

    task: str
    budget: float | None
    rank_plans: int

    def argv(self, common: Sequence[str], out: Path) -> list[str]:
        own = ["--prepare"] if self.budget is None else ["--budgets", str(self.budget), "--rank-plans", str(self.rank_plans)]
        return [sys.executable, str(EVALUATE), "--tasks", self.task, *own, *common, "--threads", "1", "--out", str(out)]


def plan_units(tasks: Sequence[str], budgets: dict[str, list[float]], rank_plans: int) -> list[Unit]:
    """A unit per (task, budget), the task's first one with the rank agreement; heaviest first, so
    the last units to start are short ones."""
    units = [Unit(t, b, rank_plans if i == 0 else 0) for t in tasks for i, b in enumerate(budgets[t])]
    return sorted(units, key=lambda u: -WEIGHT.get(u.task, 1))


def common_options(args: argparse.Namespace) -> list[str]:
    """The options that every unit takes as given (the unit sets tasks, budgets and threads)."""
    out = ["--quick"] if args.quick else []
    for name in PASSED:
        value = getattr(args, name)
        out += [f"--{name.replace('_', '-')}", str(value.value if isinstance(value, Enum) else value)]
    if args.strategies:
        out += ["--strategies", *args.strategies]
    return out


def run_parallel(units: Sequence[Unit], tasks: Sequence[str], common: Sequence[str], jobs: int) -> list[dict]:
    """Prepares every task, then runs the units ``jobs`` at a time; returns their results in task
    and budget order. A failed unit stops the run with its log's tail (its folder is kept)."""
    work = Path(tempfile.mkdtemp(prefix="geoshare-eval-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    prepare = [Unit(t, None, 0) for t in sorted(tasks, key=lambda t: -WEIGHT.get(t, 1))]
    _pool(prepare, common, jobs, work, env, "prepare costs")
    outputs = _pool(list(units), common, jobs, work, env, "evaluation units")
    order = {t: i for i, t in enumerate(tasks)}
    ranked = sorted(zip(units, outputs, strict=True), key=lambda p: (order[p[0].task], -(p[0].budget or 0.0)))
    results = [json.loads(path.with_suffix(".json").read_text()) for _, path in ranked]
    shutil.rmtree(work)
    return results


def _pool(units: list[Unit], common: Sequence[str], jobs: int, work: Path, env: dict[str, str], desc: str) -> list[Path]:
    # no dots in the names: evaluate.py writes <out>.json, <out>.md next to them
    outs = [work / (f"prepare-{u.task}" if u.budget is None else f"unit-{u.task}-{u.budget:g}".replace(".", "p"))
            for u in units]
    waiting = list(range(len(units)))
    running: dict[int, tuple[subprocess.Popen, object]] = {}
    with tqdm(total=len(units), desc=desc) as bar:
        while waiting or running:
            while waiting and len(running) < jobs:
                i = waiting.pop(0)
                log = outs[i].with_suffix(".log").open("w")
                running[i] = (subprocess.Popen(units[i].argv(common, outs[i]), stdout=log, stderr=subprocess.STDOUT, env=env), log)
            time.sleep(1.0)
            for i, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[i]
                bar.update()
                if proc.returncode != 0:
                    for other, _ in running.values():
                        other.kill()
                    tail = outs[i].with_suffix(".log").read_text()[-3000:]
                    raise SystemExit(f"{units[i]} failed (exit {proc.returncode}); log {outs[i]}.log ends:\n{tail}")
    return outs
