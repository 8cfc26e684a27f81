"""What compress's held-out shrinkage choice costs: the same compress with ``--shrinkage none`` and
``held-out`` (the default) on the packaged MiniLM, timed in one process, alternating.

    python bench/intensity_overhead.py --threads 1   # -> bench/results/intensity_overhead.{md,json}
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

import torch

from bench.corpus import splits
from hessian_worker import CompressConfig, compress, load_model

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=160,
                    help="enough that the choice's rows exceed 1,536 (else the merge is curvature, nothing chosen)")
    ap.add_argument("--curvature-samples", type=int, default=16, help="of the fit samples, those the costs use")
    ap.add_argument("--ratio", type=float, default=0.67)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "intensity_overhead"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("minilm")
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    data = splits((args.sentences,), 0, "docstrings")[0]
    runs: dict[str, list[dict]] = {"none": [], "held-out": []}
    for _ in range(args.repeats):
        for setting in runs:  # alternating, so drifting machine load hits both alike
            config = CompressConfig(ratio=args.ratio, distill="cosine", device="cpu", progress=False, shrinkage=setting,
                                    curvature_samples=args.curvature_samples)
            copy_ = copy.deepcopy(model)
            t = time.perf_counter()
            report = compress(copy_, data, config, tokenizer=tokenizer)
            runs[setting].append({"seconds": time.perf_counter() - t, "held_out_loss": report.measured_loss_change,
                                  "merge": report.merge.value,
                                  "candidates": len(report.candidates), "intensity": report.shrinkage_intensity})
            print(setting, runs[setting][-1], flush=True)
    best = {s: min(r["seconds"] for r in rs) for s, rs in runs.items()}
    result = {"meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                       "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}",
                       "sentences": args.sentences, "ratio": args.ratio, "threads": args.threads},
              "runs": runs, "best_seconds": best, "ratio_held_out_to_none": best["held-out"] / best["none"]}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# Cost of the held-out shrinkage choice in compress", "", f"Command: `{result['meta']['command']}`  ",
             f"{result['meta']['machine']}; MiniLM, {args.sentences} docstring sentences (costs on "
             f"{args.curvature_samples}), ratio {args.ratio}, compress's defaults otherwise, {args.threads} thread(s), on a shared 2-core machine with other jobs "
             "running (best of the alternating repeats).", "",
             "| shrinkage | seconds (best) | merge | candidates | chosen intensity | loss change on the held-out samples |",
             "|---|---|---|---|---|---|"]
    for s, rs in runs.items():
        r = rs[0]
        lines.append(f"| {s} | {best[s]:.1f} | {r['merge']} | {r['candidates']} | {r['intensity']} | {r['held_out_loss']:.5f} |")
    lines += ["", f"held-out / none: {result['ratio_held_out_to_none']:.3f}", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
