"""Limits and breaches (DESIGN.md §5): by hand, against a plain per-event reference
evaluator (hypothesis), batch by batch, user-defined limit types, the sample's answer
key, reconciliation, the audit trail, the registry and the CLI."""

from __future__ import annotations

import doctest
import gzip
import importlib
import json
import math
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import riskbook
from riskbook import limits
from riskbook.events import (
    AccountFunded,
    Envelope,
    Event,
    LimitSet,
    LimitViolationDetected,
    PositionUpdated,
    PriceMarked,
    Side,
    TradeCancelled,
    TradeExecuted,
    decode_envelope,
    format_time,
    parse_time,
)
from riskbook.frames import History
from riskbook.store import Store
from tests.test_projections import settle

T0 = datetime(2024, 3, 1, 20, 0, tzinfo=UTC)  # four hours before midnight
DATA = Path(__file__).resolve().parent.parent / "data"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


class Book:
    """Envelopes in position order, each recorded when it happened unless told otherwise."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.sequences: dict[str, int] = {}
        self.trades = 0

    def add(self, event: Event, recorded: datetime | None = None, **envelope: Any) -> str:
        agg = event.aggregate_id
        self.sequences[agg] = self.sequences.get(agg, 0) + 1
        env = Envelope(
            event_id=uuid.uuid4(),
            aggregate_id=agg,
            aggregate_type=event.aggregate_type,
            sequence=self.sequences[agg],
            timestamp=recorded or event.business_time,
            payload=event,
            correlation_id="test",
            **envelope,
        )
        self.envelopes.append(env)
        return str(env.event_id)

    def fund(self, acct: str, amount: float, t: datetime, recorded: datetime | None = None) -> str:
        return self.add(AccountFunded(account_id=acct, amount=amount, funded_at=t), recorded)

    def trade(
        self, acct: str, sym: str, side: str, qty: float, price: float, t: datetime,
        recorded: datetime | None = None, trade_id: str | None = None,
    ) -> str:  # fmt: skip
        self.trades += 1
        return self.add(
            TradeExecuted(
                trade_id=trade_id or f"T-{self.trades}", account_id=acct, symbol=sym,
                side=Side(side), quantity=qty, price=price, executed_at=t,
            ),
            recorded,
        )  # fmt: skip

    def cancel(
        self, acct: str, trade_id: str, t: datetime, recorded: datetime | None = None
    ) -> str:
        return self.add(
            TradeCancelled(trade_id=trade_id, account_id=acct, reason="bust", cancelled_at=t),
            recorded,
        )

    def mark(self, sym: str, price: float, t: datetime, recorded: datetime | None = None) -> str:
        return self.add(PriceMarked(symbol=sym, price=price, marked_at=t), recorded)

    def adjust(
        self, acct: str, sym: str, previous: float, new: float, t: datetime,
        recorded: datetime | None = None,
    ) -> str:  # fmt: skip
        return self.add(
            PositionUpdated(account_id=acct, symbol=sym, previous_quantity=previous,
                            new_quantity=new, reason="split", updated_at=t),
            recorded,
        )  # fmt: skip

    def limit(
        self, acct: str, kind: str, value: float, t: datetime, symbol: str | None = None,
        by: str = "risk", recorded: datetime | None = None,
    ) -> str:  # fmt: skip
        return self.add(
            LimitSet(account_id=acct, limit_type=kind, value=value, set_by=by, set_at=t,
                     symbol=symbol),
            recorded,
        )  # fmt: skip

    def history(self) -> History:
        return History.from_envelopes(self.envelopes)


# ============================================================================ the reference

Interval = tuple[Any, ...]
"""(limit_type, account, symbol, level, started_at, ended_at, peak, limit_value,
trigger_event_id, trigger_value, ended_by_event_id, limit_value_at_end, set_by,
limit_event_id)"""

FIELDS = (
    "limit_type", "account_id", "symbol", "level", "started_at", "ended_at", "peak_value",
    "limit_value", "trigger_event_id", "trigger_value", "ended_by_event_id",
    "limit_value_at_end", "set_by", "limit_event_id",
)  # fmt: skip
ACCOUNT_TYPES = ("MaxDrawdown", "MaxLeverage", "MaxGrossNotional", "MaxConcentration")


@dataclass
class Open:
    started_at: datetime
    trigger: str | None
    value: float
    limit: float
    set_by: str | None
    limit_event: str | None
    peak: float


@dataclass
class Limit:
    value: float
    set_by: str | None
    event_id: str | None
    order: int


@dataclass
class Reference:
    """DESIGN.md §4-§5 one event at a time, as plainly as possible."""

    levels: tuple[float, ...]
    extra: bool = False  # also MaxGrossNotional and MaxConcentration
    q: dict[str, dict[str, float]] = field(default_factory=dict)  # account -> symbol -> q
    avg: dict[str, dict[str, float]] = field(default_factory=dict)
    cash: dict[str, float] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)
    mark: dict[str, float] = field(default_factory=dict)
    volume: dict[tuple[str, Any], float] = field(default_factory=dict)
    metric: dict[tuple[str, str, str | None], float] = field(default_factory=dict)
    day_of: dict[str, Any] = field(default_factory=dict)  # account -> day of its volume
    limits: dict[tuple[str, str, str | None], Limit] = field(default_factory=dict)
    open: dict[tuple[str, str, str | None, float], Open] = field(default_factory=dict)
    done: list[Interval] = field(default_factory=list)
    order: int = 0

    # ---------------------------------------------------------------- limits
    def limit_of(self, kind: str, acct: str, sym: str | None) -> Limit | None:
        """The limit in force: the key's own (per-symbol types), else the account's;
        an account's row and a "*" row: the later one."""

        def latest(s: str | None) -> Limit | None:
            found = [x for a in (acct, "*") if (x := self.limits.get((a, kind, s))) is not None]
            return max(found, key=lambda x: x.order) if found else None

        if kind == "MaxPositionSize" and sym is not None:
            own = latest(sym)
            if own is not None:
                return own
        return latest(None)

    # ---------------------------------------------------------------- breaches
    def check(self, kind: str, acct: str, sym: str | None, t: datetime, cause: str | None) -> None:
        value = self.metric[(kind, acct, sym)]
        lim = self.limit_of(kind, acct, sym)
        for level in self.levels:
            key = (kind, acct, sym, level)
            over = lim is not None and value > level * lim.value  # NaN: never over
            b = self.open.get(key)
            if b is not None and over:
                b.peak = max(b.peak, value)
            elif b is not None:
                self.close(key, t, cause, lim)
            elif over:
                assert lim is not None
                self.open[key] = Open(t, cause, value, lim.value, lim.set_by, lim.event_id, value)

    def close(
        self, key: tuple[Any, ...], t: datetime, cause: str | None, lim: Limit | None
    ) -> None:
        b = self.open.pop(key)
        self.done.append(
            (*key[:3], key[3], b.started_at, t, b.peak, b.limit, b.trigger, b.value, cause,
             None if lim is None else lim.value, b.set_by, b.limit_event)
        )  # fmt: skip

    def end_days(self, t: datetime | None) -> None:
        """Daily breaches whose UTC day is over by ``t`` end at midnight."""
        for key in [k for k in self.open if k[0] == "MaxDailyVolume"]:
            acct = key[1]
            midnight = datetime.combine(self.day_of[acct], datetime.min.time(), UTC) + timedelta(
                days=1
            )
            if t is None or t >= midnight:
                self.close(key, midnight, None, self.limit_of("MaxDailyVolume", acct, None))

    # ---------------------------------------------------------------- metrics
    def account_moved(self, acct: str, t: datetime, cause: str) -> None:
        values = [q * self.mark.get(s, self.avg[acct][s]) for s, q in self.q.get(acct, {}).items()]
        net = sum(values)
        gross = sum(abs(v) for v in values)
        equity = settle(self.cash.get(acct, 0.0), net)
        self.peak[acct] = max(self.peak.get(acct, 0.0), equity)
        peak = self.peak[acct]
        figures = {
            "MaxDrawdown": 0.0 if peak <= 0 else (peak - equity) / peak,
            "MaxLeverage": 0.0 if gross == 0 else (math.inf if equity <= 0 else gross / equity),
        }
        if self.extra:
            figures["MaxGrossNotional"] = gross
            figures["MaxConcentration"] = max(abs(v) for v in values) / gross if gross > 0 else 0.0
        for kind, value in figures.items():
            self.metric[(kind, acct, None)] = value
            self.check(kind, acct, None, t, cause)

    def apply(self, e: Envelope) -> None:
        p = e.payload
        t = e.business_time
        assert t is not None
        cause = str(e.event_id)
        if isinstance(p, TradeExecuted | PositionUpdated):
            key = (p.account_id, p.symbol)
            book, avg = self.q.setdefault(p.account_id, {}), self.avg.setdefault(p.account_id, {})
            q, a = book.get(p.symbol, 0.0), avg.get(p.symbol, 0.0)
            if isinstance(p, TradeExecuted):
                s = p.quantity if p.side == Side.Buy else -p.quantity
                if q == 0 or (q > 0) == (s > 0):
                    a = (q * a + s * p.price) / (q + s)
                elif settle(q, s) == 0:
                    a = 0.0
                elif abs(s) > abs(q):
                    a = p.price
                book[p.symbol], avg[p.symbol] = settle(q, s), a
                self.cash[p.account_id] = settle(self.cash.get(p.account_id, 0.0), -(s * p.price))
                day = t.date()
                self.volume[(p.account_id, day)] = (
                    self.volume.get((p.account_id, day), 0.0) + p.quantity
                )
                self.day_of[p.account_id] = day
                self.metric[("MaxDailyVolume", p.account_id, None)] = self.volume[
                    (p.account_id, day)
                ]
                self.check("MaxDailyVolume", p.account_id, None, t, cause)
            else:
                book[p.symbol] = p.new_quantity
                avg[p.symbol] = 0.0 if p.new_quantity == 0 else q * a / p.new_quantity
            self.metric[("MaxPositionSize", *key)] = abs(book[p.symbol])
            self.check("MaxPositionSize", *key, t, cause)
            self.account_moved(p.account_id, t, cause)
        elif isinstance(p, AccountFunded):
            self.cash[p.account_id] = settle(self.cash.get(p.account_id, 0.0), p.amount)
            self.peak[p.account_id] = settle(self.peak.get(p.account_id, 0.0), p.amount)
            self.account_moved(p.account_id, t, cause)
        elif isinstance(p, PriceMarked):
            self.mark[p.symbol] = p.price
            for acct in sorted(a for a, book in self.q.items() if book.get(p.symbol, 0.0) != 0):
                self.account_moved(acct, t, cause)
        elif isinstance(p, LimitSet):
            self.set_limit(p.account_id, p.limit_type, p.symbol, p.value, p.set_by, cause, t)

    def set_limit(
        self, acct: str, kind: str, sym: str | None, value: float, by: str | None,
        event_id: str | None, t: datetime,
    ) -> None:  # fmt: skip
        if kind != "MaxPositionSize" and sym is not None:
            return  # a symbol means nothing to an account-wide limit type
        self.order += 1
        self.limits[(acct, kind, sym)] = Limit(value, by, event_id, self.order)
        for k, a, s in list(self.metric):
            if k != kind or (acct != "*" and a != acct) or (sym is not None and s != sym):
                continue
            if kind == "MaxDailyVolume":  # the day's volume so far (0 on a new day)
                self.metric[(k, a, s)] = self.volume.get((a, t.date()), 0.0)
                self.day_of[a] = t.date()
            self.check(k, a, s, t, event_id)


def reference_breaches(
    envelopes: Iterable[Envelope],
    *,
    at: datetime | None = None,
    known_at: datetime | None = None,
    levels: tuple[float, ...] = (0.8, 0.9, 1.0),
    hypothetical: list[dict[str, Any]] | None = None,
    kinds: Iterable[str] | None = None,
) -> list[Interval]:
    """Every breach interval, by folding the events one at a time in business order."""
    known = [e for e in envelopes if known_at is None or e.timestamp <= known_at]
    busted = {(e.payload.account_id, e.payload.trade_id) for e in known
              if isinstance(e.payload, TradeCancelled)}  # fmt: skip
    todo: list[tuple[Any, datetime, int, Any]] = [
        (e.business_time, e.timestamp, n, e)
        for n, e in enumerate(known)
        if not isinstance(e.payload, TradeCancelled)
        and not (isinstance(e.payload, TradeExecuted)
                 and (e.payload.account_id, e.payload.trade_id) in busted)
        and (hypothetical is None or not isinstance(e.payload, LimitSet))
        and (at is None or e.business_time <= at)  # type: ignore[operator]
    ]  # fmt: skip
    low = datetime(1, 1, 1, tzinfo=UTC)
    for n, h in enumerate(hypothetical or []):
        # before stored events of the same time; "*" rows before an account's own rows
        todo.append(
            (h.get("set_at") or low, low, -100_000 + 50_000 * (h["account_id"] != "*") + n, h)
        )
    todo.sort(key=lambda x: (x[0], x[1], x[2]))
    wanted = set(kinds) if kinds is not None else {"MaxPositionSize", "MaxDailyVolume",
                                                    "MaxDrawdown", "MaxLeverage"}  # fmt: skip
    ref = Reference(levels, extra=bool(wanted & {"MaxGrossNotional", "MaxConcentration"}))
    for t, _, _, e in todo:
        ref.end_days(t)
        if isinstance(e, dict):
            ref.set_limit(e["account_id"], e["limit_type"], e.get("symbol"), e["value"],
                          e.get("set_by", "backtest"), None, t)  # fmt: skip
        else:
            ref.apply(e)
    # a bust acts when it is known, whatever its cancelled_at: no time of the history
    times = [e.business_time for e in known if not isinstance(e.payload, TradeCancelled)] + [
        h["set_at"] for h in hypothetical or [] if h.get("set_at") is not None]  # fmt: skip
    horizon = at if at is not None else max(times, default=None)
    if horizon is not None:
        ref.end_days(horizon)
    out = ref.done + [
        (*key, b.started_at, None, b.peak, b.limit, b.trigger, b.value, None,
         (lim.value if (lim := ref.limit_of(key[0], key[1], key[2])) else None),
         b.set_by, b.limit_event)
        for key, b in ref.open.items()
    ]  # fmt: skip
    return sorted((x for x in out if x[0] in wanted), key=_sort_key)


def _sort_key(x: Interval) -> tuple[Any, ...]:
    return tuple((v is None, v) for v in x)


def rows(frame: pl.DataFrame) -> list[Interval]:
    got = frame.select(
        pl.col("limit_type", "account_id", "symbol", "set_by").cast(pl.String),
        pl.exclude("limit_type", "account_id", "symbol", "set_by"),
    ).select(FIELDS)
    return sorted(got.iter_rows(), key=_sort_key)


def show(intervals: list[Interval]) -> list[tuple[Any, ...]]:
    """The shape of intervals, for readable hand-computed expectations."""
    return [(x[0], x[2], x[3], x[4], x[5], x[6], x[7]) for x in intervals]


# ============================================================================ by hand


def test_position_size_open_peak_close_reopen_and_limit_changes() -> None:
    b = Book()
    b.limit("A", "MaxPositionSize", 100, at(0), by="ops")
    b.trade("A", "X", "Buy", 60, 10, at(1))  # 60: within every level
    b.trade("A", "X", "Buy", 30, 10, at(2))  # 90: over 80 (0.8), not over 90
    t3 = b.trade("A", "X", "Buy", 20, 10, at(3))  # 110: over 90 and 100
    b.trade("A", "X", "Sell", 15, 10, at(4))  # 95: 1.0 ends; 0.9 goes on
    b.trade("A", "X", "Buy", 25, 10, at(5))  # 120: 1.0 again, a new interval
    raised = b.limit("A", "MaxPositionSize", 130, at(6), by="cro")  # 120 < 130: 1.0 ends
    lowered = b.limit("A", "MaxPositionSize", 50, at(7), by="cro")  # under 120: opens
    b.trade("A", "X", "Sell", 120, 10, at(8))  # flat: everything ends
    got = limits.breaches(b.history())
    X = "X"
    assert show(rows(got)) == [
        # 95 is still over 90 and 80; 120 is still over 0.9 * 130 and 0.8 * 130
        ("MaxPositionSize", X, 0.8, at(2), at(8), 120.0, 100.0),
        ("MaxPositionSize", X, 0.9, at(3), at(8), 120.0, 100.0),
        ("MaxPositionSize", X, 1.0, at(3), at(4), 110.0, 100.0),
        ("MaxPositionSize", X, 1.0, at(5), at(6), 120.0, 100.0),
        ("MaxPositionSize", X, 1.0, at(7), at(8), 120.0, 50.0),
    ]
    full = got.filter(pl.col("level") == 1.0).sort("started_at")
    assert full["trigger_event_id"].to_list()[0] == t3
    assert full["trigger_value"].to_list() == [110.0, 120.0, 120.0]
    assert full["ended_by_event_id"].to_list()[1] == raised  # a raised limit ends it
    assert full["trigger_event_id"].to_list()[2] == lowered  # a lowered limit starts it
    assert full["set_by"].cast(pl.String).to_list() == ["ops", "ops", "cro"]
    assert full["limit_value_at_end"].to_list() == [100.0, 130.0, 50.0]
    # 0.8 stayed in breach through both limit changes: one interval, limits 100 then 50
    warn = got.filter(pl.col("level") == 0.8).row(0, named=True)
    assert (warn["limit_value"], warn["limit_value_at_end"]) == (100.0, 50.0)
    assert rows(got) == reference_breaches(b.envelopes)


def test_a_symbol_limit_overrides_the_account_wide_one_for_its_symbol() -> None:
    b = Book()
    b.limit("A", "MaxPositionSize", 100, at(0))
    b.trade("A", "X", "Buy", 150, 10, at(1))  # over the account-wide 100
    b.trade("A", "Y", "Sell", 150, 10, at(2))  # short 150: |q| over 100 too
    own = b.limit("A", "MaxPositionSize", 200, at(3), symbol="X")  # X's own: X ends, Y goes on
    b.limit("A", "MaxPositionSize", 500, at(4))  # account-wide: Y ends, X keeps its 200
    b.trade("A", "X", "Buy", 100, 10, at(5))  # X 250 > 200
    got = limits.breaches(b.history(), levels=1.0)
    assert show(rows(got)) == [
        ("MaxPositionSize", "X", 1.0, at(1), at(3), 150.0, 100.0),
        ("MaxPositionSize", "X", 1.0, at(5), None, 250.0, 200.0),
        ("MaxPositionSize", "Y", 1.0, at(2), at(4), 150.0, 100.0),
    ]
    assert got.filter(pl.col("started_at") == at(5))["limit_event_id"].item() == own
    assert rows(got) == reference_breaches(b.envelopes, levels=(1.0,))


def test_no_limit_no_breach_and_a_limit_set_later_applies_from_its_set_at() -> None:
    b = Book()
    b.trade("A", "X", "Buy", 1000, 10, at(1))
    assert limits.breaches(b.history()).height == 0
    b.limit("B", "MaxPositionSize", 1, at(2))  # another account's limit
    assert limits.breaches(b.history()).height == 0
    late = b.limit("A", "MaxPositionSize", 10, at(3), recorded=at(30))
    got = limits.breaches(b.history(), levels=1.0)
    assert got.select("started_at", "trigger_event_id").row(0) == (at(3), late)
    assert limits.breaches(b.history(), known_at=at(29)).height == 0  # not known yet
    assert limits.breaches(b.history(), at=at(2)).height == 0  # not in force yet


def test_a_bust_erases_a_breach_once_it_is_known() -> None:
    b = Book()
    b.limit("A", "MaxPositionSize", 100, at(0))
    b.trade("A", "X", "Buy", 80, 10, at(1))
    fat = b.trade("A", "X", "Buy", 900, 10, at(2), trade_id="T-FAT")
    b.cancel("A", "T-FAT", at(3), recorded=at(40))
    before = limits.breaches(b.history(), known_at=at(39), levels=1.0)
    assert before.select("started_at", "ended_at", "peak_value", "trigger_event_id").rows() == [
        (at(2), None, 980.0, fat)
    ]
    assert limits.breaches(b.history(), levels=1.0).height == 0
    assert limits.breaches(b.history(), known_at=at(40), levels=1.0).height == 0


def test_daily_volume_ends_at_midnight_or_when_raised() -> None:
    b = Book()  # T0 is 20:00 UTC: midnight is at(240)
    b.limit("A", "MaxDailyVolume", 100, at(0))
    b.trade("A", "X", "Buy", 60, 10, at(10))
    trigger = b.trade("A", "X", "Sell", 50, 10, at(20))  # 110 > 100
    b.trade("A", "X", "Buy", 30, 10, at(30))  # 140: the peak; buying or selling adds up
    b.trade("A", "X", "Buy", 10, 10, at(250))  # the next day: 10
    b.trade("A", "X", "Buy", 95, 10, at(260))  # 105 > 100
    raised = b.limit("A", "MaxDailyVolume", 200, at(270), by="cro")  # raised: ends
    b.limit("A", "MaxDailyVolume", 50, at(280), by="cro")  # lowered under 105: opens
    h = b.history()
    midnight = at(240)
    got = limits.breaches(h, levels=1.0)
    assert show(rows(got)) == [
        ("MaxDailyVolume", None, 1.0, at(20), midnight, 140.0, 100.0),
        ("MaxDailyVolume", None, 1.0, at(260), at(270), 105.0, 100.0),
        ("MaxDailyVolume", None, 1.0, at(280), None, 105.0, 50.0),  # its day is not over
    ]
    first = got.row(0, named=True)
    assert (first["trigger_event_id"], first["ended_by_event_id"]) == (trigger, None)
    assert got.row(1, named=True)["ended_by_event_id"] == raised
    # at T the day of the last one is over: it ended at midnight, with no event
    later = limits.breaches(h, at=midnight + timedelta(days=1, minutes=5), levels=1.0)
    assert later["ended_at"].to_list()[-1] == midnight + timedelta(days=1)
    # before midnight, the first one was still open
    assert limits.breaches(h, at=at(200), levels=1.0)["ended_at"].to_list() == [None]
    assert rows(got) == reference_breaches(b.envelopes, levels=(1.0,))


def test_daily_volume_counts_only_the_day_and_survives_no_event() -> None:
    b = Book()
    b.limit("A", "MaxDailyVolume", 100, at(0))
    b.trade("A", "X", "Buy", 90, 10, at(230))  # 23:50
    b.trade("A", "X", "Buy", 90, 10, at(250))  # 00:10 the next day: 90, not 180
    b.limit("A", "MaxDailyVolume", 80, at(260))  # under today's 90
    got = limits.breaches(b.history(), levels=1.0)
    assert show(rows(got)) == [("MaxDailyVolume", None, 1.0, at(260), None, 90.0, 80.0)]
    assert rows(got) == reference_breaches(b.envelopes, levels=(1.0,))


def test_a_bust_booked_the_next_day_does_not_end_the_days_breach() -> None:
    # the horizon was the latest business time of every event, a bust's cancelled_at
    # too: a bust booked the next day closed the day's open breach at midnight
    b = Book()
    b.limit("A", "MaxDailyVolume", 10, at(0))
    b.trade("A", "X", "Buy", 20, 10, at(10), trade_id="T-1")
    b.trade("A", "X", "Buy", 1, 10, at(20), trade_id="T-2")
    b.cancel("A", "T-2", at(300))  # the next day (midnight is at(240))
    got = limits.breaches(b.history(), levels=1.0)
    assert show(rows(got)) == [("MaxDailyVolume", None, 1.0, at(10), None, 20.0, 10.0)]
    assert rows(got) == reference_breaches(b.envelopes, levels=(1.0,))
    # the next day's own events end it, as before
    b.fund("A", 1, at(300))
    assert limits.breaches(b.history(), levels=1.0)["ended_at"].to_list() == [at(240)]


def test_a_scheduled_limit_after_every_event_takes_effect_at_its_set_at() -> None:
    # the horizon includes it (the live engine's docstring: breaches applies it at its
    # set_at even if no later event comes), and so the day it is set in has come
    b = Book()
    b.limit("A", "MaxDailyVolume", 10, at(0))
    b.trade("A", "X", "Buy", 20, 10, at(10))
    b.limit("A", "MaxPositionSize", 5, at(300), recorded=at(11))  # the next day
    got = limits.breaches(b.history(), levels=1.0)
    assert show(rows(got)) == [
        ("MaxDailyVolume", None, 1.0, at(10), at(240), 20.0, 10.0),
        ("MaxPositionSize", "X", 1.0, at(300), None, 20.0, 5.0),
    ]
    assert rows(got) == reference_breaches(b.envelopes, levels=(1.0,))


def test_a_history_loaded_until_u_ends_nothing_after_u(fresh_store: Store) -> None:
    # a History loaded with until=U keeps every bust whatever its cancelled_at: one
    # booked after U moved the horizon past U, and a daily breach open at U ended at
    # a midnight after it; a hypothetical limit set after U did too
    u = at(30)
    fresh_store.append("A", [
        LimitSet(account_id="A", limit_type="MaxDailyVolume", value=10.0, set_by="cro",
                 set_at=at(0)),
        TradeExecuted(trade_id="T-1", account_id="A", symbol="X", side=Side.Buy,
                      quantity=20.0, price=10.0, executed_at=at(10)),
        TradeCancelled(trade_id="NOPE", account_id="A", reason="typo", cancelled_at=at(300)),
        AccountFunded(account_id="A", amount=1.0, funded_at=at(400)),
    ])  # fmt: skip
    cols = ["limit_type", "started_at", "ended_at", "ended_by_event_id"]
    whole = riskbook.load(fresh_store, cache=False, progress=False)
    until_u = riskbook.load(fresh_store, until=u, cache=False, progress=False)
    assert until_u.cancels.height == 1  # kept, though after U
    expected = limits.breaches(whole, at=u, levels=1.0).select(cols)
    assert expected.rows() == [("MaxDailyVolume", at(10), None, None)]
    assert limits.breaches(until_u, levels=1.0).select(cols).equals(expected)
    assert limits.breaches(whole, levels=1.0)["ended_at"].to_list() == [at(240)]
    later = [{"account_id": "A", "limit_type": "MaxDailyVolume", "value": 10.0},
             {"account_id": "A", "limit_type": "MaxPositionSize", "value": 1.0,
              "set_at": at(300)}]  # fmt: skip
    what_if = limits.breaches(until_u, limits=later, levels=1.0)
    assert what_if.select(cols).rows() == [("MaxDailyVolume", at(10), None, None)]


def test_drawdown_open_close_reopen_and_a_raise_mid_breach() -> None:
    b = Book()
    b.limit("A", "MaxDrawdown", 0.15, at(0))
    b.fund("A", 1000, at(1))
    b.trade("A", "X", "Buy", 100, 10, at(2))
    down = b.mark("X", 8, at(3))  # equity 800: 20% down
    b.mark("X", 7, at(4))  # 30%: the peak
    up = b.mark("X", 9, at(5))  # 10%: within
    b.mark("X", 8, at(6))  # 20% again
    b.fund("A", 1000, at(7))  # a deposit moves the peak too: (2000 - 1800) / 2000 = 10%
    b.mark("X", 5, at(8))  # (2000 - 1500) / 2000 = 25%
    raise_ = b.limit("A", "MaxDrawdown", 0.3, at(9), by="cro")
    lower = b.limit("A", "MaxDrawdown", 0.2, at(10), by="cro")  # under the 25%: opens
    got = limits.breaches(b.history(), levels=1.0)
    assert show(rows(got)) == [
        ("MaxDrawdown", None, 1.0, at(3), at(5), 0.3, 0.15),
        ("MaxDrawdown", None, 1.0, at(6), at(7), 0.2, 0.15),
        ("MaxDrawdown", None, 1.0, at(8), at(9), 0.25, 0.15),
        ("MaxDrawdown", None, 1.0, at(10), None, 0.25, 0.2),
    ]
    assert got["trigger_event_id"].to_list()[0] == down
    assert got["ended_by_event_id"].to_list()[0] == up
    assert got["ended_by_event_id"].to_list()[2] == raise_
    assert got["trigger_event_id"].to_list()[3] == lower
    assert rows(got) == reference_breaches(b.envelopes, levels=(1.0,))


def test_leverage_open_close_limit_changes_and_an_infinite_peak() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.limit("A", "MaxLeverage", 2.0, at(1))
    b.trade("A", "X", "Buy", 250, 10, at(2))  # 2500 / 1000 = 2.5: over
    b.mark("X", 12, at(3))  # 3000 / 1500 = 2.0: not over 2.0
    b.mark("X", 14, at(4))  # 3500 / 2000 = 1.75
    lowered = b.limit("A", "MaxLeverage", 1.5, at(5))  # under 1.75: opens
    raised = b.limit("A", "MaxLeverage", 3.0, at(6))  # over 1.75: ends
    b.mark("X", 4, at(7))  # equity 1000 - 2500 + 1000 < 0: infinite
    b.trade("A", "X", "Sell", 250, 4, at(8))  # flat: 0
    b.limit("A", "MaxLeverage", 0.0, at(9))  # 0 > 0 is not a breach
    got = limits.breaches(b.history(), levels=(0.5, 1.0))
    assert show(rows(got)) == [
        ("MaxLeverage", None, 0.5, at(2), at(8), math.inf, 2.0),  # over half of every limit
        ("MaxLeverage", None, 1.0, at(2), at(3), 2.5, 2.0),
        ("MaxLeverage", None, 1.0, at(5), at(6), 1.75, 1.5),
        ("MaxLeverage", None, 1.0, at(7), at(8), math.inf, 3.0),
    ]
    full = got.filter(pl.col("level") == 1.0)
    assert full["trigger_event_id"].to_list()[1] == lowered
    assert full["ended_by_event_id"].to_list()[1] == raised
    assert got.row(0, named=True)["limit_value_at_end"] == 3.0
    assert rows(got) == reference_breaches(b.envelopes, levels=(0.5, 1.0))


def _busted(kind: str, b: Book) -> None:
    """A breach of ``kind`` that only the trade T-BUST (busted later) causes."""
    b.fund("A", 1000, at(0))
    if kind == "MaxPositionSize":
        b.limit("A", kind, 100, at(0))
    elif kind == "MaxDailyVolume":
        b.limit("A", kind, 100, at(0))
        b.trade("A", "X", "Buy", 60, 10, at(1))
    elif kind == "MaxDrawdown":
        b.limit("A", kind, 0.1, at(0))
    else:
        b.limit("A", kind, 2.0, at(0))
    b.trade("A", "X", "Buy", 300, 10, at(2), trade_id="T-BUST")  # |q| 300, volume 360,
    b.mark("X", 5, at(3))  # equity 1000 - 3000 + 1500 = -500: drawdown 150%, leverage inf
    b.cancel("A", "T-BUST", at(4), recorded=at(30))


@pytest.mark.parametrize("kind", ["MaxPositionSize", "MaxDailyVolume", "MaxDrawdown",
                                  "MaxLeverage"])  # fmt: skip
def test_a_bust_erases_the_breach_of_every_built_in(kind: str) -> None:
    b = Book()
    _busted(kind, b)
    h = b.history()
    before = limits.breaches(h, known_at=at(29), levels=1.0)
    start = at(3) if kind == "MaxDrawdown" else at(2)  # a fill at the market loses nothing
    assert before.select(pl.col("limit_type").cast(pl.String), "started_at").rows() == [
        (kind, start)
    ]
    assert limits.breaches(h, levels=1.0).height == 0
    assert rows(before) == reference_breaches(b.envelopes, known_at=at(29), levels=(1.0,))


def test_at_and_known_at() -> None:
    b = Book()
    b.limit("A", "MaxPositionSize", 100, at(0))
    b.trade("A", "X", "Buy", 150, 10, at(1))
    b.trade("A", "X", "Sell", 100, 10, at(2), recorded=at(20))  # a late fill brings it back
    h = b.history()
    assert show(rows(limits.breaches(h, levels=1.0))) == [
        ("MaxPositionSize", "X", 1.0, at(1), at(2), 150.0, 100.0)
    ]
    assert limits.breaches(h, known_at=at(10), levels=1.0)["ended_at"].to_list() == [None]
    assert limits.breaches(h, at=at(1), levels=1.0)["ended_at"].to_list() == [None]
    assert limits.breaches(h, at=at(0), levels=1.0).height == 0
    assert limits.breaches(h, at=format_time(at(1)), levels=1.0).height == 1
    with pytest.raises(ValueError, match="at"):
        limits.breaches(h, at="yesterday")
    with pytest.raises(ValueError, match="time zone"):
        limits.breaches(h, known_at=datetime(2024, 1, 1))


def test_empty_history_and_columns() -> None:
    got = limits.breaches(History.empty())
    assert got.columns == list(limits.BREACH_COLUMNS)
    assert got.height == 0
    assert limits.backtest(History.empty(), [{"account_id": "*", "limit_type": "MaxLeverage",
                                               "value": 1.0}]).height == 0  # fmt: skip
    with pytest.raises(TypeError):
        limits.breaches("history")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="levels"):
        limits.breaches(History.empty(), levels=(0.0,))


# ============================================================================ against the reference

ACCOUNTS = ("A", "B")
SYMBOLS = ("X", "Y")
# One step is 30 minutes from T0 (20:00 UTC): steps 8, 56, 104 are midnights.
STEP = 30


def _time(step: int) -> datetime:
    return at(step * STEP)


@st.composite
def histories(draw: st.DrawFn, max_events: int = 40) -> Book:
    """Funded accounts, marked symbols, then trades, marks, adjustments, funding, busts
    and limits of every type at shared and distinct times over three UTC days, some
    recorded late. Integer quantities and prices keep every figure exact."""
    b = Book()
    for sym in SYMBOLS:
        b.mark(sym, draw(st.integers(1, 30)), at(-1))
    for acct in ACCOUNTS:
        b.fund(acct, draw(st.integers(500, 3000)), at(-1))
    trades: list[tuple[str, str, datetime]] = []
    steps = st.integers(0, 120)
    for _ in range(draw(st.integers(0, max_events))):
        t = _time(draw(steps))
        late = draw(st.sampled_from([0, 0, 0, 1, 5, 200]))
        rec = t + timedelta(minutes=late * STEP)
        acct = draw(st.sampled_from(ACCOUNTS))
        sym = draw(st.sampled_from(SYMBOLS))
        kind = draw(st.sampled_from(["trade"] * 5 + ["mark"] * 3 + ["limit"] * 3
                                    + ["fund", "adjust", "cancel"]))  # fmt: skip
        if kind == "trade":
            tid = f"T-{len(b.envelopes)}"
            b.trade(acct, sym, draw(st.sampled_from(["Buy", "Sell"])), draw(st.integers(1, 60)),
                    draw(st.integers(1, 30)), t, rec, trade_id=tid)  # fmt: skip
            trades.append((acct, tid, rec))
        elif kind == "mark":
            b.mark(sym, draw(st.integers(1, 30)), t, rec)
        elif kind == "fund":
            b.fund(acct, draw(st.sampled_from([-400, -100, 100, 700])), t, rec)
        elif kind == "adjust":
            b.adjust(acct, sym, 0, draw(st.integers(-50, 50)), t, rec)
        elif kind == "cancel" and trades:
            who, tid, trade_rec = draw(st.sampled_from(trades))
            b.cancel(who, tid, t, trade_rec + timedelta(minutes=draw(st.integers(0, 300))))
        elif kind == "limit":
            lt = draw(st.sampled_from(["MaxPositionSize", "MaxDailyVolume", "MaxDrawdown",
                                       "MaxLeverage"]))  # fmt: skip
            value = {
                "MaxPositionSize": st.integers(0, 80).map(float),
                "MaxDailyVolume": st.integers(0, 150).map(float),
                "MaxDrawdown": st.integers(0, 12).map(lambda x: x / 40),
                "MaxLeverage": st.integers(0, 12).map(lambda x: x / 4),
            }[lt]
            symbol = draw(st.sampled_from([None, None, sym])) if lt == "MaxPositionSize" else None
            b.limit(acct, lt, draw(value), t, symbol=symbol, by=draw(st.sampled_from("pq")),
                    recorded=rec)  # fmt: skip
    return b


def edge_cases() -> Book:
    """Same-time events, a bust, a flip through zero, a limit at midnight, a late fill."""
    b = Book()
    for sym in SYMBOLS:
        b.mark(sym, 10, at(-1))
    b.fund("A", 1000, at(-1))
    b.limit("A", "MaxPositionSize", 50, _time(0))
    b.limit("A", "MaxDailyVolume", 100, _time(0))
    b.limit("A", "MaxLeverage", 0.5, _time(0))
    b.limit("A", "MaxDrawdown", 0.1, _time(0))
    b.trade("A", "X", "Buy", 60, 10, _time(1), trade_id="T-1")  # same time as the next
    b.trade("A", "X", "Sell", 120, 10, _time(1))  # flips through zero: -60
    b.trade("A", "Y", "Buy", 30, 10, _time(2), trade_id="T-3")
    b.cancel("A", "T-3", _time(3), _time(5))
    b.mark("X", 14, _time(4))
    b.limit("A", "MaxDailyVolume", 60, _time(8))  # at midnight exactly
    b.trade("A", "X", "Buy", 70, 14, _time(8), _time(30))  # at midnight, recorded late
    b.limit("A", "MaxPositionSize", 5, _time(9), symbol="X")
    b.adjust("A", "X", 10, 20, _time(10))
    return b


times = st.one_of(st.none(), st.integers(-1, 125).map(_time))
level_sets = st.sampled_from([(1.0,), (0.8, 0.9, 1.0), (0.5, 1.0)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=histories(), t=times, k=times, levels=level_sets)
@example(b=edge_cases(), t=None, k=None, levels=(0.8, 0.9, 1.0))
@example(b=edge_cases(), t=_time(8), k=_time(6), levels=(1.0,))
@example(b=edge_cases(), t=None, k=_time(4), levels=(0.5, 1.0))
def test_breaches_equal_the_reference_evaluator(
    b: Book, t: datetime | None, k: datetime | None, levels: tuple[float, ...]
) -> None:
    got = limits.breaches(b.history(), at=t, known_at=k, levels=levels)
    assert rows(got) == reference_breaches(b.envelopes, at=t, known_at=k, levels=levels)


def window(f: pl.DataFrame, col: str, lo: datetime | None, hi: datetime) -> pl.DataFrame:
    """The rows of ``f`` with ``lo < col <= hi``: one micro-batch."""
    keep = pl.col(col) <= hi
    if lo is not None:
        keep &= pl.col(col) > lo
    return f.filter(keep)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=histories(), cuts=st.lists(st.integers(-1, 125), max_size=4), k=times)
@example(b=edge_cases(), cuts=[1, 7, 8, 9], k=None)
def test_batches_with_carried_state_give_the_one_batch_result(
    b: Book, cuts: list[int], k: datetime | None
) -> None:
    """What the live processor does: the same fold over micro-batches, state carried."""
    h = b.history()
    known = [e.business_time for e in b.envelopes if k is None or e.timestamp <= k]
    assume(known)  # nothing recorded by k: nothing to split
    horizon = max(known)  # type: ignore[type-var]
    bounds = [*sorted({_time(c) for c in cuts if _time(c) < horizon}), horizon]
    levels = (0.8, 1.0)
    for name in limits.names():
        if name not in ("MaxPositionSize", "MaxDailyVolume", "MaxDrawdown", "MaxLeverage"):
            continue
        d = limits.get(name)
        metric = d.metric(h, known_at=k)
        lim = limits.stored_limits(h, known_at=k).filter(pl.col("limit_type") == name)
        whole, _ = limits.evaluate(d, metric, lim, levels=levels, through=horizon)
        state = limits.BreachState.empty(d, levels)
        closed, last, lo = [], None, None
        for hi in bounds:
            part, state = limits.evaluate(
                d, window(metric, "time", lo, hi), window(lim, "set_at", lo, hi), levels=levels,
                state=state, through=hi,
            )  # fmt: skip
            closed.append(part.filter(pl.col("ended_at").is_not_null()))
            last, lo = part, hi
        assert last is not None
        batched = pl.concat([*closed, last.filter(pl.col("ended_at").is_null())])
        assert rows(batched.drop("carried")) == rows(whole.drop("carried")), name
        assert state.open.height == whole.filter(pl.col("ended_at").is_null()).height


NO_LIMITS = pl.DataFrame(schema=limits.LIMIT_ROWS_SCHEMA)


def test_a_batch_before_the_state_is_refused() -> None:
    b = Book()
    b.limit("A", "MaxPositionSize", 10, at(0))
    b.trade("A", "X", "Buy", 20, 10, at(1))
    b.trade("A", "X", "Buy", 20, 10, at(5))
    h = b.history()
    d = limits.get("MaxPositionSize")
    metric = d.metric(h)
    _, state = limits.evaluate(d, metric.tail(1), limits.stored_limits(h).drop("limit_type"))
    with pytest.raises(ValueError, match="comes before"):
        limits.evaluate(d, metric.head(1), NO_LIMITS, state=state)
    with pytest.raises(ValueError, match="levels"):
        limits.evaluate(d, metric, NO_LIMITS, levels=(1.0,), state=state)


# ============================================================================ user-defined types


def gross_notional(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """Gross exposure in currency, after every event that moves the account."""
    return riskbook.account_timeline(history, known_at=known_at).select(
        "account_id", "timestamp", "position", "event_id",
        time="occurred_at", value="gross_exposure",
    )  # fmt: skip


def concentration(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """The largest position's share of gross exposure, as a notebook would compute it:
    each symbol's market value after every account event, side by side, carried forward."""
    acct = riskbook.account_timeline(history, known_at=known_at)
    pos = riskbook.position_timeline(history, known_at=known_at)
    marks = history.marks if known_at is None else history.marks.filter(
        pl.col("timestamp") <= known_at
    )  # fmt: skip
    # one clock for account events and marks: business time, recorded time, position
    clock = (
        pl.concat([acct.select("occurred_at", "timestamp", "position"),
                   marks.select(pl.col("marked_at").alias("occurred_at"), "timestamp", "position")])
        .unique()
        .sort("occurred_at", "timestamp", "position")
        .with_row_index("tick")
    )  # fmt: skip
    on = ["occurred_at", "timestamp", "position"]
    acct = acct.join(clock, on=on)
    prices = marks.rename({"marked_at": "occurred_at"}).join(clock, on=on)
    values = (
        acct.filter(pl.col("symbol").is_not_null())
        .join(pos.select("event_id", "account_id", "symbol", "quantity", "avg_price"),
              on=["event_id", "account_id", "symbol"], how="left")
        .sort("tick")
        .with_columns(pl.col("quantity", "avg_price").forward_fill().over("account_id", "symbol"))
        .join_asof(prices.select("symbol", "tick", "price").sort("tick"), on="tick", by="symbol",
                   check_sortedness=False)
        .select("account_id", "tick", "symbol",
                value=(pl.col("quantity") * pl.coalesce("price", "avg_price")).abs())
    )  # fmt: skip
    symbols = values["symbol"].unique().cast(pl.String).to_list()
    wide = values.with_columns(pl.col("symbol").cast(pl.String)).pivot(
        on="symbol", index=["account_id", "tick"], values="value"
    )
    out = (
        acct.join(wide, on=["account_id", "tick"], how="left")
        .sort("tick")
        .with_columns(pl.col(symbols).forward_fill().over("account_id"))
    )
    largest = pl.max_horizontal(pl.col(symbols).fill_null(0.0)) if symbols else pl.lit(0.0)
    return out.select(
        "account_id", "timestamp", "position", "event_id", time="occurred_at",
        value=pl.when(pl.col("gross_exposure") > 0)
        .then(largest / pl.col("gross_exposure"))
        .otherwise(0.0),
    )  # fmt: skip


GROSS = limits.LimitSpec("MaxGrossNotional", "account", "USD", gross_notional)
CONCENTRATION = limits.LimitSpec("MaxConcentration", "account", "fraction", concentration)


def test_a_limit_type_defined_in_a_notebook_is_registered_and_backtested() -> None:
    limits.register(GROSS)
    limits.register(CONCENTRATION)
    assert {"MaxGrossNotional", "MaxConcentration"} <= set(limits.names())
    b = Book()
    b.fund("A", 10_000, at(0))
    b.mark("X", 10, at(0))
    b.mark("Y", 10, at(0))
    b.trade("A", "X", "Buy", 300, 10, at(1))  # X 3000: 100% of gross
    b.trade("A", "Y", "Buy", 300, 10, at(2))  # 3000 / 6000 = 50%
    b.mark("X", 20, at(3))  # X 6000 / 9000 = 67%; gross 9000
    b.trade("A", "Y", "Buy", 300, 10, at(4))  # Y 6000: 50%; gross 12000
    b.limit("A", "MaxGrossNotional", 10_000, at(0))  # stored: a registered name is valid
    h = b.history()
    what_if = [
        {"account_id": "*", "limit_type": "MaxConcentration", "value": 0.6},
        {"account_id": "A", "limit_type": "MaxGrossNotional", "value": 8000, "set_at": at(2)},
    ]
    got = limits.backtest(h, what_if, levels=1.0)
    assert got["scenario"].to_list() == ["actual", "hypothetical", "hypothetical", "hypothetical"]
    assert got["set_by"].cast(pl.String).to_list() == ["risk", "backtest", "backtest", "backtest"]
    actual = got.filter(pl.col("scenario") == "actual")
    hyp = got.filter(pl.col("scenario") == "hypothetical")
    assert show(rows(actual.drop("scenario"))) == [
        ("MaxGrossNotional", None, 1.0, at(4), None, 12000.0, 10000.0)
    ]
    assert show(rows(hyp.drop("scenario"))) == [
        ("MaxConcentration", None, 1.0, at(1), at(2), 1.0, 0.6),
        ("MaxConcentration", None, 1.0, at(3), at(4), 6000 / 9000, 0.6),
        ("MaxGrossNotional", None, 1.0, at(3), None, 12000.0, 8000.0),
    ]
    # the same code as the built-ins: the reference agrees
    kinds = ["MaxGrossNotional", "MaxConcentration"]
    assert rows(hyp.drop("scenario")) == reference_breaches(
        b.envelopes, levels=(1.0,), hypothetical=what_if, kinds=kinds
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=histories(max_events=25), k=times, gross=st.integers(0, 6000),
       share=st.integers(1, 10), own=st.booleans())  # fmt: skip
def test_backtests_of_user_types_equal_the_reference(
    b: Book, k: datetime | None, gross: int, share: int, own: bool
) -> None:
    limits.register(GROSS)
    limits.register(CONCENTRATION)
    what_if: list[dict[str, Any]] = [
        {"account_id": "*", "limit_type": "MaxGrossNotional", "value": float(gross)},
        {"account_id": "*", "limit_type": "MaxConcentration", "value": share / 10,
         "set_at": _time(20)},
    ]  # fmt: skip
    if own:  # an account's own row wins over "*" from the same time, then later rows win
        what_if.append({"account_id": "A", "limit_type": "MaxGrossNotional", "value": 100.0})
        what_if.append({"account_id": "*", "limit_type": "MaxGrossNotional", "value": 50.0,
                        "set_at": _time(60)})  # fmt: skip
    got = limits.backtest(b.history(), what_if, known_at=k, levels=(0.9, 1.0))
    hyp = got.filter(pl.col("scenario") == "hypothetical").drop("scenario")
    assert rows(hyp) == reference_breaches(
        b.envelopes, known_at=k, levels=(0.9, 1.0), hypothetical=what_if,
        kinds=["MaxGrossNotional", "MaxConcentration"],
    )  # fmt: skip


def test_new_values_for_a_built_in_beside_the_actual_ones() -> None:
    b = Book()
    b.limit("A", "MaxPositionSize", 100, at(0))
    b.limit("B", "MaxPositionSize", 100, at(0))
    b.trade("A", "X", "Buy", 90, 10, at(1))
    b.trade("B", "X", "Buy", 120, 10, at(2))
    events = [LimitSet(account_id="*", limit_type="MaxPositionSize", value=80.0, set_by="quant",
                       set_at=at(0))]  # fmt: skip
    got = limits.backtest(b.history(), events, levels=1.0)
    assert got.select(
        "scenario", pl.col("account_id").cast(pl.String), "started_at", "limit_value"
    ).rows() == [
        ("actual", "B", at(2), 100.0),
        ("hypothetical", "A", at(1), 80.0),
        ("hypothetical", "B", at(2), 80.0),
    ]
    assert got["set_by"].cast(pl.String).to_list() == ["risk", "quant", "quant"]
    frame = pl.DataFrame({"account_id": ["A"], "limit_type": ["MaxPositionSize"],
                          "value": [80.0], "set_at": [format_time(at(0))]})  # fmt: skip
    assert limits.breaches(b.history(), limits=frame, levels=1.0).height == 1
    with pytest.raises(KeyError, match="NoSuchLimit"):
        limits.backtest(b.history(), [{"account_id": "A", "limit_type": "NoSuchLimit", "value": 1}])
    with pytest.raises(ValueError, match=">= 0"):
        limits.backtest(b.history(), [{"account_id": "A", "limit_type": "MaxLeverage",
                                       "value": -1.0}])  # fmt: skip


def test_a_metric_without_event_ids_or_order_still_works() -> None:
    def shuffled(history: History, *, known_at: Any = None) -> pl.DataFrame:
        return (
            riskbook.position_timeline(history, known_at=known_at)
            .select("account_id", "symbol", "timestamp", "position", time="occurred_at",
                    value=pl.col("quantity").abs() * 2)
            .reverse()
        )  # fmt: skip

    limits.register(limits.LimitSpec("MaxDoubleSize", "account_symbol", "quantity", shuffled))
    b = Book()
    first = b.trade("A", "X", "Buy", 10, 10, at(1))
    b.trade("A", "X", "Buy", 10, 10, at(2))
    last = b.trade("A", "X", "Sell", 20, 10, at(3))
    got = limits.breaches(b.history(), limits=[{"account_id": "A", "limit_type": "MaxDoubleSize",
                                                "value": 15.0}], levels=1.0)  # fmt: skip
    assert got.select("trigger_event_id", "ended_by_event_id", "peak_value").rows() == [
        (first, last, 40.0)
    ]
    bad = limits.LimitSpec("MaxBroken", "account", "x", lambda h, **k: pl.DataFrame({"a": [1]}))
    limits.register(bad)
    with pytest.raises(ValueError, match="lacks the column"):
        limits.breaches(b.history(), limits=[{"account_id": "A", "limit_type": "MaxBroken",
                                              "value": 1.0}])  # fmt: skip


# ============================================================================ the registry


def test_registry_rules() -> None:
    spec = limits.LimitSpec("MaxTestRegistry", "account", "ratio", gross_notional)
    assert limits.register(spec) is spec
    assert (
        limits.register(limits.LimitSpec("MaxTestRegistry", "account", "ratio", gross_notional))
        is not None
    )  # equal: a no-op
    other = limits.LimitSpec("MaxTestRegistry", "account", "USD", gross_notional)
    with pytest.raises(ValueError, match="already registered"):
        limits.register(other)
    assert limits.register(other, replace=True) is other
    assert limits.get("MaxTestRegistry").unit == "USD"
    with pytest.raises(ValueError, match="already registered"):
        limits.register(limits.LimitSpec("MaxLeverage", "account", "ratio", gross_notional))
    with pytest.raises(ValueError, match="scope"):
        limits.LimitSpec("MaxOdd", "galaxy", "x", gross_notional)
    with pytest.raises(ValueError, match="identifier"):
        limits.LimitSpec("not a name", "account", "x", gross_notional)
    with pytest.raises(KeyError, match="no limit type"):
        limits.get("MaxNothing")
    for d in limits.BUILT_INS:
        assert limits.get(d.name) is d and isinstance(d, limits.LimitDefinition)
    # a registered name becomes a valid limit_type of events
    LimitSet(account_id="A", limit_type="MaxTestRegistry", value=1.0, set_by="x", set_at=T0)


def test_limit_types_from_installed_packages_load_lazily(tmp_path: Path) -> None:
    """A real distribution on sys.path with an entry point in riskbook.limit_types."""
    pkg = tmp_path / "acme_limits.py"
    pkg.write_text(
        "import polars as pl\n"
        "from riskbook.limits import LimitSpec\n"
        "def metric(history, *, known_at=None):\n"
        "    return pl.DataFrame()\n"
        "NOTIONAL = LimitSpec('MaxAcmeNotional', 'account', 'USD', metric)\n"
        "BROKEN = 1 / 0\n"
    )
    dist = tmp_path / "acme_limits-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-limits\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[riskbook.limit_types]\nnotional = acme_limits:NOTIONAL\n"
    )
    registry: Any = importlib.import_module("riskbook.limits._registry")
    sys.path.insert(0, str(tmp_path))
    loaded = registry._entry_points_loaded
    try:
        registry._entry_points_loaded = False
        with pytest.warns(RuntimeWarning, match="division by zero"):
            limits.names()  # the module fails to import: a warning, not a crash
        registry._entry_points_loaded = False
        pkg.write_text(pkg.read_text().replace("BROKEN = 1 / 0\n", ""))
        sys.modules.pop("acme_limits", None)
        assert "MaxAcmeNotional" in limits.names()
        assert limits.get("MaxAcmeNotional").unit == "USD"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("acme_limits", None)
        registry._entry_points_loaded = loaded


# ============================================================================ audit trail


def test_limit_history_and_effective_limits() -> None:
    b = Book()
    first = b.limit("A", "MaxPositionSize", 100, at(0), by="ops")
    b.limit("A", "MaxPositionSize", 50, at(10), symbol="X", by="cro", recorded=at(12))
    b.limit("A", "MaxPositionSize", 200, at(5), by="cro", recorded=at(20))  # recorded late
    b.limit("B", "MaxLeverage", 3, at(1), by="ops")
    h = b.history()
    trail = limits.limit_history(h)
    assert trail.select(
        pl.col("account_id", "limit_type", "symbol", "set_by").cast(pl.String),
        "old_value", "new_value", "set_at", "timestamp",
    ).rows() == [
        ("A", "MaxPositionSize", None, "ops", None, 100.0, at(0), at(0)),
        ("B", "MaxLeverage", None, "ops", None, 3.0, at(1), at(1)),
        ("A", "MaxPositionSize", None, "cro", 100.0, 200.0, at(5), at(20)),
        ("A", "MaxPositionSize", "X", "cro", None, 50.0, at(10), at(12)),
    ]  # fmt: skip
    assert trail["event_id"].to_list()[0] == first
    assert limits.limit_history(h, known_at=at(15)).height == 3
    eff = limits.effective_limits(h, at=at(7))
    assert eff.select(pl.col("account_id", "limit_type").cast(pl.String), "value").rows() == [
        ("A", "MaxPositionSize", 200.0),
        ("B", "MaxLeverage", 3.0),
    ]
    # at 7, as known at 10: the raise to 200 was not recorded yet
    known = limits.effective_limits(h, at=at(7), known_at=at(10))
    assert known["value"].to_list() == [100.0, 3.0]
    assert limits.effective_limits(h)["symbol"].cast(pl.String).to_list() == [None, "X", None]


def test_the_audit_trail_at_t_is_the_changes_that_apply_by_t() -> None:
    from polars.testing import assert_frame_equal

    b = Book()
    b.limit("A", "MaxPositionSize", 100, at(0), by="ops")
    b.limit("A", "MaxPositionSize", 50, at(10), symbol="X", by="cro", recorded=at(12))
    b.limit("A", "MaxPositionSize", 200, at(5), by="cro", recorded=at(20))  # recorded late
    b.limit("A", "MaxPositionSize", 300, at(5), by="cro")  # same set_at: after it by time
    b.limit("B", "MaxLeverage", 3, at(1), by="ops")
    h = b.history()
    for k in (None, at(15)):
        trail = limits.limit_history(h, known_at=k)
        for t in (at(-1), at(0), at(4), at(5), at(9), at(10), at(99)):
            cut = limits.limit_history(h, at=t, known_at=k)
            assert_frame_equal(cut, trail.filter(pl.col("set_at") <= t))
            assert_frame_equal(
                limits.stored_limits(h, at=t, known_at=k),
                limits.stored_limits(h, known_at=k).filter(pl.col("set_at") <= t),
            )
    assert limits.limit_history(h, at=at(5))["new_value"].to_list() == [100.0, 3.0, 300.0, 200.0]
    assert limits.limit_history(h, at="2024-03-01T20:00:00Z").height == 1
    with pytest.raises(ValueError, match="time zone"):
        limits.limit_history(h, at=datetime(2024, 3, 1))
    with pytest.raises(ValueError, match="at"):
        limits.stored_limits(h, at="soon")


# ============================================================================ reconciliation


def reconciled_history() -> History:
    """Reports matched, busted (B, known at 30), missing (C) and without a cause (A's second)."""
    b = Book()
    b.limit("A", "MaxPositionSize", 100, at(0))
    b.limit("B", "MaxPositionSize", 100, at(0))
    b.limit("C", "MaxLeverage", 1.0, at(0))
    over = b.trade("A", "X", "Buy", 150, 10, at(1))
    b.add(LimitViolationDetected(account_id="A", limit_type="MaxPositionSize", symbol="X",
                                 current_value=150, limit_value=100, detected_at=at(1)),
          causation_id=uuid.UUID(over))  # fmt: skip
    busted = b.trade("B", "X", "Buy", 150, 10, at(2), trade_id="T-BAD")
    b.add(LimitViolationDetected(account_id="B", limit_type="MaxPositionSize", symbol="X",
                                 current_value=150, limit_value=100, detected_at=at(2)),
          causation_id=uuid.UUID(busted))  # fmt: skip
    b.cancel("B", "T-BAD", at(3), recorded=at(30))
    b.fund("C", 100, at(3))
    b.trade("C", "Y", "Buy", 20, 10, at(4))  # leverage 2: never reported
    b.trade("A", "X", "Sell", 100, 10, at(5))
    b.trade("A", "X", "Buy", 100, 10, at(6))  # a second breach, reported 2 s later, without a cause
    b.add(LimitViolationDetected(account_id="A", limit_type="MaxPositionSize", symbol="X",
                                 current_value=150, limit_value=100,
                                 detected_at=at(6) + timedelta(seconds=2)))  # fmt: skip
    return b.history()


def test_reconcile_matches_reports_and_explains_the_rest() -> None:
    h = reconciled_history()
    rec = limits.reconcile(h)
    got = rec.select("status", pl.col("account_id").cast(pl.String), "started_at", "reason").rows()
    assert [g[:3] for g in got] == [
        ("matched", "A", at(1)),
        ("no_breach", "B", None),
        ("not_reported", "C", at(4)),
        ("matched", "A", at(6)),
    ]
    assert "busted" in got[1][3] and "T-BAD" in got[1][3]
    assert "no LimitViolationDetected" in got[2][3]
    assert "2 s" in got[3][3]
    # as known before the bust, B's report is matched
    before = limits.reconcile(h, known_at=at(29))
    assert before.filter(pl.col("account_id") == "B")["status"].to_list() == ["matched"]


def test_reconcile_at_t_takes_the_breaches_and_reports_by_t() -> None:
    from polars.testing import assert_frame_equal

    h = reconciled_history()

    def got(**kw: Any) -> list[tuple[Any, ...]]:
        rec = limits.reconcile(h, **kw)
        return rec.select(
            "status", pl.col("account_id").cast(pl.String), "started_at", "ended_at",
            "detected_at",
        ).rows()  # fmt: skip

    # at 3: A's first breach is still open; C's (at 4) and A's second have not started
    assert got(at=at(3)) == [
        ("matched", "A", at(1), None, at(1)),
        ("no_breach", "B", None, None, at(2)),
    ]
    # at 6: A's second breach has started, its report (2 s later) is not made yet
    assert got(at=at(6))[2:] == [
        ("not_reported", "C", at(4), None, None),
        ("not_reported", "A", at(6), None, None),
    ]
    assert got(at=at(6) + timedelta(seconds=2))[-1] == (
        "matched", "A", at(6), None, at(6) + timedelta(seconds=2)
    )  # fmt: skip
    assert got(at=at(0)) == []
    # as known before the bust, at 2: B's report is matched to its open breach
    assert got(at=at(2), known_at=at(29))[1] == ("matched", "B", at(2), None, at(2))
    assert_frame_equal(limits.reconcile(h, at="2024-03-01T21:39:00Z"), limits.reconcile(h))
    with pytest.raises(ValueError, match="time zone"):
        limits.reconcile(h, at=datetime(2024, 3, 1))


# ============================================================================ the sample


def sample() -> tuple[list[Envelope], dict[str, Any]]:
    with gzip.open(DATA / "sample.jsonl.gz", "rb") as f:
        envelopes = [decode_envelope(line)[0] for line in f]
    return envelopes, json.loads((DATA / "sample.key.json").read_text())


def test_the_sample_answer_key() -> None:
    envelopes, key = sample()
    h = History.from_envelopes(envelopes)
    incidents = key["incidents"]
    busted = [i for i in incidents if i["kind"] == "busted_trade"]
    kept = [i for i in incidents if i["kind"] != "busted_trade"]
    assert key["complete"] is True

    def starts(frame: pl.DataFrame) -> set[tuple[Any, ...]]:
        return {
            (r["account_id"], r["limit_type"], r["symbol"], format_time(r["started_at"]),
             r["trigger_event_id"])
            for r in frame.with_columns(pl.col(pl.Categorical).cast(pl.String)).iter_rows(named=True)
        }  # fmt: skip

    def expected(found: Iterable[dict[str, Any]]) -> set[tuple[Any, ...]]:
        return {(i["account_id"], i["limit_type"], i["symbol"], i["started_at"],
                 i["trigger_event_id"]) for i in found}  # fmt: skip

    full = limits.breaches(h, levels=1.0)
    assert starts(full) == expected(kept)  # complete: these and nothing else
    for inc in kept:
        r = full.filter(pl.col("trigger_event_id") == inc["trigger_event_id"]).row(0, named=True)
        assert r["limit_value"] == inc["limit_value"]
        assert r["trigger_value"] == pytest.approx(inc["value_at_trigger"], rel=1e-9)
        assert r["peak_value"] == pytest.approx(inc["peak_value"], rel=1e-9)
        assert format_time(r["ended_at"]) == inc["ended_at"]
        assert r["ended_by_event_id"] == inc["end_event_id"]
        assert r["limit_event_id"] == inc["limit_event_id"]
        assert r["set_by"] == inc["limit_set_by"]
    (bust,) = busted
    before = limits.breaches(
        h, levels=1.0, known_at=parse_time(bust["bust_recorded_at"]) - timedelta(microseconds=1)
    )
    assert expected([bust]) <= starts(before)
    r = before.filter(pl.col("trigger_event_id") == bust["trigger_event_id"]).row(0, named=True)
    assert (r["ended_at"], r["peak_value"], r["limit_value"]) == (
        None,
        bust["peak_value"],
        bust["limit_value"],
    )
    # warning levels come before the breaches they warn of
    warned = limits.breaches(h)
    for inc in kept:
        first = warned.filter(
            (pl.col("account_id") == inc["account_id"])
            & (pl.col("limit_type") == inc["limit_type"])
            & (pl.col("started_at") <= parse_time(inc["started_at"]))
        )
        assert set(first["level"].to_list()) == {0.8, 0.9, 1.0}
    # every recorded violation is explained: four match, the busted one has no breach
    rec = limits.reconcile(h)
    assert rec["status"].value_counts().sort("status").rows() == [("matched", 4),
                                                                   ("no_breach", 1)]  # fmt: skip
    no = rec.filter(pl.col("status") == "no_breach").row(0, named=True)
    assert no["violation_event_id"] == bust["violation_event_id"]
    assert "busted" in no["reason"] and bust["trigger_trade_id"] in no["reason"]


# ============================================================================ CLI and docs


def test_cli_breaches_and_limits_history(make_database: Callable[[], str], tmp_path: Path) -> None:
    b = Book()
    b.limit("A", "MaxPositionSize", 100, at(0), by="ops")
    b.trade("A", "X", "Buy", 150, 10, at(1))
    b.trade("B", "X", "Buy", 150, 10, at(1))
    b.limit("B", "MaxPositionSize", 100, at(2), by="cro")
    path = tmp_path / "h.jsonl"
    from riskbook.events import encode_envelope

    path.write_bytes(b"\n".join(encode_envelope(e) for e in b.envelopes) + b"\n")
    dsn = make_database()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "riskbook.cli", *args, "--dsn", dsn],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    assert run("import", str(path), "--quiet").returncode == 0
    out = run("breaches", "--format", "csv", "--level", "1.0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split(",")[:9] == [
        "account_id", "limit_type", "symbol", "level", "started_at", "ended_at", "peak_value",
        "limit_value", "trigger_event_id",
    ]  # fmt: skip
    assert len(lines) == 3 and lines[1].startswith("A,MaxPositionSize,X,1.0,2024-03-01T20:01:00")
    one = run("breaches", "--account", "B", "--format", "json", "--at", format_time(at(1)))
    assert one.returncode == 0 and json.loads(one.stdout) == []  # B's limit came later
    table = run("breaches", "--known-at", format_time(at(1)))
    assert table.returncode == 0 and "MaxPositionSize" in table.stdout
    trail = run("limits", "history", "--format", "csv")
    assert trail.returncode == 0, trail.stderr
    assert [ln.split(",")[5] for ln in trail.stdout.splitlines()[1:]] == ["ops", "cro"]
    early = run("limits", "history", "--format", "csv", "--at", format_time(at(1)))
    assert [ln.split(",")[5] for ln in early.stdout.splitlines()[1:]] == ["ops"], early.stderr
    bad = run("breaches", "--at", "soon")
    assert bad.returncode == 1 and "at" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "name",
    ["riskbook.limits", "riskbook.limits._api", "riskbook.limits._evaluate",
     "riskbook.limits._registry", "riskbook.limits._builtin"],
)  # fmt: skip
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_public_names() -> None:
    missing = [n for n in limits.__all__ if not hasattr(limits, n)]
    assert missing == []


@pytest.mark.parametrize(
    ("broken", "error", "told"),
    [
        (lambda m: m.with_columns(time=pl.lit(None, pl.Datetime("us", "UTC"))), ValueError,
         "null 'time'"),
        (lambda m: m.with_columns(account_id=pl.lit(None, pl.String)), ValueError,
         "null 'account_id'"),
        (lambda m: None, TypeError, "returned a builtins.NoneType, expected a polars DataFrame"),
        (lambda m: m.lazy(), TypeError, "expected a polars DataFrame"),
    ],
)  # fmt: skip
def test_a_broken_user_metric_is_told_by_its_limit_type(
    broken: Callable[[pl.DataFrame], Any], error: type[Exception], told: str
) -> None:
    # a null business time used to be read as 1970 and give false breaches
    def metric(history: History, *, known_at: Any = None) -> Any:
        return broken(gross_notional(history, known_at=known_at))

    limits.register(limits.LimitSpec("MaxBrokenGross", "account", "USD", metric), replace=True)
    b = Book()
    b.fund("A", 10_000, at(0))
    b.trade("A", "X", "Buy", 300, 10, at(1))
    b.limit("A", "MaxBrokenGross", 1_000, at(0))
    try:
        with pytest.raises(error, match=f"MaxBrokenGross.*{told}|{told}.*MaxBrokenGross"):
            limits.breaches(b.history(), levels=1.0)
    finally:  # types stay registered for the process: leave a sound one behind
        limits.register(
            limits.LimitSpec("MaxBrokenGross", "account", "USD", gross_notional), replace=True
        )


def test_types_takes_one_name_or_several() -> None:
    limits.register(GROSS, replace=True)
    b = Book()
    b.fund("A", 10_000, at(0))
    b.trade("A", "X", "Buy", 300, 10, at(1))
    b.limit("A", "MaxGrossNotional", 1_000, at(0))
    b.limit("A", "MaxPositionSize", 10, at(0))
    h = b.history()
    one = limits.breaches(h, types="MaxGrossNotional", levels=1.0)
    assert one["limit_type"].cast(pl.String).to_list() == ["MaxGrossNotional"]
    assert one.equals(limits.breaches(h, types=["MaxGrossNotional"], levels=1.0))


def test_a_symbol_on_a_limit_per_account_is_refused() -> None:
    # it was shown in force and never evaluated: a mistyped limit that protects nothing
    with pytest.raises(
        riskbook.InvalidEvent, match=r"LimitSet\.symbol: MaxLeverage is a limit per account"
    ):
        riskbook.LimitSet(account_id="A", limit_type="MaxLeverage", value=0.1, set_by="x",
                          set_at=at(0), symbol="ACME")  # fmt: skip
    limits.register(GROSS, replace=True)
    with pytest.raises(riskbook.InvalidEvent, match="MaxGrossNotional is a limit per account"):
        riskbook.LimitSet(account_id="A", limit_type="MaxGrossNotional", value=1.0, set_by="x",
                          set_at=at(0), symbol="ACME")  # fmt: skip
    with pytest.raises(ValueError, match="MaxGrossNotional is a limit per account"):
        limits.hypothetical_limits(
            [{"account_id": "*", "limit_type": "MaxGrossNotional", "value": 100, "symbol": "X"}]
        )
    # a per-symbol type keeps its symbol overrides
    riskbook.LimitSet(account_id="A", limit_type="MaxPositionSize", value=1.0, set_by="x",
                      set_at=at(0), symbol="ACME")  # fmt: skip


def test_a_hypothetical_set_at_needs_a_time_zone() -> None:
    # Read as UTC, a notebook's local naive time moved the limit by the writer's offset,
    # where every other time parameter refuses it.
    naive = datetime(2024, 3, 1, 20, 2)
    one = {"account_id": "A", "limit_type": "MaxPositionSize", "value": 50.0}
    with pytest.raises(ValueError, match="set_at has no time zone"):
        limits.hypothetical_limits([{**one, "set_at": naive}])
    with pytest.raises(ValueError, match="set_at has no time zone"):
        limits.hypothetical_limits(pl.DataFrame([{**one, "set_at": naive}]))
    east = timezone(timedelta(hours=2))
    for when in (naive.replace(tzinfo=east), "2024-03-01T20:02:00+02:00"):
        rows = limits.hypothetical_limits([{**one, "set_at": when}])
        assert rows["set_at"].to_list() == [datetime(2024, 3, 1, 18, 2, tzinfo=UTC)]
        assert rows.schema["set_at"] == pl.Datetime("us", "UTC")
    zoned = pl.DataFrame([{**one, "set_at": naive}]).with_columns(
        pl.col("set_at").dt.replace_time_zone("Europe/Paris")
    )
    assert limits.hypothetical_limits(zoned)["set_at"].to_list() == [
        datetime(2024, 3, 1, 19, 2, tzinfo=UTC)
    ]
    assert limits.hypothetical_limits([one])["set_at"].to_list() == [None]  # from the start
