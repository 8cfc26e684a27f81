"""Curvature backends on MiniLM: cost of a pair quadratic form, backend times, rank agreement.

Reports, in one run on the same 16 calibration sentences (bench/corpus.py):
- the time of one forward+backward of the calibration loss (the baseline),
- each backend's time to produce all pair costs of all six families, and per pair,
- the Spearman rank correlation of each backend's pair costs with `exact`'s, per family.

    python bench/curvature_bench.py
"""

from __future__ import annotations

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
from bench.evaluate import spearman
from hessian_worker import AnalyzeConfig, analyze, load_model

RESULTS = Path(__file__).resolve().parent / "results"


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


def main() -> None:
    loaded = load_model("minilm")
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    calib, _ = split(16, 0, seed=0)
    t_fb = forward_backward_time(copy.deepcopy(model), tokenizer, calib)
    rows, problems = {}, {}
    for backend in ("exact", "projected", "diagonal", "layerwise"):
        config = AnalyzeConfig(backend=backend, batch_size=16, seed=0, progress=False)
        t = time.perf_counter()
        problems[backend] = analyze(copy.deepcopy(model), calib, config, tokenizer=tokenizer)
        rows[backend] = {"seconds": time.perf_counter() - t}
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
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}, {torch.get_num_threads()} threads",
        "forward_backward_s": t_fb,
        "pairs": n_pairs,
        "calibration_sentences": len(calib),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "curvature_bench.json").write_text(json.dumps({"meta": meta, "backends": rows}, indent=2))
    lines = ["# Curvature backends on MiniLM", "", f"Command: `{meta['command']}`  ", f"{meta['machine']}; {len(calib)} sentences; one forward+backward {t_fb * 1000:.1f} ms; {n_pairs} pairs", "",
             "| backend | all pairs s | per pair ms | per pair / fwd+bwd | time / exact | Spearman vs exact (per family) |", "|---|---|---|---|---|---|"]
    for b, r in rows.items():
        sp = ", ".join(f"{f.removesuffix('.weight')}: {v:.2f}" for f, v in r["spearman_vs_exact"].items())
        lines.append(f"| {b} | {r['seconds']:.2f} | {1000 * r['per_pair_s']:.1f} | {r['per_pair_vs_forward_backward']:.2f} | {r['vs_exact_time']:.2f} | {sp} |")
    (RESULTS / "curvature_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
