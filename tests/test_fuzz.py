"""Hostile input: SQL, quotes, Unicode, long strings and NUL in ids and filters; broken,
mistyped, conflicting and oversized JSON Lines; and a bounded fuzz of the JSON codec
and of the import (hypothesis). Each input is either refused with an error naming the
line and the field, with nothing written, or stored and read back exactly."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import riskbook
from riskbook.errors import ImportFailed, InvalidEvent, StoreError
from riskbook.events import (
    Envelope,
    canonical_json,
    canonical_payload,
    decode_envelope,
    decode_event,
    encode_envelope,
    encode_event,
    read_payload,
)
from riskbook.store import Store

T0 = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
FUZZ = settings(  # a few seconds each
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE = [
    "'; DROP TABLE events; --",
    "Robert'); DELETE FROM event_fields WHERE ('1'='1",
    'say "cheese"',
    "back\\slash \\x00 \\N",
    "tab\tnew\nline\rcr",
    "ünïcødé-账户-😀-\u202eevil",
    "%s %(x)s {0} $1 :name ?",
    "A" * 256,
]


def trade(account: str, symbol: str = "AAPL", i: int = 0, **kw: Any) -> riskbook.TradeExecuted:
    fields: dict[str, Any] = {
        "trade_id": f"T-{i}",
        "account_id": account,
        "symbol": symbol,
        "side": riskbook.Side.Buy,
        "quantity": 10.0,
        "price": 10.5,
        "executed_at": T0 + timedelta(seconds=i),
        **kw,
    }
    return riskbook.TradeExecuted(**fields)


# ----------------------------------------------------------------------- ids and filters


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_ids_are_stored_and_read_back_exactly(shared_store: Store, text: str) -> None:
    account = text[:248] + uuid.uuid4().hex[:8]  # unique, still hostile (and <= 256)
    event = trade(account, symbol=text, trade_id=text)
    before = shared_store.count()
    shared_store.append(account, [event], correlation_id=text, metadata={text: text})
    assert shared_store.count() == before + 1
    [back] = shared_store.read(account)
    assert back.payload == event and back.aggregate_id == account
    assert back.correlation_id == text and back.metadata == {text: text}
    h = riskbook.load(shared_store, accounts=[account], symbols=[text], cache=False)
    assert h.trades["account_id"].cast(str).to_list() == [account]
    assert h.trades["symbol"].cast(str).to_list() == [text]
    assert h.trades["trade_id"].to_list() == [text]
    assert riskbook.verify(shared_store).ok


def test_filters_are_values_never_sql(shared_store: Store) -> None:
    shared_store.append("F-1", [trade("F-1")])
    for evil in ("x' OR '1'='1", "F-1' --", "F-1'); DROP TABLE events; --", "%", "_-1"):
        h = riskbook.load(shared_store, accounts=[evil], symbols=[evil], cache=False)
        assert h.trades.height == 0
    assert shared_store.count() > 0  # the table is still there
    with pytest.raises((StoreError, ValueError)):
        riskbook.load(shared_store, accounts=["F-1\x00"], cache=False)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: trade("A\x00B"), "account_id"),
        (lambda: trade("A" * 257), "account_id"),
        (lambda: trade("A", symbol=""), "symbol"),
        (lambda: trade("A\ud800"), "account_id"),
        (lambda: trade("A", quantity=math.nan), "quantity"),
        (lambda: trade("A", price=math.inf), "price"),
        (lambda: trade("A", quantity="10"), "quantity"),
    ],
)
def test_bad_events_are_refused_naming_the_field(
    shared_store: Store, make: Any, field: str
) -> None:
    before = shared_store.count()
    with pytest.raises(InvalidEvent) as info:
        event = make()
        shared_store.append(event.account_id, [event])
    assert info.value.field == field
    assert shared_store.count() == before


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"correlation_id": "c\x00"}, "correlation_id"),
        ({"correlation_id": "c" * 257}, "correlation_id"),
        ({"correlation_id": "c\udfff"}, "correlation_id"),
        ({"metadata": {"k": "v\x00"}}, "metadata"),
        ({"metadata": {"k\x00": 1}}, "metadata"),
        ({"metadata": {"k": math.inf}}, "metadata"),
        ({"metadata": {"k": [math.nan]}}, "metadata"),
        ({"metadata": {1: "not a string key"}}, "metadata"),
        ({"metadata": {"when": T0}}, None),  # stored as its RFC 3339 text
        ({"metadata": {"k": 10**5000}}, "metadata"),
        ({"metadata": {"k": object()}}, "metadata"),
        ({"metadata": {"k": "\ud800"}}, "metadata"),
        ({"causation_id": "not-a-uuid"}, "causation_id"),
    ],
)
def test_bad_envelope_fields_are_refused_naming_the_field(
    shared_store: Store, kw: dict[str, Any], field: str | None
) -> None:
    agg = f"E-{uuid.uuid4().hex[:8]}"
    before = shared_store.count()
    if field is None:
        shared_store.append(agg, [trade(agg)], **kw)
        assert shared_store.read(agg)[0].metadata == {"when": "2024-03-01T09:30:00.000000Z"}
        return
    with pytest.raises(InvalidEvent) as info:
        shared_store.append(agg, [trade(agg)], **kw)
    assert info.value.field == field
    assert shared_store.count() == before


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timestamp": datetime(2024, 3, 1)}, "timestamp"),
        ({"correlation_id": "c\ud800"}, "correlation_id"),
        ({"correlation_id": "c\x00"}, "correlation_id"),
        ({"metadata": {"k": math.nan}}, "metadata"),
        ({"aggregate_id": "someone else"}, "account_id"),
    ],
)
def test_envelopes_made_in_python_are_checked_too(
    shared_store: Store, change: dict[str, Any], field: str
) -> None:
    agg = f"P-{uuid.uuid4().hex[:8]}"
    fields: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "aggregate_id": agg,
        "aggregate_type": "Account",
        "sequence": 1,
        "timestamp": T0,
        "payload": trade(agg),
        "correlation_id": "c",
        **change,
    }
    before = shared_store.count()
    with pytest.raises(ImportFailed, match=f"envelope 1: .*{field}"):
        shared_store.import_envelopes([Envelope(**fields)])
    assert shared_store.count() == before


def test_deeply_nested_metadata_is_refused(shared_store: Store) -> None:
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(InvalidEvent, match="nested too deeply"):
        shared_store.append("D-1", [trade("D-1")], metadata={"deep": deep})


# ----------------------------------------------------------------------- JSON Lines


def line(agg: str, i: int, **changes: Any) -> bytes:
    env = Envelope(
        event_id=uuid.uuid4(),
        aggregate_id=agg,
        aggregate_type="Account",
        sequence=i + 1,
        timestamp=T0 + timedelta(seconds=i),
        payload=trade(agg, i=i),
        correlation_id="c",
    )
    data = msgspec.json.decode(encode_envelope(env))
    for key, value in changes.items():
        where = data
        *path, last = key.split(".")
        for part in path:
            where = where[part]
        if value is _DROP:
            del where[last]
        else:
            where[last] = value
    return json.dumps(data).encode()


_DROP = object()


@pytest.fixture(params=["empty", "busy"])
def importer(request: pytest.FixtureRequest, fresh_store: Store) -> Iterator[Store]:
    """The fast road (into an empty store) and the general one (into a busy store)."""
    if request.param == "busy":
        fresh_store.append("BUSY", [trade("BUSY")])
    yield fresh_store


BAD_LINES = [
    (b'{"event_id": "broken', "line 3", "not valid JSON"),
    (b"[1, 2, 3]", "line 3", "must be a JSON object"),
    (line("X", 2, **{"payload.quantity": "10"}), "line 3", "payload.quantity"),
    (line("X", 2, **{"payload.quantity": -1}), "line 3", "payload.quantity"),
    (line("X", 2, **{"payload.side": "Short"}), "line 3", "payload.side"),
    (line("X", 2, **{"payload.executed_at": _DROP}), "line 3", "executed_at"),
    (line("X", 2, **{"payload.type": "Nope"}), "line 3", "unknown event type"),
    (line("X", 2, **{"timestamp": "2024-03-01T09:30:00"}), "line 3", "timestamp"),
    (
        line("X", 2, **{"payload.executed_at": "2024-03-01T09:30:00"}),
        "line 3",
        "payload.executed_at",
    ),
    (line("X", 2, **{"sequence": 0}), "line 3", "sequence"),
    (line("X", 2, **{"payload.account_id": "X\u0000"}), "line 3", "account_id"),
    (line("X", 2, **{"metadata": {"k": "\u0000"}}), "line 3", "metadata"),
    (line("X", 2, **{"aggregate_id": "Y"}), "line 3", "account_id"),
    (line("X", 2, **{"correlation_id": "c" * 300}), "line 3", "correlation_id"),
    # times that leave the years 1 to 9999 once in UTC, and a sequence beyond bigint:
    # once a bare OverflowError, and the database's "out of range for type bigint"
    (
        line("X", 2, **{"payload.executed_at": "0001-01-01T00:00:00+01:00"}),
        "line 3",
        "TradeExecuted.payload.executed_at: 0001-01-01T00:00:00+01:00 is out of range",
    ),
    (
        line("X", 2, **{"payload.executed_at": "9999-12-31T23:00:00-05:00"}),
        "line 3",
        "TradeExecuted.payload.executed_at: 9999-12-31T23:00:00-05:00 is out of range",
    ),
    (
        line("X", 2, **{"timestamp": "0001-01-01T00:00:00+01:00"}),
        "line 3",
        "TradeExecuted.timestamp: 0001-01-01T00:00:00+01:00 is out of range",
    ),
    (line("X", 2, **{"sequence": 2**63}), "line 3", "TradeExecuted.sequence: expected `int` <="),
]


@pytest.mark.parametrize(("bad", "where", "what"), BAD_LINES)
def test_a_bad_line_refuses_the_whole_file(
    importer: Store, bad: bytes, where: str, what: str
) -> None:
    before = importer.count()
    lines = [line("X", 0), line("X", 1), bad, line("X", 3)]
    with pytest.raises(ImportFailed) as info:
        importer.import_lines(lines, source="f.jsonl")
    assert where in str(info.value) and what in str(info.value), str(info.value)
    assert importer.count() == before


def test_huge_numbers_are_refused_or_kept_exactly(importer: Store) -> None:
    before = importer.count()
    huge = line("H", 0).replace(b'"quantity": 10.0', b'"quantity": 1e400')
    with pytest.raises(ImportFailed, match=r"line 1: .*quantity"):
        importer.import_lines([huge])
    deep = b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(ImportFailed, match="line 1"):
        importer.import_lines([deep])
    assert importer.count() == before
    big = [line("H", 0, **{"payload.quantity": 1e300, "metadata": {"big": 10**30, "tiny": 5e-324}})]
    assert importer.import_lines(big).added == 1
    [env] = importer.read("H")
    assert env.payload.quantity == 1e300  # type: ignore[union-attr]
    assert env.metadata == {"big": 10**30, "tiny": 5e-324}
    assert riskbook.verify(importer).ok


def test_duplicate_event_ids_with_other_content_are_refused(importer: Store) -> None:
    before = importer.count()
    first = line("X", 0)
    twin = json.loads(first)
    twin["payload"]["price"] = 99.0
    lines = [first, line("X", 1), json.dumps(twin).encode()]
    with pytest.raises(ImportFailed, match=r"line 3: event_id .* appears on line 1"):
        importer.import_lines(lines)
    assert importer.count() == before
    assert importer.import_lines([first, line("X", 1), first]).added == 2  # same: harmless
    clash = json.loads(first)
    clash["payload"]["quantity"] = 1.0
    with pytest.raises(ImportFailed, match="already stored with different content"):
        importer.import_lines([json.dumps(clash).encode()])
    assert importer.count() == before + 2


# ----------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def pg(make_database: Any) -> Iterator[psycopg.Connection]:
    with psycopg.connect(make_database(), autocommit=True) as conn:
        yield conn


TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(value=JSON)
@example(value={"b": 1, "aa": 2, "é": 3, "": [1e16, -0.0, 1e-7, 5e-324, 1.7976931348623157e308]})
@example(value='\x01\x1f\x7f\u2028"\\/\t😀')
def test_canonical_json_is_exactly_what_postgres_prints(pg: psycopg.Connection, value: Any) -> None:
    text = canonical_json(value)
    assert pg.execute("SELECT %s::jsonb::text", (text,)).fetchone() == (text,)


IDS = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1,
    max_size=256,
)
TIMES = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
POSITIVE = st.floats(min_value=5e-324, allow_nan=False, allow_infinity=False)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
EVENTS = st.one_of(
    st.builds(
        riskbook.TradeExecuted,
        trade_id=IDS,
        account_id=IDS,
        symbol=IDS,
        side=st.sampled_from(riskbook.Side),
        quantity=POSITIVE,
        price=POSITIVE,
        executed_at=TIMES,
    ),
    st.builds(riskbook.PriceMarked, symbol=IDS, price=POSITIVE, marked_at=TIMES),
    st.builds(
        riskbook.PositionUpdated,
        account_id=IDS,
        symbol=IDS,
        previous_quantity=FINITE,
        new_quantity=FINITE,
        reason=TEXT,
        updated_at=TIMES,
    ),
    st.builds(  # a symbol only where the type is per symbol
        riskbook.LimitSet,
        account_id=IDS,
        limit_type=st.sampled_from(riskbook.LimitType).map(str),
        value=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
        set_by=IDS,
        set_at=TIMES,
        symbol=st.none(),
    ),
    st.builds(
        riskbook.LimitSet,
        account_id=IDS,
        limit_type=st.just("MaxPositionSize"),
        value=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
        set_by=IDS,
        set_at=TIMES,
        symbol=IDS,
    ),
    st.builds(
        riskbook.AccountBlocked, account_id=IDS, reason=TEXT, blocked_by=IDS, blocked_at=TIMES
    ),
)


@FUZZ
@given(event=EVENTS, metadata=st.dictionaries(TEXT, JSON, max_size=3))
def test_the_codec_round_trips_any_valid_event(
    pg: psycopg.Connection, event: Any, metadata: dict[str, Any]
) -> None:
    assert decode_event(encode_event(event)) == event
    env = Envelope(
        event_id=uuid.uuid4(),
        aggregate_id=event.aggregate_id,
        aggregate_type=event.aggregate_type,
        sequence=1,
        timestamp=T0,
        payload=event,
        correlation_id="c",
        metadata=metadata,
    )
    back, has_sequence = decode_envelope(encode_envelope(env))
    assert back.payload == event and back.metadata == metadata and has_sequence
    # the canonical text is what PostgreSQL keeps, and it reads back as the same event
    text = canonical_payload(event)
    stored = pg.execute("SELECT %s::jsonb::text", (text,)).fetchone()
    assert stored == (text,)
    assert read_payload(type(event).__name__, text.encode()) == event


@FUZZ
@given(data=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
@example(data=b'{"event_id": "' + b"\\ud800" + b'"}')
@example(data=b"[" * 100_000)
@example(data=b'{"payload": {"type": "TradeExecuted", "quantity": 1e999}}')
def test_decoding_garbage_only_ever_raises_invalid_event(data: bytes) -> None:
    for decode in (decode_envelope, decode_event):
        try:
            decode(data)
        except InvalidEvent as exc:
            assert exc.field and exc.reason
        else:  # pragma: no cover - garbage that happens to be valid
            pass


MUTATIONS = st.sampled_from(
    ["replace", "drop", "truncate", "flip", "duplicate_id", "reorder_sequence"]
)


@settings(FUZZ, max_examples=60)
@given(
    n=st.integers(min_value=1, max_value=6),
    where=st.integers(min_value=0, max_value=5),
    mutation=MUTATIONS,
    key=st.sampled_from(
        [
            "event_id",
            "aggregate_id",
            "timestamp",
            "sequence",
            "metadata",
            "payload",
            "payload.quantity",
            "payload.account_id",
            "payload.executed_at",
            "correlation_id",
            "causation_id",
        ]
    ),
    value=JSON,
    flip=st.integers(min_value=0, max_value=10_000),
)
def test_an_import_is_all_or_nothing_whatever_the_input(
    shared_store: Store,
    n: int,
    where: int,
    mutation: str,
    key: str,
    value: Any,
    flip: int,
) -> None:
    agg = f"Z-{uuid.uuid4().hex[:10]}"
    lines = [line(agg, i) for i in range(n)]
    at = where % n
    data = json.loads(lines[at])
    if mutation in ("replace", "drop"):
        target = data
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        if mutation == "drop":
            target.pop(last, None)
        else:
            target[last] = value
        lines[at] = json.dumps(data).encode()
    elif mutation == "truncate":
        lines[at] = lines[at][: flip % len(lines[at])]
    elif mutation == "flip":
        raw = bytearray(lines[at])
        raw[flip % len(raw)] ^= 1 << (flip % 8)
        lines[at] = bytes(raw)
    elif mutation == "duplicate_id" and n > 1:
        data["event_id"] = json.loads(lines[(at + 1) % n])["event_id"]
        lines[at] = json.dumps(data).encode()
    elif mutation == "reorder_sequence":
        data["sequence"] = n + 5
        lines[at] = json.dumps(data).encode()
    before = shared_store.count()
    try:
        result = shared_store.import_lines(lines)
    except ImportFailed as exc:
        assert "line" in str(exc) or "aggregate" in str(exc) or "sequence" in str(exc), exc
        assert shared_store.count() == before
    else:
        assert shared_store.count() == before + result.added
        assert result.read == sum(1 for ln in lines if ln.strip())
