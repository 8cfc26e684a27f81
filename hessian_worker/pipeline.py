"""One call from model to compressed model: costs, candidates, measured choice, merge, heal.

The product's main path (docs/design.md §The compress chain): the quadratic cost model ranks
plans only roughly, so the
solver's K best diverse plans and the pattern strategies at the same budget become candidates,
each is measured by a real forward pass on the calibration data, the best is tied into the model
with a curvature-weighted merge (optionally healed), and the held-out loss change is reported
beside the predicted one. With healing, a shortlist (the best zero-shot plans and each pattern's
best) is tied and healed as the final model is, and the least loss after healing decides
(``choose.choose_healed``): contiguous plans heal further than their zero-shot loss suggests.
Curvature costs are the expensive part, so they may use a subset of the calibration samples
(``curvature_samples``); the measured choice uses all of them. With the layerwise merge, whose
covariances are fitted to data, each candidate is merged with the covariances of one part of the
choice samples and scored on the other (``choice_holdout``), so the choice does not favour the plans
the merge overfits; the final tie uses the covariances of all of them. With ``shrinkage='held-out'``
the chosen plan is then measured on the same held-out samples with those covariances shrunk by each
intensity of a short grid, and the final tie uses the intensity of least loss
(hessian_worker.intensity_choice).

With ``scheme='basis'`` the same chain shares low-rank bases instead of whole tensors: basis
costs (layerwise, whitened, output-weighted into predicted loss changes), the same candidate pool
with each plan's ranks raised until it spends the budget (the scheme's ``spend``:
hessian_worker.basis.fill), plus plain per-layer SVD filled the same way (hessian_worker.basis.per_layer,
so the choice never loses to it on the choice data), each candidate measured with its low-rank
weights B_c·C_ℓ substituted (hessian_worker.basis.measure), and the chosen plan installed as
BasisLinear modules; bases are whitened by the (output-scaled) input covariances of the curvature
samples, the same for the measured choice and the final apply, and the choice is measured on the
other samples.

With ``scheme='auto'`` every registered scheme runs that chain at the same ratio on common samples
(costs, whitening and merge statistics on one half, every candidate scored on the other), and the
candidate of least measured loss wins whatever its scheme. Every candidate is also predicted by one
second-order model of the whole loss at its real weights (``measure.measure_and_predict``), so
predictions of different schemes are on one scale (docs/design.md §One cost scale).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from hessian_worker.analysis import analyze
from hessian_worker.choose import choose_healed
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import Calibration, DataSource, holdout_size, load_calibration
from hessian_worker.distributed import refuse_in_job
from hessian_worker.errors import GeoShareError
from hessian_worker.healing import HealReport, heal
from hessian_worker.intensity_choice import IntensityChoice, choose_intensity, with_intensity
from hessian_worker.measure import measure_and_predict, measure_loss, measure_plans
from hessian_worker.merge_rule import default_merge
from hessian_worker.options import (
    AUTO_SCHEME,
    Backend,
    CompressConfig,
    DType,
    HealConfig,
    Merge,
    Shrinkage,
)
from hessian_worker.prepare import prepare
from hessian_worker.ranking import spearman
from hessian_worker.schemes import SCHEMES, DataParts, SharingScheme, State, scheme_for
from hessian_worker.tying import curvature_weights
from solver.candidates import candidate_plans
from solver.errors import BudgetInfeasible
from solver.planning import SolveConfig
from solver.schema import Scheme, SharingPlan, SharingProblem


def resolve_merge(config: CompressConfig, model: nn.Module, data: Calibration, names: list[str]) -> Merge:
    """The merge ``config`` asks for; by default layerwise with that backend, else the rule of
    ``merge_rule.default_merge`` (layerwise when ``data`` pins the input covariances down)."""
    if config.merge is not None:
        return config.merge
    if config.backend is Backend.layerwise:
        return Merge.layerwise
    return default_merge(model, data, names) if names else Merge.curvature


class Candidate(BaseModel):
    strategy: str
    predicted: float
    measured: float
    params_ratio: float
    healed: float | None = Field(None, description="Loss change on the choice data after healing, for the candidates "
                                 "the heal-aware choice healed.")
    scheme: Scheme | None = Field(None, description="The candidate's sharing scheme.")
    unique_params: int | None = Field(None, description="Unique shareable parameters the candidate keeps.")
    second_order: float | None = Field(
        None, description="Second-order prediction of the whole model's loss change under the candidate's real "
        "weights (exact GGN, on the samples it is measured on): one scale for every scheme, unlike `predicted`, "
        "the scheme's own cost model (the solver's objective).")


class SchemeSummary(BaseModel):
    """One scheme's part in a compress: its best candidate and how well its predictions ranked."""

    scheme: Scheme
    candidates: int
    chosen: str | None = Field(None, description="Its candidate of least measured loss (None: no candidate).")
    measured: float | None = None
    params_ratio: float | None = Field(None, description="Share of the shareable parameters its best candidate keeps.")
    spearman: float | None = Field(None, description="Of second_order against measured over its candidates.")
    note: str | None = Field(None, description="Why it keeps less than the ratio (more than 1% below), or why it "
                             "has no candidate.")


class CompressReport(BaseModel):
    plan: SharingPlan
    chosen: str
    merge: Merge
    candidates: list[Candidate]
    problem: SharingProblem = Field(description="The chosen plan's problem: the curvature costs the candidates came "
                                    "from, or, when the per-layer candidate (scheme basis) wins, its own ranks and costs.")
    unique_params: int
    params_ratio: float
    predicted_loss_change: float
    measured_loss_change: float | None = Field(description="On the held-out samples, after healing if any.")
    heal: HealReport | None = None
    scheme: Scheme | None = Field(None, description="The scheme installed (with scheme auto: the one whose candidate "
                                  "lost least).")
    schemes: list[SchemeSummary] | None = Field(None, description="Per scheme measured: its best candidate, its "
                                                "Spearman and why it falls short of the ratio, if it does.")
    spearman: float | None = Field(None, description="Spearman of the candidates' second_order predictions against "
                                   "their measured losses, over every candidate of every scheme.")
    shrinkage_intensity: float | None = Field(None, description="With shrinkage 'held-out' and the layerwise merge: "
                                              "the intensity the installed merge's covariances were shrunk by, of least "
                                              "loss on the choice's held-out samples (None: not chosen).")
    shrinkage_losses: dict[str, float] | None = Field(None, description="With shrinkage_intensity: the chosen plan's "
                                                      "loss on those samples at each intensity tried.")


@dataclass
class SchemeRun:
    """One scheme's chain up to the choice: its costs, candidates at the budget, and their losses."""

    scheme: SharingScheme
    parts: DataParts
    problem: SharingProblem
    config: AnalyzeConfig
    merge: Merge
    state: State
    diag: dict[str, torch.Tensor] | None
    layerwise: LayerwiseCurvature | None  # the final tie's (and the healed choice's) merge covariances
    candidates: list[tuple[SharingPlan, SharingProblem]]  # the solver's pool (spent) first, then the extras
    pool: int  # how many of them are the solver's
    measured: list[float]
    predicted: list[float | None]
    intensity: IntensityChoice | None = None  # shrinkage 'held-out': the layerwise merge's measured choice

    def best(self) -> int:
        return min(range(len(self.measured)), key=lambda i: (self.measured[i], i))


def compress(model: nn.Module, data: Any, config: CompressConfig, *, tokenizer: Any | None = None) -> CompressReport:
    """Compresses ``model`` in place to ``config.ratio`` of its shareable parameters.

    With ``scheme='auto'`` every registered scheme runs its chain at the same ratio on the same
    samples (``common_parts``) and the candidate of least measured loss, of whichever scheme, is
    installed.

    Raises:
        BudgetInfeasible, DataError, DiscoveryError: with the fix in the message.
        DistributedError: in a torch.distributed job of several processes (the choice, merge,
            healing and save of a model in memory do not split; a decoder checkpoint's streamed
            ``compress_checkpoint`` does).
    """
    refuse_in_job("the in-memory compress")
    calib = load_calibration(data, tokenizer=tokenizer, samples=config.samples, batch_size=config.batch_size, seed=config.seed)
    fit, held = split_holdout(calib, config)
    common = common_parts(fit, config) if config.scheme == AUTO_SCHEME else None
    runs, skipped, errors = [], [], []
    for scheme in schemes_of(config):
        try:
            runs.append(run_scheme(scheme, model, fit, config, common, tokenizer))
        except GeoShareError as exc:  # under auto, a scheme that cannot reach the ratio is left out, said why
            if common is None:
                raise
            errors.append(exc)
            skipped.append(SchemeSummary(scheme=scheme.name, candidates=0, note=str(exc)))
    if not runs:
        raise errors[0]
    run = min(runs, key=lambda r: r.measured[r.best()])  # the first scheme on a tie
    index = run.best()
    plan, plan_problem = run.candidates[index]
    quiet = run.config.model_copy(update={"progress": False})
    heal_config = HealConfig(steps=config.heal_steps, lr=config.heal_lr, holdout=config.heal_holdout, seed=config.seed,
                             batch_size=config.batch_size, device=config.device, distill=config.distill,
                             progress=config.progress) if config.heal_steps else None
    healed_choice = None
    if heal_config is not None and config.heal_choice:
        healed_choice = choose_healed(model, [p for p, _ in run.candidates], run.measured, fit, run.parts.choice,
                                      heal_config, run.config, best=config.heal_shortlist, merge=run.merge,
                                      tokenizer=tokenizer, diag=run.diag, layerwise=run.layerwise,
                                      problems=[q for _, q in run.candidates], state=run.state)
        plan, plan_problem = run.candidates[healed_choice.index]
    reference = copy.deepcopy(model)
    state = final_state(run, model, plan_problem, quiet, tokenizer)
    report = run.scheme.apply(model, plan, plan_problem, run.merge, data=run.parts.apply, config=quiet,
                              tokenizer=tokenizer, state=state, diag=run.diag, layerwise=run.layerwise)
    healed = None
    if healed_choice is not None and state is run.state:
        # the winner was installed and healed in the choice exactly as here: take its weights (a
        # factored scheme's refit on other samples installs other weights: those are healed below)
        model.load_state_dict(healed_choice.model.state_dict())
        healed = healed_choice.heal
    elif heal_config is not None:
        healed = heal(model, reference, fit, heal_config, tokenizer=tokenizer)
    held_change = measure_loss(model, reference, held, quiet) if held is not None else None
    candidates = [candidate for r in runs for candidate in _candidates(r, healed_choice if r is run else None)]
    return CompressReport(
        plan=plan,
        chosen=_label(plan),
        merge=run.merge,
        candidates=candidates,
        problem=plan_problem,
        unique_params=report.unique_params_after,
        params_ratio=plan.params.ratio if plan.params else 1.0,
        predicted_loss_change=plan.objective,
        measured_loss_change=held_change,
        heal=healed,
        scheme=run.scheme.name,
        schemes=[_summary(r, config.ratio) for r in runs] + skipped,
        spearman=_spearman(candidates),
        shrinkage_intensity=run.intensity.intensity if run.intensity else None,
        shrinkage_losses={f"{r:g}": v for r, v in run.intensity.losses.items()} if run.intensity else None,
    )


def final_state(run: SchemeRun, model: nn.Module, problem: SharingProblem, config: AnalyzeConfig,
                tokenizer: Any | None) -> State:
    """The chosen plan's fitting state: the candidates' own when the apply part is the costs part,
    else measured again on the apply part (a factored scheme's refit on every sample not held out;
    bench/results/refit.md)."""
    if run.state is None or run.parts.apply is run.parts.costs:
        return run.state
    return run.scheme.state(model, run.parts.apply, problem, config, tokenizer)


def schemes_of(config: CompressConfig) -> list[SharingScheme]:
    """The scheme ``config`` names, or with ``auto`` every registered one (a new scheme joins by
    registering in hessian_worker.schemes.SCHEMES)."""
    if config.scheme == AUTO_SCHEME:
        return list(SCHEMES.values())
    return [scheme_for(config.scheme)]


def common_parts(fit: Calibration, config: CompressConfig) -> DataParts:
    """The samples every scheme shares under ``auto``: costs, whitening and the merges' statistics on
    one part (``curvature_samples``, default half), candidates scored on the other.

    Why: schemes fit different things to data (a basis is whitened by its inputs, the layerwise
    merge solves with its covariances), and scored on samples it was fitted to, a candidate looks
    better than it is, by more for the scheme that adapts more (on MiniLM the second-order loss of a
    basis plan is 0.11 on its whitening samples, 0.9 on others). Scored on samples no scheme saw,
    the comparison is fair; the final apply then uses the winner's own samples (its ``parts``).
    ``apply`` here is the costs part; ``run_scheme`` takes each scheme's own.
    """
    n = fit.num_samples
    samples = config.curvature_samples or max(1, n // 2)
    if n < 2 or samples >= n:
        return DataParts(costs=fit, choice=fit, apply=fit)
    rest, subset = fit.split(samples, seed=config.seed + 1, batch_size=config.batch_size)
    return DataParts(costs=subset, choice=rest, apply=subset)


def run_scheme(scheme: SharingScheme, model: nn.Module, fit: Calibration, config: CompressConfig,
               common: DataParts | None, tokenizer: Any | None) -> SchemeRun:
    """One scheme's costs, candidates at the budget (the solver's pool spent, plus the scheme's own)
    and their measured and predicted losses, on its own parts of ``fit`` or on ``common`` ones."""
    acfg = config.analyze_config(DType.float32, scheme=scheme.name)
    own = scheme.parts(fit, config)
    parts = own if common is None else DataParts(costs=common.costs, choice=common.choice, apply=own.apply)
    problem = analyze(model, parts.costs, acfg, tokenizer=tokenizer)
    solve_config = SolveConfig(max_params_ratio=config.ratio, time_limit_s=config.time_limit_s, seed=config.seed)
    infeasible = None
    try:
        pool = candidate_plans(problem, solve_config, top=config.top, min_distance=config.min_distance,
                               per_pattern=config.per_pattern, normalized_top=config.normalized_top)
    except BudgetInfeasible as exc:  # the problem's plans cannot reach it; the scheme's own candidates may
        pool, infeasible = [], exc
    quiet = acfg.model_copy(update={"progress": False})
    tied = scheme.merged_layers(problem)
    merge = resolve_merge(config, model, parts.choice, tied)
    # the curvature-merge weights, measured once for every candidate and the final tie
    diag = (curvature_weights(model, parts.costs, tied, quiet, tokenizer=tokenizer)
            if merge is Merge.curvature and tied else None)
    # the layerwise merge's input covariances: on the scheme's own choice data for the tie (and the
    # healed choice, whose winner is installed as is); candidates are merged with covariances of
    # other samples than they are scored on: one part of the choice data, or under auto the costs part
    layerwise = scoring = None
    score_data = parts.choice
    if merge is Merge.layerwise and tied and scheme.merge_split_choice:
        layerwise = merge_covariances(model, own.choice, tied, quiet, tokenizer)
        if common is not None:
            scoring = merge_covariances(model, parts.costs, tied, quiet, tokenizer)
        else:
            merge_part, score_part = choice_parts(parts.choice, config)
            if score_part is not None:
                score_data, scoring = score_part, merge_covariances(model, merge_part, tied, quiet, tokenizer)
    # what the scheme measures once for every candidate and the final apply (basis: the whitening)
    state = scheme.state(model, parts.costs, problem, quiet, tokenizer)
    spent = scheme.spend(model, pool, problem, solve_config, state, acfg)
    candidates = spent + scheme.extra_candidates(model, problem, solve_config, state, acfg, data=parts.costs,
                                                 tokenizer=tokenizer)
    if not candidates and infeasible is not None:
        raise infeasible
    outcomes = _measure(model, score_data, candidates, acfg, config.predict, merge=merge, tokenizer=tokenizer,
                        diag=diag, covs=state, layerwise=scoring or layerwise)
    run = SchemeRun(scheme=scheme, parts=parts, problem=problem, config=acfg, merge=merge, state=state, diag=diag,
                    layerwise=layerwise, candidates=candidates, pool=len(spent),
                    measured=[m for m, _ in outcomes], predicted=[p for _, p in outcomes])
    if config.shrinkage is Shrinkage.held_out and layerwise is not None and scoring is not None:
        # the winner's merge at each intensity, on the samples the candidates were scored on
        plan, plan_problem = candidates[run.best()]
        run.intensity = choose_intensity(model, score_data, plan, scoring, quiet, tokenizer=tokenizer,
                                         problem=plan_problem, diag=diag, covs=state)
        run.layerwise = with_intensity(layerwise, run.intensity.intensity)
    return run


def _measure(model: nn.Module, data: Calibration, candidates: list[tuple[SharingPlan, SharingProblem]],
             config: AnalyzeConfig, predict: bool, **kwargs: Any) -> list[tuple[float, float | None]]:
    """(measured, predicted or None) of every candidate, one pass per distinct problem."""
    out: list[tuple[float, float | None]] = [(0.0, None)] * len(candidates)
    groups: dict[int, list[int]] = {}
    for i, (_, problem) in enumerate(candidates):
        groups.setdefault(id(problem), []).append(i)
    for indices in groups.values():
        plans, problem = [candidates[i][0] for i in indices], candidates[indices[0]][1]
        if predict:
            values = measure_and_predict(model, data, plans, config, problem=problem, **kwargs)
        else:
            values = [(m, None) for m in measure_plans(model, data, plans, config, problem=problem, **kwargs)]
        for i, value in zip(indices, values, strict=True):
            out[i] = value
    return out


def _candidates(run: SchemeRun, healed: Any | None) -> list[Candidate]:
    return [Candidate(strategy=_label(p), predicted=p.objective, measured=m,
                      params_ratio=p.params.ratio if p.params else 1.0,
                      healed=healed.healed.get(i) if healed is not None else None,
                      scheme=run.scheme.name, unique_params=p.params.shared if p.params else None,
                      second_order=pred)
            for i, ((p, _), m, pred) in enumerate(zip(run.candidates, run.measured, run.predicted, strict=True))]


def _summary(run: SchemeRun, ratio: float) -> SchemeSummary:
    index = run.best()
    plan, problem = run.candidates[index]
    return SchemeSummary(scheme=run.scheme.name, candidates=len(run.candidates), chosen=_label(plan),
                         measured=run.measured[index], params_ratio=plan.params.ratio if plan.params else 1.0,
                         spearman=spearman([p for p in run.predicted if p is not None],
                                           [m for m, p in zip(run.measured, run.predicted, strict=True)
                                            if p is not None]),
                         note=run.scheme.budget_note(plan, problem, ratio))


def _spearman(candidates: list[Candidate]) -> float | None:
    pairs = [(c.second_order, c.measured) for c in candidates if c.second_order is not None]
    return spearman([p for p, _ in pairs], [m for _, m in pairs])


def merge_covariances(model: nn.Module, data: DataSource, names: list[str], config: AnalyzeConfig,
                      tokenizer: Any | None = None) -> LayerwiseCurvature:
    """The input covariances of the layerwise merge over ``data`` (the model is not changed)."""
    prep = prepare(model, data, config, tokenizer=tokenizer)
    with torch.no_grad():
        return LayerwiseCurvature.collect(prep.model, prep.data, names, shrinkage=config.shrinkage)


def choice_parts(choice: Calibration, config: CompressConfig) -> tuple[Calibration, Calibration | None]:
    """(merge part, score part) of the choice data: ``choice_holdout`` of the samples, seeded, are
    scored on and the rest fit the merge; (choice, None) when the share is 0 or leaves a part empty.

    Why: fitted and scored on the same samples, the layerwise merge ranks candidates by how well
    it overfits them (MiniLM at 0.84: Spearman of the choice's scores with held-out losses 0.69 in
    sample, 0.95 out of sample; bench/results/merge_bias_study.md)."""
    held = holdout_size(config.choice_holdout, choice.num_samples)
    if not held:
        return choice, None
    return choice.split(held, seed=config.seed + 2, batch_size=config.batch_size)


def _label(plan: SharingPlan) -> str:
    return plan.strategy or "optimum"


def split_holdout(calib: Calibration, config: CompressConfig) -> tuple[Calibration, Calibration | None]:
    n = calib.num_samples
    if n < 4:
        return calib, None
    return calib.split(config.holdout or max(1, n // 4), seed=config.seed, batch_size=config.batch_size)
