"""The bulk import into an empty store, cut into many chunks (sent and filled on a
second thread while the file is read): the same guarantees as one chunk."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

import riskbook
from riskbook.store import Store, eventstore

T0 = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventstore, "_CHUNK_ROWS", 4)


def _lines(n: int, accounts: int = 3) -> list[bytes]:
    out = []
    for i in range(n):
        acc = f"ACC-{i % accounts}"
        payload = riskbook.TradeExecuted(
            trade_id=f"T-{i}",
            account_id=acc,
            symbol="AAPL",
            side=riskbook.Side.Buy,
            quantity=1.0 + i,
            price=10.25,
            executed_at=T0 + timedelta(seconds=i),
        )
        env = riskbook.Envelope(
            event_id=uuid.uuid5(uuid.NAMESPACE_OID, f"extra/{i}"),
            aggregate_id=acc,
            aggregate_type="Account",
            sequence=0,
            timestamp=T0 + timedelta(seconds=i, milliseconds=3),
            payload=payload,
            correlation_id=f"c-{i}",
        )
        d = env.to_dict()
        del d["sequence"]
        out.append(msgspec.json.encode(d))
    return out


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _typed_rows(store: Store) -> list[tuple[object, ...]]:
    with store.connection() as conn:
        return conn.execute(
            "SELECT position, event_id, sequence, quantity FROM event_fields ORDER BY position"
        ).fetchall()


def test_many_chunks_keep_order_sequences_fields_and_chain(
    small_chunks: None, fresh_store: Store, tmp_path: Path
) -> None:
    lines = _lines(23)  # five chunks of 4 and a last one of 3
    result = fresh_store.import_jsonl(_write(tmp_path / "h.jsonl", lines))
    assert (result.read, result.added) == (23, 23)
    envs = fresh_store.read_all()
    assert [e.event_id for e in envs] == [
        uuid.UUID(msgspec.json.decode(line)["event_id"]) for line in lines
    ]
    assert [e.sequence for e in fresh_store.read("ACC-1")] == list(range(1, 9))
    rows = _typed_rows(fresh_store)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (e.position, e.event_id, e.sequence) for e in envs
    ]
    assert [r[3] for r in rows] == [1.0 + i for i in range(23)]
    assert riskbook.verify(fresh_store).ok
    again = fresh_store.import_jsonl(tmp_path / "h.jsonl")
    assert (again.added, again.skipped) == (0, 23)
    # the store is usable as ever afterwards: an append continues the chain
    fresh_store.append("ACC-1", [msgspec.structs.replace(envs[1].payload, trade_id="T-new")])  # type: ignore[type-var]
    assert riskbook.verify(fresh_store).ok


@pytest.mark.parametrize("bad_at", [2, 9, 22])
def test_a_bad_line_in_a_later_chunk_writes_nothing(
    small_chunks: None, fresh_store: Store, tmp_path: Path, bad_at: int
) -> None:
    lines = _lines(23)
    d = msgspec.json.decode(lines[bad_at])
    d["payload"]["quantity"] = -1
    lines[bad_at] = msgspec.json.encode(d)
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(_write(tmp_path / "bad.jsonl", lines))
    assert f"line {bad_at + 1}: TradeExecuted.payload.quantity" in str(info.value)
    assert fresh_store.count() == 0
    assert _typed_rows(fresh_store) == []
    # and the store takes the good file afterwards, on the same road
    good = fresh_store.import_jsonl(_write(tmp_path / "good.jsonl", _lines(23)))
    assert good.added == 23 and riskbook.verify(fresh_store).ok


def test_fast_and_reference_readings_agree(tmp_path: Path) -> None:
    # the fast reading of a line makes the record the reference reading makes
    lines = _lines(5)
    d = msgspec.json.decode(lines[0])
    d["metadata"] = {"b": [1, 2.5], "a": "x\ny"}
    d["causation_id"] = str(uuid.uuid4())
    d["timestamp"] = "2024-03-01T10:30:00.5+01:00"
    lines[0] = msgspec.json.encode(d)
    fast = list(eventstore._records_from_lines(lines, "x", None))
    slow = [eventstore._checked_record(n, line, "x") for n, line in enumerate(lines, 1)]
    assert fast == slow
    assert fast[0][3][4] == "2024-03-01T09:30:00.500000Z"


def test_both_readings_cut_times_finer_than_a_microsecond(tmp_path: Path) -> None:
    # msgspec rounded them: 23:59:59.9999999 became the next day, on both roads
    lines = _lines(4)
    for n, (recorded, executed) in enumerate(
        [
            ("2024-03-01T23:59:59.9999999Z", "2024-03-01T23:59:59.99999999Z"),
            ("2024-03-02T00:59:59.9999995+01:00", "2024-03-01 23:59:59.1234567z"),
        ]
    ):
        d = msgspec.json.decode(lines[n])
        d["timestamp"], d["payload"]["executed_at"] = recorded, executed
        d["payload"]["price"] = 10.1234567  # seven digits, no time: kept
        lines[n] = msgspec.json.encode(d)
    text: Any = lines[1].decode()
    lines[2] = text  # a text line (import_lines takes them): the other road of the fast one
    fast = list(eventstore._records_from_lines(lines, "x", None))
    slow = [eventstore._checked_record(n, line, "x") for n, line in enumerate(lines, 1)]
    assert fast == slow
    values = [(r[3][4], msgspec.json.decode(r[3][8])) for r in fast[:3]]
    assert [(t, p["executed_at"], p["price"]) for t, p in values] == [
        ("2024-03-01T23:59:59.999999Z", "2024-03-01T23:59:59.999999Z", 10.1234567),
        ("2024-03-01T23:59:59.999999Z", "2024-03-01T23:59:59.123456Z", 10.1234567),
        ("2024-03-01T23:59:59.999999Z", "2024-03-01T23:59:59.123456Z", 10.1234567),
    ]


def test_a_mismatched_event_type_is_told_as_before(tmp_path: Path) -> None:
    lines = _lines(3)
    d = msgspec.json.decode(lines[1])
    d["event_type"] = "PriceMarked"
    lines[1] = msgspec.json.encode(d)
    with pytest.raises(riskbook.ImportFailed) as info:
        list(eventstore._records_from_lines(lines, "f", None))
    assert str(info.value) == (
        "f: line 2: TradeExecuted.event_type: 'PriceMarked' does not match the payload type "
        "'TradeExecuted'"
    ), str(info.value)


def test_a_line_that_is_not_utf8_is_refused_with_its_number(
    fresh_store: Store, tmp_path: Path
) -> None:
    # bytes that are not UTF-8 inside a string: msgspec raises UnicodeDecodeError, which
    # once escaped both readings as a bare exception instead of an ImportFailed
    lines = _lines(4)
    lines[2] = lines[2].replace(b'"ACC-2"', b'"ACC-\xb82"', 1)
    with pytest.raises(riskbook.InvalidEvent, match="line: not valid UTF-8"):
        riskbook.events.decode_envelope(lines[2])
    with pytest.raises(riskbook.ImportFailed, match=r"line 3: .*not valid UTF-8"):
        fresh_store.import_jsonl(_write(tmp_path / "latin.jsonl", lines))
    assert fresh_store.count() == 0


def test_a_forged_repeat_or_a_taken_sequence_in_a_later_chunk_writes_nothing(
    small_chunks: None, fresh_store: Store, tmp_path: Path
) -> None:
    # the empty store's road finds the repeat when it builds the unique indexes, then
    # hands over to the general one, which must tell it by line and field
    lines = _lines(23)
    forged = msgspec.json.decode(lines[2])
    forged["timestamp"] = "2030-01-01T00:00:00.000000Z"
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(
            _write(tmp_path / "forged.jsonl", [*lines, msgspec.json.encode(forged)])
        )
    assert f"line 24: event_id {forged['event_id']} appears on line 3 with different content " in (
        str(info.value)
    ), str(info.value)
    assert "(timestamp differs)" in str(info.value)
    with_seq = []
    for n, line in enumerate(lines):
        d = msgspec.json.decode(line)
        d["sequence"] = n // 3 + 1  # ACC-0, ACC-1, ACC-2 in turn: 1, 1, 1, 2, 2, 2, ...
        with_seq.append(d)
    with_seq[21]["sequence"] = 3  # ACC-0 gets 3 on line 22 again (line 7 had it)
    with pytest.raises(riskbook.ImportFailed) as info:
        fresh_store.import_jsonl(
            _write(tmp_path / "taken.jsonl", [msgspec.json.encode(d) for d in with_seq])
        )
    assert "line 22: aggregate 'ACC-0' sequence 3 is given on line 7 too, to another event" in (
        str(info.value)
    ), str(info.value)
    assert fresh_store.count() == 0 and _typed_rows(fresh_store) == []


def wait_for_a_lock(
    monitor: psycopg.Connection, thread: threading.Thread, seconds: float, what: str
) -> None:
    """Until a session of the monitor's database waits for a lock (or ``thread`` ends)."""
    deadline = time.monotonic() + seconds
    while thread.is_alive():
        row = monitor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ).fetchone()
        if row and row[0]:
            return
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _import_held_by_an_append(
    store: Store, path: Path, account: str, then: str | None = None
) -> tuple[riskbook.ImportResult | None, BaseException | None]:
    """Import ``path`` while another session's append to ``account`` is in flight: the
    import's insert waits for that session's row; the session appends to ``then`` too
    (if given), then commits."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = store.import_jsonl(path)
        except BaseException as exc:  # told to the test
            out["error"] = exc

    def fund(account: str) -> list[riskbook.Event]:
        return [riskbook.AccountFunded(account_id=account, amount=5.0, funded_at=T0)]

    with store.connection() as writer, psycopg.connect(store.dsn, autocommit=True) as monitor:
        store.append_in(writer, account, fund(account))
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_for_a_lock(monitor, thread, 10, "the import never waited for the append")
        if then is not None:
            store.append_in(writer, then, fund(then))
        writer.commit()
    thread.join(20)
    assert not thread.is_alive()
    return out.get("result"), out.get("error")


def test_an_import_goes_after_an_append_that_overtook_it(
    fresh_store: Store, tmp_path: Path
) -> None:
    # The append committed while the import inserted after ACC-1's head as it was when
    # its insert began: the import failed, saying another session "wrote the same
    # events" (no one had), and failed again while anything appended to ACC-1.
    s = fresh_store
    s.append("ACC-1", [riskbook.AccountFunded(account_id="ACC-1", amount=1.0, funded_at=T0)])
    path = _write(tmp_path / "h.jsonl", _lines(6))  # ACC-0, ACC-1, ACC-2: two each
    result, error = _import_held_by_an_append(s, path, "ACC-1")
    assert error is None, error
    assert result is not None and (result.read, result.added) == (6, 6)
    stored = s.read("ACC-1")
    assert [e.sequence for e in stored] == [1, 2, 3, 4]
    assert [e.event_type for e in stored] == ["AccountFunded"] * 2 + ["TradeExecuted"] * 2
    assert s.count() == 8
    # A sequence the file gives, taken by the append meanwhile, is still refused by line.
    given: list[bytes] = []
    for line in _lines(2, accounts=1):  # ACC-0's 1 and 2 (the two above are 1 and 2)
        d = msgspec.json.decode(line)
        d["event_id"] = str(uuid.uuid4())
        d["payload"]["trade_id"] += "-b"
        d["sequence"] = len(given) + 3
        given.append(msgspec.json.encode(d))
    result, error = _import_held_by_an_append(s, _write(tmp_path / "g.jsonl", given), "ACC-0")
    assert isinstance(error, riskbook.ImportFailed), (result, error)
    assert "line 1: aggregate 'ACC-0' already has sequence 3 (stored event " in str(error)
    assert s.count() == 9 and s.version("ACC-0") == 3


def test_an_import_in_a_deadlock_with_a_writer_tries_again(
    fresh_store: Store, tmp_path: Path
) -> None:
    # The import holds ACC-0's next sequence and waits for the writer's ACC-1; the writer
    # then waits for ACC-0: a deadlock, the import its victim (it waited first). It
    # failed ("deadlock detected"); its savepoint gives the writer way, and it tries again.
    s = fresh_store
    for account in ("ACC-0", "ACC-1"):
        s.append(account, [riskbook.AccountFunded(account_id=account, amount=1.0, funded_at=T0)])
    path = _write(tmp_path / "h.jsonl", _lines(4, accounts=2))  # ACC-0, ACC-1, ACC-0, ACC-1
    result, error = _import_held_by_an_append(s, path, "ACC-1", then="ACC-0")
    assert error is None, error
    assert result is not None and result.added == 4
    for account in ("ACC-0", "ACC-1"):
        stored = s.read(account)
        assert [e.sequence for e in stored] == [1, 2, 3, 4]
        assert [e.event_type for e in stored][2:] == ["TradeExecuted"] * 2


def test_an_import_overtaken_every_time_says_by_what(
    monkeypatch: pytest.MonkeyPatch, fresh_store: Store, tmp_path: Path
) -> None:
    monkeypatch.setattr(eventstore, "_IMPORT_TRIES", 1)
    s = fresh_store
    s.append("ACC-1", [riskbook.AccountFunded(account_id="ACC-1", amount=1.0, funded_at=T0)])
    path = _write(tmp_path / "h.jsonl", _lines(6))
    result, error = _import_held_by_an_append(s, path, "ACC-1")
    assert isinstance(error, riskbook.ImportFailed), (result, error)
    assert str(error) == (
        f"{path}: another session wrote to aggregate 'ACC-1' meanwhile, overtaking the "
        "import's insert 1 time; nothing was written: import again"
    )
    assert s.count() == 2
