"""Events of known types whose payload breaks the catalogue's rules, on a real PostgreSQL.

Raw SQL could store them before migration 0013 (whose constraints are NOT VALID: old
rows stay), or before 0014 (a trade without a symbol).
riskbook.read keeps such an event raw (RawEvent); riskbook.load must do the same with it:
leave it out of the typed frames, keep it in ``events`` as an unknown type is, and say
so once per load -- by every route, through the cache, on refresh, and in the wide read
of state_at. The fold itself refuses a null id rather than crash the process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import riskbook
from riskbook import frames
from riskbook.frames import WIDE_COLUMNS, Filters, History, load, psycopg_literal, read_frames
from riskbook.store import Store
from tests.test_frames import assert_same, random_history

_INSERT = (
    "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
    " correlation_id, payload) VALUES (gen_random_uuid(), %s, %s, %s,"
    " (SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_id = %s), 'c', %s)"
)
WARNING = r"left out of the typed frames .* riskbook\.read returns"


def trade(**fields: Any) -> dict[str, Any]:
    data = {
        "type": "TradeExecuted", "trade_id": "T-1", "account_id": "A", "symbol": "X",
        "side": "Buy", "quantity": 1.0, "price": 2.0, "executed_at": "2024-03-01T14:00:01Z",
    }  # fmt: skip
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


def limit(**fields: Any) -> dict[str, Any]:
    data = {
        "type": "LimitSet", "account_id": "A", "limit_type": "MaxPositionSize", "value": 0.5,
        "set_by": "risk", "set_at": "2024-03-01T14:00:02Z", "symbol": "X",
    }  # fmt: skip
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


FUNDED = {
    "type": "AccountFunded", "account_id": "A", "amount": 100.0,
    "funded_at": "2024-03-01T14:00:00Z",
}  # fmt: skip
MARKED = {"type": "PriceMarked", "symbol": "X", "price": 3.0, "marked_at": "2024-03-01T14:00:03Z"}

# (name, the malformed payload, what the warning says is wrong with it)
CASES = [
    ("no symbol", trade(trade_id="T-2a", symbol=None), "symbol is missing"),
    ("no executed_at", trade(trade_id="T-2b", executed_at=None), "executed_at is missing"),
    ("side in lower case", trade(trade_id="T-2c", side="buy"), "side is missing or not one of"),
    ("no side", trade(trade_id="T-2d", side=None), "side is missing or not one of"),
    ("a price of 0", trade(trade_id="T-2e", price=0.0), "price must be > 0"),
    ("an empty account", trade(trade_id="T-2f", account_id=""), "account_id must not be empty"),
    ("a NaN quantity", trade(trade_id="T-2g", quantity="NaN"), "quantity must be a finite"),
    ("a LimitSet without limit_type", limit(limit_type=None), "limit_type is missing"),
    ("a funding of 0", {**FUNDED, "amount": 0}, "amount must not be 0"),
]


def insert(dsn: str, *payloads: dict[str, Any]) -> None:
    """Raw INSERTs, one statement each, in order."""
    with psycopg.connect(dsn) as conn:
        for p in payloads:
            kind = "Instrument" if p["type"] == "PriceMarked" else "Account"
            agg = p["symbol"] if kind == "Instrument" else p.get("account_id", "A") or "A"
            conn.execute(_INSERT, (p["type"], agg, kind, agg, json.dumps(p)))


def old_store(make_database: Callable[[], str], *payloads: dict[str, Any]) -> Store:
    """A store written at schema 12 (before 0013 refused anything), then upgraded."""
    dsn = make_database()
    old = Store(dsn, migrate=False)
    old.migrate(target=12)
    old.close()
    insert(dsn, *payloads)
    return Store(dsn)


def without_0014(dsn: str) -> None:
    """Let raw SQL store a known event without a required field (a trade without a
    symbol) after the upgrade, as it could before migration 0014: for the refresh and
    late-row paths, which need such rows written after a load."""
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE event_fields DROP CONSTRAINT event_fields_known_types_complete")


def as_read(store: Store, filters: Filters | None = None) -> History:
    """The History of what riskbook.read gives: the reference."""
    return History.from_envelopes(store.read_all(), filters=filters)


def loaded(store: Store, **kw: Any) -> History:
    with pytest.warns(UserWarning, match=WARNING) as caught:
        h = load(store, cache=False, progress=False, **kw)
    assert len(caught) == 1  # once per load
    return h


@pytest.mark.parametrize(("payload", "problem"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_load_sets_aside_what_read_keeps_raw(
    make_database: Callable[[], str], payload: dict[str, Any], problem: str
) -> None:
    good = trade()
    store = old_store(make_database, FUNDED, good, payload, MARKED, limit())
    try:
        kinds = [type(e.payload).__name__ for e in store.read_all()]
        assert kinds.count("RawEvent") == 1
        with pytest.warns(UserWarning, match=WARNING) as caught:
            h = load(store, cache=False, progress=False)
        assert len(caught) == 1
        message = str(caught[0].message)
        assert problem in message and payload["type"] in message and "1 event" in message
        assert_same(h, as_read(store))
        assert h.events.height == 5  # kept there, with no business time
        bad = h.events.filter(h.events["occurred_at"].is_null())
        assert bad["event_type"].cast(str).to_list() == [payload["type"]]
        # the figures of the valid rows only
        pos = riskbook.positions(h)
        assert pos.select("account_id", "symbol", "quantity").rows() == [("A", "X", 1.0)]
        acc = riskbook.accounts(h)
        assert acc["cash"].to_list() == [100.0 - 2.0]
        breaches = riskbook.breaches(h).filter(level=1.0)
        assert breaches.select("limit_type", "peak_value").rows() == [("MaxPositionSize", 1.0)]
    finally:
        store.close()


def test_every_route_and_a_read_range_by_range_agree(
    make_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = old_store(make_database, *[c[1] for c in CASES], trade(trade_id="T-9", side="sell"))
    try:
        random_history(store, n=300, seed=11)
        without_0014(store.dsn)
        insert(store.dsn, trade(trade_id="T-late", symbol=None))
        reference = as_read(store)
        assert reference.trades.height > 60
        for route in ("csv", "adbc", "copy"):
            monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", route)
            with pytest.warns(UserWarning, match="11 events of known types") as caught:
                h = load(store, cache=False, progress=False)
            assert len(caught) == 1, route
            assert_same(h, reference)
        # a large load: the large kinds read range by range on two connections
        monkeypatch.setattr(frames, "_PART_ROWS", 60)
        monkeypatch.setattr(frames, "_SMALL_ROWS", 0)
        monkeypatch.setattr(frames, "_SAMPLE", 100)
        for route in ("copy", "adbc"):
            monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", route)
            assert_same(loaded(store), reference)
        assert riskbook.positions(loaded(store)).equals(riskbook.positions(reference))
    finally:
        store.close()


def test_filters_leave_them_out_as_they_do_unknown_types(
    make_database: Callable[[], str],
) -> None:
    # a bust of a malformed trade: a symbols filter still takes it through the trade
    bust = {
        "type": "TradeCancelled", "trade_id": "T-2", "account_id": "A", "reason": "bust",
        "cancelled_at": "2024-03-01T14:00:09Z",
    }  # fmt: skip
    store = old_store(
        make_database, FUNDED, trade(), trade(trade_id="T-2", side="buy"), bust, MARKED
    )
    try:
        for kw in (
            {"accounts": "A"},
            {"symbols": "X"},
            {"since": "2024-03-01T14:00:00Z"},
            {"until": "2024-03-02T00:00:00Z"},
            {"known_at": "2100-01-01T00:00:00Z"},
        ):
            h = loaded(store, **kw)
            assert_same(h, as_read(store, h.filters))
            assert h.trades.height == 1 and h.cancels.height == 1, kw
    finally:
        store.close()


def test_the_cache_and_refresh_keep_them_out_and_say_so(
    make_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))
    store = old_store(make_database, FUNDED, trade(), trade(trade_id="T-2", side="buy"))
    try:
        with pytest.warns(UserWarning, match="1 event of a known type"):
            cold = load(store, progress=False)
        with pytest.warns(UserWarning, match="1 event of a known type") as caught:
            warm = load(store, progress=False)  # from the cache
        assert len(caught) == 1
        assert_same(warm, cold)
        assert_same(warm, as_read(store))
        without_0014(store.dsn)
        insert(store.dsn, trade(trade_id="T-3", symbol=None), trade(trade_id="T-4"))
        with pytest.warns(UserWarning, match="symbol is missing") as caught:
            assert warm.refresh(progress=False) == 2
        assert len(caught) == 1 and "1 event of a known type" in str(caught[0].message)
        assert_same(warm, as_read(store))
        with pytest.warns(UserWarning, match="2 events of known types") as caught:
            again = load(store, progress=False)  # the cache and its new segment
        assert len(caught) == 1
        assert_same(again, as_read(store))
        assert riskbook.positions(again)["quantity"].to_list() == [2.0]
    finally:
        store.close()


def test_the_wide_read_sets_them_aside_too(make_database: Callable[[], str]) -> None:
    store = old_store(make_database, *[c[1] for c in CASES])
    try:
        insert(store.dsn, trade(trade_id="T-8"), FUNDED)
        with store.connection() as conn:
            query = psycopg_literal(
                conn, f"SELECT {WIDE_COLUMNS} FROM event_fields f ORDER BY f.position", []
            )
        with pytest.warns(UserWarning, match="9 events of known types") as caught:
            wide = read_frames(store, query)
        assert len(caught) == 1
        reference = as_read(store)
        for name, frame in reference.frames().items():
            assert wide[name].equals(frame), name
        with pytest.warns(UserWarning, match=WARNING):
            _, acc = riskbook.state_at(store, "2100-01-01T00:00:00Z")
        assert acc["cash"].to_list() == [100.0 - 2.0]
    finally:
        store.close()


# Run in a process of its own: before the fix, a trade without a symbol reached the
# compiled passes as code -1 and could kill the process (SIGSEGV, heap corruption).
_CHILD = """
import sys, warnings
import riskbook
from riskbook.store import Store
warnings.simplefilter("ignore")
store = Store(sys.argv[1])
h = riskbook.load(store, cache=False, progress=False)
print("trades", h.trades.height)
print("positions", riskbook.positions(h).select("symbol", "quantity").rows())
import polars as pl
h.trades = pl.concat([h.trades, h.trades.with_columns(pl.lit(None, h.trades["symbol"].dtype)
                                                      .alias("symbol"))])
try:
    riskbook.positions(h)
except ValueError as exc:
    print("refused:", exc)
"""


def test_a_trade_without_a_symbol_never_reaches_the_fold(
    make_database: Callable[[], str],
) -> None:
    store = old_store(make_database, FUNDED, trade(), trade(trade_id="T-2", symbol=None))
    try:
        run = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_CHILD), store.dsn],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        lines = run.stdout.splitlines()
        assert lines[0] == "trades 1"
        assert lines[1] == "positions [('X', 1.0)]"  # not 2.0 (booked to another symbol)
        assert lines[2].startswith("refused: History.trades: column 'symbol' has 1 null")
    finally:
        store.close()
