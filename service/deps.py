"""FastAPI dependencies as ``Annotated`` aliases: settings, store, runner, notifier, auth.

All are ``async def``: they only read app state, and FastAPI runs a plain ``def`` dependency in
the thread pool, a thread hop per dependency per request.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.db import Store
from service.metrics import Metrics
from service.notify import Notifier
from service.problems import ApiProblem
from service.runner import Runner
from service.settings import Settings


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _store(request: Request) -> Store:
    return request.app.state.store


async def _runner(request: Request) -> Runner:
    return request.app.state.runner


async def _notifier(request: Request) -> Notifier:
    return request.app.state.notifier


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[Store, Depends(_store)]
RunnerDep = Annotated[Runner, Depends(_runner)]
NotifierDep = Annotated[Notifier, Depends(_notifier)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]

_bearer = HTTPBearer(auto_error=False, description="Needed when the server has GEOSHARE_API_KEY set.")


async def require_api_key(settings: SettingsDep,
                    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Checks the bearer token when the server has an API key; open otherwise."""
    if settings.api_key is None:
        return
    want = settings.api_key.get_secret_value()
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), want.encode()):
        raise ApiProblem(401, "unauthorized", "Unauthorized",
                         "send 'Authorization: Bearer <key>' with the key this server was started with "
                         "(GEOSHARE_API_KEY)", headers={"WWW-Authenticate": "Bearer"})


Auth = [Depends(require_api_key)]
