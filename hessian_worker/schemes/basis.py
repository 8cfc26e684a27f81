"""The basis scheme: each class of layers shares one low-rank basis, each layer keeps its own
coefficients (hessian_worker/basis)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hessian_worker.basis.analysis import analyze_basis, rank_of
from hessian_worker.basis.apply import apply_basis_plan
from hessian_worker.basis.fill import ALLOCATED, UNIFORM, basis_budget_note, fill_plan
from hessian_worker.basis.io import load_basis, save_basis
from hessian_worker.basis.measure import BasisSubstitutes
from hessian_worker.basis.modules import has_basis_layers
from hessian_worker.basis.per_layer import per_layer_candidate
from hessian_worker.basis.scales import basis_covariances
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import Calibration, DataSource
from hessian_worker.factored.layers import dense_weights
from hessian_worker.losses import TaskLoss
from hessian_worker.merge import Merge
from hessian_worker.prepare import Prepared, prepare
from hessian_worker.schemes.base import DataParts, State, Substitutes
from hessian_worker.tying import ApplyReport
from solver.planning import SolveConfig, with_config
from solver.schema import Scheme, SharingPlan, SharingProblem


def disjoint_parts(fit: Calibration, config: Any) -> DataParts:
    """Disjoint parts: the curvature subset (default half) for the costs and the whitening the
    candidates are fitted with, the rest for the choice; the chosen plan is then fitted on every
    sample (``config.refit``; else on the subset, as measured). The bases are fitted to the
    activations of the data they are whitened with (on few samples the inputs span fewer
    directions than d_in, so the low-rank layers reproduce those samples almost exactly), and
    measuring candidates there would rank them by that overfit, not by what they keep; once the
    choice is made, more samples only make the fit generalize better."""
    n = fit.num_samples
    samples = config.curvature_samples or max(1, n // 2)
    if n < 2 or samples >= n:
        return DataParts(costs=fit, choice=fit, apply=fit)  # nothing left over: the choice sees them
    rest, subset = fit.split(samples, seed=config.seed + 1, batch_size=config.batch_size)
    return DataParts(costs=subset, choice=rest, apply=fit if config.refit else subset)


class BasisScheme:
    name = Scheme.basis
    # healing a shortlist and the layerwise merge's split choice are built for tied tensors
    merge_split_choice = False

    def costs(self, model: nn.Module | str, data: DataSource, config: AnalyzeConfig, *,
              tokenizer: Any | None = None, loss_fn: TaskLoss | None = None) -> SharingProblem:
        return analyze_basis(model, data, config, tokenizer=tokenizer, loss_fn=loss_fn)

    def parts(self, fit: Calibration, config: Any) -> DataParts:
        return disjoint_parts(fit, config)

    def merged_layers(self, problem: SharingProblem) -> list[str]:
        in_basis = set(rank_of(problem))
        return [layer.name for layer in problem.layers if layer.name not in in_basis]

    def state(self, model: nn.Module, data: Calibration, problem: SharingProblem, config: AnalyzeConfig,
              tokenizer: Any | None = None) -> State:
        """The whitening covariances of the basis layers on ``data`` (output-scaled unless
        ``output_weighting`` is off; None when the bases are not whitened)."""
        if not config.basis.whiten:
            return None
        prep = prepare(model, data, config, tokenizer=tokenizer)
        with torch.no_grad():
            return basis_covariances(prep.model, prep.data, list(rank_of(problem)), config)

    def substitutes(self, prep: Prepared, problem: SharingProblem, config: AnalyzeConfig,
                    state: State) -> Substitutes | None:
        covs = dict(state) if state is not None else None
        if config.basis.whiten and covs is None:
            with torch.no_grad():
                covs = basis_covariances(prep.model, prep.data, list(rank_of(problem)), config)
        return BasisSubstitutes(prep.model, problem, covs if config.basis.whiten else None, config.basis)

    def extra_candidates(self, model: nn.Module, problem: SharingProblem, solve: SolveConfig, state: State,
                         config: AnalyzeConfig, *, data: Calibration | None = None,
                         tokenizer: Any | None = None) -> list[tuple[SharingPlan, SharingProblem]]:
        """Plain per-layer SVD at the ranks that spend the same budget, so the choice never loses to
        it: at the problem's rank proportions, and at the ranks the cost model allocates (basis.fill)."""
        covs = dict(state) if state is not None else None
        out: list[tuple[SharingPlan, SharingProblem]] = []
        for start in (UNIFORM, ALLOCATED):
            found = per_layer_candidate(model, problem, solve, covs, config.basis, start=start)
            if found is not None and all(_ranks(found[1]) != _ranks(p) for _, p in out):  # one plan measured once
                out.append(found)
        return out

    def spend(self, model: nn.Module, plans: Sequence[SharingPlan], problem: SharingProblem, solve: SolveConfig,
              state: State, config: AnalyzeConfig) -> list[tuple[SharingPlan, SharingProblem]]:
        """Every plan's classes at the ranks that spend the budget (basis.fill, from the problem's
        rank proportions); a plan that no rank fits stays as it is."""
        full = with_config(problem, solve)
        budget = full.budget_params()
        if budget is None:
            return [(plan, problem) for plan in plans]
        weights = dense_weights(model, list(rank_of(problem)))
        covs = dict(state) if state is not None else None
        out, curves = [], {}  # the pool's plans share most classes: their error curves are computed once
        for plan in plans:
            filled = fill_plan(plan, full, budget, weights, covs, damping=config.basis.damping, curves=curves)
            out.append((filled.plan, filled.problem) if filled is not None else (plan, problem))
        return out

    def budget_note(self, plan: SharingPlan, problem: SharingProblem, ratio: float) -> str | None:
        return basis_budget_note(plan.params.ratio if plan.params else 1.0, ratio, problem)

    def installed_in(self, model: nn.Module) -> bool:
        return has_basis_layers(model)

    def save(self, model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
        return save_basis(model, plan, directory, source=source)

    def load(self, model: nn.Module, src: Path) -> SharingPlan:
        return load_basis(model, src)

    def apply(self, model: nn.Module, plan: SharingPlan, problem: SharingProblem | None,
              merge: Merge | str = Merge.mean, *, data: DataSource | None = None,
              config: AnalyzeConfig | None = None, tokenizer: Any | None = None, state: State = None,
              diag: dict[str, Tensor] | None = None, layerwise: LayerwiseCurvature | None = None) -> ApplyReport:
        if problem is None:
            raise ValueError("the basis scheme installs a plan with its problem (ranks and sides per family)")
        return apply_basis_plan(model, plan, problem, merge, data=data, config=config, tokenizer=tokenizer,
                                covs=dict(state) if state is not None else None, diag=diag)


def _ranks(problem: SharingProblem) -> dict[str, int | None]:
    return {f: s.rank for f, s in (problem.families or {}).items()}
