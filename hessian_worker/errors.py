"""Errors of the curvature worker, rooted in the product's one base exception."""

from __future__ import annotations

from solver.errors import GeoShareError


class WorkerError(GeoShareError):
    """Base of every error the worker raises on purpose."""


class ModelSpecError(WorkerError, ValueError):
    """A model spec could not be resolved (unknown name, missing directory, bad factory)."""


class DataError(WorkerError, ValueError):
    """Calibration data is missing, empty, or in a format the worker cannot read."""


class DiscoveryError(WorkerError, ValueError):
    """Layer discovery found nothing shareable, or an override names unknown parameters."""


class MemoryBudgetError(WorkerError, MemoryError):
    """A backend would need more memory than the configured limit.

    Attributes:
        needed_bytes: the estimate that was refused.
        limit_bytes: the configured limit.
    """

    def __init__(self, message: str, needed_bytes: int, limit_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.limit_bytes = limit_bytes


class PlanError(WorkerError, ValueError):
    """A sharing plan does not fit the model (unknown names, mixed shapes)."""


class BackendError(WorkerError, ValueError):
    """A curvature backend cannot handle this model or loss (the message names an alternative)."""
