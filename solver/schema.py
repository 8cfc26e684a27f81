"""The JSON contract: SharingProblem in, SharingPlan out (see DESIGN.md).

Structural checks live here (shapes, symmetry, finite non-negative costs, known names), so a
malformed problem fails at the door with a message naming the entries and the fix. Checks that
need solving (is the budget reachable?) live in the solver.
"""

from __future__ import annotations

import math
from collections import Counter
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = "1"
_MAX_LISTED = 5  # how many offending entries an error message names


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CostKind(str, Enum):
    """How the cost matrix is read."""

    pairwise = "pairwise"  # w[l][m]: both layers take their mean (symmetric)
    assignment = "assignment"  # c[l][m]: layer l takes layer m's weight


class Scheme(str, Enum):
    """How a class of layers shares parameters."""

    tie = "tie"  # one tensor per class
    basis = "basis"  # one low-rank basis per class, coefficients per member


class Side(str, Enum):
    """Which factor of a ``basis`` class is shared (the solver never reads it; apply does)."""

    out = "out"  # W_l ~ B_c C_l: B_c (d_out x r) shared, C_l (r x d_in) per member
    in_ = "in"  # W_l ~ C_l B_c: B_c (r x d_in) shared, C_l (d_out x r) per member


class Layer(_Model):
    name: str = Field(min_length=1, description="Full parameter name.")
    family: str = Field(min_length=1, description="Only layers of one family may share.")
    params: int = Field(gt=0, description="Element count of the tensor.")
    index: int = Field(ge=0, description="Depth position, for contiguity and baselines.")


class Costs(_Model):
    kind: CostKind = CostKind.pairwise
    matrix: list[list[float | None]] = Field(
        description="n x n over the layers; diagonal ignored; null = the pair may never share."
    )
    unary: list[float] | None = Field(
        default=None, description="Optional cost of each layer alone, added for every layer."
    )


class Constraints(_Model):
    max_params_ratio: float | None = Field(default=None, gt=0, le=1)
    max_params: int | None = Field(default=None, gt=0)
    max_group_size: int | None = Field(default=None, ge=1)
    pinned: list[str] = Field(default_factory=list, description="Layers never shared.")
    forbid: list[tuple[str, str]] = Field(default_factory=list)
    require: list[tuple[str, str]] = Field(default_factory=list)
    contiguous: bool = Field(default=False, description="Classes are runs of consecutive index.")


class Options(_Model):
    time_limit_s: float = Field(default=10.0, gt=0, le=3600)
    relative_gap: float = Field(default=0.0, ge=0, le=1)
    workers: int | None = Field(default=None, ge=1, le=64)
    seed: int = Field(default=0, ge=0)
    top: int | None = Field(
        default=None, ge=1, le=1000,
        description="Plans wanted: above 1, the plan lists the next best diverse colorings and the pattern plans as alternatives.",
    )
    min_distance: int = Field(
        default=1, ge=1, description="Layer pairs in which each alternative's sharing differs from every better plan's."
    )


class FamilySpec(_Model):
    """Per-family sharing scheme; a class costs class_params once plus member_params per member."""

    scheme: Scheme = Scheme.tie
    rank: int | None = Field(default=None, ge=1)
    class_params: int | None = Field(default=None, ge=0)
    member_params: int | None = Field(default=None, ge=0)
    side: Side | None = Field(
        default=None,
        description="basis only: 'out' (default; B_c d_out x r shared) or 'in' (B_c r x d_in shared).",
    )

    @model_validator(mode="after")
    def _basis_needs_accounting(self) -> FamilySpec:
        if self.scheme is Scheme.basis and (self.class_params is None or self.member_params is None):
            raise ValueError(
                "scheme 'basis' needs class_params (the shared basis: d_out*rank, or rank*d_in with "
                "side 'in') and member_params (each member's coefficients: rank*d_in, or d_out*rank)"
            )
        if self.side is not None and self.scheme is not Scheme.basis:
            raise ValueError(
                f"side={self.side.value!r} applies to scheme 'basis' only; drop it or set scheme 'basis'"
            )
        return self

    @property
    def basis_side(self) -> Side:
        """The shared side of a basis family ('out' when not given)."""
        return self.side or Side.out


def _listed(items: list) -> str:
    shown = ", ".join(str(x) for x in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


class SharingProblem(_Model):
    version: str = SCHEMA_VERSION
    layers: list[Layer] = Field(min_length=1)
    costs: Costs
    constraints: Constraints = Field(default_factory=Constraints)
    options: Options = Field(default_factory=Options)
    families: dict[str, FamilySpec] | None = None
    source: dict[str, Any] | None = Field(
        default=None,
        description="How the costs were made (the worker writes its analysis settings: backend, curvature, "
        "loss, samples, basis options); free-form, the solver ignores it.",
    )

    @model_validator(mode="after")
    def _check(self) -> SharingProblem:
        self._check_layers()
        self._check_matrix()
        self._check_constraints()
        self._check_families()
        return self

    def _check_layers(self) -> None:
        dup = [n for n, c in Counter(layer.name for layer in self.layers).items() if c > 1]
        if dup:
            raise ValueError(f"duplicate layer names: {_listed(dup)}; every layer needs a unique name")

    def _check_matrix(self) -> None:
        n = len(self.layers)
        m = self.costs.matrix
        if len(m) != n or any(len(row) != n for row in m):
            shape = f"{len(m)} rows of lengths {sorted({len(r) for r in m})}"
            raise ValueError(f"costs.matrix must be {n}x{n} (one row and column per layer), got {shape}")
        bad, neg, asym = [], [], []
        pairwise = self.costs.kind is CostKind.pairwise
        for i in range(n):
            for j in range(n):
                v = m[i][j]
                if i == j or v is None:
                    if pairwise and i != j and m[j][i] is not None:
                        asym.append((i, j))
                    continue
                if not math.isfinite(v):
                    bad.append((i, j))
                elif v < 0:
                    neg.append((i, j))
                elif pairwise and j > i and (m[j][i] is None or not math.isclose(v, m[j][i], rel_tol=1e-9, abs_tol=1e-12)):
                    asym.append((i, j))
        if bad:
            raise ValueError(f"costs.matrix has NaN or infinite entries at (row, col) {_listed(bad)}; use null to forbid a pair")
        if neg:
            raise ValueError(
                f"costs.matrix has negative entries at (row, col) {_listed(neg)}; costs must be >= 0 "
                "(a predicted loss increase); clip or shift them"
            )
        if asym:
            raise ValueError(
                f"pairwise costs.matrix is not symmetric at (row, col) {_listed(asym)}; "
                "symmetrize it ((W + W^T)/2) or use kind 'assignment'"
            )
        u = self.costs.unary
        if u is not None:
            if len(u) != n:
                raise ValueError(f"costs.unary must have one entry per layer ({n}), got {len(u)}")
            badu = [i for i, v in enumerate(u) if not math.isfinite(v) or v < 0]
            if badu:
                raise ValueError(f"costs.unary must be finite and >= 0; bad entries at {_listed(badu)}")

    def _check_constraints(self) -> None:
        names = {layer.name for layer in self.layers}
        c = self.constraints
        unknown = [x for x in c.pinned if x not in names]
        for field in ("forbid", "require"):
            for a, b in getattr(c, field):
                unknown += [x for x in (a, b) if x not in names]
                if a == b:
                    raise ValueError(f"constraints.{field} pairs a layer with itself: {a!r}")
        if unknown:
            raise ValueError(f"constraints name unknown layers: {_listed(sorted(set(unknown)))}; use names from 'layers'")

    def _check_families(self) -> None:
        fams = {layer.family for layer in self.layers}
        specs = self.families or {}
        extra = sorted(set(specs) - fams)
        if extra:
            raise ValueError(f"families names unknown families: {_listed(extra)}; known: {_listed(sorted(fams))}")
        for fam in fams:
            spec = specs.get(fam)
            if spec is None or spec.scheme is Scheme.tie:
                sizes = sorted({layer.params for layer in self.layers if layer.family == fam})
                if len(sizes) > 1:
                    raise ValueError(
                        f"family {fam!r} mixes tensor sizes {sizes}; tied layers must have one shape, "
                        "so put layers of different shape in different families"
                    )

    # --- derived quantities used everywhere -------------------------------------------------

    def family_accounting(self, family: str) -> tuple[int, int]:
        """(class_params, member_params): a class of s members costs class_params + s*member_params."""
        spec = (self.families or {}).get(family)
        if spec is None or spec.scheme is Scheme.tie:
            params = next(layer.params for layer in self.layers if layer.family == family)
            return params, 0
        assert spec.class_params is not None and spec.member_params is not None  # checked above
        return spec.class_params, spec.member_params

    @property
    def original_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def budget_params(self) -> int | None:
        """The unique-parameter budget, the tighter of max_params and max_params_ratio."""
        c = self.constraints
        limits = []
        if c.max_params is not None:
            limits.append(c.max_params)
        if c.max_params_ratio is not None:
            limits.append(math.floor(c.max_params_ratio * self.original_params + 1e-9))
        return min(limits) if limits else None


class PlanStatus(str, Enum):
    optimal = "optimal"
    feasible = "feasible"
    infeasible = "infeasible"
    unknown = "unknown"


class PlanParams(_Model):
    original: int
    shared: int
    ratio: float


class SolverInfo(_Model):
    method: str
    time_s: float
    ortools: str
    seed: int
    workers: int | None = None
    time_limit_hit: bool | None = Field(
        default=None, description="True when the wall-clock cap cut the search (then not reproducible)."
    )


class FamilyResult(_Model):
    """Per-family breakdown of a plan (optional extension of the contract)."""

    classes: int
    objective: float
    bound: float


class SharingPlan(_Model):
    version: str = SCHEMA_VERSION
    status: PlanStatus
    coloring: dict[str, int] = Field(default_factory=dict)
    groups: list[list[str]] = Field(default_factory=list)
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    params: PlanParams | None = None
    solver: SolverInfo
    strategy: str | None = Field(default=None, description="Baseline name when a strategy made it.")
    families: dict[str, FamilyResult] | None = None
    message: str | None = None
    alternatives: list[SharingPlan] | None = Field(
        default=None, description="With options.top > 1: further plans within the budget, cheapest first."
    )
