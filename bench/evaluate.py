"""Evaluation on real models: Geo-Sharing's plans against heuristic sharing at equal budgets.

Tasks (bench/tasks): MiniLM (pretrained all-MiniLM-L6-v2; embedding cosine to the original), a
small GPT-style LM trained here on the standard library's source (held-out perplexity) and a
residual MLP on scikit-learn's digits (test accuracy). Each task has disjoint seeded splits:
calibration (curvature costs and healing), validation (the measured choice among candidates) and
evaluation (every reported figure). Budgets are shares of the shareable parameters.

Strategies: ``geo`` is the product's pipeline (``hessian_worker.compress`` step by step: exact
GGN pair costs, the K best plans plus pattern plans, the least measured validation loss, a
curvature-weighted merge); ``geo-solver`` and ``geo-<backend>`` are a cost model's optimum alone
with a mean merge; the heuristics (weight-distance, sequence, cycle, cycle-rev, adjacent pairs,
all-share, random) use the mean merge, as published, and ``<pattern>+geo-merge`` rows give the
best patterns Geo-Sharing's merge too, so the merge's share of the gain shows. Geo-Sharing's merge
is the product's default (hessian_worker.merge_rule): the layerwise closed form when the
calibration + validation data give every tied layer a full-rank input covariance, else the
per-element curvature merge.

    python bench/evaluate.py --jobs 2         # full run -> bench/results/eval.{json,md}, plots
    python bench/evaluate.py --quick          # CI-sized: MiniLM and digits, two budgets
    python bench/evaluate.py --tasks minilm --budgets 0.84 0.67 --heal-steps 0
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

from bench.eval_jobs import common_options, plan_units, run_parallel
from bench.tasks import TASKS, Task, load_task
from geoshare.cli.model_flags import shrinkage_setting
from hessian_worker import (
    AnalyzeConfig,
    CompressConfig,
    HealConfig,
    analyze,
    apply_plan,
    heal,
    measure_loss,
)
from hessian_worker.choose import choose_healed
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import holdout_size, load_calibration
from hessian_worker.intensity_choice import choose_intensity, with_intensity
from hessian_worker.measure import measure_plans
from hessian_worker.merge_rule import default_merge
from hessian_worker.options import Shrinkage, ShrinkageSetting
from hessian_worker.pipeline import merge_covariances
from hessian_worker.ranking import spearman
from hessian_worker.tying import curvature_weights
from solver import SharingPlan, SharingProblem, SolveConfig, solve
from solver.baselines import baseline
from solver.candidates import candidate_plans
from solver.evaluate import objective

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / "cache"
HEURISTICS = ["sequence", "cycle", "cycle-rev", "adjacent-pairs", "all-share"]
GEO_MERGED = ["sequence", "adjacent-pairs"]  # heuristics also shown with Geo-Sharing's merge
# defaults of the full run and of the CI-sized one (--quick)
FULL = {"top": 16, "normalized_top": 16, "per_pattern": 4, "random_seeds": 10, "rank_plans": 50, "heal_steps": 100}
QUICK = {"top": 8, "normalized_top": 4, "per_pattern": 1, "random_seeds": 3, "rank_plans": 10, "heal_steps": 0}


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights, so cached costs never outlive the model they came from."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def weight_distances(model: torch.nn.Module, problem: SharingProblem) -> list[list[float | None]]:
    """||W_l - W_m||^2 within families (null across), the weight-distance clustering costs."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out: list[list[float | None]] = []
    for la in problem.layers:
        row: list[float | None] = []
        for lb in problem.layers:
            if la.family != lb.family:
                row.append(None)
            else:
                row.append(0.0 if la.name == lb.name else float(((params[la.name] - params[lb.name]) ** 2).sum()))
        out.append(row)
    return out


def code_version() -> str:
    """A short hash of the sources costs come from, so cached costs never outlive the code either."""
    root = Path(__file__).resolve().parent.parent / "hessian_worker"
    h = hashlib.sha1()
    for path in sorted([*root.glob("curvature/*.py"), root / "costs.py", root / "objective.py", root / "losses.py"]):
        h.update(path.read_bytes())
    return h.hexdigest()[:8]


def costs_for(task: Task, backend: str, seed: int) -> SharingProblem:
    """The backend's SharingProblem on the task's calibration data, cached on disk by its settings
    (the model's weights, the analysis config and the curvature code)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    n = len(task.calibration)
    config = AnalyzeConfig(backend=backend, kind="pairwise", seed=seed, batch_size=8, distill=task.distill, progress=True)
    # the relaxed scheme's options do not change these costs: left out, the caches made before they
    # existed still match
    settings = hashlib.sha1(config.model_dump_json(exclude={"progress", "relaxed"}).encode()).hexdigest()[:8]
    path = CACHE / f"{task.name}-{backend}-n{n}-{fingerprint(task.model)}-{settings}-{code_version()}.json"
    if path.is_file():
        return SharingProblem.model_validate_json(path.read_text())
    t = time.perf_counter()
    problem = analyze(copy.deepcopy(task.model), task.calibration, config, tokenizer=task.tokenizer)
    print(f"  {task.name} {backend}: costs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    path.write_text(problem.model_dump_json())
    return problem


def union(a: Any, b: Any) -> Any:
    """Two data splits as one (sentence lists or sample tensors)."""
    return a + b if isinstance(a, list) else torch.cat([a, b])


def healing(task: Task, steps: int, holdout: float) -> HealConfig | None:
    """The healing every strategy gets on a task (its learning rate and distillation loss, the best
    check on a held-out ``holdout`` of the data); None for 0 steps (zero-shot only)."""
    if not steps:
        return None
    return HealConfig(steps=steps, lr=task.heal_lr, distill=task.distill, holdout=holdout, progress=False)


class Runner:
    """Ties plans into copies of a task's model and scores them, zero-shot and healed.

    ``quiet`` carries the shrinkage setting of the merge's covariances; ``choice`` (shrinkage
    'held-out', layerwise merge): the (score samples, covariances fitted on other samples) a plan's
    intensity is chosen on (``merges_of``)."""

    def __init__(self, task: Task, heal: HealConfig | None, diag: dict[str, torch.Tensor] | None,
                 covariances: LayerwiseCurvature | None, *, quiet: AnalyzeConfig | None = None,
                 problem: SharingProblem | None = None) -> None:
        self.task, self.heal, self.diag, self.covariances = task, heal, diag, covariances
        self.quiet = quiet or AnalyzeConfig(distill=task.distill, progress=False)
        self.data = union(task.calibration, task.validation)  # healing and the layerwise merge
        self.problem = problem
        self.distances = weight_distances(task.model, problem) if problem is not None else None
        self.choice: tuple[Any, LayerwiseCurvature] | None = None

    def tied(self, plan: SharingPlan, merge: str, layerwise: LayerwiseCurvature | None = None) -> torch.nn.Module:
        """A tied copy of the model; ``layerwise`` replaces the runner's covariances."""
        model = copy.deepcopy(self.task.model)
        apply_plan(model, plan, merge, diag=self.diag, layerwise=layerwise or self.covariances, data=self.data,
                   config=self.quiet, tokenizer=self.task.tokenizer)
        return model.eval()

    def loss(self, model: torch.nn.Module) -> float:
        return measure_loss(model, self.task.model, self.task.evaluation, self.quiet, tokenizer=self.task.tokenizer)

    def measure(self, plan: SharingPlan, merge: str, healed: bool = True,
                layerwise: LayerwiseCurvature | None = None) -> dict[str, tuple[float, float]]:
        """{regime: (metric, loss change on the evaluation split)}; healed only with a heal config;
        ``layerwise`` replaces the runner's covariances."""
        model = self.tied(plan, merge, layerwise)
        out = {"zero-shot": (self.task.score(model), self.loss(model))}
        if self.heal is not None and healed:
            model = self.healed(model)
            out["healed"] = (self.task.score(model), self.loss(model))
        return out

    def healed(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (a tied copy) healed in place against the original on the calibration +
        validation data, as every strategy is healed."""
        assert self.heal is not None
        heal(model, self.task.model, self.data, self.heal, tokenizer=self.task.tokenizer)
        return model.eval()


def label(setting: ShrinkageSetting) -> str:
    """A shrinkage setting as the tables write it."""
    return setting.value if isinstance(setting, Shrinkage) else f"{setting:g}"


def calibrated_runner(task: Task, setting: ShrinkageSetting, seed: int,
                      choice_holdout: float = 0.5) -> tuple[Runner, str]:
    """A Runner whose merge is Geo-Sharing's default on the task's calibration + validation data,
    with input covariances shrunk as ``setting`` says; and that merge's name. With 'held-out' and
    the layerwise merge, ``runner.choice`` holds the choice's (score samples, fitted covariances)
    the intensity is chosen on (None otherwise, or without held-out samples)."""
    problem = costs_for(task, "exact", seed)
    names = [layer.name for layer in problem.layers]
    data = union(task.calibration, task.validation)
    merge = default_merge(task.model, load_calibration(data, tokenizer=task.tokenizer), names).value
    quiet = AnalyzeConfig(distill=task.distill, progress=False, shrinkage=setting)
    diag = covariances = None
    if merge == "curvature":
        diag = curvature_weights(task.model, task.calibration, names, quiet, tokenizer=task.tokenizer)
    else:
        covariances = merge_covariances(task.model, data, names, quiet, task.tokenizer)
    runner = Runner(task, None, diag, covariances, quiet=quiet, problem=problem)  # the choice's covariances alike
    if setting is Shrinkage.held_out and merge == "layerwise":
        score_data, fitted = choice_data(task, problem, runner, merge, choice_holdout)
        runner.choice = None if fitted is covariances else (score_data, fitted)
    return runner, merge


def merges_of(plans: list[SharingPlan], task: Task, runner: Runner) -> tuple[list, list[float] | None]:
    """Each plan's layerwise covariances (None: the runner's) and, with shrinkage 'held-out', the
    intensity compress would choose for it (hessian_worker.intensity_choice) on the choice's held-out
    part of the validation split, applied to the runner's covariances."""
    if runner.choice is None:
        return [None] * len(plans), None
    score_data, fitted = runner.choice
    rhos = [choose_intensity(task.model, score_data, p, fitted, runner.quiet, tokenizer=task.tokenizer).intensity
            for p in plans]
    return [with_intensity(runner.covariances, r) for r in rhos], rhos


def choice_data(task: Task, problem: SharingProblem, runner: Runner, merge: str,
                holdout: float) -> tuple[Any, LayerwiseCurvature | None]:
    """(samples the choice scores on, the layerwise covariances it merges with), as compress's
    ``choice_holdout`` splits them: with the layerwise merge, calibration + the first part of
    validation fit the covariances and the rest of validation is scored on."""
    held = holdout_size(holdout, len(task.validation))
    if merge != "layerwise" or not held:
        return task.validation, runner.covariances
    cut = len(task.validation) - held
    return task.validation[cut:], merge_covariances(task.model, union(task.calibration, task.validation[:cut]),
                                                    [layer.name for layer in problem.layers], runner.quiet,
                                                    task.tokenizer)


def geo_candidates(task: Task, problem: SharingProblem, config: SolveConfig, runner: Runner, merge: str,
                   args: argparse.Namespace) -> tuple[list[SharingPlan], list[float]]:
    """The product's pool, the K best plans (plain and size-normalized) and the pattern plans, with
    each one's loss on the validation split after Geo-Sharing's merge (the zero-shot choice is the least).

    As compress does (``choice_holdout``): with the layerwise merge, the candidates are merged with
    the covariances of calibration + the first part of validation and scored on the rest of it."""
    pool = candidate_plans(problem, config, top=args.top, per_pattern=args.per_pattern, normalized_top=args.normalized_top)
    score_data, covariances = choice_data(task, problem, runner, merge, args.choice_holdout)
    measured = measure_plans(task.model, score_data, pool, runner.quiet, merge=merge, tokenizer=task.tokenizer,
                             diag=runner.diag, layerwise=covariances)
    return pool, measured


def geo_healed(task: Task, pool: list[SharingPlan], measured: list[float], runner: Runner, merge: str,
               args: argparse.Namespace, layerwise: LayerwiseCurvature | None = None,
               ) -> tuple[SharingPlan, dict[str, tuple[float, float]]]:
    """The product's choice when it heals (choose_healed): the shortlist healed as every strategy is,
    compared on the validation split; the winner's healed model is scored on the evaluation split.
    ``layerwise``: the merge's covariances as the zero-shot winner's intensity shrank them (compress
    heals its shortlist with those), else the runner's."""
    assert runner.heal is not None
    choice = choose_healed(task.model, pool, measured, runner.data, task.validation, runner.heal, runner.quiet,
                           best=args.heal_shortlist, merge=merge, tokenizer=task.tokenizer, diag=runner.diag,
                           layerwise=layerwise or runner.covariances)
    model = choice.model.eval()
    return choice.plan, {"healed": (task.score(model), runner.loss(model))}


def rank_agreement(problems: dict[str, SharingProblem], runner: Runner, n: int, seed: int) -> dict:
    """Predicted vs measured over n random plans at budgets 0.8 to 0.95: Spearman per backend."""
    rng = np.random.default_rng(seed)
    any_problem = next(iter(problems.values()))
    plans, measured = [], []
    for i in tqdm(range(n), desc=f"{runner.task.name}: random plans", leave=False):
        ratio = float(rng.uniform(0.8, 0.95))
        plan = baseline(any_problem, "random", SolveConfig(max_params_ratio=ratio), seed=seed + i)
        if plan.status.value == "infeasible":
            continue
        plans.append(plan)
        measured.append(runner.loss(runner.tied(plan, "mean")))
    return {
        "plans": len(plans),
        "spearman": {b: spearman([objective(p, plan.coloring) for plan in plans], measured) for b, p in problems.items()},
    }


def evaluate_task(task: Task, args: argparse.Namespace, budgets: list[float], backends: list[str]) -> dict:
    """Every strategy at every budget on one task: the rows of eval.json and the rank agreement."""
    problems = {b: costs_for(task, b, args.seed) for b in backends}
    yardstick = problems["exact"]  # predicted figures and the baselines' class allocation
    # the merge's curvature, measured once and shared by the choice and every tie
    runner, geo_merge = calibrated_runner(task, args.shrinkage, args.seed, args.choice_holdout)
    heal_config = runner.heal = healing(task, args.heal_steps, args.heal_holdout)
    distances = runner.distances
    names = ["geo", "geo-solver", *(f"geo-{b}" for b in backends if b != "exact")]
    strategies = [*names, "weight-distance", *HEURISTICS, *(f"{h}+geo-merge" for h in GEO_MERGED), "random"]
    if args.strategies:
        unknown = sorted(set(args.strategies) - set(strategies))
        if unknown:
            raise SystemExit(f"unknown strategies {unknown}; choose from {strategies}")
        strategies = [x for x in strategies if x in args.strategies]
    rows = []
    for ratio, strategy in tqdm([(r, s) for r in budgets for s in strategies], desc=f"{task.name}: plans"):
        config = SolveConfig(max_params_ratio=ratio, time_limit_s=10, seed=args.seed)
        merge = geo_merge if strategy == "geo" or strategy.endswith("+geo-merge") else "mean"
        base = strategy.removesuffix("+geo-merge")
        healed_choice, pool = None, None
        if strategy == "geo":
            pool, pool_measured = geo_candidates(task, yardstick, config, runner, geo_merge, args)
            plans = [pool[int(np.argmin(pool_measured))]]
        elif strategy.startswith("geo"):
            backend = "exact" if strategy == "geo-solver" else strategy.removeprefix("geo-")
            plans = [solve(problems[backend], config)]
        elif strategy == "weight-distance":
            plans = [baseline(yardstick, strategy, config, distances=distances)]
        elif strategy == "random":
            plans = [baseline(yardstick, "random", config, seed=s) for s in range(args.random_seeds)]
        else:
            plans = [baseline(yardstick, base, config)]
        plans = [p for p in plans if p.status.value != "infeasible"]
        if not plans:
            continue  # e.g. all-share cannot meet a loose budget exactly and is not reported there
        # Geo-Sharing's merge as compress installs it: with shrinkage 'held-out', each plan's intensity
        merges, rhos = merges_of(plans, task, runner) if merge == geo_merge else ([None] * len(plans), None)
        if pool is not None and heal_config is not None:
            healed_choice = geo_healed(task, pool, pool_measured, runner, geo_merge, args, merges[0])
        measured = [runner.measure(p, merge, healed=healed_choice is None, layerwise=m)
                    for p, m in zip(plans, merges, strict=True)]
        if healed_choice is not None:
            measured[0].update(healed_choice[1])
        for regime in measured[0]:
            chosen = healed_choice[0] if healed_choice is not None and regime == "healed" else plans[0]
            scored = [chosen] if strategy == "geo" else plans
            rows.append({
                "ratio": ratio,
                "regime": regime,
                "strategy": strategy,
                "merge": merge,
                "measured": float(np.mean([m[regime][0] for m in measured])),
                "loss": float(np.mean([m[regime][1] for m in measured])),
                "predicted": float(np.mean([objective(yardstick, p.coloring) for p in scored])),
                "unique_params": int(np.mean([p.params.shared for p in scored])),
                "params_ratio": float(np.mean([p.params.ratio for p in scored])),
                "chosen": (chosen.strategy or "optimum") if strategy == "geo" else None,
                "intensity": float(np.mean(rhos)) if rhos else None,
            })
    # --rank-plans 0 (a run of some budgets only, combined later): no rank agreement, so a combine keeps another run's
    agreement = {"rank_agreement": rank_agreement(problems, runner, args.rank_plans, args.seed)} if args.rank_plans else {}
    return {"metric": task.metric, "higher_is_better": task.higher_is_better, "results": rows,
            "heal_steps": args.heal_steps, "heal_holdout": args.heal_holdout, "random_seeds": args.random_seeds,
            **agreement, "merge": geo_merge, "shrinkage": label(args.shrinkage), "splits": {k: len(getattr(task, k)) for k in ("calibration", "validation", "evaluation")},
            "original": task.score(task.model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: minilm + digits, budgets 0.8 and 0.67, no healing")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, help="default: all (quick: minilm digits)")
    ap.add_argument("--budgets", nargs="+", type=float, help="default: 0.9 0.8 0.67 0.5 (quick: 0.8 0.67)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, help="K best plans measured by geo (plus the ones below; 16, quick 8)")
    ap.add_argument("--normalized-top", type=int, help="K best by size-normalized pair costs, measured by geo (16, quick 4)")
    ap.add_argument("--per-pattern", type=int, help="budget-filling allocations per pattern, measured by geo (4, quick 1)")
    ap.add_argument("--random-seeds", type=int, help="random plans averaged per budget (10, quick 3)")
    ap.add_argument("--rank-plans", type=int, help="random plans for predicted-vs-measured (50, quick 10; 0: none)")
    ap.add_argument("--heal-steps", type=int, help="healing steps for every strategy (100, quick 0: zero-shot only)")
    ap.add_argument("--heal-shortlist", type=int, default=2,
                    help="geo, healed: the best zero-shot candidates healed in the choice (plus each pattern's best)")
    ap.add_argument("--choice-holdout", type=float, default=0.5,
                    help="geo, layerwise merge: share of the validation split candidates are scored on, kept out of "
                         "the covariances they are merged with (compress's choice_holdout; 0: score on all of it)")
    ap.add_argument("--shrinkage", type=shrinkage_setting, default=CompressConfig.model_fields["shrinkage"].default,
                    metavar="SETTING", help="Geo-Sharing's merge: the covariances' shrinkage as compress takes it "
                    "(none|ledoit-wolf|oas|held-out|RHO; default compress's: held-out, each plan's intensity of least "
                    "loss on the choice's held-out samples)")
    ap.add_argument("--heal-holdout", type=float, default=HealConfig().holdout,
                    help="share of the healing data every strategy's heal keeps out to pick its best step (step 0 "
                         "included); 0: heal on all, keep the last step")
    ap.add_argument("--threads", type=int, help="torch threads (runs side by side on 2 cores: 1 each)")
    ap.add_argument("--strategies", nargs="+", help="only these strategies (default: all); --combine a partial run "
                    "after a full one to replace its cells")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="merge finished runs' eval.json files into --out")
    ap.add_argument("--jobs", type=int, default=1, help="parallel single-threaded processes, one (task, budget) each "
                    "(bench/eval_jobs.py; 2 on a 2-core machine)")
    ap.add_argument("--prepare", action="store_true", help="only compute and cache the tasks' curvature costs")
    ap.add_argument("--out", default=str(RESULTS / "eval"))
    args = ap.parse_args()
    if args.combine:
        combine([Path(p) for p in args.combine], Path(args.out))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    tasks = args.tasks or (["minilm", "digits"] if args.quick else list(TASKS))
    backends = ["exact", "diagonal"] if args.quick else ["exact", "projected", "diagonal", "layerwise"]
    budgets = {name: args.budgets or ([0.8, 0.67] if args.quick else [0.9, *([0.84] if name == "minilm" else []), 0.8, 0.67, 0.5])
               for name in tasks}
    t0 = time.perf_counter()
    if args.jobs > 1:
        parts = run_parallel(plan_units(tasks, budgets, args.rank_plans), tasks, common_options(args), args.jobs)
        result = merge_runs(parts)
        result["meta"].update(command=" ".join([Path(sys.executable).name, *sys.argv]),
                              seconds=round(time.perf_counter() - t0, 1))
        write(result, Path(args.out))
        return
    if args.prepare:
        for name in tasks:
            task = load_task(name, quick=args.quick, seed=args.seed)
            for backend in backends:
                costs_for(task, backend, args.seed)
        return
    torch.manual_seed(args.seed)
    result: dict[str, Any] = {}
    for name in tasks:
        task = load_task(name, quick=args.quick, seed=args.seed)
        if args.quick:  # CI-sized choice: fewer validation samples to measure every candidate on
            task.validation = task.validation[:32]
        result[name] = evaluate_task(task, args, budgets[name], backends)
    result["meta"] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__}",
        "seconds": round(time.perf_counter() - t0, 1),
        "heal_steps": args.heal_steps, "heal_holdout": args.heal_holdout,
        "random_seeds": args.random_seeds,
        "top": args.top,
        "normalized_top": args.normalized_top,
        "per_pattern": args.per_pattern,
    }
    write(result, Path(args.out))


def write(result: dict, out: Path) -> None:
    """eval.json, eval.md and one plot per model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    for name in result:
        if name != "meta":
            plot(result, name, out.parent / f"{out.name}-{name}.png")
    print(markdown(result))


def combine(paths: list[Path], out: Path) -> None:
    """One result from several runs (see merge_runs), written like a run of its own."""
    write(merge_runs([json.loads(path.read_text()) for path in paths]), out)


def merge_runs(parts: list[dict]) -> dict:
    """Runs of other tasks are added; a later run of a task already there replaces its cells
    (ratio, regime, strategy) and its rank agreement. Every run's command is kept."""
    result: dict[str, Any] = {}
    metas = []
    for part in parts:
        part = dict(part)
        meta = part.pop("meta")
        metas.append(meta)
        for name, task in part.items():  # each run's settings stay with its tasks
            task.setdefault("heal_steps", meta["heal_steps"])
            task.setdefault("random_seeds", meta.get("random_seeds"))
            if name not in result:
                result[name] = task
                continue
            newer = {_cell(row): row for row in task["results"]}
            kept = [newer.pop(_cell(row), row) for row in result[name]["results"]]
            result[name]["results"] = kept + list(newer.values())
            if task.get("rank_agreement") is not None:  # a run without one (--rank-plans 0) keeps the earlier
                result[name]["rank_agreement"] = task["rank_agreement"]
    result["meta"] = {**metas[0], "command": " ; ".join(m["command"] for m in metas),
                      "seconds": max(m["seconds"] for m in metas), "runs": metas}
    return result


def _cell(row: dict) -> tuple[float, str, str]:
    return row["ratio"], row["regime"], row["strategy"]


def _intensities(rows: list[dict]) -> str:
    """The range of the intensities the held-out choice picked ('' when none was chosen)."""
    rhos = [r["intensity"] for r in rows if r.get("intensity") is not None]
    return f" (chosen intensities {min(rhos):g}-{max(rhos):g})" if rhos else ""


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Evaluation", "", f"Command: `{meta['command']}`  ",
             f"{meta['machine']}; {meta['seconds']} s; geo measures the "
             f"{meta['top']} best plans, the {meta['normalized_top']} best by size-normalized costs and "
             f"{meta['per_pattern']} allocations per pattern", ""]
    for model, data in result.items():
        if model == "meta":
            continue
        rows = data["results"]
        ratios = sorted({r["ratio"] for r in rows}, reverse=True)
        strategies = list(dict.fromkeys(r["strategy"] for r in rows))
        better = "higher" if data["higher_is_better"] else "lower"
        splits = data["splits"]
        lines += [f"## {model}: {data['metric']} ({better} is better; original {data['original']:.4g}; "
                  f"{splits['calibration']} calibration / {splits['validation']} validation / "
                  f"{splits['evaluation']} evaluation samples; Geo-Sharing's merge: {data.get('merge')}, its "
                  f"covariances' shrinkage {data.get('shrinkage', 'none')}{_intensities(rows)}; "
                  f"healing {data.get('heal_steps', meta['heal_steps'])} steps, keeping the best of every "
                  f"{HealConfig().check_every} on a held-out {data.get('heal_holdout', meta.get('heal_holdout', 0))} "
                  f"of its data; random: mean of "
                  f"{data.get('random_seeds', meta.get('random_seeds'))} seeds)", ""]
        for regime in sorted({r["regime"] for r in rows}, reverse=True):
            lines += [f"### {regime}", "", "| strategy | " + " | ".join(f"{r:g}" for r in ratios) + " |",
                      "|---" * (len(ratios) + 1) + "|"]
            for s in strategies:
                cells = []
                for r in ratios:
                    hit = [x for x in rows if x["strategy"] == s and x["ratio"] == r and x["regime"] == regime]
                    cells.append(f"{hit[0]['measured']:.4g}" if hit else "")
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines.append("")
        agreement = data.get("rank_agreement")
        if agreement:
            lines += [f"### predicted vs measured loss change, {agreement['plans']} random plans (budgets 0.8-0.95)", "",
                      "| backend | Spearman |", "|---|---|"]
            lines += [f"| {b} | {v:.3f} |" for b, v in agreement["spearman"].items()]
            lines.append("")
    return "\n".join(lines)


def plot(result: dict, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = result[name]
    regimes = sorted({r["regime"] for r in data["results"]}, reverse=True)
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.5), dpi=120, squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        for s in dict.fromkeys(r["strategy"] for r in data["results"]):
            pts = sorted((r["ratio"], r["measured"]) for r in data["results"] if r["strategy"] == s and r["regime"] == regime)
            style = "-o" if s.startswith("geo") else ("-." if s.endswith("+geo-merge") else "--.")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=s, lw=2 if s == "geo" else 1)
        ax.set_xlabel("share of shareable parameters kept")
        ax.set_ylabel(data["metric"])
        ax.invert_xaxis()
        if not data["higher_is_better"]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"{name}, {regime}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
