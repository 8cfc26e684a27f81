"""The per-layer candidate of the ``basis`` scheme: every layer alone, at the ranks that fill the budget.

Plain per-layer truncated SVD (each layer its own whitened low-rank basis, nothing shared) is the
baseline a shared basis has to beat at the same parameter count, and on some models it wins
(measured on MiniLM). The solver's candidate pool holds plans at the problem's ranks only, where
keeping every layer alone rarely fits the budget, so ``compress`` measures this plan beside the
pool: the measured choice then never loses to per-layer SVD on the choice data.

A plan does not carry ranks; its problem does (``families[...].rank``, one per family). The
per-layer plan therefore comes with its own problem: the same layers, every basis family at its
new rank r'_f (class_params and member_params rescaled), exact unary costs (each layer's own
whitened error at r'_f under the same covariances, so the plan's objective is its predicted loss
change), and every pair forbidden (null): pair costs were not computed at these ranks, and the plan
shares nothing. ``apply_basis_plan(model, plan, problem)`` installs it like any other basis plan.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from hessian_worker.basis.analysis import rank_of, side_of
from hessian_worker.basis.config import BasisOptions
from hessian_worker.basis.costs import class_errors
from hessian_worker.basis.modules import dense_weights
from solver.planning import SolveConfig, plan_from_coloring, with_config
from solver.schema import Scheme, SharingPlan, SharingProblem

STRATEGY = "per-layer-svd"


def singleton_ranks(problem: SharingProblem, budget: int) -> dict[str, int] | None:
    """Family -> rank of the plan that keeps every layer alone within ``budget`` unique params.

    The ranks are the problem's scaled by one common factor (r'_f = ⌊k·r_f / max r⌋, at least 1 and
    at most min(d_out, d_in)), with the largest k that fits: one rank for every family when the
    problem has one, and per-family proportions kept when it has several. Layers of ``tie``
    families stay dense (a class of one keeps its tensor). None when even the least ranks do not fit.
    """
    specs = problem.families or {}
    basis = {f: s for f, s in specs.items() if s.scheme is Scheme.basis}
    sizes: dict[str, int] = {}
    fixed = 0
    for layer in problem.layers:
        if layer.family in basis:
            sizes[layer.family] = sizes.get(layer.family, 0) + 1
        else:
            fixed += layer.params
    if not basis:
        return None
    top = max(s.rank for s in basis.values())
    cap = {f: min(s.class_params, s.member_params) // s.rank for f, s in basis.items()}

    def ranks_at(k: int) -> dict[str, int]:
        return {f: min(cap[f], max(1, k * s.rank // top)) for f, s in basis.items()}

    def count(ranks: Mapping[str, int]) -> int:
        return fixed + sum(
            sizes[f] * (s.class_params + s.member_params) // s.rank * ranks[f]
            for f, s in basis.items()
        )

    last = max(-(-cap[f] * top // s.rank) for f, s in basis.items())  # every family at its cap
    best = None
    for k in range(1, last + 1):
        ranks = ranks_at(k)
        if count(ranks) > budget:
            break
        best = ranks
    return best


def per_layer_problem(
    problem: SharingProblem,
    ranks: Mapping[str, int],
    weights: Mapping[str, Tensor],
    covs: Mapping[str, Tensor] | None,
    *,
    damping: float = 0.01,
) -> SharingProblem:
    """``problem`` with every basis family at ``ranks`` (family -> rank), exact unary costs from
    ``weights`` and ``covs`` (the whitening of the original problem), and every pair forbidden."""
    data = problem.model_dump(mode="json")
    for family, spec in data["families"].items():
        if family in ranks:
            old, new = spec["rank"], ranks[family]
            spec.update(
                rank=new,
                class_params=spec["class_params"] // old * new,
                member_params=spec["member_params"] // old * new,
            )
    family_of = {x.name: x.family for x in problem.layers}
    names = [x.name for x in problem.layers if x.family in ranks]
    sides = side_of(problem)
    errors = class_errors(
        [[n] for n in names],
        weights,
        covs,
        {n: ranks[family_of[n]] for n in names},
        damping=damping,
        side_of=sides,
    )
    own = dict(zip(names, errors, strict=True))
    n = len(problem.layers)
    data["costs"] = {
        "kind": "pairwise",
        "matrix": [[0.0 if i == j else None for j in range(n)] for i in range(n)],
        "unary": [own.get(x.name, 0.0) for x in problem.layers],
    }
    return SharingProblem.model_validate(data)


def per_layer_candidate(
    model: nn.Module,
    problem: SharingProblem,
    config: SolveConfig | None,
    covs: Mapping[str, Tensor] | None,
    options: BasisOptions | None = None,
) -> tuple[SharingPlan, SharingProblem] | None:
    """(plan, its problem) keeping every layer alone at the ranks that fill the budget of
    ``problem`` under ``config``, or None when there is no such plan (no budget, no basis family,
    rank 1 does not fit, or the constraints require some pair to share).

    Args:
        model: the dense reference model (read, never changed).
        covs: the whitening covariances the pool is measured and applied with (None: plain SVD);
            the unary costs use them, so the plan's objective is on the pool's scale.
    """
    options = options or BasisOptions()
    full = with_config(problem, config)
    budget = full.budget_params()
    if budget is None or full.constraints.require:
        return None
    ranks = singleton_ranks(full, budget)
    if ranks is None:
        return None
    weights = dense_weights(model, list(rank_of(full)))
    alone = per_layer_problem(full, ranks, weights, covs, damping=options.damping)
    coloring = {x.name: i for i, x in enumerate(alone.layers)}
    plan = plan_from_coloring(alone, coloring, method="baseline:per-layer", strategy=STRATEGY)
    if plan.status.value == "infeasible":
        return None
    return plan, alone
