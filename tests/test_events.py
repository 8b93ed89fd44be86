"""Events: types, validation, the JSON codec (DESIGN.md §2)."""

from __future__ import annotations

import importlib
import math
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import riskbook
from riskbook import events as ev
from riskbook.errors import InvalidEvent

T0 = "2024-03-01T09:30:00.000000Z"

VALID: dict[str, dict[str, Any]] = {
    "TradeExecuted": dict(
        trade_id="T-1",
        account_id="ACC-1",
        symbol="AAPL",
        side="Buy",
        quantity=100.0,
        price=10.5,
        executed_at=T0,
    ),
    "TradeCancelled": dict(trade_id="T-1", account_id="ACC-1", reason="bust", cancelled_at=T0),
    "PositionUpdated": dict(
        account_id="ACC-1",
        symbol="AAPL",
        previous_quantity=100.0,
        new_quantity=200.0,
        reason="split 2:1",
        updated_at=T0,
    ),
    "PriceMarked": dict(symbol="AAPL", price=11.25, marked_at=T0),
    "AccountFunded": dict(account_id="ACC-1", amount=-5000.0, funded_at=T0),
    "LimitSet": dict(
        account_id="ACC-1",
        limit_type="MaxPositionSize",
        value=1000.0,
        set_by="alice",
        set_at=T0,
        symbol="AAPL",
    ),
    "LimitViolationDetected": dict(
        account_id="ACC-1",
        limit_type="MaxLeverage",
        current_value=5.5,
        limit_value=4.0,
        detected_at=T0,
        symbol=None,
    ),
    "AccountBlocked": dict(account_id="ACC-1", reason="limit", blocked_by="engine", blocked_at=T0),
    "AccountUnblocked": dict(
        account_id="ACC-1", reason="reviewed", unblocked_by="bob", unblocked_at=T0
    ),
}


def payload(kind: str, **changes: Any) -> dict[str, Any]:
    data = {"type": kind, **VALID[kind]}
    for k, v in changes.items():
        if v is _MISSING:
            data.pop(k)
        else:
            data[k] = v
    return data


_MISSING = object()


def test_every_event_type_of_the_design_is_defined() -> None:
    assert set(ev.EVENT_TYPES) == set(VALID)
    for name, cls in ev.EVENT_TYPES.items():
        assert set(cls.__struct_fields__) == set(VALID[name]), name


@pytest.mark.parametrize("kind", sorted(VALID))
def test_payload_round_trips_through_json(kind: str) -> None:
    event = ev.event_from_dict(payload(kind))
    encoded = ev.encode_event(event)
    assert msgspec.json.decode(encoded)["type"] == kind
    assert ev.decode_event(encoded) == event
    assert ev.decode_event(encoded, event_type=kind) == event
    assert ev.event_to_dict(event) == payload(kind)


def test_times_are_rfc3339_utc_with_microseconds() -> None:
    e = ev.event_from_dict(payload("PriceMarked", marked_at="2024-03-01T11:30:00.5+02:00"))
    assert e.marked_at == datetime(2024, 3, 1, 9, 30, 0, 500000, tzinfo=UTC)
    assert ev.event_to_dict(e)["marked_at"] == "2024-03-01T09:30:00.500000Z"
    assert ev.format_time(datetime(2024, 1, 1, tzinfo=UTC)) == "2024-01-01T00:00:00.000000Z"
    east = timezone(timedelta(hours=5, minutes=30))
    assert ev.format_time(datetime(2024, 1, 1, 5, 30, tzinfo=east)) == "2024-01-01T00:00:00.000000Z"
    assert ev.parse_time("2024-01-01T00:00:00Z") == datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="zone"):
        ev.parse_time("2024-01-01T00:00:00")


def test_a_bound_finer_than_a_microsecond_is_cut_not_rounded_up() -> None:
    # .NET writes seven digits ("o"): 100 ns before a trade must not take the trade in.
    last = datetime(2024, 3, 1, 20, 0, 59, 999999, tzinfo=UTC)
    assert ev.parse_time("2024-03-01T20:00:59.9999999Z") == last
    assert ev.parse_time("2024-03-01T21:00:59.999999999+01:00") == last
    assert ev.parse_time("2024-03-01T20:00:59.1234565Z").microsecond == 123456
    with pytest.raises(ValueError, match="RFC 3339"):  # only ASCII digits are cut away
        ev.parse_time("2024-03-01T14:30:00.123456\u0663Z")
    trade = ev.TradeExecuted(
        trade_id="T", account_id="A", symbol="S", side=ev.Side.Buy, quantity=1.0, price=1.0,
        executed_at=last + timedelta(microseconds=1),
    )  # fmt: skip
    h = riskbook.History.from_events(trade)
    assert riskbook.positions(h, at="2024-03-01T20:00:59.9999999Z").height == 0
    assert riskbook.positions(h, at="2024-03-01T20:01:00.0000000Z").height == 1


def test_python_construction_validates_and_normalizes() -> None:
    t = datetime(2024, 3, 1, 10, 30, tzinfo=timezone(timedelta(hours=1)))
    trade = riskbook.TradeExecuted(
        trade_id="T",
        account_id="A",
        symbol="S",
        side=riskbook.Side.Sell,
        quantity=1.0,
        price=2.0,
        executed_at=t,
    )
    assert trade.executed_at == datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
    assert trade.business_time == trade.executed_at
    assert trade.aggregate_id == "A" and trade.aggregate_type == "Account"
    mark = riskbook.PriceMarked(symbol="S", price=3.0, marked_at=t)
    assert mark.aggregate_id == "S" and mark.aggregate_type == "Instrument"
    assert ev.validate(trade) is not None


# (event type, field, bad value, words the message must contain)
BAD: list[tuple[str, str, Any, str]] = [
    ("TradeExecuted", "quantity", 0.0, "> 0"),
    ("TradeExecuted", "quantity", -1.0, "> 0"),
    ("TradeExecuted", "price", 0.0, "> 0"),
    ("TradeExecuted", "price", -3.5, "> 0"),
    ("TradeExecuted", "quantity", "10", "float"),
    ("TradeExecuted", "quantity", True, "float"),
    ("TradeExecuted", "price", None, "float"),
    ("TradeExecuted", "quantity", _MISSING, "missing"),
    ("TradeExecuted", "side", "Hold", "Hold"),
    ("TradeExecuted", "side", "buy", "buy"),
    ("TradeExecuted", "executed_at", "2024-03-01T09:30:00", "timezone"),
    ("TradeExecuted", "executed_at", "yesterday", "datetime"),
    ("TradeExecuted", "trade_id", "", "length >= 1"),
    ("TradeExecuted", "account_id", 17, "str"),
    ("TradeExecuted", "symbol", "A" * 300, "length"),
    ("TradeExecuted", "symbol", "AA\x00PL", "NUL"),
    ("TradeCancelled", "reason", _MISSING, "missing"),
    ("PositionUpdated", "new_quantity", "lots", "float"),
    ("PriceMarked", "price", 0.0, "> 0"),
    ("AccountFunded", "amount", 0.0, "not be 0"),
    ("AccountFunded", "amount", 10**400, "out of range"),
    ("LimitSet", "limit_type", "MaxCoffee", "unknown limit type"),
    ("LimitSet", "value", -1.0, ">= 0"),
    ("LimitSet", "set_by", _MISSING, "missing"),
    ("LimitViolationDetected", "limit_type", "Nope", "unknown limit type"),
    ("AccountBlocked", "blocked_at", 1709285400, "datetime"),
    ("AccountUnblocked", "unblocked_by", "", "length >= 1"),
]


@pytest.mark.parametrize(("kind", "field", "value", "words"), BAD)
def test_bad_payloads_are_refused_naming_type_and_field(
    kind: str, field: str, value: Any, words: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        ev.event_from_dict(payload(kind, **{field: value}))
    assert info.value.event_type == kind
    assert info.value.field == field
    assert words.lower() in str(info.value).lower()
    # The same refusal when the payload arrives as JSON text (the import path)...
    if isinstance(value, float) and not math.isfinite(value):
        return
    with pytest.raises(InvalidEvent) as info2:
        ev.decode_event(msgspec.json.encode(payload(kind, **{field: value})))
    assert (info2.value.event_type, info2.value.field) == (kind, field)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("TradeExecuted", "quantity"),
        ("TradeExecuted", "price"),
        ("PriceMarked", "price"),
        ("AccountFunded", "amount"),
        ("PositionUpdated", "previous_quantity"),
        ("LimitSet", "value"),
        ("LimitViolationDetected", "current_value"),
    ],
)
def test_nan_and_infinity_are_refused(kind: str, field: str, bad: float) -> None:
    with pytest.raises(InvalidEvent) as info:
        ev.event_from_dict(payload(kind, **{field: bad}))
    assert (info.value.event_type, info.value.field) == (kind, field)
    cls = ev.EVENT_TYPES[kind]
    good = ev.event_from_dict(payload(kind))
    fields = {f: getattr(good, f) for f in cls.__struct_fields__}
    with pytest.raises(InvalidEvent) as info2:
        cls(**{**fields, field: bad})
    assert (info2.value.event_type, info2.value.field) == (kind, field)


def test_validate_catches_wrong_types_built_in_python() -> None:
    good = ev.event_from_dict(payload("TradeExecuted"))
    fields = {f: getattr(good, f) for f in good.__struct_fields__}
    wrong = riskbook.TradeExecuted(**{**fields, "quantity": "10"})  # Python does not check
    with pytest.raises(InvalidEvent) as info:
        ev.validate(wrong)
    assert (info.value.event_type, info.value.field) == ("TradeExecuted", "quantity")
    naive = dict(fields, executed_at=datetime(2024, 1, 1))
    with pytest.raises(InvalidEvent, match="executed_at"):
        riskbook.TradeExecuted(**naive)


def test_unknown_event_type_is_refused_on_write_and_kept_raw_on_read() -> None:
    with pytest.raises(InvalidEvent) as info:
        ev.event_from_dict({"type": "MarginCall", "account_id": "A"})
    assert info.value.event_type == "MarginCall" and info.value.field == "type"
    raw = ev.read_payload("MarginCall", b'{"type":"MarginCall","account_id":"A","x":[1,2]}')
    assert isinstance(raw, ev.RawEvent)
    assert raw.type == "MarginCall" and raw.data == {"account_id": "A", "x": [1, 2]}
    # A known type whose stored payload no longer fits is kept raw too, with the reason.
    odd = ev.read_payload("TradeCancelled", {"type": "TradeCancelled", "trade_id": "T"})
    assert isinstance(odd, ev.RawEvent) and odd.error and "account_id" in odd.error


def test_registered_limit_types_are_accepted_and_stored_ones_always_read() -> None:
    with pytest.raises(InvalidEvent):
        ev.event_from_dict(payload("LimitSet", limit_type="MaxConcentration"))
    stored = ev.read_payload("LimitSet", payload("LimitSet", limit_type="MaxGrossNotional"))
    assert isinstance(stored, riskbook.LimitSet) and stored.limit_type == "MaxGrossNotional"
    ev.register_limit_type_name("MaxConcentration")
    assert "MaxConcentration" in ev.known_limit_types()
    assert ev.event_from_dict(payload("LimitSet", limit_type="MaxConcentration")).value == 1000.0


def envelope_line(**changes: Any) -> bytes:
    env: dict[str, Any] = {
        "event_id": str(uuid.UUID(int=7)),
        "event_type": "TradeExecuted",
        "aggregate_id": "ACC-1",
        "aggregate_type": "Account",
        "sequence": 3,
        "timestamp": "2024-03-01T09:30:01.250000Z",
        "causation_id": None,
        "correlation_id": "req-9",
        "metadata": {"source": "fix"},
        "payload": payload("TradeExecuted"),
    }
    for k, v in changes.items():
        if v is _MISSING:
            env.pop(k)
        else:
            env[k] = v
    return msgspec.json.encode(env)


def test_envelope_round_trips_in_the_article_layout() -> None:
    line = envelope_line(causation_id=str(uuid.UUID(int=9)))
    env, has_seq = ev.decode_envelope(line)
    assert has_seq and env.sequence == 3 and env.event_type == "TradeExecuted"
    assert env.causation_id == uuid.UUID(int=9)
    assert env.timestamp == datetime(2024, 3, 1, 9, 30, 1, 250000, tzinfo=UTC)
    out = env.to_dict()
    assert list(out) == [
        "event_id",
        "event_type",
        "aggregate_id",
        "aggregate_type",
        "sequence",
        "timestamp",
        "causation_id",
        "correlation_id",
        "metadata",
        "payload",
    ]
    assert msgspec.json.decode(ev.encode_envelope(env)) == msgspec.json.decode(line)


def test_envelope_event_type_and_sequence_may_be_absent() -> None:
    env, has_seq = ev.decode_envelope(envelope_line(event_type=_MISSING, sequence=_MISSING))
    assert not has_seq and env.sequence == 0 and env.event_type == "TradeExecuted"


@pytest.mark.parametrize(
    ("changes", "kind", "field"),
    [
        ({"event_type": "TradeCancelled"}, "TradeExecuted", "event_type"),
        ({"aggregate_id": "ACC-2"}, "TradeExecuted", "payload.account_id"),
        ({"aggregate_type": "Instrument"}, "TradeExecuted", "aggregate_type"),
        ({"event_id": "not-a-uuid"}, "TradeExecuted", "event_id"),
        ({"timestamp": "2024-03-01 09:30:01"}, "TradeExecuted", "timestamp"),
        ({"sequence": 0}, "TradeExecuted", "sequence"),
        ({"correlation_id": _MISSING}, "TradeExecuted", "correlation_id"),
        ({"payload": payload("TradeExecuted", quantity=-1.0)}, "TradeExecuted", "payload.quantity"),
        ({"payload": payload("TradeExecuted", price="x")}, "TradeExecuted", "payload.price"),
        ({"payload": {"type": "Teleported"}}, "Teleported", "payload.type"),
    ],
)
def test_bad_envelopes_are_refused_naming_the_field(
    changes: dict[str, Any], kind: str, field: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        ev.decode_envelope(envelope_line(**changes))
    assert (info.value.event_type, info.value.field) == (kind, field)


OUT_OF_RANGE = [
    "0001-01-01T00:00:00+01:00",  # 31 December of the year 0 in UTC
    "9999-12-31T23:00:00-05:00",  # the year 10000 in UTC
]


@pytest.mark.parametrize("text", OUT_OF_RANGE)
def test_a_time_that_leaves_the_years_1_to_9999_in_utc_is_refused(text: str) -> None:
    # each once escaped as a bare OverflowError
    t = datetime.fromisoformat(text)
    with pytest.raises(InvalidEvent) as info:
        riskbook.TradeExecuted(**{**VALID["TradeExecuted"], "side": "Buy", "executed_at": t})
    assert (info.value.event_type, info.value.field) == ("TradeExecuted", "executed_at")
    assert f"{t.isoformat()} is out of range" in info.value.reason
    with pytest.raises(ValueError, match="out of range"):
        ev.parse_time(text)
    with pytest.raises(ValueError, match=r"^at: .*out of range"):
        ev.as_time(text, "at")
    with pytest.raises(ValueError, match=r"^known_at: .*out of range"):
        ev.as_time(t, "known_at")
    with pytest.raises(ValueError, match="out of range"):
        ev.format_time(t)
    with pytest.raises(InvalidEvent) as info:
        ev.decode_event(msgspec.json.encode(payload("AccountFunded", funded_at=text)))
    assert info.value.field == "funded_at"
    with pytest.raises(InvalidEvent) as info:
        ev.decode_envelope(envelope_line(timestamp=text))
    assert (info.value.event_type, info.value.field) == ("TradeExecuted", "timestamp")
    with pytest.raises(InvalidEvent) as info:
        ev.decode_envelope(envelope_line(payload=payload("TradeExecuted", executed_at=text)))
    assert info.value.field == "payload.executed_at"


def test_the_ends_of_the_range_in_utc_are_kept() -> None:
    for text in ("0001-01-01T00:00:00-01:00", "9999-12-31T23:00:00+05:00"):
        t = ev.parse_time(text)
        assert ev.parse_time(ev.format_time(t)) == t


def test_an_upper_case_word_opening_a_reason_keeps_its_case() -> None:
    # "JSON is malformed" came out as "jSON is malformed"
    with pytest.raises(InvalidEvent) as info:
        ev.decode_event(b'{"type": "PriceMarked", "symbol": "A", "price": NaN}')
    assert "JSON is malformed" in str(info.value) and "jSON" not in str(info.value)
    with pytest.raises(InvalidEvent, match=r"payload\.price: expected `float`"):
        ev.decode_envelope(envelope_line(payload=payload("TradeExecuted", price="x")))


@pytest.mark.parametrize("line", [b"{", b"[1,2]", b'"text"', b"\xff\xfe", b'{"payload": 1}'])
def test_broken_json_lines_are_refused(line: bytes) -> None:
    with pytest.raises(InvalidEvent):
        ev.decode_envelope(line)


_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=40,
)
_times = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
)
_pos = st.floats(min_value=1e-9, max_value=1e12, allow_nan=False, allow_infinity=False)


@given(
    trade_id=_ids,
    account_id=_ids,
    symbol=_ids,
    side=st.sampled_from(list(riskbook.Side)),
    quantity=_pos,
    price=_pos,
    executed_at=_times,
)
def test_any_valid_trade_round_trips(**fields: Any) -> None:
    trade = riskbook.TradeExecuted(**fields)
    assert ev.decode_event(ev.encode_event(trade)) == trade
    env = riskbook.Envelope(
        event_id=uuid.uuid4(),
        aggregate_id=trade.account_id,
        aggregate_type="Account",
        sequence=1,
        timestamp=fields["executed_at"],
        payload=trade,
        correlation_id="c",
    )
    back, _ = ev.decode_envelope(ev.encode_envelope(env))
    assert back == env


@given(
    trade_id=_ids | st.just('x","executed_at":"2024-01-01T00:00:00Z'),
    account_id=_ids | st.just("2024-01-01T00:00:00Z"),
    symbol=_ids,
    side=st.sampled_from(list(riskbook.Side)),
    quantity=_pos,
    price=_pos,
    executed_at=_times | st.just(datetime(2024, 1, 1, tzinfo=UTC)),
)
def test_fast_encoding_equals_the_plain_one(**fields: Any) -> None:
    trade = riskbook.TradeExecuted(**fields)
    assert ev.encode_event(trade) == msgspec.json.encode(ev.event_to_dict(trade))
    env = riskbook.Envelope(
        event_id=uuid.uuid4(),
        aggregate_id=trade.account_id,
        aggregate_type="Account",
        sequence=1,
        timestamp=fields["executed_at"],
        payload=trade,
        correlation_id="c",
    )
    assert ev.encode_envelope(env) == msgspec.json.encode(env.to_dict())


def test_an_envelope_is_written_with_its_metadata_as_given() -> None:
    # whole seconds make the encoder write the times with six digits; metadata keys
    # named like time fields keep their own text
    t = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
    metadata = {
        "timestamp": "2024-03-01T09:30:00Z",
        "nested": {"executed_at": "2024-01-01T00:00:00Z"},
    }
    env = riskbook.Envelope(
        event_id=uuid.uuid4(),
        aggregate_id="A",
        aggregate_type="Account",
        sequence=1,
        timestamp=t,
        payload=riskbook.AccountFunded(account_id="A", amount=1.0, funded_at=t),
        correlation_id="c",
        metadata=metadata,
    )
    line = msgspec.json.decode(ev.encode_envelope(env))
    assert line["metadata"] == metadata
    assert line["timestamp"] == "2024-03-01T09:30:00.000000Z"
    assert line["payload"]["funded_at"] == "2024-03-01T09:30:00.000000Z"
    assert ev.decode_envelope(ev.encode_envelope(env))[0] == env


@pytest.mark.parametrize(
    ("stored", "what"),
    [(b"[1, 2]", "array"), (b'"x"', "string"), (b"null", "null"), (b"3", "number")],
)
@pytest.mark.parametrize("event_type", ["FutureEvent", "AccountFunded"])
def test_a_stored_payload_that_is_not_an_object_is_read_raw(
    stored: bytes, what: str, event_type: str
) -> None:
    raw = ev.read_payload(event_type, stored)
    assert isinstance(raw, riskbook.RawEvent) and raw.type == event_type
    assert raw.data == {"value": msgspec.json.decode(stored)}
    assert raw.error is not None and f"JSON {what}, not an object" in raw.error


# ----------------------------------------------------------------------- decoding, exactly


def test_every_decoding_cuts_a_time_finer_than_a_microsecond_as_parse_time_does() -> None:
    # msgspec rounds: 23:59:59.9999999 was decoded as the next day's midnight
    given = "2024-03-01T23:59:59.9999999Z"
    last = datetime(2024, 3, 1, 23, 59, 59, 999999, tzinfo=UTC)
    assert ev.parse_time(given) == last
    data = payload("TradeExecuted", executed_at=given, quantity=12.1234567)
    text = msgspec.json.encode(data)
    trades = [
        ev.decode_event(text),
        ev.decode_event(text.decode(), event_type="TradeExecuted"),
        ev.event_from_dict(data),
        ev.read_payload("TradeExecuted", text),
    ]
    typed = ev.TradeExecuted(**{k: v for k, v in data.items() if k != "type"})
    trades.append(ev.validate(typed))  # what append writes of a time given as text
    for trade in trades:
        assert isinstance(trade, ev.TradeExecuted)
        assert trade.executed_at == last, trade
        assert trade.quantity == 12.1234567  # a number with many digits is no time
    env = {
        "event_id": str(uuid.uuid4()), "aggregate_id": "ACC-1", "aggregate_type": "Account",
        "timestamp": "2024-03-01T09:30:00.1234569+01:00", "correlation_id": "c",
        "metadata": {"timestamp": given, "note": "12:00:00.12345678"}, "payload": data,
    }  # fmt: skip
    for line in (msgspec.json.encode(env), msgspec.json.encode(env).decode()):
        decoded, _ = ev.decode_envelope(line)
        assert decoded.timestamp == datetime(2024, 3, 1, 8, 30, 0, 123456, tzinfo=UTC)
        assert decoded.business_time == last
        assert decoded.metadata == env["metadata"]  # not a time of the envelope: as given


def test_writing_refuses_a_key_that_is_not_a_field_and_reading_passes_it_over() -> None:
    # they were dropped: a newer writer's "venue" lost, a misspelt "Symbol" made an
    # account-wide limit, "causationId" no causation
    venue = payload("TradeExecuted", venue="XNAS")
    fields = "its fields: trade_id, account_id, symbol, side, quantity, price, executed_at"
    with pytest.raises(
        InvalidEvent, match=f"TradeExecuted.venue: is not a field of TradeExecuted \\({fields}\\)"
    ):
        ev.decode_event(msgspec.json.encode(venue))
    misspelt = {**payload("LimitSet", symbol=_MISSING), "Symbol": "AAPL"}
    with pytest.raises(InvalidEvent, match=r"LimitSet\.Symbol: is not a field of LimitSet"):
        ev.event_from_dict(misspelt)
    env = {
        "event_id": str(uuid.uuid4()), "aggregate_id": "ACC-1", "aggregate_type": "Account",
        "timestamp": T0, "correlation_id": "c", "payload": misspelt,
    }  # fmt: skip
    with pytest.raises(InvalidEvent) as info:
        ev.decode_envelope(msgspec.json.encode(env))
    assert (info.value.event_type, info.value.field) == ("LimitSet", "payload.Symbol")
    cause = {**env, "payload": payload("LimitSet"), "causationId": str(uuid.uuid4())}
    with pytest.raises(InvalidEvent) as info:
        ev.decode_envelope(msgspec.json.encode(cause))
    assert str(info.value).startswith("LimitSet.causationId: is not a field of the envelope")
    # what is stored reads, whoever wrote it
    read = ev.read_payload("TradeExecuted", msgspec.json.encode(venue))
    assert read == ev.event_from_dict(payload("TradeExecuted"))
    broken = ev.read_payload("TradeExecuted", msgspec.json.encode({**venue, "price": -1}))
    assert isinstance(broken, riskbook.RawEvent) and "price" in (broken.error or "")


def test_a_payload_without_its_type_is_told_missing_not_unknown() -> None:
    env = {
        "event_id": str(uuid.uuid4()), "event_type": "AccountFunded", "aggregate_id": "ACC-1",
        "aggregate_type": "Account", "timestamp": T0, "correlation_id": "c",
        "payload": payload("AccountFunded", type=_MISSING),
    }  # fmt: skip
    with pytest.raises(InvalidEvent) as info:
        ev.decode_envelope(msgspec.json.encode(env))
    assert str(info.value) == "AccountFunded.payload.type: is missing"
    del env["event_type"]
    with pytest.raises(InvalidEvent) as info:
        ev.decode_envelope(msgspec.json.encode(env))
    assert str(info.value) == "?.payload.type: is missing"
    env["payload"] = payload("AccountFunded", type="Gift")  # there, but no type riskbook has
    with pytest.raises(InvalidEvent, match=r"Gift\.payload\.type: unknown event type 'Gift'"):
        ev.decode_envelope(msgspec.json.encode(env))


def test_bytes_that_are_not_utf8_are_told_at_their_offset_in_the_line() -> None:
    env = {
        "event_id": str(uuid.uuid4()), "aggregate_id": "ACC-1", "aggregate_type": "Account",
        "timestamp": T0, "correlation_id": "caf\xe9", "payload": payload("AccountFunded"),
    }  # fmt: skip
    line = msgspec.json.encode(env).replace("\xe9".encode(), b"\xe9")  # Latin-1
    offset = line.index(b"\xe9")  # 150 or so; msgspec said 3, counting in the string
    with pytest.raises(InvalidEvent) as info:
        ev.decode_envelope(line)
    assert info.value.reason == f"not valid UTF-8 (at byte {offset})"


@pytest.fixture
def installed_limit_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A limit type in a distribution on sys.path (an entry point in riskbook.limit_types,
    as a pip-installed plugin has), which nothing has loaded yet."""
    name, module = "MaxPluginConcentration", f"rb_plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from riskbook import limits\n"
        f"SPEC = limits.LimitSpec({name!r}, 'account', 'fraction', lambda h, **k: None)\n"
    )
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[riskbook.limit_types]\nc = {module}:SPEC\n")
    registry: Any = importlib.import_module("riskbook.limits._registry")
    # as in a new process: entry points not loaded; whatever the test registers goes
    # with the monkeypatched copies
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(ev, "_limit_type_names", set(ev._limit_type_names))
    monkeypatch.setattr(ev, "_account_wide_types", set(ev._account_wide_types))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    assert name not in ev._limit_type_names
    return name


@pytest.mark.parametrize("first", ["import", "construction"])
def test_an_installed_limit_type_is_known_to_events_without_asking_the_registry(
    installed_limit_type: str, fresh_store: riskbook.Store, first: str
) -> None:
    # it was "unknown" to construction, append and `riskbook import` until something
    # had called limits.names()
    name = installed_limit_type
    limit = payload("LimitSet", limit_type=name, symbol=_MISSING)
    if first == "import":
        line = {
            "event_id": str(uuid.uuid4()), "aggregate_id": "ACC-1", "aggregate_type": "Account",
            "timestamp": T0, "correlation_id": "c", "payload": limit,
        }  # fmt: skip
        assert fresh_store.import_lines([msgspec.json.encode(line)]).added == 1
    else:
        ev.LimitSet(**{k: v for k, v in limit.items() if k != "type"})
    assert name in ev.known_limit_types()
    assert fresh_store.append("ACC-1", [ev.event_from_dict(limit)])[-1].event_type == "LimitSet"
