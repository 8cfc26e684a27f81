"""The relaxed scheme's candidates at other correction ranks, measured beside the solver's pool.

At one budget the correction rank trades against the number of classes: a class of s members keeps
d_out·d_in + s·r·(d_out + d_in), so a higher rank leaves fewer, larger classes. The cost model
cannot settle that trade alone (its pairwise costs are exact for pairs only, and larger classes are
what a high rank forces), so ``compress`` solves the problem again at every share in
``RelaxedOptions.rank_ratios`` and measures each optimum: the measured choice picks the rank.

Every problem comes from the same pair spectra (costs.PairSpectra: one eigenproblem per pair gives
the cost at every rank), so the extra problems cost solver time only.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from hessian_worker.basis.modules import dense_weights
from hessian_worker.options import RelaxedOptions
from hessian_worker.relaxed.analysis import family_shapes, family_sizes, rank_of, relaxed_problem
from hessian_worker.relaxed.costs import PairSpectra, family_rank, least_params
from solver.errors import BudgetInfeasible, ConstraintInfeasible
from solver.planning import SolveConfig, solve, with_config
from solver.schema import SharingPlan, SharingProblem


def rank_label(ratio: float) -> str:
    """The strategy name of the optimum at correction-rank share ``ratio``."""
    return f"relaxed-rank-{ratio:g}"


def rank_candidates(model: nn.Module, problem: SharingProblem, config: SolveConfig | None,
                    covs: Mapping[str, Tensor] | None, options: RelaxedOptions) -> list[tuple[SharingPlan, SharingProblem]]:
    """(plan, its problem) for every share in ``options.rank_ratios`` whose ranks differ from the
    problem's and whose one-class-per-family plan fits the budget of ``problem`` under ``config``.

    Args:
        model: the dense reference model (read, never changed).
        covs: the whitening covariances the problem was analyzed with (None: unwhitened).
    """
    full = with_config(problem, config)
    budget = full.budget_params()
    rank = rank_of(full)
    if not rank or len(rank) < len(full.layers) or not options.rank_ratios:
        return []  # a problem mixing schemes keeps its ranks
    names = list(rank)
    weights = dense_weights(model, names)
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
    fam_shapes, sizes = family_shapes(full, shapes), family_sizes(full)
    own = {x.family: rank[x.name] for x in full.layers}
    spectra = PairSpectra(full.layers, weights, covs, damping=options.damping)
    out = []
    for ratio in options.rank_ratios:
        ranks = {fam: family_rank(fam, shape, options, ratio) for fam, shape in fam_shapes.items()}
        if ranks == own or (budget is not None and least_params(fam_shapes, sizes, ranks) > budget):
            continue
        at_rank = relaxed_problem(full, spectra, ranks, shapes)
        try:
            plan = solve(at_rank, config)
        except (BudgetInfeasible, ConstraintInfeasible):
            continue
        out.append((plan.model_copy(update={"strategy": rank_label(ratio)}), at_rank))
    return out
