"""Incidents for auditors: what the engine knew, which limit applied, what caused what.

Every alarm on record is a ``LimitViolationDetected`` or an ``AccountBlocked``
(:func:`incidents`). :func:`explain` reconstructs one of them -- or any event -- from the
history alone:

* the event and its **causation chain** (:func:`causation_chain`): the trade or mark
  that caused it, what it caused in turn, and the events of the same correlation;
* the **limit in force** at its business time *as known when it was recorded*, and who
  set it (:func:`limit_in_force`; a symbol's own MaxPositionSize overrides the
  account's);
* the **metric** as the engine saw it (at T, known at K = the event's recorded time),
  just before its cause was recorded, and as the corrected history has it today (a
  trade busted later makes them differ: :func:`compare_states`);
* what the engine **wrote** (the violation's ``current_value`` and ``limit_value``)
  against what the history rebuilds, and the **unblock** that ended a block;
* **findings**: each way in which the record and the rebuilt history disagree.

The result, :class:`Incident`, prints as a report (``riskbook explain EVENT_ID`` prints
the same), renders as Markdown in a notebook, and gives its parts as frames and values.
The functions here use Polars only: :mod:`riskbook.widgets`' incident panel is built on
them.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from riskbook import limits as L
from riskbook import projections as P
from riskbook import viz
from riskbook.events import STORED_INFINITY, as_time
from riskbook.frames import History

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
    type and symbol are those of the violation with the same cause (or correlation),
    when there is one.
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
    about = v.select("causation_id", "correlation_id", "limit_type", "symbol")
    by_cause = b.join(
        about.drop("correlation_id").unique("causation_id"), on="causation_id", how="left"
    )
    by_corr = (
        by_cause.filter(pl.col("limit_type").is_null())
        .drop("limit_type", "symbol")
        .join(about.drop("causation_id").unique("correlation_id"), on="correlation_id", how="left")
    )
    b = pl.concat(
        [by_cause.filter(pl.col("limit_type").is_not_null()), by_corr], how="diagonal"
    ).select(v.columns)
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

    The latest LimitSet per (limit_type, symbol) with ``set_at <= at`` and recorded
    (``timestamp``) by ``known_at`` -- latest in the order (business time, recorded
    time, position). Returns ``limit_type, symbol`` (null: account-wide), ``value,
    set_by, set_at, recorded_at, event_id``.
    """
    at, known_at = as_time(at, "at"), as_time(known_at, "known_at")
    rows = viz._frame(limits, "limits").filter(pl.col("account_id").cast(pl.String) == account)
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
    summaries = viz.event_lanes(
        history, start=lo, end=hi, accounts=None, max_rows=1_000_000
    ).filter(pl.col("event_id").is_in(rows["event_id"].implode()))
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

_ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Incident:
    """One event reconstructed from the history: see :func:`explain`.

    ``event``: the event (``event_id, event_type, account_id, occurred_at, timestamp,
    position, causation_id, summary``); ``limit_type`` and ``symbol``: the limit it is
    about (a violation's, a block's through the violation beside it, a LimitSet's own;
    None for other events); ``chain``: :func:`causation_chain`; ``cause``: the first
    event of the chain that caused it (None when nothing on record did).

    At the event's business time T, as known at its recorded time K: ``limit`` (the
    :func:`limit_in_force`, None when no limit of the type was in force), ``limits``
    (every limit of the account in force) and ``compare`` (:func:`compare_states`).

    The metric the limit is checked against (None where it is not available): ``before``
    (at T, known just before the cause was recorded), ``engine_saw`` (at T, known at K),
    ``corrected`` (at T, everything known now). ``violation``: the LimitViolationDetected
    the alarm goes with -- the event itself, or a block's violation (``event_id,
    detected_at, current_value, limit_value`` as the engine wrote them, and
    ``same_cause``: False when a block came later in the breach than its start, so that
    its figures are those of the breach's start). ``unblocked``: for a block, the unblock that ended it
    (``event_id, at, by, reason, timestamp``) or None. ``findings``: each way in which
    what was recorded and the rebuilt history disagree (empty when they agree).
    """

    event: dict[str, Any]
    limit_type: str | None
    symbol: str | None
    chain: pl.DataFrame = field(repr=False)
    cause: dict[str, Any] | None
    limit: dict[str, Any] | None
    limits: pl.DataFrame = field(repr=False)
    compare: pl.DataFrame = field(repr=False)
    before: float | None
    engine_saw: float | None
    corrected: float | None
    violation: dict[str, Any] | None
    unblocked: dict[str, Any] | None
    findings: list[str]

    @property
    def metric_name(self) -> str:
        """How the report names the metric: ``|position| in CRUX``, ``leverage``..."""
        name = _METRIC_NAMES.get(self.limit_type or "", "metric")
        return f"{name} in {self.symbol}" if self.symbol and self.limit_type else name

    @property
    def still_a_breach(self) -> bool | None:
        """Whether the corrected history is over the limit at T (None: not known)."""
        if self.limit is None or self.corrected is None:
            return None
        return self.corrected > self.limit["value"]

    def report(self) -> str:
        """The reconstruction as plain text (what ``riskbook explain`` prints)."""
        ev = self.event
        lines = [f"{ev['event_type']} {ev['event_id']}"]
        late = _duration(ev["timestamp"] - ev["occurred_at"], "later", "earlier")
        facts = [
            ("account", ev["account_id"] or "(none: the event belongs to no account)"),
            ("limit", _limit_name(self.limit_type, self.symbol) if self.limit_type else None),
            ("happened", _when(ev["occurred_at"])),
            ("recorded", f"{_when(ev['timestamp'])} ({late})"),
            ("what", ev["summary"]),
        ]
        lines += [f"  {k:<10}{v}" for k, v in facts if v]

        lines += ["", "Cause"]
        c = self.cause
        if c is None:
            lines.append("  none on record: no event of this history is named as its cause")
        else:
            lines.append(f"  {c['event_type']} {c['event_id']}")
            lines.append(
                f"    happened {_when(c['occurred_at'])}, recorded {_when(c['timestamp'])}"
            )
            if c["summary"]:
                lines.append(f"    {c['summary']}")

        if self.limit_type is not None:
            lines += ["", "Limit in force (at the business time, as known when recorded)"]
            lim = self.limit
            if lim is None:
                lines.append(f"  no {_limit_name(self.limit_type, self.symbol)} was in force")
            else:
                scope = f"for {lim['symbol']} only" if lim["symbol"] else "account-wide"
                lines.append(
                    f"  {self.limit_type} {scope}: {_figure(lim['value'])}, set by"
                    f" {lim['set_by'] or '?'}, in force from {_when(lim['set_at'])}"
                )
                lines.append(f"    recorded {_when(lim['recorded_at'])}, event {lim['event_id']}")
            lines += ["", f"Metric: {self.metric_name}"]
            limit_value = None if lim is None else lim["value"]
            v = self.violation
            if v is not None:
                label = "written by the engine" if v["same_cause"] else "the breach began"
                when = "" if v["same_cause"] else f" at {_when(v['detected_at'])}"
                lines.append(
                    f"  {label:<26}{_figure(v['current_value'])} against a limit of"
                    f" {_figure(v['limit_value'])}{when}"
                    f" (LimitViolationDetected {v['event_id']})"
                )
            for label, value in (
                ("before the cause", self.before if self.cause is not None else None),
                ("as the engine knew it", self.engine_saw),
                ("corrected (known today)", self.corrected),
            ):
                if label == "before the cause" and self.cause is None:
                    continue
                lines.append(f"  {label:<26}{_verdict(value, limit_value)}")

        if ev["event_type"] == "AccountBlocked":
            u = self.unblocked
            lines.append("")
            if u is None:
                lines.append("Unblocked: not on record (the account is still blocked)")
            else:
                lines.append(
                    f"Unblocked {_when(u['at'])} by {u['by']}"
                    f" ({_duration(u['at'] - ev['occurred_at'], 'after', 'before')} the block):"
                    f" {u['reason']}"
                )

        if self.findings or ev["event_type"] in _ALARMS:
            lines += ["", "Findings"]
            lines += [f"  - {f}" for f in self.findings] or [
                "  none: what was recorded agrees with the history rebuilt as known then"
            ]

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
            "limit": _plain(self.limit),
            "limits": [_plain(r) for r in self.limits.iter_rows(named=True)],
            "metric": {
                "name": self.metric_name if self.limit_type else None,
                "before": _plain(self.before),
                "engine_saw": _plain(self.engine_saw),
                "corrected": _plain(self.corrected),
                "violation": _plain(self.violation),
                "still_a_breach": self.still_a_breach,
            },
            "unblocked": _plain(self.unblocked),
            "findings": list(self.findings),
            "compare": [_plain(r) for r in self.compare.iter_rows(named=True)],
            "chain": [_plain(r) for r in self.chain.iter_rows(named=True)],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def explain(history: History, event_id: str | uuid.UUID) -> Incident:
    """Reconstruct one event -- a violation, a block, or any other -- from the history.

    What the engine knew when it acted is the history as known at the event's recorded
    time K, at its business time T. From it: the limit in force and who set it, the
    metric before the cause, as the engine saw it and as corrected since, what the
    engine wrote in its violation, the unblock that ended a block, and the findings
    where the record and the rebuilt history disagree. See :class:`Incident`.

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
    t, k = event["occurred_at"], event["timestamp"]
    causes = chain.filter(pl.col("relation") == "cause")
    cause = causes.row(0, named=True) if causes.height else None

    limit_type, symbol, violation = _about(history, event)
    findings: list[str] = []
    limits = compare = pl.DataFrame()
    limit = None
    before = engine_saw = corrected = None
    if account is not None:
        compare = compare_states(history, account=account, at=t, known_at=k)
        limits = limits_in_force(history.limits, account=account, at=t, known_at=k)
    if account is not None and limit_type is not None:
        limit = limit_in_force(
            history.limits, account=account, limit_type=limit_type, symbol=symbol, at=t, known_at=k
        )
        try:
            L.get(limit_type)
        except KeyError:
            findings.append(
                f"no definition of the limit type {limit_type} is installed here: its metric"
                " is not rebuilt (register it, or install the package that defines it)"
            )
        else:

            def metric(known: datetime | None) -> float | None:
                value = L.metric_at(
                    history, limit_type, account=account, symbol=symbol, at=t, known_at=known
                )
                if value is None and limit_type == "MaxPositionSize" and symbol is not None:
                    return 0.0  # no trade in the symbol yet: flat
                return value

            engine_saw, corrected = metric(k), metric(None)
            if cause is not None:
                before = metric(cause["timestamp"] - _ONE_MICROSECOND)

    if kind in _ALARMS and limit_type is not None:
        written = violation if violation is not None and violation["same_cause"] else None
        findings += _disagreements(
            history, event, limit_type, limit, engine_saw, corrected, written
        )
    unblocked = _unblock(history, event) if kind == "AccountBlocked" else None
    return Incident(
        event=event,
        limit_type=limit_type,
        symbol=symbol,
        chain=chain,
        cause=cause,
        limit=limit,
        limits=limits,
        compare=compare,
        before=before,
        engine_saw=engine_saw,
        corrected=corrected,
        violation=violation,
        unblocked=unblocked,
        findings=findings,
    )


def _about(
    history: History, event: dict[str, Any]
) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """The limit type and symbol an event is about, and the violation that says so.

    A violation names them; a block through the violation of the same account with the
    same cause (or, failing that, correlation); a LimitSet is its own limit."""
    kind, eid = event["event_type"], event["event_id"]
    v = history.violations.with_columns(
        pl.col("account_id").cast(pl.String),
        pl.col("limit_type").cast(pl.String),
        pl.col("symbol").cast(pl.String),
    )
    if kind == "LimitViolationDetected":
        row = v.filter(pl.col("event_id") == eid).row(0, named=True)
        return row["limit_type"], row["symbol"], _written(row, same_cause=True)
    if kind == "LimitSet":
        row = history.limits.filter(pl.col("event_id") == eid).row(0, named=True)
        sym = row["symbol"]
        return str(row["limit_type"]), None if sym is None else str(sym), None
    if kind != "AccountBlocked":
        return None, None, None
    block = history.blocks.filter(pl.col("event_id") == eid).row(0, named=True)
    mine = v.filter(pl.col("account_id") == event["account_id"])
    for key in ("causation_id", "correlation_id"):
        if block[key] is None:
            continue
        same = mine.filter(pl.col(key) == block[key])
        if same.height:
            # the violation nearest before the block in the store's order
            earlier = same.filter(pl.col("position") < block["position"])
            row = (earlier if earlier.height else same).sort("position").row(-1, named=True)
            written = _written(row, same_cause=key == "causation_id")
            return row["limit_type"], row["symbol"], written
    return None, None, None


def _written(row: dict[str, Any], *, same_cause: bool) -> dict[str, Any]:
    """What a LimitViolationDetected row says, as :attr:`Incident.violation` keeps it."""
    keep = ("event_id", "detected_at", "current_value", "limit_value")
    return {**{k: row[k] for k in keep}, "same_cause": same_cause}


def _unblock(history: History, event: dict[str, Any]) -> dict[str, Any] | None:
    """The first AccountUnblocked of the account after a block, in the store's order."""
    after = history.blocks.filter(
        (pl.col("account_id").cast(pl.String) == event["account_id"])
        & (pl.col("position") > event["position"])
    ).sort("position")
    for row in after.iter_rows(named=True):
        if row["blocked"]:
            return None  # blocked again before any unblock: this block never ended alone
        return {
            "event_id": row["event_id"],
            "at": row["at"],
            "by": None if row["by"] is None else str(row["by"]),
            "reason": row["reason"],
            "timestamp": row["timestamp"],
        }
    return None


def _disagreements(
    history: History,
    event: dict[str, Any],
    limit_type: str,
    limit: dict[str, Any] | None,
    engine_saw: float | None,
    corrected: float | None,
    written: dict[str, Any] | None,
) -> list[str]:
    """The findings of an alarm: where the record and the rebuilt history disagree.

    ``written``: the violation whose figures are the alarm's own (same cause), if any."""
    out: list[str] = []
    recorded_value = None if written is None else written["current_value"]
    recorded_limit = None if written is None else written["limit_value"]
    if limit is None:
        out.append(
            f"no {limit_type} was in force at the alarm's business time as known when it was"
            " recorded: the history does not hold the limit the alarm is about"
        )
    elif recorded_limit is not None and not _same(recorded_limit, limit["value"]):
        out.append(
            f"the engine wrote a limit of {_figure(recorded_limit)}, but the {limit_type} in"
            f" force then, as known then, was {_figure(limit['value'])} (set by"
            f" {limit['set_by'] or '?'}, event {limit['event_id']})"
        )
    if (
        recorded_value is not None
        and engine_saw is not None
        and not _same(recorded_value, engine_saw)
    ):
        out.append(
            f"the engine wrote a metric of {_figure(recorded_value)}; the history as known"
            f" then rebuilds {_figure(engine_saw)}"
        )
    if limit is not None and engine_saw is not None and not engine_saw > limit["value"]:
        out.append(
            f"as known then, the metric ({_figure(engine_saw)}) was within the limit"
            f" ({_figure(limit['value'])}): the history does not show the breach the alarm"
            " reports"
        )
    elif (
        limit is not None
        and engine_saw is not None
        and corrected is not None
        and not corrected > limit["value"]
    ):
        busts = _busts_after(history, event)
        why = (
            f": {busts} trade{'' if busts == 1 else 's'} of the account busted after the"
            " alarm was recorded"
            if busts
            else ": the history was corrected after the alarm was recorded"
        )
        out.append(
            f"the alarm was right on what was known, but the corrected history has no breach"
            f" ({_figure(corrected)} within {_figure(limit['value'])}){why}"
        )
    return out


def _busts_after(history: History, event: dict[str, Any]) -> int:
    """How many of the account's trades up to the event's time were busted after its
    recording (a bust recorded later corrects what the engine saw)."""
    trades = history.trades.filter(
        (pl.col("account_id").cast(pl.String) == event["account_id"])
        & (pl.col("executed_at") <= event["occurred_at"])
    )
    late = history.cancels.filter(pl.col("timestamp") > event["timestamp"])
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


def _when(t: datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S.%f} UTC"


def _duration(span: timedelta, ahead: str, behind: str) -> str:
    """``1.570 ms later``, ``26 min 58 s after``, ``2.0 days earlier`` (for people):
    ``ahead`` or ``behind`` by the sign of ``span``."""
    s = span.total_seconds()
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
            r["event_type"],
            f"{r['occurred_at']:%Y-%m-%d %H:%M:%S.%f}",
            f"{r['timestamp']:%Y-%m-%d %H:%M:%S.%f}",
            r["summary"] or "",
            r["event_id"],
        )
        for r in chain.iter_rows(named=True)
    ]
    head = ("relation", "event", "happened (UTC)", "recorded (UTC)", "what", "event id")
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(5)]
    lines = [
        "  " + "  ".join(x[i].ljust(widths[i]) for i in range(5)) + f"  {x[5]}"
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
