"""A correctness hunt: riskbook.audit against what the live processor wrote, and the
live processor stopped / crashed / resumed against one uninterrupted run (DESIGN.md
sections 5, 6, 7; README "explain").

Failing tests named ``test_bug_...`` are findings; each says what is expected (and by
which part of the contract) and what happens instead. The others are properties that
held over seeded random histories.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

import riskbook
from riskbook import audit
from riskbook.events import Envelope
from riskbook.frames import History
from riskbook.live import Processor
from riskbook.live import _processor as processor_module
from riskbook.store import Store
from tests.test_hunt_store import Rec

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)
EFFECTS = ("LimitViolationDetected", "AccountBlocked")


def minutes(m: float) -> datetime:
    return T0 + timedelta(minutes=m)


# ----------------------------------------------------------------------------- histories

_ACCOUNTS = ["A", "B", "C"]
_SYMBOLS = ["X", "Y", "Z"]
_LIMITS = [
    ("MaxPositionSize", 20.0, False),
    ("MaxPositionSize", 40.0, True),
    ("MaxPositionSize", 60.0, False),
    ("MaxDailyVolume", 80.0, False),
    ("MaxLeverage", 0.5, False),
    ("MaxDrawdown", 0.02, False),
]


def random_history(seed: int, n: int = 40, *, in_order: bool = False) -> list[Envelope]:
    """Envelopes in global order, each recorded at a chosen time: trades (some late),
    busts, marks (some stale), limits (some scheduled, some late), funding,
    adjustments, unblocks, over three accounts and three symbols. ``in_order``: every
    event recorded when it happened, no bust (the engine and breaches() agree exactly)."""
    rnd = random.Random(seed)
    rec = Rec()
    for a in _ACCOUNTS:
        rec.fund(a, 1000.0, minutes(0))
    trades: list[tuple[str, str]] = []
    now = 0.0
    kinds = ["trade"] * 8 + ["mark"] * 3 + ["limit"] * 3 + ["fund", "adjust"]
    if not in_order:
        kinds += ["late", "late", "bust", "bust", "stale", "scheduled", "scheduled",
                  "latelimit", "unblock"]  # fmt: skip
    else:
        kinds += ["scheduled"]
    for _ in range(n):
        now += rnd.choice([0.0, 1.0, 1.0, 2.0, 5.0, 600.0])
        t = minutes(now)
        kind = rnd.choice(kinds)
        a, s = rnd.choice(_ACCOUNTS), rnd.choice(_SYMBOLS)
        if kind in ("trade", "late"):
            bt = t if kind == "trade" else t - timedelta(minutes=rnd.choice([1, 30, 700]))
            side = rnd.choice(["Buy", "Sell"])
            tid = rec.trade(a, s, side, float(rnd.randint(1, 30)), float(rnd.randint(5, 15)),
                            bt, t)  # fmt: skip
            trades.append((a, tid))
        elif kind in ("mark", "stale"):
            bt = t if kind == "mark" else t - timedelta(minutes=rnd.choice([1, 30]))
            rec.mark(s, float(rnd.randint(3, 20)), bt, t)
        elif kind in ("limit", "scheduled", "latelimit"):
            lt, value, by_symbol = rnd.choice(_LIMITS)
            bt = t
            if kind == "scheduled":
                bt = t + timedelta(minutes=rnd.choice([3, 30, 700]))
            elif kind == "latelimit":
                bt = t - timedelta(minutes=rnd.choice([1, 30]))
            rec.add(riskbook.LimitSet(account_id=a, limit_type=riskbook.LimitType(lt),
                                      value=value, set_by=rnd.choice(["ops", "cro"]),
                                      set_at=bt, symbol=s if by_symbol else None), t)  # fmt: skip
        elif kind == "fund":
            rec.fund(a, float(rnd.choice([500, -300, 200])), t, t)
        elif kind == "adjust":
            rec.adjust(a, s, float(rnd.randint(-10, 10)), t, t)
        elif kind == "unblock":
            rec.add(riskbook.AccountUnblocked(account_id=a, reason="ok", unblocked_by="op",
                                              unblocked_at=t), t)  # fmt: skip
        elif kind == "bust" and trades:
            acc, tid = rnd.choice(trades[-5:] if rnd.random() < 0.5 else trades)
            rec.cancel(acc, tid, t, t)
    return rec.envelopes


def chunks_of(envelopes: list[Envelope], rnd: random.Random, k: int) -> list[list[Envelope]]:
    cuts = sorted(rnd.sample(range(1, len(envelopes)), k - 1)) if k > 1 else []
    return [envelopes[a:b] for a, b in zip([0, *cuts], [*cuts, len(envelopes)], strict=True)]


def effect_rows(store: Store) -> list[tuple[Any, ...]]:
    """Every violation and block in the store, in global order, without the recorded
    time (the wall clock) or the event id (new each run)."""
    out = []
    for e in store.read_all():
        if e.event_type in EFFECTS:
            p = e.payload
            body = tuple(
                (k, getattr(p, k))
                for k in ("account_id", "limit_type", "symbol", "current_value",
                          "limit_value", "detected_at", "reason", "blocked_by", "blocked_at")
                if hasattr(p, k)
            )  # fmt: skip
            out.append((e.event_type, e.aggregate_id, str(e.causation_id), body))
    return out


def per_account(rows: list[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    """The effects of each account in store order (the order of two accounts' effects of
    one trigger -- a mark -- depends on the batch's shape: no contract orders them)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        out.setdefault(r[1], []).append(r)
    return out


def load(store: Store) -> History:
    return riskbook.load(store, cache=False, progress=False)


# ----------------------------------------------------------------------------- runs


class Boom(RuntimeError):
    pass


def reference_run(store: Store, chunks: list[list[Envelope]]) -> list[list[Any]]:
    """One processor, never stopped: each chunk imported, then caught up."""
    p = Processor(store, name="ref", snapshots=False)
    decided = []
    for chunk in chunks:
        store.import_envelopes(chunk)
        decided.append([(e.kind, e.account_id, e.causation_id) for e in p.catch_up()])
    p.stop()
    return decided


def interrupted_run(
    store: Store, chunks: list[list[Envelope]], rnd: random.Random, *, snapshots: bool
) -> None:
    """Each chunk imported, then processors of the same name, stopped after a few
    batches, crashed inside a commit, with other batch sizes, until caught up."""
    for chunk in chunks:
        store.import_envelopes(chunk)
        for _ in range(rnd.randint(0, 3)):
            action = rnd.choice(["stop", "crash", "thread"])
            max_batch = rnd.choice([1, 2, 3, 5])
            if action == "thread":  # its own loop, stopped at any moment; snapshots kept
                # in the background while it runs (snapshot_after=0)
                p = Processor(store, name="ref", max_batch=max_batch, snapshots=snapshots,
                              snapshot_after=0.0 if snapshots else None).start()  # fmt: skip
                time.sleep(rnd.uniform(0.0, 0.3))
                p.stop(timeout=30)
                assert p.error is None, p.error
            elif action == "stop":
                p = Processor(store, name="ref", max_batch=max_batch, snapshots=snapshots)
                try:
                    p._attach(wait=5)
                    for _ in range(rnd.randint(0, 4)):
                        if not p.step():
                            break
                finally:
                    if rnd.random() < 0.5:
                        p._keep_at_stop()
                    p.stop()
            else:
                left = rnd.randint(0, 3)

                def crash(effects: list[Any], left: list[int] = [left]) -> None:  # noqa: B006
                    if left[0] == 0:
                        raise Boom("crash inside the commit")
                    left[0] -= 1

                p = Processor(store, name="ref", max_batch=max_batch, snapshots=snapshots,
                              before_commit=crash)  # fmt: skip
                try:
                    p.catch_up(wait=5)
                except Boom:
                    pass
                finally:
                    p.stop()
        last = Processor(store, name="ref", max_batch=rnd.choice([None, 1, 4]),
                         snapshots=snapshots)  # fmt: skip
        try:
            last.catch_up(wait=5)
        finally:
            last.stop()


@pytest.mark.parametrize("seed", range(6))
def test_a_processor_stopped_crashed_and_resumed_writes_what_one_run_writes(
    make_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rnd = random.Random(1000 + seed)
    envelopes = random_history(seed, n=rnd.randint(25, 45))
    chunks = chunks_of(envelopes, rnd, rnd.randint(1, 4))
    snapshots = seed % 2 == 1
    if seed % 3 == 0:  # the backlog route (a read that fills _SMALL: one ADBC read)
        monkeypatch.setattr(processor_module, "_SMALL", 6)
    if snapshots:  # keep a snapshot at every clean stop, so restarts fold from one
        monkeypatch.setattr(processor_module, "_KEEP_AFTER", 0.0)
    with Store(make_database()) as a, Store(make_database()) as b:
        reference_run(a, chunks)
        interrupted_run(b, chunks, rnd, snapshots=snapshots)
        want, got = effect_rows(a), effect_rows(b)
        assert per_account(got) == per_account(want)
        assert sorted(map(repr, got)) == sorted(map(repr, want))
        # and the resumed run's alarms are explained without a finding
        h = load(b)
        for r in audit.incidents(h).iter_rows(named=True):
            assert audit.explain(h, r["event_id"]).findings == [], r


# ----------------------------------------------------------------------------- audit


@pytest.mark.parametrize("seed", range(3))
def test_explain_agrees_with_the_processor_and_the_history_routes(
    fresh_store: Store, seed: int
) -> None:
    """Every alarm the processor wrote over a random history (imported in chunks, the
    processor catching up between them): explain finds nothing wrong; the limit it
    names is the LimitSet's value and set_by, and the row of its limits table; the
    metric "as known now" is the projections' (positions / accounts at the cause's
    time, or audit.daily_volume); still_a_breach agrees with breaches(levels=1.0); the
    engine side of compare_states is state_at(store) at the alarm as known then."""
    from riskbook import projections as P

    rnd = random.Random(1000 + seed)
    envelopes = random_history(seed, n=rnd.randint(30, 50))
    reference_run(fresh_store, chunks_of(envelopes, rnd, rnd.randint(1, 4)))
    h = load(fresh_store)
    br = riskbook.breaches(h, levels=1.0)
    lim = h.limits.with_columns(pl.col("set_by").cast(pl.String))
    acc_col = pl.col("account_id").cast(pl.String)
    checked = 0
    for r in audit.incidents(h).iter_rows(named=True):
        x = audit.explain(h, r["event_id"])
        assert x.checked and x.findings == [], (r, x.findings)
        assert x.cause is not None
        account, at = r["account_id"], x.cause["occurred_at"]
        if x.limit is not None:
            row = lim.filter(pl.col("event_id") == x.limit["event_id"]).row(0, named=True)
            assert (row["value"], row["set_by"]) == (x.limit["value"], x.limit["set_by"])
            table = x.limits.filter(pl.col("limit_type") == x.limit_type)
            sym = x.limit["symbol"]
            table = table.filter(pl.col("symbol").is_null() if sym is None
                                 else pl.col("symbol") == sym)  # fmt: skip
            assert table["event_id"].to_list() == [x.limit["event_id"]]
        if x.limit_type == "MaxPositionSize":
            pos = P.positions(h, at=at).filter(
                (acc_col == account) & (pl.col("symbol").cast(pl.String) == x.symbol)
            )
            now = abs(pos["quantity"][0]) if pos.height else 0.0
        elif x.limit_type in ("MaxLeverage", "MaxDrawdown"):
            acc = P.accounts(h, at=at).filter(acc_col == account)
            now = acc["leverage" if x.limit_type == "MaxLeverage" else "drawdown"][0]
        else:
            now = audit.daily_volume(h, account=account, at=at)
        assert x.corrected == pytest.approx(now, rel=1e-9, abs=1e-12)
        k = br.filter((acc_col == account) & (pl.col("limit_type").cast(pl.String) == x.limit_type))
        k = k.filter(pl.col("symbol").is_null() if x.symbol is None
                     else pl.col("symbol").cast(pl.String) == x.symbol)  # fmt: skip
        covering = k.filter(
            (pl.col("started_at") <= at)
            & (pl.col("ended_at").is_null() | (pl.col("ended_at") > at))
        )
        assert x.still_a_breach == (covering.height > 0)
        ev = x.event
        _, acc_s = P.state_at(fresh_store, ev["occurred_at"], known_at=ev["timestamp"])
        acc_s = acc_s.filter(acc_col == account)
        engine = dict(zip(x.compare["figure"], x.compare["engine"], strict=True))
        for fig in ("equity", "gross_exposure", "leverage", "drawdown"):
            assert acc_s[fig][0] == pytest.approx(engine[fig], rel=1e-9)
        checked += 1
    assert checked or seed == 1  # seed 1: no alarm


@pytest.mark.parametrize("seed", range(2))
def test_the_processor_reports_the_breach_starts_of_breaches_over_an_ordered_history(
    fresh_store: Store, seed: int
) -> None:
    """Recorded in business order, no bust (engine docstring; DESIGN.md §5/§7): the
    violations written are exactly breaches(levels=1.0)'s starts -- time, trigger,
    value, limit -- up to the last event (a scheduled limit after it has no event to
    bring it into force yet)."""
    rnd = random.Random(seed)
    envelopes = random_history(seed, n=rnd.randint(30, 60), in_order=True)
    reference_run(fresh_store, chunks_of(envelopes, rnd, rnd.randint(1, 4)))
    h = load(fresh_store)
    kinds = pl.col("event_type").cast(pl.String)
    last = h.events.filter(~kinds.is_in(["LimitSet", *EFFECTS]))["occurred_at"].max()
    br = riskbook.breaches(h, levels=1.0).filter(pl.col("started_at") <= last)

    def rows(frame: pl.DataFrame, t: str, cause: str, value: str) -> list[tuple[Any, ...]]:
        return sorted(
            (str(r["account_id"]), str(r["limit_type"]), r["symbol"] and str(r["symbol"]),
             r[t], str(r[cause]), round(r[value], 9), r["limit_value"])
            for r in frame.iter_rows(named=True)
        )  # fmt: skip

    want = rows(br, "started_at", "trigger_event_id", "trigger_value")
    assert want
    assert rows(h.violations, "detected_at", "causation_id", "current_value") == want


# ============================================================== findings


def _alarms_by_type(h: History) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in audit.incidents(h).iter_rows(named=True):
        out.setdefault(r["event_type"], []).append(r)
    return out


def test_bug_incidents_names_a_later_violation_as_the_limit_of_a_block(
    fresh_store: Store,
) -> None:
    """One fill of 13 takes A over two limits of 10 at once: MaxDailyVolume and
    MaxPositionSize on X (both 1.3x, critical). The engine writes, in order: the
    MaxDailyVolume violation, the block ("critical MaxDailyVolume: 13 > 1.2 x limit
    10"), then the MaxPositionSize violation (the account is blocked already).
    audit.explain(block) rightly says MaxDailyVolume. audit.incidents() -- documented
    as "a block's limit type and symbol are those of the violation with the same cause
    ... (the latest stored before the block)" -- joins on the cause and keeps the
    *last stored* violation of that cause, stored *after* the block, and labels the block
    "MaxPositionSize X" (DESIGN.md intro, auditors: "what caused the block"; §7).
    Expected: MaxDailyVolume, null symbol. Actual: MaxPositionSize, X.
    Cause: riskbook/audit.py incidents(), of_the_account(): unique(keep="last") over
    every violation of the cause, with no `position < block position` filter."""
    rec = Rec()
    rec.fund("A", 1e6, minutes(0))
    rec.limit("A", "MaxPositionSize", 10.0, minutes(0))
    rec.limit("A", "MaxDailyVolume", 10.0, minutes(0))
    rec.trade("A", "X", "Buy", 13.0, 10.0, minutes(1))
    rec.flush(fresh_store)
    decided = Processor(fresh_store, snapshots=False).catch_up()
    assert [(e.kind, e.limit_type) for e in decided] == [
        ("LimitViolationDetected", "MaxDailyVolume"),
        ("AccountBlocked", "MaxDailyVolume"),
        ("LimitViolationDetected", "MaxPositionSize"),
    ]
    h = load(fresh_store)
    (block,) = _alarms_by_type(h)["AccountBlocked"]
    x = audit.explain(h, block["event_id"])
    assert (x.limit_type, x.symbol) == ("MaxDailyVolume", None) and x.findings == []
    assert (block["limit_type"], block["symbol"]) == ("MaxDailyVolume", None)  # MaxPositionSize X


def test_bug_explain_names_another_limit_than_the_block_s_own_reason(
    fresh_store: Store,
) -> None:
    """A processor that never blocks for MaxDailyVolume (critical={"MaxDailyVolume":
    None}, documented in Processor) meets a fill of 13 against two limits of 10: it
    writes both violations and one block, "critical MaxPositionSize X: 13 > 1.2 x limit
    10". audit.explain(block) reads the critical factor from the blocks on record
    (MaxPositionSize 1.2), gives every other type the default 1.2, replays, and takes
    the *first* block the replay decides -- MaxDailyVolume -- as the block's limit: it
    reports "limit MaxDailyVolume (account-wide)", the daily volume as the metric, and
    no finding or note, for a block whose own reason (and audit.incidents) says
    MaxPositionSize on X. Expected (DESIGN.md intro, auditors: "which limit applied ...
    what caused the block"): MaxPositionSize, X -- the replayed block that matches the
    one on record. Cause: riskbook/audit.py _Check._replay: `blocks[0]` without matching
    the type the block's reason states (_stated_level)."""
    rec = Rec()
    rec.fund("A", 1e6, minutes(0))
    rec.limit("A", "MaxPositionSize", 10.0, minutes(0))
    rec.limit("A", "MaxDailyVolume", 10.0, minutes(0))
    rec.trade("A", "X", "Buy", 13.0, 10.0, minutes(1))
    rec.flush(fresh_store)
    p = Processor(fresh_store, snapshots=False, critical={"MaxDailyVolume": None})
    decided = p.catch_up()
    assert [(e.kind, e.limit_type) for e in decided] == [
        ("LimitViolationDetected", "MaxDailyVolume"),
        ("LimitViolationDetected", "MaxPositionSize"),
        ("AccountBlocked", "MaxPositionSize"),
    ]
    h = load(fresh_store)
    (block,) = _alarms_by_type(h)["AccountBlocked"]
    assert (block["limit_type"], block["symbol"]) == ("MaxPositionSize", "X")
    x = audit.explain(h, block["event_id"])
    assert (x.limit_type, x.symbol) == ("MaxPositionSize", "X")  # was: MaxDailyVolume, None


def test_bug_incidents_names_a_violation_stored_after_a_block_through_the_correlation(
    fresh_store: Store,
) -> None:
    """A's account-wide MaxPositionSize is 10; all of A's fills share one correlation id
    (one order). Buy 11 X: violation (1.1x). Buy 3 X: 14 = 1.4x, critical, inside the
    open breach: a block with no violation of its own cause. Buy 11 Y: a violation on Y
    (A is blocked already: no block). audit.explain(block) rightly says MaxPositionSize
    on X (its breach started with the first violation). audit.incidents() finds no
    violation of the block's cause, falls back on the correlation, and takes the last
    violation of it *stored after the block* -- Y -- although its own comment says "the
    latest stored before the block". Expected: symbol X (DESIGN.md intro, auditors:
    "what caused the block"). Actual: Y. Cause: riskbook/audit.py incidents(),
    of_the_account(): no `position < block position` filter (same as the cause route)."""
    rec = Rec()
    rec.fund("A", 1e6, minutes(0))
    rec.limit("A", "MaxPositionSize", 10.0, minutes(0))
    rec.trade("A", "X", "Buy", 11.0, 10.0, minutes(1))
    rec.trade("A", "X", "Buy", 3.0, 10.0, minutes(2))
    rec.trade("A", "Y", "Buy", 11.0, 10.0, minutes(3))
    rec.flush(fresh_store)
    decided = Processor(fresh_store, snapshots=False).catch_up()
    assert [(e.kind, e.symbol) for e in decided] == [
        ("LimitViolationDetected", "X"),
        ("AccountBlocked", "X"),
        ("LimitViolationDetected", "Y"),
    ]
    h = load(fresh_store)
    (block,) = _alarms_by_type(h)["AccountBlocked"]
    x = audit.explain(h, block["event_id"])
    assert (x.limit_type, x.symbol) == ("MaxPositionSize", "X") and x.findings == []
    assert block["symbol"] == "X"  # was: Y


def test_bug_explain_misreads_the_critical_factor_of_a_block_on_a_symbol_with_a_colon(
    fresh_store: Store,
) -> None:
    """A processor with critical=1.5; A's MaxPositionSize is 10 and A trades "BRK:A":
    13 (1.3x: a violation), then +3 = 16 (1.6x: a block, "critical MaxPositionSize
    BRK:A: 16 > 1.5 x limit 10"). explain(block) reads the critical factor from the
    block's reason; with a plain symbol ("BRK") it reads 1.5 and finds nothing wrong.
    With "BRK:A" its pattern (_BLOCK_REASON: `(?: [^:]*)?: `) does not match, it assumes
    1.2, replays, and reports a finding against a correct block: "the engine (critical
    factor 1.2) decides no block here". Expected (README explain: findings only "where
    the record and the replay disagree"): no finding, limit MaxPositionSize on BRK:A.
    Cause: riskbook/audit.py _BLOCK_REASON (now riskbook/_reasons.py) / _stated_level (a symbol may hold ':')."""
    rec = Rec()
    rec.fund("A", 1e6, minutes(0))
    rec.limit("A", "MaxPositionSize", 10.0, minutes(0))
    rec.trade("A", "BRK:A", "Buy", 13.0, 10.0, minutes(1))
    rec.trade("A", "BRK:A", "Buy", 3.0, 10.0, minutes(2))
    rec.flush(fresh_store)
    decided = Processor(fresh_store, snapshots=False, critical=1.5).catch_up()
    assert [e.kind for e in decided] == ["LimitViolationDetected", "AccountBlocked"]
    h = load(fresh_store)
    (block,) = _alarms_by_type(h)["AccountBlocked"]
    x = audit.explain(h, block["event_id"])
    assert x.findings == []  # was: ['... the engine (critical factor 1.2) decides no block here']
    assert (x.limit_type, x.symbol) == ("MaxPositionSize", "BRK:A")
