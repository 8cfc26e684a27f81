"""Curvature backends on MiniLM: cost of a pair quadratic form, backend times, rank agreement.

Reports, in one run on the same 16 calibration sentences (bench/corpus.py):
- the time of one forward+backward of the calibration loss (the baseline),
- each backend's time to produce all pair costs of all six families, and per pair (warm: the
  median of ``--repeats`` runs after a first, cold one in this process, so torch.func's one-time
  dispatch set-up is not counted and one slow run (page faults of fresh memory vary from run to
  run by up to 30% here) does not decide a ratio; the rounds interleave the backends; the cold
  run's time is reported beside it),
- the Spearman rank correlation of each backend's pair costs with `exact`'s, per family and over
  all pairs.

Variants of `projected`: the product default (Nyström sketch of 12 HVPs, per-layer bulk, rank 8;
the HVPs in bfloat16 where the CPU multiplies it natively, else float32), the same with float32
HVPs, the default at rank 16, and the seed paper's form (Lanczos, one isotropic bulk, rank 16).

Then the same timing (exact against the default projected) on a MiniLM-shaped BERT with more
layers (`--deep`, random weights: a timing, not a ranking), where exact's pair count grows as L²
while projected's sketch stays 12 HVPs.

    python bench/curvature_bench.py [--deep 12] [--repeats 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.corpus import split
from hessian_worker import AnalyzeConfig, analyze, load_model
from hessian_worker.curvature.projected import native_bfloat16
from hessian_worker.ranking import spearman

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, dict] = {
    "exact": {"backend": "exact"},
    "projected": {"backend": "projected"},
    "projected-float32": {"backend": "projected", "sketch_precision": "model"},
    "projected-rank16": {"backend": "projected", "rank": 16},
    "projected-paper": {"backend": "projected", "rank": 16, "eigensolver": "lanczos", "bulk": "isotropic"},
    "diagonal": {"backend": "diagonal"},
    "layerwise": {"backend": "layerwise"},
}


def forward_backward_time(model, tokenizer, sentences: list[str], repeats: int = 5) -> float:
    """Median seconds of one forward+backward of an MSE-to-embeddings loss on the whole batch."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        target = model(**batch).last_hidden_state.mean(1) + 0.01
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = ((model(**batch).last_hidden_state.mean(1) - target) ** 2).mean()
        loss.backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def deep_timing(loaded, calib: list[str], layers: int) -> dict:
    """Exact vs default projected on a randomly initialized MiniLM-shaped BERT with ``layers`` layers."""
    config = copy.deepcopy(loaded.model.config)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = type(loaded.model)(config).float().eval()
    row = {"layers": layers}
    for name in ("exact", "projected"):
        # twice MiniLM's shareable parameters: the sketch needs about 4.1 GiB, over the 4 GiB default
        cfg = AnalyzeConfig(batch_size=16, seed=0, progress=False, memory_limit_gb=8.0, **VARIANTS[name])
        t = time.perf_counter()
        problem = analyze(copy.deepcopy(model), calib, cfg, tokenizer=loaded.tokenizer)
        row[f"{name}_s"] = time.perf_counter() - t
    fams = [x.family for x in problem.layers]
    row["pairs"] = sum(fams.count(f) * (fams.count(f) - 1) // 2 for f in set(fams))
    row["projected_vs_exact"] = row["projected_s"] / row["exact_s"]
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deep", type=int, default=12, help="layers of the deeper timing model (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per backend after the cold one (median reported)")
    args = parser.parse_args()
    loaded = load_model("minilm")
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    calib, _ = split(16, 0, seed=0)
    t_fb = forward_backward_time(copy.deepcopy(model), tokenizer, calib)
    configs = {name: AnalyzeConfig(batch_size=16, seed=0, progress=False, **options) for name, options in VARIANTS.items()}
    problems, times = {}, {name: [] for name in VARIANTS}
    # rounds interleave the variants, so a slow spell of the machine falls on all of them alike
    for round_ in range(1 + args.repeats):
        for name, config in configs.items():
            t = time.perf_counter()
            problems[name] = analyze(copy.deepcopy(model), calib, config, tokenizer=tokenizer)
            times[name].append(time.perf_counter() - t)
        print(f"round {round_}:", {name: round(ts[-1], 2) for name, ts in times.items()}, flush=True)
    rows = {name: {"options": VARIANTS[name], "seconds": statistics.median(ts[1:]), "cold_seconds": ts[0],
                   "warm_runs": ts[1:]} for name, ts in times.items()}
    layers = problems["exact"].layers
    families = sorted({x.family for x in layers})
    pairs = {f: [(a, b) for a in range(len(layers)) for b in range(a + 1, len(layers)) if layers[a].family == layers[b].family == f] for f in families}
    n_pairs = sum(len(v) for v in pairs.values())
    for backend, row in rows.items():
        row["per_pair_s"] = row["seconds"] / n_pairs
        row["per_pair_vs_forward_backward"] = row["per_pair_s"] / t_fb
        row["vs_exact_time"] = row["seconds"] / rows["exact"]["seconds"]
        m, e = problems[backend].costs.matrix, problems["exact"].costs.matrix
        row["spearman_vs_exact"] = {f: spearman([m[a][b] for a, b in ps], [e[a][b] for a, b in ps]) for f, ps in pairs.items()}
        every = [p for ps in pairs.values() for p in ps]
        row["spearman_vs_exact_all_pairs"] = spearman([m[a][b] for a, b in every], [e[a][b] for a, b in every])
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}, {torch.get_num_threads()} threads, "
                   f"native bfloat16: {native_bfloat16(torch.device('cpu'))}",
        "forward_backward_s": t_fb,
        "pairs": n_pairs,
        "calibration_sentences": len(calib),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    deep = deep_timing(loaded, calib, args.deep) if args.deep else None
    (RESULTS / "curvature_bench.json").write_text(json.dumps({"meta": meta, "backends": rows, "deep": deep}, indent=2))
    lines = ["# Curvature backends on MiniLM", "", f"Command: `{meta['command']}`  ", f"{meta['machine']}; {len(calib)} sentences; one forward+backward {t_fb * 1000:.1f} ms; {n_pairs} pairs", "",
             "| backend | options | all pairs s, warm median (cold) | per pair ms | per pair / fwd+bwd | time / exact | Spearman vs exact, all pairs | per family |", "|---|---|---|---|---|---|---|---|"]
    for b, r in rows.items():
        sp = ", ".join(f"{f.removesuffix('.weight')}: {v:.2f}" for f, v in r["spearman_vs_exact"].items())
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "backend") or "defaults"
        lines.append(f"| {b} | {opts} | {r['seconds']:.2f} ({r['cold_seconds']:.2f}) | {1000 * r['per_pair_s']:.1f} | {r['per_pair_vs_forward_backward']:.2f} | {r['vs_exact_time']:.2f} | {r['spearman_vs_exact_all_pairs']:.2f} | {sp} |")
    if deep:
        lines += ["", f"MiniLM-shaped BERT with {deep['layers']} layers (random weights, timing only): {deep['pairs']} pairs; "
                  f"exact {deep['exact_s']:.1f} s, projected {deep['projected_s']:.1f} s, projected / exact "
                  f"{deep['projected_vs_exact']:.2f}."]
    (RESULTS / "curvature_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
