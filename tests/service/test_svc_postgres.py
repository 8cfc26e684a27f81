"""The service on a real Postgres server instead of the SQLite file (skipped where Postgres is not
installed): plans are answered and survive a server restart."""

from __future__ import annotations

import httpx
import pytest
from svc_cases import Server, post_problem, small_problem

pytestmark = pytest.mark.slow


def test_plans_are_served_and_kept_across_a_restart(postgres_url, tmp_path):
    first = Server(db=tmp_path / "pg-first", db_url=postgres_url).start()
    try:
        with httpx.Client(base_url=first.url, timeout=30) as c:
            r = post_problem(c, "/v1/plans", small_problem(seed=5), wait=20)
            assert r.status_code == 200, r.text
            job = r.json()
            assert job["state"] == "succeeded" and job["plan"]["status"] == "optimal"
    finally:
        first.stop()
    second = Server(db=tmp_path / "pg-second", db_url=postgres_url).start()
    try:
        with httpx.Client(base_url=second.url, timeout=30) as c:
            again = c.get(f"/v1/plans/{job['id']}").json()
            assert again["state"] == "succeeded" and again["plan"] == job["plan"]
    finally:
        second.stop()
