"""Limits and breaches: the limit-type registry, breach intervals, backtests, reconciliation.

Layer 5 of DESIGN.md §1 (contract: §5; metrics: §4; point in time: §6).

=============================  =========================================================
:func:`breaches`               breach intervals of the stored (or given) limits at T as
                               known at K, at warning levels
:func:`backtest`               hypothetical limits beside the actual ones
:func:`reconcile`              recorded LimitViolationDetected vs recomputed breaches
:func:`limit_history`          every limit change: old, new, who, business/recorded time
:func:`effective_limits`       the limit in force per scope at T
:func:`register`, :func:`get`,  the registry of limit types (entry-point group
:func:`names`                  ``riskbook.limit_types``)
:func:`evaluate`               the breach fold itself, batch by batch with a state
=============================  =========================================================

A **limit type** (:class:`LimitDefinition`; :class:`LimitSpec` makes one) is a name, a
scope (``account``, ``account_symbol``, ``account_day``, ``account_symbol_day``), a unit
and a ``metric(history, *, known_at=None)`` function returning its **metric timeline**:
one row per event that moves the metric (account_id, symbol, time, timestamp, position,
value, optionally event_id). The four built-ins are :class:`LimitSpec` objects
registered at import exactly as a notebook registers its own: MaxPositionSize (``|q|``
from :func:`riskbook.position_timeline`), MaxDailyVolume (the UTC day's traded quantity
so far), MaxDrawdown and MaxLeverage (from :func:`riskbook.account_timeline`).

How a breach is found: three steps
==================================

1. **Metric timeline** -- ``definition.metric(history, known_at=K)``: the metric after
   every event that moves it, busts and events recorded after K already left out (the
   projections do that).
2. **Limit rows** -- LimitSet events (stored ones recorded by K, or hypothetical ones),
   each applying to its (account, limit type, symbol) from ``set_at`` until the next
   one of the same scope. For a per-symbol type, a row with a symbol is that key's own
   limit and overrides the account-wide one; the account-wide row is the limit of
   every other symbol of the account. No row, no limit. ``"*"`` stands for every
   account (hypothetical limits).
3. **The breach fold** -- :func:`evaluate`: a pure function that merges the metric rows
   and the limit rows in business order (business time, recorded time, position; a
   limit change first on a tie) and, per key and level, opens an interval when
   ``metric > level * limit`` (strictly) after a row, and closes it at the first row
   after which it is back within. A limit row re-evaluates the keys it sets, so
   lowering a limit under the metric opens a breach (its trigger is the LimitSet) and
   raising it over the metric closes one. A limit change that leaves the key in breach
   does not split the interval (``limit_value`` is the limit at the start,
   ``limit_value_at_end`` at the end). For ``*_day`` scopes the metric restarts at
   00:00 UTC: an open breach ends at that midnight (``ended_by_event_id`` null), or
   earlier if a row brings it back within (a raised limit). NaN or null metric values
   are not in breach. Before a key's first metric row nothing is compared.

Batches and state (for the live processor)
==========================================

:func:`evaluate` takes ``state=`` and returns ``(intervals, state)``. A
:class:`BreachState` is per limit type and levels: the last limit row of every
(account, symbol) seen (the limits in force, ``"*"`` rows kept, so keys first seen in a
later batch get the right limit), the last metric value and time (and UTC day) of every
key, and the open breaches (how each started, the limit then, its peak so far). The
next batch starts from it exactly where the last one stopped, so folding a stream in
any number of batches gives the same intervals as one batch over all of it: an interval
that closes in batch n is reported there with ``carried`` true and its original start;
one still open is reported with a null ``ended_at`` in every batch until it closes
(a live processor emits LimitViolationDetected for the rows with ``carried`` false,
once per breach start). Rows within a batch may come in any order (they are sorted);
a row that comes before what its key has already folded raises ``ValueError``.
``through=`` is the business time the batch is complete through: day-scope breaches
whose day ended by then are closed at midnight. :func:`breaches` is this function over
one batch holding the whole history with an empty state, through T (``at``) or through
the latest business time known.

Examples
--------
>>> import uuid
>>> from datetime import datetime, timedelta, timezone
>>> import riskbook
>>> t = datetime(2024, 3, 1, 14, 30, tzinfo=timezone.utc)
>>> history = riskbook.History.from_events  # each event recorded when it happened
>>> h = history(
...     riskbook.LimitSet(account_id="ACC-1", limit_type="MaxDailyVolume", value=150.0,
...         set_by="risk", set_at=t),
...     *[riskbook.TradeExecuted(trade_id=f"T-{i}", account_id="ACC-1", symbol="ACME",
...         side=riskbook.Side.Buy, quantity=100.0, price=10.0,
...         executed_at=t + timedelta(hours=i)) for i in (1, 2, 30)])
>>> breaches(h, levels=1.0).select("limit_type", "started_at", "ended_at", "peak_value")
shape: (1, 4)
┌────────────────┬─────────────────────────┬─────────────────────────┬────────────┐
│ limit_type     ┆ started_at              ┆ ended_at                ┆ peak_value │
│ ---            ┆ ---                     ┆ ---                     ┆ ---        │
│ cat            ┆ datetime[μs, UTC]       ┆ datetime[μs, UTC]       ┆ f64        │
╞════════════════╪═════════════════════════╪═════════════════════════╪════════════╡
│ MaxDailyVolume ┆ 2024-03-01 16:30:00 UTC ┆ 2024-03-02 00:00:00 UTC ┆ 200.0      │
└────────────────┴─────────────────────────┴─────────────────────────┴────────────┘
"""

from __future__ import annotations

from riskbook.limits._api import (
    BREACH_COLUMNS,
    backtest,
    breaches,
    effective_limits,
    hypothetical_limits,
    limit_history,
    metric_at,
    reconcile,
    stored_limits,
)
from riskbook.limits._builtin import (
    BUILT_INS,
    MAX_DAILY_VOLUME,
    MAX_DRAWDOWN,
    MAX_LEVERAGE,
    MAX_POSITION_SIZE,
    shared_timelines,
)
from riskbook.limits._evaluate import BREACH_SCHEMA, LIMIT_ROWS_SCHEMA, BreachState, evaluate
from riskbook.limits._registry import (
    ENTRY_POINT_GROUP,
    SCOPES,
    LimitDefinition,
    LimitSpec,
    Scope,
    get,
    names,
    register,
)

for _definition in BUILT_INS:
    register(_definition)
del _definition

__all__ = [
    "BREACH_COLUMNS",
    "BREACH_SCHEMA",
    "BUILT_INS",
    "ENTRY_POINT_GROUP",
    "LIMIT_ROWS_SCHEMA",
    "MAX_DAILY_VOLUME",
    "MAX_DRAWDOWN",
    "MAX_LEVERAGE",
    "MAX_POSITION_SIZE",
    "SCOPES",
    "BreachState",
    "LimitDefinition",
    "LimitSpec",
    "Scope",
    "backtest",
    "breaches",
    "effective_limits",
    "evaluate",
    "get",
    "hypothetical_limits",
    "limit_history",
    "metric_at",
    "names",
    "reconcile",
    "register",
    "shared_timelines",
    "stored_limits",
]
