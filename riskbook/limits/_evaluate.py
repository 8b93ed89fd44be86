"""Step (3) of the breach pipeline: metric rows + limit rows -> breach intervals, with state.

:func:`evaluate` is the one implementation of the breach rules; :func:`riskbook.breaches`
calls it once over the whole history with an empty state, and the live processor calls it
on each micro-batch with the state the previous batch returned.

A micro-batch is small (a few hundred rows) and the cost of a call is then its fixed
cost: each returned :class:`BreachState` also keeps, privately, what the next call would
otherwise derive again from its frames (the keys and accounts with their indices and
lookups, the per-key arrays of the fold, the carried limits resolved per key and
account, the open breaches as arrays and as intervals), and a call only extends that
for the keys new in its batch. The frames stay the state's meaning: a state made by hand
(or changed with :func:`dataclasses.replace`) is derived from its frames on first use.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import polars as pl

from riskbook._memory import with_large_arrays
from riskbook._time import EPOCH as _EPOCH
from riskbook._time import us as _us
from riskbook.limits._registry import SCOPES, LimitDefinition, get
from riskbook.projections import _epoch_us

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
_NO_DAY = -(1 << 62)
_DAY_US = 86_400_000_000
_DENSE_MAX = 1 << 24  # codes up to this: a lookup table; beyond, a sort

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

    A state returned by :func:`evaluate` also carries, privately, what the next call
    would derive again from these frames (see the module docstring); it is not part of
    its value (equality, repr).
    """

    limit_type: str
    scope: str
    levels: tuple[float, ...]
    limits: pl.DataFrame
    metrics: pl.DataFrame
    open: pl.DataFrame
    through: datetime | None = None
    _derived: _Derived | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(
        cls, definition: LimitDefinition | str, levels: Sequence[float] | float
    ) -> BreachState:
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


@dataclass(slots=True)
class _Derived:
    """What a call derives from a state's frames, kept with the state for the next call.

    Made once (by :func:`evaluate` for the state it returns, or by :func:`_derive` from the
    frames of a state made otherwise) and not changed after, except that the lookups
    (dicts) are filled in on first use. The fold writes to copies of the arrays.
    """

    frames: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]
    """The state's (limits, metrics, open) this was derived from (checked by identity)."""
    by_symbol: bool
    n_lvl: int
    limits: pl.DataFrame
    """The limits in force, in effect order, one row per (account_id, symbol)."""
    keys: pl.DataFrame
    """account_id, symbol (String) of every key, by key index: the metrics' keys."""
    keys_cat: pl.DataFrame
    """The same, Categorical (for the intervals)."""
    accounts: pl.Series
    """account_id (String) by account index, in order of first appearance in ``keys``."""
    key_acct: np.ndarray
    val: np.ndarray
    has_val: np.ndarray
    day: np.ndarray
    last_bt: np.ndarray
    resolved: tuple[np.ndarray, ...] | None
    """The carried limits per key and account (spec_has, spec_val, spec_src, gen_has,
    gen_val, gen_src; src a row of ``limits``), or None: resolve them from ``limits``."""
    open: tuple[np.ndarray, ...]
    """The open breaches per (key, level): open_, s_kind (2), s_idx (row of the state's
    ``open``), s_bt, peak, trig, s_lim, s_lsrc."""
    open_intervals: pl.DataFrame | None
    """The open breaches as the intervals that reported them, while the limit in force
    at their end is still the one the resolved limits give (None: not known)."""
    key_index: dict[tuple[str | None, str | None], int] | None = None
    acct_index: dict[str | None, int] | None = None
    limit_index: dict[tuple[str | None, str | None], int] | None = None
    key_rank: np.ndarray | None = None

    def ranks(self) -> np.ndarray:
        """Each key's rank in the order of the intervals: account_id, then symbol (nulls
        first), as strings."""
        if self.key_rank is None:
            order = (
                self.keys.with_row_index("_key")
                .sort("account_id", "symbol", nulls_last=False)["_key"]
                .to_numpy()
            )
            rank = np.empty(order.shape[0], np.int64)
            rank[order] = np.arange(order.shape[0])
            self.key_rank = rank
        return self.key_rank

    def keys_lookup(self) -> dict[tuple[str | None, str | None], int]:
        if self.key_index is None:
            pairs = zip(
                self.keys["account_id"].to_list(), self.keys["symbol"].to_list(), strict=True
            )
            self.key_index = {k: i for i, k in enumerate(pairs)}
        return self.key_index

    def accounts_lookup(self) -> dict[str | None, int]:
        if self.acct_index is None:
            self.acct_index = {a: i for i, a in enumerate(self.accounts.to_list())}
        return self.acct_index

    def limits_lookup(self) -> dict[tuple[str | None, str | None], int]:
        """(account_id, symbol) -> its row of ``limits`` (the last one, in effect order)."""
        if self.limit_index is None:
            pairs = zip(
                self.limits["account_id"].to_list(), self.limits["symbol"].to_list(), strict=True
            )
            self.limit_index = {k: i for i, k in enumerate(pairs) if k[0] is not None}
        return self.limit_index

    def matches(self, state: BreachState, by_symbol: bool, n_lvl: int) -> bool:
        a, b, c = self.frames
        return (
            a is state.limits and b is state.metrics and c is state.open
            and self.by_symbol == by_symbol and self.n_lvl == n_lvl
        )  # fmt: skip


def _levels(levels: Sequence[float] | float) -> tuple[float, ...]:
    """``levels``: one fraction of the limit or several, as distinct positive floats."""
    if _is_number(levels):
        levels = (levels,)  # type: ignore[assignment]
    elif isinstance(levels, str | bytes) or not isinstance(levels, Iterable):
        # text is iterable: "1.0" would be read as the levels "1", "." and "0"
        raise TypeError(
            "levels must be a number or a sequence of numbers (fractions of the limit), "
            f"got {type(levels).__name__} {levels!r}"
        )
    levels = tuple(levels)  # type: ignore[arg-type]
    for x in levels:
        if not _is_number(x):
            raise TypeError(
                f"levels must be numbers (fractions of the limit), got {type(x).__name__}"
                f" {x!r} in {levels!r}"
            )
    out = tuple(float(x) for x in levels)
    if not out or not all(np.isfinite(x) and x > 0 for x in out):
        raise ValueError(f"levels must be positive fractions of the limit, got {levels!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"levels must be distinct, got {levels!r}")
    return out


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real | Decimal) and not isinstance(x, bool)


def _times(values: np.ndarray) -> pl.Series:
    """Microseconds since the epoch as a UTC ``Datetime("us")`` Series."""
    return pl.Series(values, dtype=pl.Int64).cast(_TIME)


def _ints(s: pl.Series, fill: int) -> np.ndarray:
    return (s.fill_null(fill) if s.null_count() else s).to_numpy()


def _null(dtype: pl.DataType, n: int) -> pl.Series:
    """A Series of ``n`` nulls."""
    return pl.Series([None], dtype=dtype).new_from_index(0, n)


def _idx(a: np.ndarray) -> pl.Series:
    """Row indices as a Series (gathers with it are cheap)."""
    return pl.Series(a.astype(np.uint32) if a.shape[0] else np.empty(0, np.uint32))


def _grow_to(a: np.ndarray, n: int, fill: Any) -> np.ndarray:
    """A copy of ``a`` with rows up to ``n``, the new ones ``fill``."""
    if a.shape[0] == n:
        return a.copy()
    out = np.full((n, *a.shape[1:]), fill, a.dtype)
    out[: a.shape[0]] = a
    return out


# ----------------------------------------------------------------------------- inputs


_METRIC_COLUMNS: dict[str, tuple[pl.DataType, str]] = {
    "account_id": (_CAT, "String"),
    "symbol": (_CAT, "String"),
    "time": (_TIME, "Datetime(UTC)"),
    "timestamp": (_TIME, "Datetime(UTC)"),
    "position": (pl.Int64(), "Int64"),
    "value": (pl.Float64(), "Float64"),
    "event_id": (pl.String(), "String"),
}
"""The metric columns: the type each is read as, and what it is said to expect."""


def _metric_column(metric: pl.DataFrame, column: str, definition: LimitDefinition) -> pl.Series:
    """A metric column checked and cast to its type, or a ValueError naming the limit
    type and the column: text for the account and symbol, a time with a zone for the
    business and recorded times (a naive one is refused, as every time riskbook is
    given), a number for the position and the value."""
    s = metric[column]
    dtype = s.dtype
    target, expected = _METRIC_COLUMNS[column]
    if dtype == pl.Null:
        ok = True
    elif column in ("account_id", "symbol"):
        ok = dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)
    elif column in ("time", "timestamp"):
        ok = isinstance(dtype, pl.Datetime)
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is None and s.null_count() < s.len():
            raise ValueError(
                f"the metric of limit type {definition.name}: column {column!r} has no time"
                " zone: give UTC explicitly (.dt.replace_time_zone('UTC') if it is UTC)"
            )
    elif column == "position":
        ok = dtype.is_integer() or dtype.is_float()
    elif column == "value":
        ok = dtype.is_numeric()
    else:  # event_id: anything that reads as text
        ok = True
    if ok:
        try:
            return s.cast(target).alias(column)
        except pl.exceptions.PolarsError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"the metric of limit type {definition.name}: column {column!r} ({dtype}) does"
                f" not read as {expected}: {first}"
            ) from None
    raise ValueError(
        f"the metric of limit type {definition.name}: column {column!r} is {dtype},"
        f" expected {expected}"
    )


def _metric_rows(
    metric: pl.DataFrame, definition: LimitDefinition, by_symbol: bool
) -> tuple[pl.DataFrame, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The metric frame checked, typed and in business order; and its business time,
    recorded time, position (nulls 0) and value as arrays."""
    if not isinstance(metric, pl.DataFrame):
        raise TypeError(
            f"the metric of limit type {definition.name} returned a "
            f"{type(metric).__module__}.{type(metric).__qualname__}, expected a polars DataFrame"
        )
    need = ["account_id", "time", "timestamp", "position", "value"] + (
        ["symbol"] if by_symbol else []
    )
    missing = [c for c in need if c not in metric.columns]
    if missing:
        raise ValueError(
            f"the metric of limit type {definition.name} lacks the column(s) {', '.join(missing)}"
            f" (it has {', '.join(metric.columns)})"
        )
    n = metric.height
    # Series by Series (cheaper than a select on a small frame).
    out = pl.DataFrame(
        [
            _metric_column(metric, "account_id", definition),
            (
                _metric_column(metric, "symbol", definition)
                if by_symbol
                else _null(_CAT, n).alias("symbol")
            ),
            _metric_column(metric, "time", definition),
            _metric_column(metric, "timestamp", definition),
            _metric_column(metric, "position", definition),
            _metric_column(metric, "value", definition),
            (
                _metric_column(metric, "event_id", definition)
                if "event_id" in metric.columns
                else _null(pl.String(), n).alias("event_id")
            ),
        ]
    )
    # who, when and when recorded: a null is a bug of the metric
    for column in ("account_id", "time", "timestamp"):
        if nulls := out[column].null_count():
            raise ValueError(
                f"the metric of limit type {definition.name} has {nulls:,} row(s) with a null"
                f" {column!r} (a left join, say): every row needs its account, business time"
                " and recorded time"
            )
    if out["value"].null_count():
        out = out.with_columns(pl.col("value").fill_null(float("nan")))
    bt, ts, pos = (
        _epoch_us(out["time"], 0),
        _epoch_us(out["timestamp"], 0),
        _ints(out["position"], 0),
    )
    if out.height > 1:
        from riskbook.limits._kernel import in_order

        if not in_order(bt, ts, pos):
            out = out.sort("time", "timestamp", "position", maintain_order=True)
            bt, ts = _epoch_us(out["time"], 0), _epoch_us(out["timestamp"], 0)
            pos = _ints(out["position"], 0)
    return out, bt, ts, pos, out["value"].to_numpy()


def _dense(frame: pl.DataFrame, by_symbol: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense key per row of (account_id, symbol if ``by_symbol``), in order of first
    appearance; the first row of each key; and the account codes of the rows."""
    if frame.height == 0:
        return np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.int64)
    from riskbook.limits._kernel import dense_keys

    acct = frame["account_id"].to_physical().to_numpy().astype(np.int64, copy=False)
    sym = np.empty(0, np.int64)
    if by_symbol:
        s = frame["symbol"].to_physical()
        codes = (s.cast(pl.Int64).fill_null(-1) if s.null_count() else s).to_numpy()
        sym = codes.astype(np.int64, copy=False) + 1
    width = int(sym.max()) + 1 if by_symbol else 1
    size = (int(acct.max()) + 1) * width
    if size <= _DENSE_MAX:
        keys, first = dense_keys(acct, sym, width, size)
        return keys, first, acct
    combined = acct * width + (sym if by_symbol else 0)
    _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
    return inverse.astype(np.int32), first.astype(np.int64), acct


def _first_seen(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense index per code, numbered in order of first appearance; the first of each."""
    if codes.shape[0] == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    size = int(codes.max()) + 1
    if size <= _DENSE_MAX:
        from riskbook.limits._kernel import dense_keys

        dense, first = dense_keys(codes, np.empty(0, np.int64), 1, size)
        return dense.astype(np.int64), first
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(order.shape[0], np.int64)
    rank[order] = np.arange(order.shape[0])
    return rank[inverse.ravel()], first[order].astype(np.int64)


def _effect_order(rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The order limit rows take effect in: by ``set_at`` (null: from the start), recorded
    time, ``"*"`` rows before explicit ones, position, then as given. Returns the order
    and the rows' set_at, timestamp and position (nulls: the smallest integer)."""
    n = rows.height
    set_at, ts = _epoch_us(rows["set_at"], _MIN), _epoch_us(rows["timestamp"], _MIN)
    pos = _ints(rows["position"], _MIN)
    explicit = np.fromiter(
        (-1 if a is None else int(a != "*") for a in rows["account_id"].to_list()), np.int64, n
    )  # a null account first, as a null sorts
    order = np.lexsort((np.arange(n), pos, explicit, ts, set_at))
    return order, set_at, ts, pos


def _in_force(rows: pl.DataFrame) -> pl.DataFrame:
    """The last limit row of every (account_id, symbol), in effect order: the limits in
    force after ``rows``, as a state keeps them."""
    order = _effect_order(rows)[0]
    accts, syms = rows["account_id"].to_list(), rows["symbol"].to_list()
    last = {(accts[i], syms[i]): p for p, i in enumerate(order.tolist())}
    at = _idx(order[np.sort(np.fromiter(last.values(), np.int64, len(last)))])
    return pl.DataFrame([rows[c][at] for c in LIMIT_ROWS_SCHEMA])


def _targets(
    rows: pl.DataFrame, k: _Derived, by_symbol: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the limit rows set, in effect order: (row, account index, key index or -1 for
    account-wide, set_at, timestamp, position, value), one entry per (row, account).

    ``"*"`` rows set every account (in order of account_id); rows of accounts or keys
    not in the tables set nothing (they change nothing this batch), and so do rows with a
    symbol for a limit type whose scope has none.
    """
    order, set_at, ts, pos = _effect_order(rows)
    accts, syms = rows["account_id"].to_list(), rows["symbol"].to_list()
    key_index, acct_index = k.keys_lookup(), k.accounts_lookup()
    every: list[tuple[int, str]] | None = None
    got: list[tuple[int, int, int]] = []
    for i in order.tolist():
        a, s = accts[i], syms[i]
        if a is None or (s is not None and not by_symbol):
            continue
        if a == "*":
            if every is None:
                every = sorted(((x, y) for y, x in acct_index.items() if y is not None),
                               key=lambda p: p[1])  # fmt: skip
            for x, y in every:
                key = -1 if s is None else key_index.get((y, s))
                if key is not None:
                    got.append((i, x, key))
            continue
        ai = acct_index.get(a)
        key = -1 if s is None else key_index.get((a, s))
        if ai is not None and key is not None:
            got.append((i, ai, key))
    t = np.array(got, np.int64).reshape(-1, 3)
    row = t[:, 0].copy()
    value = rows["value"].to_numpy().astype(np.float64)[row]
    return row, t[:, 1].copy(), t[:, 2].copy(), set_at[row], ts[row], pos[row], value


_LIMIT_SCHEMA = pl.Schema(LIMIT_ROWS_SCHEMA)


def _limit_frame(limits: pl.DataFrame) -> pl.DataFrame:
    """Limit rows with :data:`LIMIT_ROWS_SCHEMA` (missing optional columns are null)."""
    for need in ("account_id", "value"):
        if need not in limits.columns:
            raise ValueError(f"limit rows need the column {need!r} (they have {limits.columns})")
    if limits.schema == _LIMIT_SCHEMA:
        return limits
    return limits.select(
        [
            (pl.col(c) if c in limits.columns else pl.lit(None))
            .cast(pl.String if t == pl.String() else t)
            .alias(c)
            for c, t in LIMIT_ROWS_SCHEMA.items()
        ]
    )


# ----------------------------------------------------------------------------- the state


def _resolve(
    c: _Derived, accts: list[str | None], syms: list[str | None], accounts: list[str | None]
) -> tuple[np.ndarray, ...]:
    """The limits in force (``c.limits``) of the keys (``accts``, ``syms``) and of the
    ``accounts``: (spec_has, spec_val, spec_src, gen_has, gen_val, gen_src).

    A key's own limit is the later (in effect order) of its account's row and the
    ``"*"`` row with its symbol; an account's limit, of its account-wide row and the
    ``"*"`` account-wide row. Rows with a symbol set nothing for a scope without one.
    """
    spec_src = np.full(len(accts), -1, np.int64)
    gen_src = np.full(len(accounts), -1, np.int64)
    if c.limits.height:
        idx = c.limits_lookup()
        if c.by_symbol:
            spec_src[:] = [
                -1 if a is None or s is None else max(idx.get((a, s), -1), idx.get(("*", s), -1))
                for a, s in zip(accts, syms, strict=True)
            ]
        star = idx.get(("*", None), -1)
        gen_src[:] = [-1 if a is None else max(idx.get((a, None), -1), star) for a in accounts]
        value = c.limits["value"].to_numpy().astype(np.float64)
        spec_val = np.where(spec_src >= 0, value[np.maximum(spec_src, 0)], 0.0)
        gen_val = np.where(gen_src >= 0, value[np.maximum(gen_src, 0)], 0.0)
    else:
        spec_val, gen_val = np.zeros(len(accts)), np.zeros(len(accounts))
    return spec_src >= 0, spec_val, spec_src, gen_src >= 0, gen_val, gen_src


def _derive(state: BreachState, by_symbol: bool, levels: tuple[float, ...]) -> _Derived:
    """What :func:`evaluate` needs of a state, from its frames alone."""
    n_lvl = len(levels)
    carried = _in_force(state.limits) if state.limits.height else state.limits
    m = state.metrics
    keys = m.select(pl.col("account_id", "symbol").cast(pl.String))
    n = keys.height
    accts, syms = keys["account_id"].to_list(), keys["symbol"].to_list()
    acct_index: dict[str | None, int] = {}
    key_acct = np.fromiter(
        (acct_index.setdefault(a, len(acct_index)) for a in accts), np.int64, count=n
    )
    accounts = pl.Series("account_id", list(acct_index), dtype=pl.String)
    c = _Derived(
        (state.limits, state.metrics, state.open), by_symbol, n_lvl, carried,
        keys, keys.select(pl.all().cast(_CAT)), accounts, key_acct,
        m["value"].cast(pl.Float64).to_numpy().copy(), np.ones(n, np.bool_),
        _ints(m["day"], _NO_DAY).astype(np.int64), _epoch_us(m["time"], _MIN),
        None, (), None, acct_index=acct_index,
    )  # fmt: skip
    c.resolved = _resolve(c, accts, syms, list(acct_index))
    open_ = np.zeros((n, n_lvl), np.bool_)
    s_kind = np.zeros((n, n_lvl), np.int8)
    s_idx = np.zeros((n, n_lvl), np.int64)
    s_bt = np.zeros((n, n_lvl), np.int64)
    peak, trig, s_lim = np.zeros((n, n_lvl)), np.zeros((n, n_lvl)), np.zeros((n, n_lvl))
    op = state.open
    if op.height:
        where = c.keys_lookup()
        k_idx = np.array(
            [where[k] for k in zip(op["account_id"].cast(pl.String).to_list(),
                                   op["symbol"].cast(pl.String).to_list(), strict=True)],
            np.int64,
        )  # fmt: skip
        l_idx = np.array([levels.index(x) for x in op["level"].to_list()], np.int64)
        open_[k_idx, l_idx] = True
        s_kind[k_idx, l_idx] = 2
        s_idx[k_idx, l_idx] = np.arange(op.height)
        s_bt[k_idx, l_idx] = _epoch_us(op["started_at"], 0)
        peak[k_idx, l_idx] = op["peak_value"].to_numpy()
        trig[k_idx, l_idx] = op["trigger_value"].to_numpy()
        s_lim[k_idx, l_idx] = op["limit_value"].to_numpy()
    c.open = (open_, s_kind, s_idx, s_bt, peak, trig, s_lim, np.full((n, n_lvl), -1, np.int64))
    return c


def _key_table(
    c: _Derived, rows: pl.DataFrame, row_key: np.ndarray, first: np.ndarray, codes: np.ndarray
) -> tuple[_Derived, np.ndarray, list[str | None], list[str | None], list[str | None]]:
    """The keys of the state and then those new in this batch (in order of first
    appearance), as a :class:`_Derived` whose arrays are not extended yet; the key of every
    row; and the new keys (accounts, symbols) and new accounts, when their carried limits
    are to be resolved."""
    nb, n_old = first.shape[0], c.keys.height
    if nb == 0:
        return c, row_key, [], [], []
    at = _idx(first)
    b_acct, b_sym = rows["account_id"][at], rows["symbol"][at]  # Categorical
    if n_old == 0:  # every key is new: no lookups
        key_acct, acct_first = _first_seen(codes[first])
        keys_cat = pl.DataFrame([b_acct, b_sym])
        keys = pl.DataFrame([b_acct.cast(pl.String), b_sym.cast(pl.String)])
        accounts = keys["account_id"][_idx(acct_first)]
        out = _Derived(
            c.frames, c.by_symbol, c.n_lvl, c.limits, keys, keys_cat, accounts, key_acct,
            c.val, c.has_val, c.day, c.last_bt, c.resolved, c.open, None,
            limit_index=c.limit_index,
        )  # fmt: skip
        if c.limits.height == 0:
            return out, row_key, [], [], []  # nothing to resolve for them
        accts, syms = keys["account_id"].to_list(), keys["symbol"].to_list()
        return out, row_key, accts, syms, accounts.to_list()
    accts = b_acct.cast(pl.String).to_list()
    syms = b_sym.cast(pl.String).to_list()
    key_index = c.keys_lookup()
    remap = np.fromiter(
        (key_index.get(k, -1) for k in zip(accts, syms, strict=True)), np.int64, count=nb
    )
    new = np.flatnonzero(remap < 0)
    if new.shape[0] == 0:
        return c, remap[row_key].astype(np.int32), [], [], []
    remap[new] = n_old + np.arange(new.shape[0])
    m_key = remap[row_key].astype(np.int32)
    new_accts = [accts[i] for i in new]
    new_syms = [syms[i] for i in new]
    key_index = dict(key_index)
    key_index.update(
        zip(zip(new_accts, new_syms, strict=True), range(n_old, n_old + len(new)), strict=True)
    )
    acct_index = c.accounts_lookup()
    added: list[str | None] = []
    key_acct = np.empty(new.shape[0], np.int64)
    for i, a in enumerate(new_accts):
        x = acct_index.get(a)
        if x is None:
            if not added:
                acct_index = dict(acct_index)
            x = acct_index[a] = len(acct_index)
            added.append(a)
        key_acct[i] = x
    fresh = _idx(new)
    part = pl.DataFrame([b_acct[fresh], b_sym[fresh]])
    keys = c.keys.vstack(pl.DataFrame([x.cast(pl.String) for x in part.get_columns()])).rechunk()
    accounts = c.accounts
    if added:
        accounts = pl.concat([accounts, pl.Series("account_id", added, dtype=pl.String)])
    out = _Derived(
        c.frames, c.by_symbol, c.n_lvl, c.limits, keys, c.keys_cat.vstack(part).rechunk(),
        accounts, np.concatenate([c.key_acct, key_acct]),
        c.val, c.has_val, c.day, c.last_bt, c.resolved, c.open, None,
        key_index=key_index, acct_index=acct_index, limit_index=c.limit_index,
    )  # fmt: skip
    return out, m_key, new_accts, new_syms, added


# ----------------------------------------------------------------------------- outputs

_NULL_STR = pl.Series([None], dtype=pl.String())
_NULL_TIME = pl.Series([None], dtype=_TIME)
_NULL_INT = pl.Series([None], dtype=pl.Int64())


def _intervals(
    name: str,
    levels: tuple[float, ...],
    r: dict[str, np.ndarray],
    rows: pl.DataFrame,
    k: _Derived,
    table: pl.DataFrame,
    carried_open: pl.DataFrame,
) -> tuple[pl.DataFrame, np.ndarray]:
    """The kernel's interval records as a frame of :data:`BREACH_SCHEMA` (+ ``carried``),
    in order (started_at, account_id, symbol, level); and the record of each row."""
    n = r["key"].shape[0]
    if n == 0 and name in _NO_INTERVALS:  # most live batches of a type: the same empty frame
        return _NO_INTERVALS[name], np.empty(0, np.int64)
    level = np.asarray(levels, np.float64)[r["lvl"]]
    rank = k.ranks()[r["key"]] if n > 1 else np.zeros(n, np.int64)
    perm = np.lexsort((level, rank, r["sbt"]))
    sbt, rank, lvl = r["sbt"][perm], rank[perm], level[perm]
    # Rows alike in every sort column are left to the sort below, as they always were.
    ties = bool(((sbt[1:] == sbt[:-1]) & (rank[1:] == rank[:-1]) & (lvl[1:] == lvl[:-1])).any())
    if ties:
        perm = np.arange(n)
    p = {c: a[perm] for c, a in r.items()}
    skind, sidx, ekind, eidx, slsrc = p["skind"], p["sidx"], p["ekind"], p["eidx"], p["slsrc"]
    nr, nt, no = rows.height, table.height, carried_open.height
    # Where trigger and end events come from: a metric row, a limit row (of the table),
    # a breach carried in (start only), nothing (a null at the end).
    start = _idx(np.where(skind == 0, sidx, np.where(skind == 1, nr + sidx, nr + nt + sidx)))
    end = _idx(np.where(ekind == 0, eidx, np.where(ekind == 1, nr + eidx, nr + nt + no)))
    who = _idx(np.where(skind == 2, nt + sidx, np.where(slsrc >= 0, slsrc, nt + no)))
    event_id = pl.concat(
        [rows["event_id"], table["event_id"], carried_open["trigger_event_id"], _NULL_STR]
    )
    position = pl.concat(
        [rows["position"], table["position"], carried_open["trigger_position"], _NULL_INT]
    )
    recorded = pl.concat(
        [rows["timestamp"], table["timestamp"], carried_open["trigger_recorded_at"], _NULL_TIME]
    )
    set_by = pl.concat([table["set_by"], carried_open["set_by"], _NULL_STR])
    limit_event_id = pl.concat([table["event_id"], carried_open["limit_event_id"], _NULL_STR])
    ended_at = _times(p["ebt"])
    still = np.flatnonzero(ekind == -1)
    if still.shape[0]:
        ended_at = ended_at.scatter(still, None)
    key = _idx(p["key"])
    out = pl.DataFrame(
        [
            k.keys_cat["account_id"][key],
            pl.Series("limit_type", [name], dtype=_CAT).new_from_index(0, n),
            k.keys_cat["symbol"][key],
            pl.Series("level", np.asarray(levels, np.float64)[p["lvl"]]),
            _times(p["sbt"]).alias("started_at"),
            ended_at.alias("ended_at"),
            pl.Series("peak_value", p["peak"]),
            pl.Series("limit_value", p["slim"]),
            event_id[start].alias("trigger_event_id"),
            pl.Series("trigger_value", p["trig"]),
            recorded[start].alias("trigger_recorded_at"),
            position[start].alias("trigger_position"),
            event_id[end].alias("ended_by_event_id"),
            position[end].alias("ended_by_position"),
            pl.Series("limit_value_at_end", p["elim"], dtype=pl.Float64, nan_to_null=True),
            set_by[who].cast(_CAT).alias("set_by"),
            limit_event_id[who].alias("limit_event_id"),
            pl.Series("carried", skind == 2),
        ]
    )
    if ties:
        out = out.with_columns(_rec=pl.Series(perm)).sort(
            "started_at",
            pl.col("account_id").cast(pl.String),
            pl.col("symbol").cast(pl.String),
            "level",
            nulls_last=False,
        )
        perm = out["_rec"].to_numpy()
        out = out.drop("_rec")
    if n == 0:
        _NO_INTERVALS[name] = out  # frames are never changed in place: shared
    return out, perm


_NO_INTERVALS: dict[str, pl.DataFrame] = {}
"""Per limit type, the empty interval frame (building one costs ~25 polars calls)."""


def _open_frame(still: pl.DataFrame) -> pl.DataFrame:
    """The open breaches of a state (:data:`_OPEN_SCHEMA`) from their intervals."""
    if still.height == 0:
        return _NO_OPEN  # most live batches: no open breach, no frame to build
    return pl.DataFrame(
        [
            still[c].cast(pl.String) if c in ("account_id", "symbol", "set_by") else still[c]
            for c in _OPEN_SCHEMA
        ]
    )


_NO_OPEN = pl.DataFrame(schema=_OPEN_SCHEMA)


def _grow(arrays: list[np.ndarray], n: int) -> list[np.ndarray]:
    size = max(2 * arrays[0].shape[0], 1024)
    return [np.concatenate([a[:n], np.empty(size - n, a.dtype)]) for a in arrays]


# ----------------------------------------------------------------------------- evaluate


@with_large_arrays
def evaluate(
    definition: LimitDefinition | str,
    metric: pl.DataFrame,
    limits: pl.DataFrame,
    *,
    levels: Sequence[float] | float = (0.8, 0.9, 1.0),
    state: BreachState | None = None,
    through: datetime | None = None,
) -> tuple[pl.DataFrame, BreachState]:
    """Fold metric rows and limit rows into breach intervals, from a state to a state.

    Parameters
    ----------
    definition : the limit type (or its registered name).
    metric : metric rows of this batch (see :class:`~riskbook.limits.LimitDefinition`).
    limits : limit rows of this batch (:data:`LIMIT_ROWS_SCHEMA`). If they have a
        ``limit_type`` column (``history.limits`` has the right columns), only the rows
        of this definition's type are used: the others, of other types, are left out.
    levels : fractions of the limit (one, or several); a breach at level x is metric >
        x * limit.
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
        ``trigger_event_id`` and ``ended_by_event_id`` are null for metric rows without
        an ``event_id`` (the built-in types' metrics have none): their
        ``trigger_position`` / ``ended_by_position`` name the events, and
        :func:`~riskbook.breaches` and :func:`~riskbook.limits.backtest` fill the ids in.

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
    c = state._derived
    if c is None or not c.matches(state, by_symbol, len(lv)):
        c = _derive(state, by_symbol, lv)
    rows, m_bt, m_ts, m_pos, m_val = _metric_rows(metric, d, by_symbol)
    if "limit_type" in limits.columns:  # history.limits, say: only this type's rows
        limits = limits.filter(pl.col("limit_type").cast(pl.String) == d.name)
    lim = _limit_frame(limits)
    cut = _MAX if through is None else _us(through)
    if through is not None:
        stop = int(np.searchsorted(m_bt, cut, side="right"))
        if stop < rows.height:
            rows = rows.head(stop)
            m_bt, m_ts, m_pos, m_val = m_bt[:stop], m_ts[:stop], m_pos[:stop], m_val[:stop]
        if lim.height:
            lim = lim.filter(pl.col("set_at").is_null() | (pl.col("set_at") <= through))

    if rows.height == 0 and lim.height == 0 and c.open_intervals is not None:
        # Nothing comes in: the open breaches are reported again, and nothing else
        # happens unless a day ends.
        latest = int(c.last_bt.max()) if c.last_bt.shape[0] else _MIN
        horizon = cut if through is not None else latest
        days = c.day[c.has_val]
        if not (daily and ((days + 1) * _DAY_US <= horizon).any()):
            return c.open_intervals.with_columns(carried=pl.lit(True)), BreachState(
                d.name, d.scope, lv, state.limits, state.metrics, state.open,
                through if through is not None else _time_or_none(latest), c,
            )  # fmt: skip

    # Keys: those of the state, then those new in this batch.
    row_key, first, codes = _dense(rows, by_symbol)
    k, m_key, new_accts, new_syms, new_accounts = _key_table(c, rows, row_key, first, codes)
    n_keys, n_acc, n_lvl = k.keys.height, k.accounts.len(), len(lv)
    key_acct = k.key_acct
    order = np.argsort(key_acct, kind="stable")
    acct_ptr = np.searchsorted(key_acct[order], np.arange(n_acc + 1)).astype(np.int64)
    acct_keys = order.astype(np.int64)

    # State arrays, from the carried state (copies: the fold writes to them).
    val = _grow_to(c.val, n_keys, 0.0)
    has_val = _grow_to(c.has_val, n_keys, False)
    day = _grow_to(c.day, n_keys, _NO_DAY)
    last_bt = _grow_to(c.last_bt, n_keys, _MIN)
    if c.resolved is None:  # the limits changed in the last batch: resolve them again
        resolved = _resolve(
            k, k.keys["account_id"].to_list(), k.keys["symbol"].to_list(), k.accounts.to_list()
        )
    else:  # those of the state's keys, and of the new keys (and accounts) resolved now
        fills = (False, 0.0, -1)
        resolved = tuple(
            _grow_to(a, n_keys if i < 3 else n_acc, fills[i % 3]) for i, a in enumerate(c.resolved)
        )
        if new_accts or new_accounts:
            fresh = _resolve(k, new_accts, new_syms, new_accounts)
            for i, part in enumerate(fresh):
                resolved[i][resolved[i].shape[0] - part.shape[0] :] = part
    spec_has, spec_val, spec_src, gen_has, gen_val, gen_src = resolved
    open_, s_kind, s_idx, s_bt, peak, trig, s_lim, s_lsrc = (
        _grow_to(a, n_keys, f)
        for a, f in zip(c.open, (False, 0, 0, 0, 0.0, 0.0, 0.0, -1), strict=True)
    )

    # The batch's limit rows, in effect order, with what they set.
    carried = c.limits
    base = carried.height
    if lim.height:
        l_row, l_acct, l_key, l_bt, l_ts, l_pos, l_val = _targets(lim, k, by_symbol)
        l_src = l_row + base  # row of the limit table
    else:
        l_row = l_acct = l_key = l_bt = l_ts = l_pos = l_src = np.empty(0, np.int64)
        l_val = np.empty(0, np.float64)
    n_targets = l_row.shape[0]

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
            i, j, rows.height, n_targets, True,
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
        where = rows.row(i, named=True) if status == 2 else lim.row(int(l_row[j]), named=True)
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
    table = pl.concat([carried, lim]) if lim.height else carried
    intervals, rec = _intervals(d.name, lv, records, rows, k, table, state.open)

    # The state to carry on from, and what the next call would derive from it.
    new_limits = _in_force(table) if lim.height else carried
    keys = k.keys
    if not has_val.all():  # not reached: every key has a metric once folded
        keys = keys.filter(pl.Series(has_val))
    metrics = pl.DataFrame(
        [
            keys["account_id"],
            keys["symbol"],
            pl.Series("value", val[has_val]),
            _times(last_bt[has_val]).alias("time"),
            (
                _ints_or_null(day[has_val], _NO_DAY) if daily else _null(pl.Int64(), keys.height)
            ).alias("day"),
        ]
    )
    at = np.flatnonzero(rec >= n)  # the rows of the breaches open at the end
    still = intervals
    if at.shape[0] < intervals.height:
        rows_at = _idx(at)
        still = pl.DataFrame([col[rows_at] for col in intervals.get_columns()])
    open_frame = _open_frame(still)
    was = rec[at] - n
    s_kind[ok[was], ol[was]] = 2
    s_idx[ok[was], ol[was]] = np.arange(at.shape[0])
    s_lsrc[ok[was], ol[was]] = -1
    same = lim.height == 0
    derived = None
    if keys is k.keys:
        derived = _Derived(
            (new_limits, metrics, open_frame), by_symbol, n_lvl, new_limits, keys, k.keys_cat,
            k.accounts, key_acct, val, has_val, day, last_bt,
            (spec_has, spec_val, spec_src, gen_has, gen_val, gen_src) if same else None,
            (open_, s_kind, s_idx, s_bt, peak, trig, s_lim, s_lsrc),
            still if same else None,
            key_index=k.key_index, acct_index=k.acct_index,
            limit_index=k.limit_index if same else None, key_rank=k.key_rank,
        )  # fmt: skip
    new_state = BreachState(
        d.name,
        d.scope,
        lv,
        new_limits,
        metrics,
        open_frame,
        through if through is not None else _time_or_none(latest),
        derived,
    )
    return intervals, new_state


def _time_or_none(us: int) -> datetime | None:
    return None if us == _MIN else _EPOCH + timedelta(microseconds=us)


def _ints_or_null(values: np.ndarray, null: int) -> pl.Series:
    s = pl.Series(values, dtype=pl.Int64)
    gone = np.flatnonzero(values == null)
    return s.scatter(gone, None) if gone.shape[0] else s
