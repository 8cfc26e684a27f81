"""Pick the plan that really loses least: measure every candidate on calibration data.

Zero-shot, the measured loss after merging decides (``choose_plan``). When the model will be
healed, the plan that is best zero-shot is not always the one that heals best: contiguous plans
(sequence, cycle) heal further than scattered ones (bench/results/eval.md, the ``+geo-merge`` rows).
``choose_healed`` heals a shortlist exactly as the final model is healed and keeps the one with
the least loss afterwards (each heal keeps its best held-out step, step 0 included, so a
candidate that healing hurts stays as it was tied). The same holds for the factored schemes: on
MiniLM at 0.5 every family alone measured best zero-shot (0.809 cosine, 0.833 healed) and one
relaxed class per family healed furthest (0.849; per-layer SVD healed 0.833;
bench/results/eval-relaxed-basis-healed.md), so the shortlist keeps the best of each form of
sharing (``heal_kind``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict
from torch import nn
from tqdm.auto import tqdm

from hessian_worker.apply import ApplyReport, apply_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.data import DataSource
from hessian_worker.healing import HealConfig, HealReport, heal
from hessian_worker.measure import measure_loss, measure_plans
from hessian_worker.merge import Merge
from hessian_worker.relaxed.analysis import family_sizes
from hessian_worker.schemes import State, scheme_of
from solver.schema import Scheme, SharingPlan, SharingProblem


class Choice(BaseModel):
    """The chosen plan and every candidate's measured calibration-loss change (same order)."""

    plan: SharingPlan
    index: int
    measured: list[float]


def choose_plan(
    model: Any,
    data: DataSource,
    plans: Sequence[SharingPlan],
    config: AnalyzeConfig | None = None,
    *,
    merge: Merge | str = Merge.mean,
    tokenizer: Any | None = None,
    diag: dict[str, Any] | None = None,
    problem: SharingProblem | None = None,
    covs: dict[str, Any] | None = None,
    layerwise: Any | None = None,
) -> Choice:
    """The candidate with the least measured loss change after merging (ties: the earlier one).

    The model is not changed: merged weights are substituted per candidate (see measure_plans);
    ``diag`` and ``layerwise`` pass merge curvature measured already; ``problem`` (and ``covs``) make the
    classes of ``basis`` families their low-rank weights.
    """
    if not plans:
        raise ValueError("choose_plan needs at least one candidate plan")
    measured = measure_plans(model, data, list(plans), config, merge=merge, tokenizer=tokenizer, diag=diag,
                             problem=problem, covs=covs, layerwise=layerwise)
    index = min(range(len(plans)), key=lambda i: (measured[i], i))
    return Choice(plan=plans[index], index=index, measured=measured)


def pattern_family(plan: SharingPlan) -> str | None:
    """The pattern a candidate came from ("sequence#2" -> "sequence"); None for cost-model plans."""
    name = plan.strategy
    if name is None or name.startswith(("top-", "norm-")):
        return None
    return name.split("#")[0]


def sharing_form(plan: SharingPlan, problem: SharingProblem) -> str:
    """How a factored plan shares, family by family: "alone" (every layer its own factors), "loop"
    (one relaxed class of all the family's layers, as a looped model), "tensors" (several relaxed
    classes), "bases" (a basis class of two or more); the plan's form joins its families' ("alone+loop").

    Why the loop apart: on MiniLM at 0.4 one class per family heals furthest (0.806 cosine) while the
    best zero-shot plan that shares tensors (some families looped, some alone) heals to 0.790."""
    families = problem.families or {}
    of = {x.name: x.family for x in problem.layers}
    size = family_sizes(problem)
    groups: dict[str, list[int]] = {}
    for group in plan.groups:
        groups.setdefault(of[group[0]], []).append(len(group))
    forms = set()
    for fam, lengths in groups.items():
        spec = families.get(fam)
        if max(lengths) < 2:
            forms.add("alone")
        elif spec is not None and spec.scheme is Scheme.basis:
            forms.add("bases")
        else:
            forms.add("loop" if lengths == [size[fam]] else "tensors")
    return "+".join(sorted(forms)) or "alone"


def heal_kind(plan: SharingPlan, problem: SharingProblem | None) -> str | None:
    """What makes candidates heal differently, so the shortlist keeps each kind's best: a tying
    plan's pattern (contiguous plans heal further), a factored plan's form of sharing (a shared S_c
    and its corrections train further than per-layer factors); None: a cost-model plan of tying."""
    if problem is None or scheme_of(problem).name is Scheme.tie:
        return pattern_family(plan)
    return sharing_form(plan, problem)


def shortlist(plans: Sequence[SharingPlan], measured: Sequence[float], best: int,
              kinds: Sequence[str | None] | None = None) -> list[int]:
    """Indices to heal: the ``best`` least-loss candidates, plus the least-loss plan of every kind
    (``kinds``, one per plan; by default each plan's pattern).

    The kinds join because a plan that loses a little more zero-shot can heal past the zero-shot
    winner; they are few (one per kind), so the shortlist stays short.
    """
    kinds = [pattern_family(p) for p in plans] if kinds is None else kinds
    order = sorted(range(len(plans)), key=lambda i: (measured[i], i))
    keep = order[:best]
    seen: set[str] = set()
    for i in order:
        kind = kinds[i]
        if kind is not None and kind not in seen:
            seen.add(kind)
            if i not in keep:
                keep.append(i)
    return keep


class HealedChoice(BaseModel):
    """The plan whose healed model loses least on the choice data, and that healed model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    plan: SharingPlan
    index: int
    healed: dict[int, float]  # candidate index -> loss change on the choice data after healing
    model: Any  # the winner, tied and healed (nn.Module)
    apply: ApplyReport  # the winner's tie
    heal: HealReport  # the winner's healing


def choose_healed(
    model: nn.Module,
    plans: Sequence[SharingPlan],
    measured: Sequence[float],
    heal_data: DataSource,
    choice_data: DataSource,
    heal_config: HealConfig,
    config: AnalyzeConfig | None = None,
    *,
    best: int = 2,
    merge: Merge | str = Merge.mean,
    tokenizer: Any | None = None,
    diag: dict[str, Any] | None = None,
    layerwise: Any | None = None,
    problems: Sequence[SharingProblem | None] | None = None,
    state: State = None,
) -> HealedChoice:
    """Ties and heals every shortlisted candidate as the final model would be, keeps the best healed.

    Args:
        model: the original model (not changed; each candidate gets a copy).
        measured: the candidates' zero-shot measured losses (``choose_plan``'s), for the shortlist.
        heal_data: what healing trains on (the same as the final heal, so the winner is final).
        choice_data: where the healed candidates are compared. Not the heal's own held-out
            fifth: tried (bench/results/runs/eval-held-choice.md), it is too small and, under the
            layerwise merge, inside the covariances the ties were fitted with, so it ranked plans by
            noise and merge fit (MiniLM healed 0.953 -> 0.929 at 0.9, 0.850 -> 0.803 at 0.67). The
            heal's held-out check keeps each candidate from overfitting, which is what the
            comparison on the larger choice data needed.
        problems: each plan's problem (None: tied), so a factored scheme's candidate is installed
            by its scheme (``apply_plan``) with ``state`` (its whitening), and shortlisted by its
            form of sharing (``heal_kind``).
    """
    if not plans:
        raise ValueError("choose_healed needs at least one candidate plan")
    config = config or AnalyzeConfig(progress=False)
    quiet = heal_config.model_copy(update={"progress": False})
    healed: dict[int, float] = {}
    winner: HealedChoice | None = None
    problems = list(problems) if problems is not None else [None] * len(plans)
    kinds = [heal_kind(plan, problem) for plan, problem in zip(plans, problems, strict=True)]
    for i in tqdm(shortlist(plans, measured, best, kinds), desc="heal candidates", disable=not config.progress,
                  leave=False):
        candidate = copy.deepcopy(model)
        tied = apply_plan(candidate, plans[i], merge, data=choice_data, config=config, tokenizer=tokenizer,
                          problem=problems[i], diag=diag, layerwise=layerwise, state=state)
        report = heal(candidate, model, heal_data, quiet, tokenizer=tokenizer)
        healed[i] = measure_loss(candidate, model, choice_data, config, tokenizer=tokenizer)
        if winner is None or (healed[i], i) < (healed[winner.index], winner.index):
            winner = HealedChoice(plan=plans[i], index=i, healed={}, model=candidate, apply=tied, heal=report)
    assert winner is not None
    return winner.model_copy(update={"healed": healed})
