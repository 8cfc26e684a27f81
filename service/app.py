"""Builds the FastAPI app: settings, store, solve runner, lease reaper, routers, error handlers.

Swagger UI's assets are served from the fastapi-offline package (Swagger UI 5, which renders
OpenAPI 3.1), so /docs works without a CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from service import errors
from service.db import SOLVE_KINDS, Store
from service.limits import AuthMiddleware, BodyLimitMiddleware, ProblemParser
from service.metrics import Metrics, MetricsMiddleware
from service.notify import Notifier
from service.routes import analyses, frontiers, health, plans
from service.runner import Runner
from service.settings import Settings
from solver import SharingProblem

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


def _with_problem_schema(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """app.openapi, plus the SharingProblem schema the plan and frontier bodies refer to.

    Those routes parse their body themselves (off the event loop), so FastAPI does not see the
    model; their requestBody names it and it is added here when no other route brought it.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "SharingProblem" not in components:
            model = SharingProblem.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in model.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components["SharingProblem"] = model
        return schema

    return openapi


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
        parser = ProblemParser(settings.max_layers, settings.max_time_limit_s)
        app.state.store, app.state.notifier, app.state.runner, app.state.parser = store, notifier, runner, parser
        parser.start()
        runner.start()
        reaper = asyncio.create_task(_reaper(app, settings))
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await run_in_threadpool(runner.stop)
            parser.stop()
            store.dispose()

    app = FastAPIOffline(title="Geo-Sharing", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                         openapi_url="/openapi.json", docs_url="/docs", redoc_url=None,
                         static_url="/docs/assets")
    app.openapi = _with_problem_schema(app)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app)
    for module in (plans, frontiers, analyses, health):
        app.include_router(module.router)
    # each add wraps the last: count every request, refuse a missing key, then an oversize
    # body, all before the body is parsed
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    app.add_middleware(AuthMiddleware, api_key=key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
