"""Interactive panels for the notebooks: controls, tables and charts over a History.

Panels (DESIGN.md §1 layer 7), each a small class whose widget tree is built once
and whose update functions recompute its frames and redraw its charts in place when a
control changes:

* :class:`ExposureExplorer` -- for quants: a measure of every account over time,
  positions at the time on the ``at`` slider, the history as known at the ``known_at``
  slider, and one account's equity, leverage and positions when it is picked;
* :class:`IncidentPanel` -- for auditors: pick a violation or a block; the state the
  engine saw (as known at the recorded moment) beside the corrected history, the limit
  in force and who set it, the causation chain, and a step control that walks the
  events around it one by one;
* :class:`LimitLab` -- for risk teams: a limit type's value on a slider; every step
  backtests it over the whole history and redraws its breaches beside those of the
  stored limits, a table per account, and where the value sits on the sweep of all
  values;
* :class:`LiveMonitor` -- for the risk desk: a running live processor's violations and
  blocks as they arrive, its throughput and batch times, a pre-trade check form and an
  unblock button.

Each panel keeps what it shows as Polars frames (``panel.accounts_at``,
``panel.compare`` ...) and its charts as ``altair.JupyterChart`` widgets
(``panel.overview.chart`` ...), so a test can set a control's ``.value`` and read both
without a browser. The computations behind the incident panel are module functions
(:func:`incidents`, :func:`limit_in_force`, :func:`limits_in_force`,
:func:`causation_chain`, :func:`compare_states`) and the limit lab
(:func:`breach_summary`, :func:`limit_sweep`) are module functions usable on their own.

Display a panel by leaving it as a cell's last expression (or ``display(panel)``).
"""

from __future__ import annotations

import functools
import hashlib
import html
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import altair as alt
import ipywidgets as widgets
import polars as pl
import traitlets

from riskbook import limits as L
from riskbook import projections as P
from riskbook import viz
from riskbook._time import us
from riskbook.audit import (
    _BUILT_IN_FIGURES,
    Incident,
    _figure,
    _time,
    causation_chain,
    compare_states,
    daily_volume,
    explain,
    incident_metric,
    incidents,
    limit_in_force,
    limit_metric_at,
    limits_in_force,
)
from riskbook.errors import RiskbookError
from riskbook.events import Envelope, as_time
from riskbook.frames import History
from riskbook.live import CheckResult, Commit, Processor
from riskbook.live import check as live_check
from riskbook.live import unblock as live_unblock
from riskbook.store import Store

__all__ = [
    "ExposureExplorer",
    "IncidentPanel",
    "LimitLab",
    "LiveMonitor",
    "TimeSlider",
    "breach_summary",
    "causation_chain",
    "compare_states",
    "daily_volume",
    "html_table",
    "incident_metric",
    "incidents",
    "limit_in_force",
    "limit_metric_at",
    "limit_sweep",
    "limits_in_force",
]

_ALL = "all accounts"


# ----------------------------------------------------------------------------- controls


class TimeSlider(widgets.HBox):
    """A slider over a time range whose ``value`` is an exact UTC datetime.

    Dragging moves ``value`` by whole ``step``\\ s from ``start``; setting ``value`` from
    code keeps it exact to the microsecond (the slider shows the nearest step), so a
    panel can put ``known_at`` precisely on an event's recorded time.

    Parameters
    ----------
    start, end : the range (datetimes with a time zone, or RFC 3339 text).
    value : the first value (default ``end``).
    step : the slider's resolution (a positive timedelta).
    description : the label in front of it.
    """

    value = traitlets.Any()

    def __init__(
        self,
        start: datetime | str,
        end: datetime | str,
        *,
        value: datetime | str | None = None,
        step: timedelta = timedelta(seconds=1),
        description: str = "at",
        continuous_update: bool = True,
    ) -> None:
        if not isinstance(step, timedelta):
            raise TypeError(f"a TimeSlider's step must be a timedelta, got {type(step).__name__}")
        if step <= timedelta(0):
            raise ValueError(f"a TimeSlider's step must be greater than 0; got {step!r}")
        self.start, self.end, self.step = _time(start, "start"), _time(end, "end"), step
        first = as_time(value, "value")
        steps = max(1, int((self.end - self.start) / step))
        self.slider = widgets.IntSlider(
            min=0,
            max=steps,
            step=1,
            readout=False,
            description=description,
            continuous_update=continuous_update,
            layout=widgets.Layout(width="520px"),
            style={"description_width": "70px"},
        )
        self.label = widgets.Label(layout=widgets.Layout(width="260px"))
        self._syncing = False
        super().__init__([self.slider, self.label])
        self.slider.observe(self._dragged, "value")
        self.value = self.end if first is None else first

    def _dragged(self, change: dict[str, Any]) -> None:
        if not self._syncing:
            self.value = min(self.start + change["new"] * self.step, self.end)

    @traitlets.validate("value")
    def _valid(self, proposal: dict[str, Any]) -> datetime:
        v = proposal["value"]
        if not isinstance(v, datetime):
            raise traitlets.TraitError(f"a TimeSlider's value is a datetime, not {v!r}")
        return min(max(_time(v, "value"), self.start), self.end)

    @traitlets.observe("value")
    def _moved(self, change: dict[str, Any]) -> None:
        v: datetime = change["new"]
        self._syncing = True
        try:
            self.slider.value = round((v - self.start) / self.step)
        finally:
            self._syncing = False
        self.label.value = f"{v:%Y-%m-%d %H:%M:%S.%f}"[:-3] + " UTC"

    @property
    def at_end(self) -> bool:
        """True when the slider is at its right end (for ``known_at``: "everything")."""
        return bool(self.value >= self.end)

    def set_range(self, start: datetime | str, end: datetime | str) -> None:
        """Move the ends of the range; the value stays, or goes to the nearer end."""
        self.start, self.end = _time(start, "start"), _time(end, "end")
        self._syncing = True
        try:
            self.slider.max = max(1, int((self.end - self.start) / self.step))
        finally:
            self._syncing = False
        value = min(max(self.value, self.start), self.end)
        if value != self.value:
            self.value = value  # observers see the move
        else:
            self._moved({"new": value})  # the same time, at another place on the slider


def _quantity(v: float) -> str:
    """A quantity as people write it: 1,500 and 0.25 (BTC), never 0 for a fraction."""
    if not math.isfinite(v):
        return str(v)
    text = f"{v:,.8f}".rstrip("0").rstrip(".")
    if text in ("0", "-0") and v != 0:  # smaller than the eighth decimal
        return f"{v:.4g}"
    return "0" if text == "-0" else text


def html_table(
    frame: pl.DataFrame,
    *,
    formats: dict[str, str | Callable[[Any], str]] | None = None,
    highlight: str | None = None,
    max_rows: int = 200,
) -> str:
    """A frame as a compact HTML table: numbers right-aligned with separators.

    Parameters
    ----------
    frame : what to show.
    formats : per column, a Python format spec or a function of the value giving its
        text (default ``,.2f`` for floats).
    highlight : a boolean column; its true rows are shaded red (and it is not shown).
    max_rows : rows shown at most (a note says how many were left out).
    """
    formats = formats or {}
    cols = [c for c in frame.columns if c != highlight]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for row in frame.head(max_rows).iter_rows(named=True):
        cells = []
        for c in cols:
            v = row[c]
            if v is None:
                text, align = "", "left"
            elif isinstance(v, float):
                text, align = _formatted(v, formats.get(c, ",.2f")), "right"
            elif isinstance(v, int) and not isinstance(v, bool):
                text, align = _formatted(v, formats.get(c, ",d")), "right"
            elif isinstance(v, datetime):
                text, align = f"{v:%Y-%m-%d %H:%M:%S.%f}"[:-3], "left"
            else:
                text, align = str(v), "left"
            color = "color:#c0392b;" if isinstance(v, float) and v < 0 else ""
            cells.append(f'<td style="text-align:{align};{color}">{html.escape(text)}</td>')
        shade = ' style="background:#fdecea"' if highlight and row.get(highlight) else ""
        body.append(f"<tr{shade}>{''.join(cells)}</tr>")
    more = (
        f"<div style='color:#777'>{frame.height - max_rows:,} more rows not shown</div>"
        if frame.height > max_rows
        else ""
    )
    return (
        "<table style='border-collapse:collapse;font-size:12px;font-family:sans-serif'>"
        "<style>td,th{padding:2px 8px;border-bottom:1px solid #eee}"
        "th{text-align:left;border-bottom:1px solid #999}</style>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"
    )


def _formatted(v: Any, spec: str | Callable[[Any], str]) -> str:
    return spec(v) if callable(spec) else format(v, spec)


# The module of every riskbook chart: small, so that anywidget finds it loaded at once.
# It imports the chart code (altair's JupyterChart with Vega bundled, ~0.9 MB) once per
# page, shared by every chart of the page, and renders with it.
_CHART_ESM = """
const bundles = (globalThis.__riskbookChartBundles ??= new Map());
export default {
  async render({ model, el, experimental }) {
    const id = model.get("_bundle_id");
    let loading = bundles.get(id);
    if (loading === undefined) {
      const url = URL.createObjectURL(
        new Blob([model.get("_bundle")], { type: "text/javascript" }));
      loading = import(url).finally(() => URL.revokeObjectURL(url));
      bundles.set(id, loading);
    }
    const chart = await loading;
    return chart.default.render({ model, el, experimental });
  },
};
"""


class _Chart(alt.JupyterChart):
    """``altair.JupyterChart`` whose module loads at once, the chart code behind it.

    anywidget 0.11 drops every later message from the kernel to a widget whose module
    took more than 2 s to load (its runtime's ``ready`` is rejected by a timer, and the
    model's message handler awaits it): JupyterChart's own module is the 0.9 MB Vega
    bundle, parsed again for each chart, and on a busy machine a chart drew once and
    then never redrew. Here the module is a few lines; the bundle comes in a trait of
    its own and is imported once per page (see ``_CHART_ESM``).
    """

    _esm = _CHART_ESM
    _bundle = traitlets.Unicode().tag(sync=True)
    _bundle_id = traitlets.Unicode().tag(sync=True)

    @traitlets.default("_bundle")
    def _default_bundle(self) -> str:
        return _chart_bundle()[0]

    @traitlets.default("_bundle_id")
    def _default_bundle_id(self) -> str:
        return _chart_bundle()[1]


@functools.cache
def _chart_bundle() -> tuple[str, str]:
    """altair's JupyterChart module with Vega bundled (no CDN), and a hash naming it."""
    alt.JupyterChart.enable_offline(offline=True)  # Vega from vl-convert's bundle
    code = str(alt.JupyterChart._esm)
    return code, hashlib.sha256(code.encode()).hexdigest()[:16]


def _chart_widget(chart: Any) -> alt.JupyterChart:
    return _Chart(chart, embed_options={"renderer": "svg", "actions": False})


def _set_rule(chart: alt.JupyterChart, value: float | None) -> None:
    """Move a chart's time rule (its ``at`` parameter) without resending its data."""
    chart.params.at = value  # type: ignore[attr-defined]  # Params gets one trait per param


def _pin_rule(chart: alt.JupyterChart, want: Callable[[], float | None]) -> None:
    """Keep a chart's ``at`` parameter where the panel says, whatever the browser does.

    When a chart's spec is replaced, the browser re-embeds it asynchronously and then
    reports the new view's parameters back (the spec's initial values); a ``params.at``
    set in between is lost that way. This puts it back when the report arrives.
    """
    _pin_param(chart, "at", want)


def _pin_param(chart: alt.JupyterChart, name: str, want: Callable[[], float | None]) -> None:
    """:func:`_pin_rule` for any variable parameter of a chart."""

    def check(change: dict[str, Any]) -> None:
        value = want()
        reported = (change["new"] or {}).get(name)
        if name in (change["new"] or {}) and value is not None and reported != value:
            setattr(chart.params, name, value)

    chart.observe(check, "_params")


def _ms(t: datetime | None) -> float | None:
    return None if t is None else us(t) / 1000


def _some(names: Sequence[str], noun: str, shown: int = 5) -> str:
    """``"3 accounts: 'A', 'B', 'C'"``, ``"40 accounts: 'A', ... (and 35 more)"`` (errors)."""
    count = f"{len(names):,} {noun}{'' if len(names) == 1 else 's'}"
    if not names:
        return f"no {noun}s"
    listed = ", ".join(repr(n) for n in names[:shown])
    more = f" (and {len(names) - shown:,} more)" if len(names) > shown else ""
    return f"{count}: {listed}{more}"


def _shift(t: datetime, by: timedelta) -> datetime:
    """``t + by``, held within the years datetime can write (1 to 9999)."""
    try:
        return t + by
    except OverflowError:
        return (
            datetime.max.replace(tzinfo=UTC)
            if by > timedelta(0)
            else datetime.min.replace(tzinfo=UTC)
        )


def _duration(span: timedelta) -> str:
    """``15 min``, ``2.5 min``, ``12.345 s`` (a window's half-width, for people)."""
    seconds = span.total_seconds()
    if seconds >= 60:
        return f"{seconds / 60:,.3g} min"
    return f"{seconds:,.3f}".rstrip("0").rstrip(".") + " s"


def _heading(text: str) -> widgets.HTML:
    return widgets.HTML(f"<h4 style='margin:10px 0 4px 0'>{html.escape(text)}</h4>")


# ----------------------------------------------------------------------------- exposure


class ExposureExplorer:
    """Exposure, PnL and leverage of every account over time; positions at T.

    Controls: ``measure`` (what the overview draws), ``account`` (all, or one to drill
    into), ``at`` (business time T: the table, the bars and the rules on every chart)
    and ``known_at`` (recorded time K: the whole history as the store knew it then;
    at its right end, everything).

    What it shows, kept as frames: ``accounts_at`` (per account at T), ``positions_at``
    (per position at T, the picked account's only when one is picked) and ``timeline``
    (:func:`riskbook.account_timeline` as known at K). Charts: ``overview``
    (:func:`riskbook.viz.exposure_chart`), ``snapshot``
    (:func:`riskbook.viz.exposure_at_chart`) and, for a picked account, ``equity``,
    ``leverage`` and ``positions`` (charts over its own timeline).

    Moving ``at`` recomputes only the state at T (a binary search per position on the
    cached timelines) and the small bar chart; the rules on the other charts move by
    their ``at`` parameter, without resending their data.
    """

    def __init__(
        self,
        history: History,
        *,
        measure: str = "gross_exposure",
        account: str | None = None,
        at: datetime | str | None = None,
        max_rows: int = viz.MAX_ROWS,
    ) -> None:
        at = as_time(at, "at")
        if history.events.height == 0:
            raise ValueError("the history is empty: nothing to explore")
        if measure not in viz.MEASURES:
            raise ValueError(f"measure must be one of {', '.join(viz.MEASURES)}; got {measure!r}")
        self.history = history
        self.max_rows = viz._cap(max_rows)
        events = history.events
        first = events["occurred_at"].min()
        last = events["occurred_at"].max()
        recorded = events["timestamp"].max()
        assert isinstance(first, datetime) and isinstance(last, datetime)
        assert isinstance(recorded, datetime)
        names = sorted(P.accounts(history)["account_id"].cast(pl.String).to_list())
        self.account_names = names
        if account is not None and account not in names:
            raise ValueError(
                f"account {account!r} is not in this history, which has {_some(names, 'account')}"
            )

        # the widget tree
        self.measure = widgets.Dropdown(
            options=[(v, k) for k, v in viz.MEASURES.items()], value=measure, description="measure"
        )
        self.account = widgets.Dropdown(
            options=[_ALL, *names], value=account or _ALL, description="account"
        )
        # a T given outside the history's times widens the slider (before the first
        # event: nothing had happened), rather than being moved to its nearest end (so
        # does a K before which T's events were not recorded yet: _fit_controls)
        self.at = TimeSlider(
            first if at is None else min(first, at),
            last if at is None else max(last, at),
            value=at or last,
            step=timedelta(minutes=1),
            description="at (T)",
        )
        self.known_at = TimeSlider(
            events["timestamp"].min(),  # type: ignore[arg-type]
            recorded,
            step=timedelta(minutes=1),
            description="known at (K)",
            continuous_update=False,
        )
        self.table = widgets.HTML()
        self.caption = widgets.HTML()
        self._fitting = False  # the controls are being fitted to K: no update of their own
        self._compute_timeline()
        self._compute_state()
        self.overview = _chart_widget(self._overview_chart())
        _pin_rule(self.overview, lambda: _ms(self.at.value))
        self.snapshot = _chart_widget(self._snapshot_chart())
        self.details = widgets.VBox()
        self.equity: alt.JupyterChart | None = None
        self.leverage: alt.JupyterChart | None = None
        self.positions: alt.JupyterChart | None = None
        self._draw_details()
        self._draw_table()
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.measure, self.account]),
                self.at,
                self.known_at,
                self.overview,
                self.caption,
                widgets.HBox([self.snapshot]),
                self.table,
                self.details,
            ]
        )

        # wiring
        self.at.observe(lambda _: self.on_at(), "value")
        self.known_at.observe(lambda _: self.on_known_at(), "value")
        self.measure.observe(lambda _: self.on_measure(), "value")
        self.account.observe(lambda _: self.on_account(), "value")

    # ---------------------------------------------------------------- state

    @property
    def picked(self) -> str | None:
        """The account drilled into, or None for all."""
        return None if self.account.value == _ALL else str(self.account.value)

    @property
    def k(self) -> datetime | None:
        """The ``known_at`` in force: None when the slider is at its end (everything)."""
        return None if self.known_at.at_end else self.known_at.value

    def _compute_timeline(self) -> None:
        self.timeline = P.account_timeline(self.history, known_at=self.k)
        self.position_timeline = (
            P.position_timeline(self.history, known_at=self.k) if self.picked else None
        )

    def _compute_state(self) -> None:
        self.accounts_at, self.positions_at = self._state()

    def _state(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The accounts and the positions at T as known at K (not yet the panel's)."""
        t, k = self.at.value, self.k
        accounts_at = P.accounts(self.history, at=t, known_at=k)
        positions = P.positions(self.history, at=t, known_at=k)
        if self.picked:
            positions = positions.filter(pl.col("account_id").cast(pl.String) == self.picked)
        return accounts_at, positions

    # ---------------------------------------------------------------- drawing

    def _overview_chart(self, timeline: pl.DataFrame | None = None) -> Any:
        return viz.exposure_chart(
            self.timeline if timeline is None else timeline,
            measure=self.measure.value,
            accounts=[self.picked] if self.picked else None,
            at=self.at.value,
            max_rows=self.max_rows,
        )

    def _snapshot_chart(self, positions: pl.DataFrame | None = None) -> Any:
        return viz.exposure_at_chart(
            self.positions_at if positions is None else positions,
            at=self.at.value,
            max_rows=self.max_rows,
        )

    def _draw_table(self) -> None:
        frame = self.accounts_at
        if self.picked:
            frame = frame.filter(pl.col("account_id").cast(pl.String) == self.picked)
            shown = self.positions_at.select(
                "symbol",
                "quantity",
                "avg_price",
                "mark_price",
                "market_value",
                "unrealized_pnl",
                "realized_pnl",
                "trades",
                "last_event_at",
            )
        else:
            shown = frame.select(
                "account_id",
                "equity",
                "cash",
                "gross_exposure",
                "net_exposure",
                "leverage",
                "drawdown",
                "realized_pnl",
                "unrealized_pnl",
                "open_positions",
            )
        fmt: dict[str, str | Callable[[Any], str]] = {
            "leverage": ".3f",
            "drawdown": ".2%",
            "quantity": _quantity,
            "trades": ",d",
        }
        # K at its right end is the History's own bound: everything it holds
        loaded = getattr(getattr(self.history, "filters", None), "known_at", None)
        k = self.k if self.k is not None else loaded
        known = "everything recorded" if k is None else f"recorded by {k:%Y-%m-%d %H:%M:%S} UTC"
        self.caption.value = (
            f"<b>At {self.at.value:%Y-%m-%d %H:%M:%S} UTC</b>, as known: {known}. "
            f"Total equity {frame['equity'].sum():,.0f}, gross exposure "
            f"{frame['gross_exposure'].sum():,.0f}."
        )
        self.table.value = html_table(shown, formats=fmt)

    def _draw_details(self) -> None:
        account = self.picked
        if account is None:
            self.equity = self.leverage = self.positions = None
            self.details.children = []
            return
        if self.position_timeline is None:
            self.position_timeline = P.position_timeline(self.history, known_at=self.k)
        limits, t, k = self.history.limits, self.at.value, self.k
        # every chart runs on to the history's last figure (a position's timeline has no
        # marks: without this its lines stop at the last trade of any account)
        last = self.timeline["occurred_at"].max()
        end = last if isinstance(last, datetime) else None
        charts: dict[str, Any] = {
            "equity": viz.equity_chart(
                self.timeline,
                account=account,
                limits=limits,
                at=t,
                known_at=k,
                end=end,
                max_rows=self.max_rows,
            ),
            "leverage": viz.leverage_chart(
                self.timeline,
                limits,
                account=account,
                at=t,
                known_at=k,
                end=end,
                max_rows=self.max_rows,
            ),
            "positions": viz.position_chart(
                self.position_timeline,
                account=account,
                limits=limits,
                at=t,
                known_at=k,
                end=end,
                max_rows=self.max_rows,
            ),
        }
        for name, chart in charts.items():
            current = getattr(self, name)
            if current is None:
                widget = _chart_widget(chart)
                _pin_rule(widget, lambda: _ms(self.at.value))
                setattr(self, name, widget)
            else:
                current.chart = chart
        self.details.children = [
            _heading(f"{account}: equity, leverage and positions"),
            self.equity,
            self.leverage,
            self.positions,
        ]

    def _move_rules(self) -> None:
        ms = _ms(self.at.value)
        for chart in (self.overview, self.equity, self.leverage, self.positions):
            if chart is not None:
                _set_rule(chart, ms)

    # ---------------------------------------------------------------- updates

    # Each update computes its frames and charts first and takes them as the panel's
    # only once they are drawn: a failure leaves the frames and the caption as they were.

    def _fit_controls(self) -> None:
        """The accounts to pick from and the range of T, as known at K: the accounts with
        an event recorded by K, and the business times of those events (widened to keep
        T where it is, as a T given outside them is). An account picked that was not
        known at K goes back to all."""
        k = self.k
        events = self.history.events
        if k is not None:
            events = events.filter(pl.col("timestamp") <= k)
        names = sorted(P.accounts(self.history, known_at=k)["account_id"].cast(pl.String))
        first, last = events["occurred_at"].min(), events["occurred_at"].max()
        self.account_names = names
        self._fitting = True
        try:
            self.account.options = [_ALL, *names]  # keeps the value if it is still there
            if self.account.value not in self.account.options:
                self.account.value = _ALL
            if isinstance(first, datetime) and isinstance(last, datetime):
                t = self.at.value
                self.at.set_range(min(first, t), max(last, t))
        finally:
            self._fitting = False

    def on_at(self) -> None:
        """T moved: the state at T, its table and bars; the rules move in place."""
        if self._fitting:
            return
        accounts_at, positions_at = self._state()
        self.snapshot.chart = self._snapshot_chart(positions_at)
        self.accounts_at, self.positions_at = accounts_at, positions_at
        self._draw_table()
        self._move_rules()

    def on_known_at(self) -> None:
        """K moved: everything is recomputed as known at K, the controls too."""
        self._fit_controls()
        k = self.k
        timeline = P.account_timeline(self.history, known_at=k)
        position_timeline = P.position_timeline(self.history, known_at=k) if self.picked else None
        accounts_at, positions_at = self._state()
        overview, snapshot = self._overview_chart(timeline), self._snapshot_chart(positions_at)
        self.overview.chart = overview
        self.snapshot.chart = snapshot
        self.timeline, self.position_timeline = timeline, position_timeline
        self.accounts_at, self.positions_at = accounts_at, positions_at
        self._draw_table()
        self._draw_details()

    def on_measure(self) -> None:
        self.overview.chart = self._overview_chart()

    def on_account(self) -> None:
        """Drill into an account (or back to all)."""
        if self._fitting:
            return
        accounts_at, positions_at = self._state()
        overview, snapshot = self._overview_chart(), self._snapshot_chart(positions_at)
        self.overview.chart = overview
        self.snapshot.chart = snapshot
        self.accounts_at, self.positions_at = accounts_at, positions_at
        self._draw_table()
        self._draw_details()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


# ----------------------------------------------------------------------------- incidents


class IncidentPanel:
    """Reconstruct a violation or a block: what the engine saw, what was true, who set what.

    Controls: ``incident`` (a violation or block), ``step`` (the events in the window
    around it, in the order the store recorded them: each step puts T on the event's
    business time and K on its recorded time), ``prev`` / ``next`` buttons, and the
    ``at`` (T) and ``known_at`` (K) sliders, which can also be moved on their own.

    The window is ``window`` either side of the incident's business time: the account's
    events, with the trades and marks of the incident's symbol (or, for an account-wide
    limit, of every symbol the account held or traded then). It holds every event
    there, one step each; when that is more than ``max_rows``, the window narrows
    around the incident until it fits, and the header says so.

    Kept as frames / values: ``current`` (the incident's row of :func:`incidents`),
    ``window`` (:func:`riskbook.viz.event_lanes` around it), ``compare``
    (:func:`compare_states` at T and K), ``limit`` (:func:`limit_in_force` for the
    incident's limit at T as known at K), ``limits`` (all the account's limits then),
    ``chain`` (:func:`causation_chain`), ``story`` (:func:`riskbook.audit.explain`: its
    ``findings`` are shown under the header), ``step_event`` (the window row of the current
    step). Chart: ``timeline`` (:func:`riskbook.viz.event_chart`; its rule follows T).
    """

    def __init__(
        self,
        history: History,
        *,
        incident: str | None = None,
        window: timedelta = timedelta(minutes=15),
        max_rows: int = viz.MAX_ROWS,
    ) -> None:
        if not isinstance(window, timedelta):  # as LiveMonitor's window: no bare seconds
            raise TypeError(
                f"IncidentPanel's window must be a timedelta, got {type(window).__name__}"
            )
        if window < timedelta(0):
            raise ValueError(f"IncidentPanel's window must not be negative; got {window!r}")
        self.history = history
        self.window_size = window
        self.max_rows = viz._cap(max_rows)
        self._metrics: dict[tuple[str, datetime], pl.DataFrame] = {}
        self.incidents = incidents(history)
        if self.incidents.height == 0:
            raise ValueError("this history has no LimitViolationDetected or AccountBlocked")
        ids = self.incidents["event_id"].to_list()
        if incident is not None and incident not in ids:
            raise ValueError(
                f"incident {incident!r} is not a violation or block of this history, which"
                f" has {_some(ids, 'incident', shown=3)}"
            )
        options = list(zip(self.incidents["label"], self.incidents["event_id"], strict=True))
        blocks = self.incidents.filter(pl.col("event_type") == "AccountBlocked")
        first = incident or (blocks if blocks.height else self.incidents)["event_id"][0]

        # the widget tree
        self.incident = widgets.Dropdown(
            options=options,
            value=first,
            description="incident",
            layout=widgets.Layout(width="820px"),
        )
        self.step = widgets.IntSlider(
            min=0,
            max=0,
            description="step",
            continuous_update=True,
            layout=widgets.Layout(width="520px"),
            style={"description_width": "70px"},
        )
        self.prev = widgets.Button(description="◀ previous", layout=widgets.Layout(width="110px"))
        self.next = widgets.Button(description="next ▶", layout=widgets.Layout(width="110px"))
        self.step_info = widgets.HTML()
        self.header = widgets.HTML()
        self.findings_box = widgets.HTML()
        self.limit_box = widgets.HTML()
        self.compare_box = widgets.HTML()
        self.chain_box = widgets.HTML()
        self.sliders = widgets.VBox()
        self.timeline: alt.JupyterChart | None = None
        self.chart_box = widgets.VBox()
        self._stepping = False
        self.widget = widgets.VBox(
            [
                self.incident,
                self.header,
                self.findings_box,
                widgets.HBox([self.step, self.prev, self.next]),
                self.step_info,
                self.sliders,
                self.chart_box,
                widgets.HBox(
                    [
                        widgets.VBox(
                            [
                                _heading(
                                    "Engine (known at K) vs corrected (everything known now), at T"
                                ),
                                self.compare_box,
                            ]
                        ),
                        widgets.VBox(
                            [_heading("Limits in force at T, as known at K"), self.limit_box],
                            layout=widgets.Layout(margin="0 0 0 24px"),
                        ),
                    ]
                ),
                _heading("Causation chain"),
                self.chain_box,
            ]
        )

        # wiring
        self.incident.observe(lambda _: self.on_incident(), "value")
        self.step.observe(lambda _: self.on_step(), "value")
        self.prev.on_click(lambda _: self._nudge(-1))
        self.next.on_click(lambda _: self._nudge(+1))
        self.on_incident()

    # ---------------------------------------------------------------- updates

    def on_incident(self) -> None:
        """A new incident: its window, sliders, chain and chart; T and K on it."""
        row = self.incidents.filter(pl.col("event_id") == self.incident.value).row(0, named=True)
        self.current = row
        t0: datetime = row["occurred_at"]
        k0: datetime = row["timestamp"]
        lo, hi = _shift(t0, -self.window_size), _shift(t0, self.window_size)
        symbols = [row["symbol"]] if row["symbol"] else self._symbols(row["account_id"], t0, lo, hi)
        whole = viz.event_lanes(
            self.history,
            start=lo,
            end=hi,
            accounts=[row["account_id"]],
            symbols=symbols,
            max_rows=max(1, self.history.events.height),  # every event: narrowed below
        )
        self.window, lo, hi = self._narrow(whole, row["event_id"], t0, lo, hi)
        self.story: Incident = explain(self.history, row["event_id"])
        self.chain = self.story.chain
        self.findings_box.value = _findings_html(self.story)
        self.at = TimeSlider(lo, hi, value=t0, description="at (T)")
        # K reaches every recording of the window: a step onto a late one is not clamped
        ends = (self.window["timestamp"].min(), self.window["timestamp"].max())
        recorded = [k0, *(t for t in ends if isinstance(t, datetime))]
        self.known_at = TimeSlider(
            min(lo, *recorded),
            max(_shift(max(hi, k0), self.window_size), *recorded),
            value=k0,
            description="known at (K)",
        )
        self.at.observe(lambda _: self.on_time(), "value")
        self.known_at.observe(lambda _: self.on_time(), "value")
        self.sliders.children = [self.at, self.known_at]
        mine = self.window.with_row_index("i").filter(pl.col("event_id") == row["event_id"])
        with self.step.hold_trait_notifications():
            self.step.max = max(0, self.window.height - 1)
        self._stepping = True
        try:
            self.step.value = int(mine["i"][0]) if mine.height else 0
        finally:
            self._stepping = False
        if self.window.height < whole.height:
            span = (
                f" Window: {self.window.height:,} events of the account within"
                f" ±{_duration(max(t0 - lo, hi - t0))} (narrowed from"
                f" ±{_duration(self.window_size)}, which holds {whole.height:,}: too many to"
                " step through)."
            )
        else:
            span = (
                f" Window: {self.window.height:,} events of the account within"
                f" ±{_duration(self.window_size)}."
            )
        self.header.value = (
            f"<b>{html.escape(row['event_type'])}</b> of <b>{html.escape(row['account_id'])}</b>"
            f" ({html.escape(row['limit_type'] or 'no limit named')}"
            f"{' on ' + html.escape(row['symbol']) if row['symbol'] else ''}),"
            f" business time {t0:%Y-%m-%d %H:%M:%S.%f} UTC, recorded {k0:%H:%M:%S.%f}." + span
        )
        self.chain_box.value = html_table(
            self.chain.drop("causation_id", "position"),
        )
        chart: Any = viz.event_chart(
            self.window,
            focus=row["event_id"],
            cursor=t0,
            start=lo,
            end=hi,
            title=f"{row['account_id']}: events around the {row['event_type']}",
        )
        if self.timeline is None:
            self.timeline = _chart_widget(chart)
            _pin_rule(self.timeline, lambda: _ms(self.at.value))
        else:
            self.timeline.chart = chart
        self.chart_box.children = [self.timeline]
        self._describe_step()
        self.on_time()

    def on_step(self) -> None:
        """Step to the window's event: T on its business time, K on its recorded time."""
        if self._stepping or self.window.height == 0:
            return
        self._describe_step()
        ev = self.step_event
        with self.at.hold_trait_notifications(), self.known_at.hold_trait_notifications():
            self._stepping = True
            try:
                self.at.value = ev["occurred_at"]
                self.known_at.value = ev["timestamp"]
            finally:
                self._stepping = False
        self.on_time()

    def on_time(self) -> None:
        """T or K moved: the two states, the limit in force, the rule on the chart."""
        if self._stepping:
            return
        row = self.current
        t, k = self.at.value, self.known_at.value
        self.compare = compare_states(self.history, account=row["account_id"], at=t, known_at=k)
        self.limits = limits_in_force(
            self.history.limits, account=row["account_id"], at=t, known_at=k
        )
        self.limit = (
            limit_in_force(
                self.history.limits,
                account=row["account_id"],
                limit_type=row["limit_type"],
                symbol=row["symbol"],
                at=t,
                known_at=k,
            )
            if row["limit_type"]
            else None
        )
        self._draw_tables()
        if self.timeline is not None:
            _set_rule(self.timeline, _ms(t))

    def _nudge(self, by: int) -> None:
        self.step.value = min(max(self.step.value + by, self.step.min), self.step.max)

    # ---------------------------------------------------------------- pieces

    def _symbols(self, account: str, at: datetime, lo: datetime, hi: datetime) -> list[str]:
        """An account-wide incident's symbols: those held at T and those traded or
        adjusted in the window (a trade that flattened a position can be its cause)."""
        pos = P.positions(self.history, at=at).filter(
            (pl.col("account_id").cast(pl.String) == account) & (pl.col("quantity") != 0)
        )
        found = set(pos["symbol"].cast(pl.String).to_list())
        h = self.history
        for frame, column in ((h.trades, "executed_at"), (h.adjustments, "updated_at")):
            mine = frame.filter(
                (pl.col("account_id").cast(pl.String) == account)
                & pl.col(column).is_between(lo, hi)
            )
            found.update(mine["symbol"].cast(pl.String).to_list())
        return sorted(found)

    def _narrow(
        self, whole: pl.DataFrame, event_id: str, t0: datetime, lo: datetime, hi: datetime
    ) -> tuple[pl.DataFrame, datetime, datetime]:
        """The window cut to ``max_rows`` events by narrowing it around ``t0``.

        Keeps every event nearer to ``t0`` than the first one that does not fit, so the
        steps stay consecutive; returns the events and the narrowed bounds.
        """
        if whole.height <= self.max_rows:
            return whole, lo, hi
        distance = (pl.col("occurred_at") - pl.lit(t0).cast(whole.schema["occurred_at"])).abs()
        cut = whole.select(distance.alias("d")).sort("d")["d"][self.max_rows]
        if cut > timedelta(0):
            reach = cut - timedelta(microseconds=1)
            narrowed = whole.filter(distance <= reach)
            return narrowed, max(lo, _shift(t0, -reach)), min(hi, _shift(t0, reach))
        # more events at the incident's very time than fit: those nearest it in order
        same = whole.filter(distance == timedelta(0)).with_row_index("i")
        me = same.filter(pl.col("event_id") == event_id)
        centre = int(me["i"][0]) if me.height else 0
        begin = max(0, min(centre - self.max_rows // 2, same.height - self.max_rows))
        return same.slice(begin, self.max_rows).drop("i"), t0, t0

    def _describe_step(self) -> None:
        if self.window.height == 0:
            self.step_event: dict[str, Any] = {}
            self.step_info.value = "no events in the window"
            return
        ev = self.window.row(self.step.value, named=True)
        self.step_event = ev
        late = (ev["timestamp"] - ev["occurred_at"]).total_seconds()
        self.step_info.value = (
            f"<b>step {self.step.value + 1} of {self.window.height}</b>: "
            f"{html.escape(ev['event_type'])} — {html.escape(ev['summary'] or '')}"
            f" <span style='color:#777'>(happened {ev['occurred_at']:%H:%M:%S.%f},"
            f" recorded {late:,.3f} s later)</span>"
        )

    def _metric(self) -> float | None:
        """The incident's metric at T as the engine saw it (known at K); None if unknown."""
        limit_type, symbol = self.current["limit_type"], self.current["symbol"]
        if limit_type is None:
            return None
        if limit_type in _BUILT_IN_FIGURES:
            engine = incident_metric(self.compare, limit_type, symbol)[0]
            if engine is None and limit_type == "MaxPositionSize" and symbol is not None:
                return 0.0  # no position in the symbol
            return engine
        # a registered type of the user's: its own metric, as riskbook.breaches computes it
        k = self.known_at.value
        key = (limit_type, k)
        if key not in self._metrics:
            try:
                definition = L.get(limit_type)
            except KeyError:
                return None
            if len(self._metrics) > 8:
                self._metrics.clear()
            self._metrics[key] = definition.metric(self.history, known_at=k)
        return limit_metric_at(
            self.history,
            limit_type,
            account=self.current["account_id"],
            symbol=symbol,
            at=self.at.value,
            known_at=k,
            metric=self._metrics[key],
        )

    def _draw_tables(self) -> None:
        self.compare_box.value = html_table(
            self.compare.with_columns(
                (pl.col("difference").abs() > 1e-9).fill_null(True).alias("changed")
            ),
            formats={"engine": ",.4f", "corrected": ",.4f", "difference": ",.4f"},
            highlight="changed",
        )
        lim = self.limit
        metric = self._metric()
        if lim is None:
            verdict = "<p>No limit of this type was in force at T as known at K.</p>"
        else:
            over = metric is not None and metric > lim["value"]
            if metric is None:
                judged = (
                    "Engine's metric at T: <b>not available</b> <span style='color:#777'>"
                    "(no value of this limit type's metric for the account at T as known"
                    " at K)</span>"
                )
            else:
                judged = (
                    f"Engine's metric at T: <b>{_figure(metric)}</b>"
                    f" — <b style='color:{'#c0392b' if over else '#27ae60'}'>"
                    f"{'over the limit' if over else 'within the limit'}</b>"
                )
            verdict = (
                f"<p><b>{html.escape(self.current['limit_type'])}</b> in force: "
                f"<b>{_figure(lim['value'])}</b> ("
                f"{'for ' + html.escape(lim['symbol']) + ' only' if lim['symbol'] else lim['scope'] + '-wide'}"
                "), set by "
                f"<b>{html.escape(lim['set_by'] or '?')}</b> at {lim['set_at']:%Y-%m-%d %H:%M:%S} UTC "
                f"(recorded {lim['recorded_at']:%Y-%m-%d %H:%M:%S}).<br>{judged}.</p>"
            )
        self.limit_box.value = verdict + html_table(
            self.limits.drop("event_id").with_columns(
                pl.col("value").map_elements(_figure, return_dtype=pl.String)
            )
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def _findings_html(story: Incident) -> str:
    """The audit of an incident (:func:`riskbook.audit.explain`): where the engine's
    record and a replay of the engine over what it knew disagree, or that they agree;
    then its notes."""
    notes = "".join(f"<p style='color:#777;margin:2px 0'>{html.escape(n)}</p>" for n in story.notes)
    if story.findings:
        items = "".join(f"<li>{html.escape(f)}</li>" for f in story.findings)
        return (
            f"<div style='color:#c0392b'><b>Findings</b><ul style='margin:2px 0'>{items}</ul>"
            f"</div>{notes}"
        )
    if not story.checked:
        return (
            "<p style='color:#777;margin:4px 0'>Not checked: there is no cause on record to"
            f" replay the engine to.</p>{notes}"
        )
    return (
        "<p style='color:#27ae60;margin:4px 0'>The engine's record agrees with a replay of"
        f" the engine over what it knew when it acted.</p>{notes}"
    )


# ----------------------------------------------------------------------------- limit lab


def breach_summary(
    breaches: pl.DataFrame,
    *,
    horizon: datetime | str,
    accounts: str | Iterable[str] | None = None,
    level: float = 1.0,
) -> pl.DataFrame:
    """Per account: how many breaches, how long in breach, the longest, the peak.

    Parameters
    ----------
    breaches : rows of :func:`riskbook.breaches` or :func:`riskbook.backtest` (only
        those at ``level`` count).
    horizon : the end of the history: a breach still open counts until then.
    accounts : give every one of these accounts a row, with zeros where it had no
        breach (None: only accounts with a breach; one account may be given as a
        string).
    level : the level counted (1.0: breaches, not warnings).

    Returns
    -------
    pl.DataFrame
        ``account_id, breaches, hours_in_breach`` (the intervals' lengths added up: for
        a per-symbol type, breach-hours of its symbols together), ``longest_hours,
        still_open, peak_value, first_started_at``, sorted by account.

    Examples
    --------
    >>> t = datetime(2024, 1, 9, 14, 0, tzinfo=UTC)
    >>> found = pl.DataFrame({"account_id": ["A", "A", "B"], "level": [1.0, 1.0, 0.8],
    ...     "started_at": [t, t + timedelta(hours=3), t],
    ...     "ended_at": [t + timedelta(hours=1), None, None], "peak_value": [1.2, 1.5, 0.9]})
    >>> breach_summary(found, horizon=t + timedelta(hours=5), accounts=["A", "C"]).select(
    ...     "account_id", "breaches", "hours_in_breach", "longest_hours", "still_open")
    shape: (2, 5)
    ┌────────────┬──────────┬─────────────────┬───────────────┬────────────┐
    │ account_id ┆ breaches ┆ hours_in_breach ┆ longest_hours ┆ still_open │
    │ ---        ┆ ---      ┆ ---             ┆ ---           ┆ ---        │
    │ str        ┆ i64      ┆ f64             ┆ f64           ┆ i64        │
    ╞════════════╪══════════╪═════════════════╪═══════════════╪════════════╡
    │ A          ┆ 2        ┆ 3.0             ┆ 2.0           ┆ 1          │
    │ C          ┆ 0        ┆ 0.0             ┆ 0.0           ┆ 0          │
    └────────────┴──────────┴─────────────────┴───────────────┴────────────┘
    """
    breaches, ids = viz._frame(breaches, "breaches"), viz._ids(accounts, "accounts")
    end = pl.lit(as_time(horizon, "horizon")).cast(breaches.schema["started_at"])
    hours = (
        pl.col("ended_at").fill_null(end) - pl.col("started_at")
    ).dt.total_microseconds() / 3.6e9
    per = (
        breaches.filter(pl.col("level") == level)
        .with_columns(pl.col("account_id").cast(pl.String), hours.alias("_hours"))
        .group_by("account_id")
        .agg(
            pl.len().cast(pl.Int64).alias("breaches"),
            pl.col("_hours").sum().alias("hours_in_breach"),
            pl.col("_hours").max().alias("longest_hours"),
            pl.col("ended_at").is_null().sum().cast(pl.Int64).alias("still_open"),
            pl.col("peak_value").max().alias("peak_value"),
            pl.col("started_at").min().alias("first_started_at"),
        )
    )
    if ids is not None:
        every = pl.DataFrame({"account_id": sorted(set(ids))}, schema={"account_id": pl.String})
        per = every.join(per, on="account_id", how="left").with_columns(
            pl.col("breaches", "still_open").fill_null(0),
            pl.col("hours_in_breach", "longest_hours").fill_null(0.0),
        )
    return per.sort("account_id")


class _Backtest:
    """:func:`riskbook.limits.backtest` of one limit type at many values, its metric
    computed once.

    ``run(value)`` returns exactly the ``"hypothetical"`` rows ``backtest`` returns for
    that value (the same :func:`riskbook.limits.evaluate` over the same metric rows and
    limit rows, through the same horizon), without the ``scenario`` column; only the
    metric timeline, which does not depend on the value, is kept between calls.
    """

    def __init__(
        self,
        history: History,
        limit_type: str | L.LimitDefinition,
        *,
        accounts: Sequence[str] | None,
        known_at: datetime | None,
        levels: Sequence[float],
    ) -> None:
        name = limit_type if isinstance(limit_type, str) else limit_type.name
        self.definition = L.get(name)  # KeyError if it is not registered, as backtest
        self.levels = tuple(levels)
        metric = self.definition.metric(history, known_at=known_at)
        if "event_id" not in metric.columns:  # backtest looks them up by position too
            metric = metric.join(
                history.events.select("position", "event_id"),
                on="position",
                how="left",
                maintain_order="left",
            )
        self.metric = metric
        # None is every account ("*"); an empty list is no account (not every one)
        scope = ["*"] if accounts is None else accounts
        self.rows = L.hypothetical_limits(
            [{"account_id": a, "limit_type": name, "value": 0.0} for a in scope]
        ).drop("limit_type")
        from riskbook.limits._api import _horizon, _latest_event

        # backtest's: the History's until, else its latest event known (busts left out)
        latest = _latest_event(history, known_at)
        self.horizon: datetime | None = _horizon(history, self.rows, None, latest)

    def run(self, value: float) -> pl.DataFrame:
        if self.horizon is None:
            return pl.DataFrame(schema=L.BREACH_SCHEMA).select(L.BREACH_COLUMNS)
        rows = self.rows.with_columns(pl.lit(float(value)).alias("value"))
        found, _ = L.evaluate(
            self.definition, self.metric, rows, levels=self.levels, through=self.horizon
        )
        from riskbook.limits._api import in_breach_order

        return in_breach_order(found)


def limit_sweep(
    history: History,
    limit_type: str | L.LimitDefinition,
    values: Iterable[float],
    *,
    accounts: str | Iterable[str] | None = None,
    known_at: datetime | str | None = None,
) -> pl.DataFrame:
    """The backtest of a limit type at every value: how many breaches, for how long.

    Each value (a finite number >= 0, as :func:`riskbook.limits.backtest` takes a
    limit) is a hypothetical limit for every account (or for each of ``accounts``: one
    account may be given as a string; an empty list is no account), evaluated over the
    whole history as :func:`riskbook.limits.backtest` does (its metric computed once
    for all values).

    Returns
    -------
    pl.DataFrame
        ``value, breaches`` (intervals at 100%), ``accounts`` (accounts with one),
        ``hours_in_breach`` (all accounts together; open breaches until the last event),
        one row per value, sorted by value. Time in breach never falls as the limit
        tightens; the number of breaches can, when breaches merge.
    """
    tried = [float(v) for v in values]
    for v in tried:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"limit_sweep's values must be finite and >= 0; got {v!r}")
    bt = _Backtest(
        history,
        limit_type,
        accounts=viz._ids(accounts, "accounts"),
        known_at=as_time(known_at, "known_at"),
        levels=(1.0,),
    )
    return _sweep(bt, tried)


def _sweep(bt: _Backtest, values: Iterable[float]) -> pl.DataFrame:
    rows = []
    for v in sorted({float(v) for v in values}):
        found = bt.run(v)
        per = (
            breach_summary(found, horizon=bt.horizon)
            if bt.horizon is not None
            else pl.DataFrame({"hours_in_breach": []}, schema={"hours_in_breach": pl.Float64})
        )
        rows.append(
            {
                "value": v,
                "breaches": found.filter(pl.col("level") == 1.0).height,
                "accounts": per.height,
                "hours_in_breach": float(per["hours_in_breach"].sum()),
            }
        )
    schema = {
        "value": pl.Float64,
        "breaches": pl.Int64,
        "accounts": pl.Int64,
        "hours_in_breach": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 'es' if noun.endswith('ch') else 's'}"


def _number_format(step: float, *values: float) -> str:
    """A format showing a value on a grid of ``step``: ``,.2f`` for 0.05, ``,.0f`` for 250,000.

    A grid finer than a millionth, or a value (``values``) that would read as 0, is
    written with significant digits instead (``.4g``: 2.5e-09), never as 0.0000000.
    """
    if 0 < step < 1e-6:
        return ".4g"
    decimals = 0 if step <= 0 or step >= 1 else min(6, math.ceil(-math.log10(step) - 1e-9))
    if step > 0 and round(step, decimals) != step:
        decimals += 1
    if any(v != 0 and round(v, decimals) == 0 for v in values):
        return ".4g"
    return f",.{decimals}f"


class LimitLab:
    """Tune a limit type's value with a slider: each step backtests it over the history.

    Controls: ``value`` (the hypothetical limit, for every account or each of
    ``accounts``). Moving it re-runs the backtest of the limit type at that value
    (:func:`riskbook.limits.backtest`'s hypothetical scenario; the metric timeline is
    computed once, when the panel is made) and redraws the breach chart and the table.

    Kept as frames: ``metric`` (the limit type's metric timeline), ``existing`` (the
    breaches of the stored limits of every type, at 100%), ``breaches`` (the
    hypothetical limit's breaches at the slider's value), ``summary`` (per account:
    :func:`breach_summary` of ``breaches`` beside the account's existing breaches) and
    ``sweep`` (:func:`limit_sweep` over the slider's values, computed once). Charts:
    ``timeline`` (:func:`riskbook.viz.breach_chart` of the new breaches and the
    existing ones), ``metric_view`` (:func:`riskbook.viz.metric_chart`) and
    ``sweep_view`` (:func:`riskbook.viz.limit_sweep_chart`); on the last two, only the
    rule moves (their ``limit`` / ``value`` parameter). ``step_ms``: how long the last
    step took (backtest, table and charts).

    Parameters
    ----------
    history : the History.
    limit_type : a registered limit type (its name or its definition).
    value : the slider's first value (a limit: finite and >= 0).
    low, high, step : the slider's range and step (default: 0 to the metric's largest
        finite value, in 50 steps; ``low`` >= 0 and below ``high``).
    accounts : the accounts the limit applies to (None: every account, ``"*"``; one
        account may be given as a string; not empty).
    known_at : backtest the history as known at this recorded time.
    sweep : compute ``sweep`` and draw ``sweep_view`` (one backtest per slider step, for
        up to 400 steps).
    max_rows : the cap on the rows of the metric chart.
    """

    def __init__(
        self,
        history: History,
        limit_type: str | L.LimitDefinition,
        *,
        value: float,
        low: float | None = None,
        high: float | None = None,
        step: float | None = None,
        accounts: str | Iterable[str] | None = None,
        known_at: datetime | str | None = None,
        sweep: bool = True,
        max_rows: int = viz.MAX_ROWS,
    ) -> None:
        for what, number in (("value", value), ("low", low), ("high", high), ("step", step)):
            if number is not None and not (
                isinstance(number, int | float) and math.isfinite(number)
            ):
                raise ValueError(f"LimitLab's {what} must be a finite number; got {number!r}")
            if what != "step" and number is not None and number < 0:  # as backtest's limits
                raise ValueError(f"LimitLab's {what} must be >= 0 (a limit value); got {number!r}")
        if step is not None and step <= 0:
            raise ValueError(f"LimitLab's step must be greater than 0; got {step!r}")
        if low is not None and high is not None and low >= high:
            raise ValueError(f"LimitLab's low must be less than its high; got {low!r} and {high!r}")
        self.accounts = viz._ids(accounts, "accounts")  # one account may be a string
        if self.accounts == []:
            raise ValueError(
                "LimitLab's accounts is empty: give the accounts the limit applies to,"
                " or None for every account"
            )
        known_at = as_time(known_at, "known_at")
        self.history = history
        self.max_rows = viz._cap(max_rows)
        self._bt = _Backtest(
            history, limit_type, accounts=self.accounts, known_at=known_at, levels=(1.0,)
        )
        self.definition = self._bt.definition
        self.metric = self._bt.metric
        if self._bt.horizon is None:
            raise ValueError("the history is empty: nothing to backtest")
        self.horizon: datetime = self._bt.horizon
        name = self.definition.name
        # every stored limit's breaches, this type's too (drawn in a lane of their own)
        existing = L.breaches(history, known_at=known_at, levels=1.0)
        if self.accounts is not None:
            existing = existing.filter(pl.col("account_id").cast(pl.String).is_in(self.accounts))
        self.existing = existing.select(L.BREACH_COLUMNS)
        self._existing_per_account = (
            self.existing.with_columns(pl.col("account_id", "limit_type").cast(pl.String))
            .group_by("account_id")
            .agg(
                pl.len().cast(pl.Int64).alias("existing_breaches"),
                pl.col("limit_type").unique().sort().str.join(", ").alias("existing_types"),
            )
        )
        finite = self.metric.filter(pl.col("value").is_finite())["value"]
        lo = 0.0 if low is None else float(low)
        hi = float(high) if high is not None else float(finite.max() or 1.0)  # type: ignore[arg-type]
        # the value asked for is the one backtested: the slider's range widens to hold it
        # (a FloatSlider would clamp it into its range without a word)
        lo, hi = min(lo, float(value)), max(hi, float(value))
        hi = hi if hi > lo else lo + 1.0
        step = step if step is not None else (hi - lo) / 50
        self._format = _number_format(step, float(value), lo, hi)
        self.value = widgets.FloatSlider(
            value=value,
            min=lo,
            max=hi,
            step=step,
            description=name,
            readout_format=self._format,  # d3 reads it as Python does
            continuous_update=True,
            layout=widgets.Layout(width="620px"),
            style={"description_width": "130px"},
        )
        shown = self.accounts or sorted(self.metric["account_id"].cast(pl.String).unique())
        self.account_names = list(shown)
        first = history.events["occurred_at"].min()
        assert isinstance(first, datetime)
        self.start = first
        self.caption = widgets.HTML()
        self.table = widgets.HTML()
        self.step_ms = 0.0
        self.breaches, self.summary = self._compute(self.value.value)
        self.timeline = _chart_widget(self._timeline_chart(self.breaches))
        self.metric_view = _chart_widget(
            viz.metric_chart(
                self.metric,
                limit=self.value.value,
                name=name,
                unit=self.definition.unit,
                accounts=self.accounts,
                max_rows=max_rows,
            )
        )
        _pin_param(self.metric_view, "limit", lambda: float(self.value.value))
        parts: list[widgets.Widget] = [
            self.value,
            self.caption,
            self.timeline,
            _heading("Per account at this value (beside the stored limits' breaches)"),
            self.table,
            self.metric_view,
        ]
        self.sweep: pl.DataFrame | None = None
        self.sweep_view: alt.JupyterChart | None = None
        if sweep:
            n = round((hi - lo) / self.value.step)
            grid = [round(lo + i * (hi - lo) / n, 10) for i in range(n + 1)] if 0 < n <= 400 else []
            self.sweep = _sweep(self._bt, [*grid, self.value.value])
            self.sweep_view = _chart_widget(
                viz.limit_sweep_chart(
                    self.sweep, value=self.value.value, name=name, unit=self.definition.unit
                )
            )
            _pin_param(self.sweep_view, "value", lambda: float(self.value.value))
            parts.append(self.sweep_view)
        self._draw_table()
        self.widget = widgets.VBox(parts)
        self.value.observe(lambda _: self.on_value(), "value")

    def _compute(self, value: float) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The backtest at ``value``: its breaches and the per-account summary."""
        found = self._bt.run(value)
        per = breach_summary(found, horizon=self.horizon, accounts=self.account_names)
        summary = per.join(self._existing_per_account, on="account_id", how="left").with_columns(
            pl.col("existing_breaches").fill_null(0)
        )
        return found, summary

    def _timeline_chart(self, found: pl.DataFrame) -> Any:
        name = self.definition.name
        stored = self.existing.with_columns(pl.col(c).cast(pl.String) for c in _CAT_COLS)
        # the stored limits of the type being tuned get a lane beside the hypothetical one
        stored = stored.with_columns(
            pl.when(pl.col("limit_type") == name)
            .then(pl.lit(f"{name} (stored)"))
            .otherwise(pl.col("limit_type"))
            .alias("limit_type")
        )
        both = pl.concat([found.with_columns(pl.col(c).cast(pl.String) for c in _CAT_COLS), stored])
        return viz.breach_chart(
            both, start=self.start, end=self.horizon, horizon=self.horizon, max_rows=self.max_rows
        )

    def _draw_table(self) -> None:
        name, v = self.definition.name, self.value.value
        hit = self.summary.filter(pl.col("breaches") > 0)
        scope = "every account" if self.accounts is None else ", ".join(self.accounts)
        self.caption.value = (
            f"<b>{html.escape(name)} &le; {v:{self._format}}</b> {html.escape(self.definition.unit)}"
            f" for {html.escape(scope)}: <b>{_count(int(hit['breaches'].sum()), 'breach')}</b> in"
            f" {hit.height} account{'s' if hit.height != 1 else ''},"
            f" {hit['hours_in_breach'].sum():,.1f} h in breach. The stored limits:"
            f" {_count(self.existing.height, 'breach')}."
            f" <span style='color:#777'>(backtest and redraw: {self.step_ms:,.0f} ms)</span>"
        )
        self.table.value = html_table(
            self.summary.drop("first_started_at").with_columns(
                (pl.col("breaches") > 0).alias("in_breach")
            ),
            formats={"hours_in_breach": ",.1f", "longest_hours": ",.1f", "peak_value": ",.4g"},
            highlight="in_breach",
        )

    def on_value(self) -> None:
        """The value moved: backtest at it, redraw the breaches and the table, move the rules.

        All is computed and drawn before anything the panel holds changes: a failure
        leaves the breaches, the summary, the caption and the chart of the last value.
        """
        started = time.perf_counter()
        v = float(self.value.value)
        found, summary = self._compute(v)
        chart = self._timeline_chart(found)
        chart.to_dict()  # validated (row caps, schema) before it replaces the old one
        self.timeline.chart = chart
        self.breaches, self.summary = found, summary
        self.metric_view.params.limit = v  # type: ignore[attr-defined]
        if self.sweep_view is not None:
            self.sweep_view.params.value = v  # type: ignore[attr-defined]
        self.step_ms = (time.perf_counter() - started) * 1000
        self._draw_table()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


_CAT_COLS = ("account_id", "limit_type", "symbol", "set_by")


# ----------------------------------------------------------------------------- live

_LIVE_EFFECTS_SCHEMA: dict[str, Any] = {
    **viz.LIVE_EFFECTS_SCHEMA,
    "causation_id": pl.String,
    "correlation_id": pl.String,
    "shown_at": pl.Datetime("us", "UTC"),
}
_RATE_SECONDS = 5.0
_MAX_EFFECTS = 10_000
_GREEN, _RED = "#1e8449", "#c0392b"


def _clock(t: datetime) -> str:
    return f"{t.astimezone(UTC):%H:%M:%S.%f}"[:-3]


def _card(label: str, value: str, *, alert: bool = False) -> str:
    color = _RED if alert else "#222"
    return (
        "<div style='display:inline-block;min-width:104px;margin:0 6px 6px 0;padding:4px 8px;"
        "border:1px solid #ddd;border-radius:4px;font-family:sans-serif'>"
        f"<div style='font-size:11px;color:#777'>{html.escape(label)}</div>"
        f"<div style='font-size:17px;color:{color}'>{html.escape(value)}</div></div>"
    )


class LiveMonitor:
    """Watch a running live processor: its violations and blocks as they arrive.

    What it shows, refreshed from the processor's own commits: counters (events
    processed, events/s over the last five seconds, micro-batches, violations, blocks,
    the accounts blocked now, batch time), a table of the effects (newest first), and
    :func:`riskbook.viz.live_chart` (events per second, violations and blocks as
    committed, the time of each micro-batch). Beneath, a pre-trade check form
    (account, symbol, side, quantity, price: :func:`riskbook.check` on the
    processor's state) and an unblock form (a blocked account, who and why:
    :func:`riskbook.unblock`).

    The panel hooks the processor's ``on_commit`` (chaining the one it had): in the
    processor's thread it only records the commit and, when the commit appended
    effects, wakes the panel's own refresher thread, which redraws at once (the chart
    at most every ``chart_interval`` seconds) and otherwise every ``interval``
    seconds -- so drawing never slows the processor. :meth:`refresh` redraws
    everything now (a test, or a notebook cell, calls it); :meth:`close` unhooks and
    stops the refresher.

    Kept as frames: ``commits`` (one row per micro-batch,
    :data:`riskbook.viz.LIVE_COMMITS_SCHEMA`) and ``effects`` (newest first; with
    ``shown_at``, when the row reached the table); ``counters`` is a dict of the
    figures shown. ``last_check`` and ``last_unblock`` are the forms' last results.

    Parameters
    ----------
    processor : a :class:`riskbook.live.Processor` (started or not).
    store : where unblocks are appended (default: the processor's store).
    interval : seconds between refreshes when nothing is violated.
    chart_interval : seconds between chart redraws at most.
    rows : effects shown in the table.
    window : the time the chart shows.
    autorefresh : run the refresher thread (False: only :meth:`refresh` redraws).
    """

    def __init__(
        self,
        processor: Processor,
        store: Store | None = None,
        *,
        interval: float = 0.5,
        chart_interval: float = 1.0,
        rows: int = 50,
        window: timedelta = timedelta(minutes=2),
        autorefresh: bool = True,
        max_commits: int = 20_000,
    ) -> None:
        self.processor = processor
        self.store = store if store is not None else processor.store
        self.interval, self.chart_interval = interval, chart_interval
        self.rows, self.window, self.max_commits = rows, window, max_commits
        self.commits = pl.DataFrame(schema=viz.LIVE_COMMITS_SCHEMA)
        self.effects = pl.DataFrame(schema=_LIVE_EFFECTS_SCHEMA)
        self.counters: dict[str, Any] = {}
        self.last_check: CheckResult | None = None
        self.last_unblock: Envelope | None = None
        self.error: BaseException | None = None
        self.refreshes = 0
        self.refresh_ms = 0.0
        # recorded in the processor's thread, drawn in the refresher's
        self._data = threading.Lock()
        self._draw = threading.RLock()
        self._new_commits: list[tuple[Any, ...]] = []
        self._new_effects: list[dict[str, Any]] = []
        self._noted = -1
        self._totals = {"batches": 0, "events": 0, "violations": 0, "blocks": 0}
        self._chart_at = 0.0
        self._chart_horizon = -1
        self._table_stale = True
        self._wake = threading.Event()
        self._closing = threading.Event()

        # the widget tree
        self.status = widgets.HTML()
        self.counter_view = widgets.HTML()
        self.table = widgets.HTML()
        self.chart = _chart_widget(viz.live_chart(self.commits, self.effects, window=window))
        text = {"style": {"description_width": "70px"}, "layout": widgets.Layout(width="250px")}
        self.account = widgets.Combobox(description="account", ensure_option=False, **text)
        self.symbol = widgets.Combobox(description="symbol", ensure_option=False, **text)
        self.side = widgets.ToggleButtons(
            options=["Buy", "Sell"],
            value="Buy",
            description="side",
            style={"button_width": "60px", "description_width": "70px"},
        )
        self.quantity = widgets.FloatText(value=100.0, description="quantity", **text)
        self.price = widgets.FloatText(value=100.0, description="price", **text)
        self.check_button = widgets.Button(description="check", button_style="primary")
        self.check_result = widgets.HTML()
        self.blocked_account = widgets.Dropdown(options=[], description="account", **text)
        self.by = widgets.Text(description="by", placeholder="who unblocks", **text)
        self.reason = widgets.Text(description="reason", placeholder="why", **text)
        self.unblock_button = widgets.Button(description="unblock", button_style="warning")
        self.unblock_result = widgets.HTML()
        self.check_button.on_click(lambda _: self.run_check())
        self.unblock_button.on_click(lambda _: self.run_unblock())
        box = {"layout": widgets.Layout(width="430px", padding="0 24px 0 0")}
        self.widget = widgets.VBox(
            [
                self.status,
                self.counter_view,
                self.chart,
                _heading("Violations and blocks (newest first)"),
                self.table,
                widgets.HBox(
                    [
                        widgets.VBox(
                            [
                                _heading("Pre-trade check"),
                                self.account,
                                self.symbol,
                                self.side,
                                self.quantity,
                                self.price,
                                self.check_button,
                                self.check_result,
                            ],
                            **box,
                        ),
                        widgets.VBox(
                            [
                                _heading("Unblock an account"),
                                self.blocked_account,
                                self.by,
                                self.reason,
                                self.unblock_button,
                                self.unblock_result,
                            ],
                            **box,
                        ),
                    ]
                ),
            ]
        )

        with self._data:  # hook first, then take what came before (deduplicated by horizon)
            self._chained = processor.on_commit
            processor.on_commit = self._on_commit
        for commit in tuple(processor.commits):
            self._note(commit)
        self.refresh()
        self._thread: threading.Thread | None = None
        if autorefresh:
            self._thread = threading.Thread(
                target=self._loop, name=f"riskbook-monitor-{processor.name}", daemon=True
            )
            self._thread.start()

    # ---------------------------------------------------------------- recording

    def _on_commit(self, commit: Commit) -> None:
        """In the processor's thread: record, and wake the refresher for effects."""
        try:
            self._note(commit)
            if commit.effects:
                self._wake.set()
        except Exception as exc:  # never fail the processor for a panel
            self.error = exc
        if self._chained is not None:
            self._chained(commit)

    def _note(self, commit: Commit) -> None:
        with self._data:
            if commit.horizon <= self._noted:
                return
            self._noted = commit.horizon
            at = datetime.fromtimestamp(commit.committed_at, UTC)
            kinds = [e.kind for e in commit.effects]
            violations = kinds.count("LimitViolationDetected")
            blocks = kinds.count("AccountBlocked")
            self._new_commits.append(
                (at, commit.horizon, commit.events, violations, blocks, commit.seconds)
            )
            self._new_effects += [
                {
                    "committed_at": at,
                    "kind": e.kind,
                    "account_id": e.account_id,
                    "limit_type": e.limit_type,
                    "symbol": e.symbol,
                    "value": e.value,
                    "limit_value": e.limit_value,
                    "trigger_position": e.trigger_position,
                    "causation_id": e.causation_id,
                    "correlation_id": e.correlation_id,
                    "shown_at": None,
                }
                for e in commit.effects
            ]
            t = self._totals
            t["batches"] += 1
            t["events"] += commit.events
            t["violations"] += violations
            t["blocks"] += blocks

    # ---------------------------------------------------------------- drawing

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._closing.is_set():
                return
            try:
                self._refresh(chart=False)
            except Exception as exc:  # shown in the status line; the loop goes on
                self.error = exc
                self.status.value = (
                    f"<span style='color:{_RED}'>panel error: {html.escape(str(exc))}</span>"
                )

    def refresh(self) -> None:
        """Take in every commit recorded so far and redraw everything, now."""
        self._refresh(chart=True)

    def _refresh(self, *, chart: bool) -> None:
        with self._draw:
            started = time.perf_counter()
            with self._data:
                commits, self._new_commits = self._new_commits, []
                found, self._new_effects = self._new_effects, []
                totals = dict(self._totals)
                horizon = self._noted
            if commits:
                new = pl.DataFrame(commits, schema=viz.LIVE_COMMITS_SCHEMA, orient="row")
                self.commits = pl.concat([self.commits, new]).tail(self.max_commits)
            if found:
                fresh = pl.DataFrame(found, schema=_LIVE_EFFECTS_SCHEMA).reverse()
                self.effects = pl.concat([fresh, self.effects]).head(_MAX_EFFECTS)
                self._table_stale = True
            if self._table_stale:
                self._draw_table()
                self._table_stale = False
                now = datetime.now(UTC)  # the rows are on their way to the browser
                self.effects = self.effects.with_columns(
                    pl.col("shown_at").fill_null(pl.lit(now, dtype=pl.Datetime("us", "UTC")))
                )
            self._draw_counters(totals)
            self._draw_controls()
            due = time.monotonic() - self._chart_at >= self.chart_interval
            if horizon != self._chart_horizon and (chart or due or bool(found)):
                drawn: Any = viz.live_chart(self.commits, self.effects, window=self.window)
                self.chart.chart = drawn
                self._chart_at, self._chart_horizon = time.monotonic(), horizon
            self.refreshes += 1
            self.refresh_ms = (time.perf_counter() - started) * 1000

    def _draw_table(self) -> None:
        shown = self.effects.head(self.rows).select(
            pl.col("committed_at").alias("committed"),
            pl.col("kind").replace_strict(
                {"LimitViolationDetected": "violation", "AccountBlocked": "BLOCK"},
                default=pl.col("kind"),
            ),
            pl.col("account_id").alias("account"),
            pl.col("limit_type").alias("limit"),
            "symbol",
            "value",
            "limit_value",
            (pl.col("value") / pl.col("limit_value")).alias("of_limit"),
            pl.col("correlation_id").alias("caused by (correlation)"),
            (pl.col("kind") == "AccountBlocked").alias("_block"),
        )
        if self.effects.height == 0:
            self.table.value = "<i style='color:#777'>no violation yet</i>"
            return
        self.table.value = html_table(
            shown,
            formats={"value": ",.6g", "limit_value": ",.6g", "of_limit": ".0%"},
            highlight="_block",
            max_rows=self.rows,
        ) + (
            f"<div style='color:#777'>{self.effects.height - self.rows:,} older not shown</div>"
            if self.effects.height > self.rows
            else ""
        )

    def _draw_counters(self, totals: dict[str, int]) -> None:
        p = self.processor
        engine = p.engine
        blocked = sorted(a for a, b in engine.blocked.items() if b)
        now = datetime.now(UTC)
        recent = self.commits.filter(
            pl.col("committed_at") > now - timedelta(seconds=_RATE_SECONDS)
        )
        windowed = self.commits.filter(pl.col("committed_at") > now - self.window)
        ms = windowed["seconds"] * 1000
        shown = self.effects.filter(pl.col("shown_at").is_not_null())
        delay = (
            (shown["shown_at"] - shown["committed_at"]).dt.total_microseconds() / 1000
            if shown.height
            else pl.Series([], dtype=pl.Float64)
        )
        self.counters = {
            "status": p.status,
            "horizon": engine.horizon,
            "events_processed": engine.events_seen,
            "events_per_second": float(recent["events"].sum()) / _RATE_SECONDS,
            "batches": totals["batches"],
            "violations": totals["violations"],
            "blocks": totals["blocks"],
            "blocked_accounts": blocked,
            "batch_ms_p50": float(ms.quantile(0.5) or 0.0) if ms.len() else None,
            "batch_ms_p99": float(ms.quantile(0.99) or 0.0) if ms.len() else None,
            "commit_to_panel_ms": float(delay[0]) if delay.len() else None,
        }
        c = self.counters
        state = "running" if p.running else "stopped"
        color = _GREEN if p.running and p.error is None else _RED
        last = self.commits["committed_at"].max() if self.commits.height else None
        self.status.value = (
            f"<b>{html.escape(p.name)}</b>: <span style='color:{color}'>"
            f"{html.escape(state)}</span>"
            + (f" ({html.escape(str(p.status))})" if p.status != state else "")
            + (f" &middot; last commit {_clock(last)} UTC" if isinstance(last, datetime) else "")
            + "".join(
                f" &middot; <span style='color:{_RED}'>{what}: {html.escape(str(exc))}</span>"
                for what, exc in (("processor error", p.error), ("panel error", self.error))
                if exc is not None
            )
        )

        def ms_text(v: float | None) -> str:
            return "-" if v is None else f"{v:,.1f} ms"

        self.counter_view.value = "".join(
            [
                _card("events processed", f"{c['events_processed']:,}"),
                _card("events/s (last 5 s)", f"{c['events_per_second']:,.0f}"),
                _card("batches", f"{c['batches']:,}"),
                _card("violations", f"{c['violations']:,}", alert=c["violations"] > 0),
                _card("blocks", f"{c['blocks']:,}", alert=c["blocks"] > 0),
                _card("blocked now", ", ".join(blocked) or "none", alert=bool(blocked)),
                _card(
                    "batch p50 / p99",
                    f"{ms_text(c['batch_ms_p50'])} / {ms_text(c['batch_ms_p99'])}",
                ),
                _card("last effect: commit → panel", ms_text(c["commit_to_panel_ms"])),
            ]
        )

    def _draw_controls(self) -> None:
        """The forms' choices follow the processor's state (only sent when they change)."""
        projection = self.processor.engine.projection
        accounts = tuple(
            sorted(
                {
                    *projection.accounts["account_id"].cast(pl.String).to_list(),
                    *projection.positions["account_id"].cast(pl.String).to_list(),
                }
            )
        )
        symbols = tuple(sorted(set(projection.positions["symbol"].cast(pl.String).to_list())))
        if tuple(self.account.options) != accounts:
            self.account.options = accounts
        if tuple(self.symbol.options) != symbols:
            self.symbol.options = symbols
        blocked = tuple(sorted(a for a, b in self.processor.engine.blocked.items() if b))
        if tuple(self.blocked_account.options) != blocked:
            keep = self.blocked_account.value
            self.blocked_account.options = blocked
            self.blocked_account.value = keep if keep in blocked else (blocked or (None,))[0]

    # ---------------------------------------------------------------- actions

    def run_check(self) -> CheckResult | None:
        """The check form's trade, checked on the processor's current state."""
        started = time.perf_counter()
        try:
            result = live_check(
                self.account.value.strip(),
                self.symbol.value.strip(),
                self.side.value,
                float(self.quantity.value),
                float(self.price.value),
                processor=self.processor,
            )
        except (RiskbookError, ValueError) as exc:
            self.check_result.value = (
                f"<span style='color:{_RED}'>cannot check: {html.escape(str(exc))}</span>"
            )
            return None
        took = (time.perf_counter() - started) * 1000
        self.last_check = result
        color = _GREEN if result.accepted else _RED
        head = html.escape(str(result).splitlines()[0])
        reasons = "".join(f"<li>{html.escape(r.message)}</li>" for r in result.reasons)
        self.check_result.value = (
            f"<div style='font-family:sans-serif'><b style='color:{color}'>{head}</b>"
            f"{f'<ul style=margin:2px>{reasons}</ul>' if reasons else ''}"
            f"<div style='color:#777;font-size:11px'>on the processor's state after"
            f" {self.processor.engine.events_seen:,} events, in {took:,.1f} ms</div></div>"
        )
        return result

    def run_unblock(self) -> Envelope | None:
        """Unblock the picked account, by whom and why (an AccountUnblocked event)."""
        account = self.blocked_account.value
        if not account:
            self.unblock_result.value = "<i>no account is blocked</i>"
            return None
        try:
            envelope = live_unblock(
                account, by=self.by.value, reason=self.reason.value, store=self.store
            )
        except RiskbookError as exc:
            self.unblock_result.value = (
                f"<span style='color:{_RED}'>not unblocked: {html.escape(str(exc))}</span>"
            )
            return None
        self.last_unblock = envelope
        self.unblock_result.value = (
            f"<span style='color:{_GREEN}'>{html.escape(account)} unblocked by"
            f" {html.escape(self.by.value)}</span>: {html.escape(self.reason.value)}"
            f" <span style='color:#777'>(AccountUnblocked {str(envelope.event_id)[:8]}…,"
            f" recorded {_clock(envelope.timestamp)} UTC)</span>"
        )
        self._wake.set()
        return envelope

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the refresher, unhook from the processor (which goes on running) and draw
        the last state."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._data:
            if self.processor.on_commit == self._on_commit:
                self.processor.on_commit = self._chained
        try:  # the last state stays on show (a processor stopped first shows "stopped")
            self._refresh(chart=True)
        except Exception as exc:
            self.error = exc

    def __enter__(self) -> LiveMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
