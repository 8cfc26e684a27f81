"""RFC 9457 problem details: the one shape every error of the API has.

Kept free of FastAPI so the solve processes can turn solver exceptions into the same documents
the HTTP handlers send; ``service.errors`` maps exceptions to responses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from solver.errors import BudgetInfeasible, ConstraintInfeasible, GeoShareError

TYPE_PREFIX = "urn:geoshare:problem:"


class ProblemDetail(BaseModel):
    """RFC 9457 problem details, with extension members allowed."""

    model_config = ConfigDict(extra="allow")

    type: str = Field("about:blank", description="URI naming the kind of problem.")
    title: str = Field(description="Short summary of the kind of problem.")
    status: int = Field(description="HTTP status code.")
    detail: str | None = Field(None, description="What went wrong here and how to fix it.")
    instance: str | None = None


def problem(status: int, slug: str, title: str, detail: str | None = None, **ext: Any) -> dict[str, Any]:
    """A problem document as a plain dict (what goes into the job store and the response)."""
    doc: dict[str, Any] = {"type": TYPE_PREFIX + slug, "title": title, "status": status}
    if detail is not None:
        doc["detail"] = detail
    doc.update({k: v for k, v in ext.items() if v is not None})
    return doc


def lease_expired(attempts: int) -> dict[str, Any]:
    """Why a job failed after its workers' leases ran out ``attempts`` times (none reported back)."""
    return problem(500, "lease-expired", "The job lost its worker too often",
                   f"{attempts} claims of this job expired without a result; check the workers' logs "
                   "(out of memory?) and submit it again")


class ApiProblem(Exception):
    """Raised anywhere in the service to answer with a problem document."""

    def __init__(self, status: int, slug: str, title: str, detail: str | None = None, *,
                 headers: dict[str, str] | None = None, **ext: Any) -> None:
        super().__init__(detail or title)
        self.doc = problem(status, slug, title, detail, **ext)
        self.headers = headers or {}

    @classmethod
    def of(cls, doc: dict[str, Any], headers: dict[str, str] | None = None) -> ApiProblem:
        """Raise a document made elsewhere (a parse in another process) as it is."""
        exc = cls(int(doc["status"]), "", str(doc["title"]), doc.get("detail"), headers=headers)
        exc.doc = dict(doc)
        return exc

    @property
    def status(self) -> int:
        return int(self.doc["status"])


def from_solver_error(exc: BaseException) -> dict[str, Any]:
    """Map a solver exception to a problem document (422 for the user's input, 500 otherwise)."""
    if isinstance(exc, BudgetInfeasible):
        return problem(422, "budget-infeasible", "The parameter budget cannot be met", str(exc),
                       least_ratio=exc.least_ratio, least_params=exc.least_params)
    if isinstance(exc, ConstraintInfeasible):
        return problem(422, "constraint-infeasible", "The sharing constraints contradict each other", str(exc))
    if isinstance(exc, GeoShareError | ValueError):
        return problem(422, "invalid-problem", "The problem is invalid", str(exc))
    return problem(500, "solver-error", "The solver failed unexpectedly",
                   f"{type(exc).__name__}: {exc}; this is a bug, please report it with the problem")
