"""/v1/plans: solve a SharingProblem; answer in the request when quick, else a job to poll."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import jobs
from service.db import TERMINAL, Job
from service.deps import Auth, NotifierDep, ParserDep, RunnerDep, SettingsDep, StoreDep
from service.errors import BODY_RESPONSES, PROBLEM_JSON, PROBLEM_RESPONSES
from service.models import PlanJob
from solver import SharingPlan

router = APIRouter(prefix="/v1/plans", tags=["plans"], dependencies=Auth)

JobId = Annotated[str, Path(min_length=1, max_length=64, description="Job id from the POST's Location.")]
Wait = Annotated[float, Query(ge=0, le=3600, description="Seconds to wait for the result in this request "
                                                          "(capped by the server's GEOSHARE_MAX_WAIT_S).")]
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                       description="Retries with the same key return the same job.")]


# the body is a SharingProblem, parsed by the route off the event loop (service.limits), so the
# OpenAPI says so here; app.py adds the schema
PROBLEM_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/SharingProblem"}}}}}


def submit_responses(view: type, what: str) -> dict[int | str, dict]:
    """A POST's answers: 200 finished (also a retry of a finished job), 202 pending, problems."""
    return {200: {"model": view, "description": f"Finished within `wait`, with its {what} (or its problem "
                  "document if it failed), or a retry with the same Idempotency-Key whose job has "
                  "finished: that job again, with Content-Location naming it."},
            202: {"model": view, "description": "Queued or running; poll the Location."},
            **BODY_RESPONSES, **PROBLEM_RESPONSES}


def _location(job_id: str) -> str:
    return f"/v1/plans/{job_id}"


async def _get(store: StoreDep, job_id: str) -> Job:
    job = await run_in_threadpool(store.get, job_id, ("plan",))
    if job is None:
        raise jobs.not_found("plan", job_id)
    return job


@router.post("", response_model=PlanJob, responses=submit_responses(PlanJob, "plan"), openapi_extra=PROBLEM_BODY)
async def create_plan(request: Request, parser: ParserDep, store: StoreDep, runner: RunnerDep,
                      notifier: NotifierDep, settings: SettingsDep, wait: Wait = 0.0,
                      idempotency_key: IdemKey = None) -> Response:
    """Queue a solve of the SharingProblem in the body; answer 200 with the plan if it finishes
    within `wait` seconds, else 202."""
    problem = await parser.problem_json(request)
    job = await jobs.submit(store, runner, settings, "plan", problem, idempotency_key)
    job = await jobs.settle(store, notifier, settings, job, wait)
    return jobs.answer(job, PlanJob.of(job), _location(job.id), failed_as_problem=True)


@router.get("/{job_id}", response_model=PlanJob, responses=PROBLEM_RESPONSES)
async def get_plan(job_id: JobId, store: StoreDep, notifier: NotifierDep, settings: SettingsDep,
                   wait: Wait = 0.0) -> Response:
    """The job's state, and its plan or problem document when finished (long-polls with `wait`)."""
    job = await _get(store, job_id)
    job = await jobs.settle(store, notifier, settings, job, wait)
    return jobs.json_response(PlanJob.of(job))


@router.delete("/{job_id}", response_model=PlanJob, responses={
    409: {"description": "Already finished", "content": {PROBLEM_JSON: {}}}, **PROBLEM_RESPONSES})
async def cancel_plan(job_id: JobId, store: StoreDep, runner: RunnerDep, notifier: NotifierDep) -> Response:
    """Cancel a queued or running solve (its process is killed at once)."""
    job = await _get(store, job_id)
    job = await jobs.cancel(store, job, f"plan job {job_id}")
    runner.cancel(job_id)
    notifier.notify(job_id)
    return jobs.json_response(PlanJob.of(job))


def _sse(event: str, data: dict, seq: int) -> str:
    return f"id: {seq}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _summary(plan: SharingPlan) -> dict:
    return {"status": plan.status.value, "objective": plan.objective, "bound": plan.bound, "gap": plan.gap,
            "params": plan.params.model_dump() if plan.params else None}


async def _events(store: StoreDep, notifier: NotifierDep, runner: RunnerDep, job_id: str,
                  keepalive_s: float) -> AsyncIterator[str]:
    seq = 0
    last = None
    last_progress = None
    with notifier.subscribe(job_id) as ev:
        while True:
            job = await run_in_threadpool(store.get, job_id)
            if job is None:
                return
            if job.state != last:
                last = job.state
                seq += 1
                yield _sse("state", {"id": job_id, "state": job.state}, seq)
            improvement = runner.progress_of(job_id) if job.state == "running" else None
            if improvement is not None and improvement != last_progress:
                last_progress = improvement
                seq += 1
                yield _sse("progress", improvement, seq)
            if job.state in TERMINAL:
                seq += 1
                if job.result:
                    yield _sse("result", _summary(SharingPlan.model_validate_json(job.result)), seq)
                elif job.error:
                    yield _sse("error", job.error_doc() or {}, seq)
                return
            try:
                await asyncio.wait_for(ev.wait(), timeout=keepalive_s)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
            ev.clear()


@router.get("/{job_id}/events", responses={
    200: {"description": "Server-sent events: `state` on every change, `progress` (objective, bound, gap, "
                         "elapsed_s) whenever a running solve improves, then `result` (status, objective, "
                         "bound, gap) or `error`; the stream ends when the job does.",
          "content": {"text/event-stream": {}}}, **PROBLEM_RESPONSES})
async def plan_events(job_id: JobId, store: StoreDep, notifier: NotifierDep, runner: RunnerDep,
                      settings: SettingsDep) -> StreamingResponse:
    """Follow a job live instead of polling."""
    await _get(store, job_id)
    return StreamingResponse(_events(store, notifier, runner, job_id, max(settings.poll_s, 1.0) * 5),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
