"""The load's own readers of a query's rows against ADBC's driver: the decoder of the
binary COPY stream (riskbook._copy, large loads) and the CSV COPY stream parsed by
Polars (riskbook._csv, small reads).

Every result is compared with what ADBC's driver reads for the same query on the same
database: the route loads used before, and the one both fall back to.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal

from riskbook import _copy, _csv
from riskbook._columns import Unsupported
from riskbook.errors import RiskbookError, StoreError
from riskbook.frames import _adbc, _collect, load
from riskbook.store import Store
from tests.test_frames import assert_same, random_history


def test_the_routes_are_available() -> None:
    """psycopg[binary] is a dependency: its libpq is there, and large loads use the
    compiled decoder, small ones (a refresh, say) the CSV route: nothing to start."""
    from riskbook.frames import _route

    assert _copy.available()
    assert [_route(s) for s in ("large", "medium", "small")] == ["copy", "adbc", "csv"]


READERS = {"copy": _copy.read, "csv": _csv.read}


# Every type the decoder reads, NULLs, empty and non-ASCII text, the extremes of each.
ALL_TYPES = r"""
SELECT x::int8 AS i8, (x * 1000)::int4 AS i4, (x % 30000)::int2 AS i2,
       CASE WHEN x % 7 = 0 THEN NULL ELSE -x::int8 * 1234567890123 END AS i8_nulls,
       x / 3.0::float8 AS f8, (x / 3.0)::float4 AS f4,
       CASE WHEN x % 5 = 0 THEN NULL ELSE x * 1e300::float8 END AS f8_nulls,
       'NaN'::float8 AS nan, (ARRAY['Infinity', '-Infinity', '-0', '5e-324',
       '1.7976931348623157e308', '0.1'])[x % 6 + 1]::float8 AS f8_edges,
       (x * 0.7)::float4 * 1e-30::float4 AS f4_small, x % 2 = 0 AS b, CASE WHEN x % 3 = 0 THEN NULL ELSE x % 2 = 1 END AS b_nulls,
       timestamptz '2024-03-04 14:30:00.123456+00' + x * interval '1 second 7 microseconds' AS tz,
       timestamp '1999-12-31 23:59:59.999999' - x * interval '1 day' AS ts,
       CASE WHEN x % 4 = 0 THEN NULL ELSE timestamptz '1970-01-01 00:00:00+00' END AS tz_nulls,
       'row ' || x AS t, CASE WHEN x % 2 = 0 THEN '' ELSE repeat('ü€𝄞', x % 9) END AS t_unicode,
       (ARRAY['a,b', 'say "hi"', E'two\nlines', E'cr\r', ' pad ', '\.', 'NULL', '"'])[x % 8 + 1]
         AS t_csv,
       9223372036854775807 - x AS i8_big, -9223372036854775807 - 1 + x AS i8_small,
       CASE WHEN x % 3 = 0 THEN NULL ELSE md5(x::text) END AS t_nulls,
       repeat('long', x % 50)::varchar AS vc, (x % 10)::text::char(3) AS bp, 'name'::name AS nm
  FROM generate_series(1, {n}) x
"""


@pytest.fixture
def conn(shared_store: Store) -> Iterator[psycopg.Connection]:
    with psycopg.connect(shared_store.dsn, autocommit=True) as c:
        yield c


def adbc_read(store: Store, query: str) -> object:
    with _adbc(store) as a:
        return _collect(a, query)


def assert_same_values(got: pl.DataFrame, theirs: pl.DataFrame) -> None:
    """Equal frames, floats to the bit (-0.0 apart from 0.0, the NaN's payload)."""
    assert_frame_equal(got, theirs, check_exact=True)
    for name, dtype in got.schema.items():
        if dtype in (pl.Float64, pl.Float32):
            bits = np.uint64 if dtype == pl.Float64 else np.uint32
            a, b = (f[name].fill_null(0).to_numpy().view(bits) for f in (got, theirs))
            assert (a == b).all(), name


@pytest.mark.parametrize("chunk", [64, 4096, 1 << 20])
def test_every_type_reads_as_adbc_reads_it(
    shared_store: Store, conn: psycopg.Connection, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a 64-byte buffer is smaller than any row: every row is one that did not fit
    monkeypatch.setattr(_copy, "_CHUNK", chunk)
    query = ALL_TYPES.format(n=2000)
    got = _copy.read(conn, query)
    assert got.height == 2000
    assert_same_values(got, adbc_read(shared_store, query))  # type: ignore[arg-type]
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is usable after


def test_the_csv_route_reads_every_type_as_adbc_reads_it(
    shared_store: Store, conn: psycopg.Connection
) -> None:
    """Floats to the last bit (its shortest text, whatever the session's
    extra_float_digits), timestamps to the microsecond whatever the session's time zone
    and date style, NULL apart from the empty string, text with CSV's special characters."""
    conn.execute("SET extra_float_digits = -10")  # the session's own settings do not matter
    conn.execute("SET TimeZone = 'America/New_York'")
    conn.execute("SET DateStyle = 'SQL, DMY'")
    query = ALL_TYPES.format(n=2000)
    got = _csv.read(conn, query, {15: pl.Categorical(), 17: pl.Categorical(), 0: pl.Categorical()})
    assert got.height == 2000
    theirs = adbc_read(shared_store, query)
    assert_same_values(got.with_columns(pl.col(pl.Categorical).cast(str)), theirs)  # type: ignore[arg-type]
    assert got.dtypes[15] == got.dtypes[17] == pl.Categorical()  # (column 0 is no text)
    assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("route", READERS)
def test_a_session_in_another_encoding_still_reads_utf8(
    shared_store: Store, conn: psycopg.Connection, route: str
) -> None:
    """PGCLIENTENCODING or a database in another encoding: the reader switches its own
    session to UTF-8 before it sends the query (whose text is not ASCII here either)."""
    conn.execute("SET client_encoding = 'LATIN1'")
    query = ALL_TYPES.format(n=300).replace("'row ' ||", "'rôw ' ||")
    got = READERS[route](conn, query)
    assert got["t"][0] == "rôw 1"
    assert_same_values(got, adbc_read(shared_store, query))  # type: ignore[arg-type]
    assert conn.pgconn.parameter_status(b"client_encoding") == b"UTF8"


@pytest.mark.parametrize("route", READERS)
def test_no_rows(shared_store: Store, conn: psycopg.Connection, route: str) -> None:
    query = ALL_TYPES.format(n=0)
    got = READERS[route](conn, query)
    assert got.height == 0
    assert_frame_equal(got, adbc_read(shared_store, query))  # type: ignore[arg-type]


@pytest.mark.parametrize("route", READERS)
def test_a_type_it_does_not_decode_is_refused_before_reading(
    conn: psycopg.Connection, route: str
) -> None:
    with pytest.raises(Unsupported, match="type oid 1700"):
        READERS[route](conn, "SELECT 1::int8 AS a, 2.5::numeric AS b")
    assert conn.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.parametrize("route", READERS)
def test_a_query_that_fails_midway_is_a_store_error(conn: psycopg.Connection, route: str) -> None:
    query = "SELECT 1 / (x - 150000)::int8 AS v FROM generate_series(1, 200000) x"
    with pytest.raises(StoreError, match="division by zero"):
        READERS[route](conn, query)
    assert conn.execute("SELECT 3").fetchone() == (3,)
    with pytest.raises(StoreError, match="no_such_table"):
        READERS[route](conn, "SELECT a FROM no_such_table")


def test_loads_by_every_route_are_equal(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))
    random_history(fresh_store, n=600, seed=11)
    monkeypatch.setattr(_copy, "_CHUNK", 8192)  # many chunks per kind
    monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", "adbc")
    theirs = load(fresh_store, cache=False)
    assert len(theirs) == 600
    for route in ("copy", "csv"):
        monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", route)
        assert_same(load(fresh_store, cache=False), theirs)
    monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", "fastest")
    with pytest.raises(RiskbookError, match="RISKBOOK_LOAD_ROUTE must be copy, csv or adbc"):
        load(fresh_store, cache=False)


def test_a_refresh_reads_through_the_csv_route(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A small read (here a refresh) needs neither ADBC nor the compiled decoder."""
    from riskbook import frames

    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))
    random_history(fresh_store, n=300, seed=5)
    history = load(fresh_store)
    random_history(fresh_store, n=200, seed=6)
    used: list[str] = []
    reader = frames._reader

    def spy(store: Store, route: str) -> object:
        used.append(route)
        return reader(store, route)

    monkeypatch.setattr(frames, "_reader", spy)
    assert history.refresh() > 0
    assert used == ["csv"]
    assert_same(history, load(fresh_store, cache=False))


def test_a_load_read_range_by_range_equals_one_read_whole(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Large loads read the large kinds range by range on two connections, and put the
    events frame together range by range; the same history read in one go agrees."""
    from riskbook import frames

    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))
    random_history(fresh_store, n=900, seed=3)
    with psycopg.connect(fresh_store.dsn) as conn:  # types riskbook does not know
        for i in range(3):
            conn.execute(
                "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type,"
                " sequence, correlation_id, payload) VALUES (gen_random_uuid(), 'MarginCalled',"
                " %s, 'Account', 1000, 'c', '{\"type\": \"MarginCalled\"}')",
                (f"ACC-X{i}",),
            )
            conn.commit()
    whole = load(fresh_store, cache=False)
    monkeypatch.setattr(frames, "_PART_ROWS", 60)
    monkeypatch.setattr(frames, "_SMALL_ROWS", 0)  # not read as a small one
    monkeypatch.setattr(frames, "_SAMPLE", 100)  # the plan sees every row
    seen: list[int] = []
    merge = frames._Events.merge

    def counted(self: frames._Events, i: int) -> None:
        seen.append(i)
        merge(self, i)

    monkeypatch.setattr(frames._Events, "merge", counted)
    for route in ("copy", "adbc"):
        monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", route)
        seen.clear()
        ranged = load(fresh_store, cache=False)
        assert len(set(seen)) == len(seen) > 5, route  # every range put in order once
        assert_same(ranged, whole)
        assert ranged.events["event_type"].cast(str).to_list().count("MarginCalled") == 3


def test_the_pump_stops_when_its_thread_ends_after_its_last_item() -> None:
    # stop() waited for an item more once the last one was taken while the thread was
    # still alive (a COPY cut short by a lost connection: the load hung for good)
    import queue
    import threading
    import time

    class SlowEnd(queue.Queue):  # type: ignore[type-arg]
        def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
            super().put(item, block, timeout)
            if item is None:
                time.sleep(0.3)  # the thread alive a while after its last item

    class Conn:
        pgconn_ptr = 0

    go = threading.Event()

    def drain(*_: object) -> tuple[int, int]:
        go.wait()
        return 0, -2  # the COPY broke off: nothing more, no item

    pump = _copy._Pump(drain, Conn(), np.zeros(1, np.int64))
    pump._full = SlowEnd()
    go.set()
    done = threading.Event()

    def run() -> None:
        assert list(pump) == []
        pump.stop()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(5), "stop() waited for good"
