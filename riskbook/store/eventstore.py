"""The event store on PostgreSQL (DESIGN.md §3).

One place owns the database: this module wraps the driver (SQLAlchemy's pool over
psycopg 3) and turns its errors into riskbook's own; nothing above it sees a psycopg
exception.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import itertools
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote

import msgspec
import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.copy import FileWriter

from riskbook.errors import ConcurrencyConflict, ImportFailed, InvalidEvent, StoreError
from riskbook.events import (
    _FINER_FRACTION,
    EVENT_TYPES,
    MAX_SEQUENCE,
    Envelope,
    Event,
    RawEvent,
    _check_aggregate,
    _envelope_decoder,
    _EnvelopeIn,
    _exact_times,
    canonical_fields,
    canonical_json,
    canonical_payload,
    check_for_aggregate,
    check_metadata,
    check_raw_envelope,
    check_text,
    decode_envelope,
    decode_event,
    encode_event,
    format_time,
    read_payload,
)
from riskbook.store import migrations

__all__ = ["Append", "ImportResult", "Store", "connect", "redact", "scrub"]

NOTIFY_CHANNEL = "riskbook_events"
_COLUMNS = (
    'position, event_id, event_type, aggregate_id, aggregate_type, sequence, "timestamp", '
    "causation_id, correlation_id, metadata, payload"
)
Progress = Callable[[str, int], None]


class _JsonBytesLoader(Loader):
    # jsonb arrives as its text; keep the bytes and decode with msgspec (much faster
    # than json.loads followed by a conversion).
    def load(self, data: Any) -> bytes:
        return bytes(data)


_PASSWORD_KEYS = ("password", "sslpassword")  # sslpassword: the client key's passphrase


def redact(dsn: str) -> str:
    """A DSN with its passwords replaced by ``***`` (safe to print or log)."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(_libpq_dsn(dsn))
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    for key in _PASSWORD_KEYS:
        if parts.get(key):
            parts[key] = "***"
    return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]


def where(dsn: str) -> str:
    """Where a DSN points, in a few words (no password): ``database riskbook on
    db.example.com:5432 as alice``; a Unix socket's folder stands for the host."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(_libpq_dsn(dsn))
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    host = str(parts.get("host") or parts.get("hostaddr") or "localhost")
    port = str(parts.get("port") or "5432")
    user = parts.get("user")
    dbname = parts.get("dbname") or user or "?"
    return f"database {dbname} on {host}:{port}" + (f" as {user}" if user else "")


# The password in a URL (postgresql://user:PASSWORD@host) or in key=value form.
_URL_PASSWORD = re.compile(r"^[A-Za-z0-9+.-]*://[^/?#@]*?:([^@/?#]*)@")
_KV_PASSWORD = re.compile(r"(?:^|\s)(?:ssl)?password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
# Where a message quotes a connection string, whole or in part: password=... (key=value
# or a URL's query), and the user:password@ of a URL.
_QUOTED_PASSWORD = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&'\"]+)", re.I)
_QUOTED_USERINFO = re.compile(r"(://[^/?#@:\s\"]*:)[^@/?#\s\"]*(?=@)")


def _secrets(dsn: str) -> list[str]:
    """Every form in which a password of ``dsn`` could appear in a message."""
    found: set[str] = set()
    m = _URL_PASSWORD.match(dsn)
    if m and m.group(1):
        found |= {m.group(1), unquote(m.group(1))}
    for m in _KV_PASSWORD.finditer(dsn):
        raw = m.group(1)
        found |= {raw, raw.strip("'"), raw.strip("'").replace("\\'", "'").replace("\\\\", "\\")}
    try:
        parts = psycopg.conninfo.conninfo_to_dict(_libpq_dsn(dsn))
    except psycopg.ProgrammingError:
        parts = {}
    for key in _PASSWORD_KEYS:
        if password := parts.get(key):
            found |= {str(password), quote(str(password), safe="")}
    return sorted((f for f in found if f), key=len, reverse=True)


def scrub(text: str, dsn: str | None, *, fragments: bool = False) -> str:
    """``text`` with the passwords it quotes replaced by ``***``.

    A message quotes one as part of a connection string (``password=...``,
    ``user:...@host``); those are starred whatever the password. Starring every
    appearance of the password's text would garble ordinary messages ("password
    authentication failed" with the password "password") and tell which words it is.
    ``fragments`` is for libpq's errors about the DSN's own syntax, which quote pieces of
    it (``missing "=" after "..."``): there every appearance of ``dsn``'s passwords goes.
    """
    text = _QUOTED_USERINFO.sub(r"\1***", _QUOTED_PASSWORD.sub(r"\1***", text))
    if fragments and dsn:
        for secret in _secrets(dsn):
            text = text.replace(secret, "***")
    return text


def _about_the_dsn(exc: BaseException) -> bool:
    """A libpq error about the connection string's syntax (no SQLSTATE: not the server's)."""
    return isinstance(exc, psycopg.ProgrammingError) and exc.sqlstate is None


def _connect(dsn: str, **kwargs: Any) -> psycopg.Connection:
    """psycopg.connect, its failure a StoreError that shows no password.

    The StoreError is raised outside the ``except`` block, so that it does not even
    carry psycopg's exception (whose message may quote the connection string) as its
    context: tracebacks, loggers and notebooks cannot show what is not there.
    """
    try:
        return read_committed(psycopg.connect(dsn, **kwargs))
    except psycopg.Error as exc:
        text = scrub(_one_line(str(exc)), dsn, fragments=_about_the_dsn(exc))
        message = f"cannot connect to {redact(dsn)}: {text}"
    raise StoreError(message)


def read_committed(conn: psycopg.Connection) -> psycopg.Connection:
    """``conn``, its transactions READ COMMITTED from now on, whatever the default of
    the database or the role (``ALTER DATABASE ... SET default_transaction_isolation``).

    riskbook's reads compute the visibility fence in a statement of their own and read
    in the next ones (:func:`_fence`), which holds only if the next statements take a
    later snapshot; under REPEATABLE READ or SERIALIZABLE the fence falls back to the
    statement's own snapshot, and a transaction of another database that ended in
    between held it below events committed well before: a processor's catch-up found
    nothing new, a reader missed what its caller had just appended. Closed on failure.
    """
    try:
        conn.execute("SET default_transaction_isolation TO 'read committed'")
        if not conn.autocommit:
            conn.commit()
    except BaseException:
        conn.close()
        raise
    return conn


class TransientStoreError(StoreError):
    """A statement failed for a reason that passes: a lost connection, a deadlock, a
    serialization failure, a lock or statement timeout, a cancelled query. The same work,
    retried (in a new transaction), can succeed; the live processor retries it.

    Raised by :meth:`Store._translate` (so by :meth:`Store.append_in` and the store's
    connections) in place of a plain :class:`~riskbook.errors.StoreError`; ``sqlstate``
    is PostgreSQL's error code (``"40P01"`` a deadlock; None: no answer from the server).
    """

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


_LOST_STATES = frozenset({"57P01", "57P02", "57P03", "57P05"})
"""Shutdowns and idle timeouts: the server ended the session (a lost connection too)."""
_TRANSIENT_STATES = frozenset({"40000", "40001", "40003", "40P01", "55P03", "57014", "53300"})
"""Transaction rollback (serialization failure, deadlock, ...), lock not available,
query cancelled (a timeout, a cancel), too many connections."""


def _lost(exc: psycopg.Error) -> bool:
    """A lost or refused connection (not a statement the server refused)?"""
    state = exc.sqlstate
    return isinstance(exc, psycopg.OperationalError) and (
        state is None or state.startswith("08") or state in _LOST_STATES
    )


def _transient(exc: psycopg.Error) -> bool:
    """Would the same work, retried, succeed? (See :class:`TransientStoreError`.)"""
    return _lost(exc) or exc.sqlstate in _TRANSIENT_STATES


def _one_line(text: str) -> str:
    """A driver's message on one line: libpq puts its hints on lines of their own."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _libpq_dsn(dsn: str) -> str:
    # Accept SQLAlchemy-style URLs too: postgresql+psycopg://... -> postgresql://...
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres+psycopg://"):
        if dsn.startswith(prefix):
            return "postgresql://" + dsn[len(prefix) :]
    return dsn


@dataclass(frozen=True)
class ImportResult:
    """What an import did.

    ``read`` records were read; ``added`` of them were written; ``skipped`` were not,
    their event being there already: stored before the import, or given by an earlier
    record of the same input (an exact repeat, kept once). ``repeated`` counts the
    latter, so ``skipped - repeated`` events were already in the store.
    """

    read: int
    added: int
    skipped: int
    seconds: float
    repeated: int = 0

    def __str__(self) -> str:
        rate = self.read / self.seconds if self.seconds > 0 else float("inf")
        present = self.skipped - self.repeated
        repeats = f", repeated in the input {self.repeated:,}" if self.repeated else ""
        return (
            f"read {self.read:,} events, added {self.added:,}, already present {present:,}"
            f"{repeats} in {self.seconds:.2f} s ({rate:,.0f} events/s)"
        )


class Store:
    """An event store in one PostgreSQL database.

    Parameters
    ----------
    dsn : a libpq connection string or URL. ``None`` uses ``RISKBOOK_DSN`` if set, and
        otherwise the embedded server (started, or attached to, on demand).
    migrate : bring the schema up to date on connect (default).

    The schema is migrated on connect; the store is safe to share between threads.
    """

    def __init__(self, dsn: str | None = None, *, migrate: bool = True) -> None:
        if dsn is not None and not isinstance(dsn, str):
            raise TypeError(f"dsn must be a DSN string or None, got {type(dsn).__name__}")
        if dsn is None:
            dsn = os.environ.get("RISKBOOK_DSN") or None
        if dsn is None:
            from riskbook.store.embedded import default_server

            dsn = default_server().attach()
        self._dsn = _libpq_dsn(dsn)
        self._engine = sa.create_engine(
            "postgresql+psycopg://",
            creator=self._new_connection,
            pool_size=4,
            max_overflow=16,
        )
        if migrate:
            self.migrate(create=False)

    # ------------------------------------------------------------------ plumbing

    def _new_connection(self) -> psycopg.Connection:
        conn = _connect(self._dsn)
        conn.adapters.register_loader("jsonb", _JsonBytesLoader)
        return conn

    def _clean(self, exc: BaseException) -> str:
        return scrub(_one_line(str(exc)), self._dsn, fragments=_about_the_dsn(exc))

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled psycopg connection (not autocommit, READ COMMITTED whatever the
        database's default: :func:`read_committed`); rolled back when returned.

        For riskbook's own layers (frames, live): errors are translated to StoreError.
        """
        failure: str | None = None
        try:
            fairy = self._engine.raw_connection()
        except sa.exc.DBAPIError as exc:
            failure = f"cannot connect to {redact(self._dsn)}: {self._clean(exc.orig or exc)}"
        if failure is not None:  # raised here, so that it carries no psycopg exception
            raise StoreError(failure)
        conn = fairy.driver_connection
        assert isinstance(conn, psycopg.Connection)
        try:
            yield conn
        except psycopg.Error as exc:
            raise self._translate(exc) from None
        finally:
            if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.UNKNOWN:
                fairy.invalidate()  # lost (server restarted, say): do not pool it again
                # and the idle ones pooled with it, most likely lost the same way (a
                # restart, an idle timeout): let them go, so the next calls connect anew
                # instead of failing one by one
                self._engine.dispose()
            fairy.close()

    def _translate(self, exc: psycopg.Error) -> StoreError:
        """psycopg's error as riskbook's, in one line without the password: a
        :class:`TransientStoreError` for one that passes (lost connection, deadlock, ...:
        retrying can succeed), else a :class:`~riskbook.errors.StoreError`; each worded
        by what happened (PostgreSQL's own message: "deadlock detected", "canceling
        statement due to lock timeout", ...)."""
        if _lost(exc):
            return TransientStoreError(
                f"lost or refused connection to {redact(self._dsn)}: {self._clean(exc)}",
                exc.sqlstate,
            )
        diag = exc.diag
        msg = scrub(diag.message_primary or "", self._dsn) or self._clean(exc)
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            msg += (
                f" (the role {self._role()!r} lacks the privilege: see `riskbook db"
                " grant-reader` and `riskbook db grant-processor` for what each role may do)"
            )
        if diag.message_hint:
            msg += f" (hint: {scrub(diag.message_hint, self._dsn)})"
        if _transient(exc):
            return TransientStoreError(_one_line(msg), exc.sqlstate)
        return StoreError(_one_line(msg))

    def _role(self) -> str:
        try:
            user = psycopg.conninfo.conninfo_to_dict(self._dsn).get("user")
        except psycopg.ProgrammingError:
            user = None
        return str(user or os.environ.get("PGUSER") or "?")

    @property
    def dsn(self) -> str:
        """The connection string, password included: do not print it (see :func:`redact`)."""
        return self._dsn

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine (for pandas, SQL tools, ...)."""
        return self._engine

    def __repr__(self) -> str:
        return f"Store({redact(self._dsn)!r})"

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def migrate(
        self, *, target: int | None = None, create: bool = True, notices: list[str] | None = None
    ) -> list[int]:
        """Bring the schema to ``target`` (default: newest); return the versions applied.

        Nothing is written when the schema is already there, so a role that may only
        read (``riskbook db grant-reader``) can connect to a current store; to one that
        is behind, it gets an error saying who must upgrade it. ``create`` False (what
        connecting does): refuse to make a new store when the database holds one in a
        schema this connection's search_path does not reach. What a migration says it
        could not do goes to ``notices`` if given, else is a warning.
        """
        conn = _connect(self._dsn, autocommit=True)
        said: list[str] = []
        try:
            with conn:
                ran = migrations.migrate(conn, target=target, create=create, notices=said)
        except psycopg.errors.InsufficientPrivilege:
            raise StoreError(self._behind(target)) from None
        except psycopg.Error as exc:
            raise self._translate(exc) from None
        for text in said:  # e.g. a guarantee a migration could not give this store
            if notices is None:
                warnings.warn(f"riskbook: {text}", stacklevel=2)
            else:
                notices.append(text)
        return ran

    def renumber(self) -> int:
        """Give the events of a store copied from another server positions of this one;
        return how many were renumbered (0: the store needed it not).

        A position is ``(transaction id << 28) + n``, and transaction ids are the
        server's own: a copy restored on another server (pg_dump and pg_restore) holds
        positions far ahead of that server's transaction ids, so readers see none of it
        and appends are refused until it is renumbered (see
        :data:`COPIED_FROM_ANOTHER_SERVER`). Its events get the positions of two
        transaction ids no transaction ever has (1 and 2), in their order, below every
        reader's fence; the processors' checkpoints and the position snapshots move
        with them. Sequences, hashes and recorded times are untouched.

        One transaction, as the owner of the store (it lifts the append-only triggers
        of events and their typed copy for its own statements); caches of the copy's
        history (``riskbook.load``, processor snapshots) are not used after it. At most
        2 x 268,435,455 events.
        """
        conn = _connect(self._dsn)
        try:
            with conn, conn.transaction():
                conn.execute(
                    "LOCK TABLE events, event_fields, processor_checkpoints, position_snapshots"
                    " IN ACCESS EXCLUSIVE MODE"
                )
                row = conn.execute(_COPIED_SQL).fetchone()
                assert row is not None
                copied, count = bool(row[0]), int(row[1])
                if not copied:
                    return 0
                if count > 2 * _PER_TRANSACTION:
                    raise StoreError(
                        f"the store holds {count:,} events: renumber gives at most"
                        f" {2 * _PER_TRANSACTION:,} positions"
                    )
                for statement in _RENUMBER_SQL:
                    conn.execute(statement)
            return count
        except psycopg.errors.InsufficientPrivilege:
            raise StoreError(
                f"the role {self._role()!r} may not renumber this store: connect as its owner"
            ) from None
        except psycopg.Error as exc:
            raise self._translate(exc) from None
        finally:
            conn.close()

    def _behind(self, target: int | None) -> str:
        try:
            with _connect(self._dsn) as conn:
                have = max(migrations.applied_versions(conn), default=0)
        except psycopg.errors.InsufficientPrivilege:
            return (
                f"the role {self._role()!r} may not read this store: ask its owner for "
                "`riskbook db grant-reader` (or grant-processor), and connect with the DSN "
                "it prints"
            )
        except (StoreError, psycopg.Error):
            have = 0
        want = migrations.head() if target is None else target
        if have >= want:
            return f"the role {self._role()!r} may not do what the upgrade needed here"
        return (
            f"the database schema is at version {have} and this riskbook needs {want}; the "
            f"role {self._role()!r} may not upgrade it: run `riskbook db upgrade` as the "
            "store's owner"
        )

    def schema_version(self) -> int:
        with self.connection() as conn:
            versions = migrations.applied_versions(conn)
        return max(versions, default=0)

    # ------------------------------------------------------------------ append

    def append(
        self,
        aggregate_id: str,
        events: Sequence[Event],
        expected_version: int | None = None,
        *,
        correlation_id: str | None = None,
        causation_id: uuid.UUID | str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Envelope]:
        """Append ``events`` to one aggregate, atomically.

        ``expected_version`` is the aggregate's current version as the caller last saw it
        (0 for a new aggregate); if another writer got there first, raises
        :class:`~riskbook.ConcurrencyConflict` and writes nothing. ``None`` appends
        after whatever is there. The batch shares ``correlation_id`` (new if not given),
        ``causation_id`` and ``metadata``. Returns the stored envelopes.
        """
        batch = _AppendBatch(
            aggregate_id, events, expected_version, correlation_id, causation_id, metadata
        )
        if not batch.events:
            if batch.expected is not None:  # nothing to write, but the check still holds
                with self.connection() as conn:
                    batch.check_version(conn)
            return []
        with self.connection() as conn:
            # One statement, so autocommit makes it one atomic round trip.
            conn.autocommit = True
            try:
                return self._append_retrying(conn, batch, savepoint=False)
            finally:
                conn.autocommit = False

    def append_in(
        self,
        conn: psycopg.Connection,
        aggregate_id: str,
        events: Sequence[Event],
        expected_version: int | None = None,
        *,
        correlation_id: str | None = None,
        causation_id: uuid.UUID | str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Envelope]:
        """:meth:`append` inside the caller's transaction on ``conn`` (not committed).

        Used by the live processor to commit effects and its checkpoint together. A
        failure that passes (a deadlock with another writer, a serialization failure, a
        lock or statement timeout, a lost connection) raises :class:`TransientStoreError`
        (a StoreError): roll the transaction back and retry it.
        """
        batch = _AppendBatch(
            aggregate_id, events, expected_version, correlation_id, causation_id, metadata
        )
        if not batch.events:
            if batch.expected is not None:
                try:
                    batch.check_version(conn)
                except psycopg.Error as exc:
                    raise self._translate(exc) from None
            return []
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.execute("SELECT 1")  # open the caller's transaction: attempts are savepoints
        return self._append_retrying(conn, batch, savepoint=True)

    def append_each_in(
        self, conn: psycopg.Connection, appends: Sequence[Append]
    ) -> list[list[Envelope]]:
        """Several :meth:`append_in` at once, each to its own aggregate after whatever
        is there (no expected version), in one statement: one round trip and one run of
        the store's insert trigger for them all, where one append each costs three
        round trips and a trigger run (~1.5 ms an append here). The live processor
        commits a micro-batch's effects so. Returns each append's envelopes; the
        positions follow the order of ``appends``. Atomic: all of them or none.
        """
        batches = [
            _AppendBatch(
                a.aggregate_id, a.events, None, a.correlation_id, a.causation_id, a.metadata
            )
            for a in appends
        ]
        params: dict[str, list[Any]] = {k: [] for k in _APPEND_EACH_ARRAYS}
        for b in batches:
            n = len(b.events)
            if not n:
                continue
            params["aggs"] += [b.aggregate_id] * n
            params["agg_types"] += [b.aggregate_type] * n
            params["ids"] += b.ids
            one = n == 1  # the batch's own parameters, encoded once
            params["types"] += [b.params["type"]] if one else b.params["types"]
            params["payloads"] += [b.params["payload"]] if one else b.params["payloads"]
            params["causations"] += [b.causation] * n
            params["correlations"] += [b.correlation] * n
            params["metadatas"] += [b.params["metadata"]] * n
        if not params["ids"]:
            return [[] for _ in batches]
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.execute("SELECT 1")  # open the caller's transaction: attempts are savepoints
        for _ in range(50):
            try:
                with conn.transaction():
                    rows = conn.execute(
                        _APPEND_EACH_SQL, {**params, "n": len(params["ids"])}
                    ).fetchall()
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name == _TRADE_KEY:
                    raise _trade_id_taken(exc) from None
                if exc.diag.constraint_name != "events_aggregate_sequence_key":
                    raise self._translate(exc) from None
                _retry_in_place(conn)
                continue  # another writer appended to one of them first: go after it
            except psycopg.Error as exc:
                raise self._translate(exc) from None
            rows.sort()  # positions in the order of the appends
            out = []
            for b in batches:
                n = len(b.events)
                out.append(b.envelopes(rows[:n]) if n else [])
                del rows[:n]
            return out
        raise StoreError("too much contention on the aggregates of the appends, gave up")

    def _append_retrying(
        self, conn: psycopg.Connection, batch: _AppendBatch, *, savepoint: bool
    ) -> list[Envelope]:
        for _ in range(50):
            try:
                if savepoint:
                    with conn.transaction():
                        rows = conn.execute(batch.statement, batch.params).fetchall()
                else:
                    rows = conn.execute(batch.statement, batch.params).fetchall()
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name == _TRADE_KEY:
                    raise _trade_id_taken(exc) from None
                if exc.diag.constraint_name != "events_aggregate_sequence_key":
                    raise self._translate(exc) from None
                if batch.expected is not None:
                    actual = self._version_in(conn, batch.aggregate_id)
                    raise ConcurrencyConflict(batch.aggregate_id, batch.expected, actual) from None
                if savepoint:
                    _retry_in_place(conn)
                continue  # no expected version: someone appended first, go after them
            except psycopg.Error as exc:
                raise self._translate(exc) from None
            if not rows:
                actual = self._version_in(conn, batch.aggregate_id)
                raise ConcurrencyConflict(batch.aggregate_id, batch.expected or 0, actual)
            return batch.envelopes(rows)
        raise StoreError(f"aggregate {batch.aggregate_id!r}: too much contention, gave up")

    # ------------------------------------------------------------------ read

    def version(self, aggregate_id: str) -> int:
        """The aggregate's current version (0 if it has no events)."""
        with self.connection() as conn:
            return self._version_in(conn, aggregate_id)

    @staticmethod
    def _version_in(conn: psycopg.Connection, aggregate_id: str) -> int:
        row = conn.execute(
            "SELECT coalesce(max(sequence), 0) FROM events WHERE aggregate_id = %s",
            (aggregate_id,),
        ).fetchone()
        return int(row[0]) if row else 0

    def read(
        self, aggregate_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[Envelope]:
        """One aggregate's events with ``from_version <= sequence <= to_version``."""
        with self.connection() as conn:
            cur = conn.execute(
                f"SELECT {_COLUMNS} FROM events WHERE aggregate_id = %s AND sequence >= %s"
                " AND (%s::bigint IS NULL OR sequence <= %s::bigint) ORDER BY sequence",
                (aggregate_id, from_version, to_version, to_version),
            )
            return [_envelope(r) for r in cur]

    def read_all(self, after: int = 0, limit: int | None = None) -> list[Envelope]:
        """Events after global position ``after``, in global order.

        Gap-safe: reads only below the visibility fence, so an event committed later by
        a slower transaction can never land behind a position already returned. Pass the
        last envelope's position as ``after`` to continue.
        """
        with self.connection() as conn:
            return _read_after(conn, after, limit)

    def iter_all(self, after: int = 0, *, batch_size: int = 10_000) -> Iterator[Envelope]:
        """Every readable event after ``after``, in global order, fetched in batches."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        return self._iter_all(after, batch_size)

    def _iter_all(self, after: int, batch_size: int) -> Iterator[Envelope]:
        while True:
            batch = self.read_all(after, limit=batch_size)
            yield from batch
            if len(batch) < batch_size:
                return
            after = batch[-1].position or after

    def head(self) -> int:
        """The highest position a reader can see now (0 if none)."""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT coalesce(max(position), 0) FROM events WHERE position < %s",
                (_fence(conn),),
            ).fetchone()
            return int(row[0]) if row else 0

    def count(self) -> int:
        """How many events the store holds (committed and visible now)."""
        with self.connection() as conn:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
            return int(row[0]) if row else 0

    def follow(
        self,
        after: int = 0,
        *,
        batch_size: int = 10_000,
        idle_timeout: float | None = None,
        max_wait: float = 1.0,
    ) -> Iterator[list[Envelope]]:
        """Yield batches of new events in global order, forever (or until idle).

        Woken by NOTIFY on every append, with a catch-up read on start and after every
        wake; no polling while idle, except a safety re-check every ``max_wait`` seconds
        (an old open transaction can hold the fence back after its notification).
        Stops when nothing arrives for ``idle_timeout`` seconds (``None``: never).
        """
        conn = _connect(self._dsn, autocommit=True)
        conn.adapters.register_loader("jsonb", _JsonBytesLoader)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
            idle_since = time.monotonic()
            wait = max_wait
            while True:
                batch = _read_after(conn, after, batch_size)
                if batch:
                    after = batch[-1].position or after
                    idle_since = time.monotonic()
                    wait = max_wait
                    yield batch
                    if len(batch) == batch_size:
                        continue
                if idle_timeout is not None:
                    left = idle_timeout - (time.monotonic() - idle_since)
                    if left <= 0:
                        return
                    wait = min(wait, left)
                notified = max(
                    (
                        _notified_position(n.payload)
                        for n in conn.notifies(timeout=wait, stop_after=1)
                    ),
                    default=0,
                )
                # Notified of a position we cannot read yet: an older transaction is still
                # open below it. Re-check soon, backing off, instead of waiting a full period.
                wait = 0.005 if notified > after else max_wait
        except psycopg.Error as exc:
            raise self._translate(exc) from None
        finally:
            conn.close()

    # ------------------------------------------------------------------ import

    def import_jsonl(
        self, path: str | os.PathLike[str] | IO[bytes], *, progress: Progress | None = None
    ) -> ImportResult:
        """Import a JSON Lines file of envelopes, plain or gzip (told by its first bytes).

        ``path`` may also be a binary stream open for reading, read to its end
        (``sys.stdin.buffer``: ``riskbook import -``); errors name it by its ``name``
        (``<stdin>``).

        Keeps each envelope's ``event_id`` and ``timestamp``; assigns ``sequence`` per
        aggregate in file order where absent, and ``position`` always (a given one, from
        an export, is the order of another store); events already in the store (same
        event_id, same content) are skipped, so importing a file twice adds nothing, and
        so is a line that repeats an earlier line exactly (counted apart:
        :attr:`ImportResult.repeated`). Same content means every field the store keeps:
        event type, aggregate id and type, recorded time, causation and correlation id,
        metadata, payload, and the sequence where the line gives one. An event id
        repeated with other content, a given sequence the aggregate has already (or
        that another line gives), or any bad line refuses the whole file with the line
        number and what is wrong: nothing of it is written. A UTF-8 byte order mark at
        the start of the file is ignored. Writes of other sessions to its aggregates
        while it runs go first: the events it assigns sequences to follow them, and the
        events they stored are skipped as already present.

        Lines are validated and streamed to PostgreSQL while the file is read, so the
        client and the server work at the same time. Into an empty store the import
        takes the ``events`` table for itself and builds its indexes once at the end
        (like ``pg_restore``): readers wait until it commits.
        """
        given: Path | IO[bytes]
        if isinstance(path, str | os.PathLike):
            given = Path(path)
            source = str(given)
            if given.is_dir():
                raise ImportFailed(f"{given}: is a directory, not a file")
            if not given.exists():
                raise ImportFailed(f"{given}: no such file")
        else:
            given, name = path, getattr(path, "name", None)
            source = name if isinstance(name, str) else "input"
        with _regular_file(given, source) as path:

            def open_lines() -> Iterator[_Record]:
                try:
                    with _open_maybe_gzip(path) as fh:
                        yield from _records_from_lines(_without_bom(fh, source), source, progress)
                except (OSError, EOFError, zlib.error) as exc:
                    # zlib's own errors are what a damaged deflate stream raises through gzip
                    what = "damaged gzip data" if isinstance(exc, zlib.error) else "cannot read"
                    raise ImportFailed(f"{source}: {what}: {exc}; nothing was written") from None

            return self._bulk_write(open_lines, source=source, progress=progress)

    def import_lines(
        self, lines: Iterable[bytes], *, progress: Progress | None = None, source: str = "input"
    ) -> ImportResult:
        """Import envelope lines (see :meth:`import_jsonl`)."""
        kept = list(lines)
        return self._bulk_write(
            lambda: _records_from_lines(_without_bom(kept, source), source, progress),
            source=source,
            progress=progress,
        )

    def import_envelopes(
        self, envelopes: Iterable[Envelope], *, progress: Progress | None = None
    ) -> ImportResult:
        """Bulk-write envelopes made in Python (a simulator, a migration from elsewhere).

        Same rules as :meth:`import_jsonl`: ids and recorded times are kept; a
        ``sequence`` of 0 is assigned per aggregate in order; already-present events are
        skipped; all or nothing. An envelope that is wrong (a mistyped field, an
        aggregate type its event does not belong to, a negative sequence, ...) refuses
        the whole batch with its number (from 1) and the field.
        """
        kept = envelopes if isinstance(envelopes, list) else list(envelopes)

        def records() -> Iterator[_Record]:
            for n, env in enumerate(kept, 1):
                try:
                    record = _envelope_record(n, env)
                except InvalidEvent as exc:
                    raise ImportFailed(f"envelope {n}: {exc}") from None
                yield record
                if progress is not None and n % 100_000 == 0:
                    progress("validated", n)

        return self._bulk_write(records, source="envelopes", progress=progress, unit="envelope")

    @contextmanager
    def trusted_copy(self) -> Iterator[Callable[[list[bytes]], None]]:
        """Write pre-formatted rows straight into ``events``, in one transaction.

        For producers that are valid by construction (the simulator) and too fast for
        per-event validation: each row is a line of ``COPY events`` text with the
        columns ``TRUSTED_COPY_COLUMNS`` (no position; newline-terminated), and must be
        in global order, each aggregate's rows in sequence order from its stored
        version on. Positions are reserved here as for every write, and each row's hash
        is chained here (its metadata and payload are written as their canonical JSON,
        see :func:`riskbook.events.canonical_json`); the insert trigger derives what it
        derives. Nothing else is validated: use :meth:`import_envelopes` for anything
        else. Commits when the block ends.

        Into an empty store (locked for the while, as an import into one is), the
        indexes but events' primary key are built once at the end instead of row by
        row: at 1M simulated events, 40-41k -> 48-49k events/s here.
        """
        with self.connection() as conn:
            empty = _lock_if_empty(conn)
            deferred = _drop_secondary_indexes(conn) if empty else None
            chain = _CopyChain(conn, empty=empty)

            def write(lines: list[bytes]) -> None:
                base = _scalar(conn, "SELECT riskbook_reserve_positions(%s)", (len(lines),))
                chain.fetch_heads(lines)  # before COPY takes the connection
                with conn.cursor().copy(
                    f"COPY events (position, {TRUSTED_COPY_COLUMNS}, hash) FROM STDIN"
                ) as copy:
                    for i in range(0, len(lines), 20_000):
                        copy.write(chain.rows(lines[i : i + 20_000], base + i))

            yield write
            if deferred is not None:
                try:
                    _build_indexes(conn, deferred)
                except psycopg.errors.UniqueViolation as exc:
                    raise StoreError(
                        f"trusted copy: {exc.diag.message_detail or exc.diag.message_primary}"
                    ) from None
            conn.commit()

    def _bulk_write(
        self,
        records: Callable[[], Iterator[_Record]],
        *,
        source: str,
        progress: Progress | None,
        unit: str = "line",
    ) -> ImportResult:
        started = time.perf_counter()
        try:
            with self.connection() as conn, _gc_paused():
                empty = _lock_if_empty(conn)
                outcome = (
                    _load_into_empty(conn, records(), source, progress, unit) if empty else None
                )
                if outcome is None:
                    if empty:  # the input repeats event ids: take the general road
                        conn.rollback()
                    outcome = _load_general(conn, records(), source, progress, unit)
                conn.commit()
        except StoreError as exc:
            if isinstance(exc, ImportFailed):
                raise
            raise ImportFailed(f"{source}: {exc}; nothing was written") from None
        read, added, repeated = outcome
        if progress is not None:
            progress("written", added)
        return ImportResult(
            read, added, read - added, time.perf_counter() - started, repeated=repeated
        )


def connect(dsn: str | None = None, *, migrate: bool = True) -> Store:
    """Open the event store: ``dsn``, else ``RISKBOOK_DSN``, else the embedded server."""
    return Store(dsn, migrate=migrate)


# ---------------------------------------------------------------------- helpers


def _envelope(row: tuple[Any, ...]) -> Envelope:
    pos, event_id, event_type, agg, agg_type, seq, ts, causation, correlation, meta, payload = row
    return Envelope(
        event_id=event_id,
        aggregate_id=agg,
        aggregate_type=agg_type,
        sequence=seq,
        timestamp=ts.astimezone(UTC),
        payload=read_payload(event_type, payload),
        correlation_id=correlation,
        causation_id=causation,
        metadata=msgspec.json.decode(meta) if isinstance(meta, bytes) else meta,
        position=pos,
    )


def _retry_in_place(conn: psycopg.Connection) -> None:
    """Whether an append in the caller's transaction, which another writer overtook on
    an aggregate, may try again in a savepoint: only under READ COMMITTED, where the
    next try's statement sees the other's events. Under REPEATABLE READ or SERIALIZABLE
    (a database's default, say) it never would: a :class:`TransientStoreError`, so that
    the caller retries the transaction."""
    level = conn.execute("SELECT current_setting('transaction_isolation')").fetchone()
    if level is None or level[0] != "read committed":
        raise TransientStoreError(
            f"another transaction appended to the same aggregate first, and this one reads"
            f" a snapshot of before ({level[0] if level else '?'}): roll back and retry it"
        )


def _fence(conn: psycopg.Connection) -> int:
    """The visibility fence for a read by the next statements on ``conn``.

    Computed in a statement of its own (riskbook_settled_fence), and not inside the
    reading one (riskbook_position_fence): the fence of a statement's own snapshot has
    to keep every transaction that snapshot saw running, and one of another database
    that ended before the fence looked it up in pg_stat_activity could no longer be
    told apart from one of this database. It then fell below events committed well
    before the read: read-your-writes failed about once in a thousand reads with other
    databases of the server busy. A later statement sees whatever such a transaction
    committed, so the fence may let every transaction that has ended go.

    Refuses a store copied from another server (see :meth:`Store.renumber`), checked
    in the same round trip.
    """
    row = conn.execute(_FENCE_SQL).fetchone()
    assert row is not None
    if row[1]:
        raise StoreError(COPIED_FROM_ANOTHER_SERVER)
    return int(row[0])


# Whether the store is a copy from another server: it holds an event of a transaction
# this server has not begun (one of the snapshot's own, from its xmax on; not one of
# this transaction's own, if it has an id), or a processor's checkpoint past them. The
# events are looked up as the first row of two index ranges around this transaction's
# own positions: "any row at or past a bound" was planned as a scan of the whole table
# when the statistics were those of a store just grown from empty (as in the insert
# trigger, migration 0022).
_COPIED = """
       (SELECT position FROM events
         WHERE position >= (pg_snapshot_xmax(pg_current_snapshot())::text::bigint << 28)
           AND position < coalesce(pg_current_xact_id_if_assigned()::text::bigint, 0) << 28
         ORDER BY position LIMIT 1) IS NOT NULL
       OR (SELECT position FROM events
            WHERE position >= greatest(
                      pg_snapshot_xmax(pg_current_snapshot())::text::bigint << 28,
                      (coalesce(pg_current_xact_id_if_assigned()::text::bigint, 0) + 1) << 28)
            ORDER BY position LIMIT 1) IS NOT NULL
       OR EXISTS (SELECT 1 FROM processor_checkpoints
                   WHERE position > (pg_snapshot_xmax(pg_current_snapshot())::text::bigint << 28))
"""

# The fence, and whether the store is a copy (readers refuse one).
_FENCE_SQL = f"SELECT riskbook_settled_fence(), {_COPIED}"

_PER_TRANSACTION = (1 << 28) - 1  # positions of one transaction id: n = 1 ... 2^28 - 1

# Whether the store is a copy (renumber has work), and how many events it holds.
_COPIED_SQL = f"SELECT {_COPIED}, (SELECT count(*) FROM events)"

# Store.renumber's statements, in one transaction holding the tables' locks. Positions
# are first made negative (all distinct, none positive), so that no new position meets
# an old one under the unique keys; the k-th event (k = 1, 2, ...) then gets position
# ((1 + (k - 1) / P) << 28) + (k - 1) % P + 1, P = 2^28 - 1: transaction ids 1 and 2,
# which PostgreSQL never gives a transaction. A checkpoint c (read on from c) goes to the
# new position of the first event at or after c, or past the last; a position snapshot
# of the events up to p, to the new position of the last event at or before p.
_RENUMBER_SQL = [
    # rows older than a rule of the catalogue (NOT VALID constraints: kept, set aside by
    # load) would fail the rule when updated: the rules are set aside meanwhile
    "CREATE TEMP TABLE riskbook_set_aside ON COMMIT DROP AS"
    " SELECT conrelid::regclass::text AS rel, conname, pg_get_constraintdef(oid) AS def"
    " FROM pg_constraint WHERE conrelid IN ('events'::regclass, 'event_fields'::regclass)"
    " AND contype = 'c' AND NOT convalidated",
    "DO $$ DECLARE c record; BEGIN FOR c IN SELECT * FROM riskbook_set_aside LOOP"
    " EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.rel, c.conname); END LOOP; END $$",
    "ALTER TABLE events DISABLE TRIGGER events_append_only",
    "ALTER TABLE event_fields DISABLE TRIGGER event_fields_append_only",
    "CREATE TEMP TABLE riskbook_renumbered ON COMMIT DROP AS"
    " SELECT position AS old,"
    f" ((1 + (k - 1) / {_PER_TRANSACTION}) << 28) + (k - 1) % {_PER_TRANSACTION} + 1 AS new"
    " FROM (SELECT position, row_number() OVER (ORDER BY position) AS k FROM events) e",
    "CREATE UNIQUE INDEX ON riskbook_renumbered (old)",
    "ANALYZE riskbook_renumbered",
    "UPDATE events SET position = -position",
    "UPDATE event_fields SET position = -position",
    "UPDATE events e SET position = r.new FROM riskbook_renumbered r WHERE e.position = -r.old",
    "UPDATE event_fields f SET position = r.new FROM riskbook_renumbered r"
    " WHERE f.position = -r.old",
    "UPDATE processor_checkpoints c SET position = coalesce("
    " (SELECT min(r.new) FROM riskbook_renumbered r WHERE r.old >= c.position),"
    " (SELECT max(r.new) + 1 FROM riskbook_renumbered r), (1::bigint << 28) + 1)",
    # snapshots taken twice with no event between (at two fences) now name the same
    # event: one of them is kept (their states are the same)
    "CREATE TEMP TABLE riskbook_snapshots_moved ON COMMIT DROP AS"
    " SELECT snapshot_id, row_number() OVER (PARTITION BY account_id, snapshot_at, new"
    " ORDER BY position DESC, snapshot_id) AS k, new FROM (SELECT s.snapshot_id, s.account_id,"
    " s.snapshot_at, s.position, coalesce((SELECT max(r.new) FROM riskbook_renumbered r"
    " WHERE r.old <= s.position), 0) AS new FROM position_snapshots s) m",
    "DELETE FROM position_snapshots s USING riskbook_snapshots_moved m"
    " WHERE s.snapshot_id = m.snapshot_id AND m.k > 1",
    "UPDATE position_snapshots s SET position = m.new FROM riskbook_snapshots_moved m"
    " WHERE s.snapshot_id = m.snapshot_id",
    "ALTER TABLE events ENABLE TRIGGER events_append_only",
    "ALTER TABLE event_fields ENABLE TRIGGER event_fields_append_only",
    "DO $$ DECLARE c record; BEGIN FOR c IN SELECT * FROM riskbook_set_aside LOOP"
    " EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s', c.rel, c.conname, c.def);"
    " END LOOP; END $$",
]

COPIED_FROM_ANOTHER_SERVER = (
    "the store holds events of positions ahead of every transaction this server has begun,"
    " so no reader here would reach them and nothing appended here would come after them:"
    " it was copied from another server (pg_dump and pg_restore, say), or positions were"
    " altered (`riskbook verify` names the events). A copy: run `riskbook db renumber` once,"
    " as the owner of the store (Store.renumber)"
)


def _read_after(conn: psycopg.Connection, after: int, limit: int | None) -> list[Envelope]:
    fence = _fence(conn)
    if fence <= after + 1:
        return []
    cur = conn.execute(
        f"SELECT {_COLUMNS} FROM events WHERE position > %s"
        " AND position < %s ORDER BY position LIMIT %s",
        (after, fence, limit),
    )
    return [_envelope(r) for r in cur.fetchall()]  # fetchall: rows made in C, not one by one


# The whole append is one statement (arrays are sent in binary: as text, quoting a
# thousand JSON payloads costs more than the insert itself): check the expected version,
# reserve positions, chain the hashes on from the aggregate's head, insert. A stale
# expected version inserts nothing (and returns no row); a race between two writers with
# the same expected version is settled by UNIQUE (aggregate_id, sequence). Recorded
# times are taken per row, as the column default would, but here, so that they are
# part of the hash.
_HEAD_CTE = """
WITH head AS (
    SELECT coalesce(last.sequence, 0) AS v, coalesce(last.hash, '\\x'::bytea) AS h
      FROM (SELECT) one
      LEFT JOIN (SELECT sequence, hash FROM events WHERE aggregate_id = %(agg)s
                  ORDER BY sequence DESC LIMIT 1) last ON true
)"""  # the aggregate's version and hash (empty for a new one)

_APPEND_SQL = (
    _HEAD_CTE
    + """, ok AS (
    SELECT v, h FROM head WHERE %(expected)s::bigint IS NULL OR v = %(expected)s::bigint
), base AS (
    SELECT riskbook_reserve_positions(%(n)s) AS b FROM ok
), new AS (
    SELECT t.ord, t.event_id, t.event_type, t.payload, ok.v + t.ord AS sequence,
           clock_timestamp() AS recorded, ok.h
      FROM ok, unnest(%(ids)b::uuid[], %(types)b::text[], %(payloads)b::text[]::jsonb[])
                 WITH ORDINALITY AS t(event_id, event_type, payload, ord)
)
INSERT INTO events (position, event_id, event_type, aggregate_id, aggregate_type, sequence,
                    "timestamp", causation_id, correlation_id, metadata, payload, hash)
SELECT base.b + new.ord - 1, new.event_id, new.event_type, %(agg)s, %(agg_type)s,
       new.sequence, new.recorded, %(causation)s::uuid, %(correlation)s, %(metadata)s::jsonb,
       new.payload,
       riskbook_chain(new.h, riskbook_event_digest(
           new.event_id, new.event_type, %(agg)s, %(agg_type)s, new.sequence, new.recorded,
           %(causation)s::uuid, %(correlation)s, %(metadata)s::jsonb, new.payload))
           OVER (ORDER BY new.ord)
  FROM new, base
 ORDER BY new.ord
RETURNING position, sequence, "timestamp"
"""
)


# The same for one event (the common case: a live effect, an order, a manual mark):
# scalar parameters, no arrays to send and unnest, no window to chain; the same checks,
# reservation, recorded time and hash (sha256(head's hash || digest) is the first step
# of riskbook_chain).
_APPEND_ONE_SQL = (
    _HEAD_CTE
    + """, new AS (
    SELECT riskbook_reserve_positions(1) AS position, v + 1 AS sequence,
           clock_timestamp() AS recorded, h
      FROM head WHERE %(expected)s::bigint IS NULL OR v = %(expected)s::bigint
)
INSERT INTO events (position, event_id, event_type, aggregate_id, aggregate_type, sequence,
                    "timestamp", causation_id, correlation_id, metadata, payload, hash)
SELECT new.position, %(id)s::uuid, %(type)s, %(agg)s, %(agg_type)s, new.sequence,
       new.recorded, %(causation)s::uuid, %(correlation)s, %(metadata)s::jsonb,
       %(payload)s::jsonb,
       sha256(new.h || riskbook_event_digest(
           %(id)s::uuid, %(type)s, %(agg)s, %(agg_type)s, new.sequence, new.recorded,
           %(causation)s::uuid, %(correlation)s, %(metadata)s::jsonb, %(payload)s::jsonb))
  FROM new
RETURNING position, sequence, "timestamp"
"""
)


# Several appends, each to its own aggregate after its head (no expected version), in
# one statement: every aggregate's head, one reservation of positions for them all (in
# the order given), each aggregate's sequences and hash chain on from its head.
_APPEND_EACH_SQL = """
WITH input AS (
    SELECT * FROM unnest(%(aggs)s::text[], %(agg_types)s::text[], %(ids)s::uuid[],
                         %(types)s::text[], %(payloads)s::text[]::jsonb[],
                         %(causations)s::uuid[], %(correlations)s::text[],
                         %(metadatas)s::text[]::jsonb[])
           WITH ORDINALITY AS t(agg, agg_type, event_id, event_type, payload, causation,
                                correlation, metadata, ord)
), head AS (
    SELECT a.agg, coalesce(last.sequence, 0) AS v, coalesce(last.hash, '\\x'::bytea) AS h
      FROM (SELECT DISTINCT agg FROM input) a
      LEFT JOIN LATERAL (SELECT sequence, hash FROM events WHERE aggregate_id = a.agg
                          ORDER BY sequence DESC LIMIT 1) last ON true
), base AS (
    SELECT riskbook_reserve_positions(%(n)s) AS b
), new AS (
    SELECT i.*, head.v + row_number() OVER (PARTITION BY i.agg ORDER BY i.ord) AS sequence,
           clock_timestamp() AS recorded, head.h
      FROM input i JOIN head ON head.agg = i.agg
)
INSERT INTO events (position, event_id, event_type, aggregate_id, aggregate_type, sequence,
                    "timestamp", causation_id, correlation_id, metadata, payload, hash)
SELECT base.b + new.ord - 1, new.event_id, new.event_type, new.agg, new.agg_type,
       new.sequence, new.recorded, new.causation, new.correlation, new.metadata, new.payload,
       riskbook_chain(new.h, riskbook_event_digest(
           new.event_id, new.event_type, new.agg, new.agg_type, new.sequence, new.recorded,
           new.causation, new.correlation, new.metadata, new.payload))
           OVER (PARTITION BY new.agg ORDER BY new.ord)
  FROM new, base
 ORDER BY new.ord
RETURNING position, sequence, "timestamp"
"""


_APPEND_EACH_ARRAYS = (
    "aggs", "agg_types", "ids", "types", "payloads", "causations", "correlations", "metadatas"
)  # fmt: skip


@dataclass(frozen=True)
class Append:
    """One append of :meth:`Store.append_each_in`: ``events`` to ``aggregate_id``, with
    the envelope fields :meth:`Store.append` takes."""

    aggregate_id: str
    events: Sequence[Event]
    correlation_id: str | None = None
    causation_id: uuid.UUID | str | None = None
    metadata: Mapping[str, Any] | None = None


class _AppendBatch:
    """A validated batch for one aggregate and the parameters of its INSERT."""

    def __init__(
        self,
        aggregate_id: str,
        events: Sequence[Event],
        expected_version: int | None,
        correlation_id: str | None,
        causation_id: uuid.UUID | str | None,
        metadata: Mapping[str, Any] | None,
    ) -> None:
        self.aggregate_id = aggregate_id
        self.events = check_for_aggregate(events, aggregate_id)
        if expected_version is not None and (
            isinstance(expected_version, bool)
            or not isinstance(expected_version, int)
            or expected_version < 0
        ):
            raise ValueError(f"expected_version must be an int >= 0, got {expected_version!r}")
        self.expected = expected_version
        if not self.events:
            return
        kind = type(self.events[0]).__name__
        try:
            self.causation = None if causation_id is None else uuid.UUID(str(causation_id))
        except ValueError:
            raise InvalidEvent(kind, "causation_id", f"{causation_id!r} is not a UUID") from None
        if correlation_id is not None:
            check_text(correlation_id, kind, "correlation_id")
        self.correlation = correlation_id if correlation_id is not None else str(uuid.uuid4())
        self.metadata = dict(metadata or {})
        metadata_json = check_metadata(self.metadata, kind)
        self.ids = [uuid.uuid4() for _ in self.events]
        self.aggregate_type = self.events[0].aggregate_type
        self.params: dict[str, Any] = {
            "agg": aggregate_id,
            "agg_type": self.aggregate_type,
            "expected": expected_version,
            "causation": self.causation,
            "correlation": self.correlation,
            "metadata": metadata_json,
        }
        if len(self.events) == 1:
            self.statement = _APPEND_ONE_SQL
            self.params["id"] = self.ids[0]
            self.params["type"] = kind
            self.params["payload"] = encode_event(self.events[0]).decode()
        else:
            self.statement = _APPEND_SQL
            self.params["n"] = len(self.events)
            self.params["ids"] = self.ids
            self.params["types"] = [type(e).__name__ for e in self.events]
            self.params["payloads"] = [encode_event(e).decode() for e in self.events]

    def check_version(self, conn: psycopg.Connection) -> None:
        """Raise ConcurrencyConflict unless the aggregate is at the expected version (for
        an empty batch, which writes nothing but must not pass a stale version)."""
        actual = Store._version_in(conn, self.aggregate_id)
        if self.expected is not None and actual != self.expected:
            raise ConcurrencyConflict(self.aggregate_id, self.expected, actual)

    def envelopes(self, rows: list[tuple[Any, ...]]) -> list[Envelope]:
        rows.sort()
        return [
            Envelope(
                event_id=event_id,
                aggregate_id=self.aggregate_id,
                aggregate_type=self.aggregate_type,
                sequence=seq,
                timestamp=ts.astimezone(UTC),
                payload=event,
                correlation_id=self.correlation,
                causation_id=self.causation,
                metadata=self.metadata,
                position=pos,
            )
            for (pos, seq, ts), event, event_id in zip(rows, self.events, self.ids, strict=True)
        ]


# ---------------------------------------------------------------------- bulk import

_GZIP_MAGIC = b"\x1f\x8b"


@contextmanager
def _open_maybe_gzip(path: Path) -> Iterator[Iterable[bytes]]:
    """``path`` opened for reading bytes, inflated if it is gzip: told by its first two
    bytes, not its name (no JSON text starts with 0x1f, so a plain file is never taken
    for gzip, and a gzip file without ``.gz`` is still read)."""
    with open(path, "rb") as fh:
        if fh.peek(2)[:2] == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=fh, mode="rb") as inflated:
                yield inflated
        else:
            yield fh


@contextmanager
def _regular_file(path: Path | IO[bytes], source: str) -> Iterator[Path]:
    """``path``, or a pipe's or a stream's content (``/dev/stdin``, ``<(zcat ...)``,
    ``sys.stdin.buffer``) kept in a temporary file for the while: an import may read its
    input twice (into an empty store, when the input repeats an event id, it starts again
    on the general road)."""
    if isinstance(path, Path) and path.is_file():
        yield path
        return
    try:
        with (
            open(path, "rb") if isinstance(path, Path) else nullcontext(path) as pipe,
            tempfile.NamedTemporaryFile(prefix="riskbook-import-", delete=False) as kept,
        ):
            shutil.copyfileobj(pipe, kept, 1 << 20)
    except OSError as exc:
        raise ImportFailed(f"{source}: cannot read: {exc}; nothing was written") from None
    try:
        yield Path(kept.name)
    finally:
        os.unlink(kept.name)


def _notified_position(payload: str) -> int:
    """The position a NOTIFY on the events channel names; 0 (a plain wake-up) for any
    other payload: every role that can connect may NOTIFY, and must not stop followers."""
    try:
        return int(payload)
    except ValueError:
        return 0


# One envelope on its way to COPY: line number, aggregate, given sequence, column values.
_Record = tuple[int, str, int | None, tuple[Any, ...]]


def _record(lineno: int, env: Envelope, has_seq: bool, metadata: str | None = None) -> _Record:
    # Payload and metadata go to COPY as their canonical JSON: jsonb reads it back
    # unchanged, so the hash computed from it here is the one a verifier computes from
    # what is stored.
    values = (
        str(env.event_id),
        env.event_type,
        env.aggregate_id,
        env.aggregate_type,
        format_time(env.timestamp),
        None if env.causation_id is None else str(env.causation_id),
        env.correlation_id,
        metadata if metadata is not None else check_metadata(env.metadata, env.event_type),
        canonical_payload(env.payload),
    )
    return lineno, env.aggregate_id, env.sequence if has_seq else None, values


def _envelope_record(n: int, env: Envelope) -> _Record:
    """The record of an envelope made in Python, checked as a line of a file is (its
    fields' types included: an Envelope is not checked when made); InvalidEvent."""
    if not isinstance(env, Envelope):
        raise InvalidEvent("?", "envelope", f"must be an Envelope, got {type(env).__name__}")
    payload = env.payload
    kind = payload.type_name() if isinstance(payload, Event | RawEvent) else "?"
    for name in ("aggregate_id", "aggregate_type"):
        if not isinstance(getattr(env, name), str):
            raise InvalidEvent(kind, name, f"must be a str, got {getattr(env, name)!r}")
    check_for_aggregate([payload], env.aggregate_id)  # type: ignore[list-item]  # checked here
    assert isinstance(payload, Event)  # check_for_aggregate refuses anything else
    _check_aggregate(payload, env.aggregate_id, env.aggregate_type)
    for name in ("event_id", "causation_id"):
        value = getattr(env, name)
        if not isinstance(value, uuid.UUID) and not (name == "causation_id" and value is None):
            raise InvalidEvent(kind, name, f"must be a uuid.UUID, got {value!r}")
    seq = env.sequence
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise InvalidEvent(kind, "sequence", f"must be an int, got {type(seq).__name__}")
    if not 0 <= seq <= MAX_SEQUENCE:
        raise InvalidEvent(
            kind, "sequence", f"must be 1 to {MAX_SEQUENCE} (or 0: assigned), got {seq}"
        )
    if not isinstance(env.timestamp, datetime):
        raise InvalidEvent(
            kind, "timestamp", f"must be a datetime, got {type(env.timestamp).__name__}"
        )
    if env.timestamp.tzinfo is None:
        raise InvalidEvent(kind, "timestamp", "has no time zone (use UTC)")
    try:
        format_time(env.timestamp)
    except ValueError as exc:
        raise InvalidEvent(kind, "timestamp", str(exc)) from None
    check_text(env.correlation_id, kind, "correlation_id")
    metadata = check_metadata(env.metadata, kind)
    return _record(n, env, seq > 0, metadata)


def _without_bom(lines: Iterable[bytes], source: str) -> Iterator[bytes]:
    """``lines`` with a UTF-8 byte order mark at the start of the first taken off (many
    Windows tools write one); the other lines are passed on as they are. A UTF-16 (or
    UTF-32) one is refused, saying so: its lines are no UTF-8 JSON."""
    it = iter(lines)
    first = next(it, None)
    if first is None:
        return it
    if isinstance(first, str):  # text lines (import_lines takes str too): U+FEFF
        return itertools.chain((first.removeprefix("\ufeff"),), it)
    if first.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ImportFailed(
            f"{source}: line 1: the file is UTF-16 (or UTF-32): it starts with that byte "
            "order mark; riskbook reads JSON Lines in UTF-8 (re-encode it, e.g. iconv -f "
            "UTF-16 -t UTF-8); nothing was written"
        )
    return itertools.chain((first.removeprefix(_UTF8_BOM),), it)


_UTF8_BOM = b"\xef\xbb\xbf"


def _digest(values: tuple[Any, ...], sequence: int) -> bytes:
    """digest(e) of an import record's column values (see riskbook.events.canonical_fields)."""
    event_id, event_type, agg, agg_type, ts, causation, correlation, metadata, payload = values
    text = canonical_fields(
        event_id, event_type, agg, agg_type, sequence, ts, causation, correlation, metadata, payload
    )
    return hashlib.sha256(text.encode()).digest()


def _records_from_lines(
    lines: Iterable[bytes], source: str, progress: Progress | None
) -> Iterator[_Record]:
    decode = _envelope_decoder.decode
    finer = _FINER_FRACTION.search  # (inline: a call per line would cost as much again)
    for lineno, line in enumerate(lines, 1):
        if not line or line.isspace():
            continue
        try:
            if line.__class__ is bytes and finer(line) is None:
                record = _fast_record(lineno, decode(line))
            else:  # times finer than microseconds are cut, not rounded by msgspec
                record = _fast_record(lineno, decode(_exact_times(line, envelope=True)))
        except (
            msgspec.ValidationError,
            msgspec.DecodeError,
            InvalidEvent,
            RecursionError,
            UnicodeDecodeError,
            ValueError,  # a recorded time out of range once in UTC
        ):
            record = _checked_record(lineno, line, source)  # says what is wrong, exactly
        yield record
        if progress is not None and lineno % 100_000 == 0:
            progress("validated", lineno)


def _fast_record(lineno: int, raw: _EnvelopeIn) -> _Record:
    """The record of a decoded line: decode_envelope's checks, but no Envelope made on the
    way (a million of them cost a second). Any error goes to :func:`_checked_record`,
    which says it exactly as decode_envelope does."""
    kind, metadata = check_raw_envelope(raw)
    values = (
        str(raw.event_id),
        kind,
        raw.aggregate_id,
        raw.aggregate_type,
        format_time(raw.timestamp),
        None if raw.causation_id is None else str(raw.causation_id),
        raw.correlation_id,
        metadata,
        canonical_payload(raw.payload),
    )
    return lineno, raw.aggregate_id, raw.sequence, values


def _checked_record(lineno: int, line: bytes, source: str) -> _Record:
    """A line the fast road refused, read the reference way: its error, with the line."""
    try:
        env, has_seq = decode_envelope(line)
    except InvalidEvent as exc:
        raise ImportFailed(f"{source}: {exc.at_line(lineno)}") from None
    return _record(lineno, env, has_seq)


TRUSTED_COPY_COLUMNS = (
    'event_id, event_type, aggregate_id, aggregate_type, sequence, "timestamp", causation_id,'
    " correlation_id, metadata, payload"
)
"""The columns of a :meth:`Store.trusted_copy` row, in order."""


class _CopyChain:
    """Chains the hashes of :meth:`Store.trusted_copy` rows, aggregate by aggregate."""

    def __init__(self, conn: psycopg.Connection, *, empty: bool = False) -> None:
        self.conn = conn
        self.empty = empty  # the store was empty: no aggregate has a stored head
        self.heads: dict[str, tuple[int, bytes]] = {}  # aggregate -> (version, hash)
        self.metadata: dict[str, str] = {}  # as given -> canonical

    def rows(self, lines: list[bytes], first_position: int) -> bytes:
        """The lines as COPY text with their positions and hashes (and their metadata,
        payload and recorded time written canonically)."""
        out = []
        sha256 = hashlib.sha256
        heads = self.heads
        uuid_ok, time_ok = _CANONICAL_UUID.fullmatch, _CANONICAL_TIME.fullmatch
        for j, line in enumerate(lines):
            raw, fields = _copy_fields(line)
            event_id, event_type, agg, agg_type, seq, ts, causation, correlation, meta, body = (
                fields
            )
            sequence = int(seq or 0)
            version, previous = heads[agg or ""]
            if sequence != version + 1:
                raise StoreError(
                    f"trusted copy: aggregate {agg!r} gets sequence {sequence} after version "
                    f"{version}: rows must continue each aggregate in order"
                )
            metadata = self._metadata(meta or "{}")
            payload = _canonical_stored_payload(event_type or "", body or "{}")
            # the ids and the time as the server stores them (and so as verify reads them);
            # the simulator's are already: a match, no call
            recorded = ts or ""
            if not time_ok(recorded):
                recorded = _canonical_time(recorded, agg, sequence)
            if not uuid_ok(event_id or ""):
                event_id = raw[0] = _canonical_uuid(event_id or "", "event_id", agg, sequence)
            if causation is not None and not uuid_ok(causation):
                causation = raw[6] = _canonical_uuid(causation, "causation_id", agg, sequence)
            text = canonical_fields(
                event_id or "",
                event_type or "",
                agg or "",
                agg_type or "",
                sequence,
                recorded,
                causation,
                correlation or "",
                metadata,
                payload,
            )
            link = sha256(previous + sha256(text.encode()).digest()).digest()
            heads[agg or ""] = (sequence, link)
            raw[5] = recorded
            raw[8] = metadata.replace("\\", "\\\\")  # COPY text: a backslash is doubled
            raw[9] = payload.replace("\\", "\\\\")
            raw.append("\\\\x" + link.hex())
            out.append(f"{first_position + j}\t" + "\t".join(raw) + "\n")
        return "".join(out).encode()

    def _metadata(self, given: str) -> str:
        known = self.metadata.get(given)
        if known is None:
            known = canonical_json(msgspec.json.decode(given))
            if len(self.metadata) < 4096:
                self.metadata[given] = known
        return known

    def fetch_heads(self, lines: list[bytes]) -> None:
        """Learn the stored head of each aggregate of ``lines`` not seen yet."""
        aggregates = {_copy_fields(line)[1][2] or "" for line in lines}
        aggregates -= self.heads.keys()
        if not aggregates:
            return
        for agg in aggregates:
            self.heads[agg] = (0, b"")
        if self.empty:  # (and its index on aggregate and sequence is dropped for the while)
            return
        rows = self.conn.execute(
            "SELECT a, last.sequence, last.hash FROM unnest(%s::text[]) a"
            " CROSS JOIN LATERAL (SELECT e.sequence, e.hash FROM events e WHERE e.aggregate_id = a"
            " ORDER BY e.sequence DESC LIMIT 1) last",
            (sorted(aggregates),),
        )
        for agg, sequence, link in rows:
            self.heads[agg] = (sequence, bytes(link))


_COPY_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.DOTALL)
_COPY_CHARS = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _copy_unescape(raw: bytes) -> bytes:
    """A field of COPY text format as the server reads it (backslash escapes)."""

    def one(m: re.Match[bytes]) -> bytes:
        if m.group(1):
            return bytes([int(m.group(1), 8) & 0xFF])
        if m.group(2):
            return bytes([int(m.group(2), 16)])
        return _COPY_CHARS.get(m.group(3), m.group(3))

    return _COPY_ESCAPE.sub(one, raw)


def _copy_fields(line: bytes) -> tuple[list[str], list[str | None]]:
    """A row of COPY text: its fields as written, and as the server reads them (``\\N``
    is NULL; backslash escapes, rare, are undone)."""
    text = line.decode()
    raw = (text[:-1] if text.endswith("\n") else text).split("\t")
    if len(raw) != 10:
        raise StoreError(
            f"trusted copy: a row has {len(raw)} columns, not the 10 of TRUSTED_COPY_COLUMNS"
        )
    if "\\" not in text:
        return raw, list(raw)
    return raw, [
        None if f == "\\N" else _copy_unescape(f.encode()).decode() if "\\" in f else f for f in raw
    ]


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _copy_row(agg: str | None, sequence: int) -> str:
    """Which :meth:`Store.trusted_copy` row, for an error."""
    return f"the row of aggregate {agg!r} with sequence {sequence}"


def _canonical_uuid(text: str, name: str, agg: str | None, sequence: int) -> str:
    """An id as ``uuid::text`` writes it: lowercase ``8-4-4-4-12`` (the simulator's
    already is; the server reads uppercase, braced or hyphen-less ids too)."""
    if _CANONICAL_UUID.fullmatch(text):
        return text
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise StoreError(
            f"trusted copy: {_copy_row(agg, sequence)}: {name} {text!r} is not a UUID"
        ) from None


# A time that is canonical already: what to_char writes, with every field in range (no
# hour 24, no second 60: the server reads those as the next day or minute).
_CANONICAL_TIME = re.compile(
    r"(?!0000)\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
    r"T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{6}Z"
)
# Any other RFC 3339 time with a zone, read as PostgreSQL reads it (below).
_RFC3339_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d)(?::(\d\d)(?:\.(\d+))?)?"
    r"(?:[Zz]|([+-])(\d\d)(?::?(\d\d)(?::?(\d\d))?)?)"
)


def _canonical_time(text: str, agg: str | None, sequence: int) -> str:
    """A recorded time as the canonical encoding writes it (the simulator's already is).

    Any other RFC 3339 time with a zone is converted as the server reads it: hour 24
    (only ``24:00:00``) is the next midnight, second 60 the next minute, fractions past
    microseconds rounded as PostgreSQL rounds them. Anything else is refused, rather
    than hashed as given and stored as the server reads it.
    """
    if _CANONICAL_TIME.fullmatch(text):
        return text
    from datetime import timedelta  # the rare road

    at = f"{_copy_row(agg, sequence)}: "
    m = _RFC3339_TIME.fullmatch(text)
    if m is None:
        raise StoreError(
            f"trusted copy: {at}recorded time {text!r} is not an RFC 3339 time with a zone "
            "(YYYY-MM-DDTHH:MM:SS.ffffffZ)"
        )
    year, month, day, hour, minute = (int(g) for g in m.group(1, 2, 3, 4, 5))
    second = int(m.group(6) or 0)
    fraction = m.group(7)
    micro = round(float("0." + fraction) * 1_000_000) if fraction else 0  # as the server
    sign, off_h, off_m, off_s = m.group(8, 9, 10, 11)
    offset = int(off_h or 0) * 3600 + int(off_m or 0) * 60 + int(off_s or 0)
    if (
        minute > 59
        or second > 60
        or (second == 60 and micro)
        or hour > 24
        or (hour == 24 and (minute or second or micro))
        or int(off_h or 0) > 15
        or int(off_m or 0) > 59
        or int(off_s or 0) > 59
    ):
        raise StoreError(f"trusted copy: {at}recorded time {text!r} is out of range")
    try:
        t = datetime(year, month, day, tzinfo=UTC) + timedelta(
            hours=hour,
            minutes=minute,
            seconds=second - (-offset if sign == "-" else offset),
            microseconds=micro,
        )
    except (ValueError, OverflowError):  # February 30th, year 0, past 9999 in UTC
        raise StoreError(
            f"trusted copy: {at}recorded time {text!r} is out of range: riskbook records "
            "real dates in the years 1 to 9999 UTC"
        ) from None
    return format_time(t)


def _canonical_stored_payload(event_type: str, given: str) -> str:
    if event_type in EVENT_TYPES:
        try:
            return canonical_payload(decode_event(given, event_type=event_type))
        except InvalidEvent:
            pass  # stored as given, like any payload riskbook cannot read
    return canonical_json(msgspec.json.decode(given))


_IMPORT_COLUMNS = (
    'event_id, event_type, aggregate_id, aggregate_type, "timestamp", causation_id,'
    " correlation_id, metadata, payload"
)


def _copy_rows(conn: psycopg.Connection, statement: str, rows: Iterator[tuple[Any, ...]]) -> None:
    # psycopg's write_row escapes in C: faster than building the text here.
    with conn.cursor().copy(statement) as copy:
        write = copy.write_row
        for row in rows:
            write(row)


def _load_into_empty(
    conn: psycopg.Connection,
    records: Iterator[_Record],
    source: str,
    progress: Progress | None,
    unit: str = "line",
) -> tuple[int, int, int] | None:
    """COPY straight into the (locked, empty) events table, indexes built at the end.

    Returns (read, added, 0 repeated), or None when the input repeats an event id (the
    general road knows how to tell harmless repeats from conflicting ones).
    """
    indexes = _drop_secondary_indexes(conn)
    conn.execute("ALTER TABLE events DISABLE TRIGGER events_inserted")
    conn.execute("ALTER TABLE events DISABLE TRIGGER events_chained")  # hashes are given
    base = _scalar(conn, "SELECT riskbook_reserve_positions(0)")
    heads: dict[str, tuple[int, bytes]] = {}  # aggregate -> (version, hash) so far
    stream = _Checked(records, source, progress, unit)
    sha256 = hashlib.sha256

    def rows() -> Iterator[tuple[Any, ...]]:
        for _, agg, seq, values in stream:
            v, previous = heads.get(agg, (0, b""))
            v += 1
            if seq is not None and seq != v:
                raise _TakeGeneralRoad  # out of order: the general road sorts it out
            link = sha256(previous + _digest(values, v)).digest()
            heads[agg] = (v, link)
            yield (base + stream.count - 1, v, *values, link)

    try:
        _copy_and_fill(conn, rows(), base)
    except _TakeGeneralRoad:
        return None
    count = stream.count
    _scalar(conn, "SELECT riskbook_reserve_positions(%s)", (count,))
    if progress is not None:
        progress("indexing", count)
    try:
        _build_indexes(conn, indexes)
    except psycopg.errors.UniqueViolation:
        return None
    conn.execute("ALTER TABLE events ENABLE TRIGGER events_inserted")
    conn.execute("ALTER TABLE events ENABLE TRIGGER events_chained")
    if count:
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(base + count - 1)))
    return count, count, 0


def _drop_secondary_indexes(conn: psycopg.Connection) -> list[tuple[str, str, bool, str]]:
    """Drop every index of the (locked, empty) events and event_fields tables but events'
    primary key; their definitions, for :func:`_build_indexes` at the end of the load
    (sorted builds beat millions of inserts).

    events keeps its primary key: each chunk's event_fields are filled by position
    range while later chunks are still being written, and appending increasing
    positions to it costs less than scanning the table for every chunk.
    """
    indexes = [
        index
        for index in _index_definitions(conn, "events") + _index_definitions(conn, "event_fields")
        if (index[0], index[1]) != ("events", "events_pkey")
    ]
    for table, name, constraint, _ in indexes:
        if constraint:
            conn.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    sql.Identifier(table), sql.Identifier(name)
                )
            )
        else:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    return indexes


def _build_indexes(conn: psycopg.Connection, indexes: list[tuple[str, str, bool, str]]) -> None:
    """Build the indexes :func:`_drop_secondary_indexes` dropped (a unique one that
    finds duplicates raises psycopg's UniqueViolation), then give the planner its view
    of the tables, which grew from empty."""
    with conn.transaction():
        # sorts of millions of keys fit in memory instead of spilling to disk
        conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
        for _, _, _, definition in indexes:
            conn.execute(definition.encode())
    conn.execute("ANALYZE events, event_fields")


def _lock_if_empty(conn: psycopg.Connection) -> bool:
    """Whether the events table is empty; if so it is locked against every other
    session until the transaction ends (so that it stays empty but for this one).

    Called first in a transaction. The first look ends its transaction before the lock
    is taken: the read lock it holds, raised to the exclusive one, deadlocked two
    imports started together (each waiting for the other's read lock to go)."""
    if not _scalar(conn, "SELECT NOT EXISTS (SELECT 1 FROM events)"):
        return False
    conn.rollback()  # nothing done yet but that look
    conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
    if _scalar(conn, "SELECT NOT EXISTS (SELECT 1 FROM events)"):
        return True
    conn.rollback()  # another session wrote first: no lock held for the general road
    return False


_CHUNK_ROWS = 50_000


def _copy_and_fill(conn: psycopg.Connection, rows: Iterator[tuple[Any, ...]], base: int) -> None:
    """COPY ``rows`` (position first, from ``base`` on) into events in chunks, each chunk's
    event_fields filled right after it (what the disabled insert trigger would do).

    This thread reads, checks and formats the rows; a second thread sends each chunk
    and runs its fill, so that the server fills chunk k (waiting on the server frees
    the GIL) while this thread reads chunk k + 1, instead of filling everything once
    the file is read.
    """
    sender = _ChunkSender(conn)
    formatting = conn.cursor()  # only lends its adapters: no statement runs on it
    try:
        done = False
        while not done:
            buffer = io.BytesIO()
            chunk = psycopg.Copy(formatting, writer=FileWriter(buffer))
            write = chunk.write_row  # psycopg formats in C: faster than building text here
            n = 0
            for row in rows:
                write(row)
                n += 1
                if n == _CHUNK_ROWS:
                    break
            else:
                done = True
            chunk.finish(None)
            if n:
                first = base + sender.sent
                sender.send(buffer.getvalue(), first, first + n - 1)
    except BaseException:
        sender.stop(quiet=True)  # the reader's error (a bad line, say) is the one to tell
        raise
    sender.stop()


class _ChunkSender:
    """A thread that COPYs formatted chunks into events and fills their event_fields."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.sent = 0  # rows handed over so far
        self.queue: queue.Queue[tuple[bytes, int, int] | None] = queue.Queue(maxsize=2)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="riskbook-import", daemon=True)
        self.thread.start()

    def send(self, data: bytes, lo: int, hi: int) -> None:
        self._raise_failure()
        self.sent += hi - lo + 1
        self.queue.put((data, lo, hi))

    def stop(self, *, quiet: bool = False) -> None:
        """Wait until every chunk sent is written; raise what the thread met, if anything."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if not quiet:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _run(self) -> None:
        statement = f"COPY events (position, sequence, {_IMPORT_COLUMNS}, hash) FROM STDIN"
        while (item := self.queue.get()) is not None:
            if self.failure is not None:
                continue  # drain until stopped: the import is failing
            data, lo, hi = item
            try:
                with self.conn.cursor().copy(statement) as copy:
                    view = memoryview(data)
                    for i in range(0, len(view), 1 << 20):
                        copy.write(view[i : i + (1 << 20)])
                self.conn.execute("SELECT riskbook_fill_event_fields(%s, %s)", (lo, hi))
            except BaseException as exc:  # handed to the reading thread
                self.failure = exc


def _load_general(
    conn: psycopg.Connection,
    records: Iterator[_Record],
    source: str,
    progress: Progress | None,
    unit: str = "line",
) -> tuple[int, int, int]:
    """COPY into a staging table, then insert what is new, in input order.

    Returns (read, added, repeated): ``repeated`` counts the records that repeat an
    earlier record of the same input exactly (kept once). The insert is left for the
    caller to commit.

    The staging is committed apart (the table is the session's until the end): the
    insert's transaction then takes its id, and so its events' positions, in the insert
    itself, after every append committed to the file's aggregates meanwhile, and each
    try of it is a transaction of its own. Staged in the insert's transaction, its id
    came first, and its versions of an aggregate others appended to meanwhile went below
    theirs in the global order (the store refuses that now: migration 0020).
    """
    conn.execute(_UNSTAGE_SQL)  # one left by an import of this connection that failed
    conn.execute(_STAGE_SQL)
    try:
        return _load_staged(conn, records, source, progress, unit)
    except BaseException:
        with suppress(psycopg.Error):  # (a lost connection takes it along)
            conn.rollback()  # nothing of the file is written...
            conn.execute(_UNSTAGE_SQL)  # ...and the staged copy goes
            conn.commit()
        raise


def _load_staged(
    conn: psycopg.Connection,
    records: Iterator[_Record],
    source: str,
    progress: Progress | None,
    unit: str,
) -> tuple[int, int, int]:
    """:func:`_load_general` once its staging table is made."""
    stream = _Checked(records, source, progress, unit)
    rows = ((lineno, seq, *values) for lineno, _, seq, values in stream)
    _copy_rows(
        conn, f"COPY riskbook_import (line_no, sequence, {_IMPORT_COLUMNS}) FROM STDIN", rows
    )
    repeated = int(_scalar(conn, _REPEATS_SQL))
    twin = conn.execute(_TWIN_SQL).fetchone() if repeated else None
    if twin:
        line, first, event_id = twin
        raise ImportFailed(
            f"{source}: {unit} {line}: event_id {event_id} appears on {unit} {first} with "
            f"different content ({_fields_differing(conn, line, first)})"
        )
    conn.commit()  # the staged lines (see above)
    for attempt in range(1, _IMPORT_TRIES + 1):
        clash = conn.execute(_CLASH_SQL).fetchone()
        if clash:
            line, event_id = clash
            raise ImportFailed(
                f"{source}: {unit} {line}: event_id {event_id} is already stored with "
                f"different content ({_fields_differing(conn, line, None)})"
            )
        try:
            added = conn.execute(_BULK_INSERT_SQL).rowcount
            break
        except psycopg.errors.UniqueViolation as exc:
            conn.rollback()  # the try, whole: the next one is a new transaction
            refused = _sequence_taken(conn, exc, source, unit)
            if refused is not None:
                raise refused from None
            if attempt == _IMPORT_TRIES:
                raise _written_meanwhile(exc, source, attempt) from None
            # Not the file's doing: another session appended to one of its aggregates (or
            # stored some of its events) after the insert began. A fresh statement sees
            # that: it skips the events stored meanwhile (their content checked again
            # above) and numbers the new ones after the heads as they are now.
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            # Another session writing to these aggregates in another order (an import
            # of some of the same events, a transaction appending to several): the
            # rollback gave back what this one held, so the other goes on; the next try
            # waits for it and then goes after it (as above). A serialization failure:
            # an append of another transaction overtook this try's (migration 0020).
            conn.rollback()
            if attempt == _IMPORT_TRIES:
                raise
    # nothing added leaves the stored versions as they were (gap-free): a re-import
    # need not scan every aggregate of the file again
    with_seq = [a for a, g in stream.given.items() if g] if added else []
    # (after the insert, whose unique keys tell a sequence given twice, or taken, first)
    backwards = conn.execute(_BACKWARDS_SQL).fetchone() if with_seq else None
    if backwards:
        line, agg, sequence, before, before_line = backwards
        raise ImportFailed(
            f"{source}: {unit} {line}: aggregate {agg!r} gets sequence {sequence} after "
            f"sequence {before} ({unit} {before_line}): an aggregate's given sequences must "
            f"rise in {unit} order, which its positions follow; nothing was written"
        )
    if with_seq:
        bad = conn.execute(_GAP_SQL, (with_seq,)).fetchone()
        if bad:
            # (the line is looked for only now: the check above is the cheap one)
            gap = conn.execute(_GAP_LINE_SQL, (with_seq,)).fetchone()
            if gap is None:  # cannot be (a gap is opened by a new event): said without line
                raise ImportFailed(
                    f"{source}: aggregate {bad[0]!r} would have versions with gaps "
                    f"(highest {bad[1]}, count {bad[2]}): sequences must continue the stored "
                    "ones as 1, 2, 3, ..."
                )
            line, agg, sequence, expected = gap
            raise ImportFailed(
                f"{source}: {unit} {line}: aggregate {agg!r} gets sequence {sequence} where "
                f"{expected} comes next: sequences must continue the stored ones as 1, 2, 3, "
                "... (no gaps)"
            )
    conn.execute(_UNSTAGE_SQL)  # (in the insert's transaction: committed with it)
    return stream.count, added, repeated


def _fields_differing(conn: psycopg.Connection, line: int, first: int | None) -> str:
    """Which fields of ``line`` differ from line ``first`` (None: from the stored event)."""
    fields = _scalar(conn, _DIFFERING_SQL, {"line": line, "first": first}) or ["?"]
    return f"{', '.join(fields)} {'differs' if len(fields) == 1 else 'differ'}"


_TRADE_KEY = "event_fields_trade_key"  # one fill per (account_id, trade_id): 0015
_TRADE_ID_RULE = "a trade id names one fill (a bust cancels it by its id): a corrected fill needs an id of its own"


def _trade_id_taken(exc: psycopg.errors.UniqueViolation) -> InvalidEvent:
    """An append's error for a TradeExecuted whose (account, trade id) is stored."""
    detail = exc.diag.message_detail or ""
    m = re.search(r"=\((.*), (.*)\) already exists", detail)
    what = f"{m.group(2)!r} of account {m.group(1)!r}" if m else "(see: " + detail + ")"
    return InvalidEvent("TradeExecuted", "trade_id", f"{what} is stored already; {_TRADE_ID_RULE}")


_IMPORT_TRIES = 10
"""How many times an import's insert is tried while other sessions' writes to its
aggregates overtake it."""


def _sequence_taken(
    conn: psycopg.Connection, exc: psycopg.errors.UniqueViolation, source: str, unit: str
) -> ImportFailed | None:
    """The import's error for a UNIQUE violation of its insert: the line whose given
    sequence is taken, or whose trade id is, and by what; None if the input does not
    explain it (another session wrote meanwhile: the insert is worth another try)."""
    if exc.diag.constraint_name == _TRADE_KEY:
        twin = conn.execute(_TRADE_TAKEN_SQL).fetchone()
        if twin is not None:
            line, other, account, trade_id = twin
            where = f"{unit} {other}" if other is not None else "a stored trade"
            return ImportFailed(
                f"{source}: {unit} {line}: trade id {trade_id!r} of account {account!r} is "
                f"{where}'s too; {_TRADE_ID_RULE}; nothing was written"
            )
    found = None
    if exc.diag.constraint_name == "events_aggregate_sequence_key":
        found = conn.execute(_SEQUENCE_TAKEN_SQL).fetchone()
    if found is None:  # another session wrote the same aggregate or event meanwhile
        return None
    line, other, agg, sequence, event_id = found
    if other is None:
        return ImportFailed(
            f"{source}: {unit} {line}: aggregate {agg!r} already has sequence {sequence} "
            f"(stored event {event_id}): a given sequence must continue the stored ones"
        )
    return ImportFailed(
        f"{source}: {unit} {line}: aggregate {agg!r} sequence {sequence} is given on {unit} "
        f"{other} too, to another event"
    )


def _written_meanwhile(
    exc: psycopg.errors.UniqueViolation, source: str, tries: int
) -> ImportFailed:
    """The import's error when other sessions' writes overtook its insert every time."""
    detail = exc.diag.message_detail or ""
    if exc.diag.constraint_name == "events_aggregate_sequence_key" and (
        m := re.search(r"=\((.*), \d+\) already exists", detail)
    ):
        what = f"wrote to aggregate {m.group(1)!r}"
    elif exc.diag.constraint_name == "events_event_id_key" and (
        m := re.search(r"=\((.*)\) already exists", detail)
    ):
        what = f"stored event {m.group(1)}"
    else:
        what = f"wrote the same events ({detail or exc.diag.message_primary})"
    return ImportFailed(
        f"{source}: another session {what} meanwhile, overtaking the import's insert "
        f"{tries} {'time' if tries == 1 else 'times'}; nothing was written: import again"
    )


class _Checked:
    """Records on their way to COPY: counted, progress reported, and per aggregate
    either all with a sequence or all without."""

    def __init__(
        self, records: Iterator[_Record], source: str, progress: Progress | None, unit: str
    ):
        self.records = records
        self.source = source
        self.unit = unit  # what a record is called in errors: "line", "envelope"
        self.progress = progress
        self.given: dict[str, bool] = {}
        self.count = 0

    def __iter__(self) -> Iterator[_Record]:
        for record in self.records:
            lineno, agg, seq, _ = record
            if self.given.setdefault(agg, seq is not None) != (seq is not None):
                raise _mixed(self.source, lineno, agg, self.unit)
            self.count += 1
            yield record
            if self.progress is not None and self.count % 100_000 == 0:
                self.progress("copied", self.count)


class _TakeGeneralRoad(Exception):
    pass


def _mixed(source: str, lineno: int, agg: str, unit: str) -> ImportFailed:
    return ImportFailed(
        f"{source}: {unit} {lineno}: aggregate {agg!r} mixes envelopes with and without a "
        "sequence; give all or none"
    )


def _index_definitions(conn: psycopg.Connection, table: str) -> list[tuple[str, str, bool, str]]:
    """(table, name, is a constraint, statement that recreates it) for each index of table."""
    out = []
    for name, conname, indexdef, condef in conn.execute(_INDEXES_SQL, (table,)):
        if conname:
            stmt = (
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ")
                .format(sql.Identifier(table), sql.Identifier(conname))
                .as_string(conn)
                + condef
            )
            out.append((table, conname, True, stmt))
        else:
            out.append((table, name, False, indexdef))
    return out


def _scalar(
    conn: psycopg.Connection,
    query: str,
    params: tuple[Any, ...] | Mapping[str, Any] | None = None,
) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Millions of small objects are made and dropped during an import; the cyclic
    # collector would scan them again and again for nothing (there are no cycles).
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_INDEXES_SQL = """
SELECT i.indexrelid::regclass::text, c.conname, pg_get_indexdef(i.indexrelid),
       pg_get_constraintdef(c.oid)
  FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
 WHERE i.indrelid = %s::regclass
 ORDER BY c.conname IS NULL, 1
"""

_STAGE_SQL = """
CREATE TEMP TABLE riskbook_import (
    line_no bigint NOT NULL, sequence bigint, event_id uuid NOT NULL, event_type text NOT NULL,
    aggregate_id text NOT NULL, aggregate_type text NOT NULL, "timestamp" timestamptz NOT NULL,
    causation_id uuid, correlation_id text NOT NULL, metadata jsonb NOT NULL,
    payload jsonb NOT NULL
) ON COMMIT PRESERVE ROWS
"""
_UNSTAGE_SQL = "DROP TABLE IF EXISTS pg_temp.riskbook_import"

# Every column an import keeps (the sequence apart: it may be absent and assigned).
_CONTENT_COLUMNS = (
    "event_type",
    "aggregate_id",
    "aggregate_type",
    "timestamp",
    "causation_id",
    "correlation_id",
    "metadata",
    "payload",
)


def _differing(a: str, b: str) -> str:
    """SQL: the names of the content columns in which rows ``a`` and ``b`` differ (a text
    array, in the order of :data:`_CONTENT_COLUMNS`, then ``sequence``)."""
    cases = [
        f'CASE WHEN {a}."{c}" IS DISTINCT FROM {b}."{c}" THEN \'{c}\' END' for c in _CONTENT_COLUMNS
    ]
    # a sequence absent from the line is assigned: it differs only where both are given
    cases.append(f"CASE WHEN {a}.sequence <> {b}.sequence THEN 'sequence' END")
    return f"array_remove(ARRAY[{', '.join(cases)}], NULL)"


def _distinct(a: str, b: str) -> str:
    """SQL: whether rows ``a`` and ``b`` differ in a content column, or in their sequence
    where both give one (one row comparison: cheap enough for every line)."""
    left = ", ".join(f'{a}."{c}"' for c in _CONTENT_COLUMNS)
    right = ", ".join(f'{b}."{c}"' for c in _CONTENT_COLUMNS)
    return f"(({left}) IS DISTINCT FROM ({right}) OR {a}.sequence <> {b}.sequence)"


# How many lines repeat the event id of an earlier line (the statements that look for
# twins below run only when there are any).
_REPEATS_SQL = """
SELECT coalesce(sum(n - 1), 0)
  FROM (SELECT count(*) AS n FROM riskbook_import GROUP BY event_id HAVING count(*) > 1) r
"""

# The first line that repeats an earlier line's event id with other content (any
# column the import keeps, the sequence where both give one), and the line of the
# id's first appearance.
_CONTENT_LIST = ", ".join(f'"{c}"' for c in _CONTENT_COLUMNS)

# The first line whose given sequence is below that of an earlier line of its aggregate
# (a line repeating an earlier one is left out, as the insert leaves it out): positions
# follow the file, so such an aggregate's versions would be stored out of their order.
_BACKWARDS_SQL = """
SELECT line_no, aggregate_id, sequence, before, before_line
  FROM (SELECT line_no, aggregate_id, sequence,
               lag(sequence) OVER w AS before, lag(line_no) OVER w AS before_line
          FROM (SELECT DISTINCT ON (event_id) line_no, aggregate_id, sequence
                  FROM riskbook_import
                 WHERE sequence IS NOT NULL
                 ORDER BY event_id, line_no) firsts
        WINDOW w AS (PARTITION BY aggregate_id ORDER BY line_no)) x
 WHERE sequence < before
 ORDER BY line_no
 LIMIT 1
"""

_TWIN_SQL = f"""
WITH firsts AS (
    SELECT DISTINCT ON (event_id) *
      FROM riskbook_import
     WHERE event_id IN (SELECT event_id FROM riskbook_import GROUP BY event_id
                         HAVING count(*) > 1)
     ORDER BY event_id, line_no
)
SELECT s.line_no, f.line_no, s.event_id
  FROM riskbook_import s JOIN firsts f USING (event_id)
 WHERE s.line_no > f.line_no AND {_distinct("f", "s")}
 ORDER BY s.line_no
 LIMIT 1
"""

# The first line whose event id is stored with other content.
_CLASH_SQL = f"""
SELECT s.line_no, s.event_id
  FROM riskbook_import s JOIN events e USING (event_id)
 WHERE {_distinct("e", "s")}
 ORDER BY s.line_no
 LIMIT 1
"""

# What differs between a line and an earlier one (%(first)s), or the stored event
# (%(first)s null): only when one of the above found something.
_DIFFERING_SQL = f"""
SELECT {_differing("f", "s")}
  FROM riskbook_import s,
       LATERAL (SELECT {_CONTENT_LIST}, sequence
                  FROM riskbook_import WHERE line_no = %(first)s
                 UNION ALL
                SELECT {_CONTENT_LIST}, sequence
                  FROM events WHERE %(first)s::bigint IS NULL AND event_id = s.event_id) f
 WHERE s.line_no = %(line)s
 LIMIT 1
"""

# After the insert met UNIQUE (aggregate_id, sequence): the first new line whose given
# sequence is taken, by a stored event or by an earlier new line of the input.
_SEQUENCE_TAKEN_SQL = """
WITH new AS (
    SELECT DISTINCT ON (s.event_id) s.line_no, s.event_id, s.aggregate_id, s.sequence
      FROM riskbook_import s
     WHERE s.sequence IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = s.event_id)
     ORDER BY s.event_id, s.line_no
), taken AS (
    SELECT n.line_no, NULL::bigint AS other, n.aggregate_id, n.sequence, e.event_id
      FROM new n JOIN events e ON e.aggregate_id = n.aggregate_id AND e.sequence = n.sequence
    UNION ALL
    SELECT b.line_no, a.line_no, b.aggregate_id, b.sequence, a.event_id
      FROM new a JOIN new b
        ON a.aggregate_id = b.aggregate_id AND a.sequence = b.sequence AND a.line_no < b.line_no
)
SELECT line_no, other, aggregate_id, sequence, event_id FROM taken
 ORDER BY line_no, other NULLS FIRST, other
 LIMIT 1
"""

# The first staged TradeExecuted whose (account, trade id) is stored, or staged on an
# earlier line for another event (a line repeating an event is not a second fill).
_TRADE_TAKEN_SQL = """
WITH new AS (
    SELECT DISTINCT ON (s.event_id) s.line_no, s.event_id,
           s.payload->>'account_id' AS account_id, s.payload->>'trade_id' AS trade_id
      FROM riskbook_import s
     WHERE s.event_type = 'TradeExecuted'
       AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = s.event_id)
     ORDER BY s.event_id, s.line_no
), taken AS (
    SELECT n.line_no, NULL::bigint AS other, n.account_id, n.trade_id
      FROM new n JOIN event_fields f
        ON f.event_type = 'TradeExecuted' AND f.account_id = n.account_id
       AND f.trade_id = n.trade_id
    UNION ALL
    SELECT b.line_no, a.line_no, b.account_id, b.trade_id
      FROM new a JOIN new b
        ON a.account_id = b.account_id AND a.trade_id = b.trade_id AND a.line_no < b.line_no
)
SELECT line_no, other, account_id, trade_id FROM taken
 ORDER BY line_no, other NULLS FIRST, other
 LIMIT 1
"""

_BULK_INSERT_SQL = """
WITH firsts AS (
    SELECT DISTINCT ON (s.event_id) s.*
      FROM riskbook_import s
     WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = s.event_id)
     ORDER BY s.event_id, s.line_no
), new AS (
    SELECT f.*,
           row_number() OVER (ORDER BY f.line_no) AS ord,
           row_number() OVER (PARTITION BY f.aggregate_id ORDER BY f.line_no) AS agg_ord
      FROM firsts f
), base AS (
    SELECT riskbook_reserve_positions((SELECT count(*) FROM new)) AS b
), cur AS (  -- each aggregate's stored head: its version and hash
    SELECT a.aggregate_id, last.sequence AS v, last.hash AS h
      FROM (SELECT DISTINCT aggregate_id FROM new) a
     CROSS JOIN LATERAL (SELECT e.sequence, e.hash FROM events e
                          WHERE e.aggregate_id = a.aggregate_id
                          ORDER BY e.sequence DESC LIMIT 1) last
), numbered AS (
    SELECT new.*, coalesce(new.sequence, coalesce(cur.v, 0) + new.agg_ord) AS seq,
           coalesce(cur.h, '\\x'::bytea) AS head
      FROM new LEFT JOIN cur USING (aggregate_id)
), chained AS (
    SELECT n.*,
           riskbook_chain(n.head, riskbook_event_digest(
               n.event_id, n.event_type, n.aggregate_id, n.aggregate_type, n.seq, n."timestamp",
               n.causation_id, n.correlation_id, n.metadata, n.payload))
               OVER (PARTITION BY n.aggregate_id ORDER BY n.seq) AS hash
      FROM numbered n
)
INSERT INTO events (position, event_id, event_type, aggregate_id, aggregate_type, sequence,
                    "timestamp", causation_id, correlation_id, metadata, payload, hash)
SELECT base.b + c.ord - 1, c.event_id, c.event_type, c.aggregate_id, c.aggregate_type, c.seq,
       c."timestamp", c.causation_id, c.correlation_id, c.metadata, c.payload, c.hash
  FROM chained c CROSS JOIN base
 ORDER BY c.ord
"""

_GAP_SQL = """
SELECT aggregate_id, max(sequence), count(*)
  FROM events WHERE aggregate_id = ANY(%s)
 GROUP BY aggregate_id HAVING max(sequence) <> count(*)
 LIMIT 1
"""

# Where the gap opens: in each aggregate, the lowest sequence that is not its rank (the
# stored ones are 1, 2, ..., v: it is a new event's), and the line that gives it; the
# earliest such line of all the aggregates.
_GAP_LINE_SQL = """
SELECT (SELECT min(s.line_no) FROM riskbook_import s WHERE s.event_id = g.event_id) AS line_no,
       g.aggregate_id, g.sequence, g.expected
  FROM (SELECT DISTINCT ON (aggregate_id) aggregate_id, sequence, expected, event_id
          FROM (SELECT aggregate_id, sequence, event_id,
                       row_number() OVER (PARTITION BY aggregate_id ORDER BY sequence) AS expected
                  FROM events WHERE aggregate_id = ANY(%s)) r
         WHERE sequence <> expected
         ORDER BY aggregate_id, sequence) g
 ORDER BY line_no
 LIMIT 1
"""
