"""Python client of the API for pipelines and the GPU worker (httpx, retries, timeouts).

    with GeoShareClient("http://127.0.0.1:8000") as api:
        plan = api.solve(problem, timeout=60)
        report = api.compress({"model": "minilm", "ratio": 0.8, "compress": {"out": "/models/out/m"}})

Retries cover connection errors and 429/502/503/504 (honouring Retry-After). Submissions carry
an Idempotency-Key, so a retried POST never makes a second job.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx

from service.compress import CompressReport
from service.states import TERMINAL, JobState
from solver import SharingPlan, SharingProblem
from solver.errors import GeoShareError

_RETRY_STATUS = (429, 502, 503, 504)
_LONG_POLL_S = 30.0


class ApiError(GeoShareError):
    """The API answered with a problem document (``.problem``) or the job failed."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(problem.get("detail") or problem.get("title") or f"HTTP {status}")


class GeoShareClient:
    """A thin, retrying wrapper over the HTTP API; job endpoints return the JSON dicts."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  transport=transport)
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GeoShareClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, retry: bool = True, timeout: float | None = None,
                 **kwargs: Any) -> httpx.Response:
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                r = self._http.request(method, path, timeout=timeout or self.timeout, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if r.status_code in _RETRY_STATUS and not last:
                time.sleep(_retry_after(r) or self.backoff_s * 2**attempt)
                continue
            return r
        raise AssertionError("unreachable")

    @staticmethod
    def _json(r: httpx.Response) -> dict[str, Any]:
        if r.status_code >= 400:
            try:
                doc = r.json()
            except ValueError:
                doc = {"title": r.reason_phrase, "status": r.status_code, "detail": r.text[:500]}
            raise ApiError(r.status_code, doc)
        return r.json()

    # --- plans -------------------------------------------------------------------------------

    def submit_plan(self, problem: SharingProblem | dict[str, Any], *, wait: float = 0.0,
                    idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/plans: the job (state ``succeeded`` with ``plan`` when it finished within wait).

        Raises:
            ApiError: invalid or infeasible problem (422, ``least_ratio`` for budgets), caps, auth.
        """
        return self._submit("/v1/plans", problem, wait, idempotency_key)

    def submit_frontier(self, problem: SharingProblem | dict[str, Any], *, wait: float = 0.0,
                        idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/frontiers: the job (with ``frontier`` when it finished within wait)."""
        return self._submit("/v1/frontiers", problem, wait, idempotency_key)

    def _submit(self, path: str, problem: SharingProblem | dict[str, Any], wait: float,
                idempotency_key: str | None) -> dict[str, Any]:
        body = problem.model_dump_json() if isinstance(problem, SharingProblem) else json.dumps(problem)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex, "Content-Type": "application/json"}
        r = self._request("POST", path, content=body, headers=headers, params={"wait": wait},
                          timeout=self.timeout + wait)
        return self._json(r)

    def get_plan(self, job_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        r = self._request("GET", f"/v1/plans/{job_id}", params={"wait": wait}, timeout=self.timeout + wait)
        return self._json(r)

    def cancel_plan(self, job_id: str) -> dict[str, Any]:
        return self._json(self._request("DELETE", f"/v1/plans/{job_id}"))

    def wait_plan(self, job_id: str, *, timeout: float | None = None) -> SharingPlan:
        """Long-poll until the job ends; the plan, or ApiError with the job's problem document."""
        job = self._wait("/v1/plans", job_id, timeout)
        return _plan_or_raise(job)

    def solve(self, problem: SharingProblem | dict[str, Any], *, timeout: float | None = None) -> SharingPlan:
        """Submit and wait: the plan, as ``solver.solve`` would return it, but solved by the server.

        Raises:
            ApiError: the problem was refused or the solve failed (the problem document says why).
            TimeoutError: no result within ``timeout`` seconds (the job keeps running).
        """
        first = min(timeout, _LONG_POLL_S) if timeout is not None else _LONG_POLL_S
        job = self.submit_plan(problem, wait=first)
        if job["state"] in TERMINAL:
            return _plan_or_raise(job)
        left = None if timeout is None else max(0.0, timeout - first)
        return self.wait_plan(job["id"], timeout=left)

    def events(self, job_id: str, *, timeout: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Stream (event, data) pairs of a plan job until it ends (``state``, then ``result``/``error``)."""
        with self._http.stream("GET", f"/v1/plans/{job_id}/events",
                               timeout=httpx.Timeout(self.timeout, read=timeout)) as r:
            if r.status_code >= 400:
                r.read()
                self._json(r)
            event, data = "message", []
            for line in r.iter_lines():
                if line.startswith(":"):
                    continue
                if not line:
                    if data:
                        yield event, json.loads("\n".join(data))
                    event, data = "message", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())

    # --- frontiers ---------------------------------------------------------------------------

    def get_frontier(self, job_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        r = self._request("GET", f"/v1/frontiers/{job_id}", params={"wait": wait}, timeout=self.timeout + wait)
        return self._json(r)

    # --- analyses (pipeline side) ------------------------------------------------------------

    def submit_analysis(self, spec: Any, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/analyses with an AnalysisSpec (or its dict): the queued job."""
        body = spec.model_dump_json() if hasattr(spec, "model_dump_json") else json.dumps(spec)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex, "Content-Type": "application/json"}
        return self._json(self._request("POST", "/v1/analyses", content=body, headers=headers))

    def get_analysis(self, job_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        r = self._request("GET", f"/v1/analyses/{job_id}", params={"wait": wait}, timeout=self.timeout + wait)
        return self._json(r)

    def wait_analysis(self, job_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Long-poll until the analysis and its plan are done; the final job (any end state)."""
        return self._wait("/v1/analyses", job_id, timeout)

    def cancel_analysis(self, job_id: str) -> dict[str, Any]:
        return self._json(self._request("DELETE", f"/v1/analyses/{job_id}"))

    def compress(self, spec: Any, *, timeout: float | None = None,
                 idempotency_key: str | None = None) -> CompressReport:
        """Submit a compress job (an AnalysisSpec or dict with ``compress``) and wait for its
        report: what ``hessian_worker.compress`` returns in one Python call, plus ``out`` (where
        the worker saved the model); ``report.plan`` is the plan tied into it.

        Raises:
            ValueError: the spec has no ``compress`` object (use submit_analysis for costs only).
            ApiError: the spec was refused (422) or the job failed or was cancelled (its problem
                document says why, e.g. a non-empty ``out`` without ``overwrite``).
            TimeoutError: no result within ``timeout`` seconds (the job keeps running).
        """
        data = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec)
        if not data.get("compress"):
            raise ValueError("spec has no `compress` object; add one (at least its `out`) or use "
                             "submit_analysis for a costs-only analysis")
        job = self.submit_analysis(data, idempotency_key=idempotency_key)
        job = self.wait_analysis(job["id"], timeout=timeout)
        if job["state"] != JobState.succeeded:
            _plan_or_raise(job)
        return CompressReport.model_validate(job["report"])

    # --- analyses (worker side) --------------------------------------------------------------

    def claim(self, worker: str, lease_s: float | None = None) -> dict[str, Any] | None:
        """The next analysis under a lease, or None when the queue is empty."""
        body: dict[str, Any] = {"worker": worker}
        if lease_s is not None:
            body["lease_s"] = lease_s
        r = self._request("POST", "/v1/analyses/claim", json=body)
        if r.status_code == 204:
            return None
        return self._json(r)

    def heartbeat(self, job_id: str, lease: str, lease_s: float | None = None) -> bool:
        """Extend the lease; False when it was lost (cancelled or expired): stop working on it."""
        params: dict[str, Any] = {"lease": lease}
        if lease_s is not None:
            params["lease_s"] = lease_s
        r = self._request("POST", f"/v1/analyses/{job_id}/heartbeat", params=params)
        if r.status_code == 409:
            return False
        self._json(r)
        return True

    def complete(self, job_id: str, lease: str, problem: SharingProblem, *,
                 report: dict[str, Any] | None = None) -> dict[str, Any]:
        """Hand in the costs (and a compress job's report); the server solves and attaches the plan."""
        if report is None:
            body = problem.model_dump_json()
        else:
            body = json.dumps({"problem": problem.model_dump(mode="json"), "report": report})
        r = self._request("POST", f"/v1/analyses/{job_id}/complete", params={"lease": lease},
                          content=body, headers={"Content-Type": "application/json"})
        return self._json(r)

    def fail(self, job_id: str, lease: str, error: str, *, retry: bool = False) -> dict[str, Any]:
        r = self._request("POST", f"/v1/analyses/{job_id}/fail", params={"lease": lease},
                          json={"error": error[:10_000], "retry": retry})
        return self._json(r)

    # --- shared ------------------------------------------------------------------------------

    def _wait(self, base: str, job_id: str, timeout: float | None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _LONG_POLL_S if deadline is None else min(_LONG_POLL_S, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s; it keeps running")
            r = self._request("GET", f"{base}/{job_id}", params={"wait": left}, timeout=self.timeout + left)
            job = self._json(r)
            if job["state"] in TERMINAL:
                return job


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("Retry-After")
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None


def _plan_or_raise(job: dict[str, Any]) -> SharingPlan:
    if job["state"] == JobState.succeeded:
        return SharingPlan.model_validate(job["plan"])
    if job["state"] == JobState.failed:
        err = job.get("error") or {"title": "Failed", "status": 500}
        raise ApiError(int(err.get("status", 500)), {**err, "job": job["id"]})
    raise ApiError(409, {"title": "Cancelled", "status": 409, "detail": f"job {job['id']} was cancelled",
                         "job": job["id"]})
