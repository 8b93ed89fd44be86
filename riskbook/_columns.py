"""What riskbook's own readers of a query's rows share: the column types they read, and
the step that finds a query's columns before anything is read.

Two readers use it: :mod:`riskbook._copy` (the binary COPY stream decoded by compiled
loops, for large loads) and :mod:`riskbook._csv` (the CSV COPY stream parsed by Polars,
for small reads). Neither imports the other: the CSV route must not pay for numba.
"""

from __future__ import annotations

from typing import Any

import polars as pl

__all__ = ["TYPES", "Unsupported", "describe", "finish", "query_error", "use_utf8"]

# PostgreSQL type oid -> (parser code, Polars type of the raw column)
INT8, INT4, INT2, FLOAT8, FLOAT4, BOOL, TIME, TEXT = range(8)
TYPES: dict[int, tuple[int, pl.DataType]] = {
    20: (INT8, pl.Int64()),
    23: (INT4, pl.Int32()),
    21: (INT2, pl.Int16()),
    701: (FLOAT8, pl.Float64()),
    700: (FLOAT4, pl.Float32()),
    16: (BOOL, pl.Boolean()),
    1184: (TIME, pl.Datetime("us", "UTC")),
    1114: (TIME, pl.Datetime("us")),
    25: (TEXT, pl.String()),
    1043: (TEXT, pl.String()),
    1042: (TEXT, pl.String()),
    19: (TEXT, pl.String()),
}


class Unsupported(Exception):
    """A route cannot read the query (a column type it does not decode, no libpq)."""


def describe(pgconn: Any, query: bytes) -> list[tuple[str, int, pl.DataType]]:
    """(name, parser code, raw Polars type) of each column the query selects: one round
    trip (the unnamed statement prepared and described), nothing executed."""
    import psycopg.pq

    res = pgconn.prepare(b"", query)
    if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise query_error(res)
    d = pgconn.describe_prepared(b"")
    if d.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise query_error(d)
    out = []
    for i in range(d.nfields):
        oid = d.ftype(i)
        if oid not in TYPES:
            raise Unsupported(f"column {i + 1} has type oid {oid}")
        name = (d.fname(i) or b"").decode()
        out.append((name, *TYPES[oid]))
    return out


def use_utf8(pgconn: Any) -> None:
    """Make the session send and read text as UTF-8, if it does not already: the readers
    encode queries as UTF-8 and hand text bytes to Arrow as they come
    (``PGCLIENTENCODING``, or a database in another encoding, would give another
    encoding's bytes). Before anything else is sent: the server converts a whole
    message's text at once, before it runs a ``SET`` inside it."""
    import psycopg.pq

    if (pgconn.parameter_status(b"client_encoding") or b"").upper() in (b"UTF8", b"UNICODE"):
        return
    res = pgconn.exec_(b"SET client_encoding = 'UTF8'")
    if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise query_error(res)


def finish(pgconn: Any) -> None:
    """Read the results left, so that the connection is idle again."""
    while pgconn.get_result() is not None:
        pass


def query_error(res: Any) -> Exception:
    """The StoreError for a failed result (``res``: a libpq result, or None): a
    TransientStoreError, as the store says of its own, for a connection lost or a
    failure that passes (a deadlock, a statement timeout), which a retry can get past."""
    import psycopg.pq

    from riskbook.store.eventstore import _LOST_STATES, _TRANSIENT_STATES, TransientStoreError

    if res is None:  # no answer at all: the connection went
        return TransientStoreError("query failed: the server sent no result")
    message = (res.error_message or b"").decode(errors="replace")
    code = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
    state = code.decode() if code else None
    if state in _LOST_STATES or state in _TRANSIENT_STATES:
        return TransientStoreError(f"query failed: {' '.join(message.split())}", state)
    return failure(message or res.status.name)


def failure(message: str) -> Exception:
    """The StoreError of a read that failed with this message (no SQLSTATE to go by: a
    driver's text, libpq's own): a TransientStoreError where it says the connection was
    lost or the statement cancelled, which a retry can get past; in one line."""
    from riskbook.errors import StoreError
    from riskbook.store.eventstore import TransientStoreError

    text = f"query failed: {' '.join(message.split())}"
    passing = any(s in text for s in _PASSING_WORDS)
    return TransientStoreError(text) if passing else StoreError(text)


_PASSING_WORDS = (
    "server closed the connection",
    "terminating connection",
    "connection to server",
    "canceling statement",
)
