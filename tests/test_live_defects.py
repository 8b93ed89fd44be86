"""Defects of the live layer found by a bug hunt, each pinned by a test (real PostgreSQL)."""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import polars as pl
import psycopg
import pytest

import riskbook
from riskbook import (
    AccountBlocked,
    AccountFunded,
    AccountUnblocked,
    Envelope,
    History,
    LimitSet,
    PriceMarked,
    Side,
    Store,
    TradeExecuted,
)
from riskbook.cli import main
from riskbook.errors import StoreError
from riskbook.live import Engine, Processor, check, unblock
from riskbook.store import roles

T0 = datetime(2024, 3, 1, 14, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def trade(account: str, side: str, qty: float, price: float, when: datetime, *,
          symbol: str = "X") -> TradeExecuted:  # fmt: skip
    return TradeExecuted(trade_id=f"T-{uuid.uuid4().hex[:12]}", account_id=account,
                         symbol=symbol, side=Side(side), quantity=qty, price=price,
                         executed_at=when)  # fmt: skip


def limit(account: str, kind: str, value: float, when: datetime,
          symbol: str | None = None) -> LimitSet:  # fmt: skip
    return LimitSet(account_id=account, limit_type=kind, value=value, set_by="cro",
                    set_at=when, symbol=symbol)  # fmt: skip


def fund(account: str, amount: float, when: datetime = T0) -> AccountFunded:
    return AccountFunded(account_id=account, amount=amount, funded_at=when)


def stored(store: Store, kind: str) -> list[Envelope]:
    return [e for e in store.read_all() if e.event_type == kind]


# ------------------------------------------------------------------ 1. infinite leverage


def test_an_infinite_leverage_is_reported_blocked_and_checked(fresh_store: Store) -> None:
    s = fresh_store
    s.append("A", [fund("A", 1000.0), limit("A", "MaxLeverage", 5.0, T0),
                   trade("A", "Buy", 200, 10.0, at(1))])  # fmt: skip
    s.append("X", [PriceMarked(symbol="X", price=4.0, marked_at=at(2))])  # equity -200
    p = Processor(s, name="inf")
    effects = p.catch_up()
    p.stop()
    assert [(e.kind, e.value) for e in effects] == [
        ("LimitViolationDetected", math.inf), ("AccountBlocked", math.inf),
    ]  # fmt: skip
    violation = stored(s, "LimitViolationDetected")[0].payload
    assert isinstance(violation, riskbook.LimitViolationDetected)
    assert violation.current_value == sys.float_info.max and violation.limit_value == 5.0
    block = stored(s, "AccountBlocked")[0].payload
    assert isinstance(block, AccountBlocked) and "infinite (equity <= 0)" in block.reason
    rec = riskbook.reconcile(riskbook.load(s, progress=False))
    assert rec["status"].to_list() == ["matched"]
    # A restart rebuilds over it, and goes on.
    again = Processor(s, name="inf")
    s.append("A", [trade("A", "Sell", 10, 4.0, at(3))])
    assert again.catch_up() == []
    again.stop()
    # The check answers, from the store and from a processor.
    verdict = check("A", "X", "Sell", 10, 4.0, store=s, at=at(10))
    assert [r.kind for r in verdict.reasons] == ["blocked"]


def test_the_check_says_a_trade_would_make_leverage_infinite(fresh_store: Store) -> None:
    s = fresh_store
    s.append("B", [fund("B", 1000.0), limit("B", "MaxLeverage", 5.0, T0),
                   trade("B", "Buy", 100, 10.0, at(1))])  # fmt: skip
    s.append("X", [PriceMarked(symbol="X", price=10.0, marked_at=at(2))])
    verdict = check("B", "X", "Buy", 100, 20.0, store=s, at=at(3))  # equity 1000 -> 0
    assert not verdict.accepted
    (reason,) = verdict.reasons
    assert (reason.kind, reason.limit_type, reason.value) == ("limit", "MaxLeverage", math.inf)
    assert reason.message == "MaxLeverage: infinite (equity <= 0) > limit 5 (by infinite)"
    as_json = json.loads(json.dumps(verdict.to_dict(), allow_nan=False))
    assert as_json["reasons"][0]["value"] == sys.float_info.max


# ------------------------------------------------------------------ 2. phantom blocks


def test_check_from_the_store_counts_only_stored_blocks(fresh_store: Store) -> None:
    """Over a critical limit, with no processor ever run (or one that never blocks):
    no AccountBlocked is stored, so the account is not blocked."""
    s = fresh_store
    s.append("A", [fund("A", 1e6), limit("A", "MaxPositionSize", 100.0, T0),
                   trade("A", "Buy", 150, 10.0, at(1))])  # fmt: skip
    never = Processor(s, name="no-block", critical={"MaxPositionSize": None})
    assert [e.kind for e in never.catch_up()] == ["LimitViolationDetected"]
    never.stop()
    verdict = check("A", "Y", "Buy", 1, 10.0, store=s, at=at(10))
    assert verdict.accepted, verdict
    assert not [r for r in check("A", "X", "Buy", 1, 10.0, store=s, at=at(10)).reasons
                if r.kind == "blocked"]  # fmt: skip
    with pytest.raises(riskbook.RiskbookError, match="not blocked"):
        unblock("A", by="desk", reason="no block to lift", store=s)


def test_a_processor_started_at_head_blocks_new_critical_breaches(fresh_store: Store) -> None:
    s = fresh_store
    s.append(
        "A",
        [
            fund("A", 1e6),
            limit("A", "MaxPositionSize", 100.0, T0),
            trade("A", "Buy", 150, 10.0, at(1)),
        ],
    )  # critical, before the head
    p = Processor(s, name="head", start="head")
    assert p.catch_up() == []
    assert not p.engine.blocked.get("A")  # what a LiveMonitor shows
    s.append("A", [trade("A", "Buy", 500, 10.0, at(5), symbol="Y")])
    p._attach()
    assert p.step()  # one batch: the block is written, not read back yet
    assert [(e.kind, e.symbol) for e in p.commits[-1].effects] == [
        ("LimitViolationDetected", "Y"), ("AccountBlocked", "Y"),
    ]  # fmt: skip
    p.stop()
    # A restart counts the block it wrote and has not read back: blocked, as stored.
    restarted = Processor(s, name="head")
    restarted._attach()
    assert restarted.engine.blocked.get("A") is True
    assert restarted.engine.pending == {"A": p.commits[-1].effects[1].causation_id}
    verdict = check("A", "Z", "Buy", 1, 10.0, processor=restarted, at=at(10))
    assert [r.kind for r in verdict.reasons] == ["blocked"]
    assert restarted.catch_up() == []  # reads its own block back: no second one
    assert restarted.engine.pending == {} and restarted.engine.blocked["A"]
    restarted.stop()
    assert len(stored(s, "AccountBlocked")) == 1


# ------------------------------------------------------------------ 3. scheduled limits


def test_a_running_processor_says_when_a_scheduled_limit_is_due_with_no_event_since(
    fresh_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A limit change recorded now for 1.5 s from now, and then nothing: when the wall
    clock passes its set_at, the idle processor says, once, that it is due and not in
    force yet; the next event brings it in, and its breach is reported then."""
    caplog.set_level(logging.WARNING, logger="riskbook.live")
    now = datetime.now(UTC)
    fresh_store.append("A", [fund("A", 1e4, now), trade("A", "Buy", 70, 10.0, now)])
    [set_] = fresh_store.append(
        "A", [limit("A", "MaxPositionSize", 60.0, now + timedelta(seconds=1.5))]
    )
    p = Processor(fresh_store, name="due", critical=100.0).start()
    try:
        deadline = time.monotonic() + 30
        while "is due but not in force yet" not in caplog.text:
            assert time.monotonic() < deadline and p.error is None, caplog.text
            time.sleep(0.05)
        time.sleep(2.5)  # idle wakes meanwhile: said once
        said = [r.getMessage() for r in caplog.records if "is due" in r.getMessage()]
        assert len(said) == 1, said
        assert "the MaxPositionSize limit of A (60, set by cro for " in said[0], said[0]
        assert not [e for e in p.effects if e.kind == "LimitViolationDetected"]
        fresh_store.append("A", [trade("A", "Buy", 1, 10.0, datetime.now(UTC))])
        while not [e for e in p.effects if e.kind == "LimitViolationDetected"]:
            assert time.monotonic() < deadline and p.error is None
            time.sleep(0.05)
    finally:
        p.stop()
    [violation] = [e for e in p.effects if e.kind == "LimitViolationDetected"]
    assert violation.causation_id == str(set_.event_id)  # its cause: the limit's change


def test_a_scheduled_limit_does_not_move_the_clock(fresh_store: Store) -> None:
    """A MaxLeverage change recorded on day 0 for day 3: the trades of days 0-2 keep
    their days (60 a day, under 100), and the limit acts on day 3, as breaches has it."""
    a = "A"
    events = [
        (fund(a, 100.0), T0),
        (limit(a, "MaxDailyVolume", 100.0, T0), T0),
        (limit(a, "MaxLeverage", 0.5, T0 + 3 * DAY), at(1)),  # scheduled, recorded now
        (trade(a, "Buy", 60, 1.0, at(60)), at(60)),
        (trade(a, "Buy", 60, 1.0, at(60) + DAY), at(60) + DAY),
        (trade(a, "Buy", 60, 1.0, at(60) + 2 * DAY), at(60) + 2 * DAY),
        (trade(a, "Sell", 10, 1.0, at(60) + 3 * DAY), at(60) + 3 * DAY),
    ]
    envs = [Envelope(uuid.uuid4(), a, "Account", i + 1, ts, e, f"c{i}")
            for i, (e, ts) in enumerate(events)]  # fmt: skip
    fresh_store.import_envelopes(envs)
    p = Processor(fresh_store, name="sched", critical=100.0, max_batch=1)
    effects = p.catch_up()
    p.stop()
    assert [(e.kind, e.limit_type, e.causation_id, e.value) for e in effects] == [
        ("LimitViolationDetected", "MaxLeverage", str(envs[2].event_id), 1.8),
    ]
    assert effects[0].event.detected_at == T0 + 3 * DAY  # type: ignore[union-attr]
    assert effects[0].correlation_id == "c2"
    rec = riskbook.reconcile(riskbook.load(fresh_store, progress=False))
    assert rec["status"].to_list() == ["matched"]
    # A limit recorded at (or after) its set_at is no schedule: the last event, lowering
    # the limit under the metric, is reported at once (not when a later event comes), as
    # breaches reports it.
    events = [fund("B", 1e4), trade("B", "Buy", 70, 10.0, at(0)),
              limit("B", "MaxPositionSize", 60.0, at(1))]  # fmt: skip
    envs = [Envelope(uuid.uuid4(), e.aggregate_id, e.aggregate_type, 1, e.business_time or T0,
                     e, f"c{i}", position=i + 1) for i, e in enumerate(events)]  # fmt: skip
    got = [(e.kind, e.causation_id) for e in Engine(critical=10.0).apply(
        History.from_envelopes(envs))]  # fmt: skip
    assert got == [("LimitViolationDetected", str(envs[2].event_id))]


# ------------------------------------------------------------------ 4. unblock race


def test_two_operators_unblocking_at_once_one_is_refused(fresh_store: Store) -> None:
    """The second operator's unblock commits while the first one reads the account's
    state (held at a lock on events): the first must then see it, or fail its append."""
    s = fresh_store
    s.append("A", [fund("A", 1e6), AccountBlocked(account_id="A", reason="r", blocked_by="x",
                                                  blocked_at=at(1))])  # fmt: skip
    result: list[object] = []

    def first() -> None:
        try:
            result.append(unblock("A", by="desk-1", reason="mine", store=s))
        except riskbook.RiskbookError as exc:
            result.append(exc)

    with psycopg.connect(s.dsn) as lock, psycopg.connect(s.dsn, autocommit=True) as watch:
        lock.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        thread = threading.Thread(target=first)
        thread.start()
        deadline = time.monotonic() + 30
        while not watch.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ).fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline, "the unblock never waited for the lock"
            time.sleep(0.02)
        second = AccountUnblocked(account_id="A", reason="concurrent", unblocked_by="desk-2",
                                  unblocked_at=at(2))  # fmt: skip
        s.append_in(lock, "A", [second], correlation_id="unblock-A")
        lock.commit()
        thread.join(30)
    (outcome,) = result
    assert isinstance(outcome, riskbook.RiskbookError) and "not blocked" in str(outcome)
    blocks = riskbook.load(s, progress=False).blocks
    assert blocks["blocked"].to_list() == [True, False]


# ------------------------------------------------------------------ 5. errors


@pytest.fixture
def reader_dsn(fresh_store: Store) -> Iterator[tuple[str, str]]:
    name = f"rk_reader_{uuid.uuid4().hex[:8]}"
    password = f"pw-{uuid.uuid4().hex}"
    grant = roles.grant_reader(fresh_store, name, password=password)
    yield psycopg.conninfo.make_conninfo(grant.dsn, password=password), password
    with psycopg.connect(fresh_store.dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP OWNED BY {}").format(psycopg.sql.Identifier(name)))
        conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(name)))


def test_a_role_that_may_not_write_stops_live_with_one_line(
    fresh_store: Store, reader_dsn: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, password = reader_dsn
    fresh_store.append("A", [fund("A", 1e6)])
    assert main(["live", "--once", "--dsn", dsn]) == 1
    err = capsys.readouterr().err
    assert "permission denied for table processor_checkpoints" in err
    assert "Traceback" not in err and password not in err and len(err.strip().splitlines()) == 1
    p = Processor(dsn, name="reader")
    with pytest.raises(StoreError, match="permission denied") as caught:
        p.catch_up()
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    p.start()  # in a thread: stops with the error instead of retrying for ever
    deadline = time.monotonic() + 30
    while p.running:
        assert time.monotonic() < deadline, p.status
        time.sleep(0.05)
    assert isinstance(p.error, StoreError) and p.status.startswith("failed: permission denied")
    p.stop()


# ------------------------------------------------------------------ 6. review: scheduled limits


def _envelopes(events: list[object]) -> list[Envelope]:
    """Envelopes in the given order (positions 1, 2, ...); an ``(event, recorded)`` pair
    is recorded then, a bare event at its business time."""
    out = []
    for i, item in enumerate(events):
        event, recorded = item if isinstance(item, tuple) else (item, None)
        out.append(Envelope(uuid.uuid4(), event.aggregate_id, event.aggregate_type, 1,  # type: ignore[attr-defined]
                            recorded or event.business_time or T0, event, f"c{i}",  # type: ignore[attr-defined]
                            position=i + 1))  # fmt: skip
    return out


def _engine_over(envelopes: list[Envelope]) -> Engine:
    engine = Engine()
    engine.apply(History.from_envelopes(envelopes), written=False)  # as check(store=) does
    return engine


def test_check_refuses_more_exposure_while_leverage_stays_infinite() -> None:
    """Equity <= 0: leverage is infinite before and after any trade that keeps it so; a
    trade adding gross exposure takes it further (refused), one reducing it does not."""
    engine = _engine_over(_envelopes([
        fund("A", 1000.0), limit("A", "MaxLeverage", 5.0, T0),
        trade("A", "Buy", 100, 10.0, at(1)),
        PriceMarked(symbol="X", price=0.5, marked_at=at(2)),
        fund("A", -100.0, at(3)),  # equity -50: leverage infinite
        AccountBlocked(account_id="A", reason="critical", blocked_by="riskbook-live",
                       blocked_at=at(3)),
        AccountUnblocked(account_id="A", reason="to de-risk", unblocked_by="cro",
                         unblocked_at=at(4)),
    ]))  # fmt: skip
    assert not engine.blocked["A"]
    running: Any = SimpleNamespace(engine=engine)
    more = check("A", "Y", "Buy", 1_000_000, 0.5, processor=running, at=at(10))
    assert not more.accepted
    assert [r.message for r in more.reasons] == [
        "MaxLeverage: infinite (equity <= 0) > limit 5 (by infinite)"
    ]
    assert not check("A", "X", "Buy", 10, 0.5, processor=running, at=at(10)).accepted
    less = check("A", "X", "Sell", 50, 0.5, processor=running, at=at(10))
    assert less.accepted, less


def _effects_in(envelopes: list[Envelope], cuts: list[int]) -> list[tuple[object, ...]]:
    """The effects of folding ``envelopes`` cut into batches at ``cuts``, as (kind,
    account, limit type, symbol, cause (index of the event), time)."""
    engine, effects = Engine(), []
    bounds = [0, *cuts, len(envelopes)]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            effects += engine.apply(History.from_envelopes(envelopes[lo:hi]))
    index = {str(e.event_id): i for i, e in enumerate(envelopes)}
    return [
        (e.kind, e.account_id, e.limit_type, e.symbol, index[e.causation_id],
         getattr(e.event, "detected_at", None) or getattr(e.event, "blocked_at", None))
        for e in effects
    ]  # fmt: skip


def _random_history(seed: int) -> list[Envelope]:
    """Two accounts' trades, marks, fundings and limits, some limits scheduled: recorded
    (at an earlier event's time) before their set_at."""
    import random

    rng = random.Random(seed)
    plain: list[tuple[object, datetime]] = [(fund(a, 10_000.0), T0) for a in "AB"]
    scheduled = []
    minute = 0.0
    for _ in range(rng.randint(5, 40)):
        minute += rng.choice([0.0, 0.5, 1.0, 600.0])
        t, acc, sym = at(minute), rng.choice("AB"), rng.choice("XY")
        kind = rng.choice(["trade"] * 6 + ["mark", "limit", "fund", "scheduled"])
        if kind == "trade":
            event: object = trade(acc, rng.choice(["Buy", "Sell"]), float(rng.randint(1, 80)),
                                  float(rng.randint(5, 15)), t, symbol=sym)  # fmt: skip
        elif kind == "mark":
            event = PriceMarked(symbol=sym, price=float(rng.randint(5, 15)), marked_at=t)
        elif kind == "fund":
            event = fund(acc, float(rng.randint(-500, 500) or 1), t)
        else:
            lt, v = rng.choice([("MaxPositionSize", 60.0), ("MaxPositionSize", 100.0),
                                ("MaxDailyVolume", 150.0), ("MaxLeverage", 0.05),
                                ("MaxDrawdown", 0.001)])  # fmt: skip
            by_symbol = lt == "MaxPositionSize" and rng.random() < 0.5
            event = limit(acc, lt, v, t, sym if by_symbol else None)
            if kind == "scheduled":
                scheduled.append(event)
                continue
        plain.append((event, t))
    for s in scheduled:
        assert isinstance(s, LimitSet)
        earlier = [i for i, (_, ts) in enumerate(plain) if ts < s.set_at]
        i = rng.choice(earlier) if earlier else 0
        plain.insert(i + 1, (s, plain[i][1] if earlier else T0 - DAY))
    return _envelopes(plain)  # type: ignore[arg-type]


def test_scheduled_limits_give_the_same_effects_in_any_batching() -> None:
    """A released scheduled limit's breach is ordered where it takes effect (its set_at),
    among the other breaches and the stored block events of the same batch, so one
    batch and one-event batches decide the same violations and blocks."""
    hand = [
        _envelopes([  # the Y limit acts on day 3, after the critical X trade of day 2
            fund("A", 1e6), limit("A", "MaxPositionSize", 100.0, T0),
            (limit("A", "MaxPositionSize", 10.0, T0 + 3 * DAY, symbol="Y"), T0),
            trade("A", "Buy", 50, 10.0, T0 + DAY, symbol="Y"),
            trade("A", "Buy", 150, 10.0, T0 + 2 * DAY),
            fund("B", 1.0, T0 + 4 * DAY),
        ]),
        _envelopes([  # the limit acts at minute 10, after the unblock of minute 5
            fund("A", 1e6),
            AccountBlocked(account_id="A", reason="manual", blocked_by="ops", blocked_at=at(0)),
            trade("A", "Buy", 150, 10.0, at(1)),
            (limit("A", "MaxPositionSize", 100.0, at(10)), at(2)),
            AccountUnblocked(account_id="A", reason="ok", unblocked_by="ops",
                             unblocked_at=at(5)),
            trade("B", "Buy", 1, 10.0, at(20)),
        ]),
    ]  # fmt: skip
    one = _effects_in(hand[0], [])
    assert [(k, s, c) for k, _, _, s, c, _ in one] == [
        ("LimitViolationDetected", "X", 4), ("AccountBlocked", "X", 4),
        ("LimitViolationDetected", "Y", 2),
    ]  # fmt: skip
    assert [k for k, *_ in _effects_in(hand[1], [])] == [
        "LimitViolationDetected", "AccountBlocked",
    ]  # fmt: skip
    histories = [*hand, *(_random_history(seed) for seed in range(0, 61, 3)),
                 _random_history(9), _random_history(24)]  # fmt: skip
    for envelopes in histories:
        whole = _effects_in(envelopes, [])
        assert whole == _effects_in(envelopes, list(range(1, len(envelopes))))
        assert whole == _effects_in(envelopes, [len(envelopes) // 2])


def test_check_counts_a_scheduled_limit_due_by_its_time(fresh_store: Store) -> None:
    """A limit recorded for tomorrow, with no event since: a check after its set_at sees
    the breach it starts before the trade (as the trade's own fold does), so a trade
    reducing that breach is accepted and one taking it further is refused."""
    events = [fund("A", 1e6), trade("A", "Buy", 150, 10.0, at(1)),
              (limit("A", "MaxPositionSize", 100.0, T0 + DAY), at(2))]  # fmt: skip
    envelopes = _envelopes(events)
    # From a running engine (a processor's): its state is not changed by the check.
    engine = Engine(critical=10.0)
    assert engine.apply(History.from_envelopes(envelopes)) == []
    running: Any = SimpleNamespace(engine=engine)
    assert check("A", "X", "Sell", 10, 10.0, processor=running, at=T0 + 2 * DAY).accepted
    more = check("A", "X", "Buy", 10, 10.0, processor=running, at=T0 + 2 * DAY)
    assert [r.message for r in more.reasons] == ["MaxPositionSize X: 160 > limit 100 (by 60)"]
    assert engine.scheduled.height == 1 and engine.open_now.get("MaxPositionSize") is None
    # Before its set_at the limit is not in force: both are accepted.
    assert check("A", "X", "Buy", 10, 10.0, processor=running, at=at(30)).accepted
    # From the store.
    fresh_store.import_envelopes(
        [
            Envelope(uuid.uuid4(), "A", "Account", i + 1, e.timestamp, e.payload, f"c{i}")
            for i, e in enumerate(envelopes)
        ]
    )
    assert check("A", "X", "Sell", 10, 10.0, store=fresh_store, at=T0 + 2 * DAY).accepted
    refused = check("A", "X", "Buy", 10, 10.0, store=fresh_store, at=T0 + 2 * DAY)
    assert [r.kind for r in refused.reasons] == ["limit"]


# ------------------------------------------------------------ a block does not move time


def test_an_unblock_at_the_wall_clock_leaves_a_replayed_history_on_its_days(
    fresh_store: Store,
) -> None:
    # An operator's unblock says now (2026); the history is of 2024. It moved the
    # processor's clock to now, so every later trade was "late", landed on today, and
    # three days of 60 each made a daily volume of 180: a false violation and block.
    s = fresh_store
    s.append("A", [fund("A", 1e6), limit("A", "MaxPositionSize", 100.0, T0),
                   limit("A", "MaxDailyVolume", 100.0, T0)])  # fmt: skip
    s.append("A", [trade("A", "Buy", 130, 10.0, at(1))])  # critical: blocked
    p = Processor(s, name="replay")
    try:
        first = p.catch_up()
        assert "AccountBlocked" in [e.kind for e in first]
        unblock("A", by="op", reason="unwound", store=s)  # at = now
        for day in (1, 2, 3):  # 60 a day: within 100 a day
            s.append("A", [trade("A", "Buy", 30, 10.0, T0 + day * DAY),
                           trade("A", "Sell", 30, 10.0, T0 + day * DAY + timedelta(minutes=1))])  # fmt: skip
        assert p.catch_up() == []
    finally:
        p.stop()
    later = riskbook.breaches(riskbook.load(s, cache=False), levels=1.0).filter(
        (pl.col("limit_type") == "MaxDailyVolume") & (pl.col("started_at") > T0 + DAY / 2)
    )
    assert later.height == 0  # the analytics agree: nothing after the first day
    assert len(stored(s, "AccountBlocked")) == 1


# ------------------------------------------- a user type that does not go on from a state


def _trades_per_day(history: riskbook.History, *, known_at: Any = None) -> pl.DataFrame:
    """The account's trades so far in the UTC day, read from the frames (not incremental)."""
    count = (pl.int_range(pl.len()) + 1).over("account_id", pl.col("executed_at").dt.date())
    return (
        history.trades.sort("executed_at", "timestamp", "position")
        .with_columns(value=count.cast(pl.Float64))
        .select("account_id", "timestamp", "position", "event_id", "value", time="executed_at")
    )


def test_a_user_metric_of_the_frames_sees_everything_folded_in_every_batch() -> None:
    # It was given each batch alone: four fills of one day, one per batch, never made a
    # count over 1, and the processor reported none of the breach breaches() finds.
    from riskbook import limits

    spec = limits.LimitSpec("MaxTradesPerDayLive", "account_day", "trades", _trades_per_day)
    limits.register(spec, replace=True)
    events: list[riskbook.Event] = [limit("A", "MaxTradesPerDayLive", 2.0, T0)]
    events += [trade("A", "Buy", 1.0, 10.0, at(i)) for i in range(1, 5)]
    events += [trade("A", "Buy", 1.0, 10.0, at(i) + DAY) for i in range(1, 3)]  # a new day
    envelopes = [
        Envelope(uuid.uuid4(), e.aggregate_id, e.aggregate_type, i + 1, e.business_time, e,
                 f"c{i}", position=i + 1)
        for i, e in enumerate(events)
    ]  # fmt: skip
    starts = riskbook.breaches(riskbook.History.from_envelopes(envelopes), levels=1.0)
    want = starts["trigger_event_id"].to_list()
    assert len(want) == 1
    for size in (1, 2, len(envelopes)):
        engine = Engine()
        got = []
        for lo in range(0, len(envelopes), size):
            batch = riskbook.History.from_envelopes(envelopes[lo : lo + size])
            effects = engine.apply(batch)
            got += [str(e.causation_id) for e in effects if e.kind == "LimitViolationDetected"]
        assert got == want, size


def test_the_engine_says_which_stored_limit_types_it_cannot_evaluate() -> None:
    # a LimitSet of a type defined in a notebook, read by a processor that does not have
    # it: silently never evaluated
    riskbook.events.register_limit_type_name("MaxGrossNotionalElsewhere")  # stored, not defined
    events = [limit("A", "MaxGrossNotionalElsewhere", 1.0, T0), trade("A", "Buy", 5, 10.0, at(1))]
    envelopes = [
        Envelope(uuid.uuid4(), e.aggregate_id, e.aggregate_type, i + 1, e.business_time, e,
                 f"c{i}", position=i + 1)
        for i, e in enumerate(events)
    ]  # fmt: skip
    engine = Engine()
    with pytest.warns(UserWarning, match="MaxGrossNotionalElsewhere not registered here"):
        assert engine.apply(riskbook.History.from_envelopes(envelopes[:1])) == []
    engine.apply(riskbook.History.from_envelopes(envelopes[1:]))  # once: no second warning
    assert engine.unregistered == {"MaxGrossNotionalElsewhere"}


def test_riskbook_unblock_takes_the_business_time(fresh_store: Store, capsys) -> None:
    # without it an operator could only unblock "now", which a replayed history's
    # processor read as the wall clock
    s = fresh_store
    s.append("A", [AccountBlocked(account_id="A", reason="r", blocked_by="engine", blocked_at=T0)])
    dsn = ["--dsn", s.dsn]
    assert main(["unblock", "A", "--by", "op", "--reason", "ok", "--at", "yesterday", *dsn]) != 0
    assert "at:" in capsys.readouterr().err and s.count() == 1  # nothing written
    when = "2024-03-01T15:00:00+01:00"
    assert main(["unblock", "A", "--by", "op", "--reason", "ok", "--at", when, *dsn]) == 0
    assert stored(s, "AccountUnblocked")[0].payload.unblocked_at == at(0)  # type: ignore[union-attr]


# ------------------------------------------- riskbook live: a bug hunt's findings


def _riskbook(*args: str, **popen: Any) -> Any:
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "riskbook.cli", *args], text=True, **popen)


def test_live_goes_on_past_a_stored_limit_of_a_type_not_registered_here(
    fresh_store: Store,
) -> None:
    # A notebook registered a limit type and stored a LimitSet of it; `riskbook live`, a
    # process without its definition, died on it ("LimitSet.limit_type: unknown limit type")
    # in every small batch, and again on every restart. It warns once, and goes on.
    import subprocess

    s = fresh_store
    name = f"MaxLiveElsewhere{uuid.uuid4().hex[:8]}"
    riskbook.events.register_limit_type_name(name)  # here only, as the notebook's process
    s.append("A", [fund("A", 1e6), limit("A", "MaxPositionSize", 100.0, T0)])
    s.append("A", [limit("A", name, 1.0, at(1))])
    s.append("A", [trade("A", "Buy", 150, 10.0, at(2))])  # over the limit: after it
    out = _riskbook("live", "--once", "--max-batch", "2", "--dsn", s.dsn,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    stdout, stderr = out.communicate(timeout=120)
    assert out.returncode == 0, stderr
    warned = [line for line in stderr.splitlines() if name in line]
    assert warned == [
        f"riskbook: warning: limit type(s) {name} not registered here: their stored limits are"
        " not evaluated (register them, e.g. by an entry point in the group"
        " 'riskbook.limit_types', where this engine runs)"
    ], stderr
    assert stdout.startswith("VIOLATION A MaxPositionSize X: 150"), stdout
    assert [e.payload.limit_type for e in stored(s, "LimitViolationDetected")] == [  # type: ignore[union-attr]
        "MaxPositionSize"
    ]
    assert len(stored(s, "AccountBlocked")) == 1


def test_live_says_a_warning_of_its_thread_on_one_line(fresh_store: Store) -> None:
    # following the store, the processor works in a thread: its warnings came out raw
    # (a path, a line number and a line of riskbook's code)
    import signal
    import subprocess

    s = fresh_store
    name = f"MaxThreadElsewhere{uuid.uuid4().hex[:8]}"
    riskbook.events.register_limit_type_name(name)
    s.append("A", [fund("A", 1e6), limit("A", name, 1.0, T0)])
    live = _riskbook("live", "--dsn", s.dsn, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timer = threading.Timer(60, live.send_signal, (signal.SIGINT,))  # should it never warn
    timer.start()
    try:
        assert live.stderr is not None
        lines = []
        while not lines or name not in lines[-1]:
            lines.append(live.stderr.readline())
            assert lines[-1], lines  # not the end of its output
        live.send_signal(signal.SIGINT)
        _, rest = live.communicate(timeout=60)
    finally:
        timer.cancel()
    assert live.returncode == 0, rest
    assert lines[-1].startswith(f"riskbook: warning: limit type(s) {name} not registered here")
    assert "Warning" not in "".join(lines) + rest and "_engine.py" not in "".join(lines) + rest


def test_live_stops_quietly_when_its_reader_goes_away(fresh_store: Store) -> None:
    # `riskbook live | head -1`: the processor's thread died on the print, and a
    # BrokenPipeError traceback went to stderr. What it decided is committed all the same.
    import subprocess

    s = fresh_store
    s.append("A", [fund("A", 1e6), limit("A", "MaxPositionSize", 100.0, T0),
                   trade("A", "Buy", 110, 10.0, at(1))])  # fmt: skip
    live = _riskbook("live", "--dsn", s.dsn, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert live.stdout is not None
    live.stdout.close()  # the reader is gone before the processor has said anything
    _, stderr = live.communicate(timeout=60)  # it stops by itself
    assert live.returncode == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert len(stored(s, "LimitViolationDetected")) == 1
