"""RelaxedSubstitutes: the dense weights S_c + A_ℓ B_ℓ a relaxed plan would install, for measuring
candidate plans by a forward pass without touching the model (``hessian_worker.measure.measure_plans``).

Each class's factors come from the same fit as ``apply_relaxed_plan`` (decompose.fit_members with the
same covariances, rank, damping and rounds; a class of a ``basis`` family beside them the shared basis
apply fits), so the measured loss is the applied model's. Candidates share many classes, so fits are
cached per class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from hessian_worker.basis.analysis import rank_of as basis_rank_of
from hessian_worker.basis.analysis import side_of
from hessian_worker.basis.decompose import BasisFactors
from hessian_worker.basis.measure import ClassSubstitutes, basis_factors
from hessian_worker.options import RelaxedOptions
from hessian_worker.relaxed.analysis import alone_layers, rank_of
from hessian_worker.relaxed.costs import class_covs
from hessian_worker.relaxed.decompose import RelaxedFactors, fit_members
from solver.schema import Scheme, SharingProblem


class RelaxedSubstitutes(ClassSubstitutes):
    """Name -> S_c + A_ℓ B_ℓ (in the parameter's own orientation) for the relaxed classes of a plan.

    Args:
        model: the dense reference model (read once, never changed).
        problem: the SharingProblem (families with scheme ``relaxed`` and their ranks).
        covs: name -> whitening covariance; None for the plain Frobenius fit.
        options: damping and rounds (``whiten`` is decided by passing ``covs`` or not).

    Raises:
        PlanError: a relaxed layer of the problem is not a linear layer of ``model``, or ``covs`` misses one.
    """

    def __init__(self, model: nn.Module, problem: SharingProblem, covs: Mapping[str, Tensor] | None,
                 options: RelaxedOptions) -> None:
        self.problem = problem
        self.scheme = Scheme.relaxed
        self.ranks = rank_of(problem)
        self.alone = alone_layers(problem)
        self.basis_ranks, self.sides = basis_rank_of(problem, Scheme.basis), side_of(problem)
        self._bind(model, [*self.ranks, *self.basis_ranks], covs)
        self.options = options
        self._cache: dict[tuple[str, ...], RelaxedFactors | BasisFactors] = {}

    def fitted_schemes(self) -> tuple[Scheme, ...]:
        """Relaxed classes, and those of basis families beside them."""
        return Scheme.relaxed, Scheme.basis

    def factors(self, group: Sequence[str]) -> RelaxedFactors | BasisFactors:
        """The class's S and corrections (a basis family's class: its basis and coefficients), in the
        model's dtype (cached)."""
        key = tuple(group)
        if key not in self._cache and group[0] in self.basis_ranks:  # whitened as a layer alone is
            self._cache[key] = basis_factors([self.weights[n] for n in group], self.basis_ranks[group[0]],
                                             class_covs(self.covs, group, True), damping=self.options.damping,
                                             side=self.sides[group[0]], dtype=self.dtype[group[0]])
        if key not in self._cache:
            ws = [self.weights[n] for n in group]
            cs = class_covs(self.covs, group, group[0] in self.alone)
            with torch.no_grad():
                f = fit_members(ws, self.ranks[group[0]], cs, alone=group[0] in self.alone,
                                damping=self.options.damping, rounds=self.options.rounds)
            dtype = self.dtype[group[0]]
            self._cache[key] = RelaxedFactors(f.shared.to(dtype), [a.to(dtype) for a in f.left],
                                              [b.to(dtype) for b in f.right])
        return self._cache[key]
