"""Relaxed sharing on real models: W_l = S_c + A_l B_l with the solver's classes against fixed groupings,
strict tying, shared bases and per-layer SVD, at equal unique-parameter budgets.

Budgets are shares of the shareable (dense) parameters. For each budget B:
- ``relaxed-geo``: the product's choice (``compress --scheme relaxed``): output-weighted relaxed costs,
  the candidate pool (K best, size-normalized K best, pattern plans) at the default correction rank
  (share 1/16 of min(d_out, d_in), lowered until one class per family fits B), plus the product's
  extra candidates (relaxed/candidates.py: the solver's optimum at every other share of
  ``RelaxedOptions.rank_ratios`` that fits, and at per-family ranks); the least loss measured on the
  validation split.
- ``relaxed-solver``: the solver's optimum at the default rank (what the costs alone pick).
- ``relaxed-loop``: one class per family (a looped model, Relaxed Recursive Transformers) at the
  largest correction rank that fits B.
- ``relaxed-pairs``: consecutive pairs (0,1), (2,3), ... of every family (DeltaLLM) at the largest
  correction rank that fits B (absent where even rank 1 does not fit).
- ``relaxed-sequence``: contiguous runs (the solver's ``sequence`` pattern filling B) at every share of
  ``rank_ratios``, the least validation loss.
- ``basis-shared-geo``: shared low-rank bases, the product's choice among the shared plans at the
  consecutive pairs' rank (bench/basis_eval.py's row of that name).
- ``svd``: every layer its own whitened low-rank factors at the ranks that fill B (no sharing).
  ``svd-unshrunk``: the same under the unshrunk covariances (the basis scheme's own whitening).
- ``relaxed-geo-heal`` (with ``--heal-steps``): what ``compress --scheme relaxed --heal`` installs: the
  best zero-shot candidates and each form of sharing's best healed, the least loss after healing on
  the validation split (hessian_worker/choose.py).
- ``tie``: strict tying, the product's geo plan on bench/evaluate.py's exact GGN costs (bench/basis_eval.py's
  row).
Every relaxed and basis plan is whitened by the same output-scaled input covariances of the
calibration split, the relaxed scheme's (by default each family's shrinkage chosen by cross-fitting,
hessian_worker/relaxed/holdout.py): the candidates are fitted with them and measured on the validation
split. The chosen plans are then fitted again, as ``compress`` does (``refit``), with the same
covariances of calibration + validation, the samples the tie row's layerwise merge uses; ``--no-refit``
installs the fits the choice measured. Each plan is scored zero-shot on the evaluation split (task metric and
distillation loss) and, with ``--heal-steps``, after the same self-distillation for every strategy.

    python bench/relaxed_eval.py --tasks minilm --budgets 0.8 0.67 0.5 0.4
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.basis_eval import (
    Scorer,
    basis_config,
    basis_problem,
    families_of,
    largest_rank,
    tie_choice,
    tie_merge,
)
from bench.evaluate import costs_for, union
from bench.paired import LEVEL, PairedDifference, SampleScores, paired_difference
from bench.tasks import TASKS, Task, load_task
from hessian_worker import AnalyzeConfig
from hessian_worker.basis.per_layer import per_layer_candidate
from hessian_worker.choose import choose_healed
from hessian_worker.discovery import discover_layers
from hessian_worker.factored.layers import dense_weights
from hessian_worker.measure import measure_plans
from hessian_worker.options import RelaxedPricing
from hessian_worker.prepare import prepare
from hessian_worker.relaxed.analysis import (
    candidate_pricer,
    family_shapes,
    family_sizes,
    relaxed_covariances,
    relaxed_problem,
)
from hessian_worker.relaxed.apply import apply_relaxed_plan
from hessian_worker.relaxed.candidates import rank_candidates
from hessian_worker.relaxed.costs import (
    PairPricer,
    family_rank,
    least_params,
    pair_matrix,
    ranks_within,
)
from hessian_worker.relaxed.holdout import cross_fitted_covariances
from solver import SharingPlan, SharingProblem, SolveConfig
from solver.baselines import baseline
from solver.candidates import candidate_plans
from solver.planning import plan_from_coloring
from solver.schema import Costs, Layer

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ["relaxed-geo", "relaxed-geo-heal", "relaxed-solver", "relaxed-loop", "relaxed-pairs", "relaxed-sequence",
        "basis-shared-geo", "svd", "svd-unshrunk", "tie"]


class Relaxed:
    """One task's relaxed problem at any correction ranks: the pair spectra, measured once."""

    def __init__(self, task: Task, seed: int, refit: bool = True, pricing: str = "kronecker") -> None:
        self.task = task
        self.config = AnalyzeConfig(scheme="relaxed", distill=task.distill, seed=seed, progress=False,
                                    relaxed={"pricing": pricing})
        self.options = self.config.relaxed
        layers = discover_layers(task.model)
        names = [x.name for x in layers]
        t = time.perf_counter()
        self.covs, self.plain_covs, self.shrinkage = self.whitening(task.calibration, names)
        # the chosen plans' final fits: on calibration + validation (compress's refit), else the choice's
        self.final_covs, self.final_plain_covs, self.final_shrinkage = (
            self.whitening(union(task.calibration, task.validation), names) if refit
            else (self.covs, self.plain_covs, self.shrinkage))
        with torch.no_grad():
            weights = dense_weights(task.model, names)
        # the product's pair costs (RelaxedOptions.pricing) on the calibration split, what the covariances saw
        self.spectra: PairPricer = candidate_pricer(task.model, task.calibration, layers, self.covs, self.config,
                                                    task.tokenizer)
        self.shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
        matrix, unary = pair_matrix(len(layers), {})  # the layers alone: self.problem prices at the ranks asked for
        print(f"  {task.name}: relaxed covariances and pair pricer ({pricing}; exact prices each rank when first "
              f"asked) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        self.base = SharingProblem(layers=[Layer(name=x.name, family=x.family, params=x.params, index=x.index)
                                           for x in layers], costs=Costs(matrix=matrix, unary=unary))
        self.fam_shapes, self.sizes = family_shapes(self.base, self.shapes), family_sizes(self.base)

    def whitening(self, data: Any, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                               dict[str, float]]:
        """(the relaxed scheme's covariances, the unshrunk ones, each family's cross-fitted intensity, and
        each family's alone under '<family> alone') on ``data``."""
        prep = prepare(copy.deepcopy(self.task.model), data, self.config, tokenizer=self.task.tokenizer)
        with torch.no_grad():
            # unshrunk: the basis scheme's own whitening (AnalyzeConfig.shrinkage none), for the svd-unshrunk row
            plain = self.config.model_copy(update={"relaxed": self.options.model_copy(update={"shrinkage": []})})
            plain_covs = relaxed_covariances(prep.model, prep.data, names, plain)
            if not self.options.shrinkage:
                return plain_covs, plain_covs, {}
            fitted = cross_fitted_covariances(prep.model, prep.data, names, self.config)  # the product's default
            chosen = {f: round(r, 4) for f, r in fitted.intensity.items()}
            chosen |= {f"{f} alone": round(r, 4) for f, r in fitted.alone_intensity.items()}  # a family alone's own
            return fitted.whitening(), plain_covs, chosen

    def ranks_at(self, share: float) -> dict[str, int]:
        return {f: family_rank(f, s, self.options, share) for f, s in self.fam_shapes.items()}

    def problem(self, ranks: dict[str, int]) -> SharingProblem:
        return relaxed_problem(self.base, self.spectra, ranks, self.shapes)

    def fits(self, ranks: dict[str, int], budget: int) -> bool:
        return least_params(self.fam_shapes, self.sizes, ranks) <= budget

    def largest(self, budget: int, classes: dict[str, int]) -> dict[str, int] | None:
        return largest_relaxed_ranks(self.fam_shapes, self.sizes, budget, classes)

    def measure(self, plans: list[tuple[SharingPlan, SharingProblem]]) -> list[float]:
        """Validation losses, the plans of one problem measured together (their class fits are cached)."""
        out: list[float] = [math.nan] * len(plans)
        groups: dict[int, list[int]] = {}
        for i, (_, prob) in enumerate(plans):
            groups.setdefault(id(prob), []).append(i)
        for idx in groups.values():
            values = measure_plans(self.task.model, self.task.validation, [plans[i][0] for i in idx], self.config,
                                   tokenizer=self.task.tokenizer, problem=plans[idx[0]][1], covs=self.covs)
            for i, v in zip(idx, values, strict=True):
                out[i] = v
        return out


def largest_relaxed_ranks(fam_shapes: dict[str, tuple[int, int]], sizes: dict[str, int], budget: int,
                          classes: dict[str, int]) -> dict[str, int] | None:
    """The largest uniform-share ranks with ``classes`` classes per family within ``budget``."""
    top = max(min(s) for s in fam_shapes.values()) // 2
    for k in range(top, 0, -1):
        ranks = {f: max(1, min(min(s) // 2, k * min(s) // (2 * top))) for f, s in fam_shapes.items()}
        count = sum(classes[f] * o * i + sizes[f] * ranks[f] * (o + i) for f, (o, i) in fam_shapes.items())
        if count <= budget:
            return ranks
    return None


def fixed_plan(problem: SharingProblem, size: int | None, strategy: str) -> SharingPlan:
    """Consecutive layers (by index) of every family in classes of ``size`` (None: the whole family)."""
    coloring, color = {}, 0
    by_family: dict[str, list[str]] = {}
    for x in sorted(problem.layers, key=lambda x: x.index):
        by_family.setdefault(x.family, []).append(x.name)
    for names in by_family.values():
        step = size or len(names)
        for i in range(0, len(names), step):
            coloring.update(dict.fromkeys(names[i : i + step], color))
            color += 1
    return plan_from_coloring(problem, coloring, method=f"baseline:{strategy}", strategy=strategy)


def heal_aware(rx: Relaxed, scorer: Scorer, pool: list[tuple[SharingPlan, SharingProblem]],
               measured: list[float]) -> tuple[SharingPlan, SharingProblem]:
    """The candidate ``compress --heal`` installs (choose.choose_healed): the best zero-shot ones
    and each form of sharing's best, fitted as the choice measured them, healed as every row is
    (on calibration + validation) and compared on the validation split."""
    choice = choose_healed(rx.task.model, [p for p, _ in pool], measured, scorer.heal_data, rx.task.validation,
                           scorer.heal_config(), rx.config,
                           tokenizer=rx.task.tokenizer, problems=[q for _, q in pool], state=rx.covs)
    plan, problem = pool[choice.index]
    return plan.model_copy(update={"strategy": f"{plan.strategy or 'optimum'} (healed {len(choice.healed)})"}), problem


def relaxed_plans(rx: Relaxed, ratio: float, budget: int, config: SolveConfig, top: int,
                  scorer: Scorer | None = None) -> dict[str, tuple[SharingPlan, SharingProblem]]:
    """The relaxed rows at one budget (see the module docstring); with a healing ``scorer``, also
    the heal-aware choice (``heal_aware``)."""
    main = rx.problem(ranks_within(rx.fam_shapes, rx.sizes, rx.ranks_at(rx.options.rank_ratio), budget))
    main = main.model_copy(update={"constraints": main.constraints.model_copy(update={"max_params_ratio": ratio})})
    pool = [(p, main) for p in candidate_plans(main, config, top=top, per_pattern=2, normalized_top=top // 2)]
    # the product's extra candidates: the optimum at every other share and at per-family ranks
    pool += rank_candidates(rx.task.model, main, config, rx.covs, rx.options, spectra=rx.spectra)
    sequences = []
    for share in rx.options.rank_ratios:
        ranks = rx.ranks_at(share)
        if not rx.fits(ranks, budget):
            continue
        seq = baseline(rx.problem(ranks), "sequence", config)
        if seq.status.value != "infeasible":
            sequences.append((seq.model_copy(update={"strategy": f"sequence-rank-{share:g}"}), rx.problem(ranks)))
    measured = rx.measure(pool)
    out = {"relaxed-geo": pool[int(np.argmin(measured))], "relaxed-solver": pool[0]}
    if scorer is not None and scorer.heal_steps:  # compress --heal: the shortlist healed, the least loss after
        out["relaxed-geo-heal"] = heal_aware(rx, scorer, pool, measured)
    if sequences:
        seq_measured = rx.measure(sequences)
        out["relaxed-sequence"] = sequences[int(np.argmin(seq_measured))]
    n = {f: 1 for f in rx.fam_shapes}
    loop = rx.largest(budget, n)
    if loop is not None:
        at = rx.problem(loop)
        out["relaxed-loop"] = (fixed_plan(at, None, "relaxed-loop"), at)
    pairs = rx.largest(budget, {f: math.ceil(rx.sizes[f] / 2) for f in rx.fam_shapes})
    if pairs is not None:
        at = rx.problem(pairs)
        out["relaxed-pairs"] = (fixed_plan(at, 2, "relaxed-pairs"), at)
    return out


def evaluate_task(task: Task, args: argparse.Namespace,
                  progress: Callable[[dict[str, Any]], Any] | None = None,
                  previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every row at every budget on one task; ``progress`` gets the results so far after each budget."""
    t0 = time.perf_counter()
    fams, dense = families_of(task.model)
    names = [x.name for x in discover_layers(task.model)]
    rx = Relaxed(task, args.seed, refit=not args.no_refit, pricing=args.pricing)
    original = task.score(task.model)
    merge = tie_merge(task, names)
    scorer = Scorer(task, args.heal_steps, args.seed, merge)
    tie = costs_for(task, "exact", args.seed)  # bench/evaluate.py's cached exact GGN costs
    bcfg = basis_config(task, args.seed)
    timings: dict[str, float] = {**(previous or {}).get("seconds", {}), "setup": time.perf_counter() - t0}
    rows: list[dict[str, Any]] = list((previous or {}).get("results", []))  # --resume: budgets done before
    for ratio in args.budgets:
        if any(r["ratio"] == ratio for r in rows):
            continue
        budget = math.floor(ratio * dense + 1e-9)
        config = SolveConfig(max_params_ratio=ratio, time_limit_s=10, seed=args.seed)
        t = time.perf_counter()
        plans: dict[str, tuple[str, SharingPlan, SharingProblem | None]] = {
            k: ("relaxed", *v) for k, v in relaxed_plans(rx, ratio, budget, config, args.top, scorer).items()}
        timings[f"relaxed-choice@{ratio}"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            r_pairs = largest_rank(fams, budget)
            bproblem = basis_problem(task, r_pairs, fams, args.seed, weighting=True)
            pool = candidate_plans(bproblem, config, top=args.top, per_pattern=2, normalized_top=args.top // 2)
            measured = measure_plans(task.model, task.validation, pool, bcfg, tokenizer=task.tokenizer,
                                     problem=bproblem, covs=rx.covs)
            plans["basis-shared-geo"] = ("basis", pool[int(np.argmin(measured))], bproblem)
            alone = per_layer_candidate(task.model, bproblem, config, rx.covs)
            if alone is not None:
                plans["svd"] = ("basis", *alone)
            plain = per_layer_candidate(task.model, bproblem, config, rx.plain_covs)
            if plain is not None and rx.plain_covs is not rx.covs:
                plans["svd-unshrunk"] = ("basis-unshrunk", *plain)
        except ValueError as exc:
            print(f"  {task.name} {ratio} basis: {exc}", file=sys.stderr)
        try:
            plans["tie"] = ("tie", tie_choice(task, tie, config, merge, args.top), None)
        except ValueError as exc:  # below tying's least reachable budget
            print(f"  {task.name} {ratio} tie: {exc}", file=sys.stderr)
        timings[f"other-choice@{ratio}"] = time.perf_counter() - t
        t = time.perf_counter()
        samples: dict[tuple[str, str], SampleScores] = {}  # (strategy, regime) -> per-sample parts, this budget
        for strategy, (scheme, plan, prob) in plans.items():
            if scheme == "relaxed":
                model = copy.deepcopy(task.model)
                report = apply_relaxed_plan(model, plan, prob, config=rx.config, covs=rx.final_covs)
                model, count = model.eval(), report.plan_params_shared
            elif scheme.startswith("basis"):
                model, count = scorer.basis_model(plan, prob, rx.final_plain_covs if scheme == "basis-unshrunk"
                                                  else rx.final_covs)
            else:
                model, count = scorer.tie_model(plan)
            assert count <= budget, (strategy, count, budget)
            ranks = sorted({s.rank for s in prob.families.values() if s.rank}) if prob is not None else []
            scores = scorer.score(model)
            samples |= {(strategy, regime): score.samples for regime, score in scores.items()
                        if score.samples is not None}
            rows += [{"ratio": ratio, "regime": regime, "strategy": strategy, "scheme": scheme,
                      "measured": score.metric, "loss": score.loss, "unique_params": count,
                      "params_ratio": count / dense, "rank": "/".join(map(str, ranks)),
                      "classes": len(set(plan.coloring.values())), "predicted": plan.objective,
                      "chosen": plan.strategy or "optimum", **against_geo(samples, strategy, regime)}
                     for regime, score in scores.items()]
            print(f"  {task.name} {ratio} {strategy}: {rows[-1]['measured']:.4g} ({rows[-1]['chosen']}, "
                  f"rank {rows[-1]['rank']}, {count / dense:.3f})", file=sys.stderr)
        timings[f"score@{ratio}"] = time.perf_counter() - t
        if progress is not None:
            progress(summary(task, original, rows, dense, fams, merge, rx, timings))
    return summary(task, original, rows, dense, fams, merge, rx, timings)


def against_geo(samples: dict[tuple[str, str], SampleScores], strategy: str, regime: str) -> dict[str, Any]:
    """``{"vs_geo": [difference, low, high]}``: the row's metric minus relaxed-geo's in the same regime
    and budget, with its paired bootstrap interval over the evaluation samples (bench/paired.py);
    empty for relaxed-geo itself or where a task gives no per-sample scores."""
    mine, geo = samples.get((strategy, regime)), samples.get(("relaxed-geo", regime))
    if strategy == "relaxed-geo" or mine is None or geo is None:
        return {}
    d = paired_difference(mine, geo)
    return {"vs_geo": [d.difference, d.low, d.high]}


def summary(task: Task, original: float, rows: list[dict[str, Any]], dense: int, fams: dict[str, Any], merge: Any,
            rx: Relaxed, timings: dict[str, float]) -> dict[str, Any]:
    return {"metric": task.metric, "higher_is_better": task.higher_is_better, "results": rows,
            "original": original, "dense_params": dense,
            "families": {k: {"d_out": f.d_out, "d_in": f.d_in, "layers": f.n} for k, f in fams.items()},
            "tie_merge": merge.merge, "rank_ratios": rx.options.rank_ratios, "shrinkage": rx.shrinkage,
            "final_shrinkage": rx.final_shrinkage,
            "splits": {k: len(getattr(task, k)) for k in ("calibration", "validation", "evaluation")},
            "seconds": {k: round(v, 1) for k, v in timings.items()}}


NOTES = [
    "Equal budgets: every row keeps at most B of the shareable parameters (params ratio below). A",
    "relaxed class of s members keeps d_out*d_in + s*r*(d_out + d_in); a relaxed class of one keeps",
    "its dense weight (no correction), so it stores r*(d_out + d_in) less than the solver counts.",
    "`relaxed-geo` is the product's measured choice (chosen: the candidate's name; relaxed-rank-x:",
    "the optimum at correction-rank share x). The fixed groupings take the largest rank that fits;",
    "`relaxed-sequence` its best share on the validation split. Timings on the shared 2-core machine.",
    "Every relaxed, basis and svd row whitens with the same covariances: the relaxed scheme's, each",
    "family's shrinkage intensity chosen by cross-fitting (hessian_worker/relaxed/holdout.py);",
    "`svd-unshrunk` whitens with the unshrunk covariances (the basis scheme's own). Every row is",
    "scored on the same evaluation samples: the paired tables give each row's metric minus",
    "relaxed-geo's with its bootstrap interval (bench/paired.py), so a lead the samples do not",
    "resolve reads as one. With healing, `relaxed-geo-heal` is what `compress --heal` installs:",
    "the best zero-shot candidates and each form of sharing's best healed, the least loss after",
    "healing on the validation split (chosen: its candidate, and how many were healed).",
]


def row_at(rows: list[dict[str, Any]], strategy: str, ratio: float, regime: str) -> dict[str, Any] | None:
    """The result row of ``strategy`` at budget ``ratio`` in ``regime``, None when there is none."""
    return next((x for x in rows if x["strategy"] == strategy and x["ratio"] == ratio and x["regime"] == regime),
                None)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Relaxed sharing (W = S_c + A_l B_l) against fixed groupings, tying, shared bases and SVD", "",
             *[f"Command: `{c}`  " for c in meta.get("commands", [meta["command"]])], f"{meta['machine']}; {meta['seconds']} s"
             f"{' (partial: the run goes on)' if meta.get('partial') else ''}; healing "
             f"{meta['heal_steps']} steps; pools: the {meta['top']} best plans + size-normalized best + pattern "
             f"plans; chosen plans refitted on calibration + validation: {'yes' if meta.get('refit') else 'no'}; "
             f"relaxed pair costs priced by {meta.get('pricing', 'kronecker')}",
             "", *NOTES, ""]
    for name, data in result.items():
        if name == "meta":
            continue
        rows = data["results"]
        ratios = sorted({r["ratio"] for r in rows}, reverse=True)
        better = "higher" if data["higher_is_better"] else "lower"
        fams = ", ".join(f"{k} {v['d_out']}x{v['d_in']}" for k, v in data["families"].items())
        lines += [f"## {name}: {data['metric']} ({better} is better; original {data['original']:.4g})", "",
                  f"{data['dense_params']} shareable params; families: {fams}. Splits: {data['splits']}. "
                  f"Tie merge: {data['tie_merge']}. Rank shares tried: {data['rank_ratios']}. "
                  f"Whitening shrinkage per family (cross-fitted): {data.get('shrinkage', {})}"
                  + (f"; of the refits: {data['final_shrinkage']}. " if data.get("final_shrinkage") is not None
                     and meta.get("refit") else ". ") +
                  f"Seconds: {data['seconds']}.", ""]
        for regime in sorted({r["regime"] for r in rows}, reverse=True):
            lines += [f"### {regime}: metric (distillation loss on the evaluation split)", "",
                      "| strategy | " + " | ".join(f"budget {r:g}" for r in ratios) + " |",
                      "|---" * (len(ratios) + 1) + "|"]
            for s in ROWS:
                cells = []
                for r in ratios:
                    x = row_at(rows, s, r, regime)
                    cells.append(f"{x['measured']:.4g} ({x['loss']:.3g})" if x else "")
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines.append("")
            if any("vs_geo" in x for x in rows if x["regime"] == regime):
                ahead = "negative" if data["higher_is_better"] else "positive"
                lines += [f"### {regime}: metric minus relaxed-geo's, paired {LEVEL:.0%} bootstrap interval over the "
                          f"evaluation samples (* where the interval excludes 0; {ahead}: relaxed-geo ahead)", "",
                          "| strategy | " + " | ".join(f"budget {r:g}" for r in ratios) + " |",
                          "|---" * (len(ratios) + 1) + "|"]
                for s in ROWS[1:]:
                    cells = []
                    for r in ratios:
                        x = row_at(rows, s, r, regime)
                        cells.append(PairedDifference(*x["vs_geo"]).cell() if x and "vs_geo" in x else "")
                    lines.append(f"| {s} | " + " | ".join(cells) + " |")
                lines.append("")
        lines += ["### plans: correction/basis rank, classes, params kept, chosen candidate", "",
                  "| budget | strategy | rank | classes | params ratio | predicted | measured loss | chosen |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ratios:
            for x in rows:
                if x["ratio"] == r and x["regime"] == "zero-shot":
                    pred = "" if x["predicted"] is None else f"{x['predicted']:.3g}"
                    lines.append(f"| {r:g} | {x['strategy']} | {x['rank']} | {x['classes']} | "
                                 f"{x['params_ratio']:.3f} | {pred} | {x['loss']:.3g} | {x['chosen']} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, reg) for n, d in result.items() if n != "meta"
              for reg in sorted({r["regime"] for r in d["results"]}, reverse=True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), dpi=110, squeeze=False)
    for col, (name, regime) in enumerate(panels):
        data, ax = result[name], axes[0][col]
        for s in ROWS:
            pts = sorted((r["ratio"], r["measured"]) for r in data["results"]
                         if r["strategy"] == s and r["regime"] == regime)
            if pts:
                style = "-o" if s == "relaxed-geo" else ("--s" if s in ("svd", "tie") else "-.")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=s, lw=2.2 if s == "relaxed-geo" else 1)
        ax.set_xlabel("budget (share of the shareable parameters)")
        ax.set_ylabel(data["metric"])
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{name}, {regime}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["minilm"], choices=TASKS)
    ap.add_argument("--quick", action="store_true", help="the CI-sized GPT (bench/tasks)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.67, 0.5, 0.4])
    ap.add_argument("--top", type=int, default=8, help="K best plans in the candidate pools")
    ap.add_argument("--heal-steps", type=int, default=0, help="healing steps for every strategy (0: zero-shot only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out", default=str(RESULTS / "eval-relaxed"))
    ap.add_argument("--no-refit", action="store_true",
                    help="install the fits the choice measured (calibration only), not refitted on calibration + validation")
    ap.add_argument("--pricing", choices=[p.value for p in RelaxedPricing], default=RelaxedPricing.kronecker.value,
                    help="how the relaxed rows' pair residuals are priced (RelaxedOptions.pricing)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the tasks and budgets already in the .json (same settings), run the rest")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    if args.resume and Path(args.out).with_suffix(".json").is_file():
        result = json.loads(Path(args.out).with_suffix(".json").read_text())
        if result.get("meta", {}).get("refit", False) != (not args.no_refit):  # results before refit: off
            sys.exit(f"{args.out}.json was made with refit {'on' if result['meta'].get('refit') else 'off'}: resume "
                     f"it {'without' if result['meta'].get('refit') else 'with'} --no-refit, or write to another --out")
        made = result.get("meta", {}).get("pricing", RelaxedPricing.kronecker.value)  # results before pricing: kronecker
        if made != args.pricing:
            sys.exit(f"{args.out}.json was made with --pricing {made}: resume it with that, or write to another --out")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    commands = [*result.get("meta", {}).get("commands", []), command]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(partial: bool) -> None:
        """The results so far (after every budget: a long run cut off still leaves its tables)."""
        result["meta"] = {"command": command, "commands": commands,
                          "machine": f"{platform.machine()} python {platform.python_version()} torch "
                                     f"{torch.__version__}, {args.threads} thread(s)",
                          "seconds": round(time.perf_counter() - t0, 1), "heal_steps": args.heal_steps,
                          "top": args.top, "refit": not args.no_refit, "pricing": args.pricing, "partial": partial}
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(markdown(result))

    for name in args.tasks:
        result[name] = evaluate_task(load_task(name, quick=args.quick, seed=args.seed), args,
                                     lambda data, name=name: (result.__setitem__(name, data), write(True)),
                                     previous=result.get(name))
    write(False)
    plot(result, out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
