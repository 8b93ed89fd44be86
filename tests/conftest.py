"""Shared fixtures: every test talks to a real PostgreSQL.

The server is the one in ``RISKBOOK_DSN`` if set, else riskbook's embedded server
(started or attached to, as a user's first ``riskbook`` command would). Each test
session works in databases of its own, created here and dropped at the end, so a
user's data is never touched.
"""

from __future__ import annotations

import os
import queue
import threading
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


class _Databases:
    """The databases of this test session on the test server: made here, dropped at
    its end."""

    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        self.admin = _with_dbname(server_dsn, "postgres")
        self.created: list[str] = []
        self.template: str | None = None
        self.doomed: queue.Queue[str | None] = queue.Queue()
        self.dropper: threading.Thread | None = None

    def create(self, template: str | None = None) -> str:
        name = f"riskbook_test_{uuid.uuid4().hex[:12]}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(statement)
        self.created.append(name)
        return name

    def dsn(self, name: str) -> str:
        return _with_dbname(self.server_dsn, name)

    def store_database(self) -> str:
        """A database holding an empty store, as ``Store(dsn)`` migrates one: a copy of
        one migrated once (CREATE DATABASE ... TEMPLATE; migrating each took ~0.3 s of
        every test's time) with an identity of its own (``riskbook_store``: caches and
        processor snapshots are kept by it)."""
        if self.template is None:
            name = self.create()
            Store(self.dsn(name)).close()  # migrated; no session left on it
            self.template = name
        try:
            name = self.create(self.template)
        except psycopg.errors.ObjectInUse:  # someone on the template: migrate a new one
            dsn = self.dsn(self.create())
            Store(dsn).close()
            return dsn
        dsn = self.dsn(name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE riskbook_store SET store_id = gen_random_uuid(),"
                " created_at = clock_timestamp()"
            )
        return dsn

    def drop_later(self, dsn: str) -> None:
        """Drop the database of ``dsn`` on a thread of its own, while the next tests run
        (~0.15 s each, mostly the server's; dropped all at the end they took ~25 s)."""
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        if self.dropper is None:
            self.dropper = threading.Thread(target=self._drop_queued, daemon=True)
            self.dropper.start()
        self.created.remove(name)
        self.doomed.put(str(name))

    def _drop_queued(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            while (name := self.doomed.get()) is not None:
                self._drop(conn, name)

    @staticmethod
    def _drop(conn: psycopg.Connection, name: str) -> None:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def drop_all(self) -> None:
        if self.dropper is not None:
            self.doomed.put(None)
            self.dropper.join()
        with psycopg.connect(self.admin, autocommit=True) as conn:
            for name in self.created:
                self._drop(conn, name)


@pytest.fixture(scope="session")
def _databases(server_dsn: str) -> Iterator[_Databases]:
    databases = _Databases(server_dsn)
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def make_database(_databases: _Databases) -> Callable[[], str]:
    """Factory: a new empty database on the test server; returns its DSN."""
    return lambda: _databases.dsn(_databases.create())


@pytest.fixture(scope="session")
def make_store_database(_databases: _Databases) -> Callable[[], str]:
    """Factory: a new database on the test server holding an empty store, migrated to
    the head (as ``Store(dsn)`` leaves a new database); returns its DSN."""
    return _databases.store_database


@pytest.fixture
def fresh_store(_databases: _Databases) -> Iterator[Store]:
    """A store on a new, empty database (migrated), dropped after the test."""
    store = Store(_databases.store_database())
    yield store
    store.close()
    _databases.drop_later(store.dsn)


@pytest.fixture(scope="session")
def shared_store(make_store_database: Callable[[], str]) -> Iterator[Store]:
    """One store for tests that only touch aggregates of their own (unique ids)."""
    store = Store(make_store_database())
    yield store
    store.close()


@pytest.fixture
def agg() -> str:
    """A fresh aggregate id."""
    return f"ACC-{uuid.uuid4().hex[:10]}"
