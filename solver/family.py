"""Split a SharingProblem into independent per-family subproblems.

Only the budget couples families, so each family is solved alone for every class count k.
Inside a family, `require` pairs are contracted into units (they always share) and pinned layers
are set aside as fixed singletons; the search algorithms see only the free units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .errors import ConstraintInfeasible
from .scaling import normalizing_exponent
from .schema import CostKind, SharingProblem


@dataclass
class UnitProblem:
    """Free units of one family: what every per-family algorithm searches over.

    A class is a set of units; its cost is, for ``pairwise``, the sum of ``pair`` over its unit
    pairs and, for ``assignment``, the least over representatives r (a layer inside the class) of
    the sum of ``take[u, r]`` over its units. ``constant`` is what every partition pays anyway.
    """

    kind: CostKind
    sizes: np.ndarray  # (m,) layers per unit
    forbidden: np.ndarray  # (m, m) bool, symmetric
    max_size: int | None  # layers per class
    pair: np.ndarray | None = None  # (m, m) pairwise unit costs; 0 where forbidden
    take: np.ndarray | None = None  # (m, L) unit u joining the class represented by layer r
    home: np.ndarray | None = None  # (L,) unit that holds layer r
    constant: float = 0.0

    @property
    def m(self) -> int:
        return len(self.sizes)

    def class_cost(self, units: list[int] | np.ndarray) -> float:
        """Cost of one class (inf when the class breaks a constraint)."""
        units = np.asarray(units, dtype=int)
        if len(units) == 0:
            return 0.0
        if self.max_size is not None and int(self.sizes[units].sum()) > self.max_size:
            return math.inf
        if self.forbidden[np.ix_(units, units)].any():
            return math.inf
        if self.kind is CostKind.pairwise:
            assert self.pair is not None
            return float(self.pair[np.ix_(units, units)].sum() / 2.0)
        assert self.take is not None and self.home is not None
        reps = np.flatnonzero(np.isin(self.home, units))
        return float(self.take[np.ix_(units, reps)].sum(axis=0).min())

    def partition_cost(self, labels: np.ndarray) -> float:
        """Cost of a labelling of the units (without ``constant``)."""
        return sum(self.class_cost(np.flatnonzero(labels == c)) for c in np.unique(labels))


@dataclass
class FamilyInstance:
    """One family: its layers in depth order and the reduced problem over free units."""

    name: str
    layer_ids: list[int]  # global layer positions, sorted by depth index
    class_params: int
    member_params: int
    units: list[list[int]]  # free units as lists of local layer positions
    pinned: list[int]  # local positions of pinned layers (fixed singletons)
    reduced: UnitProblem
    cost: np.ndarray  # (n, n) local layer costs, inf = forbidden pair
    unary: np.ndarray  # (n,)
    kind: CostKind
    max_size: int | None
    contiguous: bool
    required: list[tuple[int, int]] = field(default_factory=list)  # local pairs
    scale_exp: int = 0  # costs here are the problem's times 2^-scale_exp (see scaling.py)

    def to_problem(self, cost: float) -> float:
        """A cost of this instance (normalized) in the problem's own units."""
        return math.ldexp(cost, self.scale_exp)

    @property
    def n(self) -> int:
        return len(self.layer_ids)

    def params_for(self, k: int) -> int:
        """Unique parameters of this family when it uses k classes."""
        return self.class_params * k + self.member_params * self.n

    @property
    def k_max(self) -> int:
        return len(self.units) + len(self.pinned)

    def layer_labels(self, unit_labels: np.ndarray) -> np.ndarray:
        """Expand a labelling of free units to all local layers (pinned get fresh classes)."""
        labels = np.empty(self.n, dtype=int)
        for u, members in enumerate(self.units):
            labels[members] = unit_labels[u]
        nxt = int(unit_labels.max()) + 1 if len(unit_labels) else 0
        for i, p in enumerate(self.pinned):
            labels[p] = nxt + i
        return canonical(labels)

    def layer_partition_cost(self, labels: np.ndarray) -> float:
        """Exact objective of a labelling of this family's layers (inf if it breaks a constraint).

        Vectorized over the whole labelling: the K-best lists score thousands of neighbours.
        """
        labels = np.asarray(labels)
        if not self.is_feasible(labels):
            return math.inf
        same = labels[:, None] == labels[None, :]
        finite = np.where(same, self.cost, 0.0)  # feasible: no inf inside a class
        total = float(self.unary.sum())
        if self.kind is CostKind.pairwise:
            return total + float(np.triu(finite, 1).sum())
        np.fill_diagonal(finite, 0.0)
        # a class with representative r pays column r's sum over the class (finite is zero
        # outside it); the best r inside each class. O(n^2), not O(classes * n^2) as a one-hot
        # product: agglomerative offers a labelling per class count (288 layers: 1 s -> 0.1 s)
        best = np.full(int(labels.max()) + 1, np.inf)
        np.minimum.at(best, labels, finite.sum(axis=0))
        return total + float(best.sum())

    def is_feasible(self, labels: np.ndarray) -> bool:
        """Whether a labelling of the layers meets every constraint of this family."""
        labels = np.asarray(labels)
        counts = np.bincount(labels)
        if self.max_size is not None and counts.max(initial=0) > self.max_size:
            return False
        if self.pinned and (counts[labels[self.pinned]] > 1).any():
            return False
        same = labels[:, None] == labels[None, :]
        np.fill_diagonal(same, False)
        if np.isinf(self.cost[same]).any():
            return False
        if self.contiguous:
            pos = np.arange(self.n)
            first = np.full(len(counts), self.n)
            last = np.full(len(counts), -1)
            np.minimum.at(first, labels, pos)
            np.maximum.at(last, labels, pos)
            used = counts > 0
            if (last[used] - first[used] + 1 != counts[used]).any():
                return False
        return all(labels[a] == labels[b] for a, b in self.required)


def canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel classes 0, 1, ... in order of first appearance (one name per partition)."""
    mapping: dict[int, int] = {}
    out = np.empty_like(labels)
    for i, c in enumerate(labels.tolist()):
        out[i] = mapping.setdefault(c, len(mapping))
    return out


def coloring_of(problem: SharingProblem, fams: list[FamilyInstance], labels: list[np.ndarray]) -> dict[str, int]:
    """The problem-wide coloring from each family's layer labels (class ids never shared across families)."""
    coloring: dict[str, int] = {}
    offset = 0
    for fam, lab in zip(fams, labels, strict=True):
        for local, g in enumerate(fam.layer_ids):
            coloring[problem.layers[g].name] = offset + int(lab[local])
        offset += int(lab.max()) + 1
    return coloring


def build_families(problem: SharingProblem) -> list[FamilyInstance]:
    """Per-family instances, in order of first appearance of each family.

    Raises:
        ConstraintInfeasible: a required pair spans families, is forbidden, is pinned, or makes a
            unit larger than max_group_size.
    """
    layers = problem.layers
    pos = {layer.name: i for i, layer in enumerate(layers)}
    matrix = problem.costs.matrix
    kind = problem.costs.kind
    cons = problem.constraints
    unary_all = problem.costs.unary or [0.0] * len(layers)

    for a, b in cons.require:
        if layers[pos[a]].family != layers[pos[b]].family:
            raise ConstraintInfeasible(
                f"require pairs {a!r} and {b!r} from different families "
                f"({layers[pos[a]].family!r}, {layers[pos[b]].family!r}); only one family can share"
            )

    order: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        order.setdefault(layer.family, []).append(i)

    # every search below compares costs, so they see normalized costs (largest entry in
    # [0.5, 1), divided by a power of two: exact); plans then do not depend on the cost unit
    raw: dict[str, np.ndarray] = {}
    for fam, ids in order.items():
        ids.sort(key=lambda i: (layers[i].index, i))
        raw[fam] = np.array([[0.0 if a == b else _cost(matrix[a][b]) for b in ids] for a in ids], dtype=float).reshape(len(ids), len(ids))
    exp = normalizing_exponent(np.concatenate([c.ravel() for c in raw.values()] + [np.asarray(unary_all, dtype=float)]))

    forbid_global = {frozenset((pos[a], pos[b])) for a, b in cons.forbid}
    pinned_global = {pos[x] for x in problem.never_shared()}  # pinned, and every layer of an alone family
    out = []
    for fam, ids in order.items():
        local = {g: j for j, g in enumerate(ids)}
        n = len(ids)
        cost = np.ldexp(raw[fam], -exp)
        for pair in forbid_global:
            ga, gb = tuple(pair)
            if ga in local and gb in local:
                cost[local[ga], local[gb]] = cost[local[gb], local[ga]] = math.inf
        if kind is CostKind.assignment:
            # a pair that may not share in one direction may not share at all
            inf = np.isinf(cost) | np.isinf(cost.T)
            cost[inf] = math.inf
        required = [(local[pos[a]], local[pos[b]]) for a, b in cons.require if pos[a] in local]
        pinned = sorted(local[g] for g in pinned_global if g in local)
        class_params, member_params = problem.family_accounting(fam)
        # a cap of n or more layers never binds: drop it, so no search meets a huge integer
        max_size = cons.max_group_size if cons.max_group_size is not None and cons.max_group_size < n else None
        unary = np.ldexp(np.asarray([unary_all[g] for g in ids], dtype=float), -exp)
        units, reduced = _reduce(fam, [layers[g].name for g in ids], cost, required, pinned, kind, max_size)
        reduced.constant += float(unary.sum())
        out.append(
            FamilyInstance(
                name=fam,
                layer_ids=ids,
                class_params=class_params,
                member_params=member_params,
                units=units,
                pinned=pinned,
                reduced=reduced,
                cost=cost,
                unary=unary,
                kind=kind,
                max_size=max_size,
                contiguous=cons.contiguous,
                required=required,
                scale_exp=exp,
            )
        )
    return out


def _cost(value: float | None) -> float:
    return math.inf if value is None else value


def _reduce(
    fam: str,
    names: list[str],
    cost: np.ndarray,
    required: list[tuple[int, int]],
    pinned: list[int],
    kind: CostKind,
    max_size: int | None,
) -> tuple[list[list[int]], UnitProblem]:
    """Contract required pairs into units and drop pinned layers."""
    n = len(names)
    if required:
        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        graph.add_edges_from(required)
        comps = sorted((sorted(c) for c in nx.connected_components(graph)), key=lambda c: c[0])
    else:
        comps = [[i] for i in range(n)]
    pinned_set = set(pinned)
    units = []
    for comp in comps:
        if len(comp) > 1 and pinned_set & set(comp):
            p = next(i for i in comp if i in pinned_set)
            raise ConstraintInfeasible(
                f"layer {names[p]!r} is pinned (never shared) but a require pair makes it share; "
                "drop the pin or the require pair"
            )
        if len(comp) > 1:
            sub = cost[np.ix_(comp, comp)]
            if np.isinf(sub[~np.eye(len(comp), dtype=bool)]).any():
                bad = [(names[a], names[b]) for a in comp for b in comp if a < b and np.isinf(cost[a, b])]
                raise ConstraintInfeasible(
                    f"family {fam!r}: required pairs chain together layers that may not share "
                    f"(forbidden or null cost): {bad[:3]}; drop one of the require or forbid pairs"
                )
            if max_size is not None and len(comp) > max_size:
                raise ConstraintInfeasible(
                    f"family {fam!r}: require pairs join {len(comp)} layers "
                    f"({', '.join(names[i] for i in comp[:4])}...) but max_group_size is {max_size}"
                )
        if comp[0] not in pinned_set:
            units.append(comp)
    m = len(units)
    sizes = np.array([len(u) for u in units], dtype=int)
    if units and all(len(u) == 1 for u in units):
        return units, _singleton_units(units, cost, kind, max_size, sizes)
    forbidden = np.zeros((m, m), dtype=bool)
    for a in range(m):
        for b in range(a + 1, m):
            if np.isinf(cost[np.ix_(units[a], units[b])]).any():
                forbidden[a, b] = forbidden[b, a] = True
    finite = np.where(np.isinf(cost), 0.0, cost)
    if kind is CostKind.pairwise:
        pair = np.zeros((m, m))
        constant = 0.0
        for a in range(m):
            constant += float(np.triu(finite[np.ix_(units[a], units[a])], 1).sum())
            for b in range(a + 1, m):
                pair[a, b] = pair[b, a] = finite[np.ix_(units[a], units[b])].sum()
        pair[forbidden] = 0.0
        return units, UnitProblem(kind, sizes, forbidden, max_size, pair=pair, constant=constant)
    # assignment: representatives are the layers of the free units
    rep_layers = [layer for u in units for layer in u]
    home = np.array([a for a, u in enumerate(units) for _ in u], dtype=int)
    take = np.zeros((m, len(rep_layers)))
    for a in range(m):
        for r, layer in enumerate(rep_layers):
            col = cost[units[a], layer].copy()
            col[np.asarray(units[a]) == layer] = 0.0
            take[a, r] = math.inf if np.isinf(col).any() else col.sum()
    # a unit that cannot take a representative of another unit is forbidden with it already;
    # keep take finite so sums stay finite, forbidden masks the rest
    take = np.where(np.isinf(take), 0.0, take)
    return units, UnitProblem(kind, sizes, forbidden, max_size, take=take, home=home)


def _singleton_units(
    units: list[list[int]], cost: np.ndarray, kind: CostKind, max_size: int | None, sizes: np.ndarray
) -> UnitProblem:
    """`_reduce`'s unit problem when no require pair joins layers (the usual case), vectorized.

    The same numbers as the general loop, which sums 1x1 blocks per unit pair: a copy of the
    block values (``+ 0.0`` turns -0.0 into 0.0 as those sums do), upper triangle mirrored
    (adding the zero other triangle is exact).
    """
    m = len(units)
    idx = [u[0] for u in units]
    sub = cost[np.ix_(idx, idx)]
    upper = np.triu(np.isinf(sub), 1)
    forbidden = upper | upper.T
    finite = np.where(np.isinf(sub), 0.0, sub) + 0.0
    if kind is CostKind.pairwise:
        pair = np.triu(finite, 1)
        pair = pair + pair.T
        pair[forbidden] = 0.0
        return UnitProblem(kind, sizes, forbidden, max_size, pair=pair, constant=0.0)
    # assignment: unit a taking the representative of unit r costs its one entry (0 for itself)
    take = finite.copy()
    np.fill_diagonal(take, 0.0)
    return UnitProblem(kind, sizes, forbidden, max_size, take=take, home=np.arange(m, dtype=int))
