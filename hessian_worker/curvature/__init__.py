"""Curvature backends: each gives ``quad(deltas) -> δᵀHδ`` for a batch of perturbations."""

from hessian_worker.curvature.base import Curvature, CurvatureKind

__all__ = ["Curvature", "CurvatureKind"]
