"""The frame around a factored scheme's apply: which layers a plan names, the classes of ``tie``
families in the same plan, the whitening covariances, and the report's unique-parameter counts.

The scheme's own apply (basis/apply.py, relaxed/apply.py) fits and installs its classes between
``begin_apply`` and ``PlanApply.counts``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from hessian_worker.config import AnalyzeConfig
from hessian_worker.data import DataSource
from hessian_worker.errors import PlanError
from hessian_worker.factored.layers import module_path
from hessian_worker.merge import Merge
from hessian_worker.tying import apply_tie, plan_names, unique_params
from solver.schema import SharingPlan

# a scheme's module -> its Parameters (each counted once), None for any other module
Factors = Callable[[nn.Module], "Sequence[nn.Parameter] | None"]


@dataclass(frozen=True)
class PlanApply:
    """What a plan covers before the scheme changes the model (so the report can compare)."""

    names: list[str]  # every layer the plan names
    original: int  # their elements before
    before: int  # the model's unique parameters before
    tie_groups: list[list[str]]  # the classes of tie families, tied already

    def counts(self, model: nn.Module, merge: Merge, own_classes: Sequence[Sequence[str]],
               factors: Factors) -> dict[str, Any]:
        """The ApplyReport fields every scheme reports, measured on the changed model."""
        shared = plan_unique(model, self.names, factors)
        return {
            "merge": merge,
            "groups": sum(len(g) > 1 for g in [*own_classes, *self.tie_groups]),
            "unique_params_before": self.before,
            "unique_params_after": unique_params(model),
            "plan_params_original": self.original,
            "plan_params_shared": shared,
            "ratio": shared / self.original if self.original else 1.0,
        }


def begin_apply(model: nn.Module, plan: SharingPlan, own: set[str], merge: Merge, *, data: DataSource | None,
                config: AnalyzeConfig, tokenizer: Any | None, diag: dict[str, Tensor] | None) -> PlanApply:
    """Counts what the plan covers, then ties its classes outside ``own`` (the layers the scheme
    installs itself) with ``tying.apply_tie``; ``diag`` passes curvature-merge weights for those."""
    names = plan_names(plan)
    params = dict(model.named_parameters(remove_duplicate=False))
    original = sum(params[n].numel() for n in names if n in params)
    before = unique_params(model)
    groups = [list(g) for g in plan.groups if g and g[0] not in own]
    if any(len(g) > 1 for g in groups):
        coloring = {n: c for c, g in enumerate(groups) for n in g}
        sub = plan.model_copy(update={"groups": groups, "coloring": coloring})
        apply_tie(model, sub, merge, data=data, config=config, tokenizer=tokenizer, diag=diag)
    return PlanApply(names, original, before, groups)


def require_covs(covs: Mapping[str, Tensor] | None, names: Sequence[str]) -> None:
    """Raises PlanError when ``covs`` (given) lacks a layer's input covariance."""
    if covs is not None:
        missing = [n for n in names if n not in covs]
        if missing:
            raise PlanError(f"covs lacks the input covariances of {missing[:5]}")


def plan_unique(model: nn.Module, names: Sequence[str], factors: Factors) -> int:
    """Unique elements behind the plan's layers: the Parameters ``factors`` names for a scheme's
    module (each once), the (possibly tied) weight of the others."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: dict[int, int] = {}
    for name in names:
        module = modules.get(module_path(name)) if name.endswith(".weight") else None
        parts = factors(module) if module is not None else None
        if parts is not None:
            for p in parts:
                seen[id(p)] = p.numel()
        elif name in params:
            seen[id(params[name])] = params[name].numel()
    return sum(seen.values())
