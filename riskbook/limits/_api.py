"""Breaches, backtests, reconciliation and the audit trail of limits (the public functions)."""

from __future__ import annotations

import functools
import math
import numbers
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import polars as pl

from riskbook._memory import with_large_arrays
from riskbook.errors import RiskbookError
from riskbook.events import LimitSet, as_time, format_time, parse_time
from riskbook.frames import History
from riskbook.limits._builtin import shared_timelines
from riskbook.limits._evaluate import _levels, _limit_frame, _metric_rows, evaluate
from riskbook.limits._registry import get, names
from riskbook.projections import _check_history as _whole_enough

__all__ = [
    "BREACH_COLUMNS",
    "backtest",
    "breaches",
    "effective_limits",
    "hypothetical_limits",
    "limit_history",
    "metric_at",
    "reconcile",
    "stored_limits",
]

TimeLike = datetime | str | None
Limits = pl.DataFrame | LimitSet | Mapping[str, Any] | Iterable[LimitSet | Mapping[str, Any]]

_TIME = pl.Datetime("us", "UTC")
_CAT = pl.Categorical()

BREACH_COLUMNS = (
    "account_id",
    "limit_type",
    "symbol",
    "level",
    "started_at",
    "ended_at",
    "peak_value",
    "limit_value",
    "trigger_event_id",
    "trigger_value",
    "trigger_recorded_at",
    "ended_by_event_id",
    "limit_value_at_end",
    "set_by",
    "limit_event_id",
)
"""The columns of :func:`breaches`, in order."""

_SCENARIO = pl.Enum(["actual", "hypothetical"])


_time = as_time


def _check_history(
    history: History,
    what: str | None = None,
    *,
    kinds: Iterable[str] = (),
    limits_only: bool = False,
    avoid: str | None = None,
) -> None:
    """A History, whole enough for ``what`` (a function's name; None: any History).

    Breaches fold every earlier event against the limits then in force: a History
    loaded with ``since`` has lost the state before it and the LimitSets set before it,
    and would give no breaches or false ones with no error (``limits_only``: ``what``
    reads only the LimitSets, which it lost too). A limit type per account (one of
    ``kinds``, the limit types ``what`` evaluates, whose scope has no symbol) needs
    every symbol of the account, which a ``symbols`` filter leaves out; ``avoid`` says
    how else to call ``what`` (default: with the limit types per symbol of ``kinds``
    only, ``types=``). ``until``, ``known_at`` and ``accounts`` keep everything the
    breaches need, and so does a History going on from a projection state
    (``history.start``: the live engine's batches).
    """
    _whole_enough(history, what, limits_only=limits_only)  # a History; no since
    f = history.filters
    if what is None or history.start is not None or f.symbols is None:
        return
    registered = set(names())
    chosen = sorted({k for k in kinds if k in registered})
    wide = [k for k in chosen if "symbol" not in get(k).scope]
    if wide:
        per_symbol = [k for k in chosen if k not in wide]
        if avoid is None:
            avoid = (
                f"or pass types={per_symbol}, its limit types per symbol"
                if per_symbol
                else "or pass types= naming limit types per symbol only"
            )
        raise RiskbookError(
            f"{what} evaluates limits per account ({', '.join(wide)}), which need every "
            f"symbol of an account: this History was loaded with symbols={list(f.symbols)};"
            f" load it without symbols ({avoid})"
        )


def _known(frame: pl.DataFrame, known_at: datetime | None) -> pl.DataFrame:
    return frame if known_at is None else frame.filter(pl.col("timestamp") <= known_at)


def _by(frame: pl.DataFrame, column: str, at: datetime | None) -> pl.DataFrame:
    """The rows that happened by ``at`` (business time ``column`` <= at)."""
    return frame if at is None else frame.filter(pl.col(column) <= at)


# ----------------------------------------------------------------------------- limit rows


def stored_limits(
    history: History, *, at: TimeLike = None, known_at: TimeLike = None
) -> pl.DataFrame:
    """The stored LimitSet events (set by ``at``, recorded by ``known_at``) as limit rows.

    Columns: ``limit_type`` and those of :data:`~riskbook.limits.LIMIT_ROWS_SCHEMA`
    (account_id, symbol, value, set_by, set_at, timestamp, position, event_id), in
    global order.
    """
    _check_history(history)
    lim = _by(_known(history.limits, _time(known_at, "known_at")), "set_at", _time(at, "at"))
    return pl.concat(
        [lim.select(limit_type=pl.col("limit_type").cast(pl.String)), _limit_frame(lim)],
        how="horizontal",
    )


def hypothetical_limits(limits: Limits) -> pl.DataFrame:
    """Limits that were never stored, as limit rows (what ``limits=`` accepts).

    ``limits`` is a frame (polars; or pandas, if it is installed), one
    :class:`~riskbook.LimitSet` event or mapping, or an iterable of them, with the
    columns (keys)

    ==========  ===============================================================
    account_id  the account, or ``"*"`` for every account (an account's own row
                wins over ``"*"`` from the same time)
    limit_type  a registered limit type's name
    value       the limit (a number >= 0)
    symbol      optional: for a per-symbol limit type, this symbol only
    set_at      optional: the business time it applies from (null: from the start),
                a datetime with a time zone or RFC 3339 text
    set_by      optional: who (default ``"backtest"``)
    ==========  ===============================================================

    and no others, but for those of the envelope that ``history.limits`` and
    :func:`effective_limits` carry beside them (``timestamp``, ``position``,
    ``event_id``, ...): their frames can be given back as they are, and those columns
    are ignored. A column or key that is none of these (a typo: ``symbl``) is refused,
    as is a value of the wrong type, naming the record (from 0) and its key.

    A limit applies from its ``set_at`` until the next limit of the same (account,
    limit_type, symbol), exactly as a stored LimitSet does.

    Examples
    --------
    >>> hypothetical_limits([{"account_id": "*", "limit_type": "MaxLeverage", "value": 2.5}]
    ...     ).select("account_id", "limit_type", "value", "set_by", "set_at")
    shape: (1, 5)
    ┌────────────┬─────────────┬───────┬──────────┬───────────────────┐
    │ account_id ┆ limit_type  ┆ value ┆ set_by   ┆ set_at            │
    │ ---        ┆ ---         ┆ ---   ┆ ---      ┆ ---               │
    │ str        ┆ str         ┆ f64   ┆ str      ┆ datetime[μs, UTC] │
    ╞════════════╪═════════════╪═══════╪══════════╪═══════════════════╡
    │ *          ┆ MaxLeverage ┆ 2.5   ┆ backtest ┆ null              │
    └────────────┴─────────────┴───────┴──────────┴───────────────────┘
    """
    frame = _limits_frame(limits)
    frame = frame.with_columns(
        (pl.col("set_by") if "set_by" in frame.columns else pl.lit(None, pl.String))
        .cast(pl.String)
        .fill_null("backtest")
        .alias("set_by")
    ).drop(*_ignored_columns(), strict=False)
    rows = pl.concat(
        [frame.select(pl.col("limit_type").cast(pl.String)), _limit_frame(frame)],
        how="horizontal",
    )
    bad = rows.filter(
        pl.col("value").is_null() | ~pl.col("value").is_finite() | (pl.col("value") < 0)
    )
    if bad.height:
        raise ValueError(f"limit values must be finite and >= 0: {bad.row(0, named=True)}")
    if rows["account_id"].null_count():
        raise ValueError("every hypothetical limit needs an account_id (or '*')")
    if rows["limit_type"].null_count():
        raise ValueError("every hypothetical limit needs a limit_type")
    for name in rows["limit_type"].unique().to_list():
        scope = get(name).scope  # KeyError for a type that is not registered
        if "symbol" not in scope:
            with_symbol = rows.filter(
                (pl.col("limit_type") == name) & pl.col("symbol").is_not_null()
            )
            if with_symbol.height:
                raise ValueError(
                    f"{name} is a limit per account (scope {scope}): a symbol does not apply"
                    f" ({with_symbol.row(0, named=True)})"
                )
    return rows


_TEXT_KEYS = ("account_id", "limit_type", "symbol", "set_by")
_LIMIT_KEYS = ("account_id", "limit_type", "value", "symbol", "set_at", "set_by")
"""The columns (keys) of a hypothetical limit."""
_NEEDED_KEYS = ("account_id", "limit_type", "value")
_OPTIONAL_KEYS = ("symbol", "set_at", "set_by")
_LIMIT_KEY_SCHEMA = pl.Schema(
    {
        "account_id": pl.String(),
        "limit_type": pl.String(),
        "value": pl.Float64(),
        "symbol": pl.String(),
        "set_at": _TIME,
        "set_by": pl.String(),
    }
)


@functools.cache
def _ignored_columns() -> tuple[str, ...]:
    """The envelope columns of ``history.limits`` (a superset of those of
    :func:`effective_limits`): given back with a frame of limits, and ignored."""
    return tuple(c for c in History.empty().limits.columns if c not in _LIMIT_KEYS)


def _accepted() -> str:
    return ", ".join(_LIMIT_KEYS) + f" (and {', '.join(_ignored_columns())}, ignored)"


def _limits_frame(limits: Any) -> pl.DataFrame:
    """What :func:`hypothetical_limits` is given, as a frame of its columns: each
    checked and typed (set_at in UTC), the envelope columns still there."""
    if isinstance(limits, pl.LazyFrame):
        limits = limits.collect()
    elif _is_pandas_frame(limits):
        # pandas' missing value in a column read from a sheet is NaN (a float column
        # for an empty optional one): it is a missing value here too
        limits = pl.from_pandas(limits, nan_to_null=True)
        limits = limits.with_columns(
            pl.col(c).cast(_LIMIT_KEY_SCHEMA[c])
            for c in _OPTIONAL_KEYS
            if c in limits.columns and limits[c].null_count() == limits.height
        )
    if isinstance(limits, pl.DataFrame):
        return _checked_frame(limits)
    if isinstance(limits, LimitSet | Mapping):  # one limit
        limits = [limits]
    elif isinstance(limits, str | bytes) or not isinstance(limits, Iterable):
        raise TypeError(
            "limits must be a frame, a LimitSet event or mapping, or an iterable of them,"
            f" got {type(limits).__name__}"
        )
    columns: dict[str, list[Any]] = {c: [] for c in _LIMIT_KEY_SCHEMA}
    for i, item in enumerate(limits):
        if isinstance(item, LimitSet):
            record = _checked_record(i, {c: getattr(item, c) for c in _LIMIT_KEYS})
        elif isinstance(item, Mapping):
            record = _checked_record(i, item)
        else:
            raise TypeError(
                "limits must be a frame, LimitSet events or mappings; limit "
                f"{i} is a {type(item).__name__}"
            )
        for c, values in columns.items():
            values.append(record.get(c))
    return pl.DataFrame(columns, schema=_LIMIT_KEY_SCHEMA)


def _is_missing(value: Any) -> bool:
    """A missing value as pandas writes one (NaN, NaT, NA) in an optional key."""
    if isinstance(value, float):
        return value != value
    pandas = sys.modules.get("pandas")
    return pandas is not None and (value is pandas.NaT or value is pandas.NA)


def _is_pandas_frame(limits: Any) -> bool:
    pandas = sys.modules.get("pandas")  # not imported: it cannot be a pandas frame
    return pandas is not None and isinstance(limits, pandas.DataFrame)


def _checked_record(i: int, item: Mapping[Any, Any]) -> dict[str, Any]:
    """One mapping as a record of :data:`_LIMIT_KEY_SCHEMA`'s Python values, or a
    ValueError naming it (``i``) and the key."""
    unknown = [k for k in item if k not in _LIMIT_KEYS and k not in _ignored_columns()]
    if unknown:
        raise ValueError(
            f"hypothetical limit {i}: unknown key(s) {', '.join(map(repr, unknown))}"
            f" (the keys are {_accepted()})"
        )
    missing = [k for k in _NEEDED_KEYS if k not in item]
    if missing:
        raise ValueError(
            f"hypothetical limit {i} lacks the key(s) {', '.join(map(repr, missing))}"
            f" (it has {', '.join(map(repr, item))})"
        )
    record: dict[str, Any] = {}
    for key in _LIMIT_KEYS:
        value = item.get(key)
        if value is None or (key in _OPTIONAL_KEYS and _is_missing(value)):
            record[key] = None
        elif key in _TEXT_KEYS:
            if not isinstance(value, str):
                raise ValueError(
                    f"hypothetical limit {i}: {key!r} must be a string, got "
                    f"{type(value).__name__} {value!r}"
                )
            record[key] = value
        elif key == "value":
            if isinstance(value, bool) or not isinstance(value, numbers.Real | Decimal):
                raise ValueError(
                    f"hypothetical limit {i}: 'value' must be a number, got "
                    f"{type(value).__name__} {value!r}"
                )
            record[key] = float(value)
        else:  # set_at
            try:
                record[key] = as_time(value, "set_at")
            except (TypeError, ValueError) as exc:
                raise ValueError(f"hypothetical limit {i}: {exc}") from None
    return record


def _checked_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """A frame of limits with its columns checked and typed (set_at in UTC)."""
    unknown = [c for c in frame.columns if c not in _LIMIT_KEYS and c not in _ignored_columns()]
    if unknown:
        raise ValueError(
            f"hypothetical limits: unknown column(s) {', '.join(map(repr, unknown))}"
            f" (the columns are {_accepted()})"
        )
    for need in _NEEDED_KEYS:
        if need not in frame.columns:
            raise ValueError(
                f"hypothetical limits need a {need!r} column (they have {frame.columns})"
            )
    schema = frame.schema
    for c in _TEXT_KEYS:
        dtype = schema.get(c)
        if dtype is not None and not (
            dtype in (pl.String, pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum)
        ):
            raise ValueError(f"hypothetical limits: column {c!r} is {dtype}, expected String")
    if not (schema["value"].is_numeric() or schema["value"] == pl.Null):
        raise ValueError(
            f"hypothetical limits: column 'value' is {schema['value']}, expected a number"
        )
    frame = frame.with_columns(
        pl.col(c).cast(pl.String) for c in _TEXT_KEYS if c in frame.columns
    ).with_columns(pl.col("value").cast(pl.Float64))
    set_at = schema.get("set_at")
    if set_at == pl.String:
        times = []
        for i, text in enumerate(frame["set_at"].to_list()):
            try:
                times.append(None if text is None else parse_time(text))
            except ValueError as exc:
                raise ValueError(f"hypothetical limit {i}: set_at: {exc}") from None
        frame = frame.with_columns(pl.Series("set_at", times, dtype=_TIME))
    elif isinstance(set_at, pl.Datetime):
        if set_at.time_zone is None and frame["set_at"].null_count() < frame.height:
            # as every other time parameter: a naive time in a notebook is local time
            # to its writer, and read as UTC it would move the limit by the offset
            raise ValueError("set_at has no time zone: give UTC explicitly")
        frame = frame.with_columns(
            pl.col("set_at").dt.convert_time_zone("UTC")
            if set_at.time_zone is not None
            else pl.col("set_at").cast(_TIME)
        )
    elif set_at is not None and set_at not in (pl.Date, pl.Null):
        raise ValueError(
            f"hypothetical limits: column 'set_at' is {set_at}, expected Datetime(UTC)"
        )
    return frame


# ----------------------------------------------------------------------------- breaches


def _latest_event(history: History, known_at: datetime | None) -> datetime | None:
    """The latest business time of the events known by ``known_at``, busts left out
    (see :func:`_horizon`)."""
    events = _known(history.events, known_at)
    return events.select(
        pl.col("occurred_at").filter(pl.col("event_type") != "TradeCancelled").max()
    ).item()


def _horizon(
    history: History, rows: pl.DataFrame, at: datetime | None, latest: datetime | None
) -> datetime | None:
    """The end of what is known: ``at``; else the ``until`` a History was loaded with (it
    holds every event that happened by then: its breaches are those at ``at=until``,
    a daily breach ended at a midnight before it even when no event of the History came
    after that midnight); else the latest business time of the events known
    (``latest``: :func:`_latest_event`) or of the limits (a hypothetical one can be set
    after the last event, and a stored one scheduled: :func:`breaches` applies it at
    its set_at).

    A bust's cancelled_at is no such time: a bust acts as soon as it is known, whatever
    its cancelled_at (DESIGN.md §4), and a History loaded with ``until`` keeps every
    bust, later ones too. Counted, a bust booked the next day (or after ``until``) would
    end the day's open daily breaches at a midnight nothing else reached.
    """
    if at is not None:
        return at
    found = [t for t in (latest, rows["set_at"].max()) if isinstance(t, datetime)]
    if not found:
        return None
    until = history.filters.until
    return max(found) if until is None else until


class _UnregisteredTypes(UserWarning):
    """Limits of limit types with no registered definition were skipped (``names``)."""

    def __init__(self, message: str, names: Sequence[str]) -> None:
        super().__init__(message)
        self.names = tuple(names)


_PACKAGE = os.path.dirname(os.path.dirname(__file__)) + os.sep  # riskbook/, as code names it


def _caller_level() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function
    point at the first frame outside riskbook: the user's call, however many riskbook
    functions and wrappers (:func:`~riskbook._memory.with_large_arrays`) are between."""
    level = 1
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level


def _evaluate_scenarios(
    history: History,
    scenarios: dict[str, pl.DataFrame],
    *,
    at: datetime | None,
    known_at: datetime | None,
    levels: Sequence[float],
) -> dict[str, pl.DataFrame]:
    """Breaches of each scenario's limit rows; each limit type's metric computed once."""
    wanted = sorted(
        {n for rows in scenarios.values() for n in rows["limit_type"].unique().to_list()}
    )
    registered = set(names())
    unknown = [n for n in wanted if n not in registered]
    if unknown:
        warnings.warn(
            _UnregisteredTypes(
                f"limits of unregistered limit types are not evaluated: {', '.join(unknown)} "
                "(register their definitions with riskbook.limits.register)",
                unknown,
            ),
            stacklevel=_caller_level(),
        )
    found: dict[str, list[pl.DataFrame]] = {s: [] for s in scenarios}
    latest = _latest_event(history, known_at) if at is None else None
    horizons = {s: _horizon(history, rows, at, latest) for s, rows in scenarios.items()}
    events = None
    with shared_timelines():
        for name in (n for n in wanted if n in registered):
            definition = get(name)
            metric = definition.metric(history, known_at=known_at)
            for scenario, rows in scenarios.items():
                mine = rows.filter(pl.col("limit_type") == name)
                horizon = horizons[scenario]
                if mine.height == 0 or horizon is None:  # no limit, or an empty history
                    continue
                intervals, _ = evaluate(
                    definition, metric, mine.drop("limit_type"), levels=levels, through=horizon
                )
                found[scenario].append(intervals)
            del metric
    out = {}
    for scenario, parts in found.items():
        frame = pl.concat(parts) if parts else pl.DataFrame(schema=_empty_schema())
        if frame["trigger_event_id"].null_count() > frame["trigger_position"].null_count() or (
            frame["ended_by_event_id"].null_count() > frame["ended_by_position"].null_count()
        ):
            if events is None:
                events = history.events.select("position", "event_id")
            frame = _fill_event_ids(frame, events)
        out[scenario] = in_breach_order(frame)
    return out


def in_breach_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Breach rows as :func:`breaches` returns them: its columns, sorted by start, then
    account, limit type, symbol and level."""
    return frame.sort(
        "started_at",
        pl.col("account_id").cast(pl.String),
        pl.col("limit_type").cast(pl.String),
        pl.col("symbol").cast(pl.String),
        "level",
        nulls_last=False,
    ).select(BREACH_COLUMNS)


def _empty_schema() -> dict[str, pl.DataType]:
    from riskbook.limits._evaluate import BREACH_SCHEMA

    return {**BREACH_SCHEMA, "carried": pl.Boolean()}


def _fill_event_ids(frame: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """Event ids of triggers and ends from their positions (metrics without event_id)."""
    # the few events wanted, found first (a join would hash every event of the history)
    wanted = pl.concat([frame["trigger_position"], frame["ended_by_position"]]).drop_nulls()
    events = events.filter(pl.col("position").is_in(wanted.unique().implode()))
    for id_col, pos_col in (("trigger_event_id", "trigger_position"),
                            ("ended_by_event_id", "ended_by_position")):  # fmt: skip
        lookup = events.rename({"position": pos_col, "event_id": "_id"})
        frame = (
            frame.join(lookup, on=pos_col, how="left", maintain_order="left")
            .with_columns(pl.coalesce(id_col, "_id").alias(id_col))
            .drop("_id")
        )
    return frame


@with_large_arrays
def breaches(
    history: History,
    *,
    limits: Limits | None = None,
    at: TimeLike = None,
    known_at: TimeLike = None,
    levels: Sequence[float] | float = (0.8, 0.9, 1.0),
    types: Iterable[str] | None = None,
) -> pl.DataFrame:
    """Breach intervals of every limit (DESIGN.md §5), at T as known at K.

    A metric is in breach at level x while metric > x * limit (strictly). An interval
    starts at the business time of the event that took the metric over (or of the
    LimitSet that lowered the limit under it) and ends at the first event after which
    it is back within (or the LimitSet that raised the limit over it). A daily-volume
    breach ends at 00:00 UTC after its day, or earlier if the limit is raised. A limit
    change that leaves the metric in breach does not split the interval: it goes on,
    ``limit_value`` is the limit in force when it started and ``limit_value_at_end`` the
    one in force when it ended (or now, if it is open).

    Parameters
    ----------
    history : the History.
    limits : None: the stored LimitSet events. Otherwise hypothetical limits that
        replace them (see :func:`hypothetical_limits`): only those are evaluated.
    at : business time T: events that happened by T; breaches still open at T have a
        null ``ended_at``. None: everything, and breaches still open at the latest
        business time known are open (a daily one whose day has not ended then, too).
    known_at : recorded time K: only events recorded by K (and busts known by K).
    levels : fractions of the limit (0.8 = a warning at 80%); one row per interval and
        level.
    types : evaluate only these limit types (default: every one that has a limit).
        Limits of types with no registered definition are skipped with a warning.

    Returns
    -------
    pl.DataFrame
        One row per interval, sorted by ``started_at``: ``account_id, limit_type,
        symbol`` (null for account-wide types), ``level, started_at, ended_at`` (null:
        still open), ``peak_value`` (the metric's largest value in the interval),
        ``limit_value`` (in force at the start), ``trigger_event_id`` (the event that
        took the metric over, or the LimitSet), ``trigger_value`` (the metric then),
        ``trigger_recorded_at`` (when the store learned the trigger),
        ``ended_by_event_id`` (null when open or ended by the end of a day),
        ``limit_value_at_end``, ``set_by`` and ``limit_event_id`` (who set the limit in
        force at the start, and its LimitSet; null for a hypothetical limit).

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> history = riskbook.History.from_events  # each event recorded when it happened
    >>> def fill(side, quantity, minute):
    ...     return riskbook.TradeExecuted(trade_id=str(uuid.uuid4()), account_id="ACC-1",
    ...         symbol="ACME", side=riskbook.Side(side), quantity=quantity, price=10.0,
    ...         executed_at=t + timedelta(minutes=minute))
    >>> h = history(riskbook.LimitSet(account_id="ACC-1", limit_type="MaxPositionSize",
    ...         value=100.0, set_by="cro", set_at=t),
    ...     fill("Buy", 85.0, 1), fill("Buy", 30.0, 2), fill("Sell", 50.0, 3))
    >>> breaches(h).select("level", "started_at", "ended_at", "peak_value", "limit_value")
    shape: (3, 5)
    ┌───────┬─────────────────────────┬─────────────────────────┬────────────┬─────────────┐
    │ level ┆ started_at              ┆ ended_at                ┆ peak_value ┆ limit_value │
    │ ---   ┆ ---                     ┆ ---                     ┆ ---        ┆ ---         │
    │ f64   ┆ datetime[μs, UTC]       ┆ datetime[μs, UTC]       ┆ f64        ┆ f64         │
    ╞═══════╪═════════════════════════╪═════════════════════════╪════════════╪═════════════╡
    │ 0.8   ┆ 2024-03-01 14:31:00 UTC ┆ 2024-03-01 14:33:00 UTC ┆ 115.0      ┆ 100.0       │
    │ 0.9   ┆ 2024-03-01 14:32:00 UTC ┆ 2024-03-01 14:33:00 UTC ┆ 115.0      ┆ 100.0       │
    │ 1.0   ┆ 2024-03-01 14:32:00 UTC ┆ 2024-03-01 14:33:00 UTC ┆ 115.0      ┆ 100.0       │
    └───────┴─────────────────────────┴─────────────────────────┴────────────┴─────────────┘
    """
    _check_history(history, "breaches")
    t = _time(at, "at")
    k = _time(known_at, "known_at")
    rows = stored_limits(history, known_at=k) if limits is None else hypothetical_limits(limits)
    if types is not None:
        chosen = [types] if isinstance(types, str) else list(types)  # one name, or several
        for name in chosen:
            get(name)
        rows = rows.filter(pl.col("limit_type").is_in(chosen))
    _check_history(history, "breaches", kinds=rows["limit_type"].unique().to_list())
    return _evaluate_scenarios(history, {"run": rows}, at=t, known_at=k, levels=_levels(levels))[
        "run"
    ]


@with_large_arrays
def backtest(
    history: History,
    limits: Limits,
    *,
    at: TimeLike = None,
    known_at: TimeLike = None,
    levels: Sequence[float] | float = (0.8, 0.9, 1.0),
) -> pl.DataFrame:
    """Breaches hypothetical limits would have produced, beside the actual limits' ones.

    ``limits`` (see :func:`hypothetical_limits`) are evaluated over the stored history
    in place of the stored limits; the stored limits of the same limit types are
    evaluated too, with the same code and the same metric timelines. A new limit type
    must be registered first (:func:`riskbook.limits.register`).

    Returns
    -------
    pl.DataFrame
        :func:`breaches`' columns after ``scenario`` (``"actual"`` or
        ``"hypothetical"``).

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> events = [riskbook.LimitSet(account_id="ACC-1", limit_type="MaxPositionSize",
    ...     value=100.0, set_by="cro", set_at=t)] + [riskbook.TradeExecuted(trade_id=f"T-{i}",
    ...     account_id="ACC-1", symbol="ACME", side=riskbook.Side.Buy, quantity=60.0,
    ...     price=10.0, executed_at=t + timedelta(minutes=i)) for i in (1, 2)]
    >>> h = riskbook.History.from_envelopes(riskbook.Envelope(uuid.uuid4(), e.aggregate_id,
    ...     e.aggregate_type, 1, e.business_time, e, "doc") for e in events)
    >>> what_if = [{"account_id": "*", "limit_type": "MaxPositionSize", "value": 50.0}]
    >>> backtest(h, what_if, levels=1.0).select("scenario", "started_at", "limit_value")
    shape: (2, 3)
    ┌──────────────┬─────────────────────────┬─────────────┐
    │ scenario     ┆ started_at              ┆ limit_value │
    │ ---          ┆ ---                     ┆ ---         │
    │ enum         ┆ datetime[μs, UTC]       ┆ f64         │
    ╞══════════════╪═════════════════════════╪═════════════╡
    │ actual       ┆ 2024-03-01 14:32:00 UTC ┆ 100.0       │
    │ hypothetical ┆ 2024-03-01 14:31:00 UTC ┆ 50.0        │
    └──────────────┴─────────────────────────┴─────────────┘
    """
    _check_history(history, "backtest")
    t = _time(at, "at")
    k = _time(known_at, "known_at")
    hyp = hypothetical_limits(limits)
    kinds = hyp["limit_type"].unique().to_list()
    _check_history(
        history, "backtest", kinds=kinds, avoid="or backtest limit types per symbol only"
    )
    actual = stored_limits(history, known_at=k).filter(pl.col("limit_type").is_in(kinds))
    found = _evaluate_scenarios(
        history, {"actual": actual, "hypothetical": hyp}, at=t, known_at=k, levels=_levels(levels)
    )
    return pl.concat(
        [f.select(pl.lit(s, _SCENARIO).alias("scenario"), pl.all()) for s, f in found.items()]
    )


# ----------------------------------------------------------------------------- audit


def limit_history(
    history: History, *, at: TimeLike = None, known_at: TimeLike = None
) -> pl.DataFrame:
    """Every limit change, in the order they take effect: the audit trail of limits.

    The changes that apply by T (``set_at <= at``; None: all) recorded by K
    (``known_at``; None: all): the audit trail cut at T is the whole one's first rows.

    Returns ``account_id, limit_type, symbol, old_value`` (the value the previous
    LimitSet of the same account, limit type and symbol set; null for the first),
    ``new_value, set_by, set_at`` (business time: when it applies from),
    ``timestamp`` (recorded time: when the store learned it), ``event_id, position``,
    sorted by (set_at, timestamp, position). A symbol-specific limit overrides the
    account-wide one of its type for that symbol; its first row's ``old_value`` is null.

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> events = [riskbook.LimitSet(account_id="ACC-1", limit_type="MaxLeverage", value=v,
    ...     set_by=who, set_at=t + timedelta(days=d)) for d, v, who in [(0, 3.0, "ops"),
    ...     (1, 4.0, "cro")]]
    >>> h = riskbook.History.from_envelopes(riskbook.Envelope(uuid.uuid4(), e.aggregate_id,
    ...     e.aggregate_type, 1, e.business_time, e, "doc") for e in events)
    >>> limit_history(h).select("limit_type", "old_value", "new_value", "set_by")
    shape: (2, 4)
    ┌─────────────┬───────────┬───────────┬────────┐
    │ limit_type  ┆ old_value ┆ new_value ┆ set_by │
    │ ---         ┆ ---       ┆ ---       ┆ ---    │
    │ cat         ┆ f64       ┆ f64       ┆ cat    │
    ╞═════════════╪═══════════╪═══════════╪════════╡
    │ MaxLeverage ┆ null      ┆ 3.0       ┆ ops    │
    │ MaxLeverage ┆ 3.0       ┆ 4.0       ┆ cro    │
    └─────────────┴───────────┴───────────┴────────┘
    """
    _check_history(history, "limit_history", limits_only=True)
    lim = _by(_known(history.limits, _time(known_at, "known_at")), "set_at", _time(at, "at"))
    return lim.sort("set_at", "timestamp", "position").select(
        "account_id",
        "limit_type",
        "symbol",
        pl.col("value").shift(1).over("account_id", "limit_type", "symbol").alias("old_value"),
        pl.col("value").alias("new_value"),
        "set_by",
        "set_at",
        "timestamp",
        "event_id",
        "position",
    )


def effective_limits(
    history: History, *, at: TimeLike = None, known_at: TimeLike = None
) -> pl.DataFrame:
    """The limit in force of every (account, limit type, symbol) at T as known at K.

    One row per scope that has a LimitSet with ``set_at <= at`` recorded by
    ``known_at``: the latest one (by set_at, then recorded time, then position) --
    ``account_id, limit_type, symbol, value, set_by, set_at, timestamp, event_id``.
    A row with a symbol overrides the account-wide row of the same limit type for that
    symbol; a scope with no row has no limit.

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> events = [riskbook.LimitSet(account_id="ACC-1", limit_type="MaxPositionSize",
    ...     value=v, set_by="cro", symbol=s, set_at=t + timedelta(days=d))
    ...     for d, v, s in [(0, 1000.0, None), (1, 2000.0, None), (1, 50.0, "ACME")]]
    >>> h = riskbook.History.from_envelopes(riskbook.Envelope(uuid.uuid4(), e.aggregate_id,
    ...     e.aggregate_type, 1, e.business_time, e, "doc") for e in events)
    >>> effective_limits(h, at=t).select("limit_type", "symbol", "value")
    shape: (1, 3)
    ┌─────────────────┬────────┬────────┐
    │ limit_type      ┆ symbol ┆ value  │
    │ ---             ┆ ---    ┆ ---    │
    │ cat             ┆ cat    ┆ f64    │
    ╞═════════════════╪════════╪════════╡
    │ MaxPositionSize ┆ null   ┆ 1000.0 │
    └─────────────────┴────────┴────────┘
    >>> effective_limits(h).select("limit_type", "symbol", "value")
    shape: (2, 3)
    ┌─────────────────┬────────┬────────┐
    │ limit_type      ┆ symbol ┆ value  │
    │ ---             ┆ ---    ┆ ---    │
    │ cat             ┆ cat    ┆ f64    │
    ╞═════════════════╪════════╪════════╡
    │ MaxPositionSize ┆ null   ┆ 2000.0 │
    │ MaxPositionSize ┆ ACME   ┆ 50.0   │
    └─────────────────┴────────┴────────┘
    """
    _check_history(history, "effective_limits", limits_only=True)
    lim = _by(_known(history.limits, _time(known_at, "known_at")), "set_at", _time(at, "at"))
    return (
        lim.sort("set_at", "timestamp", "position")
        .unique(["account_id", "limit_type", "symbol"], keep="last", maintain_order=True)
        .sort(
            pl.col("account_id").cast(pl.String),
            pl.col("limit_type").cast(pl.String),
            pl.col("symbol").cast(pl.String),
            nulls_last=False,
        )
        .select(
            "account_id",
            "limit_type",
            "symbol",
            "value",
            "set_by",
            "set_at",
            "timestamp",
            "event_id",
        )
    )


# ----------------------------------------------------------------------------- reconcile

_STATUS = pl.Enum(["matched", "not_reported", "no_breach"])


@with_large_arrays
def reconcile(
    history: History,
    *,
    at: TimeLike = None,
    known_at: TimeLike = None,
    tolerance: timedelta = timedelta(minutes=1),
) -> pl.DataFrame:
    """Recorded LimitViolationDetected events against the breaches recomputed now.

    The recomputed breaches are those of :func:`breaches` at level 1.0 at ``at`` as
    known at ``known_at`` (default: everything, busts applied -- the corrected
    history); the reports are the LimitViolationDetected events recorded by
    ``known_at`` with ``detected_at <= at`` (their business time). So at T both sides
    are what had happened by T: the breaches that started by T (open if they ended
    after T) and the reports made by T. A
    report and a breach **match** when they have the same account, limit type and
    symbol (for a limit type per symbol) and either the report's ``causation_id`` is
    the breach's trigger event, or (for reports without a matching cause) its
    ``detected_at`` is within ``tolerance`` (a timedelta >= 0; default one minute) of
    the breach's start (nearest first), or
    else its ``detected_at`` is inside the breach (``started_at <= detected_at <
    ended_at``): the recomputed breach began earlier than the engine saw it, as when a
    trigger recorded late moved its start (the earliest such report). Each breach and
    report is matched once.

    Returns
    -------
    pl.DataFrame
        One row per breach and per report: ``status`` -- ``matched``,
        ``not_reported`` (a breach the engine never reported) or ``no_breach`` (a
        report with no breach of its own in the recomputed history) -- and ``reason``
        (for ``matched``: how -- by cause, by the time from the start, or "the
        recomputed breach began ... before the report", with its trigger's delay if it
        was recorded late -- and whether the engine's limit differs from the one in
        force; for ``no_breach``: the trigger was busted, is unknown, the limit the
        engine used differs from the one in force, the report is a second one inside a
        breach already matched, or the metric recomputed at ``detected_at`` and the
        limit then; for ``not_reported``: whether the trigger was recorded late), then
        ``account_id, limit_type, symbol, started_at, ended_at,
        trigger_event_id, peak_value, limit_value`` of the breach and
        ``violation_event_id, detected_at, reported_value, reported_limit,
        causation_id`` of the report (null where there is none), sorted by time.

    Examples
    --------
    >>> import riskbook  # doctest: +SKIP
    >>> rec = reconcile(riskbook.load())  # doctest: +SKIP
    >>> rec.filter(pl.col("status") != "matched").select("status", "reason")  # doctest: +SKIP
    """
    if not isinstance(tolerance, timedelta):  # as every window in riskbook: no bare seconds
        raise TypeError(
            f"tolerance must be a timedelta, got {type(tolerance).__name__} {tolerance!r}"
        )
    if tolerance < timedelta(0):  # it would match no report by time, silently
        raise ValueError(f"tolerance must be >= 0, got {tolerance.total_seconds():g} s")
    _check_history(history, "reconcile")
    t = _time(at, "at")
    k = _time(known_at, "known_at")
    kinds = {
        kind
        for frame in (history.limits, history.violations)
        for kind in _known(frame, k)["limit_type"].cast(pl.String).unique().to_list()
    }
    _check_history(
        history,
        "reconcile",
        kinds=kinds,
        avoid="breaches(types=...) naming limit types per symbol gives the breaches of this one",
    )
    found = breaches(history, at=t, known_at=k, levels=1.0)
    reports = _by(_known(history.violations, k), "detected_at", t).select(
        pl.col("account_id").cast(pl.String),
        pl.col("limit_type").cast(pl.String),
        pl.col("symbol").cast(pl.String),
        "current_value",
        "limit_value",
        "detected_at",
        "event_id",
        "causation_id",
    )
    found_rows = found.select(
        pl.col("account_id", "limit_type", "symbol").cast(pl.String),
        "started_at", "ended_at", "trigger_event_id", "trigger_recorded_at", "peak_value",
        "limit_value",
    ).to_dicts()  # fmt: skip
    report_rows = reports.to_dicts()
    matched: list[tuple[int, int, str]] = []
    used_b: set[int] = set()
    used_r: set[int] = set()
    registered = set(names())
    per_symbol = {
        kind: kind not in registered or "symbol" in get(kind).scope
        for kind in {row["limit_type"] for row in (*found_rows, *report_rows)}
    }

    def scope(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        kind = row["limit_type"]
        return row["account_id"], kind, row["symbol"] if per_symbol[kind] else None

    def match(bi: int, ri: int, why: str) -> None:
        b, r = found_rows[bi], report_rows[ri]
        if not math.isclose(b["limit_value"], r["limit_value"], rel_tol=1e-12):
            why += (
                f"; the engine's limit {r['limit_value']:g} differs from the limit in force "
                f"{b['limit_value']:g}"
            )
        used_b.add(bi)
        used_r.add(ri)
        matched.append((bi, ri, why))

    by_trigger = {(scope(b), b["trigger_event_id"]): i for i, b in enumerate(found_rows)}
    caused: dict[int, int] = {}  # report -> the breach its cause triggered
    for ri, r in enumerate(report_rows):
        bi = by_trigger.get((scope(r), r["causation_id"]))
        if r["causation_id"] is not None and bi is not None:
            caused[ri] = bi
            if bi not in used_b:
                match(bi, ri, "the report's cause is the breach's trigger")
    # a report whose cause triggered a breach matched already is a second report of
    # that breach: it is not matched to another one by its time
    candidates = sorted(
        (abs(r["detected_at"] - b["started_at"]), bi, ri)
        for ri, r in enumerate(report_rows)
        if ri not in used_r and ri not in caused
        for bi, b in enumerate(found_rows)
        if bi not in used_b
        and scope(b) == scope(r)
        and abs(r["detected_at"] - b["started_at"]) <= tolerance
    )
    for gap, bi, ri in candidates:
        if bi not in used_b and ri not in used_r:
            match(bi, ri, f"detected {gap.total_seconds():g} s from the start")
    # a report made inside a breach that began earlier than the engine saw it (a late
    # trigger moved its start): the earliest such report is that breach's
    by_scope: dict[tuple[Any, Any, Any], list[int]] = {}
    for bi, b in enumerate(found_rows):
        by_scope.setdefault(scope(b), []).append(bi)
    inside: dict[int, int] = {}  # report -> the breach it was made in
    for ri in sorted(
        (ri for ri in range(len(report_rows)) if ri not in used_r),
        key=lambda ri: report_rows[ri]["detected_at"],
    ):
        r = report_rows[ri]
        if ri in caused:
            inside[ri] = caused[ri]
            continue
        for bi in by_scope.get(scope(r), []):
            b = found_rows[bi]
            if b["started_at"] <= r["detected_at"] and (
                b["ended_at"] is None or r["detected_at"] < b["ended_at"]
            ):
                if bi in used_b:
                    inside[ri] = bi
                else:
                    match(bi, ri, _began_earlier(b, r, tolerance))
                break
    pairs: list[tuple[int | None, int | None, str]] = list(matched)
    unmatched = [ri for ri in range(len(report_rows)) if ri not in used_r]
    wanted = {report_rows[ri]["causation_id"] for ri in unmatched} - {None}
    causes, known = _causes(history, wanted, k)
    metrics: dict[str, pl.DataFrame] = {}
    first_report = {bi: ri for bi, ri, _ in matched}  # a breach -> the report matched to it
    for ri in unmatched:
        if ri in inside:
            b = found_rows[inside[ri]]
            other = report_rows[first_report[inside[ri]]]["event_id"]
            why = (
                f"a second report of the recomputed breach that began "
                f"{format_time(b['started_at'])}, matched to report {other}: recomputed, "
                "the breach did not end in between"
            )
        else:
            why = _no_breach_reason(history, report_rows[ri], causes, known, k, metrics)
        pairs.append((None, ri, why))
    for bi, b in enumerate(found_rows):
        if bi not in used_b:
            recorded = b["trigger_recorded_at"]
            late = None if recorded is None else recorded - b["started_at"]
            why = "no LimitViolationDetected for this breach"
            if late is not None and late > tolerance:
                why += f"; its trigger was recorded {late} after it happened"
            pairs.append((bi, None, why))
    out = []
    for b_i, r_i, why in pairs:
        b = found_rows[b_i] if b_i is not None else {}
        r = report_rows[r_i] if r_i is not None else {}
        status = "matched" if b and r else ("not_reported" if b else "no_breach")
        first = b or r
        out.append(
            {
                "status": status,
                "reason": why,
                "account_id": first["account_id"],
                "limit_type": first["limit_type"],
                "symbol": first["symbol"],
                "started_at": b.get("started_at"),
                "ended_at": b.get("ended_at"),
                "trigger_event_id": b.get("trigger_event_id"),
                "peak_value": b.get("peak_value"),
                "limit_value": b.get("limit_value"),
                "violation_event_id": r.get("event_id"),
                "detected_at": r.get("detected_at"),
                "reported_value": r.get("current_value"),
                "reported_limit": r.get("limit_value"),
                "causation_id": r.get("causation_id"),
            }
        )
    schema = {
        "status": _STATUS,
        "reason": pl.String(),
        "account_id": _CAT,
        "limit_type": _CAT,
        "symbol": _CAT,
        "started_at": _TIME,
        "ended_at": _TIME,
        "trigger_event_id": pl.String(),
        "peak_value": pl.Float64(),
        "limit_value": pl.Float64(),
        "violation_event_id": pl.String(),
        "detected_at": _TIME,
        "reported_value": pl.Float64(),
        "reported_limit": pl.Float64(),
        "causation_id": pl.String(),
    }
    frame = pl.DataFrame(out, schema=schema, orient="row") if out else pl.DataFrame(schema=schema)
    return frame.sort(pl.coalesce("started_at", "detected_at"), "status", nulls_last=False)


def _causes(
    history: History, wanted: set[str], known_at: datetime | None
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Of these causation ids: the known trades they are (with their bust, if any), and
    which are known events at all."""
    ids = pl.Series(sorted(wanted), dtype=pl.String).implode()
    trades = (
        _known(history.trades, known_at)
        .filter(pl.col("event_id").is_in(ids))
        .select("event_id", pl.col("account_id").cast(pl.String), "trade_id")
    )
    cancels = (
        _known(history.cancels, known_at)
        .group_by(pl.col("account_id").cast(pl.String), "trade_id")
        .agg(
            pl.col("timestamp").min().alias("busted_at"),
            pl.col("event_id").first().alias("bust_id"),
        )
    )
    joined = trades.join(cancels, on=["account_id", "trade_id"], how="left")
    events = _known(history.events, known_at).filter(pl.col("event_id").is_in(ids))
    return {r["event_id"]: r for r in joined.to_dicts()}, set(events["event_id"].to_list())


def _no_breach_reason(
    history: History,
    report: Mapping[str, Any],
    causes: Mapping[str, Mapping[str, Any]],
    known: set[str],
    known_at: datetime | None,
    metrics: dict[str, pl.DataFrame],
) -> str:
    """Why a report matched no recomputed breach; the metric at its time, if nothing
    else explains it."""
    cause = report["causation_id"]
    if report["limit_type"] not in names():
        return f"limit type {report['limit_type']} is not registered: not recomputed"
    if cause is not None:
        trade = causes.get(cause)
        if trade is not None and trade["busted_at"] is not None:
            return (
                f"trigger busted: trade {trade['trade_id']} was cancelled "
                f"(recorded {trade['busted_at'].isoformat()}, event {trade['bust_id']})"
            )
        if trade is None and cause not in known:
            return f"trigger {cause} is not in the history (as known)"
    from riskbook.audit import limit_in_force  # (audit builds on this module)

    per_symbol = "symbol" in get(report["limit_type"]).scope
    applied = limit_in_force(  # the account's own or one set for every account ("*")
        history.limits,
        account=report["account_id"],
        limit_type=report["limit_type"],
        symbol=report["symbol"] if per_symbol else None,
        at=report["detected_at"],
        known_at=known_at,
    )
    if applied is None:
        return "no limit was in force at the time of the report"
    in_force = applied["value"]
    if not math.isclose(in_force, report["limit_value"], rel_tol=1e-12):
        return (
            f"no breach recomputed; the engine's limit {report['limit_value']:g} differs "
            f"from the limit in force {in_force:g}"
        )
    name = report["limit_type"]
    if name not in metrics:  # each type's timeline once per reconcile
        with shared_timelines():
            metrics[name] = get(name).metric(history, known_at=known_at)
    value = metric_at(
        history, name, account=report["account_id"], symbol=report["symbol"],
        at=report["detected_at"], known_at=known_at, metric=metrics[name],
    )  # fmt: skip
    if value is None or math.isnan(value):
        return "no breach recomputed: the metric had no value at the time of the report"
    if value > in_force:
        return (
            f"no breach recomputed, yet the metric was {value:g} at the report, over the "
            f"limit in force {in_force:g}"
        )
    return (
        f"no breach recomputed near the report: the metric was {value:g} then, within the "
        f"limit {in_force:g} (the engine reported {report['current_value']:g})"
    )


def _began_earlier(
    breach: Mapping[str, Any], report: Mapping[str, Any], tolerance: timedelta
) -> str:
    """Why a report made inside a breach is that breach's: it began earlier."""
    why = f"the recomputed breach began {report['detected_at'] - breach['started_at']} before the report"
    recorded = breach["trigger_recorded_at"]
    late = None if recorded is None else recorded - breach["started_at"]
    if late is not None and late > tolerance:
        why += f" (a late trigger, recorded {late} after it happened)"
    return why + ": the report was made inside it"


def metric_at(
    history: History,
    limit_type: str,
    *,
    account: str,
    symbol: str | None = None,
    at: datetime | str,
    known_at: TimeLike = None,
    metric: pl.DataFrame | None = None,
) -> float | None:
    """A registered limit type's metric for one account (and symbol) at T as known at K.

    The last row at or before ``at`` of the type's metric timeline
    (``get(limit_type).metric(history, known_at=known_at)``, as :func:`breaches`
    evaluates it), in business order; for a ``*_day`` scope, 0 when that row is from an
    earlier UTC day (the metric starts again at midnight).

    Parameters
    ----------
    at : business time T (a datetime with a zone, or RFC 3339 text).
    known_at : recorded time K (likewise); None: everything recorded.
    metric : the metric timeline as known at ``known_at``, when it is already computed.

    Returns
    -------
    float | None
        The value, or None when it is not available: the type is not registered, it is
        per symbol and no symbol is given, or the key has no metric row (or a NaN) by
        then.
    """
    t = _time(at, "at")
    if t is None:
        raise TypeError("metric_at needs at: the business time of the value")
    k = _time(known_at, "known_at")
    try:
        definition = get(limit_type)
    except KeyError:
        return None
    per_symbol = "symbol" in definition.scope
    if per_symbol and symbol is None:
        return None
    if metric is None:
        with shared_timelines():
            metric = definition.metric(history, known_at=k)
    rows = _metric_rows(metric, definition, per_symbol)[0]  # checked, in business order
    mine = rows.filter((pl.col("account_id").cast(pl.String) == account) & (pl.col("time") <= t))
    if per_symbol:
        mine = mine.filter(pl.col("symbol").cast(pl.String) == symbol)
    if mine.height == 0:
        return None
    last = mine.row(-1, named=True)
    if definition.scope.endswith("_day") and last["time"].date() != t.date():  # t in UTC
        return 0.0  # a new UTC day: the metric started again from zero
    value = last["value"]
    return None if value is None or math.isnan(value) else float(value)
