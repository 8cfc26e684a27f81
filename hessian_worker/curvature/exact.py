"""Exact backend: δᵀHδ per direction, many directions at once under vmap."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from hessian_worker.curvature.base import CurvatureKind, map_directions
from hessian_worker.curvature.functional import ggn_quad_form, hessian_quad_form
from hessian_worker.objective import Objective


class ExactCurvature:
    """Exact quadratic forms of the GGN (forward mode only) or the full Hessian."""

    def __init__(self, obj: Objective, kind: CurvatureKind = CurvatureKind.ggn, chunk: int = 8) -> None:
        self.obj = obj
        self.kind = kind
        self.chunk = chunk
        self._fn = ggn_quad_form(obj) if kind is CurvatureKind.ggn else hessian_quad_form(obj)

    def quad(self, deltas: Mapping[str, Tensor]) -> Tensor:
        return map_directions(self._fn, deltas, self.chunk).detach()
