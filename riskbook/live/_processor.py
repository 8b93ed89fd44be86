"""The live processor: the engine over the store, with its checkpoint in PostgreSQL.

One loop: read the events after the checkpoint (below the visibility fence, so none is
ever skipped), fold them with the :class:`~riskbook.live.Engine`, and commit the
effects it decides together with the new checkpoint in one transaction. Woken by
NOTIFY, with a catch-up read after every wake and on start; under load each read takes
everything there is (a micro-batch), so the cost per event falls as the load rises.

Exactly once: the checkpoint row is locked and compared in the committing transaction,
and only one processor of a name works at a time (a session advisory lock; a second
one waits, :meth:`Processor.catch_up` refuses). On start the engine's state is rebuilt
by folding everything below the checkpoint without effects (the same fold, so the same
state); from the snapshot of the state kept at an earlier long rebuild or clean stop,
where one fits, so that a restart folds only the events since
(:mod:`riskbook.live._snapshot`). A crash anywhere leaves either the old checkpoint and
no effects, or the new one and all of them. An effect the store already holds -- the same kind, account and
trigger (causation id), and for a violation the same limit type and symbol, recorded
after its trigger: a history imported with its alarms, another processor's -- is not
appended again (it counts as written: a block the store holds blocks, as one written).
Processors of different names that commit the same effect at once take turns on its
account (a lock held until the commit), so the second one finds the first one's.

A lost connection (a PostgreSQL restart) is retried with backoff, and the processor
resumes from the checkpoint; a commit that fails for a reason that passes (a deadlock
with another writer, a serialization failure, a lock or statement timeout, a cancelled
query) is rolled back and the batch retried, with backoff and a log line. A statement
the database refuses (a role that may not write the checkpoint, a constraint) stops it
with a :class:`~riskbook.errors.StoreError` saying why, in one line and without the
password.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import polars as pl
import psycopg
from psycopg import sql

from riskbook import cache
from riskbook.errors import RiskbookError, StoreError
from riskbook.frames import _CACHE_CHECK_SQL, Filters, History, _cache_root, _Expect, _read
from riskbook.live import _snapshot
from riskbook.live._engine import DEFAULT_CRITICAL, Effect, Engine
from riskbook.store import Store, connect
from riskbook.store.eventstore import (
    NOTIFY_CHANNEL,
    Append,
    TransientStoreError,
    _JsonBytesLoader,
    _read_after,
    read_committed,
)

__all__ = ["Commit", "Processor"]

log = logging.getLogger("riskbook.live")

_T = TypeVar("_T")
_SMALL = 2_000  # a read this full means a backlog: read the rest in one go (ADBC)
LOCK_PREFIX = "riskbook.live:"
"""A processor of name N works under the session advisory lock of the key
``hashtextextended(LOCK_PREFIX || N, 0)`` (:func:`riskbook.live.processors` looks for it)."""
_KEEP_AFTER = 1.0
"""Seconds: a rebuild whose fold took this long keeps a snapshot of its state, and so does
a processor that stops when a rebuild of what it folded since its last one would."""
_KEEP_RUNNING = 60.0
"""Seconds: the default ``snapshot_after`` of a running processor (see :class:`Processor`)."""
_KEEP_SHARE = 0.05
"""A running processor's snapshots take this share of its time at most: the next one
starts no sooner than 19 times the last one's writing time after it (at 5M events one
is 1.5 GB and takes seconds to write, when busts make a minute's rebuild in 100 s)."""
_REFOLD_EVENT, _REFOLD_BUST = 5e-6, 0.05
"""What a rebuild's fold costs (s) an event and a bust, about (measured here at 1M events:
2,258 busts in 111 s; `benchmarks/live_rebuild.py`): the estimate of what a snapshot at
a stop saves. (The time the batches took is no estimate: each pays a fixed cost that
one fold of them all pays once.)"""


class _Moved(RiskbookError):
    """The checkpoint is not where this processor left it: someone else processed."""


class _Lost(StoreError):
    """The processor's connection was lost or refused: it reconnects and goes on."""


class _Transient(StoreError):
    """A statement failed for a reason that passes (a deadlock, a serialization failure,
    a timeout, a cancel) on a connection that is fine: the transaction is rolled back and
    the batch retried on the same connection, after a pause."""


class _Refused(StoreError):
    """The database refused a statement of the processor (a role without the privilege,
    say): retrying cannot help, the processor stops with this error."""


@dataclass(frozen=True)
class Commit:
    """One committed micro-batch: what it covered and what it appended."""

    committed_at: float
    """``time.time()`` right after the commit."""
    horizon: int
    """Every event below this position is processed."""
    events: int
    effects: tuple[Effect, ...]
    """The effects appended."""
    seconds: float
    """From the read to the commit."""
    already_stored: tuple[Effect, ...] = ()
    """Effects decided that the store already held (recorded after their trigger, by an
    import of a history with its alarms or another processor): not appended again."""


class Processor:
    """Follows the store and appends violations and blocks, exactly once (module docstring).

    Parameters
    ----------
    store : a :class:`~riskbook.Store`, a DSN, or None (the default store).
    name : the checkpoint's name: processors of different names keep separate
        checkpoints (each appends the effects it decides that the store does not hold
        yet: see the module docstring).
    critical : factor of the limit over which a breach blocks the account (one for
        every type, or per type; None for a type: never blocks; None: no type blocks).
        Default 1.2.
    types : the limit types to evaluate: one name or several (default: every registered
        one).
    start : where a processor with no checkpoint yet starts: ``"beginning"`` (every
        stored event is processed, effects included) or ``"head"`` (the stored history
        only builds the state; effects start with the next event).
    actor : who its blocks are by.
    on_commit : called after every commit with the :class:`Commit` (in the
        processor's thread).
    max_batch : at most this many events per micro-batch (default: everything there
        is; a backlog is read in one go through ADBC).
    before_commit : called inside the committing transaction, after the checkpoint's
        move and the effects are written and before the commit (for crash tests).
    snapshots : start the rebuild from the snapshot of the state that an earlier
        processor of this name kept (under the load cache's folder), and keep one after
        a long rebuild and at a clean stop (default True): a restart then folds only the
        events since (see :mod:`riskbook.live._snapshot`). False: always fold the whole
        history, and keep none.
    snapshot_after : while it runs, keep a snapshot (in a background thread, the
        batches going on) whenever a rebuild of what it folded since its last one would
        take this many seconds (default 60; estimated: 5 us an event, 50 ms a bust): a
        processor killed or crashed, not stopped, then restarts in about this long at
        most, plus the snapshot's read. None: only at a long rebuild and a clean stop.
        Each one writes the whole state (about 300 bytes an event folded), so they are
        kept 19 times their writing time apart at least (5% of the time writing).

    Examples
    --------
    >>> import riskbook  # doctest: +SKIP
    >>> p = riskbook.live.Processor(start="head").start()  # a thread  # doctest: +SKIP
    >>> p.wait_ready()  # attached, its state rebuilt  # doctest: +SKIP
    >>> p.commits[-1].effects  # doctest: +SKIP
    >>> p.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        store: Store | str | None = None,
        *,
        name: str = "live",
        critical: float | Mapping[str, float | None] | None = DEFAULT_CRITICAL,
        types: str | Iterable[str] | None = None,
        start: Literal["beginning", "head"] = "beginning",
        actor: str = "riskbook-live",
        on_commit: Callable[[Commit], None] | None = None,
        max_batch: int | None = None,
        before_commit: Callable[[list[Effect]], None] | None = None,
        snapshots: bool = True,
        snapshot_after: float | None = _KEEP_RUNNING,
    ) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if snapshot_after is not None and not snapshot_after >= 0:
            raise ValueError(f"snapshot_after must be seconds >= 0 or None, got {snapshot_after}")
        if not name.strip() or len(name) > 200:
            raise ValueError(
                f"a processor's name must have 1 to 200 characters, not only spaces (got {name!r})"
                if len(name) <= 200
                else "a processor's name must have 1 to 200 characters"
            )
        if start not in ("beginning", "head"):
            raise ValueError(f"start must be 'beginning' or 'head', got {start!r}")
        if isinstance(types, str):
            types = (types,)  # one name, as breaches(types=) takes it: not its letters
        self._engine_args = {
            "critical": critical,
            "types": None if types is None else tuple(types),
            "actor": actor,
        }
        # before connecting: a bad type or factor leaves no store open behind it
        self.engine = Engine(**self._engine_args)  # type: ignore[arg-type]
        self._owns_store = not isinstance(store, Store)
        self.store = store if isinstance(store, Store) else connect(store)
        self.name = name
        self.start_at = start
        self.on_commit = on_commit
        self.max_batch = max_batch
        self.before_commit = before_commit
        self.snapshots = snapshots
        self.snapshot_after = snapshot_after
        self.commits: deque[Commit] = deque(maxlen=10_000)
        self.effects: deque[Effect] = deque(maxlen=10_000)
        self.status = "stopped"
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()  # the state is current: see wait_ready
        self.rebuilt: str | None = None
        """What the last rebuild of the state did, in one line (None: none yet)."""
        self.kept: str | None = None
        """The last snapshot kept while running (``snapshot_after``), in one line."""
        self._unkept = 0.0  # what a rebuild of the events since the last snapshot takes (s)
        self._last_folded: tuple[int, str] | None = None  # (position, event id)
        # a snapshot being kept in the background while running, and the _unkept it covers
        self._keeper: threading.Thread | None = None
        self._keeper_covers = 0.0
        self._keeper_kept = False
        self._keep_from = 0.0  # after a failed one: no other until _unkept gets here
        self._keep_after_time = 0.0  # monotonic: no other before (see _KEEP_SHARE)
        self._said_due: set[str] = set()  # scheduled limits said due (their event ids)
        self.caught_up = False
        """A :meth:`catch_up` has finished (the pre-trade check repeats it before it
        answers from this processor)."""
        self._in_run = False
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None

    def __repr__(self) -> str:
        return (
            f"Processor(name={self.name!r}, status={self.status!r}, "
            f"horizon={self.engine.horizon}, events={self.engine.events_seen:,})"
        )

    # ------------------------------------------------------------------ control

    def start(self) -> Processor:
        """Run in a background thread (returns at once); :meth:`stop` ends it."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run_catching, name=f"riskbook-live-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ask the loop to stop after its current batch; wait for it."""
        self._stop.set()
        self._ready.clear()  # from now on its state is not kept current: no check from it
        self.caught_up = False
        if self._thread is not None:
            self._thread.join(timeout)
        self._close(unlock=not self.running)  # a thread still in a statement holds conn
        if not self.running and not self.status.startswith("failed"):
            self.status = "stopped"
        if self._owns_store:
            self.store.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ready(self) -> bool:
        """Is the state current? Running, attached (the lock held, the state rebuilt),
        its last commit through (not retrying one, not reconnecting), and not stopped or
        failed since."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """Wait until :attr:`ready`, at most ``timeout`` seconds; False if it is not.

        A processor that is not working (never started, stopped, failed) will not get
        ready: False at once. The pre-trade check waits this way before it answers from
        the processor's state (never from a state that is not current).
        """
        deadline = time.monotonic() + timeout
        while not self._ready.is_set():
            if not (self.running or self._in_run):
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._ready.wait(min(left, 0.05))
        return True

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported on the object; the thread ends
            self._ready.clear()
            self.error = exc
            self.status = f"failed: {exc}"
            if isinstance(exc, RiskbookError):  # says why in its message: no traceback
                log.error("riskbook live processor %s failed: %s", self.name, exc)
            else:
                log.exception("riskbook live processor %s failed", self.name)

    def run(self, *, idle_timeout: float | None = None, max_wait: float = 1.0) -> None:
        """The loop, in this thread, until :meth:`stop` (or ``idle_timeout`` seconds
        with nothing new). Waits for the lock while another processor of this name
        works; connection losses and commits that fail for a reason that passes are
        retried with backoff."""
        backoff = 0.1
        idle_since = time.monotonic()
        self._in_run = True
        try:
            while not self._stop.is_set():
                try:
                    self._attach()
                    while not self._stop.is_set():
                        stepped = self.step()
                        self._ready.set()  # a batch committed (or nothing new): current
                        if self.status.startswith("retrying"):
                            self.status = "running"
                        if stepped:
                            backoff = 0.1
                            idle_since = time.monotonic()
                            self._keep_while_running()
                            continue
                        backoff = 0.1
                        self._keep_while_running()  # one busy at the last batch finished since
                        self._say_due_limits()
                        if idle_timeout is not None and (
                            time.monotonic() - idle_since > idle_timeout
                        ):
                            self._keep_at_stop()
                            return
                        self._wait(max_wait)
                    self._keep_at_stop()  # stopped between two batches
                except _Refused:
                    raise
                except _Transient as exc:  # rolled back, the connection fine: retry on it
                    self._ready.clear()  # events it has not folded wait: no check from it
                    self.status = f"retrying: {_first_line(exc)}"
                    log.warning(
                        "riskbook live %s: %s; retrying the batch in %.1f s",
                        self.name, exc, backoff,
                    )  # fmt: skip
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)  # "retrying" until a commit goes through
                except (psycopg.OperationalError, StoreError, _Moved) as exc:
                    self._ready.clear()
                    self.status = f"reconnecting: {_first_line(exc)}"
                    log.warning("riskbook live %s: %s; retrying in %.1f s", self.name, exc, backoff)
                    self._close()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                finally:
                    if self._stop.is_set():
                        self._close()
        finally:
            self._in_run = False
        self._ready.clear()
        self.status = "stopped"

    def catch_up(self, *, wait: float = 1.0) -> list[Effect]:
        """Process everything committed so far, once, in this thread, then let go of the
        lock and the connection; return the effects decided, in order (those appended,
        and those the store already held: see :attr:`Commit.already_stored`).

        Raises :class:`~riskbook.RiskbookError` if another processor of this name is
        working on the store (``wait``: seconds to wait for it to let go first -- one
        that just stopped holds the lock for a moment). A commit that fails for a reason
        that passes (a deadlock, say) is retried a few times. Its state is current when
        it returns, and falls behind as the store moves on: a pre-trade check given this
        processor catches it up again first (:func:`riskbook.live.check`).
        """
        if self.running:
            raise RiskbookError(
                f"processor {self.name!r} is running in its thread: it catches up by itself"
                " (catch_up is for a processor that is not started)"
            )
        self._stop.clear()  # stopped before: this catch-up is asked for
        found: list[Effect] = []
        try:
            self._attach(wait=wait)
            tries = 0
            while True:
                try:
                    decided = self._step()
                except _Transient as exc:
                    tries += 1
                    if tries > 8:
                        raise
                    pause = min(0.1 * 2**tries, 5.0)
                    log.warning("riskbook live %s: %s; retrying the batch in %.1f s",
                                self.name, exc, pause)  # fmt: skip
                    time.sleep(pause)
                    continue
                if decided is None:
                    break
                tries = 0
                found += decided
            self._keep_at_stop()
        except BaseException as exc:
            self._ready.clear()
            self.status = f"failed: {_first_line(exc)}"
            raise
        finally:
            self._close()
            self._ready.clear()  # current now, not as the store moves on
        self.caught_up = True
        self.status = f"caught up to position {self.engine.horizon}"
        return found

    # ------------------------------------------------------------------ the loop

    def _db(self, work: Callable[[], _T]) -> _T:
        """``work()`` on the processor's own connection, its psycopg errors riskbook's:
        :class:`_Lost` (reconnect) for a lost or refused connection, :class:`_Transient`
        (retry on it) for a failure that passes, :class:`_Refused` otherwise; one line,
        no password (the store's translation)."""
        try:
            return work()
        except psycopg.Error as exc:
            translated = self.store._translate(exc)
            retry = isinstance(translated, TransientStoreError) or isinstance(
                exc, psycopg.OperationalError
            )  # an OperationalError that does not pass (a disk full) is waited out too
            failure = self._failure(str(translated), retry=retry)
        raise failure  # here, so that it carries no psycopg exception (nor its message)

    def _failure(self, message: str, *, retry: bool) -> StoreError:
        if not retry:
            return _Refused(message)
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return _Lost(message)
        return _Transient(message)

    def _attach(self, *, wait: float | None = None) -> None:
        """Connect, take the lock, load the checkpoint, rebuild the state; then
        :attr:`ready`.

        ``wait``: None waits for the lock until it is free (or :meth:`stop`), saying so
        in :attr:`status` and the log; a number waits that many seconds at most, then
        raises :class:`~riskbook.RiskbookError` (another processor of this name works).
        """
        if self._conn is not None and not self._conn.closed:
            return
        self.status = "connecting"
        conn = self._db(lambda: read_committed(psycopg.connect(self.store.dsn, autocommit=True)))
        conn.adapters.register_loader("jsonb", _JsonBytesLoader)  # msgspec decodes them
        deadline = None if wait is None else time.monotonic() + wait

        def lock_and_load() -> int | None:
            key = f"{LOCK_PREFIX}{self.name}"
            waited = False
            while not conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
            ).fetchone()[0]:  # type: ignore[index]
                if deadline is not None and time.monotonic() >= deadline:
                    return -1
                if not waited:
                    self._ready.clear()  # another one works: this state falls behind
                    self.status = "waiting: another processor of this name is working"
                    log.info("riskbook live %s: %s", self.name, self.status)
                    waited = True
                if self._stop.wait(0.5 if deadline is None else 0.1):
                    return None
            if waited:
                log.info("riskbook live %s: got the lock", self.name)
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
            return self._checkpoint(conn)

        try:
            checkpoint = self._db(lock_and_load)
        except BaseException:
            conn.close()
            raise
        if checkpoint is None or checkpoint < 0:  # stopped while waiting, or busy
            conn.close()
            if checkpoint is None:
                return
            self.status = "stopped"
            raise RiskbookError(
                f"another processor named {self.name!r} is working on this store (it holds"
                " the lock of that name): stop it first, or give this one another name"
            )
        self._conn = conn
        if checkpoint != self.engine.horizon:
            self._ready.clear()  # until the state is rebuilt
            self._rebuild(checkpoint)
        self.status = "running"
        self._ready.set()

    def _checkpoint(self, conn: psycopg.Connection) -> int:
        row = conn.execute(
            "SELECT position FROM processor_checkpoints WHERE name = %s", (self.name,)
        ).fetchone()
        if row is not None:
            return int(row[0])
        start = 0
        if self.start_at == "head":
            start = int(conn.execute("SELECT riskbook_position_fence()").fetchone()[0])  # type: ignore[index]
        conn.execute(
            "INSERT INTO processor_checkpoints (name, position) VALUES (%s, %s)"
            " ON CONFLICT (name) DO NOTHING",
            (self.name, start),
        )
        return self._checkpoint(conn) if start == 0 else start

    def _rebuild(self, checkpoint: int) -> None:
        """The engine's state at ``checkpoint``: everything below it folded, no effects.

        The blocks that fold decides are not the processor's (a head start never wrote
        them; the others were written and are read back in the history): they count for
        nothing, and the blocks of this processor written at or after the checkpoint --
        the commits before it wrote them, and they are not read back yet -- count as
        its pending blocks, as they did before the restart; so do the blocks the fold
        decides that the store holds at or after the checkpoint (the commits before
        found them stored and counted them as written: see :meth:`_not_stored`).

        The fold starts from the snapshot of this processor's state kept at its last
        long rebuild or clean stop, if one fits (:mod:`riskbook.live._snapshot`), and a
        long fold keeps one.
        """
        self._reap_keeper(wait=True)  # one writer of the snapshot at a time
        below = f"rebuilding the state below position {checkpoint}"
        self.status = below
        started = time.monotonic()
        engine = Engine(**self._engine_args)  # type: ignore[arg-type]
        how = "nothing below it"
        self._unkept, self._last_folded = 0.0, None  # of the engine this rebuild makes
        self._keep_from = 0.0
        if checkpoint > 0:
            engine, how = self._fold_below(checkpoint, engine, below)
        engine.horizon = checkpoint
        conn = self._conn
        assert conn is not None
        _, decided = engine.as_rebuilt()  # the blocks the fold decided, from the start on
        blocks = {(account, _uuid(cause)) for account, cause in decided}
        causes = sorted({cause for _, cause in blocks})
        params = {"checkpoint": checkpoint, "name": self.name, "causes": causes}
        ahead = self._db(lambda: conn.execute(_AHEAD_BLOCKS_SQL, params).fetchall())
        for account, cause, own in ahead:
            if own or (account, cause) in blocks:
                engine.expect_block(account, cause)
        self.engine = engine
        took = time.monotonic() - started
        self.rebuilt = f"rebuilt the state below position {checkpoint} in {took:.1f} s: {how}"
        gc.freeze()  # what the rebuild left is long-lived: keep it out of every collection

    def _fold_below(self, checkpoint: int, engine: Engine, below: str) -> tuple[Engine, str]:
        """``engine`` with everything below ``checkpoint`` folded (``written=False``),
        from a kept snapshot on where one fits; and what it did, in a few words."""
        since = 0
        if self.snapshots:
            kept = self._snapshot_for(engine, checkpoint)
            if kept is not None:
                engine, since = kept.engine, kept.engine.horizon
                self._last_folded = (kept.last_position, kept.last_event_id)
                below += f": from the snapshot at position {since}"
        self.status = f"{below}: reading the history"
        history = _read(self.store, Filters(), after=since, before=checkpoint, progress=False)

        def folded(done: int, total: int) -> None:
            self.status = f"{below}: folded {done:,} of {total:,} events"

        started = time.monotonic()
        engine.apply(history, written=False, progress=folded)
        self._unkept = time.monotonic() - started  # what a start from the snapshot saves
        engine.horizon = checkpoint
        how = f"{history.events.height:,} events folded"
        if since:
            how = f"from its snapshot at position {since}, then {how}"
        if history.events.height:
            self._last_folded = _last_event(history)
            if self.snapshots and self._unkept >= _KEEP_AFTER:
                self.status = f"{below}: keeping a snapshot of the state"
                size = self._keep_snapshot(engine)
                if size is not None:
                    how += f"; kept a snapshot of it for the next start ({size / 1e6:,.0f} MB)"
        return engine, how

    def _snapshot_for(self, engine: Engine, checkpoint: int) -> _snapshot.Snapshot | None:
        """The snapshot kept for this processor, if it fits a rebuild to ``checkpoint``
        with ``engine``'s settings (and says in the log why not, if one is kept)."""
        where = self._snapshot_place(engine)
        if where is None:
            return None
        path, key = where
        self.status = f"rebuilding the state below position {checkpoint}: reading its snapshot"
        kept, why = _snapshot.load(path, key)
        if kept is not None:
            if kept.engine.horizon > checkpoint:
                why = f"it is at position {kept.engine.horizon}, past the checkpoint"
                kept = None
            else:  # the check of a load cache's refresh: the same store, its last event there
                conn = self._conn
                assert conn is not None
                # (any database of the store: the snapshot ends at its last event, so a
                # copy's own events, appended after it, are read on from there)
                expect = _Expect(key["store_id"], None, kept.last_position, kept.last_event_id)
                params = {"last": expect.last, "horizon": kept.engine.horizon}
                row = self._db(lambda: conn.execute(_CACHE_CHECK_SQL, params).fetchone())
                if not expect.holds(row):
                    kept, why = None, "the store no longer holds the event it ended with"
        if kept is None and why != "none kept":
            log.info("riskbook live %s: its snapshot (%s) is not used: %s; rebuilding from"
                     " the beginning", self.name, path, why)  # fmt: skip
        elif kept is not None:
            log.info("riskbook live %s: rebuilding from its snapshot at position %d",
                     self.name, kept.engine.horizon)  # fmt: skip
            cache.touch(path)  # for `riskbook cache`: when last used
        return kept

    def _snapshot_place(self, engine: Engine) -> tuple[Path, dict[str, Any]] | None:
        """Where this processor's snapshot is kept, and what it must match (None: the
        store has no identity to key it by)."""
        conn = self._conn
        assert conn is not None
        row = self._db(lambda: conn.execute("SELECT store_id::text FROM riskbook_store").fetchone())
        if row is None:
            return None
        store_id = str(row[0])
        return _snapshot.path_for(_cache_root(), store_id, self.name), _snapshot.key(
            engine, store_id, self.name
        )

    def _keep_snapshot(self, engine: Engine) -> int | None:
        """Keep a snapshot of ``engine`` (as a rebuild would have it) for the next start;
        its size in bytes (None: not kept, the log says why). Called with the lock held,
        so no other processor of this name writes it meanwhile."""
        where = self._snapshot_place(engine) if self._last_folded is not None else None
        if where is None:
            return None
        assert self._last_folded is not None
        size = self._save(where, engine, self._last_folded)
        if size is not None:
            self._unkept = 0.0
        return size

    def _save(
        self, where: tuple[Path, dict[str, Any]], engine: Engine, last_folded: tuple[int, str]
    ) -> int | None:
        """Write the snapshot of ``engine`` (as a rebuild would have it), whose last event
        folded is ``last_folded``; its size (None: not kept, the log says why). Touches
        nothing of the processor's, so it may run in a thread of its own."""
        path, key = where
        position, event_id = last_folded
        started = time.monotonic()
        try:
            rebuilt, _ = engine.as_rebuilt()
            size = _snapshot.save(path, _snapshot.Snapshot(rebuilt, position, event_id), key)
        except Exception as exc:  # a cache: never worth stopping the processor for
            log.warning("riskbook live %s: could not keep a snapshot of its state in %s: %s:"
                        " %s", self.name, path, type(exc).__name__, exc)  # fmt: skip
            return None
        cache.note_store(path.parent.parent, self.store.dsn)
        log.info("riskbook live %s: kept a snapshot of its state at position %d (%.0f MB in"
                 " %.1f s, %s)", self.name, engine.horizon, size / 1e6,
                 time.monotonic() - started, path)  # fmt: skip
        return size

    def _keep_while_running(self) -> None:
        """Between two batches of :meth:`run`: start keeping a snapshot of the state in
        a background thread when a rebuild of what was folded since the last one would
        take :attr:`snapshot_after` or more; the batches go on meanwhile. The engine
        the thread writes is never changed (each batch folds on a copy), and one thread
        at a time writes (a batch starts no other while one is busy)."""
        self._reap_keeper()
        if (
            not self.snapshots
            or self.snapshot_after is None
            or self._keeper is not None
            or self._unkept < max(self.snapshot_after, self._keep_from)
            or self._last_folded is None
            or time.monotonic() < self._keep_after_time
        ):
            return
        where = self._snapshot_place(self.engine)  # a query: here, on the loop's connection
        if where is None:
            return
        engine, last, self._keeper_covers = self.engine, self._last_folded, self._unkept

        def keep() -> None:
            began = time.monotonic()
            size = self._save(where, engine, last)  # a failure is a line in the log
            self._keeper_kept = size is not None
            took = time.monotonic() - began
            self._keep_after_time = time.monotonic() + took * (1 / _KEEP_SHARE - 1)
            if size is not None:
                self.kept = (f"kept a snapshot of the state at position {engine.horizon} while"
                             f" running ({size / 1e6:,.0f} MB in {took:.1f}"
                             " s): a restart folds from there")  # fmt: skip

        self._keeper_kept = False
        self._keeper = threading.Thread(
            target=keep, name=f"riskbook-live-{self.name}-snapshot", daemon=True
        )
        self._keeper.start()

    def _say_due_limits(self) -> None:
        """While idle: say once each (a warning in the log) the scheduled limit changes
        whose set_at the wall clock has passed and that no event has brought into force
        yet. The engine has no clock of its own (a tick would make a replay decide
        otherwise), so one takes effect, and its breaches are reported, with the next
        event at or after its set_at; the pre-trade check applies it already."""
        scheduled = self.engine.scheduled
        if scheduled.height == 0:
            return
        due = scheduled.filter(pl.col("set_at") <= datetime.now(UTC))
        for row in due.iter_rows(named=True):
            if row["event_id"] in self._said_due:
                continue
            self._said_due.add(row["event_id"])
            symbol = f" on {row['symbol']}" if row["symbol"] else ""
            log.warning(
                "riskbook live %s: the %s limit of %s%s (%s, set by %s for %s) is due but not"
                " in force yet: no event has come since; its breaches are reported with the"
                " next one", self.name, row["limit_type"], row["account_id"], symbol,
                f"{row['value']:g}", row["set_by"], row["set_at"].isoformat(),
            )  # fmt: skip

    def _reap_keeper(self, *, wait: bool = False) -> None:
        """Account for a background snapshot that has finished (``wait``: wait for it):
        what it covers no longer needs a rebuild."""
        keeper = self._keeper
        if keeper is None:
            return
        if wait:
            keeper.join()
        if keeper.is_alive():
            return
        self._keeper = None
        if self._keeper_kept:
            self._unkept = max(0.0, self._unkept - self._keeper_covers)
            self._keep_from = 0.0
        elif self.snapshot_after is not None:  # (the log says why) not after every batch
            self._keep_from = self._keeper_covers + max(self.snapshot_after, _KEEP_RUNNING)

    def _keep_at_stop(self) -> None:
        """At a clean stop (the lock still held): keep a snapshot of the state if folding
        again what was folded since the last one would take :data:`_KEEP_AFTER` or
        more. Never fails the stop."""
        if self._keeper is not None:
            self.status = "stopping: finishing the snapshot of the state being kept"
            self._reap_keeper(wait=True)
        conn = self._conn
        if not self.snapshots or self._unkept < _KEEP_AFTER or conn is None or conn.closed:
            return
        self.status = "stopping: keeping a snapshot of the state for the next start"
        try:
            self._keep_snapshot(self.engine)
        except Exception as exc:  # the store gone meanwhile, say: stop all the same
            log.warning("riskbook live %s: could not keep a snapshot of its state: %s",
                        self.name, _first_line(exc))  # fmt: skip

    def step(self) -> bool:
        """Read, fold and commit one micro-batch; False if there was nothing new."""
        return self._step() is not None

    def _step(self) -> list[Effect] | None:
        """:meth:`step`; the effects decided (None: nothing new)."""
        conn = self._conn
        if conn is None:
            raise StoreError("the processor is not attached (call run, start or catch_up)")
        began = time.perf_counter()
        horizon = self.engine.horizon
        limit = self.max_batch or _SMALL
        envelopes = self._db(lambda: _read_after(conn, horizon - 1, limit))
        if not envelopes:
            return None
        last: tuple[int, str] | None = None
        if self.max_batch is not None or len(envelopes) < _SMALL:
            batch = History._of_envelopes(envelopes, Filters())  # decoded, so checked
            top = envelopes[-1]  # read in order of position
            last = (top.position or 0, str(top.event_id))
        else:  # a backlog: everything below the fence in one read
            batch = _read(self.store, Filters(), after=horizon, progress=False)
        engine = self.engine.copy()
        effects = engine.apply(batch)
        written = self._db(lambda: self._commit(conn, horizon, engine.horizon, effects))
        self.engine = engine
        self._unkept += batch.events.height * _REFOLD_EVENT + batch.cancels.height * _REFOLD_BUST
        if batch.events.height:
            self._last_folded = last or _last_event(batch)
        appended = {id(e) for e in written}
        held = tuple(e for e in effects if id(e) not in appended)
        done = Commit(time.time(), engine.horizon, batch.events.height, tuple(written),
                      time.perf_counter() - began, held)  # fmt: skip
        self.commits.append(done)
        self.effects.extend(written)
        if self.on_commit is not None:
            self.on_commit(done)
        return effects

    def _commit(
        self, conn: psycopg.Connection, expected: int, horizon: int, effects: list[Effect]
    ) -> list[Effect]:
        """Move the checkpoint and append the effects the store does not hold yet, in
        one transaction; return those appended."""
        if not effects and self.before_commit is None:  # most batches: one statement
            self._move_checkpoint(conn, expected, horizon)  # (autocommit: one round trip)
            return effects
        with conn.transaction():
            if effects:  # rare: the lock and the lookup cost nothing to the batches without
                # Processors of other names may decide the same effects: the lookup runs
                # once any of them holding an effect account's lock has committed (a
                # statement of its own, so that it sees what they wrote).
                accounts = sorted({e.account_id for e in effects})
                conn.execute(_LOCK_EFFECT_ACCOUNTS_SQL, (accounts,))
                effects = self._not_stored(conn, effects)
            meta = {"processor": self.name}
            appends = [
                Append(e.account_id, [e.event], e.correlation_id, uuid.UUID(e.causation_id), meta)
                for e in effects
            ]
            try:
                self.store.append_each_in(conn, appends)  # one statement for them all
            except StoreError as exc:  # translated by the store: passes, or refused?
                retry = isinstance(exc, TransientStoreError) or conn.broken or conn.closed
                raise self._failure(str(exc), retry=retry) from None
            # after the append, which so takes the transaction's id (and its events'
            # positions) with a snapshot that sees every append committed before: an
            # account's versions keep their order in the global one (migration 0020)
            self._move_checkpoint(conn, expected, horizon)
            if self.before_commit is not None:
                self.before_commit(effects)
        return effects

    def _move_checkpoint(self, conn: psycopg.Connection, expected: int, horizon: int) -> None:
        """Move the checkpoint only from where this processor left it (and lock its row
        until the commit): the check and the move in one round trip."""
        moved = conn.execute(
            "UPDATE processor_checkpoints SET position = %s, updated_at = clock_timestamp()"
            " WHERE name = %s AND position = %s RETURNING 1",
            (horizon, self.name, expected),
        ).fetchone()
        if moved is None:
            row = conn.execute(
                "SELECT position FROM processor_checkpoints WHERE name = %s", (self.name,)
            ).fetchone()
            raise _Moved(
                f"checkpoint {self.name!r} is at {None if row is None else row[0]}, "
                f"expected {expected}: another processor moved it"
            )

    def _not_stored(self, conn: psycopg.Connection, effects: list[Effect]) -> list[Effect]:
        """The effects the store does not hold yet: one the store holds (the same kind,
        account and trigger, and for a violation the same limit type and symbol,
        recorded after the trigger) is not appended again. The engine decided it as
        written, so it counts as written -- a block pending until read back -- as it
        is: the store holds it after the trigger, so the engine reads it back later.

        One lookup by causation id (index ``events_causation_idx``), in the committing
        transaction.
        """
        causes = sorted({_uuid(e.causation_id) for e in effects})
        rows = conn.execute(_STORED_EFFECTS_SQL, (causes,)).fetchall()
        if not rows:
            return effects
        stored: dict[tuple[str, str, str, str | None, str | None], int] = {}
        for kind, account, cause, limit_type, symbol, position in rows:
            key = (kind, account, cause, limit_type, symbol)
            stored[key] = max(position, stored.get(key, position))
        fresh = []
        for e in effects:
            violation = e.kind == "LimitViolationDetected"
            key = (e.kind, e.account_id, _uuid(e.causation_id),
                   e.limit_type if violation else None, e.symbol if violation else None)  # fmt: skip
            if stored.get(key, -1) > e.trigger_position:
                log.info("riskbook live %s: %s %s caused by %s is stored already: not appended",
                         self.name, e.kind, e.account_id, e.causation_id)  # fmt: skip
                continue
            fresh.append(e)
        return fresh

    def _wait(self, max_wait: float) -> None:
        conn = self._conn
        if conn is None:
            return

        def wait() -> None:
            for _ in conn.notifies(timeout=max_wait, stop_after=1):
                break

        self._db(wait)

    def _close(self, *, unlock: bool = True) -> None:
        """Let go of the lock (``unlock``: at once; a closed session's backend lets go of
        it only once it has exited) and the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if unlock and idle and not conn.broken:
                    conn.execute("SELECT pg_advisory_unlock_all()")
            with contextlib.suppress(psycopg.Error):
                conn.close()


_AHEAD_BLOCKS_SQL = """
SELECT aggregate_id, causation_id::text, coalesce(metadata->>'processor' = %(name)s, false)
  FROM events
 WHERE position >= %(checkpoint)s AND event_type = 'AccountBlocked'
   AND (metadata->>'processor' = %(name)s OR causation_id = ANY(%(causes)s::uuid[]))
 ORDER BY position
"""
"""The blocks that a processor's checkpoint has not passed (not read back yet): the
processor's own, and those with the causes given (of blocks its rebuild decides)."""

_LOCK_EFFECT_ACCOUNTS_SQL = """
SELECT pg_advisory_xact_lock(k)
  FROM (SELECT DISTINCT hashtextextended('riskbook.effects:' || a, 0) AS k
          FROM unnest(%s::text[]) AS a) AS keys
 ORDER BY k
"""
"""Locks the accounts given, for the transaction, in the order of their keys (a
volatile function is evaluated after the sort): two processors' commits never wait for
each other in a circle, even when two accounts' keys collide. Advisory locks need no
privilege (the processor's role may take them)."""

_STORED_EFFECTS_SQL = """
SELECT event_type, aggregate_id, causation_id::text,
       CASE WHEN event_type = 'LimitViolationDetected' THEN payload->>'limit_type' END,
       CASE WHEN event_type = 'LimitViolationDetected' THEN payload->>'symbol' END,
       position
  FROM events
 WHERE causation_id = ANY(%s::uuid[])
   AND event_type IN ('LimitViolationDetected', 'AccountBlocked')
"""
"""The violations and blocks stored with the causes given (served by the partial index
``events_causation_idx``)."""


def _last_event(history: History) -> tuple[int, str]:
    """(position, event id) of the event of ``history`` with the highest position."""
    last = history.events.select(pl.col("position", "event_id").sort_by("position").last())
    position, event_id = last.row(0)
    return int(position), str(event_id)


def _uuid(text: str) -> str:
    """A causation id as PostgreSQL prints a uuid (lower case, with hyphens)."""
    return str(uuid.UUID(str(text)))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
