"""The live engine: the processor's fold of batches of events into effects, with no I/O.

:class:`Engine` is everything the processor decides, as a pure object: give it the
events of the store in global order, batch by batch (:meth:`Engine.apply`), and it
returns the effects (violations, blocks) those events cause, keeping between batches
only small states -- the projection state (:class:`riskbook.projections.ProjectionState`)
and one :class:`riskbook.limits.BreachState` per limit type. Each batch is folded from
those states with the same functions :func:`riskbook.breaches` uses (the limit types'
metric functions and :func:`riskbook.limits.evaluate`): one implementation of each
rule.

The order is the order the store gives (global position): what the engine knew when.
A live engine cannot go back in time, so

* an event whose business time is earlier than the latest one already processed (a
  late event) acts when it arrives: its business time is taken as the latest so far
  (the recorded time likewise). For events recorded in business order -- the normal
  case -- nothing changes;
* a LimitSet recorded before its set_at (a scheduled limit change) does not move the
  clock: it is held, and takes effect at its set_at once the clock gets there (the first
  event at or after it), as :func:`riskbook.breaches` applies it. Its breaches are
  ordered where it takes effect (at its set_at, among the events and block events of
  that time), not where it was recorded. A LimitSet the store learns at or after its
  set_at acts like any other event (on arrival). Known limitation: the live engine has
  no clock of its own, so a scheduled limit takes effect only when an event at or
  after its set_at arrives -- a store that goes quiet reports nothing for it until then
  -- whereas :func:`riskbook.breaches` applies it at its set_at (the breach's time and
  cause are the same once it is reported; :meth:`Engine.as_of` gives the state with it
  in force, as the pre-trade check uses);
* a block or unblock (a decision about the account, not a market fact) acts at the
  clock and does not move it: an operator's unblock recorded at the wall-clock time
  leaves a history replayed from the past on its own days;
* a late mark older than the symbol's latest mark is stale and is ignored;
* a TradeCancelled (bust) takes its trade out: the account's state is refolded from
  its events without the trade, and each metric of the account is re-evaluated at the
  bust (so a bust can end a breach, or start one).

An account is blocked when the latest block event folded is an AccountBlocked, or when
the engine itself has decided a block whose effects are written (``apply(...,
written=True)``, the default) and has not read it back yet (:attr:`Engine.pending`); a
block decided in a fold whose effects are thrown away (a rebuild of the state, a
pre-trade check from the stored history: ``written=False``) blocks nothing.

Folding the same events in any number of batches gives the same effects and states.
``riskbook.breaches(history, levels=1.0)`` over a history recorded in business order
with no busts has exactly the breach starts this engine reports for it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from riskbook.events import STORED_INFINITY, AccountBlocked, LimitViolationDetected
from riskbook.frames import EVENTS_SCHEMA, KINDS, History
from riskbook.limits import BreachState, evaluate, get, names, shared_timelines
from riskbook.limits._evaluate import _limit_frame
from riskbook.limits._registry import ENTRY_POINT_GROUP
from riskbook.projections import ProjectionState, _epoch_us

__all__ = ["DEFAULT_CRITICAL", "Effect", "Engine"]

DEFAULT_CRITICAL = 1.2
"""A breach is critical (the account is blocked) when the metric goes over this many
times the limit."""

_DAY_US = 86_400_000_000
_MIN = np.iinfo(np.int64).min
_FANOUT = 16  # segments of a tier merged into one of the next
_WHOLE = 1 << 30  # the tier of a segment that holds everything before it: never merged
_TIME = pl.Datetime("us", "UTC")
_WHY_INFINITE = {"MaxLeverage": "equity <= 0"}
_BLOCK_TYPES = ("AccountBlocked", "AccountUnblocked")


@dataclass(frozen=True)
class Effect:
    """An event the engine decided to append, and why.

    ``event`` goes to the account's aggregate with ``causation_id`` = the triggering
    event and its ``correlation_id``.
    """

    event: LimitViolationDetected | AccountBlocked
    account_id: str
    causation_id: str
    correlation_id: str
    trigger_position: int
    limit_type: str
    symbol: str | None
    value: float
    limit_value: float

    @property
    def kind(self) -> str:
        return type(self.event).__name__


def _us(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // _ONE_US


_ONE_US = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Engine:
    """The processor's state and its fold (see the module docstring).

    Parameters
    ----------
    critical : the factor of the limit over which a breach blocks the account: one
        number for every limit type, or a mapping from limit type to factor (None: that
        type never blocks; types not in it get :data:`DEFAULT_CRITICAL`), or None: no
        type blocks (``riskbook live --no-block``), not even one registered later.
    types : the limit types to evaluate (default: every registered one, including types
        registered while it runs). A type is evaluated from its first limit (LimitSet)
        on, with its metric's state rebuilt from everything folded before, so it
        compares exactly as :func:`riskbook.breaches` would; a type with no limit
        cannot breach and costs nothing.
    actor : who the engine's blocks are by.
    """

    critical: float | Mapping[str, float | None] | None = DEFAULT_CRITICAL
    types: tuple[str, ...] | None = None
    actor: str = "riskbook-live"
    horizon: int = 0
    """Every event with a position below this has been folded."""
    events_seen: int = 0
    projection: ProjectionState = field(default_factory=ProjectionState.empty)
    breach: dict[str, BreachState] = field(default_factory=dict)
    blocked: dict[str, bool] = field(default_factory=dict)
    """Per account: blocked now (its latest block event folded is an AccountBlocked, or
    a block of this engine's is pending)."""
    pending: dict[str, str] = field(default_factory=dict)
    """Per account: the trigger (causation id) of a block this engine decided in a fold
    whose effects are written, until it reads that AccountBlocked back."""
    scheduled: pl.DataFrame = field(default_factory=lambda: History.empty().limits, repr=False)
    """LimitSet rows recorded before their set_at, held until the clock reaches it."""
    clock: int = _MIN
    """The latest business time folded (microseconds since the epoch); a scheduled
    LimitSet does not move it."""
    recorded: int = _MIN
    """The latest recorded time folded."""
    mark_times: dict[str, int] = field(default_factory=dict)
    """Business time (as recorded) of each symbol's latest mark."""
    open_now: dict[str, pl.DataFrame] = field(default_factory=dict, repr=False)
    """Per limit type: the breaches open after the last fold (with ``limit_value_at_end``,
    the limit in force now)."""
    unregistered: set[str] = field(default_factory=set)
    """Limit types of stored LimitSets that no registered definition evaluates here (a
    type defined in a notebook that is not running this engine): warned about once."""
    _segments: list[History] = field(default_factory=list, repr=False)
    """Everything folded, in order, in a few chunks (see :meth:`_keep`)."""
    _tiers: list[int] = field(default_factory=list, repr=False)
    """Each segment's tier: 0 a batch, k + 1 the merge of _FANOUT segments of tier k."""

    def __post_init__(self) -> None:
        if self.types is not None:
            self.types = (self.types,) if isinstance(self.types, str) else tuple(self.types)
            for name in self.types:
                get(name)  # KeyError for a type that is not registered
                self._levels(name)  # ValueError for a bad critical factor
        elif isinstance(self.critical, Mapping):
            for name in self.critical:
                self._levels(name)
        else:
            self._levels("every limit type")

    @property
    def active(self) -> list[str]:
        """The limit types being evaluated: those with a limit seen so far."""
        return list(self.breach)

    def _candidates(self) -> set[str]:
        return set(self.types if self.types is not None else names())

    # ------------------------------------------------------------------ policy

    def factor(self, limit_type: str) -> float | None:
        """The critical factor of ``limit_type`` (None: never blocks)."""
        if self.critical is None:
            return None
        if isinstance(self.critical, Mapping):
            return self.critical.get(limit_type, DEFAULT_CRITICAL)
        return float(self.critical)

    def _levels(self, limit_type: str) -> tuple[float, ...]:
        f = self.factor(limit_type)
        if f is not None and not (np.isfinite(f) and f >= 1.0):
            raise ValueError(
                f"the critical factor of {limit_type} must be a finite number >= 1, got {f!r}"
                " (None: never block; riskbook live --no-block)"
            )
        return (1.0,) if f is None or f == 1.0 else (1.0, float(f))

    def copy(self) -> Engine:
        """A copy to fold on while the original is kept (states are never mutated)."""
        out = copy.copy(self)
        out.breach = dict(self.breach)
        out.unregistered = set(self.unregistered)
        out.blocked = dict(self.blocked)
        out.pending = dict(self.pending)
        out.mark_times = dict(self.mark_times)
        out.open_now = dict(self.open_now)
        out._segments = list(self._segments)
        out._tiers = list(self._tiers)
        return out

    def as_of(self, when: datetime) -> Engine:
        """A copy with the scheduled limits due by ``when`` in force, as this engine will
        have them once an event at or after ``when`` arrives (each folded at its set_at;
        the effects it decides are thrown away). Nothing due: a plain copy.

        The pre-trade check's state "before" a trade at ``when``: a limit whose set_at
        has come counts there as in the trade's own fold.
        """
        out = self.copy()
        released = out._release(when)
        if released.height == 0:
            return out
        nothing = History.empty()
        nothing.start, nothing.horizon = out.projection, out.horizon
        out._keep(nothing)  # so that a type activated here sees everything folded
        with shared_timelines():
            out._activate_for(released)
            for name in out.active:
                metric = get(name).metric(nothing)
                out._evaluate(name, metric, out._limit_rows(released, name), when)
        return out

    # ------------------------------------------------------------------ the fold

    def apply(self, batch: History, *, written: bool = True) -> list[Effect]:
        """Fold the next events (positions at or above :attr:`horizon`, in order).

        Returns the effects, in the order of their triggers; the states move on.
        ``written``: the effects will be appended to the store (the processor's live
        batches). False when they are thrown away (rebuilding a state, a pre-trade
        check): the blocks decided then do not block the account.
        """
        if batch.events.height == 0:
            self.horizon = max(self.horizon, batch.horizon)
            return []
        first = int(batch.events["position"].min())  # type: ignore[arg-type]
        if first < self.horizon:
            raise ValueError(
                f"the engine has folded everything below position {self.horizon}: "
                f"a batch starting at {first} would fold events twice"
            )
        seen = batch.events.height
        batch = self._in_processing_order(batch)
        effects: list[Effect] = []
        for part, bust in self._split_at_busts(batch) if batch.events.height else ():
            self._keep(part)
            if bust is None:
                effects += self._fold(part, written)
            else:
                effects += self._bust(part, bust, written)
        self.horizon = max(self.horizon, batch.horizon)
        self.events_seen += seen
        return effects

    def _keep(self, part: History) -> None:
        """Add a folded part to the history kept for busts and new limit types.

        Merged like a counter in base _FANOUT: each _FANOUT segments of a tier become one
        of the next, so each row is copied once per tier and a merge's size is bounded
        by its tier. (Merging everything every 256 batches stalled one batch in 256 for
        a copy of the whole history: 17-39 ms after 100k events, growing with it.)
        """
        self._segments.append(part)
        self._tiers.append(0)
        tail = self._tiers[-_FANOUT:]
        while len(tail) == _FANOUT and min(tail) == max(tail) < _WHOLE:
            merged = _concat(self._segments[-_FANOUT:])
            del self._segments[-_FANOUT:], self._tiers[-_FANOUT:]
            self._segments.append(merged)
            self._tiers.append(tail[0] + 1)
            tail = self._tiers[-_FANOUT:]

    def _whole(self, upto: int | None = None) -> History:
        """The segments before ``upto`` (all: None) concatenated, kept as one."""
        end = len(self._segments) if upto is None else upto
        whole = _concat(self._segments[:end])
        self._segments[:end] = [whole]
        self._tiers[:end] = [_WHOLE]
        return whole

    def _in_processing_order(self, batch: History) -> History:
        """Times made monotone in global order (late events act on arrival), stale marks
        dropped, scheduled limits held; the running clocks move on.

        A LimitSet recorded before its set_at, with its set_at after the clock, is a
        scheduled change: it leaves the batch for :attr:`scheduled` (see
        :meth:`_release`) and does not move the clock, so the events that follow it keep
        their own business times.
        """
        ev = batch.events
        pos = ev["position"].to_numpy()
        if (pos[1:] < pos[:-1]).any():  # a store's read is in order already: no sort
            ev = ev.sort("position")
        bt = _epoch_us(ev["occurred_at"], _MIN)
        ts = _epoch_us(ev["timestamp"])
        early = np.zeros(bt.shape[0], bool)
        if batch.limits.height:
            early = (ev["event_type"].cast(pl.String) == "LimitSet").to_numpy() & (bt > ts)
        # A block or unblock is a decision about the account, not a market fact: it acts
        # at the clock and does not move it. An operator's unblock says the wall-clock
        # time; in a history replayed from the past it put every later event on today.
        still = early
        blocks = np.zeros(bt.shape[0], bool)
        if batch.blocks.height:
            blocks = ev["event_type"].is_in(_BLOCK_TYPES).to_numpy()
            still = early | blocks
        c_bt = np.maximum.accumulate(np.maximum(np.where(still, _MIN, bt), self.clock))
        c_ts = np.maximum.accumulate(np.maximum(ts, self.recorded))
        held = early & (bt > c_bt)
        self.clock, self.recorded = int(c_bt[-1]), int(c_ts[-1])
        if blocks.any():  # a block before any clock at all keeps its own time
            c_bt = np.where(blocks & (c_bt == _MIN), bt, c_bt)
        late = bool((c_bt != bt).any() or (c_ts != ts).any())
        if not late and batch.marks.height == 0:
            return batch  # the common case: in order, nothing to drop
        if held.any():
            gone = ev["position"].filter(pl.Series(held)).implode()
            self.scheduled = pl.concat(
                [self.scheduled, batch.limits.filter(pl.col("position").is_in(gone))],
                how="vertical_relaxed",
            )
            keep = ~pl.col("position").is_in(gone)
            batch = History(
                **{n: batch.frame(n).filter(keep) for n in KINDS},  # type: ignore[arg-type]
                events=batch.events.filter(keep),
                horizon=batch.horizon,
            )
            ev, c_bt, c_ts = ev.filter(keep), c_bt[~held], c_ts[~held]
        as_time = pl.col("_bt", "_ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
        clocks = pl.DataFrame(
            {"position": ev["position"], "_bt": pl.Series(c_bt, dtype=pl.Int64),
             "_ts": pl.Series(c_ts, dtype=pl.Int64)}
        ).with_columns(as_time)  # fmt: skip
        frames: dict[str, pl.DataFrame] = {}
        for name, kind in KINDS.items():
            frame = batch.frame(name)
            if name == "marks" and frame.height:
                frame = self._fresh_marks(frame.sort("position"))
            if late and frame.height:
                frame = (
                    frame.join(clocks, on="position", how="left", maintain_order="left")
                    .with_columns(pl.col("_bt").alias(kind.time), pl.col("_ts").alias("timestamp"))
                    .drop("_bt", "_ts")
                )
            frames[name] = frame
        events = ev
        if late:
            events = ev.with_columns(occurred_at=clocks["_bt"], timestamp=clocks["_ts"]).select(
                list(EVENTS_SCHEMA)
            )
        return History(**frames, events=events, horizon=batch.horizon)  # type: ignore[arg-type]

    def _release(self, through: datetime) -> pl.DataFrame:
        """The scheduled limits whose set_at the clock has reached (``through``), taken
        out of :attr:`scheduled`: they take effect at their set_at in this fold."""
        if self.scheduled.height == 0:
            return self.scheduled
        due = pl.col("set_at") <= through
        out = self.scheduled.filter(due)
        if out.height:
            self.scheduled = self.scheduled.filter(~due)
        return out

    def _fresh_marks(self, marks: pl.DataFrame) -> pl.DataFrame:
        """Marks that are not older than their symbol's latest mark; remembers the latest."""
        known = pl.DataFrame(
            {"symbol": list(self.mark_times), "_known": list(self.mark_times.values())},
            schema={"symbol": pl.String, "_known": pl.Int64},
        )
        t = (
            marks.select(pl.col("symbol").cast(pl.String), _t=pl.col("marked_at").dt.epoch("us"))
            .join(known, on="symbol", how="left", maintain_order="left")
            .with_columns(
                _before=pl.max_horizontal(
                    pl.col("_t").cum_max().shift(1).over("symbol"), pl.col("_known")
                )
            )
        )
        keep = (t["_before"].is_null() | (t["_t"] >= t["_before"])).to_numpy()
        latest = t.group_by("symbol").agg(pl.col("_t").max())
        for symbol, us in latest.iter_rows():
            self.mark_times[symbol] = max(us, self.mark_times.get(symbol, _MIN))
        return marks.filter(pl.Series(keep)) if not keep.all() else marks

    @staticmethod
    def _split_at_busts(batch: History) -> Iterable[tuple[History, int | None]]:
        """The batch as runs without busts and single busts (by position), in order."""
        if batch.cancels.height == 0:
            yield batch, None
            return
        cuts = sorted(batch.cancels["position"].to_list())
        lo = int(batch.events["position"].min())  # type: ignore[arg-type]
        for c in [*cuts, None]:
            hi = batch.horizon if c is None else c
            if hi > lo:
                part = _slice(batch, lo, hi)
                if part.events.height:
                    yield part, None
            if c is not None:
                yield _slice(batch, c, c + 1), c
                lo = c + 1

    @staticmethod
    def _limit_rows(limits: pl.DataFrame, name: str) -> pl.DataFrame:
        if limits.height == 0:
            return _NO_LIMITS
        return _limit_frame(limits.filter(pl.col("limit_type") == name))

    def _activate_for(self, limits: pl.DataFrame) -> None:
        """Start evaluating the wanted limit types that get their first limit here."""
        if limits.height == 0:
            return
        limited = set(limits["limit_type"].cast(pl.String).unique().to_list())
        for name in sorted(limited & self._candidates() - set(self.breach)):
            self._activate(name)
        unknown = limited - set(names()) - self.unregistered
        if unknown:
            self.unregistered |= unknown
            warnings.warn(
                f"limit type(s) {', '.join(sorted(unknown))} not registered here: their "
                "stored limits are not evaluated (register them, e.g. by an entry point "
                f"in the group {ENTRY_POINT_GROUP!r}, where this engine runs)",
                stacklevel=2,
            )

    def _fold(self, part: History, written: bool) -> list[Effect]:
        part.start = self.projection
        through = part.events["occurred_at"].max()
        assert isinstance(through, datetime)
        released = self._release(through)
        limits = part.limits
        if released.height:
            limits = pl.concat([limits, released], how="vertical_relaxed")
        found = []
        with shared_timelines():
            self._activate_for(limits)
            whole = None
            for name in self.active:
                definition = get(name)
                if getattr(definition, "incremental", False):
                    metric = definition.metric(part)
                else:  # everything folded (this part included), the part's rows kept
                    whole = self._whole() if whole is None else whole
                    metric = definition.metric(whole)
                    first = int(part.events["position"].min())  # type: ignore[arg-type]
                    metric = metric.filter(pl.col("position") >= first)
                found.append(self._evaluate(name, metric, self._limit_rows(limits, name), through))
        self.projection = ProjectionState.after(part)
        return self._effects(part, found, written, released)

    def _activate(self, name: str) -> None:
        """Start evaluating ``name`` (its first limit is in the part being folded): its
        metric state from everything folded before, so it compares exactly as
        :func:`riskbook.breaches` would from the start."""
        prior = self._segments[:-1]
        if not prior:
            self.breach[name] = BreachState.empty(get(name), self._levels(name))
            return
        whole = self._whole(-1)
        latest = whole.events["occurred_at"].max()
        through = latest if isinstance(latest, datetime) else None
        with shared_timelines():
            metric = get(name).metric(whole)
        _, self.breach[name] = evaluate(
            get(name), metric, _NO_LIMITS, levels=self._levels(name), through=through
        )

    def _evaluate(
        self, name: str, metric: pl.DataFrame, limits: pl.DataFrame, through: datetime
    ) -> pl.DataFrame:
        intervals, self.breach[name] = evaluate(
            get(name),
            metric,
            limits,
            levels=self._levels(name),
            state=self.breach.get(name),
            through=through,
        )
        self.open_now[name] = intervals.filter(pl.col("ended_at").is_null())
        return intervals.filter(~pl.col("carried")).with_columns(limit_type=pl.lit(name))

    def _bust(self, part: History, position: int, written: bool) -> list[Effect]:
        """A bust: refold its account without the trade; re-evaluate its metrics there."""
        cancel = part.cancels.row(0, named=True)
        account = str(cancel["account_id"])
        at: datetime = cancel["cancelled_at"]
        released = self._release(at)
        with shared_timelines():
            self._activate_for(released)  # before the merge: from what came before the bust
        whole = self._whole()
        mine = _account_only(whole, account)
        after = ProjectionState.after(mine)
        self.projection = _replace_account(self.projection, after, account)
        day = _us(at) // _DAY_US
        found = []
        with shared_timelines():
            for name in self.active:
                definition = get(name)
                metric = definition.metric(mine)
                rows = _latest_per_key(metric, definition.scope, account, day)
                known = self.breach.get(name)
                if known is not None:  # keys the bust emptied: back to zero
                    gone = (
                        known.metrics.filter(pl.col("account_id") == account)
                        .select("account_id", "symbol")
                        .join(rows.select("account_id", "symbol"), on=["account_id", "symbol"],
                              how="anti", nulls_equal=True)
                        .with_columns(value=pl.lit(0.0))
                    )  # fmt: skip
                    rows = pl.concat([rows, gone], how="diagonal_relaxed")
                rows = rows.with_columns(
                    time=pl.lit(at, _TIME),
                    timestamp=pl.lit(cancel["timestamp"], _TIME),
                    position=pl.lit(position, pl.Int64),
                    event_id=pl.lit(cancel["event_id"], pl.String),
                )
                found.append(self._evaluate(name, rows, self._limit_rows(released, name), at))
        return self._effects(part, found, written, released)

    def _effects(
        self, part: History, found: list[pl.DataFrame], written: bool, released: pl.DataFrame
    ) -> list[Effect]:
        """Violations (level 1.0) and blocks (critical level) of the breaches that started.

        The block state moves on with the part's block events, in order with the
        triggers; a block decided here counts (:attr:`pending`, until its AccountBlocked
        is read back) only if the effects are ``written``.

        An infinite metric (leverage with equity <= 0 and a position, DESIGN.md §4)
        cannot be stored (events hold finite numbers only): the violation's
        ``current_value`` is then :data:`riskbook.events.STORED_INFINITY` (the largest double,
        greater than any limit), the block's reason says "infinite", and the
        :class:`Effect`'s ``value`` keeps ``inf``. ``riskbook.reconcile`` matches
        violations by cause and limit, so the clamped value reconciles as any other.
        """
        starts = pl.concat(found) if found else pl.DataFrame()
        if starts.height == 0:
            self._note_blocks(part.blocks)
            return []
        ids = starts["trigger_event_id"]
        if ids.null_count():
            lookup = part.events.select("position", _id="event_id")
            starts = starts.join(
                lookup.rename({"position": "trigger_position"}), on="trigger_position", how="left"
            ).with_columns(trigger_event_id=pl.coalesce("trigger_event_id", "_id"))
        corr = part.events.select(trigger_event_id="event_id", _corr="correlation_id")
        if released.height:  # a scheduled limit can trigger: its correlation id too
            corr = pl.concat(
                [corr, released.select(trigger_event_id="event_id", _corr="correlation_id")]
            )
        # In the order they happen: by business time, then position. The part's events
        # have times monotone in position (see _in_processing_order), so for them this is
        # the position order; a released scheduled limit was recorded earlier (a smaller
        # position) but acts at its set_at, among the events of that time.
        starts = starts.join(corr, on="trigger_event_id", how="left").sort(
            "started_at", "trigger_position", "limit_type", pl.col("symbol").cast(pl.String),
            "level", nulls_last=False,
        )  # fmt: skip
        stored = part.blocks.sort("position").select(
            pl.col("account_id").cast(pl.String), "blocked", "at", "position", "causation_id"
        )
        pending = stored.iter_rows()
        next_stored = next(pending, None)
        effects: list[Effect] = []
        for row in starts.iter_rows(named=True):
            when = (row["started_at"], row["trigger_position"])
            while next_stored is not None and (next_stored[2], next_stored[3]) < when:
                self._note_block(next_stored[0], next_stored[1], next_stored[4])
                next_stored = next(pending, None)
            account = str(row["account_id"])
            symbol = None if row["symbol"] is None else str(row["symbol"])
            name = row["limit_type"]
            value = float(row["trigger_value"])
            common = {
                "account_id": account,
                "causation_id": row["trigger_event_id"],
                "correlation_id": row["_corr"] or str(row["trigger_event_id"]),
                "trigger_position": row["trigger_position"],
                "limit_type": name,
                "symbol": symbol,
                "value": value,
                "limit_value": row["limit_value"],
            }
            if row["level"] == 1.0:
                event: Any = LimitViolationDetected(
                    account_id=account,
                    limit_type=name,
                    current_value=min(value, STORED_INFINITY),
                    limit_value=row["limit_value"],
                    detected_at=row["started_at"],
                    symbol=symbol,
                )
                effects.append(Effect(event, **common))
            if row["level"] == (self.factor(name) or 0.0) and not self.blocked.get(account):
                where = f" {symbol}" if symbol else ""
                event = AccountBlocked(
                    account_id=account,
                    reason=f"critical {name}{where}: {describe(value, name)} > "
                    f"{row['level']:g} x limit {row['limit_value']:g}",
                    blocked_by=self.actor,
                    blocked_at=row["started_at"],
                )
                effects.append(Effect(event, **common))
                if written:
                    self.pending[account] = str(row["trigger_event_id"])
                    self.blocked[account] = True
        while next_stored is not None:
            self._note_block(next_stored[0], next_stored[1], next_stored[4])
            next_stored = next(pending, None)
        return effects

    def _note_blocks(self, blocks: pl.DataFrame) -> None:
        for account, blocked, cause in (
            blocks.sort("position")
            .select(pl.col("account_id").cast(pl.String), "blocked", "causation_id")
            .rows()
        ):
            self._note_block(account, blocked, cause)

    def _note_block(self, account: str, blocked: bool, cause: str | None) -> None:
        """A stored AccountBlocked (``blocked``) or AccountUnblocked of ``account``."""
        if blocked and cause is not None and self.pending.get(account) == str(cause):
            del self.pending[account]  # this engine's own block, read back
        self.blocked[account] = bool(blocked) or account in self.pending

    def expect_block(self, account: str, causation_id: str) -> None:
        """Count a block written by this engine's processor and not read back yet (the
        processor's rebuild after a restart: see :attr:`pending`)."""
        self.pending[account] = str(causation_id)
        self.blocked[account] = True


def describe(value: float, limit_type: str | None = None) -> str:
    """A metric value for messages: ``infinite`` (with why, for known types) or ``%g``."""
    if math.isinf(value) and value > 0:
        why = _WHY_INFINITE.get(limit_type or "")
        return f"infinite ({why})" if why else "infinite"
    return f"{value:g}"


# ----------------------------------------------------------------------------- helpers

_NO_LIMITS = _limit_frame(History.empty().limits)


def _slice(history: History, lo: int, hi: int) -> History:
    """The events with ``lo <= position < hi``."""
    inside = pl.col("position").is_between(lo, hi, closed="left")
    frames = {n: history.frame(n).filter(inside) for n in [*KINDS, "events"]}
    return History(**frames, horizon=hi)  # type: ignore[arg-type]


def _concat(parts: list[History]) -> History:
    frames = {
        n: pl.concat([p.frame(n) for p in parts], how="vertical_relaxed")
        for n in [*KINDS, "events"]
    }
    return History(**frames, horizon=parts[-1].horizon)  # type: ignore[arg-type]


def _account_only(history: History, account: str) -> History:
    """The account's own events and every mark."""
    mine = pl.col("account_id").cast(pl.String) == account
    frames = {
        n: (history.frame(n) if n == "marks" else history.frame(n).filter(mine)) for n in KINDS
    }
    events = history.events.filter(
        pl.col("position").is_in(pl.concat([f["position"] for f in frames.values()]).implode())
    )
    return History(**frames, events=events, horizon=history.horizon)  # type: ignore[arg-type]


def _replace_account(
    state: ProjectionState, fresh: ProjectionState, account: str
) -> ProjectionState:
    def swap(old: pl.DataFrame, new: pl.DataFrame, sort: list[str]) -> pl.DataFrame:
        keep = old.filter(pl.col("account_id") != account)
        return pl.concat([keep, new.filter(pl.col("account_id") == account)]).sort(sort)

    return ProjectionState(
        swap(state.positions, fresh.positions, ["account_id", "symbol"]),
        swap(state.accounts, fresh.accounts, ["account_id"]),
        state.marks,
        swap(state.days, fresh.days, ["account_id"]),
    )


def _latest_per_key(metric: pl.DataFrame, scope: str, account: str, day: int) -> pl.DataFrame:
    """The last metric row of each key of ``account`` (today's, for daily scopes: a key
    with no row today is back to zero)."""
    by_symbol = "symbol" in scope
    rows = metric.select(
        pl.col("account_id").cast(pl.String),
        (pl.col("symbol").cast(pl.String) if by_symbol else pl.lit(None, pl.String)).alias(
            "symbol"
        ),
        pl.col("time").dt.epoch("us").alias("_t"),
        pl.col("value").cast(pl.Float64),
    ).filter(pl.col("account_id") == account)
    last = rows.group_by("account_id", "symbol", maintain_order=True).last()
    if scope.endswith("_day"):
        last = last.with_columns(
            value=pl.when(pl.col("_t") // _DAY_US == day).then("value").otherwise(0.0)
        )
    return last.drop("_t")
