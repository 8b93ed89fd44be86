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
  (a running :class:`~riskbook.live.Processor` warns, once its set_at has passed, that
  it is due) -- whereas :func:`riskbook.breaches` applies it at its set_at (the breach's time and
  cause are the same once it is reported; :meth:`Engine.as_of` gives the state with it
  in force, as the pre-trade check uses);
* a block or unblock (a decision about the account, not a market fact) acts at the
  clock and does not move it: an operator's unblock recorded at the wall-clock time
  leaves a history replayed from the past on its own days;
* a late mark older than the symbol's latest mark is stale and is ignored;
* a TradeCancelled (bust) takes its trade out: the account's state is refolded from
  its events without the trade, and each metric of the account is re-evaluated at the
  bust (so a bust can end a breach, or start one). The refold starts from a state kept
  before the trade, so a bust costs about the events since its trade, not the history
  (see :meth:`Engine._refold`); it gives exactly what refolding the account's whole
  history gives.

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

import bisect
import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from riskbook._reasons import block_reason, figure
from riskbook._time import us as _us
from riskbook.events import STORED_INFINITY, AccountBlocked, LimitViolationDetected
from riskbook.frames import EVENTS_SCHEMA, KINDS, History
from riskbook.frames import _empty as _empty_frame
from riskbook.limits import BreachState, evaluate, get, names, shared_timelines
from riskbook.limits._builtin import daily_volume, drawdown, leverage, position_size
from riskbook.limits._evaluate import _limit_frame
from riskbook.limits._registry import ENTRY_POINT_GROUP
from riskbook.projections import (
    _NEVER,
    ProjectionState,
    _build_book,
    _compiled,
    _epoch_us,
    _final_state,
    _Timelines,
)

__all__ = ["DEFAULT_CRITICAL", "Effect", "Engine"]

DEFAULT_CRITICAL = 1.2
"""A breach is critical (the account is blocked) when the metric goes over this many
times the limit."""

_DAY_US = 86_400_000_000
_MIN = np.iinfo(np.int64).min
_FANOUT = 16  # segments of a tier merged into one of the next
_WHOLE = 1 << 30  # the tier of a segment that holds everything before it: never merged
_SPACING = 4  # a kept start state is at most 1/_SPACING of its age from the next newer one
_DEFERRED_ROWS = 1_000_000  # metric rows a batch holds for one evaluation before it evaluates
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
    limit_times: dict[tuple[str, str, str | None], int] = field(default_factory=dict)
    """Per (account, limit type, symbol): the set_at (as recorded) of the latest
    LimitSet in force. A late LimitSet with an older set_at is stale: the newer one
    applies from its own set_at on (DESIGN.md §5), so it is not folded."""
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
    _reference: bool = field(default=False, repr=False)
    """Handle each bust by refolding its account's whole history (the implementation
    before the refold from a kept state; the tests and benchmarks compare the two)."""
    _starts: list[tuple[int, int, ProjectionState]] = field(default_factory=list, repr=False)
    """(first position, events folded before it, projection state before it) of folded
    parts, thinned as they age (see :meth:`_thin`): where a bust's refold of its account
    can start."""
    _folded: int = field(default=0, repr=False)
    """Events of the parts folded so far (the age of a kept state is counted in them:
    positions can leave gaps)."""
    _layout: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    """Per account: the symbols of its trades and adjustments so far, sorted (the
    leaves of its segment trees in a fold of its whole history)."""
    _gaps: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    """Per account: symbols of its layout with no position (every trade of them busted)."""
    _valid_from: dict[str, int | None] = field(default_factory=dict, repr=False)
    """Per account: the kept states at or after this position hold its figures as a fold
    of its whole history gives them (absent: all; None: none, until its next bust)."""
    _busted: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict, repr=False)
    """Per account: disjoint sorted (lo, hi): kept states at positions in (lo, hi] hold
    a trade busted since (lo: the trade's position; hi: the bust that took it out)."""
    _cancels: dict[str, pl.DataFrame] = field(default_factory=dict, repr=False)
    """Per account: its TradeCancelled rows so far."""
    _cancelled: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    """Per account: the trade ids of every TradeCancelled folded (both implementations).
    A trade recorded after its cancel never counts (DESIGN.md §4: as if never executed,
    as soon as the cancel is known): it is kept in the history, not folded."""
    _anchor: dict[str, tuple[int, ProjectionState]] = field(default_factory=dict, repr=False)
    """Per account: (position after its last bust, the state then)."""
    _stored_blocked: dict[str, bool] = field(default_factory=dict, repr=False)
    """Per account: blocked as its stored block events say -- :attr:`blocked` of a fold
    of everything so far with ``written=False`` (see :meth:`as_rebuilt`)."""
    _rebuild_blocks: set[tuple[str, str]] = field(default_factory=set, repr=False)
    """(account, trigger event id) of the blocks a fold of everything so far with
    ``written=False`` decides (see :meth:`as_rebuilt`)."""

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
        out.limit_times = dict(self.limit_times)
        out.open_now = dict(self.open_now)
        out._stored_blocked = dict(self._stored_blocked)
        out._rebuild_blocks = set(self._rebuild_blocks)
        out._segments = list(self._segments)
        out._tiers = list(self._tiers)
        out._starts = list(self._starts)
        for name in ("_layout", "_gaps", "_valid_from", "_busted", "_cancels",
                     "_cancelled", "_anchor"):  # fmt: skip
            setattr(out, name, dict(getattr(self, name)))  # of values never changed in place
        return out

    def as_rebuilt(self) -> tuple[Engine, list[tuple[str, str]]]:
        """A copy in the state a fold of everything this engine folded gives with
        ``written=False`` (the processor's rebuild at its start), and the blocks that
        fold decides: (account, trigger event id), sorted.

        The two folds differ only in this engine's own blocks: a block it decides with
        ``written=True`` blocks its account at once (:attr:`pending`, until read back),
        so a later critical breach of the account decides no block of its own; a fold
        with ``written=False`` blocks an account only when it reads a block event. The
        copy's :attr:`blocked` is therefore the stored blocks' and it has nothing
        pending; everything else is the same (tested).
        """
        out = self.copy()
        out.blocked = dict(self._stored_blocked)
        out.pending = {}
        return out, sorted(self._rebuild_blocks)

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

    def apply(
        self,
        batch: History,
        *,
        written: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Effect]:
        """Fold the next events (positions at or above :attr:`horizon`, in order).

        Returns the effects, in the order of their triggers; the states move on.
        ``written``: the effects will be appended to the store (the processor's live
        batches). False when they are thrown away (rebuilding a state, a pre-trade
        check): the blocks decided then do not block the account. ``progress`` is
        called with (events folded, events in the batch) after each run of events
        between busts and after each bust (a long history's rebuild: each bust refolds
        its account), and at the end.
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
        later = None if self._reference else _Deferred()
        done = 0
        for part, bust in self._split_at_busts(batch) if batch.events.height else ():
            if later is not None and later.rows > _DEFERRED_ROWS:  # memory: evaluate them now
                effects += self._flush(later, written, final=False)
                later = _Deferred()
            if later is not None:
                self._note_start(part)
            self._keep(part)
            if bust is None:
                live = self._without_cancelled(part)
                if later is not None:
                    self._track(part, live)
                effects += self._fold(live, written, later)
            else:
                self._note_cancel(part.cancels)
                effects += self._bust(part, bust, written, later)
            if progress is not None:
                done += part.events.height
                progress(done, seen)
        if later is not None and later.events:
            effects += self._flush(later, written)
        self.horizon = max(self.horizon, batch.horizon)
        self.events_seen += seen
        if progress is not None:
            progress(seen, seen)
        return effects

    def _note_cancel(self, cancels: pl.DataFrame) -> None:
        for account, trade_id in cancels.select("account_id", "trade_id").iter_rows():
            known = self._cancelled.get(account, frozenset())
            self._cancelled[account] = known | {trade_id}

    def _without_cancelled(self, part: History) -> History:
        """``part`` without the trades whose cancel was folded before them (recorded
        after their cancel: they never count); ``part`` itself when there are none.

        Only its trades change: its events keep them, as the history does (a fold of
        the whole history has the trade and its cancel, and leaves the trade out).
        """
        trades = part.trades
        if not self._cancelled or trades.height == 0:
            return part
        ids = set(trades["trade_id"].cast(pl.String).to_list())
        if not any(not ids.isdisjoint(known) for known in self._cancelled.values()):
            return part  # the common case, without a pass over the rows in Python
        gone = [
            i
            for i, (account, trade_id) in enumerate(
                trades.select("account_id", "trade_id").iter_rows()
            )
            if trade_id in self._cancelled.get(account, ())
        ]
        if not gone:
            return part
        keep = np.ones(trades.height, bool)
        keep[gone] = False
        out = copy.copy(part)
        out.trades = trades.filter(pl.Series(keep))
        return out

    def _keep(self, part: History) -> None:
        """Add a folded part to the history kept for busts and new limit types.

        Merged like a counter in base _FANOUT: each _FANOUT segments of a tier become one
        of the next, so each row is copied once per tier and a merge's size is bounded
        by its tier. (Merging everything every 256 batches stalled one batch in 256 for
        a copy of the whole history: 17-39 ms after 100k events, growing with it.)
        The merges are of the segments before ``part``, which stays a segment of its own
        while it is folded: a limit type activated by it reads the segments before the
        last one (:meth:`_activate`), and a part that completed a merge took the 15
        batches before it out of that (their positions missing from the type's state).
        """
        tail = self._tiers[-_FANOUT:]
        while len(tail) == _FANOUT and min(tail) == max(tail) < _WHOLE:
            merged = _concat(self._segments[-_FANOUT:])
            del self._segments[-_FANOUT:], self._tiers[-_FANOUT:]
            self._segments.append(merged)
            self._tiers.append(tail[0] + 1)
            tail = self._tiers[-_FANOUT:]
        self._segments.append(part)
        self._tiers.append(0)

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
            if batch.limits.height:  # in order: none is stale
                self._fresh_limits(batch.limits.sort("position"))
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
            elif name == "limits" and frame.height:
                frame = self._fresh_limits(frame.sort("position"))
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
            self._fresh_limits(out)  # in force from their set_at: later ones are stale
        return out

    def _fresh_limits(self, limits: pl.DataFrame) -> pl.DataFrame:
        """LimitSets (in order) whose set_at is not older than that of the latest one
        in force for their key (:attr:`limit_times`); remembers theirs. An older one came
        late: the newer one applies from its set_at on, and it is not folded."""
        rows = limits.select(
            pl.col("account_id").cast(pl.String),
            pl.col("limit_type").cast(pl.String),
            pl.col("symbol").cast(pl.String),
            pl.col("set_at").dt.epoch("us"),
        ).rows()
        keep = []
        for account, limit_type, symbol, set_at in rows:
            key = (account, limit_type, symbol)
            latest = self.limit_times.get(key)
            fresh = latest is None or set_at >= latest
            if fresh:
                self.limit_times[key] = set_at
            keep.append(fresh)
        return limits if all(keep) else limits.filter(pl.Series(keep))

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
        cut = _slicer(batch)
        for c in [*cuts, None]:
            hi = batch.horizon if c is None else c
            if hi > lo:
                part = cut(lo, hi)
                if part.events.height:
                    yield part, None
            if c is not None:
                yield cut(c, c + 1), c
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

    def _fold(self, part: History, written: bool, later: _Deferred | None = None) -> list[Effect]:
        """Fold a part with no bust; its effects (with ``later``: evaluated at the end of
        the batch, see :meth:`_flush`)."""
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
                rows = self._limit_rows(limits, name)
                if later is not None and _deferrable(definition):
                    later.add(name, _metric_frame(metric, definition.scope), rows, through)
                else:
                    found.append(self._evaluate(name, metric, rows, through))
        self.projection = ProjectionState.after(part)
        if later is not None:
            later.note(part, found, released)
            return []
        return self._effects(part.events, part.blocks, found, written, released)

    def _flush(self, later: _Deferred, written: bool, *, final: bool = True) -> list[Effect]:
        """The evaluations a batch's parts left for its end, and their effects.

        The fold of breaches (:func:`riskbook.limits.evaluate`) gives the same breaches
        and states whatever the batches of its rows: one call for a type's rows of every
        part but the last, and one for the last (whose open breaches are :attr:`open_now`,
        ``carried`` as that part's own call reports them), instead of one per part and
        per bust (~5 ms each, whatever their size). The effects come in the order of
        their triggers, which is the order of the parts. Not ``final``: the parts so far
        of a batch that goes on (their rows held too long), one call per type.
        """
        found = list(later.found)
        for name, entries in later.entries.items():
            if not final:
                rows = pl.concat([m for m, _, _ in entries])
                limits = pl.concat([x for _, x, _ in entries])
                found.append(self._evaluate(name, rows, limits, entries[-1][2]))
                continue
            if len(entries) > 1:
                rows = pl.concat([m for m, _, _ in entries[:-1]])
                limits = pl.concat([x for _, x, _ in entries[:-1]])
                found.append(self._evaluate(name, rows, limits, entries[-2][2]))
            rows, limits, through = entries[-1]
            found.append(self._evaluate(name, rows, limits, through))
        # in the order the types were first evaluated, as part by part
        self.open_now = {n: self.open_now[n] for n in self.breach if n in self.open_now}
        events, blocks, released = (
            parts[0] if len(parts) == 1 else pl.concat(parts, how="vertical_relaxed")
            for parts in (later.events, later.blocks, later.released)
        )  # one part (no bust in the batch): as it is, no concat
        return self._effects(events, blocks, found, written, released)

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
        if intervals.height == 0:  # most batches: nothing opened or closed (no polars calls)
            self.open_now[name] = intervals
            return intervals  # (without limit_type: _effects passes over empty frames)
        self.open_now[name] = intervals.filter(pl.col("ended_at").is_null())
        return intervals.filter(~pl.col("carried")).with_columns(limit_type=pl.lit(name))

    def _bust(
        self, part: History, position: int, written: bool, later: _Deferred | None = None
    ) -> list[Effect]:
        """A bust: refold its account without the trade; re-evaluate its metrics there.

        The account is refolded from the latest kept state that holds none of its busted
        trades and whose figures are those a fold of its whole history gives (see
        :meth:`_refold`), with its own events since and the marks of its symbols: the
        cost of a bust is that of the events since its trade, not of the history. Its
        metrics at the bust follow from the refolded state for the built-in types; a
        type of the user's gets its metric over the account's whole history, as before.
        """
        if self._reference or later is None:
            return self._bust_full(part, position, written)
        cancel = part.cancels.row(0, named=True)
        account = str(cancel["account_id"])
        at: datetime = cancel["cancelled_at"]
        released = self._release(at)
        with shared_timelines():
            self._activate_for(released)  # before the refold: from what came before the bust
        after, figures = self._refold(account, position, part.cancels)
        self.projection = _replace_account(self.projection, after, account)
        day = _us(at) // _DAY_US
        mine = None
        found = []
        with shared_timelines():
            for name in self.active:
                definition = get(name)
                rows = _bust_rows(definition, after, figures, account, day)
                if rows is None:  # a metric of the user's: over the account's whole history
                    mine = _account_only(self._whole(), account) if mine is None else mine
                    rows = _latest_per_key(definition.metric(mine), definition.scope, account, day)
                    found.append(self._at_bust(name, rows, cancel, position, released))
                    continue
                keys = later.keys_of(name, account)
                rows = self._bust_frame(name, rows, cancel, position, keys)
                later.add(
                    name,
                    _metric_frame(rows, definition.scope),
                    self._limit_rows(released, name),
                    at,
                )
        later.note(part, found, released)
        return []

    def _bust_full(self, part: History, position: int, written: bool) -> list[Effect]:
        """:meth:`_bust` as it was: the account's whole history refolded at every bust
        (the reference the tests and benchmarks compare the refold from a state with)."""
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
                found.append(self._at_bust(name, rows, cancel, position, released))
        return self._effects(part.events, part.blocks, found, written, released)

    def _at_bust(
        self,
        name: str,
        rows: pl.DataFrame,
        cancel: dict[str, Any],
        position: int,
        released: pl.DataFrame,
    ) -> pl.DataFrame:
        """Evaluate ``name`` at a bust: ``rows`` are the account's metric per key after
        it (account_id, symbol, value); the keys it no longer has are back to zero."""
        rows = self._bust_frame(name, rows, cancel, position)
        return self._evaluate(name, rows, self._limit_rows(released, name), cancel["cancelled_at"])

    def _bust_frame(
        self,
        name: str,
        rows: pl.DataFrame,
        cancel: dict[str, Any],
        position: int,
        pending: Sequence[tuple[str, str | None]] = (),
    ) -> pl.DataFrame:
        """The metric rows of a bust: ``rows`` (account_id, symbol, value per key of the
        account after it), then the account's other keys -- of the type's state, and
        ``pending`` ones of rows not evaluated yet -- back to zero, at the bust."""
        account = str(cancel["account_id"])
        data = rows.select("account_id", "symbol", "value").rows()
        seen = {(a, x) for a, x, _ in data}
        keys: list[tuple[str, str | None]] = []
        known = self.breach.get(name)
        if known is not None:
            mine = known.metrics.filter(pl.col("account_id") == account)
            keys = mine.select("account_id", "symbol").rows()
        for key in [*keys, *pending]:  # keys the bust emptied: back to zero
            if key not in seen:
                seen.add(key)
                data.append((*key, 0.0))
        n = len(data)
        columns = list(zip(*data, strict=True)) if n else [(), (), ()]
        return pl.DataFrame(  # Series of Python values: ~0.1 ms, where a dict took ~1
            [
                pl.Series("account_id", columns[0], pl.String),
                pl.Series("symbol", columns[1], pl.String),
                pl.Series("value", columns[2], pl.Float64),
                pl.Series("time", [_us(cancel["cancelled_at"])] * n, pl.Int64).cast(_TIME),
                pl.Series("timestamp", [_us(cancel["timestamp"])] * n, pl.Int64).cast(_TIME),
                pl.Series("position", [position] * n, pl.Int64),
                pl.Series("event_id", [cancel["event_id"]] * n, pl.String),
            ]
        )

    # ------------------------------------------------------------------ refolds

    def _refold(
        self, account: str, position: int, cancels: pl.DataFrame
    ) -> tuple[ProjectionState, tuple[float, float] | None]:
        """The account's state after the bust at ``position`` (``cancels``: its row), as
        a fold of the account's whole history gives it; and its (leverage, drawdown)
        there, None if it has no figures.

        It folds the account's events from a kept state on (:attr:`_starts`, its
        :attr:`_anchor`, or the empty state before everything): the latest one that

        * holds no trade busted since it was kept (a trade recorded after its cancel
          is never folded: see :meth:`_without_cancelled`), and
        * has the account's figures to the bit as a fold of its whole history: the
          compiled fold sums each account's market values over a segment tree whose
          leaves are its (account, symbol) pairs, and the sum depends on where they sit.
          A fold of the whole history has a leaf for every symbol the account ever
          traded; a batch's fold has those of its held positions and the batch's
          trades. The sums are the same while the batch's leaves are a prefix of the
          whole history's (new symbols come after the old ones in name order, and no
          symbol has all its trades busted before one of a later name), or while at
          most two leaves hold a value: see :meth:`_track`. When that breaks, the next bust refolds the account's whole
          history once, and the states kept after it serve again.

        The refold's book has the leaves of the account's whole layout, so the state it
        leaves is the one the whole-history refold gives, bit for bit.
        """
        trade_id = str(cancels["trade_id"][0])
        start: ProjectionState | None
        known = self._cancels.get(account)
        mine_cancels = cancels if known is None else pl.concat([known, cancels])
        self._cancels[account] = mine_cancels
        busted = list(self._busted.get(account, ()))
        t = self._find_trade(account, trade_id, _MIN, position)
        if t is not None:  # not found: none yet, and one that comes later is never folded
            busted = _add_interval(busted, t, position)
        since = self._valid_from.get(account, _MIN)
        start_at, start = _MIN, None  # None: the empty state, before everything
        if since is not None:
            candidates = [(p, state) for p, _, state in self._starts]
            if account in self._anchor:
                candidates.append(self._anchor[account])
            for at, state in sorted(candidates, key=lambda c: c[0], reverse=True):
                if at < since:
                    break
                if not _in_intervals(busted, at):
                    start_at, start = at, state
                    break
        symbols = self._layout.get(account, ())
        window = self._since(start_at, account, symbols, mine_cancels, position + 1)
        begin = ProjectionState.empty() if start is None else _only(start, account, symbols)
        book = _build_book(
            window,
            [(account, s) for s in symbols],
            begin.accounts["account_id"].to_list(),
            begin.marks["symbol"].to_list(),
        )
        tl = _Timelines.compute(book, _NEVER - 1, begin)
        after = _final_state(tl)
        figures = None
        accounts = book.account_names.cast(pl.String).to_list()
        if account in accounts:
            ac, st = accounts.index(account), tl.final
            if st.aseen[ac]:
                lev, dd = np.empty(1), np.empty(1)
                _compiled().account_figures(
                    st.cash[ac : ac + 1], st.gross[ac : ac + 1], st.net[ac : ac + 1],
                    st.peak[ac : ac + 1], np.empty(0), lev, dd,
                )  # fmt: skip
                figures = (float(lev[0]), float(dd[0]))
        # What the next bust of the account needs.
        self._busted[account] = tuple(busted)
        held = set(after.positions["symbol"].to_list())
        gap = frozenset(s for s in symbols if s not in held)
        if gap:
            self._gaps[account] = gap
        else:
            self._gaps.pop(account, None)
        if since is None:
            self._valid_from[account] = position + 1
        marks = self.projection.marks  # every symbol's: the account may trade others later
        self._anchor[account] = (
            position + 1, ProjectionState(after.positions, after.accounts, marks, after.days)
        )  # fmt: skip
        return after, figures

    def _find_trade(self, account: str, trade_id: str, lo: int, hi: int) -> int | None:
        """The position of the account's trade ``trade_id`` among the kept events with
        ``lo <= position < hi`` (the newest first), or None. (The store keeps one fill
        per account and trade id.)"""
        hit = (
            (pl.col("trade_id") == trade_id)
            & (pl.col("account_id").cast(pl.String) == account)
            & pl.col("position").is_between(lo, hi, closed="left")
        )
        for segment in reversed(self._segments):
            trades = segment.trades
            if trades.height == 0:
                continue
            found = trades.filter(hit)
            if found.height:
                return int(found["position"].min())  # type: ignore[arg-type]
            if int(trades["position"].min()) < lo:  # type: ignore[arg-type]
                break
        return None

    def _since(
        self,
        lo: int,
        account: str,
        symbols: tuple[str, ...],
        cancels: pl.DataFrame,
        horizon: int,
    ) -> History:
        """The account's kept events at or after position ``lo`` that move figures, the
        marks of ``symbols`` there, and ``cancels`` (all of the account's: a trade
        recorded after its cancel is busted too)."""
        wanted: dict[str, list[pl.DataFrame]] = {n: [] for n in _MOVERS}
        mine = pl.col("account_id").cast(pl.String) == account
        marked = pl.col("symbol").cast(pl.String).is_in(list(symbols))
        inside = pl.col("position") >= lo
        for segment in reversed(self._segments):
            if segment.events.height == 0:
                continue
            for name, parts in wanted.items():
                frame = segment.frame(name)
                if frame.height:
                    rows = frame.filter(inside & (marked if name == "marks" else mine))
                    if rows.height:
                        parts.append(rows)
            if int(segment.events["position"].min()) <= lo:  # type: ignore[arg-type]
                break
        frames = {
            name: (pl.concat(parts[::-1], how="vertical_relaxed") if parts else _empty_frame(name))
            for name, parts in wanted.items()
        }
        return History(
            **frames,  # type: ignore[arg-type]
            cancels=cancels,
            limits=_empty_frame("limits"),
            violations=_empty_frame("violations"),
            blocks=_empty_frame("blocks"),
            events=_empty_frame("events"),
            horizon=horizon,
        )

    def _note_start(self, part: History) -> None:
        """Keep the state before ``part`` (where a later bust's refold can start)."""
        if part.events.height == 0:
            return
        first = int(part.events["position"].min())  # type: ignore[arg-type]
        self._starts.append((first, self._folded, self.projection))
        self._folded += part.events.height
        self._thin()

    def _thin(self) -> None:
        """Drop kept start states as they age: the one kept before any event is at most
        1/_SPACING of its age (in events folded) from the next newer one. So a bust
        refolds at most a fraction more than the events since its trade, and about
        _SPACING x log(events) / log(1 + 1/_SPACING) states are kept (~60 at 5M)."""
        kept = self._starts
        if len(kept) < 4 * _SPACING:
            return
        now = kept[-1][1]
        out = [kept[-1]]
        i = len(kept) - 2
        while i >= 0:
            newer = out[-1][1]
            room = (now - newer) // _SPACING
            j = i
            while j > 0 and newer - kept[j - 1][1] <= room:
                j -= 1
            out.append(kept[j])
            i = j - 1
        if len(out) < len(kept):
            self._starts = out[::-1]

    def _track(self, part: History, live: History | None = None) -> None:
        """Before ``part`` is folded (``live``: what of it is, without the trades recorded
        after their cancel): each account's layout (:attr:`_layout`) and whether the
        states kept from here on still hold its figures as a whole-history fold would
        (see :meth:`_refold`). A trade that never counts has its leaf in a fold of the
        whole history all the same: its symbol joins the layout, as a gap unless held.

        The fold of ``part`` sums an account's market values over leaves for its held
        positions and the part's trades: the same sums as over its whole layout while
        those are a prefix of it. A new symbol before one it had (in name order) moves
        leaves: the states kept before no longer serve (nor those after, which go on
        from them); so does a fold that moves the account's figures while a symbol
        whose trades were all busted sits before one it holds. Unless at most two
        leaves could hold a value: ``a + b`` (and zeros) sums alike in any tree.
        """
        live = part if live is None else live
        traded: dict[str, set[str]] = {}
        for account, symbol in _pairs(part.trades, part.adjustments):
            traded.setdefault(account, set()).add(symbol)
        moved: dict[str, set[str]] = {}
        if live is not part:
            for account, symbol in _pairs(live.trades, live.adjustments):
                moved.setdefault(account, set()).add(symbol)
        for account, symbols in traded.items():
            old = self._layout.get(account, ())
            new = symbols.difference(old)
            if new:
                if len(old) > 2 and min(new) < old[-1]:
                    self._valid_from[account] = None
                self._layout[account] = tuple(sorted(new.union(old)))
            counted = symbols if live is part else moved.get(account, set())
            gap = self._gaps.get(account, frozenset())
            if live is not part:  # symbols of trades that never count, and not held
                seen = self._seen(account)
                gap = gap | {s for s in symbols - counted if s not in seen}
            gap = gap - counted
            if gap:
                self._gaps[account] = frozenset(gap)
            else:
                self._gaps.pop(account, None)
        if not self._gaps:
            return
        movers = {str(a) for f in (part.trades, part.adjustments, part.funding)
                  for a in f["account_id"].unique().to_list()}  # fmt: skip
        marked = {str(s) for s in part.marks["symbol"].unique().to_list()}
        for account, gap in self._gaps.items():
            if self._valid_from.get(account, _MIN) is None:
                continue
            held = [s for s in self._layout[account] if s not in gap]
            moves = account in movers or not marked.isdisjoint(self._layout[account])
            if moves and len(held) > 2 and min(gap) < held[-1]:
                self._valid_from[account] = None

    def _seen(self, account: str) -> set[str]:
        """The symbols the account has a position row for now (held, or traded and
        closed): a symbol without one is a gap of its layout (see :meth:`_refold`)."""
        positions = self.projection.positions
        if positions.height == 0:
            return set()
        rows = positions.filter(pl.col("account_id") == account)
        return set(rows["symbol"].cast(pl.String).to_list())

    def _effects(
        self,
        events: pl.DataFrame,
        blocks: pl.DataFrame,
        found: list[pl.DataFrame],
        written: bool,
        released: pl.DataFrame,
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
        found = [f for f in found if f.height]  # the empty ones may lack limit_type
        starts = (found[0] if len(found) == 1 else pl.concat(found)) if found else pl.DataFrame()
        if starts.height == 0:
            self._note_blocks(blocks)
            return []
        ids = starts["trigger_event_id"]
        if ids.null_count():
            lookup = events.select("position", _id="event_id")
            starts = starts.join(
                lookup.rename({"position": "trigger_position"}), on="trigger_position", how="left"
            ).with_columns(trigger_event_id=pl.coalesce("trigger_event_id", "_id"))
        corr = events.select(trigger_event_id="event_id", _corr="correlation_id")
        if released.height:  # a scheduled limit can trigger: its correlation id too
            corr = pl.concat(
                [corr, released.select(trigger_event_id="event_id", _corr="correlation_id")]
            )
        # In the order they happen: by business time, then position. The part's events
        # have times monotone in position (see _in_processing_order), so for them this is
        # the position order; a released scheduled limit was recorded earlier (a smaller
        # position) but acts at its set_at, among the events of that time. One trigger's
        # effects (a mark's, on several accounts) by account, whatever the batches.
        starts = starts.join(corr, on="trigger_event_id", how="left").sort(
            "started_at", "trigger_position", pl.col("account_id").cast(pl.String),
            "limit_type", pl.col("symbol").cast(pl.String), "level", nulls_last=False,
        )  # fmt: skip
        stored = blocks.sort("position").select(
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
            critical = row["level"] == (self.factor(name) or 0.0)
            if critical and not self._stored_blocked.get(account):  # a rebuild's block
                self._rebuild_blocks.add((account, str(row["trigger_event_id"])))
            if critical and not self.blocked.get(account):
                event = AccountBlocked(
                    account_id=account,
                    reason=block_reason(
                        name, symbol, describe(value, name), row["level"], row["limit_value"]
                    ),
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
        if blocks.height == 0:  # most batches: no sort and select (~0.4 ms) for nothing
            return
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
        self._stored_blocked[account] = bool(blocked)
        self.blocked[account] = bool(blocked) or account in self.pending

    def expect_block(self, account: str, causation_id: str) -> None:
        """Count a block written by this engine's processor and not read back yet (the
        processor's rebuild after a restart: see :attr:`pending`)."""
        self.pending[account] = str(causation_id)
        self.blocked[account] = True


def describe(value: float, limit_type: str | None = None) -> str:
    """A metric value for messages: ``infinite`` (with why, for known types) or
    :func:`figure`."""
    if math.isinf(value) and value > 0:
        why = _WHY_INFINITE.get(limit_type or "")
        return f"infinite ({why})" if why else "infinite"
    return figure(value)


# ----------------------------------------------------------------------------- helpers

_NO_LIMITS = _limit_frame(History.empty().limits)


def _slicer(history: History) -> Callable[[int, int], History]:
    """``cut(lo, hi)``: the events of ``history`` with ``lo <= position < hi``, for many
    ranges; a binary search in each frame whose positions are in order (as a store reads
    them), not a pass over the whole batch per range (a batch with a bust every few
    hundred events made that quadratic)."""
    frames = {n: history.frame(n) for n in [*KINDS, "events"]}
    at = {n: f["position"].to_numpy() for n, f in frames.items() if f.height}
    ordered = {n: bool((p[1:] >= p[:-1]).all()) for n, p in at.items()}

    def cut(lo: int, hi: int) -> History:
        out = {}
        for n, frame in frames.items():
            if n not in at:
                out[n] = frame
            elif ordered[n]:
                a, b = np.searchsorted(at[n], [lo, hi], side="left")
                out[n] = frame.slice(int(a), int(b - a))
            else:
                out[n] = frame.filter(pl.col("position").is_between(lo, hi, closed="left"))
        return History(**out, horizon=hi)  # type: ignore[arg-type]

    return cut


def _pairs(*frames: pl.DataFrame) -> set[tuple[str, str]]:
    """The (account_id, symbol) pairs of the frames' rows: in Python for a live batch's
    few rows (a frame's select and unique cost ~0.8 ms whatever the size), else in
    polars."""
    frames = tuple(f for f in frames if f.height)
    if sum(f.height for f in frames) <= 5_000:
        return {
            pair
            for f in frames
            for pair in zip(
                f["account_id"].cast(pl.String).to_list(),
                f["symbol"].cast(pl.String).to_list(),
                strict=True,
            )
        }
    both = pl.concat([f.select(pl.col("account_id", "symbol").cast(pl.String)) for f in frames])
    return set(both.unique().iter_rows())


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


@dataclass
class _Deferred:
    """What the parts of a batch leave for its end (see :meth:`Engine._flush`)."""

    entries: dict[str, list[tuple[pl.DataFrame, pl.DataFrame, datetime]]] = field(
        default_factory=dict
    )
    """Per limit type: (metric rows, limit rows, through) of each part, not evaluated yet."""
    keys: dict[str, dict[str, dict[tuple[str, str | None], None]]] = field(default_factory=dict)
    """Per limit type and account: the keys of the rows of the first ``scanned`` entries."""
    scanned: dict[str, int] = field(default_factory=dict)
    found: list[pl.DataFrame] = field(default_factory=list)
    """Breaches of the types evaluated part by part (a metric of the user's)."""
    events: list[pl.DataFrame] = field(default_factory=list)
    blocks: list[pl.DataFrame] = field(default_factory=list)
    released: list[pl.DataFrame] = field(default_factory=list)

    rows: int = 0
    """Metric rows held in ``entries``."""

    def add(self, name: str, rows: pl.DataFrame, limits: pl.DataFrame, through: datetime) -> None:
        self.entries.setdefault(name, []).append((rows, limits, through))
        self.rows += rows.height

    def keys_of(self, name: str, account: str) -> list[tuple[str, str | None]]:
        """The keys of ``account`` in the rows of ``name`` so far (read when a bust asks)."""
        per = self.keys.setdefault(name, {})
        entries = self.entries.get(name, [])
        for rows, _, _ in entries[self.scanned.get(name, 0) :]:
            if rows.height > 10_000:
                rows = rows.select("account_id", "symbol").unique(maintain_order=True)
            pairs = zip(rows["account_id"].to_list(), rows["symbol"].to_list(), strict=True)
            for key in pairs:
                per.setdefault(key[0], {})[key] = None
        self.scanned[name] = len(entries)
        return list(per.get(account, {}))

    def note(self, part: History, found: list[pl.DataFrame], released: pl.DataFrame) -> None:
        self.events.append(part.events)
        self.blocks.append(part.blocks)
        self.found += found
        self.released.append(released)


def _deferrable(definition: Any) -> bool:
    """A built-in metric (see :func:`_bust_rows`), whose rows :func:`_metric_frame` reads."""
    return (definition.metric, definition.scope) in {
        (position_size, "account_symbol"), (daily_volume, "account_day"),
        (drawdown, "account"), (leverage, "account"),
    }  # fmt: skip


def _metric_frame(metric: pl.DataFrame, scope: str) -> pl.DataFrame:
    """A built-in metric's rows, with the columns :func:`riskbook.limits.evaluate` reads,
    alike for every part (so that they can be evaluated together)."""
    by_symbol = "symbol" in scope
    return metric.select(
        pl.col("account_id").cast(pl.String),
        (pl.col("symbol").cast(pl.String) if by_symbol else pl.lit(None, pl.String)).alias(
            "symbol"
        ),
        pl.col("time"),
        pl.col("timestamp"),
        pl.col("position").cast(pl.Int64),
        pl.col("value").cast(pl.Float64),
        (pl.col("event_id") if "event_id" in metric.columns else pl.lit(None, pl.String)).alias(
            "event_id"
        ),
    )


_MOVERS = ("trades", "adjustments", "marks", "funding")  # with cancels: what the fold reads


def _only(state: ProjectionState, account: str, symbols: tuple[str, ...]) -> ProjectionState:
    """``state`` of ``account`` alone, with the marks of ``symbols``."""
    mine = pl.col("account_id") == account
    return ProjectionState(
        state.positions.filter(mine),
        state.accounts.filter(mine),
        state.marks.filter(pl.col("symbol").is_in(list(symbols))),
        state.days.filter(mine),
    )


def _add_interval(intervals: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """``intervals`` (disjoint, sorted) with (lo, hi] added, overlapping ones merged."""
    out: list[tuple[int, int]] = []
    for a, b in sorted([*intervals, (lo, hi)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _in_intervals(intervals: list[tuple[int, int]], at: int) -> bool:
    """Whether ``lo < at <= hi`` for one of ``intervals`` (disjoint, sorted)."""
    i = bisect.bisect_left(intervals, (at, _MIN)) - 1  # the last with lo < at
    return i >= 0 and at <= intervals[i][1]


def _bust_rows(
    definition: Any,
    after: ProjectionState,
    figures: tuple[float, float] | None,
    account: str,
    day: int,
) -> pl.DataFrame | None:
    """A built-in type's metric per key of ``account`` at a bust, from the refolded
    state: what :func:`_latest_per_key` gives from the metric over the account's whole
    history (the last row of each key is the state after it). None: not a built-in."""
    metric, scope = definition.metric, definition.scope
    schema = {"account_id": pl.String, "symbol": pl.String, "value": pl.Float64}
    if metric is position_size and scope == "account_symbol":
        return after.positions.filter(pl.col("account_id") == account).select(
            "account_id", "symbol", value=pl.col("quantity").abs()
        )
    if metric is daily_volume and scope == "account_day":
        return (
            after.day_volume()
            .filter(pl.col("account_id") == account)
            .select(
                "account_id",
                symbol=pl.lit(None, pl.String),
                value=pl.when(pl.col("day") == day).then("volume").otherwise(0.0),
            )
        )
    if (metric is leverage or metric is drawdown) and scope == "account":
        if figures is None:
            return pl.DataFrame(schema=schema)
        value = figures[0] if metric is leverage else figures[1]
        return pl.DataFrame({"account_id": [account], "symbol": [None], "value": [value]},
                            schema=schema)  # fmt: skip
    return None


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
    # in business order, as the evaluator takes them: a metric of the user's may give
    # its rows in any order (LimitDefinition: "other orders are sorted")
    order = ["time", "position"] if "position" in metric.columns else ["time"]
    rows = (
        metric.filter(pl.col("account_id").cast(pl.String) == account)
        .sort(order, maintain_order=True)
        .select(
            pl.col("account_id").cast(pl.String),
            (pl.col("symbol").cast(pl.String) if by_symbol else pl.lit(None, pl.String)).alias(
                "symbol"
            ),
            pl.col("time").dt.epoch("us").alias("_t"),
            pl.col("value").cast(pl.Float64),
        )
    )
    last = rows.group_by("account_id", "symbol", maintain_order=True).last()
    if scope.endswith("_day"):
        last = last.with_columns(
            value=pl.when(pl.col("_t") // _DAY_US == day).then("value").otherwise(0.0)
        )
    return last.drop("_t")
