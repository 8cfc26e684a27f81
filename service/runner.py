"""Runs queued solves in spawned worker processes, at most ``concurrency`` at once.

Each slot is a thread that owns one long-lived solve process (imports paid once, not per job).
The thread claims a job from the store, hands it to its process, renews the job's lease while it
waits, and writes the outcome. Cancelling kills the process; the slot starts a fresh one.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from service.db import Job, Store
from service.metrics import Metrics
from service.problems import problem
from service.settings import Settings
from service.states import SOLVE_KINDS, JobState

SUCCEEDED, FAILED, CANCELLED = JobState.succeeded.value, JobState.failed.value, JobState.cancelled.value

log = logging.getLogger("geoshare.runner")
_CTX = mp.get_context("spawn")
_READY_TIMEOUT_S = 120.0


class _Process:
    """One spawned solve process and our end of its pipe."""

    def __init__(self) -> None:
        from service import solve_process

        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=solve_process.main, args=(child, os.getpid()), daemon=True,
                                 name="geoshare-solve")
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self, stop: threading.Event) -> bool:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not stop.is_set() and time.monotonic() < deadline:
            if self.conn.poll(0.1):
                try:
                    self.ready = self.conn.recv()[0] == "ready"
                except (EOFError, OSError):
                    return False
                return self.ready
            if not self.proc.is_alive():
                return False
        return False

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class Runner:
    """The solve slots of one server process."""

    def __init__(self, settings: Settings, store: Store, metrics: Metrics,
                 notify: Callable[..., None]) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.notify = notify
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._generation = 0
        self._lock = threading.Lock()
        self._procs: dict[int, _Process | None] = {}
        self._current: dict[int, str] = {}  # slot -> job id it is running
        self._progress: dict[str, dict[str, Any]] = {}  # job id -> latest improvement reported
        self._threads: list[threading.Thread] = []

    # --- control -----------------------------------------------------------------------------

    def start(self) -> None:
        for slot in range(self.settings.concurrency):
            t = threading.Thread(target=self._slot, args=(slot,), name=f"geoshare-slot-{slot}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.wake(None)
        with self._lock:
            procs = [p for p in self._procs.values() if p is not None]
        for p in procs:
            p.kill()
        for t in self._threads:
            t.join(timeout=10)

    def wake(self, jobs: int | None = 1) -> None:
        """New work: as many idle slots as there are new jobs (all when None) look at the queue
        now instead of at their next poll. One per job, so a second idle slot does not pay a
        claim that finds the queue empty."""
        with self._cond:
            self._generation += 1
            if jobs is None:
                self._cond.notify_all()
            else:
                self._cond.notify(jobs)

    def cancel(self, job_id: str) -> bool:
        """Kill the process running this job here, if any (the store already says cancelled)."""
        with self._lock:
            for slot, jid in self._current.items():
                proc = self._procs.get(slot)
                if jid == job_id and proc is not None:
                    proc.proc.kill()
                    return True
        return False

    def ready(self) -> bool:
        """At least one slot has a live, warmed-up solve process."""
        with self._lock:
            return any(p is not None and p.ready and p.alive() for p in self._procs.values())

    def running(self) -> int:
        with self._lock:
            return len(self._current)

    # --- the slot loop ----------------------------------------------------------------------

    def _slot(self, slot: int) -> None:
        while not self._stop.is_set():
            proc = self._ensure_process(slot)
            if proc is None:
                self._stop.wait(1.0)
                continue
            gen = self._generation
            try:
                job = self.store.claim(SOLVE_KINDS, self.owner, self.settings.solve_lease_s)
            except Exception:  # the database is down: keep the slot, try again later
                log.exception("claiming a job failed")
                job = None
            if job is None:
                with self._cond:
                    if self._generation == gen and not self._stop.is_set():
                        self._cond.wait(self.settings.poll_s)
                continue
            self._run(slot, proc, job)

    def _ensure_process(self, slot: int) -> _Process | None:
        with self._lock:
            proc = self._procs.get(slot)
        if proc is not None and proc.alive():
            return proc
        if proc is not None:
            proc.kill()
        proc = _Process()
        with self._lock:
            self._procs[slot] = proc
        if not proc.wait_ready(self._stop):
            log.error("solve process of slot %d did not start", slot)
            proc.kill()
            with self._lock:
                self._procs[slot] = None
            return None
        return proc

    def _run(self, slot: int, proc: _Process, job: Job) -> None:
        assert job.lease_token is not None
        with self._lock:
            self._current[slot] = job.id
        self.metrics.running.labels(job.kind).inc()
        self.notify(job.id, settled=False)
        t0 = time.perf_counter()
        try:
            outcome = self._exchange(proc, job)
        finally:
            with self._lock:
                self._current.pop(slot, None)
                self._progress.pop(job.id, None)
            self.metrics.running.labels(job.kind).dec()
        elapsed = time.perf_counter() - t0
        if outcome is None and self._stop.is_set():  # shutting down: the next start runs it
            self.store.release(job.id, job.lease_token)
            self.notify(job.id)
            return
        if outcome is None:  # killed (cancel) or crashed
            proc.kill()
            current = self.store.get(job.id)
            if current is not None and current.state == JobState.running:
                err = problem(500, "solver-crashed", "The solve process died",
                              "the solver process exited without an answer (out of memory?); "
                              "lower options.time_limit_s or the problem size and submit again")
                self._finish(job, FAILED, None, err, elapsed)
            else:
                self.metrics.jobs.labels(job.kind, CANCELLED).inc()
                self.notify(job.id)
            return
        status, payload = outcome
        if status == "ok":
            assert isinstance(payload, str)
            self._finish(job, SUCCEEDED, payload, None, elapsed)
        else:
            assert isinstance(payload, dict)
            self._finish(job, FAILED, None, payload, elapsed)

    def _exchange(self, proc: _Process, job: Job) -> tuple[str, Any] | None:
        """Send the job and wait for its answer, renewing the lease; None if the process died."""
        assert job.lease_token is not None
        try:
            proc.conn.send((job.kind, job.request, self.settings.cpu_workers()))
        except (BrokenPipeError, OSError):
            return None
        renew_every = self.settings.solve_lease_s / 3
        next_renew = time.monotonic() + min(renew_every, 1.0)
        while True:
            try:
                if proc.conn.poll(0.1):
                    message = proc.conn.recv()
                    if message[0] != "progress":
                        return message
                    # live improvements are kept in memory only: the final plan is what persists
                    with self._lock:
                        self._progress[job.id] = message[1]
                    self.notify(job.id, settled=False)
                    continue
            except (EOFError, OSError):
                return None
            if not proc.alive():
                return None
            if time.monotonic() >= next_renew:
                # renewing also tells us when another replica or a DELETE cancelled the job
                try:
                    held = self.store.renew(job.id, job.lease_token, self.settings.solve_lease_s)
                except Exception:
                    log.exception("renewing the lease of %s failed", job.id)
                    held = True
                if not held:
                    proc.proc.kill()
                    return None
                next_renew = time.monotonic() + min(renew_every, 1.0)

    def progress_of(self, job_id: str) -> dict[str, Any] | None:
        """The latest improvement a running solve reported on this replica (None if none)."""
        with self._lock:
            return self._progress.get(job_id)

    def _finish(self, job: Job, state: str, result: str | None, error: dict[str, Any] | None,
                elapsed: float) -> None:
        assert job.lease_token is not None

        done = self.store.finish(job.id, job.lease_token, state, result, error)
        outcome = state if done is not None else CANCELLED
        self.metrics.solve_seconds.labels(job.kind, outcome).observe(elapsed)
        self.metrics.jobs.labels(job.kind, outcome).inc()
        self.notify(job.id)
        if done is not None and done.parent_id:
            self.notify(done.parent_id)
