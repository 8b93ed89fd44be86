"""What the auditor found in the limits API (DESIGN.md §5, §6): breaches and limit
queries over a History that lost what they fold, and reconcile's account of a report
made inside a breach that a late trigger moved earlier."""

from __future__ import annotations

import uuid
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import riskbook
from riskbook import limits
from riskbook.events import (
    AccountFunded,
    Envelope,
    Event,
    LimitSet,
    LimitViolationDetected,
    PriceMarked,
    Side,
    TradeExecuted,
)
from riskbook.frames import Filters, History
from riskbook.projections import ProjectionState

T0 = datetime(2024, 3, 1, 14, 0, tzinfo=UTC)
DAY2 = T0 + timedelta(days=1)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def trade(trade_id: str, acct: str, sym: str, qty: float, t: datetime) -> TradeExecuted:
    return TradeExecuted(trade_id=trade_id, account_id=acct, symbol=sym, side=Side.Buy,
                         quantity=qty, price=50.0, executed_at=t)  # fmt: skip


def limit(acct: str, kind: str, value: float, t: datetime) -> LimitSet:
    return LimitSet(account_id=acct, limit_type=kind, value=value, set_by="cro", set_at=t)


def envelopes(
    *records: tuple[Event, datetime | None] | Event, causes: dict[int, int] | None = None
) -> list[Envelope]:
    """Envelopes in position order, each recorded at its own time unless given one;
    ``causes`` maps an index to the index of the event that caused it."""
    out: list[Envelope] = []
    sequences: dict[str, int] = {}
    for i, record in enumerate(records):
        event, recorded = record if isinstance(record, tuple) else (record, None)
        sequences[event.aggregate_id] = sequences.get(event.aggregate_id, 0) + 1
        cause = (causes or {}).get(i)
        out.append(
            Envelope(
                event_id=uuid.uuid4(), aggregate_id=event.aggregate_id,
                aggregate_type=event.aggregate_type, sequence=sequences[event.aggregate_id],
                timestamp=recorded or event.business_time, payload=event,
                correlation_id="audit",
                causation_id=None if cause is None else out[cause].event_id,
            )
        )  # fmt: skip
    return out


def two_days() -> list[Envelope]:
    """A's limits on day 1, a fill in ACME and one in BETA; day 2, a fat finger in ACME
    (200 > 150) that the export --since day 2 lost."""
    return envelopes(
        AccountFunded(account_id="A", amount=10_000.0, funded_at=T0),
        limit("A", "MaxPositionSize", 150.0, T0),
        limit("A", "MaxLeverage", 2.0, T0),
        trade("T-1", "A", "ACME", 100.0, at(1)),
        trade("T-2", "A", "BETA", 100.0, at(2)),
        trade("T-3", "A", "ACME", 100.0, DAY2 + timedelta(minutes=1)),
        PriceMarked(symbol="ACME", price=50.0, marked_at=DAY2 + timedelta(minutes=2)),
    )


WHAT_IF = [{"account_id": "*", "limit_type": "MaxPositionSize", "value": 120.0}]


def test_breaches_and_limit_queries_refuse_a_history_loaded_since() -> None:
    # The copy exported with --since day 2 reported no fat-finger breach and no limits,
    # with no word: the LimitSets and the positions of day 1 were missing.
    records = two_days()
    since = History.from_envelopes(records, filters=Filters(since=DAY2))
    calls: dict[str, Any] = {
        "breaches": lambda h: limits.breaches(h),
        "backtest": lambda h: limits.backtest(h, WHAT_IF),
        "reconcile": lambda h: limits.reconcile(h),
    }
    for name, call in calls.items():
        with pytest.raises(riskbook.RiskbookError, match=f"^{name} needs every earlier event"):
            call(since)
    for name in ("effective_limits", "limit_history"):
        with pytest.raises(
            riskbook.RiskbookError,
            match=f"^{name} needs every earlier LimitSet: .*since=2024-03-02T14:00:00",
        ):
            getattr(limits, name)(since)
    # until, known_at and accounts keep everything the breaches need
    whole = History.from_envelopes(records)
    cut = DAY2 + timedelta(minutes=1)
    for filters in (Filters(until=cut), Filters(known_at=cut), Filters(accounts=("A",))):
        kept = History.from_envelopes(records, filters=filters)
        assert_frame_equal(limits.breaches(kept, at=cut), limits.breaches(whole, at=cut))
        assert_frame_equal(limits.effective_limits(kept), limits.effective_limits(whole))
        limits.reconcile(kept)
        limits.limit_history(kept)


def test_a_batch_going_on_from_a_state_is_not_refused() -> None:
    # the live engine's batches: since-filtered, their earlier state in history.start
    records = two_days()
    whole = History.from_envelopes(records)
    first = History.from_envelopes(records, filters=Filters(until=DAY2))
    batch = History.from_envelopes(records, filters=Filters(since=DAY2))
    batch.start = ProjectionState.after(first)
    limits.breaches(batch, limits=WHAT_IF, levels=1.0)
    limits.effective_limits(batch)
    since = History.from_envelopes(records, filters=Filters(since=DAY2))
    with pytest.raises(riskbook.RiskbookError, match=r"^breaches needs every earlier event"):
        limits.breaches(since, limits=WHAT_IF, levels=1.0)  # named, not position_timeline
    assert limits.breaches(whole, limits=WHAT_IF, levels=1.0).height == 1


def _trades_per_day(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """A team's own account_day metric, read straight from the trades frame."""
    trades = (
        history.trades
        if known_at is None
        else history.trades.filter(pl.col("timestamp") <= known_at)
    )
    return trades.sort("executed_at", "timestamp", "position").select(
        "account_id",
        time="executed_at",
        timestamp="timestamp",
        position="position",
        value=pl.int_range(1, pl.len() + 1)
        .over("account_id", pl.col("executed_at").dt.date())
        .cast(pl.Float64),
    )


TRADES_PER_DAY = limits.LimitSpec("AuditTradesPerDay", "account_day", "trades", _trades_per_day)


def test_limits_per_account_refuse_a_history_loaded_with_symbols() -> None:
    limits.register(TRADES_PER_DAY, replace=True)
    records = [*two_days(), *envelopes(limit("A", "AuditTradesPerDay", 1.0, T0))]
    whole = History.from_envelopes(records)
    acme = History.from_envelopes(records, filters=Filters(symbols=("ACME",)))
    # the team's type counted ACME's trades only, and said no breach
    assert limits.breaches(whole, types="AuditTradesPerDay", levels=1.0).height == 1
    with pytest.raises(
        riskbook.RiskbookError,
        match=r"^breaches evaluates limits per account \(AuditTradesPerDay, MaxLeverage\), "
        r"which need every symbol of an account: this History was loaded with "
        r"symbols=\['ACME'\]; load it without symbols \(or pass "
        r"types=\['MaxPositionSize'\], its limit types per symbol\)",
    ):
        limits.breaches(acme)
    for kind in ("AuditTradesPerDay", "MaxLeverage"):
        with pytest.raises(riskbook.RiskbookError, match=f"per account \\({kind}\\)"):
            limits.breaches(acme, types=[kind])
    with pytest.raises(riskbook.RiskbookError, match="per account"):
        limits.backtest(acme, [{"account_id": "*", "limit_type": "MaxLeverage", "value": 1.0}])
    with pytest.raises(riskbook.RiskbookError, match=r"^reconcile evaluates limits per account"):
        limits.reconcile(acme)
    # a limit type per symbol sees all it needs: the same breaches as the whole History
    mine = limits.breaches(acme, types=["MaxPositionSize"])
    assert mine.height == 3
    assert_frame_equal(mine, limits.breaches(whole, types=["MaxPositionSize"]))
    assert limits.backtest(acme, WHAT_IF, levels=1.0).height == 2
    assert_frame_equal(
        limits.effective_limits(acme), limits.effective_limits(whole)
    )  # account-wide LimitSets are kept by a symbols filter


def late_trigger() -> list[Envelope]:
    """A 14:10 fill takes A's ACME over 100 and is reported at once; a 14:05 fill
    booked an hour later makes the recomputed breach start at 14:05."""
    return envelopes(
        limit("A", "MaxPositionSize", 100.0, T0),
        trade("T-2", "A", "ACME", 150.0, at(10)),
        (
            LimitViolationDetected(
                account_id="A",
                limit_type="MaxPositionSize",
                symbol="ACME",
                current_value=150.0,
                limit_value=100.0,
                detected_at=at(10) + timedelta(seconds=1),
            ),
            None,
        ),
        (trade("T-1", "A", "ACME", 120.0, at(5)), at(60)),
        causes={2: 1},
    )


def test_reconcile_matches_a_report_made_inside_a_breach_a_late_trigger_moved() -> None:
    # It said no_breach, "the metric was within the limit", for a report made at 270
    # over 100, and not_reported for the breach.
    h = History.from_envelopes(late_trigger())
    rec = limits.reconcile(h)
    (row,) = rec.rows(named=True)
    assert (row["status"], row["started_at"], row["detected_at"]) == (
        "matched", at(5), at(10) + timedelta(seconds=1)
    )  # fmt: skip
    assert row["reason"] == (
        "the recomputed breach began 0:05:01 before the report (a late trigger, recorded "
        "0:55:00 after it happened): the report was made inside it"
    )
    # as known before the late fill, the report matches by its cause
    before = limits.reconcile(h, known_at=at(30))
    assert before.select("status", "started_at", "reason").rows() == [
        ("matched", at(10), "the report's cause is the breach's trigger")
    ]


def test_a_second_report_inside_a_matched_breach_says_so() -> None:
    second = envelopes(
        LimitViolationDetected(account_id="A", limit_type="MaxPositionSize", symbol="ACME",
                               current_value=270.0, limit_value=100.0, detected_at=at(70)),
    )  # fmt: skip
    rec = limits.reconcile(History.from_envelopes([*late_trigger(), *second]))
    assert rec.select("status", "started_at", "detected_at").rows() == [
        ("matched", at(5), at(10) + timedelta(seconds=1)),
        ("no_breach", None, at(70)),
    ]
    reason = rec["reason"][1]
    assert reason.startswith(
        "a second report of the recomputed breach that began 2024-03-01T14:05:00"
    )
    assert str(rec["violation_event_id"][0]) in reason
    assert "within the limit" not in reason


def test_a_second_report_names_its_breach_s_first_report_when_the_rows_differ() -> None:
    # The breach's row (B's, the second breach) and its first report's row (the first
    # report) differ: the first report was looked up by the breach's row (KeyError).
    def report(acct: str, t: datetime) -> LimitViolationDetected:
        return LimitViolationDetected(account_id=acct, limit_type="MaxPositionSize",
                                      symbol="ACME", current_value=150.0, limit_value=100.0,
                                      detected_at=t)  # fmt: skip

    records = envelopes(
        limit("A", "MaxPositionSize", 100.0, T0),
        limit("B", "MaxPositionSize", 100.0, T0),
        trade("T-A", "A", "ACME", 150.0, at(1)),  # breach 0: never reported
        trade("T-B", "B", "ACME", 150.0, at(2)),  # breach 1
        report("B", at(2) + timedelta(seconds=1)),  # report 0, of breach 1
        report("B", at(3)),  # report 1: the same breach again (a second processor)
        causes={4: 3, 5: 3},
    )
    rec = limits.reconcile(History.from_envelopes(records))
    assert rec.select("status", "account_id").rows() == [
        ("not_reported", "A"), ("matched", "B"), ("no_breach", "B"),
    ]  # fmt: skip
    second = rec.row(2, named=True)
    assert second["violation_event_id"] == str(records[5].event_id)
    assert second["reason"].startswith(
        "a second report of the recomputed breach that began 2024-03-01T14:02:00"
    )
    assert f"matched to report {records[4].event_id}:" in second["reason"]


def test_reconcile_gives_the_metric_of_a_report_it_cannot_match() -> None:
    # "the metric was within the limit" was said without looking at the metric
    records = envelopes(
        limit("A", "MaxPositionSize", 100.0, T0),
        trade("T-1", "A", "ACME", 60.0, at(1)),
        LimitViolationDetected(account_id="A", limit_type="MaxPositionSize", symbol="ACME",
                               current_value=160.0, limit_value=100.0, detected_at=at(2)),
    )  # fmt: skip
    rec = limits.reconcile(History.from_envelopes(records))
    assert rec.select("status", "reason").rows() == [
        (
            "no_breach",
            "no breach recomputed near the report: the metric was 60 then, within the "
            "limit 100 (the engine reported 160)",
        )
    ]


def test_reconcile_of_an_account_wide_report_warns_nothing() -> None:
    # polars warned "Comparisons with None" for the report's null symbol
    h = History.from_events(
        limit("A", "MaxLeverage", 3.0, T0),
        AccountFunded(account_id="A", amount=1000.0, funded_at=at(1)),
        trade("T-1", "A", "ACME", 40.0, at(2)),
        LimitViolationDetected(account_id="A", limit_type="MaxLeverage", current_value=4.0,
                               limit_value=3.0, detected_at=at(3)),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = limits.reconcile(h)
    assert rec.select("status", "reason").rows() == [
        (
            "no_breach",
            "no breach recomputed near the report: the metric was 2 then, within the "
            "limit 3 (the engine reported 4)",
        )
    ]
