"""History into Polars: one typed frame per event kind (DESIGN.md §1 layer 3).

:func:`load` reads the typed copy of the log (``event_fields``, kept by the store's
insert trigger) as the server's binary COPY stream, decoded by compiled loops
(:mod:`riskbook._copy`; ADBC's PostgreSQL driver where those cannot run); no JSON is
parsed on either side. A :class:`History` holds

===============  ==========================================================
``trades``       TradeExecuted
``cancels``      TradeCancelled (busts)
``adjustments``  PositionUpdated
``marks``        PriceMarked
``funding``      AccountFunded
``limits``       LimitSet
``violations``   LimitViolationDetected
``blocks``       AccountBlocked (``blocked`` true) and AccountUnblocked (false)
``events``       the envelope of every event, unknown types included
===============  ==========================================================

Every frame has the envelope columns ``position``, ``event_id``, ``aggregate_id``,
``sequence``, ``timestamp`` (recorded time), ``causation_id``, ``correlation_id``,
then the payload's fields, business time last. Frames are in global order
(``position``); times are UTC with microseconds; ids are Categorical, ``side`` an Enum.

A History knows its *horizon*: every event with a position below it that matches its
filters is in it, and nothing else. :meth:`History.refresh` reads from the horizon to
the store's current visibility fence, so it costs what is new, never what is old.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from riskbook._columns import Unsupported
from riskbook._columns import failure as _read_failure
from riskbook.errors import RiskbookError, StoreError
from riskbook.events import (
    EVENT_TYPES,
    Envelope,
    Event,
    RawEvent,
    _reading_stored,
    as_time,
    format_time,
    parse_time,
    validate,
)
from riskbook.store import Store, connect, redact
from riskbook.store.eventstore import _connect, _fence, scrub

if TYPE_CHECKING:
    from riskbook.projections import ProjectionState

__all__ = [
    "ENVELOPE",
    "KINDS",
    "WIDE_COLUMNS",
    "Filters",
    "History",
    "Kind",
    "load",
    "psycopg_literal",
    "read_frames",
]

_TIME = pl.Datetime("us", "UTC")
_CAT = pl.Categorical()
SIDE = pl.Enum(["Buy", "Sell"])

ENVELOPE: dict[str, pl.DataType] = {
    "position": pl.Int64(),
    "event_id": pl.String(),
    "aggregate_id": _CAT,
    "sequence": pl.Int64(),
    "timestamp": _TIME,
    "causation_id": pl.String(),
    "correlation_id": pl.String(),
}
"""The envelope columns every frame starts with."""


@dataclass(frozen=True)
class Kind:
    """One frame of a History: which event types fill it and its payload columns.

    ``columns`` maps each payload column to its dtype and to the ``event_fields``
    expression it is read from (the business time is always ``occurred_at``).
    """

    name: str
    event_types: tuple[str, ...]
    columns: dict[str, tuple[pl.DataType, str]]

    @property
    def time(self) -> str:
        """The name of the business-time column."""
        return next(c for c, (_, src) in self.columns.items() if src == "occurred_at")

    @property
    def schema(self) -> dict[str, pl.DataType]:
        return {**ENVELOPE, **{c: t for c, (t, _) in self.columns.items()}}


def _kind(name: str, types: Sequence[str], *cols: tuple[str, pl.DataType, str]) -> Kind:
    return Kind(name, tuple(types), {c: (t, src) for c, t, src in cols})


_F = pl.Float64()
_S = pl.String()
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        _kind(
            "trades",
            ["TradeExecuted"],
            ("trade_id", _S, "trade_id"),
            ("account_id", _CAT, "account_id"),
            ("symbol", _CAT, "symbol"),
            ("side", SIDE, "side"),
            ("quantity", _F, "quantity"),
            ("price", _F, "price"),
            ("executed_at", _TIME, "occurred_at"),
        ),
        _kind(
            "cancels",
            ["TradeCancelled"],
            ("trade_id", _S, "trade_id"),
            ("account_id", _CAT, "account_id"),
            ("reason", _S, "reason"),
            ("cancelled_at", _TIME, "occurred_at"),
        ),
        _kind(
            "adjustments",
            ["PositionUpdated"],
            ("account_id", _CAT, "account_id"),
            ("symbol", _CAT, "symbol"),
            ("previous_quantity", _F, "previous_quantity"),
            ("new_quantity", _F, "new_quantity"),
            ("reason", _S, "reason"),
            ("updated_at", _TIME, "occurred_at"),
        ),
        _kind(
            "marks",
            ["PriceMarked"],
            ("symbol", _CAT, "symbol"),
            ("price", _F, "price"),
            ("marked_at", _TIME, "occurred_at"),
        ),
        _kind(
            "funding",
            ["AccountFunded"],
            ("account_id", _CAT, "account_id"),
            ("amount", _F, "amount"),
            ("funded_at", _TIME, "occurred_at"),
        ),
        _kind(
            "limits",
            ["LimitSet"],
            ("account_id", _CAT, "account_id"),
            ("limit_type", _CAT, "limit_type"),
            ("value", _F, "value"),
            ("set_by", _CAT, "actor"),
            ("symbol", _CAT, "symbol"),
            ("set_at", _TIME, "occurred_at"),
        ),
        _kind(
            "violations",
            ["LimitViolationDetected"],
            ("account_id", _CAT, "account_id"),
            ("limit_type", _CAT, "limit_type"),
            ("symbol", _CAT, "symbol"),
            ("current_value", _F, "current_value"),
            ("limit_value", _F, "limit_value"),
            ("detected_at", _TIME, "occurred_at"),
        ),
        _kind(
            "blocks",
            ["AccountBlocked", "AccountUnblocked"],
            ("account_id", _CAT, "account_id"),
            ("blocked", pl.Boolean(), "event_type = 'AccountBlocked'"),
            ("reason", _S, "reason"),
            ("by", _CAT, "actor"),
            ("at", _TIME, "occurred_at"),
        ),
    )
}
"""The frames of a History, in order."""

EVENTS_SCHEMA: dict[str, pl.DataType] = {
    **ENVELOPE,
    "event_type": _CAT,
    "aggregate_type": _CAT,
    "occurred_at": _TIME,
}
_KIND_OF_TYPE = {t: k for k in KINDS.values() for t in k.event_types}
_FORMAT = 1  # version of the on-disk layout (export and cache)


# --------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class Filters:
    """What a History was loaded with; applied in SQL.

    * ``accounts``: events of these accounts, and the limits set for every account
      (``"*"``), which apply to them too (marks belong to no account and are kept);
    * ``symbols``: events about these symbols, the busts of their trades (a bust
      recorded before its trade comes in with the trade, on refresh too), and the
      account-level events that apply to every symbol (funding, blocks, account-wide
      limits and violations);
    * ``since`` / ``until``: business time in ``[since, until]``, except busts: a bust
      acts as soon as it is known whatever its ``cancelled_at`` (DESIGN §4), so every
      bust is kept (one whose trade is outside the window changes nothing);
    * ``known_at``: recorded time ``<= known_at`` -- what the engine knew then.
    """

    accounts: tuple[str, ...] | None = None
    symbols: tuple[str, ...] | None = None
    since: datetime | None = None
    until: datetime | None = None
    known_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError(
                f"since ({format_time(self.since)}) is after until ({format_time(self.until)}):"
                " no business time is in that window"
            )

    @property
    def payload_filtered(self) -> bool:
        """Whether the filters look at the payload (all but ``known_at`` do)."""
        return not (self.accounts is None and self.symbols is None) or not (
            self.since is None and self.until is None
        )

    def key(self) -> str:
        """A stable hash of the filters (names a cache entry)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            out[k] = (
                format_time(v) if isinstance(v, datetime) else (list(v) if v is not None else None)
            )
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Filters:
        def t(v: str | None) -> datetime | None:
            return None if v is None else parse_time(v)

        def ids(v: list[str] | None) -> tuple[str, ...] | None:
            return None if v is None else tuple(v)

        return cls(
            ids(data.get("accounts")),
            ids(data.get("symbols")),
            t(data.get("since")),
            t(data.get("until")),
            t(data.get("known_at")),
        )

    def where(self, fence: int | None = None) -> tuple[str, list[Any]]:
        """The SQL condition on ``event_fields f`` and its parameters.

        ``fence``: the upper bound of the read. A bust matches a symbols filter through
        its trade, which may be recorded after it: only trades below the fence count, so
        that what a read up to the fence holds depends on the fence alone (a refresh
        brings the earlier busts of the trades it reads, see :meth:`late_busts`).
        """
        parts: list[str] = []
        params: list[Any] = []
        if self.accounts is not None:
            parts.append(
                "(f.account_id = ANY(%s) OR f.event_type = 'PriceMarked'"
                " OR (f.event_type = 'LimitSet' AND f.account_id = '*'))"
            )
            params.append(list(self.accounts))
        if self.symbols is not None:
            below = "" if fence is None else " AND t.position < %s"
            parts.append(
                "(f.symbol = ANY(%s) OR (f.symbol IS NULL AND f.event_type IN ('AccountFunded',"
                " 'AccountBlocked', 'AccountUnblocked', 'LimitSet', 'LimitViolationDetected'))"
                " OR (f.event_type = 'TradeCancelled' AND f.trade_id IN (SELECT t.trade_id FROM"
                " event_fields t WHERE t.event_type = 'TradeExecuted' AND t.symbol = ANY(%s)"
                f" AND t.account_id = f.account_id{below})))"
            )
            params += [list(self.symbols), list(self.symbols)]
            if fence is not None:
                params.append(fence)
        parts, params = self._times(parts, params)
        return (" AND ".join(parts) or "TRUE"), params

    def late_busts(self, after: int, fence: int) -> tuple[str, list[Any]] | None:
        """A query for the positions of the busts below ``after`` that match only now:
        a symbols filter takes a bust through its trade, and a trade recorded after its
        bust (from ``after`` to ``fence``) brings in a bust that a read up to ``after``
        left out. None without a symbols filter."""
        if self.symbols is None:
            return None
        parts = [
            "t.event_type = 'TradeExecuted'",
            "t.symbol = ANY(%s)",
            "t.position >= %s",
            "t.position < %s",
            "f.position < %s",
            "NOT EXISTS (SELECT 1 FROM event_fields u WHERE u.event_type = 'TradeExecuted'"
            " AND u.account_id = f.account_id AND u.trade_id = f.trade_id"
            " AND u.symbol = ANY(%s) AND u.position < %s)",
        ]
        params: list[Any] = [list(self.symbols), after, fence, after, list(self.symbols), after]
        if self.accounts is not None:
            parts.append("f.account_id = ANY(%s)")
            params.append(list(self.accounts))
        parts, params = self._times(parts, params)
        return (
            "SELECT DISTINCT f.position FROM event_fields t JOIN event_fields f"
            " ON f.event_type = 'TradeCancelled' AND f.account_id = t.account_id"
            " AND f.trade_id = t.trade_id WHERE " + " AND ".join(parts) + " ORDER BY 1",
            params,
        )

    def _times(self, parts: list[str], params: list[Any]) -> tuple[list[str], list[Any]]:
        """The business and recorded time conditions on ``f``, added to ``parts``."""
        parts, params = list(parts), list(params)
        # A bust acts as soon as it is known, whatever its cancelled_at (DESIGN §4): the
        # business-time window does not apply to it, or a trade inside the window whose
        # bust says a later time would count again.
        if self.since is not None:
            parts.append("(f.occurred_at >= %s OR f.event_type = 'TradeCancelled')")
            params.append(self.since)
        if self.until is not None:
            parts.append("(f.occurred_at <= %s OR f.event_type = 'TradeCancelled')")
            params.append(self.until)
        if self.known_at is not None:
            parts.append('f."timestamp" <= %s')
            params.append(self.known_at)
        return parts, params

    def matches(self, env: Envelope, trade_symbols: dict[tuple[str, str], str]) -> bool:
        """The same rule in Python, for histories built from envelopes."""
        p = env.payload
        if isinstance(p, RawEvent) and self.payload_filtered:
            # kept raw (an unknown type, or a known one that breaks the catalogue's
            # rules): none of its fields is trusted, so a filter on them leaves it out
            return False
        account = getattr(p, "account_id", None)
        symbol = getattr(p, "symbol", None)
        kind = env.event_type
        if (
            self.accounts is not None
            and kind != "PriceMarked"
            and account not in self.accounts
            and not (kind == "LimitSet" and account == "*")
        ):
            return False
        if self.symbols is not None:
            if kind == "TradeCancelled":
                s = trade_symbols.get((account, getattr(p, "trade_id", None)))  # type: ignore[arg-type]
                if s not in self.symbols:
                    return False
            elif symbol is None:
                if kind not in (
                    "AccountFunded",
                    "AccountBlocked",
                    "AccountUnblocked",
                    "LimitSet",
                    "LimitViolationDetected",
                ):
                    return False
            elif symbol not in self.symbols:
                return False
        t = env.business_time
        if kind != "TradeCancelled":  # a bust is outside the business-time window, as in SQL
            if self.since is not None and (t is None or t < self.since):
                return False
            if self.until is not None and (t is None or t > self.until):
                return False
        return not (self.known_at is not None and env.timestamp > self.known_at)


def _ids(v: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return (v,)
    out = tuple(v)
    if not all(isinstance(x, str) for x in out):
        raise TypeError("accounts and symbols must be strings")
    return out


_time = as_time


# --------------------------------------------------------------------------- rules
#
# A row of a known type whose payload breaks the catalogue's rules can be in a store:
# written by raw SQL before migration 0013 (its constraints are NOT VALID, old rows
# stay) or breaking a rule 0013 does not check (a trade without a symbol). riskbook.read
# keeps such an event raw (RawEvent); load does the same with it: it is left out of the
# typed frames and stays in ``events`` with no business time, as an unknown type does.
# The rules are those riskbook.events applies when it decodes a stored payload (its
# fields' types, then Event.__post_init__); finding that a load breaks none costs a
# few null counts, minima and maxima per frame.


@dataclass(frozen=True)
class _Rule:
    """A rule of a kind's column (``field``: the payload's name for it): ``broken`` is
    true (never null) on the rows that break it; ``suspect`` an aggregate, true if some
    row may (None: the rule is that the column has no nulls)."""

    column: str
    field: str
    problem: str
    broken: pl.Expr
    suspect: pl.Expr | None


_FIRST_TIME = datetime(1, 1, 1, tzinfo=UTC)  # a payload's time is a Python datetime
_LAST_TIME = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


@functools.cache
def _rules(name: str) -> tuple[_Rule, ...]:
    """The rules of kind ``name``'s columns, from its event class's field types."""
    import msgspec.inspect

    kind = KINDS[name]
    info = msgspec.inspect.type_info(EVENT_TYPES[kind.event_types[0]])
    fields = {f.name: f for f in info.fields}  # type: ignore[attr-defined]
    actor = next((f for f in fields if f in ("set_by", "blocked_by", "unblocked_by")), None)
    time_field = EVENT_TYPES[kind.event_types[0]].time_field
    out: list[_Rule] = []
    for col, (dtype, src) in kind.columns.items():
        if col == "blocked":
            continue
        field_name = {"occurred_at": time_field, "actor": actor}.get(src) or src
        f = fields[field_name]
        c = pl.col(col)
        if len(kind.event_types) > 1 and field_name.startswith("blocked_"):
            field_name = "(un)" + field_name  # AccountBlocked and AccountUnblocked alike
        if isinstance(dtype, pl.Enum):
            values = ", ".join(dtype.categories)
            out.append(
                _Rule(col, field_name, f"is missing or not one of {values}", c.is_null(), None)
            )
            continue
        if f.required:
            out.append(_Rule(col, field_name, "is missing", c.is_null(), None))
        t = f.type
        if isinstance(t, msgspec.inspect.UnionType):  # optional: X | None
            t = next(a for a in t.types if not isinstance(a, msgspec.inspect.NoneType))
        if isinstance(t, msgspec.inspect.FloatType):
            out.append(
                _Rule(
                    col,
                    field_name,
                    "must be a finite number",
                    ~c.is_finite().fill_null(True),
                    (c.nan_max() < float("inf")).not_() | (c.min() > float("-inf")).not_(),
                )
            )
            if t.gt is not None:
                above = t.gt
                out.append(
                    _Rule(col, field_name, f"must be > {above}", (c <= above).fill_null(False),
                          c.min() <= above)
                )  # fmt: skip
            if t.ge is not None:
                least = t.ge
                out.append(
                    _Rule(col, field_name, f"must be >= {least}", (c < least).fill_null(False),
                          c.min() < least)
                )  # fmt: skip
            if kind.name == "funding" and col == "amount":  # AccountFunded.__post_init__
                out.append(
                    _Rule(
                        col, field_name, "must not be 0", (c == 0).fill_null(False), (c == 0).any()
                    )
                )
        elif isinstance(t, msgspec.inspect.StrType) and (t.min_length or t.max_length):
            if isinstance(dtype, pl.Categorical):
                chars = bytes_ = c.cat.len_chars()
            else:  # more bytes than characters: the bytes' lengths (offsets) say enough
                chars, bytes_ = c.str.len_chars(), c.str.len_bytes()
            if t.min_length:
                if t.min_length != 1:
                    raise AssertionError(f"{field_name}: a minimum length other than 1")
                out.append(
                    _Rule(
                        col,
                        field_name,
                        "must not be empty",
                        (bytes_ == 0).fill_null(False),
                        bytes_.min() == 0,
                    )
                )
            if t.max_length:
                out.append(
                    _Rule(
                        col,
                        field_name,
                        f"is longer than {t.max_length} characters",
                        (chars > t.max_length).fill_null(False),
                        bytes_.max() > t.max_length,
                    )
                )
        elif isinstance(t, msgspec.inspect.DateTimeType):
            out.append(
                _Rule(
                    col,
                    field_name,
                    "is outside the years 1 to 9999 (UTC)",
                    ((c < _FIRST_TIME) | (c > _LAST_TIME)).fill_null(False),
                    (c.min() < _FIRST_TIME) | (c.max() > _LAST_TIME),
                )
            )
    return tuple(out)


@dataclass(frozen=True)
class _Malformed:
    """Events of known types a read left out of the typed frames: how many, the first."""

    count: int
    position: int
    event_type: str
    problem: str

    def __add__(self, other: _Malformed | None) -> _Malformed:
        if other is None:
            return self
        first = self if self.position <= other.position else other
        return _Malformed(self.count + other.count, first.position, first.event_type, first.problem)

    def message(self) -> str:
        if self.count == 1:
            some, verb, which, them = "1 event of a known type", "breaks", "it is", "it"
        else:
            some, verb = f"{self.count:,} events of known types", "break"
            which, them = "the first", "them"
        left = "is" if self.count == 1 else "are"
        return (
            f"{some} {verb} the catalogue's rules and {left} left out of the typed frames"
            f" (kept in `events`, without a business time, as an unknown type is):"
            f" {which} at position {self.position} ({self.event_type}), whose"
            f" {self.problem}. riskbook.read returns {them} raw (RawEvent)."
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> _Malformed | None:
        try:
            return cls(
                int(data["count"]),
                int(data["position"]),
                str(data["event_type"]),
                str(data["problem"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


def _combined(a: _Malformed | None, b: _Malformed | None) -> _Malformed | None:
    return b if a is None else a + b


def _warn(malformed: _Malformed | None, *, stacklevel: int = 3) -> None:
    if malformed is not None:
        warnings.warn(malformed.message(), stacklevel=stacklevel)


def _set_aside(frame: pl.DataFrame, kind: Kind) -> tuple[pl.DataFrame, _Malformed | None]:
    """The kind's frame with the business time of each row that breaks a rule made null,
    and a report of them (None: none). :func:`_typed` then leaves those rows out, and
    the ``events`` frame, made from the envelopes, keeps them without a business time."""
    if frame.height == 0:
        return frame, None
    rules = _rules(kind.name)
    suspects = [r for r in rules if r.suspect is not None]
    maybe = (
        frame.select([r.suspect.alias(f"r{i}") for i, r in enumerate(suspects)]).row(0)  # type: ignore[union-attr]
        if suspects
        else ()
    )
    fired = [r for r in rules if r.suspect is None and frame[r.column].null_count()]
    fired += [r for r, m in zip(suspects, maybe, strict=True) if m]
    if not fired:
        return frame, None
    mask = frame.select(pl.any_horizontal([r.broken for r in fired]).alias("m"))["m"]
    bad = frame.filter(mask)
    if bad.height == 0:
        return frame, None
    first = bad.sort("position").head(1)
    wrong = first.select([r.broken.alias(f"r{i}") for i, r in enumerate(fired)]).row(0)
    problem = "; ".join(
        dict.fromkeys(f"{r.field} {r.problem}" for r, w in zip(fired, wrong, strict=True) if w)
    )
    if kind.name == "blocks":
        event_type = "AccountBlocked" if first["blocked"][0] else "AccountUnblocked"
    else:
        event_type = kind.event_types[0]
    report = _Malformed(bad.height, int(first["position"][0]), event_type, problem)
    time = kind.time
    kept = frame.with_columns(pl.when(pl.lit(mask)).then(None).otherwise(pl.col(time)).alias(time))
    return kept, report


# --------------------------------------------------------------------------- History


def _checked(env: Envelope) -> Envelope:
    """``env`` with its payload checked as :meth:`Store.append` checks it (a payload
    kept raw is left as it is: it is one already); replaced only where checking changed
    it (a time given as text). A limit type not registered here passes, as it does in
    a read: a History, like ``load``, holds the limits of types a plugin it lacks made."""
    p = env.payload
    if isinstance(p, RawEvent):
        return env
    token = _reading_stored.set(True)
    try:
        checked = validate(p)
    finally:
        _reading_stored.reset(token)
    return env if checked == p else replace(env, payload=checked)


_EMPTY: dict[str, pl.DataFrame] = {}


_HEAD = tuple(ENVELOPE)
_NO_FILTERS = Filters()


def _frame_of_columns(
    columns: dict[str, list[Any]], schema: dict[str, pl.DataType]
) -> pl.DataFrame:
    """A frame of Python values, a list per column (in ``schema``'s order). Times go in
    as microseconds since the epoch: polars takes aware datetimes at ~6 us each."""
    return pl.DataFrame(
        [
            pl.Series(c, _micros(columns[c]), pl.Int64).cast(t)
            if t == _TIME
            else pl.Series(c, columns[c], dtype=t)
            for c, t in schema.items()
        ]
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def _micros(times: list[datetime | None]) -> list[int | None]:
    try:
        return [None if t is None else (t - _EPOCH) // _MICRO for t in times]
    except TypeError:  # a naive time (an envelope built by hand): UTC, as polars takes it
        return [
            None if t is None else ((t if t.tzinfo else t.replace(tzinfo=UTC)) - _EPOCH) // _MICRO
            for t in times
        ]


def _empty(name: str) -> pl.DataFrame:
    """An empty frame of kind ``name`` (or ``"events"``), made once: frames are never
    changed in place, so every History can share it."""
    if name not in _EMPTY:
        _EMPTY[name] = pl.DataFrame(
            schema=EVENTS_SCHEMA if name == "events" else KINDS[name].schema
        )
    return _EMPTY[name]


@dataclass
class History:
    """Typed frames of a store's history (see the module docstring).

    Build one with :func:`load`, :meth:`from_envelopes` or :meth:`from_parquet`.
    """

    trades: pl.DataFrame
    cancels: pl.DataFrame
    adjustments: pl.DataFrame
    marks: pl.DataFrame
    funding: pl.DataFrame
    limits: pl.DataFrame
    violations: pl.DataFrame
    blocks: pl.DataFrame
    events: pl.DataFrame
    horizon: int = 0
    """Every matching event with a position below this is here; none at or above it."""
    filters: Filters = field(default_factory=Filters)
    store_id: str | None = None
    """Identity of the store it came from (None if built in memory)."""
    _database: str | None = field(default=None, repr=False, compare=False)
    """The database it came from (see :func:`_identity`): a copy of a database keeps
    its store_id, but holds a history of its own from the copy on."""
    start: ProjectionState | None = field(default=None, repr=False, compare=False)
    """The projection state these events go on from (None: from nothing). The live
    processor folds each batch from the state the previous one left; see
    :class:`riskbook.projections.ProjectionState`."""
    _store: Store | None = field(default=None, repr=False, compare=False)
    _cache_dir: Path | None = field(default=None, repr=False, compare=False)
    _synced: int | None = field(default=None, repr=False, compare=False)
    """The cache's horizon when this History last matched it (None: not known to):
    while only empty deltas were read since, the next delta continues that cache."""
    _malformed: _Malformed | None = field(default=None, repr=False, compare=False)
    """The events of known types its reads left out of the typed frames (they break the
    catalogue's rules), if any."""

    # ---------------------------------------------------------------- access

    def frame(self, name: str) -> pl.DataFrame:
        """A frame by name (``"trades"``, ..., ``"events"``)."""
        if name != "events" and name not in KINDS:
            raise KeyError(f"no frame {name!r}; frames: {', '.join([*KINDS, 'events'])}")
        return getattr(self, name)

    def frames(self) -> dict[str, pl.DataFrame]:
        return {name: self.frame(name) for name in [*KINDS, "events"]}

    def __len__(self) -> int:
        return self.events.height

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}={f.height:,}" for n, f in self.frames().items())
        return f"History({counts}, horizon={self.horizon})"

    def _repr_markdown_(self) -> str:
        rows = "\n".join(f"| {n} | {f.height:,} |" for n, f in self.frames().items())
        return f"**History** (horizon {self.horizon})\n\n| frame | rows |\n|---|---:|\n{rows}"

    # ---------------------------------------------------------------- building

    @classmethod
    def empty(cls, filters: Filters | None = None) -> History:
        return cls(
            **{n: pl.DataFrame(schema=k.schema) for n, k in KINDS.items()},  # type: ignore[arg-type]
            events=pl.DataFrame(schema=EVENTS_SCHEMA),
            filters=filters or Filters(),
        )

    @classmethod
    def from_envelopes(
        cls, envelopes: Iterable[Envelope], *, filters: Filters | None = None
    ) -> History:
        """A History from envelopes in memory (tests, notebooks, simulations).

        Envelopes without a position are numbered 1, 2, 3, ... in the given order.
        The result equals what :func:`load` gives for the same events. Each payload of a
        known type is checked as :meth:`Store.append <riskbook.Store.append>` checks it
        (:func:`riskbook.events.validate`): a time given as RFC 3339 text is taken, a
        field of the wrong type is an :class:`~riskbook.InvalidEvent` naming it.
        """
        return cls._of_envelopes([_checked(e) for e in envelopes], filters or Filters())

    @classmethod
    def _of_envelopes(cls, envs: list[Envelope], filters: Filters) -> History:
        """:meth:`from_envelopes` of envelopes whose payloads are checked already (read
        from a store, or through :func:`_checked`): the check costs about 1.8 us an
        event, 20% of the rest of the work here.

        Built column by column (a list per column, one Series each): the live processor
        builds one of these per micro-batch, and rows as dicts cost it 30 us an event.
        """
        everything = filters == _NO_FILTERS
        trade_symbols: dict[tuple[Any, Any], Any] = {}  # (account, trade id) -> symbol
        if not everything:
            trade_symbols = {
                (e.payload.account_id, e.payload.trade_id): e.payload.symbol  # type: ignore[attr-defined]
                for e in envs
                if e.event_type == "TradeExecuted" and not isinstance(e.payload, RawEvent)
            }
            for e in envs:
                # a trade kept raw still brings in its bust under a symbols filter, as in
                # SQL (which reads its fields from event_fields)
                if e.event_type == "TradeExecuted" and isinstance(e.payload, RawEvent):
                    data = e.payload.data
                    key, symbol = (data.get("account_id"), data.get("trade_id")), data.get("symbol")
                    if all(isinstance(v, str) for v in (*key, symbol)):
                        trade_symbols.setdefault(key, symbol)
        columns: dict[str, dict[str, list[Any]]] = {
            n: {c: [] for c in k.schema} for n, k in KINDS.items()
        }
        columns["events"] = {c: [] for c in EVENTS_SCHEMA}
        top = 0
        for n, env in enumerate(envs, 1):
            pos = env.position if env.position is not None else n
            top = max(top, pos)
            if not everything and not filters.matches(env, trade_symbols):
                continue
            event_type = env.event_type
            head = (
                pos,
                str(env.event_id),
                env.aggregate_id,
                env.sequence,
                env.timestamp,
                None if env.causation_id is None else str(env.causation_id),
                env.correlation_id,
            )
            out = columns["events"]
            for c, v in zip(_HEAD, head, strict=True):
                out[c].append(v)
            out["event_type"].append(event_type)
            out["aggregate_type"].append(env.aggregate_type)
            out["occurred_at"].append(env.business_time)
            kind = _KIND_OF_TYPE.get(event_type)
            p = env.payload
            if kind is None or isinstance(p, RawEvent):
                continue
            out = columns[kind.name]
            for c, v in zip(_HEAD, head, strict=True):
                out[c].append(v)
            for col, (_, src) in kind.columns.items():
                if src == "occurred_at":
                    v = p.business_time
                elif src == "actor":
                    v = (
                        getattr(p, "set_by", None)
                        or getattr(p, "blocked_by", None)
                        or getattr(p, "unblocked_by", None)
                    )
                elif col == "blocked":
                    v = event_type == "AccountBlocked"
                else:
                    v = getattr(p, src, None)
                    if hasattr(v, "value") and not isinstance(v, float):
                        v = v.value  # type: ignore[union-attr]
                out[col].append(v)
        frames = {
            n: _frame_of_columns(columns[n], k.schema) if columns[n]["position"] else _empty(n)
            for n, k in KINDS.items()
        }
        events = (
            _frame_of_columns(columns["events"], EVENTS_SCHEMA)
            if columns["events"]["position"]
            else _empty("events")
        )
        return cls(**frames, events=events, horizon=top + 1, filters=filters)  # type: ignore[arg-type]

    @classmethod
    def from_events(cls, *events: Event) -> History:
        """A History of these events, each recorded when it happened, in the given order.

        For examples and quick experiments: sequences are numbered per aggregate, ids
        are new, the recorded time is the business time. Each event is checked as
        :meth:`Store.append <riskbook.Store.append>` checks it (see :meth:`from_envelopes`).
        """
        versions: dict[str, int] = {}
        envelopes = []
        for e in events:
            e = validate(e)  # a time given as text, a field of the wrong type: as append does
            versions[e.aggregate_id] = versions.get(e.aggregate_id, 0) + 1
            envelopes.append(
                Envelope(
                    event_id=uuid.uuid4(),
                    aggregate_id=e.aggregate_id,
                    aggregate_type=e.aggregate_type,
                    sequence=versions[e.aggregate_id],
                    timestamp=e.business_time,
                    payload=e,
                    correlation_id="in-memory",
                )
            )
        return cls._of_envelopes(envelopes, Filters())

    # ---------------------------------------------------------------- refresh

    def refresh(self, *, progress: bool | None = None) -> int:
        """Read the events committed since the horizon; extend the frames in place.

        Returns how many events were added. Gap-safe: reads up to the store's
        visibility fence, so nothing committed later can land below the new horizon.
        """
        delta = self._refresh(progress)
        _warn(delta._malformed)
        return delta.events.height

    def _refresh(self, progress: bool | None) -> History:
        """:meth:`refresh`, without its warning; the delta read."""
        if self._store is None:
            raise RiskbookError(
                "this History is not attached to a store (built in memory or from files)"
            )
        after = self.horizon
        # the store must still be the one these frames came from, its history only
        # grown since: checked with the fence (see _read), or a refresh would chain
        # another history (a restored older backup, a re-created database) onto them
        expect = _Expect.of(self.events, self.store_id, self._database)
        delta = _read(self._store, self.filters, after=after, progress=progress, expect=expect)
        self._extend(delta)
        if self._cache_dir is not None and delta.events.height:
            delta.store_id, delta._database = self.store_id, self._database
            _cache_segment(self, delta, after, self._cache_dir)
        return delta

    def _extend(self, delta: History) -> None:
        for name in [*KINDS, "events"]:
            new = delta.frame(name)
            if new.height:
                old = self.frame(name)
                if old.height and new["position"][0] < old["position"][-1]:
                    # busts recorded before their trades, brought in by the trades
                    # (see Filters.late_busts): put in their places
                    setattr(self, name, _merged([old, new]))
                else:
                    setattr(self, name, pl.concat([old, new], rechunk=False))
        self.horizon = max(self.horizon, delta.horizon)
        self._malformed = _combined(self._malformed, delta._malformed)

    # ---------------------------------------------------------------- files

    def to_parquet(self, directory: str | os.PathLike[str]) -> Path:
        """Write a self-contained copy: one Parquet file per frame plus ``history.json``.

        A write that fails leaves no temporary file behind, nor the folders it made
        (with what it wrote there).
        """
        out = Path(directory)
        made = [p for p in (out, *out.parents) if not p.exists()]  # the top one last
        out.mkdir(parents=True, exist_ok=True)
        tmp_suffix = f".tmp-{uuid.uuid4().hex[:8]}"
        tmp = out / f"history.json{tmp_suffix}"
        try:
            for name, frame in self.frames().items():
                tmp = out / f"{name}.parquet{tmp_suffix}"
                with open(tmp, "wb") as file:  # polars takes no path that is not UTF-8
                    frame.write_parquet(file, compression="zstd", statistics=True)
                tmp.replace(out / f"{name}.parquet")
            tmp = out / f"history.json{tmp_suffix}"
            tmp.write_text(json.dumps(_meta(self), indent=2))
            tmp.replace(out / "history.json")
        except BaseException:
            if made:  # a folder of its own: nothing of a copy that is not whole stays
                shutil.rmtree(made[-1], ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise
        return out

    @classmethod
    def from_parquet(cls, directory: str | os.PathLike[str]) -> History:
        """Read a copy written by :meth:`to_parquet`; checks it is whole."""

        def read(path: Path) -> pl.DataFrame:
            try:
                return pl.read_parquet(path)
            except (OSError, pl.exceptions.PolarsError) as exc:
                raise RiskbookError(f"{path.parent}: cannot read {path.name}: {exc}") from None

        return _read_folder(Path(directory), ".parquet", read)


def _meta(history: History) -> dict[str, Any]:
    """``history.json``: what a folder of frames holds (export and cache alike)."""
    return {
        "format": _FORMAT,
        "horizon": history.horizon,
        "filters": history.filters.to_json(),
        "store_id": history.store_id,
        "database": history._database,
        "rows": {n: f.height for n, f in history.frames().items()},
        "written_at": format_time(datetime.now(UTC)),
        **({} if history._malformed is None else {"malformed": history._malformed.to_json()}),
    }


# --------------------------------------------------------------------------- loading


def load(
    store_or_dsn: Store | str | None = None,
    *,
    accounts: str | Iterable[str] | None = None,
    symbols: str | Iterable[str] | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    known_at: datetime | str | None = None,
    cache: bool = True,
    progress: bool | None = None,
) -> History:
    """Load history from the store into typed Polars frames.

    Parameters
    ----------
    store_or_dsn : a :class:`~riskbook.Store`, a DSN, or None (``RISKBOOK_DSN``, else the
        embedded server).
    accounts, symbols, since, until, known_at : filters, applied in SQL (see
        :class:`Filters`). Times are datetimes with a zone or RFC 3339 strings.
    cache : keep a copy under ``$RISKBOOK_HOME/cache`` (``RISKBOOK_CACHE`` to move it;
        uncompressed Arrow IPC, about 280 bytes per event) and, next time, map it from
        disk and read only what is new from PostgreSQL.
    progress : show a progress bar (default: only when interactive).
    """
    store = store_or_dsn if isinstance(store_or_dsn, Store) else connect(store_or_dsn)
    filters = Filters(
        _ids(accounts),
        _ids(symbols),
        _time(since, "since"),
        _time(until, "until"),
        _time(known_at, "known_at"),
    )
    store_id, database = _identity(store)
    cache_dir = _cache_root() / store_id / filters.key() if cache else None
    hit = (
        _read_cache(cache_dir, store, (store_id, database), filters)
        if cache_dir is not None
        else None
    )
    if hit is None:
        history = _read(store, filters, after=0, progress=progress)
        history.store_id, history._database = store_id, database
        history._store = store
        history._cache_dir = cache_dir
        if cache_dir is not None:
            _write_cache(history, cache_dir)
    else:
        history, anything_new = hit
        history._store = store
        history._cache_dir = cache_dir
        if anything_new:  # else the check just made is the empty delta's read
            history._refresh(progress)
    if cache_dir is not None:  # for `riskbook cache` (the entry written by now, if it can
        from riskbook.cache import note_store, touch  # be): which store, when last used

        note_store(cache_dir.parent, store.dsn)
        touch(cache_dir)
    _warn(history._malformed)  # once per load, cached or read: what it left out
    return history


# The database a store lives in: its server's system identifier and its own oid. A
# copy of a database (CREATE DATABASE ... TEMPLATE, pg_dump and restore) keeps the
# store_id of riskbook_store, and from the copy on, a history of its own: a load's
# cache, and a History's refresh, must not take one for the other.
_DATABASE_SQL = (
    "(SELECT system_identifier::text FROM pg_control_system()) || '/'"
    " || (SELECT oid::text FROM pg_database WHERE datname = current_database())"
)


def _identity(store: Store) -> tuple[str, str]:
    """The store's identity (``riskbook_store.store_id``) and its database's."""
    with store.connection() as conn:
        row = conn.execute(f"SELECT store_id::text, {_DATABASE_SQL} FROM riskbook_store").fetchone()
    if row is None:
        raise StoreError(
            "the store has no identity row (riskbook_store, deleted): run `riskbook db upgrade`"
            " as the store's owner to make a new one"
        )
    return str(row[0]), str(row[1])


WIDE_COLUMNS = (
    'f.position, f.event_id::text, f.aggregate_id, f.sequence, f."timestamp",'
    " f.causation_id::text, f.correlation_id, f.event_type, f.aggregate_type, f.occurred_at,"
    " f.account_id, f.symbol, f.trade_id, f.side, f.quantity, f.price, f.amount,"
    " f.previous_quantity, f.new_quantity, f.limit_type, f.value, f.current_value,"
    " f.limit_value, f.actor, f.reason"
)
"""The select list (over ``event_fields f``) that :func:`read_frames` splits into frames."""


_WIDE_NAMES = [
    "position",
    "event_id",
    "aggregate_id",
    "sequence",
    "timestamp",
    "causation_id",
    "correlation_id",
    "event_type",
    "aggregate_type",
    "occurred_at",
    "account_id",
    "symbol",
    "trade_id",
    "side",
    "quantity",
    "price",
    "amount",
    "previous_quantity",
    "new_quantity",
    "limit_type",
    "value",
    "current_value",
    "limit_value",
    "actor",
    "reason",
]


@dataclass(frozen=True)
class _Expect:
    """What a refresh expects of the store (see :func:`_read`): its identity, and the
    event at the last position the History holds (None: it holds none)."""

    store_id: str | None
    database: str | None
    last: int | None
    last_id: str | None

    @classmethod
    def of(cls, events: pl.DataFrame, store_id: str | None, database: str | None) -> _Expect:
        """What a History of these events, read from that store, expects of it."""
        if not events.height:
            return cls(store_id, database, None, None)
        return cls(store_id, database, events["position"][-1], events["event_id"][-1])

    def holds(self, row: tuple[Any, ...] | None) -> bool:
        """Is the store the one expected, by its :data:`_CACHE_CHECK_SQL` row?"""
        return (
            row is not None
            and (self.store_id is None or row[1] == self.store_id)
            and (self.database is None or row[4] == self.database)
            and (self.last is None or row[0] == self.last_id)
        )


def _rewritten(store: Store) -> RiskbookError:
    return RiskbookError(
        f"the store at {redact(store.dsn)} is no longer the one this History was loaded from:"
        " its history was rewritten or replaced (a restored backup, a re-created database);"
        " nothing was added. Load it again (riskbook.load) to read the store as it is now."
    )


def _read(
    store: Store,
    filters: Filters,
    *,
    after: int,
    progress: bool | None,
    before: int | None = None,
    expect: _Expect | None = None,
) -> History:
    """Events with ``after <= position < fence`` matching ``filters``, as frames.

    ``before`` lowers the upper bound (the fence) to that position. ``expect``: checked
    in the fence's round trip (one indexed lookup more), the store's identity and the
    event at the last position already read; a :class:`RiskbookError` if the store's
    history is not the one read before.

    Each kind is read with its own narrow query (only its columns), and the ``events``
    frame is assembled from the kinds' envelopes, plus the envelopes of any event type
    riskbook does not know. A large read is cut into position ranges read by a few
    connections at once (see :func:`_plan`).
    """
    with store.connection() as conn:
        if expect is None:
            fence = _fence(conn)  # for the reads of the next statements
            anything = True
        else:
            row = conn.execute(_CACHE_CHECK_SQL, {"last": expect.last, "horizon": after}).fetchone()
            if not expect.holds(row):
                raise _rewritten(store)
            assert row is not None
            fence, anything = row[2], bool(row[3])
        if before is not None:
            fence = min(fence, before)
        where, params = filters.where(fence)
        if fence <= after:
            out = History.empty(filters)
            out.horizon = after
            return out
        # how many events the range holds, counted up to _SMALL_ROWS + 1 (a few ms at most)
        count = (
            conn.execute(_COUNT_SQL, (after, fence, _SMALL_ROWS + 1)).fetchone()
            if anything
            else None
        )
        rows = count[0] if count else 0
        if not rows:  # nothing new: no need to ask kind by kind
            out = History.empty(filters)
            out.horizon = fence
            return out
        present = {r[0] for r in conn.execute(_TYPES_PRESENT_SQL, (after, fence))}
        # busts below ``after`` that the trades read now bring in (a symbols filter)
        late_sql = filters.late_busts(after, fence) if after > 0 else None
        late: list[int] = []
        if late_sql is not None and "TradeExecuted" in present:
            late = [r[0] for r in conn.execute(*late_sql)]
        if late:
            late_task = (
                "cancels",
                0,
                psycopg_literal(
                    conn, _kind_query(KINDS["cancels"]) + "f.position = ANY(%s)", [late]
                ),
            )
        small = rows <= _SMALL_ROWS
        cuts, big = ([after, fence], set()) if small else _plan(conn, after, fence)
        # (frame, part, query): the small kinds whole first, then the large ones range
        # by range, so that each range's events can be put in order while the load goes on
        tasks: list[tuple[str, int, str]] = []
        by_range: list[tuple[str, int, str]] = []
        for name, kind in KINDS.items():
            if not present & set(kind.event_types):
                continue
            ranges = list(pairwise(cuts)) if name in big else [(after, fence)]
            for part, (lo, hi) in enumerate(ranges):
                query = _kind_query(kind) + "f.position >= %s AND f.position < %s AND " + where
                task = (name, part, psycopg_literal(conn, query, [lo, hi, *params]))
                (by_range if name in big else tasks).append(task)
        unknown = sorted(present - set(_KIND_OF_TYPE))
        if unknown:
            query = (
                f"SELECT {_ENVELOPE_SQL}, f.event_type, f.aggregate_type, f.occurred_at"
                " FROM event_fields f WHERE f.event_type = ANY(%s)"
                " AND f.position >= %s AND f.position < %s AND " + where
            )
            tasks.append(
                ("events", 0, psycopg_literal(conn, query, [unknown, after, fence, *params]))
            )
        tasks += sorted(by_range, key=lambda t: t[1])
    events = _Events(cuts, {t[0] for t in tasks}, big) if big else None
    bar = _Progress(progress)
    route = _route("large" if big else "small" if small else "medium")
    reports: list[_Malformed] = []
    parts = _run(
        store,
        tasks,
        bar,
        route=route,
        workers=_WORKERS if big else 1,
        events=events,
        malformed=reports,
    )
    bar.close()
    frames: dict[str, pl.DataFrame] = {}
    for name in KINDS:
        # the parts of a kind are consecutive position ranges, each in order
        got = [f for _, f in sorted(parts.get(name, []), key=lambda pf: pf[0])]
        frames[name] = pl.concat(got, rechunk=False) if got else _empty(name)
    if events is not None:  # put together while the load went on
        frames["events"] = events.frame()
    else:
        envelopes = [_envelope_of(frames[name], kind) for name, kind in KINDS.items()]
        frames["events"] = _merged(envelopes + [f for _, f in parts.get("events", [])])
    if late:  # all below ``after``: they go first
        busts = _run(
            store,
            [late_task],
            _Progress(False),
            route=_route("small"),
            workers=1,
            malformed=reports,
        )
        frame = busts["cancels"][0][1]
        frames["cancels"] = pl.concat([frame, frames["cancels"]], rechunk=False)
        envelope = _envelope_of(frame, KINDS["cancels"])
        frames["events"] = pl.concat([envelope, frames["events"]], rechunk=False)
    malformed = functools.reduce(_combined, reports, None)
    if malformed is not None:
        frames = _without_malformed(frames, filters)
    return History(**frames, horizon=fence, filters=filters, _malformed=malformed)  # type: ignore[arg-type]


def _without_malformed(
    frames: dict[str, pl.DataFrame], filters: Filters
) -> dict[str, pl.DataFrame]:
    """The frames of a read without the rows :func:`_set_aside` marked: out of the typed
    frames; in ``events`` they stay (no business time, as an unknown type) unless a
    filter looks at the payload, which, as for an unknown type, leaves them out (see
    :meth:`Filters.matches`)."""
    out = {name: _typed(frames[name], kind) for name, kind in KINDS.items()}
    events = frames["events"]
    if filters.payload_filtered:
        # every other event a filter on the payload lets through has a business time
        events = events.filter(pl.col("occurred_at").is_not_null())
    out["events"] = events
    return out


class _Events:
    """The ``events`` frame of a large load, put together range by range while the load
    goes on: once every part of a position range is read, the worker that read the last
    one puts the range's envelopes in order, and in the end the ranges are only chained.
    (Merged at the end instead, it took 0.25 s with nothing else to do at 5M events.)

    ``names``: the frames the load reads (``events`` for types riskbook does not know);
    ``big``: those read range by range, the others are read whole (and sliced here).
    """

    def __init__(self, cuts: list[int], names: set[str], big: set[str]) -> None:
        self.cuts = cuts
        self.big = names & big
        self.whole_pending = names - big
        self.whole: dict[str, pl.DataFrame] = {}
        self.pending = {i: set(self.big) for i in range(len(cuts) - 1)}
        self.parts: dict[tuple[str, int], pl.DataFrame] = {}
        self.merged: dict[int, pl.DataFrame] = {}

    def add(self, name: str, part: int, frame: pl.DataFrame) -> list[int]:
        """Record a part read (under the caller's lock); the ranges now complete."""
        if name in self.big:
            self.parts[name, part] = frame
            self.pending[part].discard(name)
        else:  # its envelope, kept for slicing range by range
            if name != "events":
                frame = _envelope_of(frame, KINDS[name])
            self.whole[name] = _in_order(frame)
            self.whole_pending.discard(name)
        if self.whole_pending:
            return []
        ready = [i for i, left in self.pending.items() if not left]
        for i in ready:
            del self.pending[i]
        return ready

    def merge(self, i: int) -> None:
        """Put range ``i``'s envelopes in order (outside the lock)."""
        lo, hi = self.cuts[i], self.cuts[i + 1]
        pieces = []
        for frame in self.whole.values():
            where = frame["position"].search_sorted(pl.Series([lo, hi], dtype=pl.Int64))
            pieces.append(frame.slice(where[0], where[1] - where[0]))
        pieces += [_envelope_of(self.parts[name, i], KINDS[name]) for name in sorted(self.big)]
        self.merged[i] = _merged(pieces, threads=1)

    def frame(self) -> pl.DataFrame:
        ranges = [self.merged[i] for i in range(len(self.cuts) - 1)]
        return pl.concat(ranges, rechunk=False) if ranges else _empty("events")


# Connections reading one large load at once. The server's COPY work and the client's
# decoding of it (ADBC, then Polars' casts and sorts) cost about the same CPU time, so
# on two cores two connections overlap them and halve the wall time; more connections
# than cores only contend.
_WORKERS = max(1, min(4, os.cpu_count() or 1))
_SMALL_ROWS = 50_000  # up to this many events in a read's range, the CSV route reads it
_COUNT_SQL = (
    "SELECT count(*) FROM (SELECT 1 FROM event_fields"
    " WHERE position >= %s AND position < %s LIMIT %s) s"
)
_PART_ROWS = 300_000  # rows per range of a large read: small parts, small transients
_SAMPLE = 0.1  # percent of event_fields' pages sampled to plan a read


def _plan(conn: Any, after: int, fence: int) -> tuple[list[int], set[str]]:
    """Cut ``[after, fence)`` into ranges of about ``_PART_ROWS`` events each, and say
    which kinds are large enough to be read range by range.

    Sampled (``TABLESAMPLE SYSTEM``, a few milliseconds whatever the table's size): the
    cuts only balance the work, correctness never depends on them.
    """
    rows = conn.execute(
        f"SELECT position, event_type FROM event_fields TABLESAMPLE SYSTEM ({_SAMPLE})"
        " WHERE position >= %s AND position < %s",
        (after, fence),
    ).fetchall()
    scale = 100 / _SAMPLE
    n = int(len(rows) * scale / _PART_ROWS)
    if n < 2:
        return [after, fence], set()
    per_kind: dict[str, int] = {}
    for _, event_type in rows:
        kind = _KIND_OF_TYPE.get(event_type)
        if kind is not None:
            per_kind[kind.name] = per_kind.get(kind.name, 0) + 1
    big = {name for name, c in per_kind.items() if c * scale >= _PART_ROWS}
    positions = sorted(p for p, _ in rows)
    inner = sorted({positions[len(positions) * i // n] for i in range(1, n)} - {after})
    return [after, *inner, fence], big


# a task's frame: its name, part, rows, and a report of the rows it set aside
_Result = tuple[str, int, pl.DataFrame, _Malformed | None]


def _run(
    store: Store,
    tasks: list[tuple[str, int, str]],
    bar: _Progress,
    *,
    route: str,
    workers: int,
    events: _Events | None = None,
    malformed: list[_Malformed] | None = None,
) -> dict[str, list[tuple[int, pl.DataFrame]]]:
    """Run the tasks' queries on ``workers`` connections of their own (see
    :func:`_reader`); their frames by name. The reports of rows set aside (see
    :func:`_set_aside`) go to ``malformed``.

    Each worker reads, types and orders a part on its own connection, so one part's
    decoding in this process overlaps the server's COPY of another (the compiled
    decoder, ADBC and Polars release the GIL while they work).
    """
    out: dict[str, list[tuple[int, pl.DataFrame]]] = {}

    def read(conn: _Read, task: tuple[str, int, str]) -> _Result:
        name, part, query = task
        report = None
        if name == "events":
            raw = conn(query, None)
            frame = raw.select([pl.col(c).cast(t) for c, t in EVENTS_SCHEMA.items()])
        else:
            kind = KINDS[name]
            frame, report = _read_kind(conn(query, _categories(kind)), kind)
        return name, part, frame, report

    def done(result: _Result) -> list[int]:
        name, part, frame, report = result
        if report is not None and malformed is not None:
            malformed.append(report)
        out.setdefault(name, []).append((part, frame))
        bar.update(frame.height)
        return events.add(name, part, frame) if events is not None else []

    if workers <= 1 or len(tasks) <= 1:
        with _reader(store, route) as conn:
            for task in tasks:
                for i in done(read(conn, task)):
                    events.merge(i)  # type: ignore[union-attr]
        return out

    queue = list(reversed(tasks))  # popped from the end: largest first
    lock = threading.Lock()

    def worker() -> None:
        with _reader(store, route) as conn:
            while True:
                with lock:
                    if not queue:
                        return
                    task = queue.pop()
                try:
                    result = read(conn, task)
                except BaseException:
                    with lock:
                        queue.clear()  # the load has failed: the other workers stop too
                    raise
                with lock:
                    ready = done(result)
                for i in ready:  # ranges now complete: put their events in order here
                    events.merge(i)  # type: ignore[union-attr]

    with ThreadPoolExecutor(workers, thread_name_prefix="riskbook-load") as pool:
        futures = [pool.submit(worker) for _ in range(min(workers, len(tasks)))]
        for future in futures:
            future.result()
    return out


_ENVELOPE_SQL = (
    'f.position, f.event_id::text, f.aggregate_id, f.sequence, f."timestamp",'
    " f.causation_id::text, f.correlation_id"
)

# The event types with events in a position range: a loose scan of event_fields_type_idx
# for the types, then a probe of the range for each (a few index probes whatever the
# sizes: a refresh of a few events asks only for the kinds it has).
_TYPES_PRESENT_SQL = """
WITH RECURSIVE t(event_type) AS (
    (SELECT event_type FROM event_fields ORDER BY event_type LIMIT 1)
    UNION ALL
    SELECT (SELECT f.event_type FROM event_fields f WHERE f.event_type > t.event_type
             ORDER BY f.event_type LIMIT 1)
      FROM t WHERE t.event_type IS NOT NULL
)
SELECT event_type FROM t
 WHERE event_type IS NOT NULL
   AND EXISTS (SELECT 1 FROM event_fields f
                WHERE f.event_type = t.event_type AND f.position >= %s AND f.position < %s)
"""


def _kind_query(kind: Kind) -> str:
    cols = ", ".join(
        "(f.event_type = 'AccountBlocked')" if col == "blocked" else f"f.{src}"
        for col, (_, src) in kind.columns.items()
    )
    types = ", ".join(f"'{t}'" for t in kind.event_types)
    return (
        f"SELECT {_ENVELOPE_SQL}, {cols} FROM event_fields f WHERE f.event_type IN ({types}) AND "
    )


def _collect(conn: Any, query: str) -> pl.DataFrame:
    batches = list(_batches(conn, query))
    return pl.concat(batches, rechunk=False) if len(batches) > 1 else batches[0]


def _categories(kind: Kind) -> dict[int, pl.DataType]:
    """The columns of a kind's query that are Categorical or Enum, by index."""
    return {
        i: t for i, t in enumerate(kind.schema.values()) if isinstance(t, (pl.Categorical, pl.Enum))
    }


def _read_kind(raw: pl.DataFrame, kind: Kind) -> tuple[pl.DataFrame, _Malformed | None]:
    """A kind's rows as read (any route) in its frame's types and in order, the rows
    that break the catalogue's rules set aside (see :func:`_set_aside`)."""
    names = [*ENVELOPE, *kind.columns]
    raw = raw.rename(dict(zip(raw.columns, names, strict=True)))
    # an Enum column (side) read as text: a value outside it becomes null, set aside
    frame = raw.select(
        [pl.col(c).cast(t, strict=not isinstance(t, pl.Enum)) for c, t in kind.schema.items()]
    )
    frame, malformed = _set_aside(frame, kind)
    return _in_order(frame), malformed


def _typed(frame: pl.DataFrame, kind: Kind) -> pl.DataFrame:
    """A kind's frame without the rows :func:`_set_aside` marked (no business time)."""
    if frame[kind.time].null_count():
        return frame.filter(pl.col(kind.time).is_not_null())
    return frame


def _in_order(frame: pl.DataFrame) -> pl.DataFrame:
    """In global order: the rows of a seq scan nearly always are already."""
    if frame.height and not frame["position"].is_sorted():
        return frame.sort("position")
    return frame


def _merged(parts: list[pl.DataFrame], *, threads: int = _WORKERS) -> pl.DataFrame:
    """The rows of ``parts`` in global order, built a column at a time.

    A sort of the whole frame would first copy every column into one chunk and then
    copy it again in order: two copies of the events at once, the first left to the
    allocator as garbage (about 450 MB at 5M events). Column by column, only one
    column's copy is ever extra. (Each column is put in one chunk before its gather: a
    gather from the parts' many chunks took twice as long. At 5M events: 0.30 s and a
    peak RSS of 1,840 MiB, against 0.28 s and 2,190 MiB for the sort; a column on each
    of two cores, 0.12 s.)
    """
    whole = pl.concat(parts, rechunk=False)
    if whole.height == 0 or whole["position"].is_sorted():
        return whole.rechunk()
    order = whole["position"].arg_sort()

    def column(name: str) -> pl.Series:
        return whole[name].rechunk().gather(order)

    if threads <= 1:
        return pl.DataFrame([column(c) for c in whole.columns])
    # a column at a time on each core: Polars' gather of one column keeps one busy
    with ThreadPoolExecutor(threads, thread_name_prefix="riskbook-merge") as pool:
        return pl.DataFrame(list(pool.map(column, whole.columns)))


def _envelope_of(frame: pl.DataFrame, kind: Kind) -> pl.DataFrame:
    """The ``events`` rows of a kind's frame: its envelope, type and business time."""
    if kind.name == "blocks":
        event_type = (
            pl.when(pl.col("blocked"))
            .then(pl.lit("AccountBlocked"))
            .otherwise(pl.lit("AccountUnblocked"))
        )
    else:
        event_type = pl.lit(kind.event_types[0])
    aggregate_type = "Instrument" if kind.name == "marks" else "Account"
    return frame.select(
        *ENVELOPE,
        event_type.cast(_CAT).alias("event_type"),
        pl.lit(aggregate_type).cast(_CAT).alias("aggregate_type"),
        pl.col(kind.time).alias("occurred_at"),
    )


def read_frames(
    store: Store, query: str, *, progress: bool | None = False
) -> dict[str, pl.DataFrame]:
    """Run a query selecting :data:`WIDE_COLUMNS` from ``event_fields f``; split its rows
    into History frames (through ADBC; parameters must already be inlined, see
    :func:`psycopg_literal`)."""
    parts: dict[str, list[pl.DataFrame]] = {n: [] for n in [*KINDS, "events"]}
    bar = _Progress(progress)
    reports: list[_Malformed] = []
    for wide in _fetch(store, query):
        _split(wide, parts, reports)
        bar.update(wide.height)
    bar.close()
    _warn(functools.reduce(_combined, reports, None))
    return {
        n: (
            pl.concat(parts[n], rechunk=False)
            if parts[n]
            else pl.DataFrame(schema=KINDS[n].schema if n != "events" else EVENTS_SCHEMA)
        )
        for n in parts
    }


def psycopg_literal(conn: Any, query: str, params: list[Any]) -> str:
    """The query with its parameters inlined, quoted by psycopg (ADBC takes no params here)."""
    from psycopg import ClientCursor

    with ClientCursor(conn) as cur:
        return cur.mogrify(query, params)


def _route(size: str) -> str:
    """How a read of this ``size`` (``small``: up to :data:`_SMALL_ROWS` events,
    ``large``: read range by range, else ``medium``) goes:

    * ``csv`` for a small one: PostgreSQL's CSV COPY parsed by Polars (see
      :mod:`riskbook._csv`), nothing to start, where ADBC would spend 50-60 ms on its
      first read in a process and the compiled decoder 0.15 s or more;
    * ``copy`` for a large one: riskbook's own decoder of the binary COPY stream (see
      :mod:`riskbook._copy`);
    * ``adbc`` in between: ADBC's driver, whose start is paid once per process.

    ``RISKBOOK_LOAD_ROUTE=copy|csv|adbc`` picks one for every read.
    """
    wanted = os.environ.get("RISKBOOK_LOAD_ROUTE", "").strip().lower()
    if wanted not in ("", *_ROUTES):
        raise RiskbookError(f"RISKBOOK_LOAD_ROUTE must be copy, csv or adbc, not {wanted!r}")
    return wanted or {"small": "csv", "large": "copy"}.get(size, "adbc")


_ROUTES = ("copy", "csv", "adbc")


@functools.cache
def _decoder_ready() -> bool:
    """Whether the compiled decoder runs here, made ready once per process (importing
    numba and loading the parser: 0.3 s or more in a new process)."""
    from riskbook import _copy

    return _copy.warm()


_Read = Callable[[str, "dict[int, pl.DataType] | None"], pl.DataFrame]


@contextmanager
def _reader(store: Store, route: str) -> Iterator[_Read]:
    """A connection of its own to read queries with (parameters inlined): a function
    from a query to its rows as a Polars frame of the raw column types (or of the
    Categorical and Enum types given by column index, where the route reads them so).

    Through the ``route`` (see :func:`_route`) or, where it cannot run or not read a
    query, through ADBC's driver; each connection opened on first use. (Reading a
    large load's first parts through ADBC while the decoder is made ready gained
    nothing: at 5M events the same wall time for 8% more CPU time.)
    """
    if route == "adbc":
        with _adbc(store) as adbc:

            def via(query: str, categories: dict[int, pl.DataType] | None = None) -> pl.DataFrame:
                return _collect(adbc, query)  # the caller casts

            yield via
        return
    with ExitStack() as opened:
        conns: dict[str, Any] = {}

        def via_adbc(query: str) -> pl.DataFrame:
            if "adbc" not in conns:
                conns["adbc"] = opened.enter_context(_adbc(store))
            return _collect(conns["adbc"], query)

        def read(query: str, categories: dict[int, pl.DataType] | None = None) -> pl.DataFrame:
            if route == "copy" and not _decoder_ready():
                return via_adbc(query)
            if "pg" not in conns:
                conns["pg"] = opened.enter_context(_connect(store.dsn, autocommit=True))
            if route == "copy":
                from riskbook._copy import read as read_rows
            else:
                from riskbook._csv import read as read_rows
            try:
                return read_rows(conns["pg"], query, categories)
            except Unsupported:
                return via_adbc(query)
            except pl.exceptions.InvalidOperationError:
                # a value outside an Enum (a side "buy" stored by raw SQL): read as text
                # instead, for the caller to set aside. The COPY may have stopped midway:
                # its connection is not used again.
                conns.pop("pg").close()
                return via_adbc(query)

        yield read


@contextmanager
def _adbc(store: Store) -> Iterator[Any]:
    """An ADBC connection to the store: the server's binary COPY straight into Arrow, in C.

    The driver manager's own API hands Polars an Arrow C stream, so pyarrow (a second
    or more to import) is never loaded.
    """
    import adbc_driver_manager

    failure = None
    try:
        conn = adbc_driver_manager.AdbcConnection(_adbc_database(store.dsn))
    except Exception as exc:  # its message may quote the DSN: scrubbed, and not chained
        failure = f"cannot connect to {redact(store.dsn)} with ADBC: {scrub(str(exc), store.dsn)}"
        _ADBC_DATABASES.pop((os.getpid(), store.dsn), None)  # made again next time
    if failure is not None:
        raise StoreError(failure)
    try:
        yield conn
    finally:
        conn.close()


_ADBC_DATABASES: dict[tuple[int, str], Any] = {}
_ADBC_LOCK = threading.Lock()


def _adbc_database(dsn: str) -> Any:
    """ADBC's database object for ``dsn``, one per process: making one costs about 40 ms
    (the driver reads the server's catalogue of types), a connection from it 3 ms, and a
    refresh of a few events otherwise paid the 40 ms every time."""
    import adbc_driver_postgresql

    key = (os.getpid(), dsn)
    with _ADBC_LOCK:
        db = _ADBC_DATABASES.get(key)
        if db is None:
            db = _ADBC_DATABASES[key] = adbc_driver_postgresql.connect(dsn)
    return db


def _batches(conn: Any, query: str) -> Iterator[pl.DataFrame]:
    """A query's rows as one Polars frame (possibly empty, with its columns' types)."""
    import adbc_driver_manager

    stmt = adbc_driver_manager.AdbcStatement(conn)
    failure = None
    try:
        stmt.set_sql_query(query)
        handle, _ = stmt.execute_query()
        # the rows stream in as Polars reads them: a server error then (a connection
        # ended, a statement timeout) comes out of Polars
        frame = pl.DataFrame(handle)
    except (adbc_driver_manager.Error, pl.exceptions.ComputeError) as exc:
        failure = _read_failure(str(exc))
    finally:
        stmt.close()
    if failure is not None:  # raised here, so that it carries neither driver's exception
        raise failure
    yield frame


def _fetch(store: Store, query: str) -> Iterator[pl.DataFrame]:
    """Rows of a :data:`WIDE_COLUMNS` query, with the wide column names."""
    with _adbc(store) as conn:
        for frame in _batches(conn, query):
            yield frame.rename(dict(zip(frame.columns, _WIDE_NAMES, strict=True)))


def _split(
    wide: pl.DataFrame, parts: dict[str, list[pl.DataFrame]], malformed: list[_Malformed]
) -> None:
    """Cut a batch of wide rows into the frames of its kinds; the rows that break the
    catalogue's rules stay in ``events`` only, without a business time (reported to
    ``malformed``), as in :func:`load`."""
    head = [pl.col(c).cast(t) for c, t in ENVELOPE.items()]
    aside: list[pl.Series] = []
    for kind in KINDS.values():
        rows = wide.filter(pl.col("event_type").is_in(list(kind.event_types)))
        if rows.height == 0:
            continue
        cols = []
        for col, (dtype, src) in kind.columns.items():
            expr = (pl.col("event_type") == "AccountBlocked") if col == "blocked" else pl.col(src)
            cols.append(expr.cast(dtype, strict=not isinstance(dtype, pl.Enum)).alias(col))
        frame, report = _set_aside(rows.select(*head, *cols), kind)
        if report is not None:
            malformed.append(report)
            aside.append(frame.filter(pl.col(kind.time).is_null())["position"])
            frame = _typed(frame, kind)
        parts[kind.name].append(frame)
    occurred_at = pl.col("occurred_at").cast(_TIME)
    if aside:
        occurred_at = (
            pl.when(pl.col("position").is_in(pl.concat(aside).implode()))
            .then(None)
            .otherwise(occurred_at)
        )
    parts["events"].append(
        wide.select(
            *head,
            pl.col("event_type").cast(_CAT),
            pl.col("aggregate_type").cast(_CAT),
            occurred_at.alias("occurred_at"),
        )
    )


class _Progress:
    """A progress bar for long loads: in a notebook or a terminal, silent otherwise."""

    def __init__(self, enabled: bool | None) -> None:
        if enabled is None:
            enabled = _interactive()
        self.bar: Any = None
        self.started = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc="loading events", unit=" events", unit_scale=True, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    return sys.stderr.isatty()


# --------------------------------------------------------------------------- cache


def _cache_root() -> Path:
    from riskbook._home import riskbook_home

    return Path(os.environ.get("RISKBOOK_CACHE") or riskbook_home() / "cache")


# A cache entry is a folder of segments, each a History in Arrow IPC files (see
# _write_segment): the first load, then one per refresh that found something new.
# segments.json lists them with the positions each covers, ``[after, horizon)``: they
# must chain (the first from 0, each from the previous one's horizon), so a segment is
# only added from the cache's current horizon, under the entry's lock (two Histories
# refreshing the same events would otherwise both add them), and a reader takes an
# entry whose segments do not chain for a miss. Reading concatenates them; past
# _MAX_SEGMENTS they are merged into one (from the files: a History's frames are its
# caller's to change).
_MAX_SEGMENTS = 8
# the cache's own layout (not the export's): older entries are misses. 2: the ranges
# 3: busts outside since/until kept; 4: events that break the catalogue's rules set aside
_CACHE_FORMAT = "arrow-ipc-5"  # 5: an accounts filter keeps "*" limits


def _segments(directory: Path) -> list[tuple[Path, int, int]]:
    """The listed segments: (folder, after, horizon) each, in order."""
    try:
        data = json.loads((directory / "segments.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        return []  # an entry of an older layout (Parquet, no ranges): rebuilt
    try:
        return [
            (directory / str(name), int(after), int(horizon))
            for name, (after, horizon) in zip(data["segments"], data["ranges"], strict=True)
        ]
    except (KeyError, TypeError, ValueError):
        return []


def _set_segments(directory: Path, segments: list[tuple[str, int, int]]) -> None:
    """List these segments, (name, after, horizon) each (under the entry's lock)."""
    tmp = directory / f"segments.json.tmp-{uuid.uuid4().hex[:8]}"
    names = [name for name, _, _ in segments]
    ranges = [[after, horizon] for _, after, horizon in segments]
    tmp.write_text(json.dumps({"format": _CACHE_FORMAT, "segments": names, "ranges": ranges}))
    tmp.replace(directory / "segments.json")
    _prune(directory, keep=set(names))


@contextmanager
def _cache_lock(directory: Path) -> Iterator[None]:
    """The lock of a cache entry's writers, across threads and processes (``flock`` on
    ``directory/lock``). Where there is none (not POSIX), writers are not serialised:
    a reader still takes segments that do not chain for a miss."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _prune(directory: Path, keep: set[str]) -> None:
    """Remove the segment folders no longer listed: merged ones, and those of an older
    layout. Best effort: a History already open on a removed segment keeps its mapped
    pages (on POSIX), and a reader that listed it just before finds it gone and loads
    afresh -- slower, never stale."""
    for path in directory.glob("seg-*"):
        if path.name not in keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _write_segment(history: History, directory: Path) -> None:
    """One segment: a folder of uncompressed Arrow IPC files (one per frame) and
    ``history.json``, as :meth:`History.to_parquet` lays them out.

    Uncompressed IPC is Polars' own memory layout, so :func:`_read_segment` maps the
    files instead of decoding them: a warm load costs page mappings, not a Parquet
    decode of every column. It takes about 3x the disk of zstd Parquet.
    """
    from riskbook._home import make_private_dirs

    make_private_dirs(directory)  # mode 0700: a copy of the history
    suffix = f".tmp-{uuid.uuid4().hex[:8]}"
    for name, frame in history.frames().items():
        if frame.height == 0:  # history.json says it has no rows: nothing to map
            continue
        tmp = directory / f"{name}.arrow{suffix}"
        # batches of 2^20 rows: fewer for pyarrow to map and Polars to convert than the
        # writer's default (at 5M events, 40-47 ms against 57-72 for the large frames)
        frame.write_ipc(tmp, compression="uncompressed", record_batch_size=1 << 20)
        tmp.replace(directory / f"{name}.arrow")  # a new file: maps of the old one stay valid
    (directory / f"history.json{suffix}").write_text(json.dumps(_meta(history)))
    (directory / f"history.json{suffix}").replace(directory / "history.json")


def _read_segment(directory: Path) -> History:
    """A segment written by :func:`_write_segment`, its files memory-mapped (zero-copy
    through pyarrow; Polars 2 has no mapped IPC reader of its own)."""
    import pyarrow as pa
    import pyarrow.ipc

    def read(path: Path) -> pl.DataFrame:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        # a damaged file must be a miss: the buffers' sizes are checked here (0.1 ms at
        # 5M events); checking every value (offsets, views, dictionary codes) would
        # cost 0.25 s, several warm loads, so a damage only that would find makes
        # Polars panic instead, which is taken for what it is
        table.validate()
        try:
            frame = pl.from_arrow(table, rechunk=False)
        except BaseException as exc:
            if type(exc).__module__ == "pyo3_runtime":  # a Rust panic (PanicException)
                raise RiskbookError(f"{path}: damaged: {exc}") from None
            raise
        assert isinstance(frame, pl.DataFrame)
        return frame

    return _read_folder(directory, ".arrow", read)


def _read_folder(directory: Path, suffix: str, read: Callable[[Path], pl.DataFrame]) -> History:
    """A History from a folder of one file per frame and ``history.json`` (an export or
    a cache segment), checked whole: every frame with the rows and schema it lists."""
    try:
        meta = json.loads((directory / "history.json").read_text())
    except FileNotFoundError:
        raise RiskbookError(f"{directory}: not a riskbook History (no history.json)") from None
    if meta.get("format") != _FORMAT:
        raise RiskbookError(f"{directory}: format {meta.get('format')} is not {_FORMAT}")
    frames = {}
    for name in [*KINDS, "events"]:
        path = directory / f"{name}{suffix}"
        # a cache segment leaves out the files of frames without rows
        frame = _empty(name) if meta["rows"][name] == 0 and not path.exists() else read(path)
        schema = EVENTS_SCHEMA if name == "events" else KINDS[name].schema
        if frame.height != meta["rows"][name] or frame.schema != pl.Schema(schema):
            raise RiskbookError(f"{directory}: {name}{suffix} does not match history.json")
        frames[name] = frame
    return History(
        **frames,  # type: ignore[arg-type]
        horizon=int(meta["horizon"]),
        filters=Filters.from_json(meta["filters"]),
        store_id=meta.get("store_id"),
        _database=meta.get("database"),
        _malformed=_Malformed.from_json(meta.get("malformed")),
    )


def _write_cache(history: History, directory: Path) -> None:
    try:
        from riskbook._home import make_private_dirs

        make_private_dirs(directory)  # mode 0700: a copy of the history
        with _cache_lock(directory):
            _replace_cache(history, directory)
    except OSError:
        pass  # a cache that cannot be written is only a slower next load


def _replace_cache(history: History, directory: Path) -> None:
    """Make the whole ``history`` (read from position 0) the entry's one segment."""
    name = f"seg-{history.horizon}-{uuid.uuid4().hex[:8]}"
    _write_segment(history, directory / name)
    _set_segments(directory, [(name, 0, history.horizon)])
    history._synced = history.horizon


def _cache_segment(history: History, delta: History, after: int, directory: Path) -> None:
    """Add a refresh's ``delta`` (read from ``after``; ``history`` already holds it) to
    the cache, if it continues it: the cache's horizon is ``after``, or the one
    ``history`` last matched, with only empty deltas read since. Otherwise (another
    History added these events first, or the cache moved on or was replaced) the delta
    is not cached: the next load reads from the cache's horizon and adds that.

    Past :data:`_MAX_SEGMENTS`, the segments on disk and the delta are merged into one
    (at 5M events 1.5 to 3.5 s, nearly all of it writing 1.4 GB, as writing the
    refreshing History took; once per ``_MAX_SEGMENTS`` refreshes)."""
    try:
        with _cache_lock(directory):
            segments = _segments(directory)
            top = segments[-1][2] if segments else None
            if top is None or top not in (after, history._synced):
                history._synced = None
                return
            if len(segments) + 1 > _MAX_SEGMENTS:
                # merged from the segments on disk, never from ``history``: its frames
                # are the caller's, who may have changed them (a notebook's
                # ``h.trades = h.trades.filter(...)``); the cache holds the store's
                whole = _joined(segments, (history.store_id, history._database), history.filters)
                if whole is None:  # damaged: the next load reads afresh and rewrites it
                    history._synced = None
                    return
                whole._extend(delta)
                _replace_cache(whole, directory)
                history._synced = whole.horizon
                return
            name = f"seg-{delta.horizon}-{uuid.uuid4().hex[:8]}"
            _write_segment(delta, directory / name)
            listed = [(p.name, a, h) for p, a, h in segments]
            _set_segments(directory, [*listed, (name, top, delta.horizon)])
            history._synced = delta.horizon
    except OSError:
        history._synced = None


# One round trip tells whether a cache (or a refreshing History, see _read) is still
# good and whether anything is new: the id of the event at the cached last position
# (the store is append-only, so a cache is a prefix of it -- unless the history was
# rewritten: a restored older backup, a superuser), the store's identity, the fence, and
# whether any event lies past the cached horizon.
# The fence is the one for reads by later statements (riskbook_settled_fence): rows of
# a transaction that ended after this statement's snapshot are below it but not seen
# here, so "nothing new" is said only when the two fences agree.
_CACHE_CHECK_SQL = (
    """
WITH fence AS (SELECT riskbook_settled_fence() AS fence, riskbook_position_fence() AS seen)
SELECT (SELECT event_id::text FROM events WHERE position = %(last)s),
       (SELECT store_id::text FROM riskbook_store),
       fence,
       fence > seen
       OR EXISTS (SELECT 1 FROM event_fields WHERE position >= %(horizon)s AND position < fence),
       """
    + _DATABASE_SQL
    + """
  FROM fence
"""
)


def _read_cache(
    directory: Path, store: Store, identity: tuple[str, str], filters: Filters
) -> tuple[History, bool] | None:
    """The cached History, if it is whole and still a prefix of the history of this
    store (``identity``: its store_id and database, see :func:`_identity`), and whether
    the store has events past its horizon (None: no usable cache)."""
    cached = _joined(_segments(directory), identity, filters)
    if cached is None:
        return None
    expect = _Expect.of(cached.events, *identity)
    with store.connection() as conn:
        row = conn.execute(
            _CACHE_CHECK_SQL, {"last": expect.last, "horizon": cached.horizon}
        ).fetchone()
    if not expect.holds(row):
        return None
    assert row is not None
    anything_new = bool(row[3])
    cached._synced = cached.horizon
    if not anything_new:  # what refresh() would do with the empty delta
        cached.horizon = max(cached.horizon, row[2])
    return cached, anything_new


def _joined(
    segments: list[tuple[Path, int, int]],
    identity: tuple[str | None, str | None],
    filters: Filters,
) -> History | None:
    """The History the listed segments hold, if they can all be read, are of this
    store and database (``identity``) and filters, and chain (None: the entry is not
    usable; one written before the database was part of it, say)."""
    if not segments:
        return None
    try:
        parts = [_read_segment(p) for p, _, _ in segments]
    except (RiskbookError, OSError, ValueError, KeyError, pl.exceptions.PolarsError):
        return None
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, ...), without importing it
        if type(exc).__module__.startswith("pyarrow"):
            return None
        raise
    if any((p.store_id, p._database) != identity or p.filters != filters for p in parts):
        return None
    if not _chained(parts, segments):
        return None
    whole = parts[0]
    for part in parts[1:]:
        whole._extend(part)
    return whole


def _chained(parts: list[History], segments: list[tuple[Path, int, int]]) -> bool:
    """Whether the segments cover consecutive ranges of positions from 0, each holding
    only events of its range (and, before it, the busts its trades brought in: see
    :meth:`Filters.late_busts`)."""
    expected = 0
    for part, (_, after, horizon) in zip(parts, segments, strict=True):
        if after != expected or part.horizon != horizon or horizon < after:
            return False
        positions = part.events["position"]
        if positions.len():
            if positions[-1] >= horizon:
                return False
            below = part.events.head(int(positions.search_sorted(after)))
            if below.height and not (below["event_type"] == "TradeCancelled").all():
                return False
        expected = horizon
    return True
