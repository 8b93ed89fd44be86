"""The live processor: the engine over the store, with its checkpoint in PostgreSQL.

One loop: read the events after the checkpoint (below the visibility fence, so none is
ever skipped), fold them with the :class:`~riskbook.live.Engine`, and commit the
effects it decides together with the new checkpoint in one transaction. Woken by
NOTIFY, with a catch-up read after every wake and on start; under load each read takes
everything there is (a micro-batch), so the cost per event falls as the load rises.

Exactly once: the checkpoint row is locked and compared in the committing transaction,
and only one processor of a name works at a time (a session advisory lock; a second
one waits). On start the engine's state is rebuilt by folding everything below the
checkpoint without effects (the same fold, so the same state). A crash anywhere
leaves either the old checkpoint and no effects, or the new one and all of them.
A lost connection (a PostgreSQL restart) is retried with backoff, and the processor
resumes from the checkpoint; a statement the database refuses (a role that may not
write the checkpoint, say) stops it with a :class:`~riskbook.errors.StoreError` saying
why, in one line and without the password.
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
from typing import Literal, TypeVar

import psycopg
from psycopg import sql

from riskbook.errors import RiskbookError, StoreError
from riskbook.frames import Filters, History, _read
from riskbook.live._engine import DEFAULT_CRITICAL, Effect, Engine
from riskbook.store import Store, connect
from riskbook.store.eventstore import NOTIFY_CHANNEL, _read_after

__all__ = ["Commit", "Processor"]

log = logging.getLogger("riskbook.live")

_T = TypeVar("_T")
_SMALL = 2_000  # a read this full means a backlog: read the rest in one go (ADBC)


class _Moved(RiskbookError):
    """The checkpoint is not where this processor left it: someone else processed."""


class _Lost(StoreError):
    """The processor's connection was lost or refused: it reconnects and goes on."""


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
    seconds: float
    """From the read to the commit."""


class Processor:
    """Follows the store and appends violations and blocks, exactly once (module docstring).

    Parameters
    ----------
    store : a :class:`~riskbook.Store`, a DSN, or None (the default store).
    name : the checkpoint's name: processors of different names keep separate
        checkpoints (and each appends its own effects).
    critical : factor of the limit over which a breach blocks the account (one for
        every type, or per type; None for a type: never blocks). Default 1.2.
    types : the limit types to evaluate (default: every registered one).
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

    Examples
    --------
    >>> import riskbook  # doctest: +SKIP
    >>> p = riskbook.live.Processor(start="head").start()  # a thread  # doctest: +SKIP
    >>> p.commits[-1].effects  # doctest: +SKIP
    >>> p.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        store: Store | str | None = None,
        *,
        name: str = "live",
        critical: float | Mapping[str, float | None] = DEFAULT_CRITICAL,
        types: Iterable[str] | None = None,
        start: Literal["beginning", "head"] = "beginning",
        actor: str = "riskbook-live",
        on_commit: Callable[[Commit], None] | None = None,
        max_batch: int | None = None,
        before_commit: Callable[[list[Effect]], None] | None = None,
    ) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not name or len(name) > 200:
            raise ValueError("a processor's name must have 1 to 200 characters")
        if start not in ("beginning", "head"):
            raise ValueError(f"start must be 'beginning' or 'head', got {start!r}")
        self._owns_store = not isinstance(store, Store)
        self.store = store if isinstance(store, Store) else connect(store)
        self.name = name
        self.start_at = start
        self._engine_args = {
            "critical": critical,
            "types": None if types is None else tuple(types),
            "actor": actor,
        }
        self.engine = Engine(**self._engine_args)  # type: ignore[arg-type]
        self.on_commit = on_commit
        self.max_batch = max_batch
        self.before_commit = before_commit
        self.commits: deque[Commit] = deque(maxlen=10_000)
        self.effects: deque[Effect] = deque(maxlen=10_000)
        self.status = "stopped"
        self.error: BaseException | None = None
        self._stop = threading.Event()
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
        if self._thread is not None:
            self._thread.join(timeout)
        self._close()
        if self._owns_store:
            self.store.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported on the object; the thread ends
            self.error = exc
            self.status = f"failed: {exc}"
            if isinstance(exc, RiskbookError):  # says why in its message: no traceback
                log.error("riskbook live processor %s failed: %s", self.name, exc)
            else:
                log.exception("riskbook live processor %s failed", self.name)

    def run(self, *, idle_timeout: float | None = None, max_wait: float = 1.0) -> None:
        """The loop, in this thread, until :meth:`stop` (or ``idle_timeout`` seconds
        with nothing new). Connection losses are retried with backoff."""
        backoff = 0.1
        idle_since = time.monotonic()
        while not self._stop.is_set():
            try:
                self._attach()
                backoff = 0.1
                while not self._stop.is_set():
                    if self.step():
                        idle_since = time.monotonic()
                        continue
                    if idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                        return
                    self._wait(max_wait)
            except _Refused:
                raise
            except (psycopg.OperationalError, StoreError, _Moved) as exc:
                self.status = f"reconnecting: {_first_line(exc)}"
                log.warning("riskbook live %s: %s; retrying in %.1f s", self.name, exc, backoff)
                self._close()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if self._stop.is_set():
                    self._close()
        self.status = "stopped"

    def catch_up(self) -> list[Effect]:
        """Process everything committed so far, once, in this thread; return the effects."""
        self._attach()
        found: list[Effect] = []
        while self.step():
            found += self.commits[-1].effects
        return found

    # ------------------------------------------------------------------ the loop

    def _db(self, work: Callable[[], _T]) -> _T:
        """``work()`` on the processor's own connection, its psycopg errors riskbook's:
        :class:`_Lost` (retried) for a lost or refused connection, :class:`_Refused`
        otherwise; one line, no password (the store's translation)."""
        try:
            return work()
        except psycopg.Error as exc:
            message = str(self.store._translate(exc))
            lost = isinstance(exc, psycopg.OperationalError)
            failure: StoreError = _Lost(message) if lost else _Refused(message)
        raise failure  # here, so that it carries no psycopg exception (nor its message)

    def _attach(self) -> None:
        """Connect, take the lock (waiting for it), load the checkpoint, rebuild the state."""
        if self._conn is not None and not self._conn.closed:
            return
        self.status = "connecting"
        conn = self._db(lambda: psycopg.connect(self.store.dsn, autocommit=True))

        def lock_and_load() -> int | None:
            key = f"riskbook.live:{self.name}"
            waited = False
            while not conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
            ).fetchone()[0]:  # type: ignore[index]
                if not waited:
                    self.status = "waiting: another processor of this name is working"
                    log.info("riskbook live %s: %s", self.name, self.status)
                    waited = True
                if self._stop.wait(0.5):
                    return None
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
            return self._checkpoint(conn)

        try:
            checkpoint = self._db(lock_and_load)
        except BaseException:
            conn.close()
            raise
        if checkpoint is None:  # stopped while waiting
            conn.close()
            return
        self._conn = conn
        if checkpoint != self.engine.horizon:
            self._rebuild(checkpoint)
        self.status = "running"

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
        its pending blocks, as they did before the restart.
        """
        self.status = f"rebuilding the state below position {checkpoint}"
        engine = Engine(**self._engine_args)  # type: ignore[arg-type]
        if checkpoint > 0:
            history = _read(self.store, Filters(), after=0, before=checkpoint, progress=False)
            engine.apply(history, written=False)
        engine.horizon = checkpoint
        conn = self._conn
        assert conn is not None
        own = self._db(lambda: conn.execute(_OWN_BLOCKS_SQL, (checkpoint, self.name)).fetchall())
        for account, cause in own:
            engine.expect_block(account, cause)
        self.engine = engine
        gc.freeze()  # what the rebuild left is long-lived: keep it out of every collection

    def step(self) -> bool:
        """Read, fold and commit one micro-batch; False if there was nothing new."""
        conn = self._conn
        if conn is None:
            raise StoreError("the processor is not attached (call run, start or catch_up)")
        began = time.perf_counter()
        horizon = self.engine.horizon
        limit = self.max_batch or _SMALL
        envelopes = self._db(lambda: _read_after(conn, horizon - 1, limit))
        if not envelopes:
            return False
        if self.max_batch is not None or len(envelopes) < _SMALL:
            batch = History.from_envelopes(envelopes)
        else:  # a backlog: everything below the fence in one read
            batch = _read(self.store, Filters(), after=horizon, progress=False)
        engine = self.engine.copy()
        effects = engine.apply(batch)
        self._db(lambda: self._commit(conn, horizon, engine.horizon, effects))
        self.engine = engine
        done = Commit(time.time(), engine.horizon, batch.events.height, tuple(effects),
                      time.perf_counter() - began)  # fmt: skip
        self.commits.append(done)
        self.effects.extend(effects)
        if self.on_commit is not None:
            self.on_commit(done)
        return True

    def _commit(
        self, conn: psycopg.Connection, expected: int, horizon: int, effects: list[Effect]
    ) -> None:
        with conn.transaction():
            # Moves the checkpoint only from where this processor left it (and locks its
            # row until the commit): the check and the move in one round trip.
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
            for e in effects:
                try:
                    self.store.append_in(
                        conn,
                        e.account_id,
                        [e.event],
                        correlation_id=e.correlation_id,
                        causation_id=uuid.UUID(e.causation_id),
                        metadata={"processor": self.name},
                    )
                except StoreError as exc:  # translated by the store: lost, or refused?
                    if conn.broken or conn.closed:
                        raise
                    raise _Refused(str(exc)) from None
            if self.before_commit is not None:
                self.before_commit(effects)

    def _wait(self, max_wait: float) -> None:
        conn = self._conn
        if conn is None:
            return

        def wait() -> None:
            for _ in conn.notifies(timeout=max_wait, stop_after=1):
                break

        self._db(wait)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


_OWN_BLOCKS_SQL = """
SELECT aggregate_id, causation_id::text FROM events
 WHERE position >= %s AND event_type = 'AccountBlocked' AND metadata->>'processor' = %s
 ORDER BY position
"""
"""The blocks a processor wrote that its checkpoint has not passed (not read back yet)."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
