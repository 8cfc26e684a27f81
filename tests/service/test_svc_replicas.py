"""Two API replicas on one Postgres share the queue: a job is never run by both at once, and
nothing is lost when one replica is SIGKILLed mid-job (its lease expires, the other takes the job).

Real processes (``geoshare serve`` twice), a real throwaway Postgres (skipped where it is not
installed); the store's rows are read directly to see who ran what and when.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from svc_cases import Server, long_problem, post_problem, small_problem

pytestmark = pytest.mark.slow

LEASE_S = 3.0
# one solve at a time per replica, short leases so a dead replica's job comes back within seconds
REPLICA_ENV = {"GEOSHARE_SOLVE_LEASE_S": str(LEASE_S), "GEOSHARE_CONCURRENCY": "1", "GEOSHARE_POLL_S": "0.2"}


def _rows(url: str) -> dict[str, dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, state, owner, attempts, started_at, finished_at, lease_expires "
                                     "FROM jobs")).mappings().all()
    finally:
        engine.dispose()
    return {r["id"]: dict(r) for r in rows}


def _wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _pid_of(owner: str | None) -> int | None:
    return int(owner.split(":")[1]) if owner else None


def _submit(server: Server, problem: Any) -> str:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = post_problem(c, "/v1/plans", problem)
        assert r.status_code in (200, 202), r.text
        return r.json()["id"]


def _finished(server: Server, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=70) as c:
        while time.monotonic() < deadline:
            job = c.get(f"/v1/plans/{job_id}", params={"wait": 20}).json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
    raise AssertionError(f"job {job_id} did not finish within {timeout} s")


def test_a_replica_killed_mid_job_loses_nothing_and_runs_nothing_twice(postgres_url, tmp_path):
    a = Server(db=tmp_path / "a", db_url=postgres_url, env=REPLICA_ENV).start()
    b = Server(db=tmp_path / "b", db_url=postgres_url, env=REPLICA_ENV).start()
    try:
        # long solves (each uses its 4 s limit) queued through both replicas: each runs one at a time
        ids = [_submit(a if i % 2 == 0 else b, long_problem(time_limit_s=4.0)) for i in range(4)]
        ids += [_submit(b, small_problem(seed=i)) for i in range(4)]
        assert a.proc is not None
        running_on_a = _wait_until(
            lambda: [j for j, r in _rows(postgres_url).items()
                     if r["state"] == "running" and _pid_of(r["owner"]) == a.proc.pid],
            30, "a job running on replica a")
        victim = running_on_a[0]
        lease_at_kill = _rows(postgres_url)[victim]["lease_expires"]
        a.kill()
        killed_at = time.time()
        jobs = {job_id: _finished(b, job_id) for job_id in ids}
        rows = _rows(postgres_url)
    finally:
        a.stop()
        b.stop()
    # every job ends, and ends well: the victim's solve came back and ran to the end on b
    assert {job["state"] for job in jobs.values()} == {"succeeded"}, {k: v["state"] for k, v in jobs.items()}
    assert all(job["plan"]["status"] in ("optimal", "feasible") for job in jobs.values())
    # never twice at once: b claimed the victim only after a's lease on it had run out, and it was
    # claimed exactly twice (a, then b); no other job was claimed more than once
    victim_row = rows[victim]
    assert victim_row["attempts"] == 2 and _pid_of(victim_row["owner"]) == b.proc.pid
    assert victim_row["started_at"] >= lease_at_kill - 0.05, (victim_row["started_at"], lease_at_kill)
    assert victim_row["started_at"] >= killed_at - 0.05
    assert all(r["attempts"] == 1 for job_id, r in rows.items() if job_id != victim), rows
    assert all(r["finished_at"] is not None and r["state"] == "succeeded" for r in rows.values())


def test_a_replica_starting_leaves_the_other_replicas_running_solves_alone(postgres_url, tmp_path):
    a = Server(db=tmp_path / "a", db_url=postgres_url, env=REPLICA_ENV).start()
    b = None
    try:
        job_id = _submit(a, long_problem(time_limit_s=15.0))  # outlasts b's start-up
        assert a.proc is not None
        _wait_until(lambda: _rows(postgres_url)[job_id]["state"] == "running", 30, "the solve to start on a")
        # a second replica starting on the same database must not take the running solve back
        # (on a SQLite file, a server starting re-queues what it finds running: it was its own)
        b = Server(db=tmp_path / "b", db_url=postgres_url, env=REPLICA_ENV).start()
        row = _rows(postgres_url)[job_id]
        assert row["state"] == "running" and _pid_of(row["owner"]) == a.proc.pid
        job = _finished(b, job_id)
        row = _rows(postgres_url)[job_id]
    finally:
        a.stop()
        if b is not None:
            b.stop()
    assert job["state"] == "succeeded"
    assert row["attempts"] == 1 and _pid_of(row["owner"]) == a.proc.pid


def test_a_long_poll_wakes_when_another_replica_solves_its_job(postgres_url, tmp_path):
    # long polls: the replicas look at the store every 5 s on their own, so only the announcements
    # (LISTEN/NOTIFY) can make this quick: b's idle runner must hear the job queued through a, and
    # a's long poll must hear b finish it
    slow_poll = {**REPLICA_ENV, "GEOSHARE_POLL_S": "5"}
    a = Server(db=tmp_path / "a", db_url=postgres_url, env=slow_poll).start()
    b = None
    try:
        # a alone takes a long solve (its one slot), then b starts idle
        busy = _submit(a, long_problem(time_limit_s=20.0))
        assert a.proc is not None
        _wait_until(lambda: _pid_of(_rows(postgres_url)[busy]["owner"]) == a.proc.pid, 30, "a busy")
        b = Server(db=tmp_path / "b", db_url=postgres_url, env=slow_poll).start()
        assert b.proc is not None
        with httpx.Client(base_url=a.url, timeout=30) as c:
            start = time.monotonic()
            r = post_problem(c, "/v1/plans", small_problem(seed=3), wait=20)
            latency = time.monotonic() - start
        job = r.json()
        row = _rows(postgres_url)[job["id"]]
    finally:
        a.stop()
        if b is not None:
            b.stop()
    assert r.status_code == 200 and job["state"] == "succeeded"
    assert _pid_of(row["owner"]) == b.proc.pid  # a was busy: b solved it
    assert latency < 2.0, f"answered after {latency:.2f} s: the replicas did not hear each other"
