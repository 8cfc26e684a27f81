"""Request and response bodies of the API (requests forbid unknown fields)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from hessian_worker.options import Backend  # the worker's backends, kfac included
from service.compress import CompressReport, CompressSpec
from service.problems import ProblemDetail
from service.states import JobState
from solver import SharingPlan, SharingProblem
from solver.planning import Frontier
from solver.schema import CostKind

if TYPE_CHECKING:  # the client and the GPU worker use these models without SQLAlchemy
    from service.db import Job


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Links(BaseModel):
    self: str
    events: str | None = None


class _JobView(BaseModel):
    id: str
    state: JobState
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ProblemDetail | None = Field(None, description="Why it failed (RFC 9457), when it did.")
    links: Links


def _ts(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc)


def _common(job: Job, base: str, events: bool) -> dict:
    return {
        "id": job.id, "state": job.state, "created_at": _ts(job.created_at), "started_at": _ts(job.started_at),
        "finished_at": _ts(job.finished_at), "error": job.error_doc(),
        "links": Links(self=f"{base}/{job.id}", events=f"{base}/{job.id}/events" if events else None),
    }


class PlanJob(_JobView):
    """A plan job; ``plan`` once it succeeded."""

    plan: SharingPlan | None = None

    @classmethod
    def of(cls, job: Job) -> PlanJob:
        plan = SharingPlan.model_validate_json(job.result) if job.result else None
        return cls(plan=plan, **_common(job, "/v1/plans", events=True))


class FrontierJob(_JobView):
    """A frontier job; ``frontier`` once it succeeded."""

    frontier: Frontier | None = None

    @classmethod
    def of(cls, job: Job) -> FrontierJob:
        front = Frontier.model_validate_json(job.result) if job.result else None
        return cls(frontier=front, **_common(job, "/v1/frontiers", events=False))


class AnalysisSpec(_Request):
    """What a GPU worker should analyze; the costs it returns are solved into a plan here.

    With ``compress`` the worker also compresses the model (candidate plans measured, the best
    tied in, healed, saved to ``compress.out``) and hands back its report beside the costs.
    """

    model: str = Field(min_length=1, max_length=1024,
                       description="minilm | a Hugging Face directory on the worker, under a read root "
                                   "(GEOSHARE_READ_ROOTS) | module:factory of an allowed module "
                                   "(GEOSHARE_MODEL_MODULES)")
    data: str | None = Field(None, max_length=4096,
                             description="Calibration data path on the worker, under a read root "
                                         "(GEOSHARE_READ_ROOTS) (default: built-in sentences).")
    backend: Backend = Backend.exact
    kind: CostKind = CostKind.pairwise
    ratio: float = Field(0.5, gt=0, le=1, description="max_params_ratio of the plan solved from the costs.")
    samples: int | None = Field(None, gt=0, le=1_000_000, description="Calibration samples (None = all).")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    time_limit_s: float | None = Field(None, gt=0, le=3600, description="Solve time limit (default: server's).")
    compress: CompressSpec | None = Field(None, description="Also compress and save the model (omit: costs only).")

    @field_validator("compress")
    @classmethod
    def _compress_measures_pairwise(cls, value: CompressSpec | None, info: ValidationInfo) -> CompressSpec | None:
        # a field validator (kind is validated before compress), so the error's loc names the field
        kind = info.data.get("kind")
        if value is not None and kind is not None and kind != CostKind.pairwise:
            raise ValueError(f"kind={kind.value!r} applies to costs-only analyses; a compress job measures "
                             "pairwise costs and chooses among candidate plans: drop kind or compress")
        return value

    def stored(self) -> str:
        """Canonical JSON for the store; without ``compress`` when unset, so the stored request (and
        its Idempotency-Key hash) of a costs-only analysis is what it was before compress existed."""
        return dumps(self, exclude=None if self.compress is not None else {"compress"})


class AnalysisJob(_JobView):
    """An analysis: its spec, the costs the worker sent, and the plan solved from them.

    A compress job also has ``report``; ``report.plan`` is the plan tied into the saved model (the
    candidate with the least measured loss), while ``plan`` is what the service solved from the costs.
    """

    spec: AnalysisSpec
    attempts: int
    problem: SharingProblem | None = None
    plan_id: str | None = None
    plan: SharingPlan | None = Field(None, description="The plan the service solved from the costs.")
    report: CompressReport | None = Field(None, description="Compress jobs: the worker's report.")

    @classmethod
    def of(cls, job: Job, plan_job: Job | None) -> AnalysisJob:
        return cls(
            spec=AnalysisSpec.model_validate_json(job.request),
            attempts=job.attempts,
            problem=SharingProblem.model_validate_json(job.problem) if job.problem else None,
            plan_id=job.child_id,
            plan=SharingPlan.model_validate_json(plan_job.result) if plan_job and plan_job.result else None,
            report=CompressReport.model_validate_json(job.result) if job.result else None,
            **_common(job, "/v1/analyses", events=False),
        )


class ClaimRequest(_Request):
    worker: str = Field(min_length=1, max_length=128, description="Who claims (for logs and leases).")
    lease_s: float | None = Field(None, gt=0, description="Lease length (default: server's, capped).")


class Claim(BaseModel):
    """A claimed analysis: heartbeat within ``lease_s`` and send the token with every call."""

    id: str
    lease: str
    lease_s: float
    lease_expires: datetime
    attempt: int
    spec: AnalysisSpec


class Lease(BaseModel):
    id: str
    lease_expires: datetime


class FailRequest(_Request):
    error: str = Field(min_length=1, max_length=10_000, description="What went wrong on the worker.")
    retry: bool = Field(False, description="True when another attempt may succeed (e.g. a transient OOM).")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


def dumps(model: BaseModel, exclude: set[str] | None = None) -> str:
    """Canonical JSON of a request, stored and hashed for Idempotency-Key checks."""
    return json.dumps(model.model_dump(mode="json", exclude=exclude), sort_keys=True, separators=(",", ":"))
