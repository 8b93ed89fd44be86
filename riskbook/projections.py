"""Positions, marks, cash, exposure, equity, drawdown and leverage, at any T as known at K.

The numeric heart of riskbook (DESIGN.md §4 and §6, layer 4). Every function is pure:
it reads a :class:`~riskbook.frames.History` and returns Polars frames.

=========================  ===============================================================
:func:`positions`          one row per (account, symbol) traded or adjusted by T
:func:`marks`              the mark of each symbol at T
:func:`accounts`           cash, equity, gross/net exposure, leverage, drawdown per account
:func:`position_timeline`  the position after every trade and adjustment
:func:`account_timeline`   an account's figures after every event that moves them
:func:`adjustment_mismatches`  PositionUpdated whose previous_quantity is not the books'
:func:`write_snapshots`    state snapshots into ``position_snapshots``
:func:`state_at`           (positions, accounts) at T from the nearest snapshot + the
                           events after it, read straight from PostgreSQL
=========================  ===============================================================

Semantics (DESIGN.md §4), exactly:

* events apply in the order (business time, recorded time, global position), across
  all kinds; ``at=T`` keeps the events with business time <= T, ``known_at=K`` those
  recorded by K. A TradeCancelled known by K removes its trade (matched by account and
  trade id) from every figure, whatever its ``cancelled_at`` and whatever T;
* average cost per (account, symbol): adding or opening sets
  ``a <- (q*a + s*p) / (q + s)``; reducing realizes ``closed*(p - a)*sign(q)`` and keeps
  ``a`` (``a <- 0`` when q reaches 0); flipping through zero opens the remainder at
  ``a = p``. A PositionUpdated sets ``q`` to ``new_quantity`` keeping the cost basis
  ``q*a`` (so ``a <- q*a / new_quantity``; ``new_quantity = 0`` sets ``a = 0``; from
  ``q = 0`` the cost basis is 0, so ``a = 0``); realized PnL and cash are unchanged;
* the mark of a symbol at T is its latest PriceMarked (in the order above) with
  business time <= T; a position with no mark yet is valued at its own average cost;
* per account: ``cash = sum(funding) - sum(s*p)``, ``equity = cash + net``,
  ``net = sum(q*mark)``, ``gross = sum(|q*mark|)``; :func:`leverage` and :func:`drawdown`
  as DESIGN.md says. The peak starts at 0; after each event that moves the account
  (its trades, adjustments and funding, and marks of symbols it holds, i.e. each row of
  its timeline) a funding first moves the peak by its amount, then
  ``peak <- max(peak, equity)``. The state at T is the last timeline row at or before T;
* a quantity, cash, the peak or equity whose sum cancels to within 1e-12 of its terms
  is exactly 0. That is rounding of binary fractions (0.1 + 0.2 - 0.3 is 5.6e-17);
  kept, it would be an open position of dust, or a peak that makes a drawdown of 9e16.

How it is fast and exact: the events that move figures (trades, adjustments, marks,
funding) are put once per History into one *book* sorted by (business time, recorded
time, position) -- the only sort -- and a compiled loop (numba) folds the book in that
order with per-(account, symbol), per-account and per-symbol state held in arrays. It
performs the same floating-point operations in the same order as a plain per-event
fold, so quantities, averages, realized PnL and cash are bit-identical to it. ``at`` is
a prefix of the book (a binary search); ``known_at`` and busts are a mask. Timelines are
kept per (History, known_at), so the state at any other T is a binary search per
position and account: cheap enough to drag a slider over.

Examples
--------
>>> import uuid
>>> from datetime import datetime, timedelta, timezone
>>> import riskbook
>>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
>>> history = riskbook.History.from_events  # each event recorded when it happened
>>> def fill(side, quantity, price, minute):
...     return riskbook.TradeExecuted(trade_id=str(uuid.uuid4()), account_id="ACC-1",
...         symbol="ACME", side=riskbook.Side(side), quantity=quantity, price=price,
...         executed_at=t + timedelta(minutes=minute))
>>> h = history(riskbook.AccountFunded(account_id="ACC-1", amount=10_000.0, funded_at=t),
...     fill("Buy", 100.0, 10.0, 1), fill("Buy", 100.0, 12.0, 2), fill("Sell", 150.0, 15.0, 3),
...     riskbook.PriceMarked(symbol="ACME", price=16.0, marked_at=t + timedelta(minutes=4)))
>>> positions(h).select("symbol", "quantity", "avg_price", "realized_pnl", "unrealized_pnl")
shape: (1, 5)
┌────────┬──────────┬───────────┬──────────────┬────────────────┐
│ symbol ┆ quantity ┆ avg_price ┆ realized_pnl ┆ unrealized_pnl │
│ ---    ┆ ---      ┆ ---       ┆ ---          ┆ ---            │
│ cat    ┆ f64      ┆ f64       ┆ f64          ┆ f64            │
╞════════╪══════════╪═══════════╪══════════════╪════════════════╡
│ ACME   ┆ 50.0     ┆ 11.0      ┆ 600.0        ┆ 250.0          │
└────────┴──────────┴───────────┴──────────────┴────────────────┘
>>> accounts(h).select("cash", "equity", "gross_exposure", "leverage", "drawdown")
shape: (1, 5)
┌─────────┬─────────┬────────────────┬──────────┬──────────┐
│ cash    ┆ equity  ┆ gross_exposure ┆ leverage ┆ drawdown │
│ ---     ┆ ---     ┆ ---            ┆ ---      ┆ ---      │
│ f64     ┆ f64     ┆ f64            ┆ f64      ┆ f64      │
╞═════════╪═════════╪════════════════╪══════════╪══════════╡
│ 10050.0 ┆ 10850.0 ┆ 800.0          ┆ 0.073733 ┆ 0.0      │
└─────────┴─────────┴────────────────┴──────────┴──────────┘

Before the mark, the position is valued at its average cost:

>>> positions(h, at=t + timedelta(minutes=2)).select("quantity", "avg_price", "mark_price",
...     "market_value")
shape: (1, 4)
┌──────────┬───────────┬────────────┬──────────────┐
│ quantity ┆ avg_price ┆ mark_price ┆ market_value │
│ ---      ┆ ---       ┆ ---        ┆ ---          │
│ f64      ┆ f64       ┆ f64        ┆ f64          │
╞══════════╪═══════════╪════════════╪══════════════╡
│ 200.0    ┆ 11.0      ┆ null       ┆ 2200.0       │
└──────────┴───────────┴────────────┴──────────────┘
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import numpy as np
import polars as pl

from riskbook._memory import empty as _empty
from riskbook._memory import with_large_arrays
from riskbook._time import EPOCH as _EPOCH
from riskbook._time import us as _us
from riskbook.errors import RiskbookError
from riskbook.events import as_time, format_time
from riskbook.frames import KINDS, WIDE_COLUMNS, History, Kind
from riskbook.store import Store, connect

__all__ = [
    "ACCOUNT_TIMELINE_COLUMNS",
    "POSITION_TIMELINE_COLUMNS",
    "ProjectionState",
    "account_positions",
    "account_timeline",
    "accounts",
    "adjustment_mismatches",
    "drawdown",
    "exposure",
    "leverage",
    "market_value",
    "marks",
    "position_timeline",
    "positions",
    "refresh_account_positions",
    "state_at",
    "unrealized_pnl",
    "write_snapshots",
]

TimeLike = datetime | str | None

_TRADE, _ADJUST, _MARK, _FUND = 0, 1, 2, 3
_KIND_NAMES = ["TradeExecuted", "PositionUpdated", "PriceMarked", "AccountFunded"]
_EVENT_TYPE = pl.Enum(_KIND_NAMES)
_EVENT_COLUMNS = ("occurred_at", "timestamp", "position", "event_id", "event_type", "trade_id")
POSITION_TIMELINE_COLUMNS = (
    "account_id", "symbol", *_EVENT_COLUMNS, "signed_quantity", "price",
    "quantity", "avg_price", "realized_pnl", "trades",
)  # fmt: skip
"""The columns of :func:`position_timeline`, in order."""
ACCOUNT_TIMELINE_COLUMNS = (
    "account_id", "occurred_at", "timestamp", "position", "event_id", "event_type", "symbol",
    "cash", "equity", "gross_exposure", "net_exposure", "leverage", "drawdown", "peak_equity",
)  # fmt: skip
"""The columns of :func:`account_timeline`, in order."""
_NEVER = np.iinfo(np.int64).max  # "no bust" / "no bound"
_ALWAYS = np.iinfo(np.int64).min
_TIME = pl.Datetime("us", "UTC")
_CAT = pl.Categorical()
_SNAPSHOT_FORMAT = 1


# ----------------------------------------------------------------------------- measures


def _expr(x: str | pl.Expr) -> pl.Expr:
    return pl.col(x) if isinstance(x, str) else x


def market_value(
    quantity: str | pl.Expr = "quantity", price: str | pl.Expr = "mark_price"
) -> pl.Expr:
    """Market value ``q * price`` of a position.

    Examples
    --------
    >>> pl.DataFrame({"quantity": [-2.0, 3.0], "mark_price": [10.0, 5.0]}).select(market_value())
    shape: (2, 1)
    ┌──────────┐
    │ quantity │
    │ ---      │
    │ f64      │
    ╞══════════╡
    │ -20.0    │
    │ 15.0     │
    └──────────┘
    """
    return _expr(quantity) * _expr(price)


def exposure(
    quantity: str | pl.Expr = "quantity",
    price: str | pl.Expr = "mark_price",
    *,
    gross: bool = True,
) -> pl.Expr:
    """Exposure of positions: ``|q * price|`` (gross) or ``q * price`` (net).

    Sum it per account for the account's gross or net exposure.

    Examples
    --------
    >>> df = pl.DataFrame({"quantity": [-2.0, 3.0], "mark_price": [10.0, 5.0]})
    >>> df.select(gross=exposure().sum(), net=exposure(gross=False).sum())
    shape: (1, 2)
    ┌───────┬──────┐
    │ gross ┆ net  │
    │ ---   ┆ ---  │
    │ f64   ┆ f64  │
    ╞═══════╪══════╡
    │ 35.0  ┆ -5.0 │
    └───────┴──────┘
    """
    value = market_value(quantity, price)
    return value.abs() if gross else value


def unrealized_pnl(
    quantity: str | pl.Expr = "quantity",
    price: str | pl.Expr = "mark_price",
    avg_price: str | pl.Expr = "avg_price",
) -> pl.Expr:
    """Unrealized PnL ``q * (mark - a)``.

    Examples
    --------
    >>> df = pl.DataFrame({"quantity": [100.0], "mark_price": [12.0], "avg_price": [10.0]})
    >>> df.select(unrealized_pnl()).item()
    200.0
    """
    return _expr(quantity) * (_expr(price) - _expr(avg_price))


def leverage(gross: str | pl.Expr = "gross_exposure", equity: str | pl.Expr = "equity") -> pl.Expr:
    """Leverage ``gross / equity``: 0 with no exposure, ``+inf`` when equity <= 0.

    Examples
    --------
    >>> df = pl.DataFrame({"gross_exposure": [500.0, 10.0, 0.0], "equity": [1000.0, -5.0, -5.0]})
    >>> df.select(leverage()).to_series().to_list()
    [0.5, inf, 0.0]
    """
    g, e = _expr(gross), _expr(equity)
    return (
        pl.when(g == 0)
        .then(pl.lit(0.0))
        .when(e <= 0)
        .then(pl.lit(math.inf))
        .otherwise(g / e)
        .alias("leverage")
    )


def drawdown(equity: str | pl.Expr = "equity", peak: str | pl.Expr = "peak_equity") -> pl.Expr:
    """Drawdown ``(peak - equity) / peak``; 0 while the peak is <= 0.

    Examples
    --------
    >>> df = pl.DataFrame({"equity": [800.0, -5.0], "peak_equity": [1000.0, 0.0]})
    >>> df.select(drawdown()).to_series().to_list()
    [0.2, 0.0]
    """
    e, p = _expr(equity), _expr(peak)
    return pl.when(p <= 0).then(pl.lit(0.0)).otherwise((p - e) / p).alias("drawdown")


# ----------------------------------------------------------------------------- times


_as_time = as_time


def _bound(value: TimeLike, name: str) -> int:
    """A time as microseconds since the epoch; None is "no bound"."""
    t = _as_time(value, name)
    return _NEVER - 1 if t is None else _us(t)


def _from_us(values: Any) -> pl.Series:
    # one cast: Int64 microseconds read as UTC (no expression, so no query to run)
    return pl.Series(values, dtype=pl.Int64).cast(_TIME)


# ----------------------------------------------------------------------------- the book


def _compiled() -> Any:
    """The compiled kernels (:mod:`riskbook._kernels`): numba is imported on first use."""
    from riskbook import _kernels

    return _kernels


@dataclass(eq=False)
class _Book:
    """The events that move figures, sorted once by (business time, recorded time, position).

    Numeric columns are numpy arrays indexed by book row; ``row`` points into
    ``source`` (the other columns timelines show, in the order the kinds were
    concatenated).
    Accounts, symbols and (account, symbol) pairs are dense indices, in name order;
    an account's pairs are contiguous (``acct_ptr``), a symbol's are listed by
    ``sym_ptr`` / ``sym_pairs``, and ``tree_off`` / ``tree_size`` place each account's
    segment tree of market values (see :mod:`riskbook._kernels`).
    """

    kind: np.ndarray
    bt: np.ndarray
    ts: np.ndarray
    pos: np.ndarray  # by source row, as ``source`` (only timelines show it)
    acct: np.ndarray
    sym: np.ndarray
    pair: np.ndarray
    x: np.ndarray
    y: np.ndarray
    bust: np.ndarray
    row: np.ndarray
    source: pl.DataFrame  # event_id, trade_id, symbol (the rest is in the arrays)
    account_names: pl.Series
    symbol_names: pl.Series
    pair_acct: np.ndarray
    pair_sym: np.ndarray
    acct_ptr: np.ndarray
    sym_ptr: np.ndarray
    sym_pairs: np.ndarray
    tree_off: np.ndarray
    tree_size: np.ndarray

    _outputs: pl.DataFrame | None = None

    def outputs(self) -> pl.DataFrame:
        """``source`` in one chunk (gathers from it are then fast); made on first use."""
        if self._outputs is None:
            self._outputs = self.source.rechunk()
        return self._outputs

    @property
    def n(self) -> int:
        return int(self.kind.shape[0])

    @property
    def n_accounts(self) -> int:
        return len(self.account_names)

    @property
    def n_symbols(self) -> int:
        return len(self.symbol_names)

    @property
    def n_pairs(self) -> int:
        return int(self.pair_acct.shape[0])

    def live(self, known_at: int) -> np.ndarray:
        """Rows that count as known at ``known_at``: recorded by then and not busted by then."""
        if known_at >= _NEVER - 1:
            return self.bust > known_at
        return (self.ts <= known_at) & (self.bust > known_at)

    def cut(self, at: int) -> int:
        """Number of rows with business time <= ``at`` (they are a prefix)."""
        return int(np.searchsorted(self.bt, at, side="right"))


def _epoch_us(s: pl.Series, fill: int = 0) -> np.ndarray:
    """Microseconds since the epoch of a Datetime Series (nulls as ``fill``), as int64.

    In microseconds already (every frame of riskbook's), its physical values are the
    answer: no ``dt.epoch`` query to run (~0.1 ms each on a live batch's few rows).
    """
    if not (isinstance(s.dtype, pl.Datetime) and s.dtype.time_unit == "us"):
        s = s.dt.cast_time_unit("us")
    us = s.cast(pl.Int64)  # a cast, not to_physical(), which runs a query
    return (us.fill_null(fill) if us.null_count() else us).to_numpy()


def _codes(s: pl.Series) -> np.ndarray:
    codes = s.to_physical().cast(pl.Int64)
    # fill_null runs a query (~0.1 ms on a live batch's few rows): only when needed
    return (codes.fill_null(-1) if codes.null_count() else codes).to_numpy()


def _dense(
    ids: pl.Series, codes: np.ndarray, extra: Sequence[str] = ()
) -> tuple[pl.Series, np.ndarray]:
    """Names (Categorical, sorted) and a lookup table from physical code to dense index.

    ``codes`` are the physical codes of ``ids`` (-1: null).
    """
    if len(ids) + len(extra) <= 20_000:  # small: sets beat frame operations
        # (a live batch's few values go to the set as they are: unique() is a query)
        values = ids if len(ids) <= 2_000 else ids.unique()
        found = (set(values.cast(pl.String).to_list()) - {None}) | set(extra)
        names = pl.Series("id", sorted(found), dtype=pl.String).cast(_CAT)
    else:
        # One row per code found (a pass over the codes), not a unique() of the column.
        first = np.full(int(codes.max()) + 1 if len(codes) else 0, -1, np.int64)
        _compiled().first_rows(codes, first)
        present = ids.gather(first[first >= 0])
        both = pl.concat([present, pl.Series(list(extra), dtype=_CAT)]).unique()
        names = both.to_frame("id").sort(pl.col("id").cast(pl.String))["id"]
    names_codes = _codes(names)
    lut = np.full(int(names_codes.max()) + 1 if len(names_codes) else 1, -1, np.int32)
    lut[names_codes] = np.arange(len(names_codes), dtype=np.int32)
    return names, lut


def _physical(ids: pl.Expr | None) -> pl.Expr:
    """Physical codes of a Categorical column as Int64, -1 for none."""
    if ids is None:
        return pl.lit(-1, pl.Int64)
    return ids.to_physical().cast(pl.Int64).fill_null(-1)


def _kind_frame(frame: pl.DataFrame, kind: Kind, code: int, **cols: pl.Expr) -> pl.DataFrame:
    if frame.height == 0 and code in _KIND_FRAMES:
        return _KIND_FRAMES[code]  # the same empty frame again (they are never changed)
    out = frame.select(
        kind=pl.lit(code, pl.Int8),
        bt=pl.col(kind.time).dt.epoch("us"),
        ts=pl.col("timestamp").dt.epoch("us"),
        position=pl.col("position"),
        account_id=cols.get("account_id", pl.lit(None, _CAT)),
        symbol=cols.get("symbol", pl.lit(None, _CAT)),
        acode=_physical(cols.get("account_id")),
        scode=_physical(cols.get("symbol")),
        x=cols["x"],
        y=cols.get("y", pl.lit(0.0)),
        occurred_at=pl.col(kind.time),
        timestamp=pl.col("timestamp"),
        event_id=pl.col("event_id"),
        event_type=pl.lit(_KIND_NAMES[code], _EVENT_TYPE),
        trade_id=cols.get("trade_id", pl.lit(None, pl.String)),
    )
    if frame.height == 0:
        _KIND_FRAMES[code] = out
    return out


_KIND_FRAMES: dict[int, pl.DataFrame] = {}


def _book_order(bt: np.ndarray, ts: np.ndarray, pos: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The permutation that sorts the rows by (bt, ts, position).

    The rows are the kinds one after the other (parts ``starts[k]:starts[k + 1]``), each
    in position order as the store records them, and business time mostly grows with
    position: each part is an ordered run but for a few strays (fills reported late).
    So the strays are sorted on their own and merged with the runs -- linear work
    where a sort of the whole book is n log n, and exact whatever the order (with
    many strays it is a sort of them).
    """
    k = _compiled()
    stray = _empty(bt.shape[0], np.bool_)
    k.strays(bt, ts, pos, starts, stray)
    kept = np.flatnonzero(~stray)
    lost = np.flatnonzero(stray)
    lost = lost[np.lexsort((pos[lost], ts[lost], bt[lost]))]
    bounds = np.concatenate([np.searchsorted(kept, starts), [bt.shape[0]]]).astype(np.int64)
    perm = _empty(bt.shape[0], np.int64)
    k.merge_runs(bt, ts, pos, np.concatenate([kept, lost]), bounds, perm)
    return perm


def _gather(perm: np.ndarray, column: np.ndarray) -> np.ndarray:
    """``column[perm]`` (compiled: a plain loop into a numpy array is the fastest way)."""
    out = _empty(perm.shape[0], column.dtype)
    _compiled().gather(perm, column, out)
    return out


# The columns of each frame the fold reads, which it cannot take null: an id's null
# would reach the compiled passes as code -1, an index they do not check (a crash of the
# process, or a trade booked to another symbol). riskbook.load never gives one (it sets
# such events aside, as riskbook.read keeps them raw); a History built by hand may.
_FOLD_COLUMNS = {
    "trades": ("account_id", "symbol", "side", "quantity", "price", "executed_at"),
    "adjustments": ("account_id", "symbol", "previous_quantity", "new_quantity", "updated_at"),
    "marks": ("symbol", "price", "marked_at"),
    "funding": ("account_id", "amount", "funded_at"),
}


def _check_foldable(history: History) -> None:
    """Raise ValueError, naming the frame and column, if a column the fold reads holds a
    null (a null count: no pass over the rows)."""
    for name, columns in _FOLD_COLUMNS.items():
        frame = history.frame(name)
        for column in columns:
            nulls = frame[column].null_count() if column in frame.columns else 0
            if nulls:
                first = frame.filter(pl.col(column).is_null())["position"][0]
                raise ValueError(
                    f"History.{name}: column {column!r} has {nulls:,} null value(s) (the"
                    f" first at position {first}); every {name} row needs one. riskbook.load"
                    " leaves such events out; drop these rows from a History built by hand"
                )


def _refuse_busts_of_the_start(history: History) -> None:
    """A History folded on from a :class:`ProjectionState` cannot bust a trade folded
    into that state: the state keeps positions, not the fills that made them, so the
    bust would be passed over (figures as if the trade stood, DESIGN.md §4). Refused,
    naming the trade; the live engine refolds the account's own history instead."""
    cancels = history.cancels
    if not cancels.height:
        return
    orphans = cancels.select("account_id", "trade_id").join(
        history.trades.select("account_id", "trade_id"),
        on=["account_id", "trade_id"],
        how="anti",
    )
    if orphans.height:
        account, trade = orphans.row(0)
        raise RiskbookError(
            f"TradeCancelled of trade {trade!r} of account {account!r}: the trade is not in"
            " this History, which goes on from a ProjectionState (start); a bust of a trade"
            " folded into the state cannot be applied to it: fold a History that holds the"
            " trade"
        )


def _build_book(
    history: History,
    extra_pairs: Sequence[tuple[str, str]] = (),
    extra_accounts: Sequence[str] = (),
    extra_symbols: Sequence[str] = (),
) -> _Book:
    _check_foldable(history)
    tr, adj, mk, fd, cx = (
        history.trades,
        history.adjustments,
        history.marks,
        history.funding,
        history.cancels,
    )
    signed = (
        pl.when(pl.col("side") == "Buy").then(pl.col("quantity")).otherwise(-pl.col("quantity"))
    )
    parts = [
        _kind_frame(
            tr,
            KINDS["trades"],
            _TRADE,
            account_id=pl.col("account_id"),
            symbol=pl.col("symbol"),
            x=signed,
            y=pl.col("price"),
            trade_id=pl.col("trade_id"),
        ),
        _kind_frame(
            adj,
            KINDS["adjustments"],
            _ADJUST,
            account_id=pl.col("account_id"),
            symbol=pl.col("symbol"),
            x=pl.col("new_quantity"),
            y=pl.col("previous_quantity"),
        ),
        _kind_frame(mk, KINDS["marks"], _MARK, symbol=pl.col("symbol"), x=pl.col("price")),
        _kind_frame(
            fd, KINDS["funding"], _FUND, account_id=pl.col("account_id"), x=pl.col("amount")
        ),
    ]
    nonempty = [p for p in parts if p.height] or parts[:1]  # each part costs a select
    frame = pl.concat(nonempty, rechunk=False)
    starts = np.cumsum([0] + [p.height for p in nonempty]).astype(np.int64)
    # Numpy columns (one copy of each, the parts joined) for the compiled passes below;
    # the one ordering is found on the helper thread meanwhile (the compiled passes and
    # numpy's sorts release the GIL).
    bt_, ts_, pos_ = (frame[c].to_numpy() for c in ("bt", "ts", "position"))
    small = frame.height <= _SMALL_ROWS
    ordering = _soon(small, _book_order, bt_, ts_, pos_, starts)
    kind_, x_, y_, acode, scode = (
        frame[c].to_numpy() for c in ("kind", "x", "y", "acode", "scode")
    )
    # Busts: the earliest recorded time of a cancel of each trade (by account and trade id).
    bust = np.full(frame.height, _NEVER, np.int64)
    if cx.height and tr.height:
        first = cx.group_by("account_id", "trade_id").agg(
            pl.col("timestamp").min().dt.epoch("us").alias("bust")
        )
        hit = (
            tr.select("account_id", "trade_id")
            .with_row_index("i")
            .filter(pl.col("trade_id").is_in(first["trade_id"].implode()))
            .join(first, on=["account_id", "trade_id"], how="inner")
        )
        bust[hit["i"].to_numpy()] = hit["bust"].to_numpy()
    extra_acc = [a for a, _ in extra_pairs] + list(extra_accounts)
    account_names, acct_lut = _dense(frame["account_id"], acode, extra_acc)
    symbol_names, sym_lut = _dense(
        frame["symbol"], scode, [s for _, s in extra_pairs] + list(extra_symbols)
    )
    # The columns gathered in that order, half of them on the helper thread.
    perm = ordering.result()
    acct, sym = _empty(len(perm), np.int32), _empty(len(perm), np.int32)

    def half() -> tuple[np.ndarray, ...]:
        _compiled().gather_dense(perm, scode, sym_lut, sym)
        return tuple(_gather(perm, c) for c in (x_, y_, bust))

    other = _soon(small, half)
    kind, bt, ts = (_gather(perm, c) for c in (kind_, bt_, ts_))
    _compiled().gather_dense(perm, acode, acct_lut, acct)
    x, y, bust = other.result()

    n_acc, n_sym = len(account_names), max(len(symbol_names), 1)
    extra_keys = (
        acct_lut[_codes(pl.Series([a for a, _ in extra_pairs], dtype=_CAT))].astype(np.int64)
        * n_sym
        + sym_lut[_codes(pl.Series([s for _, s in extra_pairs], dtype=_CAT))]
    )
    if n_acc * n_sym <= 1 << 24:  # a lookup table is cheaper than a sort
        pair = _empty(kind.shape[0], np.int32)
        index = np.zeros(n_acc * n_sym, np.int32)
        pair_keys = _compiled().pair_codes(kind, acct, sym, n_sym, extra_keys, index, pair)
    else:
        has_pair = kind <= _ADJUST
        keys = acct[has_pair].astype(np.int64) * n_sym + sym[has_pair]
        pair = np.full(kind.shape[0], -1, np.int32)
        pair_keys = np.unique(np.concatenate([keys, extra_keys]))
        pair[has_pair] = np.searchsorted(pair_keys, keys).astype(np.int32)
    pair_acct = (pair_keys // n_sym).astype(np.int32)
    pair_sym = (pair_keys % n_sym).astype(np.int32)
    acct_ptr = np.searchsorted(pair_acct, np.arange(n_acc + 1)).astype(np.int64)
    sym_ptr, sym_pairs = _compiled().group(pair_sym.astype(np.int64), len(symbol_names))
    per_account = np.maximum(np.diff(acct_ptr), 1)
    tree_size = (2 ** np.ceil(np.log2(per_account))).astype(np.int64)
    tree_off = np.concatenate([[0], np.cumsum(2 * tree_size)[:-1]]).astype(np.int64)
    return _Book(
        kind=kind,
        bt=bt,
        ts=ts,
        pos=pos_,
        acct=acct,
        sym=sym,
        pair=pair,
        x=x,
        y=y,
        bust=bust,
        row=perm,
        # [] and not select(): select() copied the columns (~40 ms at 5M)
        source=frame[["event_id", "trade_id", "symbol"]],
        account_names=account_names,
        symbol_names=symbol_names,
        pair_acct=pair_acct,
        pair_sym=pair_sym,
        acct_ptr=acct_ptr,
        sym_ptr=sym_ptr,
        sym_pairs=sym_pairs,
        tree_off=tree_off,
        tree_size=tree_size,
    )


# ----------------------------------------------------------------------------- state


@dataclass(eq=False)
class _State:
    """Per-pair, per-account and per-symbol state of a fold (numpy arrays)."""

    q: np.ndarray
    a: np.ndarray
    r: np.ndarray
    ntr: np.ndarray
    pseen: np.ndarray
    plast: np.ndarray
    cash: np.ndarray
    peak: np.ndarray
    equity: np.ndarray
    gross: np.ndarray
    net: np.ndarray
    aseen: np.ndarray
    alast: np.ndarray
    mark: np.ndarray
    has_mark: np.ndarray
    tree_net: np.ndarray
    tree_gross: np.ndarray
    since: np.ndarray

    @classmethod
    def empty(cls, book: _Book) -> _State:
        p, n_a, n_s = book.n_pairs, book.n_accounts, book.n_symbols
        return cls(
            q=np.zeros(p),
            a=np.zeros(p),
            r=np.zeros(p),
            ntr=np.zeros(p, np.int64),
            pseen=np.zeros(p, np.bool_),
            plast=np.full(p, _ALWAYS, np.int64),
            cash=np.zeros(n_a),
            peak=np.zeros(n_a),
            equity=np.zeros(n_a),
            gross=np.zeros(n_a),
            net=np.zeros(n_a),
            aseen=np.zeros(n_a, np.bool_),
            alast=np.full(n_a, _ALWAYS, np.int64),
            mark=np.zeros(max(n_s, 1)),
            has_mark=np.zeros(max(n_s, 1), np.bool_),
            # each node's high and low parts (see riskbook._kernels)
            tree_net=np.zeros(4 * int(book.tree_size.sum())),
            tree_gross=np.zeros(4 * int(book.tree_size.sum())),
            since=np.full(max(n_a, 1), _ALWAYS, np.int64),
        )


def _run(
    book: _Book, state: _State, live: np.ndarray, stop: int, emit: bool
) -> tuple[np.ndarray, ...]:
    """Fold rows [0, stop) into ``state``; with ``emit``, return the timelines' columns."""
    s = state
    n_pos = cap = 0
    if emit:
        kind, on = book.kind[:stop], live[:stop]
        n_pos = int(np.count_nonzero(on & (kind <= _ADJUST)))
        # At most one account row per own event and per holder of a marked symbol.
        # Pages of the arrays that are never written cost no memory.
        holders = np.diff(book.sym_ptr)[book.sym[:stop][on & (kind == _MARK)]]
        bound = int(np.count_nonzero(on & (kind != _MARK))) + int(holders.sum())
        cap = min(bound, max(2 * stop, 1 << 26))
    pos_out = [_empty(n_pos, t) for t in (np.int64, *[np.float64] * 3, np.int64, np.float64)]
    types = (np.int64, np.int32, *[np.float64] * 4)
    acc_out = [_empty(cap, t) for t in types]
    i, pi, ai = 0, 0, 0
    while True:
        i, pi, ai = _compiled().fold(
            i, stop, book.kind, book.bt, book.acct, book.sym, book.pair, book.x, book.y, live,
            book.pair_acct, book.pair_sym, book.acct_ptr, book.sym_ptr, book.sym_pairs,
            book.tree_off, book.tree_size, s.since,
            s.q, s.a, s.r, s.ntr, s.pseen, s.plast,
            s.cash, s.peak, s.equity, s.gross, s.net, s.aseen, s.alast,
            s.mark, s.has_mark, s.tree_net, s.tree_gross,
            emit, pi, ai, *pos_out, *acc_out,
        )  # fmt: skip
        if i >= stop:
            break
        grown = 2 * len(acc_out[0]) + book.n_pairs  # outputs full: grow, go on from i
        acc_out = [np.concatenate([o[:ai], np.empty(grown - ai, o.dtype)]) for o in acc_out]
    return (*(o[:pi] for o in pos_out), *(o[:ai] for o in acc_out))


# ----------------------------------------------------------------------------- carried state

_DAY_US = 86_400_000_000


@dataclass(frozen=True, eq=False)
class ProjectionState:
    """The state of the projection fold after some events, by name.

    A History whose ``start`` is a ProjectionState folds its events from it instead
    of from nothing: :func:`position_timeline` and :func:`account_timeline` give rows
    for its events only, with the figures going on from the state, and so do the
    metrics of the limit types built on them. The live processor keeps one of these
    between micro-batches (:meth:`after` of the last batch is the next one's start),
    so it never recomputes the history.

    Frames (times are ``Datetime("us", "UTC")``):

    * ``positions``: ``account_id, symbol, quantity, avg_price, realized_pnl, trades,
      last_event_at`` -- every (account, symbol) traded or adjusted so far;
    * ``accounts``: ``account_id, cash, peak_equity, updated_at``; exposure and equity
      follow from the positions and marks;
    * ``marks``: ``symbol, mark_price, marked_at`` -- the latest mark of each symbol;
    * ``days``: ``account_id, day`` (``Date``, UTC), ``volume`` -- each account's
      traded quantity on the latest UTC day it traded (for daily limits).

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> def fill(side, quantity, price, minute):
    ...     return riskbook.TradeExecuted(trade_id=str(uuid.uuid4()), account_id="ACC-1",
    ...         symbol="ACME", side=riskbook.Side(side), quantity=quantity, price=price,
    ...         executed_at=t + timedelta(minutes=minute))
    >>> first = riskbook.History.from_events(fill("Buy", 100.0, 10.0, 1))
    >>> then = riskbook.History.from_events(fill("Buy", 100.0, 12.0, 2))
    >>> then.start = ProjectionState.after(first)
    >>> position_timeline(then).select("quantity", "avg_price")
    shape: (1, 2)
    ┌──────────┬───────────┐
    │ quantity ┆ avg_price │
    │ ---      ┆ ---       │
    │ f64      ┆ f64       │
    ╞══════════╪═══════════╡
    │ 200.0    ┆ 11.0      │
    └──────────┴───────────┘
    """

    positions: pl.DataFrame
    accounts: pl.DataFrame
    marks: pl.DataFrame
    days: pl.DataFrame

    POSITIONS_SCHEMA: ClassVar[dict[str, pl.DataType]] = {
        "account_id": pl.String(),
        "symbol": pl.String(),
        "quantity": pl.Float64(),
        "avg_price": pl.Float64(),
        "realized_pnl": pl.Float64(),
        "trades": pl.Int64(),
        "last_event_at": _TIME,
    }
    ACCOUNTS_SCHEMA: ClassVar[dict[str, pl.DataType]] = {
        "account_id": pl.String(),
        "cash": pl.Float64(),
        "peak_equity": pl.Float64(),
        "updated_at": _TIME,
    }
    MARKS_SCHEMA: ClassVar[dict[str, pl.DataType]] = {
        "symbol": pl.String(),
        "mark_price": pl.Float64(),
        "marked_at": _TIME,
    }
    DAYS_SCHEMA: ClassVar[dict[str, pl.DataType]] = {
        "account_id": pl.String(),
        "day": pl.Date(),
        "volume": pl.Float64(),
    }

    @classmethod
    def empty(cls) -> ProjectionState:
        """The state before any event."""
        return cls(
            pl.DataFrame(schema=cls.POSITIONS_SCHEMA),
            pl.DataFrame(schema=cls.ACCOUNTS_SCHEMA),
            pl.DataFrame(schema=cls.MARKS_SCHEMA),
            pl.DataFrame(schema=cls.DAYS_SCHEMA),
        )

    @classmethod
    def after(cls, history: History, *, known_at: TimeLike = None) -> ProjectionState:
        """The state after every event of ``history`` (from its ``start``), as known at K."""
        _check_history(history)
        tl = _cache.timelines(history, _bound(known_at, "known_at"))
        return _final_state(tl)

    def day_volume(self) -> pl.DataFrame:
        """``days`` keyed like a daily metric: ``account_id`` and ``day`` (days since
        the epoch, Int64), ``volume``."""
        return self.days.select("account_id", pl.col("day").cast(pl.Int32).cast(pl.Int64), "volume")


def _names_index(names: pl.Series, values: pl.Series) -> np.ndarray:
    """Index of each of ``values`` in ``names`` (the book's dense, sorted names)."""
    if len(names) + len(values) <= 50_000:  # a dict is cheaper than a join at this size
        where = {n: i for i, n in enumerate(names.cast(pl.String).to_list())}
        return np.fromiter(
            (where[v] for v in values.cast(pl.String).to_list()), np.int64, len(values)
        )
    table = pl.DataFrame({"n": names.cast(pl.String), "i": np.arange(len(names), dtype=np.int64)})
    return (
        pl.DataFrame({"n": values.cast(pl.String)})
        .join(table, on="n", how="left", maintain_order="left")["i"]
        .to_numpy()
    )


def _seeded(book: _Book, start: ProjectionState) -> _State:
    """A fold state loaded from ``start`` (its names are all in the book)."""
    state = _State.empty(book)
    pos, acc, mk = start.positions, start.accounts, start.marks
    if pos.height:
        a = _names_index(book.account_names, pos["account_id"])
        s = _names_index(book.symbol_names, pos["symbol"])
        # each held (account, symbol) is a pair of the book (built with them): find it
        # by its key among the pairs' sorted keys
        n_sym = max(len(book.symbol_names), 1)
        keys = book.pair_acct.astype(np.int64) * n_sym + book.pair_sym
        want = a * n_sym + s
        by_key = np.argsort(keys, kind="stable")
        p = by_key[np.minimum(np.searchsorted(keys[by_key], want), len(keys) - 1)]
        if not np.array_equal(keys[p], want):
            raise AssertionError("a held position of the start state is not in the book")
        state.q[p] = pos["quantity"].to_numpy()
        state.a[p] = pos["avg_price"].to_numpy()
        state.r[p] = pos["realized_pnl"].to_numpy()
        state.ntr[p] = pos["trades"].to_numpy()
        state.pseen[p] = True
        state.plast[p] = _epoch_us(pos["last_event_at"])
    if mk.height:
        s = _names_index(book.symbol_names, mk["symbol"])
        state.mark[s] = mk["mark_price"].to_numpy()
        state.has_mark[s] = True
    _compiled().tree_init(
        state.q, state.a, book.pair_sym, state.mark, state.has_mark, book.acct_ptr,
        book.tree_off, book.tree_size, state.tree_net, state.tree_gross,
    )  # fmt: skip
    if acc.height:
        a = _names_index(book.account_names, acc["account_id"])
        state.cash[a] = acc["cash"].to_numpy()
        state.peak[a] = acc["peak_equity"].to_numpy()
        state.alast[a] = _epoch_us(acc["updated_at"])
        state.aseen[a] = True
        roots = book.tree_off[a] + 1
        state.net[a] = state.tree_net[2 * roots]  # the high parts (see riskbook._kernels)
        state.gross[a] = state.tree_gross[2 * roots]
        state.equity[a] = _equity(state.cash[a], state.net[a])
    return state


def _equity(cash: np.ndarray, net: np.ndarray) -> np.ndarray:
    """Equity ``cash + net`` as the fold adds them (:func:`riskbook._kernels.settle`)."""
    equity = np.empty(cash.shape[0])
    none = np.empty(0)
    _compiled().account_figures(cash, net, net, net, equity, none, none)  # gross, peak unread
    return equity


def _final_state(tl: _Timelines) -> ProjectionState:
    """The timelines' end state, by name (see :class:`ProjectionState`)."""
    book, st = tl.book, tl.final
    pairs = np.flatnonzero(st.pseen)
    positions = pl.DataFrame(
        {
            "account_id": book.account_names.gather(book.pair_acct[pairs]).cast(pl.String),
            "symbol": book.symbol_names.gather(book.pair_sym[pairs]).cast(pl.String),
            "quantity": st.q[pairs],
            "avg_price": st.a[pairs],
            "realized_pnl": st.r[pairs],
            "trades": st.ntr[pairs].astype(np.int64),
            "last_event_at": _from_us(st.plast[pairs]),
        }
    )
    accts = np.flatnonzero(st.aseen[: book.n_accounts])
    accounts_ = pl.DataFrame(
        {
            "account_id": book.account_names.gather(accts).cast(pl.String),
            "cash": st.cash[accts],
            "peak_equity": st.peak[accts],
            "updated_at": _from_us(st.alast[accts]),
        }
    )
    start = tl.start
    marks_ = _final_marks(tl, start)
    days = _final_days(tl, start)
    return ProjectionState(positions, accounts_, marks_, days)


def _final_marks(tl: _Timelines, start: ProjectionState | None) -> pl.DataFrame:
    """The latest live mark of each symbol in the book, else the start's."""
    book = tl.book
    on = tl.live & (book.kind == _MARK)
    if start is not None and not on.any():
        return start.marks
    marked = (
        pl.DataFrame({"s": book.sym[on].astype(np.int64), "t": book.bt[on], "x": book.x[on]})
        .group_by("s")
        .last()
    )  # book order is business order: last is latest
    new_marks = pl.DataFrame(
        {
            "symbol": book.symbol_names.gather(marked["s"]).cast(pl.String),
            "mark_price": marked["x"],
            "marked_at": _from_us(marked["t"]),
        }
    )
    old_marks = pl.DataFrame(schema=ProjectionState.MARKS_SCHEMA) if start is None else start.marks
    return pl.concat(
        [old_marks.filter(~pl.col("symbol").is_in(new_marks["symbol"].implode())), new_marks]
    ).sort("symbol")


def _final_days(tl: _Timelines, start: ProjectionState | None) -> pl.DataFrame:
    """The volume of each account's latest trading day, summed in fold order."""
    book = tl.book
    on = tl.live & (book.kind == _TRADE)
    if start is not None and not on.any():
        return start.days
    if int(on.sum()) <= 20_000:  # small (a live batch): one pass in fold order
        days: dict[str, tuple[int, float]] = {}
        if start is not None:
            for acc, day, volume in start.day_volume().iter_rows():
                days[acc] = (day, volume)
        names = book.account_names.cast(pl.String).to_list()
        for ac, t, x in zip(book.acct[on].tolist(), book.bt[on].tolist(), book.x[on].tolist(),
                            strict=True):  # fmt: skip
            acc, day = names[ac], t // _DAY_US
            known = days.get(acc)
            if known is None or day > known[0]:
                days[acc] = (day, abs(x))
            elif day == known[0]:
                days[acc] = (day, known[1] + abs(x))
        return pl.DataFrame(
            [(a, d, v) for a, (d, v) in sorted(days.items())],
            schema={"account_id": pl.String, "day": pl.Int64, "volume": pl.Float64},
            orient="row",
        ).with_columns(pl.col("day").cast(pl.Int32).cast(pl.Date))
    trades = pl.DataFrame(
        {
            "account_id": book.account_names.gather(book.acct[on]).cast(pl.String),
            "day": pl.Series(np.floor_divide(book.bt[on], _DAY_US)),
            "volume": np.abs(book.x[on]),
        }
    )
    old_days = (
        pl.DataFrame(schema={"account_id": pl.String, "day": pl.Int64, "volume": pl.Float64})
        if start is None
        else start.day_volume()
    )
    both = pl.concat([old_days, trades])
    return (
        both.filter(pl.col("day") == pl.col("day").max().over("account_id"))
        .group_by("account_id", maintain_order=True)
        .agg(pl.col("day").first(), pl.col("volume").cum_sum().last())
        .select("account_id", pl.col("day").cast(pl.Int32).cast(pl.Date), "volume")
        .sort("account_id")
    )


@dataclass(eq=False)
class _Timelines:
    """Both timelines of a History as known at K, and indexes to look up any T."""

    book: _Book
    live: np.ndarray
    p_ev: np.ndarray
    p_q: np.ndarray
    p_a: np.ndarray
    p_r: np.ndarray
    p_n: np.ndarray
    p_before: np.ndarray
    a_ev: np.ndarray
    a_acct: np.ndarray
    a_cash: np.ndarray
    a_gross: np.ndarray
    a_net: np.ndarray
    a_peak: np.ndarray
    final: _State
    """The state after every live row (from the start state, if any)."""
    start: ProjectionState | None
    _index: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def compute(cls, book: _Book, known_at: int, start: ProjectionState | None) -> _Timelines:
        live = book.live(known_at)
        state = _State.empty(book) if start is None else _seeded(book, start)
        (p_ev, p_q, p_a, p_r, p_n, p_before, a_ev, a_acct, a_cash, a_gross, a_net, a_peak) = _run(
            book, state, live, book.n, True
        )
        return cls(
            book, live, p_ev, p_q, p_a, p_r, p_n, p_before,
            a_ev, a_acct, a_cash, a_gross, a_net, a_peak, state, start,
        )  # fmt: skip

    def index(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ptr, order, book index) grouping rows by pair / account / symbol's marks."""
        if name not in self._index:
            b = self.book
            if name == "pairs":
                ev = self.p_ev
                ptr, order = _compiled().group(b.pair[ev].astype(np.int64), b.n_pairs)
            elif name == "accounts":
                ev = self.a_ev
                ptr, order = _compiled().group(self.a_acct.astype(np.int64), b.n_accounts)
            else:
                ev = np.flatnonzero(self.live & (b.kind == _MARK))
                ptr, order = _compiled().group(b.sym[ev].astype(np.int64), b.n_symbols)
            self._index[name] = (ptr, order, ev)
        return self._index[name]

    def last_rows(self, name: str, cut: int) -> np.ndarray:
        ptr, order, ev = self.index(name)
        return _compiled().last_before(ptr, order, ev, cut)


class _Cache:
    """Books and timelines per History, dropped with it, rebuilt when its frames change."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.entries: dict[int, tuple[tuple[Any, ...], _Book, OrderedDict[int, _Timelines]]] = {}

    @staticmethod
    def _frames(history: History) -> tuple[Any, ...]:
        return (
            history.trades,
            history.cancels,
            history.adjustments,
            history.marks,
            history.funding,
            history.start,
        )

    def book(self, history: History) -> tuple[_Book, OrderedDict[int, _Timelines]]:
        key = id(history)
        frames = self._frames(history)
        with self.lock:
            entry = self.entries.get(key)
        if entry is not None and all(a is b for a, b in zip(entry[0], frames, strict=True)):
            return entry[1], entry[2]
        start = history.start
        if start is None:
            book = _build_book(history)
        else:
            _refuse_busts_of_the_start(history)
            held = start.positions.select("account_id", "symbol").rows()
            book = _build_book(
                history,
                held,
                start.accounts["account_id"].to_list(),
                start.marks["symbol"].to_list(),
            )
        timelines: OrderedDict[int, _Timelines] = OrderedDict()
        with self.lock:
            if key not in self.entries:
                weakref.finalize(history, self._drop, key)
            self.entries[key] = (frames, book, timelines)
        return book, timelines

    def _drop(self, key: int) -> None:
        with self.lock:
            self.entries.pop(key, None)

    def timelines(self, history: History, known_at: int) -> _Timelines:
        book, per_k = self.book(history)
        with self.lock:
            found = per_k.get(known_at)
            if found is not None:
                per_k.move_to_end(known_at)
                return found
        computed = _Timelines.compute(book, known_at, history.start)
        with self.lock:
            per_k[known_at] = computed
            while len(per_k) > self.size:
                per_k.popitem(last=False)
        return computed


_cache = _Cache(size=2)


def _check_history(
    history: History,
    what: str | None = None,
    *,
    every_symbol: bool = False,
    limits_only: bool = False,
) -> None:
    """A History, whole enough for ``what`` (a function's name; None: any History).

    Figures fold every earlier event: a History loaded with ``since`` has lost the state
    before it (cash, positions, the limits in force) and would give wrong figures with
    no error; account figures (``every_symbol``) need every symbol of the account, which
    a ``symbols`` filter leaves out. ``until``, ``known_at`` and ``accounts`` keep
    everything the figures need.
    """
    if not isinstance(history, History):
        raise TypeError(f"expected a riskbook History, got {type(history).__name__}")
    f = history.filters
    if what is None or history.start is not None:
        return
    if f.since is not None:  # limits_only: ``what`` reads only the LimitSets
        needs, lost = (
            ("LimitSet", "the limits set before it are")
            if limits_only
            else ("event", "what came before (cash, positions, limits) is")
        )
        raise RiskbookError(
            f"{what} needs every earlier {needs}: this History was loaded with since="
            f"{format_time(f.since)}, so {lost} missing; load it without since (and pass "
            "at= for a time)"
        )
    if every_symbol and f.symbols is not None:
        raise RiskbookError(
            f"{what} needs every symbol of an account: this History was loaded with "
            f"symbols={list(f.symbols)}; load it without symbols (positions() gives the "
            "per-symbol figures of this one)"
        )


# ----------------------------------------------------------------------------- frames out

_POSITIONS_SCHEMA: dict[str, pl.DataType] = {
    "account_id": _CAT,
    "symbol": _CAT,
    "quantity": pl.Float64(),
    "avg_price": pl.Float64(),
    "realized_pnl": pl.Float64(),
    "mark_price": pl.Float64(),
    "market_value": pl.Float64(),
    "unrealized_pnl": pl.Float64(),
    "trades": pl.Int64(),
    "last_event_at": _TIME,
}

_ACCOUNTS_SCHEMA: dict[str, pl.DataType] = {
    "account_id": _CAT,
    "cash": pl.Float64(),
    "equity": pl.Float64(),
    "gross_exposure": pl.Float64(),
    "net_exposure": pl.Float64(),
    "leverage": pl.Float64(),
    "drawdown": pl.Float64(),
    "peak_equity": pl.Float64(),
    "realized_pnl": pl.Float64(),
    "unrealized_pnl": pl.Float64(),
    "open_positions": pl.UInt32(),
    "updated_at": _TIME,
}


def _positions_frame(
    book: _Book,
    pairs: np.ndarray,
    q: np.ndarray,
    a: np.ndarray,
    r: np.ndarray,
    ntr: np.ndarray,
    last: np.ndarray,
    mark: np.ndarray,
    has_mark: np.ndarray,
) -> pl.DataFrame:
    """Position rows for the given pair indices (arrays indexed like ``pairs``)."""
    acc = book.pair_acct[pairs]
    sym = book.pair_sym[pairs]
    mark_price = (
        pl.Series("mark_price", mark[sym], dtype=pl.Float64).scatter(
            np.flatnonzero(~has_mark[sym]), None
        )
        if len(pairs)
        else pl.Series("mark_price", [], dtype=pl.Float64)
    )
    value = pl.coalesce("mark_price", "avg_price")
    out = pl.DataFrame(
        {
            "account_id": book.account_names.gather(acc),
            "symbol": book.symbol_names.gather(sym),
            "quantity": q,
            "avg_price": a,
            "realized_pnl": r,
            "mark_price": mark_price,
            "trades": ntr.astype(np.int64),
            "last_event_at": _from_us(last),
        }
    ).with_columns(
        market_value=market_value("quantity", value),
        unrealized_pnl=unrealized_pnl("quantity", value, "avg_price"),
    )
    return out.select(list(_POSITIONS_SCHEMA))


def _accounts_frame(
    book: _Book,
    accts: np.ndarray,
    cash: np.ndarray,
    equity: np.ndarray,
    gross: np.ndarray,
    net: np.ndarray,
    peak: np.ndarray,
    last: np.ndarray,
    positions_frame: pl.DataFrame,
) -> pl.DataFrame:
    figures = pl.DataFrame(
        {
            "account_id": book.account_names.gather(accts),
            "cash": cash,
            "equity": equity,
            "gross_exposure": gross,
            "net_exposure": net,
            "peak_equity": peak,
            "updated_at": _from_us(last),
        }
    )
    pnl = positions_frame.group_by("account_id").agg(
        realized_pnl=pl.col("realized_pnl").sum(),
        unrealized_pnl=pl.col("unrealized_pnl").sum(),
        open_positions=(pl.col("quantity") != 0).sum(),
    )
    out = figures.join(pnl, on="account_id", how="left", maintain_order="left").with_columns(
        leverage("gross_exposure", "equity"),
        drawdown("equity", "peak_equity"),
        pl.col("realized_pnl", "unrealized_pnl").fill_null(0.0),
        pl.col("open_positions").fill_null(0).cast(pl.UInt32),
    )
    return out.select(list(_ACCOUNTS_SCHEMA))


def _state_frames(tl: _Timelines, cut: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Positions and accounts at the book prefix [0, cut) from the timelines."""
    book = tl.book
    if tl.start is not None:
        if cut < book.n:
            raise ValueError(
                "at= needs the whole history: this History goes on from a start state "
                "(history.start), so only the state after all of it is known"
            )
        st = tl.final
        pairs = np.flatnonzero(st.pseen)
        pos = _positions_frame(
            book, pairs, st.q[pairs], st.a[pairs], st.r[pairs], st.ntr[pairs],
            st.plast[pairs], st.mark, st.has_mark,
        )  # fmt: skip
        accts = np.flatnonzero(st.aseen[: book.n_accounts])
        acc = _accounts_frame(
            book, accts, st.cash[accts], st.equity[accts], st.gross[accts],
            st.net[accts], st.peak[accts], st.alast[accts], pos,
        )  # fmt: skip
        return pos, acc
    prow = tl.last_rows("pairs", cut)
    pairs = np.flatnonzero(prow >= 0)
    rows = prow[pairs]
    mrow = tl.last_rows("marks", cut)
    _, _, mark_ev = tl.index("marks")
    has_mark = mrow >= 0
    mark = np.zeros(book.n_symbols)
    mark[has_mark] = book.x[mark_ev[mrow[has_mark]]]
    pos = _positions_frame(
        book,
        pairs,
        tl.p_q[rows],
        tl.p_a[rows],
        tl.p_r[rows],
        tl.p_n[rows],
        book.bt[tl.p_ev[rows]],
        mark,
        has_mark,
    )
    arow = tl.last_rows("accounts", cut)
    accts = np.flatnonzero(arow >= 0)
    rows = arow[accts]
    acc = _accounts_frame(
        book,
        accts,
        tl.a_cash[rows],
        _equity(tl.a_cash[rows], tl.a_net[rows]),  # the fold's own addition
        tl.a_gross[rows],
        tl.a_net[rows],
        tl.a_peak[rows],
        book.bt[tl.a_ev[rows]],
        pos,
    )
    return pos, acc


# ----------------------------------------------------------------------------- public


@with_large_arrays
def positions(history: History, *, at: TimeLike = None, known_at: TimeLike = None) -> pl.DataFrame:
    """Average-cost positions per (account, symbol) at business time ``at`` as known at ``known_at``.

    Parameters
    ----------
    history : the History to read.
    at : business time T (datetime with a zone or RFC 3339); events that happened by T.
        None: everything.
    known_at : recorded time K; only events the store had recorded by K (busts known by
        K remove their trades). None: everything.

    Returns
    -------
    pl.DataFrame
        One row per (account, symbol) with a trade or adjustment by T, sorted by account
        and symbol: ``account_id, symbol, quantity, avg_price, realized_pnl, mark_price``
        (null while the symbol has no mark), ``market_value, unrealized_pnl`` (at the
        mark, or at the average cost while there is none), ``trades`` (fills counted,
        busts excluded), ``last_event_at`` (business time of its last trade or adjustment).

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> history = riskbook.History.from_events  # each event recorded when it happened
    >>> h = history(riskbook.TradeExecuted(trade_id="T-1", account_id="ACC-1", symbol="ACME",
    ...     side=riskbook.Side.Sell, quantity=5.0, price=20.0, executed_at=t))
    >>> positions(h).select("account_id", "symbol", "quantity", "avg_price", "market_value")
    shape: (1, 5)
    ┌────────────┬────────┬──────────┬───────────┬──────────────┐
    │ account_id ┆ symbol ┆ quantity ┆ avg_price ┆ market_value │
    │ ---        ┆ ---    ┆ ---      ┆ ---       ┆ ---          │
    │ cat        ┆ cat    ┆ f64      ┆ f64       ┆ f64          │
    ╞════════════╪════════╪══════════╪═══════════╪══════════════╡
    │ ACC-1      ┆ ACME   ┆ -5.0     ┆ 20.0      ┆ -100.0       │
    └────────────┴────────┴──────────┴───────────┴──────────────┘
    >>> positions(h, at=t - timedelta(seconds=1)).height
    0
    """
    _check_history(history, "positions")
    tl = _cache.timelines(history, _bound(known_at, "known_at"))
    return _state_frames(tl, tl.book.cut(_bound(at, "at")))[0]


@with_large_arrays
def accounts(history: History, *, at: TimeLike = None, known_at: TimeLike = None) -> pl.DataFrame:
    """Cash, equity, exposure, leverage and drawdown per account at T as known at K.

    One row per account with a trade, adjustment or funding by T: ``account_id, cash,
    equity, gross_exposure, net_exposure, leverage, drawdown, peak_equity, realized_pnl,
    unrealized_pnl, open_positions, updated_at`` (business time of the account's last
    timeline row). ``at`` / ``known_at`` as in :func:`positions`. The figures are the
    last row of :func:`account_timeline` at or before T.

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> history = riskbook.History.from_events  # each event recorded when it happened
    >>> h = history(riskbook.AccountFunded(account_id="ACC-1", amount=1000.0, funded_at=t))
    >>> accounts(h).select("account_id", "cash", "equity", "leverage", "peak_equity")
    shape: (1, 5)
    ┌────────────┬────────┬────────┬──────────┬─────────────┐
    │ account_id ┆ cash   ┆ equity ┆ leverage ┆ peak_equity │
    │ ---        ┆ ---    ┆ ---    ┆ ---      ┆ ---         │
    │ cat        ┆ f64    ┆ f64    ┆ f64      ┆ f64         │
    ╞════════════╪════════╪════════╪══════════╪═════════════╡
    │ ACC-1      ┆ 1000.0 ┆ 1000.0 ┆ 0.0      ┆ 1000.0      │
    └────────────┴────────┴────────┴──────────┴─────────────┘
    """
    _check_history(history, "accounts", every_symbol=True)
    tl = _cache.timelines(history, _bound(known_at, "known_at"))
    return _state_frames(tl, tl.book.cut(_bound(at, "at")))[1]


@with_large_arrays
def marks(history: History, *, at: TimeLike = None, known_at: TimeLike = None) -> pl.DataFrame:
    """The mark of each symbol at T: its latest PriceMarked with business time <= T.

    Returns ``symbol, mark_price, marked_at`` for every symbol marked by T (recorded by
    K), sorted by symbol.

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> history = riskbook.History.from_events  # each event recorded when it happened
    >>> h = history(*[riskbook.PriceMarked(symbol="ACME", price=p,
    ...     marked_at=t + timedelta(minutes=i)) for i, p in enumerate([10.0, 11.0])])
    >>> marks(h, at=t).select("symbol", "mark_price")
    shape: (1, 2)
    ┌────────┬────────────┐
    │ symbol ┆ mark_price │
    │ ---    ┆ ---        │
    │ cat    ┆ f64        │
    ╞════════╪════════════╡
    │ ACME   ┆ 10.0       │
    └────────┴────────────┘
    """
    _check_history(history, "marks")
    tl = _cache.timelines(history, _bound(known_at, "known_at"))
    book = tl.book
    if history.start is not None:
        _state_frames(tl, book.cut(_bound(at, "at")))  # at= is refused here too
        return _final_state(tl).marks.with_columns(pl.col("symbol").cast(_CAT))
    mrow = tl.last_rows("marks", book.cut(_bound(at, "at")))
    _, _, ev = tl.index("marks")
    syms = np.flatnonzero(mrow >= 0)
    rows = ev[mrow[syms]]
    return pl.DataFrame(
        {
            "symbol": book.symbol_names.gather(syms),
            "mark_price": book.x[rows],
            "marked_at": _from_us(book.bt[rows]),
        }
    )


_EVENT_TYPES = pl.Series("event_type", _KIND_NAMES, dtype=_EVENT_TYPE)


def _event_columns(book: _Book, ev: np.ndarray, *columns: str) -> Callable[[], pl.DataFrame]:
    """Columns ``occurred_at, timestamp, position, event_id, event_type, trade_id,
    symbol`` of book rows ``ev``: call the returned function for the frame.

    Times, positions and types come from the book's arrays (a compiled gather, and
    numpy arrays become Series without a copy); only the strings and symbols are
    gathered from ``source``, on a helper thread while the caller goes on until it
    asks for the frame (the compiled gathers and folds release the GIL, and Polars'
    gather of strings alone keeps one core of two busy).
    """
    rows = _gather(ev, book.row)  # rows of source (and of pos)
    named = [c for c in columns if c in ("event_id", "trade_id", "symbol")]
    strings = (
        _soon(
            len(rows) <= _SMALL_ROWS,
            lambda: book.outputs().select(pl.col(*named).gather(pl.Series(rows))),
        )
        if named
        else None
    )
    out: dict[str, pl.Series] = {}
    for c in columns:
        if c in ("occurred_at", "timestamp"):
            out[c] = pl.Series(c, _gather(ev, book.bt if c == "occurred_at" else book.ts)).cast(
                _TIME
            )
        elif c == "position":
            out[c] = pl.Series(c, _gather(rows, book.pos))
        elif c == "event_type":
            out[c] = _EVENT_TYPES.gather(pl.Series(_gather(ev, book.kind)))

    def frame() -> pl.DataFrame:
        if strings is not None:
            out.update((s.name, s) for s in strings.result().get_columns())
        return pl.DataFrame([out[c] for c in columns])

    return frame


_SMALL_ROWS = 20_000
"""Up to this many rows (a live batch), work is done in the calling thread: handing it
to the helper thread and waking the caller again costs more than it saves."""


def _soon(inline: bool, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    """``fn(*args)`` on the helper thread, or at once if ``inline``: a Future either way."""
    if not inline:
        return _helper().submit(fn, *args)
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()
    done.set_result(fn(*args))
    return done


def _helper() -> concurrent.futures.ThreadPoolExecutor:
    """The one helper thread of this process (keyed by pid: a forked child has no thread
    of its parent's; Polars' own pool does not survive a fork either, so use spawn)."""
    return _helper_of(os.getpid())


@functools.cache
def _helper_of(pid: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="riskbook")


@with_large_arrays
def position_timeline(
    history: History,
    *,
    at: TimeLike = None,
    known_at: TimeLike = None,
    columns: Sequence[str] | None = None,
) -> pl.DataFrame:
    """The position after every trade and adjustment that moves it, in order.

    One row per live TradeExecuted / PositionUpdated (known by K, not busted by K) that
    happened by T (business time <= ``at``; None: all):
    ``account_id, symbol, occurred_at`` (business time), ``timestamp`` (recorded),
    ``position`` (global), ``event_id, event_type, trade_id, signed_quantity`` (the
    fill's signed quantity, or ``new - q`` for an adjustment), ``price`` (the fill's;
    null for an adjustment), then the position after it: ``quantity, avg_price,
    realized_pnl, trades``. Rows are in the order of DESIGN.md §4.

    ``columns``: build only these (in this order), e.g. for a limit type's metric;
    the columns not asked for cost nothing. Default: all of
    :data:`POSITION_TIMELINE_COLUMNS`.

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> history = riskbook.History.from_events  # each event recorded when it happened
    >>> fills = [("Buy", 100.0, 10.0), ("Buy", 100.0, 12.0), ("Sell", 150.0, 15.0),
    ...          ("Sell", 100.0, 9.0)]
    >>> h = history(*[riskbook.TradeExecuted(trade_id=f"T-{i}", account_id="ACC-1",
    ...     symbol="ACME", side=riskbook.Side(side), quantity=qty, price=price,
    ...     executed_at=t + timedelta(minutes=i)) for i, (side, qty, price) in enumerate(fills)])
    >>> position_timeline(h).select("signed_quantity", "price", "quantity", "avg_price",
    ...     "realized_pnl")
    shape: (4, 5)
    ┌─────────────────┬───────┬──────────┬───────────┬──────────────┐
    │ signed_quantity ┆ price ┆ quantity ┆ avg_price ┆ realized_pnl │
    │ ---             ┆ ---   ┆ ---      ┆ ---       ┆ ---          │
    │ f64             ┆ f64   ┆ f64      ┆ f64       ┆ f64          │
    ╞═════════════════╪═══════╪══════════╪═══════════╪══════════════╡
    │ 100.0           ┆ 10.0  ┆ 100.0    ┆ 10.0      ┆ 0.0          │
    │ 100.0           ┆ 12.0  ┆ 200.0    ┆ 11.0      ┆ 0.0          │
    │ -150.0          ┆ 15.0  ┆ 50.0     ┆ 11.0      ┆ 600.0        │
    │ -100.0          ┆ 9.0   ┆ -50.0    ┆ 9.0       ┆ 500.0        │
    └─────────────────┴───────┴──────────┴───────────┴──────────────┘
    """
    _check_history(history, "position_timeline")
    names = _wanted(columns, POSITION_TIMELINE_COLUMNS, "position_timeline")
    tl = _cache.timelines(history, _bound(known_at, "known_at"))
    book = tl.book
    n = _rows_by(tl.p_ev, book, at)
    ev = tl.p_ev[:n]
    event = [c for c in ("symbol", *_EVENT_COLUMNS) if c in names]
    event_frame = _event_columns(book, ev, *event) if event else None
    out: dict[str, pl.Series] = {}
    if "account_id" in names:
        pair = _gather(ev, book.pair)
        acct = pl.Series(_gather(pair, book.pair_acct))
        out["account_id"] = book.account_names.gather(acct).alias("account_id")
    if {"signed_quantity", "price"} & names:
        is_trade = _gather(ev, book.kind) == _TRADE
        if "signed_quantity" in names:
            x = _gather(ev, book.x)
            out["signed_quantity"] = pl.Series(
                "signed_quantity", np.where(is_trade, x, x - tl.p_before[:n])
            )
        if "price" in names:
            price = pl.Series("price", _gather(ev, book.y), dtype=pl.Float64)
            if len(ev) and not is_trade.all():
                price = price.scatter(np.flatnonzero(~is_trade), None)
            out["price"] = price
    for name, values in (("quantity", tl.p_q), ("avg_price", tl.p_a),
                         ("realized_pnl", tl.p_r), ("trades", tl.p_n)):  # fmt: skip
        if name in names:
            out[name] = pl.Series(name, values[:n])
    if event_frame is not None:
        out.update((s.name, s) for s in event_frame().get_columns())
    return pl.DataFrame([out[c] for c in _order(columns, POSITION_TIMELINE_COLUMNS)])


@with_large_arrays
def account_timeline(
    history: History,
    *,
    at: TimeLike = None,
    known_at: TimeLike = None,
    columns: Sequence[str] | None = None,
) -> pl.DataFrame:
    """An account's figures after every event that moves them, in order.

    One row per (event, account) for the account's own trades, adjustments and
    funding, and for each mark of a symbol the account holds (q != 0) at that moment:
    ``account_id, occurred_at, timestamp, position, event_id, event_type, symbol``
    (null for funding), ``cash, equity, gross_exposure, net_exposure, leverage,
    drawdown, peak_equity``. The state at T is the last row at or before T.
    ``at`` / ``known_at`` as in :func:`positions`: rows of events that happened by T
    (the rows of the whole timeline with ``occurred_at <= at``) as known at K.
    ``columns``: build only these (in this order); default all of
    :data:`ACCOUNT_TIMELINE_COLUMNS`.

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> history = riskbook.History.from_events  # each event recorded when it happened
    >>> h = history(riskbook.AccountFunded(account_id="ACC-1", amount=1000.0, funded_at=t),
    ...     riskbook.TradeExecuted(trade_id="T-1", account_id="ACC-1", symbol="ACME",
    ...         side=riskbook.Side.Buy, quantity=100.0, price=10.0, executed_at=t),
    ...     riskbook.PriceMarked(symbol="ACME", price=8.0, marked_at=t + timedelta(hours=1)),
    ...     riskbook.AccountFunded(account_id="ACC-1", amount=500.0,
    ...         funded_at=t + timedelta(hours=2)))
    >>> account_timeline(h).select("event_type", "cash", "equity", "peak_equity", "drawdown")
    shape: (4, 5)
    ┌───────────────┬────────┬────────┬─────────────┬──────────┐
    │ event_type    ┆ cash   ┆ equity ┆ peak_equity ┆ drawdown │
    │ ---           ┆ ---    ┆ ---    ┆ ---         ┆ ---      │
    │ enum          ┆ f64    ┆ f64    ┆ f64         ┆ f64      │
    ╞═══════════════╪════════╪════════╪═════════════╪══════════╡
    │ AccountFunded ┆ 1000.0 ┆ 1000.0 ┆ 1000.0      ┆ 0.0      │
    │ TradeExecuted ┆ 0.0    ┆ 1000.0 ┆ 1000.0      ┆ 0.0      │
    │ PriceMarked   ┆ 0.0    ┆ 800.0  ┆ 1000.0      ┆ 0.2      │
    │ AccountFunded ┆ 500.0  ┆ 1300.0 ┆ 1500.0      ┆ 0.133333 │
    └───────────────┴────────┴────────┴─────────────┴──────────┘
    """
    _check_history(history, "account_timeline", every_symbol=True)
    names = _wanted(columns, ACCOUNT_TIMELINE_COLUMNS, "account_timeline")
    tl = _cache.timelines(history, _bound(known_at, "known_at"))
    book = tl.book
    n = _rows_by(tl.a_ev, book, at)
    cash, gross, net, peak = tl.a_cash[:n], tl.a_gross[:n], tl.a_net[:n], tl.a_peak[:n]
    out: dict[str, pl.Series] = {}
    if "account_id" in names:
        out["account_id"] = book.account_names.gather(pl.Series(tl.a_acct[:n])).alias("account_id")
    event = [c for c in ACCOUNT_TIMELINE_COLUMNS[1:7] if c in names]
    event_frame = _event_columns(book, tl.a_ev[:n], *event) if event else None
    figures = [c for c in ("equity", "leverage", "drawdown") if c in names]
    if figures:
        # equity, leverage and drawdown as leverage() and drawdown() compute them (the
        # same operations, so the same numbers), in one compiled pass instead of three
        # when/then; a figure not asked for gets an empty array and is not written
        equity, lev, dd = (
            _empty(n if c in figures else 0) for c in ("equity", "leverage", "drawdown")
        )
        _compiled().account_figures(cash, gross, net, peak, equity, lev, dd)
        out.update(
            (c, pl.Series(c, a))
            for c, a in zip(("equity", "leverage", "drawdown"), (equity, lev, dd), strict=True)
            if c in figures
        )
    for name, values in (("cash", cash), ("gross_exposure", gross),
                         ("net_exposure", net), ("peak_equity", peak)):  # fmt: skip
        if name in names:
            out[name] = pl.Series(name, values)
    if event_frame is not None:
        out.update((s.name, s) for s in event_frame().get_columns())
    return pl.DataFrame([out[c] for c in _order(columns, ACCOUNT_TIMELINE_COLUMNS)])


def _rows_by(ev: np.ndarray, book: _Book, at: TimeLike) -> int:
    """How many timeline rows (of book rows ``ev``, in book order) happened by ``at``."""
    if at is None:
        return int(ev.shape[0])
    return int(np.searchsorted(ev, book.cut(_bound(at, "at")), side="left"))


def _order(columns: Sequence[str] | None, every: tuple[str, ...]) -> Sequence[str]:
    return every if columns is None else columns


def _wanted(columns: Sequence[str] | None, every: tuple[str, ...], what: str) -> set[str]:
    """The columns asked for (all by default), checked against ``every``."""
    if columns is None:
        return set(every)
    if isinstance(columns, str):
        raise TypeError(f"{what}: columns must be a list of column names, not a string")
    unknown = [c for c in columns if c not in every]
    if unknown:
        raise ValueError(
            f"{what} has no column(s) {', '.join(map(repr, unknown))}; its columns are "
            + ", ".join(every)
        )
    if len(set(columns)) != len(columns):
        raise ValueError(f"{what}: a column is asked for twice in {list(columns)}")
    return set(columns)


@with_large_arrays
def adjustment_mismatches(
    history: History, *, at: TimeLike = None, known_at: TimeLike = None
) -> pl.DataFrame:
    """PositionUpdated events whose ``previous_quantity`` is not the projected quantity.

    A reconciliation mismatch (DESIGN.md §4): the adjustment is applied all the same
    (q becomes ``new_quantity``), and reported here; only adjustments that happened by
    T (``at``) as known at K (``known_at``), as in :func:`positions`. Quantities are
    compared with a relative tolerance of 1e-9, so that float rounding of fractional
    fills is not reported, whatever the size of a unit (fills that cancel leave exactly
    0, not dust). Returns ``account_id, symbol,
    occurred_at, timestamp, position, event_id, previous_quantity, projected_quantity,
    new_quantity, difference`` (``previous_quantity - projected_quantity``).

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timedelta, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> history = riskbook.History.from_events  # each event recorded when it happened
    >>> h = history(riskbook.TradeExecuted(trade_id="T-1", account_id="ACC-1", symbol="ACME",
    ...         side=riskbook.Side.Buy, quantity=100.0, price=10.0, executed_at=t),
    ...     riskbook.PositionUpdated(account_id="ACC-1", symbol="ACME", previous_quantity=90.0,
    ...         new_quantity=95.0, reason="reconciliation", updated_at=t + timedelta(hours=1)))
    >>> adjustment_mismatches(h).select("previous_quantity", "projected_quantity", "difference")
    shape: (1, 3)
    ┌───────────────────┬────────────────────┬────────────┐
    │ previous_quantity ┆ projected_quantity ┆ difference │
    │ ---               ┆ ---                ┆ ---        │
    │ f64               ┆ f64                ┆ f64        │
    ╞═══════════════════╪════════════════════╪════════════╡
    │ 90.0              ┆ 100.0              ┆ -10.0      │
    └───────────────────┴────────────────────┴────────────┘
    """
    _check_history(history, "adjustment_mismatches")
    tl = _cache.timelines(history, _bound(known_at, "known_at"))
    book = tl.book
    n = _rows_by(tl.p_ev, book, at)
    keep = book.kind[tl.p_ev[:n]] == _ADJUST
    ev = tl.p_ev[:n][keep]
    before = tl.p_before[:n][keep]
    prev = book.y[ev]
    # relative alone: an absolute floor hid a whole position in dispute where units are
    # small (5e-10 of a coin at 1e12 against a reported 0); dust of fills that cancel is
    # exactly 0 in the fold already (settle)
    bad = np.abs(prev - before) > 1e-9 * np.maximum(np.abs(prev), np.abs(before))
    ev, before, prev = ev[bad], before[bad], prev[bad]
    pair = book.pair[ev]
    cols = _event_columns(book, ev, "occurred_at", "timestamp", "position", "event_id", "symbol")()
    return pl.DataFrame(
        {
            "account_id": book.account_names.gather(pl.Series(book.pair_acct[pair])),
            "symbol": cols["symbol"],
            "occurred_at": cols["occurred_at"],
            "timestamp": cols["timestamp"],
            "position": cols["position"],
            "event_id": cols["event_id"],
            "previous_quantity": prev,
            "projected_quantity": before,
            "new_quantity": book.x[ev],
            "difference": prev - before,
        }
    )


# ----------------------------------------------------------------------------- snapshots


def _ids(value: str | Iterable[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    out = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) and v for v in out):
        raise ValueError(f"{name} must be non-empty strings")
    return out


def _opened(store: object) -> Store:
    """A store opened on ``store``, a DSN or None (``RISKBOOK_DSN``, else the embedded
    server), as :func:`riskbook.load` takes it; the caller closes it. Anything else (a
    History given for the store, say) is refused, naming what it is."""
    if store is None or isinstance(store, str):
        return connect(store)
    raise TypeError(
        f"store must be a Store, a DSN or None (the default store), got {type(store).__name__}"
    )


def _store_id(store: Store) -> str | None:
    with store.connection() as conn:
        row = conn.execute("SELECT store_id::text FROM riskbook_store").fetchone()
    return None if row is None else str(row[0])


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


@with_large_arrays
def write_snapshots(
    store: Store | str | None = None,
    history: History | None = None,
    *,
    at: TimeLike | Iterable[datetime | str] = None,
    every: int | None = None,
) -> int:
    """Write state snapshots of every account to ``position_snapshots``.

    A snapshot is the state of one account (cash, peak, equity, exposure and every
    position it ever had: quantity, average, realized PnL, trade count) after all the
    events with business time <= its ``snapshot_at`` that the store held when it was
    written (``position`` is the last global position covered), as they are known now
    (busts applied). :func:`state_at` starts from the nearest one.

    Parameters
    ----------
    store : the store to write to (and to read the history from if none is given): a
        :class:`~riskbook.Store`, a DSN, or None (the default store).
    history : the store's history, loaded without symbol, time or known_at filters (an
        accounts filter is fine); default: loaded now.
    at : write one snapshot per account at business time ``at`` (or at each of several
        times: the end of every trading day, say).
    every : write one per account after every ``every``-th event that moved it (a row
        of its :func:`account_timeline`: its trades, adjustments and funding, and the
        marks of symbols it held), at that event's business time. Counting marks keeps
        snapshots of a quiet account that holds positions close together in time: the
        rebuild folds the marks after a snapshot, since they move equity and the peak.

    With neither, one snapshot per account at the latest business time. Snapshots
    already stored are not written again. Returns the number written.

    Examples
    --------
    >>> import riskbook  # doctest: +SKIP
    >>> store = riskbook.connect()  # doctest: +SKIP
    >>> write_snapshots(store, every=1_000)  # doctest: +SKIP
    4127
    """
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be a positive number of events, got {every!r}")
    if not isinstance(store, Store):
        with _opened(store) as opened:
            return write_snapshots(opened, history, at=at, every=every)
    from riskbook.frames import load

    if history is None:
        history = load(store, cache=False, progress=False)
    _check_history(history)
    f = history.filters
    if (
        f.symbols is not None
        or f.since is not None
        or f.until is not None
        or f.known_at is not None
    ):
        raise RiskbookError(
            "snapshots need the whole history of their accounts: load it without "
            "symbols, since, until or known_at filters"
        )
    store_id = _store_id(store)
    if history.store_id is not None and history.store_id != store_id:
        raise RiskbookError("this History was loaded from another store")
    tl = _cache.timelines(history, _NEVER - 1)
    book = tl.book
    if book.n == 0:
        return 0
    accts_l: list[np.ndarray] = []
    times_l: list[np.ndarray] = []
    if at is None:
        ats = [] if every is not None else [int(book.bt[-1])]
    elif isinstance(at, str | datetime):
        ats = [_bound(at, "at")]
    else:
        ats = [_bound(t, "at") for t in at]
    for t in ats:
        last = tl.last_rows("accounts", book.cut(t))
        found = np.flatnonzero(last >= 0)
        accts_l.append(found)
        times_l.append(np.full(found.shape[0], t, np.int64))
    if every is not None:
        ptr, order, _ = tl.index("accounts")
        ordinal = np.empty(order.shape[0], np.int64)
        ordinal[order] = np.arange(order.shape[0]) - np.repeat(ptr[:-1], np.diff(ptr))
        pick = np.flatnonzero((ordinal + 1) % every == 0)
        accts_l.append(tl.a_acct[pick].astype(np.int64))
        times_l.append(book.bt[tl.a_ev[pick]])
    if not accts_l:
        return 0
    wanted = np.unique(np.stack([np.concatenate(accts_l), np.concatenate(times_l)]), axis=1)
    accts_w, times_w = wanted[0], wanted[1]
    cuts = np.searchsorted(book.bt, times_w, side="right")
    aptr, aorder, aev = tl.index("accounts")
    arow = _compiled().last_before_each(aptr, aorder, aev, accts_w, cuts)
    # Each snapshot's positions: every pair of its account, at its cut.
    n_pairs = np.diff(book.acct_ptr)[accts_w]
    starts = np.concatenate([[0], np.cumsum(n_pairs)]).astype(np.int64)
    q_snap = np.repeat(np.arange(accts_w.shape[0]), n_pairs)
    q_pair = np.repeat(book.acct_ptr[accts_w], n_pairs) + np.arange(starts[-1]) - starts[q_snap]
    pptr, porder, pev = tl.index("pairs")
    prow = _compiled().last_before_each(pptr, porder, pev, q_pair, cuts[q_snap])
    # Latest recorded time among the events (and busts) a state at T depends on.
    seen = np.where(book.bust == _NEVER, book.ts, np.maximum(book.ts, book.bust))
    known = np.maximum.accumulate(seen)
    sequences = _account_sequences(history)
    horizon = int(history.horizon) - 1
    names = book.account_names.cast(pl.String).to_list()
    symbols = book.symbol_names.cast(pl.String).to_list()

    def figure(x: Any) -> float | str:
        """A figure for the snapshot's JSON (jsonb has no infinities or NaN): a finite
        one as a number, the others as the strings ``"Infinity"``, ``"-Infinity"`` and
        ``"NaN"``, which :func:`state_at` reads back as those floats. (Figures that
        overflow: a finite trade of 1e300 at 1e10 costs infinite cash; leverage, made
        from equity and exposure, is infinite when equity <= 0.)"""
        x = float(x)
        if math.isfinite(x):
            return x
        return "NaN" if math.isnan(x) else "Infinity" if x > 0 else "-Infinity"

    rows = []
    for k in range(accts_w.shape[0]):
        r = arow[k]
        if r < 0:
            continue
        held = []
        for j in range(starts[k], starts[k + 1]):
            pr = prow[j]
            if pr < 0:
                continue
            p = q_pair[j]
            held.append(
                {
                    "symbol": symbols[book.pair_sym[p]],
                    "quantity": figure(tl.p_q[pr]),
                    "avg_price": figure(tl.p_a[pr]),
                    "realized_pnl": figure(tl.p_r[pr]),
                    "trades": int(tl.p_n[pr]),
                    "last_event_at": int(book.bt[tl.p_ev[pr]]),
                }
            )
        state = {
            "format": _SNAPSHOT_FORMAT,
            "cash": figure(tl.a_cash[r]),
            # the fold's own addition (-inf + inf is NaN, as there: no warning)
            "equity": figure(_compiled().settle(float(tl.a_cash[r]), float(tl.a_net[r]))),
            "gross_exposure": figure(tl.a_gross[r]),
            "net_exposure": figure(tl.a_net[r]),
            "peak_equity": figure(tl.a_peak[r]),
            "updated_at": int(book.bt[tl.a_ev[r]]),
            "positions": held,
        }
        name = names[accts_w[k]]
        rows.append(
            (
                name,
                sequences.get(name, 0),
                horizon,
                _dt(times_w[k]),
                _dt(known[cuts[k] - 1]),
                json.dumps(state, allow_nan=False),
            )
        )
    with store.connection() as conn:
        conn.execute(
            "CREATE TEMP TABLE riskbook_new_snapshots (account_id text, sequence bigint,"
            " position bigint, snapshot_at timestamptz, known_through timestamptz, state jsonb)"
            " ON COMMIT DROP"
        )
        with conn.cursor().copy(
            "COPY riskbook_new_snapshots (account_id, sequence, position, snapshot_at,"
            " known_through, state) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        written = conn.execute(
            "INSERT INTO position_snapshots (account_id, sequence, position, snapshot_at,"
            " known_through, state) SELECT * FROM riskbook_new_snapshots"
            " ON CONFLICT ON CONSTRAINT position_snapshots_state_key DO NOTHING"
        ).rowcount
        conn.commit()
    return int(written)


def _account_sequences(history: History) -> dict[str, int]:
    """The version of each account aggregate the History holds."""
    ev = history.events
    if ev.height == 0:
        return {}
    out = ev.group_by("aggregate_id").agg(pl.col("sequence").max())
    return dict(
        zip(out["aggregate_id"].cast(pl.String).to_list(), out["sequence"].to_list(), strict=True)
    )


_LATEST = datetime.max.replace(tzinfo=UTC)
"""The latest business time there can be (the store accepts up to it): "no bound" in SQL."""
_OWN = "('TradeExecuted', 'PositionUpdated', 'AccountFunded')"
_WIDE = WIDE_COLUMNS
# Distinct accounts by a loose scan of event_fields_account_time_idx.
_ACCOUNTS_SQL = """
WITH RECURSIVE a(id) AS (
    (SELECT account_id FROM event_fields WHERE account_id IS NOT NULL ORDER BY account_id LIMIT 1)
    UNION ALL
    SELECT (SELECT e.account_id FROM event_fields e
             WHERE e.account_id > a.id ORDER BY e.account_id LIMIT 1)
      FROM a WHERE a.id IS NOT NULL
)
SELECT id FROM a WHERE id IS NOT NULL
"""


# The events after each account's snapshot (or all of them, since NULL), the busts of
# its trades among them, and the marks that its figures need: one round trip.
_STATE_SQL = (
    "WITH own AS MATERIALIZED ("
    " SELECT f.* FROM unnest(%(ids)s::text[], %(since)s::timestamptz[]) AS w(account_id, since)"
    " CROSS JOIN LATERAL ("
    "  SELECT * FROM event_fields f WHERE f.account_id = w.account_id"
    f"   AND f.event_type IN {_OWN} AND f.occurred_at > coalesce(w.since, '-infinity')"
    "    AND f.occurred_at <= %(t)s{known} OFFSET 0) f"  # OFFSET 0: an index scan per account
    "), busts AS ("
    " SELECT f.* FROM event_fields f WHERE f.event_type = 'TradeCancelled'"
    "  AND f.account_id = ANY(%(ids)s){known}"
    "  AND (f.account_id, f.trade_id) IN (SELECT account_id, trade_id FROM own"
    "   WHERE event_type = 'TradeExecuted')"
    "), starts AS ("
    " SELECT symbol, min(since) AS since FROM ("
    "  SELECT * FROM unnest(%(syms)s::text[], %(from)s::timestamptz[]) AS h(symbol, since)"
    "  UNION ALL"
    "  SELECT symbol, min(occurred_at) FROM own"
    "   WHERE event_type IN ('TradeExecuted', 'PositionUpdated') GROUP BY symbol"
    " ) x GROUP BY symbol"
    ")"
    " SELECT " + _WIDE + " FROM own f"
    " UNION ALL"
    " SELECT " + _WIDE + " FROM busts f"
    " UNION ALL"
    " SELECT " + _WIDE + " FROM starts w CROSS JOIN LATERAL ("
    "  (SELECT * FROM event_fields f WHERE f.event_type = 'PriceMarked' AND f.symbol = w.symbol"
    "    AND f.occurred_at < w.since{known}"
    '   ORDER BY f.occurred_at DESC, f."timestamp" DESC, f.position DESC LIMIT 1)'
    "  UNION ALL"
    "  (SELECT * FROM event_fields f WHERE f.event_type = 'PriceMarked' AND f.symbol = w.symbol"
    "    AND f.occurred_at >= w.since AND f.occurred_at <= %(t)s{known})) f"
)


@with_large_arrays
def state_at(
    store: Store | str | None,
    at: TimeLike,
    *,
    accounts: str | Iterable[str] | None = None,
    known_at: TimeLike = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(positions, accounts) at business time ``at`` as known at ``known_at``, from PostgreSQL.

    Each account starts from its nearest snapshot at or before ``at`` (see
    :func:`write_snapshots`) and folds only what came after it, read from
    ``event_fields`` by index in one query: the account's trades, adjustments and
    funding with business time in (snapshot, at], the busts of those trades, and the
    marks of the symbols it holds from the snapshot (or from its first trade in them)
    on. Nothing else of the history is read.

    A snapshot is passed over, and its account folded from its first event, when it
    cannot be the state as known at K (it covers events recorded after K), or when an
    event recorded after it was written lands at or before its time: a late trade,
    adjustment or funding of the account, a late mark of a symbol it had, or any bust
    of its trades (busts are not matched to their trade here, so any one counts).
    Re-run :func:`write_snapshots` after a backfill.

    Parameters
    ----------
    store : a :class:`~riskbook.Store`, a DSN, or None (the default store).
    at : business time T (datetime with a zone or RFC 3339); None: everything.
    accounts : an account id or several; default every account in the store.
    known_at : recorded time K; None: everything recorded.

    Returns
    -------
    (positions, accounts) : frames exactly like :func:`positions` and :func:`accounts`
        of the whole history (``riskbook.load(store)``) at T as known at K, restricted
        to ``accounts``.

    Examples
    --------
    >>> import riskbook  # doctest: +SKIP
    >>> pos, acc = state_at(riskbook.connect(), "2024-03-01T15:00:00Z")  # doctest: +SKIP
    >>> acc.select("account_id", "equity", "leverage", "drawdown")  # doctest: +SKIP
    """
    if not isinstance(store, Store):
        with _opened(store) as opened:
            return state_at(opened, at, accounts=accounts, known_at=known_at)
    t_us = _bound(at, "at")
    k_us = _bound(known_at, "known_at")
    t_dt = _as_time(at, "at") or _LATEST
    k_dt = _as_time(known_at, "known_at")
    ids = _ids(accounts, "accounts")
    known_sql = "" if k_dt is None else ' AND f."timestamp" <= %(k)s'
    params: dict[str, Any] = {"t": t_dt, "k": k_dt}
    with store.connection() as conn:
        if ids is None:
            ids = [r[0] for r in conn.execute(_ACCOUNTS_SQL)]
        params["ids"] = ids
        snaps = conn.execute(
            "SELECT DISTINCT ON (account_id) account_id, position, snapshot_at, state::text"
            "  FROM position_snapshots"
            " WHERE account_id = ANY(%(ids)s) AND snapshot_at <= %(t)s"
            + ("" if k_dt is None else " AND known_through <= %(k)s")
            + " ORDER BY account_id, snapshot_at DESC, position DESC",
            params,
        ).fetchall()
        snapshots = {
            r[0]: (int(r[1]), _us(r[2]), json.loads(r[3]))
            for r in snaps
            if json.loads(r[3]).get("format") == _SNAPSHOT_FORMAT
        }
        if snapshots:
            snapshots = _fresh(conn, snapshots, known_sql, params)
        conn.rollback()
    since = {a: snapshots[a][1] if a in snapshots else None for a in ids}
    # From when each symbol's marks matter: from the snapshot for a symbol held then;
    # for one only shown, at T; and (in SQL) from an account's first trade or
    # adjustment in it after its snapshot.
    starts: dict[str, int] = {}
    for t_s, state in ((t, s) for _, t, s in snapshots.values()):
        for p in state["positions"]:
            w = t_s if p["quantity"] != 0 else t_us + 1
            starts[p["symbol"]] = min(starts.get(p["symbol"], _NEVER), w)
    frames = _read_wide(
        store,
        _STATE_SQL.replace("{known}", known_sql),
        {
            **params,
            "ids": list(since),
            "since": [None if s is None else _dt(s) for s in since.values()],
            "syms": list(starts),
            "from": [_dt(min(v, _us(_LATEST))) for v in starts.values()],
        },
    )
    own = frames
    history = History(
        trades=own["trades"],
        cancels=own["cancels"],
        adjustments=own["adjustments"],
        marks=frames["marks"],
        funding=own["funding"],
        limits=own["limits"],
        violations=own["violations"],
        blocks=own["blocks"],
        events=own["events"],
    )
    return _fold_from_snapshots(history, snapshots, ids, t_us, k_us)


def _fresh(
    conn: Any,
    snapshots: dict[str, tuple[int, int, dict[str, Any]]],
    known_sql: str,
    params: dict[str, Any],
) -> dict[str, tuple[int, int, dict[str, Any]]]:
    """The snapshots that no event recorded after them invalidates (see :func:`state_at`)."""
    low = min(p for p, _, _ in snapshots.values())
    latest = max(t for _, t, _ in snapshots.values())
    late = conn.execute(
        "SELECT f.account_id, f.event_type, f.symbol, f.occurred_at, f.position FROM event_fields f"
        " WHERE f.position > %(low)s AND ((f.event_type IN ('TradeExecuted', 'PositionUpdated',"
        " 'AccountFunded', 'PriceMarked') AND f.occurred_at <= %(latest)s)"
        " OR f.event_type = 'TradeCancelled')" + known_sql,
        {**params, "low": low, "latest": _dt(latest)},
    ).fetchall()
    if not late:
        return snapshots
    stale: set[str] = set()
    held = {a: {p["symbol"] for p in s["positions"]} for a, (_, _, s) in snapshots.items()}
    for account, kind, symbol, occurred, position in late:
        for name, (p_s, t_s, _) in snapshots.items():
            if name in stale or position <= p_s:
                continue
            if kind == "PriceMarked":
                hit = symbol in held[name] and _us(occurred) <= t_s
            elif account != name:
                hit = False
            else:
                hit = kind == "TradeCancelled" or _us(occurred) <= t_s
            if hit:
                stale.add(name)
    return {a: s for a, s in snapshots.items() if a not in stale}


def _read_wide(store: Store, query: str, params: dict[str, Any]) -> dict[str, pl.DataFrame]:
    """Rows of ``event_fields`` (the columns :mod:`riskbook.frames` reads) as History frames."""
    from riskbook.frames import psycopg_literal, read_frames

    with store.connection() as conn:
        literal = psycopg_literal(conn, query, params)  # type: ignore[arg-type]
    return read_frames(store, literal)


def _fold_from_snapshots(
    history: History,
    snapshots: dict[str, tuple[int, int, dict[str, Any]]],
    ids: list[str],
    t_us: int,
    k_us: int,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    extra_pairs = [(a, p["symbol"]) for a, (_, _, s) in snapshots.items() for p in s["positions"]]
    book = _build_book(history, extra_pairs, list(snapshots))
    state = _State.empty(book)
    acc_names = book.account_names.cast(pl.String).to_list()
    sym_names = book.symbol_names.cast(pl.String).to_list()
    acc_index = {n: i for i, n in enumerate(acc_names)}
    pair_index = {
        (acc_names[a], sym_names[s]): p
        for p, (a, s) in enumerate(
            zip(book.pair_acct.tolist(), book.pair_sym.tolist(), strict=True)
        )
    }
    for name, (_, t_s, s) in snapshots.items():
        ac = acc_index[name]
        state.since[ac] = t_s
        state.cash[ac] = s["cash"]
        state.peak[ac] = s["peak_equity"]
        state.equity[ac] = s["equity"]
        state.gross[ac] = s["gross_exposure"]
        state.net[ac] = s["net_exposure"]
        state.aseen[ac] = True
        state.alast[ac] = s["updated_at"]
        for pos in s["positions"]:
            p = pair_index[(name, pos["symbol"])]
            state.q[p] = pos["quantity"]
            state.a[p] = pos["avg_price"]
            state.r[p] = pos["realized_pnl"]
            state.ntr[p] = pos["trades"]
            state.pseen[p] = True
            state.plast[p] = pos["last_event_at"]
    _compiled().tree_init(
        state.q, state.a, book.pair_sym, state.mark, state.has_mark, book.acct_ptr,
        book.tree_off, book.tree_size, state.tree_net, state.tree_gross,
    )  # fmt: skip
    live = book.live(k_us)
    _run(book, state, live, book.cut(t_us), False)
    wanted = np.zeros(max(book.n_accounts, 1), np.bool_)
    for name in ids:
        if name in acc_index:
            wanted[acc_index[name]] = True
    pairs = np.flatnonzero(state.pseen & wanted[book.pair_acct])
    pos = _positions_frame(
        book, pairs, state.q[pairs], state.a[pairs], state.r[pairs], state.ntr[pairs],
        state.plast[pairs], state.mark, state.has_mark,
    )  # fmt: skip
    accts = np.flatnonzero(state.aseen & wanted[: book.n_accounts])
    acc = _accounts_frame(
        book, accts, state.cash[accts], state.equity[accts], state.gross[accts],
        state.net[accts], state.peak[accts], state.alast[accts], pos,
    )  # fmt: skip
    return pos, acc


# ----------------------------------------------------------------------------- the view


def refresh_account_positions(
    store: Store | str | None = None, *, concurrently: bool = True
) -> int:
    """Refresh the ``account_positions`` materialized view; return its number of rows.

    ``store`` is a :class:`~riskbook.Store`, a DSN, or None (the default store).
    ``concurrently`` (default) lets readers go on reading the old content meanwhile
    (the view has a unique index for that).
    """
    if not isinstance(store, Store):
        with _opened(store) as opened:
            return refresh_account_positions(opened, concurrently=concurrently)
    with store.connection() as conn:
        conn.execute(
            "REFRESH MATERIALIZED VIEW "
            + ("CONCURRENTLY " if concurrently else "")
            + "account_positions"
        )
        row = conn.execute("SELECT count(*) FROM account_positions").fetchone()
        conn.commit()
    return int(row[0]) if row else 0


def account_positions(store: Store | str | None = None) -> pl.DataFrame:
    """The ``account_positions`` materialized view as it was last refreshed.

    ``store`` is a :class:`~riskbook.Store`, a DSN, or None (the default store).
    Columns: ``account_id, symbol, net_quantity, trade_count, bought_quantity,
    sold_quantity, buy_vwap, sell_vwap, last_trade_at, last_recorded_at,
    last_adjusted_at``, sorted by account and symbol.
    """
    if not isinstance(store, Store):
        with _opened(store) as opened:
            return account_positions(opened)
    with store.connection() as conn:
        cur = conn.execute("SELECT * FROM account_positions ORDER BY account_id, symbol")
        names = [d.name for d in cur.description or []]
        rows = cur.fetchall()
    schema = {
        "account_id": pl.String(),
        "symbol": pl.String(),
        "net_quantity": pl.Float64(),
        "trade_count": pl.Int64(),
        "bought_quantity": pl.Float64(),
        "sold_quantity": pl.Float64(),
        "buy_vwap": pl.Float64(),
        "sell_vwap": pl.Float64(),
        "last_trade_at": _TIME,
        "last_recorded_at": _TIME,
        "last_adjusted_at": _TIME,
    }
    assert names == list(schema), names
    return pl.DataFrame(rows, schema=schema, orient="row")
