"""A throwaway Postgres cluster (initdb into a temp directory, Unix socket only, trust auth), for
the store tests and the replica bench: the service promises a Postgres URL works as well as the
SQLite file, and this checks it against a real server. As root, the server runs as the
``postgres`` user (it refuses root)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """Postgres (initdb, pg_ctl), psycopg or a non-root user to run it as is missing here."""


def _as_server_user(root: Path) -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root and runuser is missing: cannot start Postgres as another user")
    shutil.chown(root, "postgres", "postgres")
    return ["runuser", "-u", "postgres", "--"]


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[tuple[Path, int]]:
    """(socket directory, port) of a running cluster, stopped and deleted on exit.

    Raises:
        PostgresUnavailable: with what is missing and how to get it.
    """
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl or importlib.util.find_spec("psycopg") is None:
        raise PostgresUnavailable("needs Postgres (initdb, pg_ctl on PATH) and psycopg (pip install -e '.[postgres]')")
    root = Path(tempfile.mkdtemp(prefix="geoshare-pg-"))
    root.chmod(0o755)
    try:
        user = _as_server_user(root)
        data, port = root / "data", 50000 + os.getpid() % 10000
        subprocess.run([*user, initdb, "-D", str(data), "-A", "trust", "-U", "geoshare", "-E", "UTF8",
                        "--no-locale"], check=True, capture_output=True)
        options = f"-k {root} -c listen_addresses='' -p {port}"
        subprocess.run([*user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                       check=True, capture_output=True)
        try:
            yield root, port
        finally:
            subprocess.run([*user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(cluster: tuple[Path, int], name: str) -> str:
    """A new empty database on the cluster; its SQLAlchemy URL."""
    import psycopg

    root, port = cluster
    with psycopg.connect(host=str(root), port=port, user="geoshare", dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://geoshare@/{name}?host={root}&port={port}"
