"""The live processor and the pre-trade check, against the real PostgreSQL."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import riskbook
from riskbook import (
    AccountFunded,
    Envelope,
    History,
    LimitSet,
    PriceMarked,
    Side,
    Store,
    TradeCancelled,
    TradeExecuted,
)
from riskbook.cli import main
from riskbook.live import Effect, Engine, Processor, check, unblock

T0 = datetime(2024, 3, 1, 14, 0, tzinfo=UTC)


def trade(account: str, side: str, qty: float, minute: float, *, symbol: str = "ACME",
          price: float = 10.0, trade_id: str | None = None) -> TradeExecuted:  # fmt: skip
    return TradeExecuted(
        trade_id=trade_id or f"T-{uuid.uuid4().hex[:12]}",
        account_id=account,
        symbol=symbol,
        side=Side(side),
        quantity=qty,
        price=price,
        executed_at=T0 + timedelta(minutes=minute),
    )


def limit(account: str, value: float, *, kind: str = "MaxPositionSize",
          symbol: str | None = None, minute: float = 0.0) -> LimitSet:  # fmt: skip
    return LimitSet(account_id=account, limit_type=kind, value=value, set_by="cro",
                    set_at=T0 + timedelta(minutes=minute), symbol=symbol)  # fmt: skip


def fund(account: str, amount: float = 1_000_000.0) -> AccountFunded:
    return AccountFunded(account_id=account, amount=amount, funded_at=T0)


def stored_effects(store: Store, processor: str | None = None) -> list[Envelope]:
    return [
        e
        for e in store.read_all()
        if e.event_type in ("LimitViolationDetected", "AccountBlocked")
        and (processor is None or e.metadata.get("processor") == processor)
    ]


def effect_keys(envelopes: list[Envelope]) -> Counter[tuple[str, str, str]]:
    return Counter((e.event_type, e.aggregate_id, str(e.causation_id)) for e in envelopes)


# ----------------------------------------------------------------------------- effects


def test_one_violation_per_breach_start_with_cause_and_correlation(fresh_store: Store) -> None:
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    p = Processor(s, critical=10.0)  # no block in this test
    fills = [("Buy", 80, 1), ("Buy", 40, 2), ("Buy", 10, 3), ("Sell", 60, 4), ("Buy", 50, 5)]
    envelopes = []
    for side, qty, minute in fills:  # one at a time, the processor following
        envelopes += s.append("ACC-1", [trade("ACC-1", side, qty, minute)],
                              correlation_id=f"order-{minute}")  # fmt: skip
        p.catch_up()
    p.stop()
    found = stored_effects(s)
    assert [e.event_type for e in found] == ["LimitViolationDetected"] * 2
    # 120 > 100 starts a breach; 130 goes on in it; 70 ends it; 120 starts another.
    assert [e.causation_id for e in found] == [envelopes[1].event_id, envelopes[4].event_id]
    assert [e.correlation_id for e in found] == ["order-2", "order-5"]
    first = found[0].payload
    assert isinstance(first, riskbook.LimitViolationDetected)
    assert (first.limit_type, first.symbol, first.current_value, first.limit_value) == (
        "MaxPositionSize", "ACME", 120.0, 100.0,
    )  # fmt: skip
    assert first.detected_at == T0 + timedelta(minutes=2)
    # Stored violations reconcile with the recomputed breaches, matched by cause.
    rec = riskbook.reconcile(riskbook.load(s, progress=False))
    assert rec["status"].to_list() == ["matched", "matched"]


def test_critical_breach_blocks_then_check_rejects_and_unblock(fresh_store: Store) -> None:
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    s.append("ACC-1", [trade("ACC-1", "Buy", 130, 1)])  # 130 >= 1.2 x 100: critical
    p = Processor(s)
    effects = p.catch_up()
    assert [e.kind for e in effects] == ["LimitViolationDetected", "AccountBlocked"]
    blocked = stored_effects(s)[1].payload
    assert isinstance(blocked, riskbook.AccountBlocked)
    assert blocked.blocked_by == "riskbook-live" and "MaxPositionSize" in blocked.reason

    at = T0 + timedelta(minutes=2)
    verdict = check("ACC-1", "ACME", "Buy", 5, 10.0, processor=p, at=at)
    assert not verdict.accepted
    assert [r.kind for r in verdict.reasons] == ["blocked", "limit"]
    lim = verdict.reasons[1]
    assert (lim.limit_type, lim.value, lim.limit_value, lim.excess) == (
        "MaxPositionSize", 135.0, 100.0, 35.0,
    )  # fmt: skip
    # The same answer from the stored history alone (no processor running).
    p.catch_up()
    assert check("ACC-1", "ACME", "Buy", 5, 10.0, store=s, at=at).reasons == verdict.reasons

    with pytest.raises(riskbook.RiskbookError, match="needs a reason"):
        unblock("ACC-1", by="j.doe", reason=" ", store=s)
    env = unblock("ACC-1", by="j.doe", reason="position being unwound", store=s)
    assert env.payload.unblocked_by == "j.doe"  # type: ignore[union-attr]
    with pytest.raises(riskbook.RiskbookError, match="not blocked"):
        unblock("ACC-1", by="j.doe", reason="again", store=s)
    p.catch_up()
    assert not p.engine.blocked["ACC-1"]
    # Unblocked, still over the limit: adding is refused for the limit only; reducing is fine.
    again = check("ACC-1", "ACME", "Buy", 5, 10.0, processor=p, at=at)
    assert [r.kind for r in again.reasons] == ["limit"]
    assert check("ACC-1", "ACME", "Sell", 10, 10.0, processor=p, at=at).accepted
    assert check("ACC-2", "ACME", "Buy", 1e9, 10.0, processor=p, at=at).accepted  # no limit
    with pytest.raises(riskbook.InvalidEvent, match="quantity"):
        check("ACC-1", "ACME", "Buy", -5, 10.0, processor=p)
    p.stop()


def test_a_new_critical_breach_blocks_again_only_after_an_unblock(fresh_store: Store) -> None:
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    p = Processor(s)
    s.append("ACC-1", [trade("ACC-1", "Buy", 130, 1), trade("ACC-1", "Sell", 100, 2),
                       trade("ACC-1", "Buy", 100, 3)])  # fmt: skip
    kinds = [e.kind for e in p.catch_up()]
    assert kinds == ["LimitViolationDetected", "AccountBlocked", "LimitViolationDetected"]
    unblock("ACC-1", by="risk", reason="checked", store=s)
    s.append("ACC-1", [trade("ACC-1", "Sell", 100, 4), trade("ACC-1", "Buy", 100, 5)])
    assert [e.kind for e in p.catch_up()] == ["LimitViolationDetected", "AccountBlocked"]
    p.stop()


def test_a_bust_ends_the_breach_so_the_next_one_is_reported(fresh_store: Store) -> None:
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    p = Processor(s, critical=10.0)
    s.append("ACC-1", [trade("ACC-1", "Buy", 150, 1, trade_id="FAT")])
    s.append("ACC-1", [TradeCancelled(trade_id="FAT", account_id="ACC-1", reason="fat finger",
                                      cancelled_at=T0 + timedelta(minutes=2))])  # fmt: skip
    second = s.append("ACC-1", [trade("ACC-1", "Buy", 120, 3)])
    found = p.catch_up()
    assert len(found) == 2 and found[1].causation_id == str(second[0].event_id)
    assert found[1].value == 120.0  # the busted 150 no longer counts
    p.stop()


# ----------------------------------------------------------------------------- consistency


def _simulated(tmp: Path) -> list[Envelope]:
    """A simulated history recorded in business order, without busts or engine output."""
    from riskbook import simulate

    path = tmp / "sim.jsonl"
    simulate.cli(["--accounts", "6", "--symbols", "4", "--days", "3", "--seed", "3",
                  "--out", str(path), "--quiet"])  # fmt: skip
    from riskbook.events import decode_envelope

    envs = [decode_envelope(line)[0] for line in path.read_bytes().splitlines() if line]
    keep, latest = [], datetime.min.replace(tzinfo=UTC)
    for e in envs:
        if e.event_type in ("TradeCancelled", "LimitViolationDetected", "AccountBlocked",
                            "AccountUnblocked"):  # fmt: skip
            continue
        if e.business_time is not None and e.business_time < latest:
            continue  # late
        latest = max(latest, e.business_time or latest)
        keep.append(e)
    # Tight limits of every built-in type from the start: breaches of each kind.
    cut = len(keep) // 10
    first = keep[cut].business_time
    assert first is not None
    accounts = sorted({e.aggregate_id for e in keep if e.aggregate_type == "Account"})
    tight = [
        Envelope(uuid.uuid4(), acc, "Account", 0, first,
                 LimitSet(account_id=acc, limit_type=kind, value=value, set_by="test",
                          set_at=first), "tight")
        for acc in accounts
        for kind, value in [("MaxPositionSize", 2000.0), ("MaxDailyVolume", 20_000.0),
                            ("MaxLeverage", 0.3), ("MaxDrawdown", 0.002)]
    ]  # fmt: skip
    keep = keep[:cut] + tight + keep[cut:]
    versions: Counter[str] = Counter()
    renumbered = []
    for e in keep:  # sequences without the gaps left by what was dropped
        versions[e.aggregate_id] += 1
        renumbered.append(dataclasses.replace(e, sequence=versions[e.aggregate_id]))
    return renumbered


def test_replaying_a_history_gives_exactly_the_breach_starts(
    fresh_store: Store, tmp_path: Path
) -> None:
    envs = _simulated(tmp_path)
    fresh_store.import_envelopes(envs)
    p = Processor(fresh_store, max_batch=700)
    effects = p.catch_up()
    p.stop()
    starts = riskbook.breaches(riskbook.load(fresh_store, progress=False), levels=1.0)
    assert starts.height >= 20
    assert starts["limit_type"].n_unique() == 4
    want = sorted(
        (
            r["trigger_event_id"],
            str(r["limit_type"]),
            None if r["symbol"] is None else str(r["symbol"]),
        )
        for r in starts.iter_rows(named=True)
    )
    got = sorted((e.causation_id, e.limit_type, e.symbol) for e in effects
                 if e.kind == "LimitViolationDetected")  # fmt: skip
    assert got == want
    stored = effect_keys(stored_effects(fresh_store))
    assert stored == Counter((e.kind, e.account_id, e.causation_id) for e in effects)


# ----------------------------------------------------------------------------- crashes


def _oscillating(store: Store, accounts: int = 3, rounds: int = 30) -> None:
    """Positions that go over a 100 limit and back, again and again (some critical)."""
    for a in range(accounts):
        acc = f"ACC-{a}"
        events: list[riskbook.Event] = [fund(acc), limit(acc, 100.0)]
        for r in range(rounds):
            over = 130 if r % 5 == 0 else 50
            events += [trade(acc, "Buy", 80, 2 * r + 0.1 * a),
                       trade(acc, "Buy", over, 2 * r + 0.5 + 0.1 * a),
                       trade(acc, "Sell", over + 80, 2 * r + 1 + 0.1 * a)]  # fmt: skip
        store.append(acc, events)


def _expected(store: Store) -> Counter[tuple[str, str, str]]:
    """What one processor folding the stored history in one go decides."""
    history = riskbook.load(store, progress=False)
    engine = Engine()
    return Counter((e.kind, e.account_id, e.causation_id) for e in engine.apply(history)
                   if True)  # fmt: skip


_CRASHY = textwrap.dedent(
    """
    import sys, time
    from riskbook.live import Processor

    def hold(effects):
        if effects:
            print("IN_TX", len(effects), flush=True)
            time.sleep(30)  # killed here, inside the committing transaction

    Processor(sys.argv[1], name="crashy", max_batch=25, before_commit=hold).run()
    """
)


def test_a_checkpoint_moved_by_someone_else_stops_the_commit_and_writes_nothing(
    fresh_store: Store,
) -> None:
    _oscillating(fresh_store)
    p = Processor(fresh_store, name="moved", max_batch=20)
    p._attach()
    assert p.step()
    with fresh_store.connection() as conn:
        conn.execute(
            "UPDATE processor_checkpoints SET position = position + 1 WHERE name = 'moved'"
        )
        conn.commit()
    written = fresh_store.count()
    with pytest.raises(riskbook.RiskbookError, match="another processor moved it"):
        while p.step():  # every commit is refused, effects or none
            pass
    assert fresh_store.count() == written
    p._close()
    p.stop()


def test_sigkill_inside_the_commit_then_restart_loses_and_repeats_nothing(
    fresh_store: Store, tmp_path: Path
) -> None:
    _oscillating(fresh_store)
    want = _expected(fresh_store)
    assert sum(want.values()) > 20
    script = tmp_path / "crashy.py"
    script.write_text(_CRASHY)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), fresh_store.dsn],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()  # waits for a batch with effects, mid-commit
        assert line.startswith("IN_TX"), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    # Nothing of the killed transactions is there...
    assert stored_effects(fresh_store, "crashy") == []
    # ... and a restart (checkpoint, state rebuilt) finishes the job exactly once.
    killed_midway = Processor(fresh_store, name="crashy", max_batch=25)
    commits = 0

    def crash_after_some(effects: list[Effect]) -> None:
        nonlocal commits
        commits += 1
        if commits == 4:
            raise KeyboardInterrupt  # a crash between batches, in-process this time

    killed_midway.before_commit = crash_after_some
    with pytest.raises(KeyboardInterrupt):
        killed_midway.catch_up()
    killed_midway.stop()
    last = Processor(fresh_store, name="crashy")
    last.catch_up()
    last.stop()
    assert effect_keys(stored_effects(fresh_store, "crashy")) == want


def test_two_processors_one_works_the_other_waits(fresh_store: Store) -> None:
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    first = Processor(s, name="twin").start()
    _wait_for(lambda: first.status == "running")
    second = Processor(s, name="twin").start()
    _wait_for(lambda: second.status.startswith("waiting"))
    s.append("ACC-1", [trade("ACC-1", "Buy", 110, 1)])
    _wait_for(lambda: len(stored_effects(s)) == 1)
    first.stop()  # the second takes over, rebuilding the state from the checkpoint
    _wait_for(lambda: second.status == "running")
    s.append("ACC-1", [trade("ACC-1", "Sell", 20, 2), trade("ACC-1", "Buy", 30, 3)])
    _wait_for(lambda: len(stored_effects(s)) == 2)
    time.sleep(0.3)
    second.stop()
    assert len(stored_effects(s)) == 2 and len(first.effects) == len(second.effects) == 1


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[riskbook.store.embedded.EmbeddedServer]:  # type: ignore[name-defined]
    from riskbook.store.embedded import EmbeddedServer, _remove_outside_files

    server = EmbeddedServer(tmp_path / "pg-restart")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        _remove_outside_files(server)  # as root, a whole cluster under /var/lib/riskbook


@pytest.mark.skipif(bool(os.environ.get("RISKBOOK_DSN")), reason="restarts an embedded server")
def test_processor_survives_a_postgresql_restart(own_server) -> None:  # type: ignore[no-untyped-def]
    dsn = own_server.start()
    s = riskbook.connect(dsn)
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    p = Processor(s, critical=10.0).start()
    s.append("ACC-1", [trade("ACC-1", "Buy", 110, 1)])
    _wait_for(lambda: len(p.effects) == 1)
    own_server.stop()
    _wait_for(lambda: p.status.startswith("reconnecting"))
    own_server.start()
    s.close()  # the writer's pooled connections died with the server
    s = riskbook.connect(dsn)
    s.append("ACC-1", [trade("ACC-1", "Sell", 20, 2), trade("ACC-1", "Buy", 30, 3)])
    _wait_for(lambda: len(p.effects) == 2, timeout=60)
    assert p.status == "running"
    p.stop()
    s.close()
    with riskbook.connect(dsn) as again:
        assert len(stored_effects(again)) == 2


# ----------------------------------------------------------------------------- CLI


def test_cli_live_check_unblock(fresh_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    s.append("ACC-1", [trade("ACC-1", "Buy", 150, 1)])
    dsn = ["--dsn", s.dsn]
    assert main(["live", "--once", *dsn]) == 0
    out = capsys.readouterr().out
    assert "VIOLATION ACC-1 MaxPositionSize ACME: 150" in out and "BLOCK ACC-1" in out
    assert main(["check", "ACC-1", "ACME", "Buy", "1", "10", "--format", "json", *dsn]) == 3
    answer = json.loads(capsys.readouterr().out)
    assert answer["decision"] == "reject"
    assert [r["kind"] for r in answer["reasons"]] == ["blocked", "limit"]
    assert main(["unblock", "ACC-1", "--by", "j.doe", "--reason", "ok", *dsn]) == 0
    assert main(["unblock", "ACC-1", "--by", "j.doe", "--reason", "ok", *dsn]) == 1
    assert "not blocked" in capsys.readouterr().err
    assert main(["check", "ACC-1", "ACME", "Sell", "100", "10", *dsn]) == 0
    assert capsys.readouterr().out.startswith("ACCEPT Sell 100 ACME")


# ----------------------------------------------------------------------------- the engine


def test_engine_refuses_a_batch_it_has_folded(fresh_store: Store) -> None:
    h = History.from_events(fund("ACC-1"), trade("ACC-1", "Buy", 1, 1))
    e = Engine()
    e.apply(h)
    with pytest.raises(ValueError, match="fold events twice"):
        e.apply(h)


def test_engine_late_events_act_on_arrival_and_stale_marks_are_ignored() -> None:
    late = trade("ACC-1", "Buy", 150, -30)  # recorded after the mark, happened before
    events = [fund("ACC-1"), limit("ACC-1", 100.0, minute=-60),
              PriceMarked(symbol="ACME", price=12.0, marked_at=T0),
              late, PriceMarked(symbol="ACME", price=1.0, marked_at=T0 - timedelta(hours=1))]  # fmt: skip
    h = History.from_envelopes(
        Envelope(uuid.uuid4(), e.aggregate_id, e.aggregate_type, 1, T0 + timedelta(seconds=i),
                 e, "c", position=i + 1)
        for i, e in enumerate(events)
    )  # fmt: skip
    e = Engine(critical=10.0)
    effects = e.apply(h)
    assert [(x.kind, x.value) for x in effects] == [("LimitViolationDetected", 150.0)]
    assert effects[0].event.detected_at == T0  # type: ignore[union-attr]  # acted on arrival
    marks = e.projection.marks.row(0, named=True)
    assert marks["mark_price"] == 12.0  # the stale mark did not replace the newer one
    assert e.projection.positions.filter(pl.col("symbol") == "ACME")["quantity"].item() == 150.0


# ----------------------------------------------------------------------------- properties


_ACCOUNTS = ["A", "B"]
_SYMBOLS = ["X", "Y"]


@st.composite
def streams(draw: st.DrawFn, *, late: bool) -> list[Envelope]:
    """Random events in global order; business times in order unless ``late``."""
    n = draw(st.integers(5, 60))
    events: list[riskbook.Event] = [fund(a, 10_000.0) for a in _ACCOUNTS]
    trades: list[TradeExecuted] = []
    minute = 0.0
    for _ in range(n):
        minute += draw(st.sampled_from([0.0, 0.5, 1.0, 600.0]))  # ties, and new UTC days
        when = minute - (draw(st.sampled_from([0.0, 0.0, 0.0, 30.0])) if late else 0.0)
        kind = draw(
            st.sampled_from(["trade"] * 6 + ["mark", "limit", "fund"] + (["bust"] if late else []))
        )
        acc, sym = draw(st.sampled_from(_ACCOUNTS)), draw(st.sampled_from(_SYMBOLS))
        t = T0 + timedelta(minutes=when)
        if kind == "trade":
            e: riskbook.Event = trade(acc, draw(st.sampled_from(["Buy", "Sell"])),
                                      float(draw(st.integers(1, 80))), when, symbol=sym,
                                      price=float(draw(st.integers(5, 15))))  # fmt: skip
            trades.append(e)  # type: ignore[arg-type]
        elif kind == "mark":
            e = PriceMarked(symbol=sym, price=float(draw(st.integers(5, 15))), marked_at=t)
        elif kind == "fund":
            e = AccountFunded(
                account_id=acc, amount=float(draw(st.integers(-500, 500)) or 1), funded_at=t
            )
        elif kind == "bust" and trades:
            victim = draw(st.sampled_from(trades))
            e = TradeCancelled(trade_id=victim.trade_id, account_id=victim.account_id,
                               reason="bust", cancelled_at=t)  # fmt: skip
        else:
            lt, value = draw(st.sampled_from([("MaxPositionSize", 60.0), ("MaxPositionSize", 100.0),
                                              ("MaxDailyVolume", 150.0), ("MaxLeverage", 0.05),
                                              ("MaxDrawdown", 0.001)]))  # fmt: skip
            e = LimitSet(
                account_id=acc,
                limit_type=lt,
                value=value,
                set_by="p",
                set_at=t,
                symbol=sym if lt == "MaxPositionSize" and draw(st.booleans()) else None,
            )
        events.append(e)
    return [
        Envelope(uuid.uuid4(), e.aggregate_id, e.aggregate_type, 1,
                 T0 + timedelta(minutes=i * 1e-3) if late else e.business_time or T0, e, f"c{i}",
                 position=i + 1)
        for i, e in enumerate(events)
    ]  # fmt: skip


def _fold_in(envelopes: list[Envelope], cuts: list[int]) -> list[tuple[str, str, str]]:
    engine = Engine()
    out = []
    bounds = [0, *sorted(set(cuts)), len(envelopes)]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            h = History.from_envelopes(envelopes[lo:hi])
            out += [(e.kind, e.causation_id, e.limit_type) for e in engine.apply(h)]
    return out


def test_engine_folding_event_by_event_keeps_everything_once_and_decides_the_same() -> None:
    """Hundreds of one-event batches (the kept history merges its segments tier by
    tier), a bust and a new limit type late in the stream (both read all of it)."""
    events: list[riskbook.Event] = [fund("A"), limit("A", 100.0), fund("B")]
    for r in range(150):
        events += [trade("A", "Buy", 130 if r % 7 == 0 else 50, r),
                   trade("A", "Sell", 130 if r % 7 == 0 else 50, r + 0.5)]  # fmt: skip
    kept = trade("B", "Buy", 80, 1, trade_id="T-KEPT")
    events += [kept, TradeCancelled(trade_id="T-KEPT", account_id="B", reason="bust",
                                    cancelled_at=T0 + timedelta(minutes=200))]  # fmt: skip
    events += [limit("B", 0.01, kind="MaxLeverage", minute=201), trade("B", "Buy", 900, 202)]
    envelopes = [
        Envelope(uuid.uuid4(), e.aggregate_id, e.aggregate_type, 1, e.business_time or T0, e,
                 f"c{i}", position=i + 1)
        for i, e in enumerate(events)
    ]  # fmt: skip
    cuts = list(range(1, len(envelopes)))
    engine = Engine()
    one_by_one = []
    for lo, hi in itertools.pairwise([0, *cuts, len(envelopes)]):
        h = History.from_envelopes(envelopes[lo:hi])
        one_by_one += [(e.kind, e.causation_id, e.limit_type) for e in engine.apply(h)]
    assert one_by_one == _fold_in(envelopes, [])
    assert {k for k, _, _ in one_by_one} == {"LimitViolationDetected", "AccountBlocked"}
    assert len(engine._segments) < 40  # merged, not one per batch
    kept_positions = pl.concat([s.events for s in engine._segments])["position"].to_list()
    assert kept_positions == list(range(1, len(envelopes) + 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_engine_effects_do_not_depend_on_batching(data: st.DataObject) -> None:
    envelopes = data.draw(streams(late=True))
    cuts = data.draw(st.lists(st.integers(1, len(envelopes) - 1), max_size=6))
    assert _fold_in(envelopes, cuts) == _fold_in(envelopes, [])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_engine_violations_are_the_breach_starts_of_an_in_order_history(
    data: st.DataObject,
) -> None:
    envelopes = data.draw(streams(late=False))
    cuts = data.draw(st.lists(st.integers(1, len(envelopes) - 1), max_size=4))
    got = sorted((c, t) for k, c, t in _fold_in(envelopes, cuts) if k == "LimitViolationDetected")
    starts = riskbook.breaches(History.from_envelopes(envelopes), levels=1.0)
    want = sorted(
        (r["trigger_event_id"], str(r["limit_type"])) for r in starts.iter_rows(named=True)
    )
    assert got == want
