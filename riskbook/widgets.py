"""Interactive panels for the notebooks: controls, tables and charts over a History.

Two panels (DESIGN.md §1 layer 7), each a small class whose widget tree is built once
and whose update functions recompute its frames and redraw its charts in place when a
control changes:

* :class:`ExposureExplorer` -- for quants: a measure of every account over time,
  positions at the time on the ``at`` slider, the history as known at the ``known_at``
  slider, and one account's equity, leverage and positions when it is picked;
* :class:`IncidentPanel` -- for auditors: pick a violation or a block; the state the
  engine saw (as known at the recorded moment) beside the corrected history, the limit
  in force and who set it, the causation chain, and a step control that walks the
  events around it one by one.

Each panel keeps what it shows as Polars frames (``panel.accounts_at``,
``panel.compare`` ...) and its charts as ``altair.JupyterChart`` widgets
(``panel.overview.chart`` ...), so a test can set a control's ``.value`` and read both
without a browser. The computations behind the incident panel are module functions
(:func:`incidents`, :func:`limit_in_force`, :func:`limits_in_force`,
:func:`causation_chain`, :func:`compare_states`) usable on their own.

Display a panel by leaving it as a cell's last expression (or ``display(panel)``).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import altair as alt
import ipywidgets as widgets
import polars as pl
import traitlets

from riskbook import projections as P
from riskbook import viz
from riskbook.frames import History

__all__ = [
    "ExposureExplorer",
    "IncidentPanel",
    "TimeSlider",
    "causation_chain",
    "compare_states",
    "daily_volume",
    "html_table",
    "incident_metric",
    "incidents",
    "limit_in_force",
    "limits_in_force",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ALL = "all accounts"


# ----------------------------------------------------------------------------- controls


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("a time without a time zone is ambiguous: give UTC explicitly")
    return t.astimezone(UTC)


class TimeSlider(widgets.HBox):
    """A slider over a time range whose ``value`` is an exact UTC datetime.

    Dragging moves ``value`` by whole ``step``\\ s from ``start``; setting ``value`` from
    code keeps it exact to the microsecond (the slider shows the nearest step), so a
    panel can put ``known_at`` precisely on an event's recorded time.

    Parameters
    ----------
    start, end : the range (UTC datetimes).
    value : the first value (default ``end``).
    step : the slider's resolution.
    description : the label in front of it.
    """

    value = traitlets.Any()

    def __init__(
        self,
        start: datetime,
        end: datetime,
        *,
        value: datetime | None = None,
        step: timedelta = timedelta(seconds=1),
        description: str = "at",
        continuous_update: bool = True,
    ) -> None:
        self.start, self.end, self.step = _utc(start), _utc(end), step
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
        self.value = self.end if value is None else value

    def _dragged(self, change: dict[str, Any]) -> None:
        if not self._syncing:
            self.value = min(self.start + change["new"] * self.step, self.end)

    @traitlets.validate("value")
    def _valid(self, proposal: dict[str, Any]) -> datetime:
        v = proposal["value"]
        if not isinstance(v, datetime):
            raise traitlets.TraitError(f"a TimeSlider's value is a datetime, not {v!r}")
        return min(max(_utc(v), self.start), self.end)

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


def html_table(
    frame: pl.DataFrame,
    *,
    formats: dict[str, str] | None = None,
    highlight: str | None = None,
    max_rows: int = 200,
) -> str:
    """A frame as a compact HTML table: numbers right-aligned with separators.

    Parameters
    ----------
    frame : what to show.
    formats : Python format specs per column (default ``,.2f`` for floats).
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
                text, align = format(v, formats.get(c, ",.2f")), "right"
            elif isinstance(v, int) and not isinstance(v, bool):
                text, align = format(v, formats.get(c, ",d")), "right"
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


def _chart_widget(chart: Any) -> alt.JupyterChart:
    alt.JupyterChart.enable_offline(offline=True)  # Vega from vl-convert's bundle, no CDN
    return alt.JupyterChart(chart, embed_options={"renderer": "svg", "actions": False})


def _set_rule(chart: alt.JupyterChart, value: float | None) -> None:
    """Move a chart's time rule (its ``at`` parameter) without resending its data."""
    chart.params.at = value  # type: ignore[attr-defined]  # Params gets one trait per param


def _pin_rule(chart: alt.JupyterChart, want: Callable[[], float | None]) -> None:
    """Keep a chart's ``at`` parameter where the panel says, whatever the browser does.

    When a chart's spec is replaced, the browser re-embeds it asynchronously and then
    reports the new view's parameters back (the spec's initial values); a ``params.at``
    set in between is lost that way. This puts it back when the report arrives.
    """

    def check(change: dict[str, Any]) -> None:
        value = want()
        reported = (change["new"] or {}).get("at")
        if "at" in (change["new"] or {}) and value is not None and reported != value:
            _set_rule(chart, value)

    chart.observe(check, "_params")


def _ms(t: datetime | None) -> float | None:
    return None if t is None else (t - _EPOCH) / timedelta(milliseconds=1)


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
        at: datetime | None = None,
        max_rows: int = viz.MAX_ROWS,
    ) -> None:
        if history.events.height == 0:
            raise ValueError("the history is empty: nothing to explore")
        self.history = history
        self.max_rows = max_rows
        events = history.events
        first = events["occurred_at"].min()
        last = events["occurred_at"].max()
        recorded = events["timestamp"].max()
        assert isinstance(first, datetime) and isinstance(last, datetime)
        assert isinstance(recorded, datetime)
        names = sorted(P.accounts(history)["account_id"].cast(pl.String).to_list())
        self.account_names = names

        # the widget tree
        self.measure = widgets.Dropdown(
            options=[(v, k) for k, v in viz.MEASURES.items()], value=measure, description="measure"
        )
        self.account = widgets.Dropdown(
            options=[_ALL, *names], value=account or _ALL, description="account"
        )
        self.at = TimeSlider(
            first, last, value=at or last, step=timedelta(minutes=1), description="at (T)"
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
        t, k = self.at.value, self.k
        self.accounts_at = P.accounts(self.history, at=t, known_at=k)
        positions = P.positions(self.history, at=t, known_at=k)
        if self.picked:
            positions = positions.filter(pl.col("account_id").cast(pl.String) == self.picked)
        self.positions_at = positions

    # ---------------------------------------------------------------- drawing

    def _overview_chart(self) -> Any:
        return viz.exposure_chart(
            self.timeline,
            measure=self.measure.value,
            accounts=[self.picked] if self.picked else None,
            at=self.at.value,
            max_rows=self.max_rows,
        )

    def _snapshot_chart(self) -> Any:
        return viz.exposure_at_chart(self.positions_at, at=self.at.value)

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
        fmt = {"leverage": ".3f", "drawdown": ".2%", "quantity": ",.0f", "trades": ",d"}
        known = (
            "everything recorded"
            if self.k is None
            else f"recorded by {self.k:%Y-%m-%d %H:%M:%S} UTC"
        )
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
        charts: dict[str, Any] = {
            "equity": viz.equity_chart(
                self.timeline,
                account=account,
                limits=limits,
                at=t,
                known_at=k,
                max_rows=self.max_rows,
            ),
            "leverage": viz.leverage_chart(
                self.timeline, limits, account=account, at=t, known_at=k, max_rows=self.max_rows
            ),
            "positions": viz.position_chart(
                self.position_timeline,
                account=account,
                limits=limits,
                at=t,
                known_at=k,
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

    def on_at(self) -> None:
        """T moved: the state at T, its table and bars; the rules move in place."""
        self._compute_state()
        self.snapshot.chart = self._snapshot_chart()
        self._draw_table()
        self._move_rules()

    def on_known_at(self) -> None:
        """K moved: everything is recomputed as known at K."""
        self._compute_timeline()
        self._compute_state()
        self.overview.chart = self._overview_chart()
        self.snapshot.chart = self._snapshot_chart()
        self._draw_table()
        self._draw_details()

    def on_measure(self) -> None:
        self.overview.chart = self._overview_chart()

    def on_account(self) -> None:
        """Drill into an account (or back to all)."""
        self._compute_state()
        self.overview.chart = self._overview_chart()
        self.snapshot.chart = self._snapshot_chart()
        self._draw_table()
        self._draw_details()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


# ----------------------------------------------------------------------------- incidents


def incidents(history: History) -> pl.DataFrame:
    """Every LimitViolationDetected and AccountBlocked, with what it was about.

    Returns ``event_id, event_type, account_id, limit_type, symbol, occurred_at,
    timestamp, causation_id, correlation_id, label``, in global order. A block's limit
    type and symbol are those of the violation with the same cause (or correlation),
    when there is one.
    """
    v = history.violations.select(
        "event_id",
        pl.lit("LimitViolationDetected").alias("event_type"),
        pl.col("account_id").cast(pl.String),
        pl.col("limit_type").cast(pl.String),
        pl.col("symbol").cast(pl.String),
        pl.col("detected_at").alias("occurred_at"),
        "timestamp",
        "position",
        "causation_id",
        "correlation_id",
        pl.format(
            "{} > {}",
            pl.col("current_value").round(4),
            pl.col("limit_value").round(4),
        ).alias("detail"),
    )
    b = history.blocks.filter(pl.col("blocked")).select(
        "event_id",
        pl.lit("AccountBlocked").alias("event_type"),
        pl.col("account_id").cast(pl.String),
        "causation_id",
        "correlation_id",
        pl.col("at").alias("occurred_at"),
        "timestamp",
        "position",
        pl.col("reason").alias("detail"),
    )
    about = v.select("causation_id", "correlation_id", "limit_type", "symbol")
    by_cause = b.join(
        about.drop("correlation_id").unique("causation_id"), on="causation_id", how="left"
    )
    by_corr = (
        by_cause.filter(pl.col("limit_type").is_null())
        .drop("limit_type", "symbol")
        .join(about.drop("causation_id").unique("correlation_id"), on="correlation_id", how="left")
    )
    b = pl.concat(
        [by_cause.filter(pl.col("limit_type").is_not_null()), by_corr], how="diagonal"
    ).select(v.columns)
    out = pl.concat([v, b]).sort("position")
    return out.with_columns(
        pl.format(
            "{} {} {}: {} {}",
            pl.col("occurred_at").dt.strftime("%Y-%m-%d %H:%M:%S"),
            pl.col("account_id"),
            pl.when(pl.col("event_type") == "AccountBlocked")
            .then(pl.lit("BLOCKED"))
            .otherwise(pl.lit("violation")),
            pl.col("limit_type").fill_null(""),
            pl.col("detail").fill_null(""),
        ).alias("label")
    ).drop("detail", "position")


def limits_in_force(
    limits: pl.DataFrame,
    *,
    account: str,
    at: datetime | None = None,
    known_at: datetime | None = None,
) -> pl.DataFrame:
    """The limits of an account in force at T as known at K, and who set them.

    The latest LimitSet per (limit_type, symbol) with ``set_at <= at`` and recorded
    (``timestamp``) by ``known_at`` -- latest in the order (business time, recorded
    time, position). Returns ``limit_type, symbol`` (null: account-wide), ``value,
    set_by, set_at, recorded_at, event_id``.
    """
    rows = limits.filter(pl.col("account_id").cast(pl.String) == account)
    if at is not None:
        rows = rows.filter(pl.col("set_at") <= at)
    if known_at is not None:
        rows = rows.filter(pl.col("timestamp") <= known_at)
    return (
        rows.sort("set_at", "timestamp", "position")
        .with_columns(pl.col("limit_type").cast(pl.String), pl.col("symbol").cast(pl.String))
        .group_by("limit_type", "symbol", maintain_order=True)
        .last()
        .select(
            "limit_type",
            "symbol",
            "value",
            pl.col("set_by").cast(pl.String),
            "set_at",
            pl.col("timestamp").alias("recorded_at"),
            "event_id",
        )
        .sort("limit_type", "symbol", nulls_last=False)
    )


def limit_in_force(
    limits: pl.DataFrame,
    *,
    account: str,
    limit_type: str,
    symbol: str | None = None,
    at: datetime | None = None,
    known_at: datetime | None = None,
) -> dict[str, Any] | None:
    """The one limit that applied: a symbol's own MaxPositionSize overrides the account's.

    Returns the row of :func:`limits_in_force` as a dict, with ``scope`` ("symbol" or
    "account"), or None when no limit of that type was in force.
    """
    rows = limits_in_force(limits, account=account, at=at, known_at=known_at).filter(
        pl.col("limit_type") == limit_type
    )
    if symbol is not None:
        own = rows.filter(pl.col("symbol") == symbol)
        if own.height:
            return {**own.row(0, named=True), "scope": "symbol"}
    wide = rows.filter(pl.col("symbol").is_null())
    return {**wide.row(0, named=True), "scope": "account"} if wide.height else None


def daily_volume(
    history: History, *, account: str, at: datetime, known_at: datetime | None = None
) -> float:
    """Σ|quantity| of the account's trades in T's UTC day up to T, as known at K (busts out)."""
    day = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    trades = history.trades.filter(
        (pl.col("account_id").cast(pl.String) == account)
        & pl.col("executed_at").is_between(day, at)
    )
    cancels = history.cancels.filter(pl.col("account_id").cast(pl.String) == account)
    if known_at is not None:
        trades = trades.filter(pl.col("timestamp") <= known_at)
        cancels = cancels.filter(pl.col("timestamp") <= known_at)
    live = trades.join(cancels.select("trade_id"), on="trade_id", how="anti")
    return float(live["quantity"].abs().sum())


def compare_states(
    history: History,
    *,
    account: str,
    at: datetime,
    known_at: datetime | None,
) -> pl.DataFrame:
    """The account as the engine saw it (known at K) beside the corrected history.

    One row per figure: the account's ``equity, cash, gross_exposure, net_exposure,
    leverage, drawdown``, its daily volume, then the quantity of each of its positions
    (``position <symbol>``), each with ``engine`` (at T, known at K), ``corrected`` (at
    T, everything known now) and ``difference`` (corrected - engine).
    """

    def figures(k: datetime | None) -> dict[str, float]:
        acc = P.accounts(history, at=at, known_at=k).filter(
            pl.col("account_id").cast(pl.String) == account
        )
        pos = P.positions(history, at=at, known_at=k).filter(
            pl.col("account_id").cast(pl.String) == account
        )
        out: dict[str, float] = {}
        if acc.height:
            row = acc.row(0, named=True)
            for name in (
                "equity",
                "cash",
                "gross_exposure",
                "net_exposure",
                "leverage",
                "drawdown",
            ):
                out[name] = float(row[name])
        out["daily_volume"] = daily_volume(history, account=account, at=at, known_at=k)
        for sym, q in pos.select(pl.col("symbol").cast(pl.String), "quantity").iter_rows():
            out[f"position {sym}"] = float(q)
        return out

    engine, corrected = figures(known_at), figures(None)
    names = list(dict.fromkeys([*engine, *corrected]))
    return pl.DataFrame(
        {
            "figure": names,
            "engine": [engine.get(n) for n in names],
            "corrected": [corrected.get(n) for n in names],
        },
        schema={"figure": pl.String, "engine": pl.Float64, "corrected": pl.Float64},
    ).with_columns((pl.col("corrected") - pl.col("engine")).alias("difference"))


def incident_metric(
    compare: pl.DataFrame, limit_type: str | None, symbol: str | None = None
) -> tuple[float | None, float | None]:
    """The metric a limit type is checked against, from :func:`compare_states`' rows.

    Returns ``(engine, corrected)``: ``|position|`` of ``symbol`` for MaxPositionSize,
    leverage, drawdown, or the day's volume; None where the figure is absent (no
    position, unknown limit type).
    """
    figure = {
        "MaxPositionSize": f"position {symbol}",
        "MaxLeverage": "leverage",
        "MaxDrawdown": "drawdown",
        "MaxDailyVolume": "daily_volume",
    }.get(limit_type or "")
    row = compare.filter(pl.col("figure") == figure)
    if figure is None or row.height == 0:
        return None, None
    engine, corrected = row["engine"][0], row["corrected"][0]
    if limit_type == "MaxPositionSize":
        engine = None if engine is None else abs(engine)
        corrected = None if corrected is None else abs(corrected)
    return engine, corrected


def causation_chain(history: History, event_id: str) -> pl.DataFrame:
    """The events linked to one: its causes, its effects, and those of its correlation.

    Walks ``causation_id`` up to the first cause and down to every effect, adds the
    other effects of its causes ("same cause": the violation beside a block, both
    caused by one trade) and the events sharing the event's ``correlation_id`` (an
    order, a price update). Returns ``relation`` ("cause", "this", "effect", "same
    cause", "correlated"), ``event_type, account_id,
    occurred_at, timestamp, position, event_id, causation_id, summary``, in global
    order.
    """
    ev = history.events.select(
        "event_id",
        pl.col("event_type").cast(pl.String),
        "occurred_at",
        "timestamp",
        "position",
        "causation_id",
        "correlation_id",
        pl.col("aggregate_id").cast(pl.String),
    )
    by_id = {
        r["event_id"]: r
        for r in ev.filter(pl.col("event_id").is_in(_linked_ids(ev, event_id))).iter_rows(
            named=True
        )
    }
    if event_id not in by_id:
        raise KeyError(f"no event {event_id} in this history")
    relation: dict[str, str] = {event_id: "this"}
    cause = by_id[event_id]["causation_id"]
    while cause is not None and cause in by_id and cause not in relation:
        relation[cause] = "cause"
        cause = by_id[cause]["causation_id"]
    ancestors = [i for i, r in relation.items() if r == "cause"]
    for roots, name in (([event_id], "effect"), (ancestors, "same cause")):
        frontier = list(roots)
        while frontier:
            nxt = [
                i for i, r in by_id.items() if r["causation_id"] in frontier and i not in relation
            ]
            relation.update(dict.fromkeys(nxt, name))
            frontier = nxt
    for i in by_id:
        relation.setdefault(i, "correlated")
    rows = pl.DataFrame(list(by_id.values())).with_columns(
        pl.col("event_id").replace_strict(relation).alias("relation")
    )
    lo, hi = rows["occurred_at"].min(), rows["occurred_at"].max()
    assert isinstance(lo, datetime) and isinstance(hi, datetime)
    summaries = viz.event_lanes(
        history, start=lo, end=hi, accounts=None, max_rows=1_000_000
    ).filter(pl.col("event_id").is_in(rows["event_id"].implode()))
    return (
        rows.join(summaries.select("event_id", "account_id", "summary"), on="event_id", how="left")
        .sort("position")
        .select(
            "relation",
            "event_type",
            pl.coalesce("account_id", "aggregate_id").alias("account_id"),
            "occurred_at",
            "timestamp",
            "position",
            "event_id",
            "causation_id",
            "summary",
        )
    )


def _linked_ids(ev: pl.DataFrame, event_id: str) -> list[str]:
    """Ids linked to ``event_id`` through causation (both ways) or its correlation."""
    ids = {event_id}
    me = ev.filter(pl.col("event_id") == event_id)
    if me.height == 0:
        return []
    corr = me["correlation_id"][0]
    if corr is not None:
        ids.update(ev.filter(pl.col("correlation_id") == corr)["event_id"].to_list())
    links = ev.filter(pl.col("causation_id").is_not_null()).select("event_id", "causation_id")
    while True:
        grown = (
            set(
                links.filter(
                    pl.col("event_id").is_in(list(ids)) | pl.col("causation_id").is_in(list(ids))
                )
                .unpivot()
                .get_column("value")
                .to_list()
            )
            | ids
        )
        if grown == ids:
            return sorted(ids)
        ids = grown


class IncidentPanel:
    """Reconstruct a violation or a block: what the engine saw, what was true, who set what.

    Controls: ``incident`` (a violation or block), ``step`` (the events in the window
    around it, in the order the store recorded them: each step puts T on the event's
    business time and K on its recorded time), ``prev`` / ``next`` buttons, and the
    ``at`` (T) and ``known_at`` (K) sliders, which can also be moved on their own.

    Kept as frames / values: ``current`` (the incident's row of :func:`incidents`),
    ``window`` (:func:`riskbook.viz.event_lanes` around it), ``compare``
    (:func:`compare_states` at T and K), ``limit`` (:func:`limit_in_force` for the
    incident's limit at T as known at K), ``limits`` (all the account's limits then),
    ``chain`` (:func:`causation_chain`), ``step_event`` (the window row of the current
    step). Chart: ``timeline`` (:func:`riskbook.viz.event_chart`; its rule follows T).
    """

    def __init__(
        self,
        history: History,
        *,
        incident: str | None = None,
        window: timedelta = timedelta(minutes=15),
    ) -> None:
        self.history = history
        self.window_size = window
        self.incidents = incidents(history)
        if self.incidents.height == 0:
            raise ValueError("this history has no LimitViolationDetected or AccountBlocked")
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
        lo, hi = t0 - self.window_size, t0 + self.window_size
        symbols = [row["symbol"]] if row["symbol"] else self._held(row["account_id"], t0)
        self.window = viz.event_lanes(
            self.history, start=lo, end=hi, accounts=[row["account_id"]], symbols=symbols
        )
        # limit changes of the account are part of the story even outside its symbols
        self.chain = causation_chain(self.history, row["event_id"])
        self.at = TimeSlider(lo, hi, value=t0, description="at (T)")
        self.known_at = TimeSlider(
            min(lo, k0), max(hi, k0) + self.window_size, value=k0, description="known at (K)"
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
        self.header.value = (
            f"<b>{html.escape(row['event_type'])}</b> of <b>{html.escape(row['account_id'])}</b>"
            f" ({html.escape(row['limit_type'] or 'no limit named')}"
            f"{' on ' + html.escape(row['symbol']) if row['symbol'] else ''}),"
            f" business time {t0:%Y-%m-%d %H:%M:%S.%f} UTC, recorded {k0:%H:%M:%S.%f}."
            f" Window: {self.window.height} events of the account within"
            f" ±{self.window_size.total_seconds() / 60:.0f} min."
        )
        self.chain_box.value = html_table(
            self.chain.drop("causation_id", "position"),
        )
        chart: Any = viz.event_chart(
            self.window,
            focus=row["event_id"],
            cursor=t0,
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

    def _held(self, account: str, at: datetime) -> list[str]:
        pos = P.positions(self.history, at=at).filter(
            (pl.col("account_id").cast(pl.String) == account) & (pl.col("quantity") != 0)
        )
        return pos["symbol"].cast(pl.String).to_list()

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
        """The incident's metric at T as the engine saw it (known at K)."""
        return incident_metric(self.compare, self.current["limit_type"], self.current["symbol"])[0]

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
            verdict = (
                f"<p><b>{html.escape(self.current['limit_type'])}</b> in force: "
                f"<b>{lim['value']:,.4g}</b> ({lim['scope']}-wide"
                f"{' for ' + html.escape(lim['symbol']) if lim['symbol'] else ''}), set by "
                f"<b>{html.escape(lim['set_by'] or '?')}</b> at {lim['set_at']:%Y-%m-%d %H:%M:%S} UTC "
                f"(recorded {lim['recorded_at']:%Y-%m-%d %H:%M:%S}).<br>"
                f"Engine's metric at T: <b>{metric if metric is None else format(metric, ',.4g')}</b>"
                f" — <b style='color:{'#c0392b' if over else '#27ae60'}'>"
                f"{'over the limit' if over else 'within the limit'}</b>.</p>"
            )
        self.limit_box.value = verdict + html_table(
            self.limits.drop("event_id"), formats={"value": ",.4g"}
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
