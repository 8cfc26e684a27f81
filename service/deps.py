"""FastAPI dependencies as ``Annotated`` aliases: settings, store, runner, notifier, parser, auth.

All are ``async def``: they only read app state, and FastAPI runs a plain ``def`` dependency in
the thread pool, a thread hop per dependency per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.db import Store
from service.limits import ProblemParser, bearer_ok, unauthorized
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


async def _parser(request: Request) -> ProblemParser:
    return request.app.state.parser


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[Store, Depends(_store)]
RunnerDep = Annotated[Runner, Depends(_runner)]
NotifierDep = Annotated[Notifier, Depends(_notifier)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
ParserDep = Annotated[ProblemParser, Depends(_parser)]

_bearer = HTTPBearer(auto_error=False, description="Needed when the server has GEOSHARE_API_KEY set.")


async def require_api_key(request: Request, settings: SettingsDep,
                          creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Checks the bearer token when the server has an API key; open otherwise.

    ``AuthMiddleware`` already refused a missing key before the body was read; this keeps the
    check (and the OpenAPI security scheme) on every route that has it, whatever wraps the app.
    """
    if settings.api_key is None:
        return
    if not bearer_ok(request.headers.get("authorization"), settings.api_key.get_secret_value()):
        raise ApiProblem.of(unauthorized(), headers={"WWW-Authenticate": "Bearer"})


Auth = [Depends(require_api_key)]
