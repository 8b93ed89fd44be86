"""What the database itself refuses from raw SQL writers (migration 0013), on a real
PostgreSQL: payloads that are not objects, known events that break the catalogue's
rules, and recorded times a role that does not own the log tries to choose."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

import riskbook
from riskbook.store import Store, roles

T0 = datetime(2024, 3, 1, 14, 0, tzinfo=UTC)

_INSERT = (
    "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
    " correlation_id, payload{time_column}) VALUES (gen_random_uuid(), %s, %s, %s,"
    " (SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_id = %s), 'c',"
    " %s::jsonb{time_value})"
)


def insert(
    dsn: str, event_type: str, payload: str, *, aggregate: str = "A", recorded: str | None = None
) -> None:
    """One raw INSERT of an event (its recorded time given, or the column's default)."""
    statement = _INSERT.format(
        time_column="" if recorded is None else ', "timestamp"',
        time_value="" if recorded is None else ", %s::timestamptz",
    )
    kind = "Instrument" if event_type == "PriceMarked" else "Account"
    params: tuple[object, ...] = (event_type, aggregate, kind, aggregate, payload)
    with psycopg.connect(dsn) as conn:
        conn.execute(statement, (*params, recorded) if recorded is not None else params)


def trade_json(**fields: object) -> str:
    data: dict[str, object] = {
        "type": "TradeExecuted", "trade_id": "T-1", "account_id": "A", "symbol": "X",
        "side": "Buy", "quantity": 5.0, "price": 10.0, "executed_at": "2024-03-01T14:00:00Z",
    }  # fmt: skip
    data.update(fields)
    return riskbook.events.canonical_json({k: v for k, v in data.items() if v is not None})


@pytest.mark.parametrize(
    ("event_type", "payload"),
    [
        ("FutureEvent", "[1, 2]"),
        ("FutureEvent", '"x"'),
        ("FutureEvent", "null"),
        ("FutureEvent", '{"x": 1}'),
        ("TradeExecuted", trade_json(side="Hold")),
        ("TradeExecuted", trade_json(quantity=-5.0)),
        ("TradeExecuted", trade_json(price=0.0)),
        ("TradeExecuted", trade_json(quantity=None)),
        ("TradeExecuted", trade_json(symbol=None)),  # 0014: the fold crashed on it
        ("TradeExecuted", trade_json(executed_at=None)),
        ("TradeExecuted", trade_json(account_id=None)),
        ("TradeCancelled", '{"type": "TradeCancelled", "account_id": "A", "reason": "bust",'
                           ' "cancelled_at": "2024-03-01T14:00:00Z"}'),
        ("LimitSet", '{"type": "LimitSet", "account_id": "A", "value": 1, "set_by": "x",'
                     ' "set_at": "2024-03-01T14:00:00Z"}'),
        ("PriceMarked", '{"type": "PriceMarked", "symbol": "X", "price": -1,'
                        ' "marked_at": "2024-03-01T14:00:00Z"}'),
        ("AccountFunded", '{"type": "AccountFunded", "account_id": "A", "amount": 0,'
                          ' "funded_at": "2024-03-01T14:00:00Z"}'),
        ("LimitSet", '{"type": "LimitSet", "account_id": "A", "limit_type": "MaxLeverage",'
                     ' "value": -1, "set_by": "x", "set_at": "2024-03-01T14:00:00Z"}'),
    ],
)  # fmt: skip
def test_raw_sql_cannot_store_what_riskbook_would_not_write(
    fresh_store: Store, event_type: str, payload: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        insert(fresh_store.dsn, event_type, payload)
    assert fresh_store.count() == 0


def test_raw_sql_still_stores_valid_events_and_unknown_types(fresh_store: Store) -> None:
    insert(fresh_store.dsn, "TradeExecuted", trade_json())
    insert(fresh_store.dsn, "MarginCalled", '{"type": "MarginCalled", "amount": "lots"}')
    trade, raw = fresh_store.read("A")
    assert isinstance(trade.payload, riskbook.TradeExecuted)
    assert isinstance(raw.payload, riskbook.RawEvent)
    assert riskbook.load(fresh_store, cache=False).trades.height == 1
    assert riskbook.verify(fresh_store).ok


@pytest.fixture
def processor_dsn(fresh_store: Store) -> Iterator[str]:
    name = f"rk_role_{uuid.uuid4().hex[:8]}"
    yield roles.grant_processor(fresh_store, name).dsn
    with psycopg.connect(fresh_store.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_a_role_that_does_not_own_the_log_cannot_back_date_what_was_known(
    fresh_store: Store, processor_dsn: str
) -> None:
    with pytest.raises(psycopg.DatabaseError, match="recorded time"):
        insert(processor_dsn, "TradeExecuted", trade_json(), recorded="2024-01-09T16:00:00Z")
    with pytest.raises(psycopg.DatabaseError, match="recorded time"):
        insert(processor_dsn, "TradeExecuted", trade_json(), recorded="2999-01-01T00:00:00Z")
    assert fresh_store.count() == 0
    # the server's clock, by the column's default or by riskbook's own appends: fine
    insert(processor_dsn, "TradeExecuted", trade_json())
    processor = Store(processor_dsn)
    try:
        processor.append("A", [riskbook.AccountFunded(account_id="A", amount=5.0, funded_at=T0)])
        with pytest.raises(riskbook.ImportFailed, match="recorded time"):  # history: the owner's
            processor.import_lines([riskbook.events.encode_envelope(_envelope("B"))])
    finally:
        processor.close()
    assert fresh_store.count() == 2 and riskbook.verify(fresh_store).ok
    # the owner keeps given recorded times (an import of history)
    insert(
        fresh_store.dsn,
        "TradeExecuted",
        trade_json(trade_id="T-2"),
        recorded="2024-01-09T16:00:00Z",
    )
    assert fresh_store.read("A")[-1].timestamp == datetime(2024, 1, 9, 16, tzinfo=UTC)


def _envelope(account: str) -> riskbook.Envelope:
    return riskbook.Envelope(
        event_id=uuid.uuid4(),
        aggregate_id=account,
        aggregate_type="Account",
        sequence=1,
        timestamp=datetime(2024, 1, 9, 16, tzinfo=UTC),
        payload=riskbook.AccountFunded(account_id=account, amount=1.0, funded_at=T0),
        correlation_id="c",
    )


# ------------------------------------------------------------------ one fill per trade id


def _fill(trade_id: str, qty: float = 5.0, account: str = "A") -> riskbook.TradeExecuted:
    return riskbook.TradeExecuted(
        trade_id=trade_id, account_id=account, symbol="X", side=riskbook.Side.Buy,
        quantity=qty, price=10.0, executed_at=T0,
    )  # fmt: skip


def test_a_trade_id_names_one_fill(fresh_store: Store, tmp_path) -> None:
    # A fill booked again under a busted id (or two fills sharing one) vanished with the
    # bust: a bust cancels its trade by (account, trade id).
    s = fresh_store
    s.append("A", [_fill("T-1", 1000.0)])
    s.append("A", [riskbook.TradeCancelled(trade_id="T-1", account_id="A", reason="fat finger",
                                           cancelled_at=T0)])  # fmt: skip
    with pytest.raises(riskbook.InvalidEvent, match=r"'T-1' of account 'A' is stored already"):
        s.append("A", [_fill("T-1", 100.0)])
    with pytest.raises(riskbook.InvalidEvent, match="trade_id"):
        s.append("B", [_fill("T-2", account="B"), _fill("T-2", account="B")])
    assert s.count() == 2  # nothing of either batch
    s.append("B", [_fill("T-1", account="B")])  # ids are per account
    lines = [riskbook.events.encode_envelope(riskbook.Envelope(
        uuid.uuid4(), "C", "Account", i + 1, T0, _fill(tid, account="C"), "c"))
        for i, tid in enumerate(["T-7", "T-8", "T-7"])]  # fmt: skip
    path = tmp_path / "twins.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(
        riskbook.ImportFailed, match=r"line 3: trade id 'T-7' of account 'C' is line 1's too"
    ):
        s.import_jsonl(path)
    path.write_bytes(lines[0] + b"\n")
    assert s.import_jsonl(path).added == 1
    again = riskbook.events.encode_envelope(riskbook.Envelope(
        uuid.uuid4(), "C", "Account", 2, T0, _fill("T-7", account="C"), "c"))  # fmt: skip
    path.write_bytes(lines[0] + b"\n" + again + b"\n")  # the stored line again, then a twin
    with pytest.raises(
        riskbook.ImportFailed, match=r"line 2: trade id 'T-7' .* a stored trade's too"
    ):
        s.import_jsonl(path)
    assert s.count() == 4


def test_an_import_into_an_empty_store_names_twin_trade_ids(fresh_store: Store, tmp_path) -> None:
    # the empty store's road builds its indexes at the end: a twin fails the unique one
    lines = [riskbook.events.encode_envelope(riskbook.Envelope(
        uuid.uuid4(), "C", "Account", i + 1, T0, _fill(tid, account="C"), "c"))
        for i, tid in enumerate(["T-1", "T-2", "T-3", "T-2"])]  # fmt: skip
    path = tmp_path / "twins.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(
        riskbook.ImportFailed, match=r"line 4: trade id 'T-2' of account 'C' is line 2's too"
    ):
        fresh_store.import_jsonl(path)
    assert fresh_store.count() == 0
    path.write_bytes(b"\n".join(lines[:3]) + b"\n")
    assert fresh_store.import_jsonl(path).added == 3
