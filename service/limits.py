"""What is refused before the work: a missing API key, an oversize body, a problem over the caps.

The key is checked and the body size capped in pure ASGI, before any byte of the body is read or
parsed. Request bodies (problems, and the analysis POSTs' bodies, a worker's completion carrying a
whole problem among them) are parsed off the event loop: small ones in a thread, large ones in a
process of their own, because ``json.loads`` and pydantic hold the GIL for the whole call (a
7.9 MB body held it for 0.9 s, and every other request, ``/healthz`` included, waited).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import multiprocessing as mp
import os
import re
import secrets
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple, TypeVar

from fastapi import Request
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from service.errors import send_problem, validation_problem
from service.problems import ApiProblem, problem

# bodies up to this size parse in a thread: json.loads holds the GIL for about 1 ms per 8 KB here
INLINE_PARSE_BYTES = 64 * 1024
_JSON_TYPES = ("application/json", "application/problem+json")
ModelT = TypeVar("ModelT", bound=BaseModel)


def bearer_ok(authorization: str | None, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <key>`` (compared in constant time)."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def unauthorized() -> dict[str, Any]:
    return problem(401, "unauthorized", "Unauthorized",
                   "send 'Authorization: Bearer <key>' with the key this server was started with "
                   "(GEOSHARE_API_KEY)")


class AuthMiddleware:
    """Pure ASGI: 401 for ``/v1`` without the key, before the body is read.

    The rest of the body is left unread; uvicorn discards it and keeps the connection, so the
    client gets its 401 instead of a reset while it is still sending.
    """

    def __init__(self, app: Any, api_key: str | None, prefix: str = "/v1/") -> None:
        self.app = app
        self.api_key = api_key
        self.prefix = prefix

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or self.api_key is None
                or not (scope["path"] + "/").startswith(self.prefix)):
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"authorization")
        if bearer_ok(raw.decode("latin-1") if raw is not None else None, self.api_key):
            await self.app(scope, receive, send)
            return
        await send_problem(send, {**unauthorized(), "instance": scope["path"]},
                           [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """Pure ASGI: 413 problem+json when the body (declared or streamed) exceeds ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, int(declared))
            return
        # read the body up to the cap, then replay it to the app
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, None)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict[str, Any], send: Any, declared: int | None) -> None:
        got = f"{declared} bytes" if declared is not None else "more"
        doc = problem(413, "body-too-large", "Content too large",
                      f"the request body has {got}; this server takes at most {self.max_bytes} bytes "
                      "(GEOSHARE_MAX_BODY_BYTES); send a smaller problem (fewer layers) or raise the cap",
                      instance=scope.get("path"))
        # the rest of an oversize body is not worth reading: close once the answer is out
        await send_problem(send, doc, [(b"connection", b"close")])


# --- problem bodies ---------------------------------------------------------------------------


_WS = re.compile(r"[ \t\n\r]*")
_scan_value = json.JSONDecoder().scan_once


def leading_layer_count(body: bytes) -> int | None:
    """Entries of the top-level ``layers`` array, parsing only the members before it and itself.

    A pre-check: bodies list ``layers`` before the cost matrix, so a 1,400-layer body is refused
    after 6 ms of scanning instead of a 1 s parse. None when unsure (the full parse decides).
    """
    try:
        text = body.decode()
        i = _WS.match(text, 0).end()  # type: ignore[union-attr]
        if text[i:i + 1] != "{":
            return None
        i += 1
        while True:
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i:i + 1] != '"':
                return None
            key, i = json.decoder.scanstring(text, i + 1)
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i:i + 1] != ":":
                return None
            value, i = _scan_value(text, _WS.match(text, i + 1).end())  # type: ignore[union-attr]
            if key == "layers":
                return len(value) if isinstance(value, list) else None
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i:i + 1] != ",":
                return None
            i += 1
    except (ValueError, StopIteration, RecursionError):  # bad UTF-8 or JSON: the full parse says so
        return None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON; send finite numbers (null forbids a pair)")


def caps_problem(n_layers: int, time_limit_s: float | None, max_layers: int,
                 max_time_limit_s: float) -> dict[str, Any] | None:
    """The problem document for a problem over this server's caps, None when within them."""
    if n_layers > max_layers:
        return problem(413, "too-many-layers", "Content too large",
                       f"layers has {n_layers} entries; this server solves at most {max_layers} "
                       "(GEOSHARE_MAX_LAYERS); split the problem by family or raise the cap",
                       field="layers", limit=max_layers)
    if time_limit_s is not None and time_limit_s > max_time_limit_s:
        return problem(422, "time-limit-too-long", "Time limit over the cap",
                       f"options.time_limit_s={time_limit_s:g} exceeds this server's cap of "
                       f"{max_time_limit_s:g} s (GEOSHARE_MAX_TIME_LIMIT_S); lower it",
                       field="options.time_limit_s", limit=max_time_limit_s)
    return None


def _loads(body: bytes, what: str) -> tuple[bool, Any]:
    """``(True, data)``, or ``(False, the 400 document)`` for a body that is not JSON."""
    try:
        return True, json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, NaN, 5000-digit ints
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        return False, problem(400, "unparseable-body", "Bad request",
                              f"the body is not JSON{where}: {str(exc)[:200]}; send {what} as application/json")


def parse_problem(body: bytes, max_layers: int, max_time_limit_s: float) -> tuple[str, Any]:
    """Body -> ``("ok", canonical JSON)`` or ``("problem", doc)``; runs in a thread or a process.

    The layer count is checked on the parsed JSON, before pydantic builds a model of it. Only
    strings and plain dicts come back, so nothing heavy crosses the process boundary.
    """
    from service.models import dumps
    from solver import SharingProblem

    ok, data = _loads(body, "a SharingProblem")
    if not ok:
        return "problem", data
    if isinstance(data, dict) and isinstance(data.get("layers"), list):
        doc = caps_problem(len(data["layers"]), None, max_layers, max_time_limit_s)
        if doc is not None:
            return "problem", doc
    try:
        parsed = SharingProblem.model_validate(data)
    except ValidationError as exc:
        return "problem", validation_problem(exc, ("body",))
    doc = caps_problem(len(parsed.layers), parsed.options.time_limit_s, max_layers, max_time_limit_s)
    if doc is not None:
        return "problem", doc
    return "ok", dumps(parsed)


def parse_model(body: bytes, model: type[BaseModel]) -> tuple[str, Any]:
    """Body -> ``("ok", model instance)`` or ``("problem", doc)``, for the small request models."""
    ok, data = _loads(body, f"a {model.__name__}")
    if not ok:
        return "problem", data
    try:
        return "ok", model.model_validate(data)
    except ValidationError as exc:
        return "problem", validation_problem(exc, ("body",))


def request_hash(request: str) -> str:
    """The hash stored with a request's canonical JSON (Idempotency-Key checks)."""
    return hashlib.sha256(request.encode()).hexdigest()


class ParsedCompletion(NamedTuple):
    """A worker's completion as the store takes it: canonical JSON strings, nothing to re-parse."""

    costs: str  # the SharingProblem the worker measured
    request: str  # the plan problem solved from it: the analysis's ratio and time limit
    request_hash: str
    report: str | None  # a compress job's CompressReport; None for a bare SharingProblem


@functools.cache
def _completion_adapter() -> TypeAdapter[Any]:
    from service.compress import Completion

    return TypeAdapter(Completion)


def parse_completion(body: bytes, ratio: float, time_limit_s: float, max_layers: int,
                     max_time_limit_s: float) -> tuple[str, Any]:
    """A completion body -> ``("ok", ParsedCompletion)`` or ``("problem", doc)``.

    All of it runs here, in a thread or the parse process, never on the event loop (a near-8 MB
    completion parsed by FastAPI held the loop about a second): the parse, the layer cap before pydantic, the plan problem with the
    analysis's ``ratio`` and ``time_limit_s``, and its canonical JSON and hash.
    """
    from service.compress import CompressResult, _completion_kind
    from service.models import dumps
    from solver import SharingProblem

    ok, data = _loads(body, "the SharingProblem (or {problem, report})")
    if not ok:
        return "problem", data
    costs_node = data.get("problem") if _completion_kind(data) == "CompressResult" else data
    if isinstance(costs_node, dict) and isinstance(costs_node.get("layers"), list):
        doc = caps_problem(len(costs_node["layers"]), None, max_layers, max_time_limit_s)
        if doc is not None:
            return "problem", doc
    try:
        parsed = _completion_adapter().validate_python(data)
    except ValidationError as exc:
        return "problem", validation_problem(exc, ("body",))
    costs, report = (parsed.problem, parsed.report) if isinstance(parsed, CompressResult) else (parsed, None)
    plan_data = costs.model_dump(mode="json")
    plan_data["constraints"]["max_params_ratio"] = ratio
    plan_data["options"]["time_limit_s"] = time_limit_s
    try:
        plan_problem = SharingProblem.model_validate(plan_data)
    except ValidationError as exc:
        return "problem", validation_problem(exc)
    doc = caps_problem(len(plan_problem.layers), plan_problem.options.time_limit_s, max_layers, max_time_limit_s)
    if doc is not None:
        return "problem", doc
    request = dumps(plan_problem)
    return "ok", ParsedCompletion(dumps(costs), request, request_hash(request),
                                  report.model_dump_json() if report is not None else None)


def _init_parse_process(parent: int) -> None:
    """Imports paid once; exits by itself when the server dies (a SIGKILL leaves no orphan)."""
    import threading

    import service.compress  # noqa: F401
    import service.models  # noqa: F401
    import solver  # noqa: F401
    from service.solve_process import _watch_parent

    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


class ProblemParser:
    """Parses request bodies off the event loop: a thread when small, its own process when large.

    Every JSON body the service takes goes through here (plans, frontiers, the analysis POSTs), so
    they all answer alike: 415 for a non-JSON content type, 400 for a body that is not JSON, 422
    naming the field for an invalid one.
    """

    def __init__(self, max_layers: int, max_time_limit_s: float) -> None:
        self.max_layers = max_layers
        self.max_time_limit_s = max_time_limit_s
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        self._pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_init_parse_process,
                                         initargs=(os.getpid(),))
        self._pool.submit(int)  # spawn it now: the first large body should not pay the imports

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def problem_json(self, request: Request) -> str:
        """The request's SharingProblem as canonical JSON, checked against the caps.

        Raises:
            ApiProblem: 415 for a non-JSON content type, 400 for a body that is not JSON, 413 for
                too many layers, 422 for an invalid problem or a time limit over the cap.
        """
        return await self._parse(request, "the SharingProblem", parse_problem, self.max_layers,
                                 self.max_time_limit_s, layers_first=True)

    async def model(self, request: Request, model: type[ModelT]) -> ModelT:
        """The request's body as ``model`` (a small request such as an AnalysisSpec).

        Raises:
            ApiProblem: 415 for a non-JSON content type, 400 for a body that is not JSON, 422 for
                an invalid one (``errors[].loc`` names the field).
        """
        return await self._parse(request, f"the {model.__name__}", parse_model, model)

    async def completion(self, request: Request, ratio: float, time_limit_s: float) -> ParsedCompletion:
        """A worker's completion, with the plan problem solved from it (see ``parse_completion``).

        Raises:
            ApiProblem: 415, 400, 413 for too many layers, 422 for an invalid completion.
        """
        return await self._parse(request, "the SharingProblem (or {problem, report})", parse_completion, ratio,
                                 time_limit_s, self.max_layers, self.max_time_limit_s)

    async def _parse(self, request: Request, what: str, parse: Callable[..., tuple[str, Any]], *args: Any,
                     layers_first: bool = False) -> Any:
        """Runs ``parse(body, *args)`` in a thread when the body is small, else in the parse process.

        ``layers_first``: the body is a SharingProblem, so a large one over the layer cap is refused
        from its leading members before the parse (``leading_layer_count``).
        """
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
            raise ApiProblem(415, "unsupported-media-type", "Unsupported media type",
                             f"the body is {ctype!r}; send {what} as application/json")
        body = await request.body()
        if len(body) <= INLINE_PARSE_BYTES or self._pool is None:
            status, payload = await run_in_threadpool(parse, body, *args)
        elif layers_first and (doc := caps_problem(await run_in_threadpool(leading_layer_count, body) or 0, None,
                                                   self.max_layers, self.max_time_limit_s)) is not None:
            raise ApiProblem.of(doc)  # over the layer cap: not worth the parse process's time
        else:
            try:
                status, payload = await asyncio.wrap_future(self._pool.submit(parse, body, *args))
            except BrokenProcessPool as exc:  # the parse process died (killed): start a fresh one
                self.stop()
                self.start()
                raise ApiProblem(503, "parser-restarted", "Service unavailable",
                                 "the process parsing large bodies stopped; send the request again",
                                 headers={"Retry-After": "1"}) from exc
        if status != "ok":
            raise ApiProblem.of(payload)
        return payload
