"""The layerwise merge under domain shift, layer by layer: does covariance shrinkage help?

For each family of a model, adjacent layers are merged pairwise by the layerwise closed form with
input covariances Ĝ from one corpus's calibration + validation data (shrunk: a fixed intensity
from a grid, or estimated by Ledoit–Wolf / OAS), and the merge's output error
Σ_k tr((W* − W_k) G_E,k (W* − W_k)ᵀ) is measured with the input covariances G_E of an evaluation
split: the same corpus's (in-domain) or the other corpus's (cross-domain). Errors are relative to
the unshrunk merge's, averaged over families (below 1: shrinkage helps). A cheap proxy for the
end-to-end table of bench/cross_domain.py (no candidate search, no model forward per plan).

    python bench/merge_shift.py          # -> bench/results/merge_shift.{md,json}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.cross_domain import DOMAINS, domain_task, union
from hessian_worker.curvature.layerwise import SecondMoments, input_moments, layerwise_merge
from hessian_worker.curvature.shrinkage import intensity, shrink
from hessian_worker.data import load_calibration
from hessian_worker.discovery import discover_layers
from hessian_worker.options import Shrinkage

RESULTS = Path(__file__).resolve().parent / "results"
GRID = [0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5]
ESTIMATORS = [Shrinkage.ledoit_wolf, Shrinkage.oas]


def pair_errors(weights: dict[str, torch.Tensor], names: list[str], fit: dict[str, SecondMoments],
                rho_of, evals: dict[str, dict[str, SecondMoments]]) -> dict[str, float]:
    """Output error of merging each adjacent pair of ``names`` with Ĝ = shrink(G_fit, rho_of(name)),
    under each evaluation split's covariances."""
    out = dict.fromkeys(evals, 0.0)
    for i in range(len(names) - 1):
        pair = names[i : i + 2]
        merged = layerwise_merge([weights[n] for n in pair],
                                 [shrink(fit[n].covariance.double(), rho_of(n)) for n in pair])
        for n in pair:
            d = merged - weights[n]
            for split, moments in evals.items():
                out[split] += float(torch.einsum("oi,ij,oj->", d, moments[n].covariance.double(), d))
    return out


def run(model_name: str, seed: int) -> dict:
    tasks = {d: domain_task(model_name, d, seed) for d in DOMAINS[model_name]}
    model, tokenizer = next(iter(tasks.values())).model, next(iter(tasks.values())).tokenizer
    layers = discover_layers(model)
    names = [layer.name for layer in layers]
    families: dict[str, list[str]] = {}
    for layer in layers:
        families.setdefault(layer.family, []).append(layer.name)
    weights = {n: p.detach().double() for n, p in model.named_parameters() if n in names}
    fit = {d: input_moments(model, load_calibration(union(t.calibration, t.validation), tokenizer=tokenizer), names,
                            squares=True) for d, t in tasks.items()}
    evals = {d: input_moments(model, load_calibration(t.evaluation, tokenizer=tokenizer), names)
             for d, t in tasks.items()}
    settings = [*(f"{r:g}" for r in GRID), *(e.value for e in ESTIMATORS)]
    result = {}
    for calibrated_on in tasks:
        rel = {s: dict.fromkeys(tasks, 0.0) for s in settings}
        rhos: dict[str, list[float]] = {e.value: [] for e in ESTIMATORS}
        for fam_names in families.values():
            base = pair_errors(weights, fam_names, fit[calibrated_on], lambda n: 0.0, evals)
            for s in settings:
                if s in rhos:
                    setting = Shrinkage(s)
                    rho = {n: intensity(fit[calibrated_on][n], setting) for n in fam_names}
                    rhos[s] += list(rho.values())
                    errs = pair_errors(weights, fam_names, fit[calibrated_on], rho.get, evals)
                else:
                    errs = pair_errors(weights, fam_names, fit[calibrated_on], lambda n, r=float(s): r, evals)
                for d in tasks:
                    rel[s][d] += errs[d] / base[d] / len(families)
        result[calibrated_on] = {"relative_error": rel,
                                 "intensity": {e: sum(v) / len(v) for e, v in rhos.items()}}
    return result


def markdown(result: dict) -> str:
    lines = ["# Layerwise merge under domain shift: output error relative to no shrinkage", "",
             f"Command: `{result['meta']['command']}`  ", f"{result['meta']['seconds']} s. Adjacent pairs of every "
             "family merged with Ĝ from one corpus (calibration + validation splits), their output error measured "
             "with each corpus's evaluation-split input covariances; mean over families of error / unshrunk error "
             "(below 1: shrinkage helps).", ""]
    for model, per in result.items():
        if model == "meta":
            continue
        for calibrated_on, data in per.items():
            settings = list(data["relative_error"])
            lines += [f"## {model}, calibrated on {calibrated_on} (mean intensity: " +
                      ", ".join(f"{k} {v:.3f}" for k, v in data["intensity"].items()) + ")", "",
                      "| evaluated on | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
            for d in data["relative_error"][settings[0]]:
                tag = "in-domain" if d == calibrated_on else "cross"
                lines.append(f"| {d} ({tag}) | " + " | ".join(f"{data['relative_error'][s][d]:.3f}"
                                                             for s in settings) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(DOMAINS), default=list(DOMAINS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "merge_shift"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    result: dict = {m: run(m, args.seed) for m in args.models}
    result["meta"] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                      "seconds": round(time.perf_counter() - t, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
