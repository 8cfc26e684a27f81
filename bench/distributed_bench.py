"""Streamed analysis or compress as one torch.distributed job: 1 process against N (torchrun, gloo
on CPU) on the same LLaMA-shaped checkpoint and tokens, measured in the same run.

Both use the same cores: one process with ``--threads`` torch threads against N processes with
threads // N each, so on a small machine the figure is what data parallelism costs or saves at
equal compute, not a scaling curve (that needs more cores or devices than one process uses). It
reports wall time, the largest process's peak RSS, rank 0's phases (statistics / factors /
pricing), the largest relative difference between the two cost matrices, and whether the solver
gives both the same plan. ``--stage compress`` runs ``geoshare compress`` instead (optionally
healed) and adds the chosen plans, the held-out figures and the largest relative difference between
the two saved models' tensors.

    python bench/distributed_bench.py --shape 1b --samples 32 --length 128 --procs 2 --threads 2
    python bench/distributed_bench.py --stage compress --shape 1b --depth 4 --samples 16 --length 128 \
        --heal 8 --dtype float32 --procs 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale_bench import _commit, prepare  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAME = "distributed_bench"


def warm(folder: Path) -> None:
    """Reads the checkpoint once so neither run pays for a cold page cache."""
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as f:
            while f.read(64 * 1024**2):
                pass


def analyze(folder: Path, data: Path, out: Path, procs: int, threads: int, batch_size: int) -> dict:
    """One ``geoshare analyze`` (under torchrun when ``procs`` > 1), timed; its problem's source."""
    flags = ["-m", "geoshare", "analyze", "--model", str(folder), "--data", str(data), "--ratio", "0.8",
             "--batch-size", str(batch_size), "--no-stats-cache", "--quiet", "--device", "cpu", "-o", str(out)]
    launcher = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
        "--master-port", str(29500 + os.getpid() % 1000)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = timed([*launcher, *flags], env)
    source = json.loads(out.read_text())["source"]
    return {"procs": procs, "threads_per_proc": threads, **result, "phases_s": source.get("seconds", {}),
            "rank_samples": source.get("rank_samples"), "command": " ".join(["python", *launcher[1:], *flags])}


def compress(folder: Path, data: Path, out: Path, procs: int, threads: int, batch_size: int, heal: int,
             dtype: str | None) -> dict:
    """One ``geoshare compress`` (under torchrun when ``procs`` > 1), timed; its phases and figures."""
    flags = ["-m", "geoshare", "compress", "--model", str(folder), "--data", str(data), "--ratio", "0.8",
             "--batch-size", str(batch_size), "--heal", str(heal), "--heal-lr", "1e-3", "--no-stats-cache",
             "--quiet", "--device", "cpu", "--out", str(out), *(["--dtype", dtype] if dtype else [])]
    launcher = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
        "--master-port", str(29500 + os.getpid() % 1000)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    shutil.rmtree(out, ignore_errors=True)
    result = timed([*launcher, *flags], env)
    source = json.loads((out / "problem.json").read_text())["source"]
    report = json.loads((out / "report.json").read_text())
    return {"procs": procs, "threads_per_proc": threads, **result, "phases_s": source.get("seconds", {}),
            "rank_samples": source.get("rank_samples"), "held_out": report["measured_loss_change"],
            "candidates": len(report["candidates"]), "command": " ".join(["python", *launcher[1:], *flags])}


def compare_models(one: Path, many: Path) -> dict:
    """The same plan (plan.json groups) and the largest |a - b| / max|a| over the saved tensors."""
    from safetensors.torch import load_file

    plans = [json.loads((d / "plan.json").read_text()) for d in (one, many)]
    groups = [p.get("plan", p).get("groups") for p in plans]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(many / "model.safetensors"))
    worst = max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-30))
                for k in a) if sorted(a) == sorted(b) else None
    return {"same_plan": groups[0] == groups[1], "max_rel_tensor_diff": worst}


def timed(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall seconds and the largest process's peak RSS (GiB, /usr/bin/time -v) of a command."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(rss_kb / 1024**2, 3)}


def compare(one: Path, many: Path) -> dict:
    """The largest relative cost difference and whether the solver gives both problems one plan."""
    from solver import SolveConfig, solve
    from solver.schema import SharingProblem

    a = SharingProblem.model_validate_json(one.read_text())
    b = SharingProblem.model_validate_json(many.read_text())
    worst = 0.0
    for row_a, row_b in zip(a.costs.matrix, b.costs.matrix, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            if (x is None) != (y is None):
                return {"max_rel_diff": None, "same_plan": False}
            if x is not None and max(abs(x), abs(y)) > 0:
                worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    config = SolveConfig(max_params_ratio=0.8, time_limit_s=30, seed=0)
    return {"max_rel_diff": worst, "same_plan": solve(a, config).coloring == solve(b, config).coloring}


def run_compress(shape: str, depth: int | None, samples: int, length: int, batch_size: int, procs: int,
                 threads: int, heal: int, dtype: str | None) -> dict:
    folder, data = prepare(shape, depth, samples, length)
    warm(folder)
    one, many = folder / "compressed-1", folder / f"compressed-{procs}"
    single = compress(folder, data, one, 1, threads, batch_size, heal, dtype)
    parallel = compress(folder, data, many, procs, max(threads // procs, 1), batch_size, heal, dtype)
    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    costs = compare(one / "problem.json", many / "problem.json")
    held = abs(single["held_out"] - parallel["held_out"]) / max(abs(single["held_out"]), 1e-30)
    return {"stage": "compress", "shape": shape, "blocks": blocks, "samples": samples, "length": length,
            "batch_size": batch_size, "heal": heal, "dtype": dtype or "auto", "one": single, "many": parallel,
            "speedup": round(single["wall_s"] / parallel["wall_s"], 3), "max_rel_diff": costs["max_rel_diff"],
            "held_out_rel_diff": held, **compare_models(one, many)}


def run(shape: str, samples: int, length: int, batch_size: int, procs: int, threads: int) -> dict:
    folder, data = prepare(shape, None, samples, length)
    warm(folder)
    one, many = folder / "problem-1.json", folder / f"problem-{procs}.json"
    single = analyze(folder, data, one, 1, threads, batch_size)
    parallel = analyze(folder, data, many, procs, max(threads // procs, 1), batch_size)
    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    return {"stage": "analyze", "shape": shape, "blocks": blocks, "samples": samples, "length": length, "batch_size": batch_size,
            "one": single, "many": parallel, "speedup": round(single["wall_s"] / parallel["wall_s"], 3),
            **compare(one, many)}


def write(row: dict, argv: list[str], note: str | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{NAME}.json"
    existing = json.loads(path.read_text()) if path.is_file() else {"sessions": []}
    existing["sessions"].append({"command": "python bench/distributed_bench.py " + " ".join(argv),
                                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                 "commit": _commit(), "note": note, "runs": [row]})
    path.write_text(json.dumps(existing, indent=2))
    render(existing)


def render(existing: dict) -> None:
    """bench/results/distributed_bench.md from the sessions of the .json."""
    lines = ["# Streamed analysis and compress in one process and as one torchrun job (gloo, CPU)", "",
             "Same checkpoint (random bfloat16 weights), tokens and cores in the same run; wall seconds; RSS is the",
             "largest process's peak. Phases are rank 0's (statistics / factors / pricing).", ""]
    for session in existing["sessions"]:
        if session["runs"][0].get("stage") == "compress":
            lines += _compress_lines(session)
            continue
        lines += [f"`{session['command']}` (commit {session['commit']}, {session['cpus']} CPUs)", "",
                  *([session["note"], ""] if session.get("note") else []),
                  "| shape | blocks | tokens | procs x threads | wall s | peak RSS GiB | phases s | "
                  "speedup vs 1 | max rel cost diff | same plan |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in session["runs"]:
            for side in ("one", "many"):
                s = r[side]
                phases = " / ".join(f"{s['phases_s'][k]:.1f}" for k in ("statistics", "factors", "pricing")
                                    if k in s["phases_s"])
                extra = (f"{r['speedup']} | {r['max_rel_diff']:.2g} | {r['same_plan']}" if side == "many"
                         else "1 | | ")
                lines.append(f"| {r['shape']} | {r['blocks']} | {r['samples']}x{r['length']} | "
                             f"{s['procs']} x {s['threads_per_proc']} | {s['wall_s']} | {s['peak_rss_gib']} | "
                             f"{phases} | {extra} |")
        lines.append("")
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines))


COMPRESS_PHASES = ("statistics", "pricing", "choice", "heal", "held_out", "save")


def _compress_lines(session: dict) -> list[str]:
    lines = [f"`{session['command']}` (commit {session['commit']}, {session['cpus']} CPUs)", "",
             *([session["note"], ""] if session.get("note") else []),
             "Compress phases are rank 0's (" + " / ".join(COMPRESS_PHASES) + ").", "",
             "| shape | blocks | tokens | heal steps | dtype | procs x threads | wall s | peak RSS GiB | phases s | "
             "held-out loss change | speedup vs 1 | max rel cost diff | same plan | max rel tensor diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in session["runs"]:
        for side in ("one", "many"):
            s = r[side]
            phases = " / ".join(f"{s['phases_s'].get(k, 0):.1f}" for k in COMPRESS_PHASES)
            extra = (f"{r['speedup']} | {r['max_rel_diff']:.2g} | {r['same_plan']} | {r['max_rel_tensor_diff']:.2g}"
                     if side == "many" else "1 | | | ")
            lines.append(f"| {r['shape']} | {r['blocks']} | {r['samples']}x{r['length']} | {r['heal']} | "
                         f"{r['dtype']} | {s['procs']} x {s['threads_per_proc']} | {s['wall_s']} | "
                         f"{s['peak_rss_gib']} | {phases} | {s['held_out']:.6g} | {extra} |")
    return [*lines, ""]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["analyze", "compress"], default="analyze")
    parser.add_argument("--shape", choices=["tiny", "1b", "7b"], default="1b")
    parser.add_argument("--depth", type=int, default=None, help="compress: the shape cut to this many blocks")
    parser.add_argument("--heal", type=int, default=0, help="compress: block-wise healing steps")
    parser.add_argument("--dtype", default=None, help="compress: compute dtype (default: the checkpoint's)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--procs", type=int, default=2, help="processes of the torchrun job")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the single process; the job's processes share them")
    parser.add_argument("--note", default=None, help="a line kept with this session's results")
    parser.add_argument("--no-record", action="store_true", help="print only (a smoke run)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args(argv)
    if args.render:
        render(json.loads((RESULTS / f"{NAME}.json").read_text()))
        return 0
    if args.stage == "compress":
        row = run_compress(args.shape, args.depth, args.samples, args.length, args.batch_size, args.procs,
                           args.threads, args.heal, args.dtype)
    else:
        row = run(args.shape, args.samples, args.length, args.batch_size, args.procs, args.threads)
    print(json.dumps(row), flush=True)
    if not args.no_record:
        write(row, argv, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
