"""The tie scheme: each class of layers holds ONE tensor, the merge of its members."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import Calibration, DataSource
from hessian_worker.dedup_save import write_shared
from hessian_worker.losses import TaskLoss
from hessian_worker.merge import Merge
from hessian_worker.pair_costs import tie_costs
from hessian_worker.prepare import Prepared
from hessian_worker.schemes.base import DataParts, State, Substitutes
from hessian_worker.tying import ApplyReport, apply_tie, load_tied
from solver.planning import SolveConfig
from solver.schema import Scheme, SharingPlan, SharingProblem


class TieScheme:
    name = Scheme.tie
    merge_split_choice = True

    def costs(self, model: nn.Module | str, data: DataSource, config: AnalyzeConfig, *,
              tokenizer: Any | None = None, loss_fn: TaskLoss | None = None) -> SharingProblem:
        return tie_costs(model, data, config, tokenizer=tokenizer, loss_fn=loss_fn)

    def parts(self, fit: Calibration, config: Any) -> DataParts:
        """Costs on the curvature subset (``curvature_samples``), the choice and apply on all of ``fit``."""
        samples = config.curvature_samples
        costs = fit
        if samples is not None and samples < fit.num_samples:
            _, costs = fit.split(samples, seed=config.seed + 1, batch_size=config.batch_size)
        return DataParts(costs=costs, choice=fit, apply=fit)

    def merged_layers(self, problem: SharingProblem) -> list[str]:
        return [layer.name for layer in problem.layers]

    def state(self, model: nn.Module, data: Calibration, problem: SharingProblem, config: AnalyzeConfig,
              tokenizer: Any | None = None) -> State:
        return None

    def substitutes(self, prep: Prepared, problem: SharingProblem, config: AnalyzeConfig,
                    state: State) -> Substitutes | None:
        return None

    def extra_candidates(self, model: nn.Module, problem: SharingProblem, solve: SolveConfig, state: State,
                         config: AnalyzeConfig, *, data: Calibration | None = None,
                         tokenizer: Any | None = None) -> list[tuple[SharingPlan, SharingProblem]]:
        return []

    def spend(self, model: nn.Module, plans: Sequence[SharingPlan], problem: SharingProblem, solve: SolveConfig,
              state: State, config: AnalyzeConfig) -> list[tuple[SharingPlan, SharingProblem]]:
        """As they are: a tied class has nothing to raise (the solver already spends what it can)."""
        return [(plan, problem) for plan in plans]

    def budget_note(self, plan: SharingPlan, problem: SharingProblem, ratio: float) -> str | None:
        """Tying changes the count in steps of whole layers, so it can stop short of the budget."""
        reached = plan.params.ratio if plan.params else 1.0
        if reached >= ratio * 0.99:
            return None
        step = min(x.params for x in problem.layers) / problem.original_params
        return (f"keeps {reached:.4f} of the requested {ratio:g}: tying changes the count in steps of whole "
                f"layers (the smallest {step:.4f} of the shareable parameters), and no plan of this problem "
                "fills the rest")

    def installed_in(self, model: nn.Module) -> bool:
        return True  # tying changes no module: any model can be saved tied

    def save(self, model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
        return write_shared(model, plan, directory, source=source)

    def load(self, model: nn.Module, src: Path) -> SharingPlan:
        return load_tied(model, src)

    def apply(self, model: nn.Module, plan: SharingPlan, problem: SharingProblem | None,
              merge: Merge | str = Merge.mean, *, data: DataSource | None = None,
              config: AnalyzeConfig | None = None, tokenizer: Any | None = None, state: State = None,
              diag: dict[str, Tensor] | None = None, layerwise: LayerwiseCurvature | None = None) -> ApplyReport:
        return apply_tie(model, plan, merge, data=data, config=config, tokenizer=tokenizer, diag=diag,
                         layerwise=layerwise)
