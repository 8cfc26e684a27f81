"""Fixtures: a real server on loopback (one per session), a client for it, problem builders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from postgres import postgres_cluster, postgres_url  # noqa: F401  (fixtures)
from svc_cases import Server, small_problem

# The shared server and the workers the tests run in this process accept any path and the test
# factories, as before access rules existed (service/access.py); test_svc_access*.py test the rules
# on servers and workers of their own.
OPEN_ACCESS = {"GEOSHARE_READ_ROOTS": "/", "GEOSHARE_OUT_ROOT": "/", "GEOSHARE_MODEL_MODULES": "m,nowhere,svc_tiny"}


@pytest.fixture(scope="session", autouse=True)
def open_access() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in OPEN_ACCESS.items():
            env.setenv(name, value)
        yield


@pytest.fixture
def make_problem() -> Callable:
    """Factory of small random problems (see svc_cases.small_problem)."""
    return small_problem


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts servers on a temp SQLite file; every one is stopped at the end of the test."""
    started: list[Server] = []

    def start(db: Path | None = None, **env: str) -> Server:
        server = Server(db=db or tmp_path / "jobs.db", env={k: str(v) for k, v in env.items()})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the session (starting one costs seconds), with small caps to hit cheaply."""
    db = tmp_path_factory.mktemp("svc") / "jobs.db"
    srv = Server(db=db, env={"GEOSHARE_CONCURRENCY": "2", "GEOSHARE_MAX_LAYERS": "64",
                             "GEOSHARE_MAX_BODY_BYTES": "200000", "GEOSHARE_MAX_TIME_LIMIT_S": "30",
                             "GEOSHARE_MAX_WAIT_S": "30", "GEOSHARE_SOLVER_WORKERS": "1"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c
