"""Hunt: the notebooks' logic (widgets and chart builders) against the library's own routes.

Each ``test_bug_*`` is a confirmed disagreement (failing); the other tests are properties
that held. All histories are in memory (no database needed).
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import polars as pl
import pytest

import riskbook as R
from riskbook import limits as L
from riskbook import viz, widgets
from riskbook.frames import Filters
from tests.test_widgets import T0, _at, _Envelopes, _fill, _limit

CMP = ["account_id", "symbol", "started_at", "ended_at", "peak_value", "limit_value"]


def _rows(chart: Any) -> list[dict[str, Any]]:
    spec = chart.to_dict() if hasattr(chart, "to_dict") else chart.chart.to_dict()
    return [r for rs in spec["datasets"].values() for r in rs]


def _ms(t: Any) -> float:
    return t.timestamp() * 1000


def _held(rows: list[dict[str, Any]], key: str, who: str, t: Any, col: str) -> Any:
    """What a step-after line of ``who`` shows just after ``t``: its last data row at or
    before ``t`` (rows as the chart carries them, in their order)."""
    mine = [r for r in rows if r.get(key) == who and col in r and r["t"] <= _ms(t)]
    return mine[-1][col] if mine else None


def _star_history() -> tuple[R.History, str]:
    """A limit set for every account ("*"), breached by account A's fill; the engine's
    violation caused by the fill."""
    e = _Envelopes()
    e.add(R.AccountFunded(account_id="A", amount=1e4, funded_at=T0))
    e.add(
        R.LimitSet(
            account_id="*", limit_type="MaxPositionSize", value=100.0, set_by="cro", set_at=T0
        )
    )
    fill = e.add(_fill(1, 150.0, _at(1)))
    v = e.add(
        R.LimitViolationDetected(
            account_id="A",
            limit_type="MaxPositionSize",
            symbol="ACME",
            current_value=150.0,
            limit_value=100.0,
            detected_at=_at(1),
        ),
        cause=fill,
    )
    return e.history(), str(v.event_id)


def _cmp(frame: pl.DataFrame) -> pl.DataFrame:
    return (
        frame.select(CMP)
        .with_columns(pl.col("account_id", "symbol").cast(pl.String))
        .sort("account_id", "symbol", "started_at", nulls_last=True)
    )


# ----------------------------------------------------------------------------- bugs


def test_bug_star_limit_is_not_in_force_for_the_incident_panel() -> None:
    """A limit stored for every account ("*") applies to account A: ``riskbook.breaches``
    finds A's breach against it (limit 100) and ``audit.explain`` names it as the limit
    in force. Expected: ``limits_in_force`` / ``limit_in_force`` (and so the incident
    panel's "Limits in force at T" and its verdict) report that 100 limit. Actual: they
    filter ``account_id == account`` only, return nothing / None, and the panel says
    "No limit of this type was in force at T as known at K". Contract: DESIGN §5 (a
    LimitSet applies from set_at; "*" is every account, riskbook.limits docs).
    Cause: riskbook/audit.py ``limits_in_force`` (no "*" rows)."""
    h, violation = _star_history()
    found = R.breaches(h, levels=1.0)
    assert found.height == 1 and found["limit_value"][0] == 100.0  # the library's route
    assert "set by cro" in widgets.explain(h, violation).report()  # audit.explain sees it

    got = widgets.limit_in_force(
        h.limits, account="A", limit_type="MaxPositionSize", symbol="ACME", at=_at(2)
    )
    assert got is not None and got["value"] == 100.0
    panel = widgets.IncidentPanel(h, incident=violation)
    assert panel.limit is not None and panel.limit["value"] == 100.0
    assert "No limit of this type" not in panel.limit_box.value


def test_bug_star_limits_are_not_drawn_on_the_account_charts() -> None:
    """The exposure explorer's per-account charts draw the limits in force from
    ``viz.limit_steps``, which keeps only rows whose account_id is the account: a "*"
    MaxPositionSize / MaxLeverage is missing. Expected: the position chart marks the
    150 position red against its 100 limit and draws the limit line (as breaches()
    reports the breach); the leverage chart draws MaxLeverage 0.01. Actual: subtitles
    say "no MaxPositionSize set for this account" / "no MaxLeverage set for this
    account", no red rows. Contract: DESIGN §5 ("*" limits apply to every account) and
    the charts' docstrings (rows over the limit in force marked red).
    Cause: riskbook/viz.py ``limit_steps`` (filter on account_id only)."""
    e = _Envelopes()
    e.add(R.AccountFunded(account_id="A", amount=1e4, funded_at=T0))
    for lt, v in (("MaxPositionSize", 100.0), ("MaxLeverage", 0.01)):
        e.add(R.LimitSet(account_id="*", limit_type=lt, value=v, set_by="cro", set_at=T0))
    e.add(_fill(1, 150.0, _at(1)))
    h = e.history()
    assert set(R.breaches(h, levels=1.0)["limit_type"].cast(pl.String)) == {
        "MaxPositionSize",
        "MaxLeverage",
    }

    panel = widgets.ExposureExplorer(h, account="A")
    assert panel.positions is not None and panel.leverage is not None
    pos_spec = panel.positions.chart.to_dict()
    assert "no MaxPositionSize set" not in pos_spec["title"]["subtitle"]
    assert any(r.get("over") for r in _rows(panel.positions))
    lev_spec = panel.leverage.chart.to_dict()
    assert "no MaxLeverage set" not in lev_spec["title"]["subtitle"]


def test_bug_incident_window_drops_the_star_limit_that_started_the_breach() -> None:
    """A breach started by a "*" LimitSet that lowered the limit under A's position:
    breaches() names that LimitSet as the trigger. Expected: the incident panel's
    window (``viz.event_lanes(accounts=[A])``) holds it, as ``riskbook.load``'s
    accounts filter keeps "*" limits "which apply to them too" (frames.Filters).
    Actual: event_lanes filters LimitSet rows on account_id == A, so the trigger is not
    among the steps. Cause: riskbook/lanes.py ``window()`` (accounts filter)."""
    e = _Envelopes()
    e.add(R.AccountFunded(account_id="A", amount=1e4, funded_at=T0))
    e.add(_fill(1, 150.0, _at(1)))
    lower = e.add(
        R.LimitSet(
            account_id="*", limit_type="MaxPositionSize", value=100.0, set_by="cro", set_at=_at(2)
        )
    )
    e.add(
        R.LimitViolationDetected(
            account_id="A",
            limit_type="MaxPositionSize",
            symbol="ACME",
            current_value=150.0,
            limit_value=100.0,
            detected_at=_at(2),
        ),
        cause=lower,
    )
    h = e.history()
    found = R.breaches(h, levels=1.0)
    assert found["trigger_event_id"].to_list() == [str(lower.event_id)]
    panel = widgets.IncidentPanel(h)
    assert str(lower.event_id) in panel.window["event_id"].to_list()


def test_bug_limit_lab_horizon_takes_a_bust_cancelled_at() -> None:
    """LimitLab / limit_sweep claim to give exactly backtest's hypothetical rows. A bust
    whose cancelled_at is two days after the last other event: backtest's horizon leaves
    it out (a bust acts when known, whatever its cancelled_at: DESIGN §4; limits
    ``_horizon``), so the day's MaxDailyVolume breach is still open. Actual: the lab's
    horizon is the bust's cancelled_at, the breach is closed at midnight, and
    hours_in_breach (9.48 h) is not backtest's. Cause: riskbook/widgets.py
    ``_Backtest.__init__`` (horizon = max occurred_at of every event, busts included,
    instead of limits._api._latest_event / _horizon)."""
    e = _Envelopes()
    e.add(R.AccountFunded(account_id="A", amount=1e6, funded_at=T0))
    e.add(_fill(1, 150.0, _at(1)))
    e.add(_fill(2, 10.0, _at(2)))
    e.add(
        R.TradeCancelled(
            trade_id="T2", account_id="A", reason="bust", cancelled_at=T0 + timedelta(days=2)
        )
    )
    h = e.history()
    what_if = [{"account_id": "*", "limit_type": "MaxDailyVolume", "value": 100.0}]
    bt = L.backtest(h, what_if, levels=1.0).filter(pl.col("scenario") == "hypothetical")
    assert bt["ended_at"].to_list() == [None]  # open at the latest business time known
    lab = widgets.LimitLab(h, "MaxDailyVolume", value=100.0, sweep=False)
    assert _cmp(lab.breaches).equals(_cmp(bt))


def test_bug_limit_lab_ignores_the_histories_until() -> None:
    """A History loaded with ``until`` (a day after the last event): backtest ends the
    day's daily-volume breach at midnight (limits ``_horizon``: "the until a History was
    loaded with ... a daily breach ended at a midnight before it"); LimitLab, which
    claims backtest's rows, leaves it open. Cause: riskbook/widgets.py
    ``_Backtest.__init__`` (horizon ignores history.filters.until)."""
    e = _Envelopes()
    e.add(R.AccountFunded(account_id="A", amount=1e6, funded_at=T0))
    e.add(_fill(1, 150.0, _at(1)))
    h = R.History.from_envelopes(e.items, filters=Filters(until=T0 + timedelta(days=1)))
    what_if = [{"account_id": "*", "limit_type": "MaxDailyVolume", "value": 100.0}]
    bt = L.backtest(h, what_if, levels=1.0).filter(pl.col("scenario") == "hypothetical")
    lab = widgets.LimitLab(h, "MaxDailyVolume", value=100.0, sweep=False)
    assert _cmp(lab.breaches).equals(_cmp(bt))


def _tied_history() -> R.History:
    """Three accounts, each with two fills at the same business time, five times."""
    evs: list[Any] = [R.AccountFunded(account_id=a, amount=1e4, funded_at=T0) for a in "ABC"]
    n = 0
    for i in range(1, 6):
        for a in "ABC":
            n += 1
            evs.append(_fill(n, 10.0, _at(i), account=a))
            n += 1
            evs.append(_fill(n, 20.0, _at(i), account=a))
    return R.History.from_events(*evs)


def test_bug_exposure_overview_reorders_rows_of_the_same_time() -> None:
    """Timeline rows are in the order of DESIGN §4 and "the state at T equals the last
    timeline row at or before T". The overview (viz.exposure_chart, a step-after line)
    must carry each account's rows in that order. Actual: ``viz.downsample`` sorts by
    (account, time) with an unstable sort, so two rows of one time swap: the line holds
    the figure of the first fill after T (e.g. A's final gross 650 instead of 750, the
    value accounts() gives). Cause: riskbook/viz.py ``downsample`` (``frame.sort([*keys,
    x])`` and ``frame.sort(x)`` without maintain_order=True)."""
    h = _tied_history()
    panel = widgets.ExposureExplorer(h)
    rows = _rows(panel.overview)
    wrong = []
    for i in range(1, 6):
        acc = R.accounts(h, at=_at(i))
        for a, gross in acc.select(pl.col("account_id").cast(pl.String), "gross_exposure").rows():
            shown = _held(rows, "account_id", a, _at(i), "gross_exposure")
            if shown != gross:
                wrong.append((a, i, shown, gross))
    assert wrong == []


def test_bug_downsample_keeps_a_small_frame_in_its_order() -> None:
    """``viz.downsample``: "A frame already small enough is returned unchanged (sorted
    by x)" and "a step chart of the result has the same ... final value". With 3 series
    of 10 rows in pairs of equal times, rows of one time come back swapped."""
    rows = []
    for i in range(5):
        for a in "ABC":
            for _ in range(2):
                rows.append((a, T0 + timedelta(minutes=i), float(len(rows))))
    frame = pl.DataFrame(rows, schema=["account_id", "occurred_at", "v"], orient="row")
    got = viz.downsample(frame, x="occurred_at", y="v", by="account_id")
    assert got["v"].to_list() == frame.sort("account_id", maintain_order=True)["v"].to_list()


def test_bug_position_chart_reorders_fills_of_the_same_time() -> None:
    """The explorer's position chart of a picked account: per symbol, the quantity held
    after T must be ``positions(at=T)``'s. Two fills per symbol at one time, three
    symbols: the rows of one time are swapped and the line shows the quantity between
    the two fills. Cause: riskbook/viz.py ``downsample`` (unstable sort by (symbol, time));
    with a limit given, ``position_chart``'s ``over_limit`` sorts unstably too."""
    evs: list[Any] = [R.AccountFunded(account_id=a, amount=1e4, funded_at=T0) for a in "ABC"]
    n = 0
    for i in range(1, 8):
        for s in ("S1", "S2", "S3"):
            for a in "ABC":
                n += 1
                evs.append(_fill(n, 10.0, _at(i), account=a, symbol=s))
                n += 1
                evs.append(_fill(n, -4.0, _at(i), account=a, symbol=s))
    h = R.History.from_events(*evs)
    panel = widgets.ExposureExplorer(h, account="A")
    assert panel.positions is not None
    rows = [r for r in _rows(panel.positions) if "quantity" in r and "trade_id" in r]
    wrong = []
    for i in range(1, 8):
        pos = R.positions(h, at=_at(i)).filter(pl.col("account_id") == "A")
        for s, q in pos.select(pl.col("symbol").cast(pl.String), "quantity").rows():
            shown = _held(rows, "symbol", s, _at(i), "quantity")
            if shown != q:
                wrong.append((s, i, shown, q))
    assert wrong == []


# ----------------------------------------------------------------------------- held


def _random_history(seed: int, star: tuple[tuple[str, float], ...] = ()) -> R.History:
    """Three accounts (one unicode), symbols with ':' and a space; distinct times."""
    rnd = random.Random(seed)
    accs, syms = ["A", "Zoë ü", "B"], ["ACME", "X:Y", "BRK B"]
    evs: list[Any] = [R.AccountFunded(account_id=a, amount=2000.0, funded_at=T0) for a in accs]
    evs += [
        R.LimitSet(account_id="*", limit_type=lt, value=v, set_by="cro", set_at=T0)
        for lt, v in star
    ]
    minutes = rnd.sample(range(1, 3000), 45)
    for i, m in enumerate(sorted(minutes)):
        t = T0 + timedelta(minutes=m)
        if rnd.random() < 0.7:
            evs.append(
                R.TradeExecuted(
                    trade_id=f"T{i}",
                    account_id=rnd.choice(accs),
                    symbol=rnd.choice(syms),
                    side=rnd.choice([R.Side.Buy, R.Side.Sell]),
                    quantity=float(rnd.randint(1, 50)),
                    price=float(rnd.randint(5, 20)),
                    executed_at=t,
                )
            )
        else:
            evs.append(
                R.PriceMarked(symbol=rnd.choice(syms), price=float(rnd.randint(5, 20)), marked_at=t)
            )
    return R.History.from_events(*evs)


@pytest.mark.parametrize(
    ("limit_type", "value"),
    [
        ("MaxPositionSize", 40.0),
        ("MaxLeverage", 0.5),
        ("MaxDrawdown", 0.05),
        ("MaxDailyVolume", 60.0),
    ],
)
def test_limit_lab_equals_the_same_limit_stored_for_every_account(
    limit_type: str, value: float
) -> None:
    """Held: the lab's hypothetical "*" limit gives breaches() of the same limit stored."""
    for seed in range(2):
        lab = widgets.LimitLab(_random_history(seed), limit_type, value=value, sweep=False)
        stored = _random_history(seed, ((limit_type, value),))
        assert _cmp(lab.breaches).equals(_cmp(R.breaches(stored, levels=1.0)))
        sweep = widgets.limit_sweep(_random_history(seed), limit_type, [value])
        assert sweep["breaches"][0] == lab.breaches.height


def test_breach_summary_agrees_with_breaches() -> None:
    """Held: counts, open counts, peaks and hours of breach_summary are breaches()'."""
    h = _random_history(3, (("MaxPositionSize", 30.0), ("MaxLeverage", 0.5)))
    found = R.breaches(h)
    horizon = h.events["occurred_at"].max()
    summary = widgets.breach_summary(found, horizon=horizon, accounts=["A", "Zoë ü", "B", "none"])
    full = found.filter(pl.col("level") == 1.0).with_columns(pl.col("account_id").cast(pl.String))
    for row in summary.iter_rows(named=True):
        mine = full.filter(pl.col("account_id") == row["account_id"])
        assert row["breaches"] == mine.height
        assert row["still_open"] == mine["ended_at"].null_count()
        hours = sum(
            ((e or horizon) - s).total_seconds() / 3600
            for s, e in mine.select("started_at", "ended_at").rows()
        )
        assert row["hours_in_breach"] == pytest.approx(hours)
        if mine.height:
            assert row["peak_value"] == mine["peak_value"].max()


def test_explorer_table_and_bars_agree_with_accounts_and_positions() -> None:
    """Held: at every T (and K), accounts_at is accounts(at=T, known_at=K); the bars sum
    to net exposure and their lengths to gross; the overview holds accounts' figures
    (distinct times: no ties)."""
    h = _random_history(5)
    panel = widgets.ExposureExplorer(h)
    last = h.events["occurred_at"].max()
    for k in (None, T0 + timedelta(minutes=1500)):
        if k is not None:
            panel.known_at.value = k
        for m in (0, 700, 1500, 2999):
            t = T0 + timedelta(minutes=m)
            panel.at.value = t
            acc = R.accounts(h, at=t, known_at=panel.k)
            assert panel.accounts_at.equals(acc)
            bars = [r for r in _rows(panel.snapshot) if "symbol" in r]
            overview = _rows(panel.overview)
            for a in acc.iter_rows(named=True):
                mv = [r["market_value"] for r in bars if r["account_id"] == a["account_id"]]
                assert sum(mv) == pytest.approx(a["net_exposure"], abs=1e-9)
                assert sum(abs(x) for x in mv) == pytest.approx(a["gross_exposure"], abs=1e-9)
                shown = _held(
                    overview, "account_id", a["account_id"], min(t, last), "gross_exposure"
                )
                assert shown == pytest.approx(a["gross_exposure"])


def test_event_lanes_hold_every_event_of_the_window() -> None:
    """Held: without filters, event_lanes has exactly the history's events of the window,
    busts late, unicode accounts and symbols with ':' or spaces included."""
    e = _Envelopes()
    e.add(R.AccountFunded(account_id="Zoë", amount=1e4, funded_at=T0))
    e.add(_limit("MaxPositionSize", 10.0, _at(1)))
    e.add(_fill(1, 20.0, _at(2), account="Zoë", symbol="X:Y"))
    e.add(R.AccountBlocked(account_id="Zoë", reason="r", blocked_by="riskbook", blocked_at=_at(2)))
    e.add(
        R.PositionUpdated(
            account_id="Zoë",
            symbol="X:Y",
            previous_quantity=20.0,
            new_quantity=40.0,
            reason="split",
            updated_at=_at(3),
        )
    )
    e.add(
        R.TradeCancelled(trade_id="T1", account_id="Zoë", reason="bust", cancelled_at=_at(4)),
        recorded=_at(30),
    )
    e.add(
        R.AccountUnblocked(account_id="Zoë", reason="ok", unblocked_by="ops", unblocked_at=_at(5))
    )
    e.add(R.PriceMarked(symbol="BRK B", price=3.0, marked_at=_at(6)))
    e.add(R.PriceMarked(symbol="X:Y", price=3.0, marked_at=_at(20)))  # outside
    h = e.history()
    lanes = viz.event_lanes(h, start=T0, end=_at(10))
    inside = h.events.filter(pl.col("occurred_at").is_between(T0, _at(10)))
    assert sorted(lanes["event_id"]) == sorted(inside["event_id"].cast(pl.String))
    assert lanes["position"].is_sorted()
    viz.event_chart(lanes).to_dict()


def test_panels_and_charts_on_tiny_histories() -> None:
    """Held: marks only, funding only, an empty window: no crash, figures empty/zero."""
    marks = R.History.from_events(R.PriceMarked(symbol="ACME", price=5.0, marked_at=T0))
    funded = R.History.from_events(R.AccountFunded(account_id="Zoë", amount=100.0, funded_at=T0))
    assert widgets.ExposureExplorer(marks).accounts_at.height == 0
    assert widgets.ExposureExplorer(funded).accounts_at["equity"].to_list() == [100.0]
    assert widgets.LimitLab(funded, "MaxPositionSize", value=1.0).summary["breaches"].sum() == 0
    assert widgets.limit_sweep(funded, "MaxPositionSize", [1.0, 2.0])["breaches"].to_list() == [
        0,
        0,
    ]
    assert viz.event_lanes(funded, start=_at(100), end=_at(200)).height == 0
    with pytest.raises(ValueError, match="empty"):
        widgets.ExposureExplorer(R.History.from_events())
