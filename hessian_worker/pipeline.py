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
the merge overfits; the final tie uses the covariances of all of them.

With ``scheme='basis'`` the same chain shares low-rank bases instead of whole tensors: basis
costs (layerwise, whitened, output-weighted into predicted loss changes), the same candidate pool
plus plain per-layer SVD at the ranks that fill the same budget (hessian_worker.basis.per_layer, so
the choice never loses to it on the choice data), each candidate measured with its low-rank
weights B_c·C_ℓ substituted (hessian_worker.basis.measure), and the chosen plan installed as
BasisLinear modules; bases are whitened by the (output-scaled) input covariances of the curvature
samples, the same for the measured choice and the final apply, and the choice is measured on the
other samples.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from hessian_worker.analysis import analyze
from hessian_worker.choose import choose_healed, choose_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import Calibration, DataSource, holdout_size, load_calibration
from hessian_worker.healing import HealReport, heal
from hessian_worker.measure import measure_loss, measure_plans
from hessian_worker.merge_rule import default_merge
from hessian_worker.options import Backend, CompressConfig, DType, HealConfig, Merge
from hessian_worker.prepare import prepare
from hessian_worker.schemes import scheme_for
from hessian_worker.tying import curvature_weights
from solver.candidates import candidate_plans
from solver.planning import SolveConfig
from solver.schema import SharingPlan, SharingProblem


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


def compress(model: nn.Module, data: Any, config: CompressConfig, *, tokenizer: Any | None = None) -> CompressReport:
    """Compresses ``model`` in place to ``config.ratio`` of its shareable parameters.

    Raises:
        BudgetInfeasible, DataError, DiscoveryError: with the fix in the message.
    """
    acfg = config.analyze_config(DType.float32)
    calib = load_calibration(data, tokenizer=tokenizer, samples=config.samples, batch_size=config.batch_size, seed=config.seed)
    fit, held = split_holdout(calib, config)
    scheme = scheme_for(config.scheme)
    parts = scheme.parts(fit, config)
    problem = analyze(model, parts.costs, acfg, tokenizer=tokenizer)
    solve_config = SolveConfig(max_params_ratio=config.ratio, time_limit_s=config.time_limit_s, seed=config.seed)
    pool = candidate_plans(problem, solve_config, top=config.top, min_distance=config.min_distance,
                           per_pattern=config.per_pattern, normalized_top=config.normalized_top)
    quiet = acfg.model_copy(update={"progress": False})
    tied = scheme.merged_layers(problem)
    merge = resolve_merge(config, model, parts.choice, tied)
    # the curvature-merge weights, measured once for every candidate and the final tie
    diag = (curvature_weights(model, parts.costs, tied, quiet, tokenizer=tokenizer)
            if merge is Merge.curvature and tied else None)
    # the layerwise merge's input covariances: on all the choice data for the tie (and the healed
    # choice, whose winner is installed as is); the zero-shot choice merges with covariances of one
    # part of it and scores on the other
    layerwise = scoring = None
    score_data = parts.choice
    if merge is Merge.layerwise and tied and scheme.merge_split_choice:
        layerwise = merge_covariances(model, parts.choice, tied, quiet, tokenizer)
        merge_part, score_part = choice_parts(parts.choice, config)
        if score_part is not None:
            score_data, scoring = score_part, merge_covariances(model, merge_part, tied, quiet, tokenizer)
    # what the scheme measures once for every candidate and the final apply (basis: the whitening)
    state = scheme.state(model, parts.costs, problem, quiet, tokenizer)
    choice = choose_plan(model, score_data, pool, acfg, merge=merge, tokenizer=tokenizer, diag=diag,
                         problem=problem, covs=state, layerwise=scoring or layerwise)
    measured = list(zip(pool, choice.measured, strict=True))
    plan, plan_problem, best = choice.plan, problem, choice.measured[choice.index]
    # the scheme's own candidates at the same budget (basis: plain per-layer SVD), each with its problem
    for extra, extra_problem in scheme.extra_candidates(model, problem, solve_config, state, acfg):
        value = measure_plans(model, parts.choice, [extra], acfg, merge=merge, tokenizer=tokenizer,
                              problem=extra_problem, covs=state)[0]
        measured.append((extra, value))
        if value < best:
            plan, plan_problem, best = extra, extra_problem, value
    heal_config = HealConfig(steps=config.heal_steps, lr=config.heal_lr, holdout=config.heal_holdout, seed=config.seed,
                             batch_size=config.batch_size, device=config.device, distill=config.distill,
                             progress=config.progress) if config.heal_steps else None
    healed_choice = None
    if heal_config is not None and config.heal_choice and scheme.heal_aware_choice:
        healed_choice = choose_healed(model, pool, choice.measured, fit, parts.choice, heal_config, acfg,
                                      best=config.heal_shortlist, merge=merge, tokenizer=tokenizer, diag=diag,
                                      layerwise=layerwise)
        plan = healed_choice.plan
    reference = copy.deepcopy(model)
    report = scheme.apply(model, plan, plan_problem, merge, data=parts.apply, config=quiet, tokenizer=tokenizer,
                          state=state, diag=diag, layerwise=layerwise)
    healed = None
    if healed_choice is not None:  # the winner was healed in the choice, exactly as below: take its weights
        model.load_state_dict(healed_choice.model.state_dict())
        healed = healed_choice.heal
    elif heal_config is not None:
        healed = heal(model, reference, fit, heal_config, tokenizer=tokenizer)
    held_change = measure_loss(model, reference, held, quiet) if held is not None else None
    return CompressReport(
        plan=plan,
        chosen=_label(plan),
        merge=merge,
        candidates=[Candidate(strategy=_label(p), predicted=p.objective, measured=m,
                              params_ratio=p.params.ratio if p.params else 1.0,
                              healed=healed_choice.healed.get(i) if healed_choice is not None else None)
                    for i, (p, m) in enumerate(measured)],
        problem=plan_problem,
        unique_params=report.unique_params_after,
        params_ratio=plan.params.ratio if plan.params else 1.0,
        predicted_loss_change=plan.objective,
        measured_loss_change=held_change,
        heal=healed,
    )


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
