"""Altair charts over riskbook's Polars frames (DESIGN.md §1 layer 7).

Every builder takes the frames the projections return and gives an Altair chart:

=========================  ==============================================================
:func:`exposure_chart`     a measure (gross exposure, equity, leverage ...) of every
                           account over time, with a rule at the time being looked at
:func:`exposure_at_chart`  exposure by account and symbol at one moment (bars)
:func:`position_chart`     an account's position per symbol over time, with its
                           MaxPositionSize limits as step lines, rows over them red
:func:`equity_chart`       equity and its running peak (the drawdown shaded), drawdown
                           below against MaxDrawdown (red over it)
:func:`leverage_chart`     leverage against MaxLeverage as a step line from LimitSet,
                           rows over the limit marked
:func:`breach_chart`       breach intervals as a Gantt chart, one lane per account and
                           limit type and symbol, warning levels beneath the
                           breaches, an arrow at the end of a breach still open
:func:`metric_chart`       a limit type's metric per account against a limit value
                           that a slider moves (the limit lab)
:func:`limit_sweep_chart`  breaches and time in breach against the limit's value
:func:`event_chart`        the events around an incident, one lane per kind, with
                           causation links and the late recordings drawn
:func:`live_chart`         a live processor at work: events per second, violations
                           and blocks as committed, the time of each micro-batch
=========================  ==============================================================

Charts stay small whatever the history: a timeline is cut down by :func:`downsample`
(per series, equal-count buckets; in each bucket the rows holding the minimum and the
maximum of every plotted column and the bucket's last row are kept, so spikes and the
final state survive) to at most ``max_rows`` rows before it reaches Altair; each series
then gets a last row at the chart's end (``end``, by default the latest time in the
frame given) repeating its last values, so a step line shows the value still held rather
than stopping at the series' last event. Subtitles give the dates shown. Times are
handed to Vega as epoch milliseconds and shown in UTC. A time parameter (``at``,
``known_at``, ``start`` ...) is a datetime with a time zone or RFC 3339 text, checked as
the projections check theirs (:func:`riskbook.events.as_time`).

Rendering is offline: :func:`setup` switches Altair to its Jupyter widget renderer with
the JavaScript bundled by vl-convert (no CDN), and :func:`save_png` / :func:`save_svg`
export through vl-convert.

Examples
--------
>>> from datetime import datetime, timedelta, timezone
>>> t0 = datetime(2024, 1, 9, 14, 30, tzinfo=timezone.utc)
>>> frame = pl.DataFrame({"account_id": ["A"] * 1000,
...     "occurred_at": [t0 + timedelta(seconds=i) for i in range(1000)],
...     "equity": [float(i % 97) for i in range(1000)]})
>>> small = downsample(frame, x="occurred_at", y="equity", by="account_id", max_rows=60)
>>> small.height <= 60, small["equity"].max(), small["occurred_at"].max() == frame["occurred_at"].max()
(True, 96.0, True)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl

from riskbook._checks import MAX_ROWS, TimeLike, _cap, _frame, _ids
from riskbook._time import us
from riskbook.events import as_time
from riskbook.lanes import _LANES, event_lanes

__all__ = [
    "LEVEL_COLORS",
    "LEVEL_NAMES",
    "LIVE_COMMITS_SCHEMA",
    "LIVE_EFFECTS_SCHEMA",
    "MAX_ROWS",
    "QUANTITY_FORMAT",
    "breach_chart",
    "downsample",
    "equity_chart",
    "event_chart",
    "event_lanes",
    "exposure_at_chart",
    "exposure_chart",
    "leverage_chart",
    "limit_steps",
    "limit_sweep_chart",
    "live_chart",
    "metric_chart",
    "plot_frame",
    "position_chart",
    "save_png",
    "save_svg",
    "setup",
]

QUANTITY_FORMAT = ",.8~f"
"""How charts write a quantity: separators, and the decimals it has (0.25 BTC, 1,500)."""

MEASURES: dict[str, str] = {
    "gross_exposure": "Gross exposure",
    "net_exposure": "Net exposure",
    "equity": "Equity",
    "cash": "Cash",
    "leverage": "Leverage",
    "drawdown": "Drawdown",
}
"""Account measures :func:`exposure_chart` can draw, with their axis titles."""

LEVEL_NAMES: dict[float, str] = {0.8: "warning 80%", 0.9: "warning 90%", 1.0: "breach"}
"""How :func:`breach_chart` names the default levels (others read "level 75%")."""

LEVEL_COLORS: dict[float, str] = {0.8: "#f2c94c", 0.9: "#f2994a", 1.0: "#d62728"}
"""The colour of each default level in :func:`breach_chart` (amber, orange, breach red);
a level between or beyond them gets a colour between or beyond theirs, whatever other
levels the chart shows."""

# Anchors of _level_color beyond the default levels: pale yellow at half the limit and
# below, dark red from one and a half times the limit.
_LEVEL_RAMP = ((0.5, "#f7e7a6"), *LEVEL_COLORS.items(), (1.5, "#67000d"))
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%L"
_WIDTH = 720


# ----------------------------------------------------------------------------- setup


def setup(*, svg: bool = True, max_rows: int = 5_000) -> None:
    """Render charts offline in Jupyter: the widget renderer with bundled JavaScript.

    Altair's default renderer loads Vega from a CDN, which a closed network cannot
    reach. This enables ``alt.renderers.enable("jupyter", offline=True)`` (Vega bundled
    by vl-convert, served by the kernel) and keeps Altair's row limit as a last guard.

    Parameters
    ----------
    svg : draw charts as SVG (text stays selectable; browser tests can read it) rather
        than on a canvas.
    max_rows : Altair's own limit on rows per dataset (the builders cap below it).
    """
    embed = {"renderer": "svg", "actions": False} if svg else {"actions": False}
    alt.renderers.enable("jupyter", offline=True, embed_options=embed)
    alt.JupyterChart.enable_offline(offline=True)
    alt.data_transformers.enable("default", max_rows=max_rows)


def save_png(chart: alt.TopLevelMixin, path: str | Path, *, scale: float = 2.0) -> Path:
    """Write ``chart`` as a PNG through vl-convert (offline; ``scale`` 2 for sharp text)."""
    import vl_convert as vlc

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(vlc.vegalite_to_png(chart.to_dict(), scale=scale))
    return out


def save_svg(chart: alt.TopLevelMixin, path: str | Path) -> Path:
    """Write ``chart`` as an SVG through vl-convert (offline)."""
    import vl_convert as vlc

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(vlc.vegalite_to_svg(chart.to_dict()))
    return out


# ----------------------------------------------------------------------------- data


def _ms(t: datetime | None) -> int | None:
    return None if t is None else us(t) // 1000


def plot_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """A frame as Vega reads it best: times as epoch ms, ids as text, no inf or NaN.

    Datetimes become integer epoch milliseconds (Vega's native time, and shorter than
    ISO text); Categorical and Enum columns become strings; infinite and NaN floats
    become null (JSON has no infinity; an infinite leverage draws as a gap).

    Examples
    --------
    >>> plot_frame(pl.DataFrame({"t": [datetime(2024, 1, 1, tzinfo=UTC)],
    ...     "leverage": [math.inf]})).row(0)
    (1704067200000, None)
    """
    frame = _frame(frame, "frame")
    exprs: list[pl.Expr] = []
    for name, dtype in frame.schema.items():
        col = pl.col(name)
        if isinstance(dtype, pl.Datetime):
            exprs.append(col.dt.epoch("ms"))
        elif isinstance(dtype, pl.Categorical | pl.Enum):
            exprs.append(col.cast(pl.String))
        elif dtype.is_float():
            exprs.append(pl.when(col.is_finite()).then(col).otherwise(None).alias(name))
    return frame.with_columns(exprs) if exprs else frame


def downsample(
    frame: pl.DataFrame,
    *,
    x: str,
    y: str | Sequence[str],
    by: str | Sequence[str] | None = None,
    max_rows: int = MAX_ROWS,
) -> pl.DataFrame:
    """Cut a timeline down to at most ``max_rows`` rows, keeping its shape.

    Each series (a group of ``by``) is split into equal-count buckets in ``x`` order;
    from each bucket the rows with the minimum and the maximum of every ``y`` column
    and the bucket's last row are kept. A step chart of the result has the same peaks,
    troughs and final value as one of the whole timeline. A frame already small
    enough is returned unchanged (sorted by ``x``).

    Parameters
    ----------
    frame : the timeline, one row per event.
    x : its time (or order) column.
    y : the plotted column(s).
    by : the series columns (e.g. ``"account_id"``); None: one series.
    max_rows : the cap. At least 3 rows per series (per plotted column pair) are kept.

    Returns
    -------
    pl.DataFrame
        The kept rows, whole (all columns), sorted by ``by`` then ``x``.
    """
    frame, max_rows = _frame(frame, "frame"), _cap(max_rows)
    ys = [y] if isinstance(y, str) else list(y)
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    if frame.height <= max_rows:
        return frame.sort([*keys, x], maintain_order=True)
    n_series = frame.select(keys).n_unique() if keys else 1
    per_bucket = 2 * len(ys) + 1
    buckets = max(1, max_rows // (n_series * per_bucket))
    # timelines come in time order: rank within each series without sorting the whole
    data = (frame if frame[x].is_sorted() else frame.sort(x, maintain_order=True)).with_row_index(
        "__row"
    )
    within = pl.int_range(pl.len()).over(keys) if keys else pl.int_range(pl.len())
    size = pl.len().over(keys) if keys else pl.len()
    picks: list[pl.Expr] = [pl.col("__row").last().alias("__last")]
    for i, name in enumerate(ys):
        finite = pl.when(pl.col(name).is_finite()).then(pl.col(name))
        picks.append(pl.col("__row").get(finite.arg_min()).alias(f"__min{i}"))
        picks.append(pl.col("__row").get(finite.arg_max()).alias(f"__max{i}"))
    rows = (
        data.select(*keys, *ys, "__row", ((within * buckets) // size).alias("__bucket"))
        .group_by([*keys, "__bucket"])
        .agg(picks)
        .select(pl.concat_list(pl.exclude(*keys, "__bucket")).alias("__rows"))
        .explode("__rows")
        .drop_nulls()
        .unique()
        .sort("__rows")
        .get_column("__rows")
    )
    kept = data.drop("__row").gather(rows).sort([*keys, x], maintain_order=True)
    if kept.height > max_rows:  # many tiny series: keep each one's envelope, then thin
        kept = kept.gather_every(math.ceil(kept.height / max_rows))
    return kept


def limit_steps(
    limits: pl.DataFrame,
    *,
    account: str,
    limit_type: str,
    symbol: str | None = None,
    known_at: TimeLike = None,
    end: TimeLike = None,
    account_wide: bool = True,
) -> pl.DataFrame:
    """A limit's value over time, from the LimitSet frame, ready for a step line.

    One row per LimitSet of (account, limit_type, symbol), the account's own or set for
    every account (``"*"``: a later one of either replaces the other, as in
    :func:`riskbook.breaches`), with ``set_at`` (business time), ``value``, ``set_by``,
    ``timestamp`` (recorded), in order; as known at
    ``known_at`` (LimitSets recorded later are left out). ``end`` appends a last row
    repeating the final value so the step line runs to the chart's right edge.

    A symbol-specific MaxPositionSize overrides the account-wide one for its symbol
    (DESIGN.md §5): with ``symbol`` given and ``account_wide`` true, the result is the
    limit that applies to that symbol -- the account-wide values until the first
    symbol-specific LimitSet, the symbol's own after it.

    Returns
    -------
    pl.DataFrame
        ``set_at, value, set_by, timestamp, scope`` (``"account"`` or the symbol).
    """
    limits = _frame(limits, "limits")
    k, stop = as_time(known_at, "known_at"), as_time(end, "end")
    rows = limits.filter(
        pl.col("account_id").cast(pl.String).is_in([account, "*"])
        & (pl.col("limit_type").cast(pl.String) == limit_type)
    )
    if k is not None:
        rows = rows.filter(pl.col("timestamp") <= k)
    rows = rows.select(
        "set_at",
        "value",
        pl.col("set_by").cast(pl.String),
        "timestamp",
        "position",
        pl.col("symbol").cast(pl.String),
    )
    own = rows.filter(pl.col("symbol") == symbol) if symbol is not None else rows.clear()
    wide = rows.filter(pl.col("symbol").is_null())
    if symbol is not None and own.height:
        first = own["set_at"].min()
        wide = wide.filter(pl.col("set_at") < first) if account_wide else wide.clear()
        steps = pl.concat([wide, own])
    elif symbol is not None and not account_wide:
        steps = own
    else:
        steps = wide
    steps = (
        steps.sort("set_at", "timestamp", "position")
        .with_columns(pl.col("symbol").fill_null("account").alias("scope"))
        .select("set_at", "value", "set_by", "timestamp", "scope")
    )
    if stop is not None and steps.height and steps["set_at"].max() < stop:  # type: ignore[operator]
        last = steps.tail(1).with_columns(pl.lit(stop).cast(steps.schema["set_at"]).alias("set_at"))
        steps = pl.concat([steps, last])
    return steps


# ----------------------------------------------------------------------------- pieces


_AXIS_TIME = {
    "year": "%Y",
    "quarter": "%b %Y",
    "month": "%b %Y",
    "week": "%a %d %b",
    "date": "%a %d %b",
    "hours": "%H:%M",
    "minutes": "%H:%M",
    "seconds": "%H:%M:%S",
    "milliseconds": "%H:%M:%S.%L",
}
"""24-hour clock labels at every zoom level (Vega's default is a 12-hour clock)."""


def _x(
    field: str = "t", title: str | None = "business time (UTC)", domain: Any = alt.Undefined
) -> alt.X:
    """A UTC time axis; a ``domain`` given is kept exactly (no rounding out to nice
    ticks: a window of seconds stays that window, panels given one domain line up).

    A tick every 90 px or so: at Vega's default (one every 40 px) a week has a tick each
    12 hours, and hiding the labels that overlap can keep the "12:00"s, not the dates.
    """
    return alt.X(
        f"{field}:T",
        title=title,
        scale=alt.Scale(type="utc", domain=domain, nice=False),
        axis=alt.Axis(format=_AXIS_TIME, labelOverlap=True, tickCount=_WIDTH // 90),
    )


def _tip_time(field: str, title: str) -> alt.Tooltip:
    return alt.Tooltip(f"{field}:T", title=title, format=_TIME_FORMAT, formatType="utc")


def _cursor(at: datetime | None, name: str = "at") -> tuple[alt.Parameter, alt.Chart]:
    """A variable parameter holding a time (epoch ms) and a rule drawn at it.

    Widgets move the rule by setting ``JupyterChart.params.<name>``: no data is resent.
    """
    param = alt.param(name=name, value=_ms(at))
    rule = (
        alt.Chart(pl.DataFrame({"one": [1]}))
        .transform_filter(f"{name} != null")
        .transform_calculate(t=name)
        .mark_rule(color="#444", strokeDash=[4, 3], strokeWidth=1.5)
        .encode(x=alt.X("t:T", scale=alt.Scale(type="utc")))
    )
    return param, rule


def _last_time(frame: pl.DataFrame, column: str = "occurred_at") -> datetime | None:
    last = frame[column].max() if frame.height else None
    return last if isinstance(last, datetime) else None


def _title(text: str, subtitle: str | list[str] | None = None) -> alt.TitleParams:
    return alt.TitleParams(text, subtitle=subtitle or "", anchor="start", fontSize=14)


def _keys(by: str | Sequence[str] | None) -> list[str]:
    return [] if by is None else [by] if isinstance(by, str) else list(by)


def _window(
    frame: pl.DataFrame,
    *,
    x: str,
    by: str | Sequence[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pl.DataFrame:
    """The rows of each series within ``[start, end]``, for a step line of that window.

    Rows after ``end`` are left out. Before ``start``: a series' last row there is what
    it held at ``start``, so it is kept, moved onto ``start`` (unless the series has a
    row at ``start`` itself); the earlier ones are left out.
    """
    keys = _keys(by)

    def lit(t: datetime) -> pl.Expr:  # as the column holds it (its unit and zone)
        return pl.lit(t).cast(frame.schema[x])

    if end is not None:
        frame = frame.filter(pl.col(x) <= lit(end))
    if start is None or frame.height == 0:
        return frame
    frame = frame.sort([*keys, x], maintain_order=True)
    before = frame.filter(pl.col(x) < lit(start))
    held = (before.group_by(keys, maintain_order=True).last() if keys else before.tail(1)).select(
        frame.columns
    )
    at_start = frame.filter(pl.col(x) == lit(start)).select(keys).unique()
    if keys:
        held = held.join(at_start, on=keys, how="anti", nulls_equal=True)
    elif at_start.height:
        held = held.clear()
    held = held.with_columns(lit(start).alias(x))
    return pl.concat([held, frame.filter(pl.col(x) >= lit(start))]).sort(
        [*keys, x], maintain_order=True
    )


def _hold(
    frame: pl.DataFrame,
    *,
    x: str,
    by: str | Sequence[str] | None = None,
    end: datetime | None,
) -> pl.DataFrame:
    """Each series' last row again at ``end``, so its step line runs to the chart's end.

    A step line stops at its series' last row: a position still held, an account whose
    last event came hours before the others' would look closed (or, with one row, not
    be drawn at all). The row repeats the last values, as :func:`limit_steps` does for a
    limit; a series already at (or past) ``end`` gets none.
    """
    if end is None or frame.height == 0:
        return frame
    keys = _keys(by)
    frame = frame.sort([*keys, x], maintain_order=True)
    last = frame.group_by(keys, maintain_order=True).last() if keys else frame.tail(1)
    stop = pl.lit(end).cast(frame.schema[x])
    last = last.select(frame.columns).filter(pl.col(x) < stop).with_columns(stop.alias(x))
    if last.height == 0:
        return frame
    return pl.concat([frame, last]).sort([*keys, x], maintain_order=True)


def _cut(
    frame: pl.DataFrame,
    *,
    x: str,
    y: str | Sequence[str],
    by: str | Sequence[str] | None = None,
    max_rows: int,
    end: datetime | None,
) -> pl.DataFrame:
    """:func:`downsample` then :func:`_hold`, the held rows within ``max_rows``."""
    keys = _keys(by)
    held = (frame.select(keys).n_unique() if keys else 1) if end is not None else 0
    room = max(1, max_rows - held) if max_rows > held else max_rows
    small = downsample(frame, x=x, y=y, by=by, max_rows=room)
    return _hold(small, x=x, by=by, end=end)


def _split_at(rows: pl.DataFrame, times: pl.Series | None, *, x: str) -> pl.DataFrame:
    """A one-series step timeline with a row at each of ``times`` inside it, holding the
    values of the row before (its ``event_type`` says LimitSet).

    A limit changed between two rows changes what is over it there, not at the next
    row: without the row, the red of a drawdown over the old limit ran on past a limit
    raised above it.
    """
    if times is None or rows.height == 0:
        return rows
    rows = rows.sort(x, maintain_order=True)
    at = (
        times.cast(rows.schema[x])
        .to_frame(x)
        .filter(pl.col(x).is_between(rows[x].min(), rows[x].max(), closed="none"))
        .unique()
        .join(rows.select(x), on=x, how="anti")
        .sort(x, maintain_order=True)
    )
    if at.height == 0:
        return rows
    held = at.join_asof(rows.drop("event_type", strict=False), on=x, strategy="backward")
    if "event_type" in rows.columns:
        held = held.with_columns(
            pl.lit("LimitSet").cast(rows.schema["event_type"]).alias("event_type")
        )
    return pl.concat([rows, held.select(rows.columns)]).sort(x, maintain_order=True)


def _si_axis() -> alt.Axis:
    """An axis of SI-prefixed numbers (2M, 500k). Vega gives every tick the prefix of
    the largest, so zero read "0M": it reads "0"."""
    return alt.Axis(format="~s", labelExpr="datum.value == 0 ? '0' : datum.label")


def _between(lo: datetime | None, hi: datetime | None) -> str:
    """A time range for a subtitle, with its date: a short window's axis shows none."""
    if lo is None or hi is None:
        return "no rows"
    if lo.date() == hi.date():
        return f"{lo:%a %Y-%m-%d %H:%M} to {hi:%H:%M} UTC"
    return f"{lo:%Y-%m-%d %H:%M} to {hi:%Y-%m-%d %H:%M} UTC"


def _time_range(frame: pl.DataFrame, column: str, end: datetime | None = None) -> str:
    """:func:`_between` the first time of ``column`` and ``end`` (or its last time)."""
    first = frame[column].min() if frame.height else None
    last = end if end is not None else _last_time(frame, column)
    return _between(first if isinstance(first, datetime) else None, last)


def _duration(seconds: float) -> str:
    """A span for people: 6 s, 1.5 s, 2 min, 19 h, 3 d."""
    s = abs(seconds)
    if s < 10:
        return f"{s:.3g} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7_200:
        return f"{s / 60:.0f} min"
    if s < 172_800:
        return f"{s / 3_600:.0f} h"
    return f"{s / 86_400:.0f} d"


def _rows(n: int) -> str:
    return f"{n:,} timeline row{'s' if n != 1 else ''}"


def _unknown(frame: pl.DataFrame, account: str, what: str) -> str:
    """A subtitle for an account without rows: which accounts the frame does hold."""
    known = sorted(frame["account_id"].cast(pl.String).unique().drop_nulls().to_list())
    listed = ", ".join(known[:8]) + (f" and {len(known) - 8:,} more" if len(known) > 8 else "")
    return f"no {what} of account {account!r}" + (
        f" (this timeline holds {listed})" if known else " (the timeline is empty)"
    )


# ----------------------------------------------------------------------------- charts


def exposure_chart(
    timeline: pl.DataFrame,
    *,
    measure: str = "gross_exposure",
    accounts: str | Iterable[str] | None = None,
    at: TimeLike = None,
    max_rows: int = MAX_ROWS,
    height: int = 280,
    start: TimeLike = None,
    end: TimeLike = None,
) -> alt.TopLevelMixin:
    """A measure of every account over time (from :func:`riskbook.account_timeline`).

    Step lines (figures hold between events), one colour per account, downsampled to
    ``max_rows``, each running on to the chart's end (an account's last figure holds
    after its last event); a dashed rule at ``at`` (the parameter ``at``, epoch ms,
    which a widget moves without resending data). Click a legend entry to bring one
    account forward; drag to zoom the time axis.

    Parameters
    ----------
    timeline : rows of :func:`riskbook.account_timeline` (``account_id, occurred_at``
        and the measure).
    measure : one of :data:`MEASURES`.
    accounts : only these accounts (None: all; one account may be given as a string).
    at : where to draw the time rule (None: no rule).
    start, end : the time window drawn (None: from the first row; to the latest time in
        ``timeline``, whichever accounts are drawn). A figure set before ``start`` is
        drawn from ``start``.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}; got {measure!r}")
    ids, when, max_rows = _ids(accounts, "accounts"), as_time(at, "at"), _cap(max_rows)
    lo, hi = as_time(start, "start"), as_time(end, "end")
    frame = _frame(timeline, "timeline")
    hi = hi or _last_time(frame)
    frame = frame.select("account_id", "occurred_at", measure)  # ids cast after the cut
    if ids is not None:
        frame = frame.filter(pl.col("account_id").cast(pl.String).is_in(ids))
    frame = _window(frame, x="occurred_at", by="account_id", start=lo, end=hi)
    shown = frame.height  # the rows of the accounts drawn, before the cut
    frame = _cut(frame, x="occurred_at", y=measure, by="account_id", max_rows=max_rows, end=hi)
    data = plot_frame(frame.rename({"occurred_at": "t"}))
    pick = alt.selection_point(fields=["account_id"], bind="legend")
    zoom = alt.selection_interval(encodings=["x"], bind="scales")
    y_axis = (
        alt.Axis(format={"drawdown": "%", "leverage": ".2~f"}[measure])
        if measure in ("drawdown", "leverage")
        else _si_axis()
    )
    lines = (
        alt.Chart(data)
        .mark_line(interpolate="step-after", strokeWidth=1.4)
        .encode(
            x=_x(),
            y=alt.Y(f"{measure}:Q", title=MEASURES[measure], axis=y_axis),
            color=alt.Color("account_id:N", title="account", scale=alt.Scale(scheme="tableau20")),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.15)),
            tooltip=[
                "account_id:N",
                _tip_time("t", "at"),
                alt.Tooltip(f"{measure}:Q", format=",.4~f"),
            ],
        )
        .add_params(pick, zoom)
    )
    param, rule = _cursor(when)
    n = data["account_id"].n_unique()
    return (
        alt.layer(lines, rule)
        .add_params(param)
        .properties(
            width=_WIDTH,
            height=height,
            title=_title(
                f"{MEASURES[measure]} by account",
                f"{_time_range(frame, 'occurred_at', hi)}; {n} account{'s' if n != 1 else ''},"
                f" {shown:,} timeline rows drawn as {data.height:,}",
            ),
        )
    )


def exposure_at_chart(
    positions: pl.DataFrame,
    *,
    at: TimeLike = None,
    value: str = "market_value",
    max_rows: int = MAX_ROWS,
) -> alt.TopLevelMixin:
    """Exposure by account at one moment, stacked by symbol (from :func:`riskbook.positions`).

    Longs to the right of zero and shorts to the left, so gross exposure is the bar's
    whole length and net exposure its balance.

    At most ``max_rows`` bars are drawn: beyond it each account keeps its largest
    positions (by ``|value|``) and the rest of its longs and of its shorts are summed
    into "other" bars (labelled "(other)" if a symbol is named "other"); with more
    accounts than that allows, the accounts with the largest gross exposure are drawn.
    The subtitle says so.
    """
    when, max_rows = as_time(at, "at"), _cap(max_rows)
    frame = (
        _frame(positions, "positions")
        .filter(pl.col("quantity") != 0)
        .select(
            pl.col("account_id").cast(pl.String),
            pl.col("symbol").cast(pl.String),
            "quantity",
            "avg_price",
            "mark_price",
            value,
        )
    )
    given = _frame(positions, "positions")
    latest = _last_time(given, "last_event_at") if "last_event_at" in given.columns else None
    if when is not None:
        sub = f"at {when:%Y-%m-%d %H:%M:%S} UTC"
    elif latest is not None:
        sub = f"latest (last position change {latest:%Y-%m-%d %H:%M:%S} UTC)"
    else:
        sub = "latest"
    if frame.height == 0:  # no bars: say so rather than draw a bare axis
        sub = "no open positions " + (sub if when is not None else f"({sub})")
    if frame.height > max_rows:
        frame, note = _cap_positions(frame, value, max_rows)
        sub += f"; {note}"
    data = plot_frame(frame)
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            y=alt.Y("account_id:N", title=None, sort="ascending"),
            x=alt.X(
                f"sum({value}):Q",
                title="market value (long + / short -)",
                axis=_si_axis(),
            ),
            color=alt.Color("symbol:N", scale=alt.Scale(scheme="tableau10")),
            tooltip=[
                "account_id:N",
                "symbol:N",
                alt.Tooltip("quantity:Q", format=QUANTITY_FORMAT),
                alt.Tooltip("avg_price:Q", format=",.2f"),
                alt.Tooltip("mark_price:Q", format=",.2f"),
                alt.Tooltip(f"{value}:Q", format=",.0f"),
            ],
        )
        .properties(
            width=_WIDTH - 120,
            height=alt.Step(16),
            title=_title("Positions by account and symbol", sub),
        )
    )


def _cap_positions(frame: pl.DataFrame, value: str, max_rows: int) -> tuple[pl.DataFrame, str]:
    """Position rows cut to ``max_rows`` bars, and a note saying how."""
    total = frame.height
    accounts = frame["account_id"].n_unique()
    note = ""
    # every account: its top k positions, its other longs and its other shorts
    k = max_rows // accounts - 2
    if k < 1:
        keep = max(1, max_rows // 3)
        top = (
            frame.group_by("account_id")
            .agg(pl.col(value).abs().sum().alias("_gross"))
            .sort("_gross", "account_id", descending=[True, False])
            .head(keep)["account_id"]
        )
        frame = frame.filter(pl.col("account_id").is_in(top.implode()))
        note = f"the {keep:,} accounts of {accounts:,} with the largest gross exposure; "
        k = 1
    ranked = frame.with_columns(
        pl.int_range(pl.len())
        .sort_by([pl.col(value).abs(), pl.col("symbol")], descending=[True, False])
        .arg_sort()
        .over("account_id")
        .alias("_rank")
    )
    kept = ranked.filter(pl.col("_rank") < k).drop("_rank")
    # the summed bars are coloured and told by their label: one that a symbol of these
    # accounts has too would pass the sum off as that symbol ("other" may be a real one)
    label = "other"
    while frame["symbol"].eq(label).any():
        label = f"({label})"
    rest = (
        ranked.filter(pl.col("_rank") >= k)
        .group_by("account_id", (pl.col(value) >= 0).alias("_long"))
        .agg(pl.col(value).sum())
        .select(
            "account_id",
            pl.lit(label).alias("symbol"),
            pl.lit(None, pl.Float64).alias("quantity"),
            pl.lit(None, pl.Float64).alias("avg_price"),
            pl.lit(None, pl.Float64).alias("mark_price"),
            pl.col(value),
        )
    )
    out = pl.concat([kept, rest.cast(kept.schema)])
    note += (
        f"{total:,} positions drawn as {out.height:,} bars: per account its {k:,} largest,"
        f' the rest summed as "{label}"'
    )
    return out, note


def position_chart(
    position_timeline: pl.DataFrame,
    *,
    account: str,
    limits: pl.DataFrame | None = None,
    symbols: str | Iterable[str] | None = None,
    at: TimeLike = None,
    known_at: TimeLike = None,
    max_rows: int = MAX_ROWS,
    height: int = 260,
    start: TimeLike = None,
    end: TimeLike = None,
) -> alt.TopLevelMixin:
    """An account's position per symbol over time, with its MaxPositionSize limits.

    Each symbol's step line runs on to the chart's end (a position holds after its last
    trade); rows where ``|quantity|`` is over the MaxPositionSize in force for that
    symbol (as known at ``known_at``) are marked red.

    Parameters
    ----------
    position_timeline : rows of :func:`riskbook.position_timeline`.
    account : the account.
    limits : the History's ``limits`` frame: MaxPositionSize drawn as ± step lines
        (dashed; per symbol where a symbol-specific limit overrides the account's).
    symbols : only these symbols (None: all the account traded; one may be given as a
        string).
    at : where to draw the time rule. known_at : limits as known then.
    start, end : the time window drawn (None: from the account's first row; to the
        latest time in ``position_timeline``, the last trade of any account). A
        position held at ``start`` is drawn from ``start``.
    """
    ids, when, max_rows = _ids(symbols, "symbols"), as_time(at, "at"), _cap(max_rows)
    known_at = as_time(known_at, "known_at")
    lo, hi = as_time(start, "start"), as_time(end, "end")
    limits = None if limits is None else _frame(limits, "limits")
    given = _frame(position_timeline, "position_timeline")
    hi = hi or _last_time(given)
    frame = given.filter(pl.col("account_id").cast(pl.String) == account).select(
        pl.col("symbol").cast(pl.String), "occurred_at", "quantity", "avg_price", "trade_id"
    )
    if ids is not None:
        frame = frame.filter(pl.col("symbol").is_in(ids))
    frame = _window(frame, x="occurred_at", by="symbol", start=lo, end=hi)
    syms = sorted(frame["symbol"].unique().to_list())
    applying = (
        _applying_position_limits(limits, account, syms, known_at)
        if limits is not None and frame.height
        else None
    )

    def over_limit(rows: pl.DataFrame) -> pl.DataFrame:
        """``limit`` (the one applying to the row's symbol) and ``over`` beside each row."""
        if applying is None or applying.height == 0:
            return rows.with_columns(
                pl.lit(None, pl.Float64).alias("limit"), pl.lit(False).alias("over")
            )
        return (
            rows.sort("occurred_at", maintain_order=True)
            .join_asof(
                applying,
                left_on="occurred_at",
                right_on="set_at",
                by="symbol",
                strategy="backward",
                check_sortedness=False,  # sorted by time; polars cannot check it by group
            )
            .drop("set_at")
            .with_columns(
                (pl.col("quantity").abs() > pl.col("limit")).fill_null(False).alias("over")
            )
            .sort("symbol", "occurred_at", maintain_order=True)
        )

    n_over = int(over_limit(frame)["over"].sum())
    small = _cut(frame, x="occurred_at", y="quantity", by="symbol", max_rows=max_rows, end=hi)
    data = plot_frame(over_limit(small).rename({"occurred_at": "t"}))
    color = alt.Color("symbol:N", scale=alt.Scale(scheme="tableau10"))
    tips = [
        "symbol:N",
        _tip_time("t", "at"),
        alt.Tooltip("quantity:Q", format=QUANTITY_FORMAT),
        alt.Tooltip("avg_price:Q", format=",.2f"),
        alt.Tooltip("limit:Q", title="MaxPositionSize", format=QUANTITY_FORMAT),
        "trade_id:N",
    ]
    layers: list[alt.Chart] = [
        alt.Chart(data)
        .mark_line(interpolate="step-after", strokeWidth=1.4)
        .encode(
            x=_x(),
            y=alt.Y("quantity:Q", title="position (quantity)", axis=_si_axis()),
            color=color,
            tooltip=tips,
        )
    ]
    if n_over:
        layers.append(
            alt.Chart(data)
            .transform_filter(alt.datum.over)
            .mark_circle(color="#d62728", size=28)
            .encode(x=_x(), y="quantity:Q", tooltip=tips)
        )
    steps = (
        _position_limit_steps(limits, account, syms, known_at, _first(frame, lo), hi)
        if limits is not None and frame.height
        else None
    )
    if steps is not None and steps.height:
        limit_data = plot_frame(
            steps.rename({"set_at": "t"}).with_columns(pl.col("scope").alias("symbol"))
        )
        base = alt.Chart(limit_data).encode(
            x=_x(),
            detail="series:N",
            tooltip=[
                alt.Tooltip("scope:N", title="limit on"),
                alt.Tooltip("value:Q", title="MaxPositionSize", format=QUANTITY_FORMAT),
                "set_by:N",
                _tip_time("t", "set at"),
            ],
        )
        wide = alt.datum.scope == "account"
        if (steps["scope"] == "account").any():
            layers.append(
                base.transform_filter(wide)
                .mark_line(
                    strokeDash=[6, 4], strokeWidth=1.2, interpolate="step-after", color="#888"
                )
                .encode(y="value:Q")
            )
            layers.append(
                base.transform_filter(wide)
                .transform_calculate(neg="-datum.value")
                .mark_line(
                    strokeDash=[6, 4], strokeWidth=1.2, interpolate="step-after", color="#888"
                )
                .encode(y="neg:Q")
            )
        if (steps["scope"] != "account").any():
            own = ~wide
            layers.append(
                base.transform_filter(own)
                .mark_line(strokeDash=[6, 4], strokeWidth=1.2, interpolate="step-after")
                .encode(y="value:Q", color=color)
            )
            layers.append(
                base.transform_filter(own)
                .transform_calculate(neg="-datum.value")
                .mark_line(strokeDash=[6, 4], strokeWidth=1.2, interpolate="step-after")
                .encode(y="neg:Q", color=color)
            )
    if frame.height == 0:
        subtitle = _unknown(given, account, "positions")
    else:
        subtitle = (
            _time_range(frame, "occurred_at", hi)
            + "; "
            + (
                "dashed: MaxPositionSize (grey: account-wide, coloured: that symbol's own);"
                f" red: {_rows(n_over)} over it"
                if steps is not None and steps.height
                else "no MaxPositionSize set"
                + (" (limits not given)" if limits is None else " for this account")
            )
        )
    param, rule = _cursor(when)
    return (
        alt.layer(*layers, rule)
        .add_params(param)
        .properties(
            width=_WIDTH,
            height=height,
            title=_title(f"{account}: position per symbol", subtitle),
        )
    )


def _applying_position_limits(
    limits: pl.DataFrame, account: str, symbols: Sequence[str], known_at: datetime | None
) -> pl.DataFrame:
    """``symbol, set_at, limit``: the MaxPositionSize applying to each symbol over time
    (its own where it has one, else the account's), sorted by ``set_at``."""
    parts = [
        limit_steps(
            limits, account=account, limit_type="MaxPositionSize", symbol=sym, known_at=known_at
        ).select(pl.lit(sym).alias("symbol"), "set_at", pl.col("value").alias("limit"))
        for sym in symbols
    ]
    frames = [p for p in parts if p.height]
    if not frames:
        return pl.DataFrame(
            schema={"symbol": pl.String, "set_at": limits.schema["set_at"], "limit": pl.Float64}
        )
    return pl.concat(frames).sort("set_at", maintain_order=True)


def _position_limit_steps(
    limits: pl.DataFrame,
    account: str,
    symbols: Sequence[str],
    known_at: TimeLike,
    start: datetime | None,
    end: datetime | None,
) -> pl.DataFrame:
    """MaxPositionSize step rows within the window: the account-wide series and each
    symbol's own."""
    parts = [
        limit_steps(
            limits, account=account, limit_type="MaxPositionSize", known_at=known_at
        ).with_columns(pl.lit("account").alias("series"))
    ]
    for sym in symbols:
        own = limit_steps(
            limits,
            account=account,
            limit_type="MaxPositionSize",
            symbol=sym,
            known_at=known_at,
            account_wide=False,
        )
        parts.append(own.with_columns(pl.lit(sym).alias("series"), pl.lit(sym).alias("scope")))
    frames = [p for p in parts if p.height]
    steps = pl.concat(frames) if frames else parts[0]
    return _steps_within(steps, start, end, by="series")


def _first(frame: pl.DataFrame, start: datetime | None) -> datetime | None:
    """Where a chart's limit lines begin: ``start``, else the timeline's first row (a
    timeline filtered to an afternoon does not get limit lines from the week before)."""
    if start is not None or frame.height == 0:
        return start
    first = frame["occurred_at"].min()
    return first if isinstance(first, datetime) else None


def _steps_within(
    steps: pl.DataFrame,
    start: datetime | None,
    end: datetime | None,
    by: str | None = None,
) -> pl.DataFrame:
    """Limit step rows (:func:`limit_steps`) cut to the chart's window, each series
    running on to ``end``: a limit set after the window is not drawn in it."""
    steps = _window(steps, x="set_at", by=by, start=start, end=end)
    return _hold(steps, x="set_at", by=by, end=end)


def equity_chart(
    timeline: pl.DataFrame,
    *,
    account: str,
    limits: pl.DataFrame | None = None,
    at: TimeLike = None,
    known_at: TimeLike = None,
    max_rows: int = MAX_ROWS,
    start: TimeLike = None,
    end: TimeLike = None,
) -> alt.TopLevelMixin:
    """Equity with its running peak, the drawdown shaded; drawdown below with MaxDrawdown.

    Both panels share one time axis and run on to the chart's end. The drawdown is
    drawn grey, and red where it is over the MaxDrawdown in force (as known at
    ``known_at``).

    Parameters
    ----------
    timeline : rows of :func:`riskbook.account_timeline` (one account is picked).
    account : the account.
    limits : the History's ``limits`` frame; its MaxDrawdown is drawn as a step line.
    at : where to draw the time rule. known_at : limits as known then.
    start, end : the time window drawn (None: from the account's first row; to the
        latest time in ``timeline``, whichever account it is).
    """
    when, known_at, max_rows = as_time(at, "at"), as_time(known_at, "known_at"), _cap(max_rows)
    lo, hi = as_time(start, "start"), as_time(end, "end")
    limits = None if limits is None else _frame(limits, "limits")
    given = _frame(timeline, "timeline")
    hi = hi or _last_time(given)
    frame = given.filter(pl.col("account_id").cast(pl.String) == account).select(
        "occurred_at",
        "equity",
        "peak_equity",
        "drawdown",
        pl.col("event_type").cast(pl.String),
    )
    frame = _window(frame, x="occurred_at", start=lo, end=hi)
    steps = (
        limit_steps(limits, account=account, limit_type="MaxDrawdown", known_at=known_at)
        if limits is not None and frame.height
        else None
    )
    n_over = int(_over_limit(frame, steps, "drawdown")["over"].sum())
    small = _cut(frame, x="occurred_at", y=["equity", "drawdown"], max_rows=max_rows, end=hi)
    small = _split_at(small, None if steps is None else steps["set_at"], x="occurred_at")
    data = plot_frame(
        _over_limit(small, steps, "drawdown")
        .with_columns(
            pl.when(pl.col("over")).then(pl.col("drawdown")).otherwise(0.0).alias("drawdown_over")
        )
        .rename({"occurred_at": "t"})
    )
    tips = [
        _tip_time("t", "at"),
        alt.Tooltip("equity:Q", format=",.0f"),
        alt.Tooltip("peak_equity:Q", title="peak", format=",.0f"),
        alt.Tooltip("drawdown:Q", format=".2%"),
        alt.Tooltip("limit:Q", title="MaxDrawdown", format=".2%"),
        alt.Tooltip("event_type:N", title="event"),
    ]
    zoom = alt.selection_interval(encodings=["x"], bind="scales")
    base = alt.Chart(data).encode(x=_x(title=None))
    gap = base.mark_area(interpolate="step-after", color="#d62728", opacity=0.25).encode(
        y=alt.Y("equity:Q", title="equity", scale=alt.Scale(zero=False), axis=_si_axis()),
        y2="peak_equity:Q",
    )
    peak = base.mark_line(interpolate="step-after", color="#999", strokeDash=[3, 3]).encode(
        y="peak_equity:Q"
    )
    equity = (
        base.mark_line(interpolate="step-after", color="#1f77b4", strokeWidth=1.5)
        .encode(y="equity:Q", tooltip=tips)
        .add_params(zoom)
    )
    param, rule = _cursor(when)
    if frame.height == 0:
        subtitle = _unknown(given, account, "timeline rows")
    else:
        subtitle = f"{_time_range(frame, 'occurred_at', hi)}; shaded: drawdown from the peak"
        if steps is not None and steps.height:
            subtitle += f"; below, dashed: MaxDrawdown in force, red: {_rows(n_over)} over it"
        else:
            subtitle += "; no MaxDrawdown set" + (
                " (limits not given)" if limits is None else " for this account"
            )
    top = alt.layer(gap, peak, equity, rule).properties(
        width=_WIDTH,
        height=220,
        title=_title(f"{account}: equity and running peak", subtitle),
    )
    dd_y = alt.Y("drawdown:Q", title="drawdown", axis=alt.Axis(format="%"))
    dd_layers: list[alt.Chart] = [
        base.mark_area(interpolate="step-after", color="#8c8c8c", opacity=0.45).encode(
            x=_x(), y=dd_y, tooltip=tips
        )
    ]
    if n_over:
        dd_layers.append(
            base.mark_area(interpolate="step-after", color="#d62728", opacity=0.7).encode(
                x=_x(), y="drawdown_over:Q", tooltip=tips
            )
        )
    if steps is not None and steps.height:
        within = _steps_within(steps, _first(frame, lo), hi)
        if within.height:
            dd_layers.append(_limit_line(within, "MaxDrawdown", ".0%"))
    _, rule2 = _cursor(when)
    bottom = alt.layer(*dd_layers, rule2).properties(width=_WIDTH, height=110)
    return alt.vconcat(top, bottom, spacing=6).add_params(param).resolve_scale(x="shared")


def _over_limit(rows: pl.DataFrame, steps: pl.DataFrame | None, column: str) -> pl.DataFrame:
    """``limit`` (the value in force, from :func:`limit_steps` rows) and ``over``
    (``column`` above it) beside each row of a one-account timeline."""
    if steps is None or steps.height == 0:
        return rows.with_columns(
            pl.lit(None, pl.Float64).alias("limit"), pl.lit(False).alias("over")
        )
    return (
        rows.sort("occurred_at", maintain_order=True)
        .join_asof(
            steps.select(
                pl.col("set_at").alias("occurred_at"), pl.col("value").alias("limit")
            ).sort("occurred_at", maintain_order=True),
            on="occurred_at",
            strategy="backward",
        )
        .with_columns((pl.col(column) > pl.col("limit")).fill_null(False).alias("over"))
    )


def _limit_line(steps: pl.DataFrame, name: str, fmt: str) -> alt.Chart:
    data = plot_frame(steps.rename({"set_at": "t"}))
    return (
        alt.Chart(data)
        .mark_line(interpolate="step-after", color="black", strokeDash=[6, 4], strokeWidth=1.3)
        .encode(
            x=_x(),
            y=alt.Y("value:Q"),
            tooltip=[
                alt.Tooltip("value:Q", title=name, format=fmt),
                alt.Tooltip("set_by:N", title="set by"),
                _tip_time("t", "set at"),
            ],
        )
    )


def leverage_chart(
    timeline: pl.DataFrame,
    limits: pl.DataFrame,
    *,
    account: str,
    at: TimeLike = None,
    known_at: TimeLike = None,
    max_rows: int = MAX_ROWS,
    start: TimeLike = None,
    end: TimeLike = None,
) -> alt.TopLevelMixin:
    """Leverage over time against MaxLeverage (a step line from the LimitSet events).

    Timeline rows where leverage is over the limit in force (as known at ``known_at``)
    are marked red; an infinite leverage (equity <= 0 with positions open) breaks the
    line and is marked by a red triangle pinned at the top of the plot, its tooltip
    reading "∞ (equity ≤ 0)". The line runs on to the chart's end: ``start, end`` the
    time window drawn (None: from the account's first row; to the latest time in
    ``timeline``, whichever account it is).
    """
    when, known_at, max_rows = as_time(at, "at"), as_time(known_at, "known_at"), _cap(max_rows)
    lo, hi = as_time(start, "start"), as_time(end, "end")
    limits = _frame(limits, "limits")
    given = _frame(timeline, "timeline")
    hi = hi or _last_time(given)
    frame = (
        given.filter(pl.col("account_id").cast(pl.String) == account)
        .select(
            "occurred_at",
            "leverage",
            "gross_exposure",
            "equity",
            pl.col("event_type").cast(pl.String),
        )
        .sort("occurred_at", maintain_order=True)
    )
    frame = _window(frame, x="occurred_at", start=lo, end=hi)
    steps = limit_steps(limits, account=account, limit_type="MaxLeverage", known_at=known_at)
    infinite = pl.col("leverage").is_infinite() & (pl.col("leverage") > 0)
    frame = frame.with_columns(
        infinite.cast(pl.Float64).alias("infinite"),  # a plotted column: kept by the cut
        pl.when(infinite)
        .then(pl.lit("∞ (equity ≤ 0)"))
        .otherwise(pl.col("leverage").round(3).cast(pl.String))
        .alias("leverage_text"),
    )
    n_over = int(_over_limit(frame, steps, "leverage")["over"].sum())
    n_infinite = int(frame["infinite"].sum())
    small = _cut(frame, x="occurred_at", y=["leverage", "infinite"], max_rows=max_rows, end=hi)
    data = plot_frame(_over_limit(small, steps, "leverage").rename({"occurred_at": "t"}))
    tips = [
        _tip_time("t", "at"),
        alt.Tooltip("leverage_text:N", title="leverage"),
        alt.Tooltip("limit:Q", title="MaxLeverage", format=".2f"),
        alt.Tooltip("gross_exposure:Q", title="gross", format=",.0f"),
        alt.Tooltip("equity:Q", format=",.0f"),
        alt.Tooltip("event_type:N", title="event"),
    ]
    zoom = alt.selection_interval(encodings=["x"], bind="scales")
    line = (
        alt.Chart(data)
        .mark_line(interpolate="step-after", color="#1f77b4", strokeWidth=1.4)
        .encode(x=_x(), y=alt.Y("leverage:Q", title="leverage (gross / equity)"), tooltip=tips)
        .add_params(zoom)
    )
    over = (
        alt.Chart(data)
        .transform_filter(alt.datum.over)
        .mark_circle(color="#d62728", size=28)
        .encode(x=_x(), y="leverage:Q", tooltip=tips)
    )
    layers: list[alt.Chart] = [line, over] if data["over"].any() else [line]
    if n_infinite:
        layers.append(
            alt.Chart(data)
            .transform_filter("datum.infinite > 0")
            .mark_point(shape="triangle-up", filled=True, color="#d62728", size=70, opacity=0.9)
            .encode(x=_x(), y=alt.value(4), tooltip=tips)
        )
    within = _steps_within(steps, _first(frame, lo), hi) if frame.height else steps.clear()
    if within.height:
        layers.append(_limit_line(within, "MaxLeverage", ".2f"))
    if frame.height == 0:
        subtitle = _unknown(given, account, "timeline rows")
    elif steps.height:
        subtitle = (
            f"{_time_range(frame, 'occurred_at', hi)}; dashed: the limit in force;"
            f" red: {_rows(n_over)} over it"
        )
    else:
        subtitle = (
            f"{_time_range(frame, 'occurred_at', hi)}; no MaxLeverage set for this account"
            + ("" if known_at is None else f" as known at {known_at:%Y-%m-%d %H:%M:%S} UTC")
        )
    if n_infinite:
        subtitle += f" (▲ at the top: {n_infinite:,} with leverage ∞, equity ≤ 0)"
    param, rule = _cursor(when)
    return (
        alt.layer(*layers, rule)
        .add_params(param)
        .properties(
            width=_WIDTH,
            height=220,
            title=_title(f"{account}: leverage against MaxLeverage", subtitle),
        )
    )


def _level_color(level: float) -> str:
    """The colour :func:`breach_chart` draws a level in, from the level alone.

    The default levels have their own (:data:`LEVEL_COLORS`: 80% amber, 90% orange,
    100% red); another level is interpolated between its neighbours on a ramp from
    pale yellow (50% and below) to dark red (150% and above), so a level keeps its
    colour whichever others are drawn with it (0.85 -> ``#f2b14b``).
    """
    if level in LEVEL_COLORS:
        return LEVEL_COLORS[level]
    ramp = _LEVEL_RAMP
    if level <= ramp[0][0]:
        return ramp[0][1]
    for (lo, lo_hex), (hi, hi_hex) in itertools.pairwise(ramp):
        if level <= hi:
            f = (level - lo) / (hi - lo)
            a, b = _rgb(lo_hex), _rgb(hi_hex)
            return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))
    return ramp[-1][1]


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return int(hex_color[1:3], 16), int(hex_color[3:5], 16), int(hex_color[5:7], 16)


def breach_chart(
    breaches: pl.DataFrame,
    *,
    start: TimeLike = None,
    end: TimeLike = None,
    at: TimeLike = None,
    horizon: TimeLike = None,
    max_rows: int = MAX_ROWS,
) -> alt.TopLevelMixin:
    """Breach intervals as a Gantt chart: one lane per account, limit type and symbol.

    ``breaches`` has the columns of :func:`riskbook.breaches` (``account_id,
    limit_type, symbol, level, started_at, ended_at, peak_value, limit_value,
    trigger_event_id``). Each lane (``track``: "account · limit type · symbol", the
    symbol left out for an account-wide limit; ``lane`` keeps "account · limit type")
    holds one limit's intervals, so MaxPositionSize on two symbols does not overlap.
    Bars run from ``started_at`` to ``ended_at``; a breach still open runs to
    ``horizon`` (the end of the history it was found in), else to ``end``, else to the
    latest time in the frame, ends in an arrow ▶, and its tooltip says "open". Warning levels
    are drawn beneath the breaches, each level in its own colour whichever others are
    shown (:data:`LEVEL_COLORS`: 80% amber, 90% orange, breaches red; other levels on a
    ramp between and beyond them); a tick marks each start, so a breach of a few
    seconds on a chart of weeks is still seen.

    Parameters
    ----------
    breaches : the breach rows.
    start, end : the time axis (None: from the bars drawn).
    at : where to draw the time rule.
    horizon : where an open breach ends on the chart: the history's last business
        time (e.g. ``history.events["occurred_at"].max()``); None: ``end``, or the
        latest time in the frame.
    max_rows : the cap on the intervals drawn. Beyond it each lane keeps its breaches
        before its warnings, then its longest and most recent intervals, as many as
        fit (lanes with few intervals keep them all); the subtitle says how many of
        how many are drawn.

    Examples
    --------
    >>> t = datetime(2024, 1, 9, 14, 0, tzinfo=UTC)
    >>> found = pl.DataFrame({"account_id": ["A"], "limit_type": ["MaxLeverage"],
    ...     "symbol": [None], "level": [1.0], "started_at": [t], "ended_at": [None],
    ...     "peak_value": [3.2], "limit_value": [3.0], "trigger_event_id": ["e1"]},
    ...     schema_overrides={"symbol": pl.String, "ended_at": pl.Datetime("us", "UTC")})
    >>> bar = breach_chart(found, horizon=t + timedelta(hours=2)).to_dict()["datasets"]
    >>> [(r["t2"] - r["t"]) / 3.6e6 for rs in bar.values() for r in rs if "lane" in r]
    [2.0]
    """
    lo_t, hi_t = as_time(start, "start"), as_time(end, "end")
    when, max_rows = as_time(at, "at"), _cap(max_rows)
    until = as_time(horizon, "horizon") or hi_t
    frame = _frame(breaches, "breaches").with_columns(
        pl.col("account_id").cast(pl.String),
        pl.col("limit_type").cast(pl.String),
        pl.col("symbol").cast(pl.String),
        pl.col("level").cast(pl.Float64),
    )
    if until is None and frame.height:
        latest = frame.select(
            pl.max_horizontal(pl.col("started_at").max(), pl.col("ended_at").max())
        ).item()
        until = latest
    open_ = pl.col("ended_at").is_null()
    time_type = frame.schema["started_at"]
    frame = frame.with_columns(
        open_.alias("open"),
        (
            pl.col("ended_at").fill_null(pl.lit(until).cast(time_type))
            if until is not None
            else pl.col("ended_at")
        ).alias("until"),
        (pl.col("account_id") + " · " + pl.col("limit_type")).alias("lane"),
        pl.concat_str(
            pl.col("account_id"),
            pl.lit(" · "),
            pl.col("limit_type"),
            (pl.lit(" · ") + pl.col("symbol")).fill_null(""),
        ).alias("track"),
        pl.col("level")
        .map_elements(lambda v: LEVEL_NAMES.get(v, f"level {v:.0%}"), return_dtype=pl.String)
        .alias("severity"),
        pl.when(open_)
        .then(pl.lit("open"))
        .otherwise(pl.col("ended_at").dt.strftime("%Y-%m-%d %H:%M:%S%.3f"))
        .alias("ended"),
    ).with_columns(
        ((pl.col("until") - pl.col("started_at")).dt.total_microseconds() / 6e7).alias("minutes")
    )
    total, n = frame.height, frame.filter(pl.col("level") >= 1.0).height
    frame = _cap_intervals(frame, max_rows).sort("level")
    data = plot_frame(frame.rename({"started_at": "t", "until": "t2"}))
    levels = sorted(frame["level"].unique().to_list()) if frame.height else [0.8, 0.9, 1.0]
    names = [LEVEL_NAMES.get(v, f"level {v:.0%}") for v in levels]
    color = alt.Color(
        "severity:N",
        title="level",
        sort=names,
        scale=alt.Scale(domain=names, range=[_level_color(v) for v in levels]),
    )
    if lo_t is None:
        earliest = frame["started_at"].min() if frame.height else None
        lo_t = earliest if isinstance(earliest, datetime) else None
    if hi_t is None:  # what is drawn: an open breach reaches the horizon
        latest_drawn = frame["until"].max() if frame.height else None
        hi_t = latest_drawn if isinstance(latest_drawn, datetime) else until
    domain: Any = alt.Undefined
    if isinstance(lo_t, datetime) and isinstance(hi_t, datetime) and hi_t > lo_t:
        pad = (hi_t - lo_t) * 0.03 if start is None or end is None else timedelta(0)
        domain = [_ms(lo_t - pad), _ms(hi_t + pad)]
    x = _x(domain=domain)
    tips = [
        alt.Tooltip("track:N", title="lane"),
        "severity:N",
        _tip_time("t", "started"),
        alt.Tooltip("ended:N", title="ended"),
        alt.Tooltip("minutes:Q", title="minutes (open: so far)", format=",.1f"),
        alt.Tooltip("peak_value:Q", title="peak", format=",.4~f"),
        alt.Tooltip("limit_value:Q", title="limit", format=",.4~f"),
        alt.Tooltip("trigger_event_id:N", title="trigger event"),
    ]
    y = alt.Y("track:N", title=None, sort="ascending")
    zoom = alt.selection_interval(encodings=["x"], bind="scales")
    bars = (
        alt.Chart(data)
        .mark_bar(height=12, cornerRadius=2)
        .encode(x=x, x2="t2:T", y=y, color=color, tooltip=tips)
        .add_params(zoom)
    )
    ticks = (
        alt.Chart(data).mark_tick(thickness=2, size=16).encode(x=x, y=y, color=color, tooltip=tips)
    )
    layers = [bars, ticks]
    n_open = int(frame.filter(pl.col("open") & pl.col("until").is_not_null()).height)
    if n_open:  # the end of an open bar is the horizon, not an end: an arrow says so
        layers.append(
            alt.Chart(data)
            .transform_filter("datum.open && datum.t2 != null")
            .mark_point(shape="triangle-right", filled=True, size=60, color="#333", opacity=0.9)
            .encode(x=_x("t2", domain=domain), y=y, tooltip=tips)
        )
    param, rule = _cursor(when)
    shown = _between(lo_t, hi_t) if isinstance(lo_t, datetime) else "no breaches"
    subtitle = f"{shown}; {n:,} breach intervals at 100%, warnings beneath; a tick marks each start"
    if n_open:
        subtitle += f"; ▶ {n_open:,} still open"
    if frame.height < total:
        subtitle += (
            f"; {frame.height:,} of {total:,} intervals drawn (per lane its breaches, then"
            " its longest and most recent)"
        )
    return (
        alt.layer(*layers, rule)
        .add_params(param)
        .properties(
            width=_WIDTH,
            height=alt.Step(22),
            title=_title("Limit breaches", subtitle),
        )
    )


def _cap_intervals(frame: pl.DataFrame, max_rows: int) -> pl.DataFrame:
    """At most ``max_rows`` breach rows, shared out between the lanes.

    Within a lane the rows are ranked by level (breaches first), length (``minutes``,
    open ones to the horizon) and start (latest first); every lane keeps its first
    ``r`` rows, ``r`` as large as the cap allows (a lane with fewer keeps them all).
    """
    if frame.height <= max_rows:
        return frame
    ranked = frame.with_columns(
        pl.int_range(pl.len())
        .sort_by(
            [pl.col("level"), pl.col("minutes").fill_null(0.0), pl.col("started_at")],
            descending=True,
        )
        .arg_sort()
        .over("track")
        .alias("_rank")
    )
    sizes = sorted(ranked.group_by("track").len()["len"].to_list())
    # the largest r with sum(min(size, r)) <= max_rows
    r, used, lanes_left = 0, 0, len(sizes)
    for size in sizes:
        fits = (max_rows - used) // lanes_left if lanes_left else 0
        if size <= fits:
            used += size
            lanes_left -= 1
            r = size
        else:
            r = max(r, fits)
            break
    else:
        r = sizes[-1] if sizes else 0
    kept = ranked.filter(pl.col("_rank") < r)
    if kept.height == 0:  # more lanes than the cap: each lane's first row, the cap's worth
        kept = (
            ranked.filter(pl.col("_rank") == 0)
            .sort("level", "minutes", descending=True, nulls_last=True)
            .head(max_rows)
        )
    return kept.drop("_rank")


# ----------------------------------------------------------------------------- limit lab


def metric_chart(
    metric: pl.DataFrame,
    *,
    limit: float | None = None,
    name: str = "metric",
    unit: str = "",
    accounts: str | Iterable[str] | None = None,
    max_rows: int = MAX_ROWS,
    height: int = 260,
    start: TimeLike = None,
    end: TimeLike = None,
) -> alt.TopLevelMixin:
    """A limit type's metric timeline per account, against a limit value.

    Step lines, one colour per account, downsampled to ``max_rows`` and running on to
    the chart's end (``end``; None: the latest time in ``metric``, whichever accounts
    are drawn; ``start``: where the window begins, None: the first row); a dashed red rule
    at the limit and red dots on the rows over it. The limit is the chart's parameter
    ``limit``: a widget moves the rule and the dots by setting it, without resending
    the data. Infinite values (equity <= 0) are drawn as gaps.

    Parameters
    ----------
    metric : a metric timeline (``LimitDefinition.metric``: ``account_id, time,
        value``, one row per event that moves it).
    limit : where to draw the limit (None: no rule).
    name, unit : the limit type's name and unit (titles).
    accounts : only these accounts (None: all; one account may be given as a string).

    Examples
    --------
    >>> t0 = datetime(2024, 1, 9, 14, 30, tzinfo=UTC)
    >>> m = pl.DataFrame({"account_id": ["A", "A", "B"], "value": [0.2, 1.4, 0.7],
    ...     "time": [t0, t0 + timedelta(minutes=1), t0]})
    >>> spec = metric_chart(m, limit=1.0, name="MaxConcentration").to_dict()
    >>> [p["value"] for p in spec["params"] if p["name"] == "limit"]
    [1.0]
    """
    ids, max_rows = _ids(accounts, "accounts"), _cap(max_rows)
    lo, hi = as_time(start, "start"), as_time(end, "end")
    frame = _frame(metric, "metric").select("account_id", "time", "value")
    hi = hi or _last_time(frame, "time")
    if ids is not None:
        frame = frame.filter(pl.col("account_id").cast(pl.String).is_in(ids))
    frame = _window(frame, x="time", by="account_id", start=lo, end=hi)
    shown = frame.height  # the rows of the accounts drawn, before the cut
    frame = _cut(frame, x="time", y="value", by="account_id", max_rows=max_rows, end=hi)
    data = plot_frame(frame.rename({"time": "t"}))
    pick = alt.selection_point(fields=["account_id"], bind="legend")
    zoom = alt.selection_interval(encodings=["x"], bind="scales")
    title = f"{name} ({unit})" if unit else name
    tips = ["account_id:N", _tip_time("t", "at"), alt.Tooltip("value:Q", format=",.4~f")]
    y = alt.Y("value:Q", title=title, axis=alt.Axis(format=",.4~f"))
    lines = (
        alt.Chart(data)
        .mark_line(interpolate="step-after", strokeWidth=1.4)
        .encode(
            x=_x(),
            y=y,
            color=alt.Color("account_id:N", title="account", scale=alt.Scale(scheme="tableau20")),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.15)),
            tooltip=tips,
        )
        .add_params(pick, zoom)
    )
    over = (
        alt.Chart(data)
        .transform_filter("limit != null && datum.value > limit")
        .mark_circle(color="#d62728", size=14, opacity=0.8)
        .encode(x=_x(), y="value:Q", tooltip=tips)
    )
    param = alt.param(name="limit", value=limit)
    rule = (
        alt.Chart(pl.DataFrame({"one": [1]}))
        .transform_filter("limit != null")
        .transform_calculate(v="limit")
        .mark_rule(color="#d62728", strokeDash=[6, 4], strokeWidth=1.5)
        .encode(y="v:Q", tooltip=[alt.Tooltip("v:Q", title="limit", format=",.4~f")])
    )
    n = data["account_id"].n_unique()
    return (
        alt.layer(lines, over, rule)
        .add_params(param)
        .properties(
            width=_WIDTH,
            height=height,
            title=_title(
                f"{name} by account",
                f"{_time_range(frame, 'time', hi)}; {n} account{'s' if n != 1 else ''},"
                f" {shown:,} metric rows drawn as {data.height:,}; dashed: the limit, red:"
                " rows over it",
            ),
        )
    )


def limit_sweep_chart(
    sweep: pl.DataFrame, *, value: float | None = None, name: str = "limit", unit: str = ""
) -> alt.TopLevelMixin:
    """Breaches and time in breach against the limit's value: where to set a limit.

    Two panels over the same x axis (the limit value): hours in breach (all accounts
    together) and the number of breach intervals, with the number of accounts in
    breach as a dashed line. A rule marks ``value`` (the chart's parameter ``value``;
    a widget moves it without resending the data).

    Parameters
    ----------
    sweep : rows of :func:`riskbook.widgets.limit_sweep` (``value, breaches, accounts,
        hours_in_breach``), one per limit value tried.
    value : the value being looked at (None: no rule).
    name, unit : the limit type's name and unit (titles).
    """
    data = plot_frame(
        _frame(sweep, "sweep").select("value", "breaches", "accounts", "hours_in_breach")
    )
    x = alt.X("value:Q", title=f"{name} value ({unit})" if unit else f"{name} value")
    tips = [
        alt.Tooltip("value:Q", title="limit", format=",.4~f"),
        alt.Tooltip("breaches:Q", format=",d"),
        alt.Tooltip("accounts:Q", title="accounts in breach", format=",d"),
        alt.Tooltip("hours_in_breach:Q", title="hours in breach", format=",.1f"),
    ]
    param = alt.param(name="value", value=value)

    def rule() -> alt.Chart:
        return (
            alt.Chart(pl.DataFrame({"one": [1]}))
            .transform_filter("value != null")
            .transform_calculate(v="value")
            .mark_rule(color="#444", strokeDash=[4, 3], strokeWidth=1.5)
            .encode(x=alt.X("v:Q"))
        )

    base = alt.Chart(data).encode(x=x, tooltip=tips)
    hours = alt.layer(
        base.mark_area(line=True, opacity=0.25, interpolate="step-after", color="#d62728").encode(
            y=alt.Y("hours_in_breach:Q", title="hours in breach (all accounts)")
        ),
        rule(),
    ).properties(width=_WIDTH, height=150)
    counts = alt.layer(
        base.transform_fold(["breaches", "accounts"], as_=["what", "n"])
        .mark_line(point=True)
        .encode(
            y=alt.Y("n:Q", title="count"),
            color=alt.Color(
                "what:N",
                title=None,
                sort=["breaches", "accounts"],
                scale=alt.Scale(domain=["breaches", "accounts"], range=["#1f77b4", "#555"]),
                legend=alt.Legend(
                    labelExpr="datum.label == 'accounts' ? 'accounts in breach' : 'breaches'"
                ),
            ),
            strokeDash=alt.StrokeDash(
                "what:N",
                sort=["breaches", "accounts"],
                scale=alt.Scale(domain=["breaches", "accounts"], range=[[1, 0], [4, 3]]),
                legend=None,
            ),
        ),
        rule(),
    ).properties(width=_WIDTH, height=150)
    return (
        alt.vconcat(hours, counts)
        .add_params(param)
        .properties(
            title=_title(
                f"{name}: what each value would have done",
                "time in breach only grows as the limit tightens; the count of breaches need"
                " not (a tighter limit merges short breaches into longer ones)",
            )
        )
    )


# ----------------------------------------------------------------------------- events


_EVENT_COLORS = {
    "LimitSet": "#7f7f7f",
    "TradeExecuted": "#1f77b4",
    "TradeCancelled": "#9467bd",
    "PositionUpdated": "#8c564b",
    "AccountFunded": "#2ca02c",
    "PriceMarked": "#bcbd22",
    "LimitViolationDetected": "#ff7f0e",
    "AccountBlocked": "#d62728",
    "AccountUnblocked": "#17becf",
}


def _span(times: pl.Series) -> str:
    if times.len() == 0:
        return "no events"
    lo, hi = times.min(), times.max()
    assert isinstance(lo, datetime) and isinstance(hi, datetime)
    return _between(lo, hi)


def event_chart(
    events: pl.DataFrame,
    *,
    focus: str | None = None,
    cursor: TimeLike = None,
    title: str | None = None,
    start: TimeLike = None,
    end: TimeLike = None,
) -> alt.TopLevelMixin:
    """The events around an incident: one lane per kind, causation links, late recordings.

    Parameters
    ----------
    events : rows of :func:`event_lanes`.
    focus : the event_id to ring (the violation or block being looked at).
    cursor : where to draw the time rule (the step being looked at).
    title : the chart's title.
    start, end : the time axis (None: the events' first and last business times, padded
        by 3% of the span, at least a second).

    Each event is a point at its business time in its lane; a grey line joins an
    event to its cause (``causation_id``) when both are in the frame; an event the
    store recorded more than a second after it happened gets an orange line from its
    business time to its recorded time (late trades, busts learnt later). The axis is
    the window, whatever the recordings: a line running past its right end is cut
    there, with a note of how late the recording was ("recorded +19 h →"). The focus's
    label sits on the side of it with the more room, and its summary is in the
    subtitle too.
    """
    when = as_time(cursor, "cursor")
    lo_t, hi_t = as_time(start, "start"), as_time(end, "end")
    frame = _frame(events, "events").with_columns(
        ((pl.col("timestamp") - pl.col("occurred_at")).dt.total_milliseconds() / 1000).alias(
            "latency_s"
        ),
        (pl.col("event_id") == (focus or "")).alias("focus"),
    )
    first, last = frame["occurred_at"].min(), frame["occurred_at"].max()
    if isinstance(first, datetime) and isinstance(last, datetime):
        pad = max((last - first) * 0.03, timedelta(seconds=1))
        lo_t, hi_t = lo_t or first - pad, hi_t or last + pad
    domain: Any = [_ms(lo_t), _ms(hi_t)] if lo_t and hi_t and hi_t > lo_t else alt.Undefined
    data = plot_frame(frame.rename({"occurred_at": "t", "timestamp": "recorded"}))
    lanes = [lane for lane in _LANES if lane in set(frame["lane"].to_list())] or _LANES
    y = alt.Y("lane:N", title=None, sort=lanes, scale=alt.Scale(domain=lanes))
    tips = [
        "event_type:N",
        "summary:N",
        "account_id:N",
        _tip_time("t", "business time"),
        _tip_time("recorded", "recorded"),
        alt.Tooltip("latency_s:Q", title="recorded after (s)", format=",.3f"),
        "position:Q",
        "event_id:N",
        "causation_id:N",
    ]
    present = set(frame["event_type"].to_list())
    types = [t for t in _EVENT_COLORS if t in present] or list(_EVENT_COLORS)
    color = alt.Color(
        "event_type:N",
        title="event",
        scale=alt.Scale(domain=types, range=[_EVENT_COLORS[t] for t in types]),
    )
    links = (
        frame.join(
            frame.select(
                pl.col("event_id").alias("causation_id"),
                pl.col("occurred_at").alias("cause_t"),
                pl.col("lane").alias("cause_lane"),
            ),
            on="causation_id",
        )
        .with_row_index("link")
        .select("link", "occurred_at", "lane", "cause_t", "cause_lane", "summary")
    )
    link_rows = pl.concat(
        [
            links.select("link", pl.col("occurred_at").alias("t"), "lane", "summary"),
            links.select(
                "link", pl.col("cause_t").alias("t"), pl.col("cause_lane").alias("lane"), "summary"
            ),
        ]
    )
    x = _x(domain=domain)
    layers: list[alt.Chart] = []
    late = data.filter(pl.col("latency_s") > 1.0)
    if late.height:
        right = domain[1] if domain is not alt.Undefined else None
        late = late.with_columns(
            (pl.min_horizontal("recorded", pl.lit(right)) if right else pl.col("recorded")).alias(
                "recorded_drawn"
            )
        )
        layers.append(
            alt.Chart(late)
            .mark_rule(color="#ff7f0e", strokeWidth=2, opacity=0.7, clip=True)
            .encode(x=x, x2="recorded_drawn:T", y=y, tooltip=tips)
        )
        beyond = late.filter(pl.col("recorded") > pl.col("recorded_drawn")).with_columns(
            pl.format(
                "recorded +{} →",
                pl.col("latency_s").map_elements(_duration, return_dtype=pl.String),
            ).alias("late_note")
        )
        if beyond.height:
            layers.append(
                alt.Chart(beyond)
                .mark_text(align="right", dx=-2, dy=-7, fontSize=10, color="#c2540a")
                .encode(x=_x("recorded_drawn", domain=domain), y=y, text="late_note:N")
            )
    if link_rows.height:
        layers.append(
            alt.Chart(plot_frame(link_rows))
            .mark_line(color="#555", strokeWidth=1.2, opacity=0.8, clip=True)
            .encode(x=x, y=y, detail="link:N")
        )
    zoom = alt.selection_interval(encodings=["x"], bind="scales")
    layers.append(
        alt.Chart(data)
        .mark_point(filled=True, size=60, opacity=0.85, clip=True)
        .encode(x=x, y=y, color=color, shape=alt.Shape("event_type:N", legend=None), tooltip=tips)
        .add_params(zoom)
    )
    focused = data.filter(pl.col("focus"))
    subtitle = [
        f"{_span(frame['occurred_at'])}; lines: causation links; orange: recorded later than"
        " it happened"
    ]
    if focused.height:
        layers.append(
            alt.Chart(focused)
            .mark_point(size=420, strokeWidth=2.5, color="black", clip=True)
            .encode(x=x, y=y)
        )
        # the label on the side with the more room, cut to it (the subtitle has it whole)
        t_focus = focused["t"][0]
        share = (
            (t_focus - domain[0]) / (domain[1] - domain[0]) if domain is not alt.Undefined else 0
        )
        left = share > 0.5
        room = max(60, int((share if left else 1 - share) * _WIDTH) - 20)
        layers.append(
            alt.Chart(focused)
            .mark_text(
                align="right" if left else "left",
                dx=-14 if left else 14,
                dy=-12,
                fontSize=11,
                fontWeight="bold",
                limit=room,
            )
            .encode(x=x, y=y, text="summary:N")
        )
        summary = focused["summary"][0]
        if summary:
            subtitle.append(f"ringed: {focused['event_type'][0]} {summary}")
    param, rule = _cursor(when)
    layers.append(rule.mark_rule(color="#444", strokeDash=[4, 3], strokeWidth=1.5, clip=True))
    return (
        alt.layer(*layers)
        .add_params(param)
        .properties(
            width=_WIDTH,
            height=alt.Step(34),
            title=_title(title or "Events around the incident", subtitle),
        )
    )


def ratio_chart(
    frame: pl.DataFrame,
    *,
    label: str = "label",
    ratio: str = "ratio",
    color: str | None = "group",
    text: str | None = "ratio_text",
    title: str = "riskbook against the alternatives",
    subtitle: str | None = None,
) -> alt.TopLevelMixin:
    """Ratios as horizontal bars from 1 on a log axis: right of the rule is ahead.

    One bar per row, in the frame's order; ``color`` groups them (legend in order of
    first appearance), ``text`` (if given) is printed beyond the end of each bar.
    Ratios must be finite and positive (cap an infinite one and say so in its text).
    """
    data = _frame(frame, "frame").select(
        pl.col(label).alias("label"),
        pl.col(ratio).cast(pl.Float64).alias("ratio"),
        pl.lit(1.0).alias("one"),
        *([pl.col(color).alias("group")] if color else []),
        (pl.col(text) if text else pl.col(ratio).round(2).cast(pl.String)).alias("text"),
    )
    lo = min(0.5, float(data["ratio"].min()) / 4)  # type: ignore[arg-type]
    hi = max(2.0, float(data["ratio"].max()) * 4)  # type: ignore[arg-type]
    x = alt.X(
        "ratio:Q", title="ratio (log scale; 1 = even)", scale=alt.Scale(type="log", domain=[lo, hi])
    )
    # room for the longest label whole (Vega cuts a label at labelLimit px with "…"):
    # about 7 px a character at the axis' 10 px font, with a margin
    longest = int(data["label"].cast(pl.String).str.len_chars().max() or 0)  # type: ignore[arg-type]
    y = alt.Y(
        "label:N", title=None, sort=None, axis=alt.Axis(labelLimit=max(460, 7 * longest + 20))
    )
    base = alt.Chart(data).encode(y=y)
    colour = (
        alt.Color(
            "group:N",
            title=None,
            sort=data["group"].unique(maintain_order=True).to_list(),
            scale=alt.Scale(scheme="tableau10"),
        )
        if color
        else alt.value("#4c78a8")
    )
    bars = base.mark_bar(height=14).encode(
        x=x, x2="one:Q", color=colour, tooltip=["label:N", "text:N"]
    )
    ahead = (
        base.transform_filter("datum.ratio >= 1")
        .mark_text(align="left", dx=4, fontSize=11)
        .encode(x=x, text="text:N")
    )
    behind = (
        base.transform_filter("datum.ratio < 1")
        .mark_text(align="right", dx=-4, fontSize=11)
        .encode(x=x, text="text:N")
    )
    even = alt.Chart(pl.DataFrame({"one": [1.0]})).mark_rule(color="black").encode(x="one:Q")
    return alt.layer(bars, ahead, behind, even).properties(
        width=_WIDTH - 240, height=alt.Step(22), title=_title(title, subtitle)
    )


# ----------------------------------------------------------------------------- live

LIVE_EFFECTS_SCHEMA: dict[str, Any] = {
    "committed_at": pl.Datetime("us", "UTC"),
    "kind": pl.String,
    "account_id": pl.String,
    "limit_type": pl.String,
    "symbol": pl.String,
    "value": pl.Float64,
    "limit_value": pl.Float64,
    "trigger_position": pl.Int64,
}
"""Effects of the live processor as :func:`live_chart` and the live panel show them."""

LIVE_COMMITS_SCHEMA: dict[str, Any] = {
    "committed_at": pl.Datetime("us", "UTC"),
    "horizon": pl.Int64,
    "events": pl.Int64,
    "violations": pl.Int64,
    "blocks": pl.Int64,
    "seconds": pl.Float64,
}
"""The commits of a live processor as :func:`live_chart` reads them, one row per
micro-batch (:class:`riskbook.widgets.LiveMonitor` keeps them as ``commits``)."""

_EFFECT_LANES = {"LimitViolationDetected": "violation", "AccountBlocked": "block"}


def live_chart(
    commits: pl.DataFrame,
    effects: pl.DataFrame | None = None,
    *,
    window: timedelta = timedelta(minutes=2),
    end: TimeLike = None,
    max_rows: int = 2_000,
) -> alt.TopLevelMixin:
    """A live processor at work: throughput, violations and blocks, batch latency.

    Three panels over one wall-clock axis (one shared scale, exactly the window shown:
    a violation is drawn above the batch that committed it), the last ``window`` before
    ``end`` (default: the latest commit; a shorter run fills the axis, and the subtitle
    gives the span shown): events processed per
    second (bars of a second, or of 250 ms over 30 s or less), each violation
    and block as it was committed (one lane per kind; the tooltip says which account,
    limit and value), and the time each micro-batch took from its read to its commit
    (ms, log scale: a catch-up batch of thousands and a lone trade on one axis).

    Parameters
    ----------
    commits : one row per committed micro-batch (:data:`LIVE_COMMITS_SCHEMA`:
        ``committed_at, horizon, events, violations, blocks, seconds``).
    effects : one row per effect (``committed_at, kind, account_id, limit_type,
        symbol, value, limit_value``), or None.
    window : how much time the axis shows.
    end : the right end of the axis (None: the latest commit, or now).
    max_rows : the cap on the batches drawn (:func:`downsample`: the slowest and the
        fastest of each stretch are kept, and those with effects); violations and
        blocks: the latest ``max_rows / 2``.

    Examples
    --------
    >>> t0 = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
    >>> commits = pl.DataFrame({"committed_at": [t0, t0 + timedelta(seconds=1.5)],
    ...     "horizon": [40, 43], "events": [39, 3], "violations": [0, 1], "blocks": [0, 1],
    ...     "seconds": [0.012, 0.004]}, schema=LIVE_COMMITS_SCHEMA)
    >>> spec = live_chart(commits).to_dict()  # seconds with events, effects, batches:
    >>> [len(rows) for rows in spec["datasets"].values()]
    [2, 0, 2]
    """
    stop, max_rows = as_time(end, "end"), _cap(max_rows)
    commits = _frame(commits, "commits")
    effects = None if effects is None else _frame(effects, "effects")
    last = _last_time(commits, "committed_at") if commits.height else None
    stop = stop or last or datetime.now(UTC)
    first = commits["committed_at"].min() if commits.height else None
    begin = stop - window
    if isinstance(first, datetime) and first - timedelta(seconds=1) > begin:
        begin = first - timedelta(seconds=1)  # a short run fills the axis
    recent = commits.filter(pl.col("committed_at") > begin)
    domain = [_ms(begin), _ms(stop)]
    x = _x("t", title="wall-clock time (UTC)", domain=domain)
    stacked_x = alt.X(  # the panels above the bottom one: the same axis, unlabelled
        "t:T",
        title=None,
        scale=alt.Scale(type="utc", domain=domain, nice=False),
        axis=alt.Axis(format=_AXIS_TIME, labels=False, ticks=False, tickCount=_WIDTH // 90),
    )
    short = stop - begin <= timedelta(seconds=30)
    bucket = timedelta(milliseconds=250) if short else timedelta(seconds=1)
    per_bucket = plot_frame(
        recent.group_by(pl.col("committed_at").dt.truncate(bucket).alias("t"))
        .agg(
            (pl.col("events").sum() / bucket.total_seconds()).alias("rate"),
            pl.col("events").sum(),
            pl.len().alias("batches"),
        )
        .with_columns((pl.col("t") + bucket).alias("t_end"))
        .sort("t", maintain_order=True)
    )
    rate = (
        alt.Chart(per_bucket)
        .mark_rect(color="#4c78a8", stroke="white", strokeWidth=0.5, clip=True)
        .encode(
            x=stacked_x,
            x2="t_end:T",
            y=alt.Y("rate:Q", title="events / s"),
            y2=alt.datum(0),
            tooltip=[
                _tip_time("t", "from"),
                alt.Tooltip("events:Q", format=",d"),
                alt.Tooltip("rate:Q", title="events / s", format=",.0f"),
                alt.Tooltip("batches:Q", format=",d"),
            ],
        )
        .properties(width=_WIDTH, height=110)
    )
    columns = ["committed_at", "kind", "account_id", "limit_type", "symbol", "value", "limit_value"]
    found = (
        effects.select(columns)
        if effects is not None and effects.height
        else pl.DataFrame(schema={c: LIVE_EFFECTS_SCHEMA[c] for c in columns})
    )
    lanes = plot_frame(
        found.filter(pl.col("committed_at") > begin)
        .sort("committed_at", maintain_order=True)
        .tail(max_rows // 2)  # the latest ones, when they come by the thousand
        .with_columns(
            pl.col("committed_at").alias("t"),
            pl.col("kind").replace_strict(_EFFECT_LANES, default=pl.col("kind")).alias("lane"),
        )
    )
    kinds = list(_EFFECT_LANES.values())
    marks = (
        alt.Chart(lanes)
        .mark_point(filled=True, size=70, opacity=0.85)
        .encode(
            x=stacked_x,
            y=alt.Y("lane:N", title=None, sort=kinds, scale=alt.Scale(domain=kinds)),
            color=alt.Color(
                "lane:N",
                title=None,
                scale=alt.Scale(
                    domain=kinds,
                    range=[
                        _EVENT_COLORS["LimitViolationDetected"],
                        _EVENT_COLORS["AccountBlocked"],
                    ],
                ),
                legend=None,
            ),
            shape=alt.Shape(
                "lane:N", scale=alt.Scale(domain=kinds, range=["circle", "square"]), legend=None
            ),
            tooltip=[
                _tip_time("t", "committed"),
                alt.Tooltip("kind:N"),
                alt.Tooltip("account_id:N", title="account"),
                alt.Tooltip("limit_type:N", title="limit"),
                alt.Tooltip("symbol:N"),
                alt.Tooltip("value:Q", format=",.4~f"),
                alt.Tooltip("limit_value:Q", title="limit value", format=",.4~f"),
            ],
        )
        .properties(width=_WIDTH, height=alt.Step(22))
    )
    batches = plot_frame(
        downsample(
            recent.select(
                pl.col("committed_at").alias("t"),
                "events",
                (pl.col("violations") + pl.col("blocks")).alias("effects"),
                (pl.col("seconds") * 1000).clip(lower_bound=0.01).alias("ms"),
            ),
            x="t",
            y=["ms", "effects"],
            max_rows=max_rows,
        )
    )
    latency = (
        alt.Chart(batches)
        .mark_point(filled=True, size=22, opacity=0.6)
        .encode(
            x=x,
            y=alt.Y("ms:Q", title="batch ms (log)", scale=alt.Scale(type="log")),
            color=alt.condition("datum.effects > 0", alt.value("#d62728"), alt.value("#4c78a8")),
            tooltip=[
                _tip_time("t", "committed"),
                alt.Tooltip("events:Q", format=",d"),
                alt.Tooltip("effects:Q", format=",d"),
                alt.Tooltip("ms:Q", title="read to commit (ms)", format=",.2f"),
            ],
        )
        .properties(width=_WIDTH, height=100)
    )
    # one time scale for the three panels, exactly the window: an effect sits above its batch
    return (
        alt.vconcat(rate, marks, latency, spacing=6)
        .resolve_scale(x="shared")
        .properties(
            title=_title(
                "Live processor",
                f"the last {_duration((stop - begin).total_seconds())}, to"
                f" {stop:%Y-%m-%d %H:%M:%S} UTC: events processed per second; violations and"
                " blocks as committed; each micro-batch from read to commit (red: it had"
                " effects)",
            )
        )
    )
