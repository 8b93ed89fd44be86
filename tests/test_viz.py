"""Chart builders: the data they carry, their row cap, and offline rendering."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import polars as pl
import pytest

import riskbook
from riskbook import viz
from riskbook.demo import SAMPLE

T0 = datetime(2024, 1, 9, 14, 30, tzinfo=UTC)
FAT_FINGER_BLOCK = "8dc2a032-4e36-4e83-93b8-68ee163fcac4"


@pytest.fixture(scope="module")
def sample(make_database: Callable[[], str]) -> Iterator[riskbook.History]:
    store = riskbook.Store(make_database())
    store.import_jsonl(SAMPLE)
    yield riskbook.load(store, cache=False, progress=False)
    store.close()


def datasets(chart: alt.TopLevelMixin) -> dict[str, list[dict[str, Any]]]:
    return chart.to_dict()["datasets"]  # type: ignore[no-any-return]


def total_rows(chart: alt.TopLevelMixin) -> int:
    return sum(len(rows) for rows in datasets(chart).values())


# ----------------------------------------------------------------------------- data


def test_downsample_keeps_extremes_and_last_per_series() -> None:
    rng = np.random.default_rng(1)
    n = 200_000
    frame = pl.DataFrame(
        {
            "account_id": np.repeat(["A", "B", "C", "D"], n // 4),
            "occurred_at": pl.datetime_range(T0, T0 + timedelta(seconds=n - 1), "1s", eager=True),
            "equity": rng.normal(size=n).cumsum(),
            "leverage": rng.random(n),
        }
    )
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 777)
        .then(np.inf)
        .otherwise(pl.col("leverage"))
        .alias("leverage")
    )
    small = viz.downsample(
        frame, x="occurred_at", y=["equity", "leverage"], by="account_id", max_rows=2_000
    )
    assert small.height <= 2_000
    assert small.columns == frame.columns
    full = frame.group_by("account_id").agg(
        pl.col("equity").min().alias("lo"),
        pl.col("equity").max().alias("hi"),
        pl.col("leverage").filter(pl.col("leverage").is_finite()).max().alias("lev"),
        pl.col("occurred_at").max().alias("last"),
    )
    kept = small.group_by("account_id").agg(
        pl.col("equity").min().alias("lo"),
        pl.col("equity").max().alias("hi"),
        pl.col("leverage").filter(pl.col("leverage").is_finite()).max().alias("lev"),
        pl.col("occurred_at").max().alias("last"),
    )
    assert full.sort("account_id").equals(kept.sort("account_id"))
    assert small.equals(small.sort("account_id", "occurred_at"))


def test_downsample_leaves_small_frames_whole() -> None:
    frame = pl.DataFrame({"t": [3, 1, 2], "v": [1.0, 2.0, 3.0]})
    assert viz.downsample(frame, x="t", y="v", max_rows=10)["t"].to_list() == [1, 2, 3]


def test_plot_frame_gives_vega_friendly_columns() -> None:
    frame = pl.DataFrame(
        {
            "t": [T0, T0 + timedelta(milliseconds=1500)],
            "account_id": pl.Series(["A", "B"], dtype=pl.Categorical),
            "leverage": [np.inf, 1.5],
            "x": [float("nan"), 2.0],
        }
    )
    out = viz.plot_frame(frame)
    assert out["t"].to_list() == [1704810600000, 1704810601500]
    assert out["account_id"].dtype == pl.String
    assert out["leverage"].to_list() == [None, 1.5]
    assert out["x"].to_list() == [None, 2.0]
    json.dumps(out.to_dicts())  # no infinity left for JSON


def _limits(*rows: tuple[str, str, float, str | None, datetime, datetime]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "position": i,
                "account_id": acc,
                "limit_type": kind,
                "value": value,
                "set_by": "risk",
                "symbol": sym,
                "set_at": set_at,
                "timestamp": recorded,
            }
            for i, (acc, kind, value, sym, set_at, recorded) in enumerate(rows)
        ],
        schema={
            "position": pl.Int64,
            "account_id": pl.Categorical,
            "limit_type": pl.Categorical,
            "value": pl.Float64,
            "set_by": pl.Categorical,
            "symbol": pl.Categorical,
            "set_at": pl.Datetime("us", "UTC"),
            "timestamp": pl.Datetime("us", "UTC"),
        },
    )


def test_limit_steps_symbol_overrides_account_and_known_at_hides_late_sets() -> None:
    h = timedelta(hours=1)
    limits = _limits(
        ("A", "MaxPositionSize", 100.0, None, T0, T0),
        ("A", "MaxPositionSize", 50.0, "ACME", T0 + h, T0 + h),
        ("A", "MaxPositionSize", 120.0, None, T0 + 2 * h, T0 + 2 * h),
        ("A", "MaxPositionSize", 70.0, "ACME", T0 + 3 * h, T0 + 5 * h),  # recorded late
        ("B", "MaxPositionSize", 1.0, None, T0, T0),
        ("A", "MaxLeverage", 3.0, None, T0, T0),
    )
    acme = viz.limit_steps(
        limits, account="A", limit_type="MaxPositionSize", symbol="ACME", end=T0 + 6 * h
    )
    assert acme["value"].to_list() == [100.0, 50.0, 70.0, 70.0]
    assert acme["scope"].to_list() == ["account", "ACME", "ACME", "ACME"]
    assert acme["set_at"][-1] == T0 + 6 * h
    known = viz.limit_steps(
        limits, account="A", limit_type="MaxPositionSize", symbol="ACME", known_at=T0 + 4 * h
    )
    assert known["value"].to_list() == [100.0, 50.0]
    wide = viz.limit_steps(limits, account="A", limit_type="MaxPositionSize")
    assert wide["value"].to_list() == [100.0, 120.0]


# ----------------------------------------------------------------------------- charts


def test_exposure_chart_is_capped_and_carries_the_rule(sample: riskbook.History) -> None:
    timeline = riskbook.account_timeline(sample)
    chart = viz.exposure_chart(timeline, measure="leverage", at=T0, max_rows=1_500)
    spec = chart.to_dict()
    assert timeline.height > 50_000
    assert total_rows(chart) <= 1_500 + 1  # + the rule's one row
    assert {"name": "at", "value": 1704810600000} in spec["params"]
    accounts = {
        r["account_id"] for rows in spec["datasets"].values() for r in rows if "account_id" in r
    }
    assert len(accounts) == 12
    with pytest.raises(ValueError, match="measure"):
        viz.exposure_chart(timeline, measure="vibes")


def test_exposure_chart_over_millions_of_rows_stays_small() -> None:
    n = 2_000_000
    timeline = pl.DataFrame(
        {
            "account_id": np.repeat([f"ACC-{i:03}" for i in range(20)], n // 20),
            "occurred_at": pl.datetime_range(T0, T0 + timedelta(seconds=n - 1), "1s", eager=True),
            "gross_exposure": np.random.default_rng(2).random(n),
        }
    )
    chart = viz.exposure_chart(timeline)
    assert total_rows(chart) <= viz.MAX_ROWS + 1
    assert len(json.dumps(chart.to_dict())) < 600_000


def test_position_chart_draws_the_fat_finger_and_its_limits(sample: riskbook.History) -> None:
    chart = viz.position_chart(
        riskbook.position_timeline(sample), account="ACC-001", limits=sample.limits
    )
    rows = [r for rows in datasets(chart).values() for r in rows]
    assert max(r["quantity"] for r in rows if "quantity" in r) == 4420.0  # the spike survives
    limits = {(r["scope"], r["value"]) for r in rows if "scope" in r}
    assert ("ACME", 3400.0) in limits  # ACME's own limit
    assert ("account", 3000.0) in limits  # the account-wide one


def test_equity_and_leverage_charts(sample: riskbook.History) -> None:
    timeline = riskbook.account_timeline(sample)
    eq = viz.equity_chart(timeline, account="ACC-002", limits=sample.limits)
    rows = [r for rows in datasets(eq).values() for r in rows]
    assert max(r["drawdown"] for r in rows if r.get("drawdown") is not None) > 0.12
    assert {r["value"] for r in rows if "set_by" in r} >= {0.12}
    lev = viz.leverage_chart(timeline, sample.limits, account="ACC-003")
    rows = [r for rows in datasets(lev).values() for r in rows]
    over = [r for r in rows if r.get("over")]
    assert over and all(r["leverage"] > r["limit"] for r in over)
    assert max(r["leverage"] for r in over) == pytest.approx(3.240460650365166)


def _breaches() -> pl.DataFrame:
    h = timedelta(hours=1)
    return pl.DataFrame(
        {
            "account_id": ["ACC-001", "ACC-001", "ACC-001", "ACC-003"],
            "limit_type": ["MaxPositionSize"] * 3 + ["MaxLeverage"],
            "symbol": ["ACME", "ACME", "ACME", None],
            "level": [0.8, 0.9, 1.0, 1.0],
            "started_at": [T0, T0 + 0.1 * h, T0 + 0.2 * h, T0 + 2 * h],
            "ended_at": [T0 + h, T0 + 0.9 * h, T0 + 0.8 * h, None],
            "peak_value": [4420.0, 4420.0, 4420.0, 3.2],
            "limit_value": [3400.0] * 3 + [3.0],
            "trigger_event_id": ["e1", "e2", "e3", "e4"],
        },
        schema_overrides={"account_id": pl.Categorical, "limit_type": pl.Categorical},
    )


def test_breach_chart_has_one_lane_per_account_and_limit_type() -> None:
    end = T0 + timedelta(hours=5)
    chart = viz.breach_chart(_breaches(), end=end)
    rows = [r for rows in datasets(chart).values() for r in rows if "lane" in r]
    assert {r["lane"] for r in rows} == {"ACC-001 · MaxPositionSize", "ACC-003 · MaxLeverage"}
    assert {r["severity"] for r in rows} == {"warning 80%", "warning 90%", "breach"}
    still_open = next(r for r in rows if r["trigger_event_id"] == "e4")
    assert (
        still_open["open"]
        and still_open["t2"] == viz.plot_frame(pl.DataFrame({"t": [end]}))["t"][0]
    )
    assert "breach intervals" in json.dumps(chart.to_dict())
    empty = viz.breach_chart(_breaches().clear())
    assert total_rows(empty) <= 1


def _level_scale(chart: alt.TopLevelMixin) -> dict[str, str]:
    """The breach chart's colour scale, as {level name: colour}."""
    scales = [
        layer["encoding"]["color"]["scale"]
        for layer in chart.to_dict()["layer"]
        if "color" in layer.get("encoding", {})
    ]
    assert scales and all(s == scales[0] for s in scales)
    return dict(zip(scales[0]["domain"], scales[0]["range"], strict=True))


def test_breach_chart_colours_each_level_by_its_value() -> None:
    own = {"warning 80%": "#f2c94c", "warning 90%": "#f2994a", "breach": "#d62728"}
    for levels in [(0.8, 0.9, 1.0), (0.8, 0.9), (0.8,), (0.9,), (1.0,), (0.9, 1.0), (0.8, 1.0),
                   (0.5, 0.8, 0.9, 0.95, 1.0, 1.2)]:  # fmt: skip
        frame = pl.concat([_breaches().head(1).with_columns(level=pl.lit(v)) for v in levels])
        scale = _level_scale(viz.breach_chart(frame))
        names = [viz.LEVEL_NAMES.get(v, f"level {v:.0%}") for v in levels]
        assert list(scale) == names, levels
        assert {n: c for n, c in scale.items() if n in own} == {
            n: c for n, c in own.items() if n in names
        }, levels
        # every level's colour is its own: the same in whatever set it is drawn
        alone = {n: c for v in levels for n, c in _level_scale(viz.breach_chart(
            frame.filter(pl.col("level") == v))).items()}  # fmt: skip
        assert alone == scale, levels
        assert len(set(scale.values())) == len(scale), levels
    assert {viz.LEVEL_NAMES[v]: c for v, c in viz.LEVEL_COLORS.items()} == own


def test_breach_chart_levels_between_the_defaults_sit_between_their_colours() -> None:
    frame = pl.concat([_breaches().head(1).with_columns(level=pl.lit(v)) for v in (0.85, 1.5)])
    scale = _level_scale(viz.breach_chart(frame))
    assert scale == {"level 85%": "#f2b14b", "level 150%": "#67000d"}
    empty = _level_scale(viz.breach_chart(_breaches().clear()))
    assert empty == {"warning 80%": "#f2c94c", "warning 90%": "#f2994a", "breach": "#d62728"}


def test_event_chart_links_causes_and_rings_the_focus(sample: riskbook.History) -> None:
    window = viz.event_lanes(
        sample,
        start=datetime(2024, 1, 9, 16, 3, tzinfo=UTC),
        end=datetime(2024, 1, 9, 16, 50, tzinfo=UTC),
        accounts=["ACC-001"],
        symbols=["ACME"],
    )
    assert {"trade", "mark", "violation", "block"} <= set(window["lane"])
    block = window.filter(pl.col("event_id") == FAT_FINGER_BLOCK).row(0, named=True)
    assert block["summary"].startswith("blocked by risk-engine")
    chart = viz.event_chart(window, focus=FAT_FINGER_BLOCK, cursor=block["occurred_at"])
    rows = [r for rows in datasets(chart).values() for r in rows]
    links = {r["link"] for r in rows if "link" in r}
    assert len(links) == 3  # trade -> violation, trade -> block, block -> unblock
    assert [r["event_id"] for r in rows if r.get("focus")] == [FAT_FINGER_BLOCK] * 2


def test_charts_render_offline_to_png_and_svg(sample: riskbook.History, tmp_path: Path) -> None:
    timeline = riskbook.account_timeline(sample)
    chart = viz.leverage_chart(timeline, sample.limits, account="ACC-003", at=T0)
    png = viz.save_png(chart, tmp_path / "leverage.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = viz.save_svg(viz.exposure_chart(timeline), tmp_path / "exposure.svg").read_text()
    assert "ACC-012" in svg and "Gross exposure by account" in svg


def test_setup_enables_the_offline_renderer() -> None:
    before = alt.renderers.active
    try:
        viz.setup()
        assert alt.renderers.active == "jupyter"
        assert alt.renderers.options.get("offline") is True
        assert alt.JupyterChart._is_offline
        assert "esm.sh" not in alt.JupyterChart._esm and "cdn" not in alt.JupyterChart._esm[:2000]
    finally:
        alt.renderers.enable(before)


# ----------------------------------------------------------------------------- limit lab


def test_metric_chart_carries_the_limit_as_a_parameter_and_stays_small(tmp_path: Path) -> None:
    n = 30_000
    rng = np.random.default_rng(3)
    metric = pl.DataFrame(
        {
            "account_id": np.repeat(["A", "B", "C"], n // 3),
            "time": pl.datetime_range(T0, T0 + timedelta(seconds=n - 1), "1s", eager=True),
            "value": rng.random(n) * 2,
        }
    ).with_columns(
        pl.when(pl.int_range(pl.len()) == 5).then(np.inf).otherwise("value").alias("value")
    )
    chart = viz.metric_chart(metric, limit=1.25, name="MaxConcentration", unit="fraction")
    spec = chart.to_dict()
    assert [p.get("value") for p in spec["params"] if p["name"] == "limit"] == [1.25]
    assert "datum.value > limit" in json.dumps(spec)  # the red dots follow the parameter
    rows = [r for rows in datasets(chart).values() for r in rows if "account_id" in r]
    assert len(rows) <= viz.MAX_ROWS and {r["account_id"] for r in rows} == {"A", "B", "C"}
    assert max(r["value"] for r in rows if r["value"] is not None) > 1.99  # peaks kept
    small = metric.filter(pl.col("account_id") == "A").head(10)
    only_a = viz.metric_chart(small, accounts=["A"])
    values = [r["value"] for rs in datasets(only_a).values() for r in rs if "account_id" in r]
    assert len(values) == 10 and values[5] is None  # whole, and the infinite value is a gap
    assert [p.get("value") for p in only_a.to_dict()["params"] if p["name"] == "limit"] == [None]
    only_b = datasets(viz.metric_chart(metric, accounts=["B"]))
    assert {r["account_id"] for rs in only_b.values() for r in rs if "account_id" in r} == {"B"}
    svg = viz.save_svg(chart, tmp_path / "metric.svg").read_text()
    assert "MaxConcentration by account" in svg


def test_limit_sweep_chart_draws_both_measures_and_a_movable_rule(tmp_path: Path) -> None:
    sweep = pl.DataFrame(
        {
            "value": [0.5, 1.0, 1.5, 2.0],
            "breaches": [9, 13, 1, 0],
            "accounts": [5, 4, 1, 0],
            "hours_in_breach": [2000.0, 400.9, 0.5, 0.0],
        }
    )
    chart = viz.limit_sweep_chart(sweep, value=1.0, name="MaxConcentration", unit="fraction")
    spec = chart.to_dict()
    assert len(spec["vconcat"]) == 2
    assert [p.get("value") for p in spec["params"] if p["name"] == "value"] == [1.0]
    rows = [r for rows in datasets(chart).values() for r in rows if "hours_in_breach" in r]
    assert sorted((r["value"], r["breaches"], r["accounts"]) for r in rows) == [
        (0.5, 9, 5),
        (1.0, 13, 4),
        (1.5, 1, 1),
        (2.0, 0, 0),
    ]
    png = viz.save_png(chart, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = viz.save_svg(chart, tmp_path / "sweep.svg").read_text()
    assert "accounts in breach" in svg and "hours in breach" in svg


def _many_breaches(short: int, long: int) -> pl.DataFrame:
    """Lane A: ``short`` one-minute breaches and ``long`` hour-long ones; lane B: three."""
    starts = [T0 + timedelta(minutes=2 * i) for i in range(short + long)] + [T0] * 3
    lengths = [timedelta(minutes=1)] * short + [timedelta(hours=1)] * long + [timedelta(1)] * 3
    n = len(starts)
    return pl.DataFrame(
        {
            "account_id": ["A"] * (short + long) + ["B"] * 3,
            "limit_type": ["MaxPositionSize"] * n,
            "symbol": ["ACME"] * n,
            "level": [1.0] * n,
            "started_at": starts,
            "ended_at": [s + d for s, d in zip(starts, lengths, strict=True)],
            "peak_value": [2.0] * n,
            "limit_value": [1.0] * n,
            "trigger_event_id": [f"e{i}" for i in range(n)],
        }
    )


def test_breach_chart_caps_its_rows_keeping_each_lanes_longest() -> None:
    chart = viz.breach_chart(_many_breaches(short=6_000, long=20))
    rows = [r for rs in datasets(chart).values() for r in rs if "lane" in r]
    assert len(rows) == viz.MAX_ROWS  # Altair refuses more than 5,000
    assert sum(r["lane"] == "B · MaxPositionSize" for r in rows) == 3  # a small lane: all
    assert sum(r["minutes"] == 60 for r in rows) == 20  # the long ones survive
    subtitle = chart.to_dict()["title"]["subtitle"]
    assert "6,023 breach intervals" in subtitle and "4,000 of 6,023 intervals drawn" in subtitle
    small = viz.breach_chart(_many_breaches(short=10, long=2), max_rows=8)
    assert total_rows(small) <= 8 + 1


def test_breach_chart_draws_an_open_breach_to_the_horizon() -> None:
    found = _breaches().filter(pl.col("trigger_event_id") == "e4")  # open, started T0 + 2 h
    horizon = T0 + timedelta(hours=50)
    chart = viz.breach_chart(found, horizon=horizon)
    (row,) = [r for rs in datasets(chart).values() for r in rs if "lane" in r]
    assert row["t2"] - row["t"] == 48 * 3_600_000 and row["ended"] == "open"
    assert row["minutes"] == 48 * 60
    closed = viz.breach_chart(_breaches(), horizon=horizon)
    ended = {
        r["trigger_event_id"]: r["ended"]
        for rs in datasets(closed).values()
        for r in rs
        if "lane" in r
    }
    assert ended["e3"] == "2024-01-09 15:18:00.000" and ended["e4"] == "open"


def test_exposure_at_chart_caps_its_bars_summing_the_rest() -> None:
    accounts, symbols = 30, 12
    positions = pl.DataFrame(
        {
            "account_id": [f"A{a:02d}" for a in range(accounts) for _ in range(symbols)],
            "symbol": [f"S{s:02d}" for _ in range(accounts) for s in range(symbols)],
            "quantity": [
                float(s + 1) * (-1 if s == 0 else 1)
                for _ in range(accounts)
                for s in range(symbols)
            ],
            "avg_price": [10.0] * (accounts * symbols),
            "mark_price": [10.0] * (accounts * symbols),
        }
    ).with_columns((pl.col("quantity") * pl.col("mark_price")).alias("market_value"))
    chart = viz.exposure_at_chart(positions, max_rows=100)
    rows = [r for rs in datasets(chart).values() for r in rs]
    assert len(rows) <= 100
    mine = [r for r in rows if r["account_id"] == "A03"]
    assert sum(r["market_value"] for r in mine) == pytest.approx(
        sum(10.0 * (s + 1) * (-1 if s == 0 else 1) for s in range(symbols))
    )
    assert {r["symbol"] for r in mine} >= {"S11", "other"}  # the largest kept by name
    assert "360 positions drawn as" in chart.to_dict()["title"]["subtitle"]
    few = viz.exposure_at_chart(positions, max_rows=30)  # fewer bars than accounts
    few_rows = [r for rs in datasets(few).values() for r in rs]
    assert len(few_rows) <= 30 and "the 10 accounts of 30" in few.to_dict()["title"]["subtitle"]


def test_subtitles_count_the_rows_of_the_accounts_shown() -> None:
    tl = pl.DataFrame(
        {
            "account_id": ["A"] * 10 + ["B"] * 990,
            "occurred_at": [T0 + timedelta(seconds=i) for i in range(1000)],
            "gross_exposure": [float(i) for i in range(1000)],
        }
    )
    chart = viz.exposure_chart(tl, accounts=["A"])
    assert "1 account, 10 timeline rows" in chart.to_dict()["title"]["subtitle"]
    metric = tl.select("account_id", time="occurred_at", value="gross_exposure")
    chart = viz.metric_chart(metric, accounts=["A"])
    assert "1 account, 10 metric rows" in chart.to_dict()["title"]["subtitle"]


def test_leverage_chart_draws_infinite_leverage_at_the_top() -> None:
    t = T0
    h = riskbook.History.from_events(
        riskbook.AccountFunded(account_id="A", amount=100.0, funded_at=t),
        riskbook.LimitSet(
            account_id="A", limit_type="MaxLeverage", value=2.0, set_by="cro", set_at=t
        ),
        riskbook.TradeExecuted(
            trade_id="T1",
            account_id="A",
            symbol="ACME",
            side=riskbook.Side.Buy,
            quantity=100.0,
            price=10.0,
            executed_at=t + timedelta(minutes=1),
        ),
        *[
            riskbook.PriceMarked(symbol="ACME", price=p, marked_at=t + timedelta(minutes=k))
            for p, k in ((9.5, 2), (8.0, 3), (7.0, 4))
        ],
    )
    chart = viz.leverage_chart(riskbook.account_timeline(h), h.limits, account="A")
    spec = chart.to_dict()
    infinite = [r for rs in spec["datasets"].values() for r in rs if r.get("infinite")]
    assert len(infinite) == 2 and {r["leverage_text"] for r in infinite} == {"∞ (equity ≤ 0)"}
    pinned = [
        layer for layer in spec["layer"] if layer.get("mark", {}).get("shape") == "triangle-up"
    ]
    assert pinned and pinned[0]["encoding"]["y"] == {"value": 4}
    assert "2 with leverage ∞" in spec["title"]["subtitle"]


def test_event_lanes_never_thin_away_incidents_limits_or_kept_events() -> None:
    events: list[Any] = [riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0)]
    events += [
        riskbook.TradeExecuted(
            trade_id=f"T{i}",
            account_id="A",
            symbol="ACME",
            side=riskbook.Side.Buy,
            quantity=1.0,
            price=5.0,
            executed_at=T0 + timedelta(seconds=i + 1),
        )
        for i in range(300)
    ]
    events += [
        riskbook.LimitSet(
            account_id="A",
            limit_type="MaxPositionSize",
            value=5.0 + i,
            set_by="cro",
            set_at=T0 + timedelta(seconds=10 * i + 5),
        )
        for i in range(10)
    ]
    events.append(
        riskbook.LimitViolationDetected(
            account_id="A",
            limit_type="MaxPositionSize",
            symbol="ACME",
            current_value=7.0,
            limit_value=5.0,
            detected_at=T0 + timedelta(seconds=7),
        )
    )
    h = riskbook.History.from_events(*events)
    wanted = h.events.filter(pl.col("event_type") == "TradeExecuted")["event_id"][137]
    lanes = viz.event_lanes(h, start=T0, end=T0 + timedelta(hours=1), max_rows=50, keep=[wanted])
    assert lanes.height <= 50 and wanted in lanes["event_id"].to_list()
    assert (lanes["lane"] == "limit").sum() == 10 and (lanes["lane"] == "violation").sum() == 1
    assert lanes["position"].is_sorted()


# ----------------------------------------------------------------------------- arguments


def _two_accounts(*more: Any) -> riskbook.History:
    """ACC-1 trading ACME and BOLT, ACC-2 trading ACME, both funded at T0 (and ``more``).

    ACC-1's BOLT trade at minute 3 is the last event: ACC-1's ACME position and ACC-2
    have nothing after minutes 1 and 2.
    """

    def fill(i: int, account: str, symbol: str, minutes: int) -> riskbook.TradeExecuted:
        return riskbook.TradeExecuted(
            trade_id=f"T{i}",
            account_id=account,
            symbol=symbol,
            side=riskbook.Side.Buy,
            quantity=100.0,
            price=10.0,
            executed_at=T0 + timedelta(minutes=minutes),
        )

    return riskbook.History.from_events(
        riskbook.AccountFunded(account_id="ACC-1", amount=1e4, funded_at=T0),
        riskbook.AccountFunded(account_id="ACC-2", amount=1e4, funded_at=T0),
        fill(1, "ACC-1", "ACME", 1),
        fill(2, "ACC-2", "ACME", 2),
        fill(3, "ACC-1", "BOLT", 3),
        *more,
    )


def drawn(chart: alt.TopLevelMixin, field: str) -> set[Any]:
    return {r[field] for rows in datasets(chart).values() for r in rows if field in r}


def test_builders_take_one_id_as_a_string_not_its_characters() -> None:
    h = _two_accounts()
    timeline = riskbook.account_timeline(h)
    assert drawn(viz.exposure_chart(timeline, accounts="ACC-1"), "account_id") == {"ACC-1"}
    assert drawn(viz.exposure_chart(timeline, accounts=[]), "account_id") == set()
    metric = riskbook.limits.get("MaxLeverage").metric(h)
    assert drawn(viz.metric_chart(metric, limit=1.0, accounts="ACC-2"), "account_id") == {"ACC-2"}
    chart = viz.position_chart(riskbook.position_timeline(h), account="ACC-1", symbols="BOLT")
    assert drawn(chart, "symbol") == {"BOLT"}
    end = T0 + timedelta(hours=1)
    one = viz.event_lanes(h, start=T0, end=end, accounts="ACC-1", symbols="ACME")
    assert one.equals(viz.event_lanes(h, start=T0, end=end, accounts=["ACC-1"], symbols=["ACME"]))
    assert one["summary"].str.contains("ACME").any() and set(one["account_id"]) == {"ACC-1"}
    with pytest.raises(TypeError, match=r"^accounts must hold strings, got 1 \(int\)$"):
        viz.exposure_chart(timeline, accounts=["ACC-1", 1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^symbols must be a string or a collection of strings"):
        viz.event_lanes(h, start=T0, end=end, symbols=5)  # type: ignore[arg-type]


def test_builders_check_their_times_as_the_projections_do() -> None:
    h = _two_accounts()
    timeline = riskbook.account_timeline(h)
    found = pl.DataFrame(
        {"account_id": ["ACC-1"], "limit_type": ["MaxLeverage"], "symbol": [None], "level": [1.0],
         "started_at": [T0], "ended_at": [None], "peak_value": [3.0], "limit_value": [2.0],
         "trigger_event_id": ["e1"]},
        schema_overrides={"symbol": pl.String, "ended_at": pl.Datetime("us", "UTC")},
    )  # fmt: skip
    lanes = viz.event_lanes(h, start=T0, end=T0 + timedelta(hours=1))
    commits = pl.DataFrame(schema=viz.LIVE_COMMITS_SCHEMA)
    calls: list[tuple[str, Callable[[Any], Any]]] = [
        ("at", lambda v: viz.exposure_chart(timeline, at=v)),
        ("at", lambda v: viz.exposure_at_chart(riskbook.positions(h), at=v)),
        ("start", lambda v: viz.breach_chart(found, start=v)),
        ("horizon", lambda v: viz.breach_chart(found, horizon=v)),
        ("end", lambda v: viz.event_lanes(h, start=T0, end=v)),
        ("known_at", lambda v: viz.equity_chart(timeline, account="ACC-1", known_at=v)),
        ("end", lambda v: viz.limit_steps(h.limits, account="A", limit_type="X", end=v)),
        ("cursor", lambda v: viz.event_chart(lanes, cursor=v)),
        ("end", lambda v: viz.live_chart(commits, end=v)),
    ]
    for name, call in calls:
        for bad, error, says in (
            (date(2024, 1, 9), TypeError, "must be a datetime or an RFC 3339 string, got date"),
            (np.datetime64("2024-01-09T15:00"), TypeError, "must be .* string, got datetime64"),
            (datetime(2024, 1, 9, 15), ValueError, "has no time zone: give UTC explicitly"),
        ):
            with pytest.raises(error, match=f"^{name} {says}$"):
                call(bad)
        call("2024-01-09T15:00:00Z")  # RFC 3339 text, as every projection takes it
    spec = viz.exposure_chart(timeline, at="2024-01-09T14:35:00+00:00").to_dict()
    at = T0 + timedelta(minutes=5)
    assert [p["value"] for p in spec["params"] if p["name"] == "at"] == [at.timestamp() * 1000]


def test_builders_refuse_a_cap_below_one_and_frames_of_another_kind() -> None:
    import pandas as pd  # the bench group, installed by default (pyproject: default-groups)

    timeline = riskbook.account_timeline(_two_accounts())
    for call in (
        lambda n: viz.exposure_chart(timeline, max_rows=n),
        lambda n: viz.downsample(timeline, x="occurred_at", y="equity", max_rows=n),
        lambda n: viz.event_lanes(_two_accounts(), start=T0, end=T0, max_rows=n),
    ):
        with pytest.raises(ValueError, match=r"^max_rows must be at least 1; got 0$"):
            call(0)
        with pytest.raises(TypeError, match=r"^max_rows must be an integer, got float$"):
            call(2.5)
    numpy_int: Any = np.int64(3)  # a whole number of rows, as before
    assert total_rows(viz.exposure_chart(timeline, max_rows=numpy_int)) > 0
    with pytest.raises(
        TypeError,
        match=r"^timeline must be a polars DataFrame, got polars\..*LazyFrame: call \.collect\(\)",
    ):
        viz.exposure_chart(timeline.lazy())  # type: ignore[arg-type]
    pandas_frame: Any = pd.DataFrame({"a": [1]})
    with pytest.raises(
        TypeError, match=r"^limits must be a polars DataFrame, got pandas\..*from_pandas$"
    ):
        viz.limit_steps(pandas_frame, account="A", limit_type="MaxLeverage")
    with pytest.raises(TypeError, match=r"^breaches must be a polars DataFrame"):
        viz.breach_chart(timeline.lazy())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- what is drawn


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def series_ends(chart: alt.TopLevelMixin, key: str, has: str) -> dict[Any, int]:
    """The last time drawn of each series (by ``key``) in the rows holding ``has``."""
    ends: dict[Any, int] = {}
    for rows in datasets(chart).values():
        for r in rows:
            if has in r and key in r:
                ends[r[key]] = max(ends.get(r[key], r["t"]), r["t"])
    return ends


def rows_with(chart: alt.TopLevelMixin, field: str) -> list[dict[str, Any]]:
    return [r for rows in datasets(chart).values() for r in rows if field in r]


def subtitle(chart: alt.TopLevelMixin) -> str:
    """A chart's subtitle as one text (a stacked chart's: its top panel's)."""
    spec = chart.to_dict()
    title = spec.get("title") or spec["vconcat"][0]["title"]
    sub = title["subtitle"]
    return " / ".join(sub) if isinstance(sub, list) else str(sub)


def _set(limit_type: str, value: float, account: str = "ACC-1", **kw: Any) -> riskbook.LimitSet:
    return riskbook.LimitSet(
        account_id=account,
        limit_type=limit_type,
        value=value,
        set_by="cro",
        set_at=kw.pop("set_at", T0),
        **kw,
    )


def test_step_lines_run_on_to_the_end_of_the_chart() -> None:
    h = _two_accounts(
        _set("MaxLeverage", 5.0, "ACC-2"),
        _set("MaxDrawdown", 0.5, "ACC-2"),
        _set("MaxPositionSize", 1_000.0, "ACC-2"),
    )
    end = ms(T0 + timedelta(minutes=3))  # ACC-1's BOLT trade: the last event
    timeline, positions = riskbook.account_timeline(h), riskbook.position_timeline(h)
    # ACC-2's only trade (minute 2) is still held at the end, as is ACC-1's ACME (minute 1)
    chart = viz.position_chart(positions, account="ACC-2", limits=h.limits)
    assert series_ends(chart, "symbol", has="quantity") == {"ACME": end}
    assert [r["quantity"] for r in rows_with(chart, "quantity") if r["t"] == end] == [100.0]
    assert max(r["t"] for r in rows_with(chart, "set_by")) == end  # the limit too
    chart = viz.position_chart(positions, account="ACC-1")
    assert series_ends(chart, "symbol", has="quantity") == {"ACME": end, "BOLT": end}
    chart = viz.exposure_chart(timeline)
    assert series_ends(chart, "account_id", has="gross_exposure") == {"ACC-1": end, "ACC-2": end}
    for chart in (
        viz.equity_chart(timeline, account="ACC-2", limits=h.limits),
        viz.leverage_chart(timeline, h.limits, account="ACC-2"),
    ):
        assert max(r["t"] for r in rows_with(chart, "equity")) == end
        assert max(r["t"] for r in rows_with(chart, "set_by")) == end
    metric = riskbook.limits.get("MaxLeverage").metric(h)
    chart = viz.metric_chart(metric, limit=1.0)
    assert series_ends(chart, "account_id", has="value") == {"ACC-1": end, "ACC-2": end}
    # an end given: every line and every limit runs to it
    later = T0 + timedelta(hours=1)
    for chart in (
        viz.position_chart(positions, account="ACC-2", limits=h.limits, end=later),
        viz.equity_chart(timeline, account="ACC-2", limits=h.limits, end=later),
        viz.leverage_chart(timeline, h.limits, account="ACC-2", end=later),
        viz.exposure_chart(timeline, end=later),
        viz.metric_chart(metric, end=later),
    ):
        drawn = [r for r in rows_with(chart, "t") if "one" not in r]
        assert max(r["t"] for r in drawn) == ms(later)
        ends = {(r.get("account_id"), r.get("symbol"), "set_by" in r): r["t"] for r in drawn}
        assert set(ends.values()) == {ms(later)}, ends  # each series' last row


def test_position_and_leverage_charts_draw_the_window_asked_for() -> None:
    h = _two_accounts(
        _set("MaxPositionSize", 1_000.0),
        _set("MaxPositionSize", 2_000.0, set_at=T0 + timedelta(minutes=10)),
        _set("MaxLeverage", 3.0),
        _set("MaxLeverage", 4.0, set_at=T0 + timedelta(minutes=10)),
    )
    start, end = T0 + timedelta(minutes=2), T0 + timedelta(minutes=5)
    positions = riskbook.position_timeline(h)
    chart = viz.position_chart(positions, account="ACC-1", limits=h.limits, start=start, end=end)
    drawn = sorted((r["symbol"], r["t"], r["quantity"]) for r in rows_with(chart, "quantity"))
    assert drawn == [
        ("ACME", ms(start), 100.0),  # bought at minute 1: held at the window's start
        ("ACME", ms(end), 100.0),
        ("BOLT", ms(T0 + timedelta(minutes=3)), 100.0),
        ("BOLT", ms(end), 100.0),
    ]
    limit = rows_with(chart, "set_by")  # the raise at minute 10 is after the window
    assert {r["value"] for r in limit} == {1_000.0}
    assert {r["t"] for r in limit} == {ms(start), ms(end)}
    timeline = riskbook.account_timeline(h)
    chart = viz.leverage_chart(timeline, h.limits, account="ACC-1", start=start, end=end)
    assert {r["t"] for r in rows_with(chart, "equity")} <= set(range(ms(start), ms(end) + 1))
    assert {r["value"] for r in rows_with(chart, "set_by")} == {3.0}
    # a timeline filtered beforehand: the limit lines begin with its first row, not before
    later = positions.filter(pl.col("occurred_at") >= T0 + timedelta(minutes=2))
    chart = viz.position_chart(later, account="ACC-1", limits=h.limits)
    first = ms(T0 + timedelta(minutes=3))  # the BOLT trade
    assert min(r["t"] for r in rows_with(chart, "t")) == first
    assert {r["t"] for r in rows_with(chart, "set_by")} == {first}  # no later sets in it


def test_charts_say_when_a_limit_or_the_account_is_missing() -> None:
    h = _two_accounts()
    timeline, positions = riskbook.account_timeline(h), riskbook.position_timeline(h)
    said = subtitle(viz.leverage_chart(timeline, h.limits, account="ACC-1"))
    assert "no MaxLeverage set for this account" in said and "over it" not in said
    said = subtitle(viz.position_chart(positions, account="ACC-1", limits=h.limits))
    assert "no MaxPositionSize set for this account" in said and "dashed" not in said
    said = subtitle(viz.equity_chart(timeline, account="ACC-1", limits=h.limits))
    assert "no MaxDrawdown set for this account" in said
    for chart, what in (
        (viz.leverage_chart(timeline, h.limits, account="ACC-9"), "timeline rows"),
        (viz.equity_chart(timeline, account="ACC-9"), "timeline rows"),
        (viz.position_chart(positions, account="ACC-9", limits=h.limits), "positions"),
    ):
        said = subtitle(chart)
        assert f"no {what} of account 'ACC-9' (this timeline holds ACC-1, ACC-2)" in said, said
    empty = viz.exposure_at_chart(riskbook.positions(h).clear(), at=T0)
    assert subtitle(empty) == "no open positions at 2024-01-09 14:30:00 UTC"
    latest = subtitle(viz.exposure_at_chart(riskbook.positions(h)))
    assert latest == "latest (last position change 2024-01-09 14:33:00 UTC)"


def test_subtitles_give_the_dates_shown() -> None:
    h = _two_accounts()
    timeline, positions = riskbook.account_timeline(h), riskbook.position_timeline(h)
    metric = riskbook.limits.get("MaxLeverage").metric(h)
    for chart, first in (
        (viz.exposure_chart(timeline), "14:30"),
        (viz.position_chart(positions, account="ACC-1"), "14:31"),
        (viz.equity_chart(timeline, account="ACC-1"), "14:30"),
        (viz.leverage_chart(timeline, h.limits, account="ACC-1"), "14:30"),
        (viz.metric_chart(metric), "14:30"),
    ):
        assert subtitle(chart).startswith(f"Tue 2024-01-09 {first} to 14:33 UTC; ")
    breaches = subtitle(viz.breach_chart(_breaches(), start=T0, end=T0 + timedelta(hours=5)))
    assert breaches.startswith("Tue 2024-01-09 14:30 to 19:30 UTC; ")


def test_breach_chart_gives_each_symbol_its_lane_and_marks_open_breaches() -> None:
    bolt = (
        _breaches()
        .filter(pl.col("trigger_event_id") == "e3")
        .with_columns(symbol=pl.lit("BOLT"), trigger_event_id=pl.lit("e5"))
    )  # at the same time as ACME's: one lane would draw them on each other
    chart = viz.breach_chart(pl.concat([_breaches(), bolt]), end=T0 + timedelta(hours=5))
    rows = rows_with(chart, "track")
    assert {r["trigger_event_id"]: r["track"] for r in rows} == {
        "e1": "ACC-001 · MaxPositionSize · ACME",
        "e2": "ACC-001 · MaxPositionSize · ACME",
        "e3": "ACC-001 · MaxPositionSize · ACME",
        "e5": "ACC-001 · MaxPositionSize · BOLT",
        "e4": "ACC-003 · MaxLeverage",  # account-wide: no symbol
    }
    assert {r["lane"] for r in rows} == {"ACC-001 · MaxPositionSize", "ACC-003 · MaxLeverage"}
    layers = chart.to_dict()["layer"]
    assert {layer["encoding"]["y"]["field"] for layer in layers if "y" in layer["encoding"]} == {
        "track"
    }
    (arrow,) = [layer for layer in layers if layer["mark"].get("shape") == "triangle-right"]
    assert arrow["encoding"]["x"]["field"] == "t2" and "datum.open" in json.dumps(arrow)
    assert "▶ 1 still open" in subtitle(chart)
    closed = viz.breach_chart(_breaches().filter(pl.col("ended_at").is_not_null()))
    assert not [layer for layer in closed.to_dict()["layer"] if "shape" in layer["mark"]]


def test_position_and_equity_charts_mark_rows_over_the_limit() -> None:
    h = _two_accounts(
        _set("MaxPositionSize", 150.0),
        _set("MaxPositionSize", 50.0, symbol="ACME"),  # ACME's own: 100 is over it
        _set("MaxDrawdown", 0.04),
        riskbook.PriceMarked(symbol="ACME", price=5.0, marked_at=T0 + timedelta(minutes=4)),
    )
    chart = viz.position_chart(riskbook.position_timeline(h), account="ACC-1", limits=h.limits)
    over = {(r["symbol"], r["over"]) for r in rows_with(chart, "quantity")}
    assert over == {("ACME", True), ("BOLT", False)}
    assert "red: 1 timeline row over it" in subtitle(chart)  # ACME's trade (then held)
    timeline = riskbook.account_timeline(h)
    chart = viz.equity_chart(timeline, account="ACC-1", limits=h.limits)
    rows = rows_with(chart, "drawdown_over")
    assert rows and all(
        (r["drawdown_over"] > 0) == (r["drawdown"] > 0.04) and r["over"] == (r["drawdown"] > 0.04)
        for r in rows
    )
    assert any(r["drawdown_over"] > 0 for r in rows)
    red = [
        layer
        for layer in chart.to_dict()["vconcat"][1]["layer"]
        if layer["encoding"].get("y", {}).get("field") == "drawdown_over"
    ]
    assert red and red[0]["mark"]["color"] == "#d62728"
    assert chart.to_dict()["resolve"] == {"scale": {"x": "shared"}}


def test_the_red_of_a_drawdown_ends_where_the_limit_is_raised_above_it() -> None:
    # The limit went from 4% to 90% at minute 5, between two timeline rows (minutes 4
    # and 8): the red ran on to minute 8.
    h = _two_accounts(
        _set("MaxDrawdown", 0.04),
        riskbook.PriceMarked(symbol="ACME", price=5.0, marked_at=T0 + timedelta(minutes=4)),
        _set("MaxDrawdown", 0.9, set_at=T0 + timedelta(minutes=5)),
        riskbook.PriceMarked(symbol="BOLT", price=10.0, marked_at=T0 + timedelta(minutes=8)),
    )
    chart = viz.equity_chart(riskbook.account_timeline(h), account="ACC-1", limits=h.limits)
    rows = {r["t"]: r for r in rows_with(chart, "drawdown_over")}
    four, five, eight = (ms(T0 + timedelta(minutes=m)) for m in (4, 5, 8))
    assert rows[four]["drawdown_over"] > 0.04 and rows[four]["limit"] == 0.04
    assert rows[five]["drawdown"] == rows[four]["drawdown"]  # held until the next row
    assert (rows[five]["drawdown_over"], rows[five]["limit"]) == (0.0, 0.9)
    assert rows[five]["event_type"] == "LimitSet" and rows[eight]["drawdown_over"] == 0.0
    assert "red: 1 timeline row over it" in subtitle(chart)  # the rows of the history


def test_si_axes_label_zero_as_zero(tmp_path: Path) -> None:
    # Vega gives every tick the prefix of the largest: the zero of a 0-2k axis read "0k"
    # (the sample's exposure chart: "0M").
    chart = viz.exposure_chart(riskbook.account_timeline(_two_accounts()))
    svg = viz.save_svg(chart, tmp_path / "exposure.svg").read_text()
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "0" in texts and "0k" not in texts, texts
    assert {"1k", "2k"} <= set(texts)  # the prefix stays on the others


def test_event_chart_keeps_its_window_when_an_event_was_recorded_late() -> None:
    h = _two_accounts()
    lanes = viz.event_lanes(h, start=T0, end=T0 + timedelta(minutes=30))
    trade = lanes.filter(pl.col("summary").str.contains("T2")).row(0, named=True)
    lanes = lanes.with_columns(  # T2 (minute 2) recorded 19 hours after it happened
        pl.when(pl.col("event_id") == trade["event_id"])
        .then(pl.col("timestamp") + timedelta(hours=19))
        .otherwise(pl.col("timestamp"))
        .alias("timestamp")
    )
    spec = viz.event_chart(lanes, focus=trade["event_id"]).to_dict()
    pad = timedelta(minutes=3) * 0.03  # the events span three minutes
    window = [ms(T0 - pad), ms(T0 + timedelta(minutes=3) + pad)]
    domains = [
        layer["encoding"]["x"]["scale"]["domain"]
        for layer in spec["layer"]
        if "domain" in layer["encoding"].get("x", {}).get("scale", {})
    ]
    assert len(domains) >= 4 and all(d == window for d in domains), domains
    late = [r for rs in spec["datasets"].values() for r in rs if "recorded_drawn" in r]
    assert {r["recorded_drawn"] for r in late} == {window[1]}  # cut at the right edge
    assert {r["late_note"] for r in late if "late_note" in r} == {"recorded +19 h →"}
    # the focus at minute 2, past the middle: its label reads leftwards from it
    (label,) = [
        layer
        for layer in spec["layer"]
        if layer["mark"]["type"] == "text" and layer["encoding"]["text"]["field"] == "summary"
    ]
    assert label["mark"]["align"] == "right" and label["mark"]["dx"] < 0
    assert spec["title"]["subtitle"][1] == "ringed: TradeExecuted Buy 100 ACME @ 10 (T2)"


def test_live_chart_panels_share_one_exact_time_axis() -> None:
    t0 = datetime(2026, 1, 5, 9, 30, 0, 137_000, tzinfo=UTC)
    times = [t0 + timedelta(milliseconds=97 * i) for i in range(60)]
    commits = pl.DataFrame(
        [(t, 100 + i, 5, int(i in (13, 41)), 0, 0.02) for i, t in enumerate(times)],
        schema=viz.LIVE_COMMITS_SCHEMA,
        orient="row",
    )
    effects = pl.DataFrame(
        [(times[i], "LimitViolationDetected", "A", "MaxPositionSize", "X", 10.0, 5.0, 100 + i)
         for i in (13, 41)],
        schema=viz.LIVE_EFFECTS_SCHEMA,
        orient="row",
    )  # fmt: skip
    spec = viz.live_chart(commits, effects).to_dict()
    assert spec["resolve"] == {"scale": {"x": "shared"}}
    window = [ms(t0 - timedelta(seconds=1)), ms(times[-1])]  # a short run fills the axis
    for panel in spec["vconcat"]:
        assert panel["encoding"]["x"]["scale"] == {"type": "utc", "domain": window, "nice": False}
    axis = spec["vconcat"][-1]["encoding"]["x"]["axis"]
    assert axis["format"]["milliseconds"] == "%H:%M:%S.%L"  # "09:30:01.500", not "01.500"
    assert spec["title"]["subtitle"].startswith("the last 6.72 s, to 2026-01-05 09:30:05 UTC:")


def test_ratio_chart_leaves_room_for_its_longest_label() -> None:
    long = "load 300,000 events into a History from PostgreSQL, cold, against pandas read_sql"
    frame = pl.DataFrame({"label": [long, "short"], "group": ["a", "b"], "ratio": [3.0, 0.5]})
    spec = viz.ratio_chart(frame, text=None).to_dict()
    limit = spec["layer"][0]["encoding"]["y"]["axis"]["labelLimit"]
    assert limit >= 7 * len(long)  # Vega cuts a label longer than labelLimit px with "…"
