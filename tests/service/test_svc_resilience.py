"""Restarts, load and auth, each on a server of its own."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter

import httpx
import pytest
from svc_cases import long_problem, post_problem, small_problem


def _solve_children(server_pid: int) -> list[int]:
    """Pids of processes whose parent is the server (its solve processes)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == server_pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_restart_after_sigkill_finishes_the_running_job(start_server, tmp_path):
    db = tmp_path / "restart.db"
    first = start_server(db, GEOSHARE_CONCURRENCY=1)
    with httpx.Client(base_url=first.url, timeout=30) as c:
        running = post_problem(c, "/v1/plans", long_problem(time_limit_s=2.5)).json()["id"]
        queued = post_problem(c, "/v1/plans", small_problem(seed=1)).json()["id"]
        deadline = time.monotonic() + 15
        while c.get(f"/v1/plans/{running}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get(f"/v1/plans/{queued}").json()["state"] == "queued"
    assert first.proc is not None
    children = _solve_children(first.proc.pid)
    assert children
    first.kill()
    time.sleep(1.5)  # the orphaned solve processes notice their parent is gone and exit
    assert not [p for p in children if _alive(p)]
    second = start_server(db, GEOSHARE_CONCURRENCY=1)
    with httpx.Client(base_url=second.url, timeout=60) as c:
        for job_id in (running, queued):
            job = c.get(f"/v1/plans/{job_id}", params={"wait": 30}).json()
            assert job["state"] == "succeeded", job


def test_load_200_requests_20_clients_no_5xx_no_lost_job(start_server, tmp_path):
    db = tmp_path / "load.db"
    server = start_server(db, GEOSHARE_CONCURRENCY=2, GEOSHARE_SOLVER_WORKERS=1, GEOSHARE_MAX_WAIT_S=60)
    problems = [small_problem((3, 3, 3), seed=s, time_limit_s=5) for s in range(10)]
    statuses: Counter[int] = Counter()
    ids: list[str] = []
    lock = threading.Lock()

    def client_thread(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for i in range(10):
                r = post_problem(c, "/v1/plans", problems[(k + i) % 10], wait=60)
                with lock:
                    statuses[r.status_code] += 1
                    ids.append(r.json()["id"])

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(20)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    elapsed = time.monotonic() - t0
    assert statuses == Counter({200: 200}), statuses
    assert len(set(ids)) == 200
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    assert rows == {"succeeded": 200}, rows
    print(f"200 plans in {elapsed:.1f} s ({200 / elapsed:.1f} plans/s)")


def test_queue_full_is_429_with_retry_after(start_server, tmp_path):
    server = start_server(tmp_path / "full.db", GEOSHARE_CONCURRENCY=1, GEOSHARE_MAX_QUEUE=2)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        ids = [post_problem(c, "/v1/plans", long_problem(time_limit_s=20)).json()["id"]]
        deadline = time.monotonic() + 15
        while c.get(f"/v1/plans/{ids[0]}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ids += [post_problem(c, "/v1/plans", small_problem(seed=s)).json()["id"] for s in range(2)]
        r = post_problem(c, "/v1/plans", small_problem(seed=9))
        assert r.status_code == 429 and r.headers["retry-after"] == "5"
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "GEOSHARE_MAX_QUEUE" in r.json()["detail"]
        for job_id in ids:
            c.delete(f"/v1/plans/{job_id}")


def test_api_key(start_server, tmp_path):
    server = start_server(tmp_path / "auth.db", GEOSHARE_API_KEY="s3cret", GEOSHARE_CONCURRENCY=1)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = post_problem(c, "/v1/plans", small_problem())
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in r.json()["detail"]
        assert c.get("/v1/plans/x", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        ok = post_problem(c, "/v1/plans", small_problem(), wait=20, Authorization="Bearer s3cret")
        assert ok.status_code == 200 and ok.json()["state"] == "succeeded"


def test_graceful_stop_gives_the_running_job_back(start_server, tmp_path):
    db = tmp_path / "stop.db"
    server = start_server(db, GEOSHARE_CONCURRENCY=1)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        job_id = post_problem(c, "/v1/plans", long_problem(time_limit_s=20)).json()["id"]
        deadline = time.monotonic() + 15
        while c.get(f"/v1/plans/{job_id}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    server.stop()  # SIGTERM: uvicorn's shutdown stops the runner
    assert server.proc is not None and server.proc.returncode in (0, -15)  # uvicorn re-raises SIGTERM
    with sqlite3.connect(db) as conn:
        state, attempts = conn.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert (state, attempts) == ("queued", 0)  # not failed, and the interrupted run does not count
