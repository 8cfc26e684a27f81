"""Cross-domain evaluation: calibrate on one kind of data, evaluate on another, both ways.

A compressed model is judged on the user's data, not on the calibration set. For each model two
corpora of different kinds (MiniLM: the standard library's docstrings and the bench's general
prose; the GPT task model: text/data-format modules and systems modules of the standard
library, see bench/tasks/gpt.SOURCES) give two tasks with their own calibration, validation and
evaluation splits. Each strategy is calibrated on one corpus (costs, the choice, the merge's
input covariances) and every plan it makes is scored on both evaluation splits: its own corpus's
(in-domain) and the other's (cross-domain). Geo is the product's pipeline as bench/evaluate.py
runs it (the K best plans and the pattern plans, the least validation loss under Geo-Sharing's
merge); the heuristics get the same merge, so the table compares plans and the merge's shrinkage
setting (``--shrinkage``, hessian_worker.curvature.shrinkage) is compared across runs.

The domain shift is measured on one evaluation set: cross(A→B) − in(B→B), the cost of having
calibrated on A rather than on B, both scored on B's evaluation split.

With ``--mixed`` a third calibration joins: ``mixed``, half of each corpus's calibration and
validation splits (the same sizes as one corpus's), scored on both evaluation splits; its shift,
mixed(→B) − in(B→B), is what calibrating on data that covers both uses costs on each.

With ``--heal-steps N`` each cell is also healed: the strategy's tied model (geo: its zero-shot
choice) is healed on its calibration domain as bench/evaluate.py heals every strategy, and the one
healed model is scored on both evaluation splits; healed cells are kept apart from the zero-shot ones.

    python bench/cross_domain.py                                   # -> bench/results/eval-cross-domain.*
    python bench/cross_domain.py --models minilm --budgets 0.67 --shrinkage none ledoit-wolf
    python bench/cross_domain.py --resume --models minilm --budgets 0.67 --heal-steps 100
    python bench/cross_domain.py --resume --mixed          # adds the mixed-calibration cells
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

from bench.evaluate import (
    HEURISTICS,
    Runner,
    calibrated_runner,
    geo_candidates,
    healing,
    label,
    merges_of,
    union,
)
from bench.tasks.base import Task
from geoshare.cli.model_flags import shrinkage_setting
from hessian_worker import CompressConfig, HealConfig
from solver import SharingPlan, SolveConfig
from solver.baselines import baseline

RESULTS = Path(__file__).resolve().parent / "results"
DOMAINS = {"minilm": ("docstrings", "prose"), "gpt": ("text", "system")}
STRATEGIES = ["geo", "weight-distance", *HEURISTICS, "random"]


MIXED = "mixed"  # the calibration on half of each corpus


def mixed_task(model: str, tasks: dict[str, Task]) -> Task:
    """The model's task calibrated on both corpora: the first half of each one's calibration and
    validation splits (together the size of one's); its evaluation split is the first corpus's (the
    cells score every plan on each corpus's own)."""
    a, b = (tasks[d] for d in DOMAINS[model])

    def halves(x: Any, y: Any) -> Any:
        return union(x[:len(x) // 2], y[:len(y) - len(y) // 2])

    return dataclasses.replace(a, name=f"{model}-{MIXED}", calibration=halves(a.calibration, b.calibration),
                               validation=halves(a.validation, b.validation))


def domain_task(model: str, domain: str, seed: int) -> Task:
    """The model's task with every split drawn from one domain."""
    if model == "minilm":
        from bench.tasks.minilm import minilm_task

        return minilm_task(corpus=domain, seed=seed)
    from bench.tasks.gpt import gpt_task

    return gpt_task(quick=True, source=domain, seed=seed)


PLOTTED = ("none", label(CompressConfig.model_fields["shrinkage"].default))  # the .png's settings


def plans_of(strategy: str, task: Task, runner: Runner, config: SolveConfig, merge: str,
             args: argparse.Namespace) -> list[SharingPlan]:
    """The plan(s) a strategy makes on its calibration task (random: one per seed)."""
    problem = runner.problem
    if strategy == "geo":
        pool, measured = geo_candidates(task, problem, config, runner, merge, args)
        return [pool[int(np.argmin(measured))]]
    if strategy == "weight-distance":
        plans = [baseline(problem, strategy, config, distances=runner.distances)]
    elif strategy == "random":
        plans = [baseline(problem, "random", config, seed=s) for s in range(args.random_seeds)]
    else:
        plans = [baseline(problem, strategy, config)]
    return [p for p in plans if p.status.value != "infeasible"]


def done_key(row: dict) -> tuple:
    """What identifies a cell in --resume: healed cells by their steps too."""
    key = (row["model"], row["shrinkage"], row["calibrated_on"], row["ratio"], row["strategy"])
    return key if "heal_steps" not in row else ("healed", row["heal_steps"], *key)


def run_model(model: str, args: argparse.Namespace, done: set[tuple], rows: list[dict], out: Path,
              healed: list[dict] | None = None) -> None:
    """Every (shrinkage, calibration domain, budget, strategy) cell of one model, appended to rows;
    with ``args.heal_steps``, each cell healed too, appended to ``healed``."""
    healed = [] if healed is None else healed
    tasks = {d: domain_task(model, d, args.seed) for d in DOMAINS[model]}
    calibrations = {**tasks, MIXED: mixed_task(model, tasks)} if args.mixed else tasks
    for setting in args.shrinkage:
        for calibrated_on, task in calibrations.items():
            heal = healing(task, args.heal_steps, args.heal_holdout)
            extra = {} if heal is None else {"heal_steps": heal.steps, "heal_holdout": heal.holdout}
            todo = {}  # cell -> the regimes still to measure, and the list their rows go to
            for r in args.budgets:
                for s in args.strategies:
                    row = {"model": model, "shrinkage": label(setting), "calibrated_on": calibrated_on, "ratio": r,
                           "strategy": s}
                    regimes = [(name, target) for name, target, key in (
                        ("zero-shot", rows, done_key(row)), ("healed", healed, done_key({**row, **extra})))
                        if key not in done and (name == "zero-shot" or heal is not None)]
                    if regimes:
                        todo[(r, s)] = regimes
            if not todo:
                continue
            runner, merge = calibrated_runner(task, setting, args.seed, args.choice_holdout)
            runner.heal = heal
            rhos = list((runner.covariances.intensities if runner.covariances else {}).values())
            for (ratio, strategy), regimes in tqdm(todo.items(), desc=f"{model} {label(setting)} on {calibrated_on}"):
                config = SolveConfig(max_params_ratio=ratio, time_limit_s=10, seed=args.seed)
                plans = plans_of(strategy, task, runner, config, merge, args)
                if not plans:
                    continue  # e.g. all-share cannot meet a loose budget
                scores = {name: {d: [] for d in tasks} for name, _ in regimes}
                merges, chosen = merges_of(plans, task, runner)
                for plan, layerwise in zip(plans, merges, strict=True):
                    tied = runner.tied(plan, merge, layerwise)
                    for name, _ in regimes:  # zero-shot first: healing changes the model in place
                        if name == "healed":
                            tied = runner.healed(tied)
                        for domain, other in tasks.items():
                            scores[name][domain].append(other.score(tied))
                for name, target in regimes:
                    for domain in tasks:
                        target.append({
                            "model": model, "shrinkage": label(setting), "calibrated_on": calibrated_on,
                            "evaluated_on": domain, "ratio": ratio, "strategy": strategy, "merge": merge,
                            "score": float(np.mean(scores[name][domain])), "plans": len(plans),
                            "params_ratio": float(np.mean([p.params.ratio for p in plans])),
                            "intensity": summary(chosen if chosen is not None else rhos),
                            **(extra if name == "healed" else {}),
                        })
                save(rows, args, out, healed)


def summary(rhos: list[float]) -> dict[str, float] | None:
    """Mean, min and max of the intensities a cell's merges used."""
    if not rhos:
        return None
    return {"mean": float(np.mean(rhos)), "min": float(np.min(rhos)), "max": float(np.max(rhos))}


def save(rows: list[dict], args: argparse.Namespace, out: Path, healed: list[dict] | None = None) -> None:
    command = " ".join([Path(sys.executable).name, *sys.argv])
    result = {"meta": {"command": " ; ".join([*args.earlier, command]),
                       "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}",
                       "top": args.top, "normalized_top": args.normalized_top, "per_pattern": args.per_pattern,
                       "random_seeds": args.random_seeds, "choice_holdout": args.choice_holdout,
                       "seconds": round(args.earlier_seconds + time.perf_counter() - args.started, 1)},
              "higher_is_better": {"minilm": True, "gpt": False},
              "metric": {"minilm": "embedding cosine to the original", "gpt": "held-out perplexity"},
              "rows": rows}
    if healed:
        result["healed"] = healed  # the healed cells, each with its heal_steps and heal_holdout
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))


def cell(rows: list[dict], **match: Any) -> float | None:
    hit = [r["score"] for r in rows if all(r[k] == v for k, v in match.items())]
    return hit[0] if hit else None


def shift(rows: list[dict], model: str, setting: str, strategy: str, ratio: float, a: str, b: str) -> float | None:
    """cross(a→b) − in(b→b): the cost of calibrating on a rather than b, on b's evaluation split."""
    cross = cell(rows, model=model, shrinkage=setting, strategy=strategy, ratio=ratio, calibrated_on=a, evaluated_on=b)
    home = cell(rows, model=model, shrinkage=setting, strategy=strategy, ratio=ratio, calibrated_on=b, evaluated_on=b)
    return None if cross is None or home is None else cross - home


def fmt(v: float | None, signed: bool = False) -> str:
    return "" if v is None else (f"{v:+.4f}" if signed else f"{v:.4g}")


def score_tables(mine: list[dict], ratios: list[float], directions: list[tuple[str, str]], title: str) -> list[str]:
    """One table of scores per shrinkage setting: a row per strategy, a column per (ratio, direction);
    ``title`` is the heading's start."""
    lines: list[str] = []
    for setting in dict.fromkeys(r["shrinkage"] for r in mine):
        rho = next((r["intensity"] for r in mine if r["shrinkage"] == setting and r["intensity"]), None)
        note = f" (intensity mean {rho['mean']:.3f}, range {rho['min']:.3f}-{rho['max']:.3f})" if rho else ""
        lines += [f"### {title}{setting}{note}", "",
                  "| strategy | " + " | ".join(f"{r:g} {x[:4]}→{y[:4]}" for r in ratios for x, y in directions) + " |",
                  "|---" * (1 + len(ratios) * 4) + "|"]
        for s in dict.fromkeys(r["strategy"] for r in mine):
            cells = [fmt(cell(mine, shrinkage=setting, strategy=s, ratio=r, calibrated_on=x, evaluated_on=y))
                     for r in ratios for x, y in directions]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def lead_table(mine: list[dict], model: str, ratios: list[float], higher: bool, title: str,
               via: str | None = None) -> list[str]:
    """Geo's shift on each corpus and its lead over the best heuristic in each cell calibrated on the
    other corpus (``via``: on that calibration instead, e.g. the mixed one)."""
    a, b = DOMAINS[model]
    x_to = {b: via or a, a: via or b}  # the calibration whose cells are scored on each corpus
    lines = [f"### {title} ({model})", "",
             "| shrinkage | ratio | shift on " + b + " | shift on " + a + f" | lead {x_to[b]}→{b} | lead {x_to[a]}→{a} |",
             "|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["shrinkage"] for r in mine):
        for r in ratios:
            leads = []
            for x, y in ((x_to[b], b), (x_to[a], a)):
                geo = cell(mine, shrinkage=setting, strategy="geo", ratio=r, calibrated_on=x, evaluated_on=y)
                others = [v["score"] for v in mine if v["shrinkage"] == setting and v["ratio"] == r
                          and v["calibrated_on"] == x and v["evaluated_on"] == y and v["strategy"] != "geo"]
                best = (max if higher else min)(others) if others else None
                leads.append(None if geo is None or best is None else (geo - best if higher else best - geo))
            lines.append(f"| {setting} | {r:g} | {fmt(shift(mine, model, setting, 'geo', r, x_to[b], b), True)} | "
                         f"{fmt(shift(mine, model, setting, 'geo', r, x_to[a], a), True)} | {fmt(leads[0], True)} | "
                         f"{fmt(leads[1], True)} |")
    return [*lines, ""]


def markdown(result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    healed = result.get("healed", [])
    lines = ["# Cross-domain evaluation", "", f"Command: `{meta['command']}`  ",
             f"{meta['machine']}; {meta['seconds']} s (the runs above together, on a shared 2-core machine with "
             f"other jobs running); zero-shot; geo measures the {meta['top']} best plans, the "
             f"{meta['normalized_top']} best by size-normalized costs and {meta['per_pattern']} allocations per "
             f"pattern (choice holdout {meta['choice_holdout']}); random: mean of {meta['random_seeds']} seeds; every "
             "strategy with Geo-Sharing's merge (the product's default rule) fitted on its calibration domain.", "",
             "Cells: `A→B` is calibrated on A (costs, choice, merge) and scored on B's evaluation split. "
             "Shift = cross(A→B) − in(B→B) on the same evaluation split (cosine: negative is a loss; perplexity: "
             "positive is a loss). Lead = geo's margin over the best heuristic in that cell (positive: geo is ahead).",
             ""]
    if healed:
        lines += ["Healed cells (their own tables after each model's zero-shot ones): each strategy's tied model "
                  "(geo: its zero-shot choice, not bench/evaluate.py's healed shortlist) healed on its calibration "
                  "domain's calibration + validation data as bench/evaluate.py heals every strategy (the task's "
                  "learning rate and distillation loss, the best of every "
                  f"{HealConfig().check_every} steps on a held-out share of that data); the one healed model gives "
                  "both A→A and A→B.", ""]
    for model in dict.fromkeys(r["model"] for r in [*rows, *healed]):
        a, b = DOMAINS[model]
        higher = result["higher_is_better"][model]
        mine = [r for r in rows if r["model"] == model]
        ratios = sorted({r["ratio"] for r in mine}, reverse=True)
        merge = (mine or [r for r in healed if r["model"] == model])[0]["merge"]
        lines += [f"## {model}: {result['metric'][model]} ({'higher' if higher else 'lower'} is better; corpora "
                  f"{a} and {b}; merge {merge})", ""]
        directions = [(a, a), (a, b), (b, b), (b, a)]
        single = [r for r in mine if r["calibrated_on"] != MIXED]
        lines += score_tables(single, ratios, directions, "shrinkage ")
        lines += lead_table(single, model, ratios, higher,
                            "geo: shift and lead over the best heuristic in each cross-domain cell")
        settings = {r["shrinkage"] for r in mine if r["calibrated_on"] == MIXED}
        if settings:
            mixed = [r for r in mine if r["shrinkage"] in settings]
            lines += score_tables(mixed, ratios, [(a, a), (MIXED, a), (b, b), (MIXED, b)],
                                  "calibrated on both corpora (mixed) beside in-domain, shrinkage ")
            lines += lead_table(mixed, model, ratios, higher, "geo calibrated on both corpora: shift and lead over "
                                "the best heuristic in each mixed cell", via=MIXED)
        for steps, holdout in dict.fromkeys((r["heal_steps"], r["heal_holdout"]) for r in healed if r["model"] == model):
            cells = [r for r in healed if r["model"] == model and r["heal_steps"] == steps]
            kept = sorted({r["ratio"] for r in cells}, reverse=True)
            what = f"healed {steps} steps (held-out {holdout:g})"
            lines += score_tables(cells, kept, directions, f"{what}, shrinkage ")
            lines += lead_table(cells, model, kept, higher,
                                f"geo {what}: shift and lead over the best healed heuristic in each cross-domain cell")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    healed = [{**r, "shrinkage": f"{r['shrinkage']}, healed {r['heal_steps']}"} for r in result.get("healed", [])
              if r["shrinkage"] in PLOTTED]
    models = list(dict.fromkeys(r["model"] for r in [*rows, *healed]))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), dpi=110, squeeze=False)
    for axrow, model in zip(axes, models, strict=True):
        mine = [r for r in [*rows, *healed] if r["model"] == model]
        # none and compress's default, zero-shot and healed (the .md has every setting): more would hide them
        settings = [s for s in dict.fromkeys(r["shrinkage"] for r in mine) if s.split(",")[0] in PLOTTED]
        for ax, (home, away) in zip(axrow, [DOMAINS[model], DOMAINS[model][::-1]], strict=True):
            for i, setting in enumerate(settings):
                color = f"C{i}"
                for calibrated_on, style, what in ((home, "-o", "in-domain"), (away, "--s", "cross")):
                    pts = sorted((r["ratio"], r["score"]) for r in mine if r["shrinkage"] == setting and
                                 r["strategy"] == "geo" and r["calibrated_on"] == calibrated_on and r["evaluated_on"] == home)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color,
                            label=f"geo, {what}, shrinkage {setting}")
                best: dict[float, float] = {}
                for r in mine:
                    if r["shrinkage"] == setting and r["strategy"] != "geo" and r["calibrated_on"] == away and \
                            r["evaluated_on"] == home:
                        pick = max if result["higher_is_better"][model] else min
                        best[r["ratio"]] = pick(best.get(r["ratio"], r["score"]), r["score"])
                pts = sorted(best.items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ":", color=color, alpha=0.7,
                        label=f"best heuristic, cross, shrinkage {setting}")
            ax.set_title(f"{model}: evaluated on {home}")
            ax.set_xlabel("share of shareable parameters kept")
            ax.set_ylabel(result["metric"][model])
            ax.invert_xaxis()
            if not result["higher_is_better"][model]:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(out: Path) -> None:
    result = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(DOMAINS), default=list(DOMAINS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.84, 0.67, 0.5])
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES)
    ap.add_argument("--shrinkage", nargs="+", type=shrinkage_setting,
                    default=[CompressConfig.model_fields["shrinkage"].default],
                    help="the merge's covariance shrinkage settings to compare (default: compress's default)")
    ap.add_argument("--seed", type=int, default=0)
    # geo's pool and choice: compress's defaults
    ap.add_argument("--top", type=int, default=16, help="geo: K best plans measured")
    ap.add_argument("--normalized-top", type=int, default=16, help="geo: K best by size-normalized costs measured")
    ap.add_argument("--per-pattern", type=int, default=2, help="geo: budget-filling allocations per pattern")
    ap.add_argument("--random-seeds", type=int, default=3, help="random plans averaged per cell")
    ap.add_argument("--choice-holdout", type=float, default=0.5,
                    help="geo: share of the validation split candidates are scored on (compress's choice_holdout)")
    ap.add_argument("--heal-steps", type=int, default=0,
                    help="also heal every cell this many steps on its calibration domain (bench/evaluate.py's healing; "
                         "its full run: 100); 0: zero-shot only")
    ap.add_argument("--heal-holdout", type=float, default=HealConfig().holdout,
                    help="share of the healing data kept out to pick the best check (as bench/evaluate.py)")
    ap.add_argument("--mixed", action="store_true",
                    help="also calibrate on half of each corpus (the calibration 'mixed'), scored on both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="keep the cells of --out's json and run the rest")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md and .png from --out's json")
    ap.add_argument("--out", default=str(RESULTS / "eval-cross-domain"))
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        write(out)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.started = time.perf_counter()
    rows: list[dict] = []
    healed: list[dict] = []
    args.earlier, args.earlier_seconds = [], 0.0  # the runs a --resume continues
    if args.resume and out.with_suffix(".json").is_file():
        earlier = json.loads(out.with_suffix(".json").read_text())
        rows, args.earlier = earlier["rows"], [earlier["meta"]["command"]]
        healed = earlier.get("healed", [])
        args.earlier_seconds = earlier["meta"]["seconds"]
    done = {done_key(r) for r in [*rows, *healed]}
    for model in args.models:
        run_model(model, args, done, rows, out, healed)
    save(rows, args, out, healed)
    write(out)


if __name__ == "__main__":
    main()
