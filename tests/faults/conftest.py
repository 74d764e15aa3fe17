"""Fixtures of the fault suite: servers of our own, to stop and kill (see harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import PrivatePostgres, postgres_bindir


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started PostgreSQL of this test's own on a spare port; destroyed after the test."""
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    server = PrivatePostgres()
    try:
        yield server.start()
    finally:
        server.destroy()
