"""The live engine's busts: refolding the account from a kept state (the engine) gives
exactly what refolding its whole history gives (``Engine(_reference=True)``, the
implementation before it): the same effects, in the same order, and the same states."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import riskbook
from riskbook import (
    AccountFunded,
    AccountUnblocked,
    Envelope,
    History,
    LimitSet,
    PositionUpdated,
    PriceMarked,
    TradeCancelled,
    TradeExecuted,
    limits,
)
from riskbook.events import decode_envelope
from riskbook.live import Effect, Engine
from riskbook.live import _engine as engine_module
from tests.test_live import T0, fund, limit, trade

DATA = Path(__file__).resolve().parent.parent / "data"


# ----------------------------------------------------------------------------- helpers


def envelopes_of(events: list[tuple[riskbook.Event, datetime]]) -> list[Envelope]:
    """(event, recorded time) in global order, as envelopes at positions 1, 2, ..."""
    return [
        Envelope(uuid.uuid4(), e.aggregate_id, e.aggregate_type, 1, recorded, e, f"c{i}",
                 position=i + 1)
        for i, (e, recorded) in enumerate(events)
    ]  # fmt: skip


def recorded_when_they_happen(*events: riskbook.Event) -> list[Envelope]:
    return envelopes_of([(e, e.business_time or T0) for e in events])


def fold(engine: Engine, envelopes: list[Envelope], cuts: Sequence[int]) -> list[Effect]:
    """``envelopes`` folded in batches cut at ``cuts`` (indices)."""
    out: list[Effect] = []
    for lo, hi in itertools.pairwise([0, *sorted(set(cuts)), len(envelopes)]):
        if hi > lo:
            out += engine.apply(History.from_envelopes(envelopes[lo:hi]))
    return out


def assert_same_state(new: Engine, ref: Engine) -> None:
    """Every state an engine keeps between batches, to the bit."""
    for name in ("positions", "accounts", "marks", "days"):
        assert_frame_equal(getattr(new.projection, name), getattr(ref.projection, name),
                           check_exact=True)  # fmt: skip
    assert list(new.breach) == list(ref.breach)
    for name, state in new.breach.items():
        other = ref.breach[name]
        for frame in ("limits", "metrics", "open"):
            assert_frame_equal(getattr(state, frame), getattr(other, frame), check_exact=True)
        assert state.through == other.through
    assert list(new.open_now) == list(ref.open_now)
    for name, frame in new.open_now.items():
        assert_frame_equal(frame, ref.open_now[name], check_exact=True)
    assert_frame_equal(new.scheduled, ref.scheduled, check_exact=True)
    for what in ("clock", "recorded", "mark_times", "blocked", "pending", "horizon",
                 "events_seen", "unregistered"):  # fmt: skip
        assert getattr(new, what) == getattr(ref, what), what


def both(
    envelopes: list[Envelope], cuts: Sequence[int] = (), **args: Any
) -> tuple[Engine, list[Effect]]:
    """Fold with the engine and with the reference; assert the same effects and states."""
    new, ref = Engine(**args), Engine(**args, _reference=True)
    got, want = fold(new, envelopes, cuts), fold(ref, envelopes, cuts)
    assert got == want
    assert_same_state(new, ref)
    return new, got


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of trades each bust's refold reads (its window of the history)."""
    seen: list[int] = []
    build = engine_module._build_book

    def spy(history: History, *args: Any) -> Any:
        seen.append(history.trades.height)
        return build(history, *args)

    monkeypatch.setattr(engine_module, "_build_book", spy)
    yield seen


def cancel(victim: TradeExecuted, when: datetime) -> TradeCancelled:
    return TradeCancelled(trade_id=victim.trade_id, account_id=victim.account_id,
                          reason="bust", cancelled_at=when)  # fmt: skip


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


# ----------------------------------------------------------------------------- scenarios


def test_a_bust_refolds_the_events_since_its_trade_not_the_history(windows: list[int]) -> None:
    events: list[riskbook.Event] = [fund("A"), fund("B"), limit("A", 100.0)]
    events += [limit("A", 0.05, kind="MaxLeverage"), limit("B", 150.0, kind="MaxDailyVolume")]
    fills = [trade(("A", "B")[i % 2], ("Buy", "Sell")[i % 3 == 0], 10 + i % 7, i,
                   symbol=("P", "Q", "R")[i % 3], price=10 + i % 5) for i in range(240)]  # fmt: skip
    events += fills
    events += [cancel(fills[-3], at(240)), cancel(fills[-2], at(241))]  # just now
    events += [trade("A", "Buy", 5, 242, symbol="Q")]
    events += [cancel(fills[10], at(243))]  # long ago
    envelopes = recorded_when_they_happen(*events)
    cuts = list(range(5, len(envelopes), 20))
    fold(Engine(), envelopes, cuts)
    # The account's trades since a kept state before the busted trade: a batch or two
    # for a trade of just now, nearly all of its 121 trades for one of long ago.
    assert len(windows) == 3 and max(windows[:2]) <= 20 and 110 < windows[2] <= 121
    both(envelopes, cuts)


def test_a_new_symbol_before_the_others_makes_the_next_bust_refold_everything_once() -> None:
    # The fold sums an account's market values over a tree with a leaf per symbol it
    # traded, in name order: W, Y, Z sum as (W + Y) + Z in the batches before X comes; a
    # fold of the whole history has X's leaf too, so W + (Y + Z). Equity 1 + 2e-16 against
    # 1.0: the peak the batches kept is not the whole history's, and the refold of A at
    # the bust must not start from the states kept before X.
    events = [fund("A", 1.0), limit("A", 0.5, kind="MaxDrawdown"),
              trade("A", "Buy", 1, 1, symbol="W", price=0.1),
              trade("A", "Buy", 1, 2, symbol="Y", price=0.3),
              trade("A", "Buy", 1, 3, symbol="Z", price=0.2)]  # fmt: skip
    z = trade("A", "Buy", 1, 5, symbol="Z", price=0.2)
    w = trade("A", "Buy", 1, 7, symbol="W", price=0.1)
    events += [trade("A", "Buy", 1, 4, symbol="X", price=0.4), z, cancel(z, at(6))]
    events += [w, cancel(w, at(8))]
    # B's third symbol comes before its two: two leaves sum alike in any tree
    b = [trade("B", "Buy", 1, 9 + i, symbol=x, price=0.1 * (i + 1)) for i, x in enumerate("ZYX")]
    events += [*b, cancel(b[1], at(12))]
    envelopes = recorded_when_they_happen(*events)
    new, _ = both(envelopes, list(range(1, len(envelopes))))
    assert new.projection.accounts["peak_equity"][0] == 1.0  # A's, not 1.0000000000000002
    # A: the states kept after the bust that refolded it all; B: every state serves
    assert new._valid_from == {"A": 9}


def test_a_symbol_all_busted_before_others_makes_the_next_bust_refold_everything() -> None:
    # Q's only trade busted: A's fold has no leaf for Q (no position), a fold of its
    # whole history has one (zero) between P and R: (P + R) + S against P + (R + S). A mark
    # of P at its cost: equity 1 + 2e-16 against 1.0, and the peak with it.
    q = trade("A", "Buy", 1, 2, symbol="Q", price=0.25)
    s2 = trade("A", "Buy", 1, 7, symbol="S", price=0.2)
    events = [fund("A", 1.0), limit("A", 0.5, kind="MaxDrawdown"),
              trade("A", "Buy", 1, 1, symbol="P", price=0.1), q,
              trade("A", "Buy", 1, 3, symbol="R", price=0.3),
              trade("A", "Buy", 1, 4, symbol="S", price=0.2), cancel(q, at(5)),
              PriceMarked(symbol="P", price=0.1, marked_at=at(6)), s2, cancel(s2, at(8))]  # fmt: skip
    envelopes = recorded_when_they_happen(*events)
    new, _ = both(envelopes, list(range(1, len(envelopes))))
    assert new.projection.accounts["peak_equity"].item() == 1.0  # not 1.0000000000000002
    assert new._gaps == {"A": frozenset({"Q"})} and new._valid_from["A"] == 11


def test_a_trade_recorded_after_its_cancel_never_counts() -> None:
    # DESIGN.md §4: a busted trade is as if never executed as soon as the cancel is
    # known. The cancel came first here, so the trade never counts: it used to fold as
    # live until the account's next bust, starting a breach (and a block) over a trade
    # cancelled before it arrived -- and not when the batch was cut so that its limit
    # type was activated after it (that fold of the history left it out).
    late = trade("A", "Buy", 150, 2, trade_id="T-LATER")
    other = trade("A", "Buy", 10, 3)
    events = [fund("A"), limit("A", 100.0),
              TradeCancelled(trade_id="T-LATER", account_id="A", reason="bust", cancelled_at=at(1)),
              late, other, cancel(other, at(4)), trade("A", "Buy", 20, 5)]  # fmt: skip
    envelopes = recorded_when_they_happen(*events)
    for cuts in ([], [3], [4], [4, 5], list(range(1, len(envelopes)))):
        new, effects = both(envelopes, cuts)
        assert new.projection.positions["quantity"].to_list() == [20.0]
        assert effects == []
    history = History.from_envelopes(envelopes)
    assert riskbook.breaches(history, levels=1.0).height == 0  # the one-shot fold agrees


def test_a_trade_recorded_after_its_cancel_leaves_a_gap_where_its_symbol_sorts() -> None:
    # Its symbol has a leaf in a fold of the whole history (the trade is there, busted),
    # none in the live fold: a gap, as for a symbol whose trades were all busted. Prices
    # in thirds make sums that differ by where the leaves sit.
    events: list[riskbook.Event] = [fund("A", 1_000.0), limit("A", 5.0, kind="MaxLeverage")]
    for i, symbol in enumerate(["P", "R", "S", "T"]):
        events.append(trade("A", "Buy", 3, 1 + i, symbol=symbol, price=10 + i / 3))
    events += [
        TradeCancelled(trade_id="T-EARLY", account_id="A", reason="bust", cancelled_at=at(6)),
        trade("A", "Buy", 7, 7, symbol="B", price=11 / 3, trade_id="T-EARLY"),
        trade("A", "Sell", 1, 8, symbol="S", price=31 / 3),
    ]
    envelopes = recorded_when_they_happen(*events)
    new, _ = both(envelopes, [len(envelopes) - 2])
    assert new._gaps == {"A": frozenset({"B"})}
    assert "B" in new._layout["A"]
    first = events[2]
    assert isinstance(first, TradeExecuted)
    bust = envelopes_of([(cancel(first, at(9)), at(9))])[0]
    new, _ = both([*envelopes, dataclasses.replace(bust, position=len(envelopes) + 1)])
    assert new.projection.positions["symbol"].to_list() == ["R", "S", "T"]


# ----------------------------------------------------------------------------- properties

_ACCOUNTS = ["A", "B", "C"]
_SYMBOLS = ["P", "Q", "R", "S", "T"]  # enough for leaves that sum differently by layout
_LIMITS = [("MaxPositionSize", 60.0), ("MaxPositionSize", 100.0), ("MaxDailyVolume", 150.0),
           ("MaxLeverage", 0.05), ("MaxDrawdown", 0.001)]  # fmt: skip
_KINDS = (["trade"] * 8 + ["late", "mark", "stale", "limit", "scheduled", "fund", "adjust",
          "unblock"] + ["bust"] * 2 + ["recent", "again", "unknown", "early"])  # fmt: skip


@st.composite
def histories(draw: st.DrawFn, *, types: tuple[tuple[str, float], ...] = ()) -> list[Envelope]:
    """Random events in global order, with busts of trades long ago and just now, of a
    trade busted already, of a trade that does not exist, and of one recorded later;
    late events (recorded after later ones happened), stale marks, LimitSets recorded
    before their set_at, new UTC days; prices in thirds (sums that round)."""
    n = draw(st.integers(8, 36))
    events: list[tuple[riskbook.Event, datetime]] = [(fund(a, 10_000.0), T0) for a in _ACCOUNTS]
    trades: list[TradeExecuted] = []
    busted: list[TradeExecuted] = []
    early: list[tuple[str, str]] = []  # (account, trade id) cancelled before the trade
    marked: dict[str, datetime] = {}
    minute = 0.0
    for _ in range(n):
        minute += draw(st.sampled_from([0.0, 0.5, 1.0, 1.0, 700.0]))  # ties, new UTC days
        now = at(minute)
        kind = draw(st.sampled_from(_KINDS))
        acc, sym = draw(st.sampled_from(_ACCOUNTS)), draw(st.sampled_from(_SYMBOLS))
        price = draw(st.integers(15, 45)) / 3
        e: riskbook.Event
        if kind in ("trade", "late"):
            when = now - timedelta(minutes=30) if kind == "late" else now
            trade_id = None
            if early and draw(st.booleans()):
                acc, trade_id = early.pop()
            e = trade(acc, draw(st.sampled_from(["Buy", "Sell"])), float(draw(st.integers(1, 80))),
                      (when - T0) / timedelta(minutes=1), symbol=sym, price=price,
                      trade_id=trade_id)  # fmt: skip
            trades.append(e)  # type: ignore[arg-type]
        elif kind in ("mark", "stale"):
            when = now
            if kind == "stale" and sym in marked:
                when = marked[sym] - timedelta(minutes=1)
            marked[sym] = max(when, marked.get(sym, when))
            e = PriceMarked(symbol=sym, price=price, marked_at=when)
        elif kind in ("limit", "scheduled"):
            lt, value = draw(st.sampled_from(_LIMITS + list(types)))
            later = draw(st.sampled_from([10.0, 700.0, 2000.0])) if kind == "scheduled" else 0.0
            e = LimitSet(account_id=acc, limit_type=lt, value=value, set_by="p",
                         set_at=now + timedelta(minutes=later),
                         symbol=sym if lt == "MaxPositionSize" and draw(st.booleans()) else None)  # fmt: skip
        elif kind == "fund":
            e = AccountFunded(account_id=acc, amount=float(draw(st.integers(-500, 500)) or 1),
                              funded_at=now)  # fmt: skip
        elif kind == "adjust":
            e = PositionUpdated(account_id=acc, symbol=sym, previous_quantity=0.0,
                                new_quantity=float(draw(st.integers(-50, 50))), reason="split",
                                updated_at=now)  # fmt: skip
        elif kind == "unblock":
            e = AccountUnblocked(account_id=acc, reason="ok", unblocked_by="op", unblocked_at=now)
        elif kind in ("bust", "recent", "again") and trades:
            pool = {"bust": trades, "recent": trades[-1:], "again": busted or trades}[kind]
            victim = draw(st.sampled_from(pool))
            busted.append(victim)
            e = cancel(victim, now)
        else:  # a bust of a trade never recorded, or recorded later
            trade_id = f"T-{uuid.uuid4().hex[:12]}"
            if kind == "early":
                early.append((acc, trade_id))
            e = TradeCancelled(trade_id=trade_id, account_id=acc, reason="bust",
                               cancelled_at=now)  # fmt: skip
        events.append((e, now))
    return envelopes_of(events)


def _cuts(data: st.DataObject, envelopes: list[Envelope]) -> list[int]:
    one_by_one = data.draw(st.booleans())
    if one_by_one:
        return list(range(1, len(envelopes)))
    return data.draw(st.lists(st.integers(1, len(envelopes) - 1), max_size=5))


def _both_in_batches(data: st.DataObject, envelopes: list[Envelope]) -> None:
    """:func:`both` in random batches, the engine evaluating a batch's rows at its end or
    every few rows (as it does past ``_DEFERRED_ROWS`` held)."""
    held = data.draw(st.sampled_from([engine_module._DEFERRED_ROWS, 0, 5]))
    with mock.patch.object(engine_module, "_DEFERRED_ROWS", held):
        both(envelopes, _cuts(data, envelopes))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_refold_from_a_kept_state_is_the_whole_history_refold(data: st.DataObject) -> None:
    _both_in_batches(data, data.draw(histories()))


def test_a_limit_type_first_limited_in_the_batch_that_completes_a_merge_sees_the_history() -> None:
    # The kept history merges each 16 batches into one segment; the 16th batch's limit
    # activated its type from the segments before the last one -- with the merge, none
    # of the 15 batches before it: A's position of 140 was unknown to the new type, and
    # the breach was reported at the next trade instead of at the LimitSet.
    events = [fund("A")] + [trade("A", "Buy", 10, i) for i in range(1, 15)]
    events += [limit("A", 50.0, minute=20), trade("A", "Buy", 1, 21)]
    envelopes = recorded_when_they_happen(*events)
    starts = riskbook.breaches(History.from_envelopes(envelopes), levels=1.0)
    assert starts["trigger_event_id"].to_list() == [str(envelopes[15].event_id)]
    _, effects = both(envelopes, list(range(1, len(envelopes))), critical=None)
    assert [e.causation_id for e in effects] == [str(envelopes[15].event_id)]


def _gross(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """A user's metric that goes on from a state: the account's gross exposure."""
    return riskbook.account_timeline(history, known_at=known_at).select(
        "account_id", "timestamp", "position", "event_id", time="occurred_at",
        value="gross_exposure",
    )  # fmt: skip


def _fills(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """A user's metric of the frames (every fill, busted ones too, counted per UTC day)."""
    count = (pl.int_range(pl.len()) + 1).over("account_id", pl.col("executed_at").dt.date())
    return (
        history.trades.sort("executed_at", "timestamp", "position")
        .with_columns(value=count.cast(pl.Float64))
        .select("account_id", "timestamp", "position", "event_id", "value", time="executed_at")
    )


def _register_user_types() -> tuple[tuple[str, float], ...]:
    limits.register(limits.LimitSpec("BustsGross", "account", "USD", _gross, incremental=True),
                    replace=True)  # fmt: skip
    limits.register(limits.LimitSpec("BustsFills", "account_day", "fills", _fills), replace=True)
    return (("BustsGross", 900.0), ("BustsFills", 3.0))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_user_limit_type_at_a_bust_reads_the_account_history_as_before(
    data: st.DataObject,
) -> None:
    types = _register_user_types()
    _both_in_batches(data, data.draw(histories(types=types)))


@pytest.mark.slow
def test_a_rebuild_of_the_sample_decides_and_keeps_the_same() -> None:
    # the processor's rebuild at its start: the whole history below its checkpoint in
    # one batch, effects thrown away
    with gzip.open(DATA / "sample.jsonl.gz", "rb") as f:
        history = History.from_envelopes(decode_envelope(line)[0] for line in f)
    assert history.cancels.height == 54
    new, ref = Engine(), Engine(_reference=True)
    got = new.apply(history, written=False)
    assert got == ref.apply(history, written=False)
    assert len(got) == 7
    assert_same_state(new, ref)


def test_a_long_fold_says_how_far_it_is_after_each_bust() -> None:
    fills = [trade("A", "Buy", 10, i, trade_id=f"T-{i}") for i in range(30)]
    events: list[riskbook.Event] = [fund("A"), *fills[:20], cancel(fills[3], at(20))]
    events += [*fills[20:], cancel(fills[25], at(31)), trade("A", "Sell", 5, 32)]
    history = History.from_envelopes(recorded_when_they_happen(*events))
    told: list[tuple[int, int]] = []
    Engine().apply(history, written=False, progress=lambda done, total: told.append((done, total)))
    n = len(events)
    # the run before each bust, each bust, the run after the last, and the end
    assert told == [(21, n), (22, n), (32, n), (33, n), (34, n), (34, n)]
