"""Shared fixtures: every test talks to a real PostgreSQL.

The server is the one in ``RISKBOOK_DSN`` if set, else riskbook's embedded server
(started or attached to, as a user's first ``riskbook`` command would). Each test
session works in databases of its own, created here and dropped at the end, so a
user's data is never touched.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql

from riskbook.store import Store


def _server_dsn() -> str:
    dsn = os.environ.get("RISKBOOK_DSN")
    if dsn:
        return dsn
    from riskbook.store.embedded import default_server

    return default_server().attach()


def _with_dbname(dsn: str, dbname: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    parts["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The load cache and the live processors' snapshots of this session go to a folder
    of its own, not the user's ``$RISKBOOK_HOME/cache`` (tests that look at them set
    their own)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RISKBOOK_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def server_dsn() -> str:
    """DSN of the server the tests run against (its own default database)."""
    return _server_dsn()


@pytest.fixture(scope="session")
def make_database(server_dsn: str) -> Iterator[Callable[[], str]]:
    """Factory: a new empty database on the test server; returns its DSN."""
    created: list[str] = []
    admin = _with_dbname(server_dsn, "postgres")

    def make() -> str:
        name = f"riskbook_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return _with_dbname(server_dsn, name)

    yield make
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in created:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def fresh_store(make_database: Callable[[], str]) -> Iterator[Store]:
    """A store on a new, empty database (migrated)."""
    store = Store(make_database())
    yield store
    store.close()


@pytest.fixture(scope="session")
def shared_store(make_database: Callable[[], str]) -> Iterator[Store]:
    """One store for tests that only touch aggregates of their own (unique ids)."""
    store = Store(make_database())
    yield store
    store.close()


@pytest.fixture
def agg() -> str:
    """A fresh aggregate id."""
    return f"ACC-{uuid.uuid4().hex[:10]}"
