"""The words riskbook writes in its events: numbers for messages, and the reason of a
block the live engine decides (:func:`block_reason`, which the simulator writes as the
engine would), read back by :func:`stated` for :func:`riskbook.audit.incidents` and
``riskbook explain``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


def figure(value: float) -> str:
    """A number for messages, exact: ``%g`` where that is exact and plain (1.2, 40,
    10.125), a whole number in full (1000001, not 1e+06), else all the digits it takes
    (1.2345678). A block's reason states the critical factor ``riskbook explain``
    replays with, and a metric just over its limit must not read as equal to it."""
    v = float(value)
    short = f"{v:g}"
    if float(short) == v and "e" not in short:
        return short
    if v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return repr(v)


def block_reason(
    limit_type: str, symbol: str | None, value: str, level: float, limit: float
) -> str:
    """The reason of an engine's block: ``critical MaxPositionSize ACME: 65 > 1.5 x
    limit 40`` (the symbol only for a per-symbol limit; ``value``: the metric, as the
    caller words it).

    >>> block_reason("MaxDrawdown", None, "0.148123", 1.2, 0.12)
    'critical MaxDrawdown: 0.148123 > 1.2 x limit 0.12'
    >>> stated(block_reason("MaxPositionSize", "BRK:A", "65", 1.5, 40))
    Stated(limit_type='MaxPositionSize', symbol='BRK:A', level=1.5)
    """
    where = f" {symbol}" if symbol else ""
    return f"critical {limit_type}{where}: {value} > {figure(level)} x limit {figure(limit)}"


# block_reason's words, read back: the symbol may hold ": " itself, the metric after it
# holds no colon.
_BLOCK_REASON = re.compile(
    r"^critical (?P<type>\S+)(?: (?P<symbol>.*))?: (?P<value>[^:]*) > (?P<level>\S+)"
    r" x limit \S+$",
    re.DOTALL,
)


@dataclass(frozen=True)
class Stated:
    """What an engine's block reason states: the limit type, symbol and critical factor."""

    limit_type: str
    symbol: str | None
    level: float


def stated(reason: str | None) -> Stated | None:
    """The limit type, symbol and critical factor an engine's block reason states
    (:func:`block_reason`), or None (a reason of someone else's)."""
    m = _BLOCK_REASON.match(reason or "")
    if m is None:
        return None
    try:
        level = float(m["level"])
    except ValueError:
        return None
    if not (math.isfinite(level) and level >= 1.0):
        return None
    return Stated(m["type"], m["symbol"], level)
