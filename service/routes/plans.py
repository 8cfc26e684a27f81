"""/v1/plans: solve a SharingProblem; answer in the request when quick, else a job to poll."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.deps import NotifierDep, RunnerDep, SettingsDep, StoreDep
from service.errors import PROBLEM_RESPONSES
from service.models import PlanJob
from service.routes.solves import JobId, get_job, solve_router
from service.states import TERMINAL, JobKind, JobState
from solver import SharingPlan

router = solve_router(
    JobKind.plan, PlanJob,
    create="Queue a solve of the SharingProblem in the body; answer 200 with the plan if it finishes\n"
           "within `wait` seconds, else 202.",
    get="The job's state, and its plan or problem document when finished (long-polls with `wait`).",
    cancel="Cancel a queued or running solve (its process is killed at once).",
)


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
            improvement = runner.progress_of(job_id) if job.state == JobState.running else None
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
    await get_job(store, JobKind.plan.value, job_id)
    return StreamingResponse(_events(store, notifier, runner, job_id, max(settings.poll_s, 1.0) * 5),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
