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
  (two events swapped, say);
* **duplicate** -- two events share a sequence.

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
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import sql

from riskbook.events import canonical_fields
from riskbook.store import Store, connect

__all__ = ["Problem", "VerifyReport", "read_heads", "verify"]

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


@dataclass(frozen=True, order=True)
class Problem:
    """Where a chain breaks: an aggregate, a sequence, what is wrong there."""

    aggregate_id: str
    sequence: int
    kind: str
    """``altered``, ``removed``, ``reordered`` or ``duplicate``."""
    detail: str = field(compare=False)
    position: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.aggregate_id!r} sequence {self.sequence}: {self.kind} ({self.detail})"


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found.

    Attributes
    ----------
    events : events read
    aggregates : aggregates read
    seconds : wall time of the scan
    problems : every break found, ordered by aggregate and sequence (empty: all holds)
    heads : each aggregate's last sequence and its hash (hex), to keep and pass back to
        a later :func:`verify` (``heads=``)
    """

    events: int
    aggregates: int
    seconds: float
    problems: tuple[Problem, ...]
    heads: Mapping[str, tuple[int, str]] = field(repr=False)

    @property
    def ok(self) -> bool:
        """True when every chain holds."""
        return not self.problems

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    def save_heads(self, path: str | Path) -> Path:
        """Write :attr:`heads` as JSON (``{aggregate: [sequence, hash]}``)."""
        path = Path(path)
        path.write_text(json.dumps({a: list(h) for a, h in sorted(self.heads.items())}) + "\n")
        return path

    def __str__(self) -> str:
        rate = f"{self.events_per_second:,.0f} events/s" if self.seconds > 0 else "-"
        summary = (
            f"verified {self.events:,} events of {self.aggregates:,} aggregates in "
            f"{self.seconds:.2f} s ({rate}): "
        )
        if self.ok:
            return summary + "every chain holds"
        broken = len({p.aggregate_id for p in self.problems})
        lines = [str(p) for p in self.problems]
        return "\n".join(
            [*lines, summary + f"{len(self.problems):,} problem(s) in {broken:,} aggregate(s)"]
        )


def read_heads(path: str | Path) -> dict[str, tuple[int, str]]:
    """Heads saved by :meth:`VerifyReport.save_heads`."""
    try:
        data = json.loads(Path(path).read_text())
        return {str(a): (int(h[0]), str(h[1])) for a, h in data.items()}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"{path}: not a heads file written by riskbook verify ({exc})") from None


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
    heads : heads of an earlier report (a mapping, or the path of a file written by
        :meth:`VerifyReport.save_heads`): each must still be there, with the same hash.
    progress : called with ("verified", events so far) every 100,000 events.

    Examples
    --------
    >>> report = verify(store)  # doctest: +SKIP
    >>> report.ok, report.events_per_second  # doctest: +SKIP
    (True, 185000.0)
    """
    store = store_or_dsn if isinstance(store_or_dsn, Store) else connect(store_or_dsn)
    expected_heads = read_heads(heads) if isinstance(heads, str | Path) else dict(heads or {})
    started = time.perf_counter()
    scan = _Scan(expected_heads)
    sha256 = hashlib.sha256
    with store.connection() as conn:
        # one snapshot for the whole scan, and nothing it could write
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
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
                    if progress is not None and n % 100_000 == 0:
                        progress("verified", n)
            scan.finish()
            if scan.suspects:
                _explain(conn, scan)
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
        heads={a: (c[0] - 1, c[1].hex()) for a, c in scan.chains.items()},
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

    def __init__(self, expected_heads: dict[str, tuple[int, str]]) -> None:
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
    touched: only its neighbour changed, and that is told once, as that move. Any other
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
        for seq, pos, stored, digest in broken:
            written_before = written_at.get(seq - 1)
            if (
                seq not in moved
                and written_before is not None
                and hashlib.sha256(written_before + digest).digest() == stored
            ):
                continue  # untouched: the event written before it was moved (told above)
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
