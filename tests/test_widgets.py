"""Widget panels without a browser: set a control, read the panel's frames and charts."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import altair as alt
import polars as pl
import pytest
import traitlets
from polars.testing import assert_frame_equal

import riskbook
from riskbook import limits, viz, widgets
from riskbook.demo import SAMPLE

KEY = json.loads(SAMPLE.with_name("sample.key.json").read_text())
FAT_FINGER = next(i for i in KEY["incidents"] if i["kind"] == "fat_finger")
BUSTED = next(i for i in KEY["incidents"] if i["kind"] == "busted_trade")
T = datetime(2024, 1, 9, 16, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def sample(make_database: Callable[[], str]) -> Iterator[riskbook.History]:
    store = riskbook.Store(make_database())
    store.import_jsonl(SAMPLE)
    yield riskbook.load(store, cache=False, progress=False)
    store.close()


def rows(chart: alt.JupyterChart) -> list[dict[str, Any]]:
    return [r for rs in chart.chart.to_dict()["datasets"].values() for r in rs]


def ms(t: datetime) -> float:
    return t.timestamp() * 1000


# ----------------------------------------------------------------------------- controls


def test_time_slider_is_exact_when_set_and_stepped_when_dragged() -> None:
    start = datetime(2024, 1, 9, 16, 0, tzinfo=UTC)
    s = widgets.TimeSlider(start, start + timedelta(hours=1), step=timedelta(minutes=1))
    assert s.value == start + timedelta(hours=1) and s.at_end
    exact = start + timedelta(minutes=18, seconds=4, microseconds=492306)
    s.value = exact
    assert s.value == exact and s.slider.value == 18 and "16:18:04.492" in s.label.value
    s.slider.value = 30  # a drag
    assert s.value == start + timedelta(minutes=30) and not s.at_end
    s.value = start - timedelta(days=1)
    assert s.value == start
    with pytest.raises(traitlets.TraitError):
        s.value = "16:30"
    with pytest.raises(ValueError, match="time zone"):
        widgets.TimeSlider(datetime(2024, 1, 1), datetime(2024, 1, 2))


def test_html_table_formats_numbers_and_highlights() -> None:
    frame = pl.DataFrame({"figure": ["a", "b"], "value": [1234.5, -2.0], "bad": [False, True]})
    text = widgets.html_table(frame, highlight="bad")
    assert "1,234.50" in text and "color:#c0392b" in text and "fdecea" in text
    assert "<th>bad</th>" not in text


# ----------------------------------------------------------------------------- explorer


def test_exposure_explorer_follows_its_controls(sample: riskbook.History) -> None:
    panel = widgets.ExposureExplorer(sample, measure="gross_exposure")
    assert panel.accounts_at.height == 12
    first_bars = rows(panel.snapshot)

    panel.at.value = T
    assert panel.accounts_at.equals(riskbook.accounts(sample, at=T))
    assert panel.overview.params.at == pytest.approx(ms(T))  # the rule moved in place
    assert rows(panel.snapshot) != first_bars
    assert f"At {T:%Y-%m-%d %H:%M:%S}" in panel.caption.value

    # the browser re-embeds a replaced chart and reports the spec's old value back
    panel.overview._params = {"at": 0.0}
    assert panel.overview.params.at == pytest.approx(ms(T))

    panel.measure.value = "leverage"
    assert any("leverage" in r for r in rows(panel.overview))

    panel.account.value = "ACC-001"
    held = dict(panel.positions_at.select(pl.col("symbol").cast(pl.String), "quantity").iter_rows())
    assert held["ACME"] == FAT_FINGER["value_at_trigger"]  # 4,420 ACME at 16:30
    assert set(panel.positions_at["account_id"].cast(pl.String)) == {"ACC-001"}
    assert {r["account_id"] for r in rows(panel.overview) if "account_id" in r} == {"ACC-001"}
    assert panel.equity is not None and panel.leverage is not None and panel.positions is not None
    assert len(panel.details.children) == 4
    assert "ACME" in panel.table.value

    later = T + timedelta(hours=1)
    panel.at.value = later
    assert panel.positions.params.at == pytest.approx(ms(later))
    assert panel.equity.params.at == pytest.approx(ms(later))

    everything = panel.timeline.height
    panel.known_at.value = T
    assert panel.k == T and panel.timeline.height < everything
    assert panel.timeline["timestamp"].max() <= T

    panel.account.value = "all accounts"
    assert panel.picked is None and panel.details.children == () and panel.equity is None


def test_exposure_explorer_at_a_time_outside_the_history_keeps_it(
    sample: riskbook.History,
) -> None:
    # it moved a T before the first event to that event: the state after it, as at T
    first = sample.events["occurred_at"].min()
    assert isinstance(first, datetime)
    before = first - timedelta(days=1)
    panel = widgets.ExposureExplorer(sample, at=before)
    assert panel.at.value == before
    assert panel.accounts_at.equals(riskbook.accounts(sample, at=before))
    assert panel.accounts_at.height == 0
    after = sample.events["occurred_at"].max() + timedelta(days=3)  # type: ignore[operator]
    assert widgets.ExposureExplorer(sample, at=after).at.value == after


def test_exposure_explorer_draws_a_held_position_to_the_last_figure() -> None:
    """A position held after its last trade: the line runs on to the history's last
    figure (a mark here), not to the last trade of any account."""
    t0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)
    h = riskbook.History.from_events(
        riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=t0),
        riskbook.TradeExecuted(trade_id="T1", account_id="A", symbol="ACME",
                               side=riskbook.Side.Buy, quantity=100.0, price=5.0,
                               executed_at=t0 + timedelta(minutes=1)),
        riskbook.PriceMarked(symbol="ACME", price=6.0, marked_at=t0 + timedelta(hours=3)),
    )  # fmt: skip
    panel = widgets.ExposureExplorer(h)
    panel.account.value = "A"
    assert panel.positions is not None
    acme = [r for r in rows(panel.positions) if r.get("symbol") == "ACME" and "quantity" in r]
    assert max(r["t"] for r in acme) == pytest.approx(ms(t0 + timedelta(hours=3)))
    assert acme[-1]["quantity"] == 100.0


# ----------------------------------------------------------------------------- incidents


def test_incidents_lists_violations_and_blocks_with_their_limit(sample: riskbook.History) -> None:
    found = widgets.incidents(sample)
    assert found.height == 7  # five violations; the fat finger and the spiral blocked
    blocks = found.filter(pl.col("event_type") == "AccountBlocked")
    assert blocks["limit_type"].to_list() == ["MaxPositionSize", "MaxDrawdown"]
    block = blocks.row(0, named=True)
    assert block["event_id"] == FAT_FINGER["block_event_id"]
    assert (block["limit_type"], block["symbol"]) == ("MaxPositionSize", "ACME")
    assert "BLOCKED" in block["label"]


def test_limit_in_force_symbol_override_and_known_at(sample: riskbook.History) -> None:
    at = datetime.fromisoformat(FAT_FINGER["started_at"])
    got = widgets.limit_in_force(
        sample.limits, account="ACC-001", limit_type="MaxPositionSize", symbol="ACME", at=at
    )
    assert got is not None
    assert (got["value"], got["set_by"], got["scope"]) == (
        3400.0,
        FAT_FINGER["limit_set_by"],
        "symbol",
    )
    assert got["event_id"] == FAT_FINGER["limit_event_id"]
    other = widgets.limit_in_force(
        sample.limits, account="ACC-001", limit_type="MaxPositionSize", symbol="BOLT", at=at
    )
    assert other is not None and other["scope"] == "account" and other["symbol"] is None
    before = sample.limits["timestamp"].min() - timedelta(seconds=1)  # type: ignore[operator]
    assert (
        widgets.limit_in_force(
            sample.limits, account="ACC-001", limit_type="MaxPositionSize", at=at, known_at=before
        )
        is None
    )


def test_causation_chain_of_the_block(sample: riskbook.History) -> None:
    chain = widgets.causation_chain(sample, FAT_FINGER["block_event_id"])
    rel = dict(zip(chain["event_id"], chain["relation"], strict=True))
    assert rel[FAT_FINGER["trigger_event_id"]] == "cause"
    assert rel[FAT_FINGER["block_event_id"]] == "this"
    assert rel[FAT_FINGER["unblock_event_id"]] == "effect"
    assert rel[FAT_FINGER["violation_event_id"]] == "same cause"
    with pytest.raises(KeyError):
        widgets.causation_chain(sample, "no-such-event")
    # a UUID, or its text in capitals, names the same event (a polars TypeError before)
    block = uuid.UUID(FAT_FINGER["block_event_id"])
    assert widgets.causation_chain(sample, block).equals(chain)
    assert widgets.causation_chain(sample, str(block).upper()).equals(chain)
    with pytest.raises(TypeError, match="event_id must be a UUID"):
        widgets.causation_chain(sample, 7)  # type: ignore[arg-type]


def test_incident_panel_engine_view_limit_and_steps(sample: riskbook.History) -> None:
    panel = widgets.IncidentPanel(sample)
    assert panel.current["event_id"] == FAT_FINGER["block_event_id"]  # a block first
    assert panel.limit is not None and panel.limit["value"] == FAT_FINGER["limit_value"]
    assert panel.limit["set_by"] == FAT_FINGER["limit_set_by"]
    engine, corrected = widgets.incident_metric(panel.compare, "MaxPositionSize", "ACME")
    assert engine == corrected == FAT_FINGER["value_at_trigger"]
    assert panel.step_event["event_id"] == FAT_FINGER["block_event_id"]
    assert "over the limit" in panel.limit_box.value and "s.okafor" in panel.limit_box.value
    assert panel.timeline is not None and panel.timeline.params.at == pytest.approx(
        ms(panel.at.value)
    )

    ids = panel.window["event_id"].to_list()
    fill = ids.index(FAT_FINGER["trigger_event_id"])
    panel.step.value = fill - 1  # the event before the fat finger
    before, _ = widgets.incident_metric(panel.compare, "MaxPositionSize", "ACME")
    assert before is not None and before < FAT_FINGER["limit_value"]
    assert panel.known_at.value == panel.step_event["timestamp"]
    assert panel.at.value == panel.step_event["occurred_at"]
    assert panel.timeline.params.at == pytest.approx(ms(panel.at.value))
    panel.next.click()
    assert panel.step.value == fill
    after, _ = widgets.incident_metric(panel.compare, "MaxPositionSize", "ACME")
    assert after == FAT_FINGER["value_at_trigger"]

    # K moved on its own to before the trade was recorded: the engine did not know it
    recorded = datetime.fromisoformat(FAT_FINGER["trigger_recorded_at"])
    panel.known_at.value = recorded - timedelta(microseconds=1)
    unknown, known_now = widgets.incident_metric(panel.compare, "MaxPositionSize", "ACME")
    assert unknown == before and known_now == FAT_FINGER["value_at_trigger"]


def test_incident_panel_shows_the_bust_the_engine_did_not_know(sample: riskbook.History) -> None:
    panel = widgets.IncidentPanel(sample)
    panel.incident.value = BUSTED["violation_event_id"]
    assert panel.current["account_id"] == "ACC-005"
    engine, corrected = widgets.incident_metric(panel.compare, "MaxPositionSize", "ACME")
    assert engine == BUSTED["value_at_trigger"]
    assert corrected is not None and corrected < BUSTED["limit_value"]
    assert panel.limit is not None and panel.limit["scope"] == "account"  # account-wide limit
    assert "fdecea" in panel.compare_box.value  # the corrected rows are shaded
    assert panel.story.findings == [] and "agrees" in panel.findings_box.value
    assert "1 trade of the account busted since" in panel.findings_box.value  # a note
    panel.incident.value = FAT_FINGER["block_event_id"]
    assert panel.story.findings == [] and panel.story.notes == []
    assert "agrees" in panel.findings_box.value


# ----------------------------------------------------------------------------- limit lab


def gross_notional(history: riskbook.History, *, known_at: Any = None) -> pl.DataFrame:
    """A limit type a team might try: the account's gross exposure, in USD."""
    return riskbook.account_timeline(history, known_at=known_at).select(
        "account_id",
        "timestamp",
        "position",
        "event_id",
        time="occurred_at",
        value="gross_exposure",
    )


GROSS = limits.LimitSpec("MaxGrossNotionalLab", "account", "USD", gross_notional)


def hypothetical(history: riskbook.History, value: float) -> pl.DataFrame:
    what_if = [{"account_id": "*", "limit_type": GROSS.name, "value": value}]
    found = limits.backtest(history, what_if, levels=1.0)
    return found.filter(pl.col("scenario") == "hypothetical").drop("scenario")


def inside(narrow: pl.DataFrame, wide: pl.DataFrame, end: datetime) -> bool:
    """Every interval of ``narrow`` lies within an interval of ``wide`` of its account."""
    spans: dict[str, list[tuple[datetime, datetime]]] = {}
    for r in wide.iter_rows(named=True):
        spans.setdefault(r["account_id"], []).append((r["started_at"], r["ended_at"] or end))
    return all(
        any(
            a <= r["started_at"] and (r["ended_at"] or end) <= b
            for a, b in spans.get(r["account_id"], [])
        )
        for r in narrow.iter_rows(named=True)
    )


def test_limit_lab_backtests_at_every_slider_step(sample: riskbook.History) -> None:
    limits.register(GROSS, replace=True)
    lab = widgets.LimitLab(sample, GROSS.name, value=3e6, low=0.0, high=8e6, step=250_000.0)
    end = lab.horizon
    assert_frame_equal(lab.breaches, hypothetical(sample, 3e6))  # the backtest, metric cached
    assert lab.breaches.height > 0 and lab.existing.height == 4  # beside the stored limits'
    assert lab.summary["account_id"].to_list() == [f"ACC-{i:03d}" for i in range(1, 13)]
    assert lab.summary["existing_breaches"].sum() == 4
    assert "3,000,000" in lab.caption.value and lab.value.readout_format == ",.0f"
    before = lab.breaches
    hours = dict(lab.summary.select("account_id", "hours_in_breach").iter_rows())
    chart_rows, table = rows(lab.timeline), lab.table.value

    lab.value.value = 2e6  # tighter
    assert_frame_equal(lab.breaches, hypothetical(sample, 2e6))
    assert rows(lab.timeline) != chart_rows and lab.table.value != table
    assert lab.metric_view.params.limit == 2e6
    assert lab.sweep_view is not None and lab.sweep_view.params.value == 2e6
    # a lower limit: every breach at 3M lies inside one at 2M; no account has less time in
    # breach, none leaves the list (the count itself can fall when breaches merge)
    assert inside(before, lab.breaches, end)
    after = dict(lab.summary.select("account_id", "hours_in_breach").iter_rows())
    assert all(after[a] >= hours[a] - 1e-9 for a in hours) and sum(after.values()) > sum(
        hours.values()
    )
    lanes = {r["lane"] for r in rows(lab.timeline) if "lane" in r}
    new = {
        r["account_id"]
        for r in lab.breaches.select(pl.col("account_id").cast(pl.String)).to_dicts()
    }
    assert {f"{a} · {GROSS.name}" for a in new} <= lanes
    assert {"ACC-001 · MaxPositionSize", "ACC-003 · MaxLeverage"} <= lanes  # the stored ones
    assert f"<b>{lab.breaches.height:,} breach" in lab.caption.value
    assert lab.step_ms > 0

    lab.value.value = lab.value.max  # over the metric's highest value: nothing left
    assert lab.breaches.height == 0 and lab.summary["breaches"].sum() == 0
    assert not [r for r in rows(lab.timeline) if r.get("lane", "").endswith(GROSS.name)]

    # the sweep: one backtest per slider step, time in breach never falls as it tightens
    assert lab.sweep is not None and lab.sweep.height == 33
    loosest_first = lab.sweep.sort("value", descending=True)
    assert (loosest_first["hours_in_breach"].diff().drop_nulls() >= -1e-9).all()
    assert (loosest_first["accounts"].diff().drop_nulls() >= 0).all()
    at_2m = lab.sweep.filter(pl.col("value") == 2e6).row(0, named=True)
    assert at_2m["breaches"] == hypothetical(sample, 2e6).height
    assert at_2m["hours_in_breach"] == pytest.approx(sum(after.values()))

    # the browser re-embeds a chart and reports its spec's value back: the panel's wins
    lab.metric_view._params = {"limit": 0.0}
    assert lab.metric_view.params.limit == lab.value.max


def test_breach_summary_and_limit_sweep(sample: riskbook.History) -> None:
    limits.register(GROSS, replace=True)
    sweep = widgets.limit_sweep(
        sample, GROSS.name, [4e6, 1e6, 2e6], accounts=["ACC-002", "ACC-003"]
    )
    assert sweep["value"].to_list() == [1e6, 2e6, 4e6]
    found = limits.backtest(
        sample,
        [{"account_id": a, "limit_type": GROSS.name, "value": 2e6} for a in ("ACC-002", "ACC-003")],
        levels=1.0,
    ).filter(pl.col("scenario") == "hypothetical")
    end = sample.events["occurred_at"].max()
    assert isinstance(end, datetime)
    per = widgets.breach_summary(found, horizon=end, accounts=["ACC-001", "ACC-002", "ACC-003"])
    assert per["account_id"].to_list() == ["ACC-001", "ACC-002", "ACC-003"]
    assert (
        per.row(0, named=True)["breaches"] == 0 and per.row(0, named=True)["hours_in_breach"] == 0
    )
    row = sweep.filter(pl.col("value") == 2e6).row(0, named=True)
    assert row["breaches"] == found.height == per["breaches"].sum()
    assert row["hours_in_breach"] == pytest.approx(per["hours_in_breach"].sum())
    assert row["accounts"] == per.filter(pl.col("breaches") > 0).height


# ----------------------------------------------------------------------------- live


def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.01)


def test_live_monitor_shows_a_block_as_it_arrives_and_its_forms_act(
    fresh_store: riskbook.Store,
) -> None:
    s = fresh_store
    now = datetime.now(UTC)
    s.append(
        "ACC-1",
        [
            riskbook.AccountFunded(account_id="ACC-1", amount=1e6, funded_at=now),
            riskbook.LimitSet(
                account_id="ACC-1",
                limit_type="MaxPositionSize",
                value=100.0,
                set_by="cro",
                set_at=now,
            ),
        ],
    )
    seen: list[riskbook.live.Commit] = []
    p = riskbook.Processor(s, on_commit=seen.append).start()
    monitor = widgets.LiveMonitor(p, s, interval=0.05)
    try:
        _until(lambda: p.engine.horizon > s.head(), "the processor to take the setup in")
        monitor.refresh()
        assert monitor.counters["violations"] == 0 and "no violation yet" in monitor.table.value
        assert monitor.counters["events_processed"] == 2
        before = (monitor.table.value, monitor.counter_view.value, rows(monitor.chart))

        fill = riskbook.TradeExecuted(trade_id="T-1", account_id="ACC-1", symbol="ACME",
                                      side=riskbook.Side.Buy, quantity=130.0, price=10.0,
                                      executed_at=datetime.now(UTC))  # fmt: skip
        [trade] = s.append("ACC-1", [fill])  # 130 >= 1.2 x 100: critical
        # the refresher thread shows it, without a call to refresh
        _until(lambda: monitor.counters.get("blocks") == 1, "the panel to show the block")
        _until(lambda: p.engine.horizon > s.head(), "the processor to take its effects in")
        monitor.refresh()
        c = monitor.counters
        assert (c["violations"], c["blocks"], c["blocked_accounts"]) == (1, 1, ["ACC-1"])
        assert c["events_processed"] == 5  # the fill, then the violation and block it caused
        assert c["batches"] == len(seen) >= 3  # the processor's own on_commit still called
        assert monitor.effects["kind"].to_list() == ["AccountBlocked", "LimitViolationDetected"]
        assert monitor.effects["causation_id"].to_list() == [str(trade.event_id)] * 2
        assert monitor.effects["shown_at"].null_count() == 0
        assert (monitor.effects["shown_at"] >= monitor.effects["committed_at"]).all()
        after = (monitor.table.value, monitor.counter_view.value, rows(monitor.chart))
        assert all(b != a for b, a in zip(before, after, strict=True))
        assert "BLOCK" in monitor.table.value and "130" in monitor.table.value
        lanes = [r["lane"] for r in rows(monitor.chart) if "lane" in r]
        assert sorted(lanes) == ["block", "violation"]
        assert sum(r["events"] for r in rows(monitor.chart) if "batches" in r) == 3 + 2

        # the check form: the blocked account is refused, with the reason
        monitor.account.value, monitor.symbol.value = "ACC-1", "ACME"
        monitor.side.value, monitor.quantity.value, monitor.price.value = "Buy", 5.0, 10.0
        monitor.check_button.click()
        result = monitor.last_check
        assert result is not None and not result.accepted
        assert [(r.kind, r.excess) for r in result.reasons] == [("blocked", None), ("limit", 35.0)]
        assert "REJECT" in monitor.check_result.value and "is blocked" in monitor.check_result.value
        monitor.quantity.value = -5.0
        monitor.check_button.click()
        assert monitor.last_check is result and "cannot check" in monitor.check_result.value

        # the unblock form: who and why are required; then the processor takes it in
        assert monitor.blocked_account.options == ("ACC-1",)
        monitor.by.value, monitor.reason.value = "j.doe", " "
        monitor.unblock_button.click()
        assert monitor.last_unblock is None and "needs a reason" in monitor.unblock_result.value
        monitor.reason.value = "position being unwound"
        monitor.unblock_button.click()
        assert monitor.last_unblock is not None
        assert isinstance(monitor.last_unblock.payload, riskbook.AccountUnblocked)
        assert monitor.last_unblock.payload.unblocked_by == "j.doe"
        _until(lambda: not p.engine.blocked["ACC-1"], "the processor to take the unblock in")
        monitor.refresh()
        assert monitor.counters["blocked_accounts"] == [] and monitor.blocked_account.options == ()
        monitor.side.value, monitor.quantity.value = "Sell", 10.0
        monitor.check_button.click()
        assert monitor.last_check is not None and monitor.last_check.accepted
        assert "ACCEPT" in monitor.check_result.value
        assert monitor.error is None and p.error is None
    finally:
        monitor.close()
        p.stop()
    assert p.on_commit == seen.append  # unhooked: the processor's own callback is back
    assert monitor._thread is not None and not monitor._thread.is_alive()


def test_limit_lab_backtests_the_value_asked_for(sample: riskbook.History) -> None:
    # the slider's range (up to the largest metric) widens instead of clamping the value
    lab = widgets.LimitLab(sample, "MaxLeverage", value=50.0)
    assert lab.value.value == 50.0 and lab.value.max >= 50.0


def test_exposure_explorer_says_what_its_history_knew(make_database: Callable[[], str]) -> None:
    store = riskbook.Store(make_database())
    try:
        store.import_jsonl(SAMPLE)
        k = datetime(2024, 1, 9, 16, 20, tzinfo=UTC)
        panel = widgets.ExposureExplorer(riskbook.load(store, known_at=k, cache=False))
        assert "recorded by 2024-01-09 16:20:00 UTC" in panel.caption.value
        assert "everything recorded" not in panel.caption.value
    finally:
        store.close()


def test_incident_panel_writes_large_limits_as_people_read_them(
    sample: riskbook.History,
) -> None:
    panel = widgets.IncidentPanel(sample)
    panel.incident.value = BUSTED["violation_event_id"]  # MaxPositionSize 89,000 on ACME
    box = panel.limit_box.value
    assert "89,000" in box and "e+04" not in box


# ----------------------------------------------------------------------------- small histories

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)


def _at(minutes: float = 0.0, **more: float) -> datetime:
    return T0 + timedelta(minutes=minutes, **more)


def _fill(
    i: int | str, quantity: float, t: datetime, *, account: str = "A", symbol: str = "ACME"
) -> riskbook.TradeExecuted:
    side = riskbook.Side.Buy if quantity > 0 else riskbook.Side.Sell
    return riskbook.TradeExecuted(
        trade_id=f"T{i}",
        account_id=account,
        symbol=symbol,
        side=side,
        quantity=abs(quantity),
        price=5.0,
        executed_at=t,
    )


def _limit(limit_type: str, value: float, t: datetime = T0) -> riskbook.LimitSet:
    return riskbook.LimitSet(
        account_id="A", limit_type=limit_type, value=value, set_by="cro", set_at=t
    )


def _violation(
    limit_type: str, value: float, limit: float, t: datetime, symbol: str | None = None
) -> riskbook.LimitViolationDetected:
    return riskbook.LimitViolationDetected(
        account_id="A",
        limit_type=limit_type,
        symbol=symbol,
        current_value=value,
        limit_value=limit,
        detected_at=t,
    )


class _Envelopes:
    """Envelopes built one by one: recorded when they happened unless told otherwise."""

    def __init__(self) -> None:
        self.items: list[riskbook.Envelope] = []

    def add(
        self,
        event: Any,
        *,
        recorded: datetime | None = None,
        cause: riskbook.Envelope | None = None,
        correlation: str | None = None,
    ) -> riskbook.Envelope:
        env = riskbook.Envelope(
            event_id=uuid.uuid4(),
            aggregate_id=event.aggregate_id,
            aggregate_type=event.aggregate_type,
            sequence=len(self.items) + 1,
            timestamp=recorded or event.business_time,
            payload=event,
            correlation_id=correlation or str(uuid.uuid4()),
            causation_id=None if cause is None else cause.event_id,
        )
        self.items.append(env)
        return env

    def history(self) -> riskbook.History:
        return riskbook.History.from_envelopes(self.items)


def _text(html_text: str) -> str:
    return re.sub(r"\s+", " ", re.sub("<[^>]+>", " ", html_text))


def test_causation_chain_of_more_than_a_hundred_correlated_events() -> None:
    # a day's fills appended as one batch share one correlation_id
    e = _Envelopes()
    e.add(riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0), correlation="b")
    fills = [e.add(_fill(i, 10.0, _at(seconds=i + 1)), correlation="b") for i in range(150)]
    v = e.add(
        _violation("MaxPositionSize", 1010.0, 1000.0, fills[100].payload.business_time, "ACME"),
        cause=fills[100],
        correlation="b",
    )
    h = e.history()
    chain = widgets.causation_chain(h, str(v.event_id))
    assert chain.height == 152
    assert chain.filter(pl.col("relation") == "cause")["event_id"].to_list() == [
        str(fills[100].event_id)
    ]
    assert chain.filter(pl.col("relation") == "correlated").height == 150
    panel = widgets.IncidentPanel(h)
    assert panel.chain.height == 152


def test_incident_panel_narrows_a_busy_window_and_keeps_the_incident() -> None:
    e = _Envelopes()
    e.add(riskbook.AccountFunded(account_id="A", amount=1e9, funded_at=T0))
    e.add(_limit("MaxPositionSize", 1000.0))
    for i in range(4_400):  # 5 fills a second, more than a chart's rows
        fill = e.add(
            _fill(
                i,
                (1 if i % 2 == 0 else -1) * (2000.0 if i == 2201 else 10.0),
                _at(1, milliseconds=200 * i),
            )
        )
        if i == 2201:
            t = fill.payload.business_time
            v = e.add(_violation("MaxPositionSize", 2000.0, 1000.0, t, "ACME"), cause=fill)
    panel = widgets.IncidentPanel(e.history())
    assert panel.window.height <= viz.MAX_ROWS
    ids = panel.window["event_id"].to_list()
    assert str(v.event_id) in ids and panel.step_event["event_id"] == str(v.event_id)
    focus = [r for r in rows(panel.timeline) if r.get("focus")] if panel.timeline else []
    assert focus and all(r["event_id"] == str(v.event_id) for r in focus)
    # consecutive: every event of the account between the window's ends is a step
    lo, hi = panel.window["occurred_at"].min(), panel.window["occurred_at"].max()
    between = panel.history.events.filter(pl.col("occurred_at").is_between(lo, hi))
    assert panel.window.height == between.height
    panel.next.click()
    assert panel.step_event["event_id"] == ids[ids.index(str(v.event_id)) + 1]
    header = _text(panel.header.value)
    assert f"{panel.window.height:,} events" in header and "narrowed from ±15 min" in header
    assert "holds 4,403" in header  # the fills, the violation, the funding, the limit


def test_incident_panel_shows_the_trades_behind_an_account_wide_incident() -> None:
    e = _Envelopes()
    e.add(riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0))
    e.add(_limit("MaxDailyVolume", 100.0))
    e.add(_fill(1, 60.0, _at(1)))
    trigger = e.add(_fill(2, -60.0, _at(2)))  # flat again at the incident
    e.add(_violation("MaxDailyVolume", 120.0, 100.0, _at(2)), cause=trigger)
    panel = widgets.IncidentPanel(e.history())
    assert panel.window["event_type"].to_list().count("TradeExecuted") == 2
    assert str(trigger.event_id) in panel.window["event_id"].to_list()
    assert "over the limit" in panel.limit_box.value


def test_incident_panel_step_onto_a_late_recording_puts_k_on_it() -> None:
    e = _Envelopes()
    e.add(riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0))
    e.add(_limit("MaxPositionSize", 5.0))
    fill = e.add(_fill(1, 10.0, _at(1)))
    e.add(_violation("MaxPositionSize", 10.0, 5.0, _at(1), "ACME"), cause=fill)
    late = e.add(_fill(2, -8.0, _at(6)), recorded=_at(120))  # learnt two hours later
    panel = widgets.IncidentPanel(e.history())
    panel.step.value = panel.window["event_id"].to_list().index(str(late.event_id))
    assert panel.known_at.value == late.timestamp
    row = panel.compare.filter(pl.col("figure") == "position ACME")
    assert row["engine"][0] == 2.0


def _nothing_metric(history: riskbook.History, *, known_at: Any = None) -> pl.DataFrame:
    return gross_notional(history, known_at=known_at).filter(pl.col("account_id") == "nobody")


def test_incident_panel_judges_a_registered_limit_type_by_its_own_metric() -> None:
    limits.register(
        limits.LimitSpec("MaxGrossPanel", "account", "USD", gross_notional), replace=True
    )
    limits.register(
        limits.LimitSpec("MaxNothingPanel", "account", "USD", _nothing_metric), replace=True
    )
    h = riskbook.History.from_events(
        riskbook.AccountFunded(account_id="A", amount=1000.0, funded_at=T0),
        _limit("MaxGrossPanel", 40.0),
        _limit("MaxNothingPanel", 40.0),
        _fill(1, 10.0, _at(1)),  # 10 @ 5: a gross exposure of 50
        _violation("MaxGrossPanel", 50.0, 40.0, _at(1)),
        _violation("MaxNothingPanel", 50.0, 40.0, _at(1)),
    )
    found = widgets.incidents(h)
    panel = widgets.IncidentPanel(h, incident=found["event_id"][0])
    text = _text(panel.limit_box.value)
    assert "Engine's metric at T: 50 — over the limit" in text
    assert widgets.limit_metric_at(h, "MaxGrossPanel", account="A", at=_at(1)) == 50.0
    assert widgets.limit_metric_at(h, "MaxGrossPanel", account="A", at=T0) == 0.0
    panel.step.value = 0  # before the fill: back within
    assert "0 — within the limit" in _text(panel.limit_box.value)

    panel.incident.value = found["event_id"][1]  # a metric with no value: no verdict
    text = _text(panel.limit_box.value)
    assert "not available" in text and "within the limit" not in text
    assert "over the limit" not in text


def test_compare_states_counts_a_busted_position_as_zero() -> None:
    e = _Envelopes()
    e.add(riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0))
    e.add(_fill(1, 10.0, _at(1)))
    e.add(
        riskbook.TradeCancelled(trade_id="T1", account_id="A", reason="bust", cancelled_at=_at(2)),
        recorded=_at(30),
    )
    compare = widgets.compare_states(e.history(), account="A", at=_at(5), known_at=_at(5))
    row = compare.filter(pl.col("figure") == "position ACME").row(0, named=True)
    assert (row["engine"], row["corrected"], row["difference"]) == (10.0, 0.0, -10.0)


def test_incident_panel_near_the_ends_of_the_calendar() -> None:
    for t in (datetime(9999, 12, 31, 23, 59, tzinfo=UTC), datetime(1, 1, 1, 0, 1, tzinfo=UTC)):
        h = riskbook.History.from_events(
            riskbook.AccountFunded(account_id="A", amount=1e3, funded_at=t),
            _limit("MaxPositionSize", 5.0, t),
            _fill(1, 10.0, t),
            _violation("MaxPositionSize", 10.0, 5.0, t, "ACME"),
        )
        panel = widgets.IncidentPanel(h)
        assert panel.at.value == t and panel.window.height == 4


def test_limit_lab_keeps_the_stored_breaches_of_its_own_type() -> None:
    h = riskbook.History.from_events(
        riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0),
        _limit("MaxPositionSize", 5.0),
        _fill(1, 10.0, _at(1)),
        _fill(2, -10.0, _at(61)),
    )
    lab = widgets.LimitLab(h, "MaxPositionSize", value=8.0, sweep=False)
    assert lab.existing.height == 1 and lab.summary["existing_breaches"].to_list() == [1]
    assert "The stored limits: 1 breach." in _text(lab.caption.value)
    lanes = {r["lane"] for r in rows(lab.timeline) if "lane" in r}
    assert lanes == {"A · MaxPositionSize", "A · MaxPositionSize (stored)"}


def _flipping(n: int) -> riskbook.History:
    """An account going 10 long and flat again ``n`` times: a breach each time under 10."""
    return riskbook.History.from_events(
        riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0),
        *[_fill(i, 10.0 if i % 2 == 0 else -10.0, _at(seconds=i + 1)) for i in range(2 * n)],
    )


def test_limit_lab_caps_its_breach_chart_and_updates_all_or_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lab = widgets.LimitLab(_flipping(80), "MaxPositionSize", value=20.0, sweep=False, max_rows=50)
    lab.value.value = 5.0  # 80 breaches, a chart of 50 rows at most
    assert lab.breaches.height == 80 and len(rows(lab.timeline)) <= 50 + 1
    assert "50 of 80 intervals drawn" in lab.timeline.chart.to_dict()["title"]["subtitle"]

    state = (lab.breaches, lab.summary, lab.caption.value, lab.timeline.chart)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(widgets.viz, "breach_chart", broken)
    with pytest.raises(RuntimeError):
        lab.value.value = 15.0
    assert (lab.breaches, lab.summary, lab.caption.value, lab.timeline.chart) == state


def test_limit_lab_writes_tiny_limits_with_significant_digits() -> None:
    h = riskbook.History.from_events(
        riskbook.AccountFunded(account_id="A", amount=1.0, funded_at=T0),
        *[_fill(i, 1e-9, _at(i + 1), symbol="DUST") for i in range(5)],
    )
    lab = widgets.LimitLab(h, "MaxPositionSize", value=2.5e-9)
    assert "&le; 2.5e-09</b>" in lab.caption.value
    assert format(lab.value.value, lab.value.readout_format) == "2.5e-09"


def test_exposure_explorer_keeps_the_decimals_of_a_quantity() -> None:
    h = riskbook.History.from_events(
        riskbook.AccountFunded(account_id="A", amount=1e5, funded_at=T0),
        _limit("MaxPositionSize", 0.4),
        _fill(1, 0.25, T0, symbol="BTC"),
    )
    panel = widgets.ExposureExplorer(h, account="A")
    assert ">0.25</td>" in panel.table.value
    spec = json.dumps(panel.snapshot.chart.to_dict()) + json.dumps(
        panel.positions.chart.to_dict() if panel.positions else {}
    )
    quantity_formats = re.findall(r'"field": "(?:quantity|value)"[^}]*"format": "([^"]+)"', spec)
    assert quantity_formats and set(quantity_formats) == {viz.QUANTITY_FORMAT}


def test_exposure_explorer_draws_thousands_of_positions() -> None:
    events: list[Any] = [
        riskbook.AccountFunded(account_id=f"A{a}", amount=1e6, funded_at=T0) for a in range(251)
    ]
    events += [
        _fill(f"{a}-{s}", 10.0 + s, _at(seconds=1), account=f"A{a}", symbol=f"S{s}")
        for a in range(251)
        for s in range(20)
    ]
    panel = widgets.ExposureExplorer(riskbook.History.from_events(*events))
    drawn = rows(panel.snapshot)
    assert len(drawn) <= viz.MAX_ROWS
    per_account = {}
    for r in drawn:
        per_account[r["account_id"]] = per_account.get(r["account_id"], 0.0) + r["market_value"]
    assert per_account["A7"] == pytest.approx(sum(5.0 * (10.0 + s) for s in range(20)))
    assert "other" in {r["symbol"] for r in drawn}
    assert "5,020 positions drawn as" in panel.snapshot.chart.to_dict()["title"]["subtitle"]


def test_panels_refuse_bad_arguments_in_one_line() -> None:
    h = riskbook.History.from_events(
        riskbook.AccountFunded(account_id="ACC-1", amount=1e6, funded_at=T0),
        riskbook.LimitSet(
            account_id="ACC-1", limit_type="MaxPositionSize", value=5.0, set_by="cro", set_at=T0
        ),
        _fill(1, 10.0, _at(1), account="ACC-1"),
    )
    with pytest.raises(ValueError, match=r"^account 'ACC-9' .* 1 account: 'ACC-1'$"):
        widgets.ExposureExplorer(h, account="ACC-9")
    with pytest.raises(ValueError, match=r"^measure must be one of gross_exposure, .*'pnl'$"):
        widgets.ExposureExplorer(h, measure="pnl")
    e = _Envelopes()
    for event in (
        riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0),
        _violation("MaxPositionSize", 10.0, 5.0, _at(1), "ACME"),
    ):
        e.add(event)
    with pytest.raises(ValueError, match=r"^incident 'no-such-id' .* 1 incident: '"):
        widgets.IncidentPanel(e.history(), incident="no-such-id")
    with pytest.raises(ValueError, match="step must be greater than 0"):
        widgets.LimitLab(h, "MaxPositionSize", value=1.0, step=0.0)
    with pytest.raises(ValueError, match="value must be a finite number; got nan"):
        widgets.LimitLab(h, "MaxPositionSize", value=float("nan"))
    lab = widgets.LimitLab(h, "MaxPositionSize", value=1.0, accounts="ACC-1", sweep=False)
    assert lab.accounts == ["ACC-1"] and lab.summary["account_id"].to_list() == ["ACC-1"]


def _levered() -> riskbook.History:
    """ACC-1 at leverage 3 from T0 + 1 min, ACC-2 at 0.5 from T0 + 2 min (MaxLeverage 2)."""
    return riskbook.History.from_events(
        riskbook.AccountFunded(account_id="ACC-1", amount=1e3, funded_at=T0),
        riskbook.AccountFunded(account_id="ACC-2", amount=1e3, funded_at=T0),
        riskbook.LimitSet(
            account_id="ACC-1", limit_type="MaxLeverage", value=2.0, set_by="cro", set_at=T0
        ),
        _fill(1, 600.0, _at(1), account="ACC-1"),
        _fill(2, 100.0, _at(2), account="ACC-2"),
    )


def test_limit_lab_helpers_take_one_account_as_a_string_and_an_empty_list_as_none() -> None:
    h = _levered()
    one = widgets.limit_sweep(h, "MaxLeverage", [1.0], accounts="ACC-1")
    assert one.equals(widgets.limit_sweep(h, "MaxLeverage", [1.0], accounts=["ACC-1"]))
    assert one.select("breaches", "accounts").row(0) == (1, 1)
    none = widgets.limit_sweep(h, "MaxLeverage", [0.1], accounts=[])
    assert none.select("breaches", "accounts").row(0) == (0, 0)
    found = riskbook.breaches(h)
    summary = widgets.breach_summary(found, horizon=_at(10), accounts="ACC-2")
    assert summary.select("account_id", "breaches").rows() == [("ACC-2", 0)]
    with pytest.raises(TypeError, match=r"^accounts must hold strings, got 1 \(int\)$"):
        widgets.breach_summary(found, horizon=_at(10), accounts=[1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^LimitLab's accounts is empty: .* None for every"):
        widgets.LimitLab(h, "MaxLeverage", value=1.0, accounts=[], sweep=False)


def test_incident_helpers_check_their_times_as_the_projections_do() -> None:
    h = _levered()
    t = _at(5)
    text, naive = "2024-03-01T14:35:00Z", t.replace(tzinfo=None)
    assert widgets.daily_volume(h, account="ACC-1", at=text, known_at=text) == 600.0
    assert widgets.compare_states(h, account="ACC-1", at=text, known_at=text).equals(
        widgets.compare_states(h, account="ACC-1", at=t, known_at=t)
    )
    assert widgets.limits_in_force(h.limits, account="ACC-1", at=text, known_at=text).height == 1
    limit = widgets.limit_in_force(
        h.limits, account="ACC-1", limit_type="MaxLeverage", at=text, known_at=text
    )
    assert limit is not None and limit["value"] == 2.0
    found = riskbook.breaches(h)
    assert widgets.breach_summary(found, horizon=text).equals(
        widgets.breach_summary(found, horizon=t)
    )
    assert widgets.limit_sweep(h, "MaxLeverage", [1.0], known_at=text)["accounts"][0] == 1
    slider = widgets.TimeSlider("2024-03-01T14:30:00Z", text, value="2024-03-01T15:31:00+01:00")
    assert (slider.start, slider.end, slider.value) == (T0, t, _at(1))
    calls: list[tuple[str, Callable[[Any], Any]]] = [
        ("at", lambda v: widgets.daily_volume(h, account="ACC-1", at=v)),
        ("at", lambda v: widgets.compare_states(h, account="ACC-1", at=v, known_at=None)),
        ("known_at", lambda v: widgets.compare_states(h, account="ACC-1", at=t, known_at=v)),
        ("at", lambda v: widgets.limits_in_force(h.limits, account="ACC-1", at=v)),
        (
            "known_at",
            lambda v: widgets.limit_in_force(
                h.limits, account="ACC-1", limit_type="MaxLeverage", known_at=v
            ),
        ),
        ("horizon", lambda v: widgets.breach_summary(found, horizon=v)),
        ("known_at", lambda v: widgets.limit_sweep(h, "MaxLeverage", [1.0], known_at=v)),
        ("known_at", lambda v: widgets.LimitLab(h, "MaxLeverage", value=1.0, known_at=v)),
        ("at", lambda v: widgets.ExposureExplorer(h, at=v)),
        ("start", lambda v: widgets.TimeSlider(v, t)),
    ]
    for name, call in calls:
        with pytest.raises(ValueError, match=f"^{name} has no time zone: give UTC explicitly$"):
            call(naive)
        with pytest.raises(TypeError, match=f"^{name} must be a datetime or an RFC 3339 string"):
            call(t.date())
        with pytest.raises(ValueError, match=f"^{name}: 'soon' is not an RFC 3339 time"):
            call("soon")


def test_limit_lab_and_panels_refuse_values_backtest_refuses() -> None:
    h = _levered()
    for bad in (-1.0, float("nan"), math.inf):
        with pytest.raises(ValueError, match=r"^limit_sweep's values must be finite and >= 0"):
            widgets.limit_sweep(h, "MaxLeverage", [1.0, bad])
    with pytest.raises(ValueError, match=r"^LimitLab's value must be >= 0 \(a limit value\)"):
        widgets.LimitLab(h, "MaxLeverage", value=-1.0, sweep=False)
    with pytest.raises(ValueError, match=r"^LimitLab's low must be >= 0"):
        widgets.LimitLab(h, "MaxLeverage", value=1.0, low=-2.0, sweep=False)
    with pytest.raises(ValueError, match=r"^LimitLab's low must be less than its high; got 5"):
        widgets.LimitLab(h, "MaxLeverage", value=1.0, low=5.0, high=1.0, sweep=False)
    with pytest.raises(TypeError, match=r"^IncidentPanel's window must be a timedelta, got int$"):
        widgets.IncidentPanel(h, window=900)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^IncidentPanel's window must not be negative"):
        widgets.IncidentPanel(h, window=timedelta(minutes=-15))
    with pytest.raises(ValueError, match=r"^max_rows must be at least 1; got 0$"):
        widgets.IncidentPanel(h, max_rows=0)
    with pytest.raises(ValueError, match=r"^a TimeSlider's step must be greater than 0"):
        widgets.TimeSlider(T0, _at(10), step=timedelta(0))
    with pytest.raises(TypeError, match=r"^a TimeSlider's step must be a timedelta, got int$"):
        widgets.TimeSlider(T0, _at(10), step=60)  # type: ignore[arg-type]


def test_charts_load_a_small_module_and_share_the_vega_bundle() -> None:
    # anywidget drops the kernel's updates to a widget whose module took over 2 s to
    # load; JupyterChart's own module is the whole Vega bundle, parsed again per chart.
    # riskbook's charts load a few lines, which import the bundle once per page.
    chart = alt.Chart(alt.Data(values=[{"a": 1}])).mark_point().encode(x="a:Q")
    one, two = widgets._chart_widget(chart), widgets._chart_widget(chart)
    assert isinstance(one, alt.JupyterChart)
    state = one.get_state()
    assert len(state["_esm"]) < 2_000 and "import(" in state["_esm"]
    assert len(state["_bundle"]) > 500_000 and "esm.sh" not in state["_bundle"]  # offline
    assert state["_bundle_id"] == two.get_state()["_bundle_id"]  # one import per page
    assert "as default}" in state["_bundle"][-500:]  # the module _esm renders with
    one.chart = chart.mark_line()  # updates go through the chart's own traits, as before
    assert one.get_state()["spec"]["mark"]["type"] == "line"
