"""Altair charts over riskbook's Polars frames (DESIGN.md §1 layer 7).

Every builder takes the frames the projections return and gives an Altair chart:

=========================  ==============================================================
:func:`exposure_chart`     a measure (gross exposure, equity, leverage ...) of every
                           account over time, with a rule at the time being looked at
:func:`exposure_at_chart`  exposure by account and symbol at one moment (bars)
:func:`position_chart`     an account's position per symbol over time, with its
                           MaxPositionSize limits as step lines
:func:`equity_chart`       equity and its running peak (the drawdown shaded), drawdown
                           below against MaxDrawdown
:func:`leverage_chart`     leverage against MaxLeverage as a step line from LimitSet,
                           rows over the limit marked
:func:`breach_chart`       breach intervals as a Gantt chart, one lane per account and
                           limit type, warning levels beneath the breaches
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
final state survive) to at most ``max_rows`` rows before it reaches Altair. Times are
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
import operator
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl

from riskbook.events import as_time

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

MAX_ROWS = 4_000
"""Default cap on the rows a chart carries (Altair refuses more than 5,000 per dataset)."""

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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

TimeLike = datetime | str | None


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
    return None if t is None else (t - _EPOCH) // timedelta(milliseconds=1)


def _ids(value: str | Iterable[str] | None, name: str) -> list[str] | None:
    """Ids given as one string or a collection of strings; None stays None (no filter).

    One id may be given as a string, as :func:`riskbook.load` takes it: it is not split
    into its characters. An empty collection stays empty (nothing matches it).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    try:
        ids = list(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a string or a collection of strings, got {type(value).__name__}"
        ) from None
    for x in ids:
        if not isinstance(x, str):
            raise TypeError(f"{name} must hold strings, got {x!r} ({type(x).__name__})")
    return ids


def _frame(value: Any, name: str) -> pl.DataFrame:
    """``value`` if it is a Polars DataFrame; a TypeError naming ``name`` otherwise."""
    if isinstance(value, pl.DataFrame):
        return value
    kind = type(value)
    hint = (
        ": call .collect() first"
        if isinstance(value, pl.LazyFrame)
        else ": convert it with polars.from_pandas"
        if kind.__module__.startswith("pandas")
        else ""
    )
    raise TypeError(
        f"{name} must be a polars DataFrame, got {kind.__module__}.{kind.__qualname__}{hint}"
    )


def _cap(max_rows: Any) -> int:
    """``max_rows`` checked: a whole number of rows, at least one."""
    try:
        n = operator.index(max_rows)
    except TypeError:
        raise TypeError(f"max_rows must be an integer, got {type(max_rows).__name__}") from None
    if n < 1:
        raise ValueError(f"max_rows must be at least 1; got {n}")
    return n


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
        return frame.sort([*keys, x])
    n_series = frame.select(keys).n_unique() if keys else 1
    per_bucket = 2 * len(ys) + 1
    buckets = max(1, max_rows // (n_series * per_bucket))
    # timelines come in time order: rank within each series without sorting the whole
    data = (frame if frame[x].is_sorted() else frame.sort(x)).with_row_index("__row")
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

    One row per LimitSet of (account, limit_type, symbol) with ``set_at`` (business
    time), ``value``, ``set_by``, ``timestamp`` (recorded), in order; as known at
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
        (pl.col("account_id").cast(pl.String) == account)
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
    "milliseconds": "%S.%L",
}
"""24-hour clock labels at every zoom level (Vega's default is a 12-hour clock)."""


def _x(
    field: str = "t", title: str | None = "business time (UTC)", domain: Any = alt.Undefined
) -> alt.X:
    return alt.X(
        f"{field}:T",
        title=title,
        scale=alt.Scale(type="utc", domain=domain, nice=domain is not alt.Undefined),
        axis=alt.Axis(format=_AXIS_TIME, labelOverlap=True),
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


def _title(text: str, subtitle: str | None = None) -> alt.TitleParams:
    return alt.TitleParams(text, subtitle=subtitle or "", anchor="start", fontSize=14)


# ----------------------------------------------------------------------------- charts


def exposure_chart(
    timeline: pl.DataFrame,
    *,
    measure: str = "gross_exposure",
    accounts: str | Iterable[str] | None = None,
    at: TimeLike = None,
    max_rows: int = MAX_ROWS,
    height: int = 280,
) -> alt.TopLevelMixin:
    """A measure of every account over time (from :func:`riskbook.account_timeline`).

    Step lines (figures hold between events), one colour per account, downsampled to
    ``max_rows``; a dashed rule at ``at`` (the parameter ``at``, epoch ms, which a
    widget moves without resending data). Click a legend entry to bring one account
    forward; drag to zoom the time axis.

    Parameters
    ----------
    timeline : rows of :func:`riskbook.account_timeline` (``account_id, occurred_at``
        and the measure).
    measure : one of :data:`MEASURES`.
    accounts : only these accounts (None: all; one account may be given as a string).
    at : where to draw the time rule (None: no rule).
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}; got {measure!r}")
    ids, when, max_rows = _ids(accounts, "accounts"), as_time(at, "at"), _cap(max_rows)
    frame = _frame(timeline, "timeline")
    frame = frame.select("account_id", "occurred_at", measure)  # ids cast after the cut
    if ids is not None:
        frame = frame.filter(pl.col("account_id").cast(pl.String).is_in(ids))
    shown = frame.height  # the rows of the accounts drawn, before the cut
    frame = downsample(frame, x="occurred_at", y=measure, by="account_id", max_rows=max_rows)
    data = plot_frame(frame.rename({"occurred_at": "t"}))
    pick = alt.selection_point(fields=["account_id"], bind="legend")
    zoom = alt.selection_interval(encodings=["x"], bind="scales")
    y_axis = alt.Axis(format={"drawdown": "%", "leverage": ".2~f"}.get(measure, "~s"))
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
                f"{n} account{'s' if n != 1 else ''}, {shown:,} timeline rows"
                f" drawn as {data.height:,}",
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
    into "other" bars; with more accounts than that allows, the accounts with the
    largest gross exposure are drawn. The subtitle says so.
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
    sub = f"at {when:%Y-%m-%d %H:%M:%S} UTC" if when else "latest"
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
                axis=alt.Axis(format="~s"),
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
    rest = (
        ranked.filter(pl.col("_rank") >= k)
        .group_by("account_id", (pl.col(value) >= 0).alias("_long"))
        .agg(pl.col(value).sum())
        .select(
            "account_id",
            pl.lit("other").alias("symbol"),
            pl.lit(None, pl.Float64).alias("quantity"),
            pl.lit(None, pl.Float64).alias("avg_price"),
            pl.lit(None, pl.Float64).alias("mark_price"),
            pl.col(value),
        )
    )
    kept = ranked.filter(pl.col("_rank") < k).drop("_rank")
    out = pl.concat([kept, rest.cast(kept.schema)])
    note += (
        f"{total:,} positions drawn as {out.height:,} bars: per account its {k:,} largest,"
        ' the rest summed as "other"'
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
) -> alt.TopLevelMixin:
    """An account's position per symbol over time, with its MaxPositionSize limits.

    Parameters
    ----------
    position_timeline : rows of :func:`riskbook.position_timeline`.
    account : the account.
    limits : the History's ``limits`` frame: MaxPositionSize drawn as ± step lines
        (dashed; per symbol where a symbol-specific limit overrides the account's).
    symbols : only these symbols (None: all the account traded; one may be given as a
        string).
    at : where to draw the time rule. known_at : limits as known then.
    """
    ids, when, max_rows = _ids(symbols, "symbols"), as_time(at, "at"), _cap(max_rows)
    known_at = as_time(known_at, "known_at")
    limits = None if limits is None else _frame(limits, "limits")
    frame = (
        _frame(position_timeline, "position_timeline")
        .filter(pl.col("account_id").cast(pl.String) == account)
        .select(
            pl.col("symbol").cast(pl.String), "occurred_at", "quantity", "avg_price", "trade_id"
        )
    )
    if ids is not None:
        frame = frame.filter(pl.col("symbol").is_in(ids))
    end = _last_time(frame)
    small = downsample(frame, x="occurred_at", y="quantity", by="symbol", max_rows=max_rows)
    data = plot_frame(small.rename({"occurred_at": "t"}))
    color = alt.Color("symbol:N", scale=alt.Scale(scheme="tableau10"))
    layers: list[alt.Chart] = [
        alt.Chart(data)
        .mark_line(interpolate="step-after", strokeWidth=1.4)
        .encode(
            x=_x(),
            y=alt.Y("quantity:Q", title="position (quantity)", axis=alt.Axis(format="~s")),
            color=color,
            tooltip=[
                "symbol:N",
                _tip_time("t", "at"),
                alt.Tooltip("quantity:Q", format=QUANTITY_FORMAT),
                alt.Tooltip("avg_price:Q", format=",.2f"),
                "trade_id:N",
            ],
        )
    ]
    if limits is not None and frame.height:
        steps = _position_limit_steps(
            limits, account, frame["symbol"].unique().to_list(), known_at, end
        )
        if steps.height:
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
    param, rule = _cursor(when)
    return (
        alt.layer(*layers, rule)
        .add_params(param)
        .properties(
            width=_WIDTH,
            height=height,
            title=_title(
                f"{account}: position per symbol",
                "dashed: MaxPositionSize (grey: account-wide, coloured: that symbol's own)",
            ),
        )
    )


def _position_limit_steps(
    limits: pl.DataFrame,
    account: str,
    symbols: Sequence[str],
    known_at: TimeLike,
    end: datetime | None,
) -> pl.DataFrame:
    """MaxPositionSize step rows: the account-wide series and each symbol's own."""
    parts = [
        limit_steps(
            limits, account=account, limit_type="MaxPositionSize", known_at=known_at, end=end
        ).with_columns(pl.lit("account").alias("series"))
    ]
    for sym in symbols:
        own = limit_steps(
            limits,
            account=account,
            limit_type="MaxPositionSize",
            symbol=sym,
            known_at=known_at,
            end=end,
            account_wide=False,
        )
        parts.append(own.with_columns(pl.lit(sym).alias("series"), pl.lit(sym).alias("scope")))
    frames = [p for p in parts if p.height]
    return pl.concat(frames) if frames else parts[0]


def equity_chart(
    timeline: pl.DataFrame,
    *,
    account: str,
    limits: pl.DataFrame | None = None,
    at: TimeLike = None,
    known_at: TimeLike = None,
    max_rows: int = MAX_ROWS,
) -> alt.TopLevelMixin:
    """Equity with its running peak, the drawdown shaded; drawdown below with MaxDrawdown.

    Parameters
    ----------
    timeline : rows of :func:`riskbook.account_timeline` (one account is picked).
    account : the account.
    limits : the History's ``limits`` frame; its MaxDrawdown is drawn as a step line.
    at : where to draw the time rule. known_at : limits as known then.
    """
    when, known_at, max_rows = as_time(at, "at"), as_time(known_at, "known_at"), _cap(max_rows)
    limits = None if limits is None else _frame(limits, "limits")
    frame = (
        _frame(timeline, "timeline")
        .filter(pl.col("account_id").cast(pl.String) == account)
        .select(
            "occurred_at",
            "equity",
            "peak_equity",
            "drawdown",
            pl.col("event_type").cast(pl.String),
        )
    )
    small = downsample(frame, x="occurred_at", y=["equity", "drawdown"], max_rows=max_rows)
    data = plot_frame(small.rename({"occurred_at": "t"}))
    tips = [
        _tip_time("t", "at"),
        alt.Tooltip("equity:Q", format=",.0f"),
        alt.Tooltip("peak_equity:Q", title="peak", format=",.0f"),
        alt.Tooltip("drawdown:Q", format=".2%"),
        alt.Tooltip("event_type:N", title="event"),
    ]
    zoom = alt.selection_interval(encodings=["x"], bind="scales")
    base = alt.Chart(data).encode(x=_x(title=None))
    gap = base.mark_area(interpolate="step-after", color="#d62728", opacity=0.25).encode(
        y=alt.Y(
            "equity:Q", title="equity", scale=alt.Scale(zero=False), axis=alt.Axis(format="~s")
        ),
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
    top = alt.layer(gap, peak, equity, rule).properties(
        width=_WIDTH,
        height=220,
        title=_title(f"{account}: equity and running peak", "shaded: drawdown from the peak"),
    )
    dd_layers: list[alt.Chart] = [
        base.mark_area(interpolate="step-after", color="#d62728", opacity=0.55).encode(
            x=_x(),
            y=alt.Y("drawdown:Q", title="drawdown", axis=alt.Axis(format="%")),
            tooltip=tips,
        )
    ]
    if limits is not None and frame.height:
        steps = limit_steps(
            limits,
            account=account,
            limit_type="MaxDrawdown",
            known_at=known_at,
            end=_last_time(frame),
        )
        if steps.height:
            dd_layers.append(_limit_line(steps, "MaxDrawdown", ".0%"))
    _, rule2 = _cursor(when)
    bottom = alt.layer(*dd_layers, rule2).properties(width=_WIDTH, height=110)
    return alt.vconcat(top, bottom, spacing=6).add_params(param)


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
) -> alt.TopLevelMixin:
    """Leverage over time against MaxLeverage (a step line from the LimitSet events).

    Timeline rows where leverage is over the limit in force (as known at ``known_at``)
    are marked red; an infinite leverage (equity <= 0 with positions open) breaks the
    line and is marked by a red triangle pinned at the top of the plot, its tooltip
    reading "∞ (equity ≤ 0)".
    """
    when, known_at, max_rows = as_time(at, "at"), as_time(known_at, "known_at"), _cap(max_rows)
    limits = _frame(limits, "limits")
    frame = (
        _frame(timeline, "timeline")
        .filter(pl.col("account_id").cast(pl.String) == account)
        .select(
            "occurred_at",
            "leverage",
            "gross_exposure",
            "equity",
            pl.col("event_type").cast(pl.String),
        )
        .sort("occurred_at")
    )
    end = _last_time(frame)
    steps = limit_steps(
        limits, account=account, limit_type="MaxLeverage", known_at=known_at, end=end
    )
    if steps.height:
        frame = frame.join_asof(
            steps.select(pl.col("set_at").alias("occurred_at"), pl.col("value").alias("limit")),
            on="occurred_at",
            strategy="backward",
        )
    else:
        frame = frame.with_columns(pl.lit(None, pl.Float64).alias("limit"))
    infinite = pl.col("leverage").is_infinite() & (pl.col("leverage") > 0)
    frame = frame.with_columns(
        (pl.col("leverage") > pl.col("limit")).fill_null(False).alias("over"),
        infinite.cast(pl.Float64).alias("infinite"),  # a plotted column: kept by the cut
        pl.when(infinite)
        .then(pl.lit("∞ (equity ≤ 0)"))
        .otherwise(pl.col("leverage").round(3).cast(pl.String))
        .alias("leverage_text"),
    )
    small = downsample(frame, x="occurred_at", y=["leverage", "infinite"], max_rows=max_rows)
    data = plot_frame(small.rename({"occurred_at": "t"}))
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
    n_over = int(frame["over"].sum())
    n_infinite = int(frame["infinite"].sum())
    layers: list[alt.Chart] = [line, over] if data["over"].any() else [line]
    if n_infinite:
        layers.append(
            alt.Chart(data)
            .transform_filter("datum.infinite > 0")
            .mark_point(shape="triangle-up", filled=True, color="#d62728", size=70, opacity=0.9)
            .encode(x=_x(), y=alt.value(4), tooltip=tips)
        )
    if steps.height:
        layers.append(_limit_line(steps, "MaxLeverage", ".2f"))
    subtitle = f"dashed: the limit in force; red: {n_over:,} timeline rows over it"
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
    """Breach intervals as a Gantt chart: one lane per account and limit type.

    ``breaches`` has the columns of :func:`riskbook.breaches` (``account_id,
    limit_type, symbol, level, started_at, ended_at, peak_value, limit_value,
    trigger_event_id``). Bars run from ``started_at`` to ``ended_at``; a breach still
    open runs to ``horizon`` (the end of the history it was found in), else to ``end``,
    else to the latest time in the frame, and its tooltip says "open". Warning levels
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
        "lane:N",
        "symbol:N",
        "severity:N",
        _tip_time("t", "started"),
        alt.Tooltip("ended:N", title="ended"),
        alt.Tooltip("minutes:Q", title="minutes (open: so far)", format=",.1f"),
        alt.Tooltip("peak_value:Q", title="peak", format=",.4~f"),
        alt.Tooltip("limit_value:Q", title="limit", format=",.4~f"),
        alt.Tooltip("trigger_event_id:N", title="trigger event"),
    ]
    y = alt.Y("lane:N", title=None, sort="ascending")
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
    param, rule = _cursor(when)
    subtitle = f"{n:,} breach intervals at 100%, warnings beneath; a tick marks each start"
    if frame.height < total:
        subtitle += (
            f"; {frame.height:,} of {total:,} intervals drawn (per lane its breaches, then"
            " its longest and most recent)"
        )
    return (
        alt.layer(bars, ticks, rule)
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
        .over("lane")
        .alias("_rank")
    )
    sizes = sorted(ranked.group_by("lane").len()["len"].to_list())
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
) -> alt.TopLevelMixin:
    """A limit type's metric timeline per account, against a limit value.

    Step lines, one colour per account, downsampled to ``max_rows``; a dashed red rule
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
    frame = _frame(metric, "metric").select("account_id", "time", "value")
    if ids is not None:
        frame = frame.filter(pl.col("account_id").cast(pl.String).is_in(ids))
    shown = frame.height  # the rows of the accounts drawn, before the cut
    frame = downsample(frame, x="time", y="value", by="account_id", max_rows=max_rows)
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
                f"{n} account{'s' if n != 1 else ''}, {shown:,} metric rows drawn as"
                f" {data.height:,}; dashed: the limit, red: rows over it",
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

_LANES = [
    "limit",
    "trade",
    "cancel",
    "adjustment",
    "funding",
    "mark",
    "violation",
    "block",
    "other",
]
_LANE_OF = {
    "LimitSet": "limit",
    "TradeExecuted": "trade",
    "TradeCancelled": "cancel",
    "PositionUpdated": "adjustment",
    "AccountFunded": "funding",
    "PriceMarked": "mark",
    "LimitViolationDetected": "violation",
    "AccountBlocked": "block",
    "AccountUnblocked": "block",
}


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


def _fmt(x: float) -> str:
    return (
        f"{x:,.4f}".rstrip("0").rstrip(".") if abs(x) < 100 else f"{x:,.2f}".rstrip("0").rstrip(".")
    )


def event_lanes(
    history: Any,
    *,
    start: TimeLike,
    end: TimeLike,
    accounts: str | Iterable[str] | None = None,
    symbols: str | Iterable[str] | None = None,
    max_rows: int = MAX_ROWS,
    keep: Sequence[str] = (),
) -> pl.DataFrame:
    """The events between two business times, each with a lane and a one-line summary.

    Parameters
    ----------
    history : a :class:`riskbook.History`.
    start, end : the business-time window (inclusive).
    accounts : only events of these accounts (marks are kept for ``symbols``; None: all;
        one account may be given as a string).
    symbols : the symbols whose marks and trades to show (None: all; one may be given as
        a string).
    max_rows : the cap; beyond it the marks are thinned first, then the other events.
        Violations, blocks, limit changes and the events in ``keep`` are never thinned
        away (a window that must show every event narrows its times instead: see
        :class:`riskbook.widgets.IncidentPanel`).
    keep : event ids that stay whatever the cap (the incident being looked at).

    Returns
    -------
    pl.DataFrame
        ``event_id, event_type, lane, account_id, symbol, occurred_at, timestamp,
        position, causation_id, correlation_id, summary``, in global order.
    """
    lo, hi = as_time(start, "start"), as_time(end, "end")
    if lo is None or hi is None:
        raise ValueError("event_lanes needs both start and end")
    accs, syms = _ids(accounts, "accounts"), _ids(symbols, "symbols")
    max_rows = _cap(max_rows)
    head = ["event_id", "timestamp", "position", "causation_id", "correlation_id"]
    f = _fmt

    def window(frame: pl.DataFrame, time: str) -> pl.DataFrame:
        out = frame.filter(pl.col(time).is_between(lo, hi))
        if accs is not None and "account_id" in out.columns:
            out = out.filter(pl.col("account_id").cast(pl.String).is_in(accs))
        return out

    parts: list[pl.DataFrame] = []

    def add(
        frame: pl.DataFrame, kind: str, time: str, summary: pl.Expr, sym: pl.Expr | None = None
    ) -> None:
        if frame.height == 0:
            return
        parts.append(
            frame.select(
                *head,
                pl.lit(kind).alias("event_type"),
                (
                    pl.col("account_id").cast(pl.String)
                    if "account_id" in frame.columns
                    else pl.lit(None, pl.String)
                ).alias("account_id"),
                (sym if sym is not None else pl.lit(None, pl.String)).alias("symbol"),
                pl.col(time).alias("occurred_at"),
                summary.alias("summary"),
            )
        )

    def text(*pieces: pl.Expr | str) -> pl.Expr:
        return pl.concat_str(
            [p if isinstance(p, pl.Expr) else pl.lit(p) for p in pieces], ignore_nulls=True
        )

    def num(col: str) -> pl.Expr:
        return pl.col(col).map_elements(f, return_dtype=pl.String)

    trades = window(history.trades, "executed_at")
    if syms is not None:
        trades = trades.filter(pl.col("symbol").cast(pl.String).is_in(syms))
    add(
        trades,
        "TradeExecuted",
        "executed_at",
        text(
            pl.col("side").cast(pl.String),
            " ",
            num("quantity"),
            " ",
            pl.col("symbol").cast(pl.String),
            " @ ",
            num("price"),
            " (",
            pl.col("trade_id"),
            ")",
        ),
        pl.col("symbol").cast(pl.String),
    )
    add(
        window(history.cancels, "cancelled_at"),
        "TradeCancelled",
        "cancelled_at",
        text("bust of ", pl.col("trade_id"), ": ", pl.col("reason")),
    )
    add(
        window(history.adjustments, "updated_at"),
        "PositionUpdated",
        "updated_at",
        text(
            pl.col("symbol").cast(pl.String),
            " ",
            num("previous_quantity"),
            " → ",
            num("new_quantity"),
            " (",
            pl.col("reason"),
            ")",
        ),
        pl.col("symbol").cast(pl.String),
    )
    add(
        window(history.funding, "funded_at"),
        "AccountFunded",
        "funded_at",
        text("funding ", num("amount")),
    )
    add(
        window(history.limits, "set_at"),
        "LimitSet",
        "set_at",
        text(
            pl.col("limit_type").cast(pl.String),
            " ",
            pl.col("symbol").cast(pl.String).fill_null("(account)"),
            " = ",
            num("value"),
            " by ",
            pl.col("set_by").cast(pl.String),
        ),
        pl.col("symbol").cast(pl.String),
    )
    add(
        window(history.violations, "detected_at"),
        "LimitViolationDetected",
        "detected_at",
        text(
            pl.col("limit_type").cast(pl.String),
            " ",
            pl.col("symbol").cast(pl.String).fill_null(""),
            " ",
            num("current_value"),
            " > ",
            num("limit_value"),
        ),
        pl.col("symbol").cast(pl.String),
    )
    blocks = window(history.blocks, "at")
    if blocks.height:
        for flag, kind, word in (
            (True, "AccountBlocked", "blocked"),
            (False, "AccountUnblocked", "unblocked"),
        ):
            add(
                blocks.filter(pl.col("blocked") == flag),
                kind,
                "at",
                text(word, " by ", pl.col("by").cast(pl.String), ": ", pl.col("reason")),
            )
    marks = history.marks.filter(pl.col("marked_at").is_between(lo, hi))
    if syms is not None:
        marks = marks.filter(pl.col("symbol").cast(pl.String).is_in(syms))
    others = sum(p.height for p in parts)
    budget = max(0, max_rows - others)
    if marks.height > budget:
        marks = marks.gather_every(math.ceil(marks.height / budget)) if budget else marks.clear()
    add(
        marks,
        "PriceMarked",
        "marked_at",
        text(pl.col("symbol").cast(pl.String), " marked ", num("price")),
        pl.col("symbol").cast(pl.String),
    )
    schema: dict[str, pl.DataType] = {
        "event_id": pl.String(),
        "timestamp": pl.Datetime("us", "UTC"),
        "position": pl.Int64(),
        "causation_id": pl.String(),
        "correlation_id": pl.String(),
        "event_type": pl.String(),
        "account_id": pl.String(),
        "symbol": pl.String(),
        "occurred_at": pl.Datetime("us", "UTC"),
        "summary": pl.String(),
    }
    if not parts:
        return pl.DataFrame(schema=schema).with_columns(pl.lit(None, pl.String).alias("lane"))
    out = (
        pl.concat([p.cast(schema) for p in parts])  # type: ignore[arg-type]
        .sort("position")
        .with_columns(pl.col("event_type").replace_strict(_LANE_OF, default="other").alias("lane"))
    )
    if out.height > max_rows:
        protected = pl.col("lane").is_in(["limit", "violation", "block"]) | pl.col(
            "event_id"
        ).is_in(list(keep))
        fixed = out.filter(protected)
        rest = out.filter(~protected)
        room = max(0, max_rows - fixed.height)
        rest = rest.gather_every(math.ceil(rest.height / room)) if room else rest.clear()
        out = pl.concat([fixed, rest]).sort("position")
    return out.select(
        "event_id",
        "event_type",
        "lane",
        "account_id",
        "symbol",
        "occurred_at",
        "timestamp",
        "position",
        "causation_id",
        "correlation_id",
        "summary",
    )


def _span(times: pl.Series) -> str:
    if times.len() == 0:
        return "no events"
    lo, hi = times.min(), times.max()
    assert isinstance(lo, datetime) and isinstance(hi, datetime)
    if lo.date() == hi.date():
        return f"{lo:%a %Y-%m-%d %H:%M} to {hi:%H:%M} UTC"
    return f"{lo:%Y-%m-%d %H:%M} to {hi:%Y-%m-%d %H:%M} UTC"


def event_chart(
    events: pl.DataFrame,
    *,
    focus: str | None = None,
    cursor: TimeLike = None,
    title: str | None = None,
) -> alt.TopLevelMixin:
    """The events around an incident: one lane per kind, causation links, late recordings.

    Parameters
    ----------
    events : rows of :func:`event_lanes`.
    focus : the event_id to ring (the violation or block being looked at).
    cursor : where to draw the time rule (the step being looked at).
    title : the chart's title.

    Each event is a point at its business time in its lane; a grey line joins an
    event to its cause (``causation_id``) when both are in the frame; an event the
    store recorded more than a second after it happened gets an orange line from its
    business time to its recorded time (late trades, busts learnt later).
    """
    when = as_time(cursor, "cursor")
    frame = _frame(events, "events").with_columns(
        ((pl.col("timestamp") - pl.col("occurred_at")).dt.total_milliseconds() / 1000).alias(
            "latency_s"
        ),
        (pl.col("event_id") == (focus or "")).alias("focus"),
    )
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
    x = _x()
    layers: list[alt.Chart] = []
    late = data.filter(pl.col("latency_s") > 1.0)
    if late.height:
        layers.append(
            alt.Chart(late)
            .mark_rule(color="#ff7f0e", strokeWidth=2, opacity=0.7)
            .encode(x=x, x2="recorded:T", y=y, tooltip=tips)
        )
    if link_rows.height:
        layers.append(
            alt.Chart(plot_frame(link_rows))
            .mark_line(color="#555", strokeWidth=1.2, opacity=0.8)
            .encode(x=x, y=y, detail="link:N")
        )
    zoom = alt.selection_interval(encodings=["x"], bind="scales")
    layers.append(
        alt.Chart(data)
        .mark_point(filled=True, size=60, opacity=0.85)
        .encode(x=x, y=y, color=color, shape=alt.Shape("event_type:N", legend=None), tooltip=tips)
        .add_params(zoom)
    )
    focused = data.filter(pl.col("focus"))
    if focused.height:
        layers.append(
            alt.Chart(focused).mark_point(size=420, strokeWidth=2.5, color="black").encode(x=x, y=y)
        )
        layers.append(
            alt.Chart(focused)
            .mark_text(align="left", dx=14, dy=-12, fontSize=11, fontWeight="bold")
            .encode(x=x, y=y, text="summary:N")
        )
    param, rule = _cursor(when)
    layers.append(rule)
    return (
        alt.layer(*layers)
        .add_params(param)
        .properties(
            width=_WIDTH,
            height=alt.Step(34),
            title=_title(
                title or "Events around the incident",
                f"{_span(frame['occurred_at'])}; lines: causation links; orange: recorded"
                " later than it happened",
            ),
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
    y = alt.Y("label:N", title=None, sort=None, axis=alt.Axis(labelLimit=460))
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

    Three panels over the same wall-clock axis, the last ``window`` before ``end``
    (default: the latest commit; a shorter run fills the axis): events processed per
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
        scale=alt.Scale(type="utc", domain=domain),
        axis=alt.Axis(format=_AXIS_TIME, labels=False, ticks=False),
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
        .sort("t")
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
        .sort("committed_at")
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
    return alt.vconcat(rate, marks, latency, spacing=6).properties(
        title=_title(
            "Live processor",
            f"the last {window.total_seconds():,.0f} s: events processed per second; violations"
            " and blocks as committed; each micro-batch from read to commit (red: it had effects)",
        )
    )
