"""Schema migrations: numbered SQL files applied in order, each in its own transaction.

Simpler than Alembic and enough here: the schema is a handful of tables and functions,
written in SQL anyway. ``riskbook_migrations`` records what has been applied; a
transaction-level advisory lock makes concurrent first connections safe (one migrates,
the others wait, then find nothing to do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql

from riskbook.errors import StoreError

__all__ = ["Migration", "applied_versions", "available", "head", "migrate", "store_schema"]

_LOCK_KEY = 0x7269736B626F6F6B & 0x7FFFFFFFFFFFFFFF  # "riskbook"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """Every migration shipped with this version of riskbook, in order."""
    found: list[Migration] = []
    for entry in resources.files("riskbook.store").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    for i, mig in enumerate(found, 1):
        if mig.version != i:
            raise RuntimeError(
                f"migrations must be numbered 1, 2, 3, ...: found {mig.version} at {i}"
            )
    return found


def head() -> int:
    """The schema version this riskbook expects."""
    return len(available())


def applied_versions(conn: psycopg.Connection) -> list[int]:
    exists = conn.execute("SELECT to_regclass('riskbook_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    return [r[0] for r in conn.execute("SELECT version FROM riskbook_migrations ORDER BY version")]


def store_schema(conn: psycopg.Connection) -> str | None:
    """The schema of the store this connection's search_path finds (None: none)."""
    row = conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass('riskbook_migrations')"
    ).fetchone()
    return None if row is None else str(row[0])


def _stores_elsewhere(conn: psycopg.Connection) -> list[str]:
    """The schemas of this database that hold a riskbook store (whether or not this role
    may use them: the catalogue is readable by all)."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relname = 'riskbook_migrations' AND c.relkind IN ('r', 'p') ORDER BY 1"
        )
    ]


def migrate(
    conn: psycopg.Connection,
    *,
    target: int | None = None,
    create: bool = True,
    notices: list[str] | None = None,
) -> list[int]:
    """Bring the database to ``target`` (default: the newest schema); return what ran.

    ``conn`` must be in autocommit mode; each migration commits on its own, so a failure
    leaves the database at the last good version. Every migration runs in the schema of
    the store the search_path finds, even if another schema now comes first on the path
    (a user's own schema made later): an upgrade never starts a second, empty store there.

    A new store is made in the first schema of the search_path, unless this database
    already holds a store in a schema the search_path does not reach (a role whose path
    misses the store would otherwise make and own an empty one): that is refused unless
    ``create`` (``riskbook db upgrade`` asks for it explicitly).

    ``notices``: where the warnings a migration gives go (one that could not do all it
    would, e.g. 0015 on a store holding two fills of one trade id), named by migration.

    Raises
    ------
    StoreError
        A store elsewhere (see above); a migration that fails, named; a database newer
        than this riskbook.
    """
    migrations = available()
    target = len(migrations) if target is None else target
    ran: list[int] = []
    if set(applied_versions(conn)) >= {m.version for m in migrations[:target]}:
        migrations = []  # nothing to do: skip the lock on the common path
    schema = None
    if migrations[:target]:
        # under the lock: a first connection migrating at the same time has made the
        # store (or is making it, and this waits) before this one looks for it
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            schema = store_schema(conn)
            others = [] if schema is not None else _stores_elsewhere(conn)
    if migrations[:target] and schema is None:
        current = conn.execute("SELECT current_schema()").fetchone()
        schema = None if current is None else current[0]
        path = conn.execute("SHOW search_path").fetchone()[0]  # type: ignore[index]
        if schema is None:
            raise StoreError(
                f"no schema on this connection's search_path ({path}) exists to make the "
                "store in: create one, or set search_path in the DSN (options=-csearch_path=...)"
            )
        if others and not create:
            raise StoreError(
                f"this database holds a riskbook store in schema {others[0]!r}, which this "
                f"connection's search_path ({path}) does not reach: add "
                f"options=-csearch_path={others[0]} to the DSN (the DSNs that riskbook db "
                f"grant-reader and grant-processor print do), or run `riskbook db upgrade` "
                f"to make a second, empty store in schema {schema!r}"
            )
    said: list[str] = []

    def hear(notice: psycopg.errors.Diagnostic) -> None:
        if notice.severity_nonlocalized == "WARNING" and notice.message_primary:
            said.append(notice.message_primary)

    if notices is not None:
        conn.add_notice_handler(hear)
    for m in migrations[:target]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(str(schema))))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS riskbook_migrations ("
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
            done = conn.execute(
                "SELECT 1 FROM riskbook_migrations WHERE version = %s", (m.version,)
            ).fetchone()
            if done:
                continue
            try:
                conn.execute(m.sql.encode())
            except psycopg.errors.InsufficientPrivilege:
                raise  # the caller says who may upgrade
            except psycopg.Error as exc:
                raise StoreError(
                    f"migration {m.version:04d}_{m.name} failed, the schema stays at version "
                    f"{m.version - 1}: {exc.diag.message_primary or exc}"
                ) from None
            conn.execute(
                "INSERT INTO riskbook_migrations (version, name) VALUES (%s, %s)",
                (m.version, m.name),
            )
            ran.append(m.version)
            if notices is not None:
                notices += [f"migration {m.version:04d}_{m.name}: {text}" for text in said]
                said.clear()
    if create and target >= 4 and store_schema(conn) is not None:
        # the store's identity (0004), deleted by hand: loads refuse to key a cache
        # without it and send the owner here, so this is where a new one is made (only
        # then: an INSERT needs the privilege even when it adds nothing, and a role that
        # may only read can run this on a current store)
        missing = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM riskbook_store)").fetchone()
        if missing and missing[0]:
            conn.execute("INSERT INTO riskbook_store DEFAULT VALUES")
    newer = [v for v in applied_versions(conn) if v > head()]
    if newer:
        raise StoreError(
            f"the database has schema version {max(newer)}, newer than this riskbook "
            f"({head()}): upgrade riskbook"
        )
    return ran
