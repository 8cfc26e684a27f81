"""The job store alone (no HTTP): the conditional updates that keep jobs from being lost or doubled."""

from __future__ import annotations

import threading
import time

import pytest

from service.db import IdempotencyMismatch, Store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def store(request, tmp_path):
    """Every store test runs on the embedded SQLite file and on a real Postgres server (a
    throwaway cluster from tests/service/postgres.py; skipped where Postgres is not installed)."""
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = Store(url)
    yield s
    s.dispose()


def test_each_job_is_claimed_once_under_contention(store):
    ids = {store.create("plan", f"req{i}", f"h{i}")[0].id for i in range(40)}
    got: list[str] = []
    lock = threading.Lock()

    def runner(name: str) -> None:
        while (job := store.claim(("plan",), name, 30)) is not None:
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=runner, args=(f"r{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(ids)


def test_a_late_result_never_overwrites_a_cancel(store):
    job, _ = store.create("plan", "req", "h")
    running = store.claim(("plan",), "r", 30)
    assert running is not None and running.lease_token
    assert store.cancel(job.id).state == "cancelled"
    assert store.finish(job.id, running.lease_token, "succeeded", result="{}") is None
    assert store.get(job.id).state == "cancelled"
    assert not store.renew(job.id, running.lease_token, 30)


def test_idempotency(store):
    a, created = store.create("plan", "req", "h1", idempotency_key="k")
    b, again = store.create("plan", "req", "h1", idempotency_key="k")
    assert created and not again and a.id == b.id
    with pytest.raises(IdempotencyMismatch):
        store.create("plan", "other", "h2", idempotency_key="k")
    assert store.create("frontier", "req", "h1", idempotency_key="k")[1]  # keys are per kind


def test_expired_leases_requeue_then_fail(store):
    job, _ = store.create("analysis", "{}", "h")
    for attempt in (1, 2):
        claimed = store.claim(("analysis",), "w", 0.01)
        assert claimed.attempts == attempt
        time.sleep(0.02)
        assert store.reap_expired(max_attempts=2) == [job.id]
        assert store.get(job.id).state == ("queued" if attempt == 1 else "failed")
    assert "2 claims" in store.get(job.id).error_doc()["detail"]


def test_restart_requeues_running_solves_only(store):
    plan, _ = store.create("plan", "p", "h")
    analysis, _ = store.create("analysis", "a", "h")
    store.claim(("plan",), "r", 30)
    store.claim(("analysis",), "w", 30)
    assert store.requeue_running(("plan", "frontier")) == [plan.id]
    assert store.get(plan.id).state == "queued" and store.get(analysis.id).state == "running"


def test_analysis_completion_queues_its_plan_and_mirrors_the_outcome(store):
    job, _ = store.create("analysis", "{}", "h")
    claim = store.claim(("analysis",), "w", 30)
    assert store.complete_analysis(job.id, "wrong", "{}", "p", "hp") is None
    done = store.complete_analysis(job.id, claim.lease_token, "{costs}", "p", "hp")
    assert done.state == "solving" and done.child_id
    child = store.claim(("plan",), "r", 30)
    assert child.id == done.child_id and child.parent_id == job.id
    store.finish(child.id, child.lease_token, "succeeded", result="{plan}")
    assert store.get(job.id).state == "succeeded"


def test_a_compress_report_is_kept_beside_the_costs(store):
    job, _ = store.create("analysis", "{}", "h")
    claim = store.claim(("analysis",), "w", 30)
    done = store.complete_analysis(job.id, claim.lease_token, "{costs}", "p", "hp", report="{report}")
    assert done.result == "{report}" and done.problem == "{costs}"
    child = store.claim(("plan",), "r", 30)
    store.finish(child.id, child.lease_token, "succeeded", result="{plan}")
    after = store.get(job.id)
    assert after.state == "succeeded" and after.result == "{report}"  # the plan lives on the child
