"""Job persistence through SQLAlchemy: a SQLite file by default, a Postgres URL for replicas.

Every state change is one conditional UPDATE (``WHERE state = ...``), so two runners or two
replicas never both take a job and a late result never overwrites a cancellation.
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
    Float,
    Integer,
    String,
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
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SOLVE_KINDS = ("plan", "frontier")
TERMINAL = ("succeeded", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    """One job: a plan or frontier solve, or an analysis for a GPU worker."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("kind", "idempotency_key", name="uq_jobs_idempotency"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    request: Mapped[str] = mapped_column(Text)  # the problem (plan, frontier) or the analysis spec
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    problem: Mapped[str | None] = mapped_column(Text, nullable=True)  # analysis: the costs
    # plan: the plan; frontier: the frontier; analysis: the compress report (its plan is a child job)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    parent_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    child_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


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


def _snapshot(row: JobRow) -> Job:
    return Job(**{f: getattr(row, f) for f in Job.__dataclass_fields__})


# The statements of every plan request (create, claim, finish, get), built once as Core
# statements with bound parameters: SQLAlchemy then reuses their compiled form, and the ORM's
# unit of work (a third of a millisecond per statement here) stays out of the request path.
_JOBS = JobRow.__table__
_FIELDS = [_JOBS.c[f] for f in Job.__dataclass_fields__]  # Job(*row) takes them in this order
_GET = select(*_FIELDS).where(_JOBS.c.id == bindparam("b_id"))
_BY_KEY = select(*_FIELDS).where(_JOBS.c.kind == bindparam("b_kind"), _JOBS.c.idempotency_key == bindparam("b_key"))
_COUNT = select(func.count()).select_from(_JOBS).where(
    _JOBS.c.kind.in_(bindparam("b_kinds", expanding=True)), _JOBS.c.state == bindparam("b_state"))
_INSERT = insert(_JOBS)
_OLDEST_QUEUED = select(_JOBS.c.id).where(
    _JOBS.c.kind.in_(bindparam("b_kinds", expanding=True)), _JOBS.c.state == "queued"
).order_by(_JOBS.c.created_at).limit(1)
_CLAIM = update(_JOBS).where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.state == "queued").values(
    state="running", owner=bindparam("b_owner"), lease_token=bindparam("b_token"),
    lease_expires=bindparam("b_expires"), started_at=bindparam("b_now"), attempts=_JOBS.c.attempts + 1)
_HELD = (_JOBS.c.id == bindparam("b_id"), _JOBS.c.lease_token == bindparam("b_token"), _JOBS.c.state == "running")
_RENEW = update(_JOBS).where(*_HELD).values(lease_expires=bindparam("b_expires"))
_FINISH = update(_JOBS).where(*_HELD).values(
    state=bindparam("b_state"), result=bindparam("b_result"), error=bindparam("b_error"),
    finished_at=bindparam("b_now"), lease_token=None, lease_expires=None)
_RETURNING = {stmt: stmt.returning(*_FIELDS) for stmt in (_CLAIM, _FINISH)}
_FINISH_PARENT = update(_JOBS).where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.state == "solving").values(
    state=bindparam("b_state"), error=bindparam("b_error"), finished_at=bindparam("b_now"))


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
        Base.metadata.create_all(self.engine)
        self._returning = self.engine.dialect.update_returning  # SQLite >= 3.35, Postgres

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
        job = Job(id=uuid.uuid4().hex, kind=kind, state="queued", request=request, request_hash=request_hash,
                  idempotency_key=idempotency_key, problem=None, result=None, error=None, parent_id=parent_id,
                  child_id=None, owner=None, lease_token=None, lease_expires=None, attempts=0,
                  created_at=time.time(), started_at=None, finished_at=None)
        try:
            with self.engine.begin() as conn:
                conn.execute(_INSERT, dataclasses.asdict(job))
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

    # --- solve jobs (runner side) ------------------------------------------------------------

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
            if job is not None and job.parent_id:
                conn.execute(_FINISH_PARENT, {"b_id": job.parent_id, "b_state": state, "b_error": job.error,
                                              "b_now": job.finished_at})
            return job

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job that has not finished (and its plan, for an analysis); None if unknown."""
        with Session(self.engine) as s, s.begin():
            row = s.get(JobRow, job_id)
            if row is None:
                return None
            if row.state not in TERMINAL:
                s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state.not_in(TERMINAL)).values(
                    state="cancelled", finished_at=time.time(), lease_token=None, lease_expires=None))
                if row.child_id:
                    s.execute(update(JobRow).where(JobRow.id == row.child_id, JobRow.state.not_in(TERMINAL)).values(
                        state="cancelled", finished_at=time.time(), lease_token=None, lease_expires=None))
            row = s.get(JobRow, job_id, populate_existing=True)
            assert row is not None
            return _snapshot(row)

    def requeue_running(self, kinds: Sequence[str]) -> list[str]:
        """Put every running job of these kinds back in the queue (a restarted single replica)."""
        with Session(self.engine) as s, s.begin():
            ids = list(s.scalars(select(JobRow.id).where(JobRow.kind.in_(list(kinds)), JobRow.state == "running")))
            if ids:
                s.execute(update(JobRow).where(JobRow.id.in_(ids), JobRow.state == "running").values(
                    state="queued", owner=None, lease_token=None, lease_expires=None, started_at=None))
            return ids

    def release(self, job_id: str, token: str) -> bool:
        """Give a running job back to the queue (this server is shutting down)."""
        with Session(self.engine) as s, s.begin():
            res = s.execute(update(JobRow).where(
                JobRow.id == job_id, JobRow.lease_token == token, JobRow.state == "running"
            ).values(state="queued", owner=None, lease_token=None, lease_expires=None, started_at=None,
                     attempts=JobRow.attempts - 1))
            return res.rowcount == 1

    def reap_expired(self, max_attempts: int) -> list[str]:
        """Running jobs whose lease ran out go back to the queue, or fail after max_attempts."""
        now = time.time()
        changed: list[str] = []
        with Session(self.engine) as s, s.begin():
            rows = s.scalars(select(JobRow).where(JobRow.state == "running", JobRow.lease_expires < now)).all()
            for row in rows:
                if row.attempts >= max_attempts:
                    err = {"type": "urn:geoshare:problem:lease-expired", "title": "The job lost its worker too often",
                           "status": 500, "detail": f"{row.attempts} claims of this job expired without a result; "
                           "check the workers' logs (out of memory?) and submit it again"}
                    values: dict[str, Any] = {"state": "failed", "error": json.dumps(err), "finished_at": now}
                else:
                    values = {"state": "queued", "owner": None, "started_at": None}
                res = s.execute(update(JobRow).where(
                    JobRow.id == row.id, JobRow.state == "running", JobRow.lease_expires < now
                ).values(lease_token=None, lease_expires=None, **values))
                if res.rowcount == 1:
                    changed.append(row.id)
        return changed

    # --- analyses (GPU worker side) ----------------------------------------------------------

    def complete_analysis(self, job_id: str, token: str, problem: str, plan_request: str,
                          plan_hash: str, report: str | None = None) -> Job | None:
        """Store the worker's costs (and a compress job's report) and queue their plan as a child
        job, in one transaction.

        The report goes in the analysis row's ``result``, unused by analyses before, so a store
        file from an earlier version needs no new column.
        """
        with Session(self.engine) as s, s.begin():
            row = s.get(JobRow, job_id)
            if row is None or row.kind != "analysis" or row.state != "running" or row.lease_token != token:
                return None
            child = JobRow(id=uuid.uuid4().hex, kind="plan", state="queued", request=plan_request,
                           request_hash=plan_hash, parent_id=job_id, attempts=0, created_at=time.time())
            s.add(child)
            row.state, row.problem, row.child_id, row.result = "solving", problem, child.id, report
            row.lease_token = row.lease_expires = None
            s.flush()
            return _snapshot(row)

    def fail_analysis(self, job_id: str, token: str, error: dict[str, Any], retry: bool,
                      max_attempts: int) -> Job | None:
        """A worker gave up: fail the job, or queue it again when the worker says it may help."""
        with Session(self.engine) as s, s.begin():
            row = s.get(JobRow, job_id)
            if row is None or row.kind != "analysis" or row.state != "running" or row.lease_token != token:
                return None
            if retry and row.attempts < max_attempts:
                row.state, row.owner, row.started_at = "queued", None, None
            else:
                row.state, row.error, row.finished_at = "failed", json.dumps(error), time.time()
            row.lease_token = row.lease_expires = None
            s.flush()
            return _snapshot(row)
