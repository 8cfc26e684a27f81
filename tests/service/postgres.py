"""A throwaway Postgres cluster for the store tests, when Postgres is installed here.

The service promises that a Postgres URL works as well as the SQLite file (SQLAlchemy); this
checks it against a real server: initdb into a temp directory, a Unix socket only (no TCP), trust
auth, stopped at the end. As root, the server runs as the ``postgres`` user (it refuses root).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_counter = itertools.count()


def _as_server_user(root: Path) -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.skip("running as root and runuser is missing: cannot start Postgres as another user")
    shutil.chown(root, "postgres", "postgres")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[tuple[Path, int]]:
    """(socket directory, port) of a running throwaway cluster."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl or importlib.util.find_spec("psycopg") is None:
        pytest.skip("needs Postgres (initdb, pg_ctl on PATH) and psycopg (pip install -e '.[postgres]')")
    root = Path(tempfile.mkdtemp(prefix="geoshare-pg-"))
    root.chmod(0o755)
    user = _as_server_user(root)
    data, port = root / "data", 50000 + os.getpid() % 10000
    subprocess.run([*user, initdb, "-D", str(data), "-A", "trust", "-U", "geoshare", "-E", "UTF8", "--no-locale"],
                   check=True, capture_output=True)
    options = f"-k {root} -c listen_addresses='' -p {port}"
    subprocess.run([*user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield root, port
    finally:
        subprocess.run([*user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster: tuple[Path, int]) -> str:
    """A fresh, empty database on the cluster for one test."""
    import psycopg

    root, port = postgres_cluster
    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(host=str(root), port=port, user="geoshare", dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://geoshare@/{name}?host={root}&port={port}"
