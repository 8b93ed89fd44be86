"""Hunt: the numbers of exposure and P&L (DESIGN.md §4) and the limits built on them (§5),
by hand-computed examples and against the plain reference folds of the other test files,
in batch (riskbook.positions / accounts / timelines / breaches) and live (Engine)."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import riskbook
from riskbook import limits
from riskbook import projections as P
from riskbook.events import Envelope
from riskbook.frames import History
from riskbook.live import Engine
from tests.test_limits import Book, reference_breaches, rows
from tests.test_projections import assert_state, reference_events, reference_fold

T0 = datetime(2024, 3, 1, 14, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def pos_row(h: History, acct: str, sym: str, **kw: Any) -> dict[str, Any]:
    p = P.positions(h, **kw).filter(
        (pl.col("account_id").cast(pl.String) == acct) & (pl.col("symbol").cast(pl.String) == sym)
    )
    assert p.height == 1, p
    return p.row(0, named=True)


def acc_row(h: History, acct: str, **kw: Any) -> dict[str, Any]:
    a = P.accounts(h, **kw).filter(pl.col("account_id").cast(pl.String) == acct)
    assert a.height == 1, a
    return a.row(0, named=True)


# ============================================================================ projections by hand


def test_flip_through_zero_realizes_and_reopens_at_trade_price() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.trade("A", "X", "Buy", 100, 10, at(1))
    b.trade("A", "X", "Sell", 150, 15, at(2))  # closes 100 (R = 500), opens -50 @ 15
    b.mark("X", 12, at(3))
    h = b.history()
    p = pos_row(h, "A", "X")
    assert (p["quantity"], p["avg_price"], p["realized_pnl"]) == (-50.0, 15.0, 500.0)
    assert p["unrealized_pnl"] == 150.0  # -50 * (12 - 15)
    assert p["market_value"] == -600.0
    a = acc_row(h, "A")
    # cash = 1000 - 1000 + 2250 = 2250; equity = 2250 - 600 = 1650
    assert a["cash"] == 2250.0
    assert a["equity"] == 1650.0
    assert (a["gross_exposure"], a["net_exposure"]) == (600.0, -600.0)
    assert a["leverage"] == 600.0 / 1650.0
    assert a["realized_pnl"] == 500.0 and a["unrealized_pnl"] == 150.0
    # equity = funding + realized + unrealized
    assert a["equity"] == 1000.0 + 500.0 + 150.0


def test_partial_close_keeps_average_then_flip_short_to_long() -> None:
    b = Book()
    b.trade("A", "X", "Sell", 100, 20, at(1))  # -100 @ 20
    b.trade("A", "X", "Buy", 40, 15, at(2))  # covers 40: R = 40 * 5 = 200; -60 @ 20
    b.trade("A", "X", "Buy", 100, 18, at(3))  # covers 60: R += 60 * 2 = 120; +40 @ 18
    h = b.history()
    tl = P.position_timeline(h)
    assert tl.select("quantity", "avg_price", "realized_pnl").rows() == [
        (-100.0, 20.0, 0.0),
        (-60.0, 20.0, 200.0),
        (40.0, 18.0, 320.0),
    ]
    a = acc_row(h, "A")
    # cash = 2000 - 600 - 1800 = -400; net = 40 * 18 (no mark: at average cost) = 720
    assert (a["cash"], a["equity"], a["gross_exposure"]) == (-400.0, 320.0, 720.0)
    assert a["leverage"] == 720.0 / 320.0


def test_bust_of_the_flipping_trade_restores_the_position() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.trade("A", "X", "Buy", 100, 10, at(1))
    b.trade("A", "X", "Sell", 150, 15, at(2), trade_id="FLIP")
    b.mark("X", 12, at(3))
    b.cancel("A", "FLIP", at(4))
    h = b.history()
    p = pos_row(h, "A", "X")
    assert (p["quantity"], p["avg_price"], p["realized_pnl"], p["trades"]) == (100.0, 10.0, 0.0, 1)
    a = acc_row(h, "A")
    assert (a["cash"], a["equity"], a["gross_exposure"]) == (0.0, 1200.0, 1200.0)
    # before the cancel was known, the flip counts
    before = acc_row(h, "A", known_at=at(3))
    assert before["cash"] == 2250.0
    assert_state(h, reference_events(h), None, None)
    assert_state(h, reference_events(h), None, at(3))


def test_bust_of_the_opening_trade() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.trade("A", "X", "Buy", 100, 10, at(1), trade_id="OPEN")
    b.trade("A", "X", "Buy", 50, 20, at(2))
    b.trade("A", "X", "Sell", 30, 25, at(3))
    b.cancel("A", "OPEN", at(4))
    h = b.history()
    p = pos_row(h, "A", "X")
    # without OPEN: +50 @ 20, sell 30 @ 25: R = 150, q = 20 @ 20
    assert (p["quantity"], p["avg_price"], p["realized_pnl"]) == (20.0, 20.0, 150.0)
    tl = P.position_timeline(h)
    assert tl["quantity"].to_list() == [50.0, 20.0]
    assert_state(h, reference_events(h), None, None)


def test_bust_of_only_trade_leaves_no_exposure() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.trade("A", "X", "Buy", 100, 10, at(1), trade_id="ONLY")
    b.mark("X", 30, at(2))
    b.cancel("A", "ONLY", at(3))
    h = b.history()
    a = acc_row(h, "A")
    assert (a["cash"], a["equity"], a["gross_exposure"], a["leverage"]) == (
        1000.0,
        1000.0,
        0.0,
        0.0,
    )
    assert a["peak_equity"] == 1000.0 and a["drawdown"] == 0.0
    # the mark moves nothing: no row for it
    tl = P.account_timeline(h)
    assert tl["event_type"].cast(pl.String).to_list() == ["AccountFunded"]


def test_mark_before_any_trade_values_the_later_position() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.mark("X", 8, at(0.5))
    b.trade("A", "X", "Buy", 100, 10, at(1))
    h = b.history()
    p = pos_row(h, "A", "X")
    assert (p["mark_price"], p["market_value"], p["unrealized_pnl"]) == (8.0, 800.0, -200.0)
    a = acc_row(h, "A")
    assert (a["equity"], a["gross_exposure"]) == (800.0, 800.0)
    assert a["drawdown"] == pytest.approx(0.2)
    tl = P.account_timeline(h)
    assert tl["event_type"].cast(pl.String).to_list() == ["AccountFunded", "TradeExecuted"]


def test_mark_of_a_symbol_never_traded_and_after_close() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.mark("Z", 5, at(0.5))
    b.trade("A", "X", "Buy", 10, 10, at(1))
    b.trade("A", "X", "Sell", 10, 12, at(2))
    b.mark("X", 100, at(3))  # after close: moves nothing
    h = b.history()
    tl = P.account_timeline(h)
    assert tl["event_type"].cast(pl.String).to_list() == [
        "AccountFunded", "TradeExecuted", "TradeExecuted"
    ]  # fmt: skip
    a = acc_row(h, "A")
    assert (a["cash"], a["equity"], a["gross_exposure"], a["open_positions"]) == (
        1020.0, 1020.0, 0.0, 0
    )  # fmt: skip
    mk = P.marks(h)
    assert dict(zip(mk["symbol"].cast(pl.String), mk["mark_price"], strict=True)) == {
        "X": 100.0, "Z": 5.0
    }  # fmt: skip
    p = pos_row(h, "A", "X")
    assert (p["quantity"], p["avg_price"], p["market_value"], p["unrealized_pnl"]) == (
        0.0, 0.0, 0.0, 0.0
    )  # fmt: skip


def test_several_accounts_share_a_symbol_one_mark_moves_each() -> None:
    b = Book()
    for acct in ("A", "B", "C"):
        b.fund(acct, 1000, at(0))
    b.trade("A", "X", "Buy", 10, 10, at(1))
    b.trade("B", "X", "Sell", 20, 11, at(2))
    b.trade("C", "Y", "Buy", 5, 3, at(3))
    m = b.mark("X", 12, at(4))
    h = b.history()
    tl = P.account_timeline(h).filter(pl.col("event_id").cast(pl.String) == m)
    assert sorted(tl["account_id"].cast(pl.String).to_list()) == ["A", "B"]
    a, bb = acc_row(h, "A"), acc_row(h, "B")
    assert (a["net_exposure"], a["equity"]) == (120.0, 1020.0)
    assert (bb["net_exposure"], bb["gross_exposure"], bb["equity"]) == (-240.0, 240.0, 980.0)
    assert acc_row(h, "C")["equity"] == 1000.0


def test_position_updated_split_keeps_cost_basis_and_mismatch_reported() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.trade("A", "X", "Buy", 100, 10, at(1))
    b.mark("X", 11, at(2))
    b.adjust("A", "X", 100, 200, at(3))  # split: 200 @ 5; mark still 11 (not split)
    h = b.history()
    p = pos_row(h, "A", "X")
    assert (p["quantity"], p["avg_price"], p["realized_pnl"]) == (200.0, 5.0, 0.0)
    a = acc_row(h, "A")
    assert a["gross_exposure"] == 2200.0 and a["cash"] == 0.0
    b.mark("X", 5.5, at(4))
    b.adjust("A", "X", 150, 0, at(5))  # mismatch: the books say 200
    h = b.history()
    p = pos_row(h, "A", "X")
    assert (p["quantity"], p["avg_price"]) == (0.0, 0.0)
    mm = riskbook.adjustment_mismatches(h)
    assert mm.height == 1
    assert_state(h, reference_events(h), None, None)


def test_position_updated_opens_a_position_with_zero_cost() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.adjust("A", "X", 0, 50, at(1))
    h = b.history()
    p = pos_row(h, "A", "X")
    assert (p["quantity"], p["avg_price"], p["market_value"]) == (50.0, 0.0, 0.0)
    b.mark("X", 2, at(2))
    h = b.history()
    a = acc_row(h, "A")
    assert (a["equity"], a["gross_exposure"]) == (1100.0, 100.0)
    assert_state(h, reference_events(h), None, None)


@pytest.mark.parametrize(
    ("qty", "price"),
    [(1e-9, 1e12), (1e12, 1e-9), (1e-9, 1e-9), (1e9, 1e6), (0.123456789012, 98765.4321)],
)
def test_tiny_and_huge_quantities_and_prices(qty: float, price: float) -> None:
    b = Book()
    b.fund("A", 1e6, at(0))
    b.trade("A", "X", "Buy", qty, price, at(1))
    b.trade("A", "X", "Buy", qty, price * 3, at(2))
    b.mark("X", price * 2, at(3))
    b.trade("A", "X", "Sell", qty, price * 4, at(4))
    h = b.history()
    p = pos_row(h, "A", "X")
    assert p["quantity"] == pytest.approx(qty, rel=1e-12)
    assert p["avg_price"] == pytest.approx(price * 2, rel=1e-12)
    assert p["realized_pnl"] == pytest.approx(qty * price * 2, rel=1e-9)
    a = acc_row(h, "A")
    assert a["gross_exposure"] == pytest.approx(qty * price * 2, rel=1e-12)
    assert a["cash"] == pytest.approx(1e6 - qty * price * 4 + qty * price * 4, rel=1e-9, abs=1e-6)
    assert_state(h, reference_events(h), None, None)
    assert_state(h, reference_events(h), at(3.5), None)


def test_state_at_between_events_is_last_timeline_row() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.trade("A", "X", "Buy", 100, 10, at(1))
    b.mark("X", 9, at(2))
    b.mark("X", 12, at(3))
    h = b.history()
    assert acc_row(h, "A", at=at(2))["equity"] == 900.0
    assert acc_row(h, "A", at=at(2.5))["equity"] == 900.0
    assert acc_row(h, "A", at=at(3))["equity"] == 1200.0
    assert acc_row(h, "A", at=at(1))["equity"] == 1000.0
    assert P.accounts(h, at=at(-1)).height == 0
    assert pos_row(h, "A", "X", at=at(2.5))["mark_price"] == 9.0


# ============================================================================ limits by hand


def starts(h: History) -> list[tuple[str, str | None, datetime, datetime | None, float]]:
    got = limits.breaches(h, levels=1.0)
    return sorted(
        (str(r["limit_type"]), None if r["symbol"] is None else str(r["symbol"]),
         r["started_at"], r["ended_at"], r["peak_value"])
        for r in got.iter_rows(named=True)
    )  # fmt: skip


def engine_effects(h: History, critical: Any = None) -> list[tuple[str, str, str, float]]:
    e = Engine(critical=critical)
    return [(x.kind, x.limit_type, x.causation_id, x.value) for x in e.apply(h)]


def test_leverage_at_the_limit_is_no_breach_and_marks_move_it() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.limit("A", "MaxLeverage", 2.0, at(0))
    b.trade("A", "X", "Buy", 100, 20, at(1))  # gross 2000 / equity 1000 = 2.0: not over
    down = b.mark("X", 19, at(2))  # 1900 / 900 = 2.11: over, with no trade
    b.mark("X", 21, at(3))  # 2100 / 1100: back within
    h = b.history()
    assert starts(h) == [("MaxLeverage", None, at(2), at(3), 1900.0 / 900.0)]
    assert rows(limits.breaches(h)) == reference_breaches(b.envelopes)
    eff = engine_effects(h)
    assert eff == [("LimitViolationDetected", "MaxLeverage", down, 1900.0 / 900.0)]


def test_drawdown_at_the_limit_is_no_breach() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.limit("A", "MaxDrawdown", 0.2, at(0))
    b.trade("A", "X", "Buy", 100, 10, at(1))
    b.mark("X", 8, at(2))  # (1000 - 800) / 1000 = 0.2: not over
    over = b.mark("X", 7.9, at(3))  # 0.21
    b.fund("A", 100, at(4))  # flows move the peak: peak 1100, equity 890: 0.19
    h = b.history()
    tl = P.account_timeline(h)
    assert tl["drawdown"].to_list()[2] == 0.2
    assert starts(h) == [("MaxDrawdown", None, at(3), at(4), pytest.approx(0.21))]
    assert rows(limits.breaches(h)) == reference_breaches(b.envelopes)
    assert [x[:3] for x in engine_effects(h)] == [("LimitViolationDetected", "MaxDrawdown", over)]


def test_position_size_at_limit_and_adjustment_over_it() -> None:
    b = Book()
    b.limit("A", "MaxPositionSize", 100, at(0))
    b.trade("A", "X", "Sell", 100, 10, at(1))  # |q| = 100: not over
    adj = b.adjust("A", "X", -100, -101, at(2))  # over, by an adjustment
    b.trade("A", "X", "Buy", 201, 10, at(3))  # flips to +100: within
    h = b.history()
    assert starts(h) == [("MaxPositionSize", "X", at(2), at(3), 101.0)]
    assert rows(limits.breaches(h)) == reference_breaches(b.envelopes)
    assert [x[:3] for x in engine_effects(h)] == [
        ("LimitViolationDetected", "MaxPositionSize", adj)
    ]


def test_leverage_goes_infinite_when_equity_negative() -> None:
    b = Book()
    b.fund("A", 100, at(0))
    b.limit("A", "MaxLeverage", 5.0, at(0))
    b.trade("A", "X", "Buy", 10, 10, at(1))  # 100 / 100 = 1
    crash = b.mark("X", -0.0 + 1.0, at(2))  # 10 / 10 = 1 ... equity 10
    b.mark("X", 0.5, at(3))  # gross 5, equity 5: 1
    h = b.history()
    assert P.account_timeline(h)["leverage"].to_list() == [0.0, 1.0, 1.0, 1.0]
    b2 = Book()
    b2.fund("A", 100, at(0))
    b2.limit("A", "MaxLeverage", 5.0, at(0))
    b2.trade("A", "X", "Sell", 10, 10, at(1))  # short 100, cash 200, equity 100
    crash = b2.mark("X", 20, at(2))  # net -200, equity 0: +inf
    b2.mark("X", 15, at(3))  # equity 50, gross 150: 3
    h2 = b2.history()
    assert P.account_timeline(h2)["leverage"].to_list() == [0.0, 1.0, math.inf, 3.0]
    assert starts(h2) == [("MaxLeverage", None, at(2), at(3), math.inf)]
    assert rows(limits.breaches(h2)) == reference_breaches(b2.envelopes)
    assert [x[:3] for x in engine_effects(h2)] == [("LimitViolationDetected", "MaxLeverage", crash)]


# ============================================================================ properties

_ACCTS = ["A", "B"]
_SYMS = ["X", "Y"]
MAX_MINUTES = 30


@st.composite
def in_order_books(draw: st.DrawFn, *, adjust: bool = True, cancel: bool = False) -> Book:
    """Random events in business order (recorded when they happened), with adjustments,
    withdrawals, marks and limits whose values the metrics can hit exactly."""
    b = Book()
    minute = 0.0
    for a in _ACCTS:
        b.fund(a, float(draw(st.sampled_from([100.0, 1000.0, 250.5]))), at(0))
    qtys = st.sampled_from([1.0, 2.0, 5.0, 10.0, 0.5, 0.1, 0.3, 25.0, 50.0])
    prices = st.sampled_from([1.0, 2.0, 4.0, 5.0, 8.0, 10.0, 0.1, 12.5])
    trade_ids: list[tuple[str, str]] = []
    kinds = ["trade"] * 6 + ["mark"] * 3 + ["limit", "fund"] + (["adjust"] if adjust else [])
    kinds += ["cancel"] if cancel else []
    for _ in range(draw(st.integers(3, 40))):
        minute += draw(st.sampled_from([0.0, 1.0, 1.0, 700.0]))
        t = at(minute)
        kind = draw(st.sampled_from(kinds))
        a, s = draw(st.sampled_from(_ACCTS)), draw(st.sampled_from(_SYMS))
        if kind == "trade":
            tid = f"T-{len(b.envelopes)}"
            b.trade(a, s, draw(st.sampled_from(["Buy", "Sell"])), draw(qtys), draw(prices), t,
                    trade_id=tid)  # fmt: skip
            trade_ids.append((a, tid))
        elif kind == "mark":
            b.mark(s, draw(prices), t)
        elif kind == "fund":
            b.fund(a, draw(st.sampled_from([-50.0, 100.0, -0.5, 20.0])), t)
        elif kind == "adjust":
            b.adjust(a, s, 0.0, draw(st.sampled_from([0.0, 10.0, -5.0, 2.0, 100.0])), t)
        elif kind == "cancel" and trade_ids:
            acct, tid = draw(st.sampled_from(trade_ids))
            b.cancel(acct, tid, t)
        else:
            lt, value = draw(st.sampled_from([
                ("MaxPositionSize", 10.0), ("MaxPositionSize", 5.0), ("MaxPositionSize", 0.0),
                ("MaxDailyVolume", 10.0), ("MaxDailyVolume", 20.0),
                ("MaxLeverage", 1.0), ("MaxLeverage", 0.5), ("MaxLeverage", 2.0),
                ("MaxDrawdown", 0.1), ("MaxDrawdown", 0.0), ("MaxDrawdown", 0.5),
            ]))  # fmt: skip
            sym = s if lt == "MaxPositionSize" and draw(st.booleans()) else None
            b.limit(a, lt, value, t, symbol=sym)
    return b


def _with_positions(b: Book) -> list[Envelope]:
    """The envelopes numbered 1, 2, 3 ... in order (positions, and sequences per aggregate)."""
    seq: dict[str, int] = {}
    out = []
    for i, e in enumerate(b.envelopes):
        seq[e.aggregate_id] = seq.get(e.aggregate_id, 0) + 1
        out.append(
            Envelope(
                e.event_id,
                e.aggregate_id,
                e.aggregate_type,
                seq[e.aggregate_id],
                e.timestamp,
                e.payload,
                e.correlation_id,
                position=i + 1,
            )
        )
    return out


def _engine_starts(envs: list[Envelope], cuts: list[int]) -> list[tuple[str, str, str | None]]:
    engine = Engine(critical=None)
    out = []
    bounds = [0, *sorted(set(cuts)), len(envs)]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            out += [
                (x.causation_id, x.limit_type, x.symbol)
                for x in engine.apply(History.from_envelopes(envs[lo:hi]))
                if x.kind == "LimitViolationDetected"
            ]
    return sorted(out, key=str)


def _batch_starts(h: History) -> list[tuple[str, str, str | None]]:
    got = limits.breaches(h, levels=1.0)
    return sorted(
        (
            str(r["trigger_event_id"]),
            str(r["limit_type"]),
            None if r["symbol"] is None else str(r["symbol"]),
        )
        for r in got.iter_rows(named=True)
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=in_order_books())
def test_breaches_equal_reference_with_adjustments_and_marks(b: Book) -> None:
    h = b.history()
    assert rows(limits.breaches(h)) == reference_breaches(b.envelopes)
    assert_state(h, reference_events(h), None, None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=in_order_books(), data=st.data())
def test_engine_violations_equal_breach_starts_with_adjustments(b: Book, data: Any) -> None:
    envs = _with_positions(b)
    h = History.from_envelopes(envs)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(envs) - 1)), max_size=4))
    assert _engine_starts(envs, cuts) == sorted(_batch_starts(h), key=str)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=in_order_books(), data=st.data())
def test_engine_projection_equals_batch_state(b: Book, data: Any) -> None:
    envs = _with_positions(b)
    h = History.from_envelopes(envs)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(envs) - 1)), max_size=4))
    engine = Engine(critical=None)
    bounds = [0, *sorted(set(cuts)), len(envs)]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            engine.apply(History.from_envelopes(envs[lo:hi]))
    want = P.ProjectionState.after(h)
    got = engine.projection
    key = ["account_id", "symbol"]
    assert (
        got.positions.sort(key).drop("last_event_at").rows()
        == want.positions.sort(key).drop("last_event_at").rows()
    )
    assert got.accounts.sort("account_id").select("account_id", "cash", "peak_equity").rows() == (
        want.accounts.sort("account_id").select("account_id", "cash", "peak_equity").rows()
    )
    assert got.marks.sort("symbol").rows() == want.marks.sort("symbol").rows()


# ============================================================================ pre-trade check


def test_check_at_the_limit_accepts_and_over_it_rejects(fresh_store: Any) -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.limit("A", "MaxLeverage", 2.0, at(0))
    b.limit("A", "MaxPositionSize", 100, at(0))
    b.mark("X", 20, at(0.5))
    fresh_store.import_envelopes(_with_positions(b))
    ok = riskbook.check("A", "X", "Buy", 100, 20, store=fresh_store, at=at(1))
    assert ok.accepted, ok  # leverage 2000 / 1000 = 2 and |q| = 100: both at their limits
    over = riskbook.check("A", "X", "Buy", 101, 20, store=fresh_store, at=at(1))
    assert not over.accepted
    assert {r.limit_type for r in over.reasons} == {"MaxLeverage", "MaxPositionSize"}
    # valued at the mark, not the trade price: 100 @ 25 with mark 20 is gross 2000,
    # equity 1000 + (-2500 + 2000) = 500: leverage 4
    rich = riskbook.check("A", "X", "Buy", 100, 25, store=fresh_store, at=at(1))
    assert [(r.limit_type, r.value) for r in rich.reasons] == [("MaxLeverage", 4.0)]
    # a short of the same size is the same gross exposure
    short = riskbook.check("A", "X", "Sell", 100, 20, store=fresh_store, at=at(1))
    assert short.accepted, short


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=in_order_books(cancel=True), data=st.data())
def test_engine_projection_equals_batch_state_with_busts(b: Book, data: Any) -> None:
    envs = _with_positions(b)
    h = History.from_envelopes(envs)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(envs) - 1)), max_size=4))
    engine = Engine(critical=None)
    bounds = [0, *sorted(set(cuts)), len(envs)]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            engine.apply(History.from_envelopes(envs[lo:hi]))
    want = P.ProjectionState.after(h)
    got = engine.projection
    key = ["account_id", "symbol"]
    gp = got.positions.sort(key).drop("last_event_at")
    wp = want.positions.sort(key).drop("last_event_at")
    # a pair whose every trade was busted may stay in one of them with nothing in it
    empty = (pl.col("quantity") == 0) & (pl.col("trades") == 0) & (pl.col("realized_pnl") == 0)
    assert gp.filter(~empty).rows() == wp.filter(~empty).rows()
    assert got.accounts.sort("account_id").select("account_id", "cash", "peak_equity").rows() == (
        want.accounts.sort("account_id").select("account_id", "cash", "peak_equity").rows()
    )
    assert_state(h, reference_events(h), None, None)
    assert rows(limits.breaches(h)) == reference_breaches(b.envelopes)


# ============================================================================ user-defined exposure types


def _gross_metric(history: Any, *, known_at: Any = None) -> pl.DataFrame:
    return P.account_timeline(history, known_at=known_at).select(
        "account_id", time="occurred_at", timestamp="timestamp", position="position",
        event_id="event_id", value="gross_exposure",
    )  # fmt: skip


def _net_metric(history: Any, *, known_at: Any = None) -> pl.DataFrame:
    return P.account_timeline(history, known_at=known_at).select(
        "account_id", time="occurred_at", timestamp="timestamp", position="position",
        event_id="event_id", value=pl.col("net_exposure").abs(),
    )  # fmt: skip


HUNT_GROSS = limits.LimitSpec("HuntGross", "account", "USD", _gross_metric)
HUNT_NET = limits.LimitSpec("HuntNetInc", "account", "USD", _net_metric, incremental=True)


@st.composite
def exposure_books(draw: st.DrawFn) -> Book:
    limits.register(HUNT_GROSS, replace=True)  # as a notebook would (names stay registered)
    limits.register(HUNT_NET, replace=True)
    b = draw(in_order_books(adjust=True))
    # and limits of the user's types, at values the exposures hit exactly
    t = b.envelopes[-1].payload.business_time
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(b.envelopes) - 1))
        when = b.envelopes[i].payload.business_time or t
        b.add(
            riskbook.LimitSet(
                account_id=draw(st.sampled_from(_ACCTS)),
                limit_type=draw(st.sampled_from(["HuntGross", "HuntNetInc"])),
                value=draw(st.sampled_from([0.0, 10.0, 20.0, 50.0, 100.0])),
                set_by="hunt", set_at=when,
            )
        )  # fmt: skip
    # in business order again (the limits went to the end)
    b.envelopes.sort(key=lambda e: e.payload.business_time)
    return b


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=exposure_books(), data=st.data())
def test_engine_user_exposure_types_equal_breach_starts(b: Book, data: Any) -> None:
    envs = _with_positions(b)
    h = History.from_envelopes(envs)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(envs) - 1)), max_size=4))
    assert _engine_starts(envs, cuts) == sorted(_batch_starts(h), key=str)


# ============================================================================ the processor on a store


def test_processor_on_store_reports_the_breach_starts_of_marks_and_adjustments(
    fresh_store: Any,
) -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.fund("B", 500, at(0))
    b.limit("A", "MaxLeverage", 2.0, at(0))
    b.limit("B", "MaxDrawdown", 0.2, at(0))
    b.limit("A", "MaxPositionSize", 100, at(0))
    b.limit("B", "MaxPositionSize", 50, at(0), symbol="X")
    b.trade("A", "X", "Buy", 100, 20, at(1))  # A: lev 2, |q| 100: both at the limit
    b.trade("B", "X", "Sell", 50, 10, at(1))  # B: |q| 50 at the limit; equity 500
    b.mark("X", 19, at(2))  # A: 1900 / 900 over; B: equity 500 + 50 * (10 - 19) = 50 dd .9
    b.mark("X", 12, at(3))  # A: 1200 / 200 = 6 still; B: 400, dd 0.2: ends
    b.adjust("B", "X", -50, -100, at(4))  # split: B |q| 100 over 50; value -1200: equity -200
    b.mark("X", 6, at(5))  # B: equity 500 + 500 - 600 = 400: dd .2
    b.adjust("A", "X", 100, 50, at(6))  # reverse split: A |q| 50; 300 / -600 ... equity
    fresh_store.import_envelopes(_with_positions(b))
    h = riskbook.load(fresh_store, progress=False)
    p = riskbook.Processor(fresh_store, critical=None, snapshots=False)
    try:
        effects = p.catch_up()
    finally:
        p.stop()
    got = sorted(
        ((str(e.causation_id), e.limit_type, e.symbol) for e in effects
         if e.kind == "LimitViolationDetected"), key=str,
    )  # fmt: skip
    assert got == sorted(_batch_starts(h), key=str)
    assert rows(limits.breaches(h)) == reference_breaches(b.envelopes)
    assert len(got) >= 4


def test_star_limits_engine_and_check_agree_with_breaches(fresh_store: Any) -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.fund("B", 1000, at(0))
    b.limit("*", "MaxLeverage", 1.0, at(0))
    b.trade("A", "X", "Buy", 50, 20, at(1))  # A: 1000 / 1000 = 1: at the limit
    b.trade("B", "X", "Sell", 50, 20, at(1))  # B: same, short
    up = b.mark("X", 21, at(2))  # A: 1050 / 1050 = 1; B: 1050 / 950 over
    b.limit("A", "MaxLeverage", 0.5, at(3))  # A's own: 1 over 0.5
    h = b.history()
    assert starts(h) == [
        ("MaxLeverage", None, at(2), None, 1050.0 / 950.0),
        ("MaxLeverage", None, at(3), None, 1.0),
    ]
    assert rows(limits.breaches(h)) == reference_breaches(b.envelopes)
    eff = engine_effects(h)
    assert sorted((k, c) for k, _, c, _ in eff) == sorted(
        [
            ("LimitViolationDetected", up),
            ("LimitViolationDetected", b.envelopes[-1].event_id.__str__()),
        ]
    )
    fresh_store.import_envelopes(_with_positions(b))
    # B is in breach: a trade that adds exposure is refused, one that reduces it is not
    assert not riskbook.check("B", "X", "Sell", 1, 21, store=fresh_store, at=at(4)).accepted
    assert riskbook.check("B", "X", "Buy", 10, 21, store=fresh_store, at=at(4)).accepted
    # C has no events: its first trade at the limit (leverage 1 needs equity): no equity
    c = riskbook.check("C", "X", "Buy", 1, 21, store=fresh_store, at=at(4))
    assert not c.accepted and c.reasons[0].value == math.inf


@pytest.mark.parametrize("route", ["csv", "copy", "adbc"])
def test_many_decimals_survive_every_load_route(
    fresh_store: Any, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = Book()
    b.fund("A", 0.1 + 0.2, at(0))
    b.fund("A", 123456789.123456789, at(0))
    b.trade("A", "X", "Buy", 1 / 3, 0.123456789012345678, at(1))
    b.trade("A", "X", "Buy", 1e-9, 1e12, at(2))
    b.trade("A", "X", "Sell", 2 / 7, 98765.43210987654, at(3))
    b.trade("A", "Y", "Sell", 1e12, 1e-9, at(3))
    b.trade("A", "Y", "Buy", 5e-324 + 1e-300, 1.7976931348623157e300, at(3.5))
    b.mark("X", 3.141592653589793, at(4))
    b.mark("Y", 2.718281828459045e-7, at(5))
    b.adjust("A", "X", 0.1, 0.30000000000000004, at(6))
    fresh_store.import_envelopes(_with_positions(b))
    monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", route)
    h = riskbook.load(fresh_store, progress=False, cache=False)
    mem = b.history()
    for frame in ("trades", "marks", "funding", "adjustments"):
        got = getattr(h, frame).drop("timestamp", "position", "event_id", strict=False)
        want = getattr(mem, frame).drop("timestamp", "position", "event_id", strict=False)
        num = [c for c, t in want.schema.items() if t == pl.Float64]
        assert got.select(num).rows() == want.select(num).rows(), frame
    assert (
        P.positions(h).drop("last_event_at").rows() == P.positions(mem).drop("last_event_at").rows()
    )
    assert P.accounts(h).drop("updated_at").rows() == P.accounts(mem).drop("updated_at").rows()


def test_many_accounts_and_symbols_take_the_large_paths() -> None:
    """> 2**24 (account, symbol) combinations and > 20,000 ids: the book's other paths."""
    n_acc, n_sym = 4200, 4100
    tr = pl.DataFrame(
        {
            "account_id": [f"A{i:05d}" for i in range(n_acc)],
            "symbol": [f"S{i % n_sym:05d}" for i in range(n_acc)],
            "side": ["Buy" if i % 3 else "Sell" for i in range(n_acc)],
            "quantity": [float(i % 7 + 1) for i in range(n_acc)],
            "price": [float(i % 5 + 1) for i in range(n_acc)],
        }
    )
    events: list[Any] = [
        riskbook.TradeExecuted(trade_id=f"T{i}", account_id=r["account_id"], symbol=r["symbol"],
                               side=riskbook.Side(r["side"]), quantity=r["quantity"],
                               price=r["price"], executed_at=at(1))
        for i, r in enumerate(tr.iter_rows(named=True))
    ]  # fmt: skip
    events += [
        riskbook.PriceMarked(symbol=f"S{j:05d}", price=float(j % 11 + 1), marked_at=at(2))
        for j in range(n_sym)
    ]
    events += [riskbook.AccountFunded(account_id=f"A{i:05d}", amount=100.0, funded_at=at(3))
               for i in range(0, n_acc, 100)]  # fmt: skip
    h = History.from_events(*events)
    acc = P.accounts(h)
    assert acc.height == n_acc
    got = {r["account_id"]: r for r in acc.iter_rows(named=True)}
    for i in (0, 1, 2, 100, 4099, 4100, 4101, 4199):
        r = tr.row(i, named=True)
        s = r["quantity"] * (1 if r["side"] == "Buy" else -1)
        mark = float((i % n_sym) % 11 + 1)
        fund = 100.0 if i % 100 == 0 else 0.0
        g = got[r["account_id"]]
        assert g["net_exposure"] == s * mark, (i, g)
        assert g["cash"] == fund - s * r["price"], (i, g)
        assert g["equity"] == fund - s * r["price"] + s * mark, (i, g)
    tl = P.account_timeline(h)
    # one row per trade, one per holder of each mark, one per funding
    assert tl.height == n_acc + n_acc + len(range(0, n_acc, 100))


# ============================================================================ live, with busts, by a plain fold


def _live_reference(b: Book) -> list[tuple[str, str, str | None]]:
    """Violation starts as a processor must find them, by a plain fold at every event in
    global order of what is known by then (busts take their trade out when they come):
    (trigger event id, limit type, symbol). Events recorded in strictly increasing time."""
    envs = b.envelopes
    h = b.history()
    evs = reference_events(h)
    limits_: dict[tuple[str, str, str | None], float] = {}
    over: dict[tuple[str, str, str | None], bool] = {}
    out = []
    for e in envs:
        p = e.payload
        if isinstance(p, riskbook.LimitSet):
            limits_[(p.account_id, p.limit_type, p.symbol)] = p.value
        f = reference_fold(evs, known_at=e.timestamp)
        metrics: dict[tuple[str, str, str | None], float] = {}
        for (acct, sym), pos in f.positions.items():
            metrics[(acct, "MaxPositionSize", sym)] = abs(pos.q)
        for acct, fig in f.figures.items():
            metrics[(acct, "MaxLeverage", None)] = fig["leverage"]
            metrics[(acct, "MaxDrawdown", None)] = fig["drawdown"]
        for key, value in metrics.items():
            acct, kind, sym = key
            lim = limits_.get((acct, kind, sym)) if sym is not None else None
            if lim is None:
                lim = limits_.get((acct, kind, None))
            now = lim is not None and value > lim
            if now and not over.get(key, False):
                out.append((str(e.event_id), kind, sym))
            over[key] = now
        for key in set(over) - set(metrics):
            over[key] = False
    return sorted(out, key=str)


@st.composite
def busy_books(draw: st.DrawFn, cancel: bool = True) -> Book:
    """In business order, one event a minute (recorded then), busts included."""
    b = Book()
    for a in _ACCTS:
        b.fund(a, 1000.0, at(-1 if a == "A" else -0.5))
    trade_ids: list[tuple[str, str]] = []
    for minute in range(draw(st.integers(3, MAX_MINUTES))):
        t = at(minute)
        kinds = ["trade"] * 5 + ["mark"] * 2 + ["limit", "fund"] + (["cancel"] if cancel else [])
        kind = draw(st.sampled_from(kinds))
        a, s = draw(st.sampled_from(_ACCTS)), draw(st.sampled_from(_SYMS))
        if kind == "trade":
            tid = f"T-{minute}"
            b.trade(a, s, draw(st.sampled_from(["Buy", "Sell"])),
                    draw(st.sampled_from([10.0, 50.0, 100.0, 5.0])),
                    draw(st.sampled_from([5.0, 10.0, 20.0])), t, trade_id=tid)  # fmt: skip
            trade_ids.append((a, tid))
        elif kind == "mark":
            b.mark(s, draw(st.sampled_from([5.0, 10.0, 20.0, 2.0])), t)
        elif kind == "fund":
            b.fund(a, draw(st.sampled_from([-300.0, 200.0])), t)
        elif kind == "cancel" and trade_ids:
            acct, tid = draw(st.sampled_from(trade_ids))
            b.cancel(acct, tid, t)
        else:
            lt, value = draw(st.sampled_from([
                ("MaxPositionSize", 50.0), ("MaxPositionSize", 100.0), ("MaxLeverage", 1.0),
                ("MaxLeverage", 2.0), ("MaxDrawdown", 0.1), ("MaxDrawdown", 0.3),
            ]))  # fmt: skip
            sym = s if lt == "MaxPositionSize" and draw(st.booleans()) else None
            b.limit(a, lt, value, t, symbol=sym)
    return b


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=busy_books(), data=st.data())
def test_engine_with_busts_equals_a_plain_fold_at_every_event(b: Book, data: Any) -> None:
    envs = _with_positions(b)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(envs) - 1)), max_size=3))
    assert _engine_starts(envs, cuts) == _live_reference(b)


def _reference_check(b: Book, acct: str, sym: str, side: str, qty: float, price: float,
                     when: datetime) -> set[tuple[str, str | None]]:  # fmt: skip
    """The limits a proposed trade would breach (after it over the limit, and higher
    than before it or newly over), by the plain fold of the history with and without it."""
    h = b.history()
    evs = reference_events(h)
    before = reference_fold(evs)
    trial = Book()
    trial.envelopes = list(b.envelopes)
    trial.trade(acct, sym, side, qty, price, when, trade_id="PROPOSED")
    after = reference_fold(reference_events(trial.history()))
    lims: dict[tuple[str, str, str | None], float] = {}
    for e in b.envelopes:
        if isinstance(e.payload, riskbook.LimitSet):
            p = e.payload
            lims[(p.account_id, p.limit_type, p.symbol)] = p.value

    def metrics(f: Any) -> dict[tuple[str, str | None], tuple[float, float]]:
        out: dict[tuple[str, str | None], tuple[float, float]] = {}
        for (a, s), pos in f.positions.items():
            if a == acct:
                out[("MaxPositionSize", s)] = (abs(pos.q), 0.0)
        fig = f.figures.get(acct)
        if fig is not None:
            out[("MaxLeverage", None)] = (fig["leverage"], fig["gross_exposure"])
            out[("MaxDrawdown", None)] = (fig["drawdown"], 0.0)
        return out

    m0, m1 = metrics(before), metrics(after)
    found = set()
    for (kind, s), (v, g) in m1.items():
        lim = lims.get((acct, kind, s)) if s is not None else None
        if lim is None:
            lim = lims.get((acct, kind, None))
        if lim is None or not v > lim:
            continue
        v0, g0 = m0.get((kind, s), (0.0, 0.0))
        was = v0 > lim
        further = g > g0 if (math.isinf(v) and math.isinf(v0)) else v > v0
        if not was or further:
            found.add((kind, s))
    return found


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(b=busy_books(cancel=False), data=st.data())
def test_check_equals_a_plain_fold(make_database: Any, b: Book, data: Any) -> None:
    store = riskbook.Store(make_database())
    try:
        store.import_envelopes(_with_positions(b))
        for _ in range(4):
            acct = data.draw(st.sampled_from(_ACCTS))
            sym = data.draw(st.sampled_from(_SYMS))
            side = data.draw(st.sampled_from(["Buy", "Sell"]))
            qty = data.draw(st.sampled_from([1.0, 10.0, 50.0, 100.0, 150.0]))
            price = data.draw(st.sampled_from([5.0, 10.0, 20.0]))
            when = at(500)
            got = riskbook.check(acct, sym, side, qty, price, store=store, at=when)
            want = _reference_check(b, acct, sym, side, qty, price, when)
            assert {(r.limit_type, r.symbol) for r in got.reasons} == want, (got, want)
    finally:
        store.close()


def test_timeline_column_subsets_equal_the_full_frames() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.trade("A", "X", "Buy", 10, 10, at(1))
    b.mark("X", 12, at(2))
    b.trade("B", "X", "Sell", 5, 11, at(2))
    b.adjust("A", "X", 10, 20, at(3))
    b.fund("B", -50, at(4))
    b.mark("X", 9, at(5))
    h = b.history()
    for fn, every in ((P.position_timeline, P.POSITION_TIMELINE_COLUMNS),
                      (P.account_timeline, P.ACCOUNT_TIMELINE_COLUMNS)):  # fmt: skip
        full = fn(h)
        for c in every:
            assert fn(h, columns=[c])[c].to_list() == full[c].to_list(), (fn.__name__, c)
        rev = list(reversed(every))
        assert fn(h, columns=rev).rows() == full.select(rev).rows()
        for t in (at(2), at(2.5), at(5)):
            assert fn(h, at=t).rows() == full.filter(pl.col("occurred_at") <= t).rows()


def test_trade_ids_shared_across_accounts_and_reused_busts() -> None:
    b = Book()
    b.fund("A", 1000, at(0))
    b.fund("B", 1000, at(0))
    b.limit("A", "MaxPositionSize", 15, at(0))
    b.limit("B", "MaxPositionSize", 15, at(0))
    b.trade("A", "X", "Buy", 10, 10, at(1), trade_id="T-1")
    b.trade("B", "X", "Buy", 20, 10, at(2), trade_id="T-1")  # B over 15
    b.trade("A", "X", "Buy", 10, 11, at(3), trade_id="T-1")  # A over 15 (the id again)
    b.mark("X", 12, at(4))
    b.cancel("B", "T-1", at(5))  # B's only: B back to 0
    b.cancel("C", "T-1", at(6))  # no such trade of C: nothing
    h = b.history()
    pos = {
        (str(r["account_id"]), str(r["symbol"])): r for r in P.positions(h).iter_rows(named=True)
    }
    assert pos[("A", "X")]["quantity"] == 20.0
    assert pos[("B", "X")]["quantity"] == 0.0 if ("B", "X") in pos else True
    assert acc_row(h, "B")["cash"] == 1000.0
    envs = _with_positions(b)
    engine = Engine(critical=None)
    for e in envs:
        engine.apply(History.from_envelopes([e]))
    want = P.ProjectionState.after(h)
    nz = pl.col("quantity") != 0
    assert engine.projection.positions.filter(nz).drop("last_event_at").sort(
        "account_id"
    ).rows() == (want.positions.filter(nz).drop("last_event_at").sort("account_id").rows())
    assert engine.projection.accounts.select("account_id", "cash").sort("account_id").rows() == (
        want.accounts.select("account_id", "cash").sort("account_id").rows()
    )
    assert _engine_starts(envs, []) == _live_reference(b)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=in_order_books(adjust=False, cancel=True), data=st.data())
def test_equity_is_funding_plus_realized_plus_unrealized(b: Book, data: Any) -> None:
    h = b.history()
    times = sorted({e.timestamp for e in b.envelopes})
    t = data.draw(st.sampled_from(times))
    k = data.draw(st.sampled_from([None, *times]))
    acc = P.accounts(h, at=t, known_at=k)
    pos = P.positions(h, at=t, known_at=k)
    fund = (
        h.funding.filter(
            (pl.col("funded_at") <= t) & (True if k is None else pl.col("timestamp") <= k)
        )
        .group_by(pl.col("account_id").cast(pl.String))
        .agg(pl.col("amount").sum())
    )
    funded = dict(fund.rows())
    for r in acc.iter_rows(named=True):
        a = str(r["account_id"])
        want = funded.get(a, 0.0) + r["realized_pnl"] + r["unrealized_pnl"]
        scale = abs(funded.get(a, 0.0)) + r["gross_exposure"] + abs(r["cash"]) + 1.0
        assert abs(r["equity"] - want) <= 1e-9 * scale, (r, want)
        mine = pos.filter(pl.col("account_id").cast(pl.String) == a)
        assert abs(r["net_exposure"] - mine["market_value"].sum()) <= 1e-9 * scale
        assert abs(r["gross_exposure"] - mine["market_value"].abs().sum()) <= 1e-9 * scale
        assert r["open_positions"] == mine.filter(pl.col("quantity") != 0).height


def test_account_positions_view_closes_a_position_of_binary_fractions(fresh_store: Any) -> None:
    # Found by this hunt (fixed in f025669): the account_positions view (migration 0005) says its net_quantity "is the
    # position riskbook.projections computes"; the projection settles 0.1 + 0.2 - 0.3 to
    # exactly 0 (a closed position, DESIGN.md §4: q reaches 0, a <- 0), the view's plain
    # float sum leaves 5.55e-17: an open position of dust for every SQL consumer
    # (WHERE net_quantity <> 0). Expected 0.0, actual 5.551115123125783e-17.
    b = Book()
    b.trade("A", "X", "Buy", 0.1, 10, at(1))
    b.trade("A", "X", "Buy", 0.2, 10, at(2))
    b.trade("A", "X", "Sell", 0.3, 10, at(3))
    fresh_store.import_envelopes(_with_positions(b))
    assert P.positions(b.history())["quantity"].to_list() == [0.0]
    P.refresh_account_positions(fresh_store)
    mv = P.account_positions(fresh_store)
    assert mv["net_quantity"].to_list() == [0.0]


# ============================================================================ the layout of the exposure sums


def _four_longs(future: bool, limit: float | None = None) -> Book:
    """Longs of 0.1, 0.1, 0.1 and 0.4 (price 1, no marks: valued at cost) in S1, S2, S4,
    S5: gross exposure 0.7 at at(4), equity 1; with ``future``, a trade in S3 at at(10)."""
    b = Book()
    b.fund("A", 1.0, at(0))
    if limit is not None:
        b.limit("A", "MaxLeverage", limit, at(0))
    for i, (s, q) in enumerate(zip(["S1", "S2", "S4", "S5"], [0.1, 0.1, 0.1, 0.4], strict=True)):
        b.trade("A", s, "Buy", q, 1.0, at(1 + i))
    if future:
        b.trade("A", "S3", "Buy", 1.0, 1.0, at(10))
    return b


def test_state_at_t_does_not_depend_on_a_later_trade_in_another_symbol() -> None:
    # Found by this hunt (DESIGN.md §4/§6: the state at T is the last timeline row at or
    # before T, from the events that happened by T): the gross exposure (and leverage) at
    # at(4) changed by its last bit when a trade in a new symbol S3 happened at at(10),
    # 0.7 without it and 0.7000000000000001 with it. The account's exposure sums are a
    # segment tree whose leaves are all the (account, symbol) pairs of the History, in
    # name order: S3, between S2 and S4, shifted the leaves and regrouped the sum
    # ((0.1+0.1)+(0.1+0.4) vs ((0.1+0.1)+(0+0.1))+0.4). The tree's nodes are now
    # double-doubles, rounded once at the root: the sum of the leaves rounded once
    # (math.fsum's), however they are laid out.
    exact = math.fsum([0.1, 0.1, 0.1, 0.4])  # 0.7000000000000001: 0.1 is above 1/10
    before = P.accounts(_four_longs(False).history()).row(0, named=True)
    assert (before["gross_exposure"], before["leverage"]) == (exact, exact)
    full = _four_longs(True).history()
    then = P.accounts(full, at=at(4)).row(0, named=True)
    assert (then["gross_exposure"], then["net_exposure"], then["leverage"]) == (exact,) * 3


def test_a_leverage_breach_at_the_limit_does_not_depend_on_a_later_trade() -> None:
    # Same cause: MaxLeverage 0.7 and leverage 0.1 + 0.1 + 0.1 + 0.4 at at(4). breaches()
    # of the history up to then found none (0.7), but breaches() of the whole history --
    # where a trade in S3 comes at at(10) -- started a breach at at(4) with peak
    # 0.7000000000000001. Now both say the same (a breach: the doubles sum to just above
    # 0.7, and DESIGN.md §5 says "strictly"), as does the live engine, however batched.
    early = _four_longs(False, limit=0.7).history()
    full = _four_longs(True, limit=0.7)
    got = [s[:3] for s in starts(full.history()) if s[2] <= at(4)]  # (its peak: later)
    assert got == [s[:3] for s in starts(early)] == [("MaxLeverage", None, at(4))]


def test_the_engine_does_not_depend_on_batching_at_the_limit() -> None:
    # Found by this hunt (fixed in f025669): same cause, live: the engine folds each batch with a book of the pairs seen so
    # far. Event by event, at at(4) it knows S1, S2, S4, S5 (leverage 0.7: no breach); in
    # one batch it knows S3 too (0.7000000000000001: a breach at at(4)). Engine's own
    # contract (riskbook/live/_engine.py): "Folding the same events in any number of
    # batches gives the same effects". Expected equal effects; actual [] vs one violation.
    envs = _with_positions(_four_longs(True, limit=0.7))
    one_by_one = _engine_starts(envs, list(range(1, len(envs))))
    at_once = _engine_starts(envs, [])
    assert one_by_one == at_once


def test_state_at_from_the_store_equals_accounts_at_t(fresh_store: Any) -> None:
    # Found by this hunt (fixed in f025669): same cause. riskbook.state_at (documented: "frames exactly like positions()
    # and accounts() of the whole history at T") reads only the events up to T, so its
    # sums have the leaves of S1, S2, S4, S5; accounts(load(store), at=T) has S3's leaf
    # too. Expected equal; actual gross 0.7 (state_at) vs 0.7000000000000001 (accounts).
    fresh_store.import_envelopes(_with_positions(_four_longs(True)))
    h = riskbook.load(fresh_store, progress=False)
    _, acc = P.state_at(fresh_store, at(4))
    want = P.accounts(h, at=at(4))
    cols = ["cash", "equity", "gross_exposure", "net_exposure", "leverage"]
    assert acc.select(cols).rows() == want.select(cols).rows()


def test_what_was_known_at_k_does_not_depend_on_what_was_recorded_later() -> None:
    # Found by this hunt (fixed in f025669): same cause, for known_at (DESIGN.md §6: "known_at=K uses only events recorded
    # by K"): accounts(h, known_at=K) differs from the accounts of the events recorded
    # by K when a pair first traded after K sits among the account's leaves.
    # Expected gross 0.7 / leverage 0.7 in both; actual 0.7000000000000001 with known_at.
    b = _four_longs(True)
    h = b.history()
    recorded = History.from_envelopes([e for e in _with_positions(b) if e.timestamp <= at(5)])
    cols = ["cash", "equity", "gross_exposure", "net_exposure", "leverage"]
    assert P.accounts(h, known_at=at(5)).select(cols).rows() == (
        P.accounts(recorded).select(cols).rows()
    )


def test_check_daily_volume_at_the_limit_and_on_a_new_day(fresh_store: Any) -> None:
    b = Book()
    b.limit("A", "MaxDailyVolume", 100, at(0))
    b.trade("A", "X", "Buy", 60, 10, at(1))
    b.trade("A", "X", "Sell", 30, 10, at(2))  # 90 today
    fresh_store.import_envelopes(_with_positions(b))
    assert riskbook.check("A", "X", "Sell", 10, 10, store=fresh_store, at=at(3)).accepted
    over = riskbook.check("A", "X", "Sell", 10.5, 10, store=fresh_store, at=at(3))
    assert [(r.limit_type, r.value) for r in over.reasons] == [("MaxDailyVolume", 100.5)]
    tomorrow = at(24 * 60)
    assert riskbook.check("A", "X", "Buy", 100, 10, store=fresh_store, at=tomorrow).accepted
    assert not riskbook.check("A", "X", "Buy", 101, 10, store=fresh_store, at=tomorrow).accepted


def test_a_reconciliation_of_a_tiny_position_that_disagrees_is_reported() -> None:
    # Found by this hunt: DESIGN.md §4: "A previous_quantity that differs from the
    # projected q is reported as a reconciliation mismatch, not silently accepted." The
    # books hold 5e-10 units (at 1e12 each: 500 of value); a PositionUpdated says the
    # previous quantity was 0 -- the whole position is in dispute -- and nothing was
    # reported: adjustment_mismatches compared with an absolute floor of 1e-9 units.
    # The tolerance is relative alone now.
    b = Book()
    b.fund("A", 1000, at(0))
    b.trade("A", "BTC-SAT", "Buy", 5e-10, 1e12, at(1))
    b.adjust("A", "BTC-SAT", 0.0, 1e-9, at(2))
    h = b.history()
    assert pos_row(h, "A", "BTC-SAT", at=at(1))["market_value"] == pytest.approx(500.0)
    mm = riskbook.adjustment_mismatches(h)
    assert mm.select("previous_quantity", "projected_quantity").rows() == [(0.0, 5e-10)]


def test_withdrawal_moves_the_peak_by_its_amount_as_designed() -> None:
    """DESIGN.md §4 as written (held): a withdrawal lowers the peak by its amount, so a
    drawdown of 200 on a peak of 1000 (0.2) becomes 200 on 500 (0.4) by the withdrawal
    alone -- see the report: the flow does change the relative drawdown."""
    b = Book()
    b.fund("A", 1000, at(0))
    b.limit("A", "MaxDrawdown", 0.3, at(0))
    b.trade("A", "X", "Buy", 100, 10, at(1))
    b.mark("X", 8, at(2))  # equity 800, peak 1000: 0.2
    w = b.fund("A", -500, at(3))  # equity 300, peak 500: 0.4
    h = b.history()
    assert P.account_timeline(h)["drawdown"].to_list() == [0.0, 0.0, 0.2, 0.4]
    assert [s[:3] for s in starts(h)] == [("MaxDrawdown", None, at(3))]
    assert [x[2] for x in engine_effects(h)] == [w]


def test_going_on_from_a_state_a_bust_of_an_earlier_trade_is_refused() -> None:
    # Found by this hunt: ProjectionState's documented pattern -- ``then.start =
    # ProjectionState.after(first)`` -- folds ``then`` from the state of ``first``. A
    # TradeCancelled in ``then`` of a trade in ``first`` was silently passed over (the
    # state keeps positions, not fills): positions and cash stayed as if the trade had
    # happened (DESIGN.md §4). It is now refused, naming the trade. (The live Engine does
    # not rely on this: it refolds the account itself.)
    first = Book()
    first.fund("A", 1000, at(0))
    first.trade("A", "X", "Buy", 100, 10, at(1), trade_id="T-1")
    then = Book()
    then.cancel("A", "T-1", at(2))
    then.fund("A", 1, at(3))
    h = then.history()
    h.start = P.ProjectionState.after(first.history())
    with pytest.raises(riskbook.RiskbookError, match="'T-1' of account 'A'"):
        P.ProjectionState.after(h)
    # a bust of a trade of its own still counts
    both = Book()
    both.trade("A", "X", "Buy", 5, 10, at(4), trade_id="T-2")
    both.cancel("A", "T-2", at(5))
    h2 = both.history()
    h2.start = P.ProjectionState.after(first.history())
    assert P.ProjectionState.after(h2).positions["quantity"].to_list() == [100.0]
