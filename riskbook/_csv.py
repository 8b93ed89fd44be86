"""A small query's rows into Polars through PostgreSQL's CSV COPY, parsed by Polars.

The route of :func:`riskbook.load` for small reads -- a refresh of a few thousand
events, a filtered load -- where the other two would spend more time starting than
reading: ADBC's driver costs 50-60 ms the first time in a process (importing it, and
its database object reading the server's catalogue of types), and the compiled binary
decoder of :mod:`riskbook._copy` 0.15 s or more (numba).

``COPY (SELECT ... FROM (query)) TO STDOUT (FORMAT csv)`` on a psycopg connection: each
row's message taken from libpq (one call per row, no parsing in Python), the whole
text parsed by Polars' CSV reader with the column types known in advance. Values come
through exactly:

* timestamps as integer microseconds since 1970 (``extract(epoch ...)`` is exact
  numeric since PostgreSQL 14), not as text in the session's time zone and date style;
* floats in PostgreSQL's shortest text that reads back to the same bits
  (``extra_float_digits`` > 0), ``float4`` through ``float8`` (exact) so that no decimal
  is rounded twice;
* booleans as 0 / 1;
* NULL as an unquoted empty field, the empty string quoted: the CSV format tells them
  apart, and so does Polars.

A column type not listed in :data:`riskbook._columns.TYPES` is refused with
:class:`~riskbook._columns.Unsupported` before anything is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from riskbook._columns import (
    BOOL,
    FLOAT4,
    TEXT,
    TIME,
    Unsupported,
    describe,
    failure,
    finish,
    query_error,
    use_utf8,
)

__all__ = ["Unsupported", "read"]


def read(
    conn: Any, query: str, categories: Mapping[int, pl.DataType] | None = None
) -> pl.DataFrame:
    """The rows of ``query`` (parameters inlined) on psycopg connection ``conn``, which
    must be idle and is not usable by others meanwhile (its ``extra_float_digits`` is
    left at 3, its ``client_encoding`` at UTF8); raises
    :class:`~riskbook._columns.Unsupported` before reading anything if a column's type
    is not read here.

    ``categories``: text columns (by index) to return as this Categorical or Enum type.
    """
    import psycopg.pq

    pgconn = conn.pgconn
    use_utf8(pgconn)
    columns = describe(pgconn, query.encode())
    names = [f"c{i}" for i in range(len(columns))]
    select = []
    read_as: dict[str, pl.DataType] = {}
    for name, (_, code, dtype) in zip(names, columns, strict=True):
        if code == TIME:
            select.append(f"(extract(epoch FROM {name}) * 1000000)::int8")
            read_as[name] = pl.Int64()
        elif code == BOOL:
            select.append(f"{name}::int4")
            read_as[name] = pl.Int32()
        elif code == FLOAT4:
            select.append(f"{name}::float8")
            read_as[name] = pl.Float64()
        else:
            select.append(name)
            read_as[name] = dtype
    copy = (
        f"SET extra_float_digits = 3;"
        f" COPY (SELECT {', '.join(select)} FROM ({query}) AS q({', '.join(names)}))"
        " TO STDOUT (FORMAT csv)"
    )
    pgconn.send_query(copy.encode())
    res = pgconn.get_result()  # the SET's
    if res is None or res.status != psycopg.pq.ExecStatus.COMMAND_OK:
        finish(pgconn)
        raise query_error(res)
    res = pgconn.get_result()  # the COPY's start
    if res is None or res.status != psycopg.pq.ExecStatus.COPY_OUT:
        finish(pgconn)
        raise query_error(res)
    # one growing buffer, each row's message freed at once: nothing piles up for the
    # garbage collector, whose full passes over a notebook's heap (50 ms and more with
    # Polars and friends loaded) a list of a row object each would set off
    data = bytearray()
    get = pgconn.get_copy_data
    try:
        while True:
            n, row = get(0)
            if n < 0:
                break
            data += row
    except psycopg.Error as exc:  # the connection lost mid-stream: psycopg raises here
        raise failure(str(exc)) from None
    final = pgconn.get_result()
    finish(pgconn)
    if final is None or final.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise query_error(final)
    wanted = {i: t for i, t in (categories or {}).items() if columns[i][1] == TEXT}
    out = [
        pl.col(n).cast(wanted.get(i, dtype)) if read_as[n] != wanted.get(i, dtype) else pl.col(n)
        for i, (n, (_, _, dtype)) in enumerate(zip(names, columns, strict=True))
    ]
    if not data:
        return pl.DataFrame(schema=read_as).select(out).rename(_named(columns))
    raw = pl.read_csv(bytes(data), has_header=False, new_columns=names, schema=read_as)
    return raw.select(out).rename(_named(columns))


def _named(columns: list[tuple[str, int, pl.DataType]]) -> dict[str, str]:
    """The query's own column names (duplicates, say two ``?column?``, made unique)."""
    seen: dict[str, int] = {}
    out = {}
    for i, (name, _, _) in enumerate(columns):
        k = seen.get(name, 0)
        seen[name] = k + 1
        out[f"c{i}"] = name if k == 0 else f"{name}_{k}"
    return out
