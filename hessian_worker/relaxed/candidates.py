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
family (``mixed_ranks``: coordinate descent on the solver's predicted loss). A family may also keep
no shared tensor (``FamilySpec.alone``: each layer its own rank-r factors): every family alone at
the ranks that fill the budget is per-layer low rank as a relaxed plan (``ALONE``), and a second
descent may leave families alone one at a time (``MIXED_ALONE``), looping the families that share
and keeping the others per layer (MiniLM at 0.67: 0.908 cosine against 0.9026 without;
bench/results/eval-relaxed-alone.md).

A family may also share one basis per class instead (``RelaxedOptions.basis_ratios``: the basis
scheme's form, W_ℓ ≈ U_c C_ℓ, at those shares of min(d_out, d_in), on the side that saves more),
beside the relaxed families in the same plan, priced by the same pricer (costs.PairPricer.basis) so
the solver weighs the two kinds of family on one scale: every family on bases at the level that
predicts least (``BASES``), the descent free to move families to bases from the best start
(``MIXED_BASIS``) and from the all-bases start (``BASIS_FIRST``), and each plan with basis families
again at the basis ranks that spend the budget (``spend_bases``). Why: on the GPT task model at 0.5
and 0.4 shared bases measured far better than every relaxed plan (distillation loss 0.0045 against
0.010 at 0.5; bench/results/eval-relaxed-alone-small.md).

At every one of those ranks the fixed groupings of the literature join too (``PATTERNS``:
contiguous runs as in a looped model, adjacent pairs as in DeltaLLM): the pair costs price a class
of three or more only as the sum of its pairs, so the solver's optimum at a rank can miss the
grouping that measures best there (MiniLM at 0.8, Kronecker-priced: consecutive pairs at the
3-class rank 0.9284 cosine, the solver's optimum at that rank 0.9025; bench/results/eval-relaxed-refit.md
and relaxed-pricing.md), and measured beside the rest, the choice never loses to a fixed grouping
at a rank it tried on its own choice data (the quick GPT at 0.67: contiguous runs at rank share
0.1875 measured 7.015 perplexity against the choice's 7.028, a difference the paired interval
resolves; bench/results/eval-relaxed-basis-healed-small.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping

from torch import Tensor, nn

from hessian_worker.basis.config import BasisOptions
from hessian_worker.basis.costs import family_side
from hessian_worker.basis.fill import fill_plan
from hessian_worker.factored.layers import dense_weights
from hessian_worker.options import RelaxedOptions
from hessian_worker.relaxed.analysis import family_shapes, family_sizes, rank_of, relaxed_problem
from hessian_worker.relaxed.costs import (
    PairPricer,
    PairSpectra,
    alone_cov,
    family_rank,
    least_params,
    ranks_within,
)
from solver.baselines import Strategy
from solver.candidates import distinct_plans, pattern_plans
from solver.errors import BudgetInfeasible, ConstraintInfeasible
from solver.planning import SolveConfig, plan_from_coloring, solve, with_config
from solver.schema import Scheme, SharingPlan, SharingProblem

MIXED = "relaxed-mixed-ranks"  # the strategy name of the per-family ranks of ``mixed_ranks``
MIXED_ALONE = "relaxed-mixed-alone"  # ``mixed_ranks`` free to leave families alone, when it does
MIXED_BASIS = "relaxed-mixed-basis"  # ``mixed_ranks`` free to move families to shared bases, when it does
BASIS_FIRST = "relaxed-basis-first"  # the same descent started with every family on shared bases
BASES = "relaxed-bases"  # that start itself: every family on shared bases, at the level predicting least
BASIS_LEVEL = "basis-rank"  # the label of a level of basis ranks
FILL = "relaxed-fill"  # the optimum at the largest ranks where c classes per family fill the budget
FILL_CLASSES = (1, 2, 3)
PATTERNS = (Strategy.adjacent_pairs, Strategy.sequence)  # the fixed groupings measured at every rank level
ALONE = f"{FILL}-0"  # every family alone at the ranks that fill the budget: per-layer low rank

Ranks = dict[str, int]  # family -> correction rank (a basis family's: its basis rank)
Found = tuple[SharingPlan, SharingProblem]
# an optimum's forms: family -> rank, the families alone, the families sharing bases
Forms = tuple[Ranks, frozenset[str], frozenset[str]]
Optimum = Callable[[Ranks, frozenset[str], frozenset[str]], "Found | None"]


def rank_label(ratio: float) -> str:
    """The strategy name of the optimum at correction-rank share ``ratio``."""
    return f"relaxed-rank-{ratio:g}"


def rank_candidates(model: nn.Module, problem: SharingProblem, config: SolveConfig | None,
                    covs: Mapping[str, Tensor] | None, options: RelaxedOptions, *,
                    spectra: PairPricer | None = None) -> list[Found]:
    """(plan, its problem) for every share in ``options.rank_ratios`` whose ranks differ from the
    problem's and whose one-class-per-family plan fits the budget of ``problem`` under ``config``
    (with the ``PATTERNS`` plans at those ranks, and at the filling ranks), every family alone at
    the ranks that fill the budget (``ALONE``: per-layer low rank as a relaxed plan), and the
    optimum at per-family ranks (``mixed_ranks``), once with every family sharing, once free to
    leave families alone, and once free to move families to shared bases at the shares of
    ``options.basis_ratios``, when they differ from all of those.

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
    own_alone = frozenset(full.alone_families())
    spectra = spectra or PairSpectra(full.layers, weights, covs, damping=options.damping)
    sides = {fam: family_side(shape, BasisOptions()) for fam, shape in fam_shapes.items()}  # the larger one
    solved: dict[tuple[tuple[tuple[str, int], ...], frozenset[str], frozenset[str]], Found | None] = {}

    def priced(forms: Forms) -> SharingProblem:
        """The problem at ``forms`` (ranks, families alone, families on bases), priced by ``spectra``."""
        ranks, alone, based = forms
        return relaxed_problem(full, spectra, ranks, shapes, alone, {f: sides[f] for f in based})

    def optimum(ranks: Ranks, alone: frozenset[str] = frozenset(), based: frozenset[str] = frozenset()) -> Found | None:
        """The solver's optimum at ``ranks`` with the families ``alone`` kept apart and those ``based``
        sharing bases, None when it does not fit (memoized)."""
        key = (tuple(sorted(ranks.items())), alone, based)
        if key not in solved:
            solved[key] = None
            basis = {f: sides[f] for f in based}
            if budget is None or least_params(fam_shapes, sizes, ranks, alone=alone, basis=basis) <= budget:
                at_rank = priced((ranks, alone, based))
                with contextlib.suppress(BudgetInfeasible, ConstraintInfeasible):
                    solved[key] = (solve(at_rank, config), at_rank)
        return solved[key]

    out = []
    # the rank shares asked for, and the largest ranks at which c classes per family fill the budget
    # exactly (c = 1: a looped model's rank; c = n/2: consecutive pairs'), which no fixed share hits
    levels = {rank_label(ratio): {fam: family_rank(fam, shape, options, ratio) for fam, shape in fam_shapes.items()}
              for ratio in options.rank_ratios}
    if budget is not None:
        for label, ranks in fill_ranks(fam_shapes, sizes, budget).items():
            levels.setdefault(label, ranks)
    nothing: frozenset[str] = frozenset()
    seen: list[Forms] = [(own, own_alone, nothing)]
    for label, ranks in levels.items():
        found = optimum(ranks) if (ranks, nothing, nothing) not in seen else None
        seen.append((ranks, nothing, nothing))
        if found is not None:
            out.append((found[0].model_copy(update={"strategy": label}), found[1]))
            out += level_patterns(found, label, config)
    everyone = frozenset(fam_shapes)
    if budget is not None:
        per_layer = ranks_within(fam_shapes, sizes, widest_ranks(fam_shapes), budget, classes=0)
        found = optimum(per_layer, everyone) if (per_layer, everyone, nothing) not in seen else None
        seen.append((per_layer, everyone, nothing))
        if found is not None:
            out.append((found[0].model_copy(update={"strategy": ALONE}), found[1]))
            levels[ALONE] = per_layer
    bases = {f"{BASIS_LEVEL}-{ratio:g}": {fam: max(1, round(ratio * min(shape))) for fam, shape in fam_shapes.items()}
             for ratio in options.basis_ratios}
    # the descents: every family sharing, free to leave families alone, free to move them to bases
    # from the best start, and from the best with every family on bases (the predicted losses of the
    # two kinds of family are fits to the calibration samples, which a dense S_c overfits more than a
    # basis: on the GPT task at 0.5 the relaxed optimum predicts 0.00023 and measures 0.0073, the
    # basis plan 0.0012 and 0.0045, so the measured choice needs a candidate from each side)
    on_bases = [found for ranks in bases.values() if (found := optimum(ranks, nothing, everyone)) is not None]
    if on_bases:
        best = min(on_bases, key=lambda found: objective(found[0]))
        seen.append(forms_of(best[1]))
        out.append((best[0].model_copy(update={"strategy": BASES}), best[1]))
    descents = [(nothing, {}, False), (everyone, {}, False)]
    descents += [(everyone, bases, False), (everyone, bases, True)] if bases else []
    for families, basis_levels, first in descents:
        mixed = mixed_ranks(own, levels, optimum, may_leave=families, bases=basis_levels, bases_first=first)
        if mixed is None or mixed[1].families is None:
            continue
        state = forms_of(mixed[1])
        if state not in seen:
            seen.append(state)
            named = (BASIS_FIRST if first else MIXED_BASIS) if state[2] else MIXED_ALONE if state[1] else MIXED
            out.append((mixed[0].model_copy(update={"strategy": named}), mixed[1]))
    if budget is not None:  # the basis shares leave some budget unspent: their plans at ranks that spend it
        out += [raised for found in out if forms_of(found[1])[2]
                if (raised := spend_bases(found, budget, weights, covs, options.damping, priced)) is not None]
    return out


def spend_bases(found: Found, budget: int, weights: Mapping[str, Tensor], covs: Mapping[str, Tensor] | None,
                damping: float, priced: Callable[[Forms], SharingProblem]) -> Found | None:
    """``found`` with its basis families at the basis ranks that spend ``budget`` (basis.fill.fill_plan:
    the partition kept, the ranks raised by most predicted gain per parameter under the Kronecker
    error curves, whitened as a layer alone is; the relaxed families stay), named ``<strategy>-spent``
    and priced as every candidate is (``priced``: the problem at given forms); None when no rank rises."""
    plan, problem = found
    families = problem.families or {}
    based = [x.name for x in problem.layers if families[x.family].scheme is Scheme.basis]
    own = None if covs is None else {n: alone_cov(covs, n) for n in based}
    spent = fill_plan(plan, problem, budget, weights, own, damping=damping)
    if spent is None or all(spent.ranks[f] == families[f].rank for f in spent.ranks):
        return None
    ranks, alone, on_bases = forms_of(problem)
    at = priced(({**ranks, **spent.ranks}, alone, on_bases))
    return plan_from_coloring(at, plan.coloring, method=f"{plan.solver.method}+spent",
                              strategy=f"{plan.strategy}-spent"), at


def forms_of(problem: SharingProblem) -> Forms:
    """The forms of a problem the candidates built: family -> rank, the families alone, the families
    sharing bases."""
    families = problem.families or {}
    return ({f: s.rank for f, s in families.items() if s.rank is not None}, frozenset(problem.alone_families()),
            frozenset(f for f, s in families.items() if s.scheme is Scheme.basis))


def fill_ranks(fam_shapes: Mapping[str, tuple[int, int]], sizes: Mapping[str, int],
               budget: int) -> dict[str, dict[str, int]]:
    """``{FILL}-c`` -> the largest uniform-share ranks (family -> rank) at which c classes per family
    fit ``budget``, for every c of ``FILL_CLASSES`` that fits at all."""
    widest = widest_ranks(fam_shapes)
    out = {}
    for c in FILL_CLASSES:
        ranks = ranks_within(fam_shapes, sizes, widest, budget, c)
        if least_params(fam_shapes, sizes, ranks, c) <= budget:
            out[f"{FILL}-{c}"] = ranks
    return out


def widest_ranks(fam_shapes: Mapping[str, tuple[int, int]]) -> Ranks:
    """The ranks the filling ranks are lowered from: half of min(d_out, d_in) per family."""
    return {fam: max(1, min(shape) // 2) for fam, shape in fam_shapes.items()}


def level_patterns(optimum: tuple[SharingPlan, SharingProblem], label: str,
                   config: SolveConfig | None) -> list[tuple[SharingPlan, SharingProblem]]:
    """The ``PATTERNS`` plans on the problem of ``optimum`` (its level's ranks), named
    ``{label}-{pattern}``; those with the optimum's classes, or another pattern's, are left out."""
    plan, problem = optimum
    found = distinct_plans([plan, *pattern_plans(problem, config, patterns=PATTERNS)])[1:]
    return [(p.model_copy(update={"strategy": f"{label}-{p.strategy}"}), problem) for p in found]


def mixed_ranks(own: Ranks, uniform: Mapping[str, Ranks], optimum: Optimum, rounds: int = 2,
                may_leave: Collection[str] = (), bases: Mapping[str, Ranks] | None = None,
                bases_first: bool = False) -> Found | None:
    """Ranks per family by coordinate descent on the solver's objective: from the best uniform
    ranks, each family in turn takes the rank of every share whose optimum (the other families
    kept) predicts less loss; a family of ``may_leave`` may also go alone (no shared tensor,
    ``FamilySpec.alone``) at that rank, and with ``bases`` (label -> family -> basis rank) any family
    may share a basis per class at each of those ranks instead; ``rounds`` passes over the
    families. The start is the best of the uniform ranks with every family sharing, with every
    family of ``may_leave`` alone, and of every level of ``bases`` with every family on bases (with
    ``bases_first``, the best of the last only). The
    objective is exact for classes of one and two and the pairwise sum beyond (which prices a large
    class above its fitted error), so the measured choice has the last word."""
    leave, bases = frozenset(may_leave), dict(bases or {})
    nothing: frozenset[str] = frozenset()
    starts = [] if bases_first else [(r, a, nothing) for r in (own, *uniform.values())
                                     for a in ((nothing, leave) if leave else (leave,))]
    starts += [(r, nothing, frozenset(r)) for r in bases.values()]
    found_starts = [found for forms in starts if (found := optimum(*forms)) is not None]
    if not found_starts:
        return None

    def loss(found: Found) -> float:
        return objective(found[0])

    best = min(found_starts, key=loss)
    ranks, alone, based = forms_of(best[1])
    for _ in range(rounds):
        moved = False
        for fam in ranks:
            options = [(option[fam], apart, False) for option in uniform.values()
                       for apart in ((False, True) if fam in leave else (False,))]
            options += [(option[fam], False, True) for option in bases.values()]
            for rank, apart, on_basis in options:
                trial = {**ranks, fam: rank}
                trial_alone = alone | {fam} if apart else alone - {fam}
                trial_based = based | {fam} if on_basis else based - {fam}
                found = optimum(trial, trial_alone, trial_based)
                if found is not None and loss(found) < loss(best):
                    best, ranks, alone, based, moved = found, trial, trial_alone, trial_based, True
        if not moved:
            break
    return best


def objective(plan: SharingPlan) -> float:
    """The solver's predicted loss of ``plan`` (inf when it has none)."""
    return plan.objective if plan.objective is not None else float("inf")
