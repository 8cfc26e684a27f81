"""Why do the relaxed and basis costs under-predict the measured loss, and do they rank the plans as
measured? Predicted (in-sample) against out-of-sample costs against measured loss, for fixed plans
at one budget, under several whitening settings.

The relaxed and basis fits whiten with the input covariances of the calibration split (16 MiniLM
sentences, ~300 tokens, below the hidden width 384): G is rank-deficient, so a shared S, a
correction or a basis is free outside the directions the calibration tokens visit, and the
in-sample error E_fit = Σ_ℓ tr(δ_ℓ G̃_fit δ_ℓᵀ) of the fitted residual δ_ℓ = Ŵ_ℓ − W_ℓ is optimistic.
For every setting (calibration size, shrinkage, damping) this fits the same plans and reports:

- ``in-sample``: E_fit, damped as the fit is (what the solver's objective estimates);
- ``held-out``: Σ_ℓ tr(δ_ℓ G_held δ_ℓᵀ) with G_held the output-scaled covariances of sentences
  neither fitted nor measured on (undamped, unshrunk): the fit's cost out of sample;
- ``eval-cov``: the same under the evaluation split's own covariances (what the quadratic model
  predicts for exactly the data measured: its gap to ``measured`` is the Taylor model's, not the fit's);
- ``measured``: the distillation loss on the evaluation split, and the task metric.

With ``--curvature`` each plan's perturbation is also priced on the evaluation split under finer
curvature models, to tell where a ranking error comes from (costs vs measured):

- ``iso``: Σ_ℓ ½ ā_ℓ tr(δ_ℓ G_ℓ δ_ℓᵀ), the schemes' model (K-FAC's A_ℓ ≈ ā_ℓ·I, basis/scales.py);
- ``diag``: Σ_ℓ ½ Σ_o a_ℓo (δ_ℓ G_ℓ δ_ℓᵀ)_oo, a per-output-channel A_ℓ = diag(a_ℓ) (the least-squares
  fit to the diagonal GGN, decompose.output_weights, before its mean is taken);
- ``block``: Σ_ℓ ½ δ_ℓᵀ GGN_ℓℓ δ_ℓ, the exact GGN's diagonal blocks (no approximation within a layer);
- ``ggn``: ½ δᵀ GGN δ, the exact GGN with every cross-layer term (the second-order model itself).

Plans at budget B: ``relaxed-loop`` (one class per family at the largest correction rank that fits),
``relaxed-solver`` (the solver's optimum at the default rank under this setting's costs), ``svd``
(per-layer whitened SVD filling B), ``basis-pairs`` (consecutive pairs share a basis).

    python bench/relaxed_generalization.py --budget 0.5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor, nn

from bench.basis_eval import basis_problem, families_of, largest_rank, pairs_plan
from bench.corpus import splits
from bench.relaxed_eval import fixed_plan, largest_relaxed_ranks
from bench.tasks import Task, load_task
from hessian_worker import AnalyzeConfig, measure_loss
from hessian_worker.basis.apply import apply_basis_plan
from hessian_worker.basis.decompose import DTYPE, damped, output_weights
from hessian_worker.basis.per_layer import per_layer_candidate
from hessian_worker.config import generator
from hessian_worker.curvature.diagonal import estimate_diagonal
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.discovery import discover_layers
from hessian_worker.factored.layers import dense_weights
from hessian_worker.objective import Objective
from hessian_worker.options import RelaxedOptions
from hessian_worker.prepare import prepare
from hessian_worker.ranking import spearman
from hessian_worker.relaxed.analysis import (
    family_shapes,
    family_sizes,
    relaxed_covariances,
    relaxed_problem,
)
from hessian_worker.relaxed.apply import apply_relaxed_plan
from hessian_worker.relaxed.costs import PairSpectra, family_rank, ranks_within
from hessian_worker.relaxed.holdout import cross_fitted_covariances
from solver import SharingProblem, SolveConfig
from solver.planning import solve
from solver.schema import Costs, Layer

RESULTS = Path(__file__).resolve().parent / "results"
PRICES = ("iso", "diag", "block", "ggn")  # --curvature's columns


@dataclass
class Setting:
    """One whitening: calibration sentences, shrinkage and damping."""

    label: str
    calibration: int = 16
    shrinkage: str | float = "none"
    damping: float = 0.01
    crossfit: bool = False  # the product's default: each family's intensity chosen by cross-fitting


SETTINGS = {
    "base": Setting("base"),
    "crossfit": Setting("crossfit", crossfit=True),
    "n128-crossfit": Setting("n128-crossfit", calibration=128, crossfit=True),
    "crossfit-halved": Setting("crossfit-halved", crossfit=True),
    "ledoit-wolf": Setting("ledoit-wolf", shrinkage="ledoit-wolf"),
    "oas": Setting("oas", shrinkage="oas"),
    "damping-0.1": Setting("damping-0.1", damping=0.1),
    "damping-0.3": Setting("damping-0.3", damping=0.3),
    "damping-1": Setting("damping-1", damping=1.0),
    "n128": Setting("n128", calibration=128),
    "n128-oas": Setting("n128-oas", calibration=128, shrinkage="oas"),
    "n128-damping-0.1": Setting("n128-damping-0.1", calibration=128, damping=0.1),
    "n512": Setting("n512", calibration=512),
}


def effective_weights(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """name -> the [out, in] weight a (compressed) layer computes with (Linear, RelaxedLinear, BasisLinear)."""
    modules = dict(model.named_modules())
    return {n: modules[n.removesuffix(".weight")].weight.detach().to(DTYPE) for n in names}


def quadratic(delta: dict[str, Tensor], covs: dict[str, Tensor], damping: float | None) -> float:
    """Σ_ℓ tr(δ_ℓ G δ_ℓᵀ), G damped when ``damping`` is given."""
    total = 0.0
    for n, d in delta.items():
        g = damped(covs[n], damping) if damping is not None else covs[n].to(DTYPE)
        total += float(((d @ g) * d).sum())
    return total


@dataclass
class Pricing:
    """The evaluation split's curvature models (``--curvature``): its raw input covariances, each
    layer's per-output-channel weights a_ℓ, and the exact GGN's quadratic form."""

    covs: dict[str, Tensor]
    out_weights: dict[str, Tensor]
    exact: ExactCurvature
    dtype: torch.dtype

    @classmethod
    def on(cls, task: Task, data: list[str], names: list[str], seed: int) -> Pricing:
        config = AnalyzeConfig(scheme="relaxed", distill=task.distill, seed=seed, progress=False,
                               relaxed={"shrinkage": [], "output_weighting": False})
        prep = prepare(copy.deepcopy(task.model), data, config, tokenizer=task.tokenizer)
        obj = Objective(prep.model, prep.data, names, config.distill)
        with torch.no_grad():
            covs = relaxed_covariances(prep.model, prep.data, names, config)
            diag = estimate_diagonal(obj, config.diagonal_method, probes=config.probes, generator=generator(config),
                                     kind=config.curvature)
        assert covs is not None
        return cls(covs, {n: output_weights(diag[n], covs[n]) for n in names}, ExactCurvature(obj, chunk=1),
                   next(prep.model.parameters()).dtype)

    def prices(self, delta: dict[str, Tensor]) -> dict[str, float]:
        """iso, diag, block and ggn of the perturbation ``delta`` (name -> [out, in])."""
        iso = diag = block = 0.0
        for n, d in delta.items():
            out_err = ((d @ self.covs[n].to(DTYPE)) * d).sum(dim=1)  # (δ G δᵀ)_oo
            a = self.out_weights[n]
            iso += 0.5 * float(a.mean()) * float(out_err.sum())
            diag += 0.5 * float((a * out_err).sum())
            block += 0.5 * float(self.exact.quad({n: d.to(self.dtype)[None]})[0])
        ggn = 0.5 * float(self.exact.quad({n: d.to(self.dtype)[None] for n, d in delta.items()})[0])
        return {"iso": iso, "diag": diag, "block": block, "ggn": ggn}


def covariances(task: Task, data: list[str], names: list[str], config: AnalyzeConfig) -> dict[str, Tensor]:
    prep = prepare(copy.deepcopy(task.model), data, config, tokenizer=task.tokenizer)
    with torch.no_grad():
        covs = relaxed_covariances(prep.model, prep.data, names, config)
    assert covs is not None
    return covs


def run(task: Task, args: argparse.Namespace, rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Appends each setting's rows to ``rows`` (settings already there are skipped), yielding after each."""
    fams, dense = families_of(task.model)
    layers = discover_layers(task.model)
    names = [x.name for x in layers]
    budget = math.floor(args.budget * dense + 1e-9)
    # the task's splits, then sentences for larger calibration sets and the held-out covariances
    calib, evaluation, validation, extra, held = splits((16, 64, 128, 496, 128), args.seed)
    assert calib == task.calibration and evaluation == task.evaluation and validation == task.validation
    weights = {n: w.to(DTYPE) for n, w in dense_weights(task.model, names).items()}
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
    plain = AnalyzeConfig(scheme="relaxed", distill=task.distill, seed=args.seed, progress=False,
                          relaxed={"shrinkage": []})
    t = time.perf_counter()
    held_covs = covariances(task, held, names, plain)
    eval_covs = covariances(task, evaluation, names, plain)
    pricing = Pricing.on(task, evaluation, names, args.seed) if args.curvature else None
    print(f"held-out and evaluation covariances in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    bproblem = basis_problem(task, largest_rank(fams, budget), fams, args.seed, weighting=True)
    config = SolveConfig(max_params_ratio=args.budget, time_limit_s=10, seed=args.seed)
    options = RelaxedOptions()
    for key in args.settings:
        if any(r["setting"] == key for r in rows):
            continue
        s = SETTINGS[key]
        t = time.perf_counter()
        relaxed: dict[str, Any] = {"damping": s.damping} if s.crossfit else {"damping": s.damping, "shrinkage": []}
        cfg = AnalyzeConfig(scheme="relaxed", distill=task.distill, seed=args.seed, progress=False,
                            shrinkage=s.shrinkage, relaxed=relaxed, basis={"damping": s.damping})
        data = calib + extra[: s.calibration - 16]
        if s.crossfit:
            prep = prepare(copy.deepcopy(task.model), data, cfg, tokenizer=task.tokenizer)
            with torch.no_grad():
                fitted = cross_fitted_covariances(prep.model, prep.data, names, cfg)
            covs, chosen = fitted.covs, {f: round(r, 4) for f, r in fitted.intensity.items()}
            print(f"  {key}: chosen intensities {chosen}", file=sys.stderr)
        else:
            covs, chosen = covariances(task, data, names, cfg), {}
        spectra = PairSpectra(layers, weights, covs, damping=s.damping)
        matrix, unary = spectra.costs({x.family: 1 for x in layers})
        base = SharingProblem(layers=[Layer(name=x.name, family=x.family, params=x.params, index=x.index)
                                      for x in layers], costs=Costs(matrix=matrix, unary=unary))
        fam_shapes, sizes = family_shapes(base, shapes), family_sizes(base)
        loop_ranks = largest_relaxed_ranks(fam_shapes, sizes, budget, dict.fromkeys(fam_shapes, 1))
        assert loop_ranks is not None
        loop = relaxed_problem(base, spectra, loop_ranks, shapes)
        default = {f: family_rank(f, sh, options) for f, sh in fam_shapes.items()}
        at_default = relaxed_problem(base, spectra, ranks_within(fam_shapes, sizes, default, budget), shapes)
        plans: dict[str, tuple[str, Any, SharingProblem]] = {
            "relaxed-loop": ("relaxed", fixed_plan(loop, None, "relaxed-loop"), loop),
            "relaxed-solver": ("relaxed", solve(at_default, config), at_default),
            "basis-pairs": ("basis", pairs_plan(bproblem), bproblem),
        }
        alone = per_layer_candidate(task.model, bproblem, config, covs)
        assert alone is not None
        plans["svd"] = ("basis", *alone)
        for strategy, (scheme, plan, prob) in plans.items():
            model = copy.deepcopy(task.model)
            with torch.no_grad():
                if scheme == "relaxed":
                    report = apply_relaxed_plan(model, plan, prob, config=cfg, covs=covs)
                else:
                    report = apply_basis_plan(model, plan, prob, config=cfg, covs=covs)
            model.eval()
            delta = {n: w - weights[n] for n, w in effective_weights(model, names).items()}
            row = {"setting": key, "strategy": strategy, "calibration": s.calibration, "shrinkage": s.shrinkage,
                   "damping": s.damping, "chosen": chosen, "params_ratio": report.plan_params_shared / dense,
                   "objective": plan.objective,
                   "in_sample": quadratic(delta, covs, s.damping),
                   "held_out": quadratic(delta, held_covs, None),
                   "eval_cov": quadratic(delta, eval_covs, None),
                   "measured": measure_loss(model, task.model, task.evaluation,
                                            AnalyzeConfig(distill=task.distill, progress=False),
                                            tokenizer=task.tokenizer),
                   "metric": task.score(model)}
            if pricing is not None:
                row.update(pricing.prices(delta))
            assert report.plan_params_shared <= budget, (strategy, report.plan_params_shared, budget)
            rows.append(row)
            print(f"  {key} {strategy}: in {row['in_sample']:.4g} held {row['held_out']:.4g} eval-cov "
                  f"{row['eval_cov']:.4g} measured {row['measured']:.4g} metric {row['metric']:.4g}"
                  + "".join(f" {k} {row[k]:.4g}" for k in PRICES if k in row), file=sys.stderr)
        print(f"{key} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        yield rows


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Relaxed and basis costs in and out of sample (MiniLM)", "",
             *[f"Command: `{c}`  " for c in meta.get("commands", [meta["command"]])], f"{meta['machine']}; {meta['seconds']} s"
             f"{' (partial)' if meta['partial'] else ''}; budget {meta['budget']}", "",
             "in-sample: Σ tr(δ G̃_fit δᵀ) under the fitted (damped, shrunk) covariances; held-out: under 128 "
             "other sentences' covariances; eval-cov: under the evaluation split's; measured: distillation loss on "
             "the evaluation split (64 sentences); metric: embedding cosine. All covariances output-scaled. "
             "Settings: calibration sentences (n128: 128), shrinkage (oas, ledoit-wolf), damping; crossfit: the "
             "product's default (relaxed/holdout.py), crossfit-as-is: the halves' choice applied without carrying it "
             "to all samples (the code before full_data_intensity).", "",
             "| setting | strategy | params ratio | in-sample | held-out | eval-cov | measured | metric |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("chosen") and r["strategy"] == "relaxed-loop":
            lines.append(f"| {r['setting']} | chosen ρ per family: {r['chosen']} | | | | | | |")
        lines.append(f"| {r['setting']} | {r['strategy']} | {r['params_ratio']:.3f} | {r['in_sample']:.4g} | "
                     f"{r['held_out']:.4g} | {r['eval_cov']:.4g} | {r['measured']:.4g} | {r['metric']:.4g} |")
    priced = [r for r in result["rows"] if all(k in r for k in PRICES)]
    if priced:
        lines += ["", "## The same perturbations under finer curvature models (evaluation split)", "",
                  "iso: per-layer K-FAC with A = ā·I (the schemes' costs); diag: A = diag(a), per output channel; "
                  "block: the exact GGN's per-layer blocks; ggn: the exact GGN, cross-layer terms too; measured: "
                  "the distillation loss. Spearman over each setting's plans against measured in the last rows.", "",
                  "| setting | strategy | iso | diag | block | ggn | measured |", "|---|---|---|---|---|---|---|"]
        for r in priced:
            lines.append(f"| {r['setting']} | {r['strategy']} | " + " | ".join(f"{r[k]:.4g}" for k in PRICES)
                         + f" | {r['measured']:.4g} |")
        lines += ["", "| setting | plans | " + " | ".join(f"Spearman {k}" for k in PRICES) + " |",
                  "|---" * (2 + len(PRICES)) + "|"]
        for setting in dict.fromkeys(r["setting"] for r in priced):
            mine = [r for r in priced if r["setting"] == setting]
            measured = [r["measured"] for r in mine]
            lines.append(f"| {setting} | {len(mine)} | " + " | ".join(
                f"{spearman([r[k] for r in mine], measured):+.2f}" for k in PRICES) + " |")
        every = [r["measured"] for r in priced]
        lines.append(f"| all | {len(priced)} | " + " | ".join(
            f"{spearman([r[k] for r in priced], every):+.2f}" for k in PRICES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "relaxed-generalization"))
    ap.add_argument("--resume", action="store_true", help="keep the settings already in the .json, run the rest")
    ap.add_argument("--curvature", action="store_true",
                    help="also price each perturbation under iso, diag, block and exact GGN curvature on the evaluation split")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    out = Path(args.out)
    task = load_task("minilm", seed=args.seed)

    def write(rows: list[dict[str, Any]], partial: bool) -> None:
        result = {"meta": {"command": commands[-1], "commands": commands,
                           "machine": f"{platform.machine()} python {platform.python_version()} torch "
                                      f"{torch.__version__}, {args.threads} thread(s), shared 2-core machine",
                           "seconds": round(time.perf_counter() - t0, 1), "budget": args.budget,
                           "partial": partial}, "rows": rows}
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(markdown(result))

    rows: list[dict[str, Any]] = []
    commands = [" ".join([Path(sys.executable).name, *sys.argv])]
    if args.resume and out.with_suffix(".json").is_file():
        before = json.loads(out.with_suffix(".json").read_text())
        rows, commands = before["rows"], [*before["meta"].get("commands", [before["meta"]["command"]]), *commands]
    for done in run(task, args, rows):
        write(done, True)
    write(rows, False)


if __name__ == "__main__":
    main()
