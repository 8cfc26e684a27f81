"""Plans and frontiers over real HTTP: answers, polling, cancelling, caps, problem+json errors."""

from __future__ import annotations

import json
import threading
import time

import httpx
from svc_cases import long_problem, post_problem

from solver import solve

PROBLEM_JSON = "application/problem+json"


def _is_problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON)
    doc = r.json()
    assert doc["status"] == status and doc["title"] and doc["type"]
    return doc


def test_health_ready_and_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "solver": "ok"}
    spec = client.get("/openapi.json").json()
    assert {"/v1/plans", "/v1/plans/{job_id}/events", "/v1/frontiers", "/v1/analyses/claim"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_answers_in_the_request_when_quick(client, make_problem):
    problem = make_problem((4, 5, 3), seed=3)
    r = post_problem(client, "/v1/plans", problem, wait=20)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded"
    assert r.headers["content-location"] == f"/v1/plans/{job['id']}"
    local = solve(problem)
    assert abs(job["plan"]["objective"] - local.objective) <= 1e-9
    assert job["plan"]["status"] == "optimal"
    assert job["plan"]["params"]["ratio"] <= 0.5


def test_queues_then_polls(client, make_problem):
    r = post_problem(client, "/v1/plans", make_problem(seed=4))
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    assert r.json()["state"] in ("queued", "running")
    done = client.get(location, params={"wait": 20}).json()
    assert done["state"] == "succeeded" and done["plan"]["coloring"]


def test_idempotency_key_returns_the_same_job(client, make_problem):
    problem = make_problem(seed=5)
    first = post_problem(client, "/v1/plans", problem, **{"Idempotency-Key": "retry-5"}).json()
    again = post_problem(client, "/v1/plans", problem, wait=10, **{"Idempotency-Key": "retry-5"}).json()
    assert again["id"] == first["id"]
    other = post_problem(client, "/v1/plans", make_problem(seed=6), **{"Idempotency-Key": "retry-5"})
    doc = _is_problem(other, 422)
    assert doc["job"] == first["id"] and "Idempotency-Key" in doc["detail"]


def test_infeasible_budget_is_422_with_least_ratio(client, make_problem):
    r = post_problem(client, "/v1/plans", make_problem(ratio=0.05), wait=20)
    doc = _is_problem(r, 422)
    assert doc["type"].endswith("budget-infeasible")
    assert 0.05 < doc["least_ratio"] <= 1 and "raise the budget" in doc["detail"]
    job = client.get(r.headers["location"]).json()
    assert job["state"] == "failed" and job["error"]["least_ratio"] == doc["least_ratio"]


def test_validation_errors_are_problem_json(client, make_problem):
    bad = json.loads(make_problem().model_dump_json())
    bad["layers"][0]["params"] = -1
    bad["typo"] = 1
    doc = _is_problem(post_problem(client, "/v1/plans", bad), 422)
    assert "layers.0.params" in doc["detail"] and "typo" in doc["detail"]
    asym = json.loads(make_problem().model_dump_json())
    asym["costs"]["matrix"][0][1] = 7.0
    doc = _is_problem(post_problem(client, "/v1/plans", asym), 422)
    assert "symmetric" in doc["detail"]
    doc = _is_problem(client.post("/v1/plans", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert "not JSON (line 1, column 2)" in doc["detail"]
    doc = _is_problem(post_problem(client, "/v1/plans", make_problem(), wait=-1), 422)
    assert "wait" in doc["detail"]


def test_caps_time_layers_and_body(client, make_problem):
    doc = _is_problem(post_problem(client, "/v1/plans", make_problem(time_limit_s=600)), 422)
    assert "options.time_limit_s" in doc["detail"] and doc["limit"] == 30
    doc = _is_problem(post_problem(client, "/v1/plans", make_problem((40, 30))), 413)
    assert doc["field"] == "layers" and "64" in doc["detail"]
    doc = _is_problem(client.post("/v1/plans", content=b" " * 300_000, headers={"Content-Type": "application/json"}), 413)
    assert "GEOSHARE_MAX_BODY_BYTES" in doc["detail"]


def test_not_found_and_method_are_problem_json(client):
    doc = _is_problem(client.get("/v1/plans/0123abc"), 404)
    assert "0123abc" in doc["detail"]
    _is_problem(client.get("/v1/nothing-here"), 404)
    r = client.put("/v1/plans")
    _is_problem(r, 405)
    assert r.headers["allow"] == "POST"
    r = client.post("/v1/plans/0123abc")
    _is_problem(r, 405)
    assert r.headers["allow"] == "DELETE, GET"
    _is_problem(client.delete("/v1/analyses/nope"), 404)


def test_cancel_kills_a_running_solve(client, make_problem):
    r = post_problem(client, "/v1/plans", long_problem(time_limit_s=25))
    location = r.headers["location"]
    deadline = time.monotonic() + 15
    while client.get(location).json()["state"] != "running":
        assert time.monotonic() < deadline, "the solve never started"
        time.sleep(0.05)
    t0 = time.monotonic()
    cancelled = client.delete(location)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert time.monotonic() - t0 < 2.0
    time.sleep(0.5)
    assert client.get(location).json()["state"] == "cancelled"  # a late result never overwrites it
    _is_problem(client.delete(f"/v1/plans/{post_problem(client, '/v1/plans', make_problem(), wait=20).json()['id']}"), 409)
    # the slot got a fresh process: quick solves still go through
    assert post_problem(client, "/v1/plans", make_problem(seed=8), wait=20).json()["state"] == "succeeded"


def _read_events(client, url: str, timeout: float = 30) -> list[tuple[str | None, dict]]:
    """(event, data) pairs of a server-sent event stream, read to its end."""
    events: list[tuple[str | None, dict]] = []
    with client.stream("GET", url, timeout=timeout) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in s.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line[5:])))
    return events


def test_events_stream_state_and_result(client, make_problem):
    r = post_problem(client, "/v1/plans", make_problem((6, 6), seed=9))
    events = _read_events(client, r.headers["location"] + "/events")
    assert events[-2] == ("state", {"id": r.json()["id"], "state": "succeeded"})
    kind, result = events[-1]
    assert kind == "result" and result["status"] == "optimal" and result["gap"] == 0.0
    assert result["objective"] == result["bound"]


def test_frontier(client, make_problem):
    r = post_problem(client, "/v1/frontiers", make_problem((4, 4), ratio=None), wait=20)
    assert r.status_code == 200, r.text
    front = r.json()["frontier"]
    assert front["original"] == 4 * 64 + 4 * 128
    ratios = [p["ratio"] for p in front["points"]]
    assert ratios == sorted(ratios) and ratios[-1] == 1.0
    assert client.get(r.headers["content-location"]).json()["state"] == "succeeded"


def test_metrics_count_requests_and_solves(client, make_problem):
    post_problem(client, "/v1/plans", make_problem(seed=10), wait=20)
    text = client.get("/metrics").text
    assert 'geoshare_http_requests_total{method="POST",route="/v1/plans",status="200"}' in text
    assert "geoshare_solve_seconds_bucket" in text and 'geoshare_queue_depth{kind="plan"}' in text


def test_saturated_server_queues_then_runs_everything(client, make_problem):
    """More long-ish solves than slots: the extra ones wait in the queue, none is lost."""
    ids = [post_problem(client, "/v1/plans", make_problem((30,), seed=s, ratio=0.4, time_limit_s=0.5)).json()["id"]
           for s in range(4)]
    states = [client.get(f"/v1/plans/{i}").json()["state"] for i in ids]
    assert "queued" in states
    done = [client.get(f"/v1/plans/{i}", params={"wait": 30}).json()["state"] for i in ids]
    assert done == ["succeeded"] * 4


def test_concurrent_waiters_all_get_answers(client, make_problem):
    out: list[int] = []

    def one(seed: int) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            out.append(post_problem(c, "/v1/plans", make_problem(seed=100 + seed), wait=20).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [200] * 8


def test_events_stream_progress_of_a_long_solve(client):
    from svc_cases import long_problem

    r = post_problem(client, "/v1/plans", long_problem(time_limit_s=4.0))
    events = _read_events(client, r.headers["location"] + "/events", timeout=60)
    progress = [data for kind, data in events if kind == "progress"]
    assert progress, events
    # incumbents only go down, bounds only go up, and the last one is the plan's
    assert all(a["objective"] >= b["objective"] - 1e-12 for a, b in zip(progress, progress[1:], strict=False))
    assert all(a["bound"] <= b["bound"] + 1e-12 for a, b in zip(progress, progress[1:], strict=False))
    kind, result = events[-1]
    assert kind == "result"
    assert result["objective"] <= progress[-1]["objective"] + 1e-9
