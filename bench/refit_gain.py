"""What refitting the chosen plan on every sample buys (``CompressConfig.refit``): the same
compress of the basis and relaxed schemes with refit off (the fit the choice measured, on the
curvature half) and on (the winner fitted again on every sample not held out), scored on the
task's evaluation split, in one process.

    python bench/refit_gain.py --tasks minilm --ratios 0.5 --threads 2   # -> bench/results/refit.{md,json}

Both runs of a pair make the same choice (same samples, same seed): only the installed fit differs.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.evaluate import union
from bench.tasks import TASKS, load_task
from hessian_worker import AnalyzeConfig, CompressConfig, compress
from hessian_worker.measure import measure_loss

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = ("relaxed", "basis")


def run_pair(task: Any, scheme: str, ratio: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Refit off then on: score, held-out loss change, seconds, what was chosen."""
    data = union(task.calibration, task.validation)
    rows = []
    for refit in (False, True):
        config = CompressConfig(ratio=ratio, scheme=scheme, distill=task.distill, device="cpu", progress=False,
                                top=args.top, normalized_top=args.top // 2, refit=refit, seed=args.seed)
        model = copy.deepcopy(task.model)
        t = time.perf_counter()
        report = compress(model, data, config, tokenizer=task.tokenizer)
        seconds = time.perf_counter() - t
        loss = measure_loss(model.eval(), task.model, task.evaluation, AnalyzeConfig(distill=task.distill, progress=False),
                            tokenizer=task.tokenizer)
        rows.append({"task": task.name, "scheme": scheme, "ratio": ratio, "refit": refit, "score": task.score(model),
                     "eval_loss": loss, "held_out_loss": report.measured_loss_change,
                     "seconds": round(seconds, 1), "chosen": report.chosen, "params_ratio": report.params_ratio})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Refitting the chosen plan on every sample (compress `refit`)", "", f"Command: `{meta['command']}`  ",
             f"{meta['machine']}; {meta['seconds']} s; peak RSS {meta['peak_rss_gb']:.2f} GiB. Data: each task's "
             "calibration + validation splits (a quarter held out for the held-out loss, the rest split in halves: "
             "costs and candidate fits / choice); score and distillation loss on its evaluation split. Same choice "
             "both ways.", "",
             "| task (metric) | scheme | budget | refit off | refit on | gain | evaluation loss off / on | held-out loss off / on "
             "| seconds off / on | chosen |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    for off, on in zip(rows[::2], rows[1::2], strict=True):
        sign = 1 if result["higher_is_better"][off["task"]] else -1
        lines.append(f"| {off['task']} ({result['metrics'][off['task']]}) | {off['scheme']} | {off['ratio']:g} | "
                     f"{off['score']:.4f} | {on['score']:.4f} | {sign * (on['score'] - off['score']):+.4f} | "
                     f"{off['eval_loss']:.4f} / {on['eval_loss']:.4f} | "
                     f"{off['held_out_loss']:.4f} / {on['held_out_loss']:.4f} | {off['seconds']} / {on['seconds']} | "
                     f"{on['chosen']} |")
    return "\n".join(lines + ["", *([meta["note"], ""] if meta.get("note") else [])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["minilm"], choices=TASKS)
    ap.add_argument("--quick", action="store_true", help="the CI-sized GPT")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "refit"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, metrics, higher = [], {}, {}
    for name in args.tasks:
        task = load_task(name, quick=args.quick, seed=args.seed)
        metrics[name], higher[name] = task.metric, task.higher_is_better
        for ratio in args.ratios:
            for scheme in args.schemes:
                rows += run_pair(task, scheme, ratio, args)
    result = {"meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                       "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}, "
                                  f"{args.threads} thread(s)",
                       "seconds": round(time.perf_counter() - t0, 1),
                       "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},  # KiB on Linux
              "metrics": metrics, "higher_is_better": higher, "rows": rows}
    out = Path(args.out)
    write(result, out)


def write(result: dict[str, Any], out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
