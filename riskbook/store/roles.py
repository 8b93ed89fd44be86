"""Least-privilege roles for a store: the auditor's, that reads, and the live
processor's, that appends (``riskbook db grant-reader`` / ``grant-processor``).

What each may do, on riskbook's own relations only (nothing else of the database is
granted):

==============  ===========================================  ==========================
role            may                                          may not
==============  ===========================================  ==========================
reader          read history, its typed copy, snapshots,     append, alter or delete
                checkpoints and the ``account_positions``    anything
                view; run ``riskbook.load`` and ``verify``
processor       what a reader may; append events; insert     alter or delete events (or
                and update ``processor_checkpoints``         their typed copy); write
                                                             anything else
==============  ===========================================  ==========================

Both are LOGIN roles. A password, if given, is sent as a SCRAM verifier computed here,
so the server (and its log) never sees it. On the embedded server, which trusts every
connection that reaches its private socket, no password is needed -- the roles there
guard against mistakes (an auditor's notebook cannot append by accident), not against
people who can already reach the socket as the superuser.

Privileges follow the relations that exist when the command runs: after a schema
upgrade that adds one, run the command again (it updates the role in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import sql

from riskbook.errors import StoreError
from riskbook.store.eventstore import Store, redact

__all__ = ["RELATIONS", "RoleGrant", "grant_processor", "grant_reader"]

RELATIONS = (
    "events",
    "event_fields",
    "position_snapshots",
    "processor_checkpoints",
    "riskbook_store",
    "riskbook_migrations",
    "account_positions",
)
"""riskbook's relations: what a reader may read, and all a processor may touch."""

_WRITES = {"processor": {"events": "INSERT", "processor_checkpoints": "INSERT, UPDATE"}}
_FORBIDDEN = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")

Kind = Literal["reader", "processor"]


@dataclass(frozen=True)
class RoleGrant:
    """A role made or updated by :func:`grant_reader` / :func:`grant_processor`.

    ``dsn`` is the store's connection string for that role, without a password.
    """

    role: str
    kind: Kind
    created: bool
    dsn: str

    def __str__(self) -> str:
        does = (
            "can read history and views, and nothing else"
            if self.kind == "reader"
            else "can read, append events and keep its checkpoint; it cannot alter history"
        )
        verb = "created" if self.created else "updated"
        return f"role {self.role!r} {verb}: it {does}\nconnect with: {redact(self.dsn)}"


def grant_reader(store: Store, role: str, *, password: str | None = None) -> RoleGrant:
    """Create or update ``role`` so that it can read the store and nothing else."""
    return _grant(store, role, "reader", password)


def grant_processor(store: Store, role: str, *, password: str | None = None) -> RoleGrant:
    """Create or update ``role`` for the live processor: read, append events, keep its
    checkpoint (insert and update ``processor_checkpoints``); never alter history."""
    return _grant(store, role, "processor", password)


def _grant(store: Store, role: str, kind: Kind, password: str | None) -> RoleGrant:
    if not isinstance(role, str) or not role or "\x00" in role or len(role.encode()) > 63:
        raise ValueError("a role name must be 1 to 63 bytes, without NUL")
    if role.lower().startswith("pg_") or role.lower() == "public":
        raise ValueError(f"{role!r} is a reserved role name")
    if password is not None and (not password or "\x00" in password):
        raise ValueError("a password must be a non-empty string without NUL")
    with store.connection() as conn:
        try:
            created = _apply(conn, role, kind, password)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    parts = psycopg.conninfo.conninfo_to_dict(store.dsn)
    parts["user"] = role
    parts.pop("password", None)
    return RoleGrant(role, kind, created, psycopg.conninfo.make_conninfo(**parts))  # type: ignore[arg-type]


def _apply(conn: psycopg.Connection, role: str, kind: Kind, password: str | None) -> bool:
    ident = sql.Identifier(role)
    me = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
    if role == me:
        raise StoreError(f"{role!r} is the role riskbook connects with; choose another")
    found = conn.execute(
        "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", (role,)
    ).fetchone()
    if found is not None and (found[0] or found[1]):
        raise StoreError(
            f"role {role!r} is a superuser (or bypasses row security): whatever is granted, "
            "it can do anything; choose another role"
        )
    conn.execute(sql.SQL("{} ROLE {} LOGIN").format(sql.SQL("ALTER" if found else "CREATE"), ident))
    if password is not None:
        verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(verifier.decode()))
        )
    schema = conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = 'events'::regclass"
    ).fetchone()[0]  # type: ignore[index]
    conn.execute(
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), ident
        )
    )
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), ident))
    # The role finds the store whatever its default search_path ("$user", public): a
    # store kept outside public was not found, and where the role may create in public
    # (PostgreSQL <= 14) connecting made it an empty store of its own.
    conn.execute(
        sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path TO {}").format(
            ident, sql.Identifier(conn.info.dbname), sql.Identifier(schema)
        )
    )
    present = [
        r[0]
        for r in conn.execute(
            "SELECT r FROM unnest(%s::text[]) r WHERE to_regclass(r) IS NOT NULL",
            (list(RELATIONS),),
        )
    ]
    writes = _WRITES.get(kind, {})
    for rel in present:
        table = sql.Identifier(rel)
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(table, ident))
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(table, ident))
        if rel in writes:
            conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(writes[rel]), table, ident))
    _check(conn, role, kind, present, writes)
    return found is None


_COLUMN_PRIVILEGES = frozenset({"INSERT", "UPDATE", "REFERENCES"})


def _check(
    conn: psycopg.Connection, role: str, kind: Kind, present: list[str], writes: dict[str, str]
) -> None:
    """Refuse a role that could still write what it may not (through a role it is a
    member of, or a grant to PUBLIC): the grants above cannot take that away."""
    leaks = []
    for rel in present:
        allowed = {w.strip() for w in writes.get(rel, "").split(",") if w.strip()}
        for privilege in _FORBIDDEN:
            if privilege in allowed:
                continue
            row = conn.execute(
                "SELECT has_table_privilege(%s, %s, %s)", (role, rel, privilege)
            ).fetchone()
            if row and row[0]:
                leaks.append(f"{privilege} on {rel}")
            elif privilege in _COLUMN_PRIVILEGES:  # e.g. UPDATE (position) via a group
                row = conn.execute(
                    "SELECT has_any_column_privilege(%s, %s, %s)", (role, rel, privilege)
                ).fetchone()
                if row and row[0]:
                    leaks.append(f"{privilege} on columns of {rel}")
    if leaks:
        raise StoreError(
            f"role {role!r} would still have {', '.join(leaks)} (inherited from a role it is a "
            f"member of, or granted to PUBLIC); revoke that first; nothing was changed"
        )
