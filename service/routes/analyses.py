"""/v1/analyses: curvature jobs for GPU workers, handed out under expiring leases.

A worker claims a job, heartbeats within its lease, and completes it with the SharingProblem it
measured (a compress job: with the costs and its compression report); the plan is then solved here
and attached. A lease that runs out puts the job back in the queue (a dead worker loses nothing
but time).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from service import jobs
from service.access import AccessDenied, AccessRules
from service.db import Job
from service.deps import Auth, NotifierDep, ParserDep, RunnerDep, SettingsDep, StoreDep
from service.errors import BODY_RESPONSES, PROBLEM_JSON, PROBLEM_RESPONSES
from service.limits import ParsedCompletion
from service.models import AnalysisJob, AnalysisSpec, Claim, ClaimRequest, FailRequest, Lease
from service.problems import ApiProblem, problem
from service.routes.solves import IdemKey, JobId, Wait
from service.settings import AccessSettings
from service.states import JobKind

ANALYSIS = JobKind.analysis.value

router = APIRouter(prefix="/v1/analyses", tags=["analyses"], dependencies=Auth)

LeaseToken = Annotated[str, Query(min_length=1, max_length=64, description="The token from the claim.")]
LeaseSeconds = Annotated[float | None, Query(gt=0, description="Lease length (default: the server's).")]
# The bodies are parsed by the routes off the event loop (service.limits), like the plan and
# frontier bodies, so the OpenAPI names them here; app.py adds the schemas.
def _body(*names: str) -> dict:
    refs = [{"$ref": f"#/components/schemas/{name}"} for name in names]
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": refs[0] if len(refs) == 1 else {"oneOf": refs}}}}}


_CONFLICT = {409: {"description": "The lease was lost (expired, cancelled, or another worker holds it)",
                   "content": {PROBLEM_JSON: {}}}}


def _location(job_id: str) -> str:
    return f"/v1/analyses/{job_id}"


def _lease_s(asked: float | None, settings: SettingsDep) -> float:
    return min(asked or settings.lease_s, settings.max_lease_s)


def _lost(job_id: str) -> ApiProblem:
    return ApiProblem(409, "lease-lost", "Conflict",
                      f"analysis {job_id} is not held under this lease (it expired and was re-queued, was "
                      "cancelled, or finished); drop the work and claim again", id=job_id)


async def _view(store: StoreDep, job_id: str) -> tuple[Job, AnalysisJob]:
    job = await run_in_threadpool(store.get, job_id, (ANALYSIS,))
    if job is None:
        raise jobs.not_found(ANALYSIS, job_id)
    child = await run_in_threadpool(store.get, job.child_id) if job.child_id else None
    return job, AnalysisJob.of(job, child)


@router.post("", response_model=AnalysisJob, status_code=202, responses={**BODY_RESPONSES, **PROBLEM_RESPONSES},
             openapi_extra=_body("AnalysisSpec"))
async def create_analysis(request: Request, parser: ParserDep, store: StoreDep, settings: SettingsDep,
                          idempotency_key: IdemKey = None) -> Response:
    """Queue an analysis for the GPU workers (202 + Location; the plan follows the costs).

    With `compress` the worker also compresses the model and saves it to `compress.out`."""
    spec = await parser.model(request, AnalysisSpec)
    if spec.time_limit_s is not None and spec.time_limit_s > settings.max_time_limit_s:
        raise ApiProblem(422, "time-limit-too-long", "Time limit over the cap",
                         f"time_limit_s={spec.time_limit_s:g} exceeds this server's cap of "
                         f"{settings.max_time_limit_s:g} s (GEOSHARE_MAX_TIME_LIMIT_S); lower it",
                         field="time_limit_s", limit=settings.max_time_limit_s,
                         errors=[{"loc": ["body", "time_limit_s"], "type": "time_limit_too_long",
                                  "msg": f"exceeds this server's cap of {settings.max_time_limit_s:g} s"}])
    denied = await run_in_threadpool(_denied, spec, settings)  # realpath may touch a slow mount
    if denied is not None:
        raise denied
    job = await jobs.submit(store, None, settings, ANALYSIS, spec.stored(), idempotency_key)
    view = AnalysisJob.of(job, None)
    status = 200 if job.terminal else 202
    return jobs.json_response(view, status, {"Location": _location(job.id)})


def _denied(spec: AnalysisSpec, settings: AccessSettings) -> RequestValidationError | None:
    """A 422 naming the field when the spec's model, data or out is not allowed here (service/access.py).

    This host resolves what it can (``..`` always, symlinks where the path exists here); the worker
    checks again on its own file system before it runs the job.
    """
    try:
        AccessRules.of(settings, side="this API").check(spec)
    except AccessDenied as exc:
        value: object = spec.model_dump(mode="json")
        for key in exc.loc:
            value = value.get(key) if isinstance(value, dict) else None
        return RequestValidationError([{"type": "access_denied", "loc": ("body", *exc.loc), "msg": str(exc),
                                        "input": value}])
    return None


@router.post("/claim", response_model=Claim, responses={
    204: {"description": "Nothing to do; poll again later."}, **BODY_RESPONSES, **PROBLEM_RESPONSES},
    openapi_extra=_body("ClaimRequest"))
async def claim_analysis(request: Request, parser: ParserDep, store: StoreDep, notifier: NotifierDep,
                         settings: SettingsDep) -> Response:
    """Take the oldest queued analysis under a lease; 204 when the queue is empty."""
    body = await parser.model(request, ClaimRequest)
    lease_s = _lease_s(body.lease_s, settings)
    job = await run_in_threadpool(store.claim, (ANALYSIS,), body.worker, lease_s)
    if job is None:
        return Response(status_code=204)
    notifier.notify(job.id)
    assert job.lease_token is not None and job.lease_expires is not None
    return jobs.json_response(Claim(id=job.id, lease=job.lease_token, lease_s=lease_s, attempt=job.attempts,
                                    lease_expires=datetime.fromtimestamp(job.lease_expires, tz=timezone.utc),
                                    spec=AnalysisSpec.model_validate_json(job.request)))


@router.post("/{job_id}/heartbeat", response_model=Lease, responses={**_CONFLICT, **PROBLEM_RESPONSES})
async def heartbeat_analysis(job_id: JobId, lease: LeaseToken, store: StoreDep, settings: SettingsDep,
                             lease_s: LeaseSeconds = None) -> Response:
    """Extend the lease; 409 tells the worker to stop (cancelled or expired)."""
    seconds = _lease_s(lease_s, settings)
    if not await run_in_threadpool(store.renew, job_id, lease, seconds):
        await _view(store, job_id)  # 404 when the id is unknown
        raise _lost(job_id)
    expires = datetime.fromtimestamp(time.time() + seconds, tz=timezone.utc)
    return jobs.json_response(Lease(id=job_id, lease_expires=expires))


@router.post("/{job_id}/complete", response_model=AnalysisJob,
             responses={**_CONFLICT, **BODY_RESPONSES, **PROBLEM_RESPONSES},
             openapi_extra=_body("SharingProblem", "CompressResult"))
async def complete_analysis(job_id: JobId, lease: LeaseToken, request: Request, parser: ParserDep, store: StoreDep,
                            runner: RunnerDep, notifier: NotifierDep, settings: SettingsDep) -> Response:
    """Hand in the measured costs (a compress job: `{problem, report}`); the plan is solved here
    with the analysis's ratio.

    The job is looked up first (404 for an unknown id): its ratio and time limit go into the plan
    problem, which is built with the parse, off the event loop."""
    _, view = await _view(store, job_id)
    spec = view.spec
    limit = min(spec.time_limit_s or settings.analysis_time_limit_s, settings.max_time_limit_s)
    parsed = await parser.completion(request, spec.ratio, limit)
    _check_kind(job_id, spec, parsed)
    done = await run_in_threadpool(store.complete_analysis, job_id, lease, parsed.costs, parsed.request,
                                   parsed.request_hash, parsed.report)
    if done is None:
        raise _lost(job_id)
    runner.wake()
    notifier.notify(job_id)
    _, view = await _view(store, job_id)
    return jobs.json_response(view)


def _check_kind(job_id: str, spec: AnalysisSpec, parsed: ParsedCompletion) -> None:
    """422 when the completion does not fit the kind of job (costs alone vs {problem, report})."""
    if parsed.report is not None and spec.compress is None:
        raise ApiProblem(422, "not-a-compress-job", "Completion does not fit the job",
                         f"analysis {job_id} only measures costs; send the SharingProblem alone, "
                         "not {problem, report}", id=job_id)
    if parsed.report is None and spec.compress is not None:
        raise ApiProblem(422, "report-missing", "Completion does not fit the job",
                         f"analysis {job_id} is a compress job; complete it with {{\"problem\": <the "
                         "SharingProblem>, \"report\": <the CompressReport>}", id=job_id)


@router.post("/{job_id}/fail", response_model=AnalysisJob,
             responses={**_CONFLICT, **BODY_RESPONSES, **PROBLEM_RESPONSES}, openapi_extra=_body("FailRequest"))
async def fail_analysis(job_id: JobId, lease: LeaseToken, request: Request, parser: ParserDep, store: StoreDep,
                        notifier: NotifierDep, settings: SettingsDep) -> Response:
    """Report that the analysis failed; with `retry` it goes back to the queue (up to the attempt cap)."""
    body = await parser.model(request, FailRequest)
    await _view(store, job_id)
    err = problem(422, "analysis-failed", "The analysis failed on the worker", body.error)
    done = await run_in_threadpool(store.fail_analysis, job_id, lease, err, body.retry, settings.max_attempts)
    if done is None:
        raise _lost(job_id)
    notifier.notify(job_id)
    _, view = await _view(store, job_id)
    return jobs.json_response(view)


@router.get("/{job_id}", response_model=AnalysisJob, responses=PROBLEM_RESPONSES)
async def get_analysis(job_id: JobId, store: StoreDep, notifier: NotifierDep, settings: SettingsDep,
                       wait: Wait = 0.0) -> Response:
    """State, the costs (and a compress job's report) once a worker sent them, and the plan once
    solved (long-polls with `wait`)."""
    job, view = await _view(store, job_id)
    if not job.terminal and await jobs.settle(store, notifier, settings, job, wait) is not job:
        job, view = await _view(store, job_id)
    return jobs.json_response(view)


@router.delete("/{job_id}", response_model=AnalysisJob, responses={
    409: {"description": "Already finished", "content": {PROBLEM_JSON: {}}}, **PROBLEM_RESPONSES})
async def cancel_analysis(job_id: JobId, store: StoreDep, runner: RunnerDep, notifier: NotifierDep) -> Response:
    """Cancel an analysis (and the solve of its plan, if running); its worker's next heartbeat gets 409."""
    job, _ = await _view(store, job_id)
    job = await jobs.cancel(store, job, f"analysis {job_id}")
    if job.child_id:
        runner.cancel(job.child_id)
        notifier.notify(job.child_id)
    notifier.notify(job_id)
    _, view = await _view(store, job_id)
    return jobs.json_response(view)
