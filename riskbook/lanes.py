"""The events of a window, each with a lane and a one-line summary.

:func:`event_lanes` is what the incident chart (:func:`riskbook.viz.event_chart`), the
incident panel and ``riskbook explain`` show of the events around an alarm. It lives
apart from :mod:`riskbook.viz` so that the reports need no Altair; ``viz`` re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl

from riskbook._checks import MAX_ROWS, TimeLike, _cap, _ids
from riskbook.events import as_time

__all__ = ["event_lanes"]


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
        position, causation_id, correlation_id, summary``, in global order. An event
        kept raw (of a type this riskbook does not know) has no business time it can
        read: it is in the window, and in ``occurred_at``, by its recorded time, in the
        ``other`` lane.
    """
    lo, hi = as_time(start, "start"), as_time(end, "end")
    if lo is None or hi is None:
        raise ValueError("event_lanes needs both start and end")
    accs, syms = _ids(accounts, "accounts"), _ids(symbols, "symbols")
    max_rows = _cap(max_rows)
    head = ["event_id", "timestamp", "position", "causation_id", "correlation_id"]
    f = _fmt

    def window(frame: pl.DataFrame, time: str, *, everyone: bool = False) -> pl.DataFrame:
        """``frame``'s rows in the window, of the accounts (and, ``everyone``: of every
        account, ``"*"``: the limits set for every account apply to them too)."""
        out = frame.filter(pl.col(time).is_between(lo, hi))
        if accs is not None and "account_id" in out.columns:
            out = out.filter(
                pl.col("account_id").cast(pl.String).is_in([*accs, "*"] if everyone else accs)
            )
        return out

    parts: list[pl.DataFrame] = []

    def add(
        frame: pl.DataFrame,
        kind: str | pl.Expr,
        time: str,
        summary: pl.Expr,
        sym: pl.Expr | None = None,
    ) -> None:
        """``frame``'s rows as lane rows; ``kind`` the event type (an expression: of
        events kept raw, which go to the "other" lane whatever their type says)."""
        if frame.height == 0:
            return
        parts.append(
            frame.select(
                *head,
                (kind if isinstance(kind, pl.Expr) else pl.lit(kind)).alias("event_type"),
                pl.lit("other" if isinstance(kind, pl.Expr) else _LANE_OF[kind]).alias("lane"),
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
        window(history.limits, "set_at", everyone=True),
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
            (pl.col("symbol").cast(pl.String) + " ").fill_null(""),  # account-wide: none
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
    # An event kept raw (an unknown type, written by a newer riskbook; or one that does
    # not read as its type) has no business time riskbook can read: it is shown at its
    # recorded time, in the "other" lane, rather than left out of the window.
    raw = history.events.filter(
        pl.col("occurred_at").is_null() & pl.col("timestamp").is_between(lo, hi)
    ).with_columns(
        pl.when(pl.col("aggregate_type").cast(pl.String) == "Account")
        .then(pl.col("aggregate_id").cast(pl.String))
        .alias("account_id"),
        pl.when(pl.col("aggregate_type").cast(pl.String) == "Instrument")
        .then(pl.col("aggregate_id").cast(pl.String))
        .alias("_symbol"),
    )
    if accs is not None:
        raw = raw.filter(pl.col("account_id").is_null() | pl.col("account_id").is_in(accs))
    if syms is not None:
        raw = raw.filter(pl.col("_symbol").is_null() | pl.col("_symbol").is_in(syms))
    add(
        raw,
        pl.col("event_type").cast(pl.String),
        "timestamp",
        text(
            pl.col("event_type").cast(pl.String),
            " of ",
            pl.col("aggregate_id").cast(pl.String),
            " (kept raw: not readable by this riskbook; shown at its recorded time)",
        ),
        pl.col("_symbol"),
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
        "lane": pl.String(),
        "account_id": pl.String(),
        "symbol": pl.String(),
        "occurred_at": pl.Datetime("us", "UTC"),
        "summary": pl.String(),
    }
    out = (
        pl.concat([p.cast(schema) for p in parts]).sort("position")  # type: ignore[arg-type]
        if parts
        else pl.DataFrame(schema=schema)
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
