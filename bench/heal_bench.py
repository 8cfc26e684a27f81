"""Block-wise healing of the streamed compress against end-to-end healing in memory, on the trained
task models (issue 17).

For each task (bench/tasks: the byte-level GPT, KL distillation, held-out perplexity; MiniLM,
cosine distillation, embedding cosine to the original's) and ratio, in one run:
- the streamed compress (``hessian_worker.llm.compress.compress_blocks`` over the task model's
  block adapter: ``bench.tasks.gpt.gpt_blocks``, ``hessian_worker.llm.blocks.bert_blocks``) without
  healing, and with block-wise local distillation (``hessian_worker.llm.heal``) at ``--steps``
  optimizer steps per tied block, at the learning rate picked per task from ``--lrs`` on the
  validation split (below),
- the in-memory ``hessian_worker.pipeline.compress`` without healing and with end-to-end
  self-distillation at the same steps and the task's ``heal_lr`` (the baseline). ``heal_choice``
  is off, so both paths heal the zero-shot winner (the in-memory default also heals a shortlist
  and may pick another plan); the in-memory healing keeps its default holdout (a fifth of the fit
  samples picks the best check),
- per run: the task's score of the saved model (``load_shared`` into a copy of the original task
  model, taken before anything ties it) on the evaluation split, the same metric on the validation
  split, the report's held-out loss change (the calibration's held-out quarter), the compress's
  wall seconds, and for block-wise healing the totals of its per-block report.

Besides, per ratio, the streamed zero-shot at ``--check-rank`` (default none: whole input
covariances, what the in-memory layerwise merge always uses): it should equal the in-memory
zero-shot (same costs, plan and merge); at the default rank 64 the streamed merge differs.

Settings shared by every run: backend kfac (default rank 64), merge layerwise, the task's distill
loss, calibration = the task's calibration split only (16 samples: 12 fit, 4 held out for the
loss change), float32, CPU, seed 0, candidates top 4 + normalized top 2 + 1 per pattern.

The learning-rate sweep: block-wise healing at ``--sweep-ratio`` and ``--sweep-steps`` for each lr
of ``--lrs``, scored by the task metric on the validation split (never the evaluation split); the
best is used for every ratio and step count of that task. The evaluation split only reports.

The GPT weights come from bench/cache; a run that would train the GPT stops instead.

    python bench/heal_bench.py [--tasks gpt minilm] [--ratios 0.8 0.67 0.5] [--steps 50 200]
                               [--lrs 3e-4 1e-3 3e-3] [--sweep-ratio 0.67] [--sweep-steps 50]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.tasks.base import Task  # noqa: E402
from hessian_worker.io import load_shared, save_shared  # noqa: E402
from hessian_worker.llm.compress import compress_blocks  # noqa: E402
from hessian_worker.pipeline import CompressConfig, compress  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAME = "heal_bench"


def load(name: str) -> Task:
    """The task, refusing to train: the GPT must come from bench/cache."""
    if name == "gpt":
        import bench.tasks.gpt as gpt

        def refuse(*_: Any, **__: Any) -> dict:
            raise SystemExit("the GPT task would train (no cached weights in bench/cache): not retraining here")

        gpt.train_gpt = refuse
        return gpt.gpt_task()
    if name == "minilm":
        from bench.tasks.minilm import minilm_task

        return minilm_task()
    raise ValueError(f"unknown task {name!r}: use gpt or minilm")


def blocks_of(task: Task, model: nn.Module) -> Any:
    if task.name == "gpt":
        from bench.tasks.gpt import gpt_blocks

        return gpt_blocks(model)
    from hessian_worker.llm.blocks import bert_blocks

    return bert_blocks(model)


def validation_score(task: Task, original: nn.Module) -> Callable[[nn.Module], float]:
    """The task's metric on its validation split (what the lr sweep may look at)."""
    if task.name == "gpt":
        from bench.tasks.gpt import perplexity

        return lambda m: perplexity(m, task.validation)
    from bench.tasks.minilm import embed

    reference = embed(original, task.tokenizer, task.validation)
    return lambda m: float((embed(m, task.tokenizer, task.validation) * reference).sum(-1).mean())


def config_for(task: Task, ratio: float, steps: int, lr: float, rank: int | None,
               args: argparse.Namespace) -> CompressConfig:
    return CompressConfig(ratio=ratio, backend="kfac", merge="layerwise", distill=task.distill, dtype="float32",
                          device="cpu", seed=0, top=args.top, normalized_top=args.normalized_top,
                          per_pattern=args.per_pattern, heal_steps=steps, heal_lr=lr, heal_choice=False,
                          kfac={"rank": rank}, progress=False)


def heal_totals(summary: dict[str, Any]) -> dict[str, Any]:
    """Totals of the block-wise healing report (``BlockHealReport.summary``)."""
    blocks = summary["blocks"]
    return {"blocks": len(blocks), "before": sum(b["before"] for b in blocks),
            "after": sum(b["after"] for b in blocks), "earlier": sum(b["earlier"] for b in blocks),
            "kept_step_0": sum(b["best_step"] == 0 for b in blocks), "seconds": summary["seconds"],
            "per_block": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in b.items()} for b in blocks]}


def run_one(task: Task, original: nn.Module, score_val: Callable[[nn.Module], float], mode: str, ratio: float,
            steps: int, lr: float, rank: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """One compress (mode streamed or memory), saved, reloaded into a copy of the original, scored."""
    config = config_for(task, ratio, steps, lr, rank, args)
    with tempfile.TemporaryDirectory() as out:
        model = copy.deepcopy(original)
        t = time.perf_counter()
        if mode == "streamed":
            report = compress_blocks(blocks_of(task, model), task.calibration, config, out, tokenizer=task.tokenizer)
        else:
            report = compress(model, task.calibration, config, tokenizer=task.tokenizer)
        seconds = time.perf_counter() - t
        if mode == "memory":
            save_shared(model, report.plan, out)
        del model
        loaded = copy.deepcopy(original)
        load_shared(loaded, out)
        row: dict[str, Any] = {
            "task": task.name, "mode": mode, "ratio": ratio, "steps": steps, "lr": lr if steps else None, "kfac_rank": rank,
            "score": task.score(loaded), "validation_score": score_val(loaded),
            "measured_loss_change": report.measured_loss_change, "predicted_loss_change": report.predicted_loss_change,
            "params_ratio": report.params_ratio, "chosen": report.chosen,
            "groups": [g for g in report.plan.groups if len(g) > 1], "seconds": round(seconds, 2),
        }
    source = report.problem.source or {}
    if mode == "streamed" and "heal" in source:
        row["heal"] = heal_totals(source["heal"])
    if mode == "streamed":
        row["phases_s"] = source.get("seconds")
    if report.heal is not None:
        row["heal"] = {"best_step": report.heal.best_step, "first_loss": report.heal.first_loss,
                       "last_loss": report.heal.last_loss, "held_losses": report.heal.held_losses}
    print(json.dumps({k: v for k, v in row.items() if k not in ("groups", "heal")}), flush=True)
    return row


def bench_task(name: str, args: argparse.Namespace) -> dict[str, Any]:
    task = load(name)
    original = copy.deepcopy(task.model)  # before anything ties it
    score_val = validation_score(task, original)
    base = {"score": task.score(copy.deepcopy(original)), "validation_score": score_val(copy.deepcopy(original))}
    done: dict[tuple, dict[str, Any]] = {}

    def get(mode: str, ratio: float, steps: int, lr: float, rank: int | None = args.kfac_rank) -> dict[str, Any]:
        key = (mode, ratio, steps, lr if steps else None, rank)
        if key not in done:
            done[key] = run_one(task, original, score_val, mode, ratio, steps, lr, rank, args)
        return done[key]

    # the block-wise lr: the best validation score at the sweep setting
    sweep = [get("streamed", args.sweep_ratio, args.sweep_steps, lr) for lr in args.lrs]
    sign = -1.0 if task.higher_is_better else 1.0
    best_lr = min(sweep, key=lambda r: sign * r["validation_score"])["lr"]
    rows = []
    for ratio in args.ratios:
        rows.append(get("streamed", ratio, 0, task.heal_lr))
        rows += [get("streamed", ratio, s, best_lr) for s in args.steps]
        rows.append(get("memory", ratio, 0, task.heal_lr))
        rows += [get("memory", ratio, s, task.heal_lr) for s in args.steps]
        if args.check_rank != args.kfac_rank:  # the streamed zero-shot with the in-memory merge's covariances
            rows.append(get("streamed", ratio, 0, task.heal_lr, args.check_rank))
    return {"task": name, "metric": task.metric, "higher_is_better": task.higher_is_better, "distill": task.distill,
            "calibration_samples": len(task.calibration), "original": base, "blockwise_lr": best_lr,
            "e2e_lr": task.heal_lr,
            "sweep": [{"lr": r["lr"], "validation_score": r["validation_score"], "score": r["score"]} for r in sweep],
            "runs": list(done.values())}


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _find(t: dict[str, Any], mode: str, ratio: float, steps: int, rank: int | None) -> dict[str, Any] | None:
    """The task's run of that mode, ratio, steps and kfac rank, healed at the lr the table uses."""
    lr = t["blockwise_lr"] if mode == "streamed" else t["e2e_lr"]
    return next((x for x in t["runs"] if x["mode"] == mode and x["ratio"] == ratio and x["steps"] == steps
                 and x["kfac_rank"] == rank and (steps == 0 or x["lr"] == lr)), None)


def render(payload: dict[str, Any]) -> str:
    settings = payload["settings"]
    steps, rank, check = settings["steps"], settings["kfac_rank"], settings["check_rank"]
    lines = ["# Block-wise healing of the streamed compress vs end-to-end healing in memory", "",
             f"Command: `{payload['command']}`  ", f"Machine: {payload['machine']}  ", f"Commit: {payload['commit']}  ",
             f"Total wall time: {payload['seconds']:.0f} s", "", payload["settings_note"], ""]
    if payload.get("note"):
        lines += [payload["note"], ""]
    for t in payload["tasks"]:
        runs = t["runs"]

        def find(mode: str, ratio: float, s: int, r: int | None = rank, t: dict[str, Any] = t) -> dict[str, Any] | None:
            return _find(t, mode, ratio, s, r)

        better = "higher" if t["higher_is_better"] else "lower"
        extra = check != rank
        lines += [f"## {t['task']}: {t['metric']} on the evaluation split ({better} is better)", "",
                  f"Calibration: the task's {t['calibration_samples']} samples (12 fit, 4 held out for the loss "
                  f"change). Block-wise lr {t['blockwise_lr']:g} (validation sweep below); end-to-end lr "
                  f"{t['e2e_lr']:g} (the task's heal_lr).", "",
                  "| ratio | original | zero-shot (streamed) | "
                  + " | ".join(f"block-wise {s}" for s in steps)
                  + " | in-memory zero-shot | " + " | ".join(f"end-to-end {s}" for s in steps)
                  + (f" | streamed zero-shot, kfac rank {check} |" if extra else " |")
                  + " seconds: streamed 0 / " + " / ".join(f"bw {s}" for s in steps) + " / memory 0 / "
                  + " / ".join(f"e2e {s}" for s in steps) + " |",
                  "|" + "---|" * (5 + 2 * len(steps) + extra)]
        for ratio in sorted({x["ratio"] for x in runs}, reverse=True):
            if find("memory", ratio, 0) is None:
                continue  # a sweep-only ratio
            cells = [find("streamed", ratio, 0)] + [find("streamed", ratio, s) for s in steps] \
                + [find("memory", ratio, 0)] + [find("memory", ratio, s) for s in steps]
            checked = [find("streamed", ratio, 0, check)] if extra else []
            lines.append(f"| {ratio} | {_fmt(t['original']['score'])} | "
                         + " | ".join(_fmt(c["score"]) if c else "-" for c in cells + checked) + " | "
                         + " / ".join(f"{c['seconds']:.0f}" if c else "-" for c in cells) + " |")
        lines += ["", "Every run: the held-out loss change (the calibration's held-out quarter: the report's "
                  "measured_loss_change), the validation score, healing's record (block-wise: the blocks healed, "
                  "the sum over them of the relative reconstruction error before -> after, and how many kept "
                  "step 0; end-to-end: the kept check) and the plan:", "",
                  "| ratio | mode | kfac rank | steps | loss change | validation score | healing | plan |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in sorted(runs, key=lambda x: (-x["ratio"], x["mode"] != "streamed", x["kfac_rank"] is None,
                                             x["steps"], x["lr"] or 0)):
            h = x.get("heal")
            record = (f"{h['blocks']} blocks, {h['before']:.3f} -> {h['after']:.3f}, {h['kept_step_0']} kept step 0"
                      if h and "blocks" in h else (f"best step {h['best_step']}" if h else "-"))
            lr = f" (lr {x['lr']:g})" if x["steps"] else ""
            lines.append(f"| {x['ratio']} | {x['mode']} | {x['kfac_rank']} | {x['steps']}{lr} | "
                         f"{_fmt(x['measured_loss_change'])} | {_fmt(x['validation_score'])} | {record} | "
                         f"{x['chosen']}, {len(x['groups'])} classes |")
        lines += ["", f"Block-wise lr sweep at ratio {settings['sweep_ratio']}, {settings['sweep_steps']} steps "
                  "(the lr with the best validation score is used throughout; the evaluation score is shown, not "
                  "used):", "", "| lr | validation score | evaluation score |", "|---|---|---|"]
        lines += [f"| {x['lr']:g} | {_fmt(x['validation_score'])} | {_fmt(x['score'])} |" for x in t["sweep"]]
        lines += ["", f"Original: evaluation {_fmt(t['original']['score'])}, "
                  f"validation {_fmt(t['original']['validation_score'])}.", ""]
    return "\n".join(lines)


SETTINGS_NOTE = ("Settings: backend kfac (rank {kfac_rank}), merge layerwise, the task's distill loss, float32 on CPU, seed 0, "
                 "candidates top {top} + normalized top {normalized_top} + {per_pattern} per pattern; healing of the "
                 "zero-shot winner on both paths (heal_choice off); the end-to-end healing keeps a fifth of the fit "
                 "samples to pick its best check (its default), the block-wise healing keeps each block's best check "
                 "on its own fit data. End-to-end healing trains every parameter (embeddings, norms, biases, head "
                 "included); block-wise healing trains the tied classes only. The in-memory layerwise merge uses whole "
                 "input covariances whatever the kfac rank; the streamed merge (and healing's anchors) keep kfac rank "
                 "eigenpairs plus a bulk, so at a finite rank the two paths can merge, and then choose, differently: "
                 "the last column of the table is the streamed zero-shot with whole covariances, which should equal "
                 "the in-memory zero-shot. Scores: the saved model loaded into a copy of the original task model.")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["gpt", "minilm"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.67, 0.5])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--sweep-ratio", type=float, default=0.67)
    parser.add_argument("--sweep-steps", type=int, default=50)
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--normalized-top", type=int, default=2)
    parser.add_argument("--per-pattern", type=int, default=1)
    parser.add_argument("--kfac-rank", type=lambda v: None if v == "none" else int(v), default=64,
                        help="kfac.rank: input factors' eigenpairs, in the costs and the streamed merge (none: whole)")
    parser.add_argument("--check-rank", type=lambda v: None if v == "none" else int(v), default=None,
                        help="also the streamed zero-shot at this kfac rank (default none: whole covariances, as the "
                        "in-memory merge uses); the same as --kfac-rank to skip")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2, shared)")
    parser.add_argument("--note", default="", help="a note written under the header of the .md")
    parser.add_argument("--no-write", action="store_true", help="print only (trial runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tasks = [bench_task(name, args) for name in args.tasks]
    payload = {
        "command": "python bench/heal_bench.py " + " ".join(argv),
        "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "commit": _commit(), "seconds": round(time.perf_counter() - start, 1),
        "settings": {k: v for k, v in vars(args).items() if k not in ("note", "no_write")},
        "settings_note": SETTINGS_NOTE.format(**vars(args)), "note": args.note, "tasks": tasks,
    }
    text = render(payload)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{NAME}.json").write_text(json.dumps(payload, indent=2))
        (RESULTS / f"{NAME}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
