"""Builds the FastAPI app: settings, store, solve runner, lease reaper, routers, error handlers.

Swagger UI's assets are served from the fastapi-offline package (Swagger UI 5, which renders
OpenAPI 3.1), so /docs works without a CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service import errors
from service.compress import CompressResult
from service.db import Store
from service.limits import AuthMiddleware, BodyLimitMiddleware, ProblemParser
from service.listen import StoreListener
from service.metrics import Metrics, MetricsMiddleware
from service.models import AnalysisSpec, ClaimRequest, FailRequest
from service.notify import Notifier
from service.routes import analyses, frontiers, health, plans
from service.runner import Runner
from service.settings import Settings
from service.states import SOLVE_KINDS
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


# the models of the bodies the routes parse themselves (service.limits), named by their OpenAPI
BODY_MODELS: tuple[type[BaseModel], ...] = (SharingProblem, AnalysisSpec, ClaimRequest, FailRequest, CompressResult)
_PROBE = "geoshare-body-"


def _document_bodies(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """app.openapi, with the schemas of the bodies the routes parse themselves.

    Those routes parse their body off the event loop, so FastAPI does not see the model; their
    ``openapi_extra`` names it. For FastAPI to generate its schema with the rest (one naming, the
    ``-Input``/``-Output`` split included), each model is the body of a webhook, which is only
    documented, never served; the webhooks are dropped from the document again.
    """
    for model in BODY_MODELS:
        async def probe(body: Any) -> None:  # never called
            """A body schema for the OpenAPI document."""

        probe.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=model)])
        app.webhooks.add_api_route(_PROBE + model.__name__, probe, methods=["POST"],
                                  responses={422: {"description": "never served"}})
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        hooks = schema.get("webhooks", {})
        for name in [n for n in hooks if n.startswith(_PROBE)]:
            del hooks[name]
        if "webhooks" in schema and not hooks:
            del schema["webhooks"]
        return schema

    return openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; workers and the database start with the app's lifespan."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await run_in_threadpool(Store, settings.db_url)
        if settings.requeues_on_start():
            requeued = await run_in_threadpool(store.requeue_running, SOLVE_KINDS)
            if requeued:
                log.info("re-queued %d solves that were running when the server stopped", len(requeued))
        notifier = Notifier(asyncio.get_running_loop())
        runner = Runner(settings, store, metrics, notifier.notify)
        parser = ProblemParser(settings.max_layers, settings.max_time_limit_s)
        app.state.store, app.state.notifier, app.state.runner, app.state.parser = store, notifier, runner, parser
        parser.start()
        runner.start()
        # replicas sharing the store hear each other's changes (a SQLite file has one server)
        listener = StoreListener(store, notifier.notify, runner.wake) if store.shared else None
        if listener is not None:
            listener.start()
        reaper = asyncio.create_task(_reaper(app, settings))
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            if listener is not None:
                await run_in_threadpool(listener.stop)
            await run_in_threadpool(runner.stop)
            parser.stop()
            store.dispose()

    app = FastAPIOffline(title="Geo-Sharing", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                         openapi_url="/openapi.json", docs_url="/docs", redoc_url=None,
                         static_url="/docs/assets")
    app.openapi = _document_bodies(app)  # type: ignore[method-assign]
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
