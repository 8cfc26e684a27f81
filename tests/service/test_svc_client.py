"""The Python client: against the real server, and its retry rules against a scripted transport."""

from __future__ import annotations

import httpx
import pytest
from svc_cases import long_problem

from service.client import ApiError, GeoShareClient
from solver import solve


@pytest.fixture
def api(server):
    with GeoShareClient(server.url, timeout=30) as c:
        yield c


def test_solve_returns_the_plan(api, make_problem):
    problem = make_problem((5, 4), seed=21)
    plan = api.solve(problem, timeout=30)
    assert plan.objective == pytest.approx(solve(problem).objective, abs=1e-12)


def test_solve_raises_with_the_problem_document(api, make_problem):
    with pytest.raises(ApiError) as err:
        api.solve(make_problem(ratio=0.05), timeout=30)
    assert err.value.status == 422 and err.value.problem["least_ratio"] > 0.05
    assert "infeasible" in str(err.value)


def test_events_and_cancel(api, make_problem):
    job = api.submit_plan(make_problem(seed=22))
    events = list(api.events(job["id"], timeout=30))
    assert events[-1][0] == "result" and events[-1][1]["status"] == "optimal"
    long = api.submit_plan(long_problem(time_limit_s=25))
    assert api.cancel_plan(long["id"])["state"] == "cancelled"
    with pytest.raises(ApiError) as err:
        api.wait_plan(long["id"], timeout=10)
    assert err.value.status == 409


def test_frontier_and_timeout(api, make_problem):
    job = api.submit_frontier(make_problem((4,), ratio=None), wait=20)
    assert job["state"] == "succeeded" and job["frontier"]["points"]
    long = api.submit_plan(long_problem(time_limit_s=25))
    with pytest.raises(TimeoutError):
        api.wait_plan(long["id"], timeout=0.3)
    api.cancel_plan(long["id"])


def test_retries_transient_answers_then_gives_up():
    calls: list[str] = []
    answers = iter([httpx.Response(503), httpx.Response(429, headers={"Retry-After": "0"}),
                    httpx.Response(200, json={"id": "x", "state": "queued"})])

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("Idempotency-Key", ""))
        return next(answers)

    with GeoShareClient("http://127.0.0.1:9", transport=httpx.MockTransport(handler), backoff_s=0.0) as c:
        assert c.get_plan("x")["id"] == "x"
    assert len(calls) == 3

    def always_down(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("Idempotency-Key", ""))
        raise httpx.ConnectError("refused", request=request)

    calls.clear()
    with GeoShareClient("http://127.0.0.1:9", transport=httpx.MockTransport(always_down), backoff_s=0.0,
                        retries=2) as c, pytest.raises(httpx.ConnectError):
        c.submit_plan({"layers": []})
    assert len(calls) == 3 and len(set(calls)) == 1  # one Idempotency-Key across the retries
