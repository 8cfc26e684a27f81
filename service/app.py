"""Builds the FastAPI app: settings, store, solve runner, lease reaper, routers, error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import errors
from service.db import SOLVE_KINDS, Store
from service.limits import BodyLimitMiddleware
from service.metrics import Metrics, MetricsMiddleware
from service.notify import Notifier
from service.routes import analyses, frontiers, health, plans
from service.runner import Runner
from service.settings import Settings

log = logging.getLogger("geoshare.api")

DESCRIPTION = """Optimal cross-layer parameter sharing plans with proven bounds.

Submit a SharingProblem to `/v1/plans` (add `?wait=10` to get the plan in the same request when it is
quick), follow it with `/v1/plans/{id}/events`, queue GPU analyses at `/v1/analyses`.
Every error is RFC 9457 `application/problem+json`.
"""


async def _reaper(app: FastAPI, settings: Settings) -> None:
    """Expired leases (dead GPU workers, dead replicas) go back to the queue."""
    store: Store = app.state.store
    while True:
        await asyncio.sleep(settings.poll_s)
        try:
            changed = await run_in_threadpool(store.reap_expired, settings.max_attempts)
        except Exception:
            log.exception("reaping expired leases failed")
            continue
        for job_id in changed:
            app.state.notifier.notify(job_id)
        if changed:
            app.state.runner.wake(len(changed))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; workers and the database start with the app's lifespan."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await run_in_threadpool(Store, settings.db_url)
        if settings.requeue_on_start:
            requeued = await run_in_threadpool(store.requeue_running, SOLVE_KINDS)
            if requeued:
                log.info("re-queued %d solves that were running when the server stopped", len(requeued))
        notifier = Notifier(asyncio.get_running_loop())
        runner = Runner(settings, store, metrics, notifier.notify)
        app.state.store, app.state.notifier, app.state.runner = store, notifier, runner
        runner.start()
        reaper = asyncio.create_task(_reaper(app, settings))
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await run_in_threadpool(runner.stop)
            store.dispose()

    app = FastAPI(title="Geo-Sharing", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app)
    for module in (plans, frontiers, analyses, health):
        app.include_router(module.router)
    # outermost first: count every request, then refuse oversize bodies before parsing
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
