"""Where MiniLM's cross-domain loss comes from, and which lever of the layerwise merge closes it.

bench/cross_domain.py measures geo's cross-domain shift cross(A→B) − in(B→B). This study splits
it, for geo's plans at each ratio (chosen on each domain's validation split, shrinkage none), into

- the plan's part: plan chosen on A, merged with B's covariances, scored on B, minus in(B→B);
- the merge's part: plan chosen on B, merged with A's covariances, scored on B, minus in(B→B);

reports how well each domain's calibration rows pin the input covariances down (rows against the
layer width; the share of the other domain's input energy in the directions the calibration
covariance barely visits: eigenvalues below ``--floor`` of its mean), and then, with the plans
held fixed, scores the merge under each lever on both evaluation splits: a fixed shrinkage
intensity ρ (Ĝ = (1−ρ)G + ρ·tr(G)/d·I; ρ = 1 makes the merge the trace-weighted mean), the
merge's damping, and more calibration rows (extra sentences of the same domain).

    python bench/cross_domain_diagnosis.py --threads 1     # -> bench/results/cross_domain_diagnosis.{md,json}
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.corpus import corpus_sentences, splits
from bench.cross_domain import DOMAINS, domain_task, plans_of
from bench.evaluate import calibrated_runner, union
from hessian_worker import AnalyzeConfig, apply_plan
from hessian_worker.curvature.layerwise import (
    LayerwiseCurvature,
    SecondMoments,
    input_moments,
    linear_modules,
)
from hessian_worker.curvature.shrinkage import shrink
from hessian_worker.options import Shrinkage
from hessian_worker.prepare import prepare
from solver import SharingPlan, SolveConfig

RESULTS = Path(__file__).resolve().parent / "results"
RHOS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
DAMPINGS = [0.001, 0.01, 0.03, 0.1, 0.3, 1.0]


def moments_of(task, sentences: list[str], names: list[str]) -> dict[str, SecondMoments]:
    """Raw (unshrunk) input second moments of every named layer over the sentences."""
    config = AnalyzeConfig(distill=task.distill, progress=False)
    prep = prepare(task.model, sentences, config, tokenizer=task.tokenizer)
    with torch.no_grad():
        return input_moments(prep.model, prep.data, names)


def shrink_to_diagonal(cov: torch.Tensor, rho: float) -> torch.Tensor:
    """(1 − ρ) G + ρ diag(G): keeps every input's variance, pulls the correlations to zero."""
    out = (1.0 - rho) * cov
    out.diagonal().add_(rho * cov.diagonal())
    return out


def curvature(model: torch.nn.Module, moments: dict[str, SecondMoments], rho: float,
              target: str = "identity") -> LayerwiseCurvature:
    """The layerwise merge's covariances, shrunk by ρ toward tr(G)/d·I or toward diag(G)."""
    layers = linear_modules(model, list(moments))
    pull = shrink if target == "identity" else shrink_to_diagonal
    return LayerwiseCurvature({n: pull(m.covariance.clone(), rho) for n, m in moments.items()},
                              {n: t for n, (_, t) in layers.items()}, {n: rho for n in moments})


def score(task, plan: SharingPlan, layerwise: LayerwiseCurvature, data: list[str], damping: float = 0.01) -> float:
    """``task``'s evaluation score of the plan merged layerwise with the given covariances."""
    model = copy.deepcopy(task.model)
    config = AnalyzeConfig(distill=task.distill, progress=False, layerwise_damping=damping)
    apply_plan(model, plan, "layerwise", layerwise=layerwise, data=data, config=config, tokenizer=task.tokenizer)
    return task.score(model.eval())


def coverage(fit: SecondMoments, other: SecondMoments, floor: float) -> dict[str, float]:
    """How well ``fit``'s covariance covers ``other``'s inputs: numerical rank, and the share of
    tr(G_other) in the eigendirections of G_fit below ``floor`` × its mean eigenvalue."""
    g = fit.covariance.double()
    vals, vecs = torch.linalg.eigh(g)
    low = vals < floor * vals.mean()
    h = other.covariance.double()
    energy = float(torch.einsum("ik,ij,jk->", vecs[:, low], h, vecs[:, low]) / h.trace()) if low.any() else 0.0
    own = float(vals[low].sum() / vals.sum()) if low.any() else 0.0
    rank = int((vals > vals.max() * 1e-9).sum())
    return {"rows": fit.rows, "width": g.shape[0], "rank": rank, "low_dims": int(low.sum()),
            "own_low_energy": own, "other_low_energy": energy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(DOMAINS), default="minilm")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.67, 0.84])
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--normalized-top", type=int, default=8)
    ap.add_argument("--per-pattern", type=int, default=2)
    ap.add_argument("--choice-holdout", type=float, default=0.5)
    ap.add_argument("--extra", nargs="+", type=int, default=[64, 139],
                    help="extra same-domain sentences added to the merge's calibration rows")
    ap.add_argument("--floor", type=float, default=0.01, help="'barely visited': eigenvalue below floor × mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "cross_domain_diagnosis"))
    ap.add_argument("--report", action="store_true", help="only rewrite the .md from --out's json")
    ap.add_argument("--more", action="store_true", help="keep --out's plans and results; add the diagonal-target "
                    "shrinkage and the merge fitted on both domains' rows")
    args = ap.parse_args()
    if args.more:
        more_levers(args)
    if args.more or args.report:
        write(Path(args.out))
        return
    args.random_seeds = 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    doms = DOMAINS[args.model]
    tasks = {d: domain_task(args.model, d, args.seed) for d in doms}
    runners = {d: calibrated_runner(t, Shrinkage.none, args.seed)[0] for d, t in tasks.items()}
    names = [layer.name for layer in runners[doms[0]].problem.layers]
    fit_data = {d: union(t.calibration, t.validation) for d, t in tasks.items()}
    fit = {d: moments_of(tasks[d], fit_data[d], names) for d in doms}
    evals = {d: moments_of(tasks[d], tasks[d].evaluation, names) for d in doms}
    out: dict = {"meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                          "sentences": {d: len(fit_data[d]) for d in doms},
                          "corpus_size": {d: len(corpus_sentences(d)) for d in doms}}}

    # 1. coverage of the covariances
    cov: dict = {}
    for a in doms:
        for b in doms:
            per = [coverage(fit[a][n], evals[b][n], args.floor) for n in names]
            by_width: dict[int, list[dict]] = {}
            for c in per:
                by_width.setdefault(c["width"], []).append(c)
            cov[f"{a}->{b}"] = {str(w): {k: float(np.mean([c[k] for c in cs])) for k in cs[0]}
                                for w, cs in by_width.items()}
    out["coverage"] = cov
    print(json.dumps(cov, indent=1), flush=True)

    # 2. decomposition, 3. levers (plans fixed)
    out["ratios"] = {}
    for ratio in args.budgets:
        config = SolveConfig(max_params_ratio=ratio, time_limit_s=10, seed=args.seed)
        plans = {d: plans_of("geo", tasks[d], runners[d], config, "layerwise", args)[0] for d in doms}
        base = {d: curvature(tasks[d].model, fit[d], 0.0) for d in doms}
        grid = {f"{p}|{m}|{e}": score(tasks[e], plans[p], base[m], fit_data[m])
                for p in doms for m in doms for e in doms}
        print(ratio, json.dumps(grid, indent=1), flush=True)
        levers: dict = {"rho": {}, "damping": {}, "extra": {}}
        for a in doms:  # calibrated on a: plan and merge from a, scored on both splits
            levers["rho"][a] = {f"{r:g}": {e: score(tasks[e], plans[a], curvature(tasks[a].model, fit[a], r),
                                                    fit_data[a]) for e in doms} for r in RHOS}
            print(ratio, a, "rho", levers["rho"][a], flush=True)
            levers["damping"][a] = {f"{d:g}": {e: score(tasks[e], plans[a], base[a], fit_data[a], damping=d)
                                               for e in doms} for d in DAMPINGS}
            print(ratio, a, "damping", levers["damping"][a], flush=True)
            levers["extra"][a] = {}
            room = len(corpus_sentences(a)) - 16 - 64 - 128
            for n in args.extra:
                n = min(n, room)
                extra = splits((16, 64, 128, n), args.seed, a)[3]
                data = fit_data[a] + extra
                m = moments_of(tasks[a], data, names)
                levers["extra"][a][str(n)] = {e: score(tasks[e], plans[a], curvature(tasks[a].model, m, 0.0), data)
                                              for e in doms}
            print(ratio, a, "extra", levers["extra"][a], flush=True)
        out["ratios"][f"{ratio:g}"] = {"grid": grid, "levers": levers,
                                       "plans": {d: plans[d].model_dump(mode="json") for d in doms}}
        out["meta"]["seconds"] = round(time.perf_counter() - started, 1)
        Path(args.out).with_suffix(".json").write_text(json.dumps(out, indent=1))
    print(f"{time.perf_counter() - started:.0f} s")
    write(Path(args.out))


def markdown(out: dict) -> str:
    """The study's tables: decomposition, coverage, levers (cosine on each evaluation split)."""
    meta = out["meta"]
    doms = list(meta["sentences"])
    a, b = doms
    lines = ["# MiniLM cross-domain shift: plan or merge, and the merge's levers", "",
             f"Command: `{meta['command']}`  ", f"{meta['seconds']} s on the shared 2-core machine (one thread; "
             "other jobs running). Geo's plan per domain as bench/cross_domain.py makes it (shrinkage none; 8 best, 8 "
             f"normalized, 2 per pattern, choice holdout 0.5); merge fitted on calibration + validation "
             f"({meta['sentences'][a]} sentences per domain; corpora hold {meta['corpus_size']}). Scores: embedding "
             "cosine to the original on each domain's 64 evaluation sentences.", "",
             "## Decomposition of the shift cross(A→B) − in(B→B)", "",
             "plan part: plan chosen on A, merge fitted on B; merge part: plan chosen on B, merge fitted on A "
             "(both scored on B).", "",
             "| ratio | A→B | in(B→B) | cross(A→B) | shift | plan part | merge part |", "|---|---|---|---|---|---|---|"]
    for ratio, per in out["ratios"].items():
        g = per["grid"]
        for x, y in ((a, b), (b, a)):
            home = g[f"{y}|{y}|{y}"]
            lines.append(f"| {ratio} | {x}→{y} | {home:.4f} | {g[f'{x}|{x}|{y}']:.4f} | "
                         f"{g[f'{x}|{x}|{y}'] - home:+.4f} | {g[f'{x}|{y}|{y}'] - home:+.4f} | "
                         f"{g[f'{y}|{x}|{y}'] - home:+.4f} |")
    lines += ["", "## Coverage of the input covariances (mean over layers of each width)", "",
              "rows: calibration rows (tokens); low dims: eigenvalues of G_fit below 1% of their mean; energy: share "
              "of tr(G) of an evaluation split's inputs in those directions.", "",
              "| fitted on → evaluated on | width | rows | numerical rank | low dims | own energy there | "
              "other split's energy there |", "|---|---|---|---|---|---|---|"]
    for key, per in out["coverage"].items():
        for width, c in per.items():
            lines.append(f"| {key} | {width} | {c['rows']:.0f} | {c['rank']:.1f} | {c['low_dims']:.1f} | "
                         f"{c['own_low_energy']:.4f} | {c['other_low_energy']:.4f} |")
    titles = {"rho": "ρ toward tr(G)/d·I", "damping": "damping", "diagonal": "ρ toward diag(G)",
              "extra": "+ sentences"}
    for ratio, per in out["ratios"].items():
        lev = per["levers"]
        lines += ["", f"## Levers at {ratio} (plans fixed; cells: in-domain / cross-domain cosine)", ""]
        for cal in doms:
            other = b if cal == a else a
            lines += [f"calibrated on {cal}: in = on {cal}, cross = on {other}. damping: the merge's ridge as a share "
                      "of mean diag(G), toward the members' mean (default 0.01); + sentences: more same-domain "
                      "sentences in the merge's rows.", "",
                      "| lever | value | in | cross |", "|---|---|---|---|"]
            for kind, title in titles.items():
                for value, sc in lev.get(kind, {}).get(cal, {}).items():
                    lines.append(f"| {title} | {value} | {sc[cal]:.4f} | {sc[other]:.4f} |")
            if "both" in lev:
                sc = lev["both"][cal]
                lines.append(f"| merge fitted on both domains' rows | | {sc[cal]:.4f} | {sc[other]:.4f} |")
            lines.append("")
    return "\n".join(lines)


def write(out: Path) -> None:
    result = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


DIAGONAL_RHOS = [0.1, 0.3, 0.5, 0.7, 1.0]


def more_levers(args: argparse.Namespace) -> None:
    """Levers on --out's plans: shrinkage toward diag(G), and the merge fitted on both domains (a ceiling)."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    path = Path(args.out).with_suffix(".json")
    out = json.loads(path.read_text())
    doms = DOMAINS[args.model]
    tasks = {d: domain_task(args.model, d, args.seed) for d in doms}
    names = None
    fit: dict = {}
    out["meta"]["command"] += " ; " + " ".join([Path(sys.executable).name, *sys.argv])
    for ratio, per in out["ratios"].items():
        plans = {d: SharingPlan.model_validate(p) for d, p in per["plans"].items()}
        if names is None:
            from bench.evaluate import costs_for
            names = [layer.name for layer in costs_for(tasks[doms[0]], "exact", args.seed).layers]
            fit = {d: moments_of(tasks[d], union(tasks[d].calibration, tasks[d].validation), names) for d in doms}
            both = {n: SecondMoments(fit[doms[0]][n].total + fit[doms[1]][n].total,
                                     fit[doms[0]][n].rows + fit[doms[1]][n].rows) for n in names}
        data = {d: union(tasks[d].calibration, tasks[d].validation) for d in doms}
        levers = per["levers"]
        levers["diagonal"] = {}
        levers["both"] = {}
        for a in doms:
            levers["diagonal"][a] = {f"{r:g}": {e: score(tasks[e], plans[a], curvature(tasks[a].model, fit[a], r,
                                                                                       "diagonal"), data[a])
                                                for e in doms} for r in DIAGONAL_RHOS}
            print(ratio, a, "diagonal", levers["diagonal"][a], flush=True)
            levers["both"][a] = {e: score(tasks[e], plans[a], curvature(tasks[a].model, both, 0.0), data[a])
                                 for e in doms}
            print(ratio, a, "both", levers["both"][a], flush=True)
        out["meta"]["seconds"] += round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
