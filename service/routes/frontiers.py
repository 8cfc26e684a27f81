"""/v1/frontiers: the whole compression-vs-cost frontier of a problem, as a job like a plan."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import jobs
from service.db import Job
from service.deps import Auth, NotifierDep, ParserDep, RunnerDep, SettingsDep, StoreDep
from service.errors import PROBLEM_JSON, PROBLEM_RESPONSES
from service.models import FrontierJob
from service.routes.plans import PROBLEM_BODY, IdemKey, JobId, Wait, submit_responses

router = APIRouter(prefix="/v1/frontiers", tags=["frontiers"], dependencies=Auth)


def _location(job_id: str) -> str:
    return f"/v1/frontiers/{job_id}"


async def _get(store: StoreDep, job_id: str) -> Job:
    job = await run_in_threadpool(store.get, job_id, ("frontier",))
    if job is None:
        raise jobs.not_found("frontier", job_id)
    return job


@router.post("", response_model=FrontierJob, responses=submit_responses(FrontierJob, "frontier"),
             openapi_extra=PROBLEM_BODY)
async def create_frontier(request: Request, parser: ParserDep, store: StoreDep, runner: RunnerDep,
                          notifier: NotifierDep, settings: SettingsDep, wait: Wait = 0.0,
                          idempotency_key: IdemKey = None) -> Response:
    """Queue a frontier of the SharingProblem in the body; answer 200 with it if it finishes
    within `wait` seconds, else 202."""
    problem = await parser.problem_json(request)
    job = await jobs.submit(store, runner, settings, "frontier", problem, idempotency_key)
    job = await jobs.settle(store, notifier, settings, job, wait)
    return jobs.answer(job, FrontierJob.of(job), _location(job.id), failed_as_problem=True)


@router.get("/{job_id}", response_model=FrontierJob, responses=PROBLEM_RESPONSES)
async def get_frontier(job_id: JobId, store: StoreDep, notifier: NotifierDep, settings: SettingsDep,
                       wait: Wait = 0.0) -> Response:
    """The job's state, and its frontier or problem document when finished."""
    job = await _get(store, job_id)
    job = await jobs.settle(store, notifier, settings, job, wait)
    return jobs.json_response(FrontierJob.of(job))


@router.delete("/{job_id}", response_model=FrontierJob, responses={
    409: {"description": "Already finished", "content": {PROBLEM_JSON: {}}}, **PROBLEM_RESPONSES})
async def cancel_frontier(job_id: JobId, store: StoreDep, runner: RunnerDep, notifier: NotifierDep) -> Response:
    """Cancel a queued or running frontier job."""
    job = await _get(store, job_id)
    job = await jobs.cancel(store, job, f"frontier job {job_id}")
    runner.cancel(job_id)
    notifier.notify(job_id)
    return jobs.json_response(FrontierJob.of(job))
