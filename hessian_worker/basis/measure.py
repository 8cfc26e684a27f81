"""BasisSubstitutes: the dense low-rank weights a basis plan would install, for measuring candidate
plans by a forward pass without touching the model (``hessian_worker.measure.measure_plans``).

Each class's factors come from the same decomposition as ``apply_basis_plan`` (same covariances,
rank, side, damping), so the measured loss is the applied model's. Candidates share many classes,
so factors are cached per class, in the model's dtype: r·(d_out + |S|·d_in) numbers a class rather
than |S| dense matrices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hessian_worker.basis.analysis import rank_of, side_of, split_classes
from hessian_worker.basis.config import BasisOptions
from hessian_worker.basis.decompose import BasisFactors, shared_basis
from hessian_worker.curvature.layerwise import linear_modules
from hessian_worker.errors import PlanError
from hessian_worker.factored.apply import require_covs
from hessian_worker.factored.layers import dense_weights
from solver.schema import Scheme, SharingPlan, SharingProblem, Side


class ClassSubstitutes:
    """The part every scheme with its own modules shares: split a plan into the scheme's classes and
    the others, and give each member the weight its class's ``factors(group).weight(i)`` computes
    (in the parameter's own orientation). Subclasses set ``problem``, ``scheme``, ``transposed``."""

    problem: SharingProblem
    scheme: Scheme
    transposed: dict[str, bool]

    def split(
        self, plan: SharingPlan | Sequence[Sequence[str]]
    ) -> tuple[list[list[str]], list[list[str]]]:
        """(this scheme's classes, classes of other families) of a plan or a list of groups."""
        if isinstance(plan, SharingPlan):
            return split_classes(plan.groups, plan.coloring, self.problem, self.fitted_schemes())
        return split_classes(plan, {}, self.problem, self.fitted_schemes())

    def fitted_schemes(self) -> tuple[Scheme, ...]:
        """The family schemes whose classes ``factors`` fits (the scheme's own)."""
        return (self.scheme,)

    def weights_of(self, classes: Sequence[Sequence[str]]) -> dict[str, Tensor]:
        """The weight of every member of ``classes`` (each a class of this scheme)."""
        out: dict[str, Tensor] = {}
        for group in classes:
            factors = self.factors(group)
            for i, name in enumerate(group):
                w = factors.weight(i)
                out[name] = (w.T if self.transposed[name] else w).contiguous()
        return out

    def factors(self, group: Sequence[str]) -> Any:
        """The class's factors (with ``weight(i)``); each subclass fits its own."""
        raise NotImplementedError

    def _bind(self, model: nn.Module, names: Sequence[str], covs: Mapping[str, Tensor] | None) -> None:
        """Resolves the scheme's layers in ``model`` (orientation, dtype, dense weights) and checks
        ``covs`` covers them.

        Raises:
            PlanError: a layer is not a linear layer of ``model``, or ``covs`` misses one.
        """
        try:
            layers = linear_modules(model, list(names))
        except ValueError as exc:
            raise PlanError(f"{self.scheme.value} layers do not fit this model: {exc}") from exc
        self.transposed = {n: t for n, (_, t) in layers.items()}
        self.dtype = {n: m.weight.dtype for n, (m, _) in layers.items()}
        self.weights = dense_weights(model, list(names))
        require_covs(covs, names)
        self.covs = covs


class BasisSubstitutes(ClassSubstitutes):
    """Name -> low-rank weight (in the parameter's own orientation) for the basis classes of a plan.

    Args:
        model: the dense reference model (read once, never changed).
        problem: the SharingProblem (families with scheme ``basis``, ranks, sides).
        covs: name -> input covariance for whitening; None for the plain SVD.
        options: damping (``whiten`` is decided by passing ``covs`` or not).

    Raises:
        PlanError: a basis layer of the problem is not a linear layer of ``model``, or ``covs``
            misses one.
    """

    def __init__(
        self,
        model: nn.Module,
        problem: SharingProblem,
        covs: Mapping[str, Tensor] | None,
        options: BasisOptions,
    ) -> None:
        self.problem = problem
        self.scheme = Scheme.basis
        self.ranks = rank_of(problem)
        self.sides = side_of(problem)
        self._bind(model, list(self.ranks), covs)
        self.damping = options.damping
        self._cache: dict[tuple[str, ...], BasisFactors] = {}

    def factors(self, group: Sequence[str]) -> BasisFactors:
        """The class's shared basis and coefficients, in the model's dtype (cached)."""
        key = tuple(group)
        if key not in self._cache:
            cs = None if self.covs is None else [self.covs[n] for n in group]
            self._cache[key] = basis_factors([self.weights[n] for n in group], self.ranks[group[0]], cs,
                                             damping=self.damping, side=self.sides[group[0]],
                                             dtype=self.dtype[group[0]])
        return self._cache[key]


def basis_factors(weights: Sequence[Tensor], rank: int, covs: Sequence[Tensor] | None, *, damping: float,
                  side: Side, dtype: torch.dtype) -> BasisFactors:
    """The shared basis apply fits for a class (decompose.shared_basis), cast to the model's ``dtype``:
    what a measured candidate's basis class holds."""
    with torch.no_grad():
        f = shared_basis(weights, rank, covs, damping=damping, side=side)
    return BasisFactors(f.basis.to(dtype), [c.to(dtype) for c in f.coefs], f.side)
