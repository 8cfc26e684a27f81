"""Liveness, readiness and Prometheus metrics (open even when an API key is set)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from service import jobs
from service.deps import MetricsDep, RunnerDep, StoreDep
from service.errors import problem_response
from service.models import Health
from service.problems import problem
from service.states import JobKind, JobState

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers (for container healthchecks and restarts)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"description": "Not ready (problem+json)"}})
async def readyz(store: StoreDep, runner: RunnerDep) -> Response:
    """Ready to take work: the database answers and a solve process is up."""
    checks = {}
    try:
        await run_in_threadpool(store.ping)
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means not ready
        checks["database"] = f"error: {type(exc).__name__}"
    checks["solver"] = "ok" if runner.ready() else "starting"
    if all(v == "ok" for v in checks.values()):
        return jobs.json_response(Health(status="ok", checks=checks))
    doc = problem(503, "not-ready", "Service unavailable",
                  "not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"), checks=checks)
    return problem_response(doc, {"Retry-After": "1"})


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(metrics: MetricsDep, store: StoreDep, runner: RunnerDep) -> Response:
    """Request counts and latencies, solve times, queue depth, running jobs."""
    for kind in JobKind:
        metrics.queue_depth.labels(kind.value).set(await run_in_threadpool(store.count, (kind.value,), JobState.queued.value))
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
