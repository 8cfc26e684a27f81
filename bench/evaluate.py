"""Evaluation on a real model: Geo-Sharing's plans against heuristic sharing at equal budgets.

MiniLM (the packaged all-MiniLM-L6-v2): calibration and evaluation sentences are disjoint seeded
samples of the standard library's docstrings (bench/corpus.py); the metric is the mean cosine of
the compressed model's sentence embeddings (mean pooling, as sentence-transformers) to the
original's on the evaluation sentences. Budgets are shares of the shareable parameters.

    python bench/evaluate.py                  # full run -> bench/results/eval.{json,md}, plots
    python bench/evaluate.py --quick          # CI-sized run (two budgets, fewer strategies)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

from bench.corpus import split
from hessian_worker import (
    AnalyzeConfig,
    HealConfig,
    analyze,
    apply_plan,
    choose_plan,
    heal,
    load_model,
    measure_loss,
)
from solver import SharingPlan, SharingProblem, SolveConfig, solve
from solver.baselines import baseline
from solver.candidates import candidate_plans
from solver.evaluate import objective

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / "cache"
HEURISTICS = ["sequence", "cycle", "cycle-rev", "adjacent-pairs", "all-share"]


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: masked mean pooling, L2-normalized."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def weight_distances(model: torch.nn.Module, problem: SharingProblem) -> list[list[float | None]]:
    """||W_l - W_m||^2 within families (null across), the weight-distance clustering costs."""
    params = dict(model.named_parameters())
    names = [layer.name for layer in problem.layers]
    out: list[list[float | None]] = []
    for a, la in enumerate(problem.layers):
        row = []
        for b, lb in enumerate(problem.layers):
            if la.family != lb.family:
                row.append(None)
            else:
                row.append(0.0 if a == b else float(((params[names[a]] - params[names[b]]) ** 2).sum()))
        out.append(row)
    return out


def costs_for(backend: str, model, calib: list[str], samples: int, seed: int, distill: str = "mse") -> SharingProblem:
    """The backend's SharingProblem on the calibration sentences, cached on disk by its settings."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"minilm-{backend}-{distill}-n{samples}-s{seed}.json"
    if path.is_file():
        return SharingProblem.model_validate_json(path.read_text())
    config = AnalyzeConfig(backend=backend, kind="pairwise", seed=seed, batch_size=8, distill=distill, progress=True)
    t = time.perf_counter()
    problem = analyze(copy.deepcopy(model), calib, config, tokenizer=TOKENIZER)
    print(f"  {backend}: costs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    path.write_text(problem.model_dump_json())
    return problem


def measure(
    plan: SharingPlan, model, eval_sents: list[str], ref_emb: torch.Tensor, heal_data: list[str] | None, heal_steps: int,
    distill: str = "mse",
) -> dict[str, tuple[float, float]]:
    """{regime: (embedding cosine to the original, measured distillation-loss change)} of the tied
    model, zero-shot and, with heal_steps, after healing on the calibration sentences."""
    tied = copy.deepcopy(model)
    apply_plan(tied, plan, "mean")
    out = {"zero-shot": _scores(tied, model, eval_sents, ref_emb, distill)}
    if heal_steps and heal_data:
        heal(tied, model, heal_data, HealConfig(steps=heal_steps, lr=5e-5, distill=distill, progress=False), tokenizer=TOKENIZER)
        out["healed"] = _scores(tied, model, eval_sents, ref_emb, distill)
    return out


def _scores(tied, model, eval_sents: list[str], ref_emb: torch.Tensor, distill: str) -> tuple[float, float]:
    tied.eval()
    emb = embed(tied, TOKENIZER, eval_sents)
    cosine = float((emb * ref_emb).sum(-1).mean())
    loss = measure_loss(tied, model, eval_sents, AnalyzeConfig(distill=distill, progress=False), tokenizer=TOKENIZER)
    return cosine, loss


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for value in np.unique(a):
            tie = a == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def rank_agreement(problems: dict[str, SharingProblem], model, eval_sents: list[str], n: int, seed: int,
                   distill: str = "mse") -> dict:
    """Predicted vs measured over n random plans at budgets 0.8 to 0.95: Spearman per backend."""
    rng = np.random.default_rng(seed)
    any_problem = next(iter(problems.values()))
    plans, measured = [], []
    for i in tqdm(range(n), desc="random plans"):
        ratio = float(rng.uniform(0.8, 0.95))
        plan = baseline(any_problem, "random", SolveConfig(max_params_ratio=ratio), seed=seed + i)
        if plan.status.value == "infeasible":
            continue
        tied = copy.deepcopy(model)
        apply_plan(tied, plan, "mean")
        plans.append(plan)
        measured.append(measure_loss(tied, model, eval_sents, AnalyzeConfig(distill=distill, progress=False), tokenizer=TOKENIZER))
    return {
        "plans": len(plans),
        "spearman": {b: spearman([objective(p, plan.coloring) for plan in plans], measured) for b, p in problems.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: budgets 0.8 and 0.67, exact + diagonal only")
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--evaluation", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill", choices=["mse", "cosine"], default="cosine",
                    help="calibration loss for costs, choice, healing and the measured loss (cosine: the metric's own)")
    ap.add_argument("--random-seeds", type=int, default=10)
    ap.add_argument("--rank-plans", type=int, default=50, help="random plans for predicted-vs-measured")
    ap.add_argument("--heal-steps", type=int, default=100, help="healing steps for every strategy (0: zero-shot only)")
    ap.add_argument("--out", default=str(RESULTS / "eval"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    budgets = [0.8, 0.67] if args.quick else [0.9, 0.8, 0.67, 0.5]
    # "geo" is the product's pipeline (exact GGN pair costs -> candidates -> measured choice);
    # "geo-solver" is the cost model's optimum alone, other backends' optima are geo-<backend>
    backends = ["exact", "diagonal"] if args.quick else ["exact", "projected", "diagonal", "layerwise"]
    random_seeds = 3 if args.quick else args.random_seeds

    global TOKENIZER
    loaded = load_model("minilm")
    model, TOKENIZER = loaded.model.float().eval(), loaded.tokenizer
    calib, eval_sents = split(args.calibration, args.evaluation, args.seed)
    ref_emb = embed(model, TOKENIZER, eval_sents)
    t0 = time.perf_counter()
    problems = {b: costs_for(b, model, calib, args.calibration, args.seed, args.distill) for b in backends}
    yardstick = problems["exact"]  # predicted figures and the baselines' class allocation
    distances = weight_distances(model, yardstick)
    rows = []
    names = ["geo", "geo-solver", *(f"geo-{b}" for b in backends if b != "exact")]
    cells = [(r, s) for r in budgets for s in [*names, "weight-distance", *HEURISTICS, "random"]]
    for ratio, strategy in tqdm(cells, desc="plans"):
        config = SolveConfig(max_params_ratio=ratio, time_limit_s=10, seed=args.seed)
        if strategy == "geo":
            # the product's pipeline: candidates (optimum + patterns under the exact costs), the
            # one with the least measured loss on the calibration sentences wins
            pool = candidate_plans(problems["exact"], config)
            plans = [choose_plan(model, calib, pool, AnalyzeConfig(distill=args.distill, progress=False), tokenizer=TOKENIZER).plan]
        elif strategy.startswith("geo"):
            backend = "exact" if strategy == "geo-solver" else strategy.removeprefix("geo-")
            plans = [solve(problems[backend], config)]
        elif strategy == "weight-distance":
            plans = [baseline(yardstick, strategy, config, distances=distances)]
        elif strategy == "random":
            plans = [baseline(yardstick, "random", config, seed=s) for s in range(random_seeds)]
        else:
            plans = [baseline(yardstick, strategy, config)]
        plans = [p for p in plans if p.status.value != "infeasible"]
        if not plans:
            continue  # e.g. all-share cannot meet a loose budget exactly and is not reported there
        heal_steps = 0 if args.quick else args.heal_steps
        measured = [measure(p, model, eval_sents, ref_emb, calib, heal_steps, args.distill) for p in plans]
        for regime in measured[0]:
            rows.append(
                {
                    "ratio": ratio,
                    "regime": regime,
                    "strategy": strategy,
                    "measured": float(np.mean([m[regime][0] for m in measured])),
                    "loss": float(np.mean([m[regime][1] for m in measured])),
                    "predicted": float(np.mean([objective(yardstick, p.coloring) for p in plans])),
                    "unique_params": int(np.mean([p.params.shared for p in plans])),
                    "params_ratio": float(np.mean([p.params.ratio for p in plans])),
                }
            )
    agreement = rank_agreement(problems, model, eval_sents, 10 if args.quick else args.rank_plans, args.seed, args.distill)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}",
        "calibration": args.calibration,
        "evaluation": args.evaluation,
        "seconds": round(time.perf_counter() - t0, 1),
        "heal_steps": 0 if args.quick else args.heal_steps,
        "distill": args.distill,
    }
    result = {
        "minilm": {"metric": "embedding cosine to the original", "higher_is_better": True, "results": rows,
                   "rank_agreement": agreement},
        "meta": meta,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.parent / f"{out.name}-minilm.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Evaluation", "", f"Command: `{meta['command']}`  ", f"{meta['machine']}; {meta['calibration']} calibration / {meta['evaluation']} evaluation sentences; calibration loss {meta.get('distill', 'mse')}; {meta['seconds']} s", ""]
    for model, data in result.items():
        if model == "meta":
            continue
        rows = data["results"]
        ratios = sorted({r["ratio"] for r in rows}, reverse=True)
        strategies = list(dict.fromkeys(r["strategy"] for r in rows))
        for regime in sorted({r["regime"] for r in rows}):
            lines += [f"## {model}: {data['metric']} ({regime}; higher is better)", "", "| strategy | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
            for s in strategies:
                cells = []
                for r in ratios:
                    hit = [x for x in rows if x["strategy"] == s and x["ratio"] == r and x["regime"] == regime]
                    cells.append(f"{hit[0]['measured']:.3f}" if hit else "")
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines.append("")
        agreement = data.get("rank_agreement")
        if agreement:
            lines += [f"### {model}: predicted vs measured loss change, {agreement['plans']} random plans (budgets 0.8-0.95)", "",
                      "| backend | Spearman |", "|---|---|"]
            lines += [f"| {b} | {v:.3f} |" for b, v in agreement["spearman"].items()]
            lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = result["minilm"]
    regimes = sorted({r["regime"] for r in data["results"]}, reverse=True)
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.5), dpi=120, squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        for s in dict.fromkeys(r["strategy"] for r in data["results"]):
            pts = sorted((r["ratio"], r["measured"]) for r in data["results"] if r["strategy"] == s and r["regime"] == regime)
            style = "-o" if s.startswith("geo") else "--."
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=s, lw=2 if s == "geo" else 1)
        ax.set_xlabel("share of shareable parameters kept")
        ax.set_ylabel(data["metric"])
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"MiniLM, {regime} (mean merge)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


TOKENIZER = None

if __name__ == "__main__":
    main()
