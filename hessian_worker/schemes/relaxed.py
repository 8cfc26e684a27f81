"""The relaxed scheme: each class of layers shares one tensor S_c, each layer keeps a rank-r
correction A_ℓ B_ℓ of its own (hessian_worker/relaxed). Its plans may keep some families as shared
bases (families of scheme ``basis`` beside the relaxed ones), fitted under the same whitening."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hessian_worker.config import AnalyzeConfig
from hessian_worker.cost_source import made_with
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import Calibration, DataSource
from hessian_worker.losses import TaskLoss
from hessian_worker.merge import Merge
from hessian_worker.options import RelaxedPricing
from hessian_worker.prepare import Prepared, prepare
from hessian_worker.relaxed.analysis import (
    analyze_relaxed,
    candidate_pricer,
    fitted_layers,
    rank_of,
    relaxed_covariances,
)
from hessian_worker.relaxed.apply import apply_relaxed_plan
from hessian_worker.relaxed.candidates import rank_candidates
from hessian_worker.relaxed.io import load_relaxed, save_relaxed
from hessian_worker.relaxed.measure import RelaxedSubstitutes
from hessian_worker.relaxed.modules import has_relaxed_layers
from hessian_worker.schemes.base import DataParts, State, Substitutes
from hessian_worker.schemes.basis import disjoint_parts
from hessian_worker.tying import ApplyReport
from solver.planning import SolveConfig
from solver.schema import Scheme, SharingPlan, SharingProblem


class RelaxedScheme:
    name = Scheme.relaxed
    # healing a shortlist and the layerwise merge's split choice are built for tied tensors
    merge_split_choice = False

    def costs(self, model: nn.Module | str, data: DataSource, config: AnalyzeConfig, *,
              tokenizer: Any | None = None, loss_fn: TaskLoss | None = None) -> SharingProblem:
        return analyze_relaxed(model, data, config, tokenizer=tokenizer, loss_fn=loss_fn)

    def parts(self, fit: Calibration, config: Any) -> DataParts:
        """As the basis scheme: S_c and the corrections are fitted to the whitening data, so the
        candidates are measured on the other samples (``schemes.basis.disjoint_parts``)."""
        return disjoint_parts(fit, config)

    def merged_layers(self, problem: SharingProblem) -> list[str]:
        fitted = set(fitted_layers(problem))
        return [layer.name for layer in problem.layers if layer.name not in fitted]

    def state(self, model: nn.Module, data: Calibration, problem: SharingProblem, config: AnalyzeConfig,
              tokenizer: Any | None = None) -> State:
        """The whitening covariances of the layers it fits on ``data`` (None when not whitened)."""
        if not config.relaxed.whiten:
            return None
        prep = prepare(model, data, config, tokenizer=tokenizer)
        with torch.no_grad():
            return relaxed_covariances(prep.model, prep.data, fitted_layers(problem), config)

    def substitutes(self, prep: Prepared, problem: SharingProblem, config: AnalyzeConfig,
                    state: State) -> Substitutes | None:
        covs = dict(state) if state is not None else None
        if config.relaxed.whiten and covs is None:
            with torch.no_grad():
                covs = relaxed_covariances(prep.model, prep.data, fitted_layers(problem), config)
        return RelaxedSubstitutes(prep.model, problem, covs, config.relaxed)

    def extra_candidates(self, model: nn.Module, problem: SharingProblem, solve: SolveConfig, state: State,
                         config: AnalyzeConfig, *, data: Calibration | None = None,
                         tokenizer: Any | None = None) -> list[tuple[SharingPlan, SharingProblem]]:
        """The optimum at every other correction-rank share of ``config.relaxed.rank_ratios`` and at
        the budget-filling ranks (relaxed/candidates.py), priced as ``config.relaxed.pricing`` says
        (exact pricing reads ``data``, the costs' samples)."""
        covs = dict(state) if state is not None else None
        pricer = None  # kronecker: rank_candidates computes the spectra from the covariances
        if config.relaxed.pricing is RelaxedPricing.exact:
            if data is None:
                raise ValueError("exact relaxed pricing prices the candidates at other ranks on the costs' samples; "
                                 "pass data=")
            pricer = candidate_pricer(model, data, problem.layers, covs, config, tokenizer)
            # the pipeline's own analysis of these samples made the problem: its ranks are priced already
            if made_with(problem.source, config):
                pricer.remember(problem)
        return rank_candidates(model, problem, solve, covs, config.relaxed, spectra=pricer)

    def spend(self, model: nn.Module, plans: Sequence[SharingPlan], problem: SharingProblem, solve: SolveConfig,
              state: State, config: AnalyzeConfig) -> list[tuple[SharingPlan, SharingProblem]]:
        """As they are: the correction rank is the problem's, and the plans at the ranks that fill the
        budget come from ``extra_candidates`` (each with its own problem)."""
        return [(plan, problem) for plan in plans]

    def budget_note(self, plan: SharingPlan, problem: SharingProblem, ratio: float) -> str | None:
        """A relaxed plan's count moves in steps of whole classes at the problem's correction rank."""
        reached = plan.params.ratio if plan.params else 1.0
        if reached >= ratio * 0.99:
            return None
        return (f"keeps {reached:.4f} of the requested {ratio:g}: at correction rank(s) "
                f"{sorted(set(rank_of(problem).values()))} the count moves in steps of whole classes; the "
                "candidates at other correction ranks (measured beside it) fill the budget more closely")

    def installed_in(self, model: nn.Module) -> bool:
        return has_relaxed_layers(model)

    def save(self, model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
        return save_relaxed(model, plan, directory, source=source)

    def load(self, model: nn.Module, src: Path) -> SharingPlan:
        return load_relaxed(model, src)

    def apply(self, model: nn.Module, plan: SharingPlan, problem: SharingProblem | None,
              merge: Merge | str = Merge.mean, *, data: DataSource | None = None,
              config: AnalyzeConfig | None = None, tokenizer: Any | None = None, state: State = None,
              diag: dict[str, Tensor] | None = None, layerwise: LayerwiseCurvature | None = None) -> ApplyReport:
        if problem is None:
            raise ValueError("the relaxed scheme installs a plan with its problem (correction ranks per family)")
        return apply_relaxed_plan(model, plan, problem, merge, data=data, config=config, tokenizer=tokenizer,
                                  covs=dict(state) if state is not None else None, diag=diag)
