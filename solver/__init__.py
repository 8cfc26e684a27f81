"""Geo-Sharing solver: optimal cross-layer sharing plans under a parameter budget, with bounds."""

from .errors import BudgetInfeasible, ConstraintInfeasible, GeoShareError, ProblemError
from .planning import Frontier, SolveConfig, frontier, solve
from .schema import SharingPlan, SharingProblem

__all__ = [
    "BudgetInfeasible",
    "ConstraintInfeasible",
    "Frontier",
    "GeoShareError",
    "ProblemError",
    "SharingPlan",
    "SharingProblem",
    "SolveConfig",
    "frontier",
    "solve",
]
