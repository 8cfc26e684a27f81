"""Job persistence with SQLAlchemy Core: a SQLite file by default, a Postgres URL for replicas.

Every state change is one conditional UPDATE (``WHERE state = ...``), so two runners or two
replicas never both take a job and a late result never overwrites a cancellation. The statements
are built once with bound parameters: SQLAlchemy reuses their compiled form on the request path.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from service.problems import lease_expired
from service.states import TERMINAL, JobKind, JobState

QUEUED, RUNNING, SOLVING = JobState.queued.value, JobState.running.value, JobState.solving.value
FAILED, CANCELLED = JobState.failed.value, JobState.cancelled.value

metadata = MetaData()

# One row per job: a plan or frontier solve, or an analysis for a GPU worker. Column and index
# names are those of earlier versions, so their store files open unchanged.
jobs_table = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False, index=True),
    Column("state", String(16), nullable=False, index=True),
    Column("request", Text, nullable=False),  # the problem (plan, frontier) or the analysis spec
    Column("request_hash", String(64), nullable=False),
    Column("idempotency_key", String(255)),
    Column("problem", Text),  # analysis: the costs
    # plan: the plan; frontier: the frontier; analysis: the compress report (its plan is a child job)
    Column("result", Text),
    Column("error", Text),  # a problem document (RFC 9457), as JSON
    Column("parent_id", String(32), index=True),
    Column("child_id", String(32)),
    Column("owner", String(128)),
    Column("lease_token", String(64)),
    Column("lease_expires", Float),
    Column("attempts", Integer, nullable=False),
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float),
    Column("finished_at", Float),
    UniqueConstraint("kind", "idempotency_key", name="uq_jobs_idempotency"),
)


@dataclass(frozen=True)
class Job:
    """A detached snapshot of a row, safe to pass between threads."""

    id: str
    kind: str
    state: str
    request: str
    request_hash: str
    idempotency_key: str | None
    problem: str | None
    result: str | None
    error: str | None
    parent_id: str | None
    child_id: str | None
    owner: str | None
    lease_token: str | None
    lease_expires: float | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def error_doc(self) -> dict[str, Any] | None:
        return json.loads(self.error) if self.error else None


def new_job(kind: str, request: str, request_hash: str, idempotency_key: str | None = None,
            parent_id: str | None = None) -> Job:
    """A queued job not yet stored."""
    return Job(id=uuid.uuid4().hex, kind=kind, state=QUEUED, request=request, request_hash=request_hash,
               idempotency_key=idempotency_key, problem=None, result=None, error=None, parent_id=parent_id,
               child_id=None, owner=None, lease_token=None, lease_expires=None, attempts=0,
               created_at=time.time(), started_at=None, finished_at=None)


_J = jobs_table.c
_FIELDS = [_J[f] for f in Job.__dataclass_fields__]  # Job(*row) takes them in this order
_ID = _J.id == bindparam("b_id")
_KINDS = _J.kind.in_(bindparam("b_kinds", expanding=True))
_OPEN = _J.state.not_in(TERMINAL)
_NO_LEASE = {"lease_token": None, "lease_expires": None}
_BACK_IN_QUEUE = {"state": QUEUED, "owner": None, "started_at": None, **_NO_LEASE}

_GET = select(*_FIELDS).where(_ID)
_BY_KEY = select(*_FIELDS).where(_J.kind == bindparam("b_kind"), _J.idempotency_key == bindparam("b_key"))
_COUNT = select(func.count()).select_from(jobs_table).where(_KINDS, _J.state == bindparam("b_state"))
_INSERT = insert(jobs_table)
_OLDEST_QUEUED = select(_J.id).where(_KINDS, _J.state == QUEUED).order_by(_J.created_at).limit(1)
_CLAIM = update(jobs_table).where(_ID, _J.state == QUEUED).values(
    state=RUNNING, owner=bindparam("b_owner"), lease_token=bindparam("b_token"),
    lease_expires=bindparam("b_expires"), started_at=bindparam("b_now"), attempts=_J.attempts + 1)
_HELD = (_ID, _J.lease_token == bindparam("b_token"), _J.state == RUNNING)
_RENEW = update(jobs_table).where(*_HELD).values(lease_expires=bindparam("b_expires"))
_FINISH = update(jobs_table).where(*_HELD).values(
    state=bindparam("b_state"), result=bindparam("b_result"), error=bindparam("b_error"),
    finished_at=bindparam("b_now"), **_NO_LEASE)
_FINISH_PARENT = update(jobs_table).where(_ID, _J.state == SOLVING).values(
    state=bindparam("b_state"), error=bindparam("b_error"), finished_at=bindparam("b_now"))
_CANCEL = update(jobs_table).where(_ID, _OPEN).values(state=CANCELLED, finished_at=bindparam("b_now"),
                                                     **_NO_LEASE)
_RELEASE = update(jobs_table).where(*_HELD).values(attempts=_J.attempts - 1, **_BACK_IN_QUEUE)
_REQUEUE_RUNNING = update(jobs_table).where(_KINDS, _J.state == RUNNING).values(**_BACK_IN_QUEUE)
_RUNNING_IDS = select(_J.id).where(_KINDS, _J.state == RUNNING)
_EXPIRED = (_J.state == RUNNING, _J.lease_expires < bindparam("b_now"))
_EXPIRED_ROWS = select(_J.id, _J.attempts).where(*_EXPIRED)
_REAP_REQUEUE = update(jobs_table).where(_ID, *_EXPIRED).values(**_BACK_IN_QUEUE)
_REAP_FAIL = update(jobs_table).where(_ID, *_EXPIRED).values(
    state=FAILED, error=bindparam("b_error"), finished_at=bindparam("b_now"), **_NO_LEASE)
# an analysis's worker reports back: its costs in and a plan queued, or its failure
_ANALYSIS_HELD = (*_HELD, _J.kind == JobKind.analysis.value)
_ANALYSIS_DONE = update(jobs_table).where(*_ANALYSIS_HELD).values(
    state=SOLVING, problem=bindparam("b_problem"), child_id=bindparam("b_child"), result=bindparam("b_report"),
    **_NO_LEASE)
_ANALYSIS_RETRY = update(jobs_table).where(*_ANALYSIS_HELD).values(**_BACK_IN_QUEUE)
_ANALYSIS_FAIL = update(jobs_table).where(*_ANALYSIS_HELD).values(
    state=FAILED, error=bindparam("b_error"), finished_at=bindparam("b_now"), **_NO_LEASE)
# on a shared database (Postgres), every change is also announced to the other replicas, in the
# transaction that makes it (delivered at commit): "<origin> <job id> <1 if it may settle the
# job else 0>" on JOB_CHANNEL (wakes their long polls and event streams), "<origin> <kind>" on
# QUEUE_CHANNEL when a job is queued (wakes their idle runners); service/listen.py receives them
JOB_CHANNEL, QUEUE_CHANNEL = "geoshare_job", "geoshare_queue"
_ANNOUNCE = text("SELECT pg_notify(:channel, :payload)")
_RETURNING = {stmt: stmt.returning(*_FIELDS)
              for stmt in (_CLAIM, _FINISH, _ANALYSIS_DONE, _ANALYSIS_RETRY, _ANALYSIS_FAIL)}


def engine_for(url: str) -> Engine:
    """An engine; SQLite gets WAL and a busy timeout so threads and restarts share the file."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: commits append to the WAL without an fsync (synced at checkpoints).
            # A committed job survives the server process dying (kill -9, OOM: what the restart
            # test does), but the last commits before an OS crash or power loss may roll back.
            # FULL would fsync on every commit, several per request, on the synchronous path.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.id)
        self.job = job


class Store:
    """Every read and write of jobs; methods are blocking (call them from a thread)."""

    def __init__(self, url: str) -> None:
        self.engine = engine_for(url)
        metadata.create_all(self.engine)
        self._returning = self.engine.dialect.update_returning  # SQLite >= 3.35, Postgres
        # a database several replicas may share, whose changes are announced (see JOB_CHANNEL)
        self.shared = self.engine.dialect.name == "postgresql"
        self.origin = uuid.uuid4().hex[:12]  # this store's announcements, which its own listener skips

    def _job_changed(self, conn: Connection, job_id: str | None, settled: bool = True) -> None:
        if self.shared and job_id:
            conn.execute(_ANNOUNCE, {"channel": JOB_CHANNEL, "payload": f"{self.origin} {job_id} {int(settled)}"})

    def _queued(self, conn: Connection, kind: str) -> None:
        if self.shared:
            conn.execute(_ANNOUNCE, {"channel": QUEUE_CHANNEL, "payload": f"{self.origin} {kind}"})

    def _update_one(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> Job | None:
        """Run an UPDATE of the row ``params["b_id"]``; its new state if it matched, else None."""
        if self._returning:
            row = conn.execute(_RETURNING[stmt], params).first()
            return Job(*row) if row is not None else None
        if conn.execute(stmt, params).rowcount != 1:
            return None
        return Job(*conn.execute(_GET, {"b_id": params["b_id"]}).one())

    def dispose(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # --- reading -----------------------------------------------------------------------------

    def get(self, job_id: str, kinds: Sequence[str] | None = None) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(_GET, {"b_id": job_id}).first()
        if row is None or (kinds is not None and row.kind not in kinds):
            return None
        return Job(*row)

    def by_idempotency(self, kind: str, key: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(_BY_KEY, {"b_kind": kind, "b_key": key}).first()
        return Job(*row) if row is not None else None

    def count(self, kinds: Iterable[str], state: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(_COUNT, {"b_kinds": list(kinds), "b_state": state}).scalar() or 0)

    # --- creating ----------------------------------------------------------------------------

    def create(self, kind: str, request: str, request_hash: str, idempotency_key: str | None = None,
               parent_id: str | None = None) -> tuple[Job, bool]:
        """A new queued job, or the one already made with this Idempotency-Key (created=False).

        Raises:
            IdempotencyMismatch: the key was used with a different request.
        """
        if idempotency_key is not None:
            old = self.by_idempotency(kind, idempotency_key)
            if old is not None:
                return self.same_request(old, request_hash), False
        job = new_job(kind, request, request_hash, idempotency_key, parent_id)
        try:
            with self.engine.begin() as conn:
                conn.execute(_INSERT, dataclasses.asdict(job))
                self._queued(conn, kind)
        except IntegrityError:
            # a concurrent retry with the same key won the insert
            assert idempotency_key is not None
            old = self.by_idempotency(kind, idempotency_key)
            if old is None:
                raise
            return self.same_request(old, request_hash), False
        return job, True

    @staticmethod
    def same_request(job: Job, request_hash: str) -> Job:
        """The job a reused Idempotency-Key points at, if the request is the same.

        Raises:
            IdempotencyMismatch: the key was first used with a different request.
        """
        if job.request_hash != request_hash:
            raise IdempotencyMismatch(job)
        return job

    # --- leases (solve processes and GPU workers) --------------------------------------------

    def claim(self, kinds: Sequence[str], owner: str, lease_s: float) -> Job | None:
        """Take the oldest queued job of these kinds; None when there is none."""
        for _ in range(5):  # lost races: another runner took the candidate first
            with self.engine.begin() as conn:
                cand = conn.execute(_OLDEST_QUEUED, {"b_kinds": list(kinds)}).scalar()
                if cand is None:
                    return None
                now = time.time()
                job = self._update_one(conn, _CLAIM, {
                    "b_id": cand, "b_owner": owner, "b_token": secrets.token_hex(16),
                    "b_expires": now + lease_s, "b_now": now})
                if job is not None:
                    self._job_changed(conn, job.id, settled=False)
                    return job
        return None

    def renew(self, job_id: str, token: str, lease_s: float) -> bool:
        """Extend a lease; False when the job was cancelled, finished or re-queued meanwhile."""
        with self.engine.begin() as conn:
            res = conn.execute(_RENEW, {"b_id": job_id, "b_token": token, "b_expires": time.time() + lease_s})
            return res.rowcount == 1

    def finish(self, job_id: str, token: str, state: str, result: str | None = None,
               error: dict[str, Any] | None = None) -> Job | None:
        """Record the outcome of a job still held under this lease; mirror it onto the parent."""
        with self.engine.begin() as conn:
            job = self._update_one(conn, _FINISH, {
                "b_id": job_id, "b_token": token, "b_state": state, "b_result": result,
                "b_error": json.dumps(error) if error else None, "b_now": time.time()})
            if job is not None:
                self._job_changed(conn, job.id)
            if job is not None and job.parent_id:
                conn.execute(_FINISH_PARENT, {"b_id": job.parent_id, "b_state": state, "b_error": job.error,
                                              "b_now": job.finished_at})
                self._job_changed(conn, job.parent_id)
            return job

    def release(self, job_id: str, token: str) -> bool:
        """Give a running job back to the queue (this server is shutting down)."""
        with self.engine.begin() as conn:
            released = conn.execute(_RELEASE, {"b_id": job_id, "b_token": token}).rowcount == 1
            if released:
                self._job_changed(conn, job_id, settled=False)
                self._queued(conn, "")
            return released

    def requeue_running(self, kinds: Sequence[str]) -> list[str]:
        """Put every running job of these kinds back in the queue (a restarted single replica)."""
        with self.engine.begin() as conn:
            ids = list(conn.execute(_RUNNING_IDS, {"b_kinds": list(kinds)}).scalars())
            if ids:
                conn.execute(_REQUEUE_RUNNING, {"b_kinds": list(kinds)})
                self._queued(conn, "")
            return ids

    def reap_expired(self, max_attempts: int) -> list[str]:
        """Running jobs whose lease ran out go back to the queue, or fail after max_attempts."""
        now = time.time()
        changed: list[str] = []
        with self.engine.begin() as conn:
            for job_id, attempts in conn.execute(_EXPIRED_ROWS, {"b_now": now}).all():
                if attempts >= max_attempts:
                    stmt, params = _REAP_FAIL, {"b_error": json.dumps(lease_expired(attempts))}
                else:
                    stmt, params = _REAP_REQUEUE, {}
                if conn.execute(stmt, {"b_id": job_id, "b_now": now, **params}).rowcount == 1:
                    changed.append(job_id)
                    self._job_changed(conn, job_id, settled=stmt is _REAP_FAIL)
            if changed:
                self._queued(conn, "")
        return changed

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job that has not finished (and its plan, for an analysis); None if unknown."""
        with self.engine.begin() as conn:
            row = conn.execute(_GET, {"b_id": job_id}).first()
            if row is None:
                return None
            now = time.time()
            conn.execute(_CANCEL, {"b_id": job_id, "b_now": now})
            self._job_changed(conn, job_id)
            if row.child_id:
                conn.execute(_CANCEL, {"b_id": row.child_id, "b_now": now})
                self._job_changed(conn, row.child_id)
            return Job(*conn.execute(_GET, {"b_id": job_id}).one())

    # --- analyses (GPU worker side) ----------------------------------------------------------

    def complete_analysis(self, job_id: str, token: str, problem: str, plan_request: str,
                          plan_hash: str, report: str | None = None) -> Job | None:
        """Store the worker's costs (and a compress job's report) and queue their plan as a child
        job, in one transaction.

        The report goes in the analysis row's ``result``, unused by analyses before, so a store
        file from an earlier version needs no new column.
        """
        child = new_job(JobKind.plan.value, plan_request, plan_hash, parent_id=job_id)
        with self.engine.begin() as conn:
            job = self._update_one(conn, _ANALYSIS_DONE, {
                "b_id": job_id, "b_token": token, "b_problem": problem, "b_child": child.id, "b_report": report})
            if job is not None:
                conn.execute(_INSERT, dataclasses.asdict(child))
                self._job_changed(conn, job_id, settled=False)
                self._queued(conn, child.kind)
            return job

    def fail_analysis(self, job_id: str, token: str, error: dict[str, Any], retry: bool,
                      max_attempts: int) -> Job | None:
        """A worker gave up: fail the job, or queue it again when the worker says it may help."""
        with self.engine.begin() as conn:
            row = conn.execute(_GET, {"b_id": job_id}).first()
            if row is None:
                return None
            if retry and row.attempts < max_attempts:
                job = self._update_one(conn, _ANALYSIS_RETRY, {"b_id": job_id, "b_token": token})
                if job is not None:
                    self._job_changed(conn, job_id, settled=False)
                    self._queued(conn, job.kind)
                return job
            job = self._update_one(conn, _ANALYSIS_FAIL, {
                "b_id": job_id, "b_token": token, "b_error": json.dumps(error), "b_now": time.time()})
            self._job_changed(conn, job.id if job is not None else None)
            return job
