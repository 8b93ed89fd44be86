"""The four built-in limit types of DESIGN.md §5, defined as a user would define one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import polars as pl

from riskbook.frames import History
from riskbook.limits._registry import LimitSpec
from riskbook.projections import account_timeline, position_timeline

__all__ = [
    "BUILT_INS",
    "MAX_DAILY_VOLUME",
    "MAX_DRAWDOWN",
    "MAX_LEVERAGE",
    "MAX_POSITION_SIZE",
    "daily_volume",
    "drawdown",
    "leverage",
    "position_size",
    "shared_timelines",
]

_memo: ContextVar[dict[tuple[Any, ...], pl.DataFrame] | None] = ContextVar(
    "riskbook_limits_timelines", default=None
)


@contextmanager
def shared_timelines() -> Iterator[None]:
    """Inside this block, metric functions share the timeline frames they build.

    :func:`riskbook.breaches` evaluates several limit types over one History; with it,
    MaxDrawdown and MaxLeverage build :func:`riskbook.account_timeline` once. The frames
    are dropped when the block ends.
    """
    token = _memo.set({})
    try:
        yield
    finally:
        _memo.reset(token)


# The timeline columns the built-ins read (their event ids are looked up by position
# for the few rows that start or end a breach).
_POSITION_COLUMNS = ("account_id", "symbol", "occurred_at", "timestamp", "position",
                     "event_type", "signed_quantity", "quantity")  # fmt: skip
_ACCOUNT_COLUMNS = ("account_id", "occurred_at", "timestamp", "position", "leverage", "drawdown")


def _shared(
    fn: Callable[..., pl.DataFrame], columns: tuple[str, ...], history: History, known_at: Any
) -> pl.DataFrame:
    memo = _memo.get()
    if memo is None:
        return fn(history, known_at=known_at, columns=columns)
    key = (fn, id(history), str(known_at))
    if key not in memo:
        memo[key] = fn(history, known_at=known_at, columns=columns)
    return memo[key]


_EVENT = ("timestamp", "position")
_DAY_US = 86_400_000_000


def position_size(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """MaxPositionSize's metric: ``|q|`` after every trade and adjustment, per (account, symbol).

    Examples
    --------
    >>> import uuid
    >>> from datetime import datetime, timezone
    >>> import riskbook
    >>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
    >>> sell = riskbook.TradeExecuted(trade_id="T-1", account_id="ACC-1", symbol="ACME",
    ...     side=riskbook.Side.Sell, quantity=5.0, price=20.0, executed_at=t)
    >>> h = riskbook.History.from_envelopes([riskbook.Envelope(uuid.uuid4(), "ACC-1",
    ...     "Account", 1, t, sell, "doc")])
    >>> position_size(h).select("account_id", "symbol", "value")
    shape: (1, 3)
    ┌────────────┬────────┬───────┐
    │ account_id ┆ symbol ┆ value │
    │ ---        ┆ ---    ┆ ---   │
    │ cat        ┆ cat    ┆ f64   │
    ╞════════════╪════════╪═══════╡
    │ ACC-1      ┆ ACME   ┆ 5.0   │
    └────────────┴────────┴───────┘
    """
    return _shared(position_timeline, _POSITION_COLUMNS, history, known_at).select(
        "account_id", "symbol", pl.col("occurred_at").alias("time"), *_EVENT,
        value=pl.col("quantity").abs(),
    )  # fmt: skip


def daily_volume(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """MaxDailyVolume's metric: the account's traded quantity so far in the UTC day.

    One row per trade that is not busted (as known at ``known_at``); ``value`` is the
    sum of the quantities of the account's trades of that UTC calendar day up to and
    including this one, in business order.
    """
    trades = _shared(position_timeline, _POSITION_COLUMNS, history, known_at).filter(
        pl.col("event_type") == "TradeExecuted"
    )
    rows = trades.select(
        pl.col("account_id").cast(pl.String), "symbol", pl.col("occurred_at").alias("time"),
        *_EVENT, day=pl.col("occurred_at").dt.epoch("us") // _DAY_US,  # the UTC day
        value=pl.col("signed_quantity").abs(), carried=pl.lit(False),
    )  # fmt: skip
    if history.start is not None and history.start.days.height:
        # Going on from a state: the day's volume so far comes first in its day's sum.
        carried = history.start.day_volume().select(
            "account_id", "day", value="volume", carried=pl.lit(True)
        )
        rows = pl.concat([carried, rows], how="diagonal_relaxed")
    out = rows.with_columns(pl.col("value").cum_sum().over("account_id", "day"))
    if history.start is not None:
        out = out.filter(~pl.col("carried"))
    return out.drop("day", "carried")


def drawdown(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """MaxDrawdown's metric: the account's drawdown after every event that moves it."""
    return _shared(account_timeline, _ACCOUNT_COLUMNS, history, known_at).select(
        "account_id", pl.col("occurred_at").alias("time"), *_EVENT, value=pl.col("drawdown")
    )


def leverage(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """MaxLeverage's metric: the account's leverage after every event that moves it."""
    return _shared(account_timeline, _ACCOUNT_COLUMNS, history, known_at).select(
        "account_id", pl.col("occurred_at").alias("time"), *_EVENT, value=pl.col("leverage")
    )


MAX_POSITION_SIZE = LimitSpec(
    "MaxPositionSize",
    "account_symbol",
    "quantity",
    position_size,
    description="|position| per (account, symbol); a limit with a symbol overrides the "
    "account-wide one for that symbol",
    incremental=True,
)
MAX_DAILY_VOLUME = LimitSpec(
    "MaxDailyVolume",
    "account_day",
    "quantity",
    daily_volume,
    description="sum of |quantity| of the account's trades in the UTC calendar day",
    incremental=True,
)
MAX_DRAWDOWN = LimitSpec(
    "MaxDrawdown",
    "account",
    "fraction",
    drawdown,
    description="(peak - equity) / peak, 0.2 = 20%",
    incremental=True,
)
MAX_LEVERAGE = LimitSpec(
    "MaxLeverage",
    "account",
    "ratio",
    leverage,
    description="gross exposure / equity",
    incremental=True,
)
BUILT_INS = (MAX_POSITION_SIZE, MAX_DAILY_VOLUME, MAX_DRAWDOWN, MAX_LEVERAGE)
