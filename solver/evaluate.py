"""Score and check a coloring straight from the problem's JSON data.

Independent of the search code on purpose: every plan's objective is recomputed here, and the
tests use it as the reference.
"""

from __future__ import annotations

import math
from collections import defaultdict

from .schema import CostKind, SharingProblem


def classes_of(problem: SharingProblem, coloring: dict[str, int]) -> dict[int, list[int]]:
    """Class id -> layer positions, in layer order."""
    out: dict[int, list[int]] = defaultdict(list)
    for i, layer in enumerate(problem.layers):
        out[coloring[layer.name]].append(i)
    return dict(out)


def objective(problem: SharingProblem, coloring: dict[str, int]) -> float:
    """The plan's objective: pair costs inside classes (or representative costs) plus unary."""
    m = problem.costs.matrix
    total = sum(problem.costs.unary or [])
    for members in classes_of(problem, coloring).values():
        if len(members) < 2:
            continue
        if problem.costs.kind is CostKind.pairwise:
            for a_i, a in enumerate(members):
                for b in members[a_i + 1 :]:
                    v = m[a][b]
                    total += math.inf if v is None else v
        else:
            best = math.inf
            for r in members:
                s = 0.0
                for a in members:
                    if a != r:
                        v = m[a][r]
                        s += math.inf if v is None else v
                best = min(best, s)
            total += best
    return total


def unique_params(problem: SharingProblem, coloring: dict[str, int]) -> int:
    """Unique parameters kept: per class, class_params + member_params per member."""
    total = 0
    for members in classes_of(problem, coloring).values():
        fam = problem.layers[members[0]].family
        cp, mp = problem.family_accounting(fam)
        total += cp + mp * len(members)
    return total


def violations(problem: SharingProblem, coloring: dict[str, int]) -> list[str]:
    """Every constraint the coloring breaks, in words (empty when feasible)."""
    out = []
    names = [layer.name for layer in problem.layers]
    missing = [n for n in names if n not in coloring]
    if missing:
        return [f"layers without a class: {missing[:5]}"]
    cons = problem.constraints
    classes = classes_of(problem, coloring)
    for c, members in classes.items():
        fams = {problem.layers[i].family for i in members}
        if len(fams) > 1:
            out.append(f"class {c} mixes families {sorted(fams)}")
        if cons.max_group_size is not None and len(members) > cons.max_group_size:
            out.append(f"class {c} has {len(members)} layers > max_group_size {cons.max_group_size}")
        for a_i, a in enumerate(members):
            for b in members[a_i + 1 :]:
                if problem.costs.matrix[a][b] is None or problem.costs.matrix[b][a] is None:
                    out.append(f"class {c} joins {names[a]} and {names[b]} whose cost is null")
        if cons.contiguous and len(members) > 1:
            fam = problem.layers[members[0]].family
            order = sorted(
                (i for i, layer in enumerate(problem.layers) if layer.family == fam),
                key=lambda i: (problem.layers[i].index, i),
            )
            pos = sorted(order.index(i) for i in members)
            if pos[-1] - pos[0] + 1 != len(pos):
                out.append(f"class {c} is not a run of consecutive layers")
    alone = problem.alone_families()
    for p in problem.never_shared():
        if len(classes[coloring[p]]) > 1:
            why = "of an alone family" if problem.layers[names.index(p)].family in alone else "pinned"
            out.append(f"layer {p} is {why} but shared")
    for a, b in cons.forbid:
        if coloring[a] == coloring[b]:
            out.append(f"forbidden pair {a}, {b} shares")
    for a, b in cons.require:
        if coloring[a] != coloring[b]:
            out.append(f"required pair {a}, {b} does not share")
    budget = problem.budget_params()
    if budget is not None and unique_params(problem, coloring) > budget:
        out.append(f"unique params {unique_params(problem, coloring)} exceed the budget {budget}")
    return out
