"""Relaxed pair costs priced by the exact GGN's per-layer blocks (``RelaxedOptions.pricing = exact``).

The Kronecker price (costs.py) of a pair's residual δ_ℓ is tr(δ_ℓ G̃_ℓ δ_ℓᵀ): the layer's input
covariance with one output-side scale. The residual the closed form leaves is exactly what that
price cannot see (the directions the whitened SVD kept are the cheap ones *under that model*), so
the solver steers into its blind spot: on MiniLM its relaxed optimum is the worst relaxed plan
measured, and the plans' Kronecker prices rank against their measured losses with Spearman −0.4 to
−0.8, the exact per-layer blocks with +0.8 to +1.0 (bench/results/relaxed-ranking.md).

Here the fit stays the whitened closed form (decompose.pair_fit, what apply installs); only its
price changes, to the second-order loss change of its residual under the exact GGN with the
cross-layer terms left out (they couple layers of different classes, which pairwise costs cannot
hold, and price 1.6-2x the measured loss):

    w_ℓm(r) = ½ δ_ℓᵀ GGN_ℓℓ δ_ℓ + ½ δ_mᵀ GGN_mm δ_m,   δ = S + A B − W at correction rank r.

A layer alone (no shared tensor) is priced the same way: a_ℓ(r) = ½ δ_ℓᵀ GGN_ℓℓ δ_ℓ with δ_ℓ = A B − W_ℓ
of decompose.alone_fit; so is a class of a basis family beside the relaxed ones, its residuals those
of basis.decompose.shared_basis (whitened as a layer alone), E(S) = Σ_{ℓ∈S} ½ δ_ℓᵀ GGN_ℓℓ δ_ℓ, and
the basis costs follow from E of every layer and pair (costs.basis_terms).

Each form is one forward-mode pass over the pricing data (functional.ggn_quad_form), a layer's
residuals batched under vmap; costs are cached per rank, so the candidates at other ranks
(candidates.py) add forms only for the ranks they ask for. That is 2·(pairs) forms per rank: cheap
on models the size of MiniLM, and the reason this is not the default for LLMs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hessian_worker.basis.decompose import shared_basis
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.discovery import LayerInfo
from hessian_worker.relaxed.costs import (
    BasisTerms,
    alone_cov,
    basis_terms,
    class_covs,
    family_pairs,
    pair_matrix,
)
from hessian_worker.relaxed.decompose import alone_fit, pair_fit
from solver.schema import Scheme, SharingProblem, Side


class ExactPairCosts:
    """Pair costs of same-family ``layers`` at any correction ranks, priced by ``curvature``
    (an exact GGN on the pricing data, over the parameters named by the layers)."""

    def __init__(self, layers: Sequence[LayerInfo], weights: Mapping[str, Tensor],
                 covs: Mapping[str, Tensor] | None, curvature: ExactCurvature, *, damping: float = 0.01,
                 progress: bool = False) -> None:
        self.layers = list(layers)
        self.weights = weights
        self.covs = covs
        self.curvature = curvature
        self.damping = damping
        self.progress = progress
        self.pairs = family_pairs(self.layers, weights, covs)
        self._priced: dict[tuple[int, int, int], float] = {}  # (i, j, rank) -> cost
        self._alone: dict[tuple[int, int], float] = {}  # (i, rank) -> cost of layer i alone
        self._basis: dict[tuple[tuple[int, ...], int, Side], float] = {}  # (members, rank, side) -> E

    def costs(self, ranks: Mapping[str, int]) -> tuple[list[list[float | None]], list[float]]:
        """(pairwise matrix, unary) at family -> correction rank; None across families and for the
        pairs of a family ``ranks`` leaves out, 0 on the diagonal."""
        wanted = [(i, j, ranks[self.layers[i].family]) for i, j in self.pairs if self.layers[i].family in ranks]
        todo = [key for key in wanted if key not in self._priced]
        if todo:
            self._price(todo)
        return pair_matrix(len(self.layers), {(i, j): self._priced[(i, j, rank)] for i, j, rank in wanted})

    def remember(self, problem: SharingProblem) -> None:
        """Takes ``problem``'s costs (over the same layers, priced this way on the same data, e.g. by
        ``analyze_relaxed``) as priced at its ranks, so they are not computed again (~33 s a rank
        level on MiniLM)."""
        if [x.name for x in problem.layers] != [x.name for x in self.layers] or not problem.families:
            raise ValueError("the problem's layers are not this pricer's; price it with its own pricer")
        # the relaxed families' costs only (a basis family's are other quantities at its basis rank)
        ranks = {f: spec.rank for f, spec in problem.families.items() if spec.scheme is Scheme.relaxed}
        matrix, unary = problem.costs.matrix, problem.costs.unary or [0.0] * len(self.layers)
        for i, j in self.pairs:
            value = matrix[i][j]
            if value is not None and self.layers[i].family in ranks:
                self._priced.setdefault((i, j, ranks[self.layers[i].family]), value)
        for i, x in enumerate(self.layers):
            if x.family in problem.alone_families():
                self._alone.setdefault((i, ranks[x.family]), unary[i])

    def alone(self, ranks: Mapping[str, int], families: Collection[str]) -> dict[int, float]:
        """Layer index -> a_ℓ at its family's rank, for every layer of ``families``."""
        wanted = [(i, ranks[x.family]) for i, x in enumerate(self.layers) if x.family in families]
        todo = [key for key in wanted if key not in self._alone]
        deltas: dict[int, list[Tensor]] = {}  # layer -> its residuals, in todo order
        with torch.no_grad():
            for i, rank in todo:
                name = self.layers[i].name
                fit = alone_fit(self.weights[name], rank, alone_cov(self.covs, name), damping=self.damping)
                deltas.setdefault(i, []).append(fit.weight(0) - self.weights[name].to(fit.shared.dtype))
        forms = {i: iter(values) for i, values in self._half_forms(deltas, "relaxed exact alone costs").items()}
        for i, rank in todo:
            self._alone[(i, rank)] = next(forms[i])
        return {i: self._alone[(i, rank)] for i, rank in wanted}

    def basis(self, ranks: Mapping[str, int], sides: Mapping[str, Side]) -> BasisTerms:
        """``costs.basis_terms`` of the families in ``sides`` at family -> basis rank, each class of
        one and two fitted (shared_basis) and its residuals priced, one batch of forms per layer."""
        wanted = [((i,), ranks[x.family], sides[x.family]) for i, x in enumerate(self.layers) if x.family in sides]
        wanted += [((i, j), ranks[self.layers[i].family], sides[self.layers[i].family]) for i, j in self.pairs
                   if self.layers[i].family in sides]
        todo = [key for key in wanted if key not in self._basis]
        residuals: dict[int, list[Tensor]] = {}  # layer -> its residuals, in todo order
        with torch.no_grad():
            for members, rank, side in todo:
                names = [self.layers[i].name for i in members]
                ws = [self.weights[n] for n in names]
                fit = shared_basis(ws, rank, class_covs(self.covs, names, True), damping=self.damping, side=side)
                for k, (i, w) in enumerate(zip(members, ws, strict=True)):
                    residuals.setdefault(i, []).append(fit.weight(k) - w.to(fit.basis.dtype))
        forms = {i: iter(values) for i, values in self._half_forms(residuals, "basis exact costs").items()}
        for key in todo:
            self._basis[key] = sum(next(forms[i]) for i in key[0])
        return basis_terms(self.layers, self.pairs, ranks, sides, lambda m, r, side: self._basis[(m, r, side)])

    def _price(self, todo: Sequence[tuple[int, int, int]]) -> None:
        """Fits every (pair, rank) of ``todo`` and prices both residuals, one batch of forms per layer."""
        residuals: dict[int, list[Tensor]] = {}  # layer -> its residuals, in todo order
        with torch.no_grad():
            for i, j, rank in todo:
                for layer, residual in zip((i, j), self.residuals(i, j, rank), strict=True):
                    residuals.setdefault(layer, []).append(residual)
        forms = {layer: iter(values) for layer, values in self._half_forms(residuals, "relaxed exact costs").items()}
        for i, j, rank in todo:
            self._priced[(i, j, rank)] = next(forms[i]) + next(forms[j])

    def _half_forms(self, residuals: Mapping[int, Sequence[Tensor]], desc: str) -> dict[int, list[float]]:
        """Layer -> ½ δᵀ GGN_ℓℓ δ of each of its residuals (cast as the model holds the layer), one
        batch of forms per layer."""
        forms: dict[int, list[float]] = {}
        with tqdm(total=sum(len(r) for r in residuals.values()), desc=desc, disable=not self.progress,
                  leave=False) as bar:
            for layer, deltas in residuals.items():
                name = self.layers[layer].name
                ref = self.curvature.obj.params0[name]
                values = self.curvature.quad({name: torch.stack([d.to(ref) for d in deltas])})
                forms[layer] = [0.5 * float(v) for v in values]
                bar.update(len(deltas))
        return forms

    def residuals(self, i: int, j: int, rank: int) -> tuple[Tensor, Tensor]:
        """(δ_i, δ_j): what the pair's whitened closed form at ``rank`` leaves of layers i and j."""
        a, b = self.layers[i].name, self.layers[j].name
        fit = pair_fit(self.weights[a], self.weights[b], rank, None if self.covs is None else self.covs[a],
                       None if self.covs is None else self.covs[b], damping=self.damping)
        return (fit.weight(0) - self.weights[a].to(fit.shared.dtype),
                fit.weight(1) - self.weights[b].to(fit.shared.dtype))
