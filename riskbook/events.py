"""Event types, the envelope, validation and the JSON codec (DESIGN.md §2).

Every fact riskbook knows is one of the event types below, wrapped in an
:class:`Envelope`. The JSON layout is the seed article's serde layout: the envelope's
fields plus ``payload``, an object tagged by ``"type"``. Times are RFC 3339 in UTC with
microseconds (``2024-03-01T09:30:00.000000Z``).

Two times are kept apart everywhere:

* **business time** -- when it happened in the world: the payload's ``*_at`` field
  (:attr:`Event.business_time`);
* **recorded time** -- when the store learned it: :attr:`Envelope.timestamp`.

Examples
--------
>>> from datetime import datetime, timezone
>>> trade = TradeExecuted(
...     trade_id="T-1", account_id="ACC-1", symbol="AAPL", side=Side.Buy,
...     quantity=100.0, price=10.0, executed_at=datetime(2024, 3, 1, 9, 30, tzinfo=timezone.utc),
... )
>>> encode_event(trade).decode()
'{"type":"TradeExecuted","trade_id":"T-1","account_id":"ACC-1","symbol":"AAPL","side":"Buy","quantity":100.0,"price":10.0,"executed_at":"2024-03-01T09:30:00.000000Z"}'
>>> TradeExecuted(
...     trade_id="T-2", account_id="ACC-1", symbol="AAPL", side=Side.Buy,
...     quantity=-5.0, price=10.0, executed_at=datetime(2024, 3, 1, 9, 30, tzinfo=timezone.utc),
... )
Traceback (most recent call last):
...
riskbook.errors.InvalidEvent: TradeExecuted.quantity: must be > 0, got -5.0
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from types import UnionType
from typing import Annotated, Any, ClassVar, TypeAlias, Union, get_args, get_origin

import msgspec

from riskbook.errors import InvalidEvent

__all__ = [
    "ACCOUNT",
    "EVENT_TYPES",
    "INSTRUMENT",
    "MAX_SEQUENCE",
    "STORED_INFINITY",
    "AccountBlocked",
    "AccountFunded",
    "AccountUnblocked",
    "Envelope",
    "Event",
    "LimitSet",
    "LimitType",
    "LimitViolationDetected",
    "PositionUpdated",
    "PriceMarked",
    "RawEvent",
    "Side",
    "TradeCancelled",
    "TradeExecuted",
    "as_time",
    "canonical_event",
    "canonical_fields",
    "canonical_json",
    "canonical_payload",
    "chain_hash",
    "check_for_aggregate",
    "check_metadata",
    "check_text",
    "decode_envelope",
    "decode_event",
    "encode_envelope",
    "encode_event",
    "event_digest",
    "event_from_dict",
    "event_to_dict",
    "format_time",
    "known_limit_types",
    "parse_time",
    "read_payload",
    "register_limit_type_name",
    "validate",
]

ACCOUNT = "Account"
INSTRUMENT = "Instrument"


class Side(StrEnum):
    """The side of a fill."""

    Buy = "Buy"
    Sell = "Sell"


class LimitType(StrEnum):
    """The built-in limit types (DESIGN.md §5). More can be registered by name."""

    MaxPositionSize = "MaxPositionSize"
    MaxDailyVolume = "MaxDailyVolume"
    MaxDrawdown = "MaxDrawdown"
    MaxLeverage = "MaxLeverage"


STORED_INFINITY = 1.7976931348623157e308  # sys.float_info.max
"""How an infinite metric is written in an event (``current_value`` of a violation:
leverage with equity <= 0): the largest finite double, since events (and JSON) hold
finite numbers only. Read back, a value this large means infinite."""

_limit_type_names: set[str] = {t.value for t in LimitType}
# Limit types with one limit per account: a LimitSet of one names no symbol.
_account_wide_types: set[str] = {"MaxDailyVolume", "MaxDrawdown", "MaxLeverage"}
# True while decoding what the store holds: a limit type registered by another
# process (a notebook's) is still a valid stored fact.
_reading_stored: ContextVar[bool] = ContextVar("_reading_stored", default=False)


def register_limit_type_name(name: str, *, per_symbol: bool = True) -> None:
    """Make ``name`` acceptable as a ``limit_type`` in LimitSet / LimitViolationDetected.

    The limits layer calls this when a limit type is registered; events name limit
    types by string so that a type defined in a notebook can be stored. ``per_symbol``
    False (a type with one limit per account): a LimitSet of it may not name a symbol,
    which would otherwise be shown in force and never evaluated.
    """
    if not isinstance(name, str) or not name or not name.isidentifier():
        raise ValueError(f"a limit type name must be a non-empty identifier, got {name!r}")
    _limit_type_names.add(name)
    if per_symbol:
        _account_wide_types.discard(name)
    else:
        _account_wide_types.add(name)


def known_limit_types() -> frozenset[str]:
    """The limit type names events may carry (installed plugins' included)."""
    if _limit_type_loader is not None:
        _limit_type_loader()
    return frozenset(_limit_type_names)


# The limits layer's loader of the limit types installed packages add (entry points):
# events, the lowest layer, cannot import it, so the limits layer installs it here when
# it is imported. It runs on the first limit type not known yet (and loads only once),
# so that a plugin's type is known to construction, append and import without anything
# having asked the limits registry first.
_limit_type_loader: Callable[[], object] | None = None


def _install_limit_type_loader(loader: Callable[[], object]) -> None:
    global _limit_type_loader
    _limit_type_loader = loader


def _is_limit_type(name: str) -> bool:
    if name in _limit_type_names:
        return True
    if _limit_type_loader is not None:
        _limit_type_loader()
    return name in _limit_type_names


# --------------------------------------------------------------------------- times


def format_time(t: datetime) -> str:
    """RFC 3339, UTC, always six fractional digits: ``2024-03-01T09:30:00.000000Z``."""
    if t.tzinfo is None:
        raise ValueError("a time without a time zone is ambiguous")
    return _time_json(t)[1:-1]


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time that carries a zone; the result is in UTC.

    Times are kept to the microsecond: digits past the sixth are dropped, never rounded
    up, so a bound such as ``at`` or ``known_at`` never reaches past the time it names.
    """
    if isinstance(text, str):
        text = _FINER_THAN_MICROSECONDS.sub(r"\1", text, count=1)
    try:
        t = msgspec.json.decode(msgspec.json.encode(text), type=_AwareTime)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{text!r} is not an RFC 3339 time with a zone") from exc
    return _in_utc(t)


_FINER_THAN_MICROSECONDS = re.compile(r"(:[0-9]{2}\.[0-9]{6})[0-9]+")


def _in_utc(t: datetime) -> datetime:
    """``t`` in UTC; ValueError if that falls outside the years 1 to 9999."""
    try:
        return t.astimezone(UTC)
    except OverflowError:
        raise ValueError(_OUT_OF_RANGE.format(t.isoformat())) from None


_OUT_OF_RANGE = "{} is out of range: in UTC it falls outside the years 1 to 9999"


def as_time(value: datetime | str | None, name: str) -> datetime | None:
    """A user-given time (a datetime with a zone, or RFC 3339 text) in UTC; None stays None.

    ``name`` is the parameter's name, for the error (``at``, ``known_at``, ...).
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_time(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if not isinstance(value, datetime):
        raise TypeError(
            f"{name} must be a datetime or an RFC 3339 string, got {type(value).__name__}"
        )
    if value.tzinfo is None:
        raise ValueError(f"{name} has no time zone: give UTC explicitly")
    try:
        t = _in_utc(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if type(t) is not datetime:  # a subclass (pandas' Timestamp, say): a plain one, as
        # the events it may go into take (its nanoseconds floored, as everywhere)
        t = datetime(t.year, t.month, t.day, t.hour, t.minute, t.second, t.microsecond, UTC)
    return t


# --------------------------------------------------------------------------- types

_AwareTime: TypeAlias = Annotated[datetime, msgspec.Meta(tz=True)]
_Id: TypeAlias = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Positive: TypeAlias = Annotated[float, msgspec.Meta(gt=0)]
_NonNegative: TypeAlias = Annotated[float, msgspec.Meta(ge=0)]

_ID_FIELDS = frozenset({"trade_id", "account_id", "symbol", "set_by", "blocked_by", "unblocked_by"})
_POSITIVE_FIELDS = frozenset({"quantity", "price"})
# Lone surrogates can come from Python code (never from UTF-8 input): no database or
# file can store them.
_SURROGATE = re.compile("[\ud800-\udfff]")


_FIELD_KINDS: dict[type, tuple[tuple[str, ...], tuple[str, ...], str]] = {}


def _field_kinds(cls: type) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(float fields, str fields, time field) of an event class, from its annotations."""

    def bases(t: Any) -> set[Any]:
        if get_origin(t) is Annotated:
            return bases(get_args(t)[0])
        if get_origin(t) in (Union, UnionType):
            return set().union(*(bases(a) for a in get_args(t)))
        return {t}

    floats, strs = [], []
    for f in msgspec.structs.fields(cls):
        kinds = bases(f.type)
        if float in kinds:
            floats.append(f.name)
        elif any(isinstance(k, type) and issubclass(k, str) for k in kinds):
            strs.append(f.name)
    result = (tuple(floats), tuple(strs), cls.time_field)  # type: ignore[attr-defined]
    _FIELD_KINDS[cls] = result
    return result


class Event(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    tag_field="type",
    tag=True,
    forbid_unknown_fields=True,
):
    """Base of every event payload. Subclasses are immutable and validated on creation.

    ``aggregate_type`` says which kind of aggregate the event belongs to
    (``"Account"`` or ``"Instrument"``); :attr:`aggregate_id` is the id of that
    aggregate, taken from the payload; :attr:`business_time` is its ``*_at`` field.

    Decoding refuses a key that is not a field (``"venue"``, a misspelt ``"Symbol"``):
    written, it would be lost or change what the event means. Reading what is stored
    (:func:`read_payload`) passes over such keys instead: a newer riskbook's payload
    still reads.
    """

    aggregate_type: ClassVar[str] = ACCOUNT
    time_field: ClassVar[str] = ""

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    @property
    def aggregate_id(self) -> str:
        return str(self.account_id)  # type: ignore[attr-defined]

    @property
    def business_time(self) -> datetime:
        return getattr(self, self.time_field)

    def __post_init__(self) -> None:
        # Runs both on construction and on decoding (millions of times in an import, so
        # it looks only at the fields that need it). Types of values built in Python are
        # checked by validate(); here: the rules msgspec cannot express.
        cls = type(self)
        spec = _FIELD_KINDS.get(cls) or _field_kinds(cls)
        name = cls.__name__
        for f in spec[0]:
            v = getattr(self, f)
            if v.__class__ is float:
                if not math.isfinite(v):
                    raise InvalidEvent(name, f, f"must be a finite number, got {v!r}")
                if f in _POSITIVE_FIELDS and not v > 0:
                    raise InvalidEvent(name, f, f"must be > 0, got {v!r}")
        for f in spec[1]:
            v = getattr(self, f)
            if v.__class__ is str:
                if "\x00" in v:
                    raise InvalidEvent(name, f, "contains a NUL character")
                if not v and f in _ID_FIELDS:
                    raise InvalidEvent(name, f, "must not be empty")
                if not v.isascii() and _SURROGATE.search(v):
                    raise InvalidEvent(name, f, "is not valid Unicode (a lone surrogate)")
        t = getattr(self, spec[2])
        if t.__class__ is datetime and t.tzinfo is not UTC:
            if t.tzinfo is None:
                raise InvalidEvent(name, spec[2], "has no time zone (use UTC)")
            try:
                utc = t.astimezone(UTC)
            except OverflowError:
                raise InvalidEvent(name, spec[2], _OUT_OF_RANGE.format(t.isoformat())) from None
            msgspec.structs.force_setattr(self, spec[2], utc)
        limit_type = getattr(self, "limit_type", None)
        if limit_type is not None and not _reading_stored.get():
            if not _is_limit_type(limit_type):
                raise InvalidEvent(
                    name,
                    "limit_type",
                    f"unknown limit type {limit_type!r} (known: {', '.join(sorted(_limit_type_names))})",
                )
            if name == "LimitSet" and limit_type in _account_wide_types and self.symbol is not None:  # type: ignore[attr-defined]
                raise InvalidEvent(
                    name,
                    "symbol",
                    f"{limit_type} is a limit per account: a symbol does not apply (leave it out)",
                )


class TradeExecuted(Event, frozen=True, kw_only=True):
    """A fill."""

    time_field: ClassVar[str] = "executed_at"
    trade_id: _Id
    account_id: _Id
    symbol: _Id
    side: Side
    quantity: _Positive
    price: _Positive
    executed_at: _AwareTime


class TradeCancelled(Event, frozen=True, kw_only=True):
    """A bust: the trade is treated as never having happened."""

    time_field: ClassVar[str] = "cancelled_at"
    trade_id: _Id
    account_id: _Id
    reason: str
    cancelled_at: _AwareTime


class PositionUpdated(Event, frozen=True, kw_only=True):
    """An adjustment (split, reconciliation): sets the quantity, keeps the cost basis."""

    time_field: ClassVar[str] = "updated_at"
    account_id: _Id
    symbol: _Id
    previous_quantity: float
    new_quantity: float
    reason: str
    updated_at: _AwareTime


class PriceMarked(Event, frozen=True, kw_only=True):
    """A mark price from a pricing source; belongs to the Instrument aggregate."""

    aggregate_type: ClassVar[str] = INSTRUMENT
    time_field: ClassVar[str] = "marked_at"
    symbol: _Id
    price: _Positive
    marked_at: _AwareTime

    @property
    def aggregate_id(self) -> str:
        return self.symbol


class AccountFunded(Event, frozen=True, kw_only=True):
    """Cash in (amount > 0) or out (amount < 0)."""

    time_field: ClassVar[str] = "funded_at"
    account_id: _Id
    amount: float
    funded_at: _AwareTime

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.amount == 0:
            raise InvalidEvent("AccountFunded", "amount", "must not be 0")


class LimitSet(Event, frozen=True, kw_only=True):
    """A limit takes effect from ``set_at`` until the next LimitSet of its scope."""

    time_field: ClassVar[str] = "set_at"
    account_id: _Id
    limit_type: str
    value: _NonNegative
    set_by: _Id
    set_at: _AwareTime
    symbol: _Id | None = None


class LimitViolationDetected(Event, frozen=True, kw_only=True):
    """Emitted by the live processor when a breach starts."""

    time_field: ClassVar[str] = "detected_at"
    account_id: _Id
    limit_type: str
    current_value: float
    limit_value: float
    detected_at: _AwareTime
    symbol: _Id | None = None


class AccountBlocked(Event, frozen=True, kw_only=True):
    """Trading stopped for the account."""

    time_field: ClassVar[str] = "blocked_at"
    account_id: _Id
    reason: str
    blocked_by: _Id
    blocked_at: _AwareTime


class AccountUnblocked(Event, frozen=True, kw_only=True):
    """Trading allowed again."""

    time_field: ClassVar[str] = "unblocked_at"
    account_id: _Id
    reason: str
    unblocked_by: _Id
    unblocked_at: _AwareTime


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        TradeExecuted,
        TradeCancelled,
        PositionUpdated,
        PriceMarked,
        AccountFunded,
        LimitSet,
        LimitViolationDetected,
        AccountBlocked,
        AccountUnblocked,
    )
}

AnyEvent: TypeAlias = (
    TradeExecuted
    | TradeCancelled
    | PositionUpdated
    | PriceMarked
    | AccountFunded
    | LimitSet
    | LimitViolationDetected
    | AccountBlocked
    | AccountUnblocked
)


@dataclass(frozen=True)
class RawEvent:
    """A payload riskbook cannot interpret (a type written by a newer version, say).

    Kept as it was stored so readers never crash on it; projections pass it over.
    """

    type: str
    data: Mapping[str, Any]
    error: str | None = None

    aggregate_type: ClassVar[str] = "?"

    def type_name(self) -> str:
        return self.type


# --------------------------------------------------------------------------- codec

_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()
}
_any_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(AnyEvent)
_encoder = msgspec.json.Encoder()

# msgspec rounds a fraction finer than a microsecond to the nearest one; riskbook cuts
# it, as parse_time does: a fill at 23:59:59.9999999 stays on its day, and a time never
# moves past the one given. No time riskbook writes has such a fraction, so decoding
# looks for one with a search of the text first (cheap next to the decoding) and
# rewrites the times only where there is one (floats with many digits match too: they
# are only read once more).
_FINER_FRACTION = re.compile(rb"\.[0-9]{7}")
_FINER_FRACTION_TEXT = re.compile(r"\.[0-9]{7}")
_TIME_FIELDS = tuple(sorted({cls.time_field for cls in EVENT_TYPES.values()}))


def _cut_time(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``data`` with the fraction of its time ``key`` cut to microseconds (a copy, if it
    has digits past the sixth; else ``data`` itself)."""
    value = data.get(key)
    if value.__class__ is str and len(value) > 27 and _FINER_THAN_MICROSECONDS.search(value):
        return {**data, key: _FINER_THAN_MICROSECONDS.sub(r"\1", value, count=1)}
    return data


def _exact_times(data: bytes | str, *, envelope: bool) -> bytes | str:
    """The JSON text of an envelope line (of a payload, ``envelope`` False) with its
    times' digits past the sixth cut: the recorded time and the payload's business
    time, nothing else (metadata is kept as given). Text with none comes back as is."""
    if isinstance(data, str):
        if _FINER_FRACTION_TEXT.search(data) is None:
            return data
    elif _FINER_FRACTION.search(data) is None:
        return data
    try:
        obj = msgspec.json.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return data  # not JSON: the decoder says what is wrong
    if not isinstance(obj, dict):
        return data
    exact = _cut_time(obj, "timestamp") if envelope else obj
    payload = exact.get("payload") if envelope else exact
    if isinstance(payload, Mapping):
        cut = payload
        for key in _TIME_FIELDS:
            cut = _cut_time(cut, key)
        if cut is not payload:
            exact = {**exact, "payload": cut} if envelope else cut
    return data if exact is obj else msgspec.json.encode(exact)


def _field_of(path: str) -> str:
    # msgspec reports "... - at `$.payload.quantity`"; keep the part after "$." .
    return path.split("$.", 1)[1].rstrip("`") if "$." in path else "?"


def _not_a_field(what: str, fields: Iterable[str]) -> str:
    return f"is not a field of {what} (its fields: {', '.join(fields)})"


def _invalid(event_type: str, exc: Exception, *, prefix: str = "") -> InvalidEvent:
    if isinstance(exc, InvalidEvent):
        if prefix:
            return InvalidEvent(exc.event_type, prefix + exc.field, exc.reason)
        return exc
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, InvalidEvent):  # raised from __post_init__ while decoding
        return _invalid(event_type, cause, prefix=prefix)
    text = str(exc)
    reason, _, where = text.partition(" - at ")
    field_name = _field_of(where) if where else "?"
    if "Object missing required field" in reason:
        missing = reason.split("`")[1] if "`" in reason else "?"
        field_name = f"{field_name}.{missing}" if field_name != "?" else missing
        reason = "is missing"
    elif reason.startswith("Object contains unknown field"):
        # refused, not dropped: a newer writer's field would be lost, a misspelt one
        # ("Symbol") would change what the event means
        unknown = reason.partition("`")[2][:-1]  # the key as given, backticks and all
        if not unknown.isidentifier():
            unknown = json.dumps(unknown)  # "" (an empty key), "a b", ...
        cls = EVENT_TYPES.get(event_type)
        if field_name in ("?", "payload") and cls is not None:
            reason = _not_a_field(event_type, cls.__struct_fields__)
        else:
            reason = "is not a field riskbook knows"
        field_name = f"{field_name}.{unknown}" if field_name != "?" else unknown
    if reason[1:2].islower():  # "Expected ..." -> "expected ...", but "JSON ..." stays
        reason = reason[:1].lower() + reason[1:]
    return InvalidEvent(event_type, prefix + field_name, reason)


def event_to_dict(event: Event) -> dict[str, Any]:
    """The payload as a JSON-ready dict: ``{"type": ..., field: value, ...}``."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for f in event.__struct_fields__:
        v = getattr(event, f)
        if isinstance(v, datetime):
            v = format_time(v)
        elif isinstance(v, StrEnum):
            v = v.value
        out[f] = v
    return out


def encode_event(event: Event) -> bytes:
    """The payload as JSON bytes (the serde layout, tagged by ``"type"``)."""
    data = _encoder.encode(event)
    return _six_digits(data) if _whole_second(event) else data


def _whole_second(event: Event) -> bool:
    return getattr(getattr(event, event.time_field, None), "microsecond", 0) == 0


# msgspec writes a UTC time with no fraction when its microseconds are 0; riskbook always
# writes six digits. Only values of the known time keys are touched: inside a JSON string,
# quotes are escaped, so '"executed_at":"' can only be a key followed by its value.
_WHOLE_SECOND = re.compile(
    rb'("(?:executed_at|cancelled_at|updated_at|marked_at|funded_at|set_at|detected_at'
    rb'|blocked_at|unblocked_at|timestamp)":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)Z"'
)


def _six_digits(data: bytes) -> bytes:
    return _WHOLE_SECOND.sub(rb'\1.000000Z"', data)


def decode_event(data: bytes | str, *, event_type: str | None = None) -> Event:
    """Decode and validate a payload. Raises :class:`InvalidEvent` naming the field (a
    key that is not one of the event's fields too). Digits of its time past the sixth
    are dropped, as :func:`parse_time` drops them."""
    try:
        if event_type is None:
            return _any_decoder.decode(_exact_times(data, envelope=False))
        decoder = _decoders.get(event_type)
        if decoder is None:
            raise InvalidEvent(event_type, "type", f"unknown event type {event_type!r}")
        return decoder.decode(_exact_times(data, envelope=False))
    except RecursionError:
        raise InvalidEvent(event_type or "?", "payload", "nested too deeply") from None
    except (msgspec.ValidationError, msgspec.DecodeError, InvalidEvent) as exc:
        kind = event_type or _peek_type(data)
        if isinstance(exc, msgspec.ValidationError) and "`$.type`" in str(exc):
            raise InvalidEvent(kind, "type", f"unknown event type {kind!r}") from None
        raise _invalid(kind, exc) from None


def _peek_type(data: bytes | str | Mapping[str, Any]) -> str:
    # Best effort, for error messages: the standard library reads what msgspec refuses
    # (numbers out of range, say).
    try:
        obj = json.loads(data) if isinstance(data, bytes | str) else data
    except (ValueError, RecursionError):
        return "?"
    t = obj.get("type") if isinstance(obj, Mapping) else None
    return t if isinstance(t, str) else "?"


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Build and validate an event from a dict with a ``"type"`` key."""
    if not isinstance(data, Mapping):
        raise InvalidEvent("?", "payload", f"must be an object, got {type(data).__name__}")
    event_type = data.get("type")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        raise InvalidEvent(str(event_type or "?"), "type", f"unknown event type {event_type!r}")
    cls = EVENT_TYPES[event_type]
    try:
        return msgspec.convert(_cut_time(data, cls.time_field), cls, strict=True)
    except (msgspec.ValidationError, InvalidEvent) as exc:
        raise _invalid(event_type, exc) from None


def validate(event: Event) -> Event:
    """Check every field of an event built in Python (types included); return it.

    ``TradeExecuted(quantity="10", ...)`` constructs (Python does not check types on
    construction), but cannot be written: :func:`validate` refuses it.
    """
    if isinstance(event, RawEvent) or not isinstance(event, Event):
        kind = event.type if isinstance(event, RawEvent) else type(event).__name__
        raise InvalidEvent(kind, "type", "not a riskbook event; cannot be written")
    data = {"type": type(event).__name__}
    for f in event.__struct_fields__:
        data[f] = getattr(event, f)
    try:
        # a time given as text (Python does not check types) is cut like a decoded one
        return msgspec.convert(_cut_time(data, event.time_field), type(event), strict=True)
    except (msgspec.ValidationError, InvalidEvent) as exc:
        raise _invalid(type(event).__name__, exc) from None


# --------------------------------------------------------------------------- envelope


@dataclass(frozen=True, slots=True)
class Envelope:
    """An event with everything the store knows about it.

    ``sequence`` is the aggregate's version after this event (1, 2, 3, ... no gaps);
    ``position`` the global reading order (``None`` until stored); ``timestamp`` the
    recorded time.
    """

    event_id: uuid.UUID
    aggregate_id: str
    aggregate_type: str
    sequence: int
    timestamp: datetime
    payload: Event | RawEvent
    correlation_id: Annotated[str, msgspec.Meta(max_length=256)]
    causation_id: uuid.UUID | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    position: int | None = None

    @property
    def event_type(self) -> str:
        return self.payload.type_name()

    @property
    def business_time(self) -> datetime | None:
        return None if isinstance(self.payload, RawEvent) else self.payload.business_time

    def to_dict(self) -> dict[str, Any]:
        """The article's ``EventEnvelope`` layout as a JSON-ready dict."""
        payload = (
            {"type": self.payload.type, **self.payload.data}
            if isinstance(self.payload, RawEvent)
            else event_to_dict(self.payload)
        )
        return {
            "event_id": str(self.event_id),
            "event_type": self.event_type,
            "aggregate_id": self.aggregate_id,
            "aggregate_type": self.aggregate_type,
            "sequence": self.sequence,
            "timestamp": format_time(self.timestamp),
            "causation_id": None if self.causation_id is None else str(self.causation_id),
            "correlation_id": self.correlation_id,
            "metadata": dict(self.metadata),
            "payload": payload,
        }


MAX_SEQUENCE = 2**63 - 1
"""The highest sequence the store can hold (PostgreSQL's bigint)."""
_BOM = "\ufeff"


class _EnvelopeIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # The import layout: event_type and sequence may be absent. A key that is not a field
    # is refused, as in a payload ("causationId" would be dropped: no causation). The
    # envelope's position may be given (an export that kept it) but is not kept: it is
    # the order of commits in the store that writes the event (and not hashed).
    event_id: uuid.UUID
    aggregate_id: _Id
    aggregate_type: _Id
    timestamp: _AwareTime
    correlation_id: Annotated[str, msgspec.Meta(max_length=256)]
    payload: AnyEvent
    event_type: str | None = None
    sequence: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQUENCE)] | None = None
    causation_id: uuid.UUID | None = None
    metadata: dict[str, Any] = {}
    position: int | None = None


_envelope_decoder = msgspec.json.Decoder(_EnvelopeIn)


class _EnvelopeOut(msgspec.Struct):
    # The article's field order.
    event_id: uuid.UUID
    event_type: str
    aggregate_id: str
    aggregate_type: str
    sequence: int
    timestamp: datetime
    causation_id: uuid.UUID | None
    correlation_id: str
    metadata: Mapping[str, Any]
    payload: Any


# those of _EnvelopeIn, in the article's order
_ENVELOPE_FIELDS = (*_EnvelopeOut.__struct_fields__, "position")


def encode_envelope(envelope: Envelope) -> bytes:
    """One envelope as a JSON line (without the newline)."""
    payload = envelope.payload
    if isinstance(payload, RawEvent):
        return _encoder.encode(envelope.to_dict())
    whole = envelope.timestamp.microsecond == 0 or _whole_second(payload)
    metadata = envelope.metadata
    data = _encoder.encode(
        _EnvelopeOut(
            envelope.event_id,
            type(payload).__name__,
            envelope.aggregate_id,
            envelope.aggregate_type,
            envelope.sequence,
            envelope.timestamp.astimezone(UTC),
            envelope.causation_id,
            envelope.correlation_id,
            {} if whole and metadata else metadata,
            payload,
        )
    )
    if not whole:
        return data
    data = _six_digits(data)
    if metadata:
        # the user's metadata goes in as given, after the times are written with six
        # digits: a key of it named like a time field keeps its text. The first
        # '"metadata":{}' is the envelope's own: the fields before it are ids and
        # strings, in which a quote is escaped.
        data = data.replace(b'"metadata":{}', b'"metadata":' + _encoder.encode(metadata), 1)
    return data


def decode_envelope(line: bytes | str) -> tuple[Envelope, bool]:
    """Decode and validate one envelope line of the import format.

    Returns the envelope and whether its ``sequence`` was given (an absent sequence is
    returned as 0, to be assigned by the store). Raises :class:`InvalidEvent`, also for
    a key that is not a field of the envelope or of its payload. Times are kept to the
    microsecond as :func:`parse_time` keeps them: digits past the sixth are dropped.
    """
    try:
        raw = _envelope_decoder.decode(_exact_times(line, envelope=True))
    except RecursionError:
        raise InvalidEvent("?", "line", "nested too deeply") from None
    except UnicodeDecodeError as exc:  # msgspec's, for bytes in a string that are not UTF-8
        # msgspec counts from the start of that string: the offset in the line is Python's
        start = exc.start
        if isinstance(line, bytes):
            try:
                line.decode()
            except UnicodeDecodeError as in_line:
                start = in_line.start
        raise InvalidEvent("?", "line", f"not valid UTF-8 (at byte {start})") from None
    except (msgspec.ValidationError, msgspec.DecodeError, InvalidEvent) as exc:
        raise _envelope_error(line, exc) from None
    return check_envelope(raw), raw.sequence is not None


def _envelope_error(line: bytes | str, exc: Exception) -> InvalidEvent:
    try:
        obj = json.loads(line)
    except ValueError:
        return InvalidEvent("?", "line", f"not valid JSON ({exc})")
    except RecursionError:
        return InvalidEvent("?", "line", "nested too deeply")
    if not isinstance(obj, dict):
        return InvalidEvent("?", "line", f"must be a JSON object, got {type(obj).__name__}")
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        # what Python's json reads and msgspec does not: NaN, a byte order mark, ...
        if (line[:1] if isinstance(line, str) else line[:3]) in (_BOM, _BOM.encode()):
            return InvalidEvent("?", "line", "starts with a byte order mark (U+FEFF)")
        return InvalidEvent("?", "line", f"not valid JSON ({exc})")
    payload = obj.get("payload")
    kind = _peek_type(payload) if isinstance(payload, Mapping) else "?"
    if kind == "?" and isinstance(obj.get("event_type"), str):
        kind = obj["event_type"]
    cause = exc.__cause__ or exc.__context__
    err = _invalid(kind, exc, prefix="payload." if isinstance(cause, InvalidEvent) else "")
    if err.field == "payload.type" and not (isinstance(payload, Mapping) and "type" in payload):
        return InvalidEvent(kind, "payload.type", "is missing")
    if err.field == "payload.type" or (err.field == "payload" and kind not in EVENT_TYPES):
        return InvalidEvent(kind, "payload.type", f"unknown event type {kind!r}")
    if str(exc).startswith("Object contains unknown field `") and " - at " not in str(exc):
        # a key of the envelope itself
        return InvalidEvent(kind, err.field, _not_a_field("the envelope", _ENVELOPE_FIELDS))
    return err


def check_raw_envelope(raw: _EnvelopeIn) -> tuple[str, str]:
    """The checks of a decoded envelope line beyond its types: its event type and
    canonical metadata JSON, or :class:`InvalidEvent`."""
    kind = type(raw.payload).__name__
    if raw.event_type is not None and raw.event_type != kind:
        raise InvalidEvent(
            kind, "event_type", f"{raw.event_type!r} does not match the payload type {kind!r}"
        )
    _check_aggregate(raw.payload, raw.aggregate_id, raw.aggregate_type, prefix="payload.")
    check_text(raw.correlation_id, kind, "correlation_id")
    return kind, check_metadata(raw.metadata, kind)


def check_envelope(raw: _EnvelopeIn) -> Envelope:
    payload: Event = raw.payload
    kind, _ = check_raw_envelope(raw)
    try:
        timestamp = _in_utc(raw.timestamp)
    except ValueError as exc:
        raise InvalidEvent(kind, "timestamp", str(exc)) from None
    return Envelope(
        event_id=raw.event_id,
        aggregate_id=raw.aggregate_id,
        aggregate_type=raw.aggregate_type,
        sequence=raw.sequence or 0,
        timestamp=timestamp,
        payload=payload,
        correlation_id=raw.correlation_id,
        causation_id=raw.causation_id,
        metadata=raw.metadata,
    )


def check_metadata(metadata: Mapping[str, Any], event_type: str) -> str:
    """Envelope metadata must be a JSON object PostgreSQL can store exactly.

    That is: string keys; values of JSON types (str, int, float, bool, None, lists,
    dicts); finite numbers; no NUL character or lone surrogate. Returns its
    :func:`canonical_json` text, which is what the store writes.
    """
    if not isinstance(metadata, Mapping):
        raise InvalidEvent(
            event_type, "metadata", f"must be an object, got {type(metadata).__name__}"
        )
    if not metadata:
        return "{}"
    try:
        return canonical_json(metadata)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(event_type, "metadata", str(exc)) from None
    except RecursionError:
        raise InvalidEvent(event_type, "metadata", "nested too deeply") from None


def check_text(value: Any, event_type: str, field: str, *, max_length: int = 256) -> str:
    """An envelope's text field (aggregate id, correlation id): a string PostgreSQL can
    store, of at most ``max_length`` characters."""
    if not isinstance(value, str):
        raise InvalidEvent(event_type, field, f"must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidEvent(event_type, field, "contains a NUL character")
    if len(value) > max_length:
        raise InvalidEvent(event_type, field, f"is longer than {max_length} characters")
    if not value.isascii() and _SURROGATE.search(value):
        raise InvalidEvent(event_type, field, "is not valid Unicode (a lone surrogate)")
    return value


def _check_aggregate(
    event: Event, aggregate_id: str, aggregate_type: str | None, *, prefix: str = ""
) -> None:
    kind = type(event).__name__
    if aggregate_type is not None and aggregate_type != event.aggregate_type:
        raise InvalidEvent(
            kind,
            "aggregate_type",
            f"{kind} belongs to an {event.aggregate_type} aggregate, not {aggregate_type!r}",
        )
    if event.aggregate_id != aggregate_id:
        key = "symbol" if event.aggregate_type == INSTRUMENT else "account_id"
        raise InvalidEvent(
            kind,
            prefix + key,
            f"{event.aggregate_id!r} does not match the aggregate id {aggregate_id!r}",
        )


def check_for_aggregate(events: Iterable[Event], aggregate_id: str) -> list[Event]:
    """Validate a batch for one aggregate: every event valid and belonging to it."""
    out = []
    types = set()
    for event in events:
        event = validate(event)
        _check_aggregate(event, aggregate_id, None)
        types.add(event.aggregate_type)
        out.append(event)
    if len(types) > 1:
        raise InvalidEvent(
            type(out[-1]).__name__, "aggregate_type", "a batch mixes Account and Instrument events"
        )
    return out


def read_payload(event_type: str, payload: bytes | str | Mapping[str, Any]) -> Event | RawEvent:
    """Decode a stored payload; anything riskbook cannot interpret comes back raw.

    Keys that are not fields of the event (written by a newer riskbook) are passed over.
    """
    cls = EVENT_TYPES.get(event_type)
    data = msgspec.json.decode(payload) if isinstance(payload, bytes | str) else payload
    if not isinstance(data, Mapping):
        # written by raw SQL, say: kept, under "value", and said so
        what = (
            "null" if data is None else "boolean" if isinstance(data, bool)
            else "array" if isinstance(data, list) else "string" if isinstance(data, str)
            else "number"
        )  # fmt: skip
        return RawEvent(event_type, {"value": data}, f"the payload is a JSON {what}, not an object")
    if cls is None:
        return RawEvent(event_type, {k: v for k, v in data.items() if k != "type"})
    token = _reading_stored.set(True)
    try:
        data = _cut_time(data, cls.time_field)
        try:
            return msgspec.convert(data, cls, strict=False)
        except msgspec.ValidationError as exc:
            if not str(exc).startswith("Object contains unknown field"):
                raise
        # A field this riskbook does not know (a newer one wrote it): passed over, as a
        # reader must; only writing refuses it.
        known = cls.__struct_fields__
        return msgspec.convert(
            {k: v for k, v in data.items() if k in known or k == "type"}, cls, strict=False
        )
    except (msgspec.ValidationError, InvalidEvent) as exc:
        return RawEvent(event_type, {k: v for k, v in data.items() if k != "type"}, str(exc))
    finally:
        _reading_stored.reset(token)


# --------------------------------------------------------------------------- canonical encoding
#
# What the store's hash chain is computed over (DESIGN.md §3, tamper evidence). The
# definition is in canonical_fields' docstring; the store computes the same thing in
# SQL (migration 0009) and riskbook.verify recomputes it from what is stored.

_escape = json.encoder.encode_basestring  # escapes exactly what PostgreSQL's escape_json does


def _canonical_str(s: str) -> str:
    if "\x00" in s:
        raise ValueError("contains a NUL character")
    if not s.isascii() and _SURROGATE.search(s):
        raise ValueError("is not valid Unicode (a lone surrogate)")
    return _escape(s)


def _canonical_float(v: float) -> str:
    text = repr(v)
    if "e" in text or v == 0 or not math.isfinite(v):
        if not math.isfinite(v):
            raise ValueError(f"contains a number that is not finite ({v!r})")
        if v == 0:
            return "0.0"  # PostgreSQL's numeric has no negative zero
        return format(Decimal(text), "f")  # 1e+16 -> 10000000000000000, 1e-07 -> 0.0000001
    return text  # "123.25": already as numeric prints it


def _key_order(key: str) -> tuple[int, bytes]:
    data = key.encode("utf-8", "surrogatepass")
    return len(data), data


# Objects of the same shape come by the million: their keys' order and escaped text are
# kept (up to a bound, so that hostile input cannot grow them without end).
_KEY_ORDERS: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = {}
_CACHE_LIMIT = 4096


def _object_keys(value: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    keys = tuple(value)
    order = _KEY_ORDERS.get(keys)
    if order is None:
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"has a key that is not a string: {key!r}")
        order = tuple((k, _canonical_str(k)) for k in sorted(keys, key=_key_order))
        if len(_KEY_ORDERS) < _CACHE_LIMIT:
            _KEY_ORDERS[keys] = order
    return order


def canonical_json(value: Any) -> str:
    """``value`` as JSON text exactly as PostgreSQL prints it once stored as ``jsonb``.

    So that a hash computed here from a value equals one computed from the value stored:
    ``canonical_json(v) == (canonical_json(v))::jsonb::text`` (a test checks it against
    the server). The rules are those of ``jsonb``'s output:

    * separators ``", "`` between items and ``": "`` after a key, no other whitespace;
    * object keys ordered by their UTF-8 length, then bytewise;
    * strings: ``"`` and ``\\`` escaped with a backslash, ``\\b \\f \\n \\r \\t`` as
      such, other characters below U+0020 as ``\\u00xx`` (lowercase hex), every other
      character as itself;
    * numbers as PostgreSQL's ``numeric`` prints them: plain decimal, never an exponent,
      no negative zero (a float ``1e16`` is ``10000000000000000``, ``1e-7`` is
      ``0.0000001``, ``2.0`` stays ``2.0``);
    * ``true``, ``false``, ``null``.

    Accepts str, int, float, bool, None, lists and tuples, mappings with string keys,
    datetimes (as RFC 3339 text, see :func:`format_time`) and events. Raises ValueError
    for what no ``jsonb`` can hold (NUL, lone surrogates, NaN, infinities) and TypeError
    for other types.

    >>> canonical_json({"b": [1, 2.5, None], "aa": "x\\ny", "c": 1e16})
    '{"b": [1, 2.5, null], "c": 10000000000000000, "aa": "x\\\\ny"}'
    """
    cls = value.__class__
    if cls is str:
        return _canonical_str(value)
    if cls is float:
        return _canonical_float(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if cls is int:
        return str(value)
    if isinstance(value, Mapping):
        items = [f"{key}: {canonical_json(value[k])}" for k, key in _object_keys(value)]
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join([canonical_json(v) for v in value]) + "]"
    if isinstance(value, str):  # a StrEnum
        return _canonical_str(str.__str__(value))
    if isinstance(value, int):  # an IntEnum, say: not bool (above)
        return str(int(value))
    if isinstance(value, float):
        return _canonical_float(float(value))
    if isinstance(value, datetime):
        return f'"{format_time(value)}"'
    if isinstance(value, Event | RawEvent):
        return canonical_payload(value)
    raise TypeError(f"has a value that is not JSON: {value!r} ({cls.__name__})")


def _time_json(t: datetime) -> str:
    # msgspec formats in C; it leaves out a zero fraction, riskbook always writes six digits
    if t.tzinfo is not UTC:
        t = _in_utc(t)
    text = _encoder.encode(t).decode()
    return text if t.microsecond else text[:-2] + '.000000Z"'


def _escape_or_null(v: str | None) -> str:
    return "null" if v is None else _escape(v)


_PAYLOAD_ENCODERS: dict[type, Callable[[Any], str]] = {}


def _payload_encoder(cls: type[Event]) -> Callable[[Any], str]:
    """A function writing the canonical text of ``cls`` events: one f-string, its keys
    in jsonb order, each value through the converter of its field's type. Strings go
    through the plain escape: events are checked (no NUL, no lone surrogate) when made."""
    floats, strs, time_field = _FIELD_KINDS.get(cls) or _field_kinds(cls)
    optional = {f.name for f in msgspec.structs.fields(cls) if f.default is None}
    converters: dict[str, Callable[[Any], str]] = {}
    parts = []
    for name in sorted(["type", *cls.__struct_fields__], key=_key_order):
        if name == "type":
            parts.append(f'"type": "{cls.__name__}"')
            continue
        if name in floats:
            converters[f"c_{name}"] = _canonical_float
        elif name == time_field:
            converters[f"c_{name}"] = _time_json
        elif name in strs:
            converters[f"c_{name}"] = _escape_or_null if name in optional else _escape
        else:
            converters[f"c_{name}"] = canonical_json
        parts.append(f'"{name}": {{c_{name}(e.{name})}}')
    source = "lambda e: f'{{" + ", ".join(parts) + "}}'"
    encoder: Callable[[Any], str] = eval(source, converters)  # field names are identifiers
    _PAYLOAD_ENCODERS[cls] = encoder
    return encoder


def canonical_payload(payload: Event | RawEvent) -> str:
    """A payload's :func:`canonical_json` text (``{"type": ..., field: value, ...}``).

    This is also the text the store writes for it (``jsonb`` reads it back unchanged).

    >>> canonical_payload(PriceMarked(symbol="AAPL", price=10.5,
    ...                               marked_at=datetime(2024, 3, 1, tzinfo=UTC)))
    '{"type": "PriceMarked", "price": 10.5, "symbol": "AAPL", "marked_at": "2024-03-01T00:00:00.000000Z"}'
    """
    if isinstance(payload, RawEvent):
        return canonical_json({**payload.data, "type": payload.type})
    cls = payload.__class__
    return (_PAYLOAD_ENCODERS.get(cls) or _payload_encoder(cls))(payload)


def canonical_fields(
    event_id: str,
    event_type: str,
    aggregate_id: str,
    aggregate_type: str,
    sequence: int,
    timestamp: str,
    causation_id: str | None,
    correlation_id: str,
    metadata: str,
    payload: str,
) -> str:
    """The canonical text of a stored event, from its columns as text.

    The hash chain of an aggregate (migration 0009 stores it in ``events.hash``):

    * ``canonical(e)`` is the UTF-8 encoding of the :func:`canonical_json` text of the
      array ``[event_id, event_type, aggregate_id, aggregate_type, sequence, timestamp,
      causation_id, correlation_id, metadata, payload]``: ids as lowercase
      ``8-4-4-4-12`` text (``causation_id`` null if absent), ``sequence`` an integer,
      ``timestamp`` the recorded time in UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``,
      ``metadata`` and ``payload`` the stored JSON values. In SQL, over a row of
      ``events``, that is::

          convert_to(jsonb_build_array(event_id::text, event_type, aggregate_id,
              aggregate_type, sequence,
              to_char("timestamp" AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
              causation_id::text, correlation_id, metadata, payload)::text, 'UTF8')

    * ``digest(e) = SHA-256(canonical(e))``;
    * ``hash(e) = SHA-256(hash(p) || digest(e))`` where ``p`` is the event of the same
      aggregate with sequence ``e.sequence - 1``; for sequence 1, ``hash(p)`` is empty.

    The global ``position`` is not part of it: the chain is the aggregate's history.
    ``metadata`` and ``payload`` are given here as their :func:`canonical_json` text,
    the other strings as stored (checked already: no NUL, no lone surrogate).
    """
    causation = "null" if causation_id is None else f'"{causation_id}"'
    return (
        f'["{event_id}", {_escape(event_type)}, {_escape(aggregate_id)}, '
        f'{_escape(aggregate_type)}, {sequence}, "{timestamp}", {causation}, '
        f"{_escape(correlation_id)}, {metadata}, {payload}]"
    )


def canonical_event(envelope: Envelope) -> str:
    """The canonical text of a stored envelope (see :func:`canonical_fields`)."""
    return canonical_fields(
        str(envelope.event_id),
        envelope.event_type,
        envelope.aggregate_id,
        envelope.aggregate_type,
        envelope.sequence,
        format_time(envelope.timestamp),
        None if envelope.causation_id is None else str(envelope.causation_id),
        envelope.correlation_id,
        canonical_json(dict(envelope.metadata)),
        canonical_payload(envelope.payload),
    )


def event_digest(envelope: Envelope) -> bytes:
    """``SHA-256(canonical(e))`` of a stored envelope (see :func:`canonical_fields`).

    Exact for what riskbook writes. A payload written by other means can hold what a
    decoded envelope no longer shows (``1.50`` reads back as the float ``1.5``): the
    stored text is what counts, and :func:`riskbook.verify` hashes that.
    """
    return hashlib.sha256(canonical_event(envelope).encode()).digest()


def chain_hash(previous: bytes, digest: bytes) -> bytes:
    """The hash of an event: ``SHA-256(previous || digest)``; ``previous`` is the hash of
    the aggregate's event before it, ``b""`` for its first event."""
    return hashlib.sha256(previous + digest).digest()
