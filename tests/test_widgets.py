"""Widget panels without a browser: set a control, read the panel's frames and charts."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import altair as alt
import polars as pl
import pytest
import traitlets

import riskbook
from riskbook import widgets
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


# ----------------------------------------------------------------------------- incidents


def test_incidents_lists_violations_and_blocks_with_their_limit(sample: riskbook.History) -> None:
    found = widgets.incidents(sample)
    assert found.height == 6
    block = found.filter(pl.col("event_type") == "AccountBlocked").row(0, named=True)
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
