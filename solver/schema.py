"""The JSON contract: SharingProblem in, SharingPlan out (see docs/design.md §The contract).

Structural checks live here (shapes, symmetry, finite non-negative costs, known names, numbers
the solver can take), so a malformed problem fails at the door with a message naming the entries
and the fix, and with a ``loc`` that names the field (``["costs", "matrix", 3, 5]``), also when
the check needs several fields at once. Checks that need solving (is the budget reachable?) live
in the solver.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from enum import Enum
from fractions import Fraction
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

SCHEMA_VERSION = "1"
_MAX_LISTED = 5  # how many offending entries an error message names

# The largest integer a count may take: every JSON reader (and a float64) holds it exactly, and
# sums of a few thousand of them stay far inside int64. 2^53 elements is 36 PB of float32.
MAX_COUNT = 2**53
# Seeds: any non-negative int64 (they seed tabu search's numpy generator, which takes any).
MAX_SEED = 2**63 - 1
# A float max_params_ratio computed as a quotient (1/3) may sit an ulp below the budget it
# means; ratio * original within this relative distance below an integer counts as that integer.
_RATIO_SLACK = Fraction(1, 2**50)

Loc = tuple[str | int, ...]


def fail(loc: Loc, message: str, value: Any = None) -> ValidationError:
    """A validation error located at ``loc`` (relative to the model being validated).

    Raised from a model validator, pydantic prefixes the outer path, so the client sees the field
    (``["body", "costs", "matrix", 3, 5]`` in the service) instead of just the model.
    """
    return ValidationError.from_exception_data(
        "SharingProblem",
        [InitErrorDetails(type=PydanticCustomError("geoshare_problem", message), loc=loc, input=value)],
    )


def _no_control_characters(value: str) -> str:
    """Names end up in logs, files and HTTP headers: NUL and other control characters break them."""
    bad = sorted({f"U+{ord(ch):04X}" for ch in value if unicodedata.category(ch) == "Cc"})
    if bad:
        raise ValueError(f"{value!r} holds control characters ({', '.join(bad)}); use printable names")
    return value


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
    relaxed = "relaxed"  # one tensor per class plus a rank-r correction per member: W_l ~ S_c + A_l B_l


class Side(str, Enum):
    """Which factor of a ``basis`` class is shared (the solver never reads it; apply does)."""

    out = "out"  # W_l ~ B_c C_l: B_c (d_out x r) shared, C_l (r x d_in) per member
    in_ = "in"  # W_l ~ C_l B_c: B_c (r x d_in) shared, C_l (d_out x r) per member


class Layer(_Model):
    name: str = Field(min_length=1, description="Full parameter name.")
    family: str = Field(min_length=1, description="Only layers of one family may share.")
    params: int = Field(gt=0, le=MAX_COUNT, description="Element count of the tensor.")
    index: int = Field(ge=0, le=MAX_COUNT, description="Depth position, for contiguity and baselines.")

    _names = field_validator("name", "family")(_no_control_characters)


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
    max_params: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    max_group_size: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    pinned: list[str] = Field(default_factory=list, description="Layers never shared.")
    forbid: list[tuple[str, str]] = Field(default_factory=list)
    require: list[tuple[str, str]] = Field(default_factory=list)
    contiguous: bool = Field(default=False, description="Classes are runs of consecutive index.")


class Options(_Model):
    time_limit_s: float = Field(default=10.0, gt=0, le=3600)
    relative_gap: float = Field(default=0.0, ge=0, le=1)
    workers: int | None = Field(default=None, ge=1, le=64)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    top: int | None = Field(
        default=None, ge=1, le=1000,
        description="Plans wanted: above 1, the plan lists the next best diverse colorings and the pattern plans as alternatives.",
    )
    min_distance: int = Field(
        default=1, ge=1, le=MAX_COUNT,
        description="Layer pairs in which each alternative's sharing differs from every better plan's.",
    )


class FamilySpec(_Model):
    """Per-family sharing scheme; a class costs class_params once plus member_params per member."""

    scheme: Scheme = Scheme.tie
    rank: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    class_params: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    member_params: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    side: Side | None = Field(
        default=None,
        description="basis only: 'out' (default; B_c d_out x r shared) or 'in' (B_c r x d_in shared).",
    )
    alone: bool | None = Field(
        default=None,
        description="relaxed only: true keeps no shared tensor; every layer is stored as its rank-r factors "
        "alone (W ≈ A·B, per-layer low rank), a class of its own paying member_params and its costs.unary.",
    )

    @model_validator(mode="after")
    def _basis_needs_accounting(self) -> FamilySpec:
        if self.scheme is Scheme.basis and (self.class_params is None or self.member_params is None):
            missing = "class_params" if self.class_params is None else "member_params"
            raise fail(
                (missing,),
                "scheme 'basis' needs class_params (the shared basis: d_out*rank, or rank*d_in with "
                "side 'in') and member_params (each member's coefficients: rank*d_in, or d_out*rank)",
            )
        if self.scheme is Scheme.relaxed:
            missing = [f for f in ("rank", "class_params", "member_params") if getattr(self, f) is None]
            if missing:
                raise fail(
                    (missing[0],),
                    "scheme 'relaxed' needs rank (each member's correction rank r), class_params (the "
                    "shared tensor S_c: d_out*d_in) and member_params (each member's correction A_l B_l: "
                    "r*(d_out + d_in)); missing: " + ", ".join(missing),
                )
        if self.alone and self.scheme is not Scheme.relaxed:
            raise fail(
                ("alone",),
                f"alone=true applies to scheme 'relaxed' only (a layer kept as its rank-r correction with no "
                f"shared tensor); drop it or set scheme 'relaxed' (got {self.scheme.value!r})",
                True,
            )
        if self.side is not None and self.scheme is not Scheme.basis:
            raise fail(
                ("side",),
                f"side={self.side.value!r} applies to scheme 'basis' only; drop it or set scheme 'basis'",
                self.side.value,
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
    version: str = Field(default=SCHEMA_VERSION, description='The contract version; only "1" exists.')
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

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        if value != SCHEMA_VERSION:
            raise ValueError(
                f"version {value!r} is not a contract version this solver reads; use {SCHEMA_VERSION!r} (or leave it out)"
            )
        return value

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
            seen: set[str] = set()
            for i, layer in enumerate(self.layers):  # the loc: the first repeat of a name
                if layer.name in seen:
                    raise fail(("layers", i, "name"), f"duplicate layer names: {_listed(dup)}; every layer needs a unique name", layer.name)
                seen.add(layer.name)

    def _check_matrix(self) -> None:
        n = len(self.layers)
        m = self.costs.matrix
        if len(m) != n or any(len(row) != n for row in m):
            shape = f"{len(m)} rows of lengths {sorted({len(r) for r in m})}"
            where: Loc = ("costs", "matrix") if len(m) != n else ("costs", "matrix", next(i for i, r in enumerate(m) if len(r) != n))
            raise fail(where, f"costs.matrix must be {n}x{n} (one row and column per layer), got {shape}")
        bad, neg, asym = [], [], []
        pairwise = self.costs.kind is CostKind.pairwise
        # symmetry up to rounding, relative to the matrix's own scale (costs in any unit pass alike)
        top = max((abs(v) for row in m for v in row if v is not None and math.isfinite(v)), default=0.0)
        abs_tol = 1e-12 * top
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
                elif pairwise and j > i and (m[j][i] is None or not math.isclose(v, m[j][i], rel_tol=1e-9, abs_tol=abs_tol)):
                    asym.append((i, j))
        if bad:
            raise self._entry_error(bad, f"costs.matrix has NaN or infinite entries at (row, col) {_listed(bad)}; use null to forbid a pair")
        if neg:
            raise self._entry_error(
                neg,
                f"costs.matrix has negative entries at (row, col) {_listed(neg)}; costs must be >= 0 "
                "(a predicted loss increase); clip or shift them",
            )
        if asym:
            raise self._entry_error(
                asym,
                f"pairwise costs.matrix is not symmetric at (row, col) {_listed(asym)}; "
                "symmetrize it ((W + W^T)/2) or use kind 'assignment'",
            )
        u = self.costs.unary
        if u is not None:
            if len(u) != n:
                raise fail(("costs", "unary"), f"costs.unary must have one entry per layer ({n}), got {len(u)}")
            badu = [i for i, v in enumerate(u) if not math.isfinite(v) or v < 0]
            if badu:
                raise fail(("costs", "unary", badu[0]), f"costs.unary must be finite and >= 0; bad entries at {_listed(badu)}", u[badu[0]])
        self._check_total()

    def _entry_error(self, entries: Sequence[tuple[int, int]], message: str) -> ValidationError:
        i, j = entries[0]
        return fail(("costs", "matrix", i, j), message, self.costs.matrix[i][j])

    def _check_total(self) -> None:
        """Every entry finite is not enough: an objective adds them up, and the largest one (every
        pair shares; pairwise costs count each pair once) must be finite too."""
        m = self.costs.matrix
        if self.costs.kind is CostKind.pairwise:
            entries = sum(sum(v for v in row[i + 1 :] if v is not None) for i, row in enumerate(m))
        else:
            entries = sum(sum(v for j, v in enumerate(row) if v is not None and j != i) for i, row in enumerate(m))
        entries += sum(self.costs.unary or [])
        if not math.isfinite(entries):
            raise fail(
                ("costs", "matrix"),
                "costs.matrix and costs.unary add up to more than the largest float (1.8e308), so objectives "
                "would overflow to infinity; divide every cost by one factor (plans do not depend on the unit)",
            )

    def _check_constraints(self) -> None:
        names = {layer.name for layer in self.layers}
        c = self.constraints
        unknown = [(("constraints", "pinned", i), x) for i, x in enumerate(c.pinned) if x not in names]
        for field in ("forbid", "require"):
            for i, (a, b) in enumerate(getattr(c, field)):
                unknown += [(("constraints", field, i, k), x) for k, x in enumerate((a, b)) if x not in names]
                if a == b:
                    raise fail(("constraints", field, i), f"constraints.{field} pairs a layer with itself: {a!r}", [a, b])
        if unknown:
            listed = _listed(sorted({x for _, x in unknown}))
            raise fail(unknown[0][0], f"constraints name unknown layers: {listed}; use names from 'layers'", unknown[0][1])

    def _check_families(self) -> None:
        fams = {layer.family for layer in self.layers}
        specs = self.families or {}
        extra = sorted(set(specs) - fams)
        if extra:
            raise fail(("families", extra[0]), f"families names unknown families: {_listed(extra)}; known: {_listed(sorted(fams))}")
        for fam in fams:
            spec = specs.get(fam)
            if spec is None or spec.scheme is Scheme.tie:
                members = [i for i, layer in enumerate(self.layers) if layer.family == fam]
                sizes = sorted({self.layers[i].params for i in members})
                if len(sizes) > 1:
                    odd = next(i for i in members if self.layers[i].params != self.layers[members[0]].params)
                    raise fail(
                        ("layers", odd, "params"),
                        f"family {fam!r} mixes tensor sizes {sizes}; tied layers must have one shape, "
                        "so put layers of different shape in different families",
                        self.layers[odd].params,
                    )

    # --- derived quantities used everywhere -------------------------------------------------

    def family_accounting(self, family: str) -> tuple[int, int]:
        """(class_params, member_params): a class of s members costs class_params + s*member_params;
        an ``alone`` family's classes store nothing shared (class_params 0)."""
        spec = (self.families or {}).get(family)
        if spec is None or spec.scheme is Scheme.tie:
            params = next(layer.params for layer in self.layers if layer.family == family)
            return params, 0
        assert spec.class_params is not None and spec.member_params is not None  # checked above
        return (0 if spec.alone else spec.class_params), spec.member_params

    def alone_families(self) -> set[str]:
        """The families whose layers each stand alone (``FamilySpec.alone``): never shared."""
        return {f for f, spec in (self.families or {}).items() if spec.alone}

    def never_shared(self) -> list[str]:
        """Every layer that must be a class of its own: the pinned ones and those of alone families."""
        alone = self.alone_families()
        pinned = set(self.constraints.pinned)
        return [x.name for x in self.layers if x.name in pinned or x.family in alone]

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
            # exact rational arithmetic: a float product loses whole parameters past 2^53
            exact = Fraction(c.max_params_ratio) * self.original_params
            budget = math.floor(exact)
            if budget != exact and budget + 1 - exact <= exact * _RATIO_SLACK:
                budget += 1
            limits.append(budget)
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
