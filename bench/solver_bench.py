"""Solver benchmark: proven optimality up to 16 layers, quality at 24-48 layers.

Compares, on the same instances in one run: Geo-Sharing's solve (at the request time limits),
naive CP-SAT (whole problem, class-slot model, no hints), agglomerative merging alone and
contiguous interval DP alone. The reference for 24-48 layers is the best value any method finds,
Geo-Sharing included with a long (default 10-minute) run.

    python bench/solver_bench.py                      # full run (about 45 minutes on 2 cores)
    python bench/solver_bench.py --reference-time 60  # shorter reference
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from bench.instances import make_problem
from bench.methods import Result, agglomerative_alone, geo, interval_alone, naive_cpsat, rel

RESULTS = Path(__file__).resolve().parent / "results"

EXACT = [([12] * 6, 0.5), ([12] * 6, 0.75), ([16] * 4, 0.5), ([16] * 4, 0.67)]
LARGE = [([24, 24], 0.5, "curvature"), ([36], 0.5, "curvature"), ([48], 0.5, "curvature"), ([48], 0.67, "uniform")]


def _row(name: str, r: Result, ref: float | None = None) -> dict:
    d = {"instance": name, "method": r.method, "objective": r.objective, "bound": r.bound, "time_s": round(r.time_s, 3), "status": r.status}
    if r.bound is not None and r.objective:
        d["gap"] = max(0.0, r.objective - r.bound) / abs(r.objective)
    if ref is not None:
        d["vs_reference"] = rel(r.objective, ref)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-time", type=float, default=600.0)
    ap.add_argument("--limits", type=float, nargs="+", default=[10.0, 30.0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "solver_bench"))
    args = ap.parse_args()
    rows: list[dict] = []
    t0 = time.perf_counter()

    for sizes, ratio in tqdm(EXACT, desc="exact (<=16 layers)"):
        name = f"{len(sizes)}x{sizes[0]} ratio={ratio}"
        p = make_problem(sizes, seed=len(sizes) * sizes[0], ratio=ratio, workers=args.workers)
        rows.append(_row(name, geo(p, 10.0)) | {"part": "exact", "limit_s": 10.0})

    for sizes, ratio, shape in tqdm(LARGE, desc="large (24-48 layers)"):
        name = f"{'+'.join(map(str, sizes))} {shape} ratio={ratio}"
        p = make_problem(sizes, seed=sum(sizes), ratio=ratio, shape=shape, workers=args.workers)
        results = [geo(p, lim) for lim in args.limits]
        for r, lim in zip(results, args.limits, strict=True):
            r.method = f"geo-sharing@{lim:g}s"
        results += [agglomerative_alone(p), interval_alone(p), naive_cpsat(p, max(args.limits), args.workers)]
        results[-1].method = f"naive-cpsat@{max(args.limits):g}s"
        refrun = geo(p, args.reference_time)
        refrun.method = f"geo-sharing@{args.reference_time:g}s (reference run)"
        results.append(refrun)
        ref = min(r.objective for r in results if r.objective is not None and math.isfinite(r.objective))
        rows += [_row(name, r, ref) | {"part": "large", "reference": ref} for r in results]

    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}",
        "cores_used": args.workers,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(_markdown(meta, rows))
    print(_markdown(meta, rows))


def _fmt(v, spec=".4g") -> str:
    return "" if v is None else format(v, spec)


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# Solver benchmark", "", f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, {meta['cores_used']} workers, total {meta['total_s']} s", ""]
    lines += ["## Up to 16 layers per family (10 s limit)", "", "| instance | status | objective | bound | gap | time s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "exact":
            lines.append(f"| {r['instance']} | {r['status']} | {_fmt(r['objective'])} | {_fmt(r['bound'])} | {_fmt(r.get('gap'), '.2e')} | {r['time_s']} |")
    lines += ["", "## 24-48 layers per family", "", "| instance | method | objective | vs best found | bound | gap | time s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "large":
            vs = r.get("vs_reference")
            lines.append(
                f"| {r['instance']} | {r['method']} | {_fmt(r['objective'])} | {'' if vs is None else f'{100 * vs:+.2f}%'} | {_fmt(r['bound'])} | {_fmt(r.get('gap'), '.3f')} | {r['time_s']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
