"""The event store against a real PostgreSQL (DESIGN.md §3)."""

from __future__ import annotations

import gzip
import multiprocessing
import os
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import psycopg
import pytest

import riskbook
from riskbook.events import encode_envelope
from riskbook.store import Append, Store, migrations
from riskbook.store.eventstore import TransientStoreError

T0 = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)


def funded(account: str, amount: float = 1000.0, minutes: int = 0) -> riskbook.AccountFunded:
    return riskbook.AccountFunded(
        account_id=account, amount=amount, funded_at=T0 + timedelta(minutes=minutes)
    )


def trade(account: str, n: int = 1, side: str = "Buy") -> riskbook.TradeExecuted:
    return riskbook.TradeExecuted(
        trade_id=f"T-{n}",
        account_id=account,
        symbol="AAPL",
        side=riskbook.Side(side),
        quantity=10.0,
        price=100.0 + n,
        executed_at=T0 + timedelta(seconds=n),
    )


# ----------------------------------------------------------------------- append / read


def test_append_assigns_versions_positions_and_recorded_times(
    shared_store: Store, agg: str
) -> None:
    before = datetime.now(UTC)
    envs = shared_store.append(agg, [funded(agg), trade(agg, 1), trade(agg, 2)], expected_version=0)
    assert [e.sequence for e in envs] == [1, 2, 3]
    positions = [e.position for e in envs]
    assert positions == sorted(positions) and len(set(positions)) == 3
    assert all(e.timestamp >= before - timedelta(seconds=5) for e in envs)
    assert len({e.correlation_id for e in envs}) == 1
    assert shared_store.version(agg) == 3
    back = shared_store.read(agg)
    assert back == envs
    assert shared_store.read(agg, from_version=2) == envs[1:]
    assert shared_store.read(agg, from_version=2, to_version=2) == envs[1:2]


def test_causation_correlation_and_metadata_are_kept(shared_store: Store, agg: str) -> None:
    cause = shared_store.append(agg, [funded(agg)])[0]
    effect = shared_store.append(
        agg,
        [
            riskbook.AccountBlocked(
                account_id=agg, reason="test", blocked_by="engine", blocked_at=T0
            )
        ],
        causation_id=cause.event_id,
        correlation_id=cause.correlation_id,
        metadata={"rule": "MaxLeverage", "n": 1},
    )[0]
    stored = shared_store.read(agg, from_version=2)[0]
    assert stored.causation_id == cause.event_id
    assert stored.correlation_id == cause.correlation_id
    assert stored.metadata == {"rule": "MaxLeverage", "n": 1}
    assert stored == effect


def test_stale_expected_version_raises_and_writes_nothing(shared_store: Store, agg: str) -> None:
    shared_store.append(agg, [funded(agg), trade(agg)], expected_version=0)
    for stale in (0, 1, 3, 10):
        with pytest.raises(riskbook.ConcurrencyConflict) as info:
            shared_store.append(agg, [trade(agg, 5), trade(agg, 6)], expected_version=stale)
        assert (info.value.expected, info.value.actual) == (stale, 2)
    assert shared_store.version(agg) == 2
    assert len(shared_store.read(agg)) == 2
    assert shared_store.append(agg, [trade(agg, 7)], expected_version=2)[0].sequence == 3


def test_an_empty_batch_still_checks_the_expected_version(shared_store: Store, agg: str) -> None:
    shared_store.append(agg, [funded(agg), trade(agg)], expected_version=0)
    for stale in (0, 1, 999):
        with pytest.raises(riskbook.ConcurrencyConflict) as info:
            shared_store.append(agg, [], expected_version=stale)
        assert (info.value.expected, info.value.actual) == (stale, 2)
    assert shared_store.append(agg, [], expected_version=2) == []
    assert shared_store.append(agg, []) == []
    with shared_store.connection() as conn:
        with pytest.raises(riskbook.ConcurrencyConflict):
            shared_store.append_in(conn, agg, [], expected_version=5)
        assert shared_store.append_in(conn, agg, [], expected_version=2) == []
    assert shared_store.version(agg) == 2


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_iter_all_refuses_a_batch_size_below_one(shared_store: Store, batch_size: object) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        shared_store.iter_all(batch_size=batch_size)  # type: ignore[arg-type]


def test_a_batch_must_belong_to_its_aggregate(shared_store: Store, agg: str) -> None:
    with pytest.raises(riskbook.InvalidEvent) as info:
        shared_store.append(agg, [funded(agg), funded("someone-else")])
    assert info.value.field == "account_id"
    mark = riskbook.PriceMarked(symbol="AAPL", price=1.0, marked_at=T0)
    with pytest.raises(riskbook.InvalidEvent):
        shared_store.append(agg, [mark])
    assert shared_store.version(agg) == 0
    sym = f"SYM-{uuid.uuid4().hex[:6]}"
    env = shared_store.append(sym, [riskbook.PriceMarked(symbol=sym, price=1.0, marked_at=T0)])[0]
    assert env.aggregate_type == "Instrument"


def test_an_invalid_event_in_a_batch_writes_nothing(shared_store: Store, agg: str) -> None:
    bad = riskbook.TradeExecuted(
        trade_id="T",
        account_id=agg,
        symbol="X",
        side=riskbook.Side.Buy,
        quantity="7",  # type: ignore[arg-type]
        price=1.0,
        executed_at=T0,
    )
    with pytest.raises(riskbook.InvalidEvent) as info:
        shared_store.append(agg, [funded(agg), bad])
    assert (info.value.event_type, info.value.field) == ("TradeExecuted", "quantity")
    assert shared_store.version(agg) == 0


def _race(
    store: Store, agg: str, writer: int, rounds: int, out: list[tuple[int, int, str]]
) -> None:
    for _ in range(rounds):
        while True:
            v = store.version(agg)
            try:
                store.append(agg, [funded(agg, amount=writer + 1)], expected_version=v)
                out.append((writer, v + 1, "won"))
                break
            except riskbook.ConcurrencyConflict as exc:
                assert exc.expected == v and exc.actual > v
                out.append((writer, v + 1, "lost"))


def test_threads_racing_on_one_aggregate(shared_store: Store, agg: str) -> None:
    writers, rounds = 8, 15
    log: list[tuple[int, int, str]] = []
    threads = [
        threading.Thread(target=_race, args=(shared_store, agg, w, rounds, log))
        for w in range(writers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = shared_store.read(agg)
    assert [e.sequence for e in stored] == list(range(1, writers * rounds + 1))
    wins = Counter(version for _, version, result in log if result == "won")
    assert sorted(wins) == list(range(1, writers * rounds + 1))
    assert set(wins.values()) == {1}, "each version is won by exactly one writer"
    # The winner of each version is the writer whose amount is stored there.
    winner = {version: w for w, version, result in log if result == "won"}
    assert all(e.payload.amount == winner[e.sequence] + 1 for e in stored)  # type: ignore[union-attr]
    assert any(result == "lost" for _, _, result in log), "no contention happened"


def _process_writer(
    dsn: str, agg: str, writer: int, rounds: int, queue: multiprocessing.Queue
) -> None:
    store = Store(dsn)
    log: list[tuple[int, int, str]] = []
    _race(store, agg, writer, rounds, log)
    store.close()
    queue.put(log)


def test_processes_racing_on_one_aggregate(make_database: Callable[[], str], agg: str) -> None:
    dsn = make_database()
    Store(dsn).close()  # migrate once up front
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = ctx.Queue()
    writers, rounds = 4, 10
    procs = [
        ctx.Process(target=_process_writer, args=(dsn, agg, w, rounds, queue))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    logs = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    store = Store(dsn)
    stored = store.read(agg)
    store.close()
    assert [e.sequence for e in stored] == list(range(1, writers * rounds + 1))
    wins = Counter(v for log in logs for _, v, r in log if r == "won")
    assert set(wins.values()) == {1} and len(wins) == writers * rounds


def test_append_each_in_writes_several_aggregates_in_one_statement(fresh_store: Store) -> None:
    store = fresh_store
    store.append("ACC-A", [funded("ACC-A"), trade("ACC-A", 1)])
    cause = uuid.uuid4()
    appends = [
        Append("ACC-A", [trade("ACC-A", 2)], "corr-1", cause, {"processor": "p"}),
        Append("ACC-B", [funded("ACC-B"), trade("ACC-B", 1)], "corr-2"),
        Append("ACC-C", []),
        Append("ACC-A", [trade("ACC-A", 3)], "corr-3", str(cause)),
    ]
    with store.connection() as conn:
        out = store.append_each_in(conn, appends)
        assert store.read_all() == store.read("ACC-A", 1, 2)  # not committed yet
        conn.commit()
    assert [len(e) for e in out] == [1, 2, 0, 1]
    # each aggregate on from its head, in the order given; positions in that order too
    written = [e for envelopes in out for e in envelopes]
    assert [(e.aggregate_id, e.sequence) for e in written] == [
        ("ACC-A", 3), ("ACC-B", 1), ("ACC-B", 2), ("ACC-A", 4)
    ]  # fmt: skip
    positions = [e.position for e in written]
    assert positions == sorted(positions) and len(set(positions)) == 4
    assert [(e.correlation_id, e.causation_id, dict(e.metadata)) for e in out[0] + out[3]] == [
        ("corr-1", cause, {"processor": "p"}),
        ("corr-3", cause, {}),
    ]
    # what is read back is what was returned, and the hash chains hold
    assert store.read("ACC-A", 3) == out[0] + out[3]
    assert store.read("ACC-B") == out[1]
    assert riskbook.verify(store).ok


def test_append_each_in_is_all_or_nothing(fresh_store: Store) -> None:
    store = fresh_store
    store.append("ACC-A", [trade("ACC-A", 1)])
    with store.connection() as conn:
        # refused before anything is sent: the second append's event is another account's
        with pytest.raises(riskbook.InvalidEvent, match="ACC-X"):
            store.append_each_in(
                conn, [Append("ACC-B", [funded("ACC-B")]), Append("ACC-C", [funded("ACC-X")])]
            )
        # refused by the database: the trade id of the second one is taken
        with pytest.raises(riskbook.InvalidEvent, match=r"T-1.*stored already"):
            store.append_each_in(
                conn, [Append("ACC-B", [funded("ACC-B")]), Append("ACC-A", [trade("ACC-A", 1)])]
            )
        conn.commit()
    assert store.count() == 1 and store.version("ACC-B") == 0


def test_append_each_in_goes_after_a_writer_that_got_there_first(fresh_store: Store) -> None:
    """Another writer's uncommitted event takes the sequence the statement wants: it
    waits for that commit, and then appends after it (no expected version)."""
    store = fresh_store
    store.append("ACC-A", [funded("ACC-A")])
    with store.connection() as other:
        store.append_in(other, "ACC-A", [trade("ACC-A", 1)])  # sequence 2, not committed
        got: list[list[riskbook.Envelope]] = []
        errors: list[BaseException] = []

        def each() -> None:
            try:
                with store.connection() as conn:
                    both = [
                        Append("ACC-B", [funded("ACC-B")]),
                        Append("ACC-A", [trade("ACC-A", 2)]),
                    ]
                    got.extend(store.append_each_in(conn, both))
                    conn.commit()
            except BaseException as exc:  # reported below
                errors.append(exc)

        worker = threading.Thread(target=each)
        worker.start()
        time.sleep(0.5)  # it waits on the unique (aggregate_id, sequence) meanwhile
        assert worker.is_alive()
        other.commit()
        worker.join(timeout=30)
    assert not errors, errors
    assert [e.sequence for e in got[1]] == [3]
    assert [e.sequence for e in store.read("ACC-A")] == [1, 2, 3]
    assert store.version("ACC-B") == 1 and riskbook.verify(store).ok


# ----------------------------------------------------------------------- global order


def test_reader_never_skips_an_event_committed_late(fresh_store: Store) -> None:
    """The BIGSERIAL commit-order gap, solved by the visibility fence."""
    store = fresh_store
    store.append("ACC-0", [funded("ACC-0")])
    start = store.head()
    # A slow transaction reserves its position first and stays open...
    with store.connection() as slow:
        slow_env = store.append_in(slow, "ACC-slow", [funded("ACC-slow")])[0]
        # ...while a fast one commits after it.
        fast_env = store.append("ACC-fast", [funded("ACC-fast")])[0]
        assert slow_env.position < fast_env.position  # type: ignore[operator]
        # A naive reader (position > last) would now see the fast event and move past
        # the slow one for ever:
        with store.connection() as naive:
            seen = [
                r[0]
                for r in naive.execute(
                    "SELECT position FROM events WHERE position > %s ORDER BY position", (start,)
                )
            ]
        assert seen == [fast_env.position]
        # riskbook's reader holds back at the fence instead:
        assert store.read_all(after=start) == []
        assert store.head() == start
        slow.commit()
    got = store.read_all(after=start)
    assert [e.event_id for e in got] == [slow_env.event_id, fast_env.event_id]
    assert store.read_all(after=got[-1].position or 0) == []


def test_an_open_transaction_in_another_database_does_not_hold_readers_back(
    fresh_store: Store, make_database: Callable[[], str]
) -> None:
    with psycopg.connect(make_database()) as elsewhere:
        elsewhere.execute("SELECT pg_current_xact_id()")  # a writing transaction, left open
        env = fresh_store.append("ACC-1", [funded("ACC-1")])[0]
        assert [e.event_id for e in fresh_store.read_all()] == [env.event_id]
        # ...while one in this database does (it could still commit events below)
        with fresh_store.connection() as here:
            here.execute("SELECT pg_current_xact_id()")
            later = fresh_store.append("ACC-2", [funded("ACC-2")])[0]
            assert [e.event_id for e in fresh_store.read_all()] == [env.event_id]
        assert [e.event_id for e in fresh_store.read_all()] == [env.event_id, later.event_id]


def _fences_while(store: Store, elsewhere: psycopg.Connection, end: str) -> tuple[int, int]:
    """Both fences, computed in a statement whose snapshot was taken while the
    transaction open on ``elsewhere`` ran, and which looks at pg_stat_activity only
    after ``end`` ("commit" or "rollback") ended it: the race that a load right after
    an append ran into, with another database busy, about once in a thousand loads."""
    timer = threading.Timer(0.3, getattr(elsewhere, end))
    with store.connection() as conn:
        timer.start()
        try:
            row = conn.execute(
                "SELECT pg_sleep(1), riskbook_position_fence(), riskbook_settled_fence()"
            ).fetchone()
        finally:
            timer.join()
    assert row is not None
    return int(row[1]), int(row[2])


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_load_sees_an_append_though_another_database_s_transaction_ended_meanwhile(
    fresh_store: Store, make_database: Callable[[], str], end: str
) -> None:
    """riskbook_position_fence() keeps a transaction it cannot place in another database,
    and one that ended after the snapshot is no longer in pg_stat_activity: the fence
    fell below an event committed before the load began. The fence a load reads with
    (riskbook_settled_fence) lets a transaction that has ended go; its later statements
    see whatever it committed."""
    with psycopg.connect(make_database()) as elsewhere:
        elsewhere.execute("SELECT pg_current_xact_id()")  # its xid comes before the append's
        env = fresh_store.append("ACC-1", [funded("ACC-1")])[0]
        assert env.position is not None
        seen, settled = _fences_while(fresh_store, elsewhere, end)
    assert seen <= env.position  # the race, made certain: the old fence holds it back
    assert settled > env.position
    assert riskbook.load(fresh_store, cache=False).events["event_id"].to_list() == [
        str(env.event_id)
    ]


def test_the_settled_fence_still_holds_for_a_transaction_of_this_database(
    fresh_store: Store, make_database: Callable[[], str]
) -> None:
    """Gap safety: an open transaction here may still commit events below a later one,
    so loads stop below it until it ends -- under any isolation level."""
    store = fresh_store
    first = store.append("ACC-0", [funded("ACC-0")])[0]
    with store.connection() as slow:
        slow_env = store.append_in(slow, "ACC-slow", [funded("ACC-slow")])[0]
        fast_env = store.append("ACC-fast", [funded("ACC-fast")])[0]
        with psycopg.connect(make_database()) as elsewhere:
            elsewhere.execute("SELECT pg_current_xact_id()")
            seen, settled = _fences_while(store, elsewhere, "commit")
        assert seen <= settled <= slow_env.position  # type: ignore[operator]
        with store.connection() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = conn.execute(
                "SELECT riskbook_settled_fence(), riskbook_position_fence()"
            ).fetchone()
            assert row is not None and row[0] == row[1]
        held = riskbook.load(store, cache=False)
        assert held.events["event_id"].to_list() == [str(first.event_id)]
        slow.commit()
    assert held.refresh() == 2
    assert held.events["event_id"].to_list() == [
        str(e.event_id) for e in (first, slow_env, fast_env)
    ]


def test_an_aggregates_versions_keep_their_order_in_the_global_one(fresh_store: Store) -> None:
    """A transaction that took its id (its first write) before another appended to an
    aggregate and committed gave its own next version of that aggregate a position
    below the previous version's: a follower of the global order read version 2 before
    version 1. The append is refused as a serialization failure, to be retried."""
    store = fresh_store
    with store.connection() as slow:
        store.append_in(slow, "B", [funded("B")])  # its id is taken here
        first = store.append("A", [funded("A")])[0]  # a later id, committed
        store.append_in(slow, "D", [funded("D")])  # an aggregate no later one wrote to
        with pytest.raises(TransientStoreError, match="retry"):
            store.append_in(slow, "A", [funded("A", 2.0)])
        slow.rollback()
    with store.connection() as again:  # the retry: a new transaction, a later id
        second = store.append_in(again, "A", [funded("A", 2.0)])[0]
        again.commit()
    assert first.position is not None and second.position is not None
    assert second.position > first.position
    assert [(e.aggregate_id, e.sequence) for e in store.read_all()] == [("A", 1), ("A", 2)]


def test_renumber_leaves_a_store_of_this_server_alone(fresh_store: Store) -> None:
    """`riskbook db renumber` is for a copy from another server (tests/
    test_hunt_pointintime.py restores one on a second cluster); here it does nothing."""
    from riskbook.cli import main

    env = fresh_store.append("ACC-1", [funded("ACC-1")])[0]
    assert fresh_store.renumber() == 0
    assert main(["db", "renumber", "--dsn", fresh_store.dsn]) == 0
    assert fresh_store.read_all() == [env]


def test_follower_sees_every_event_exactly_once_under_concurrent_writers(
    fresh_store: Store,
) -> None:
    store = fresh_store
    writers, per_writer = 4, 60
    done = threading.Event()
    seen: list[int] = []
    ids: list[uuid.UUID] = []

    def follow() -> None:
        after = 0
        while True:
            finished = done.is_set()
            batch = store.read_all(after=after, limit=50)
            for e in batch:
                assert e.position is not None and e.position > after
                after = e.position
                seen.append(e.position)
                ids.append(e.event_id)
            if finished and not batch:
                return

    def write(w: int) -> None:
        for i in range(per_writer):
            acc = f"ACC-{w}-{i % 3}"
            # a mix of tiny and longer transactions, so commits overtake each other
            events = [funded(acc, amount=1 + j) for j in range(1 + (i % 4))]
            store.append(acc, events)

    reader = threading.Thread(target=follow)
    reader.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join(timeout=60)
    stored = store.read_all()
    assert len(ids) == len(set(ids)) == len(stored) == store.count()
    assert seen == sorted(seen)
    assert ids == [e.event_id for e in stored]


def test_follow_wakes_on_notify(fresh_store: Store) -> None:
    store = fresh_store
    store.append("ACC-1", [funded("ACC-1")])
    got: list[list[riskbook.Envelope]] = []
    stamps: list[float] = []
    ready = threading.Event()

    def consume() -> None:
        for batch in store.follow(after=0, idle_timeout=5.0, max_wait=30.0):
            got.append(batch)
            stamps.append(time.monotonic())
            ready.set()
            if sum(len(b) for b in got) >= 3:
                return

    t = threading.Thread(target=consume)
    t.start()
    assert ready.wait(10), "catch-up read on start did not deliver the existing event"
    time.sleep(0.3)  # the follower is now waiting on LISTEN, not polling (max_wait=30 s)
    sent = time.monotonic()
    store.append("ACC-2", [funded("ACC-2"), funded("ACC-2", 5.0)])
    t.join(timeout=10)
    assert not t.is_alive()
    assert [len(b) for b in got] == [1, 2]
    assert stamps[-1] - sent < 2.0, "the follower was not woken by NOTIFY"


# ----------------------------------------------------------------------- immutability


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET aggregate_id = 'X'",
        "UPDATE events SET payload = payload || '{\"quantity\": 1}'",
        "DELETE FROM events",
        "TRUNCATE events",
    ],
)
def test_events_are_append_only_in_the_database(fresh_store: Store, statement: str) -> None:
    fresh_store.append("ACC-1", [funded("ACC-1")])
    with psycopg.connect(fresh_store.dsn) as conn, pytest.raises(psycopg.Error) as info:
        conn.execute(statement)
    assert info.value.sqlstate == "RK001"
    assert "append-only" in str(info.value)
    assert fresh_store.count() == 1


def test_raw_sql_inserts_get_fenced_positions_too(fresh_store: Store) -> None:
    with psycopg.connect(fresh_store.dsn) as conn:
        conn.execute(
            "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
            " correlation_id, payload) VALUES (gen_random_uuid(), 'AccountFunded', 'A', 'Account', 1,"
            ' \'c\', \'{"type":"AccountFunded","account_id":"A","amount":1.0,'
            '"funded_at":"2024-01-01T00:00:00.000000Z"}\')'
        )
        conn.commit()
        with pytest.raises(psycopg.Error) as info:
            conn.execute(
                "INSERT INTO events (position, event_id, event_type, aggregate_id, aggregate_type,"
                " sequence, correlation_id, payload) VALUES (1, gen_random_uuid(), 'X', 'A', 'Account',"
                " 2, 'c', '{\"type\":\"X\"}')"
            )
        assert info.value.sqlstate == "RK002"
    [env] = fresh_store.read_all()
    assert env.sequence == 1 and isinstance(env.payload, riskbook.AccountFunded)


def test_unknown_event_type_in_the_database_is_read_raw(fresh_store: Store) -> None:
    fresh_store.append("ACC-1", [funded("ACC-1")])
    with psycopg.connect(fresh_store.dsn) as conn:
        conn.execute(
            "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
            " correlation_id, payload) VALUES (gen_random_uuid(), 'MarginCalled', 'ACC-1', 'Account',"
            ' 2, \'c\', \'{"type":"MarginCalled","amount":"lots","nested":{"a":[1]}}\')'
        )
        conn.commit()
    fresh_store.append("ACC-1", [funded("ACC-1", 2.0)])
    envs = fresh_store.read("ACC-1")
    assert [e.event_type for e in envs] == ["AccountFunded", "MarginCalled", "AccountFunded"]
    raw = envs[1].payload
    assert isinstance(raw, riskbook.RawEvent)
    assert raw.data == {"amount": "lots", "nested": {"a": [1]}}
    assert [e.event_type for e in fresh_store.read_all()] == [e.event_type for e in envs]
    line = encode_envelope(envs[1])  # and it can be exported again as it was
    assert msgspec.json.decode(line)["payload"]["nested"] == {"a": [1]}


def test_import_lines_takes_text_lines_too(fresh_store: Store) -> None:
    lines = [line.decode() for line in _envelope_lines(n_accounts=1, per_account=3)]
    lines[0] = "\ufeff" + lines[0]  # a byte order mark read as text
    assert fresh_store.import_lines(lines).added == 3
    assert fresh_store.import_lines(lines[1:]).skipped == 2


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_a_utf16_file_is_refused_saying_so(fresh_store: Store, tmp_path: Path, gz: bool) -> None:
    # it said "invalid character (byte 0)"
    text = b"\n".join(_envelope_lines(n_accounts=1, per_account=2)).decode()
    data = text.encode("utf-16")  # with its byte order mark, as Windows tools write it
    path = tmp_path / ("u16.jsonl.gz" if gz else "u16.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(path)
    assert str(info.value).startswith(f"{path}: line 1: the file is UTF-16 (or UTF-32)")
    assert fresh_store.count() == 0


def test_an_exported_envelope_imports_again_as_already_present(fresh_store: Store) -> None:
    # a whole-second time and metadata holding time-like strings: exported as stored
    meta = {"timestamp": "2024-03-01T09:30:00Z", "nested": {"executed_at": "2024-01-01T00:00:00Z"}}
    fresh_store.append("ACC-1", [funded("ACC-1")], metadata=meta)
    (env,) = fresh_store.read("ACC-1")
    result = fresh_store.import_lines([encode_envelope(env)])
    assert (result.added, result.skipped) == (0, 1)
    assert fresh_store.read("ACC-1")[0].metadata == meta


# ----------------------------------------------------------------------- import


def _envelope_lines(
    n_accounts: int = 3, per_account: int = 5, with_seq: bool = False
) -> list[bytes]:
    lines = []
    for i in range(per_account):
        for a in range(n_accounts):
            acc = f"ACC-{a}"
            e = riskbook.Envelope(
                event_id=uuid.uuid5(uuid.NAMESPACE_OID, f"{acc}/{i}"),
                aggregate_id=acc,
                aggregate_type="Account",
                sequence=i + 1 if with_seq else 0,
                timestamp=T0 + timedelta(seconds=10 * i + a),
                payload=funded(acc, amount=100.0 + i, minutes=i),
                correlation_id=f"import-{a}",
            )
            d = e.to_dict()
            if not with_seq:
                del d["sequence"]
            lines.append(msgspec.json.encode(d))
    return lines


def _write(path: Path, lines: list[bytes]) -> Path:
    data = b"\n".join(lines) + b"\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["history.jsonl", "history.jsonl.gz"])
def test_import_keeps_ids_and_times_assigns_sequences_and_is_idempotent(
    fresh_store: Store, tmp_path: Path, name: str
) -> None:
    lines = _envelope_lines()
    path = _write(tmp_path / name, lines)
    result = fresh_store.import_jsonl(path)
    assert (result.read, result.added, result.skipped) == (15, 15, 0)
    for a in range(3):
        envs = fresh_store.read(f"ACC-{a}")
        assert [e.sequence for e in envs] == [1, 2, 3, 4, 5]
        assert [e.payload.amount for e in envs] == [100.0, 101.0, 102.0, 103.0, 104.0]  # type: ignore[union-attr]
        assert envs[0].event_id == uuid.uuid5(uuid.NAMESPACE_OID, f"ACC-{a}/0")
        assert envs[2].timestamp == T0 + timedelta(seconds=20 + a)
    # global order is file order
    assert [e.event_id for e in fresh_store.read_all()] == [
        uuid.UUID(msgspec.json.decode(line)["event_id"]) for line in lines
    ]
    again = fresh_store.import_jsonl(path)
    assert (again.added, again.skipped) == (0, 15)
    assert fresh_store.count() == 15


def test_import_continues_existing_aggregates(fresh_store: Store, tmp_path: Path) -> None:
    fresh_store.append("ACC-1", [funded("ACC-1"), funded("ACC-1")])
    fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", _envelope_lines()))
    assert [e.sequence for e in fresh_store.read("ACC-1")] == list(range(1, 8))


def test_import_with_explicit_sequences(fresh_store: Store, tmp_path: Path) -> None:
    fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", _envelope_lines(with_seq=True)))
    assert [e.sequence for e in fresh_store.read("ACC-2")] == [1, 2, 3, 4, 5]
    gappy = [
        line
        for line in _envelope_lines(n_accounts=1, per_account=4, with_seq=True)
        if msgspec.json.decode(line)["sequence"] != 2
    ]
    # ACC-9 with versions 1, 3, 4: refused, nothing written
    new_lines = [
        msgspec.json.encode(
            {**msgspec.json.decode(line.replace(b"ACC-0", b"ACC-9")), "event_id": str(uuid.uuid4())}
        )
        for line in gappy
    ]
    other = tmp_path / "gap.jsonl"
    with pytest.raises(riskbook.ImportFailed, match="gaps"):
        fresh_store.import_jsonl(_write(other, new_lines))
    assert fresh_store.version("ACC-9") == 0


def _bad_line_cases() -> list[tuple[str, Callable[[list[bytes]], list[bytes]], str]]:
    def replace(i: int, line: bytes) -> Callable[[list[bytes]], list[bytes]]:
        return lambda ls: [*ls[:i], line, *ls[i + 1 :]]

    def tweak(i: int, **changes: object) -> Callable[[list[bytes]], list[bytes]]:
        def f(ls: list[bytes]) -> list[bytes]:
            d = msgspec.json.decode(ls[i])
            for k, v in changes.items():
                if k.startswith("payload."):
                    d["payload"][k.split(".", 1)[1]] = v
                else:
                    d[k] = v
            return [*ls[:i], msgspec.json.encode(d), *ls[i + 1 :]]

        return f

    return [
        ("broken json", replace(7, b'{"event_id": '), "line 8"),
        ("not an object", replace(3, b"[1, 2, 3]"), "line 4"),
        (
            "negative amount",
            tweak(9, **{"payload.amount": 0}),
            "line 10: AccountFunded.payload.amount",
        ),
        (
            "wrong type",
            tweak(11, **{"payload.amount": "many"}),
            "line 12: AccountFunded.payload.amount",
        ),
        ("no zone", tweak(5, timestamp="2024-03-01T09:30:00"), "line 6: AccountFunded.timestamp"),
        ("unknown type", tweak(2, **{"payload.type": "Gift"}), "line 3: Gift.payload.type"),
        (
            "mismatched aggregate",
            tweak(13, aggregate_id="ACC-x"),
            "line 14: AccountFunded.payload.account_id",
        ),
    ]


@pytest.mark.parametrize(
    ("case", "mutate", "message"), _bad_line_cases(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_a_bad_line_fails_the_import_and_writes_nothing(
    fresh_store: Store,
    tmp_path: Path,
    case: str,
    mutate: Callable[[list[bytes]], list[bytes]],
    message: str,
) -> None:
    path = _write(tmp_path / "bad.jsonl", mutate(_envelope_lines()))
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(path)
    assert message in str(info.value), str(info.value)
    assert fresh_store.count() == 0


def test_duplicate_event_ids_with_different_content_are_refused(
    fresh_store: Store, tmp_path: Path
) -> None:
    lines = _envelope_lines()
    twin = msgspec.json.decode(lines[4])
    twin["payload"]["amount"] = 999.0
    path = _write(tmp_path / "dup.jsonl", [*lines, msgspec.json.encode(twin)])
    with pytest.raises(
        riskbook.ImportFailed, match=r"line 16: event_id .* line 5 with different content"
    ):
        fresh_store.import_jsonl(path)
    assert fresh_store.count() == 0
    # an exact repeat inside one file is harmless
    fresh_store.import_jsonl(_write(tmp_path / "rep.jsonl", [*lines, lines[4]]))
    assert fresh_store.count() == 15
    # and a stored id arriving again with other content is refused
    path2 = _write(tmp_path / "dup2.jsonl", [msgspec.json.encode(twin)])
    with pytest.raises(riskbook.ImportFailed, match="already stored with different content"):
        fresh_store.import_jsonl(path2)
    assert fresh_store.count() == 15


def test_import_of_a_missing_file_is_a_clear_error(fresh_store: Store, tmp_path: Path) -> None:
    with pytest.raises(riskbook.ImportFailed, match="no such file"):
        fresh_store.import_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(riskbook.ImportFailed, match="is a directory, not a file"):
        fresh_store.import_jsonl(tmp_path)


def test_import_reads_a_pipe_even_where_it_must_read_twice(
    fresh_store: Store, tmp_path: Path
) -> None:
    """`zcat f | riskbook import /dev/stdin` said "no such file". A line repeated into an
    empty store makes the import start again on the general road: a pipe is read once."""
    lines = _envelope_lines()
    data = gzip.compress(b"\n".join([*lines, lines[0]]) + b"\n")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    spools = set(Path(tempfile.gettempdir()).glob("riskbook-import-*"))
    writer = threading.Thread(target=fifo.write_bytes, args=(data,))
    writer.start()
    result = fresh_store.import_jsonl(fifo)
    writer.join()
    assert (result.read, result.added, result.repeated) == (16, 15, 1)
    assert set(Path(tempfile.gettempdir()).glob("riskbook-import-*")) == spools  # gone


def _tweaked(line: bytes, **changes: object) -> bytes:
    d = msgspec.json.decode(line)
    d.update(changes)
    return msgspec.json.encode(d)


# Every field of an envelope that the store keeps besides the payload, changed.
ENVELOPE_CHANGES: list[tuple[dict[str, object], str]] = [
    ({"timestamp": "2030-01-01T00:00:00.000000Z"}, "timestamp differs"),
    ({"correlation_id": "forged"}, "correlation_id differs"),
    ({"metadata": {"source": "forged"}}, "metadata differs"),
    ({"causation_id": "00000000-0000-0000-0000-000000000001"}, "causation_id differs"),
    ({"sequence": 4}, "sequence differs"),
    (
        {"timestamp": "2030-01-01T00:00:00.000000Z", "correlation_id": "forged"},
        "timestamp, correlation_id differ",
    ),
]


@pytest.mark.parametrize(("changes", "told"), ENVELOPE_CHANGES, ids=lambda x: str(x))
def test_a_stored_event_id_with_other_envelope_fields_is_refused(
    fresh_store: Store, tmp_path: Path, changes: dict[str, object], told: str
) -> None:
    # once only the payload, types and aggregate were compared: a forged recorded
    # time, correlation, causation, metadata or sequence was "already present"
    lines = _envelope_lines(with_seq=True)
    fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", lines))
    forged = [lines[1], _tweaked(lines[0], **changes)]
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(_write(tmp_path / "forged.jsonl", forged))
    event_id = msgspec.json.decode(lines[0])["event_id"]
    assert f"line 2: event_id {event_id} is already stored with different content ({told})" in (
        str(info.value)
    ), str(info.value)
    assert fresh_store.count() == 15 and riskbook.verify(fresh_store).ok


@pytest.mark.parametrize(("changes", "told"), ENVELOPE_CHANGES, ids=lambda x: str(x))
def test_an_event_id_repeated_in_a_file_with_other_envelope_fields_is_refused(
    fresh_store: Store, tmp_path: Path, changes: dict[str, object], told: str
) -> None:
    lines = _envelope_lines(with_seq=True)
    # the id's first line, an exact repeat of it (harmless), then the one that differs
    twins = [*lines, lines[4], _tweaked(lines[4], **changes)]
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(_write(tmp_path / "twins.jsonl", twins))
    assert f"line 17: event_id {msgspec.json.decode(lines[4])['event_id']} appears on line 5" in (
        str(info.value)
    ), str(info.value)
    assert f"with different content ({told})" in str(info.value)
    assert fresh_store.count() == 0
    # into a store that holds them already: the same
    fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", lines))
    with pytest.raises(riskbook.ImportFailed, match=r"line 17: .* appears on line 5"):
        fresh_store.import_jsonl(tmp_path / "twins.jsonl")
    assert fresh_store.count() == 15


def test_exact_repeats_in_a_file_are_not_counted_as_already_present(
    fresh_store: Store, tmp_path: Path
) -> None:
    lines = _envelope_lines()
    path = _write(tmp_path / "rep.jsonl", [*lines, lines[4], lines[4]])
    first = fresh_store.import_jsonl(path)
    assert (first.read, first.added, first.skipped, first.repeated) == (17, 15, 2, 2)
    assert "added 15, already present 0, repeated in the input 2 in" in str(first)
    again = fresh_store.import_jsonl(path)
    assert (again.read, again.added, again.skipped, again.repeated) == (17, 0, 17, 2)
    assert "added 0, already present 15, repeated in the input 2 in" in str(again)
    plain = fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", lines))
    assert (plain.skipped, plain.repeated) == (15, 0)
    assert "added 0, already present 15 in" in str(plain)


def _new_ids(lines: list[bytes], tag: str) -> list[bytes]:
    return [
        _tweaked(line, event_id=str(uuid.uuid5(uuid.NAMESPACE_OID, f"{tag}/{n}")))
        for n, line in enumerate(lines)
    ]


def test_a_given_sequence_already_stored_is_refused_naming_the_line(
    fresh_store: Store, tmp_path: Path
) -> None:
    # the friendly message was dead code: the database's own came out, with no line
    lines = _envelope_lines(with_seq=True)
    fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", lines))
    taken = _new_ids([lines[0], lines[13]], "taken")  # ACC-0 at 1, ACC-1 at 5
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(_write(tmp_path / "taken.jsonl", taken))
    stored = fresh_store.read("ACC-1")[4].event_id
    assert "taken.jsonl: line 1: aggregate 'ACC-0' already has sequence 1 (stored event " in str(
        info.value
    ), str(info.value)
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(_write(tmp_path / "taken2.jsonl", taken[1:]))
    assert f"line 1: aggregate 'ACC-1' already has sequence 5 (stored event {stored})" in str(
        info.value
    )
    assert "duplicate key" not in str(info.value)
    assert fresh_store.count() == 15


@pytest.mark.parametrize("stored", [False, True], ids=["into an empty store", "into a store"])
def test_one_sequence_given_twice_in_a_file_is_refused_naming_both_lines(
    fresh_store: Store, tmp_path: Path, stored: bool
) -> None:
    if stored:
        fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", _envelope_lines(with_seq=True)))
    before = fresh_store.count()
    lines = _new_ids(_envelope_lines(n_accounts=1, per_account=3, with_seq=True), "twice")
    lines = [_tweaked(line, aggregate_id="ACC-7") for line in lines]
    lines = [line.replace(b'"account_id":"ACC-0"', b'"account_id":"ACC-7"') for line in lines]
    lines[2] = _tweaked(lines[2], sequence=2)
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(_write(tmp_path / "twice.jsonl", lines))
    assert "line 3: aggregate 'ACC-7' sequence 2 is given on line 2 too, to another event" in str(
        info.value
    ), str(info.value)
    assert fresh_store.count() == before


@pytest.mark.parametrize("stored", [False, True], ids=["into an empty store", "into a store"])
def test_given_sequences_going_back_in_file_order_are_refused(
    fresh_store: Store, tmp_path: Path, stored: bool
) -> None:
    # they were taken: the aggregate's version 2 then had a lower position than its 1
    if stored:
        fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", _envelope_lines(with_seq=True)))
    before = fresh_store.count()
    base = 5 if stored else 0
    lines = _new_ids(_envelope_lines(n_accounts=1, per_account=3, with_seq=True), "back")
    lines = [
        _tweaked(line, sequence=base + msgspec.json.decode(line)["sequence"]) for line in lines
    ]
    lines[0], lines[1] = lines[1], lines[0]  # versions base + 2, base + 1, base + 3
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(_write(tmp_path / "back.jsonl", [*lines, lines[0]]))
    assert str(info.value) == (
        f"{tmp_path / 'back.jsonl'}: line 2: aggregate 'ACC-0' gets sequence {base + 1} after "
        f"sequence {base + 2} (line 1): an aggregate's given sequences must rise in line "
        "order, which its positions follow; nothing was written"
    )
    assert fresh_store.count() == before
    fresh_store.import_jsonl(
        _write(tmp_path / "ok.jsonl", [lines[1], lines[0], lines[2], lines[0]])
    )
    assert [e.sequence for e in fresh_store.read("ACC-0")][-3:] == [base + 1, base + 2, base + 3]
    positions = [e.position for e in fresh_store.read("ACC-0")]
    assert positions == sorted(positions)


@pytest.mark.parametrize("stored", [False, True], ids=["into an empty store", "into a store"])
def test_a_gap_in_given_sequences_is_refused_naming_the_line_that_opens_it(
    fresh_store: Store, tmp_path: Path, stored: bool
) -> None:
    # it named the aggregate only (highest, count), and no line
    if stored:
        fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", _envelope_lines(with_seq=True)))
    before = fresh_store.count()
    base = 5 if stored else 0  # ACC-1's stored versions
    lines = _new_ids(_envelope_lines(n_accounts=3, per_account=4, with_seq=True), "gap")
    lines = [
        _tweaked(line, sequence=base + msgspec.json.decode(line)["sequence"]) for line in lines
    ]
    # ACC-1 (lines 2, 5, 8, 11) gets base + 1, 2, 4, 5; ACC-2 (line 12) a gap later
    lines[7] = _tweaked(lines[7], sequence=base + 4)
    lines[10] = _tweaked(lines[10], sequence=base + 5)
    lines[11] = _tweaked(lines[11], sequence=base + 9)
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(_write(tmp_path / "gap.jsonl", lines))
    assert str(info.value) == (
        f"{tmp_path / 'gap.jsonl'}: line 8: aggregate 'ACC-1' gets sequence {base + 4} where "
        f"{base + 3} comes next: sequences must continue the stored ones as 1, 2, 3, ... "
        "(no gaps)"
    ), str(info.value)
    assert fresh_store.count() == before
    envelopes = [
        _trade_envelope(sequence=1),
        _trade_envelope(sequence=3, payload=trade("E-1", 2)),
    ]
    with pytest.raises(
        riskbook.ImportFailed,
        match=r"^envelopes: envelope 2: aggregate 'E-1' gets sequence 3 where 2 comes next",
    ):
        fresh_store.import_envelopes(envelopes)
    # and the envelopes of a batch are numbered as envelopes when they mix sequences too
    envelopes[1] = _trade_envelope(sequence=0, payload=trade("E-1", 2))
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_envelopes(envelopes)
    assert str(info.value) == (
        "envelopes: envelope 2: aggregate 'E-1' mixes envelopes with and without a sequence; "
        "give all or none"
    )
    assert fresh_store.count() == before


@pytest.mark.parametrize("stored", [False, True], ids=["into an empty store", "into a store"])
def test_an_import_cuts_times_finer_than_a_microsecond_instead_of_rounding_them(
    fresh_store: Store, tmp_path: Path, stored: bool
) -> None:
    # a fill at 23:59:59.9999999 (.NET writes seven digits) was stored on the next day
    if stored:
        fresh_store.append("ACC-9", [funded("ACC-9")])
    finer = "2024-03-01T23:59:59.9999999Z"
    line = _tweaked(_envelope_lines(n_accounts=1, per_account=1)[0], timestamp=finer)
    d = msgspec.json.decode(line)
    d["payload"]["funded_at"] = "2024-03-02T00:59:59.99999951+01:00"
    lines = [line.replace(b"2024-03-01T", b"2024-02-01T"), msgspec.json.encode(d)]
    lines[0] = _tweaked(lines[0], event_id=str(uuid.uuid4()))
    assert fresh_store.import_jsonl(_write(tmp_path / "finer.jsonl", lines)).added == 2
    env = fresh_store.read("ACC-0")[-1]
    last = datetime(2024, 3, 1, 23, 59, 59, 999999, tzinfo=UTC)
    assert (env.timestamp, env.business_time) == (last, last)
    assert riskbook.verify(fresh_store).ok
    assert fresh_store.import_jsonl(tmp_path / "finer.jsonl").skipped == 2  # the same, again


def test_an_import_refuses_keys_that_are_not_fields_naming_line_and_field(
    fresh_store: Store, tmp_path: Path
) -> None:
    # they were dropped: "venue" lost, a misspelt "Symbol" an account-wide limit,
    # "causationId" no causation
    lines = _envelope_lines(n_accounts=1, per_account=3)
    d = msgspec.json.decode(lines[1])
    d["payload"]["venue"] = "XNAS"
    cases = [
        (msgspec.json.encode(d), "line 2: AccountFunded.payload.venue: is not a field of "
         "AccountFunded (its fields: account_id, amount, funded_at)"),
        (_tweaked(lines[1], causationId=str(uuid.uuid4())), "line 2: AccountFunded.causationId: "
         "is not a field of the envelope (its fields: event_id, event_type, aggregate_id, "),
    ]  # fmt: skip
    for bad, told in cases:
        with pytest.raises(riskbook.ImportFailed) as info:
            fresh_store.import_jsonl(_write(tmp_path / "keys.jsonl", [lines[0], bad, lines[2]]))
        assert told in str(info.value), str(info.value)
    assert fresh_store.count() == 0
    # an envelope's position is one of its fields (an export may keep it): the store's
    # own is assigned
    exported = [_tweaked(line, position=7 + n) for n, line in enumerate(lines)]
    assert fresh_store.import_jsonl(_write(tmp_path / "exported.jsonl", exported)).added == 3
    assert [e.position for e in fresh_store.read_all()] != [7, 8, 9]


@pytest.mark.parametrize("dsn", [5, b"postgresql://", Path("x")], ids=lambda d: type(d).__name__)
def test_a_dsn_that_is_not_a_string_is_a_type_error(dsn: object) -> None:
    # it failed with AttributeError: 'int' object has no attribute 'startswith'
    for open_store in (Store, riskbook.connect):
        with pytest.raises(
            TypeError, match=f"dsn must be a DSN string or None, got {type(dsn).__name__}"
        ):
            open_store(dsn)  # type: ignore[arg-type]
    history = riskbook.History.from_events(funded("A"))
    for use in (riskbook.load, riskbook.verify):
        with pytest.raises(TypeError, match="dsn must be a DSN string or None, got History"):
            use(history)  # type: ignore[arg-type]


@pytest.mark.parametrize("sequence", [2**63, 2**64, -1])
def test_a_sequence_out_of_the_stores_range_is_refused_before_writing(
    fresh_store: Store, tmp_path: Path, sequence: int
) -> None:
    lines = _envelope_lines(with_seq=True)
    lines[3] = _tweaked(lines[3], sequence=sequence)
    with pytest.raises(riskbook.ImportFailed, match=r"line 4: AccountFunded\.sequence: ") as info:
        fresh_store.import_jsonl(_write(tmp_path / "big.jsonl", lines))
    assert "out of range for type bigint" not in str(info.value)
    assert fresh_store.count() == 0


def test_a_byte_order_mark_at_the_start_of_a_file_is_taken_off(
    fresh_store: Store, tmp_path: Path
) -> None:
    # Windows tools write one; it gave "line 1: AccountFunded.?: jSON is malformed"
    lines = _envelope_lines()
    data = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n"
    (tmp_path / "bom.jsonl").write_bytes(data)
    (tmp_path / "bom.jsonl.gz").write_bytes(gzip.compress(data))
    assert fresh_store.import_jsonl(tmp_path / "bom.jsonl").added == 15
    assert fresh_store.import_jsonl(tmp_path / "bom.jsonl.gz").skipped == 15
    assert fresh_store.import_lines([b"\xef\xbb\xbf" + lines[0]]).skipped == 1
    # anywhere else, it is told for what it is
    inside = [*lines[:2], b"\xef\xbb\xbf" + lines[2]]
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_lines(inside, source="f.jsonl")
    assert str(info.value) == ("f.jsonl: line 3: ?.line: starts with a byte order mark (U+FEFF)"), (
        str(info.value)
    )
    assert fresh_store.count() == 15


def test_a_json_extension_python_reads_is_refused_as_json_not_jumbled(
    fresh_store: Store,
) -> None:
    nan = _envelope_lines()[0].replace(b'"amount":100.0', b'"amount":NaN')
    assert b"NaN" in nan
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_lines([nan], source="f.jsonl")
    assert str(info.value).startswith("f.jsonl: line 1: ?.line: not valid JSON (JSON is malformed")
    assert "jSON" not in str(info.value)


def _trade_envelope(**changes: object) -> riskbook.Envelope:
    fields: dict[str, object] = dict(
        event_id=uuid.uuid4(),
        aggregate_id="E-1",
        aggregate_type="Account",
        sequence=0,
        timestamp=T0,
        payload=trade("E-1"),
        correlation_id="c",
    )
    return riskbook.Envelope(**{**fields, **changes})  # type: ignore[arg-type]


BAD_ENVELOPES: list[tuple[dict[str, object], str]] = [
    ({"aggregate_type": "Instrument"}, "TradeExecuted.aggregate_type: TradeExecuted belongs to"),
    ({"aggregate_type": ""}, "TradeExecuted.aggregate_type"),
    ({"aggregate_type": None}, "TradeExecuted.aggregate_type: must be a str"),
    ({"aggregate_id": None}, "TradeExecuted.aggregate_id: must be a str"),
    ({"event_id": "not-a-uuid"}, "TradeExecuted.event_id: must be a uuid.UUID"),
    (
        {"event_id": "8c1f6a52-3f4e-4f1e-9d56-2a0f5b7d9e10"},
        "TradeExecuted.event_id: must be a uuid.UUID",
    ),
    ({"causation_id": "nope"}, "TradeExecuted.causation_id: must be a uuid.UUID"),
    ({"sequence": "1"}, "TradeExecuted.sequence: must be an int, got str"),
    ({"sequence": True}, "TradeExecuted.sequence: must be an int, got bool"),
    ({"sequence": -3}, "TradeExecuted.sequence: must be 1 to"),
    ({"sequence": 2**63}, "TradeExecuted.sequence: must be 1 to"),
    ({"timestamp": "2024-01-01T00:00:00Z"}, "TradeExecuted.timestamp: must be a datetime"),
    ({"timestamp": datetime(2024, 1, 1)}, "TradeExecuted.timestamp: has no time zone"),
    (
        {"timestamp": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))},
        "TradeExecuted.timestamp: 0001-01-01T00:00:00+01:00 is out of range",
    ),
    ({"metadata": None}, "TradeExecuted.metadata: must be an object"),
    ({"correlation_id": 5}, "TradeExecuted.correlation_id: must be a string"),
    ({"payload": riskbook.RawEvent("Foo", {"account_id": "E-1"})}, "Foo.type: not a riskbook"),
]


@pytest.mark.parametrize(("changes", "told"), BAD_ENVELOPES, ids=lambda x: str(x)[:40])
def test_import_envelopes_refuses_a_mistyped_envelope_naming_it_and_the_field(
    fresh_store: Store, changes: dict[str, object], told: str
) -> None:
    # they reached the database (a raw check-constraint or uuid error), crashed
    # (TypeError, AttributeError), or a negative sequence was taken as "assign one"
    good = _trade_envelope()
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_envelopes([good, _trade_envelope(**changes)])
    assert str(info.value).startswith(f"envelope 2: {told}"), str(info.value)
    assert fresh_store.count() == 0
    with pytest.raises(riskbook.ImportFailed, match="envelope 1: "):
        fresh_store.import_envelopes([{"event_id": 1}])  # type: ignore[list-item]


def test_import_envelopes_tells_a_taken_sequence_by_envelope(fresh_store: Store) -> None:
    # e.g. `riskbook simulate` into a store that holds the same aggregates already
    fresh_store.append("E-1", [trade("E-1"), trade("E-1", 2)])
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_envelopes([_trade_envelope(sequence=1)])
    assert str(info.value).startswith(
        "envelopes: envelope 1: aggregate 'E-1' already has sequence 1 (stored event "
    ), str(info.value)
    assert fresh_store.count() == 2


def test_gzip_is_told_by_its_bytes_not_its_name(fresh_store: Store, tmp_path: Path) -> None:
    lines = _envelope_lines()
    data = b"\n".join(lines) + b"\n"
    unnamed = tmp_path / "history.jsonl"  # gzip without .gz
    unnamed.write_bytes(gzip.compress(data))
    assert fresh_store.import_jsonl(unnamed).added == 15
    misnamed = tmp_path / "history.jsonl.gz"  # plain text with .gz
    misnamed.write_bytes(data)
    assert (fresh_store.import_jsonl(misnamed).skipped, fresh_store.count()) == (15, 15)


@pytest.mark.parametrize("damage", ["deflate", "truncated", "crc"])
def test_a_damaged_gzip_file_fails_the_import_clearly_and_writes_nothing(
    fresh_store: Store, tmp_path: Path, damage: str
) -> None:
    data = bytearray(gzip.compress(b"\n".join(_envelope_lines(per_account=40)) + b"\n"))
    if damage == "deflate":  # the compressed stream itself: zlib's own error
        data[12:20] = bytes(b ^ 0x5A for b in data[12:20])
        message = "damaged gzip data"
    elif damage == "truncated":
        data = data[: len(data) // 2]
        message = "cannot read: Compressed file ended"
    else:  # the content checksum in the trailer
        data[-8] ^= 0xFF
        message = "cannot read: CRC check failed"
    path = tmp_path / "damaged.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(riskbook.ImportFailed, match=message) as info:
        fresh_store.import_jsonl(path)
    assert str(path) in str(info.value) and "nothing was written" in str(info.value)
    assert fresh_store.count() == 0


# ----------------------------------------------------------------------- migrations


def test_migrations_create_and_upgrade_in_place(make_database: Callable[[], str]) -> None:
    dsn = make_database()
    assert migrations.head() >= 2
    old = Store(dsn, migrate=False)
    assert old.migrate(target=1) == [1]
    assert old.schema_version() == 1
    with psycopg.connect(dsn) as conn:  # data written under schema version 1
        conn.execute(
            "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
            " correlation_id, payload) VALUES (gen_random_uuid(), 'AccountFunded', 'ACC-1',"
            ' \'Account\', 1, \'c\', \'{"type":"AccountFunded","account_id":"ACC-1",'
            '"amount":5.0,"funded_at":"2024-01-01T00:00:00.000000Z"}\')'
        )
        conn.commit()
    old.close()
    store = Store(dsn)  # migrates on connect
    assert store.schema_version() == migrations.head()
    [env] = store.read("ACC-1")
    assert env.payload == riskbook.AccountFunded(
        account_id="ACC-1", amount=5.0, funded_at=datetime(2024, 1, 1, tzinfo=UTC)
    )
    with psycopg.connect(dsn) as conn:
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert {"events", "position_snapshots", "processor_checkpoints", "event_fields"} <= tables
    # the typed copy of events stored before the upgrade was filled in place
    assert _fields(store)[0][1:4] == ("AccountFunded", datetime(2024, 1, 1, tzinfo=UTC), "ACC-1")
    assert store.migrate() == []
    store.close()


def test_concurrent_first_connections_migrate_once(make_database: Callable[[], str]) -> None:
    dsn = make_database()
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            Store(dsn).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(dsn) as conn:
        versions = [
            r[0] for r in conn.execute("SELECT version FROM riskbook_migrations ORDER BY 1")
        ]
    assert versions == list(range(1, migrations.head() + 1))


def test_unreachable_database_is_a_clear_error_without_the_password(tmp_path: Path) -> None:
    dsn = f"postgresql://someone:s3cret-pw@/nodb?host={tmp_path}&connect_timeout=2"
    with pytest.raises(riskbook.StoreError) as info:
        Store(dsn)
    assert "s3cret-pw" not in str(info.value)
    assert "***" in str(info.value) or "someone" in str(info.value)


# ----------------------------------------------------------------------- typed fields


def _fields(store: Store) -> list[tuple[object, ...]]:
    with store.connection() as conn:
        return conn.execute(
            "SELECT f.position, f.event_type, f.occurred_at, f.account_id, f.symbol, f.side,"
            " f.quantity, f.price, f.amount, f.actor FROM event_fields f ORDER BY position"
        ).fetchall()


def test_every_road_in_fills_the_typed_fields(fresh_store: Store, tmp_path: Path) -> None:
    path = _write(tmp_path / "h.jsonl", _envelope_lines())
    fresh_store.import_jsonl(path)  # into an empty store: the bulk road
    fresh_store.append("ACC-7", [trade("ACC-7", 3, "Sell")])  # an append
    more = [
        msgspec.json.encode({**msgspec.json.decode(line), "event_id": str(uuid.uuid4())})
        for line in _envelope_lines(n_accounts=1, per_account=2)
    ]
    fresh_store.import_jsonl(_write(tmp_path / "more.jsonl", more))  # the general road
    envs = fresh_store.read_all()
    rows = _fields(fresh_store)
    assert [r[0] for r in rows] == [e.position for e in envs]
    for env, row in zip(envs, rows, strict=True):
        p = env.payload
        assert row[1] == env.event_type and row[2] == p.business_time  # type: ignore[union-attr]
        assert row[3] == p.account_id  # type: ignore[union-attr]
        if isinstance(p, riskbook.TradeExecuted):
            assert row[4:8] == (p.symbol, p.side.value, p.quantity, p.price)
        if isinstance(p, riskbook.AccountFunded):
            assert row[8] == p.amount
    with psycopg.connect(fresh_store.dsn) as conn, pytest.raises(psycopg.Error) as info:
        conn.execute("UPDATE event_fields SET quantity = 0")
    assert info.value.sqlstate == "RK001"


def test_appends_and_reads_look_events_up_by_index_whatever_the_statistics(
    fresh_store: Store,
) -> None:
    # Found by a profile of appends (fixed by migration 0022): the insert trigger's
    # checks (no event ahead of this server's transactions; versions in order) and the
    # readers' check for a copied store were planned as scans of the whole events table
    # while its statistics were those of a store just grown from empty (until
    # autovacuum analyzes it): a 50-event append into 10,000 events took 12.7 ms, 7 ms
    # of it in one check. The plans, read with auto_explain, must look events up by
    # index, which costs the same at any size.
    from riskbook.store.eventstore import _FENCE_SQL

    s = fresh_store
    for i in range(40):
        s.append(f"A{i % 4}", [trade(f"A{i % 4}", i * 100 + n) for n in range(50)])
    plans: list[str] = []
    with psycopg.connect(s.dsn) as conn:
        conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        try:
            conn.execute("LOAD 'auto_explain'")
        except psycopg.Error as exc:  # a server of the user's without the module
            pytest.skip(f"the server cannot load auto_explain: {exc}")
        for name, value in [("log_min_duration", "0"), ("log_nested_statements", "on"),
                            ("log_level", "notice"), ("log_analyze", "off")]:  # fmt: skip
            conn.execute(f"SET auto_explain.{name} = '{value}'")
        conn.execute("SELECT pg_current_xact_id()")  # its id, then a later one's events:
        s.append("B", [funded("B")])  # the order check looks up each predecessor
        s.append_in(conn, "A1", [trade("A1", 9_000 + n) for n in range(50)])
        conn.execute(_FENCE_SQL).fetchone()
        conn.rollback()
    looked = [p for p in plans if re.search(r"\b(FROM|JOIN) events\b", p, re.IGNORECASE)]
    assert any("pg_snapshot_xmax" in p for p in looked), plans  # the copy checks ran
    assert any("first_sequence" in p for p in looked), plans  # and the order check
    scans = [p for p in looked if "Seq Scan on events" in p]
    assert not scans, "\n\n".join(scans)
