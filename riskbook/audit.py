"""Incidents for auditors: what the engine knew, which limit applied, what caused what.

Every alarm on record is a ``LimitViolationDetected`` or an ``AccountBlocked``
(:func:`incidents`). :func:`explain` reconstructs one of them -- or any event -- from the
history alone:

* the event and its **causation chain** (:func:`causation_chain`): the trade or mark
  that caused it, what it caused in turn, and the events of the same correlation;
* a **replay of the live engine** over what it knew when it acted -- the account's
  events and its symbols' marks, in the store's order, up to the alarm's cause: which
  alarms it decides there, the limit it applied and who set it, the metric just before
  the cause and after it;
* the metric at the cause's time in the history **as known now** (a trade busted
  since, a late event or a limit recorded since makes it differ);
* what the engine **wrote** (the violation's ``current_value``, ``limit_value`` and
  ``detected_at``), and the **unblock** that ended a block;
* **findings**: each way in which the record disagrees with the replay (an alarm the
  replay does not decide, another value or limit, no cause on record); **notes**: what
  is no fault (the history corrected since, a late cause, a person's block).

The result, :class:`Incident`, prints as a report (``riskbook explain EVENT_ID`` prints
the same), renders as Markdown in a notebook, and gives its parts as frames and values.
:mod:`riskbook.widgets`' incident panel is built on these functions.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from riskbook import limits as L
from riskbook import projections as P
from riskbook._checks import _frame
from riskbook._reasons import stated as _stated
from riskbook.events import STORED_INFINITY, as_time
from riskbook.frames import KINDS, History
from riskbook.lanes import event_lanes

__all__ = [
    "ACCOUNT_EVENT_TYPES",
    "Incident",
    "causation_chain",
    "compare_states",
    "daily_volume",
    "explain",
    "incident_metric",
    "incidents",
    "limit_in_force",
    "limit_metric_at",
    "limits_in_force",
]


def _time(value: datetime | str, name: str) -> datetime:
    """A time that must be given, in UTC (:func:`riskbook.events.as_time`'s check)."""
    t = as_time(value, name)
    if t is None:
        raise TypeError(f"{name} must be a datetime or an RFC 3339 string, got None")
    return t


def _figure(v: float) -> str:
    """A limit or metric value for people: 81,000 and 97,900 (not 8.1e+04), 0.148, 2.5."""
    if not math.isfinite(v):
        return "infinite" if v > 0 else str(v)
    if v >= STORED_INFINITY:
        return "infinite"
    if abs(v) >= 1000:
        return f"{v:,.0f}" if v == round(v) else f"{v:,.2f}"
    return f"{v:.4g}"


# ----------------------------------------------------------------------------- incidents


def incidents(history: History) -> pl.DataFrame:
    """Every LimitViolationDetected and AccountBlocked, with what it was about.

    Returns ``event_id, event_type, account_id, limit_type, symbol, occurred_at,
    timestamp, causation_id, correlation_id, label``, in global order. A block's limit
    type and symbol are those its reason states (the live engine's blocks: "critical
    MaxPositionSize ACME: ..."); for a block of another reason, those of the account's
    latest violation stored before it with the same cause (else correlation), when
    there is one.
    """
    v = history.violations.select(
        "event_id",
        pl.lit("LimitViolationDetected").alias("event_type"),
        pl.col("account_id").cast(pl.String),
        pl.col("limit_type").cast(pl.String),
        pl.col("symbol").cast(pl.String),
        pl.col("detected_at").alias("occurred_at"),
        "timestamp",
        "position",
        "causation_id",
        "correlation_id",
        pl.format(
            "{} > {}",
            pl.col("current_value").round(4),
            pl.col("limit_value").round(4),
        ).alias("detail"),
    )
    b = history.blocks.filter(pl.col("blocked")).select(
        "event_id",
        pl.lit("AccountBlocked").alias("event_type"),
        pl.col("account_id").cast(pl.String),
        "causation_id",
        "correlation_id",
        pl.col("at").alias("occurred_at"),
        "timestamp",
        "position",
        pl.col("reason").alias("detail"),
    )
    # a block's limit: the one its reason states (the engine's blocks), else that of the
    # account's latest violation stored before it with the same cause, else with the
    # same correlation
    stated = [_stated(r) for r in b["detail"].to_list()]
    b = b.with_columns(
        pl.Series("limit_type", [x and x.limit_type for x in stated], pl.String),
        pl.Series("symbol", [x and x.symbol for x in stated], pl.String),
    )
    for key in ("causation_id", "correlation_id"):
        found = (
            b.filter(pl.col("limit_type").is_null())
            .select("event_id", "account_id", key, "position")
            .join(
                v.filter(pl.col(key).is_not_null()).select(
                    "account_id", key, "limit_type", "symbol", pl.col("position").alias("at")
                ),
                on=["account_id", key],
            )
            .filter(pl.col("at") < pl.col("position"))
            .sort("at")
            .unique("event_id", keep="last")
            .select("event_id", pl.col("limit_type").alias("_type"), pl.col("symbol").alias("_sym"))
        )
        b = (
            b.join(found, on="event_id", how="left")
            .with_columns(
                pl.coalesce("limit_type", "_type").alias("limit_type"),
                pl.when(pl.col("limit_type").is_null())
                .then(pl.col("_sym"))
                .otherwise(pl.col("symbol"))
                .alias("symbol"),
            )
            .drop("_type", "_sym")
        )
    b = b.select(v.columns)
    out = pl.concat([v, b]).sort("position")
    return out.with_columns(
        pl.format(
            "{} {} {}: {} {}",
            pl.col("occurred_at").dt.strftime("%Y-%m-%d %H:%M:%S"),
            pl.col("account_id"),
            pl.when(pl.col("event_type") == "AccountBlocked")
            .then(pl.lit("BLOCKED"))
            .otherwise(pl.lit("violation")),
            pl.col("limit_type").fill_null(""),
            pl.col("detail").fill_null(""),
        ).alias("label")
    ).drop("detail", "position")


def limits_in_force(
    limits: pl.DataFrame,
    *,
    account: str,
    at: datetime | str | None = None,
    known_at: datetime | str | None = None,
) -> pl.DataFrame:
    """The limits of an account in force at T as known at K, and who set them.

    The latest LimitSet per (limit_type, symbol) of the account or of every account
    (``"*"``: a later one of either replaces the other, as in
    :func:`riskbook.breaches`) with ``set_at <= at`` and recorded (``timestamp``) by
    ``known_at`` -- latest in the order (business time, recorded time, position).
    Returns ``limit_type, symbol`` (null: account-wide), ``value, set_by, set_at,
    recorded_at, event_id``, and ``account_id`` (the account, or ``"*"``: set for every
    account).
    """
    at, known_at = as_time(at, "at"), as_time(known_at, "known_at")
    rows = _frame(limits, "limits").filter(
        pl.col("account_id").cast(pl.String).is_in([account, "*"])
    )
    if at is not None:
        rows = rows.filter(pl.col("set_at") <= at)
    if known_at is not None:
        rows = rows.filter(pl.col("timestamp") <= known_at)
    return (
        rows.sort("set_at", "timestamp", "position")
        .with_columns(pl.col("limit_type").cast(pl.String), pl.col("symbol").cast(pl.String))
        .group_by("limit_type", "symbol", maintain_order=True)
        .last()
        .select(
            "limit_type",
            "symbol",
            "value",
            pl.col("set_by").cast(pl.String),
            "set_at",
            pl.col("timestamp").alias("recorded_at"),
            "event_id",
            pl.col("account_id").cast(pl.String),
        )
        .sort("limit_type", "symbol", nulls_last=False)
    )


def limit_in_force(
    limits: pl.DataFrame,
    *,
    account: str,
    limit_type: str,
    symbol: str | None = None,
    at: datetime | str | None = None,
    known_at: datetime | str | None = None,
) -> dict[str, Any] | None:
    """The one limit that applied: a symbol's own MaxPositionSize overrides the account's.

    Returns the row of :func:`limits_in_force` as a dict, with ``scope`` ("symbol" or
    "account"), or None when no limit of that type was in force.
    """
    rows = limits_in_force(limits, account=account, at=at, known_at=known_at).filter(
        pl.col("limit_type") == limit_type
    )
    if symbol is not None:
        own = rows.filter(pl.col("symbol") == symbol)
        if own.height:
            return {**own.row(0, named=True), "scope": "symbol"}
    wide = rows.filter(pl.col("symbol").is_null())
    return {**wide.row(0, named=True), "scope": "account"} if wide.height else None


def daily_volume(
    history: History,
    *,
    account: str,
    at: datetime | str,
    known_at: datetime | str | None = None,
) -> float:
    """Σ|quantity| of the account's trades in T's UTC day up to T, as known at K (busts out)."""
    at, known_at = _time(at, "at"), as_time(known_at, "known_at")
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    trades = history.trades.filter(
        (pl.col("account_id").cast(pl.String) == account)
        & pl.col("executed_at").is_between(day, at)
    )
    cancels = history.cancels.filter(pl.col("account_id").cast(pl.String) == account)
    if known_at is not None:
        trades = trades.filter(pl.col("timestamp") <= known_at)
        cancels = cancels.filter(pl.col("timestamp") <= known_at)
    live = trades.join(cancels.select("trade_id"), on="trade_id", how="anti")
    return float(live["quantity"].abs().sum())


def compare_states(
    history: History,
    *,
    account: str,
    at: datetime | str,
    known_at: datetime | str | None,
) -> pl.DataFrame:
    """The account as the engine saw it (known at K) beside the corrected history.

    One row per figure: the account's ``equity, cash, gross_exposure, net_exposure,
    leverage, drawdown``, its daily volume, then the quantity of each of its positions
    (``position <symbol>``), each with ``engine`` (at T, known at K), ``corrected`` (at
    T, everything known now) and ``difference`` (corrected - engine). A position one
    side holds and the other does not (a trade busted later, a position closed) is 0
    on the side without it.
    """
    t, known = _time(at, "at"), as_time(known_at, "known_at")

    def figures(k: datetime | None) -> dict[str, float]:
        acc = P.accounts(history, at=t, known_at=k).filter(
            pl.col("account_id").cast(pl.String) == account
        )
        pos = P.positions(history, at=t, known_at=k).filter(
            pl.col("account_id").cast(pl.String) == account
        )
        out: dict[str, float] = {}
        if acc.height:
            row = acc.row(0, named=True)
            for name in (
                "equity",
                "cash",
                "gross_exposure",
                "net_exposure",
                "leverage",
                "drawdown",
            ):
                out[name] = float(row[name])
        out["daily_volume"] = daily_volume(history, account=account, at=t, known_at=k)
        for sym, q in pos.select(pl.col("symbol").cast(pl.String), "quantity").iter_rows():
            out[f"position {sym}"] = float(q)
        return out

    engine, corrected = figures(known), figures(None)
    names = list(dict.fromkeys([*engine, *corrected]))

    def value(side: dict[str, float], name: str) -> float | None:
        flat = 0.0 if name.startswith("position ") else None  # no position: none held
        return side.get(name, flat)

    return pl.DataFrame(
        {
            "figure": names,
            "engine": [value(engine, n) for n in names],
            "corrected": [value(corrected, n) for n in names],
        },
        schema={"figure": pl.String, "engine": pl.Float64, "corrected": pl.Float64},
    ).with_columns((pl.col("corrected") - pl.col("engine")).alias("difference"))


def incident_metric(
    compare: pl.DataFrame, limit_type: str | None, symbol: str | None = None
) -> tuple[float | None, float | None]:
    """The metric a limit type is checked against, from :func:`compare_states`' rows.

    Returns ``(engine, corrected)``: ``|position|`` of ``symbol`` for MaxPositionSize,
    leverage, drawdown, or the day's volume; None where the figure is absent (no
    position, or a limit type other than the built-ins: :func:`limit_metric_at`
    computes any registered type's metric).
    """
    figure = _BUILT_IN_FIGURES.get(limit_type or "")
    if figure is None:
        return None, None
    if limit_type == "MaxPositionSize":
        figure = f"position {symbol}"
    row = compare.filter(pl.col("figure") == figure)
    if row.height == 0:
        return None, None
    engine, corrected = row["engine"][0], row["corrected"][0]
    if limit_type == "MaxPositionSize":
        engine = None if engine is None else abs(engine)
        corrected = None if corrected is None else abs(corrected)
    return engine, corrected


_BUILT_IN_FIGURES = {
    "MaxPositionSize": "position",
    "MaxLeverage": "leverage",
    "MaxDrawdown": "drawdown",
    "MaxDailyVolume": "daily_volume",
}
"""The figure of :func:`compare_states` each built-in limit type is checked against."""


limit_metric_at = L.metric_at
"""A registered limit type's metric for one account (and symbol) at T as known at K:
:func:`riskbook.limits.metric_at`, which the incident panel shows for a limit type other
than the built-ins."""


def causation_chain(history: History, event_id: str | uuid.UUID) -> pl.DataFrame:
    """The events linked to one: its causes, its effects, and those of its correlation.

    Walks ``causation_id`` up to the first cause and down to every effect, adds the
    other effects of its causes ("same cause": the violation beside a block, both
    caused by one trade) and the events sharing the event's ``correlation_id`` (an
    order, a price update). Returns ``relation`` ("cause", "this", "effect", "same
    cause", "correlated"), ``event_type, account_id,
    occurred_at, timestamp, position, event_id, causation_id, summary``, in global
    order.
    """
    if not isinstance(event_id, str | uuid.UUID):
        raise TypeError(f"event_id must be a UUID or its text, got {type(event_id).__name__}")
    try:  # the frames hold ids as lower-case text
        event_id = str(uuid.UUID(str(event_id)))
    except ValueError:
        raise KeyError(f"no event {event_id} in this history: it is not a UUID") from None
    ev = history.events.select(
        "event_id",
        pl.col("event_type").cast(pl.String),
        "occurred_at",
        "timestamp",
        "position",
        "causation_id",
        "correlation_id",
        pl.col("aggregate_id").cast(pl.String),
    )
    linked = ev.filter(pl.col("event_id").is_in(_linked_ids(ev, event_id)))
    by_id = {r["event_id"]: r for r in linked.iter_rows(named=True)}
    if event_id not in by_id:
        raise KeyError(f"no event {event_id} in this history")
    relation: dict[str, str] = {event_id: "this"}
    cause = by_id[event_id]["causation_id"]
    while cause is not None and cause in by_id and cause not in relation:
        relation[cause] = "cause"
        cause = by_id[cause]["causation_id"]
    ancestors = [i for i, r in relation.items() if r == "cause"]
    for roots, name in (([event_id], "effect"), (ancestors, "same cause")):
        frontier = set(roots)
        while frontier:
            nxt = {
                i for i, r in by_id.items() if r["causation_id"] in frontier and i not in relation
            }
            relation.update(dict.fromkeys(nxt, name))
            frontier = nxt
    for i in by_id:
        relation.setdefault(i, "correlated")
    # from the frame itself: its schema holds however many rows share the correlation
    rows = linked.with_columns(pl.col("event_id").replace_strict(relation).alias("relation"))
    lo, hi = rows["occurred_at"].min(), rows["occurred_at"].max()
    assert isinstance(lo, datetime) and isinstance(hi, datetime)
    summaries = event_lanes(history, start=lo, end=hi, accounts=None, max_rows=1_000_000).filter(
        pl.col("event_id").is_in(rows["event_id"].implode())
    )
    return (
        rows.join(summaries.select("event_id", "account_id", "summary"), on="event_id", how="left")
        .sort("position")
        .select(
            "relation",
            "event_type",
            pl.coalesce("account_id", "aggregate_id").alias("account_id"),
            "occurred_at",
            "timestamp",
            "position",
            "event_id",
            "causation_id",
            "summary",
        )
    )


def _linked_ids(ev: pl.DataFrame, event_id: str) -> list[str]:
    """Ids linked to ``event_id`` through causation (both ways) or its correlation."""
    ids = {event_id}
    me = ev.filter(pl.col("event_id") == event_id)
    if me.height == 0:
        return []
    corr = me["correlation_id"][0]
    if corr is not None:
        ids.update(ev.filter(pl.col("correlation_id") == corr)["event_id"].to_list())
    links = ev.filter(pl.col("causation_id").is_not_null()).select("event_id", "causation_id")
    while True:
        grown = (
            set(
                links.filter(
                    pl.col("event_id").is_in(list(ids)) | pl.col("causation_id").is_in(list(ids))
                )
                .unpivot()
                .get_column("value")
                .to_list()
            )
            | ids
        )
        if grown == ids:
            return sorted(ids)
        ids = grown


# ----------------------------------------------------------------------------- explain

_METRIC_NAMES = {
    "MaxPositionSize": "|position|",
    "MaxLeverage": "leverage",
    "MaxDrawdown": "drawdown",
    "MaxDailyVolume": "daily volume",
}
"""How the report names each built-in limit type's metric (others: "metric")."""

_FLAT_WHEN_MISSING = ("MaxPositionSize", "MaxDailyVolume")
"""Built-in types whose metric is 0 for a key with no value yet (no trade of it)."""

ACCOUNT_EVENT_TYPES = frozenset(
    {
        "TradeExecuted",
        "TradeCancelled",
        "PositionUpdated",
        "AccountFunded",
        "LimitSet",
        "LimitViolationDetected",
        "AccountBlocked",
        "AccountUnblocked",
    }
)
"""The event types that belong to one account (``payload.account_id``); a mark belongs
to its symbol."""

_ALARMS = ("LimitViolationDetected", "AccountBlocked")
"""The events an engine writes when a limit is breached."""


@dataclass(frozen=True)
class Incident:
    """One event reconstructed from the history: see :func:`explain`.

    ``event``: the event (``event_id, event_type, account_id, occurred_at, timestamp,
    position, causation_id, summary``); ``limit_type`` and ``symbol``: the limit an
    alarm is about (a violation's own; a block's, from the engine's replayed decision);
    ``chain``: :func:`causation_chain`; ``cause``: the event it names as its cause
    (``causation_id``), None when it names none or the history does not hold it.

    For an alarm with a cause, the engine is replayed over what it knew when it acted:
    the account's events and the marks of its symbols, in the store's order, up to and
    including the cause. ``replayed``: the alarms that replay decides at the cause
    (``kind, limit_type, symbol, value, limit_value``); ``limit``: the limit it applied
    (``limit_type, symbol, value, set_by, set_at, event_id``; None: none in force);
    ``before`` and ``engine_saw``: its metric just before the cause and after it.
    ``limits``: every limit of the account in force then (:func:`limits_in_force` over
    the same events). ``replayed`` rows also give ``at``, the business time the engine
    gives the alarm. ``corrected``: the metric at the cause's business time in the
    history as known now, against ``corrected_limit``, the limit in force then as known
    now. ``violation``: the LimitViolationDetected the alarm goes with (the event itself,
    or the latest of a block's limit before it: ``event_id, detected_at, current_value,
    limit_value, same_cause``). ``unblocked``: for a block, the first unblock after it.
    ``compare``: :func:`compare_states` at the event's business time as known at its
    recorded time.

    ``findings``: each way in which the record disagrees with the replay (empty when
    they agree); ``notes``: what the reader should know that is no fault (a late cause,
    a block decided by a person, the critical factor assumed).
    """

    event: dict[str, Any]
    limit_type: str | None
    symbol: str | None
    chain: pl.DataFrame = field(repr=False)
    cause: dict[str, Any] | None
    replayed: list[dict[str, Any]]
    limit: dict[str, Any] | None
    limits: pl.DataFrame = field(repr=False)
    compare: pl.DataFrame = field(repr=False)
    before: float | None
    engine_saw: float | None
    corrected: float | None
    corrected_limit: float | None
    violation: dict[str, Any] | None
    unblocked: dict[str, Any] | None
    findings: list[str]
    notes: list[str]
    checked: bool
    """Whether the alarm was checked by a replay (an alarm with its cause on record)."""

    @property
    def metric_name(self) -> str:
        """How the report names the metric: ``|position| in CRUX``, ``leverage``..."""
        name = _METRIC_NAMES.get(self.limit_type or "", "metric")
        return f"{name} in {self.symbol}" if self.symbol and self.limit_type else name

    @property
    def still_a_breach(self) -> bool | None:
        """Whether the history as known now is over the limit at the cause's business
        time (None: not known)."""
        if self.corrected_limit is None or self.corrected is None:
            return None
        return self.corrected > self.corrected_limit

    def report(self) -> str:
        """The reconstruction as plain text (what ``riskbook explain`` prints)."""
        ev = self.event
        lines = [f"{ev['event_type']} {ev['event_id']}"]
        late = _duration(ev["timestamp"], ev["occurred_at"], "later", "earlier")
        facts = [
            ("account", ev["account_id"] or "(none: the event belongs to no account)"),
            ("limit", _limit_name(self.limit_type, self.symbol) if self.limit_type else None),
            ("happened", _when(ev["occurred_at"])),
            ("recorded", f"{_when(ev['timestamp'])}" + (f" ({late})" if late else "")),
            ("what", ev["summary"]),
        ]
        lines += [f"  {k:<10}{v}" for k, v in facts if v]

        lines += ["", "Cause"]
        c = self.cause
        if c is None:
            named = ev["causation_id"]
            lines.append(
                f"  {named}: not in this history"
                if named
                else "  none on record: the event names no cause"
            )
        else:
            lines.append(f"  {c['event_type']} {c['event_id']}")
            lines.append(
                f"    happened {_when(c['occurred_at'])}, recorded {_when(c['timestamp'])}"
            )
            if c["summary"]:
                lines.append(f"    {c['summary']}")

        if self.checked:
            lines += ["", "The engine replayed over what it knew up to the cause"]
            if self.replayed:
                for r in self.replayed:
                    what = "block" if r["kind"] == "AccountBlocked" else "violation"
                    lines.append(
                        f"  decides a {what}: {_limit_name(r['limit_type'], r['symbol'])},"
                        f" {_figure(r['value'])} against {_figure(r['limit_value'])}"
                    )
            else:
                lines.append("  decides no alarm at the cause")
            lim = self.limit
            if self.limit_type is not None:
                if lim is None:
                    lines.append(f"  no {_limit_name(self.limit_type, self.symbol)} in force")
                else:
                    scope = f"for {lim['symbol']} only" if lim["symbol"] else "account-wide"
                    lines.append(
                        f"  limit in force: {self.limit_type} {scope}, {_figure(lim['value'])},"
                        f" set by {lim['set_by'] or '?'}, in force from {_when(lim['set_at'])}"
                    )
                    lines.append(f"    (LimitSet {lim['event_id']})")
                limit_value = None if lim is None else lim["value"]
                lines += ["", f"Metric: {self.metric_name}"]
                v = self.violation
                if v is not None:
                    label = "written by the engine" if v["same_cause"] else "the breach began"
                    when = "" if v["same_cause"] else f" at {_when(v['detected_at'])}"
                    lines.append(
                        f"  {label:<26}{_figure(v['current_value'])} against a limit of"
                        f" {_figure(v['limit_value'])}{when}"
                        f" (LimitViolationDetected {v['event_id']})"
                    )
                lines.append(f"  {'before the cause':<26}{_verdict(self.before, limit_value)}")
                lines.append(
                    f"  {'after it (replayed)':<26}{_verdict(self.engine_saw, limit_value)}"
                )
                lines.append(
                    f"  {'as known now':<26}{_verdict(self.corrected, self.corrected_limit)}"
                )

        if ev["event_type"] == "AccountBlocked":
            u = self.unblocked
            lines.append("")
            if u is None:
                lines.append("Unblocked: not on record (the account is still blocked)")
            else:
                after = _duration(u["at"], ev["occurred_at"], "after", "before")
                lines.append(
                    f"Unblocked {_when(u['at'])} by {u['by']}"
                    + (f" ({after} the block)" if after else "")
                    + f": {u['reason']}"
                )

        if ev["event_type"] in _ALARMS or self.findings:
            lines += ["", "Findings"]
            if self.findings:
                lines += [f"  - {f}" for f in self.findings]
            elif self.checked:
                lines.append("  none: the engine replayed over what it knew decides this alarm")
            else:
                lines.append("  not checked: there is no cause on record to replay the engine to")
        if self.notes:
            lines += ["", "Notes"] + [f"  - {n}" for n in self.notes]

        lines += ["", "Causation chain"]
        lines += _chain_lines(self.chain)
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.report()

    def _repr_markdown_(self) -> str:
        return f"```text\n{self.report()}```\n"

    def to_dict(self) -> dict[str, Any]:
        """The reconstruction as JSON-ready values: times as RFC 3339 text, an infinite
        figure as the largest double (as in stored events)."""
        return {
            "event": _plain(self.event),
            "limit_type": self.limit_type,
            "symbol": self.symbol,
            "cause": _plain(self.cause),
            "checked": self.checked,
            "replayed": [_plain(r) for r in self.replayed],
            "limit": _plain(self.limit),
            "limits": [_plain(r) for r in self.limits.iter_rows(named=True)],
            "metric": {
                "name": self.metric_name if self.limit_type else None,
                "before": _plain(self.before),
                "engine_saw": _plain(self.engine_saw),
                "corrected": _plain(self.corrected),
                "corrected_limit": _plain(self.corrected_limit),
                "violation": _plain(self.violation),
                "still_a_breach": self.still_a_breach,
            },
            "unblocked": _plain(self.unblocked),
            "findings": list(self.findings),
            "notes": list(self.notes),
            "compare": [_plain(r) for r in self.compare.iter_rows(named=True)],
            "chain": [_plain(r) for r in self.chain.iter_rows(named=True)],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def explain(
    history: History,
    event_id: str | uuid.UUID,
    *,
    critical: float | Mapping[str, float | None] | None = None,
) -> Incident:
    """Reconstruct one event -- a violation, a block, or any other -- from the history.

    An alarm is checked by replaying the live engine (:class:`riskbook.live.Engine`)
    over what it knew when it acted: the account's events and the marks of its symbols,
    in the store's order, up to and including the alarm's cause. The replay's decision
    at the cause -- which breach starts, which block -- is compared with what was
    recorded; each disagreement is a finding. The replay also gives the limit the engine
    applied and who set it, and the metric just before the cause and after it; the
    history as known now gives the metric at the cause's business time (a trade busted
    since makes the two differ). See :class:`Incident`.

    Parameters
    ----------
    critical : the processor's critical factor (``riskbook live --critical``), for
        blocks. None: for each limit type, the factor the engine's blocks on record
        state (it writes it in a block's reason, "... > 1.5 x limit 40"; a block being
        explained: its own), else :data:`riskbook.live.DEFAULT_CRITICAL`; the notes say
        when that differs from the default.

    The replay folds the account's events and the marks of its symbols, with the clock
    a processor of the whole store had at each of them: another account's event can make
    one of this account's late, or bring a scheduled limit of it into force, as it did
    for the processor.

    Raises KeyError when the history holds no such event (a history loaded for some
    accounts holds only theirs, and the marks).

    >>> incident = riskbook.audit.explain(history, block_id)  # doctest: +SKIP
    >>> print(incident)                                       # doctest: +SKIP
    """
    chain = causation_chain(history, event_id)  # checks the id; KeyError when absent
    this = chain.filter(pl.col("relation") == "this").row(0, named=True)
    kind = this["event_type"]
    account = this["account_id"] if kind in ACCOUNT_EVENT_TYPES else None
    event = {
        "event_id": this["event_id"],
        "event_type": kind,
        "account_id": account,
        "occurred_at": this["occurred_at"],
        "timestamp": this["timestamp"],
        "position": this["position"],
        "causation_id": this["causation_id"],
        "summary": this["summary"],
    }
    named = event["causation_id"]
    found = chain.filter(pl.col("event_id") == named) if named is not None else chain.clear()
    cause = found.row(0, named=True) if found.height else None
    compare = limits = pl.DataFrame()
    if account is not None and isinstance(event["occurred_at"], datetime):
        compare = compare_states(
            history, account=account, at=event["occurred_at"], known_at=event["timestamp"]
        )
        limits = limits_in_force(
            history.limits, account=account, at=event["occurred_at"], known_at=event["timestamp"]
        )
    factor, read = (critical, []) if critical is not None else _critical_read(history, event)
    check = _Check(history, event, cause, factor)
    if kind in _ALARMS and account is not None:
        check.alarm()
        if check.checked and kind == "AccountBlocked":
            check.notes.extend(read)
    return Incident(
        event=event,
        limit_type=check.limit_type,
        symbol=check.symbol,
        chain=chain,
        cause=cause,
        replayed=check.replayed,
        limit=check.limit,
        limits=check.limits if check.limits is not None else limits,
        compare=compare,
        before=check.before,
        engine_saw=check.after,
        corrected=check.corrected,
        corrected_limit=check.corrected_limit,
        violation=check.violation,
        unblocked=_unblock(history, event) if kind == "AccountBlocked" else None,
        findings=check.findings,
        notes=check.notes,
        checked=check.checked,
    )


class _Check:
    """The check of one alarm against a replay of the engine (see :func:`explain`)."""

    def __init__(
        self,
        history: History,
        event: dict[str, Any],
        cause: dict[str, Any] | None,
        critical: float | Mapping[str, float | None] | None,
    ) -> None:
        self.history, self.event, self.cause, self.critical = history, event, cause, critical
        self.account: str = event["account_id"]
        self.limit_type: str | None = None
        self.symbol: str | None = None
        self.replayed: list[dict[str, Any]] = []
        self.limit: dict[str, Any] | None = None
        self.limits: pl.DataFrame | None = None
        self.before: float | None = None
        self.after: float | None = None
        self.corrected: float | None = None
        self.corrected_limit: float | None = None
        self.violation: dict[str, Any] | None = None
        self.findings: list[str] = []
        self.notes: list[str] = []
        self.checked = False
        self._acted_at = 0  # the position where the engine acted on the cause
        if event["event_type"] == "LimitViolationDetected":
            row = _rows_of(history.violations, event["event_id"])
            self.limit_type, self.symbol = row["limit_type"], row["symbol"]
            self.violation = _written(row, same_cause=True)

    def alarm(self) -> None:
        ev, cause = self.event, self.cause
        if ev["causation_id"] is None:
            if ev["event_type"] == "AccountBlocked":
                by = _rows_of(self.history.blocks, ev["event_id"])["by"]
                self.notes.append(
                    f"a block that names no cause, by {by}: a person's decision, not one"
                    " the engine made from an event; nothing to replay"
                )
            else:
                self.findings.append(
                    "the alarm names no cause: the engine always names the event that triggered it"
                )
            return
        if cause is None:
            self.findings.append(
                f"its cause {ev['causation_id']} is not in this history (not in the store,"
                " or the history was loaded without it)"
            )
            return
        if cause["position"] >= ev["position"]:
            self.findings.append(
                "the alarm was stored before its cause: an engine appends an alarm after"
                " the event that triggered it"
            )
            return
        mine = _account_history(self.history, self.account)
        if mine.events.filter(pl.col("event_id") == cause["event_id"]).height == 0:
            self.findings.append(
                f"its cause, {cause['event_type']} {cause['event_id']}, is not an event of"
                f" {self.account} or a mark of a symbol it traded: it cannot move its figures"
            )
            return
        if self.limit_type is not None and self.limit_type not in L.names():
            self.notes.append(
                f"no definition of the limit type {self.limit_type} is installed here (register"
                " it, or install the package that defines it): the engine cannot be replayed"
                " for it"
            )
            return
        self.checked = True
        self._replay(_with_store_clock(self.history, mine))

    def _replay(self, mine: History) -> None:
        from riskbook.live._engine import Engine, _us

        p = self._trigger(mine)
        self._acted_at = p
        engine = Engine(critical=self.critical)
        engine.apply(_positions(mine, None, p), written=False)
        clock = engine.clock
        states_before = dict(engine.breach)
        decided = engine.apply(_positions(mine, p, p + 1), written=False)
        mine_now = [e for e in decided if e.account_id == self.account]
        self.replayed = [
            {
                "kind": e.kind,
                "limit_type": e.limit_type,
                "symbol": e.symbol,
                "value": e.value,
                "limit_value": e.limit_value,
                "at": e.event.business_time,
            }
            for e in mine_now
        ]
        kind = self.event["event_type"]
        if kind == "AccountBlocked":
            blocks = [e for e in self.replayed if e["kind"] == "AccountBlocked"]
            block = self._block_as_stated(blocks)
            if block is not None:
                self.limit_type, self.symbol = block["limit_type"], block["symbol"]
                self.violation = _breach_start(self.history, self.event, block)
                self._check_time("blocked_at", block["at"])
            else:
                self.findings.append(
                    "replayed over what it knew up to the cause, the engine (critical"
                    f" factor {_factor_text(self.critical)}) decides no block here"
                    + _why_not(self.replayed)
                )
        lt, sym = self.limit_type, self.symbol
        cause_us = _us(self.cause["occurred_at"]) if self.cause else None
        if cause_us is not None and cause_us < clock:
            self.notes.append(
                "its cause was late: it happened before events the engine had already"
                " folded, and the engine acts on a late event when it arrives (at the"
                " latest business time it had seen)"
            )
        if lt is None:
            return
        state, state_before = engine.breach.get(lt), states_before.get(lt)
        self.after = _metric_of(state, self.account, sym, lt)
        self.before = _metric_of(state_before, self.account, sym, lt)
        self.limit = _applied(state, self.account, sym, lt)
        prefix = _positions(self.history, None, p + 1)
        # in force when the engine acted: set_at by its clock then (a limit scheduled
        # for later, recorded before the cause, is not)
        self.limits = limits_in_force(
            prefix.limits, account=self.account, at=_time_of(engine.clock)
        )
        at = self.cause["occurred_at"]  # type: ignore[index]
        self.corrected = _corrected(self.history, lt, self.account, sym, at)
        known_now = limit_in_force(
            self.history.limits, account=self.account, limit_type=lt, symbol=sym, at=at
        )
        self.corrected_limit = None if known_now is None else known_now["value"]
        if kind == "LimitViolationDetected":
            self._check_violation(state_before)
        self._check_today()

    def _block_as_stated(self, blocks: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Of the blocks the replay decides, the one the block on record states (its
        reason's limit type and symbol), else the first; None if it decides none.

        The replay leaves the account unblocked after a block, so it decides one for
        every limit type gone critical at the cause, where the engine wrote only its
        first: a block the replay puts before the one on record says the processor
        did not block for that type (a critical factor of its own for it)."""
        if not blocks:
            return None
        stated = _stated(_rows_of(self.history.blocks, self.event["event_id"])["reason"])
        if stated is None:
            return blocks[0]
        key = (stated.limit_type, stated.symbol)
        same = [b for b in blocks if (b["limit_type"], b["symbol"]) == key]
        if not same:
            first = blocks[0]
            self.findings.append(
                f"the block on record is for {_limit_name(*key)}; replayed over what it"
                f" knew, the engine (critical factor {_factor_text(self.critical)}) blocks"
                f" for {_limit_name(first['limit_type'], first['symbol'])} instead"
            )
            return first
        before = blocks[: blocks.index(same[0])]
        if before:
            self.notes.append(
                "replayed, the engine (critical factor "
                f"{_factor_text(self.critical)}) would have blocked first for "
                + ", ".join(_limit_name(b["limit_type"], b["symbol"]) for b in before)
                + ": the processor that wrote this block did not block for it (run with"
                " a critical factor of its own for that type? riskbook explain"
                " --critical says which to replay with)"
            )
        return same[0]

    def _trigger(self, mine: History) -> int:
        """The position where the engine acted on the cause: the cause's own, or for a
        scheduled limit (a LimitSet recorded before its set_at, with its set_at after
        the engine's clock when it came) that of the first event at or after its
        set_at, which made it take effect. A LimitSet whose set_at the clock had passed
        acts as it comes, however early it was recorded."""
        from riskbook.live._engine import _us

        cause = self.cause
        assert cause is not None
        p = int(cause["position"])
        if cause["event_type"] != "LimitSet":
            return p
        row = mine.limits.filter(pl.col("event_id") == cause["event_id"]).row(0, named=True)
        if not row["set_at"] > row["timestamp"]:
            return p
        pos, clock = _clock(mine.events.sort("position"))
        before = int(np.searchsorted(pos, p))
        if before and _us(row["set_at"]) <= clock[before - 1]:
            return p
        then = mine.events.filter(
            (pl.col("position") > p) & (pl.col("occurred_at") >= row["set_at"])
        ).sort("position")
        if then.height == 0:
            return p
        first = str(then["event_id"][0])
        real = self.history.events.filter(pl.col("event_id") == first)  # a clock mark's too
        what = str(real["event_type"][0]) if real.height else str(then["event_type"][0])
        self.notes.append(
            f"its cause is a scheduled limit (recorded {_when(row['timestamp'])}, in force"
            f" from {_when(row['set_at'])}): the engine applied it when it folded the first"
            f" event at or after that time, {what} {first}; the replay runs to there"
        )
        return int(then["position"][0])

    def _check_violation(self, state_before: Any) -> None:
        v = self.violation
        assert v is not None
        lt, sym = self.limit_type, self.symbol
        same = [
            r
            for r in self.replayed
            if r["kind"] == "LimitViolationDetected" and (r["limit_type"], r["symbol"]) == (lt, sym)
        ]
        if same:
            r = same[0]
            self._check_time("detected_at", r["at"])
            if not _same(v["current_value"], r["value"]):
                self.findings.append(
                    f"the engine wrote a metric of {_exact(v['current_value'])}; replayed over"
                    f" what it knew, it is {_exact(r['value'])}"
                )
            if not _same(v["limit_value"], r["limit_value"]):
                self.findings.append(
                    f"the engine wrote a limit of {_exact(v['limit_value'])}; the limit in"
                    f" force as it knew it was {_exact(r['limit_value'])}"
                    + (f" (set by {self.limit['set_by']})" if self.limit else "")
                )
            return
        name = _limit_name(lt, sym)
        if self.limit is None:
            why = f"no {name} was in force as the engine knew it"
        elif self.after is None:
            why = "the replay has no value of its metric there"
        elif not self.after > self.limit["value"]:
            why = (
                f"after the cause the metric was {_exact(self.after)}, within the limit"
                f" of {_exact(self.limit['value'])}"
            )
        elif _was_open(state_before, self.account, sym):
            why = (
                f"the breach was open already before the cause (the metric was"
                f" {_exact(self.before)} against {_exact(self.limit['value'])}): a violation"
                " is written once, when a breach starts"
            )
        else:
            why = "the replay does not start a breach there"
        self.findings.append(f"replayed over what it knew up to the cause, {why}")

    def _check_time(self, name: str, replayed: datetime) -> None:
        """The alarm's business time is the engine's clock when it acted: at least the
        replay's (the account's events and its symbols' marks), at most the latest
        business time of any event the store held then (another account's event or
        mark can move a processor's clock further than the account's own) or the time
        the alarm was recorded."""
        written = self.event["occurred_at"]
        # a detection is no later than its recording (an engine that stamps the time it
        # detected, not its clock, is within that too)
        latest = max(_clock_bound(self.history, self._acted_at), self.event["timestamp"])
        if not (replayed <= written <= max(replayed, latest)):
            self.findings.append(
                f"the engine wrote {name} {_when(written)}; replayed, it acts at"
                f" {_when(replayed)}"
                + ("" if latest <= replayed else f" (and no later than {_when(latest)})")
                + ": the latest business time it had folded"
            )

    def _check_today(self) -> None:
        if (
            self.after is not None
            and self.limit is not None
            and self.after > self.limit["value"]
            and self.corrected is not None
            and self.corrected_limit is not None
            and not self.corrected > self.corrected_limit
        ):
            busts = _busts_after(self.history, self.event)
            if busts:
                why = f"{busts} trade{'' if busts == 1 else 's'} of the account busted since"
            elif not _same(self.corrected_limit, self.limit["value"]):
                why = "a limit recorded since applies at that time"
            else:
                why = (
                    "events stored after the cause, with business times at or before it,"
                    " take it back within (a late event, or another at the same time)"
                )
            self.notes.append(
                "the alarm was right on what the engine knew; the history as known now has"
                f" no breach at the cause's time ({_exact(self.corrected)} within"
                f" {_exact(self.corrected_limit)}): {why}"
            )


def _clock_bound(history: History, position: int) -> datetime:
    """The latest business time a processor of the whole store can have reached when it
    folded ``position``: of the events up to it, blocks, unblocks and busts left out
    (they do not move its clock), and limits only when recorded at or after their
    set_at (a scheduled one does not)."""
    ev = history.events
    moves = (
        (pl.col("position") <= position)
        & ~pl.col("event_type")
        .cast(pl.String)
        .is_in(["AccountBlocked", "AccountUnblocked", "TradeCancelled"])
        & (
            (pl.col("event_type").cast(pl.String) != "LimitSet")
            | (pl.col("occurred_at") <= pl.col("timestamp"))
        )
    )
    latest = ev.filter(moves)["occurred_at"].max()
    assert isinstance(latest, datetime)
    return latest


def _time_of(clock: int) -> datetime | None:
    """An engine's clock (microseconds since the epoch) as a time; None before any."""
    from riskbook._time import EPOCH
    from riskbook.live._engine import _MIN

    return None if clock == _MIN else EPOCH + timedelta(microseconds=clock)


def _rows_of(frame: pl.DataFrame, event_id: str) -> dict[str, Any]:
    """One event's row of a typed frame, ids as text."""
    row = frame.filter(pl.col("event_id") == event_id).row(0, named=True)
    return {k: str(v) if k in _ID_COLUMNS and v is not None else v for k, v in row.items()}


_ID_COLUMNS = ("account_id", "limit_type", "symbol", "by", "set_by")


def _positions(history: History, lo: int | None, hi: int) -> History:
    """The events with ``lo <= position < hi`` (``lo`` None: from the first)."""
    inside = pl.col("position") < hi
    if lo is not None:
        inside = inside & (pl.col("position") >= lo)
    frames = {n: history.frame(n).filter(inside) for n in [*KINDS, "events"]}
    return History(**frames, horizon=hi)  # type: ignore[arg-type]


def _account_history(history: History, account: str) -> History:
    """The account's own events, the limits set for every account (``"*"``), and the
    marks of the symbols it traded or adjusted (the only marks that move its figures:
    DESIGN.md §4), in the store's order."""
    mine = pl.col("account_id").cast(pl.String) == account
    frames = {n: history.frame(n) for n in KINDS}
    for n in KINDS:
        if "account_id" in frames[n].columns:
            everyone = n == "limits" and account != "*"
            frames[n] = frames[n].filter(
                mine | (pl.col("account_id").cast(pl.String) == "*") if everyone else mine
            )
    symbols = pl.concat(
        [frames[n]["symbol"].cast(pl.String) for n in ("trades", "adjustments")]
    ).unique()
    frames["marks"] = frames["marks"].filter(
        pl.col("symbol").cast(pl.String).is_in(symbols.implode())
    )
    kept = pl.concat([f["position"] for f in frames.values()]).implode()
    events = history.events.filter(pl.col("position").is_in(kept))
    return History(**frames, events=events, horizon=history.horizon)  # type: ignore[arg-type]


def _clock(events: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(positions, clock after each): a processor's clock over ``events`` (in position
    order), the latest business time folded. Blocks and unblocks act at the clock
    without moving it, and a LimitSet recorded before its set_at does not move it
    either: held if its set_at is past the clock, else at most equal to it (as
    :meth:`riskbook.live.Engine._in_processing_order` folds them)."""
    from riskbook.live._engine import _MIN
    from riskbook.projections import _epoch_us

    kind = events["event_type"].cast(pl.String)
    bt, ts = _epoch_us(events["occurred_at"], _MIN), _epoch_us(events["timestamp"])
    still = kind.is_in(["AccountBlocked", "AccountUnblocked"]).to_numpy() | (
        (kind == "LimitSet").to_numpy() & (bt > ts)
    )
    return events["position"].to_numpy(), np.maximum.accumulate(np.where(still, _MIN, bt))


_CLOCK_SYMBOL = "riskbook:clock"
"""The symbol of the marks that stand for other accounts' events in a replay."""


def _with_store_clock(history: History, mine: History) -> History:
    """``mine`` with the clock a processor of the whole store had at each of its events.

    A processor's clock is the latest business time of everything it folded (blocks,
    unblocks and scheduled LimitSets left out): another account's event can make one of
    this account's late, or bring a scheduled limit into force. Before each event of
    ``mine`` whose store clock is ahead of the replay's, a mark of a symbol no account
    holds (:data:`_CLOCK_SYMBOL`) carries the clock there: it moves nothing else. It
    takes the id of the event that moved the clock, for the notes to name.
    """
    from riskbook.live._engine import _MIN
    from riskbook.projections import _epoch_us

    ev = history.events.sort("position")
    if ev.height == 0 or mine.events.height == 0:
        return mine
    pos, clock = _clock(ev)
    recorded = np.maximum.accumulate(_epoch_us(ev["timestamp"]))
    mine_pos = np.sort(mine.events["position"].to_numpy())
    at = np.searchsorted(pos, mine_pos)
    before = np.where(at > 0, clock[np.maximum(at - 1, 0)], _MIN)
    after_previous = np.concatenate([[_MIN], clock[at[:-1]]])
    need = before > after_previous
    n = int(need.sum())
    if n == 0:
        return mine
    # the event that brought the clock to ``before``: the first one with that time
    first = np.searchsorted(clock, before[need])  # clock is sorted
    marks = pl.DataFrame(
        {
            "position": mine_pos[need] - 1,
            "event_id": ev["event_id"].gather(first),
            "aggregate_id": [_CLOCK_SYMBOL] * n,
            "sequence": [0] * n,
            "timestamp": pl.Series(recorded[np.maximum(at[need] - 1, 0)]),
            "causation_id": pl.Series([None] * n, dtype=pl.String),
            "correlation_id": pl.Series([None] * n, dtype=pl.String),
            "symbol": [_CLOCK_SYMBOL] * n,
            "price": [1.0] * n,
            "marked_at": pl.Series(before[need]),
        }
    ).cast(dict(mine.marks.schema))  # type: ignore[arg-type]
    events = marks.select(
        "position", "event_id", "aggregate_id", "sequence", "timestamp", "causation_id",
        "correlation_id", event_type=pl.lit("PriceMarked"), aggregate_type=pl.lit("Instrument"),
        occurred_at="marked_at",
    ).cast(dict(mine.events.schema))  # type: ignore[arg-type]  # fmt: skip
    frames = {n: mine.frame(n) for n in KINDS}
    frames["marks"] = pl.concat([frames["marks"], marks]).sort("position")
    both = pl.concat([mine.events, events]).sort("position")
    return History(**frames, events=both, horizon=mine.horizon)  # type: ignore[arg-type]


def _metric_of(state: Any, account: str, symbol: str | None, limit_type: str) -> float | None:
    """The key's last metric value in a breach state (None: none yet; 0 for a position
    or a day's volume with no trade)."""
    if state is None:
        return None
    m = state.metrics.filter(pl.col("account_id") == account)
    m = m.filter(pl.col("symbol").is_null() if symbol is None else pl.col("symbol") == symbol)
    if m.height == 0:
        return 0.0 if limit_type in _FLAT_WHEN_MISSING else None
    value = m["value"][-1]
    return None if value is None or math.isnan(value) else float(value)


def _applied(
    state: Any, account: str, symbol: str | None, limit_type: str
) -> dict[str, Any] | None:
    """The limit a breach state applies to the key: the symbol's own, else the
    account's, else one for every account ("*")."""
    if state is None:
        return None
    rows = state.limits
    for acc, sym in ((account, symbol), (account, None), ("*", symbol), ("*", None)):
        hit = rows.filter(pl.col("account_id") == acc)
        hit = hit.filter(pl.col("symbol").is_null() if sym is None else pl.col("symbol") == sym)
        if hit.height:
            r = hit.row(-1, named=True)
            return {
                "limit_type": limit_type,
                "symbol": r["symbol"],
                "value": r["value"],
                "set_by": r["set_by"],
                "set_at": r["set_at"],
                "event_id": r["event_id"],
            }
    return None


def _was_open(state: Any, account: str, symbol: str | None) -> bool:
    """Whether a breach of the key at the limit itself (level 1) was open in a state."""
    if state is None:
        return False
    o = state.open.filter((pl.col("account_id") == account) & (pl.col("level") == 1.0))
    o = o.filter(pl.col("symbol").is_null() if symbol is None else pl.col("symbol") == symbol)
    return o.height > 0


def _corrected(
    history: History, limit_type: str, account: str, symbol: str | None, at: datetime
) -> float | None:
    """The metric at ``at`` in the history as known now (None: not available)."""
    try:
        L.get(limit_type)
    except KeyError:
        return None
    value = L.metric_at(history, limit_type, account=account, symbol=symbol, at=at)
    if value is None and limit_type in _FLAT_WHEN_MISSING:
        return 0.0
    return value


def _breach_start(
    history: History, event: dict[str, Any], block: dict[str, Any]
) -> dict[str, Any] | None:
    """The violation that started the breach a block is about: the latest of the
    account's violations of that limit type and symbol stored before the block."""
    v = history.violations.with_columns(
        pl.col("account_id").cast(pl.String),
        pl.col("limit_type").cast(pl.String),
        pl.col("symbol").cast(pl.String),
    ).filter(
        (pl.col("account_id") == event["account_id"])
        & (pl.col("limit_type") == block["limit_type"])
        & (pl.col("position") < event["position"])
    )
    sym = block["symbol"]
    v = v.filter(pl.col("symbol").is_null() if sym is None else pl.col("symbol") == sym)
    if v.height == 0:
        return None
    row = v.sort("position").row(-1, named=True)
    return _written(row, same_cause=row["causation_id"] == event["causation_id"])


def _written(row: dict[str, Any], *, same_cause: bool) -> dict[str, Any]:
    """What a LimitViolationDetected row says, as :attr:`Incident.violation` keeps it."""
    keep = ("event_id", "detected_at", "current_value", "limit_value")
    return {**{k: row[k] for k in keep}, "same_cause": same_cause}


def _why_not(replayed: list[dict[str, Any]]) -> str:
    violations = [r for r in replayed if r["kind"] == "LimitViolationDetected"]
    if not violations:
        return ""
    r = violations[0]
    return (
        f" (it starts a {_limit_name(r['limit_type'], r['symbol'])} breach, at"
        f" {_exact(r['value'])} against {_exact(r['limit_value'])}, below the critical level)"
    )


def _factor_text(critical: float | Mapping[str, float | None] | None) -> str:
    if critical is None:
        return "none: no type blocks"
    if isinstance(critical, Mapping):
        from riskbook.live._engine import DEFAULT_CRITICAL

        named = ", ".join(
            f"{k} {'none' if v is None else format(v, 'g')}" for k, v in critical.items()
        )
        return f"{named}, any other {DEFAULT_CRITICAL:g}"
    return f"{critical:g}"


def _critical_read(
    history: History, event: dict[str, Any]
) -> tuple[float | dict[str, float], list[str]]:
    """The critical factor to replay with when none is given, and the notes saying so.

    For each limit type, the factor the engine's blocks on record state (a block being
    explained: the one its own reason states); a type whose blocks state two factors,
    or none, gets the default.
    """
    from riskbook.live._engine import DEFAULT_CRITICAL

    reasons = history.blocks.filter(pl.col("blocked"))["reason"].drop_nulls().unique()
    levels: dict[str, set[float]] = {}
    for stated in filter(None, map(_stated, reasons)):
        levels.setdefault(stated.limit_type, set()).add(stated.level)
    if event["event_type"] == "AccountBlocked":
        own = _stated(_rows_of(history.blocks, event["event_id"])["reason"])
        if own is not None:
            levels[own.limit_type] = {own.level}
    found = {t: next(iter(v)) for t, v in sorted(levels.items()) if len(v) == 1}
    mixed = sorted(t for t, v in levels.items() if len(v) > 1)
    notes = []
    if any(v != DEFAULT_CRITICAL for v in found.values()):
        notes.append(
            "the critical factor is the one the engine's blocks on record state: "
            + _factor_text(found)
            + " (riskbook explain --critical F says otherwise)"
        )
    if mixed:
        notes.append(
            f"the blocks on record state more than one critical factor for {', '.join(mixed)}"
            f" (processors run with different --critical?): {DEFAULT_CRITICAL:g} is assumed"
            " for it; riskbook explain --critical F gives the right one"
        )
    return found or DEFAULT_CRITICAL, notes


def _unblock(history: History, event: dict[str, Any]) -> dict[str, Any] | None:
    """The first AccountUnblocked of the account after a block, in the store's order
    (blocks do not nest: one unblock ends the blocked state, however many blocks)."""
    after = history.blocks.filter(
        (pl.col("account_id").cast(pl.String) == event["account_id"])
        & (pl.col("position") > event["position"])
        & ~pl.col("blocked")
    ).sort("position")
    if after.height == 0:
        return None
    row = after.row(0, named=True)
    return {
        "event_id": row["event_id"],
        "at": row["at"],
        "by": None if row["by"] is None else str(row["by"]),
        "reason": row["reason"],
        "timestamp": row["timestamp"],
    }


def _busts_after(history: History, event: dict[str, Any]) -> int:
    """How many of the account's trades up to the event's time were busted after its
    recording (a bust recorded later corrects what the engine saw)."""
    trades = history.trades.filter(
        (pl.col("account_id").cast(pl.String) == event["account_id"])
        & (pl.col("executed_at") <= event["occurred_at"])
    )
    late = history.cancels.filter(
        (pl.col("account_id").cast(pl.String) == event["account_id"])
        & (pl.col("timestamp") > event["timestamp"])
    )  # a trade id is the account's own: another account may use it too
    return late.join(trades.select("trade_id"), on="trade_id", how="semi").height


# ----------------------------------------------------------------------------- formatting


def _same(a: float, b: float) -> bool:
    """Equal as figures: within 1e-9 (relative), infinities and the stored largest
    double (an infinite leverage as written) alike."""
    if a >= STORED_INFINITY or b >= STORED_INFINITY:
        return a >= STORED_INFINITY and b >= STORED_INFINITY
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _limit_name(limit_type: str | None, symbol: str | None) -> str:
    return f"{limit_type} on {symbol}" if symbol else f"{limit_type} (account-wide)"


def _when(t: datetime | None) -> str:
    return "unknown" if t is None else f"{t:%Y-%m-%d %H:%M:%S.%f} UTC"


def _stamp(t: datetime | None) -> str:
    """A time in a table: UTC implied by the heading; an unknown event type has none."""
    return "unknown" if t is None else f"{t:%Y-%m-%d %H:%M:%S.%f}"


def _exact(v: float | None) -> str:
    """A figure in a finding: enough digits that two different ones never read alike."""
    if v is None:
        return "none"
    if not math.isfinite(v) or v >= STORED_INFINITY:
        return _figure(v)
    return f"{v:,.10g}"


def _duration(t1: datetime | None, t0: datetime | None, ahead: str, behind: str) -> str:
    """``1.570 ms later``, ``26 min 58 s after``, ``2.0 days earlier`` (for people):
    ``ahead`` or ``behind`` by the sign of ``t1 - t0``; "" when a time is unknown."""
    if t1 is None or t0 is None:
        return ""
    s = (t1 - t0).total_seconds()
    way = ahead if s >= 0 else behind
    s = abs(s)
    if s < 1:
        text = f"{s * 1000:,.3f} ms"
    elif s < 60:
        text = f"{s:,.3f} s"
    elif s < 3600:
        text = f"{int(s // 60)} min {int(s % 60)} s"
    elif s < 86400:
        text = f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    else:
        text = f"{s / 86400:,.1f} days"
    return f"{text} {way}"


def _verdict(value: float | None, limit: float | None) -> str:
    if value is None:
        return "not available"
    if limit is None:
        return _figure(value)
    return f"{_figure(value):<12}{'over the limit' if value > limit else 'within the limit'}"


_NEAREST_CORRELATED = 3
"""The report shows this many events of the same correlation either side of the event
(a price series can share one correlation id over a day of marks)."""


def _chain_lines(chain: pl.DataFrame) -> list[str]:
    """The causation chain as aligned text rows: relation, type, times, summary, id.

    Every cause and effect; of the events related only by correlation, the
    :data:`_NEAREST_CORRELATED` nearest either side of the event, and a count of the rest.
    """
    chain = chain.with_row_index("i")
    me = int(chain.filter(pl.col("relation") == "this")["i"][0])
    correlated = chain.filter(pl.col("relation") == "correlated")
    near = pl.concat(
        [
            correlated.filter(pl.col("i") < me).tail(_NEAREST_CORRELATED),
            correlated.filter(pl.col("i") > me).head(_NEAREST_CORRELATED),
        ]
    )["i"]
    shown = chain.filter(
        (pl.col("relation") != "correlated")
        | pl.col("i").is_in(near.implode())
        | pl.col("event_type").is_in([*_ALARMS, "AccountUnblocked"])
    )
    left = chain.height - shown.height
    chain = shown
    rows = [
        (
            r["relation"],
            r["account_id"] or "",
            r["event_type"],
            _stamp(r["occurred_at"]),
            _stamp(r["timestamp"]),
            r["summary"] or "",
            r["event_id"],
        )
        for r in chain.iter_rows(named=True)
    ]
    head = ("relation", "account", "event", "happened (UTC)", "recorded (UTC)", "what", "event id")
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(6)]
    lines = [
        "  " + "  ".join(x[i].ljust(widths[i]) for i in range(6)) + f"  {x[6]}"
        for x in [head, *rows]
    ]
    if left:
        lines.append(
            f"  ... and {left:,} more event{'' if left == 1 else 's'} of the same correlation"
            " (riskbook.audit.causation_chain, or --format json, lists them all)"
        )
    return lines


def _plain(value: Any) -> Any:
    """A value as JSON takes it: times as RFC 3339 text, infinities as the largest double."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%dT%H:%M:%S.%f}Z"
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return STORED_INFINITY if value > 0 else -STORED_INFINITY
    return value
