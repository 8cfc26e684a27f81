"""What a compressed MiniLM costs at inference against the original (issue 19): weights on disk,
unique parameters in memory, and the peak memory of loading it plus one forward pass.

For each scheme and ratio (the share of the shareable parameters kept), ``geoshare compress
--model minilm`` runs as a user would (the CLI's in-memory path, its defaults, the bench corpus's
calibration sentences), then:
- ``hessian_worker.evaluation.evaluate`` against ``minilm`` on the evaluation sentences (which the
  compress never saw): embedding cosine to the original, parameters counted from the loaded
  tensors' storage, weight bytes on disk;
- ``hessian_worker.footprint.measure_peak``: the weight files evicted from the page cache, a
  fresh Python process per measurement loads the model (``load_compressed`` for a compressed directory, ``from_pretrained`` for the original and
  for the dense export) and runs one forward on the first evaluation batch; the figure is its
  resident high-water mark above the resident set after the imports (the model's modeling code
  imported before that baseline). ``--repeats`` rounds, every model once per round in turn, so
  drift on the shared machine spreads over all of them; the table gives the median and the range.
- The dense export of the smallest ratio (``geoshare export --format hf``, every tensor written
  out) is measured too: what the same weights cost without the sharing.

    python bench/inference_bench.py [--ratios 0.84 0.67] [--schemes tie basis] [--repeats 5]

Writes bench/results/inference_bench.{json,md} with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.corpus import splits  # noqa: E402
from geoshare.cli import main as cli  # noqa: E402
from hessian_worker.data import load_calibration  # noqa: E402
from hessian_worker.evaluation import EvaluateConfig, evaluate  # noqa: E402
from hessian_worker.footprint import measure_peak  # noqa: E402
from hessian_worker.models import load_model  # noqa: E402

NAME = "inference_bench"
RESULTS = ROOT / "bench" / "results"


def compress(work: Path, scheme: str, ratio: float, calib: Path) -> tuple[Path, dict[str, Any], float]:
    """``geoshare compress`` into ``work``; the directory, its report and the wall seconds."""
    out = work / f"minilm-{scheme}-{ratio:g}"
    argv = ["compress", "--model", "minilm", "--data", str(calib), "--ratio", str(ratio), "--out", str(out), "--quiet"]
    if scheme == "basis":
        argv += ["--scheme", "basis"]
    start = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit(f"geoshare {' '.join(argv)} failed")
    return out, json.loads((out / "report.json").read_text()), time.perf_counter() - start


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    calib_sents, eval_sents = splits((args.calibration, args.evaluation), args.seed)
    calib, evaluation = work / "calib.txt", work / "eval.txt"
    calib.write_text("\n".join(calib_sents) + "\n")
    evaluation.write_text("\n".join(eval_sents) + "\n")
    config = EvaluateConfig(batch_size=args.batch_size, memory=False)

    models: list[dict[str, Any]] = []
    for scheme in args.schemes:
        for ratio in args.ratios:
            out, report, seconds = compress(work, scheme, ratio, calib)
            figures = evaluate(str(out), "minilm", str(evaluation), config)
            models.append({"name": f"{scheme} {ratio:g}", "spec": str(out), "scheme": scheme, "ratio": ratio,
                           "params_ratio": report["params_ratio"], "chosen": report["chosen"],
                           "compress_s": round(seconds, 1), "cosine": figures.model.score,
                           "min_cosine": figures.quality["min_cosine"],
                           "unique_params": figures.model.storage.unique_params,
                           "disk_bytes": figures.model.disk_bytes, "reference": figures.reference})
    reference = models[0].pop("reference")
    for m in models:
        m.pop("reference", None)
    smallest = min(models, key=lambda m: m["unique_params"])
    dense = work / "dense-export"
    if cli(["export", smallest["spec"], "--format", "hf", "--out", str(dense)]) != 0:
        raise SystemExit("geoshare export failed")
    dense_figures = evaluate(str(dense), "minilm", str(evaluation), config)
    rows = [{"name": "original", "spec": "minilm", "scheme": "-", "ratio": 1.0, "params_ratio": 1.0,
             "cosine": reference.score, "min_cosine": 1.0, "unique_params": reference.storage.unique_params,
             "disk_bytes": reference.disk_bytes},
            *models,
            {"name": f"dense export of {smallest['name']}", "spec": str(dense), "scheme": "-", "ratio": smallest["ratio"],
             "params_ratio": smallest["params_ratio"], "cosine": dense_figures.model.score,
             "min_cosine": dense_figures.quality["min_cosine"],
             "unique_params": dense_figures.model.storage.unique_params, "disk_bytes": dense_figures.model.disk_bytes}]

    tokenizer = load_model("minilm").tokenizer
    batch = load_calibration(eval_sents, tokenizer=tokenizer, batch_size=args.batch_size, seed=args.seed).batches[0]
    peaks: dict[str, list[dict[str, Any]]] = {r["name"]: [] for r in rows}
    for _ in range(args.repeats):
        for r in rows:
            peak = measure_peak(r["spec"], batch)
            if not (peak.cold_cache and peak.baseline_reset):
                raise SystemExit(f"{r['name']}: not measured from a cold cache with a reset high-water mark: {peak}")
            peaks[r["name"]].append(peak.model_dump())
    for r in rows:
        load_forward = [p["load_forward_bytes"] for p in peaks[r["name"]]]
        r["mapped_bytes_median"] = int(statistics.median(p["mapped_bytes"] or 0 for p in peaks[r["name"]]))
        r["load_forward_bytes"] = {"median": int(statistics.median(load_forward)), "min": min(load_forward),
                                   "max": max(load_forward)}
        r["peak_bytes_median"] = int(statistics.median(p["peak_bytes"] for p in peaks[r["name"]]))
        r["runs"] = peaks[r["name"]]
        r["spec"] = r["spec"].replace(str(work), "<work>")
    return {"rows": rows, "batch": {k: list(v.shape) for k, v in batch.items()}}


def render(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    original = rows[0]
    lines = ["# Inference cost of a compressed MiniLM against the original", "",
             f"Command: `{payload['command']}`  ", f"Machine: {payload['machine']}  ", f"Commit: {payload['commit']}  ",
             f"Total wall time: {payload['seconds']:.0f} s", "",
             f"Compressed with `geoshare compress --model minilm --data calib.txt --ratio R [--scheme basis]` "
             f"(defaults otherwise) on {payload['settings']['calibration']} calibration sentences of the bench corpus; "
             f"scored by `geoshare evaluate`'s library call on {payload['settings']['evaluation']} other sentences. "
             f"Peak: the weight files evicted from the page cache, a fresh process per measurement loads the "
             f"model and runs one forward on a batch of "
             f"{payload['batch']['input_ids']} tokens; the resident high-water mark above the resident set after "
             f"the imports (modeling code included), median of {payload['settings']['repeats']} rounds "
             f"(range in brackets).", "",
             "| model | shareable kept | unique params | weights on disk | peak load + forward | vs original | "
             "mapped weights [range] | the rest [range] | embedding cosine (min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lf = r["load_forward_bytes"]
        mapped = [p["mapped_bytes"] or 0 for p in r["runs"]]
        rest = [p["load_forward_bytes"] - (p["mapped_bytes"] or 0) for p in r["runs"]]
        lines.append(
            f"| {r['name']} | {r['params_ratio']:.3f} | {r['unique_params']:,} | {r['disk_bytes'] / 1e6:.1f} MB | "
            f"{lf['median'] / 1e6:.1f} MB [{lf['min'] / 1e6:.1f}-{lf['max'] / 1e6:.1f}] | "
            f"{lf['median'] / original['load_forward_bytes']['median']:.2f}x | {_range(mapped)} | {_range(rest)} | "
            f"{r['cosine']:.3f} ({r['min_cosine']:.3f}) |")
    lines += ["", "Embeddings (11.7 M of MiniLM's 22.7 M parameters) are not shareable, so the model shrinks less than "
              "its shareable part. The dense export holds the compressed weights with every alias written out: the "
              "same outputs as its compressed directory, the original's size on disk and in memory. The peak splits "
              "into the mapped weights the load and forward touched (file-backed pages: the weights, less the "
              "embedding rows no token used) and the rest (activations, the allocator, the runtime's buffers); "
              "medians of each column separately.", ""]
    if payload.get("note"):
        lines += [payload["note"], ""]
    return "\n".join(lines)


def _range(values: list[int]) -> str:
    return f"{statistics.median(values) / 1e6:.1f} MB [{min(values) / 1e6:.1f}-{max(values) / 1e6:.1f}]"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.84, 0.67])
    parser.add_argument("--schemes", nargs="+", choices=("tie", "basis"), default=["tie"])
    parser.add_argument("--calibration", type=int, default=16, help="calibration sentences (the MiniLM task's)")
    parser.add_argument("--evaluation", type=int, default=64, help="evaluation sentences")
    parser.add_argument("--batch-size", type=int, default=8, help="sentences in the measured forward")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of fresh-process peak measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2, shared)")
    parser.add_argument("--note", default="", help="a note written under the table of the .md")
    parser.add_argument("--no-write", action="store_true", help="print only (trial runs)")
    parser.add_argument("--render", action="store_true",
                        help="only write the .md again from the .json (its command and figures unchanged)")
    args = parser.parse_args(argv)
    if args.render:
        payload = json.loads((RESULTS / f"{NAME}.json").read_text())
        payload["note"] = args.note or payload.get("note", "")
        (RESULTS / f"{NAME}.md").write_text(render(payload))
        print(render(payload))
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as tmp:
        result = run(args, Path(tmp))
    import transformers

    payload = {
        "command": "python bench/inference_bench.py " + " ".join(argv),
        "machine": f"{platform.machine()} {platform.platform()}, python {platform.python_version()}, torch "
                   f"{torch.__version__}, transformers {transformers.__version__}",
        "commit": _commit(), "seconds": round(time.perf_counter() - start, 1),
        "settings": {k: v for k, v in vars(args).items() if k not in ("note", "no_write", "render")},
        "note": args.note,
        **result,
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
