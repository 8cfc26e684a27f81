"""The relaxed scheme's candidates at other correction ranks, measured beside the solver's pool.

At one budget the correction rank trades against the number of classes: a class of s members keeps
d_out·d_in + s·r·(d_out + d_in), so a higher rank leaves fewer, larger classes. The cost model
cannot settle that trade alone (its pairwise costs are exact for pairs only, and larger classes are
what a high rank forces), so ``compress`` solves the problem again at every share in
``RelaxedOptions.rank_ratios`` and measures each optimum: the measured choice picks the rank.

Every problem comes from the same pair spectra (costs.PairSpectra: one eigenproblem per pair gives
the cost at every rank), so the extra problems cost solver time only. Beside the shares, the optima
at the largest ranks where 1, 2 or 3 classes per family fill the budget exactly (a looped model's
rank, and for six-layer families consecutive pairs'), and one candidate lets the rank differ by
family (``mixed_ranks``: coordinate descent on the solver's predicted loss).

At those filling ranks the fixed groupings of the literature join too (``FILL_PATTERNS``: contiguous
runs as in a looped model, adjacent pairs as in DeltaLLM): the pair costs price a class of three or
more only as the sum of its pairs, so the solver's optimum at a rank can miss the grouping that
measures best there (MiniLM at 0.8, Kronecker-priced: consecutive pairs at the 3-class rank 0.9284
cosine, the solver's optimum at that rank 0.9025; bench/results/eval-relaxed-refit.md and
relaxed-pricing.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from hessian_worker.factored.layers import dense_weights
from hessian_worker.options import RelaxedOptions
from hessian_worker.relaxed.analysis import family_shapes, family_sizes, rank_of, relaxed_problem
from hessian_worker.relaxed.costs import (
    PairPricer,
    PairSpectra,
    family_rank,
    least_params,
    ranks_within,
)
from solver.baselines import Strategy
from solver.candidates import distinct_plans, pattern_plans
from solver.errors import BudgetInfeasible, ConstraintInfeasible
from solver.planning import SolveConfig, solve, with_config
from solver.schema import SharingPlan, SharingProblem

MIXED = "relaxed-mixed-ranks"  # the strategy name of the per-family ranks of ``mixed_ranks``
FILL = "relaxed-fill"  # the optimum at the largest ranks where c classes per family fill the budget
FILL_CLASSES = (1, 2, 3)
FILL_PATTERNS = (Strategy.adjacent_pairs, Strategy.sequence)  # the fixed groupings measured at the filling ranks


def rank_label(ratio: float) -> str:
    """The strategy name of the optimum at correction-rank share ``ratio``."""
    return f"relaxed-rank-{ratio:g}"


def rank_candidates(model: nn.Module, problem: SharingProblem, config: SolveConfig | None,
                    covs: Mapping[str, Tensor] | None, options: RelaxedOptions, *,
                    spectra: PairPricer | None = None) -> list[tuple[SharingPlan, SharingProblem]]:
    """(plan, its problem) for every share in ``options.rank_ratios`` whose ranks differ from the
    problem's and whose one-class-per-family plan fits the budget of ``problem`` under ``config``,
    and the optimum at per-family ranks (``mixed_ranks``) when it differs from all of those.

    Args:
        model: the dense reference model (read, never changed).
        covs: the whitening covariances the problem was analyzed with (None: unwhitened).
        spectra: the problem's pair costs when at hand (else the Kronecker spectra of ``model`` and ``covs``).
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
    spectra = spectra or PairSpectra(full.layers, weights, covs, damping=options.damping)
    solved: dict[tuple[tuple[str, int], ...], tuple[SharingPlan, SharingProblem]] = {}

    def optimum(ranks: dict[str, int]) -> tuple[SharingPlan, SharingProblem] | None:
        """The solver's optimum at ``ranks`` (family -> rank), None when it does not fit (memoized)."""
        key = tuple(sorted(ranks.items()))
        if key not in solved:
            if budget is not None and least_params(fam_shapes, sizes, ranks) > budget:
                return None
            at_rank = relaxed_problem(full, spectra, ranks, shapes)
            try:
                solved[key] = (solve(at_rank, config), at_rank)
            except (BudgetInfeasible, ConstraintInfeasible):
                return None
        return solved[key]

    out = []
    # the rank shares asked for, and the largest ranks at which c classes per family fill the budget
    # exactly (c = 1: a looped model's rank; c = n/2: consecutive pairs'), which no fixed share hits
    levels = {rank_label(ratio): {fam: family_rank(fam, shape, options, ratio) for fam, shape in fam_shapes.items()}
              for ratio in options.rank_ratios}
    if budget is not None:
        for label, ranks in fill_ranks(fam_shapes, sizes, budget).items():
            levels.setdefault(label, ranks)
    seen = [own]
    for label, ranks in levels.items():
        found = optimum(ranks) if ranks not in seen else None
        seen.append(ranks)
        if found is not None:
            out.append((found[0].model_copy(update={"strategy": label}), found[1]))
            if label.startswith(FILL):
                out += fill_patterns(found, label, config)
    mixed = mixed_ranks(own, levels, optimum)
    if mixed is not None and mixed[1].families is not None and all(
            {f: s.rank for f, s in mixed[1].families.items()} != r for r in seen):
        out.append((mixed[0].model_copy(update={"strategy": MIXED}), mixed[1]))
    return out


def fill_ranks(fam_shapes: Mapping[str, tuple[int, int]], sizes: Mapping[str, int],
               budget: int) -> dict[str, dict[str, int]]:
    """``{FILL}-c`` -> the largest uniform-share ranks (family -> rank) at which c classes per family
    fit ``budget``, for every c of ``FILL_CLASSES`` that fits at all."""
    widest = {fam: max(1, min(shape) // 2) for fam, shape in fam_shapes.items()}
    out = {}
    for c in FILL_CLASSES:
        ranks = ranks_within(fam_shapes, sizes, widest, budget, c)
        if least_params(fam_shapes, sizes, ranks, c) <= budget:
            out[f"{FILL}-{c}"] = ranks
    return out


def fill_patterns(optimum: tuple[SharingPlan, SharingProblem], label: str,
                  config: SolveConfig | None) -> list[tuple[SharingPlan, SharingProblem]]:
    """The ``FILL_PATTERNS`` plans on the problem of ``optimum`` (its filling ranks), named
    ``{label}-{pattern}``; those with the optimum's classes, or another pattern's, are left out."""
    plan, problem = optimum
    found = distinct_plans([plan, *pattern_plans(problem, config, patterns=FILL_PATTERNS)])[1:]
    return [(p.model_copy(update={"strategy": f"{label}-{p.strategy}"}), problem) for p in found]


def mixed_ranks(own: dict[str, int], uniform: Mapping[str, dict[str, int]],
                optimum: Callable[[dict[str, int]], tuple[SharingPlan, SharingProblem] | None],
                rounds: int = 2) -> tuple[SharingPlan, SharingProblem] | None:
    """Ranks per family by coordinate descent on the solver's objective: from the best uniform
    ranks, each family in turn takes the rank of every share whose optimum (the other families
    kept) predicts less loss; ``rounds`` passes over the families. The objective is exact for
    classes of one and two and the pairwise sum beyond, so the measured choice has the last word."""
    starts = [found for r in (own, *uniform.values()) if (found := optimum(r)) is not None]
    if not starts:
        return None
    best = min(starts, key=lambda x: x[0].objective if x[0].objective is not None else float("inf"))
    ranks = {f: s.rank for f, s in (best[1].families or {}).items()}
    for _ in range(rounds):
        moved = False
        for fam in ranks:
            for option in uniform.values():
                trial = {**ranks, fam: option[fam]}
                found = optimum(trial)
                if found is not None and (found[0].objective or 0.0) < (best[0].objective or 0.0):
                    best, ranks, moved = found, trial, True
        if not moved:
            break
    return best
