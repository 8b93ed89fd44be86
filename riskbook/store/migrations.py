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

from riskbook.errors import StoreError

__all__ = ["Migration", "applied_versions", "available", "head", "migrate"]

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


def migrate(conn: psycopg.Connection, *, target: int | None = None) -> list[int]:
    """Bring the database to ``target`` (default: the newest schema); return what ran.

    ``conn`` must be in autocommit mode; each migration commits on its own, so a failure
    leaves the database at the last good version.
    """
    migrations = available()
    target = len(migrations) if target is None else target
    ran: list[int] = []
    if set(applied_versions(conn)) >= {m.version for m in migrations[:target]}:
        migrations = []  # nothing to do: skip the lock on the common path
    for m in migrations[:target]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
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
            conn.execute(m.sql.encode())
            conn.execute(
                "INSERT INTO riskbook_migrations (version, name) VALUES (%s, %s)",
                (m.version, m.name),
            )
            ran.append(m.version)
    newer = [v for v in applied_versions(conn) if v > head()]
    if newer:
        raise StoreError(
            f"the database has schema version {max(newer)}, newer than this riskbook "
            f"({head()}): upgrade riskbook"
        )
    return ran
