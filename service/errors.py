"""The one place exceptions become HTTP answers: RFC 9457 problem+json for every error."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from service.problems import ApiProblem, ProblemDetail, from_solver_error, problem
from solver.errors import GeoShareError
from solver.io import describe_validation

log = logging.getLogger("geoshare.api")
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
PROBLEM_JSON = "application/problem+json"

_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
           405: "Method not allowed", 406: "Not acceptable", 409: "Conflict", 413: "Content too large",
           415: "Unsupported media type", 422: "Unprocessable content", 429: "Too many requests"}

# for the OpenAPI document: every error response is a problem document
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ProblemDetail, "content": {PROBLEM_JSON: {}}, "description": _TITLES[code]}
    for code in (401, 404, 413, 422, 429)
}
# and for the routes that take a body: what a body that is not JSON gets
BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ProblemDetail, "content": {PROBLEM_JSON: {}},
          "description": "The body is not JSON (a syntax error, bad UTF-8, NaN or Infinity literals)"},
    415: {"model": ProblemDetail, "content": {PROBLEM_JSON: {}},
          "description": "The body is not declared as application/json"},
}


def problem_response(doc: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(doc, status_code=int(doc["status"]), headers=headers, media_type=PROBLEM_JSON)


async def send_problem(send: Any, doc: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer with a problem document from pure ASGI middleware (before FastAPI sees the request)."""
    data = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": int(doc["status"]),
                "headers": [(b"content-type", PROBLEM_JSON.encode()),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def _validation_errors(errors: list[Any], prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append({"loc": [*prefix, *(str(x) for x in e.get("loc", ()))],
                    "msg": str(e.get("msg", "")).removeprefix("Value error, "), "type": e.get("type")})
    return out


def validation_problem(exc: ValidationError, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """The 422 document of a pydantic error; ``loc`` starts with ``prefix`` (``body`` for a body)."""
    return problem(422, "validation-error", "The request is invalid",
                   f"{describe_validation(exc)}; fix these fields and send it again",
                   errors=_validation_errors(list(exc.errors()), prefix))


def allowed_methods(app: Any, path: str) -> list[str]:
    """Every method some route serves at ``path`` (a 405's ``Allow`` names them all).

    Asks each route whether it fully matches the path under each method: Starlette's own Allow
    names only the one route that matched the path, and GET and DELETE of a job are two routes.
    """
    allowed: set[str] = set()
    for method in _METHODS:
        scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "app": app}
        for route in app.router.routes:
            if route.matches(scope)[0] is Match.FULL:
                allowed |= {"GET", "HEAD"} if isinstance(route, Mount) else {method}  # static files
    return sorted(allowed)


def _slug(status: int) -> str:
    return _TITLES.get(status, "error").lower().replace(" ", "-")


def install(app: FastAPI) -> None:
    """Register the handlers on the app."""

    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response({**exc.doc, "instance": request.url.path}, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        detail = describe_validation(exc)  # type: ignore[arg-type]  (same .errors() interface)
        doc = problem(422, "validation-error", "The request is invalid",
                      f"{detail}; fix these fields and send it again", errors=_validation_errors(errors),
                      instance=request.url.path)
        return problem_response(doc)

    @app.exception_handler(ValidationError)
    async def _model_invalid(request: Request, exc: ValidationError) -> JSONResponse:
        return problem_response({**validation_problem(exc), "instance": request.url.path})

    @app.exception_handler(GeoShareError)
    async def _solver_error(request: Request, exc: GeoShareError) -> JSONResponse:
        return problem_response({**from_solver_error(exc), "instance": request.url.path})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else None
        if status == 404 and detail == "Not Found":
            detail = f"no resource at {request.url.path}; see /docs for the endpoints"
        headers = dict(exc.headers or {})
        if status == 405:
            # Starlette's Allow names one route's methods; GET and DELETE of a job are two routes
            allow = allowed_methods(request.app, request.url.path)
            headers["Allow"] = ", ".join(allow)
            detail = f"{request.method} is not allowed on {request.url.path}; use {', '.join(allow)}"
        doc = problem(status, _slug(status), _TITLES.get(status, "Error"), detail, instance=request.url.path)
        return problem_response(doc, headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        doc = problem(500, "internal-error", "Internal server error",
                      "the server failed unexpectedly; the error is logged, please report it",
                      instance=request.url.path)
        return problem_response(doc)
