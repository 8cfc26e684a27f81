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
from torch import Tensor, nn

from hessian_worker.analysis import analyze, prepare
from hessian_worker.apply import apply_plan, curvature_weights
from hessian_worker.basis.analysis import has_basis, rank_of
from hessian_worker.basis.per_layer import per_layer_candidate
from hessian_worker.basis.scales import basis_covariances
from hessian_worker.choose import choose_healed, choose_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import Calibration, DataSource, holdout_size, load_calibration
from hessian_worker.healing import HealReport, heal
from hessian_worker.measure import measure_loss, measure_plans
from hessian_worker.merge_rule import default_merge
from hessian_worker.options import Backend, CompressConfig, DType, HealConfig, Merge
from solver.candidates import candidate_plans
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
    costs_data, choice_data = _costs_and_choice(fit, config)
    problem = analyze(model, costs_data, acfg, tokenizer=tokenizer)
    solve_config = SolveConfig(max_params_ratio=config.ratio, time_limit_s=config.time_limit_s, seed=config.seed)
    pool = candidate_plans(problem, solve_config, top=config.top, min_distance=config.min_distance,
                           per_pattern=config.per_pattern, normalized_top=config.normalized_top)
    quiet = acfg.model_copy(update={"progress": False})
    basis = has_basis(problem)
    in_basis = set(rank_of(problem)) if basis else set()
    tied = [layer.name for layer in problem.layers if layer.name not in in_basis]
    merge = resolve_merge(config, model, choice_data, tied)
    # the curvature-merge weights, measured once for every candidate and the final tie
    diag = (curvature_weights(model, costs_data, tied, quiet, tokenizer=tokenizer)
            if merge is Merge.curvature and tied else None)
    # the layerwise merge's input covariances: on all the choice data for the tie (and the healed
    # choice, whose winner is installed as is); the zero-shot choice merges with covariances of one
    # part of it and scores on the other
    layerwise = scoring = None
    score_data = choice_data
    if merge is Merge.layerwise and tied and not basis:
        layerwise = merge_covariances(model, choice_data, tied, quiet, tokenizer)
        merge_part, score_part = choice_parts(choice_data, config)
        if score_part is not None:
            score_data, scoring = score_part, merge_covariances(model, merge_part, tied, quiet, tokenizer)
    # the whitening of the bases, measured once for every candidate and the final apply
    covs = _basis_covs(model, costs_data, problem, quiet, tokenizer) if basis else None
    choice = choose_plan(model, score_data, pool, acfg, merge=merge, tokenizer=tokenizer, diag=diag,
                         problem=problem if basis else None, covs=covs, layerwise=scoring or layerwise)
    measured = list(zip(pool, choice.measured, strict=True))
    plan, plan_problem = choice.plan, problem
    if basis:  # plain per-layer SVD at the same budget, measured beside the pool (its own ranks)
        alone = per_layer_candidate(model, problem, solve_config, covs, acfg.basis)
        if alone is not None:
            value = measure_plans(model, choice_data, [alone[0]], acfg, merge=merge, tokenizer=tokenizer,
                                  problem=alone[1], covs=covs)[0]
            measured.append((alone[0], value))
            if value < choice.measured[choice.index]:
                plan, plan_problem = alone
    heal_config = HealConfig(steps=config.heal_steps, lr=config.heal_lr, holdout=config.heal_holdout, seed=config.seed,
                             batch_size=config.batch_size, device=config.device, distill=config.distill,
                             progress=config.progress) if config.heal_steps else None
    healed_choice = None
    if heal_config is not None and config.heal_choice and not basis:
        healed_choice = choose_healed(model, pool, choice.measured, fit, choice_data, heal_config, acfg,
                                      best=config.heal_shortlist, merge=merge, tokenizer=tokenizer, diag=diag,
                                      layerwise=layerwise)
        plan = healed_choice.plan
    reference = copy.deepcopy(model)
    if basis:
        from hessian_worker.basis.apply import apply_basis_plan

        report = apply_basis_plan(model, plan, plan_problem, merge, data=costs_data, config=quiet,
                                  tokenizer=tokenizer, covs=covs, diag=diag)
    else:
        report = apply_plan(model, plan, merge, data=choice_data, config=quiet, tokenizer=tokenizer, diag=diag,
                            layerwise=layerwise)
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
        return LayerwiseCurvature.collect(prep.model, prep.data, names)


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


def _basis_covs(model: nn.Module, data: Calibration, problem: SharingProblem, config: AnalyzeConfig,
               tokenizer: Any | None) -> dict[str, Tensor] | None:
    """The whitening covariances of the basis layers on ``data`` (output-scaled unless
    ``output_weighting`` is off; None when the bases are not whitened)."""
    if not config.basis.whiten:
        return None
    prep = prepare(model, data, config, tokenizer=tokenizer)
    with torch.no_grad():
        return basis_covariances(prep.model, prep.data, list(rank_of(problem)), config)


def _label(plan: SharingPlan) -> str:
    return plan.strategy or "optimum"


def _subset(calib: Calibration, samples: int | None, config: CompressConfig) -> Calibration:
    """A seeded subset of ``samples`` rows (all of them when None or not fewer)."""
    if samples is None or samples >= calib.num_samples:
        return calib
    _, subset = calib.split(samples, seed=config.seed + 1, batch_size=config.batch_size)
    return subset


def _costs_and_choice(fit: Calibration, config: CompressConfig) -> tuple[Calibration, Calibration]:
    """(costs data, choice data). Tie: the curvature subset, and all of ``fit`` for the choice.
    Basis: disjoint parts (the curvature subset, default half, and the rest), because the bases are
    fitted to the activations of the data they are whitened with (on few samples the inputs span
    fewer directions than d_in, so the low-rank layers reproduce those samples almost exactly), and
    measuring candidates there ranks them by that overfit, not by what they keep."""
    if config.scheme is not Scheme.basis:
        return _subset(fit, config.curvature_samples, config), fit
    n = fit.num_samples
    samples = config.curvature_samples or max(1, n // 2)
    if n < 2 or samples >= n:
        return fit, fit  # nothing left over: the choice sees the whitening samples
    rest, subset = fit.split(samples, seed=config.seed + 1, batch_size=config.batch_size)
    return subset, rest


def split_holdout(calib: Calibration, config: CompressConfig) -> tuple[Calibration, Calibration | None]:
    n = calib.num_samples
    if n < 4:
        return calib, None
    return calib.split(config.holdout or max(1, n // 4), seed=config.seed, batch_size=config.batch_size)
