"""The interface every way of sharing implements, so the compress chain has no per-scheme branches.

A scheme (``tie``: one tensor per class; ``basis``: one low-rank basis per class; a new one is a
new module here) says how its costs are measured, which samples each step of the chain uses, what
it measures once for every candidate, what a candidate's layers hold while it is measured, which
candidates it adds beside the solver's, and how a chosen plan is installed. docs/design.md
§Schemes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.data import Calibration, DataSource
from hessian_worker.losses import TaskLoss
from hessian_worker.merge import Merge
from hessian_worker.prepare import Prepared
from hessian_worker.tying import ApplyReport
from solver.planning import SolveConfig
from solver.schema import Scheme, SharingPlan, SharingProblem

# what a scheme measures once per compress and hands to every candidate and the final apply
# (basis: the whitening covariances, name -> G); None when it needs nothing
State = Mapping[str, Tensor] | None


@dataclass(frozen=True)
class DataParts:
    """Which calibration samples each step of the compress chain uses."""

    costs: Calibration  # the curvature costs, and what the scheme measures once (its State)
    choice: Calibration  # the candidates' measured losses
    apply: Calibration  # the final apply's data-dependent merge, and a factored scheme's final fit


class Substitutes(Protocol):
    """The weights a scheme's classes would hold, substituted into the model while measuring."""

    def split(self, plan: SharingPlan) -> tuple[list[Any], Sequence[Sequence[str]]]:
        """(this scheme's classes of ``plan``, the groups left to the ordinary merge)."""
        ...

    def weights_of(self, classes: Sequence[Any]) -> dict[str, Tensor]:
        """Parameter name -> the value it holds under ``classes``."""
        ...


class SharingScheme(Protocol):
    name: Scheme
    # the layerwise merge's covariances come from one part of the choice data, scored on the other
    merge_split_choice: bool

    def costs(self, model: nn.Module | str, data: DataSource, config: AnalyzeConfig, *,
              tokenizer: Any | None = None, loss_fn: TaskLoss | None = None) -> SharingProblem:
        """The SharingProblem (layers, costs, family specs) of sharing ``model`` this way."""
        ...

    def parts(self, fit: Calibration, config: Any) -> DataParts:
        """The samples of each step, from the samples not held out (``config``: a CompressConfig)."""
        ...

    def merged_layers(self, problem: SharingProblem) -> list[str]:
        """The layers whose shared value comes from the ordinary merge (mean, curvature, layerwise)."""
        ...

    def state(self, model: nn.Module, data: Calibration, problem: SharingProblem, config: AnalyzeConfig,
              tokenizer: Any | None = None) -> State:
        """What is measured once on ``data`` for every candidate and the final apply."""
        ...

    def substitutes(self, prep: Prepared, problem: SharingProblem, config: AnalyzeConfig,
                    state: State) -> Substitutes | None:
        """The weights this scheme's classes hold while candidates are measured (None: all merged)."""
        ...

    def extra_candidates(self, model: nn.Module, problem: SharingProblem, solve: SolveConfig, state: State,
                         config: AnalyzeConfig, *, data: Calibration | None = None,
                         tokenizer: Any | None = None) -> list[tuple[SharingPlan, SharingProblem]]:
        """Plans measured beside the solver's at the same budget, each with its own problem (``data``:
        the costs' samples, what ``state`` was measured on, for a scheme that prices more plans)."""
        ...

    def spend(self, model: nn.Module, plans: Sequence[SharingPlan], problem: SharingProblem, solve: SolveConfig,
              state: State, config: AnalyzeConfig) -> list[tuple[SharingPlan, SharingProblem]]:
        """Each of the solver's plans at the budget, with its problem: what a plan can still raise
        without changing its classes (basis: ranks) raised until the budget is spent, so every
        candidate is compared at equal parameters; a plan that cannot be raised stays as it is."""
        ...

    def budget_note(self, plan: SharingPlan, problem: SharingProblem, ratio: float) -> str | None:
        """Why ``plan`` keeps less than ``ratio`` of the shareable parameters (more than 1% below), or
        None when it spends the budget."""
        ...

    def installed_in(self, model: nn.Module) -> bool:
        """``model`` holds this scheme's modules (a model from ``apply`` or ``load``)."""
        ...

    def save(self, model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
        """Writes the model in this scheme's layout (``io.save_shared``)."""
        ...

    def load(self, model: nn.Module, src: Path) -> SharingPlan:
        """Installs the saved plan in a fresh ``model`` and loads the saved tensors (``io.load_shared``)."""
        ...

    def apply(self, model: nn.Module, plan: SharingPlan, problem: SharingProblem | None,
              merge: Merge | str = Merge.mean, *, data: DataSource | None = None,
              config: AnalyzeConfig | None = None, tokenizer: Any | None = None, state: State = None,
              diag: dict[str, Tensor] | None = None, layerwise: LayerwiseCurvature | None = None) -> ApplyReport:
        """Installs ``plan`` in ``model``, in place."""
        ...
