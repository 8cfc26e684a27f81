"""What the plan, frontier and analysis routes share: caps, submission, waiting, answering."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastapi import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.db import IdempotencyMismatch, Job, Store
from service.errors import problem_response
from service.limits import caps_problem, request_hash
from service.notify import Notifier
from service.problems import ApiProblem
from service.runner import Runner
from service.settings import Settings
from service.states import FINISHED, SOLVE_KINDS, JobState
from solver import SharingProblem

JSON = "application/json"


def check_caps(problem: SharingProblem, settings: Settings) -> None:
    """Refuse problems beyond this server's caps, naming the field, the cap and the fix.

    Raises:
        ApiProblem: 413 for too many layers, 422 for a time limit over the cap.
    """
    doc = caps_problem(len(problem.layers), problem.options.time_limit_s, settings.max_layers,
                       settings.max_time_limit_s)
    if doc is not None:
        raise ApiProblem.of(doc)


def _submit_blocking(store: Store, settings: Settings, kind: str, request: str,
                     idempotency_key: str | None, queue_kinds: tuple[str, ...]) -> tuple[Job, bool]:
    digest = request_hash(request)
    if idempotency_key is not None:
        old = store.by_idempotency(kind, idempotency_key)
        if old is not None:
            return Store.same_request(old, digest), False
    queued = store.count(queue_kinds, JobState.queued.value)
    if queued >= settings.max_queue:
        raise ApiProblem(429, "queue-full", "Too many requests",
                         f"{queued} jobs are queued, the most this server holds (GEOSHARE_MAX_QUEUE); "
                         f"retry after {settings.retry_after_s} s",
                         headers={"Retry-After": str(settings.retry_after_s)})
    return store.create(kind, request, digest, idempotency_key)


async def submit(store: Store, runner: Runner | None, settings: Settings, kind: str, request: str,
                 idempotency_key: str | None) -> Job:
    """Queue a job (or find the one this Idempotency-Key made) and wake the runner.

    Raises:
        ApiProblem: 429 when the queue is full, 422 when the key was used for another request.
    """
    queue_kinds = SOLVE_KINDS if kind in SOLVE_KINDS else (kind,)
    try:
        job, created = await run_in_threadpool(_submit_blocking, store, settings, kind, request,
                                               idempotency_key, queue_kinds)
    except IdempotencyMismatch as e:
        raise ApiProblem(422, "idempotency-key-reused", "Idempotency-Key reused",
                         f"Idempotency-Key {idempotency_key!r} was used for a different request (job "
                         f"{e.job.id}); use a new key for a new request", job=e.job.id) from e
    if created and runner is not None:
        runner.wake()
    return job


async def wait_for(store: Store, notifier: Notifier, job_id: str, wait_s: float,
                   poll_s: float = 1.0) -> Job | None:
    """The job once it is terminal or ``wait_s`` has passed, whichever is first.

    Woken only by changes that may settle the job (not by its start or a solve's progress), so
    a quick solve costs one store read here after the first.
    """
    deadline = time.monotonic() + wait_s
    with notifier.subscribe(job_id, every_change=False) as ev:
        while True:
            job = await run_in_threadpool(store.get, job_id)
            left = deadline - time.monotonic()
            if job is None or job.terminal or left <= 0:
                return job
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout=min(left, poll_s))
            ev.clear()


async def settle(store: Store, notifier: Notifier, settings: Settings, job: Job, wait: float) -> Job:
    """The job after long-polling up to ``wait`` seconds (capped by the settings) for it to finish."""
    wait = min(wait, settings.max_wait_s)
    if wait > 0 and not job.terminal:
        return await wait_for(store, notifier, job.id, wait, settings.poll_s) or job
    return job


async def cancel(store: Store, job: Job, what: str) -> Job:
    """Marks a queued or running job cancelled; 409 when it already finished.

    ``what`` names the job in the message ("plan job <id>"); killing its process and waking its
    waiters stay with the caller, which knows whether a child solve exists.
    """
    if job.state in FINISHED:
        raise ApiProblem(409, "already-finished", "Conflict",
                         f"{what} already {job.state}; there is nothing to cancel", id=job.id)
    cancelled = await run_in_threadpool(store.cancel, job.id)
    assert cancelled is not None
    return cancelled


def json_response(view: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(view.model_dump_json(exclude_none=True), status_code=status, headers=headers, media_type=JSON)


def answer(job: Job, view: BaseModel, location: str, *, failed_as_problem: bool) -> Response:
    """200 when done, 202 + Location while pending; a failure as its problem document on submit."""
    if job.state == JobState.failed and failed_as_problem:
        doc: dict[str, Any] = job.error_doc() or {"type": "about:blank", "title": "Failed", "status": 500}
        return problem_response({**doc, "job": job.id, "instance": location},
                                {"Location": location})
    if job.terminal:
        return json_response(view, 200, {"Content-Location": location})
    return json_response(view, 202, {"Location": location, "Retry-After": "1"})


def not_found(kind: str, job_id: str) -> ApiProblem:
    return ApiProblem(404, "not-found", "Not found",
                      f"no {kind} job with id {job_id!r}; ids come from the Location of the POST that made it",
                      id=job_id)
