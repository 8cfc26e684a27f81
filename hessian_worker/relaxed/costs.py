"""Costs of the ``relaxed`` scheme: the pair costs the solver reads, and the correction ranks.

- unary u_ℓ = 0: a class of one keeps its dense weight (S = W_ℓ, decompose.py), nothing is lost;
- pair w_ℓm = E*({ℓ, m}) = Σ_{i>2r} σ_i(D L_H)², the exact joint optimum of the pair (decompose.py:
  D = W_ℓ − W_m, H the parallel sum of the damped covariances), ≥ 0 by construction;
- a layer of an ``alone`` family (no shared tensor, W_ℓ ≈ A_ℓ B_ℓ) pays a unary
  a_ℓ = Σ_{i>r} σ_i(W_ℓ L_ℓ)² instead (``PairPricer.alone``), the same whitened error of a fit with S = 0;
- a ``basis`` family beside the relaxed ones (one shared rank-k basis per class, whitened as a layer
  alone is) costs what the basis scheme's costs say, u_ℓ = E*({ℓ}) and w_ℓm = E*({ℓ, m}) − u_ℓ − u_m
  ≥ 0 (basis/costs.py), under this pricer's covariances (``PairPricer.basis``), so the two kinds of
  family meet on one scale in one problem.

The solver then scores a class S as Σ_{pairs} w, exact for classes of one and two; for larger
classes the measured choice decides (as for the other schemes). One pair spectrum gives the cost at
every correction rank, so ``PairSpectra`` is computed once per analysis and rebuilds the cost
matrix at any ranks: the candidates at other ranks (candidates.py) cost no new eigenproblem.

Units: those of the covariances (basis/scales.basis_covariances: by default output-scaled, so a
cost is a predicted loss change on the tie scheme's scale).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from torch import Tensor
from tqdm.auto import tqdm

from hessian_worker.basis.analysis import basis_spec
from hessian_worker.basis.costs import family_errors
from hessian_worker.discovery import LayerInfo
from hessian_worker.errors import DiscoveryError
from hessian_worker.factored.layers import require_known_families
from hessian_worker.options import RelaxedOptions
from hessian_worker.relaxed.decompose import alone_spectrum, check_class, pair_spectrum, tail
from solver.schema import Scheme, Side

ALONE_SUFFIX = "#alone"  # a whitening state's key for a layer alone's own covariance (holdout.py)


def alone_key(name: str) -> str:
    """The whitening state's key of layer ``name``'s covariance when it is fitted alone."""
    return name + ALONE_SUFFIX


def alone_cov(covs: Mapping[str, Tensor] | None, name: str) -> Tensor | None:
    """The covariance a layer alone whitens with: its own entry (``alone_key``) where the state has
    one, else the layer's; None unwhitened."""
    if covs is None:
        return None
    return covs.get(alone_key(name), covs[name])


def class_covs(covs: Mapping[str, Tensor] | None, group: Sequence[str], alone: bool) -> list[Tensor] | None:
    """The covariances a class's fit whitens with, in member order: each layer's, or for a layer
    alone (``alone``) its own (``alone_cov``); None unwhitened."""
    if covs is None:
        return None
    return [alone_cov(covs, n) if alone else covs[n] for n in group]


def family_rank(family: str, shape: tuple[int, ...], options: RelaxedOptions, ratio: float | None = None) -> int:
    """The family's correction rank: ``options.rank`` (int or per family), else
    round(ratio·min(d_out, d_in)) with ``ratio`` (default ``options.rank_ratio``), at least 1.

    Raises:
        DiscoveryError: the weight is not 2-D, or the rank is above min(d_out, d_in).
    """
    if len(shape) != 2:
        raise DiscoveryError(f"family {family!r} has {len(shape)}-D weights; the relaxed scheme needs linear "
                             "(2-D) weights")
    d_out, d_in = shape
    if ratio is None and isinstance(options.rank, int):
        rank = options.rank
    elif ratio is None and isinstance(options.rank, dict) and family in options.rank:
        rank = options.rank[family]
    else:
        rank = max(1, round((options.rank_ratio if ratio is None else ratio) * min(d_out, d_in)))
    if rank > min(d_out, d_in):
        raise DiscoveryError(
            f"relaxed correction rank {rank} for family {family!r} exceeds min(d_out, d_in) = {min(d_out, d_in)}; "
            f"pass a smaller rank, or rank={{{family!r}: r}} per family")
    return rank


def family_ranks(layers: Sequence[LayerInfo], shapes: Mapping[str, tuple[int, int]], options: RelaxedOptions,
                 ratio: float | None = None) -> dict[str, int]:
    """Family -> correction rank (``ratio``: every family at that share of min(d_out, d_in)).

    Raises:
        DiscoveryError: a per-family rank names an unknown family, or a rank is too high.
    """
    fams = {x.family: shapes[x.name] for x in layers}
    require_known_families(options.rank, fams, Scheme.relaxed)
    return {fam: family_rank(fam, shape, options, ratio) for fam, shape in fams.items()}


def least_params(shapes: Mapping[str, tuple[int, int]], sizes: Mapping[str, int], ranks: Mapping[str, int],
                 classes: int = 1, alone: Collection[str] = (), basis: Mapping[str, Side] | None = None) -> int:
    """Unique parameters of ``classes`` classes per family (at most its size): c·d_out·d_in +
    s·r·(d_out + d_in), a family in ``alone`` s·r·(d_out + d_in) only, a family in ``basis`` (family ->
    shared side) c shared bases and s coefficient blocks at rank r; with one class, the least any
    plan at ``ranks`` keeps."""
    total = 0
    for f, (o, i) in shapes.items():
        c = min(classes, sizes[f])
        if basis and f in basis:
            spec = basis_spec(ranks[f], (o, i), basis[f])
            total += c * (spec.class_params or 0) + sizes[f] * (spec.member_params or 0)
        else:
            total += (0 if f in alone else c * o * i) + sizes[f] * ranks[f] * (o + i)
    return total


def ranks_within(shapes: Mapping[str, tuple[int, int]], sizes: Mapping[str, int], ranks: Mapping[str, int],
                 budget: int, classes: int = 1) -> dict[str, int]:
    """``ranks`` lowered in one proportion (r'_f = max(1, ⌊t·r_f⌋), the largest t ≤ 1) until ``classes``
    classes per family fit ``budget``; at rank 1 when nothing fits (the solver then says the budget is
    infeasible). ``shapes`` and ``sizes`` are per family."""
    top = max(ranks.values())
    for k in range(top, 0, -1):
        scaled = {f: max(1, r * k // top) for f, r in ranks.items()}
        if least_params(shapes, sizes, scaled, classes) <= budget:
            return scaled
    return dict.fromkeys(ranks, 1)


class PairPricer(Protocol):
    """Pair costs of same-family layers at any correction ranks (PairSpectra; exact_costs.ExactPairCosts),
    the cost of a layer alone (no shared tensor) at its family's rank, and the costs of families
    kept as shared bases beside the relaxed ones."""

    layers: list[LayerInfo]

    def costs(self, ranks: Mapping[str, int]) -> tuple[list[list[float | None]], list[float]]: ...

    def alone(self, ranks: Mapping[str, int], families: Collection[str]) -> dict[int, float]: ...

    def basis(self, ranks: Mapping[str, int], sides: Mapping[str, Side]) -> BasisTerms: ...


# a basis family's costs: ((i, j) -> pair excess w_ℓm, i -> unary u_ℓ), indices into the pricer's layers
BasisTerms = tuple[dict[tuple[int, int], float], dict[int, float]]
# the least error of one shared basis for members (indices) at a rank on a side
ClassError = Callable[[tuple[int, ...], int, Side], float]


def basis_terms(layers: Sequence[LayerInfo], pairs: Sequence[tuple[int, int]], ranks: Mapping[str, int],
                sides: Mapping[str, Side], error: ClassError) -> BasisTerms:
    """The basis scheme's costs (basis/costs.py) of the families in ``sides`` at family -> rank:
    u_ℓ = E({ℓ}), w_ℓm = E({ℓ, m}) − u_ℓ − u_m, clipped at 0 (the shared basis is a feasible pair
    of separate ones, so a negative excess is the pricing's noise)."""
    unary = {i: error((i,), ranks[x.family], sides[x.family]) for i, x in enumerate(layers) if x.family in sides}
    excess = {}
    for i, j in pairs:
        fam = layers[i].family
        if fam in sides:
            excess[(i, j)] = max(0.0, error((i, j), ranks[fam], sides[fam]) - unary[i] - unary[j])
    return excess, unary


def family_pairs(layers: Sequence[LayerInfo], weights: Mapping[str, Tensor],
                 covs: Mapping[str, Tensor] | None) -> list[tuple[int, int]]:
    """Every same-family pair (i, j), i < j, of indices into ``layers``, family by family; each
    family is checked to be shareable first (``check_class``: one shape, matching covariances).

    Raises:
        PlanError: a family mixes shapes or its covariances do not fit.
    """
    fams: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        fams.setdefault(layer.family, []).append(i)
    pairs: list[tuple[int, int]] = []
    for members in fams.values():
        names = [layers[i].name for i in members]
        check_class([weights[n] for n in names], 1, None if covs is None else [covs[n] for n in names])
        pairs += [(i, j) for a, i in enumerate(members) for j in members[a + 1:]]
    return pairs


def pair_matrix(n: int, values: Mapping[tuple[int, int], float]) -> tuple[list[list[float | None]], list[float]]:
    """(pairwise matrix, unary) of ``n`` layers from (i, j) -> cost: None for every pair not given
    (across families: never shared), 0 on the diagonal and every unary (a class of one keeps its
    dense weight)."""
    matrix: list[list[float | None]] = [[0.0 if i == j else None for j in range(n)] for i in range(n)]
    for (i, j), value in values.items():
        matrix[i][j] = matrix[j][i] = value
    return matrix, [0.0] * n


class PairSpectra:
    """σ_i(D L_H)² of every same-family pair of ``layers``: the pair cost at any correction rank."""

    def __init__(self, layers: Sequence[LayerInfo], weights: Mapping[str, Tensor],
                 covs: Mapping[str, Tensor] | None, *, damping: float = 0.01, progress: bool = False) -> None:
        self.layers = list(layers)
        self.weights, self.covs, self.damping = weights, covs, damping
        self.spectra: dict[tuple[int, int], Tensor] = {}
        self.alone_spectra: dict[int, Tensor] = {}  # computed when first asked for
        self._basis_curves: dict[tuple[tuple[int, ...], Side], list[float]] = {}  # when first asked for
        self.pairs = pairs = family_pairs(self.layers, weights, covs)  # every same-family (i, j), i < j
        for i, j in tqdm(pairs, desc="relaxed costs", disable=not progress, leave=False):
            a, b = self.layers[i].name, self.layers[j].name
            self.spectra[(i, j)] = pair_spectrum(weights[a], weights[b], None if covs is None else covs[a],
                                                 None if covs is None else covs[b], damping=damping)

    def costs(self, ranks: Mapping[str, int]) -> tuple[list[list[float | None]], list[float]]:
        """(pairwise matrix, unary) at family -> correction rank; None across families and for the
        pairs of a family ``ranks`` leaves out, 0 on the diagonal."""
        return pair_matrix(len(self.layers), {(i, j): tail(spectrum, ranks[self.layers[i].family])
                                              for (i, j), spectrum in self.spectra.items()
                                              if self.layers[i].family in ranks})

    def alone(self, ranks: Mapping[str, int], families: Collection[str]) -> dict[int, float]:
        """Layer index -> a_ℓ at its family's rank, for every layer of ``families``."""
        out = {}
        for i, layer in enumerate(self.layers):
            if layer.family in families:
                if i not in self.alone_spectra:
                    self.alone_spectra[i] = alone_spectrum(self.weights[layer.name], alone_cov(self.covs, layer.name),
                                                           damping=self.damping)
                out[i] = float(self.alone_spectra[i][ranks[layer.family]:].sum())
        return out

    def basis(self, ranks: Mapping[str, int], sides: Mapping[str, Side]) -> BasisTerms:
        """``basis_terms`` of the families in ``sides`` at family -> basis rank: one error curve per
        layer and per pair (every rank at once, cached), whitened as a layer alone is."""
        return basis_terms(self.layers, self.pairs, ranks, sides, self._basis_error)

    def _basis_error(self, members: tuple[int, ...], rank: int, side: Side) -> float:
        key = (members, side)
        if key not in self._basis_curves:
            names = [self.layers[i].name for i in members]
            grams = family_errors([self.weights[n] for n in names], class_covs(self.covs, names, True), side,
                                  damping=self.damping)
            self._basis_curves[key] = grams.error_curve(range(len(names)))
        return self._basis_curves[key][rank]
