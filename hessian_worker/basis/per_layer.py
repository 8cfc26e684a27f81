"""The per-layer candidate of the ``basis`` scheme: every layer alone, at the ranks that spend the budget.

Plain per-layer truncated SVD (each layer its own whitened low-rank basis, nothing shared) is the
baseline a shared basis has to beat at the same parameter count, and on some models it wins
(measured on MiniLM). It is the all-alone partition, filled like every basis candidate
(hessian_worker.basis.fill): its own problem carries the new ranks and the exact unary costs (each
layer's own whitened error at its rank under the same covariances, so the plan's objective is its
predicted loss change), every pair forbidden (null). ``apply_basis_plan(model, plan, problem)``
installs it like any other basis plan.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from hessian_worker.basis.analysis import rank_of
from hessian_worker.basis.config import BasisOptions
from hessian_worker.basis.fill import UNIFORM, fill_plan
from hessian_worker.factored.layers import dense_weights
from solver.planning import SolveConfig, plan_from_coloring, with_config
from solver.schema import SharingPlan, SharingProblem

STRATEGY = "per-layer-svd"


def per_layer_candidate(
    model: nn.Module,
    problem: SharingProblem,
    config: SolveConfig | None,
    covs: Mapping[str, Tensor] | None,
    options: BasisOptions | None = None,
    *,
    start: str = UNIFORM,
) -> tuple[SharingPlan, SharingProblem] | None:
    """(plan, its problem) keeping every layer alone at the ranks that spend the budget of
    ``problem`` under ``config`` (basis.fill: from the problem's rank proportions, ``uniform``, or
    from rank 1 by predicted gain per parameter, ``allocated``), or None when there is no such plan
    (no budget, no basis family, rank 1 does not fit, or the constraints require some pair to share).

    Args:
        model: the dense reference model (read, never changed).
        covs: the whitening covariances the pool is measured and applied with (None: plain SVD);
            the unary costs use them, so the plan's objective is on the pool's scale.
    """
    options = options or BasisOptions()
    full = with_config(problem, config)
    budget = full.budget_params()
    names = list(rank_of(full))
    if budget is None or full.constraints.require or not names:
        return None
    coloring = {x.name: i for i, x in enumerate(full.layers)}
    alone = plan_from_coloring(full, coloring, method="baseline:per-layer", strategy=STRATEGY)
    filled = fill_plan(alone, full, budget, dense_weights(model, names), covs, start=start,
                       damping=options.damping, suffix="" if start == UNIFORM else f"+{start}")
    if filled is None or filled.plan.status.value == "infeasible":
        return None
    return filled.plan, filled.problem
