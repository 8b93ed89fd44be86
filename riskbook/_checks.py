"""Argument checks shared by the chart and widget layers (no Altair here)."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import polars as pl

TimeLike = datetime | str | None
"""A time argument: a datetime with a time zone, RFC 3339 text, or None."""

MAX_ROWS = 4_000
"""Default cap on the rows a chart carries (Altair refuses more than 5,000 per dataset)."""


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
