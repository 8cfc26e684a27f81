"""What /v1/plans and /v1/frontiers share: a SharingProblem solved as a job, answered in the
request when quick, else polled; one router per kind built by ``solve_router``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service import jobs
from service.db import Job
from service.deps import Auth, NotifierDep, ParserDep, RunnerDep, SettingsDep, StoreDep
from service.errors import BODY_RESPONSES, PROBLEM_JSON, PROBLEM_RESPONSES
from service.models import FrontierJob, PlanJob
from service.states import JobKind

JobId = Annotated[str, Path(min_length=1, max_length=64, description="Job id from the POST's Location.")]
Wait = Annotated[float, Query(ge=0, le=3600, description="Seconds to wait for the result in this request "
                                                          "(capped by the server's GEOSHARE_MAX_WAIT_S).")]
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                       description="Retries with the same key return the same job.")]

# the body is a SharingProblem, parsed by the route off the event loop (service.limits), so the
# OpenAPI says so here; app.py adds the schema
PROBLEM_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/SharingProblem"}}}}}
CANCEL_RESPONSES = {409: {"description": "Already finished", "content": {PROBLEM_JSON: {}}}, **PROBLEM_RESPONSES}


def submit_responses(view: type, what: str) -> dict[int | str, dict]:
    """A POST's answers: 200 finished (also a retry of a finished job), 202 pending, problems."""
    return {200: {"model": view, "description": f"Finished within `wait`, with its {what} (or its problem "
                  "document if it failed), or a retry with the same Idempotency-Key whose job has "
                  "finished: that job again, with Content-Location naming it."},
            202: {"model": view, "description": "Queued or running; poll the Location."},
            **BODY_RESPONSES, **PROBLEM_RESPONSES}


async def get_job(store: StoreDep, kind: str, job_id: str) -> Job:
    """The job of this kind, or 404."""
    job = await run_in_threadpool(store.get, job_id, (kind,))
    if job is None:
        raise jobs.not_found(kind, job_id)
    return job


def solve_router(kind: JobKind, view: type[PlanJob] | type[FrontierJob], *, create: str, get: str,
                 cancel: str) -> APIRouter:
    """POST, GET and DELETE of one solve kind at /v1/{kind}s; the docstrings are the operations'.

    Route names (create_plan, get_frontier, ...) keep the OpenAPI operation ids of earlier versions.
    """
    name = kind.value
    base = f"/v1/{name}s"
    router = APIRouter(prefix=base, tags=[f"{name}s"], dependencies=Auth)

    async def create_job(request: Request, parser: ParserDep, store: StoreDep, runner: RunnerDep,
                         notifier: NotifierDep, settings: SettingsDep, wait: Wait = 0.0,
                         idempotency_key: IdemKey = None) -> Response:
        problem = await parser.problem_json(request)
        job = await jobs.submit(store, runner, settings, name, problem, idempotency_key)
        job = await jobs.settle(store, notifier, settings, job, wait)
        return jobs.answer(job, view.of(job), f"{base}/{job.id}", failed_as_problem=True)

    async def get_one(job_id: JobId, store: StoreDep, notifier: NotifierDep, settings: SettingsDep,
                      wait: Wait = 0.0) -> Response:
        job = await get_job(store, name, job_id)
        job = await jobs.settle(store, notifier, settings, job, wait)
        return jobs.json_response(view.of(job))

    async def cancel_job(job_id: JobId, store: StoreDep, runner: RunnerDep, notifier: NotifierDep) -> Response:
        job = await get_job(store, name, job_id)
        job = await jobs.cancel(store, job, f"{name} job {job_id}")
        runner.cancel(job_id)
        notifier.notify(job_id)
        return jobs.json_response(view.of(job))

    router.add_api_route("", create_job, methods=["POST"], name=f"create_{name}", description=create,
                         response_model=view, responses=submit_responses(view, name), openapi_extra=PROBLEM_BODY)
    router.add_api_route("/{job_id}", get_one, methods=["GET"], name=f"get_{name}", description=get,
                         response_model=view, responses=PROBLEM_RESPONSES)
    router.add_api_route("/{job_id}", cancel_job, methods=["DELETE"], name=f"cancel_{name}", description=cancel,
                         response_model=view, responses=CANCEL_RESPONSES)
    return router
