"""LLM scale on one device: streamed analysis of LLaMA-architecture checkpoints against a plain
streamed forward pass over the same tokens, with peak memory.

For each shape it writes a random-weight checkpoint shard by shard (bfloat16; a 7B-shaped one never
sits in memory whole) and random calibration tokens, then measures in separate processes (so each
peak RSS is its own, read by ``/usr/bin/time -v``):
- the baseline: one forward pass over the tokens with the model loaded the same way (block by block
  from the checkpoint, embeddings to logits),
- ``geoshare analyze`` with the default backend for such models (kfac, streamed), or with
  ``--compress RATIO`` ``geoshare compress`` (streamed: statistics, measured choice, tie, save),
and reports the ratio of their wall times, seconds per block, and peak RSS. ``--depths`` runs the
same shape cut to fewer blocks, to show time growing linearly with depth.

    python bench/scale_bench.py --shape 1b --samples 32 --length 128
    python bench/scale_bench.py --shape 7b --depths 8 16 32 --samples 32 --length 128
    python bench/scale_bench.py --shape 1b --samples 32 --length 128 --compress 0.8
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hessian_worker.llm.synthetic import (  # noqa: E402
    SHAPES,
    decoder_config,
    random_tokens,
    write_random_checkpoint,
)

CACHE = ROOT / "bench" / "cache" / "scale"
RESULTS = ROOT / "bench" / "results"
GEOSHARE = str(Path(sys.executable).parent / "geoshare")


def forward_pass(model_dir: str, data: str, batch_size: int) -> None:
    """The baseline: logits for every calibration token, one block in memory at a time."""
    from hessian_worker.data import load_calibration
    from hessian_worker.llm.checkpoint import Checkpoint
    from hessian_worker.llm.decoder import Decoder, run_block

    checkpoint = Checkpoint(model_dir)
    decoder = Decoder(checkpoint, checkpoint.stored_dtype)
    calib = load_calibration(data, batch_size=batch_size)
    with torch.no_grad():
        prepared = [decoder.inputs(b) for b in calib.batches]
        hidden = [h for h, _ in prepared]
        for i in range(decoder.num_blocks):
            block = decoder.load_block(i)
            hidden = [run_block(block, h, kw) for h, (_, kw) in zip(hidden, prepared, strict=True)]
            decoder.release(block)
        for h in hidden:
            decoder.logits(h)


def timed(command: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (GiB) of a command, from /usr/bin/time -v."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(rss_kb / 1024**2, 3)}


def prepare(shape: str, depth: int | None, samples: int, length: int) -> tuple[Path, Path]:
    fields = dict(SHAPES[shape])
    if depth is not None:
        fields["num_hidden_layers"] = depth
    name = f"llama-{shape}-{fields['num_hidden_layers']}"
    folder = CACHE / name
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_random_checkpoint(decoder_config("llama", **fields), folder, dtype=torch.bfloat16,
                                shard_bytes=1024**3, progress=True)
    data = CACHE / f"tokens-{samples}x{length}.pt"
    if not data.is_file():
        torch.save(random_tokens(fields["vocab_size"], samples, length), data)
    return folder, data


def run_compress(shape: str, depth: int | None, samples: int, length: int, batch_size: int, ratio: float) -> dict:
    """``geoshare compress`` streamed against a plain streamed forward over the same tokens: its wall
    time in forwards beside the issue's budget (candidates measured + 5), and its peak RSS."""
    folder, data = prepare(shape, depth, samples, length)
    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    forward = timed([sys.executable, __file__, "--forward-only", str(folder), str(data), str(batch_size)])
    out = folder / "compressed"
    shutil.rmtree(out, ignore_errors=True)
    command = [GEOSHARE, "compress", "--model", str(folder), "--data", str(data), "--ratio", str(ratio),
               "--batch-size", str(batch_size), "--no-stats-cache", "--quiet", "--out", str(out)]
    compressed = timed(command)
    report = json.loads((out / "report.json").read_text())
    phases = json.loads((out / "problem.json").read_text())["source"].get("seconds", {})
    candidates = len(report["candidates"])
    forwards = compressed["wall_s"] / forward["wall_s"]
    on_disk = (out / "model.safetensors").stat().st_size
    shutil.rmtree(out, ignore_errors=True)
    return {"shape": shape, "blocks": blocks, "samples": samples, "length": length, "ratio": ratio,
            "forward": forward, "compress": compressed, "candidates": candidates,
            "compress_in_forwards": round(forwards, 2), "budget_in_forwards": candidates + 5,
            "phases_s": phases, "params_ratio": report["params_ratio"],
            "measured_loss_change": report["measured_loss_change"], "saved_gib": round(on_disk / 1024**3, 3),
            "command": " ".join(["geoshare", *command[1:]])}


def run(shape: str, depth: int | None, samples: int, length: int, batch_size: int) -> dict:
    folder, data = prepare(shape, depth, samples, length)
    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    forward = timed([sys.executable, __file__, "--forward-only", str(folder), str(data), str(batch_size)])
    out = folder / "problem.json"
    analyze_cmd = [GEOSHARE, "analyze", "--model", str(folder), "--data", str(data), "--ratio", "0.8",
                   "--batch-size", str(batch_size), "--no-stats-cache", "--quiet", "-o", str(out)]
    analysis = timed(analyze_cmd)
    solve = timed([GEOSHARE, "solve", str(out), "--time-limit", "30", "-o", str(folder / "plan.json")])
    plan = json.loads((folder / "plan.json").read_text())
    phases = json.loads(out.read_text())["source"].get("seconds", {})
    return {"shape": shape, "blocks": blocks, "samples": samples, "length": length,
            "checkpoint_gib": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1024**3, 3),
            "forward": forward, "analyze": analysis, "solve": solve,
            "analyze_over_forward": round(analysis["wall_s"] / forward["wall_s"], 2),
            "analyze_s_per_block": round(analysis["wall_s"] / blocks, 2),
            "analyze_phases_s": phases,
            "plan_status": plan["status"], "plan_gap": plan.get("gap"),
            "command": " ".join(["geoshare", *analyze_cmd[1:]])}


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def write(rows: list[dict], argv: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "scale_bench"
    payload = {"command": "python bench/scale_bench.py " + " ".join(argv), "machine": platform.processor() or
               platform.machine(), "threads": torch.get_num_threads(), "commit": _commit(), "runs": rows}
    path = RESULTS / f"{name}.json"
    existing = json.loads(path.read_text()) if path.is_file() else {"sessions": []}
    existing.setdefault("sessions", []).append(payload)
    path.write_text(json.dumps(existing, indent=2))
    render(existing)


def render(existing: dict) -> None:
    """bench/results/scale_bench.md from every recorded session (a session's ``note`` is kept)."""
    name = "scale_bench"
    lines = ["# Streamed analysis of LLaMA-shaped checkpoints (random bfloat16 weights)", "",
             "Each block: the command that made it. Times are wall seconds on this machine (2 cores, shared);",
             "the ratio is against a plain streamed forward over the same tokens measured in the same run.", ""]
    for session in existing["sessions"]:
        lines += [f"`{session['command']}`", "", *([session["note"], ""] if session.get("note") else []),
                  "| shape | blocks | tokens | checkpoint GiB | forward s | forward RSS GiB | analyze s | "
                  "analyze RSS GiB | analyze / forward | s per block | statistics / factors / pricing s | solve s | plan |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        runs = [r for r in session["runs"] if "analyze" in r]
        for r in runs:
            lines.append(f"| {r['shape']} | {r['blocks']} | {r['samples']}x{r['length']} | {r['checkpoint_gib']} | "
                         f"{r['forward']['wall_s']} | {r['forward']['peak_rss_gib']} | {r['analyze']['wall_s']} | "
                         f"{r['analyze']['peak_rss_gib']} | {r['analyze_over_forward']} | "
                         f"{r['analyze_s_per_block']} | {_phases(r)} | {r['solve']['wall_s']} | {r['plan_status']} |")
        if not runs:
            del lines[-2:]
        compressed = [r for r in session["runs"] if "compress" in r]
        if compressed:
            lines += ["| shape | blocks | tokens | ratio | forward s | compress s | compress RSS GiB | candidates | "
                      "compress in forwards | budget (candidates + 5) | statistics / pricing / choice / held-out / save s "
                      "| params ratio | held-out loss change | saved GiB |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in compressed:
                p = r["phases_s"]
                phases = " / ".join(f"{p[k]:.0f}" for k in ("statistics", "pricing", "choice", "held_out", "save")
                                    if k in p)
                lines.append(f"| {r['shape']} | {r['blocks']} | {r['samples']}x{r['length']} | {r['ratio']} | "
                             f"{r['forward']['wall_s']} | {r['compress']['wall_s']} | {r['compress']['peak_rss_gib']} | "
                             f"{r['candidates']} | {r['compress_in_forwards']} | {r['budget_in_forwards']} | {phases} | "
                             f"{r['params_ratio']:.3f} | {r['measured_loss_change']:.4g} | {r['saved_gib']} |")
        lines.append("")
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


def _phases(row: dict) -> str:
    p = row.get("analyze_phases_s") or {}
    return " / ".join(f"{p[k]:.0f}" for k in ("statistics", "factors", "pricing") if k in p) or "-"


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--forward-only":
        forward_pass(argv[1], argv[2], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--depths", type=int, nargs="*", default=None, help="blocks (default: the shape's own)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--compress", type=float, default=None, metavar="RATIO",
                        help="measure geoshare compress at this ratio instead of analyze + solve")
    args = parser.parse_args(argv)
    rows = []
    for depth in args.depths or [None]:
        if args.compress is not None:
            row = run_compress(args.shape, depth, args.samples, args.length, args.batch_size, args.compress)
        else:
            row = run(args.shape, depth, args.samples, args.length, args.batch_size)
        print(json.dumps(row), flush=True)
        rows.append(row)
    write(rows, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
