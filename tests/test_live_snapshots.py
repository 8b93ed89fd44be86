"""A processor's restart from the snapshot of its state that an earlier rebuild kept."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import pickle
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from riskbook import History, Store, TradeCancelled
from riskbook.live import Engine, Processor, _processor, _snapshot
from riskbook.simulate import encode_envelope, generate
from tests.test_live import T0, streams, trade


@pytest.fixture(autouse=True)
def _every_rebuild_keeps_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_processor, "_KEEP_AFTER", 0.0)
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))


def _parts(tmp_path: Path, n: int) -> list[Path]:
    """The sample history (busts, critical breaches) cut into ``n`` files, without
    its stored violations and blocks (the processors decide and write their own) and
    without versions (they go on after the effects appended to the accounts)."""
    envelopes = [e for e in generate(seed=7, events=4_000).envelopes
                 if e.event_type not in ("LimitViolationDetected", "AccountBlocked")]  # fmt: skip
    cut = [len(envelopes) * i // n for i in range(n + 1)]
    files = []
    for i in range(n):
        path = tmp_path / f"part{i}.jsonl.gz"
        with gzip.open(path, "wb") as f:
            for e in envelopes[cut[i] : cut[i + 1]]:
                row = json.loads(encode_envelope(e))
                del row["sequence"]  # after the processors' own effects on the account
                f.write(json.dumps(row).encode() + b"\n")
        files.append(path)
    return files


def _effects(processor: Processor) -> Counter[tuple[str, str, str, str | None]]:
    return Counter(
        (e.kind, e.account_id, str(e.causation_id), e.limit_type)
        for c in processor.commits
        for e in (*c.effects, *c.already_stored)
    )


def _state(engine: Engine) -> dict[str, Any]:
    """What an engine carries into its next fold, comparable."""

    def rows(frame: pl.DataFrame) -> list[tuple[Any, ...]]:
        return sorted(frame.rows(), key=repr)

    p = engine.projection
    return {
        "projection": [rows(f) for f in (p.positions, p.accounts, p.marks, p.days)],
        "breach": {
            n: [rows(f) for f in (b.limits, b.metrics, b.open)]
            for n, b in sorted(engine.breach.items())
        },
        # (without "carried": open before the type's last evaluation, which depends on
        # the batches, and nothing reads it of these)
        "open_now": {
            n: rows(f.drop("carried", strict=False)) for n, f in sorted(engine.open_now.items())
        },
        "blocked": sorted(a for a, b in engine.blocked.items() if b),
        "pending": sorted(engine.pending.items()),
        "scheduled": rows(engine.scheduled),
        "clocks": (engine.clock, engine.recorded, engine.horizon, engine.events_seen),
        "mark_times": sorted(engine.mark_times.items()),
        "kept": pl.concat([s.events for s in engine._segments])["position"].to_list(),
    }


def _run(store: Store, files: list[Path], *, snapshots: bool) -> list[Processor]:
    """Import the files one at a time, each followed by a fresh processor's catch-up
    (a restart): the processors, in order."""
    out = []
    for path in files:
        store.import_jsonl(path)
        p = Processor(store, name="desk", snapshots=snapshots)
        p.catch_up()
        out.append(p)
    return out


@pytest.mark.parametrize("kept_at", ["stops", "rebuilds"])
def test_a_restart_folds_from_the_snapshot_and_decides_the_same(
    fresh_store: Store,
    make_database: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    kept_at: str,
) -> None:
    """Four starts, each after more of the sample came in, from snapshots kept at the
    stops before (the running processor's state, as a rebuild has it), or only at the
    rebuilds: the same effects as processors that rebuild from the whole history, and
    the same state at the end."""
    if kept_at == "rebuilds":
        monkeypatch.setattr(Processor, "_keep_at_stop", lambda self: None)
    files = _parts(tmp_path, 4)
    caplog.set_level(logging.INFO, logger="riskbook.live")
    with_snapshots = _run(fresh_store, files, snapshots=True)
    used = [
        r.getMessage() for r in caplog.records if "rebuilding from its snapshot" in r.getMessage()
    ]
    # at stops: every start after the first; at rebuilds: the third and the fourth
    assert len(used) == (3 if kept_at == "stops" else 2)
    kept = list((tmp_path / "cache").rglob("*.snapshot"))
    assert len(kept) == 1  # one per store and name, replaced

    with Store(make_database()) as control:
        without = _run(control, files, snapshots=False)
        assert (tmp_path / "cache" / _store_id(fresh_store)).is_dir()
        assert not list((tmp_path / "cache" / _store_id(control)).rglob("*.snapshot"))
        for a, b in zip(with_snapshots, without, strict=True):
            assert _effects(a) == _effects(b)
        assert sum(sum(_effects(p).values()) for p in without) >= 5
        assert any(k[0] == "AccountBlocked" for p in without[1:] for k in _effects(p))
    # a restart now, from the snapshot and from the whole history: the same state, and
    # the one the processor had when it stopped
    restarts = [Processor(fresh_store, name="desk", snapshots=s) for s in (True, False)]
    for p in restarts:
        p.catch_up()
    assert _state(restarts[0].engine) == _state(restarts[1].engine)
    assert _state(restarts[1].engine) == _state(with_snapshots[-1].engine)


def _store_id(store: Store) -> str:
    with store.connection() as conn:
        return str(conn.execute("SELECT store_id FROM riskbook_store").fetchone()[0])  # type: ignore[index]


def _kept(tmp_path: Path) -> Path:
    (path,) = list((tmp_path / "cache").rglob("*.snapshot"))
    return path


def _rewrite(path: Path, change: Any) -> None:
    """Change the snapshot at ``path`` (``change(header, snapshot)`` -> new ones)."""
    with open(path, "rb") as f:
        magic, header, body = f.readline(), json.loads(f.readline()), f.read()
    header, body = change(header, body)
    path.write_bytes(magic + json.dumps(header).encode() + b"\n" + body)


def _not_used(store: Store, caplog: pytest.LogCaptureFixture, **kwargs: Any) -> str:
    caplog.clear()
    Processor(store, name="desk", **kwargs).catch_up()
    (why,) = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
    return why


def test_a_snapshot_that_does_not_fit_is_not_used_and_the_rebuild_is_whole(
    fresh_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="riskbook.live")
    _run(fresh_store, _parts(tmp_path, 2), snapshots=True)
    path = _kept(tmp_path)
    assert path.stat().st_mode & 0o077 == 0

    assert "made with another critical" in _not_used(fresh_store, caplog, critical=1.5)
    # each rebuild that could not use it kept its own: now with critical 1.5
    args: dict[str, Any] = {"critical": 1.5, "types": ["MaxLeverage"]}
    assert "made with another types" in _not_used(fresh_store, caplog, **args)

    def damage(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        middle = len(body) // 2
        return header, body[:middle] + bytes([body[middle] ^ 1]) + body[middle + 1 :]

    _rewrite(path, damage)
    assert "do not match their digest" in _not_used(fresh_store, caplog, **args)

    def torn(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        return header, body[: len(body) // 3]

    _rewrite(path, torn)
    assert "do not match their digest" in _not_used(fresh_store, caplog, **args)

    def other_code(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        return dict(header, code="0" * 64), body

    _rewrite(path, other_code)
    assert "made with another code" in _not_used(fresh_store, caplog, **args)

    snapshot, why = _snapshot.load(path, _key_of(path))
    assert snapshot is not None, why
    snapshot.last_event_id = "00000000-0000-0000-0000-000000000000"
    _snapshot.save(path, snapshot, _key_of(path))
    assert "no longer holds the event it ended with" in _not_used(fresh_store, caplog, **args)
    caplog.clear()
    Processor(fresh_store, name="desk", **args).catch_up()
    assert any("rebuilding from its snapshot" in r.getMessage() for r in caplog.records)


def _key_of(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        f.readline()
        header = json.loads(f.readline())
    return {k: v for k, v in header.items() if k != "horizon"}


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this must never run",))


def test_a_snapshot_loads_nothing_but_an_engine(tmp_path: Path, capsys: Any) -> None:
    """Its digest right, a snapshot that names any other callable is refused, and
    nothing of it runs."""
    engine = Engine()
    engine.pending = {"ACC-1": _Boom()}  # type: ignore[dict-item]
    inside = pickle.dumps(_snapshot.Snapshot(engine, 1, "x"))
    for payload in (pickle.dumps(_Boom()), inside, pickle.dumps(Path("/etc/passwd"))):
        key = {"format": 1}
        path = tmp_path / "x.snapshot"
        trailer = _snapshot._trailer(hashlib.sha256(payload).hexdigest(), len(payload))
        path.write_bytes(b"riskbook-engine-snapshot\n" + json.dumps(key).encode() + b"\n"
                         + payload + trailer)  # fmt: skip
        snapshot, why = _snapshot.load(path, key)
        assert snapshot is None
        assert "does not unpickle" in why
    assert "must never run" not in capsys.readouterr().out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_an_engine_kept_and_read_back_folds_on_as_the_one_kept(
    data: st.DataObject, tmp_path: Path
) -> None:
    envelopes = data.draw(streams(late=True))
    cut = data.draw(st.integers(1, len(envelopes) - 1))
    first, rest = History.from_envelopes(envelopes[:cut]), History.from_envelopes(envelopes[cut:])
    engine = Engine()
    engine.apply(first, written=False)
    path = tmp_path / "e.snapshot"
    key = _snapshot.key(engine, "store", "name")
    pieces = data.draw(st.sampled_from([1, 3, 16, _snapshot._PIECE_ROWS]))
    with pytest.MonkeyPatch.context() as mp:  # long frames and series go in pieces of this
        mp.setattr(_snapshot, "_PIECE_ROWS", pieces)
        _snapshot.save(path, _snapshot.Snapshot(engine, 1, "x"), key)
    back, why = _snapshot.load(path, key)
    assert back is not None, why
    p = engine.projection
    if pieces == 1 and any(f.height > 1 for f in (p.positions, p.accounts, p.marks, p.days)):
        # every frame of more than one row went in pieces: read back whole
        with path.open("rb") as f:
            assert b"_frame_of_pieces" in f.read()
    assert _state(back.engine) == _state(engine)
    assert back.engine.as_rebuilt()[1] == engine.as_rebuilt()[1]

    def keys(effects: list[Any]) -> list[tuple[Any, ...]]:
        return [(e.kind, e.causation_id, e.limit_type, e.value) for e in effects]

    assert keys(back.engine.apply(rest)) == keys(engine.apply(rest))
    assert _state(back.engine) == _state(engine)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_running_engine_as_rebuilt_is_the_rebuild(data: st.DataObject) -> None:
    """An engine folding batches with its effects written (its blocks block at once),
    taken as a rebuild has it, is the state and the blocks decided of one fold of the
    same events with ``written=False``."""
    envelopes = data.draw(streams(late=True))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(envelopes) - 1), max_size=5))))
    running = Engine(critical=data.draw(st.sampled_from([1.0, 1.2, 2.0])))
    for lo, hi in itertools.pairwise([0, *cuts, len(envelopes)]):
        running.apply(History.from_envelopes(envelopes[lo:hi]))
    rebuild = Engine(critical=running.critical)
    decided = rebuild.apply(History.from_envelopes(envelopes), written=False)
    as_rebuilt, blocks = running.as_rebuilt()
    got, want = _state(as_rebuilt), _state(rebuild)
    for name in want:
        assert (name, got[name]) == (name, want[name])
    # (account, trigger): one for the blocks a trigger decides for several limit types
    assert blocks == sorted({(e.account_id, e.causation_id) for e in decided
                             if e.kind == "AccountBlocked"})  # fmt: skip
    assert rebuild.as_rebuilt()[1] == blocks


def test_a_processor_stopped_keeps_its_state_for_the_next_start(
    fresh_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="riskbook.live")
    (path,) = _parts(tmp_path, 1)
    fresh_store.import_jsonl(path)
    running = Processor(fresh_store, name="desk").start()

    def caught_up() -> bool:  # its own effects read back too (or the next start reads them)
        horizon = running.engine.horizon
        with fresh_store.connection() as conn:
            left = conn.execute("SELECT count(*) FROM events WHERE position >= %s", (horizon,))
            return running.engine.events_seen >= 3_000 and left.fetchone()[0] == 0  # type: ignore[index]

    deadline = time.monotonic() + 60
    while not caught_up() and time.monotonic() < deadline:
        time.sleep(0.05)
    running.stop(timeout=60)
    assert not running.running
    assert any("kept a snapshot" in r.getMessage() for r in caplog.records)
    caplog.clear()
    again = Processor(fresh_store, name="desk")
    again.catch_up()
    assert again.rebuilt is not None and "then 0 events folded" in again.rebuilt, again.rebuilt
    assert _state(again.engine) == _state(running.engine)


def test_riskbook_live_says_it_rebuilds_from_its_snapshot(
    fresh_store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from riskbook.cli import main

    files = _parts(tmp_path, 3)
    for path in files:
        fresh_store.import_jsonl(path)
        assert main(["live", "--once", "--name", "desk", "--dsn", fresh_store.dsn]) == 0
    err = capsys.readouterr().err
    rebuilt = [line for line in err.splitlines() if "rebuilt the state" in line]
    assert len(rebuilt) == 2, err  # the first start had nothing to rebuild
    assert all("from its snapshot at position" in line for line in rebuilt), err


def test_a_stop_keeps_a_snapshot_only_when_a_rebuild_would_take_a_while(
    fresh_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain events cost a rebuild little, busts much (each refolds its account): a
    stop after a few hundred plain events keeps nothing; after 25 busts it keeps one."""
    monkeypatch.setattr(_processor, "_KEEP_AFTER", 1.0)
    for i in range(200):
        fresh_store.append("ACC-1", [trade("ACC-1", "Buy", 1.0, i)])
    Processor(fresh_store, name="desk").catch_up()
    assert not list((tmp_path / "cache").rglob("*.snapshot"))
    for i in range(25):
        t = trade("ACC-1", "Buy", 1.0, 300 + i)
        cancel = TradeCancelled(trade_id=t.trade_id, account_id="ACC-1", reason="bust",
                                cancelled_at=T0 + timedelta(minutes=300 + i))  # fmt: skip
        fresh_store.append("ACC-1", [t, cancel])
    p = Processor(fresh_store, name="desk")
    p.catch_up()
    assert p.rebuilt is not None and "events folded" in p.rebuilt
    assert len(list((tmp_path / "cache").rglob("*.snapshot"))) == 1


def test_a_killed_processor_restarts_from_the_snapshot_it_kept_while_running(
    fresh_store: Store,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`riskbook live --snapshot-after 0` keeps snapshots in the background while it
    runs; killed with SIGKILL (no clean stop, so no snapshot at a stop), the next start
    folds from the last one it kept, to the state a full rebuild gives."""
    from riskbook.limits import BUILT_INS, _registry

    # the limit types of the command's process: other tests of this one registered more
    # (a snapshot of other definitions is not used, rightly)
    monkeypatch.setattr(_registry, "_registry", {d.name: d for d in BUILT_INS})
    files = _parts(tmp_path, 3)
    live = subprocess.Popen(
        [sys.executable, "-m", "riskbook.cli", "live", "--name", "desk", "--snapshot-after",
         "0", "--dsn", fresh_store.dsn],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for path in files:
            fresh_store.import_jsonl(path)
            time.sleep(0.5)  # batches apart: snapshots kept between them

        def done() -> bool:  # everything processed, its own effects read back, one kept
            with fresh_store.connection() as conn:
                head = conn.execute("SELECT max(position) FROM events").fetchone()[0]  # type: ignore[index]
                row = conn.execute(
                    "SELECT position FROM processor_checkpoints WHERE name = 'desk'"
                ).fetchone()
            kept = list((tmp_path / "cache").rglob("*.snapshot"))
            header = _snapshot.header(kept[0]) if kept else None
            return (
                row is not None
                and row[0] > head
                and header is not None
                and (header["horizon"] > head)
            )

        deadline = time.monotonic() + 120
        while not done():
            assert live.poll() is None, live.stderr.read() if live.stderr else ""
            assert time.monotonic() < deadline, "the processor did not catch up and keep one"
            time.sleep(0.1)
    finally:
        live.kill()  # SIGKILL: no stop, nothing kept at one
        _, err = live.communicate()
    assert "kept a snapshot of the state at position" in err and "while running" in err, err
    kept = _kept(tmp_path)
    horizon = _snapshot.header(kept)["horizon"]  # type: ignore[index]
    again = Processor(fresh_store, name="desk")
    caplog.set_level(logging.INFO, logger="riskbook.live")
    again.catch_up()
    assert again.rebuilt is not None
    assert f"from its snapshot at position {horizon}, then 0 events folded" in again.rebuilt, (
        caplog.text  # why it was not used
    )
    whole = Processor(fresh_store, name="desk", snapshots=False)
    whole.catch_up()
    assert "from its snapshot" not in (whole.rebuilt or "")
    assert _state(again.engine) == _state(whole.engine)


def test_snapshot_after_must_be_seconds(fresh_store: Store) -> None:
    with pytest.raises(ValueError, match="snapshot_after must be seconds"):
        Processor(fresh_store, snapshot_after=-1.0)
    out = subprocess.run(
        [sys.executable, "-m", "riskbook.cli", "live", "--snapshot-after", "soon"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "must be seconds >= 0 or 'never'" in out.stderr


def test_batches_go_on_while_a_snapshot_is_kept(
    fresh_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot of a running processor is written in a thread of its own: held up
    in the middle of writing it, the processor still folds and commits new batches; a
    stop waits for it, then keeps the state it stopped with."""
    gate, saving = threading.Event(), threading.Event()
    save = _snapshot.save

    def held_up(*args: Any, **kwargs: Any) -> int:
        saving.set()
        gate.wait(60)
        return save(*args, **kwargs)

    monkeypatch.setattr(_snapshot, "save", held_up)
    p = Processor(fresh_store, name="desk", snapshot_after=0.0).start()
    try:
        fresh_store.append("ACC-1", [trade("ACC-1", "Buy", 1.0, 0)])
        assert saving.wait(30), "no snapshot was started"
        assert p.running and p._keeper is not None and p._keeper.is_alive()
        for i in range(1, 6):
            fresh_store.append("ACC-1", [trade("ACC-1", "Buy", 1.0, i)])
        deadline = time.monotonic() + 30
        while p.engine.events_seen < 6:
            assert time.monotonic() < deadline, "no batch went through while it was kept"
            time.sleep(0.02)
        assert p._keeper is not None and p._keeper.is_alive()  # still held up
    finally:
        gate.set()
        p.stop(timeout=60)
    assert not p.running and p.error is None
    assert _snapshot.header(_kept(tmp_path))["horizon"] == p.engine.horizon  # type: ignore[index]


def test_a_snapshot_that_cannot_be_kept_while_running_is_not_tried_after_every_batch(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tries: list[int] = []

    def full(*args: Any, **kwargs: Any) -> int:
        tries.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_snapshot, "save", full)
    caplog.set_level(logging.WARNING, logger="riskbook.live")
    p = Processor(fresh_store, name="desk", snapshot_after=0.0).start()
    try:
        for i in range(8):  # batches apart
            fresh_store.append("ACC-1", [trade("ACC-1", "Buy", 1.0, i)])
            deadline = time.monotonic() + 30
            while p.engine.events_seen < i + 1:
                assert time.monotonic() < deadline and p.error is None
                time.sleep(0.02)
        running_tries = len(tries)
    finally:
        p.stop(timeout=60)  # (a stop tries once more)
    assert p.error is None and p.engine.events_seen == 8
    assert running_tries == 1  # then none until a minute's worth of rebuild more
    assert "No space left on device" in caplog.text


@pytest.mark.parametrize(("share", "most"), [(0.05, 1), (1.0, 99)])
def test_snapshots_while_running_take_a_small_share_of_the_time(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch, share: float, most: int
) -> None:
    """A snapshot that takes 0.2 s to write is followed by the next one no sooner than
    3.8 s later (5% of the time writing): over 1.5 s of batches, one is kept; with no
    such share (1.0), one after the other."""
    save, saves = _snapshot.save, []

    def slow(*args: Any, **kwargs: Any) -> int:
        time.sleep(0.2)
        saves.append(time.monotonic())
        return save(*args, **kwargs)

    monkeypatch.setattr(_snapshot, "save", slow)
    monkeypatch.setattr(_processor, "_KEEP_SHARE", share)
    p = Processor(fresh_store, name="desk", snapshot_after=0.0).start()
    try:
        ends = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < ends:
            fresh_store.append("ACC-1", [trade("ACC-1", "Buy", 1.0, i)])
            i += 1
            time.sleep(0.05)
        during = len(saves)
    finally:
        p.stop(timeout=60)
    assert p.error is None
    assert 1 <= during <= most
    if share == 1.0:
        assert during >= 3, saves
