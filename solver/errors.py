"""Exceptions of the whole product.

One base class; each subclass also inherits the built-in it refines, so callers that catch
``ValueError`` keep working. Only the service maps these to HTTP answers.
"""

from __future__ import annotations


class GeoShareError(Exception):
    """Base of every error Geo-Sharing raises on purpose."""


class ProblemError(GeoShareError, ValueError):
    """The problem is malformed: the message names the field and the fix."""


class BudgetInfeasible(GeoShareError, ValueError):
    """No coloring meets the parameter budget.

    Attributes:
        least_params: the fewest unique parameters any feasible coloring reaches.
        least_ratio: the same as a share of the listed layers' parameters.
    """

    def __init__(self, message: str, least_params: int, least_ratio: float) -> None:
        super().__init__(message)
        self.least_params = least_params
        self.least_ratio = least_ratio


class ConstraintInfeasible(GeoShareError, ValueError):
    """The sharing constraints contradict each other (e.g. a required pair that is forbidden)."""
