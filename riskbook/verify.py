"""Verify the store's hash chains: was history altered, removed or reordered?

Every event carries ``hash = SHA-256(hash of the aggregate's previous event ||
SHA-256(canonical encoding))`` (the definition: :func:`riskbook.events.canonical_fields`),
set when it was written. :func:`verify` recomputes every chain from what is stored now
and names each aggregate and sequence where it breaks:

* **altered** -- the event's content (or its stored hash) is not what was hashed when it
  was written: a payload, a time, an id was changed behind the append-only triggers;
  also any event whose recorded time lies outside the years 1 to 9999 UTC or is
  infinite, which no riskbook writer can have stored (the canonical encoding has no
  era: 2026 BC would hash as 2026 AD), whatever its hash says;
* **removed** -- sequences are missing from an aggregate (its events must be 1, 2, 3, ...),
  or a head recorded earlier (``heads=``) is gone;
* **reordered** -- an event sits at a sequence other than the one it was written with
  (two events swapped, say); or its position puts it before an earlier version of its
  aggregate in the global order, where followers read it first (positions are not
  hashed: a store written before migration 0020 may hold such events, or positions
  were altered);
* **duplicate** -- two events share a sequence;
* **back-dated** -- (with ``heads=`` taken by this version) an event the heads do not
  hold, recorded at or before the moment they were taken: written since, with a past
  recorded time (an import of history does that too), it changes what
  ``riskbook.load(known_at=K)`` says for a K before then.

Besides the chains, two things that would make ``riskbook.load`` and the live processor
read less than the chains vouch for are reported as altered: an event whose position
lies beyond any the server has handed out (positions are ``transaction id << 28`` plus a
count, so every committed event sits below the snapshot's ``xmax << 28``; one above it
is past every reader's fence), and riskbook's own SQL functions in the store's schema
(``riskbook_settled_fence()`` bounds what every reader reads) when their source or
settings are not what the migrations installed, when one is missing, or when another
function of one of their names stands on the search path beside them (on a store whose
schema is behind this riskbook's, that they cannot be checked). A problem with the
functions belongs to no aggregate: its ``aggregate_id`` is empty and its sequence 0.

The scan reads the table once, in one snapshot, in whatever order the server finds
fastest (chains are put back in order as they stream by), with the canonical encoding
computed by the server from built-in functions only (never riskbook's own SQL
functions, which whoever altered history could have replaced too) and the chain in
Python. It needs only read access: an auditor's role (``riskbook db grant-reader``)
can run it.

A chain without a secret proves that history was not altered *since* it was hashed,
unless whoever altered it also recomputed every later hash of the aggregate (and
removing an aggregate's latest events leaves a shorter, valid chain). Against that, keep
the heads (``VerifyReport.heads``, ``riskbook verify --save-heads FILE``) somewhere the
database's superuser cannot write, and pass them back (``heads=``, ``--heads FILE``):
every head recorded then must still be there, with the same hash.

The heads file (:meth:`VerifyReport.save_heads`) is JSON::

    {"heads": {"<aggregate>": [<sequence>, "<hash, hex>"], ...},
     "taken_at": "<the server's time at the scan's snapshot, UTC, ISO 8601, ...Z>",
     "xmax": <the snapshot's xmax>, "running": [<the snapshot's xip>, ...],
     "next_xid": <the next transaction id to be assigned, read just after>}

(transaction ids as 64-bit numbers, as ``pg_snapshot_xmax`` gives them). Files written
by older versions are the ``"heads"`` mapping alone (``{"<aggregate>": [<sequence>,
"<hash>"], ...}``): they are still read, without the check for back-dated events (they
do not say when they were taken), as is a plain mapping passed as ``heads=``.

That check looks at each event beyond the heads (a later sequence of an aggregate they
list, or any event of one they do not) and at its transaction (``position >> 28``):
one that had ended before the heads were taken (below ``xmax``, not ``running``)
should be in them: the event is reported whatever its recorded time; one that was
running then (``running``, or from ``xmax`` up to ``next_xid``) had not committed, and
may have recorded its events before: not reported; one that began after is reported
if its recorded time is at or before ``taken_at`` (riskbook's writers take an event's
position, and with it a transaction id, before its recorded time, so theirs are
later). A server clock set back since ``taken_at`` would make honest events look
back-dated; a transaction that was running then may still add events recorded before.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg import sql

from riskbook.events import canonical_fields
from riskbook.store import Store, connect
from riskbook.store.migrations import applied_versions, head

__all__ = ["Heads", "Problem", "VerifyReport", "read_heads", "verify"]

Progress = Callable[[str, int], None]

# The stored columns as the canonical encoding writes them, from built-in functions only
# (schema-qualified, so that nothing on the search_path can stand in for them); the
# encoding itself is put together and hashed here, in Python (riskbook.events'
# canonical_fields) -- a second implementation beside the writers' SQL function.
#
# The encoding's YYYY has no era and an infinite time has no text: a recorded time moved
# to 2026 BC hashes as 2026 AD, and an infinite one as null. riskbook's writers (Python
# datetimes, clock_timestamp()) only ever write times in the years 1 to 9999 UTC, so a
# time outside them was put there afterwards: the last column shows it (NULL for every
# other row), and each such event is reported altered whatever its hash says.
_SCAN_SQL = (  # canonical_fields' arguments, the stored hash, the position, a bad time
    "SELECT event_id::text, event_type, aggregate_id, aggregate_type, sequence,"
    ' pg_catalog.to_char("timestamp" AT TIME ZONE \'UTC\', \'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\'),'
    " causation_id::text, correlation_id, metadata::text, payload::text, hash, position,"
    " CASE WHEN \"timestamp\" OPERATOR(pg_catalog.>=) '0001-01-01 00:00:00+00'::pg_catalog.timestamptz"
    " AND \"timestamp\" OPERATOR(pg_catalog.<) '10000-01-01 00:00:00+00'::pg_catalog.timestamptz"
    " THEN NULL ELSE (\"timestamp\" AT TIME ZONE 'UTC')::pg_catalog.text END"
    " FROM events"
)
# The digest in SQL, for the few events whose place in the chain is in doubt.
_DIGEST_SQL = (
    "pg_catalog.sha256(pg_catalog.convert_to(pg_catalog.jsonb_build_array("
    "{e}event_id::text, {e}event_type, {e}aggregate_id, {e}aggregate_type, {sequence},"
    ' pg_catalog.to_char({e}"timestamp" AT TIME ZONE \'UTC\', \'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\'),'
    " {e}causation_id::text, {e}correlation_id, {e}metadata, {e}payload)::text, 'UTF8'))"
)

# event_fields, the typed copy of events that riskbook.load reads, must be what the
# insert trigger derives from events (migration 0003), row for row: otherwise an
# auditor's notebook would show history other than the one the chains vouch for.
_TIME_FIELD = (
    "CASE e.event_type WHEN 'TradeExecuted' THEN 'executed_at'"
    " WHEN 'TradeCancelled' THEN 'cancelled_at' WHEN 'PositionUpdated' THEN 'updated_at'"
    " WHEN 'PriceMarked' THEN 'marked_at' WHEN 'AccountFunded' THEN 'funded_at'"
    " WHEN 'LimitSet' THEN 'set_at' WHEN 'LimitViolationDetected' THEN 'detected_at'"
    " WHEN 'AccountBlocked' THEN 'blocked_at' WHEN 'AccountUnblocked' THEN 'unblocked_at' END"
)
_DERIVED_SQL = f"""
WITH derived AS (
    SELECT e.position, e.aggregate_id, e.sequence,
           ROW(e.event_id, e.event_type, e.aggregate_id, e.aggregate_type, e.sequence,
               e."timestamp", e.causation_id, e.correlation_id,
               (e.payload->>({_TIME_FIELD}))::timestamptz,
               k->>'account_id', k->>'symbol', k->>'trade_id', k->>'side',
               (k->>'quantity')::float8, (k->>'price')::float8, (k->>'amount')::float8,
               (k->>'previous_quantity')::float8, (k->>'new_quantity')::float8,
               k->>'limit_type', (k->>'value')::float8, (k->>'current_value')::float8,
               (k->>'limit_value')::float8,
               coalesce(k->>'set_by', k->>'blocked_by', k->>'unblocked_by'),
               k->>'reason') AS fields
      FROM events e
     CROSS JOIN LATERAL (SELECT CASE WHEN ({_TIME_FIELD}) IS NOT NULL THEN e.payload END) x(k)
)
SELECT coalesce(d.aggregate_id, f.aggregate_id), coalesce(d.sequence, f.sequence),
       coalesce(d.position, f.position),
       CASE WHEN d.position IS NULL OR f.position IS NULL THEN 'removed' ELSE 'altered' END,
       CASE WHEN d.position IS NULL
            THEN 'gone from events; its typed copy in event_fields (what riskbook.load reads)'
                 || ' is still there'
            WHEN f.position IS NULL
            THEN 'its typed copy in event_fields (what riskbook.load reads) is gone'
            ELSE 'its typed copy in event_fields (what riskbook.load reads) differs from it'
       END
  FROM derived d
  FULL JOIN event_fields f ON f.position = d.position
 WHERE d.position IS NULL OR f.position IS NULL
    OR d.fields IS DISTINCT FROM ROW(
           f.event_id, f.event_type, f.aggregate_id, f.aggregate_type, f.sequence,
           f."timestamp", f.causation_id, f.correlation_id, f.occurred_at, f.account_id,
           f.symbol, f.trade_id, f.side, f.quantity, f.price, f.amount, f.previous_quantity,
           f.new_quantity, f.limit_type, f.value, f.current_value, f.limit_value, f.actor,
           f.reason)
"""

# The scan's first statement takes its snapshot: export it (for the typed-copy check),
# and note what kept heads need -- when (this statement's start, no later than the
# snapshot) and which transactions had begun by then: those below the snapshot's xmax
# had ended (their events are in it) unless running (its xip); those below next_xid
# (the next transaction id to be assigned, read after the snapshot: age() of a
# transaction id counts from it) may have been running; the others began after. No
# committed event's position reaches the snapshot's xmax << 28.
_SNAPSHOT_SQL = (
    "SELECT pg_catalog.pg_export_snapshot(), pg_catalog.statement_timestamp(),"
    " x::text::bigint, x::text::bigint + pg_catalog.age(pg_catalog.xid(x)),"
    " ARRAY(SELECT r::text::bigint FROM pg_catalog.pg_snapshot_xip(s) AS r)"
    " FROM (SELECT s, pg_catalog.pg_snapshot_xmax(s) AS x"
    " FROM (SELECT pg_catalog.pg_current_snapshot() AS s) a) b"
)
# A position is (transaction id << 28) + n (riskbook_reserve_positions, migration 0001).
_POSITION_SHIFT = 28

# riskbook's own SQL functions, as this connection finds them: those of the store's
# schema, and any of the same name in a schema of the search path (which could stand in
# for them). What each is made of, in a form that does not depend on the store's schema,
# is digested in Python (_function_digest).
_STORE_SCHEMA_SQL = (
    "SELECT n.nspname, pg_catalog.quote_ident(n.nspname),"
    " pg_catalog.array_position(pg_catalog.current_schemas(true), n.nspname)"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.oid = pg_catalog.to_regclass('events')"
)
_FUNCTIONS_SQL = """
SELECT n.nspname, p.proname, pg_catalog.oidvectortypes(p.proargtypes),
       pg_catalog.array_position(pg_catalog.current_schemas(true), n.nspname),
       pg_catalog.pg_get_function_identity_arguments(p.oid),
       pg_catalog.pg_get_function_result(p.oid), l.lanname, p.prokind, p.prosecdef,
       p.provolatile, p.proisstrict, p.proparallel, p.prosrc, p.probin, p.proconfig,
       t.proname, pg_catalog.format_type(a.aggtranstype, NULL), a.agginitval, f.proname
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language l ON l.oid = p.prolang
  LEFT JOIN pg_catalog.pg_aggregate a ON a.aggfnoid = p.oid
  LEFT JOIN pg_catalog.pg_proc t ON t.oid = a.aggtransfn
  LEFT JOIN pg_catalog.pg_proc f ON f.oid = a.aggfinalfn
 WHERE p.proname LIKE 'riskbook\\_%%'
   AND (n.nspname = %s OR n.nspname = ANY (pg_catalog.current_schemas(true)))
"""

# What the migrations install (each function's _function_digest), after the newest one.
# A migration that adds or replaces a function changes this table: the test
# test_verify_knows_the_functions_the_migrations_install says so, and prints it anew.
_FUNCTIONS: dict[str, str] = {
    "riskbook_chain(bytea, bytea)": "f239e470076c2988913150cfd5f7418b",
    "riskbook_chain_event()": "7d4a237a8b25d077eaf7106f090761f0",
    "riskbook_chain_step(bytea, bytea, bytea)": "40acb6284deded489c077e9923273012",
    "riskbook_event_digest(uuid, text, text, text, bigint, timestamp with time zone, uuid,"
    " text, jsonb, jsonb)": "4a1a146b90a3045d7a5835a5a472e715",
    "riskbook_events_inserted()": "26c207d131c1a8438b4d5cef82803ff7",
    "riskbook_fill_event_fields(bigint, bigint)": "58856cd9325faa352d98782a8139c83e",
    "riskbook_next_position()": "f637ab154e52e077210e7cdb2cbd7d45",
    "riskbook_position_fence()": "df5072fdbf06b756f8c2b53a73b4b979",
    "riskbook_refuse_change()": "6c185fb18bed8e4ef2aaa657acfe784d",
    "riskbook_reserve_positions(bigint)": "98fa304b36e62b9461d339db10352e5d",
    "riskbook_settled_fence()": "223fb77fcaf93baa36666f28933ff856",
    "riskbook_time_field(text)": "0027a2c53f68623efeeea9e4af45f77d",
}


@dataclass(frozen=True, order=True)
class Problem:
    """Where a chain breaks: an aggregate, a sequence, what is wrong there.

    A problem of the store rather than of an event (riskbook's SQL functions) has an
    empty ``aggregate_id`` and sequence 0.
    """

    aggregate_id: str
    sequence: int
    kind: str
    """``altered``, ``removed``, ``reordered``, ``duplicate`` or ``back-dated``."""
    detail: str = field(compare=False)
    position: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        if not self.aggregate_id:
            return f"the store: {self.kind} ({self.detail})"
        return f"{self.aggregate_id!r} sequence {self.sequence}: {self.kind} ({self.detail})"


class Heads(dict[str, tuple[int, str]]):
    """Each aggregate's last sequence and its hash (hex), as :func:`verify` found them,
    and when: ``taken_at`` (the server's time at the scan's snapshot, UTC), and which
    transactions had begun by then (``xmax``, ``next_xid``, ``running``: see the
    module's documentation). A plain mapping of heads (or an old heads file) does not
    say when: ``taken_at`` is None, and :func:`verify` cannot tell back-dated events."""

    def __init__(
        self,
        heads: Mapping[str, tuple[int, str]] | Iterable[tuple[str, tuple[int, str]]] = (),
        *,
        taken_at: datetime | None = None,
        xmax: int = 0,
        next_xid: int = 0,
        running: Iterable[int] = (),
    ) -> None:
        super().__init__(heads)
        if taken_at is not None and (taken_at.tzinfo is None or not 0 < xmax <= next_xid):
            raise ValueError(
                "heads taken at a time need an aware taken_at and 0 < xmax <= next_xid"
            )
        self.taken_at = taken_at
        self.xmax = xmax
        self.next_xid = next_xid
        self.running = frozenset(running)

    def to_json(self) -> str:
        """The heads file's text (see the module's documentation)."""
        data: dict[str, Any] = {"heads": {a: list(h) for a, h in sorted(self.items())}}
        if self.taken_at is not None:
            data["taken_at"] = f"{self.taken_at.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%fZ}"
            data["xmax"] = self.xmax
            data["next_xid"] = self.next_xid
            data["running"] = sorted(self.running)
        return json.dumps(data) + "\n"


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found.

    Attributes
    ----------
    events : events read
    aggregates : aggregates read
    seconds : wall time of the scan
    problems : every break found, ordered by aggregate and sequence (empty: all holds)
    heads : each aggregate's last sequence and its hash (hex), and when they were taken
        (:class:`Heads`), to keep and pass back to a later :func:`verify` (``heads=``)
    """

    events: int
    aggregates: int
    seconds: float
    problems: tuple[Problem, ...]
    heads: Heads = field(repr=False)

    @property
    def ok(self) -> bool:
        """True when every chain holds."""
        return not self.problems

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    def save_heads(self, path: str | Path) -> Path:
        """Write :attr:`heads` as JSON (``{"heads": {aggregate: [sequence, hash]},
        "taken_at": ..., "xmax": ..., "running": [...], "next_xid": ...}``: see the
        module's documentation). It writes them whatever :attr:`ok` says; ``riskbook
        verify --save-heads`` only when every chain holds (heads of a history found
        tampered with would vouch for it at the next check)."""
        path = Path(path)
        path.write_text(self.heads.to_json())
        return path

    def __str__(self) -> str:
        rate = f"{self.events_per_second:,.0f} events/s" if self.seconds > 0 else "-"
        summary = (
            f"verified {self.events:,} events of {self.aggregates:,} aggregates in "
            f"{self.seconds:.2f} s ({rate}): "
        )
        if self.ok:
            return summary + "every chain holds"
        broken = len({p.aggregate_id for p in self.problems if p.aggregate_id})
        where = f"{broken:,} aggregate(s)"
        if any(not p.aggregate_id for p in self.problems):
            where += " and in riskbook's SQL functions"
        lines = [str(p) for p in self.problems]
        return "\n".join([*lines, summary + f"{len(self.problems):,} problem(s) in {where}"])


def read_heads(path: str | Path) -> Heads:
    """Heads saved by :meth:`VerifyReport.save_heads` (by this version, or an older one:
    without ``taken_at``)."""
    try:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and isinstance(data.get("heads"), dict):
            taken = data.get("taken_at")
            taken_at = None if taken is None else datetime.fromisoformat(taken)
            if taken_at is not None and taken_at.tzinfo is None:
                raise ValueError(f"taken_at {taken!r} has no time zone")
            when: dict[str, Any] = {}
            if taken_at is not None:
                running = data["running"]
                if not isinstance(running, list):
                    raise ValueError(f"running is {running!r}, not a list of transaction ids")
                when = {
                    "taken_at": taken_at,
                    "xmax": _count(data["xmax"], "xmax", 0),
                    "next_xid": _count(data["next_xid"], "next_xid", 0),
                    "running": [_count(x, "a running transaction id", 0) for x in running],
                }
            return Heads((_head(a, h) for a, h in data["heads"].items()), **when)
        if not isinstance(data, dict):
            raise ValueError("it holds no object of heads")
        return Heads(_head(a, h) for a, h in data.items())
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"{path}: not a heads file written by riskbook verify ({exc})") from None


def _count(value: Any, what: str, least: int) -> int:
    """``value`` if it is a whole number (a JSON integer) of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{what} is {value!r}, not a whole number from {least}")
    return value


_HASH = re.compile(r"[0-9a-f]{64}")


def _head(aggregate: str, head: Any) -> tuple[str, tuple[int, str]]:
    """One aggregate's head as a heads file holds it: [sequence >= 1, sha256 in hex]."""
    if not isinstance(head, list) or len(head) != 2:
        raise ValueError(f"the head of {aggregate!r} is {head!r}, not [sequence, hash]")
    sequence = _count(head[0], f"the sequence of {aggregate!r}", 1)
    digest = head[1]
    if not isinstance(digest, str) or not _HASH.fullmatch(digest):
        raise ValueError(f"the hash of {aggregate!r} is {digest!r}, not a sha256 in hex")
    return aggregate, (sequence, digest)


def verify(
    store_or_dsn: Store | str | None = None,
    *,
    heads: Mapping[str, tuple[int, str]] | str | Path | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Recompute every hash chain of the store; report where history was tampered with.

    Parameters
    ----------
    store_or_dsn : a :class:`~riskbook.Store`, a DSN, or None (``RISKBOOK_DSN``, else the
        embedded server).
    heads : heads of an earlier report (its :attr:`VerifyReport.heads`, a mapping, or the
        path of a file written by :meth:`VerifyReport.save_heads`): each must still be
        there, with the same hash; and, when they say when they were taken, no event
        beyond them may be back-dated to before then.
    progress : called with ("verified", events so far) every 100,000 events.

    Examples
    --------
    >>> report = verify(store)  # doctest: +SKIP
    >>> report.ok, report.events_per_second  # doctest: +SKIP
    (True, 185000.0)
    """
    if not isinstance(store_or_dsn, Store):
        store = connect(store_or_dsn)
        try:
            return verify(store, heads=heads, progress=progress)
        finally:
            store.close()  # opened here: its connections go with it
    store = store_or_dsn
    if isinstance(heads, Heads):
        expected_heads = heads
    elif isinstance(heads, str | Path):
        expected_heads = read_heads(heads)
    else:
        expected_heads = Heads(heads or {})
    started = time.perf_counter()
    scan = _Scan(expected_heads)
    sha256 = hashlib.sha256
    with store.connection() as conn:
        # one snapshot for the whole scan, and nothing it could write
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        found = conn.execute(_SNAPSHOT_SQL).fetchone()
        snapshot, taken_at, xmax, next_xid, running = found  # type: ignore[misc]
        beyond = xmax << _POSITION_SHIFT  # no committed event's position reaches it
        dated = scan.since is not None  # heads that say when they were taken
        typed = _TypedCopyCheck(store, snapshot)  # the server works on it meanwhile
        typed.start()
        try:
            with conn.cursor() as cur:
                rows = cur.stream(_SCAN_SQL, binary=True, size=20_000)
                for n, row in enumerate(rows, 1):
                    digest = sha256(canonical_fields(*row[:10]).encode()).digest()
                    scan.add(row[2], row[4], row[10], digest, row[11])
                    if row[12] is not None:
                        scan.impossible_time(row[2], row[4], row[12], row[11])
                    if row[11] >= beyond:
                        scan.future_position(row[2], row[4], row[11], xmax)
                    if dated:
                        scan.check_recorded(row[2], row[4], row[5], row[11])
                    if progress is not None and n % 100_000 == 0:
                        progress("verified", n)
            scan.finish()
            if scan.suspects:
                _explain(conn, scan)
            scan.problems += scan.out_of_order()
            scan.problems += _check_functions(conn)
        finally:
            typed.join()
        scan.problems += typed.result()
    seconds = time.perf_counter() - started
    unique = {(p.aggregate_id, p.sequence, p.kind, p.detail): p for p in scan.problems}
    return VerifyReport(
        events=scan.events,
        aggregates=len(scan.chains),
        seconds=seconds,
        problems=tuple(sorted(unique.values())),
        heads=Heads(
            ((a, (c[0] - 1, c[1].hex())) for a, c in scan.chains.items()),
            taken_at=taken_at.astimezone(UTC),
            xmax=xmax,
            next_xid=next_xid,
            running=running,
        ),
    )


class _TypedCopyCheck(threading.Thread):
    """Compares event_fields with events (``_DERIVED_SQL``) on a second connection, in
    the scan's snapshot, while the scan runs (the wait is on the server: no GIL held)."""

    def __init__(self, store: Store, snapshot: str) -> None:
        super().__init__(name="riskbook-verify-typed-copy", daemon=True)
        self.store = store
        self.snapshot = snapshot
        self.problems: list[Problem] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.store.connection() as conn:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot))
                )
                for agg, seq, pos, kind, detail in conn.execute(_DERIVED_SQL):
                    self.problems.append(Problem(agg, int(seq), kind, detail, pos))
        except BaseException as exc:  # handed to the caller's thread by result()
            self.error = exc

    def result(self) -> list[Problem]:
        if self.error is not None:
            raise self.error
        return self.problems


class _Scan:
    """The chains, put together as rows stream by in any order.

    For each aggregate: the next sequence expected and the stored hash of the last one
    seen; rows that arrive early wait in ``pending``. After a break the chain goes on
    from the *stored* hash, so that one altered event is reported once, not with every
    event after it.
    """

    def __init__(self, expected_heads: Heads) -> None:
        self.chains: dict[str, tuple[int, bytes]] = {}
        self.pending: dict[str, dict[int, tuple[bytes, bytes, int]]] = {}
        self.problems: list[Problem] = []
        # agg -> (seq, pos, stored hash, digest of the event as it is now)
        self.suspects: dict[str, list[tuple[int, int, bytes, bytes]]] = {}
        self.expected_heads = expected_heads
        self.seen_heads: set[str] = set()
        self.events = 0
        # positions of events whose recorded time riskbook cannot have written: told as
        # such, not again as a content that does not hash (which it may well not)
        self.impossible_times: set[int] = set()
        # agg -> (sequence, position) of its event furthest on in the global order so far;
        # and the events found before it though of a later sequence (see out_of_order)
        self.furthest: dict[str, tuple[int, int]] = {}
        self.behind: list[tuple[str, int, int, int, int]] = []
        # when the heads were taken, as the scan writes recorded times (None: unknown)
        taken_at = expected_heads.taken_at
        self.since = (
            None if taken_at is None else f"{taken_at.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%fZ}"
        )

    def future_position(self, agg: str, seq: int, pos: int, xmax: int) -> None:
        self.problems.append(
            Problem(
                agg,
                seq,
                "altered",
                f"its position ({pos}) is beyond any the server has handed out (every "
                f"transaction so far writes below {xmax << _POSITION_SHIFT}): riskbook.load "
                "and the live processor do not read it",
                pos,
            )
        )

    def check_recorded(self, agg: str, seq: int, recorded: str | None, pos: int) -> None:
        """An event beyond the heads: back-dated unless its transaction was running when
        they were taken, or began after and recorded it after (see the module's text)."""
        head = self.expected_heads.get(agg)
        if head is not None and seq <= head[0]:
            return
        heads = self.expected_heads
        xid = pos >> _POSITION_SHIFT
        if xid < heads.xmax and xid not in heads.running:
            detail = (
                f"written by a transaction that had ended when the heads were taken "
                f"({self.since}), yet they do not hold it"
            )
        elif xid >= heads.next_xid and recorded is not None and recorded <= str(self.since):
            detail = (
                f"recorded at {recorded}, at or before the heads were taken ({self.since}), "
                "yet written after: what riskbook.load(known_at=...) says of a time before "
                "then has changed"
            )
        else:
            return
        self.problems.append(Problem(agg, seq, "back-dated", detail, pos))

    def impossible_time(self, agg: str, seq: int, recorded: str, pos: int) -> None:
        shown = recorded if recorded.endswith("infinity") else f"{recorded} UTC"
        self.impossible_times.add(pos)
        self.problems.append(
            Problem(
                agg,
                seq,
                "altered",
                f"its recorded time ({shown}) is one riskbook cannot have written (before "
                "year 1, after year 9999 or infinite; its hash cannot tell): changed since, "
                "or written by other means",
                pos,
            )
        )

    def add(self, agg: str, seq: int, stored: bytes | None, digest: bytes, pos: int) -> None:
        self.events += 1
        expected, previous = self.chains.get(agg, (1, b""))
        stored = b"" if stored is None else bytes(stored)
        if seq == expected:
            self._link(agg, seq, previous, stored, bytes(digest), pos, after_gap=False)
            waiting = self.pending.get(agg)
            while waiting:
                nxt = self.chains[agg][0]
                if nxt not in waiting:
                    break
                s_stored, s_digest, s_pos = waiting.pop(nxt)
                self._link(agg, nxt, self.chains[agg][1], s_stored, s_digest, s_pos, False)
        elif seq > expected:
            waiting = self.pending.setdefault(agg, {})
            if seq in waiting:
                self._duplicate(agg, seq, pos)
            else:
                waiting[seq] = (stored, bytes(digest), pos)
        else:
            self._duplicate(agg, seq, pos)

    def _link(
        self,
        agg: str,
        seq: int,
        previous: bytes,
        stored: bytes,
        digest: bytes,
        pos: int,
        after_gap: bool,
    ) -> None:
        if not after_gap and hashlib.sha256(previous + digest).digest() != stored:
            self.suspects.setdefault(agg, []).append((seq, pos, stored, digest))
        self.chains[agg] = (seq + 1, stored)
        furthest = self.furthest.get(agg)
        if furthest is None or pos > furthest[1]:
            self.furthest[agg] = (seq, pos)
        else:
            self.behind.append((agg, seq, pos, *furthest))
        head = self.expected_heads.get(agg)
        if head is not None and head[0] == seq:
            self.seen_heads.add(agg)
            if stored.hex() != head[1]:
                self.problems.append(
                    Problem(
                        agg,
                        seq,
                        "altered",
                        "its hash differs from the head recorded earlier: the chain up to "
                        "here was rewritten",
                        pos,
                    )
                )

    def out_of_order(self) -> list[Problem]:
        """The events a reader of the global order meets before an earlier version of
        their aggregate (position is not hashed: every chain may hold). Written by a
        transaction that had taken its id before another's, which then appended to the
        aggregate first -- refused since migration 0020 -- or positions were altered.
        Not told again when either event is told already (a swap of sequences moves
        positions with the events)."""
        told = {(p.aggregate_id, p.sequence) for p in self.problems}
        return [
            Problem(
                agg,
                seq,
                "reordered",
                f"its position ({pos}) comes before that of sequence {ahead} ({ahead_pos}):"
                f" a reader of the global order (riskbook.read, Store.follow, the live"
                f" processor) meets it before the version it follows",
                pos,
            )
            for agg, seq, pos, ahead, ahead_pos in self.behind
            if (agg, seq) not in told and (agg, ahead) not in told
        ]

    def _duplicate(self, agg: str, seq: int, pos: int) -> None:
        self.problems.append(
            Problem(agg, seq, "duplicate", f"another event has this sequence too (position {pos})")
        )

    def finish(self) -> None:
        """Close the gaps: whatever still waits comes after missing sequences."""
        for agg, waiting in self.pending.items():
            while waiting:
                expected = self.chains.get(agg, (1, b""))[0]
                first = min(waiting)
                missing = f"{expected}" if first == expected + 1 else f"{expected}-{first - 1}"
                self.problems.append(
                    Problem(
                        agg,
                        expected,
                        "removed",
                        f"sequence {missing} is missing; the event after the gap (sequence "
                        f"{first}) cannot be checked against its predecessor",
                    )
                )
                stored, digest, pos = waiting.pop(first)
                self._link(agg, first, b"", stored, digest, pos, after_gap=True)
                while (nxt := self.chains[agg][0]) in waiting:
                    s_stored, s_digest, s_pos = waiting.pop(nxt)
                    self._link(agg, nxt, self.chains[agg][1], s_stored, s_digest, s_pos, False)
        for agg, (seq, recorded) in self.expected_heads.items():
            if agg not in self.seen_heads:
                last = self.chains.get(agg, (1, b""))[0] - 1
                self.problems.append(
                    Problem(
                        agg,
                        seq,
                        "removed",
                        f"the head recorded earlier (sequence {seq}, hash {recorded[:12]}...) is "
                        f"gone; the aggregate now ends at sequence {last}",
                    )
                )


def _explain(conn: Any, scan: _Scan) -> None:
    """Tell a reordered event from an altered one.

    An event found at sequence s whose hash checks out as written at another broken
    sequence t of its aggregate (its content hashed with t, after the stored hash of
    the event now at t - 1) was moved there from t. An event that chains, at its own
    sequence, from the event written just before it (which has moved away) was not
    touched: only its neighbour changed, and that is told once, as that move. So is one
    that chains from the hash the content of the event before it gives, when that
    event's stored hash alone was changed: that event is told, as altered. Any other
    break is an alteration.
    """
    for agg, broken in scan.suspects.items():
        stored_hashes = {
            int(seq): bytes(h)
            for seq, h in conn.execute(
                "SELECT sequence, hash FROM events WHERE aggregate_id = %s", (agg,)
            )
        }
        stored_hashes[0] = b""
        candidates = sorted({seq for seq, _, _, _ in broken})[:64]
        moved: dict[int, int] = {}
        if len(candidates) > 1:
            rows = conn.execute(
                "SELECT e.position, t.seq, "
                + _DIGEST_SQL.format(e="e.", sequence="t.seq")
                + " FROM events e CROSS JOIN unnest(%s::bigint[]) t(seq)"
                " WHERE e.position = ANY(%s) AND t.seq <> e.sequence",
                (candidates, [pos for _, pos, _, _ in broken]),
            ).fetchall()
            by_position = {pos: (seq, stored) for seq, pos, stored, _ in broken}
            # the event before it then: the one at t - 1 now, or one that moved too
            movers = {stored for _, _, stored, _ in broken}
            for pos, t, digest in rows:
                seq, stored = by_position[pos]
                before = movers | {stored_hashes.get(int(t) - 1, b"")}
                if any(
                    hashlib.sha256(previous + bytes(digest)).digest() == stored
                    for previous in before
                ):
                    moved[seq] = int(t)
        # the stored hash of the event written at each sequence that has moved away
        written_at = {moved[seq]: stored for seq, _, stored, _ in broken if seq in moved}
        # the hash each broken event's content gives, chained from the stored hash before
        # it: what it was written with, if only its stored hash was changed since
        hashed = {
            seq: hashlib.sha256(stored_hashes.get(seq - 1, b"") + digest).digest()
            for seq, _, _, digest in broken
            if seq not in moved
        }
        for seq, pos, stored, digest in broken:
            written_before = written_at.get(seq - 1)
            if (
                seq not in moved
                and written_before is not None
                and hashlib.sha256(written_before + digest).digest() == stored
            ):
                continue  # untouched: the event written before it was moved (told above)
            hashed_before = hashed.get(seq - 1)
            if (
                seq not in moved
                and hashed_before is not None
                and hashlib.sha256(hashed_before + digest).digest() == stored
            ):
                continue  # untouched: it chains from what the event before it hashes to,
                # whose stored hash alone was changed (that event is told, as altered)
            if seq in moved:
                detail = f"the event here was written as sequence {moved[seq]}"
                scan.problems.append(Problem(agg, seq, "reordered", detail, pos))
            elif pos in scan.impossible_times:
                continue  # told already, more plainly: its recorded time was changed
            else:
                detail = (
                    "its content does not hash to its stored hash: the event, its hash, or "
                    "the link to the event before it was changed"
                )
                scan.problems.append(Problem(agg, seq, "altered", detail, pos))


def _function_digest(store_schema: str, row: tuple[Any, ...]) -> str:
    """md5 of what a function is made of (``_FUNCTIONS_SQL``'s columns from the fifth
    on), the store's schema written as ``$store`` wherever a setting names it."""
    *made_of, config, transfn, transtype, initval, finalfn = row[4:]
    settings = []
    for entry in config or ():
        name, _, value = entry.partition("=")
        if name == "search_path" and (
            value == store_schema or value.startswith(store_schema + ",")
        ):
            value = "$store" + value[len(store_schema) :]
        settings.append(f"{name}={value}")
    made = [*made_of, settings, transfn, transtype, initval, finalfn]
    return hashlib.md5(json.dumps(made, default=str).encode()).hexdigest()


def _installed_functions(conn: Any) -> tuple[str, dict[str, str], list[Problem]]:
    """The store's schema, the digest of each riskbook function in it (by signature),
    and any function of one of their names elsewhere on the search path that could
    stand in for it (before the store's schema, or another signature)."""
    found = conn.execute(_STORE_SCHEMA_SQL).fetchone()
    if found is None:  # the scan read events: cannot happen, but say so plainly
        raise RuntimeError("the events table cannot be found on this connection's search path")
    schema, quoted, store_place = found
    names = {key.partition("(")[0] for key in _FUNCTIONS}
    digests: dict[str, str] = {}
    strangers: list[Problem] = []
    for row in conn.execute(_FUNCTIONS_SQL, (schema,)):
        nsp, name, args, place = row[:4]
        key = f"{name}({args})"
        if nsp == schema:
            digests[key] = _function_digest(quoted, row)
            continue
        if name in names and (
            key not in _FUNCTIONS or store_place is None or place is None or place < store_place
        ):
            strangers.append(
                _store_problem(
                    f"the function {nsp}.{key}, of the name of riskbook's {name} (schema "
                    f"{schema!r}), is on the search path too: calls of {name} may reach it"
                )
            )
    return schema, digests, strangers


def _store_problem(detail: str) -> Problem:
    return Problem("", 0, "altered", detail)


def _check_functions(conn: Any) -> list[Problem]:
    """riskbook's SQL functions must be what the migrations installed: replacing
    riskbook_position_fence() alone, say, hides the latest events from every reader."""
    schema, digests, problems = _installed_functions(conn)
    applied = applied_versions(conn)
    if applied != list(range(1, head() + 1)):  # a store opened with migrate=False, say
        return [
            *problems,
            _store_problem(
                f"the store's schema is at version {max(applied, default=0)}, this riskbook's "
                f"at {head()}: riskbook's SQL functions cannot be checked (riskbook db upgrade)"
            ),
        ]
    for key, expected in _FUNCTIONS.items():
        actual = digests.get(key)
        if actual is None:
            problems.append(
                _store_problem(f"riskbook's SQL function {key} is missing from schema {schema!r}")
            )
        elif actual != expected:
            problems.append(
                _store_problem(
                    f"riskbook's SQL function {key} (schema {schema!r}) is not the one the "
                    "migrations installed: its source or settings were replaced"
                )
            )
    names = {key.partition("(")[0] for key in _FUNCTIONS}
    for key in sorted(digests.keys() - _FUNCTIONS.keys()):
        if key.partition("(")[0] in names:  # an overload can take riskbook's calls
            problems.append(
                _store_problem(
                    f"the function {key} (schema {schema!r}) takes the name of one of "
                    "riskbook's, which the migrations did not install: calls may reach it"
                )
            )
    return problems
