"""The one place exceptions become HTTP answers: RFC 9457 problem+json for every error."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.problems import ApiProblem, ProblemDetail, from_solver_error, problem
from solver.errors import GeoShareError
from solver.io import describe_validation

log = logging.getLogger("geoshare.api")
PROBLEM_JSON = "application/problem+json"

_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
           405: "Method not allowed", 406: "Not acceptable", 409: "Conflict", 413: "Content too large",
           415: "Unsupported media type", 422: "Unprocessable content", 429: "Too many requests"}

# for the OpenAPI document: every error response is a problem document
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ProblemDetail, "content": {PROBLEM_JSON: {}}, "description": _TITLES[code]}
    for code in (401, 404, 413, 422, 429)
}


def problem_response(doc: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(doc, status_code=int(doc["status"]), headers=headers, media_type=PROBLEM_JSON)


def _validation_errors(errors: list[Any]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append({"loc": [str(x) for x in e.get("loc", ())],
                    "msg": str(e.get("msg", "")).removeprefix("Value error, "), "type": e.get("type")})
    return out


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
        doc = problem(422, "validation-error", "The request is invalid", describe_validation(exc),
                      errors=_validation_errors(list(exc.errors())), instance=request.url.path)
        return problem_response(doc)

    @app.exception_handler(GeoShareError)
    async def _solver_error(request: Request, exc: GeoShareError) -> JSONResponse:
        return problem_response({**from_solver_error(exc), "instance": request.url.path})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else None
        if status == 404 and detail == "Not Found":
            detail = f"no resource at {request.url.path}; see /docs for the endpoints"
        if status == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs"
        doc = problem(status, _slug(status), _TITLES.get(status, "Error"), detail, instance=request.url.path)
        return problem_response(doc, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        doc = problem(500, "internal-error", "Internal server error",
                      "the server failed unexpectedly; the error is logged, please report it",
                      instance=request.url.path)
        return problem_response(doc)
