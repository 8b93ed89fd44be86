"""Synthetic trading histories with planted incidents and their answer key (issue 3).

:func:`generate` makes a deterministic (by ``seed``) history of a small trading firm:
symbols whose prices random-walk, marked every five minutes during US trading hours
(14:30--21:00 UTC, weekdays); accounts of three styles (market makers doing many small
round trips, trend followers building large positions over days, leveraged accounts),
each funded and later topped up or drawn down; limits of all four built-in types set
and changed over time by named people; and the awkward cases real histories have:
trades recorded hours after they were executed, busts, a stock split, and one
reconciliation whose ``previous_quantity`` does not match the books.

Five incidents are planted, each a breach of one limit that a plain fold over the
events finds (DESIGN.md §4--§5):

1. ``fat_finger`` -- a market maker's order gets an extra zero: its position passes
   1.2 x its (symbol-specific) MaxPositionSize, the live engine records a
   LimitViolationDetected and an AccountBlocked; a named person unblocks the account
   and the position is unwound;
2. ``drawdown_spiral`` -- a trend follower's conviction trade sells off and it averages
   down until MaxDrawdown is breached; as the sell-off goes on the drawdown usually
   passes 1.2 x the limit and the live engine blocks the account; the CRO unblocks it
   to liquidate, and raises the limit;
3. ``leverage_creep`` -- a leveraged account adds exposure over days until a last add
   takes it over MaxLeverage; it de-risks half an hour later;
4. ``daily_volume`` -- a market maker's quoting algorithm loops and its traded quantity
   of the UTC day passes MaxDailyVolume; the algorithm is halted for the day;
5. ``busted_trade`` -- a trade booked to the wrong account takes a position over
   MaxPositionSize; the trade is busted 40 minutes later, so the breach exists only as
   known before the bust was recorded.

For each, the live engine's records are in the history, as riskbook's processor
(:mod:`riskbook.live`, default critical factor) decides them: a LimitViolationDetected
with ``causation_id`` = the event that started the breach, and -- when the breach is
critical, i.e. at some event of it the metric goes over 1.2 x the limit in force -- an
AccountBlocked with ``causation_id`` = that first event (the trigger itself for the fat
finger), unless the account is blocked already; both carry the cause's
``correlation_id``. The answer key (:attr:`Simulation.answer_key`) says which account,
which limit, when, and which events (``critical``: whether the breach got there).
Background activity is kept inside the limits (pre-trade checks at 70 %, and a risk
officer who raises a limit when a metric passes 80 % of it), and the generator follows
every metric exactly as DESIGN.md §4--§5 defines it, so with everything known the
key's incidents are the complete list of breaches (``"complete": true``; any other
breach would be listed under ``"unplanned_breaches"`` and make it false).

Everything comes from ``random.Random(seed)``; no wall-clock time is read, so the same
seed and parameters give byte-identical files. Times are integer microseconds inside.

Ways out, all writing the same events:

* :func:`generate` -> :class:`Simulation` (Envelope objects + key); :func:`write_jsonl`
  writes it as the import format, :func:`to_store` through ``Store.import_envelopes``;
* :func:`stream_jsonl` and :func:`stream_to_store` generate straight into a file or a
  store without building Envelope objects (for millions of events; the store path
  generates in a child process and writes with ``COPY`` into the events table);
* :func:`cli` -- ``riskbook simulate`` / ``python -m riskbook.simulate``.

Examples
--------
>>> sim = generate(seed=1, accounts=5, symbols=3, days=3)
>>> sorted(i["kind"] for i in sim.answer_key["incidents"])
['busted_trade', 'daily_volume', 'drawdown_spiral', 'fat_finger', 'leverage_creep']
>>> sim.envelopes[0].event_type
'AccountFunded'
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import gzip
import heapq
import json
import math
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from riskbook._reasons import block_reason, figure
from riskbook._time import EPOCH as _EPOCH
from riskbook._time import us as _us
from riskbook.errors import ImportFailed, RiskbookError, StoreError
from riskbook.events import (
    ACCOUNT,
    EVENT_TYPES,
    INSTRUMENT,
    Envelope,
    Side,
    encode_envelope,
)
from riskbook.store import ImportResult, Store, connect

__all__ = [
    "CRITICAL_RATIO",
    "DEFAULT_START",
    "MAX_EVENTS",
    "SAMPLE_PARAMS",
    "Simulation",
    "cli",
    "generate",
    "key_path",
    "stream_jsonl",
    "stream_to_store",
    "to_store",
    "write_jsonl",
]

DEFAULT_START = datetime(2024, 1, 2, tzinfo=UTC)
"""The first trading day of a history unless told otherwise (a Tuesday)."""

SAMPLE_PARAMS: dict[str, Any] = {"seed": 7, "accounts": 12, "symbols": 8, "days": 18}
"""The parameters of the bundled sample, ``data/sample.jsonl.gz`` (see data/README.md)."""

CRITICAL_RATIO = 1.2
"""A breach is critical when its metric goes over this x its limit: the live engine
blocks the account (riskbook.live's default critical factor)."""

MAX_EVENTS = 1_000_000_000
"""The largest history :func:`generate` and friends make (by its expected event count)."""

Progress = Callable[[str, int], None]

# ----------------------------------------------------------------------------- time

_US = 1_000_000
_MIN = 60 * _US
_HOUR = 3600 * _US
_DAY = 86_400 * _US
_OPEN = 14 * _HOUR + 30 * _MIN  # 09:30 New York in winter
_CLOSE = 21 * _HOUR
_MARK_EVERY = 5 * _MIN
_MARKS_PER_DAY = (_CLOSE - _OPEN) // _MARK_EVERY + 1  # 14:30 ... 21:00

_day_prefix: dict[int, str] = {}
_hms: list[str] = []


def _ts(us: int) -> str:
    """``format_time`` of a time in microseconds since the epoch (the same text, faster)."""
    d, r = divmod(us, _DAY)
    prefix = _day_prefix.get(d)
    if prefix is None:
        day = _EPOCH + timedelta(days=d)
        # not strftime("%Y"): it does not pad years before 1000 to four digits on glibc
        prefix = _day_prefix[d] = f"{day.year:04d}-{day.month:02d}-{day.day:02d}T"
        if not _hms:
            _hms.extend(
                f"{h:02d}:{m:02d}:{s:02d}." for h in range(24) for m in range(60) for s in range(60)
            )
    s, micro = divmod(r, _US)
    return f"{prefix}{_hms[s]}{micro:06d}Z"


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


# ------------------------------------------------------------------------ event ids

_UUID_MASK = ((1 << 128) - 1) & ~((0xC000 << 48) | (0xF000 << 64))
_UUID_V4 = (0x8000 << 48) | (4 << 76)


def _uuid_str(n: int) -> str:
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _num(x: float) -> str:
    """A float as msgspec writes it (Python's repr differs only in exponent notation)."""
    if 1e-4 <= abs(x) < 1e16:
        return repr(x)
    return msgspec.json.encode(x).decode()


# -------------------------------------------------------------------- event kinds
# Records carry a kind code and the payload's values in field order (times as ints).

K_TRADE, K_CANCEL, K_UPDATE, K_MARK, K_FUND, K_LIMIT, K_VIOLATION, K_BLOCK, K_UNBLOCK = range(9)
_KINDS = (
    "TradeExecuted",
    "TradeCancelled",
    "PositionUpdated",
    "PriceMarked",
    "AccountFunded",
    "LimitSet",
    "LimitViolationDetected",
    "AccountBlocked",
    "AccountUnblocked",
)
_TIME_FIELD_INDEX = (6, 3, 5, 2, 2, 4, 4, 3, 3)

M_OMS, M_LATE, M_PRICING, M_TREASURY, M_CONSOLE, M_ENGINE, M_BACKOFFICE = range(7)
_META_JSON = (
    '{"source":"oms"}',
    '{"source":"drop-copy","booking":"late"}',
    '{"source":"pricing"}',
    '{"source":"treasury"}',
    '{"source":"risk-console"}',
    '{"source":"risk-engine"}',
    '{"source":"back-office"}',
)

_META_DICT = tuple(json.loads(m) for m in _META_JSON)


def _opt(s: str | None) -> str:
    return "null" if s is None else f'"{s}"'


def _payload_json(kind: int, v: tuple[Any, ...]) -> str:
    """The payload exactly as :func:`riskbook.events.encode_event` writes it."""
    if kind == K_TRADE:
        return (
            f'{{"type":"TradeExecuted","trade_id":"{v[0]}","account_id":"{v[1]}",'
            f'"symbol":"{v[2]}","side":"{v[3]}","quantity":{v[4]!r},"price":{v[5]!r},'
            f'"executed_at":"{_ts(v[6])}"}}'
        )
    if kind == K_MARK:
        return (
            f'{{"type":"PriceMarked","symbol":"{v[0]}","price":{v[1]!r},"marked_at":"{_ts(v[2])}"}}'
        )
    if kind == K_CANCEL:
        return (
            f'{{"type":"TradeCancelled","trade_id":"{v[0]}","account_id":"{v[1]}",'
            f'"reason":"{v[2]}","cancelled_at":"{_ts(v[3])}"}}'
        )
    if kind == K_UPDATE:
        return (
            f'{{"type":"PositionUpdated","account_id":"{v[0]}","symbol":"{v[1]}",'
            f'"previous_quantity":{_num(v[2])},"new_quantity":{_num(v[3])},'
            f'"reason":"{v[4]}","updated_at":"{_ts(v[5])}"}}'
        )
    if kind == K_FUND:
        return (
            f'{{"type":"AccountFunded","account_id":"{v[0]}","amount":{_num(v[1])},'
            f'"funded_at":"{_ts(v[2])}"}}'
        )
    if kind == K_LIMIT:
        return (
            f'{{"type":"LimitSet","account_id":"{v[0]}","limit_type":"{v[1]}",'
            f'"value":{_num(v[2])},"set_by":"{v[3]}","set_at":"{_ts(v[4])}",'
            f'"symbol":{_opt(v[5])}}}'
        )
    if kind == K_VIOLATION:
        return (
            f'{{"type":"LimitViolationDetected","account_id":"{v[0]}","limit_type":"{v[1]}",'
            f'"current_value":{_num(v[2])},"limit_value":{_num(v[3])},'
            f'"detected_at":"{_ts(v[4])}","symbol":{_opt(v[5])}}}'
        )
    if kind == K_BLOCK:
        return (
            f'{{"type":"AccountBlocked","account_id":"{v[0]}","reason":"{v[1]}",'
            f'"blocked_by":"{v[2]}","blocked_at":"{_ts(v[3])}"}}'
        )
    return (
        f'{{"type":"AccountUnblocked","account_id":"{v[0]}","reason":"{v[1]}",'
        f'"unblocked_by":"{v[2]}","unblocked_at":"{_ts(v[3])}"}}'
    )


# A record: (recorded_us, order, event_id_int, aggregate_id, kind, causation_int | None,
#            correlation_id, meta_code, payload_values). "order" breaks ties in recorded
# time; the output is sorted by (recorded_us, order).
Record = tuple[int, int, int, str, int, int | None, str, int, tuple[Any, ...]]


def _rec_time(rec: Record) -> int:
    return rec[0]


def _envelope(rec: Record, sequence: int) -> Envelope:
    rec_us, _, eid, agg, kind, cause, corr, meta, values = rec
    cls = EVENT_TYPES[_KINDS[kind]]
    names = cls.__struct_fields__
    ti = _TIME_FIELD_INDEX[kind]
    kw: dict[str, Any] = {}
    for i, name in enumerate(names):
        v = values[i]
        if i == ti:
            v = _dt(v)
        elif kind == K_TRADE and i == 3:
            v = Side(v)
        kw[name] = v
    return Envelope(
        event_id=uuid.UUID(int=eid),
        aggregate_id=agg,
        aggregate_type=INSTRUMENT if kind == K_MARK else ACCOUNT,
        sequence=sequence,
        timestamp=_dt(rec_us),
        payload=cls(**kw),
        correlation_id=corr,
        causation_id=None if cause is None else uuid.UUID(int=cause),
        metadata=dict(_META_DICT[meta]),
    )


def _json_line(rec: Record, sequence: int) -> str:
    """One envelope line, exactly as :func:`riskbook.events.encode_envelope` writes it."""
    rec_us, _, eid, agg, kind, cause, corr, meta, values = rec
    cause_s = "null" if cause is None else f'"{_uuid_str(cause)}"'
    agg_type = INSTRUMENT if kind == K_MARK else ACCOUNT
    return (
        f'{{"event_id":"{_uuid_str(eid)}","event_type":"{_KINDS[kind]}",'
        f'"aggregate_id":"{agg}","aggregate_type":"{agg_type}","sequence":{sequence},'
        f'"timestamp":"{_ts(rec_us)}","causation_id":{cause_s},"correlation_id":"{corr}",'
        f'"metadata":{_META_JSON[meta]},"payload":{_payload_json(kind, values)}}}\n'
    )


def _copy_row(rec: Record, sequence: int) -> str:
    """One row of ``COPY events`` (without its position): tab-separated, no escaping
    needed (the simulator's strings have no tab, newline or backslash)."""
    rec_us, _, eid, agg, kind, cause, corr, meta, values = rec
    agg_type = INSTRUMENT if kind == K_MARK else ACCOUNT
    cause_s = _NULL if cause is None else _uuid_str(cause)
    return (
        f"{_uuid_str(eid)}\t{_KINDS[kind]}\t{agg}\t{agg_type}\t{sequence}\t{_ts(rec_us)}\t"
        f"{cause_s}\t{corr}\t{_META_JSON[meta]}\t{_payload_json(kind, values)}\n"
    )


_NULL = "\\N"


# ---------------------------------------------------------------------- the world

MM, TF, LV = "market_maker", "trend_follower", "leveraged"
_STYLES = (MM, TF, LV)

MPS, MDV, MDD, MLV = "MaxPositionSize", "MaxDailyVolume", "MaxDrawdown", "MaxLeverage"

_TICKERS = (
    "ACME", "BOLT", "CRUX", "DYNA", "EMBR", "FLUX", "GRID", "HALO", "IRIS", "JADE",
    "KILN", "LUMA", "MOSS", "NOVA", "ONYX", "PIKE", "QUIL", "RUNE", "SOLA", "TERA",
    "UMBR", "VALE", "WREN", "XENO", "YARA", "ZINC",
)  # fmt: skip
_RISK_PEOPLE = ("a.rossi", "m.chen", "s.okafor", "j.novak", "l.garcia", "k.tanaka", "p.sharma")
_CRO = "d.weber"
_DESK_HEAD = "r.silva"
_ENGINE = "risk-engine"
_BUST_REASONS = (
    "price outside the day's range",
    "duplicate fill reported by the broker",
    "exchange bust of an erroneous trade",
)

_GUARD = 0.8  # a risk officer raises a background limit when a metric passes this share
_PRE_TRADE = 0.7  # background trades keep metrics under this share of their limits
_MM_TRADES = 240
_MM_LOTS = (1, 1, 2, 2, 3, 4, 5)
_TF_TRADES = 24
_LV_TRADES = 30
# Estimated events per trading day, for sizing by ``events`` (measured, see _days_for).
_EST_MM, _EST_TF, _EST_LV = 241.0, 18.5, 13.5


def _nice_up(x: float) -> float:
    """Round up to two significant digits (limits people type: 0.15, 2.5, 12000)."""
    if x <= 0:
        return 0.0
    e = math.floor(math.log10(x)) - 1
    if e >= 0:
        return float(math.ceil(x / 10**e - 1e-9) * 10**e)
    return math.ceil(x * 10**-e - 1e-9) / 10**-e


class _Symbol:
    __slots__ = ("ema", "holders", "index", "name", "offset", "p0", "price", "sigma")

    def __init__(self, index: int, name: str, price: float, sigma: float, offset: int) -> None:
        self.index = index
        self.name = name
        self.price = price
        self.p0 = price
        self.ema = price
        self.sigma = sigma
        self.offset = offset
        self.holders: list[_Account] = []


class _Account:
    __slots__ = (
        "blocked", "cash", "equity0", "gross", "halted_day", "id", "in_breach", "incident_days",
        "index", "l_dd", "l_lev", "l_pos", "l_pos_sym", "l_vol", "lev_target", "limit_src",
        "mv", "peak", "pending_guard", "protect", "q", "shadow_q", "special", "style",
        "symbols", "trades_per_day", "vol", "vol_day", "vol_shadow", "weights",
    )  # fmt: skip

    def __init__(self, index: int, style: str, symbols: list[_Symbol], equity0: float) -> None:
        self.index = index
        self.id = f"ACC-{index + 1:03d}"
        self.style = style
        self.symbols = symbols
        self.equity0 = equity0
        self.cash = 0.0
        self.mv = 0.0  # sum of q * mark
        self.gross = 0.0  # sum of |q| * mark
        self.peak = 0.0
        self.q: dict[str, float] = {s.name: 0.0 for s in symbols}
        self.shadow_q: dict[str, float] = {}  # busted trades' quantities (as if never busted)
        self.vol = 0.0
        self.vol_day = -1
        self.vol_shadow = 0.0
        self.l_pos: float | None = None
        self.l_pos_sym: dict[str, float] = {}
        self.l_vol: float | None = None
        self.l_dd: float | None = None
        self.l_lev: float | None = None
        self.limit_src: dict[tuple[str, str | None], tuple[int, str]] = {}
        self.in_breach: dict[tuple[str, str | None], dict[str, Any]] = {}
        self.protect: set[str] = set()  # limit types an armed incident owns (no guard)
        self.pending_guard: set[str] = set()
        self.blocked = False
        self.halted_day = -1
        self.incident_days: set[int] = set()
        self.weights: dict[str, float] = {}
        self.lev_target = 0.0
        self.special: dict[str, float] = {}  # per-symbol target weights that override the style

    def pos_limit(self, sym: str) -> float | None:
        v = self.l_pos_sym.get(sym)
        return self.l_pos if v is None else v

    def equity(self) -> float:
        return self.cash + self.mv


@dataclass
class _Ev:
    """The event that moved a metric (what a breach records as its trigger)."""

    event_id: int
    kind: int
    bus: int
    rec: int
    correlation: str
    trade_id: str | None = None


@dataclass(frozen=True)
class Simulation:
    """A generated history and its answer key.

    Attributes
    ----------
    envelopes : every event, in recorded-time order (the file's order, and the order a
        store records them in); ``sequence`` is each aggregate's version 1, 2, 3, ...
    answer_key : JSON-ready dict: ``seed``, ``params``, ``incidents`` (one dict per
        planted incident), ``complete``, ``counts``, ``accounts``, ``symbols``,
        ``awkward`` (late trades, busts, the split, the mismatched adjustment), ``notes``.
    """

    envelopes: list[Envelope]
    answer_key: dict[str, Any]


@dataclass(frozen=True)
class _Params:
    seed: int
    accounts: int
    symbols: int
    days: int
    events: int | None
    start_day: int  # days since the epoch of the first trading day


def _params(
    seed: int, accounts: int, symbols: int, days: int, events: int | None, start: datetime | None
) -> _Params:
    for name, value in (("seed", seed), ("accounts", accounts), ("symbols", symbols),
                        ("days", days), ("events", events)):  # fmt: skip
        if (value is not None or name != "events") and (
            not isinstance(value, int) or isinstance(value, bool)
        ):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if seed < 0:  # Random(-3) is Random(3): the same history, the same event ids
        raise ValueError(f"seed must be >= 0, got {seed}")
    if start is not None and not isinstance(start, datetime):
        raise ValueError(f"start must be a datetime, got {type(start).__name__}")
    if accounts < 5:
        raise ValueError(f"accounts must be >= 5 (five planted incidents), got {accounts}")
    if symbols < 3:
        raise ValueError(f"symbols must be >= 3, got {symbols}")
    most = f"{MAX_EVENTS:,}"
    if events is not None:
        if events < 1:
            raise ValueError(f"events must be >= 1, got {events}")
        if events > MAX_EVENTS:
            raise ValueError(f"events must be at most {most}, got {events:,}")
        days = _days_for(events, accounts, symbols)
    if days < 3:
        raise ValueError(f"days must be >= 3, got {days}")
    # the smallest history of these sizes (three days) must fit, then the days asked
    per_day = _per_day(accounts, symbols)
    if 3 * per_day > MAX_EVENTS:
        raise ValueError(
            f"{accounts:,} accounts and {symbols:,} symbols make about {per_day:,.0f} events "
            f"a trading day: more than {most} in three days; ask for fewer"
        )
    if events is None and days * per_day > MAX_EVENTS:
        raise ValueError(
            f"days must be at most {int(MAX_EVENTS // per_day):,} with {accounts:,} accounts "
            f"and {symbols:,} symbols (about {per_day:,.0f} events a day, at most {most} "
            f"events), got {days:,}"
        )
    start = DEFAULT_START if start is None else start
    if start.tzinfo is None:
        raise ValueError("start must carry a time zone")
    try:
        d = _us(start.astimezone(UTC)) // _DAY
    except OverflowError:
        raise ValueError(
            f"start {start.isoformat()}: in UTC it is outside the years 1 to 9999"
        ) from None
    while (d + 3) % 7 >= 5:  # 1970-01-01 was a Thursday: (d + 3) % 7 is 0 on Mondays
        d += 1
    # Everything happens by the morning after the last trading day (late bookings of
    # the last evening, the key's "end" at midnight): that day must still be in 9999.
    if _nth_weekday(d, days) + 1 > _LAST_DAY:
        first = _format_day(d) if d <= _LAST_DAY else "the first weekday after it"
        why = f"{days:,} trading days" + ("" if events is None else f" (for {events:,} events)")
        raise ValueError(
            f"start {start.date().isoformat()}: {why} from {first} run past the year 9999; "
            "start earlier or ask for fewer"
        )
    return _Params(seed, accounts, symbols, days, events, d)


_LAST_DAY = (datetime(9999, 12, 31, tzinfo=UTC) - _EPOCH).days
"""9999-12-31, the last day a time can have, in days since the epoch."""


def _format_day(d: int) -> str:
    return _ts(d * _DAY)[:10]


def _nth_weekday(d: int, n: int) -> int:
    """The ``n``-th weekday (1-based) counting from weekday ``d`` (days since the epoch)."""
    weeks, extra = divmod(n - 1, 5)
    last = d + 7 * weeks + extra
    if (d + 3) % 7 + extra >= 5:  # went over a weekend
        last += 2
    return last


def _style_counts(accounts: int) -> tuple[int, int, int]:
    """How many accounts of each style (styles cycle MM, TF, LV)."""
    k, r = divmod(accounts, 3)
    return k + (r > 0), k + (r > 1), k


def _per_day(accounts: int, symbols: int) -> float:
    """Expected events per trading day."""
    mm, tf, lv = _style_counts(accounts)
    return symbols * _MARKS_PER_DAY + mm * _EST_MM + tf * _EST_TF + lv * _EST_LV


def _days_for(events: int, accounts: int, symbols: int) -> int:
    """Trading days whose expected event count is closest to ``events`` (at least 3)."""
    return max(3, round(events / _per_day(accounts, symbols)))


# ---------------------------------------------------------------------- generator


class _Generator:
    """Runs the simulated world day by day, in business-time order, and records events.

    Every metric of DESIGN.md §4--§5 is followed exactly as a fold over the events in
    their canonical order (business time, recorded time, position) would compute it;
    each breach start is matched against the planted incidents.
    """

    def __init__(self, p: _Params) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        # Blocks of breaches that reach the critical level after their start, and the
        # unblocks they need, draw from their own stream: the rest of the history is
        # the same whether or not a breach gets there.
        self.rng_crit = random.Random(f"critical:{p.seed}")
        self.order = 0
        self.out: list[Record] = []  # recorded but not yet flushed
        self.agg_seq: dict[str, int] = {}
        self.counts: Counter[str] = Counter()
        self.trade_no = 0
        self.fund_no = 0
        self.limit_no = 0
        self.heap: list[tuple[int, int, int, Callable[..., None], Any]] = []
        self.d = 0
        self.day_us = 0
        self.date = ""
        self.unplanned: list[dict[str, Any]] = []
        self.late: list[dict[str, Any]] = []
        self.busts: list[dict[str, Any]] = []
        self.split_info: dict[str, Any] | None = None
        self.mismatch: dict[str, Any] | None = None
        self.forced_bust_done = False
        rng = self.rng
        days: list[int] = []
        d = p.start_day
        while len(days) < p.days:
            if (d + 3) % 7 < 5:
                days.append(d)
            d += 1
        self.days = days
        # symbols
        self.symbols: list[_Symbol] = []
        for i in range(p.symbols):
            name = _TICKERS[i] if i < len(_TICKERS) else f"S{i + 1:04d}"
            price = round(rng.uniform(20.0, 400.0), 2)
            sigma = rng.uniform(0.010, 0.022) / math.sqrt(_MARKS_PER_DAY)
            offset = (i * 7919) % 300 * _US  # distinct whole seconds within the 5 minutes
            self.symbols.append(_Symbol(i, name, price, sigma, offset))
        self.first_prices = [s.price for s in self.symbols]
        self.by_name = {s.name: s for s in self.symbols}
        # accounts: incident accounts first (styles MM, TF, LV, MM, TF), then background
        syms = self.symbols
        self.accounts: list[_Account] = []
        for i in range(p.accounts):
            style = _STYLES[i % 3]
            if i < 5:
                chosen = self._incident_symbols(i)
            else:
                k = {MM: rng.randint(2, 3), TF: rng.randint(2, 4), LV: rng.randint(2, 3)}[style]
                chosen = rng.sample(syms, min(k, len(syms)))
                chosen.sort(key=lambda s: s.index)
            base = {MM: (1.5, 3.0), TF: (4.0, 6.0), LV: (0.8, 1.5)}[style]
            equity0 = round(rng.uniform(*base), 1) * 1_000_000
            acct = _Account(i, style, chosen, equity0)
            for s in chosen:
                s.holders.append(acct)
            self.accounts.append(acct)
        self.a_ff, self.a_dd, self.a_lev, self.a_vol, self.a_bust = self.accounts[:5]
        self.s_ff = syms[0]
        self.s_dd = syms[2]
        self.s_split = syms[3] if len(syms) > 3 else syms[1]
        self.s_bust = min(
            (s for s in self.a_bust.symbols if s is not self.s_split), key=lambda s: s.price
        )
        n = p.days

        def at(frac: float, lo: int = 1) -> int:
            return min(n - 1, max(lo, round(n * frac)))

        self.day_ff = at(0.3)
        self.day_vol = at(0.4)
        self.day_dd = at(0.5)
        self.day_bust = at(0.6)
        self.day_lev = at(0.7, 2)
        self.day_lev0 = max(1, self.day_lev - 3)
        self.day_split = at(0.8, 2)
        self.day_mismatch = n - 1
        self.a_ff.incident_days.add(self.day_ff)
        self.a_vol.incident_days.add(self.day_vol)
        self.a_dd.incident_days.update({self.day_dd - 1, self.day_dd})
        self.a_lev.incident_days.update(range(self.day_lev0, self.day_lev + 1))
        self.a_bust.incident_days.add(self.day_bust)
        self.incidents: list[dict[str, Any]] = []
        self.armed: dict[tuple[str, str, str | None], dict[str, Any]] = {}
        self.spiral_active = False
        self.spiral_start_price = 0.0
        self._vol_inc: dict[str, Any] = {}
        self._ff = (0.0, 0.0)  # the fat-finger quantity, the position before it

    def _incident_symbols(self, i: int) -> list[_Symbol]:
        """The books of the five incident accounts. The spiral symbol (s[2]) is the
        drawdown account's alone, and the split symbol (s[3], or s[1] with three symbols)
        is never in the creeping leveraged book (the desks go flat in it the evening
        before the split); the busted-trade account holds it, to be split."""
        s = self.symbols
        split = s[3] if len(s) > 3 else s[1]
        return {
            0: [s[0], s[1]],  # fat finger on s[0]
            1: [s[1], s[2]],  # drawdown spiral on s[2]
            2: [s[0], s[1]] if len(s) > 3 else [s[0]],  # leverage creep
            3: [s[0], s[1]],  # daily volume
            4: [s[0], s[1]] + ([split] if len(s) > 3 else []),  # busted trade, split holder
        }[i]

    # ------------------------------------------------------------------ recording

    def _new_id(self) -> int:
        return (self.rng.getrandbits(128) & _UUID_MASK) | _UUID_V4

    def _record(
        self,
        rec_us: int,
        agg: str,
        kind: int,
        cause: int | None,
        corr: str,
        meta: int,
        values: tuple[Any, ...],
        rng: random.Random | None = None,
    ) -> int:
        eid = self._new_id() if rng is None else (rng.getrandbits(128) & _UUID_MASK) | _UUID_V4
        self.order += 1
        self.out.append((rec_us, self.order, eid, agg, kind, cause, corr, meta, values))
        return eid

    def _push(self, bus: int, rec: int, fn: Callable[..., None], arg: Any) -> None:
        self.order += 1
        heapq.heappush(self.heap, (bus, rec, self.order, fn, arg))

    def _flush(self, before: int | None) -> list[tuple[Record, int]]:
        out = self.out
        out.sort()
        cut = len(out) if before is None else bisect.bisect_left(out, before, key=_rec_time)
        done, self.out = out[:cut], out[cut:]
        seqs = self.agg_seq
        counts = self.counts
        batch = []
        for r in done:
            agg = r[3]
            n = seqs.get(agg, 0) + 1
            seqs[agg] = n
            counts[_KINDS[r[4]]] += 1
            batch.append((r, n))
        return batch

    def _latency(self, lo_ms: int, hi_ms: int, rng: random.Random | None = None) -> int:
        return lo_ms * 1000 + int((rng or self.rng).random() * (hi_ms - lo_ms) * 1000)

    # ------------------------------------------------------------------ running

    def run(self) -> Iterator[list[tuple[Record, int]]]:
        """Yield batches of (record, sequence) in recorded-time order, day by day."""
        for d, day in enumerate(self.days):
            self.d = d
            self.day_us = day * _DAY
            self.date = _ts(self.day_us)[:10]
            self._plan_day()
            heap = self.heap
            pop = heapq.heappop
            while heap:
                bus, rec, _, fn, arg = pop(heap)
                fn(bus, rec, arg)
            self._end_day()
            nxt = self.days[d + 1] * _DAY if d + 1 < len(self.days) else None
            if nxt is not None:
                yield self._flush(nxt)
        yield self._flush(None)
        missing = [i["kind"] for i in self.incidents if i.get("started_at") is None]
        if missing or len(self.incidents) != 5:
            raise RuntimeError(
                f"planted incidents did not happen: {missing or 'some'} "
                f"(seed {self.p.seed}); please report this seed and these parameters"
            )

    def _plan_day(self) -> None:
        rng = self.rng
        d = self.d
        t0 = self.day_us
        if d == 0:
            self._plan_setup()
        else:
            self._plan_flows_and_reviews()
        # marks
        for s in self.symbols:
            for k in range(_MARKS_PER_DAY):
                t = t0 + _OPEN + s.offset + k * _MARK_EVERY
                self._push(t, t + self._latency(5, 60), self._on_mark, s)
        # trading opportunities
        lo, hi = t0 + _OPEN + _MIN, t0 + _CLOSE - _MIN
        for a in self.accounts:
            base = {MM: _MM_TRADES, TF: _TF_TRADES, LV: _LV_TRADES}[a.style]
            n = int(base * rng.uniform(0.85, 1.15))
            if a.style == LV:
                self._lv_weights(a)
            late_ok = a.style != MM and d not in a.incident_days
            for _ in range(n):
                t = lo + int(rng.random() * (hi - lo))
                late = late_ok and rng.random() < 0.006
                rec = self._late_rec(t) if late else t + self._latency(20, 400)
                self._push(t, rec, self._on_opportunity, (a, late))
        self._plan_incidents()

    def _late_rec(self, t: int) -> int:
        """A trade booked late: a few hours later, or the next trading morning."""
        d = self.d
        if t < self.day_us + 17 * _HOUR or d + 1 >= len(self.days):
            return t + self.rng.randrange(2 * _HOUR, 4 * _HOUR)
        return self.days[d + 1] * _DAY + 13 * _HOUR + self.rng.randrange(0, 30 * _MIN)

    def _end_day(self) -> None:
        end = self.day_us + _DAY
        for a in self.accounts:
            br = a.in_breach.get((MDV, None))
            if br is not None:
                self._end_breach(a, (MDV, None), br, end, None)
            a.vol_shadow = 0.0
            # re-sum exposure once a day so float drift cannot build up over years
            mv = gross = 0.0
            for s in a.symbols:
                q = a.q[s.name]
                mv += q * s.price
                gross += abs(q) * s.price
            a.mv, a.gross = mv, gross

    # ------------------------------------------------------------------ setup

    def _plan_setup(self) -> None:
        rng = self.rng
        t0 = self.day_us
        for a in self.accounts:
            t = t0 + 13 * _HOUR + a.index * _MIN + rng.randrange(0, 50 * _US)
            self._push(t, t + self._latency(200, 2000), self._on_funding, (a, a.equity0))
        for a in self.accounts:
            person = rng.choice(_RISK_PEOPLE)
            t = t0 + 13 * _HOUR + 30 * _MIN + a.index * _MIN + rng.randrange(0, 50 * _US)
            for lt, sym, value in self._initial_limits(a):
                t += rng.randrange(5 * _US, 20 * _US)
                self._push(
                    t, t + self._latency(200, 2000), self._on_limit, (a, lt, sym, value, person)
                )

    def _initial_limits(self, a: _Account) -> list[tuple[str, str | None, float]]:
        rng = self.rng
        e = a.equity0
        pmin = min(s.price for s in a.symbols)
        if a.style == MM:
            pos = 0.08 * e / pmin / 0.45
            vol = _MM_TRADES * 2.6 * 0.004 * e / pmin * 2.2
            lev, dd = 4.0, 0.15
        elif a.style == TF:
            pos = 0.3 * e / pmin / 0.45
            vol = _TF_TRADES * 0.025 * e / pmin * 2.5
            lev, dd = 2.0, 0.2
        else:
            pos = 1.2 * e / pmin / 0.45
            vol = _LV_TRADES * 0.08 * e / pmin * 2.5
            lev, dd = 3.0, 0.3
        if a is self.a_dd:
            lev, dd = 3.0, 0.12
        if a is self.a_lev:
            pos *= 3.0
            vol *= 3.0
        if a is self.a_bust:
            lev = 3.0
        out: list[tuple[str, str | None, float]] = [
            (MPS, None, _nice_up(pos)),
            (MDV, None, _nice_up(vol)),
            (MDD, None, dd),
            (MLV, None, lev),
        ]
        if a is self.a_ff:
            cap = 0.08 * e / self.s_ff.price
            out.append((MPS, self.s_ff.name, _nice_up(cap * 2.5)))
        elif a.index >= 5 and rng.random() < 0.35:
            s = rng.choice(a.symbols)
            cap = {MM: 0.08, TF: 0.3, LV: 1.2}[a.style] * e / s.price
            out.append((MPS, s.name, _nice_up(cap / 0.4)))
        return out

    def _plan_flows_and_reviews(self) -> None:
        """Deposits, withdrawals and limit reviews before the open."""
        rng = self.rng
        t0 = self.day_us + 13 * _HOUR
        for a in self.accounts:
            if self.d in a.incident_days:
                continue
            r = rng.random()
            forced = (self.d == 1 and a is self.accounts[-1]) or (
                self.d == 2 and a is self.accounts[-2]
            )
            if r < 0.04 or forced:
                t = t0 + rng.randrange(0, 20 * _MIN)
                self._push(t, t + self._latency(200, 2000), self._on_flow, (a, forced))
            elif r < 0.09:
                t = t0 + 20 * _MIN + rng.randrange(0, 20 * _MIN)
                self._push(t, t + self._latency(200, 2000), self._on_review, a)

    def _on_flow(self, t: int, rec: int, arg: tuple[_Account, bool]) -> None:
        """A deposit or, if the account is well inside its limits, a withdrawal (the
        second forced one of a history always tries a withdrawal)."""
        a, forced = arg
        rng = self.rng
        eq = a.equity()
        dd = self._drawdown(a)
        lev = self._leverage(a)
        withdraw = rng.random() < 0.4 or (forced and self.d == 2)
        if (
            withdraw
            and a.l_dd is not None
            and dd < 0.3 * a.l_dd
            and a.l_lev is not None
            and lev < 0.4 * a.l_lev
        ):
            amount = -round(eq * rng.uniform(0.02, 0.08), -3)
        else:
            amount = round(eq * rng.uniform(0.03, 0.15), -3)
        if amount == 0:
            return
        self._on_funding(t, rec, (a, amount))

    def _on_review(self, t: int, rec: int, a: _Account) -> None:
        """A named person changes one limit by -20 % .. +30 % (never below 2x the metric)."""
        rng = self.rng
        lt = rng.choice((MPS, MDV, MDD, MLV))
        if lt in a.protect:
            return
        sym: str | None = None
        if lt == MPS:
            if a.l_pos_sym and rng.random() < 0.5:
                sym = rng.choice(sorted(a.l_pos_sym))
                old = a.l_pos_sym[sym]
            else:
                old = a.l_pos or 0.0
        else:
            old = {MDV: a.l_vol, MDD: a.l_dd, MLV: a.l_lev}[lt] or 0.0
        if old <= 0:
            return
        new = _nice_up(old * rng.uniform(0.8, 1.3))
        if lt == MDD:
            new = min(new, 0.95)
        if new < old:
            if lt == MPS:
                worst = max(
                    (
                        abs(a.q[s.name]) + abs(a.shadow_q.get(s.name, 0.0))
                        for s in a.symbols
                        if (sym is None and s.name not in a.l_pos_sym) or s.name == sym
                    ),
                    default=0.0,
                )
            elif lt == MDV:
                worst = a.vol + a.vol_shadow if a.vol_day == self.d else 0.0
            elif lt == MDD:
                worst = self._drawdown(a)
            else:
                worst = self._leverage(a)
            if worst > 0.5 * new:
                return
        self._on_limit(t, rec, (a, lt, sym, new, rng.choice(_RISK_PEOPLE)))

    # ------------------------------------------------------------------ handlers

    def _on_funding(self, t: int, rec: int, arg: tuple[_Account, float]) -> None:
        a, amount = arg
        self.fund_no += 1
        corr = f"fund-{self.fund_no:06d}"
        eid = self._record(rec, a.id, K_FUND, None, corr, M_TREASURY, (a.id, amount, t))
        a.cash += amount
        a.peak += amount
        self._eval_account(a, t, _Ev(eid, K_FUND, t, rec, corr))

    def _on_limit(
        self, t: int, rec: int, arg: tuple[_Account, str, str | None, float, str]
    ) -> None:
        a, lt, sym, value, person = arg
        self._set_limit(a, lt, sym, value, person, t, rec)

    def _set_limit(
        self,
        a: _Account,
        lt: str,
        sym: str | None,
        value: float,
        person: str,
        t: int,
        rec: int,
        *,
        cause: int | None = None,
        corr: str | None = None,
    ) -> int:
        if corr is None:
            self.limit_no += 1
            corr = f"lim-{self.limit_no:06d}"
        eid = self._record(
            rec, a.id, K_LIMIT, cause, corr, M_CONSOLE, (a.id, lt, value, person, t, sym)
        )
        a.limit_src[(lt, sym)] = (eid, person)
        ev = _Ev(eid, K_LIMIT, t, rec, corr)
        if lt == MPS:
            if sym is None:
                a.l_pos = value
                for s in a.symbols:
                    if s.name not in a.l_pos_sym:
                        self._eval_position(a, s.name, t, ev)
            else:
                a.l_pos_sym[sym] = value
                self._eval_position(a, sym, t, ev)
        elif lt == MDV:
            a.l_vol = value
            if a.vol_day == self.d:
                self._eval_volume(a, t, ev)
        elif lt == MDD:
            a.l_dd = value
            a.pending_guard.discard(MDD)
            self._eval_account(a, t, ev)
        else:
            a.l_lev = value
            a.pending_guard.discard(MLV)
            self._eval_account(a, t, ev)
        return eid

    def _on_mark(self, t: int, rec: int, s: _Symbol) -> None:
        rng = self.rng
        old = s.price
        drift = -0.0001 * math.log(old / s.p0)  # slow pull back towards the first price
        if t < self.day_us + _OPEN + _MARK_EVERY:
            drift += rng.gauss(0.0, 0.004)  # overnight gap
        noise = s.sigma * rng.gauss(0.0, 1.0)
        if self.spiral_active and s is self.s_dd:
            drift -= 0.004
            noise *= 0.25  # a steady sell-off
        new = round(old * math.exp(drift + noise), 2)
        if self.spiral_active and s is self.s_dd:
            new = self._spiral_gap(old, new)
        if new < 0.01:
            new = 0.01
        self._mark(s, new, t, rec)

    def _spiral_gap(self, old: float, new: float) -> float:
        """The mark that takes the spiral over its limit gaps through it (by ~4 %), so
        that the breach cannot flicker back on the next mark."""
        a, s = self.a_dd, self.s_dd
        inc = self.armed.get((a.id, MDD, None))
        q = a.q[s.name]
        if inc is None or inc.get("started_at") is not None or q <= 0 or a.l_dd is None:
            return new
        peak = max(a.peak, a.equity())
        lowest = peak * (1.0 - 1.04 * a.l_dd)  # equity at 1.04 x the limit
        eq_new = a.equity() + q * (new - old)
        if peak > 0 and (peak - eq_new) / peak > a.l_dd and eq_new > lowest:
            new = math.floor((old + (lowest - a.equity()) / q) * 100) / 100
        return new

    def _mark(self, s: _Symbol, new: float, t: int, rec: int, corr: str | None = None) -> None:
        old = s.price
        s.price = new
        s.ema += (new - s.ema) / 48.0
        corr = corr or f"px-{s.name}-{self.date}"
        eid = self._record(rec, s.name, K_MARK, None, corr, M_PRICING, (s.name, new, t))
        delta = new - old
        if delta == 0.0:
            return
        ev: _Ev | None = None
        name = s.name
        for a in s.holders:
            q = a.q[name]
            if q:
                a.mv += q * delta
                a.gross += abs(q) * delta
                if ev is None:
                    ev = _Ev(eid, K_MARK, t, rec, corr)
                self._eval_account(a, t, ev)

    def _on_opportunity(self, t: int, rec: int, arg: tuple[_Account, bool]) -> None:
        a, late = arg
        if a.blocked or a.halted_day == self.d:
            return
        style = a.style
        if style == MM:
            order = self._mm_order(a)
        elif style == TF:
            if a is self.a_dd and self.spiral_active:
                self._spiral_weight()
            order = self._tf_order(a)
        else:
            order = self._lv_order(a, t)
        if order is None:
            return
        s, qty, price = order
        if not self._allowed(a, s, qty, price):
            return
        bust = (
            style != LV
            and not late
            and self.d not in a.incident_days
            and (
                self.rng.random() < 0.003
                or (not self.forced_bust_done and self.d >= 1 and style == MM)
            )
        )
        if bust:
            self.forced_bust_done = True
        ev = self._emit_trade(a, s, qty, price, t, rec, M_LATE if late else M_OMS)
        if late:
            self.late.append(
                {
                    "event_id": str(uuid.UUID(int=ev.event_id)),
                    "trade_id": ev.trade_id,
                    "account_id": a.id,
                    "executed_at": _ts(t),
                    "recorded_at": _ts(rec),
                }
            )
        if bust:
            self._plan_bust(a, s, qty, ev, self.rng.choice(_BUST_REASONS))
        else:
            self._apply_trade(a, s, qty, price, t, ev)

    # ------------------------------------------------------------------ styles

    def _mm_order(self, a: _Account) -> tuple[_Symbol, float, float] | None:
        rng = self.rng
        s = a.symbols[int(rng.random() * len(a.symbols))]
        ref = s.price
        lot = max(1, round(0.004 * a.equity0 / ref))
        qty = lot * _MM_LOTS[int(rng.random() * 7)]
        cap = 0.08 * a.equity0 / ref
        q = a.q[s.name]
        lean = max(-1.0, min(1.0, q / cap))
        if rng.random() < 0.5 - 0.45 * lean:
            price = round(ref * (1.0 - 0.0001 * (1.0 + rng.random())), 2)
            return s, float(qty), price
        price = round(ref * (1.0 + 0.0001 * (1.0 + rng.random())), 2)
        return s, -float(qty), price

    def _scale(self, a: _Account) -> float:
        if a.l_dd is None or a.l_dd <= 0:
            return 1.0
        dd = self._drawdown(a)
        if dd < 0.35 * a.l_dd:
            return 1.0
        return 0.5 if dd < 0.55 * a.l_dd else 0.2

    def _tf_order(self, a: _Account) -> tuple[_Symbol, float, float] | None:
        rng = self.rng
        s = a.symbols[int(rng.random() * len(a.symbols))]
        if a.special and rng.random() < 0.5:
            s = self.by_name[next(iter(a.special))]
        ref = s.price
        eq = a.equity()
        w = a.special.get(s.name)
        if w is None:
            signal = ref / s.ema - 1.0
            w = max(-0.3, min(0.3, signal * 8.0)) * self._scale(a)
            if a.special:
                w = max(-0.15, min(0.15, w))
        target = w * eq / ref
        q = a.q[s.name]
        diff = target - q
        chunk = (0.1 if s.name in a.special else 0.025) * a.equity0 / ref
        if abs(diff) < 0.3 * chunk:
            return None
        qty = float(max(1, round(min(abs(diff), chunk))))
        if diff > 0:
            return s, qty, round(ref * 1.0002, 2)
        return s, -qty, round(ref * 0.9998, 2)

    def _lv_weights(self, a: _Account) -> None:
        """Each morning the book's weights drift towards a new random mix (mostly long)."""
        if (a.id, MLV, None) in self.armed:
            return  # the creeping account keeps its long book
        rng = self.rng
        raw = [rng.uniform(0.2, 1.0) * (1 if rng.random() < 0.85 else -1) for _ in a.symbols]
        if a.weights:
            raw = [0.3 * x + 0.7 * a.weights[s.name] for s, x in zip(a.symbols, raw, strict=True)]
        total = sum(abs(x) for x in raw) or 1.0
        a.weights = {s.name: x / total for s, x in zip(a.symbols, raw, strict=True)}
        if a.lev_target == 0.0:
            a.lev_target = rng.uniform(1.4, 1.8)

    def _lv_order(self, a: _Account, now: int) -> tuple[_Symbol, float, float] | None:
        rng = self.rng
        s = a.symbols[int(rng.random() * len(a.symbols))]
        ref = s.price
        eq = a.equity()
        g = a.lev_target
        creep = self.armed.get((a.id, MLV, None))
        if creep is not None and creep.get("started_at") is None:
            start, end, g_top = creep["_creep"]
            frac = min(1.0, max(0.0, (now - start) / (end - start)))
            g = a.lev_target + (g_top - a.lev_target) * frac
        else:
            g *= self._scale(a)
        target = a.weights[s.name] * g * eq / ref
        q = a.q[s.name]
        diff = target - q
        chunk = 0.08 * a.equity0 / ref
        if abs(diff) < 0.25 * chunk:
            return None
        qty = float(max(1, round(min(abs(diff), chunk))))
        if diff > 0:
            return s, qty, round(ref * 1.0003, 2)
        return s, -qty, round(ref * 0.9997, 2)

    # ------------------------------------------------------------------ trades

    def _allowed(self, a: _Account, s: _Symbol, qty: float, price: float) -> bool:
        """Pre-trade check of a background trade: stay under 70 % of every limit."""
        name = s.name
        q = a.q[name]
        q2 = q + qty
        lim = a.pos_limit(name)
        if lim is not None:
            cap = _PRE_TRADE * lim
            if abs(q2) > cap and abs(q2) > abs(q):
                return False
            sh = a.shadow_q.get(name)
            if sh and abs(q2 + sh) > cap and abs(q2 + sh) > abs(q + sh):
                return False
        if a.l_vol is not None:
            vol = a.vol + a.vol_shadow if a.vol_day == self.d else 0.0
            if vol + abs(qty) > _PRE_TRADE * a.l_vol:
                return False
        if a.l_lev is not None and MLV not in a.protect:
            mark = s.price
            gross2 = a.gross + (abs(q2) - abs(q)) * mark
            eq2 = a.cash + a.mv + qty * (mark - price)
            if gross2 > a.gross and gross2 > _PRE_TRADE * a.l_lev * eq2:
                return False
        return True

    def _emit_trade(
        self, a: _Account, s: _Symbol, qty: float, price: float, t: int, rec: int, meta: int
    ) -> _Ev:
        self.trade_no += 1
        n = self.trade_no
        tid = f"T-{n:08d}"
        corr = f"ord-{n:08d}"
        side = "Buy" if qty > 0 else "Sell"
        eid = self._record(
            rec, a.id, K_TRADE, None, corr, meta, (tid, a.id, s.name, side, abs(qty), price, t)
        )
        return _Ev(eid, K_TRADE, t, rec, corr, tid)

    def _apply_trade(
        self, a: _Account, s: _Symbol, qty: float, price: float, t: int, ev: _Ev
    ) -> None:
        name = s.name
        q = a.q[name]
        q2 = q + qty
        a.q[name] = q2
        mark = s.price
        a.cash -= qty * price
        a.mv += qty * mark
        a.gross += (abs(q2) - abs(q)) * mark
        if a.vol_day != self.d:
            a.vol_day = self.d
            a.vol = 0.0
        a.vol += abs(qty)
        self._eval_position(a, name, t, ev)
        self._eval_volume(a, t, ev)
        self._eval_account(a, t, ev)

    def _plan_bust(self, a: _Account, s: _Symbol, qty: float, ev: _Ev, reason: str) -> int:
        """Record a trade that will be busted: it never moves the books (busts remove it).

        Until the bust is recorded, whoever reads the history (the live engine, a
        ``known_at`` view) sees the trade: its quantity is kept as the account's
        "shadow", which pre-trade checks count too.
        """
        a.shadow_q[s.name] = a.shadow_q.get(s.name, 0.0) + qty
        if a.vol_day != self.d:
            a.vol_day = self.d
            a.vol = 0.0
        a.vol_shadow += abs(qty)
        delay = self.rng.randrange(5 * _MIN, 60 * _MIN) if a is not self.a_bust else 40 * _MIN
        t = ev.bus + delay
        rec = t + self._latency(200, 1500)
        eid = self._record(
            rec,
            a.id,
            K_CANCEL,
            ev.event_id,
            ev.correlation,
            M_OMS,
            (ev.trade_id, a.id, reason, t),
        )
        self._push(rec, rec, self._bust_known, (a, s.name, qty, self.d))
        self.busts.append(
            {
                "event_id": str(uuid.UUID(int=eid)),
                "trade_id": ev.trade_id,
                "trade_event_id": str(uuid.UUID(int=ev.event_id)),
                "account_id": a.id,
                "cancelled_at": _ts(t),
                "recorded_at": _ts(rec),
            }
        )
        return eid

    def _bust_known(self, t: int, rec: int, arg: tuple[_Account, str, float, int]) -> None:
        a, sym, qty, day = arg
        left = a.shadow_q.get(sym, 0.0) - qty
        if left:
            a.shadow_q[sym] = left
        else:
            a.shadow_q.pop(sym, None)
        if day == self.d:
            a.vol_shadow -= abs(qty)

    # ------------------------------------------------------------------ metrics

    @staticmethod
    def _drawdown(a: _Account) -> float:
        eq = a.cash + a.mv
        peak = a.peak if a.peak > eq else eq
        return (peak - eq) / peak if peak > 0 else 0.0

    @staticmethod
    def _leverage(a: _Account) -> float:
        eq = a.cash + a.mv
        if eq > 0:
            return a.gross / eq
        return math.inf if a.gross > 0 else 0.0

    def _eval_position(self, a: _Account, sym: str, t: int, ev: _Ev) -> None:
        lim = a.pos_limit(sym)
        key = (MPS, sym)
        br = a.in_breach.get(key)
        m = abs(a.q[sym])
        if br is None:
            if lim is not None and m > lim:
                self._start_breach(
                    a, key, m, lim, (MPS, sym if sym in a.l_pos_sym else None), t, ev
                )
        elif lim is None or m <= lim:
            self._end_breach(a, key, br, t, ev)
        else:
            self._still_breached(a, br, m, lim, ev)

    def _eval_volume(self, a: _Account, t: int, ev: _Ev) -> None:
        lim = a.l_vol
        key = (MDV, None)
        br = a.in_breach.get(key)
        m = a.vol if a.vol_day == self.d else 0.0
        if br is None:
            if lim is not None and m > lim:
                self._start_breach(a, key, m, lim, (MDV, None), t, ev)
        elif lim is None or m <= lim:
            self._end_breach(a, key, br, t, ev)
        else:
            self._still_breached(a, br, m, lim, ev)

    def _eval_account(self, a: _Account, t: int, ev: _Ev) -> None:
        eq = a.cash + a.mv
        if eq > a.peak:
            a.peak = eq
        peak = a.peak
        dd = (peak - eq) / peak if peak > 0 else 0.0
        gross = a.gross
        lev = gross / eq if eq > 0 else (math.inf if gross > 0 else 0.0)
        lim = a.l_dd
        if lim is not None:
            br = a.in_breach.get((MDD, None))
            if br is None:
                if dd > lim:
                    self._start_breach(a, (MDD, None), dd, lim, (MDD, None), t, ev)
                elif dd > _GUARD * lim:
                    self._guard(a, MDD, dd, t)
            elif dd <= lim:
                self._end_breach(a, (MDD, None), br, t, ev)
            else:
                self._still_breached(a, br, dd, lim, ev)
        lim = a.l_lev
        if lim is not None:
            br = a.in_breach.get((MLV, None))
            if br is None:
                if lev > lim:
                    self._start_breach(a, (MLV, None), lev, lim, (MLV, None), t, ev)
                elif lev > _GUARD * lim:
                    self._guard(a, MLV, lev, t)
            elif lev <= lim:
                self._end_breach(a, (MLV, None), br, t, ev)
            else:
                self._still_breached(a, br, lev, lim, ev)

    def _guard(self, a: _Account, lt: str, metric: float, t: int) -> None:
        """A risk officer raises a background limit that a metric is getting close to."""
        if lt in a.protect or lt in a.pending_guard:
            return
        a.pending_guard.add(lt)
        value = _nice_up(metric / 0.55)
        if lt == MDD:
            value = min(0.95, value)
        t2 = t + 2 * _MIN
        self._push(
            t2,
            t2 + self._latency(500, 5000),
            self._on_limit,
            (a, lt, None, value, self.rng.choice(_RISK_PEOPLE)),
        )

    def _start_breach(
        self,
        a: _Account,
        key: tuple[str, str | None],
        metric: float,
        limit: float,
        limit_key: tuple[str, str | None],
        t: int,
        ev: _Ev,
    ) -> None:
        br: dict[str, Any] = {
            "account_id": a.id,
            "limit_type": key[0],
            "symbol": key[1],
            "limit_symbol": limit_key[1],
            "limit_value": limit,
            "started_at": _ts(t),
            "value_at_trigger": metric,
            "peak_value": metric,
            "trigger_event_id": str(uuid.UUID(int=ev.event_id)),
            "trigger_event_type": _KINDS[ev.kind],
            "trigger_trade_id": ev.trade_id,
            "trigger_recorded_at": _ts(ev.rec),
            "ended_at": None,
            "end_event_id": None,
        }
        src = a.limit_src.get(limit_key)
        if src is not None:
            br["limit_event_id"] = str(uuid.UUID(int=src[0]))
            br["limit_set_by"] = src[1]
        incident = self.armed.get((a.id, key[0], key[1]))
        if incident is not None and incident.get("started_at") is None:
            incident.update(br)
            a.in_breach[key] = incident
            self._engine_records(a, incident, ev, metric, limit)
            incident["_on_trigger"](t, ev)
        else:
            a.in_breach[key] = br
            self.unplanned.append(br)

    def _end_breach(
        self, a: _Account, key: tuple[str, str | None], br: dict[str, Any], t: int, ev: _Ev | None
    ) -> None:
        del a.in_breach[key]
        br["ended_at"] = _ts(t)
        br["end_event_id"] = None if ev is None else str(uuid.UUID(int=ev.event_id))

    def _engine_records(
        self, a: _Account, incident: dict[str, Any], ev: _Ev, metric: float, limit: float
    ) -> None:
        """What the live engine recorded when it saw the trigger (DESIGN.md §7)."""
        incident["critical"] = False
        detected = ev.rec + self._latency(2, 15)
        rec = detected + self._latency(1, 3)
        lt = incident["limit_type"]
        eid = self._record(
            rec,
            a.id,
            K_VIOLATION,
            ev.event_id,
            ev.correlation,
            M_ENGINE,
            (a.id, lt, metric, limit, detected, incident["symbol"]),
        )
        incident["violation_event_id"] = str(uuid.UUID(int=eid))
        incident["block_event_id"] = None
        incident["_crit"] = False
        if metric > CRITICAL_RATIO * limit:  # the block recorded after it, as the engine's
            self._critical(a, incident, ev, metric, limit, detected, None, after=rec)

    def _still_breached(
        self, a: _Account, br: dict[str, Any], metric: float, limit: float, ev: _Ev
    ) -> None:
        """An event that leaves a breach open: its peak, and (for a planted incident)
        the critical level as the live engine follows it -- a breach at the level
        ``CRITICAL_RATIO`` starts at the first event where the metric goes over
        ``CRITICAL_RATIO`` x the limit in force, and ends when it is back at or under."""
        if metric > br["peak_value"]:
            br["peak_value"] = metric
        if "_crit" not in br:
            return  # an unplanned breach: no engine records are simulated for it
        over = metric > CRITICAL_RATIO * limit
        if over and not br["_crit"]:
            rng = self.rng_crit
            self._critical(a, br, ev, metric, limit, ev.rec + self._latency(2, 15, rng), rng)
        elif not over:
            br["_crit"] = False

    def _critical(
        self,
        a: _Account,
        incident: dict[str, Any],
        ev: _Ev,
        metric: float,
        limit: float,
        detected: int,
        rng: random.Random | None,
        after: int | None = None,
    ) -> None:
        """A breach at the critical level starts at ``ev``: the live engine blocks the
        account (unless it is blocked already) with ``ev`` as the cause, recorded after
        ``after`` (the recorded time of the violation decided with it), in the engine's
        words (:func:`riskbook._reasons.block_reason`)."""
        incident["critical"] = True
        incident["_crit"] = True
        if a.blocked:
            return
        lt = incident["limit_type"]
        blocked = detected + self._latency(1, 3, rng)
        reason = block_reason(lt, incident["symbol"], figure(metric), CRITICAL_RATIO, limit)
        rec = blocked + self._latency(1, 3, rng)
        if after is not None:
            rec = max(rec, after + 1)
        eid = self._record(
            rec,
            a.id,
            K_BLOCK,
            ev.event_id,
            ev.correlation,
            M_ENGINE,
            (a.id, reason, _ENGINE, blocked),
            rng,
        )
        incident["block_event_id"] = str(uuid.UUID(int=eid))
        incident["_blocked"] = (eid, ev.correlation, rec)
        a.blocked = True

    def _release(
        self, a: _Account, inc: dict[str, Any], t: int, rec: int, by: str, reason: str
    ) -> tuple[int, int]:
        """If the engine blocked ``a`` during ``inc``, ``by`` unblocks it before the
        trades that resolve the incident at (``t``, ``rec``); returns their (business,
        recorded) times, moved to just after the unblock."""
        if not a.blocked:
            return t, rec
        rng = self.rng_crit
        block_eid, corr, block_rec = inc["_blocked"]
        u = max(t - 1, block_rec + self._latency(500, 2000, rng))  # the trades: u + 1
        u_rec = u + self._latency(5, 15, rng)
        eid = self._record(
            u_rec, a.id, K_UNBLOCK, block_eid, corr, M_CONSOLE, (a.id, reason, by, u), rng
        )
        inc["unblock_event_id"] = str(uuid.UUID(int=eid))
        a.blocked = False
        return u + 1, max(rec + (u + 1 - t), u_rec + 1000)

    # ------------------------------------------------------------------ incidents

    def _incident(
        self, kind: str, a: _Account, lt: str, sym: str | None, text: str
    ) -> dict[str, Any]:
        inc: dict[str, Any] = {
            "id": len(self.incidents) + 1,
            "kind": kind,
            "account_id": a.id,
            "limit_type": lt,
            "symbol": sym,
            "description": text,
            "started_at": None,
        }
        self.incidents.append(inc)
        self.armed[(a.id, lt, sym)] = inc
        return inc

    def _plan_incidents(self) -> None:
        d = self.d
        t0 = self.day_us
        rng = self.rng
        if d == self.day_ff:
            t = t0 + 16 * _HOUR + 10 * _MIN + rng.randrange(0, 10 * _MIN)
            self._push(t, t + self._latency(20, 200), self._fat_finger, None)
        if d == self.day_vol:
            t = t0 + 17 * _HOUR + rng.randrange(0, 10 * _MIN)
            self._vol_inc = self._incident(
                "daily_volume",
                self.a_vol,
                MDV,
                None,
                "A market maker's quoting algorithm loops and trades round trips until the "
                "day's traded quantity passes MaxDailyVolume; the algorithm is halted for "
                "the rest of the day. The breach lasts to the end of the UTC day.",
            )
            self.a_vol.protect.add(MDV)
            self._vol_inc["_on_trigger"] = self._vol_triggered
            self._push(t, t + self._latency(20, 200), self._burst, None)
        if d == self.day_dd - 1:
            t = t0 + 13 * _HOUR + 40 * _MIN
            self._push(t, t + self._latency(500, 3000), self._conviction, None)
        if d == self.day_dd:
            self.spiral_active = True
            self.spiral_start_price = self.s_dd.price
        if d == self.day_lev0:
            a = self.a_lev
            inc = self._incident(
                "leverage_creep",
                a,
                MLV,
                None,
                "A leveraged account adds exposure trade by trade over several days until "
                "a last add takes it over MaxLeverage; it de-risks half an hour later.",
            )
            assert a.l_lev is not None
            end = self.days[self.day_lev] * _DAY + 15 * _HOUR
            inc["_creep"] = (t0 + _OPEN, end, 0.93 * a.l_lev)
            inc["_on_trigger"] = self._lev_triggered
            a.protect.add(MLV)
            total = sum(abs(w) for w in a.weights.values())
            a.weights = {k: abs(w) / total for k, w in a.weights.items()}
        if d == self.day_lev:
            t = t0 + 15 * _HOUR + 20 * _MIN + rng.randrange(0, 10 * _MIN)
            self._push(t, t + self._latency(20, 200), self._last_add, None)
        if d == self.day_bust:
            t = t0 + 15 * _HOUR + 45 * _MIN + rng.randrange(0, 10 * _MIN)
            self._push(t, t + self._latency(20, 200), self._busted_trade, None)
        if d == self.day_split - 1:
            t = t0 + 20 * _HOUR + 59 * _MIN + 20 * _US
            self._push(t, t + self._latency(20, 200), self._pre_split, None)
        if d == self.day_split:
            t = t0 + 12 * _HOUR + 55 * _MIN
            self._push(t, t + self._latency(500, 3000), self._split_limits, None)
            t = t0 + 13 * _HOUR
            self._push(t, t + 10_000, self._split, None)
        if d == 1:
            t = t0 + 15 * _HOUR + 30 * _MIN + rng.randrange(0, 30 * _MIN)
            self._push(t, self._late_rec(t), self._voice_trade, None)
        if d == self.day_mismatch:
            t = t0 + 13 * _HOUR + 10 * _MIN + rng.randrange(0, 60 * _US)
            self._push(t, t + self._latency(500, 3000), self._adjust_mismatch, None)

    def _forced_trade(
        self,
        a: _Account,
        s: _Symbol,
        qty: float,
        t: int,
        rec: int,
        *,
        spread: float = 0.0002,
        apply: bool = True,
        target: str | None = None,
        reserve: float = 0.0,
    ) -> _Ev:
        """A trade the story needs; limits it would strain (other than ``target``) are
        raised by a named person just before it, so it breaches nothing unplanned."""
        ref = s.price
        price = round(ref * (1 + spread) if qty > 0 else ref * (1 - spread), 2)
        self._headroom(a, s, qty, price, t, rec, target, reserve)
        ev = self._emit_trade(a, s, qty, price, t, rec, M_OMS)
        if apply:
            self._apply_trade(a, s, qty, price, t, ev)
        return ev

    def _headroom(
        self,
        a: _Account,
        s: _Symbol,
        qty: float,
        price: float,
        t: int,
        rec: int,
        target: str | None,
        reserve: float,
    ) -> None:
        name = s.name
        q = a.q[name] + a.shadow_q.get(name, 0.0)
        q2 = q + qty
        raises: list[tuple[str, str | None, float]] = []
        lim = a.pos_limit(name)
        if target != MPS and lim is not None and abs(q2) > 0.75 * lim and abs(q2) > abs(q):
            raises.append((MPS, name, _nice_up(abs(q2) / 0.5)))
        if target != MDV and a.l_vol is not None:
            vol = a.vol + a.vol_shadow if a.vol_day == self.d else 0.0
            vol2 = vol + abs(qty) + reserve
            if vol2 > 0.75 * a.l_vol:
                raises.append((MDV, None, _nice_up(vol2 / 0.5)))
        if target != MLV and a.l_lev is not None:
            mark = s.price
            gross2 = a.gross + (abs(q2) - abs(q)) * mark
            eq2 = a.equity() + qty * (mark - price)
            lev2 = gross2 / eq2 if eq2 > 0 else math.inf
            if lev2 > 0.75 * a.l_lev:
                raises.append((MLV, None, _nice_up(lev2 / 0.5)))
        for lt, sym, value in raises:
            if (lt, None if lt != MPS else sym) in a.in_breach:
                continue  # an open breach is not ended by a convenient raise
            t0 = t - 30 * _US
            self._set_limit(
                a, lt, sym, value, self.rng.choice(_RISK_PEOPLE), t0, t0 + self._latency(200, 900)
            )

    # fat finger ---------------------------------------------------------------

    def _fat_finger(self, t: int, rec: int, _: None) -> None:
        a, s = self.a_ff, self.s_ff
        lim = a.pos_limit(s.name)
        assert lim is not None
        q = a.q[s.name]
        lot = max(1, round(0.004 * a.equity0 / s.price))
        intended = 3 * lot
        side = 1.0 if q >= 0 else -1.0
        qty = float(max(10 * intended, math.ceil(1.3 * lim - abs(q))))
        inc = self._incident(
            "fat_finger",
            a,
            MPS,
            s.name,
            f"A market maker meant to trade {intended} {s.name} and typed {qty:g}: the position "
            "passes 1.2 x its MaxPositionSize, the live engine blocks the account; a named "
            "person unblocks it and the position is unwound.",
        )
        inc["intended_quantity"] = float(intended)
        inc["_on_trigger"] = self._ff_triggered
        self._ff = (side * qty, q)
        self._forced_trade(a, s, side * qty, t, rec, target=MPS, reserve=qty)
        if inc.get("started_at") is None:
            raise RuntimeError("the fat-finger trade did not breach its limit")

    def _ff_triggered(self, t: int, ev: _Ev) -> None:
        t2 = ev.rec + 25 * _MIN + self.rng.randrange(0, 5 * _MIN)
        self._push(t2, t2 + self._latency(200, 2000), self._ff_unblock, None)

    def _ff_unblock(self, t: int, rec: int, _: None) -> None:
        a, s = self.a_ff, self.s_ff
        inc = self.armed[(a.id, MPS, s.name)]
        block_eid, corr, _ = inc["_blocked"]
        eid = self._record(
            rec,
            a.id,
            K_UNBLOCK,
            block_eid,
            corr,
            M_CONSOLE,
            (a.id, "fat-finger confirmed with the desk; position to be unwound", _DESK_HEAD, t),
        )
        inc["unblock_event_id"] = str(uuid.UUID(int=eid))
        a.blocked = False
        t2 = t + _MIN + self.rng.randrange(0, 30 * _US)
        self._push(t2, t2 + self._latency(20, 200), self._ff_unwind, None)

    def _ff_unwind(self, t: int, rec: int, _: None) -> None:
        a, s = self.a_ff, self.s_ff
        qty, _before = self._ff
        ev = self._forced_trade(a, s, -qty, t, rec, target=MPS)
        inc = self.armed[(a.id, MPS, s.name)]
        inc["unwind_event_id"] = str(uuid.UUID(int=ev.event_id))
        del self.armed[(a.id, MPS, s.name)]

    # daily volume ---------------------------------------------------------------

    def _burst(self, t: int, rec: int, _: None) -> None:
        a = self.a_vol
        inc = self._vol_inc
        if inc.get("started_at") is not None or a.halted_day == self.d:
            return
        s = a.symbols[0]
        lot = max(1, round(0.004 * a.equity0 / s.price))
        left = (a.l_vol or 0.0) - (a.vol if a.vol_day == self.d else 0.0)
        lim = a.pos_limit(s.name)
        size = left / 40 if lim is None else min(left / 40, 0.3 * lim)  # ~40 round trips
        qty = float(max(5 * lot, math.ceil(size / lot) * lot))
        q = a.q[s.name]
        side = -1.0 if q > 0 else 1.0
        if lim is not None and abs(q + side * qty) > 0.7 * lim:
            side = -side
        self._forced_trade(a, s, side * qty, t, rec, spread=0.0001, target=MDV)
        t2 = t + self.rng.randrange(2 * _US, 6 * _US)
        self._push(t2, t2 + self._latency(20, 200), self._burst, None)

    def _vol_triggered(self, t: int, ev: _Ev) -> None:
        self.a_vol.halted_day = self.d
        self.a_vol.protect.discard(MDV)

    # drawdown spiral ------------------------------------------------------------

    def _conviction(self, t: int, rec: int, _: None) -> None:
        a, s = self.a_dd, self.s_dd
        inc = self._incident(
            "drawdown_spiral",
            a,
            MDD,
            None,
            f"A trend follower builds a conviction long in {s.name}, which sells off; it "
            "averages down until MaxDrawdown is breached, liquidates, and the CRO raises "
            "the limit.",
        )
        inc["_on_trigger"] = self._dd_triggered
        a.protect.add(MDD)
        value = _nice_up(2.5 * a.equity() / s.price)
        self.limit_no += 1
        corr = f"lim-{self.limit_no:06d}"
        self._set_limit(a, MPS, s.name, value, _CRO, t, rec, corr=corr)
        a.special[s.name] = 1.0

    def _spiral_weight(self) -> None:
        a, s = self.a_dd, self.s_dd
        if self.spiral_active and self.spiral_start_price > 0:
            drop = 1.0 - s.price / self.spiral_start_price
            a.special[s.name] = min(1.5, 1.0 + 3.0 * max(0.0, drop))

    def _dd_triggered(self, t: int, ev: _Ev) -> None:
        a = self.a_dd
        a.halted_day = self.d
        t2 = t + 45 * _MIN + self.rng.randrange(0, 60 * _US)
        self._push(t2, t2 + self._latency(20, 200), self._dd_liquidate, None)

    def _dd_liquidate(self, t: int, rec: int, _: None) -> None:
        a = self.a_dd
        inc = self.armed[(a.id, MDD, None)]
        t, rec = self._release(a, inc, t, rec, _CRO, "unblocked to liquidate the spiral")
        self.spiral_active = False
        a.special.clear()
        for s in a.symbols:
            q = a.q[s.name]
            if q:
                self._forced_trade(a, s, -q, t, rec, target=MDD)
                t += self.rng.randrange(1 * _US, 5 * _US)
                rec = t + self._latency(20, 200)
        t2 = t + 45 * _MIN
        self._push(t2, t2 + self._latency(500, 3000), self._dd_raise, None)

    def _dd_raise(self, t: int, rec: int, _: None) -> None:
        a = self.a_dd
        inc = self.armed.pop((a.id, MDD, None))
        value = min(0.95, max(0.25, _nice_up(self._drawdown(a) * 1.6)))
        eid = self._set_limit(a, MDD, None, value, _CRO, t, rec)
        inc["limit_raised_event_id"] = str(uuid.UUID(int=eid))
        self._release(a, inc, t, rec, _CRO, "book liquidated and MaxDrawdown raised")
        a.protect.discard(MDD)

    # leverage creep -------------------------------------------------------------

    def _last_add(self, t: int, rec: int, _: None) -> None:
        a = self.a_lev
        inc = self.armed[(a.id, MLV, None)]
        if inc.get("started_at") is not None:
            return
        assert a.l_lev is not None
        # add on the side already held, so that all of it adds to the gross exposure
        s = max(a.symbols, key=lambda x: abs(a.q[x.name]) * x.price)
        extra = 1.08 * a.l_lev * a.equity() - a.gross
        qty = float(max(1, math.ceil(extra / s.price)))
        if a.q[s.name] < 0:
            qty = -qty
        self._forced_trade(a, s, qty, t, rec, target=MLV)

    def _lev_triggered(self, t: int, ev: _Ev) -> None:
        t2 = t + 30 * _MIN + self.rng.randrange(0, 60 * _US)
        self._push(t2, t2 + self._latency(20, 200), self._lev_derisk, None)
        self.a_lev.halted_day = self.d

    def _lev_derisk(self, t: int, rec: int, _: None) -> None:
        a = self.a_lev
        inc = self.armed[(a.id, MLV, None)]
        t, rec = self._release(a, inc, t, rec, _DESK_HEAD, "unblocked to de-risk")
        eq = a.equity()
        for s in a.symbols:
            target = a.weights[s.name] * a.lev_target * eq / s.price
            diff = float(round(target - a.q[s.name]))
            if diff and abs(target) < abs(a.q[s.name]):
                self._forced_trade(a, s, diff, t, rec, target=MLV)
                t += self.rng.randrange(1 * _US, 5 * _US)
                rec = t + self._latency(20, 200)
        del self.armed[(a.id, MLV, None)]
        a.protect.discard(MLV)

    # busted trade ---------------------------------------------------------------

    def _busted_trade(self, t: int, rec: int, _: None) -> None:
        a, s = self.a_bust, self.s_bust
        lim = a.pos_limit(s.name)
        assert lim is not None
        q = a.q[s.name] + a.shadow_q.get(s.name, 0.0)
        side = 1.0 if q >= 0 else -1.0
        qty = side * float(max(1, math.ceil(1.1 * lim - abs(q))))
        other = self.accounts[5].id if len(self.accounts) > 5 else self.a_dd.id
        inc = self._incident(
            "busted_trade",
            a,
            MPS,
            s.name,
            f"A trade meant for {other} is booked to {a.id} and takes its {s.name} position "
            "over MaxPositionSize; it is busted 40 minutes later, so the breach exists only "
            "as known before the bust was recorded.",
        )
        ev = self._forced_trade(a, s, qty, t, rec, apply=False, target=MPS)
        # Not applied (busts remove the trade): the breach is seen as known before the bust.
        limit_key = (MPS, s.name if s.name in a.l_pos_sym else None)
        metric = abs(q + qty)
        br = {
            "account_id": a.id,
            "limit_type": MPS,
            "symbol": s.name,
            "limit_symbol": limit_key[1],
            "limit_value": lim,
            "started_at": _ts(t),
            "value_at_trigger": metric,
            "peak_value": metric,
            "trigger_event_id": str(uuid.UUID(int=ev.event_id)),
            "trigger_event_type": "TradeExecuted",
            "trigger_trade_id": ev.trade_id,
            "trigger_recorded_at": _ts(ev.rec),
            "ended_at": None,
            "end_event_id": None,
        }
        src = a.limit_src.get(limit_key)
        if src is not None:
            br["limit_event_id"] = str(uuid.UUID(int=src[0]))
            br["limit_set_by"] = src[1]
        inc.update(br)
        self._engine_records(a, inc, ev, metric, lim)
        bust = self._plan_bust(a, s, qty, ev, f"booked to the wrong account; belongs to {other}")
        inc["bust_event_id"] = str(uuid.UUID(int=bust))
        inc["bust_recorded_at"] = self.busts[-1]["recorded_at"]
        del self.armed[(a.id, MPS, s.name)]

    # late booking, split and reconciliation -------------------------------------

    def _voice_trade(self, t: int, rec: int, _: None) -> None:
        """A phone trade the back office books the next morning (recorded late)."""
        for a in [*self.accounts[5:], self.a_bust, self.a_dd, self.a_lev]:
            if a.style != MM and self.d not in a.incident_days and a.halted_day != self.d:
                break
        else:
            return
        s = a.symbols[0]
        qty = float(max(1, round(0.01 * a.equity0 / s.price)))
        if a.q[s.name] > 0:
            qty = -qty
        ref = s.price
        price = round(ref * 1.0002 if qty > 0 else ref * 0.9998, 2)
        self._headroom(a, s, qty, price, t, rec, None, 0.0)
        ev = self._emit_trade(a, s, qty, price, t, rec, M_LATE)
        self.late.append(
            {
                "event_id": str(uuid.UUID(int=ev.event_id)),
                "trade_id": ev.trade_id,
                "account_id": a.id,
                "executed_at": _ts(t),
                "recorded_at": _ts(rec),
            }
        )
        self._apply_trade(a, s, qty, price, t, ev)

    # split and reconciliation -------------------------------------------------

    def _split_holder(self) -> _Account:
        s = self.s_split
        for a in self.accounts[5:]:
            if s in a.symbols and a.style != MM:
                return a
        return self.a_bust  # holds the split symbol by construction

    def _pre_split(self, t: int, rec: int, _: None) -> None:
        """The evening before the split: desks go flat in the symbol, one account keeps a
        small position (so that the split's transient valuation stays small)."""
        s = self.s_split
        holder = self._split_holder()
        for a in s.holders:
            if a.blocked:
                continue  # keeps its position through the split
            q = a.q[s.name]
            target = 0.0
            if a is holder:
                target = float(max(1, round(0.02 * a.equity() / s.price)))
            diff = target - q
            if diff:
                self._forced_trade(a, s, diff, t, rec)
                t += self.rng.randrange(1 * _US, 3 * _US)
                rec = t + self._latency(20, 200)

    def _split_limits(self, t: int, rec: int, _: None) -> None:
        s = self.s_split
        person = self.rng.choice(_RISK_PEOPLE)
        corr = f"split-{s.name}-{_ts(t)[:10]}"
        for a in s.holders:
            lim = a.pos_limit(s.name)
            if lim is None or MPS in a.protect:
                continue
            t += self.rng.randrange(1 * _US, 3 * _US)
            self._set_limit(
                a, MPS, s.name, lim * 2, person, t, t + self._latency(200, 900), corr=corr
            )

    def _split(self, t: int, rec: int, _: None) -> None:
        s = self.s_split
        corr = f"split-{s.name}-{_ts(t)[:10]}"
        new_price = round(s.price / 2, 2)
        s.p0 /= 2
        s.ema /= 2
        self._mark(s, new_price, t, rec, corr)
        updates = []
        for a in s.holders:
            q = a.q[s.name]
            if not q:
                continue
            rec += self._latency(1, 5)
            eid = self._record(
                rec,
                a.id,
                K_UPDATE,
                None,
                corr,
                M_BACKOFFICE,
                (a.id, s.name, q, 2 * q, f"2-for-1 stock split of {s.name}", t),
            )
            a.q[s.name] = 2 * q
            a.shadow_q.pop(s.name, None)
            a.mv += q * s.price
            a.gross += abs(q) * s.price
            ev = _Ev(eid, K_UPDATE, t, rec, corr)
            self._eval_position(a, s.name, t, ev)
            self._eval_account(a, t, ev)
            updates.append(
                {
                    "event_id": str(uuid.UUID(int=eid)),
                    "account_id": a.id,
                    "previous_quantity": q,
                    "new_quantity": 2 * q,
                }
            )
        self.split_info = {
            "symbol": s.name,
            "ratio": 2,
            "at": _ts(t),
            "mark_price_after": new_price,
            "updates": updates,
        }

    def _adjust_mismatch(self, t: int, rec: int, _: None) -> None:
        """A reconciliation whose ``previous_quantity`` disagrees with the books."""
        order = [a for a in self.accounts[5:] if a.style != MM] + [
            self.a_bust,
            self.a_dd,
            self.a_lev,
            *[a for a in self.accounts[5:] if a.style == MM],
            self.a_ff,
            self.a_vol,
        ]
        for a in order:
            if a.protect:
                continue
            held = [s for s in a.symbols if a.q[s.name]]
            if not held:
                continue
            s = max(held, key=lambda x: abs(a.q[x.name]) * x.price)
            q = a.q[s.name]
            sign = 1.0 if q > 0 else -1.0
            delta = float(max(1, round(0.02 * abs(q))))
            stated = q + sign * delta
            new = q - sign * delta
            eid = self._record(
                rec,
                a.id,
                K_UPDATE,
                None,
                f"recon-{_ts(t)[:10]}-{a.id}",
                M_BACKOFFICE,
                (a.id, s.name, stated, new, "reconciliation with the broker's statement", t),
            )
            a.q[s.name] = new
            a.shadow_q.pop(s.name, None)
            a.mv += (new - q) * s.price
            a.gross += (abs(new) - abs(q)) * s.price
            ev = _Ev(eid, K_UPDATE, t, rec, f"recon-{_ts(t)[:10]}-{a.id}")
            self._eval_position(a, s.name, t, ev)
            self._eval_account(a, t, ev)
            self.mismatch = {
                "event_id": str(uuid.UUID(int=eid)),
                "account_id": a.id,
                "symbol": s.name,
                "previous_quantity": stated,
                "projected_quantity": q,
                "new_quantity": new,
                "updated_at": _ts(t),
            }
            return

    # ------------------------------------------------------------------ the key

    def answer_key(self) -> dict[str, Any]:
        p = self.p
        incidents = []
        for inc in self.incidents:
            incidents.append({k: v for k, v in inc.items() if not k.startswith("_")})
        unplanned = [{k: v for k, v in b.items() if not k.startswith("_")} for b in self.unplanned]
        return {
            "format": 1,
            "generator": "riskbook.simulate",
            "seed": p.seed,
            "params": {
                "accounts": p.accounts,
                "symbols": p.symbols,
                "days": p.days,
                "events": p.events,
                "start": _ts(self.days[0] * _DAY),
                "end": _ts((self.days[-1] + 1) * _DAY),
            },
            "critical_ratio": CRITICAL_RATIO,
            "complete": not unplanned,
            "incidents": incidents,
            "unplanned_breaches": unplanned,
            "counts": dict(sorted(self.counts.items())),
            "accounts": [
                {
                    "account_id": a.id,
                    "style": a.style,
                    "symbols": [s.name for s in a.symbols],
                    "initial_funding": a.equity0,
                }
                for a in self.accounts
            ],
            "symbols": [
                {"symbol": s.name, "first_price": p0}
                for s, p0 in zip(self.symbols, self.first_prices, strict=True)
            ],
            "awkward": {
                "late_trades": self.late,
                "busts": self.busts,
                "split": self.split_info,
                "adjustment_mismatch": self.mismatch,
            },
            "notes": (
                "Times are business times (the payload's *_at) unless named recorded_at. "
                "A breach is metric > limit (DESIGN.md §5), evaluated in the order business "
                "time, recorded time, position. 'complete' is true when, with every event "
                "known (busts applied), the incidents other than the busted trade are all the "
                "breaches at level 1.0; the busted-trade breach exists only as known before "
                "its bust was recorded. For MaxPositionSize, 'symbol' is the position's symbol "
                "and 'limit_symbol' the LimitSet's (null: the account-wide limit). "
                "value_at_trigger and peak_value are floats computed incrementally: compare "
                "with a tolerance."
            ),
        }


# ------------------------------------------------------------------------ public API


def generate(
    *,
    seed: int = 0,
    accounts: int = 8,
    symbols: int = 6,
    days: int = 5,
    events: int | None = None,
    start: datetime | None = None,
) -> Simulation:
    """Generate a history with planted incidents.

    Parameters
    ----------
    seed : everything random comes from ``random.Random(seed)``.
    accounts : number of accounts (>= 5); styles cycle market maker, trend follower,
        leveraged; the first five carry the planted incidents.
    symbols : number of symbols (>= 3).
    days : number of trading days (weekdays, >= 3).
    events : if given, sizes the history instead of ``days``: the number of trading days
        is chosen so that the expected event count is closest to ``events`` (the
        history is then generated whole, so the count is approximate -- typically
        within a few percent).
    start : the first trading day is the UTC date of ``start`` (moved to the next Monday
        if it falls on a weekend); default :data:`DEFAULT_START`.

    Returns
    -------
    Simulation
        The envelopes in recorded-time order and the answer key.
    """
    g = _Generator(_params(seed, accounts, symbols, days, events, start))
    envelopes = [_envelope(r, n) for batch in g.run() for r, n in batch]
    return Simulation(envelopes, g.answer_key())


def key_path(path: str | os.PathLike[str]) -> Path:
    """Where the answer key of a history file goes: ``x.jsonl.gz`` -> ``x.key.json``."""
    path = Path(path)
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".key.json")


@contextmanager
def _output(path: Path) -> Iterator[Callable[[bytes], object]]:
    """A write function for ``path``; gzip (without name or time in its header) if it
    ends in ``.gz``, so the same content always gives the same bytes."""
    with open(path, "wb") as raw:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                yield gz.write
        else:
            yield raw.write


def _write_key(key: dict[str, Any], path: Path) -> Path:
    kp = key_path(path)
    kp.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
    return kp


def write_jsonl(sim: Simulation, path: str | os.PathLike[str]) -> Path:
    """Write a simulation as JSON Lines (gzip if ``path`` ends in ``.gz``) and its key.

    One envelope per line (:func:`riskbook.events.encode_envelope`); the gzip header
    carries no time or name, so the same simulation gives the same bytes. The key goes
    next to it (:func:`key_path`). Returns the key's path.
    """
    path = Path(path)
    with _output(path) as write:
        envelopes = sim.envelopes
        for i in range(0, len(envelopes), 10_000):
            write(b"".join([encode_envelope(e) + b"\n" for e in envelopes[i : i + 10_000]]))
    return _write_key(sim.answer_key, path)


def stream_jsonl(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    accounts: int = 8,
    symbols: int = 6,
    days: int = 5,
    events: int | None = None,
    start: datetime | None = None,
    progress: Progress | None = None,
) -> tuple[int, dict[str, Any]]:
    """Generate straight into a file, without building :class:`Envelope` objects.

    The same bytes as ``write_jsonl(generate(...), path)`` (a test checks it), in a
    fraction of the time and memory. Returns (events written, answer key); the key is
    written next to the file.
    """
    g = _Generator(_params(seed, accounts, symbols, days, events, start))
    path = Path(path)
    n = 0
    with _output(path) as write:
        for batch in g.run():
            if batch:
                write("".join([_json_line(r, s) for r, s in batch]).encode())
                n += len(batch)
                if progress is not None:
                    progress("generated", n)
    key = g.answer_key()
    _write_key(key, path)
    return n, key


def to_store(sim: Simulation, store: Store, *, progress: Progress | None = None) -> ImportResult:
    """Bulk-write a simulation into a store (:meth:`Store.import_envelopes`).

    Ids, recorded times and sequences are kept; writing the same simulation twice adds
    nothing the second time.
    """
    return store.import_envelopes(sim.envelopes, progress=progress)


def _copy_text_producer() -> None:
    """Child process of :func:`stream_to_store` (``python -c``, parameters as JSON in
    argv[1]): generate, write framed ``COPY`` text (rows without their position) to
    stdout, then the answer key."""
    params = _Params(**json.loads(sys.argv[1]))
    chunk = int(sys.argv[2])
    out = sys.stdout.buffer
    g = _Generator(params)
    pending: list[str] = []

    def send(rows: list[str]) -> None:
        data = "".join(rows).encode()
        out.write(b"rows %d %d\n" % (len(rows), len(data)))
        out.write(data)

    for batch in g.run():
        pending += [_copy_row(r, s) for r, s in batch]
        if len(pending) >= chunk:
            send(pending)
            pending = []
    if pending:
        send(pending)
    key = json.dumps(g.answer_key()).encode()
    out.write(b"key 0 %d\n" % len(key))
    out.write(key)
    out.flush()


_PRODUCER = "from riskbook.simulate import _copy_text_producer; _copy_text_producer()"


def stream_to_store(
    store: Store,
    *,
    seed: int = 0,
    accounts: int = 8,
    symbols: int = 6,
    days: int = 5,
    events: int | None = None,
    start: datetime | None = None,
    progress: Progress | None = None,
    chunk_events: int = 200_000,
) -> tuple[ImportResult, dict[str, Any]]:
    """Generate straight into a store: the fast path for large histories.

    Writes the same events as ``to_store(generate(...), store)`` (a test checks it), in
    one transaction, with ``COPY`` into the events table: the history is generated in a
    child process (so that generating and writing use both cores, free of the GIL)
    while this one writes. Positions are reserved with ``riskbook_reserve_positions``,
    as every write to the store does; the store's insert trigger derives what it
    derives. Used when none of the simulated aggregates exist in the store yet;
    otherwise falls back to :func:`generate` + :func:`to_store` (which skips events
    already present, and refuses an envelope whose sequence another event holds) --
    also when another session writes to one of them while the copy runs (the copy
    writes nothing then). Returns (import result, answer key).
    """
    params = _params(seed, accounts, symbols, days, events, start)
    g = _Generator(params)  # only its setup runs: the aggregates it will write
    aggregates = [a.id for a in g.accounts] + [s.name for s in g.symbols]

    def general() -> tuple[ImportResult, dict[str, Any]]:
        sim = generate(
            seed=seed, accounts=accounts, symbols=symbols, days=days, events=events, start=start
        )
        return to_store(sim, store, progress=progress), sim.answer_key

    if _any_stored(store, aggregates):
        return general()
    try:
        return _copy_from_child(store, params, chunk_events, progress)
    except StoreError as exc:
        # Another session wrote to a simulated aggregate after the look above (nothing
        # holds them off in between): the copy met its events, and wrote nothing. The
        # general road skips the events stored already (the same simulation's, written
        # at the same time) and names an envelope whose sequence another writer took.
        if isinstance(exc, ImportFailed) or not _any_stored(store, aggregates):
            raise
        return general()


def _any_stored(store: Store, aggregates: list[str]) -> bool:
    """Does the store hold an event of any of ``aggregates``?"""
    with store.connection() as conn:
        row = conn.execute(
            "SELECT aggregate_id FROM events WHERE aggregate_id = ANY(%s) LIMIT 1", (aggregates,)
        ).fetchone()
    return row is not None


def _copy_from_child(
    store: Store, params: _Params, chunk_events: int, progress: Progress | None
) -> tuple[ImportResult, dict[str, Any]]:
    """:func:`stream_to_store`'s fast path: a trusted copy of what a child process
    generates."""
    started = time.perf_counter()
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _PRODUCER,
            json.dumps(dataclasses.asdict(params)),
            str(chunk_events),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    n = 0
    key: dict[str, Any] | None = None
    try:
        with store.trusted_copy() as write:
            while key is None:
                header = child.stdout.readline().split()
                if len(header) != 3:
                    child.wait()
                    why = child.stderr.read().decode(errors="replace").strip().splitlines()
                    raise ImportFailed(
                        "simulated history: the generating process failed"
                        f"{': ' + why[-1] if why else ''}; nothing was written"
                    )
                kind, count, size = header[0], int(header[1]), int(header[2])
                data = child.stdout.read(size)
                if kind == b"key":
                    key = json.loads(data)
                    break
                lines = data.split(b"\n")
                lines.pop()  # after the last newline
                assert len(lines) == count
                write([ln + b"\n" for ln in lines])
                n += count
                if progress is not None:
                    progress("written", n)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
    return ImportResult(n, n, 0, time.perf_counter() - started), key


# ------------------------------------------------------------------------------ CLI


def _summary(key: dict[str, Any]) -> str:
    lines = [f"events: {sum(key['counts'].values()):,}"]
    lines += [f"  {k:<24} {v:>10,}" for k, v in key["counts"].items()]
    lines.append(f"planted incidents ({'complete' if key['complete'] else 'NOT complete'}):")
    for inc in key["incidents"]:
        lines.append(
            f"  {inc['id']}. {inc['kind']:<16} {inc['account_id']} {inc['limit_type']}"
            f"{' ' + inc['symbol'] if inc['symbol'] else ''} limit {inc['limit_value']:g} "
            f"from {inc['started_at']}"
        )
    return "\n".join(lines)


def _cli_params(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    start = None
    if args.start is not None:
        try:
            start = datetime.strptime(args.start, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            parser.error(f"--start: expected YYYY-MM-DD, got {args.start!r}")
    params: dict[str, Any] = dict(
        seed=args.seed,
        accounts=args.accounts,
        symbols=args.symbols,
        days=args.days,
        events=args.events,
        start=start,
    )
    try:
        _params(**params)
    except ValueError as exc:
        parser.error(str(exc))
    return params


def _unwritable(path: str) -> str | None:
    """Why an output file cannot be written (None if it looks writable), checked before
    any work so that a bad path does not cost a whole generation."""
    target = Path(path)
    if target.is_dir():
        return "is a directory, not a file"
    folder = target.parent
    if not folder.is_dir():
        return f"no such directory {str(folder)!r}"
    if target.exists():
        if not os.access(target, os.W_OK):
            return "permission denied"
    elif not os.access(folder, os.W_OK | os.X_OK):
        return f"permission denied (directory {str(folder)!r})"
    return None


def cli(argv: list[str] | None = None) -> int:
    """``riskbook simulate``: generate a history into a file or a store.

    Returns the exit code (0 on success, 1 on an error riskbook reports, 2 on bad
    arguments).
    """
    parser = argparse.ArgumentParser(
        prog="riskbook simulate",
        description=(
            "Generate a deterministic synthetic trading history with planted incidents "
            "and its answer key, into a JSON Lines file or a store."
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default 0)")
    parser.add_argument("--accounts", type=int, default=8, help="accounts, >= 5 (default 8)")
    parser.add_argument("--symbols", type=int, default=6, help="symbols, >= 3 (default 6)")
    parser.add_argument("--days", type=int, default=5, help="trading days, >= 3 (default 5)")
    parser.add_argument(
        "--events", type=int, default=None, help="size by (approximate) event count instead of days"
    )
    parser.add_argument(
        "--start", default=None, help="first trading day, YYYY-MM-DD (default 2024-01-02)"
    )
    # Where to is always said: a history written into a store stays there (the log is
    # append-only), so the default store is never written by omission.
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--out", default=None, help="write FILE.jsonl or FILE.jsonl.gz (+ FILE.key.json)"
    )
    where.add_argument("--dsn", default=None, help="write into the store at this PostgreSQL DSN")
    where.add_argument(
        "--store",
        action="store_true",
        help="write into the store riskbook uses by default ($RISKBOOK_DSN, else the "
        "embedded server); the events stay there for good",
    )
    parser.add_argument("--key", default=None, help="also write the answer key to this file")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    try:
        args = parser.parse_args(argv)
        params = _cli_params(parser, args)
        outputs = [("--key", args.key)]
        if args.out is not None:
            outputs[:0] = [("--out", args.out), ("--out", str(key_path(args.out)))]
        for option, path in outputs:
            if path is not None and (why := _unwritable(path)) is not None:
                parser.error(f"{option} {path}: {why}")
        if (
            args.out is not None
            and args.key is not None
            and (Path(args.key).resolve() == Path(args.out).resolve())
        ):
            parser.error(f"--key {args.key}: is the --out file (the key would replace it)")
    except SystemExit as exc:  # --help, or bad arguments (argparse printed why)
        return exc.code if isinstance(exc.code, int) else 2
    err = sys.stderr
    last = [time.perf_counter()]

    def progress(stage: str, n: int) -> None:
        now = time.perf_counter()
        if not args.quiet and now - last[0] > 1.0:
            last[0] = now
            print(f"  {stage} {n:,} events", file=err, flush=True)

    started = time.perf_counter()
    try:
        if args.out is not None:
            n, key = stream_jsonl(args.out, progress=progress, **params)
            seconds = time.perf_counter() - started
            rate = n / seconds if seconds > 0 else float("inf")
            done = (
                f"wrote {n:,} events to {args.out} (key: {key_path(args.out)}) "
                f"in {seconds:.1f} s ({rate:,.0f} events/s)"
            )
        else:
            with connect(args.dsn) as store:
                result, key = stream_to_store(store, progress=progress, **params)
                done = f"{store!r}: {result}"
    except (RiskbookError, OSError) as exc:
        print(f"riskbook simulate: {exc}", file=err)
        return 1
    if args.key is not None:
        Path(args.key).write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
    print(_summary(key), file=err)
    print(done, file=err)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
