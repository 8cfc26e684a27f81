"""The kfac backend against `exact` on MiniLM and the byte-level GPT: times and rank agreement.

For each task (bench/tasks: MiniLM with its cosine distillation loss, the GPT with KL), on the
task's calibration split and with the settings of bench/evaluate.py's ``costs_for`` (pairwise
costs, batch size 8, the task's ``distill`` loss, seed 0), in one run:
- each variant's time for all pair costs (warm: the median of ``--repeats`` rounds after a cold
  one; the rounds interleave the variants, so a slow spell of the shared machine falls on all of
  them alike) and its ratio to exact's,
- the Spearman rank correlation of its pair costs with exact's, over all same-family pairs and per
  family (hessian_worker.ranking's ``spearman``).

Variants: exact (the reference: one forward-mode GGN quadratic form per pair), kfac with the whole
input factor (``rank=None``) and with the default rank 64 (+64 oversampled sketch columns), both
with the sampled diagonal output factor, kfac with the whole input factor and the identity output
factor (B = 2I, no backward pass), and the layerwise and projected backends for context.

The kfac output factor is Monte Carlo (one sampled pseudo-loss gradient per output row), so the
diagonal variants are also run at seeds 0..``--seeds``-1 (the seed also draws the rank-64 sketch):
mean ± sd of their Spearman; the seeds' mean cost matrix is K-FAC with that many times the draws
(the costs are linear in B).

Diagnostics, once each:
- exact-blockdiag: exact's GGN without the blocks between layers, priced from `exact` assignment
  costs M[a][b] = ½ q_a(W_b − W_a) as (M[a][b] + M[b][a]) / 4. Every per-layer backend (kfac,
  layerwise, projected's quad_pairs) prices pairs this way, so its Spearman against exact bounds
  what the per-layer structure alone can reach, and kfac against it isolates the Kronecker / Monte
  Carlo / diagonal-B approximation.
- the scale: the median over pairs of kfac's cost over exact-blockdiag's (1 for a factorization in
  loss units), and kfac-identity against layerwise (the same form 2·tr(D A Dᵀ) by construction).

    python bench/kfac_bench.py [--tasks minilm gpt] [--repeats 2] [--seeds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.tasks.base import Task
from hessian_worker import AnalyzeConfig, analyze
from hessian_worker.ranking import spearman
from solver import SharingProblem

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {
    "exact": {"backend": "exact"},
    "kfac-whole": {"backend": "kfac", "kfac": {"rank": None}},
    "kfac": {"backend": "kfac"},
    "kfac-whole-identity": {"backend": "kfac", "kfac": {"rank": None, "output": "identity"}},
    "layerwise": {"backend": "layerwise"},
    "projected": {"backend": "projected"},
}
SEEDED = ("kfac", "kfac-whole")  # Monte-Carlo output factor: the seed spread


def load(name: str) -> Task:
    if name == "minilm":
        from bench.tasks.minilm import minilm_task

        return minilm_task()
    if name == "gpt":
        from bench.tasks.gpt import gpt_task

        return gpt_task()
    raise ValueError(f"unknown task {name!r}: use minilm or gpt")


def config_for(task: Task, options: dict[str, Any], seed: int, kind: str = "pairwise") -> AnalyzeConfig:
    """bench/evaluate.py's ``costs_for`` settings, plus the variant's options."""
    return AnalyzeConfig(kind=kind, seed=seed, batch_size=8, distill=task.distill, progress=False, **options)


def run(task: Task, config: AnalyzeConfig) -> tuple[SharingProblem, float]:
    t = time.perf_counter()
    problem = analyze(copy.deepcopy(task.model), task.calibration, config, tokenizer=task.tokenizer)
    return problem, time.perf_counter() - t


def family_pairs(problem: SharingProblem) -> dict[str, list[tuple[int, int]]]:
    layers = problem.layers
    families = sorted({x.family for x in layers})
    return {f: [(a, b) for a in range(len(layers)) for b in range(a + 1, len(layers))
                if layers[a].family == layers[b].family == f] for f in families}


def agreement(matrix: list[list[float | None]], reference: list[list[float | None]],
              pairs: dict[str, list[tuple[int, int]]]) -> dict[str, Any]:
    """Spearman of ``matrix``'s pair costs with ``reference``'s: over all pairs and per family."""
    every = [p for ps in pairs.values() for p in ps]
    return {
        "all": spearman([matrix[a][b] for a, b in every], [reference[a][b] for a, b in every]),
        "per_family": {f: spearman([matrix[a][b] for a, b in ps], [reference[a][b] for a, b in ps])
                       for f, ps in pairs.items()},
    }


def scale(matrix: list[list[float | None]], reference: list[list[float | None]],
          pairs: dict[str, list[tuple[int, int]]]) -> dict[str, float]:
    """Per family, the median over its pairs of matrix / reference."""
    return {f: float(np.median([matrix[a][b] / reference[a][b] for a, b in ps if reference[a][b]]))
            for f, ps in pairs.items()}


def mean_matrix(matrices: list[list[list[float | None]]]) -> list[list[float | None]]:
    n = len(matrices[0])
    return [[None if matrices[0][i][j] is None else float(np.mean([m[i][j] for m in matrices]))
             for j in range(n)] for i in range(n)]


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def bench_task(name: str, repeats: int, seeds: int) -> dict[str, Any]:
    task = load(name)
    configs = {v: config_for(task, options, 0) for v, options in VARIANTS.items()}
    problems: dict[str, SharingProblem] = {}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(1 + repeats):
        for v, config in configs.items():
            problems[v], seconds = run(task, config)
            times[v].append(seconds)
        print(f"{name} round {round_}:", {v: round(ts[-1], 2) for v, ts in times.items()}, flush=True)
    pairs = family_pairs(problems["exact"])
    exact = problems["exact"].costs.matrix
    rows: dict[str, dict[str, Any]] = {}
    for v, ts in times.items():
        warm = ts[1:] or ts
        rows[v] = {"options": VARIANTS[v], "seconds": statistics.median(warm), "cold_seconds": ts[0], "warm_runs": warm,
                   **{f"spearman_{k}": s for k, s in agreement(problems[v].costs.matrix, exact, pairs).items()}}
    for row in rows.values():
        row["vs_exact_time"] = row["seconds"] / rows["exact"]["seconds"]

    # the Monte-Carlo output factor: seeds 0..seeds-1 (seed 0 is the rounds' run)
    seeded: dict[str, Any] = {}
    for v in SEEDED:
        matrices = [problems[v].costs.matrix]
        for seed in range(1, seeds):
            problem, _ = run(task, config_for(task, VARIANTS[v], seed))
            matrices.append(problem.costs.matrix)
        per_seed = [agreement(m, exact, pairs) for m in matrices]
        seeded[v] = {
            "seeds": list(range(seeds)),
            "all": [a["all"] for a in per_seed],
            "per_family": {f: [a["per_family"][f] for a in per_seed] for f in pairs},
            "all_spread": spread([a["all"] for a in per_seed]),
            "per_family_spread": {f: spread([a["per_family"][f] for a in per_seed]) for f in pairs},
            "seed_mean_matrix": agreement(mean_matrix(matrices), exact, pairs),
            "seed_to_seed": spread([agreement(matrices[i], matrices[j], pairs)["all"]
                                    for i in range(len(matrices)) for j in range(i + 1, len(matrices))]),
        }
        print(f"{name} {v} seeds:", [round(x, 3) for x in seeded[v]["all"]], flush=True)

    # exact without the curvature between layers, from the assignment costs
    assignment, blockdiag_seconds = run(task, config_for(task, VARIANTS["exact"], 0, kind="assignment"))
    m = assignment.costs.matrix
    blockdiag = [[None if m[i][j] is None else (m[i][j] + m[j][i]) / 4 for j in range(len(m))] for i in range(len(m))]
    diagnostics = {
        "exact_blockdiag_seconds": blockdiag_seconds,
        "exact_blockdiag_vs_exact": agreement(blockdiag, exact, pairs),
        "vs_exact_blockdiag": {v: agreement(problems[v].costs.matrix, blockdiag, pairs) for v in VARIANTS},
        "scale_vs_exact_blockdiag": {v: scale(problems[v].costs.matrix, blockdiag, pairs) for v in VARIANTS if v != "layerwise"},
        "kfac_whole_identity_vs_layerwise": {
            **agreement(problems["kfac-whole-identity"].costs.matrix, problems["layerwise"].costs.matrix, pairs),
            "ratio": scale(problems["kfac-whole-identity"].costs.matrix, problems["layerwise"].costs.matrix, pairs),
        },
    }
    print(f"{name} exact-blockdiag vs exact: {diagnostics['exact_blockdiag_vs_exact']['all']:.3f}", flush=True)
    n_layers = len(problems["exact"].layers)
    return {
        "task": name, "distill": task.distill, "calibration": len(task.calibration), "layers": n_layers,
        "pairs": sum(len(ps) for ps in pairs.values()), "families": {f: len(ps) for f, ps in pairs.items()},
        "variants": rows, "seeds": seeded, "diagnostics": diagnostics,
    }


def short(family: str) -> str:
    return family.removesuffix(".weight")


def fmt_family(values: dict[str, float]) -> str:
    return ", ".join(f"{short(f)}: {v:.2f}" for f, v in values.items())


def markdown(meta: dict[str, Any], tasks: dict[str, dict[str, Any]]) -> str:
    lines = ["# kfac backend against exact", "", f"Command: `{meta['command']}`  ", f"{meta['machine']}", ""]
    for name, r in tasks.items():
        lines += [f"## {name} ({r['distill']} distillation, {r['calibration']} calibration samples, "
                  f"{r['layers']} layers, {r['pairs']} same-family pairs)", "",
                  "| variant | options | all pairs s, warm median (cold) | time / exact | Spearman vs exact, all pairs | per family |",
                  "|---|---|---|---|---|---|"]
        for v, row in r["variants"].items():
            opts = ", ".join(f"{k}={val}" for k, val in row["options"].items() if k != "backend") or "defaults"
            lines.append(f"| {v} | {opts} | {row['seconds']:.2f} ({row['cold_seconds']:.2f}) | {row['vs_exact_time']:.3f} | "
                         f"{row['spearman_all']:.2f} | {fmt_family(row['spearman_per_family'])} |")
        lines += ["", f"Seed spread of the Monte-Carlo output factor (seeds {r['seeds']['kfac']['seeds'][0]}.."
                  f"{r['seeds']['kfac']['seeds'][-1]}, mean ± sd of the Spearman against exact; the seeds' mean "
                  "cost matrix = K-FAC with that many times the draws):", "",
                  "| variant | all pairs | per family | mean matrix, all | mean matrix, per family | seed vs seed, all |",
                  "|---|---|---|---|---|---|"]
        for v, s in r["seeds"].items():
            fam = ", ".join(f"{short(f)}: {x['mean']:.2f} ± {x['sd']:.2f}" for f, x in s["per_family_spread"].items())
            lines.append(f"| {v} | {s['all_spread']['mean']:.3f} ± {s['all_spread']['sd']:.3f} | {fam} | "
                         f"{s['seed_mean_matrix']['all']:.2f} | {fmt_family(s['seed_mean_matrix']['per_family'])} | "
                         f"{s['seed_to_seed']['mean']:.3f} ± {s['seed_to_seed']['sd']:.3f} |")
        d = r["diagnostics"]
        lines += ["", f"exact-blockdiag (exact without the curvature between layers; {d['exact_blockdiag_seconds']:.1f} s "
                  f"for the assignment costs) vs exact: all {d['exact_blockdiag_vs_exact']['all']:.2f}; "
                  f"{fmt_family(d['exact_blockdiag_vs_exact']['per_family'])}.", "",
                  "| variant | Spearman vs exact-blockdiag, all | per family | median cost / exact-blockdiag's, per family |",
                  "|---|---|---|---|"]
        for v, a in d["vs_exact_blockdiag"].items():
            sc = d["scale_vs_exact_blockdiag"].get(v)
            lines.append(f"| {v} | {a['all']:.2f} | {fmt_family(a['per_family'])} | "
                         f"{', '.join(f'{short(f)}: {x:.3g}' for f, x in sc.items()) if sc else '-'} |")
        li = d["kfac_whole_identity_vs_layerwise"]
        lines += ["", f"kfac-whole-identity vs layerwise (the same form by construction): Spearman {li['all']:.3f}; "
                  f"median ratio per family {', '.join(f'{short(f)}: {x:.4g}' for f, x in li['ratio'].items())}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["minilm", "gpt"], choices=["minilm", "gpt"])
    parser.add_argument("--repeats", type=int, default=2, help="warm rounds after the cold one (median reported)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 of the kfac variants with sampled output factors")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine has 2, shared)")
    parser.add_argument("--out", default="kfac_bench", help="results/<out>.{json,md}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = {name: bench_task(name, args.repeats, args.seeds) for name in args.tasks}
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "tasks": tasks}, indent=2))
    text = markdown(meta, tasks)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
