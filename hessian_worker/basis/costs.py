"""Costs of the ``basis`` scheme: a layer alone at rank r (unary) and the extra cost of one shared
basis for a pair (pairwise), both as the step-1 minimum of decompose.py.

Units: E = Σ_ℓ tr(δ_ℓ G̃_ℓ δ_ℓᵀ) under the covariances passed in. analyze_basis passes
scales.basis_covariances: by default G_ℓ scaled by the layer's output-side curvature ā_ℓ/2, so E
is the predicted change of the calibration loss under K-FAC's H_ℓ ≈ ā_ℓ·I ⊗ G_ℓ, on the scale of
the tie scheme's costs; with ``output_weighting`` off, G_ℓ itself, so E is the mean squared change
of the layers' outputs (the layerwise backend's ½δᵀ(2G⊗I)δ), every layer counted alike.

- unary u_ℓ = E*({ℓ}) = Σ_{i>r} σ_i(W_ℓ L_ℓ)², the layer's own whitened truncated-SVD error;
- pair w_ℓm = E*({ℓ, m}) − u_ℓ − u_m ≥ 0: the shared basis is a feasible pair of separate bases,
  so the joint optimum is never below the two separate optima; round-off can leave a tiny negative,
  which is clipped to 0 (larger ones, impossible in exact arithmetic, are reported in a warning).

The solver then scores a class S as Σ u + Σ_{pairs} w, exact for classes of one and two; the exact
value of any class is ``FamilyGrams.error`` (used by plan re-scoring).

E*(S) = Σ_{i>r} λ_i of a Gram matrix of M = [Y_ℓ]_{ℓ∈S}, Y_ℓ = W_ℓ L_ℓ: of MMᵀ = Σ Y_ℓY_ℓᵀ
(d_out × d_out) or of MᵀM (blocks Y_ℓᵀY_m, |S|·d_in square), whichever is smaller; both have the
same non-zero eigenvalues, and the per-layer blocks are cached, so a family's n(n−1)/2 pairs cost
n(n−1)/2 eigenvalue problems of size min(d_out, 2·d_in) and no SVDs.

Side "in" (B shared on the input side): the basis of a class depends on the class's pooled input
covariance (decompose.py), so there is no per-layer whitened factor to cache; ``InputSideFamily``
computes E(S) of the decomposition apply installs (one SVD of |S|·d_out × d_in per class). It is
exact for classes of one; for larger classes it is the error of a feasible shared basis, hence
still ≥ the members' own errors and pair costs stay ≥ 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hessian_worker.basis.config import BasisOptions, SideChoice
from hessian_worker.basis.decompose import (
    DTYPE,
    check_class,
    lapack_threads,
    shared_basis,
    whitened,
    whitened_error,
    whitening,
)
from hessian_worker.discovery import LayerInfo
from hessian_worker.errors import DiscoveryError
from hessian_worker.factored.layers import require_known_families
from solver.schema import Scheme, Side

# a negative pair cost within this share of the pair's energy ‖M‖² is round-off
NOISE_TOL = 1e-9


class FamilyGrams:
    """Whitened factors Y_ℓ of one family's layers, with cached Gram blocks for class errors."""

    def __init__(
        self, weights: Sequence[Tensor], covs: Sequence[Tensor] | None, *, damping: float = 0.01
    ) -> None:
        self.ys = whitened(weights, covs, damping)
        self.d_out, self.d_in = self.ys[0].shape
        self._outer: dict[int, Tensor] = {}
        self._cross: dict[tuple[int, int], Tensor] = {}

    def energy(self, members: Sequence[int]) -> float:
        """‖M‖² = Σ_ℓ ‖W_ℓ L_ℓ‖²: the error of sharing a rank-0 basis."""
        return float(sum(self.ys[i].pow(2).sum() for i in members))

    def error(self, members: Sequence[int], rank: int) -> float:
        """E*(S): the least whitened error of one rank-r basis for the members (Σ_{i>r} σ_i(M)²)."""
        members = list(members)
        gram = self._gram(members)
        with lapack_threads(gram.shape[0]):
            values = torch.linalg.eigvalsh(gram)
        keep = max(values.numel() - rank, 0)
        return float(values[:keep].clamp_min(0.0).sum())

    def error_curve(self, members: Sequence[int]) -> list[float]:
        """[E*(S) at rank 0, 1, …, min(d_out, d_in)] from one eigendecomposition: the tail sums of
        the Gram spectrum (what ``error`` returns rank by rank)."""
        members = list(members)
        gram = self._gram(members)
        with lapack_threads(gram.shape[0]):
            values = torch.linalg.eigvalsh(gram).clamp_min(0.0).flip(0)  # descending
        tail = values.sum() - torch.cat([values.new_zeros(1), values.cumsum(0)])
        return tail.clamp_min(0.0)[: min(self.d_out, self.d_in) + 1].tolist()

    def _gram(self, members: list[int]) -> Tensor:
        if self.d_out <= len(members) * self.d_in:
            return sum(self._outer_of(i) for i in members)
        rows = [torch.cat([self._cross_of(a, b) for b in members], dim=1) for a in members]
        return torch.cat(rows, dim=0)

    def _outer_of(self, i: int) -> Tensor:
        if i not in self._outer:
            self._outer[i] = self.ys[i] @ self.ys[i].T
        return self._outer[i]

    def _cross_of(self, a: int, b: int) -> Tensor:
        if a > b:
            return self._cross_of(b, a).T
        if (a, b) not in self._cross:
            self._cross[(a, b)] = self.ys[a].T @ self.ys[b]
        return self._cross[(a, b)]


class InputSideFamily:
    """Class errors of one family shared on the input side (W_ℓ ≈ C_ℓ B), same interface as
    FamilyGrams."""

    def __init__(
        self, weights: Sequence[Tensor], covs: Sequence[Tensor] | None, *, damping: float = 0.01
    ) -> None:
        self.ws = [w.to(DTYPE) for w in weights]
        self.covs = None if covs is None else [c.to(DTYPE) for c in covs]
        self.damping = damping
        self.d_out, self.d_in = self.ws[0].shape

    def energy(self, members: Sequence[int]) -> float:
        """Σ_ℓ ‖W_ℓ L_ℓ‖²: the error of a rank-0 basis."""
        return float(sum(y.pow(2).sum() for y in whitened(*self._pick(members), self.damping)))

    def error(self, members: Sequence[int], rank: int) -> float:
        """E(S) of the side-in decomposition (pooled basis, exact coefficients) at rank r."""
        ws, cs = self._pick(members)
        factors = shared_basis(ws, rank, cs, damping=self.damping, side=Side.in_)
        return whitened_error(ws, factors, cs, damping=self.damping)

    def error_curve(self, members: Sequence[int]) -> list[float]:
        """[E(S) at rank 0, 1, …, min(d_out, d_in)] from one decomposition.

        The pooled basis is nested in r (the top-r right singular vectors of the pooled stack), and
        member ℓ's exact coefficients leave the part of Y_ℓ = W_ℓ L_ℓ outside the row space of
        B_r L_ℓ; the QR of (B L_ℓ)ᵀ spans those nested spaces column by column, so E(S, r) =
        Σ_ℓ ‖Y_ℓ‖² − Σ_ℓ Σ_{i≤r} ‖Y_ℓ q_i‖² for every r at once."""
        ws, cs = self._pick(members)
        full = min(self.d_out, self.d_in)
        basis = shared_basis(ws, full, cs, damping=self.damping, side=Side.in_).basis  # full × d_in, nested rows
        factors = [None] * len(ws) if cs is None else [whitening(c, self.damping) for c in cs]
        energy = 0.0
        kept = torch.zeros(full, dtype=DTYPE)
        for w, factor in zip(ws, factors, strict=True):
            y = w if factor is None else w @ factor
            seen = basis.T if factor is None else factor.T @ basis.T  # (B L_ℓ)ᵀ: d_in × full
            with lapack_threads(seen.shape[0]):
                q, _ = torch.linalg.qr(seen)
            energy += float(y.pow(2).sum())
            kept += (y @ q).pow(2).sum(0)
        tail = energy - torch.cat([kept.new_zeros(1), kept.cumsum(0)])
        return tail.clamp_min(0.0).tolist()

    def _pick(self, members: Sequence[int]) -> tuple[list[Tensor], list[Tensor] | None]:
        ws = [self.ws[i] for i in members]
        return ws, None if self.covs is None else [self.covs[i] for i in members]


def family_errors(
    weights: Sequence[Tensor],
    covs: Sequence[Tensor] | None,
    side: Side,
    *,
    damping: float = 0.01,
) -> FamilyGrams | InputSideFamily:
    """The class-error oracle of one family for its shared side."""
    if side is Side.in_:
        return InputSideFamily(weights, covs, damping=damping)
    return FamilyGrams(weights, covs, damping=damping)


def family_side(shape: tuple[int, ...], options: BasisOptions) -> Side:
    """``options.side``, or for ``auto`` the side that saves more: the larger dimension is shared
    (a class of s members keeps r·shared + s·r·other parameters); out on a tie."""
    if options.side is SideChoice.out:
        return Side.out
    if options.side is SideChoice.in_:
        return Side.in_
    d_out, d_in = shape
    return Side.in_ if d_in > d_out else Side.out


def family_sides(
    layers: Sequence[LayerInfo], shapes: Mapping[str, tuple[int, int]], options: BasisOptions
) -> dict[str, Side]:
    """Family -> shared side, from each family's (d_out, d_in) in linear orientation."""
    return {x.family: family_side(shapes[x.name], options) for x in layers}


def family_rank(family: str, shape: tuple[int, ...], options: BasisOptions) -> int:
    """The family's rank: ``options.rank`` (int or per family), else rank_ratio·min(d_out, d_in).

    Raises:
        DiscoveryError: the rank is above min(d_out, d_in), or the weight is not 2-D.
    """
    if len(shape) != 2:
        raise DiscoveryError(
            f"family {family!r} has {len(shape)}-D weights; the basis scheme needs linear (2-D) weights"
        )
    d_out, d_in = shape
    if isinstance(options.rank, int):
        rank = options.rank
    elif isinstance(options.rank, dict) and family in options.rank:
        rank = options.rank[family]
    else:
        rank = max(1, round(options.rank_ratio * min(d_out, d_in)))
    if rank > min(d_out, d_in):
        raise DiscoveryError(
            f"basis rank {rank} for family {family!r} exceeds min(d_out, d_in) = {min(d_out, d_in)}; "
            f"pass a smaller rank, or rank={{{family!r}: r}} per family"
        )
    return rank


def family_ranks(
    layers: Sequence[LayerInfo], shapes: Mapping[str, tuple[int, int]], options: BasisOptions
) -> dict[str, int]:
    """Family -> rank, from each family's (d_out, d_in) in linear orientation.

    Raises:
        DiscoveryError: a per-family rank names an unknown family, or a rank is too high.
    """
    fams = {x.family: shapes[x.name] for x in layers}
    require_known_families(options.rank, fams, Scheme.basis)
    return {fam: family_rank(fam, shape, options) for fam, shape in fams.items()}


def basis_costs(
    layers: Sequence[LayerInfo],
    weights: Mapping[str, Tensor],
    covs: Mapping[str, Tensor] | None,
    ranks: Mapping[str, int],
    *,
    damping: float = 0.01,
    progress: bool = False,
    sides: Mapping[str, Side] | None = None,
) -> tuple[list[list[float | None]], list[float]]:
    """(pairwise matrix, unary) over ``layers``; None across families, 0 on the diagonal.

    Args:
        weights: name -> weight as [d_out, d_in] (GPT-2 Conv1D weights transposed already).
        covs: name -> whitening covariance (d_in × d_in: G, or s·G with the output scale s, see
            scales.py); None for the unwhitened scheme.
        ranks: family -> rank.
        sides: family -> shared side (default: out for every family).
    """
    n = len(layers)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    unary = [0.0] * n
    fams: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        matrix[i][i] = 0.0
        fams.setdefault(layer.family, []).append(i)
    total = sum(len(m) + len(m) * (len(m) - 1) // 2 for m in fams.values())
    bar = tqdm(total=total, desc="basis costs", disable=not progress, leave=False)
    clipped: list[float] = []
    for fam, members in fams.items():
        names = [layers[i].name for i in members]
        ws = [weights[x] for x in names]
        cs = [covs[x] for x in names] if covs is not None else None
        check_class(ws, ranks[fam], cs)
        grams = family_errors(ws, cs, (sides or {}).get(fam, Side.out), damping=damping)
        rank = ranks[fam]
        alone = []
        for local, i in enumerate(members):
            alone.append(grams.error([local], rank))
            unary[i] = alone[-1]
            bar.update(1)
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                value = grams.error([a, b], rank) - alone[a] - alone[b]
                if value < 0:
                    if value < -NOISE_TOL * max(grams.energy([a, b]), 1e-300):
                        clipped.append(value)
                    value = 0.0
                matrix[members[a]][members[b]] = matrix[members[b]][members[a]] = value
                bar.update(1)
    bar.close()
    if clipped:
        warnings.warn(
            f"{len(clipped)} basis pair costs were negative beyond round-off (least {min(clipped):.3g}) "
            "and were clipped to 0; the eigenvalue solver lost accuracy (try float64 covariances)",
            stacklevel=2,
        )
    return matrix, unary


def class_errors(
    classes: Sequence[Sequence[str]],
    weights: Mapping[str, Tensor],
    covs: Mapping[str, Tensor] | None,
    rank_of: Mapping[str, int],
    *,
    damping: float = 0.01,
    side_of: Mapping[str, Side] | None = None,
) -> list[float]:
    """E(S) of each class at its rank: the exact step-1 error of its real shared basis.

    ``side_of`` maps layer names to their family's side (default: out).
    """
    out = []
    for names in classes:
        ws = [weights[x].to(DTYPE) for x in names]
        cs = [covs[x] for x in names] if covs is not None else None
        rank = rank_of[names[0]]
        check_class(ws, rank, cs)
        side = (side_of or {}).get(names[0], Side.out)
        out.append(family_errors(ws, cs, side, damping=damping).error(range(len(names)), rank))
    return out
