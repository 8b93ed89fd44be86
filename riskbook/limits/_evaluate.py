"""Step (3) of the breach pipeline: metric rows + limit rows -> breach intervals, with state.

:func:`evaluate` is the one implementation of the breach rules; :func:`riskbook.breaches`
calls it once over the whole history with an empty state, and the live processor calls it
on each micro-batch with the state the previous batch returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from riskbook.limits._registry import SCOPES, LimitDefinition, get

__all__ = [
    "BREACH_SCHEMA",
    "LIMIT_ROWS_SCHEMA",
    "BreachState",
    "evaluate",
]

_TIME = pl.Datetime("us", "UTC")
_CAT = pl.Categorical()
_MIN = np.iinfo(np.int64).min
_MAX = np.iinfo(np.int64).max
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_DAY = -(1 << 62)

LIMIT_ROWS_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "symbol": pl.String(),
    "value": pl.Float64(),
    "set_by": pl.String(),
    "set_at": _TIME,
    "timestamp": _TIME,
    "position": pl.Int64(),
    "event_id": pl.String(),
}
"""Limit rows (LimitSet events, stored or hypothetical) as :func:`evaluate` takes them.

``account_id`` ``"*"`` means every account; ``symbol`` null means account-wide; a null
``set_at`` means "from the start"; hypothetical rows have null ``timestamp``,
``position`` and ``event_id``.
"""

BREACH_SCHEMA: dict[str, pl.DataType] = {
    "account_id": _CAT,
    "limit_type": _CAT,
    "symbol": _CAT,
    "level": pl.Float64(),
    "started_at": _TIME,
    "ended_at": _TIME,
    "peak_value": pl.Float64(),
    "limit_value": pl.Float64(),
    "trigger_event_id": pl.String(),
    "trigger_value": pl.Float64(),
    "trigger_recorded_at": _TIME,
    "trigger_position": pl.Int64(),
    "ended_by_event_id": pl.String(),
    "ended_by_position": pl.Int64(),
    "limit_value_at_end": pl.Float64(),
    "set_by": _CAT,
    "limit_event_id": pl.String(),
}
"""Columns of a breach interval (see :func:`riskbook.breaches`)."""

_OPEN_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "symbol": pl.String(),
    "level": pl.Float64(),
    "started_at": _TIME,
    "trigger_event_id": pl.String(),
    "trigger_value": pl.Float64(),
    "trigger_recorded_at": _TIME,
    "trigger_position": pl.Int64(),
    "peak_value": pl.Float64(),
    "limit_value": pl.Float64(),
    "set_by": pl.String(),
    "limit_event_id": pl.String(),
}

_METRICS_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "symbol": pl.String(),
    "value": pl.Float64(),
    "time": _TIME,
    "day": pl.Int64(),
}


@dataclass(frozen=True)
class BreachState:
    """Where the breach fold of one limit type stands after some rows.

    Attributes
    ----------
    limit_type, scope, levels : what it is the state of.
    limits : the last limit row (:data:`LIMIT_ROWS_SCHEMA`) of every (account_id,
        symbol) seen so far, ``"*"`` and account-wide rows included: the limits in
        force, from which the next batch starts.
    metrics : per key (account_id, symbol; symbol null for account scopes): the last
        metric ``value``, its business ``time`` and, for day scopes, its UTC ``day``
        (days since the epoch).
    open : the breaches open at the end, one row per (key, level), with how each
        started (time, trigger event, value, limit in force, who set it) and its peak.
    through : the horizon the batch was evaluated through (business time), or None.
    """

    limit_type: str
    scope: str
    levels: tuple[float, ...]
    limits: pl.DataFrame
    metrics: pl.DataFrame
    open: pl.DataFrame
    through: datetime | None = None

    @classmethod
    def empty(cls, definition: LimitDefinition | str, levels: Sequence[float]) -> BreachState:
        """The state before anything: no limits, no metric, nothing open."""
        d = get(definition) if isinstance(definition, str) else definition
        return cls(
            d.name,
            d.scope,
            _levels(levels),
            pl.DataFrame(schema=LIMIT_ROWS_SCHEMA),
            pl.DataFrame(schema=_METRICS_SCHEMA),
            pl.DataFrame(schema=_OPEN_SCHEMA),
        )


def _levels(levels: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(x) for x in levels)
    if not out or not all(np.isfinite(x) and x > 0 for x in out):
        raise ValueError(f"levels must be positive fractions of the limit, got {levels!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"levels must be distinct, got {levels!r}")
    return out


def _us(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def _times(values: np.ndarray) -> pl.Series:
    return pl.Series(values, dtype=pl.Int64).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def _epoch(frame: pl.DataFrame, column: str, fill: int) -> np.ndarray:
    """Microseconds since the epoch of a UTC ``Datetime("us")`` column; nulls as ``fill``."""
    s = frame[column]
    if s.null_count():
        s = s.dt.epoch("us").fill_null(fill)
    return s.to_physical().to_numpy()


# ----------------------------------------------------------------------------- inputs


def _metric_rows(
    metric: pl.DataFrame, definition: LimitDefinition, by_symbol: bool
) -> pl.DataFrame:
    """The metric frame checked, typed and in business order."""
    need = ["account_id", "time", "timestamp", "position", "value"] + (
        ["symbol"] if by_symbol else []
    )
    missing = [c for c in need if c not in metric.columns]
    if missing:
        raise ValueError(
            f"the metric of limit type {definition.name} lacks the column(s) {', '.join(missing)}"
            f" (it has {', '.join(metric.columns)})"
        )
    cols: list[Any] = [
        pl.col("account_id").cast(_CAT),
        (pl.col("symbol").cast(_CAT) if by_symbol else pl.lit(None, _CAT)).alias("symbol"),
        pl.col("time").cast(_TIME),
        pl.col("timestamp").cast(_TIME),
        pl.col("position").cast(pl.Int64),
        pl.col("value").cast(pl.Float64),
        (
            pl.col("event_id").cast(pl.String)
            if "event_id" in metric.columns
            else pl.lit(None, pl.String)
        ).alias("event_id"),
    ]
    out = metric.select(cols)
    if out["value"].null_count():
        out = out.with_columns(pl.col("value").fill_null(float("nan")))
    if out.height > 1:
        from riskbook.limits._kernel import in_order

        bt, ts = _epoch(out, "time", 0), _epoch(out, "timestamp", 0)
        if not in_order(bt, ts, out["position"].fill_null(0).to_numpy()):
            out = out.sort("time", "timestamp", "position", maintain_order=True)
    return out


def _dense(frame: pl.DataFrame, by_symbol: bool) -> tuple[np.ndarray, np.ndarray]:
    """Dense key per row of (account_id, symbol if ``by_symbol``), in order of first
    appearance; and the first row of each key."""
    if frame.height == 0:
        return np.empty(0, np.int32), np.empty(0, np.int64)
    from riskbook.limits._kernel import dense_keys

    acct = frame["account_id"].to_physical().to_numpy()
    sym = (
        frame["symbol"].to_physical().cast(pl.Int64).fill_null(-1).to_numpy() + 1
        if by_symbol
        else np.empty(0, np.int64)
    )
    width = int(sym.max()) + 1 if by_symbol else 1
    size = (int(acct.max()) + 1) * width
    if size <= 1 << 24:
        keys, first = dense_keys(acct.astype(np.int64, copy=False), sym, width, size)
        return keys, first
    combined = acct.astype(np.int64) * width + (sym if by_symbol else 0)
    _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
    return inverse.astype(np.int32), first.astype(np.int64)


def _order_limits(rows: pl.DataFrame) -> pl.DataFrame:
    """Limit rows in the order they take effect; "*" rows before explicit ones on ties."""
    return (
        rows.with_row_index("_row")
        .with_columns(_explicit=pl.col("account_id") != "*")
        .sort(
            pl.col("set_at").dt.epoch("us").fill_null(_MIN),
            pl.col("timestamp").dt.epoch("us").fill_null(_MIN),
            "_explicit",
            pl.col("position").fill_null(_MIN),
            "_row",
        )
    )


def _targets(
    rows: pl.DataFrame, keys: pl.DataFrame, accounts: pl.DataFrame, by_symbol: bool
) -> pl.DataFrame:
    """Ordered limit rows with the account index and key index (-1: account-wide) they set.

    ``"*"`` rows are expanded to every account; rows of accounts or keys not in the
    tables are dropped (they change nothing this batch), and so are rows with a symbol
    for a limit type whose scope has none.
    """
    ordered = _order_limits(rows)
    if not by_symbol:
        ordered = ordered.filter(pl.col("symbol").is_null())
    star = ordered.filter(pl.col("account_id") == "*").drop("account_id")
    expanded = pl.concat(
        [
            ordered.filter(pl.col("account_id") != "*"),
            star.join(accounts.select("account_id"), how="cross").select(ordered.columns),
        ]
    )
    # Back in effect order: the cross join lost it.
    expanded = expanded.join(
        ordered.select("_row").with_row_index("_rank"), on="_row", how="left"
    ).sort("_rank", "account_id")
    out = expanded.join(accounts, on="account_id", how="inner", maintain_order="left")
    general = out.filter(pl.col("symbol").is_null()).with_columns(_key=pl.lit(-1, pl.Int64))
    specific = out.filter(pl.col("symbol").is_not_null()).join(
        keys.select("account_id", "symbol", _key="_key"),
        on=["account_id", "symbol"],
        how="inner",
    )
    return pl.concat([general, specific.select(general.columns)]).sort("_rank", "account_id")


def _limit_frame(limits: pl.DataFrame) -> pl.DataFrame:
    """Limit rows with :data:`LIMIT_ROWS_SCHEMA` (missing optional columns are null)."""
    for need in ("account_id", "value"):
        if need not in limits.columns:
            raise ValueError(f"limit rows need the column {need!r} (they have {limits.columns})")
    return limits.select(
        [
            (pl.col(c) if c in limits.columns else pl.lit(None))
            .cast(pl.String if t == pl.String() else t)
            .alias(c)
            for c, t in LIMIT_ROWS_SCHEMA.items()
        ]
    )


def _pick(frame: pl.DataFrame, idx: np.ndarray, mask: np.ndarray, **cols: str) -> pl.DataFrame:
    """``frame``'s columns at rows ``idx`` where ``mask``, null elsewhere."""
    where = pl.Series(np.where(mask, idx, 0), dtype=pl.Int64)
    if frame.height == 0:
        return pl.DataFrame({o: pl.Series([None] * len(idx), dtype=frame.schema[c])
                             for o, c in cols.items()})  # fmt: skip
    got = frame.select([pl.col(c).gather(where).alias(o) for o, c in cols.items()])
    hide = pl.Series(~mask)
    return got.select([pl.when(hide).then(None).otherwise(pl.col(o)).alias(o) for o in cols])


def _intervals(
    name: str,
    levels: tuple[float, ...],
    r: dict[str, np.ndarray],
    rows: pl.DataFrame,
    keys: pl.DataFrame,
    table: pl.DataFrame,
    carried_open: pl.DataFrame,
) -> pl.DataFrame:
    """The kernel's interval records as a frame of :data:`BREACH_SCHEMA` (+ ``carried``)."""
    skind, sidx, ekind, eidx = r["skind"], r["sidx"], r["ekind"], r["eidx"]
    ev = {"event_id": "event_id", "recorded": "timestamp", "position": "position"}
    starts = [
        _pick(rows, sidx, skind == 0, **ev),
        _pick(table, sidx, skind == 1, **ev),
        _pick(carried_open, sidx, skind == 2, event_id="trigger_event_id",
              recorded="trigger_recorded_at", position="trigger_position"),
    ]  # fmt: skip
    ends = [_pick(rows, eidx, ekind == 0, **ev), _pick(table, eidx, ekind == 1, **ev)]
    set_from_table = (skind != 2) & (r["slsrc"] >= 0)
    setters = [
        _pick(table, r["slsrc"], set_from_table, set_by="set_by", limit_event_id="event_id"),
        _pick(carried_open, sidx, skind == 2, set_by="set_by", limit_event_id="limit_event_id"),
    ]
    key = pl.Series(r["key"], dtype=pl.Int64)

    def first(frames: list[pl.DataFrame], column: str) -> pl.Expr:
        return pl.coalesce([f[column] for f in frames]).alias(column)

    out = pl.DataFrame(
        {
            "account_id": keys["account_id"].gather(key),
            "symbol": keys["symbol"].gather(key),
            "level": np.asarray(levels, np.float64)[r["lvl"]],
            "started_at": _times(r["sbt"]),
            "ended_at": _times(r["ebt"]),
            "_open": ekind == -1,
            "peak_value": r["peak"],
            "limit_value": r["slim"],
            "trigger_value": r["trig"],
            "limit_value_at_end": r["elim"],
            "carried": skind == 2,
        }
    ).with_columns(
        first(starts, "event_id").alias("trigger_event_id"),
        first(starts, "recorded").alias("trigger_recorded_at"),
        first(starts, "position").alias("trigger_position"),
        first(ends, "event_id").alias("ended_by_event_id"),
        first(ends, "position").alias("ended_by_position"),
        first(setters, "set_by"),
        first(setters, "limit_event_id"),
    )
    return (
        out.with_columns(
            pl.when(pl.col("_open")).then(None).otherwise(pl.col("ended_at")).alias("ended_at"),
            pl.col("limit_value_at_end").fill_nan(None),
            pl.col("account_id", "symbol", "set_by").cast(_CAT),
            limit_type=pl.lit(name, _CAT),
        )
        .sort(
            "started_at",
            pl.col("account_id").cast(pl.String),
            pl.col("symbol").cast(pl.String),
            "level",
            nulls_last=False,
        )
        .select(*BREACH_SCHEMA, "carried")
    )


def _grow(arrays: list[np.ndarray], n: int) -> list[np.ndarray]:
    size = max(2 * arrays[0].shape[0], 1024)
    return [np.concatenate([a[:n], np.empty(size - n, a.dtype)]) for a in arrays]


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    definition: LimitDefinition | str,
    metric: pl.DataFrame,
    limits: pl.DataFrame,
    *,
    levels: Sequence[float] = (0.8, 0.9, 1.0),
    state: BreachState | None = None,
    through: datetime | None = None,
) -> tuple[pl.DataFrame, BreachState]:
    """Fold metric rows and limit rows into breach intervals, from a state to a state.

    Parameters
    ----------
    definition : the limit type (or its registered name).
    metric : metric rows of this batch (see :class:`~riskbook.limits.LimitDefinition`).
    limits : limit rows of this batch (:data:`LIMIT_ROWS_SCHEMA`; ``history.limits`` of
        this type has the right columns).
    levels : fractions of the limit; a breach at level x is metric > x * limit.
    state : where the previous batch left off (None: the beginning). Rows of a key that
        come before what that key already folded raise ``ValueError``.
    through : the business time the batch is complete through: rows after it are left
        out, and daily breaches whose day ended by then are closed at midnight. None:
        everything given, through the latest time among the rows and the state.

    Returns
    -------
    (intervals, state) : one row per breach interval that closed in this batch or is
        open at its end (``ended_at`` null), with :data:`BREACH_SCHEMA` and a boolean
        ``carried`` (it started in an earlier batch); and the state to carry on from.

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> import polars as pl
    >>> from riskbook.limits import evaluate
    >>> t = [datetime(2024, 3, 1, 15, m, tzinfo=timezone.utc) for m in range(4)]
    >>> metric = pl.DataFrame({"account_id": "A", "time": t, "timestamp": t,
    ...     "position": [2, 3, 4, 5], "value": [1.0, 3.0, 4.0, 1.5]})
    >>> limits = pl.DataFrame({"account_id": ["A"], "value": [2.0], "set_by": ["cro"],
    ...     "set_at": [t[0]]})
    >>> first, state = evaluate("MaxLeverage", metric.head(2), limits, levels=[1.0])
    >>> first.select("started_at", "ended_at", "peak_value", "carried")
    shape: (1, 4)
    ┌─────────────────────────┬───────────────────┬────────────┬─────────┐
    │ started_at              ┆ ended_at          ┆ peak_value ┆ carried │
    │ ---                     ┆ ---               ┆ ---        ┆ ---     │
    │ datetime[μs, UTC]       ┆ datetime[μs, UTC] ┆ f64        ┆ bool    │
    ╞═════════════════════════╪═══════════════════╪════════════╪═════════╡
    │ 2024-03-01 15:01:00 UTC ┆ null              ┆ 3.0        ┆ false   │
    └─────────────────────────┴───────────────────┴────────────┴─────────┘
    >>> rest, state = evaluate("MaxLeverage", metric.tail(2), limits.clear(), levels=[1.0],
    ...     state=state)
    >>> rest.select("started_at", "ended_at", "peak_value", "carried")
    shape: (1, 4)
    ┌─────────────────────────┬─────────────────────────┬────────────┬─────────┐
    │ started_at              ┆ ended_at                ┆ peak_value ┆ carried │
    │ ---                     ┆ ---                     ┆ ---        ┆ ---     │
    │ datetime[μs, UTC]       ┆ datetime[μs, UTC]       ┆ f64        ┆ bool    │
    ╞═════════════════════════╪═════════════════════════╪════════════╪═════════╡
    │ 2024-03-01 15:01:00 UTC ┆ 2024-03-01 15:03:00 UTC ┆ 4.0        ┆ true    │
    └─────────────────────────┴─────────────────────────┴────────────┴─────────┘
    """
    d = get(definition) if isinstance(definition, str) else definition
    if d.scope not in SCOPES:
        raise ValueError(f"limit type {d.name}: unknown scope {d.scope!r}")
    lv = _levels(levels)
    if state is None:
        state = BreachState.empty(d, lv)
    elif state.limit_type != d.name or state.levels != lv:
        raise ValueError(
            f"the state is of {state.limit_type} at levels {state.levels}, not {d.name} at {lv}"
        )
    by_symbol = "symbol" in d.scope
    daily = d.scope.endswith("_day")
    rows = _metric_rows(metric, d, by_symbol)
    lim = _limit_frame(limits)
    cut = _MAX if through is None else _us(through)
    if through is not None:
        rows = rows.head(int(np.searchsorted(_epoch(rows, "time", 0), cut, side="right")))
        lim = lim.filter(pl.col("set_at").is_null() | (pl.col("set_at") <= through))

    # Keys: those of the state, then those new in this batch.
    row_key, first = _dense(rows, by_symbol)
    batch_keys = rows.select(
        pl.col("account_id").gather(first).cast(pl.String),
        pl.col("symbol").gather(first).cast(pl.String),
    ).with_columns(_batch=pl.int_range(pl.len(), dtype=pl.Int64))
    old = state.metrics.select("account_id", "symbol")
    keys = (
        pl.concat([old, batch_keys.select("account_id", "symbol")])
        .unique(maintain_order=True)
        .with_columns(_key=pl.int_range(pl.len(), dtype=pl.Int64))
    )
    remap = (
        batch_keys.join(keys, on=["account_id", "symbol"], how="left", nulls_equal=True)
        .sort("_batch")["_key"]
        .to_numpy()
    )
    if (remap == np.arange(remap.shape[0])).all():
        m_key = row_key  # no state, or the state's keys in the same order
    else:
        m_key = remap[row_key].astype(np.int32)
    accounts = (
        keys.select("account_id").unique(maintain_order=True)
        .with_columns(_acct=pl.int_range(pl.len(), dtype=pl.Int64))
    )  # fmt: skip
    key_acct = keys.join(accounts, on="account_id", maintain_order="left")["_acct"].to_numpy()
    n_keys, n_acc, n_lvl = keys.height, accounts.height, len(lv)
    order = np.argsort(key_acct, kind="stable")
    acct_ptr = np.searchsorted(key_acct[order], np.arange(n_acc + 1)).astype(np.int64)
    acct_keys = order.astype(np.int64)

    # State arrays, from the carried state.
    val = np.zeros(n_keys)
    has_val = np.zeros(n_keys, np.bool_)
    day = np.full(n_keys, _NO_DAY, np.int64)
    last_bt = np.full(n_keys, _MIN, np.int64)
    spec_has = np.zeros(n_keys, np.bool_)
    spec_val = np.zeros(n_keys)
    spec_src = np.full(n_keys, -1, np.int64)
    gen_has = np.zeros(n_acc, np.bool_)
    gen_val = np.zeros(n_acc)
    gen_src = np.full(n_acc, -1, np.int64)
    open_ = np.zeros((n_keys, n_lvl), np.bool_)
    s_kind = np.zeros((n_keys, n_lvl), np.int8)
    s_idx = np.zeros((n_keys, n_lvl), np.int64)
    s_bt = np.zeros((n_keys, n_lvl), np.int64)
    peak = np.zeros((n_keys, n_lvl))
    trig = np.zeros((n_keys, n_lvl))
    s_lim = np.zeros((n_keys, n_lvl))
    s_lsrc = np.full((n_keys, n_lvl), -1, np.int64)
    if state.metrics.height:
        k = np.arange(state.metrics.height)  # the state's keys come first, in its order
        val[k] = state.metrics["value"].to_numpy()
        has_val[k] = True
        day[k] = state.metrics["day"].fill_null(_NO_DAY).to_numpy()
        last_bt[k] = _epoch(state.metrics, "time", _MIN)
    carried = state.limits
    if carried.height:
        init = _targets(carried, keys, accounts, by_symbol).unique(
            ["_acct", "_key"], keep="last", maintain_order=True
        )
        gen = init.filter(pl.col("_key") < 0)
        a_idx = gen["_acct"].to_numpy()
        gen_has[a_idx] = True
        gen_val[a_idx] = gen["value"].to_numpy()
        gen_src[a_idx] = gen["_row"].to_numpy()
        spec = init.filter(pl.col("_key") >= 0)
        k_idx = spec["_key"].to_numpy()
        spec_has[k_idx] = True
        spec_val[k_idx] = spec["value"].to_numpy()
        spec_src[k_idx] = spec["_row"].to_numpy()
    if state.open.height:
        op = state.open.join(
            keys, on=["account_id", "symbol"], how="left", nulls_equal=True, maintain_order="left"
        ).with_columns(
            _lvl=pl.col("level").replace_strict(list(lv), list(range(n_lvl)), return_dtype=pl.Int64)
        )
        k_idx, l_idx = op["_key"].to_numpy(), op["_lvl"].to_numpy()
        open_[k_idx, l_idx] = True
        s_kind[k_idx, l_idx] = 2
        s_idx[k_idx, l_idx] = np.arange(op.height)
        s_bt[k_idx, l_idx] = _epoch(op, "started_at", 0)
        peak[k_idx, l_idx] = op["peak_value"].to_numpy()
        trig[k_idx, l_idx] = op["trigger_value"].to_numpy()
        s_lim[k_idx, l_idx] = op["limit_value"].to_numpy()

    # The batch's limit rows, in effect order, with what they set.
    base = carried.height
    targets = _targets(lim, keys, accounts, by_symbol)
    l_acct = targets["_acct"].to_numpy().astype(np.int64)
    l_key = targets["_key"].to_numpy().astype(np.int64)
    l_bt = _epoch(targets, "set_at", _MIN)
    l_ts = _epoch(targets, "timestamp", _MIN)
    l_pos = targets["position"].fill_null(_MIN).to_numpy()
    l_val = targets["value"].to_numpy().astype(np.float64)
    l_src = targets["_row"].to_numpy().astype(np.int64) + base  # row of the limit table

    m_bt = _epoch(rows, "time", 0)
    m_ts = _epoch(rows, "timestamp", 0)
    m_pos = rows["position"].fill_null(0).to_numpy()
    m_val = rows["value"].to_numpy()
    latest = max(
        int(m_bt[-1]) if rows.height else _MIN,
        int(l_bt.max()) if l_bt.shape[0] else _MIN,
        int(last_bt.max()) if n_keys else _MIN,
    )
    horizon = cut if through is not None else latest

    from riskbook.limits._kernel import fold_breaches

    thr = np.asarray(lv, np.float64)
    out_types = (np.int64, np.int64, np.int8, np.int64, np.int64, np.int8, np.int64, np.int64,
                 np.float64, np.float64, np.float64, np.int64, np.float64, np.int64)  # fmt: skip
    outs = [np.empty(max(1024, 4 * n_lvl), t) for t in out_types]
    i = j = n = 0
    while True:
        i, j, n, status = fold_breaches(
            i, j, rows.height, targets.height, True,
            m_key, m_bt, m_ts, m_pos, m_val,
            l_acct, l_key, l_bt, l_ts, l_pos, l_val, l_src,
            key_acct, acct_ptr, acct_keys, thr, daily, horizon,
            val, has_val, day, last_bt,
            spec_has, spec_val, spec_src, gen_has, gen_val, gen_src,
            open_, s_kind, s_idx, s_bt, peak, trig, s_lim, s_lsrc,
            n, *outs,
        )  # fmt: skip
        if status == 0:
            break
        if status == 1:
            outs = _grow(outs, n)
            continue
        where = rows.row(i, named=True) if status == 2 else targets.row(j, named=True)
        raise ValueError(
            f"limit type {d.name}: the row at {where.get('time') or where.get('set_at')} "
            f"(position {where.get('position')}) comes before what its key already folded"
        )

    # Open breaches at the end, with the limit in force now.
    ok, ol = np.nonzero(open_)
    eff_spec = spec_has[ok]
    eff_gen = gen_has[key_acct[ok]]
    now_lim = np.where(eff_spec, spec_val[ok], np.where(eff_gen, gen_val[key_acct[ok]], np.nan))
    now_src = np.where(eff_spec, spec_src[ok], np.where(eff_gen, gen_src[key_acct[ok]], -1))
    records = {
        "key": np.concatenate([outs[0][:n], ok]),
        "lvl": np.concatenate([outs[1][:n], ol]),
        "skind": np.concatenate([outs[2][:n], s_kind[ok, ol]]),
        "sidx": np.concatenate([outs[3][:n], s_idx[ok, ol]]),
        "sbt": np.concatenate([outs[4][:n], s_bt[ok, ol]]),
        "ekind": np.concatenate([outs[5][:n], np.full(ok.shape[0], -1, np.int8)]),
        "eidx": np.concatenate([outs[6][:n], np.full(ok.shape[0], -1, np.int64)]),
        "ebt": np.concatenate([outs[7][:n], np.zeros(ok.shape[0], np.int64)]),
        "peak": np.concatenate([outs[8][:n], peak[ok, ol]]),
        "trig": np.concatenate([outs[9][:n], trig[ok, ol]]),
        "slim": np.concatenate([outs[10][:n], s_lim[ok, ol]]),
        "slsrc": np.concatenate([outs[11][:n], s_lsrc[ok, ol]]),
        "elim": np.concatenate([outs[12][:n], now_lim]),
        "elsrc": np.concatenate([outs[13][:n], now_src]),
    }
    table = pl.concat([carried, lim])
    intervals = _intervals(d.name, lv, records, rows, keys, table, state.open)
    new_limits = (
        _order_limits(pl.concat([carried, lim]))
        .unique(["account_id", "symbol"], keep="last", maintain_order=True)
        .select(list(LIMIT_ROWS_SCHEMA))
    )
    metrics = keys.filter(pl.Series(has_val)).select(
        "account_id",
        "symbol",
        value=pl.Series(val[has_val]),
        time=_times(last_bt[has_val]),
        day=pl.Series(day[has_val], dtype=pl.Int64).replace(_NO_DAY, None)
        if daily
        else pl.lit(None, pl.Int64),
    )
    still_open = intervals.filter(pl.col("ended_at").is_null())
    new_state = BreachState(
        d.name,
        d.scope,
        lv,
        new_limits,
        metrics,
        still_open.select(
            pl.col("account_id", "symbol").cast(pl.String),
            *[c for c in _OPEN_SCHEMA if c not in ("account_id", "symbol", "set_by")],
            pl.col("set_by").cast(pl.String),
        ).select(list(_OPEN_SCHEMA)),
        through
        if through is not None
        else (None if latest == _MIN else _EPOCH + timedelta(microseconds=latest)),
    )
    return intervals, new_state
