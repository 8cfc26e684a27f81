"""Brute force over set partitions, written from the contract alone (no solver code)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

from solver.schema import SharingProblem


def set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


def _class_cost(problem: SharingProblem, members: list[int]) -> float:
    m = problem.costs.matrix
    if len(members) < 2:
        return 0.0
    if any(m[a][b] is None or m[b][a] is None for a, b in itertools.combinations(members, 2)):
        return math.inf  # null: the pair may never share
    if problem.costs.kind.value == "pairwise":
        total = 0.0
        for a, b in itertools.combinations(members, 2):
            if m[a][b] is None:
                return math.inf
            total += m[a][b]
        return total
    best = math.inf
    for r in members:
        s = 0.0
        for a in members:
            if a == r:
                continue
            if m[a][r] is None or m[r][a] is None:
                s = math.inf
                break
            s += m[a][r]
        best = min(best, s)
    return best


def _alone(problem: SharingProblem, family: str) -> bool:
    """The contract's ``families[f].alone``: every layer a class of its own, nothing shared stored."""
    spec = (problem.families or {}).get(family)
    return bool(spec is not None and spec.alone)


def _feasible(problem: SharingProblem, part: list[list[int]], order: list[int]) -> bool:
    names = [layer.name for layer in problem.layers]
    pos = {n: i for i, n in enumerate(names)}
    c = problem.constraints
    label = {}
    for ci, cls in enumerate(part):
        for i in cls:
            label[i] = ci
        if c.max_group_size is not None and len(cls) > c.max_group_size:
            return False
        if len(cls) > 1 and any(pos[p] in cls for p in c.pinned):
            return False
        if len(cls) > 1 and _alone(problem, problem.layers[cls[0]].family):
            return False
        if c.contiguous and len(cls) > 1:
            idx = sorted(order.index(i) for i in cls)
            if idx[-1] - idx[0] + 1 != len(idx):
                return False
    for a, b in c.forbid:
        if pos[a] in label and pos[b] in label and label[pos[a]] == label[pos[b]]:
            return False
    for a, b in c.require:
        if (pos[a] in label) != (pos[b] in label):
            return False
        if pos[a] in label and label[pos[a]] != label[pos[b]]:
            return False
    return True


def family_table(problem: SharingProblem) -> dict[str, dict[int, tuple[float, int]]]:
    """family -> {classes: (least cost, params)} over every feasible partition."""
    fams: dict[str, list[int]] = {}
    for i, layer in enumerate(problem.layers):
        fams.setdefault(layer.family, []).append(i)
    unary = problem.costs.unary or [0.0] * len(problem.layers)
    out = {}
    for fam, ids in fams.items():
        order = sorted(ids, key=lambda i: (problem.layers[i].index, i))
        spec = (problem.families or {}).get(fam)
        if spec is None or spec.scheme.value == "tie":
            cp, mp = problem.layers[ids[0]].params, 0
        else:
            cp, mp = (0 if spec.alone else spec.class_params), spec.member_params
        table: dict[int, tuple[float, int]] = {}
        for part in set_partitions(order):
            if not _feasible(problem, part, order):
                continue
            cost = sum(_class_cost(problem, cls) for cls in part) + sum(unary[i] for i in ids)
            if not math.isfinite(cost):
                continue
            k = len(part)
            params = cp * k + mp * len(ids)
            if k not in table or cost < table[k][0]:
                table[k] = (cost, params)
        out[fam] = table
    return out


def brute_optimum(problem: SharingProblem) -> tuple[float, int] | None:
    """(least objective within the budget, least reachable params); None if a family has no
    feasible partition at all. Objective is inf when nothing meets the budget."""
    tables = family_table(problem)
    if any(not t for t in tables.values()):
        return None
    budget = problem.budget_params()
    least = sum(min(p for _, p in t.values()) for t in tables.values())
    best = math.inf
    for combo in itertools.product(*(t.values() for t in tables.values())):
        params = sum(p for _, p in combo)
        if budget is None or params <= budget:
            best = min(best, sum(c for c, _ in combo))
    return best, least
