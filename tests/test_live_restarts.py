"""The live processor around its starts, stops and retries (real PostgreSQL): the check
before it is ready, a deadlock in its commit, a second processor of its name, and a
replay of a history that holds the engine's effects already."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import riskbook
from riskbook import (
    AccountFunded,
    Envelope,
    LimitSet,
    Side,
    Store,
    TradeCancelled,
    TradeExecuted,
)
from riskbook.cli import main
from riskbook.errors import RiskbookError
from riskbook.live import Engine, Processor, check

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2024, 3, 1, 14, 0, tzinfo=UTC)
EFFECT_TYPES = ("LimitViolationDetected", "AccountBlocked")


def trade(account: str, side: str, qty: float, minute: float) -> TradeExecuted:
    return TradeExecuted(trade_id=f"T-{uuid.uuid4().hex[:12]}", account_id=account,
                         symbol="ACME", side=Side(side), quantity=qty, price=10.0,
                         executed_at=T0 + timedelta(minutes=minute))  # fmt: skip


def limit(account: str, value: float) -> LimitSet:
    return LimitSet(account_id=account, limit_type="MaxPositionSize", value=value,
                    set_by="cro", set_at=T0)  # fmt: skip


def fund(account: str) -> AccountFunded:
    return AccountFunded(account_id=account, amount=1_000_000.0, funded_at=T0)


def effects_of(store: Store, processor: str | None = None) -> list[Envelope]:
    return [e for e in store.read_all() if e.event_type in EFFECT_TYPES
            and (processor is None or e.metadata.get("processor") == processor)]  # fmt: skip


def keys(envelopes: list[Envelope]) -> Counter[tuple[str, str, str]]:
    return Counter((e.event_type, e.aggregate_id, str(e.causation_id)) for e in envelopes)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """``work()`` in a daemon thread; its result or exception lands in the dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = work()
        except BaseException as exc:  # reported to the test, not to pytest's hook
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def advisory_locks(store: Store) -> int:
    with store.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
        conn.rollback()
    assert row is not None
    return int(row[0])


# ----------------------------------------------------------------- the check before it is ready


def test_the_check_never_answers_from_a_processor_that_is_not_ready(fresh_store: Store) -> None:
    s = fresh_store
    s.append("A", [fund("A"), limit("A", 100.0), trade("A", "Buy", 150, 1)])
    first = Processor(s, name="first")
    first.catch_up()  # stores the violation and the block
    first.stop()
    # Right after start(): the thread has not attached yet. Rejected (once it is ready)
    # or refused -- never accepted from an empty state.
    p = Processor(s, start="head").start()
    try:
        verdict = check("A", "ACME", "Buy", 1000, 10.0, processor=p)
    except RiskbookError:
        pass
    else:
        assert not verdict.accepted and "blocked" in [r.kind for r in verdict.reasons]
    assert p.wait_ready(30)
    # Stopped: its state is not kept current any more, refused at once.
    p.stop()
    began = time.monotonic()
    with pytest.raises(RiskbookError, match=r"processor 'live' cannot answer.*stopped"):
        check("A", "ACME", "Buy", 1000, 10.0, processor=p)
    with pytest.raises(RiskbookError, match="'never'"):
        check("A", "ACME", "Buy", 1, 10.0, processor=Processor(s, name="never"))
    assert time.monotonic() - began < 2
    # A second processor of a name, waiting for the first: refused after the wait.
    twin = Processor(s, name="twin").start()
    wait_for(lambda: twin.status == "running")
    waiting = Processor(s, name="twin").start()
    try:
        wait_for(lambda: waiting.status.startswith("waiting"))
        assert twin.ready and not waiting.ready
        with pytest.raises(RiskbookError, match=r"'twin' cannot answer.*waiting"):
            check("A", "ACME", "Buy", 1000, 10.0, processor=waiting, wait=0.3)
        twin.stop()  # the second takes over: ready, and it answers
        assert not check("A", "ACME", "Buy", 1000, 10.0, processor=waiting, wait=30).accepted
    finally:
        twin.stop()
        waiting.stop()


# ----------------------------------------------------------------- a deadlock in the commit


def test_a_deadlock_in_the_commit_is_retried_and_nothing_is_lost_or_doubled(
    fresh_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    s = fresh_store
    for a in ("A", "B"):
        s.append(a, [fund(a), limit(a, 100.0)])
    s.append("A", [trade("A", "Buy", 150, 1)])  # both breach: the commit writes A, then B
    s.append("B", [trade("B", "Buy", 150, 1.5)])
    caplog.set_level(logging.WARNING, logger="riskbook.live")
    p: Processor | None = None
    try:
        # Another writer's transaction over two accounts (as an import does): it holds B's
        # next sequence while the processor's commit, holding A's, waits for it.
        with s.connection() as other:
            s.append_in(other, "B", [trade("B", "Buy", 1, 2)])
            p = Processor(s, name="dl").start()
            with psycopg.connect(s.dsn, autocommit=True) as monitor:
                wait_for(lambda: monitor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'").fetchone()[0] > 0)  # type: ignore[index]  # fmt: skip
            s.append_in(other, "A", [trade("A", "Buy", 1, 2)])  # waits for it: a deadlock
            other.commit()  # the processor's commit was the victim
        s.append("A", [trade("A", "Sell", 150, 3), trade("A", "Buy", 200, 4)])
        history = riskbook.load(s, progress=False, cache=False)
        want = Counter((e.kind, e.account_id, e.causation_id) for e in Engine().apply(history))
        try:
            wait_for(lambda: keys(effects_of(s, "dl")) == want, timeout=60)
        except AssertionError:
            got = keys(effects_of(s, "dl"))
            raise AssertionError(
                f"missing {want - got}, extra {got - want}; {p.status}; {p.error}"
            ) from None
        assert p.error is None and p.running and p.status == "running", p.status
        assert "deadlock detected" in caplog.text and "lost or refused" not in caplog.text
        time.sleep(0.3)
        assert keys(effects_of(s, "dl")) == want  # and nothing after
    finally:
        if p is not None:
            p.stop()


# ------------------------------------------------------------ a second processor of a name


def test_catch_up_and_live_once_refuse_at_once_while_another_of_the_name_works(
    fresh_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    s = fresh_store
    s.append("A", [fund("A"), limit("A", 100.0)])
    working = Processor(s, name="busy").start()
    try:
        wait_for(lambda: working.status == "running")
        began = time.monotonic()
        thread, out = in_thread(lambda: Processor(s, name="busy").catch_up())
        thread.join(10)
        assert not thread.is_alive(), "catch_up waits silently for the lock"
        assert isinstance(out.get("error"), RiskbookError)
        assert "another processor named 'busy' is working on this store" in str(out["error"])
        thread, out = in_thread(lambda: main(["live", "--once", "--name", "busy",
                                              "--dsn", s.dsn]))  # fmt: skip
        thread.join(10)
        assert not thread.is_alive(), "riskbook live --once waits silently for the lock"
        assert out.get("result") == 1
        assert "another processor named 'busy' is working" in capsys.readouterr().err
        assert time.monotonic() - began < 10
    finally:
        working.stop()


def test_catch_up_lets_go_of_its_lock_and_connection(fresh_store: Store) -> None:
    s = fresh_store
    s.append("A", [fund("A"), limit("A", 100.0), trade("A", "Buy", 150, 1)])
    p = Processor(s, name="once")
    try:
        assert [e.kind for e in p.catch_up()] == ["LimitViolationDetected", "AccountBlocked"]
        assert p.status != "running" and advisory_locks(s) == 0
        # Caught up: its state answers the check until it is stopped.
        assert not check("A", "ACME", "Buy", 1, 10.0, processor=p).accepted
        s.append("A", [trade("A", "Sell", 150, 2), trade("A", "Buy", 120, 3)])
        thread, out = in_thread(lambda: Processor(s, name="once").catch_up())
        thread.join(20)
        assert not thread.is_alive(), "the second catch_up waits for the first one's lock"
        assert [e.kind for e in out["result"]] == ["LimitViolationDetected"]
        assert p.catch_up() == []  # and again: it attaches, catches up, lets go
        assert advisory_locks(s) == 0
    finally:
        p.stop()


def test_riskbook_live_says_when_it_waits_for_another_of_its_name(
    fresh_store: Store, tmp_path: Path
) -> None:
    s = fresh_store
    s.append("A", [fund("A"), limit("A", 100.0)])
    working = Processor(s, name="live").start()
    second = subprocess.Popen(
        [sys.executable, "-m", "riskbook.cli", "live", "--dsn", s.dsn],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    lines: list[str] = []
    assert second.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(second.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()

    def said(words: str) -> list[str]:
        return [line for line in list(lines) if words in line]

    try:
        wait_for(lambda: working.status == "running")
        wait_for(lambda: bool(said("waiting")), timeout=30)
        assert "another processor named 'live' is working on this store" in said("waiting")[0]
        assert not said("following the store")  # it is not following: it waits
        working.stop()  # it takes over, and says so
        wait_for(lambda: bool(said("following the store")), timeout=30)
        assert "got the lock" in said("following the store")[0], lines
    finally:
        working.stop()
        second.terminate()
        second.wait(30)
        reader.join(10)
        second.stderr.close()


# ------------------------------------------------------- processors of different names


def test_two_processors_of_different_names_append_an_effect_once(fresh_store: Store) -> None:
    # Each looked for a stored effect before appending its own, but nothing ordered the
    # lookup after the other's commit: both appended the violation and the block.
    s = fresh_store
    s.append("A", [fund("A"), limit("A", 100.0), trade("A", "Buy", 150, 1)])
    inside, go = threading.Event(), threading.Event()

    def hold(effects: list[Any]) -> None:
        if effects:
            inside.set()
            go.wait(10)

    alpha = Processor(s, name="alpha", before_commit=hold)
    beta = Processor(s, name="beta")
    first, first_out = in_thread(alpha.catch_up)
    try:
        assert inside.wait(10)  # alpha's effects are written, its commit held
        second, second_out = in_thread(beta.catch_up)
        with psycopg.connect(s.dsn, autocommit=True) as monitor:
            wait_for(lambda: not second.is_alive() or monitor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'").fetchone()[0] > 0, timeout=10)  # type: ignore[index]  # fmt: skip
    finally:
        go.set()
    first.join(10)
    second.join(10)
    assert "error" not in first_out and "error" not in second_out
    assert [e.kind for e in second_out["result"]] == list(EFFECT_TYPES)  # decided, not appended
    assert sum(len(c.effects) for c in beta.commits) == 0
    assert sum(len(c.already_stored) for c in beta.commits) == 2
    assert keys(effects_of(s)) == keys(effects_of(s, "alpha"))
    assert sum(keys(effects_of(s)).values()) == 2


# ------------------------------------------------- a history that holds the engine's effects


def test_replaying_the_sample_adds_no_effect(fresh_store: Store) -> None:
    """The sample holds the violations and blocks its simulated engine decided (causation
    id = the trigger, recorded after it) and the unblocks that followed: the processor,
    from the beginning, decides the same effects and appends none of them -- here with a
    restart between the first block's trigger and the stored block (the block counts as
    written across it: the account is blocked, as in a run without a restart)."""
    s = fresh_store
    s.import_jsonl(ROOT / "data" / "sample.jsonl.gz")
    before = keys(effects_of(s))
    assert sum(before.values()) == 7
    envelopes = s.read_all()
    by_id = {str(e.event_id): e.position for e in envelopes}
    block = next(e for e in envelopes if e.event_type == "AccountBlocked")
    trigger = by_id[str(block.causation_id)]
    upto = sum(1 for e in envelopes if e.position <= trigger)  # the trigger, not the block
    first = Processor(s, max_batch=upto)
    first._attach()
    assert first.step()
    assert first.commits[-1].effects == () and first.commits[-1].already_stored
    assert first.engine.blocked.get(block.aggregate_id)
    first.stop()
    restarted = Processor(s)
    try:
        restarted._attach()
        assert restarted.engine.blocked.get(block.aggregate_id)  # as before the restart
        decided = restarted.catch_up()
    finally:
        restarted.stop()
    assert keys(effects_of(s)) == before  # nothing appended
    assert {e.kind for e in decided} == set(EFFECT_TYPES)
    assert sum(len(c.effects) for c in restarted.commits) == 0
    # The unblocks that followed hold: no account ends blocked.
    assert not any(restarted.engine.blocked.values()) and restarted.engine.pending == {}
    for account in ("ACC-001", "ACC-002"):
        verdict = check(account, "BOLT", "Buy", 1, 100.0, store=s)
        assert "blocked" not in [r.kind for r in verdict.reasons]


# ------------------------------------------------------------------ a review's findings


def test_a_block_folded_before_any_other_event_is_noted() -> None:
    # A block stored before the account's first trade (a compliance system) made the
    # engine's clock overflow: check() and the processor died with a Rust panic.
    block = riskbook.AccountBlocked(account_id="A", reason="kyc", blocked_by="compliance",
                                    blocked_at=T0)  # fmt: skip
    env = Envelope(uuid.uuid4(), "A", "Account", 1, T0, block, "c", position=1)
    engine = Engine()
    assert engine.apply(riskbook.History.from_envelopes([env])) == []
    assert engine.blocked == {"A": True}


def test_a_check_from_a_processor_caught_up_earlier_catches_it_up_again(
    fresh_store: Store,
) -> None:
    s = fresh_store
    s.append("A", [fund("A"), limit("A", 100.0), trade("A", "Buy", 10, 1)])
    p = Processor(s, name="once")
    p.catch_up()
    assert not p.ready  # current when it returned, not as the store moves on
    s.append("A", [trade("A", "Buy", 200, 2)])  # critical: the account is blocked
    answer = check("A", "ACME", "Buy", 1, 10.0, processor=p, at=T0 + timedelta(minutes=3))
    assert {r.kind for r in answer.reasons} == {"blocked", "limit"}  # it accepted
    assert [e.event_type for e in effects_of(s)] == list(EFFECT_TYPES)  # committed by it
    p.stop()
    with pytest.raises(RiskbookError, match="cannot answer"):
        check("A", "ACME", "Buy", 1, 10.0, processor=p)


def test_a_processor_retrying_a_commit_is_not_ready(fresh_store: Store) -> None:
    # Retrying a commit (a lock timeout here) it stayed "ready", and a check from it
    # accepted a trade of an account it was about to block.
    s = fresh_store
    dbname = psycopg.conninfo.conninfo_to_dict(s.dsn)["dbname"]
    with psycopg.connect(s.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{dbname}\" SET lock_timeout = '200ms'")
    s.append("A", [fund("A"), limit("A", 100.0), trade("A", "Buy", 10, 1)])
    store = Store(s.dsn)  # new sessions take the timeout
    p = Processor(store, name="stuck").start()
    holder = psycopg.connect(s.dsn)
    try:
        assert p.wait_ready(10)
        holder.execute("LOCK TABLE processor_checkpoints IN EXCLUSIVE MODE")
        store.append("A", [trade("A", "Buy", 200, 2)])
        wait_for(lambda: p.status.startswith("retrying"), timeout=20)
        assert not p.ready
        with pytest.raises(RiskbookError, match=r"cannot answer.*retrying"):
            check("A", "ACME", "Buy", 1, 10.0, processor=p, wait=0.5)
        holder.rollback()
        assert p.wait_ready(20)
        wait_for(lambda: len(effects_of(s)) == 2, timeout=20)
    finally:
        holder.close()
        p.stop()
        store.close()


def test_critical_none_blocks_no_type(fresh_store: Store) -> None:
    # Documented (None: never blocks), and what riskbook live --no-block means; it was
    # a bare TypeError (float(None)).
    s = fresh_store
    s.append("A", [fund("A"), limit("A", 100.0), trade("A", "Buy", 500, 1)])
    p = Processor(s, name="noblock", critical=None)
    try:
        assert [e.kind for e in p.catch_up()] == ["LimitViolationDetected"]
    finally:
        p.stop()
    assert Engine(critical=None).factor("MaxPositionSize") is None
    assert [e.event_type for e in effects_of(s)] == ["LimitViolationDetected"]


def test_riskbook_live_says_how_far_its_rebuild_is(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A long history's rebuild takes minutes (each bust refolds its account): the
    command says how far it is, here at every look (each bust made slow)."""
    from riskbook.live import _cli

    s = fresh_store
    fills = [trade("A", "Buy", 10, i) for i in range(6)]
    s.append("A", [fund("A"), limit("A", 1_000.0), *fills])
    for f in fills[:3]:
        s.append("A", [TradeCancelled(trade_id=f.trade_id, account_id="A", reason="bust",
                                      cancelled_at=T0 + timedelta(minutes=10))])  # fmt: skip
    assert main(["live", "--once", "--name", "p", "--dsn", s.dsn]) == 0  # the checkpoint
    s.append("A", [trade("A", "Sell", 5, 11)])
    capsys.readouterr()
    bust = Engine._bust

    def slow(self: Engine, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return bust(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_bust", slow)
    monkeypatch.setattr(_cli, "_PROGRESS_EVERY", 0.0)
    monkeypatch.setattr(_cli, "_POLL", 0.01)
    assert main(["live", "--once", "--name", "p", "--dsn", s.dsn]) == 0  # rebuilds, then on
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "rebuilding" in line]
    assert lines and "rebuilding the state below position" in lines[0], lines
    folded = [re.search(r"folded (\d+) of (\d+) events", line) for line in lines]
    counts = [(int(m[1]), int(m[2])) for m in folded if m]
    assert len(counts) >= 2 and all(total == 11 for _, total in counts), lines
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)
    assert len(set(lines)) == len(lines), lines  # a line when it moves on, not at each look
