"""Fixtures: a throwaway Postgres cluster for the session (bench/pg_cluster.py), a fresh database
per test; skipped where Postgres is not installed."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.pg_cluster import PostgresUnavailable, create_database, throwaway_cluster

_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[tuple[Path, int]]:
    """(socket directory, port) of a running throwaway cluster."""
    try:
        with throwaway_cluster() as cluster:
            yield cluster
    except PostgresUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def postgres_url(postgres_cluster: tuple[Path, int]) -> str:
    """A fresh, empty database on the cluster for one test."""
    return create_database(postgres_cluster, f"t{os.getpid()}_{next(_counter)}")
