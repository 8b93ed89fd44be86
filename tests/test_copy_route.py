"""The load's own decoder of the binary COPY stream (riskbook._copy) against ADBC's.

Every result is compared with what ADBC's driver reads for the same query on the same
database: the route a load used before, and the one it falls back to.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from polars.testing import assert_frame_equal

from riskbook import _copy
from riskbook.errors import RiskbookError, StoreError
from riskbook.frames import _adbc, _collect, load
from riskbook.store import Store
from tests.test_frames import assert_same, random_history


def test_the_route_is_available() -> None:
    """psycopg[binary] is a dependency: its libpq is there, and large loads use this
    route (small ones, a refresh say, ADBC's: no compiled code to start)."""
    from riskbook.frames import _route

    assert _copy.available()
    assert (_route(large=True), _route(large=False)) == ("copy", "adbc")


# Every type the decoder reads, NULLs, empty and non-ASCII text, the extremes of each.
ALL_TYPES = """
SELECT x::int8 AS i8, (x * 1000)::int4 AS i4, (x % 30000)::int2 AS i2,
       CASE WHEN x % 7 = 0 THEN NULL ELSE -x::int8 * 1234567890123 END AS i8_nulls,
       x / 3.0::float8 AS f8, (x / 3.0)::float4 AS f4,
       CASE WHEN x % 5 = 0 THEN NULL ELSE x * 1e300::float8 END AS f8_nulls,
       'NaN'::float8 AS nan, x % 2 = 0 AS b, CASE WHEN x % 3 = 0 THEN NULL ELSE x % 2 = 1 END AS b_nulls,
       timestamptz '2024-03-04 14:30:00.123456+00' + x * interval '1 second 7 microseconds' AS tz,
       timestamp '1999-12-31 23:59:59.999999' - x * interval '1 day' AS ts,
       CASE WHEN x % 4 = 0 THEN NULL ELSE timestamptz '1970-01-01 00:00:00+00' END AS tz_nulls,
       'row ' || x AS t, CASE WHEN x % 2 = 0 THEN '' ELSE repeat('ü€𝄞', x % 9) END AS t_unicode,
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


@pytest.mark.parametrize("chunk", [64, 4096, 1 << 20])
def test_every_type_reads_as_adbc_reads_it(
    shared_store: Store, conn: psycopg.Connection, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a 64-byte buffer is smaller than any row: every row is one that did not fit
    monkeypatch.setattr(_copy, "_CHUNK", chunk)
    query = ALL_TYPES.format(n=2000)
    got = _copy.read(conn, query)
    assert got.height == 2000
    assert_frame_equal(got, adbc_read(shared_store, query))  # type: ignore[arg-type]
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is usable after


def test_no_rows(shared_store: Store, conn: psycopg.Connection) -> None:
    query = ALL_TYPES.format(n=0)
    got = _copy.read(conn, query)
    assert got.height == 0
    assert_frame_equal(got, adbc_read(shared_store, query))  # type: ignore[arg-type]


def test_a_type_it_does_not_decode_is_refused_before_reading(conn: psycopg.Connection) -> None:
    with pytest.raises(_copy.Unsupported, match="type oid 1700"):
        _copy.read(conn, "SELECT 1::int8 AS a, 2.5::numeric AS b")
    assert conn.execute("SELECT 2").fetchone() == (2,)


def test_a_query_that_fails_midway_is_a_store_error(conn: psycopg.Connection) -> None:
    query = "SELECT 1 / (x - 150000)::int8 AS v FROM generate_series(1, 200000) x"
    with pytest.raises(StoreError, match="division by zero"):
        _copy.read(conn, query)
    assert conn.execute("SELECT 3").fetchone() == (3,)
    with pytest.raises(StoreError, match="no_such_table"):
        _copy.read(conn, "SELECT a FROM no_such_table")


def test_loads_by_either_route_are_equal(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))
    random_history(fresh_store, n=600, seed=11)
    monkeypatch.setattr(_copy, "_CHUNK", 8192)  # many chunks per kind
    monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", "copy")
    ours = load(fresh_store, cache=False)
    monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", "adbc")
    theirs = load(fresh_store, cache=False)
    assert len(ours) == 600
    assert_same(ours, theirs)
    monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", "fastest")
    with pytest.raises(RiskbookError, match="RISKBOOK_LOAD_ROUTE must be copy or adbc"):
        load(fresh_store, cache=False)


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
