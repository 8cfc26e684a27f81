"""The relaxed pair costs' pricing, alone: the solver's optimum at one correction rank under the
Kronecker price and under the exact GGN's per-layer blocks (``RelaxedOptions.pricing``).

Same task, same whitening (the relaxed scheme's cross-fitted covariances of the calibration split),
same closed-form fits, same budget and rank: only the price of each pair's residual differs. For
every budget the ranks are the default share lowered to fit (``ranks_within``) and the largest at
which 1, 2 and 3 classes per family fill the budget (the product's ``relaxed-fill-c`` levels). Each
optimum is measured on the validation split (what the product's choice reads), then refitted on
calibration + validation as ``compress`` does and scored on the evaluation split.

    python bench/relaxed_pricing.py --tasks minilm --budgets 0.8 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.relaxed_eval import Relaxed
from bench.tasks import TASKS, load_task
from hessian_worker.factored.layers import dense_weights
from hessian_worker.relaxed.analysis import relaxed_problem
from hessian_worker.relaxed.apply import apply_relaxed_plan
from hessian_worker.relaxed.candidates import fill_ranks
from hessian_worker.relaxed.costs import PairSpectra, ranks_within
from solver.planning import SolveConfig, solve

RESULTS = Path(__file__).resolve().parent / "results"


def levels(rx: Relaxed, budget: int) -> dict[str, dict[str, int]]:
    """Rank level name -> family ranks: the default share lowered to fit, and the filling ranks."""
    default = ranks_within(rx.fam_shapes, rx.sizes, rx.ranks_at(rx.options.rank_ratio), budget)
    return {"default": default, **fill_ranks(rx.fam_shapes, rx.sizes, budget)}


def run(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    task = load_task(name, quick=args.quick, seed=args.seed)
    rx = Relaxed(task, args.seed, pricing="exact")  # the whitening and the exact pair costs, measured once
    with torch.no_grad():
        weights = dense_weights(task.model, [x.name for x in rx.base.layers])
        pricers = {"kronecker": PairSpectra(rx.base.layers, weights, rx.covs), "exact": rx.spectra}
    dense = sum(x.params for x in rx.base.layers)
    rows = []
    for ratio in args.budgets:
        budget = math.floor(ratio * dense + 1e-9)
        config = SolveConfig(max_params_ratio=ratio, time_limit_s=10, seed=args.seed)
        for level, ranks in levels(rx, budget).items():
            for pricing, pricer in pricers.items():
                t = time.perf_counter()
                problem = relaxed_problem(rx.base, pricer, ranks, rx.shapes)
                priced = time.perf_counter() - t
                plan = solve(problem, config)
                validation = rx.measure([(plan, problem)])[0]
                model = copy.deepcopy(task.model)
                with torch.no_grad():
                    report = apply_relaxed_plan(model, plan, problem, config=rx.config, covs=rx.final_covs)
                model.eval()
                rows.append({"task": name, "ratio": ratio, "level": level, "ranks": sorted(set(ranks.values())),
                             "pricing": pricing, "classes": len(set(plan.coloring.values())),
                             "objective": plan.objective, "validation_loss": validation,
                             "evaluation": task.score(model), "params_ratio": report.plan_params_shared / dense,
                             "pricing_s": round(priced, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Relaxed pair costs: Kronecker against exact per-layer GGN pricing, the solver's optimum at one rank",
             "", f"Command: `{meta['command']}`  ", f"{meta['machine']}; {meta['seconds']} s; peak RSS "
             f"{meta['peak_rss_gb']} GB", "",
             "Same whitening, fits, budget and correction rank per row pair; only each pair residual's price "
             "differs. validation: the distillation loss the product's choice reads; evaluation: the task "
             "metric after the refit on calibration + validation (higher is better for MiniLM's cosine); "
             "pricing s: the exact forms of that rank level (0 where an earlier level or budget priced them).", "",
             "| task | budget | level | rank | pricing | classes | params ratio | validation loss | evaluation | pricing s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['ratio']} | {r['level']} | {'/'.join(map(str, r['ranks']))} | "
                     f"{r['pricing']} | {r['classes']} | {r['params_ratio']:.3f} | {r['validation_loss']:.4f} | "
                     f"{r['evaluation']:.4f} | {r['pricing_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["minilm"], choices=TASKS)
    ap.add_argument("--quick", action="store_true", help="the CI-sized GPT (bench/tasks)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "relaxed-pricing"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = [r for name in args.tasks for r in run(name, args)]
    result = {"meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                       "machine": f"{platform.machine()} python {platform.python_version()} torch "
                                  f"{torch.__version__}, {args.threads} thread(s)",
                       "seconds": round(time.perf_counter() - t0, 1),
                       "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)},
              "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
