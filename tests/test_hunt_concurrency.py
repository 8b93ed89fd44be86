"""Correctness hunt: the store under concurrency, and the readers that follow it.

Writers (threads and processes: single appends with and without expected versions,
batches, ``append_each_in``, imports, transactions that abort, transactions held
open) run while readers (``Store.follow``, ``read_all`` polling, ``History.refresh``,
``riskbook.load`` with its cache) follow the store; then every reader must hold exactly
the committed events, in global order, once each.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

import riskbook
from riskbook.frames import Filters, History, _read, load
from riskbook.store import Append, Store
from riskbook.store.eventstore import TransientStoreError
from tests.test_frames import assert_same
from tests.test_store import _write

T0 = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))


def fund(acc: str, amount: float = 1.0) -> riskbook.AccountFunded:
    return riskbook.AccountFunded(account_id=acc, amount=amount, funded_at=T0)


def trade(acc: str, tid: str, n: int = 1) -> riskbook.TradeExecuted:
    return riskbook.TradeExecuted(
        trade_id=tid,
        account_id=acc,
        symbol=random.choice(["AAPL", "MSFT"]),
        side=riskbook.Side.Buy if n % 2 else riskbook.Side.Sell,
        quantity=1.0 + n % 7,
        price=100.0 + n % 13,
        executed_at=T0 + timedelta(seconds=n),
    )


def bust(acc: str, tid: str) -> riskbook.TradeCancelled:
    return riskbook.TradeCancelled(
        trade_id=tid, account_id=acc, reason="bust", cancelled_at=T0 + timedelta(hours=1)
    )


class Ledger:
    """What the writers did: the ids committed, aborted and refused."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.committed: set[uuid.UUID] = set()
        self.gone: set[uuid.UUID] = set()  # aborted or refused: must never be seen

    def ok(self, envs: list[riskbook.Envelope]) -> None:
        with self.lock:
            self.committed.update(e.event_id for e in envs)

    def lost(self, envs: list[riskbook.Envelope]) -> None:
        with self.lock:
            self.gone.update(e.event_id for e in envs)


def _import_lines(tag: str, n: int) -> list[bytes]:
    lines = []
    for i in range(n):
        acc = f"IMP-{tag}-{i % 3}"
        env = riskbook.Envelope(
            event_id=uuid.uuid4(),
            aggregate_id=acc,
            aggregate_type="Account",
            sequence=0,
            timestamp=T0 + timedelta(seconds=i),
            payload=fund(acc, 1.0 + i),
            correlation_id=f"import-{tag}",
        )
        d = env.to_dict()
        del d["sequence"]
        lines.append(msgspec.json.encode(d))
    return lines


def _ids_of(lines: list[bytes]) -> set[uuid.UUID]:
    return {uuid.UUID(msgspec.json.decode(line)["event_id"]) for line in lines}


def _process_import(dsn: str, path: str, pause: float) -> None:
    time.sleep(pause)
    store = Store(dsn)
    store.import_jsonl(path)
    store.close()


def _process_appender(dsn: str, tag: str, n: int, out: Any) -> None:
    store = Store(dsn)
    ids = []
    for i in range(n):
        envs = store.append(f"PROC-{tag}-{i % 2}", [fund(f"PROC-{tag}-{i % 2}", 1.0 + i)])
        ids += [str(e.event_id) for e in envs]
    store.close()
    out.put(ids)


def _writers(store: Store, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    """One writer thread: a random mix of every way to append."""
    rnd = random.Random(seed)
    n = 0
    while not stop.is_set():
        n += 1
        kind = rnd.randrange(9)
        acc = f"ACC-{seed}-{rnd.randrange(3)}"
        hot = f"HOT-{rnd.randrange(2)}"
        try:
            if kind == 0:  # optimistic, on hot aggregates shared by every writer
                v = store.version(hot)
                events = [fund(hot, 1.0 + n + j) for j in range(rnd.randint(1, 3))]
                # a conflict (caught below) writes nothing: the final count checks it
                ledger.ok(store.append(hot, events, expected_version=v))
            elif kind == 1:  # a batch
                batch = [trade(acc, f"T-{seed}-{n}-{j}", n + j) for j in range(rnd.randint(1, 6))]
                ledger.ok(store.append(acc, batch))
            elif kind == 2:  # several aggregates in one statement, in a transaction
                with store.connection() as conn:
                    outs = store.append_each_in(
                        conn,
                        [Append(acc, [fund(acc)]), Append(hot, [fund(hot), fund(hot, 2.0)])],
                    )
                    conn.commit()
                for envs in outs:
                    ledger.ok(envs)
            elif kind == 3:  # a transaction that aborts after appending
                got: list[riskbook.Envelope] = []
                with pytest.raises(RuntimeError), store.connection() as conn:
                    got = store.append_in(conn, acc, [fund(acc), fund(acc, 3.0)])
                    time.sleep(rnd.random() * 0.01)
                    raise RuntimeError("abort")
                ledger.lost(got)
            elif kind == 4:  # a transaction held open a while
                with store.connection() as conn:
                    envs = store.append_in(conn, acc, [fund(acc, 7.0)])
                    time.sleep(rnd.random() * 0.05)
                    conn.commit()
                ledger.ok(envs)
            elif kind == 5:  # a stale expected version: writes nothing
                v = store.version(acc)
                stale = [fund(acc, 9.0)]
                try:
                    store.append(acc, stale, expected_version=v + 5)
                    raise AssertionError("a stale expected version was accepted")
                except riskbook.ConcurrencyConflict:
                    pass
            elif kind == 7:  # a bust recorded before its trade, then the trade
                tid = f"B-{seed}-{n}"
                ledger.ok(store.append(acc, [bust(acc, tid)]))
                ledger.ok(store.append(acc, [trade(acc, tid, n)]))
            elif kind == 8:  # a trade and its bust, the bust in a transaction held open
                tid = f"C-{seed}-{n}"
                ledger.ok(store.append(acc, [trade(acc, tid, n)]))
                with store.connection() as conn:
                    envs = store.append_in(conn, acc, [bust(acc, tid)])
                    time.sleep(rnd.random() * 0.02)
                    conn.commit()
                ledger.ok(envs)
            else:  # one event, the common case
                ledger.ok(store.append(acc, [fund(acc, 0.5)]))
        except riskbook.ConcurrencyConflict:
            pass
        except TransientStoreError as exc:
            # a transaction overtaken on an aggregate (append_in, append_each_in: their
            # caller retries), rolled back whole: nothing of it is written
            assert "retry" in str(exc), exc


END = "END"  # the aggregate of the last event: every reader stops once it has it


def _collect_follow(store: Store, out: list[riskbook.Envelope]) -> None:
    for batch in store.follow(after=0, batch_size=37, idle_timeout=60, max_wait=0.2):
        out.extend(batch)
        if any(e.aggregate_id == END for e in batch):
            return


def _collect_poll(store: Store, out: list[riskbook.Envelope], deadline: float) -> None:
    after = 0
    while time.monotonic() < deadline:
        batch = store.read_all(after=after, limit=23)
        for e in batch:
            assert e.position is not None and e.position > after
            after = e.position
        out.extend(batch)
        if any(e.aggregate_id == END for e in batch):
            return
        if not batch:
            time.sleep(0.002)


def _refresher(h: History, stop: threading.Event, sizes: list[int]) -> None:
    while not stop.is_set():
        sizes.append(h.refresh())
        time.sleep(0.01)


def test_every_reader_sees_exactly_the_committed_events_under_mixed_writers(
    fresh_store: Store, tmp_path: Path
) -> None:
    store = fresh_store
    ledger = Ledger()
    ledger.ok(store.append("SEED", [fund("SEED")]))
    stop = threading.Event()

    lines_thread = _import_lines("thread", 400)
    lines_proc = _import_lines("proc", 400)
    path_thread = _write(tmp_path / "t.jsonl.gz", lines_thread)
    path_proc = _write(tmp_path / "p.jsonl", lines_proc)

    cached = load(store)  # a cache entry, refreshed by a History while writers write
    plain = load(store, cache=False)
    by_symbol = load(store, symbols=["AAPL"])
    by_account = load(store, accounts=["ACC-1-0", "ACC-2-1"], symbols=["MSFT"])
    filtered = [
        (by_symbol, {"symbols": ["AAPL"]}),
        (by_account, {"accounts": ["ACC-1-0", "ACC-2-1"], "symbols": ["MSFT"]}),
    ]
    followed: list[riskbook.Envelope] = []
    polled: list[riskbook.Envelope] = []
    sizes: list[int] = []
    deadline = time.monotonic() + 60
    readers = [
        threading.Thread(target=_collect_follow, args=(store, followed)),
        threading.Thread(target=_collect_poll, args=(store, polled, deadline)),
    ]
    refreshers = [
        threading.Thread(target=_refresher, args=(cached, stop, sizes)),
        threading.Thread(target=_refresher, args=(plain, stop, [])),
        *(threading.Thread(target=_refresher, args=(h, stop, [])) for h, _ in filtered),
    ]
    for t in readers + refreshers:
        t.start()
    ctx = multiprocessing.get_context("spawn")
    queue: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_process_import, args=(store.dsn, str(path_proc), 0.5)),
        ctx.Process(target=_process_appender, args=(store.dsn, "a", 60, queue)),
    ]
    for p in procs:
        p.start()
    writers = [
        threading.Thread(target=_writers, args=(store, ledger, stop, seed)) for seed in range(4)
    ]
    for t in writers:
        t.start()
    time.sleep(0.8)
    result = store.import_jsonl(path_thread)
    assert result.added == 400
    ledger.committed |= _ids_of(lines_thread)
    proc_ids = queue.get(timeout=60)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ledger.committed |= _ids_of(lines_proc) | {uuid.UUID(i) for i in proc_ids}
    time.sleep(0.5)
    stop.set()
    for t in writers + refreshers:
        t.join()
    # the last event: every writer has ended, so all that committed lies below it
    ledger.ok(store.append(END, [fund(END)]))
    for t in readers:
        t.join(timeout=30)
        assert not t.is_alive()

    stored = store.read_all()
    ids = [e.event_id for e in stored]
    assert len(ids) == len(set(ids)) == store.count()
    assert set(ids) == ledger.committed
    assert not (set(ids) & ledger.gone)
    positions = [e.position for e in stored]
    assert positions == sorted(positions)
    assert [e.event_id for e in followed] == ids, "follow"
    assert [e.event_id for e in polled] == ids, "read_all polling"
    # a History refreshed while they wrote ends equal to a fresh load
    cold = load(store, cache=False)
    assert cold.events.height == len(ids)
    for h in (cached, plain):
        h.refresh()
        assert_same(h, cold)
    assert sum(sizes) > 0
    warm = load(store)  # the cache the refreshing History kept, plus what is new
    assert_same(warm, cold)
    assert_same(load(store), cold)
    for h, kw in filtered:
        h.refresh()
        fresh = load(store, cache=False, **kw)
        assert fresh.cancels.height > 0
        assert_same(h, fresh)
        assert_same(load(store, **kw), fresh)


def test_import_into_an_empty_store_under_appenders_and_a_follower(
    fresh_store: Store, tmp_path: Path
) -> None:
    """The empty-store road (table locked, indexes dropped and rebuilt) with appenders
    waiting on the lock, a failing import started once it holds the lock (started
    together, two imports into an empty store deadlock: see the test_bug below), and a
    follower from position 0."""
    store = fresh_store
    ledger = Ledger()
    lines = _import_lines("empty", 3000)
    path = _write(tmp_path / "e.jsonl", lines)
    bad = _write(tmp_path / "bad.jsonl", [*_import_lines("bad", 200), b'{"oops": 1}'])
    followed: list[riskbook.Envelope] = []
    follower = threading.Thread(target=_collect_follow, args=(store, followed))
    follower.start()
    stop = threading.Event()
    writers = [
        threading.Thread(target=_writers, args=(store, ledger, stop, seed)) for seed in range(3)
    ]
    failures: list[BaseException] = []

    def failing() -> None:
        try:
            store.import_jsonl(bad)
        except riskbook.ImportFailed as exc:
            failures.append(exc)

    def locked() -> None:  # once the import holds the table, the failing one starts
        with psycopg.connect(store.dsn, autocommit=True) as conn:
            for _ in range(2000):
                if conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE granted AND"
                    " relation = 'events'::regclass AND mode = 'AccessExclusiveLock')"
                ).fetchone()[0]:  # type: ignore[index]
                    break
                time.sleep(0.005)
        failing()

    bad_t = threading.Thread(target=locked)
    bad_t.start()
    for t in writers:
        t.start()
    result = store.import_jsonl(path)
    ledger.committed |= _ids_of(lines)
    assert result.added == 3000
    time.sleep(0.3)
    stop.set()
    for t in [*writers, bad_t]:
        t.join()
    assert len(failures) == 1
    ledger.ok(store.append(END, [fund(END)]))
    follower.join(timeout=30)
    assert not follower.is_alive()
    stored = store.read_all()
    ids = [e.event_id for e in stored]
    assert set(ids) == ledger.committed and len(ids) == len(set(ids))
    assert [e.event_id for e in followed] == ids
    assert_same(load(store, cache=False), History.from_envelopes(stored))


def _backends(store: Store, like: str) -> list[int]:
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND query LIKE %s",
                (like,),
            )
        ]


def _kill(store: Store, pids: list[int]) -> None:
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_follower_whose_connection_is_killed_while_waiting_fails_clearly(
    fresh_store: Store,
) -> None:
    store = fresh_store
    store.append("ACC-1", [fund("ACC-1")])
    outcome: list[object] = []
    got: list[riskbook.Envelope] = []

    def consume() -> None:
        try:
            for batch in store.follow(after=0, idle_timeout=20, max_wait=10):
                got.extend(batch)
            outcome.append("returned")
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # waiting on LISTEN now
    pids = _backends(store, "%FROM events WHERE position > $1 AND position < $2 ORDER BY position%")
    assert len(pids) == 1
    killed = time.monotonic()
    _kill(store, pids)
    t.join(timeout=15)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], TransientStoreError), outcome
    assert time.monotonic() - killed < 5


def _set_timeout(store: Store, value: str | None) -> None:
    # this session must not be cut short by the setting it changes
    with psycopg.connect(store.dsn, autocommit=True, options="-c statement_timeout=0") as conn:
        db = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        if value is None:
            conn.execute(f'ALTER DATABASE "{db}" RESET statement_timeout')
        else:
            conn.execute(f"ALTER DATABASE \"{db}\" SET statement_timeout = '{value}'")
    store.engine.dispose()  # pooled connections took the old setting


@pytest.mark.parametrize("route", ["csv", "copy"])  # adbc: see the test_bug below
def test_a_statement_timeout_makes_a_load_fail_never_come_back_short(
    fresh_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    store = fresh_store
    store.import_jsonl(_write(tmp_path / "big.jsonl", _import_lines("big", 30_000)))
    full = load(store, cache=False)
    assert full.events.height == 30_000
    monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", route)
    outcomes = []
    try:
        for ms in (1, 3, 10, 30, 100):
            _set_timeout(store, f"{ms}ms")
            try:
                h = load(store, cache=False)
            except riskbook.RiskbookError as exc:
                outcomes.append(type(exc).__name__)
                continue
            outcomes.append(h.events.height)
            assert_same(h, full)
    finally:
        _set_timeout(store, None)
    assert outcomes


@pytest.mark.parametrize("route", ["csv", "copy"])  # adbc: see the test_bug below
def test_a_load_whose_reading_connection_is_killed_fails_never_comes_back_short(
    fresh_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    store = fresh_store
    store.import_jsonl(_write(tmp_path / "big.jsonl", _import_lines("big", 40_000)))
    full = load(store, cache=False)
    monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", route)
    outcomes: list[object] = []
    for _ in range(4):
        box: list[object] = []

        def run(box: list[object] = box) -> None:
            try:
                box.append(load(store, cache=False))
            except Exception as exc:
                box.append(exc)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 10
        killed = False
        while t.is_alive() and time.monotonic() < deadline and not killed:
            pids = _backends(store, "%COPY%")
            if pids:
                _kill(store, pids)
                killed = True
        t.join(timeout=30)
        assert not t.is_alive()
        (got,) = box
        if isinstance(got, History):
            assert_same(got, full)
            outcomes.append("whole")
        else:  # a connection lost: a retry can get past it
            assert isinstance(got, TransientStoreError), repr(got)
            assert "\n" not in str(got)
            outcomes.append(type(got).__name__)
    assert outcomes


def test_bug_a_killed_connection_during_a_default_load_of_a_medium_store_escapes_as_polars_error(
    fresh_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load of 50,001 to ~600,000 events takes the ADBC route by default. When the
    server ends its reading connection mid-stream (pg_terminate_backend, a restart, a
    statement_timeout on the role), ``riskbook.load`` raises
    ``polars.exceptions.ComputeError`` ("got external error: [libpq] ...") instead of a
    ``riskbook.StoreError`` (TransientStoreError for a lost connection), as the csv and
    copy routes and every Store method do.

    Expected: a RiskbookError (what ``Store.connection`` promises riskbook's layers, and
    what the CLI turns into its one-line error with exit 1).
    Actual: a polars ComputeError, which the CLI's handler does not catch (a traceback).
    Cause: riskbook/frames.py ``_batches`` catches only ``adbc_driver_manager.Error``
    around ``execute_query``; the stream's error surfaces later, inside
    ``pl.DataFrame(handle)``, as a Polars error.
    """
    monkeypatch.delenv("RISKBOOK_LOAD_ROUTE", raising=False)
    store = fresh_store
    store.import_jsonl(_write(tmp_path / "big.jsonl", _import_lines("big", 60_000)))
    load(store, cache=False)  # the ADBC driver's start paid here
    for _ in range(10):  # until a kill lands while the rows stream in
        box: list[object] = []

        def run(box: list[object] = box) -> None:
            try:
                box.append(load(store, cache=False))
            except Exception as exc:
                box.append(exc)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 20
        while t.is_alive() and time.monotonic() < deadline:
            pids = _backends(store, "%COPY%")
            if pids:
                _kill(store, pids)
                break
        t.join(timeout=30)
        (got,) = box
        if not isinstance(got, History):
            break
    assert isinstance(got, TransientStoreError), repr(got)
    assert "\n" not in str(got)


def _check_loads(
    store: Store, stop: threading.Event, kw: dict[str, Any], checked: list[int]
) -> None:
    """Load (through the cache, warm or cold, and by refresh) again and again; each
    History must equal a cold read of the store up to its own horizon."""
    h = load(store, **kw)
    while not stop.is_set():
        for got in (load(store, **kw), h):
            if got is h:
                h.refresh()
            cold = _read(
                store, Filters(**_filters(kw)), after=0, progress=False, before=got.horizon
            )
            assert_same(got, cold)
            checked.append(got.events.height)


def _filters(kw: dict[str, Any]) -> dict[str, Any]:
    from riskbook.frames import _ids

    return {k: _ids(v) for k, v in kw.items()}


def test_warm_loads_and_refreshes_equal_a_cold_read_at_their_horizon_while_writers_write(
    fresh_store: Store,
) -> None:
    store = fresh_store
    ledger = Ledger()
    ledger.ok(store.append("SEED", [fund("SEED")]))
    stop, halt = threading.Event(), threading.Event()
    writers = [
        threading.Thread(target=_writers, args=(store, ledger, stop, seed)) for seed in range(3)
    ]
    for t in writers:
        t.start()
    checked: list[int] = []
    errors: list[BaseException] = []

    def guarded(kw: dict[str, Any]) -> None:
        try:
            _check_loads(store, halt, kw, checked)
        except BaseException as exc:
            errors.append(exc)
            halt.set()

    kws: list[dict[str, Any]] = [{}, {}, {"symbols": ["AAPL"]}, {"accounts": ["ACC-0-1"]}]
    readers = [threading.Thread(target=guarded, args=(kw,)) for kw in kws]
    for t in readers:
        t.start()
    time.sleep(3)
    stop.set()
    for t in writers:
        t.join()
    halt.set()
    for t in readers:
        t.join()
    if errors:
        raise errors[0]
    assert len(checked) > 4 and max(checked) > 50


def test_the_same_file_imported_at_once_by_several_sessions_is_stored_once(
    fresh_store: Store, tmp_path: Path
) -> None:
    """Into a store that is not empty (for an empty one see the deadlock below)."""
    store = fresh_store
    store.append("SEED", [fund("SEED")])
    lines = _import_lines("same", 2000)
    path = _write(tmp_path / "same.jsonl", lines)
    half = _write(tmp_path / "half.jsonl", lines[1000:] + _import_lines("other", 300))
    results: list[object] = []

    def run(p: Path) -> None:
        try:
            results.append(store.import_jsonl(p).added)
        except Exception as exc:
            results.append(exc)

    appends: list[riskbook.Envelope] = []

    def appender() -> None:  # into the file's aggregates meanwhile
        for i in range(30):
            appends.extend(store.append(f"IMP-same-{i % 3}", [fund(f"IMP-same-{i % 3}")]))

    threads = [threading.Thread(target=run, args=(p,)) for p in (path, path, half, path)]
    threads.append(threading.Thread(target=appender))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, int) for r in results), results
    assert sum(results) == 2300, results  # type: ignore[arg-type]
    stored = store.read_all()
    ids = [e.event_id for e in stored]
    assert len(ids) == len(set(ids)) == store.count() == 2300 + len(appends) + 1
    # every aggregate's versions still run 1, 2, 3, ... with no gaps
    for a in {e.aggregate_id for e in stored}:
        assert [e.sequence for e in store.read(a)] == list(range(1, store.version(a) + 1))


def test_bug_imports_started_together_into_an_empty_store_deadlock(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    """Two imports of the same file started together into an empty store: one fails with
    "deadlock detected ...; nothing was written".

    Expected: both succeed; the first adds every event and the other adds nothing (DESIGN
    §3: "importing the same file twice adds nothing"; ``import_jsonl``: writes of other
    sessions go first and their events are skipped as already present; ``_load_general``
    even retries deadlocks with other imports).
    Actual: ``ImportFailed: ...: deadlock detected (...); nothing was written``.
    Cause: riskbook/store/eventstore.py ``_lock_if_empty`` reads ``events`` first
    (``SELECT NOT EXISTS``, which takes ACCESS SHARE until the transaction ends) and then
    upgrades to ``LOCK TABLE events IN ACCESS EXCLUSIVE MODE``: two sessions that both
    passed the read each wait for the other's ACCESS SHARE -- the classic lock-upgrade
    deadlock. (``trusted_copy`` takes the same road.) Taking the lock first, or
    ``LOCK ... NOWAIT``/a SHARE ROW EXCLUSIVE lock before the check, would not deadlock.
    """
    path = _write(tmp_path / "same.jsonl", _import_lines("same", 50))
    failures: list[BaseException] = []
    for _ in range(6):
        store = Store(make_database())
        barrier = threading.Barrier(3)
        added: list[int] = []

        def run(
            store: Store = store, barrier: threading.Barrier = barrier, added: list[int] = added
        ) -> None:
            barrier.wait()
            try:
                added.append(store.import_jsonl(path).added)
            except riskbook.ImportFailed as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.close()
        if failures:
            break
        assert sorted(added) == [0, 0, 50]
    assert not failures, str(failures[0])


def test_read_your_writes_while_another_database_is_busy_writing(
    fresh_store: Store, make_database: Callable[[], str]
) -> None:
    """Right after ``append`` returns, ``read_all``, ``head``, ``load`` (cached) and a
    running ``follow`` have the event, though transactions of another database, some
    older than it, keep starting and ending (the fence leaves them out through
    pg_stat_activity)."""
    store = fresh_store
    other = make_database()
    stop = threading.Event()

    def foreign(seed: int) -> None:
        rnd = random.Random(seed)
        with psycopg.connect(other) as conn:
            while not stop.is_set():
                conn.execute("SELECT pg_current_xact_id()")
                time.sleep(rnd.random() * 0.004)
                conn.commit()

    busy = [threading.Thread(target=foreign, args=(i,)) for i in range(6)]
    for t in busy:
        t.start()
    followed: list[riskbook.Envelope] = []
    follower = threading.Thread(target=_collect_follow, args=(store, followed))
    follower.start()
    h = load(store)
    try:
        end = time.monotonic() + 2.5
        n = 0
        while time.monotonic() < end:
            n += 1
            env = store.append("ACC-1", [fund("ACC-1", float(n))])[0]
            assert store.read_all(after=(env.position or 0) - 1) == [env]
            assert store.head() == env.position
            if n % 10 == 0:
                assert load(store).events["event_id"][-1] == str(env.event_id)
                h.refresh()
                assert h.events.height == n
    finally:
        stop.set()
        for t in busy:
            t.join()
    store.append(END, [fund(END)])
    follower.join(timeout=30)
    assert len(followed) == n + 1


def test_pooled_connections_killed_while_idle_cost_one_failed_call_not_several(
    fresh_store: Store,
) -> None:
    """Idle pooled connections ended by the server (a restart, an idle timeout, a DBA):
    the first call on one of them fails (TransientStoreError, it may have written), and
    the pool lets the others go with it: the next call connects anew. Before, each of
    the next four calls took a dead connection and failed in turn."""
    store = fresh_store
    store.append("ACC-1", [fund("ACC-1")])
    with store.connection() as a, store.connection() as b, store.connection() as c:
        for conn in (a, b, c):
            conn.execute("SELECT 1")  # four idle in the pool after this, with the migrator's
    _kill(store, _backends(store, "%"))
    failed = 0
    for _ in range(3):
        try:
            assert store.head() > 0
        except TransientStoreError:
            failed += 1
    assert failed <= 1
    assert store.read_all()[0].aggregate_id == "ACC-1"
