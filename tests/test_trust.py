"""Trust: hash chains and ``riskbook verify``, least-privilege roles, secrets kept out of
every message (issue 9). Real PostgreSQL, no mocks; tampering is done the way a
superuser would do it, with the append-only trigger disabled."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import riskbook
from riskbook import cli, simulate
from riskbook.errors import StoreError
from riskbook.events import Envelope, chain_hash, encode_envelope, event_digest
from riskbook.store import Store, migrations, roles
from riskbook.verify import _FUNCTIONS, VerifyReport, _installed_functions, read_heads

T0 = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)


def funded(account: str, amount: float = 100.0, i: int = 0) -> riskbook.AccountFunded:
    return riskbook.AccountFunded(
        account_id=account, amount=amount, funded_at=T0 + timedelta(seconds=i)
    )


def trade(account: str, i: int, qty: float = 10.0) -> riskbook.TradeExecuted:
    return riskbook.TradeExecuted(
        trade_id=f"T-{i}",
        account_id=account,
        symbol="AAPL",
        side=riskbook.Side.Buy,
        quantity=qty,
        price=10.5 + i,
        executed_at=T0 + timedelta(minutes=i),
    )


def stored_hashes(store: Store, aggregate: str) -> list[bytes]:
    with psycopg.connect(store.dsn) as conn:
        rows = conn.execute(
            "SELECT hash FROM events WHERE aggregate_id = %s ORDER BY sequence", (aggregate,)
        )
        return [bytes(r[0]) for r in rows]


def recomputed(store: Store, aggregate: str) -> list[bytes]:
    """The chain from the envelopes as read, by riskbook.events' definition."""
    out, previous = [], b""
    for env in store.read(aggregate):
        previous = chain_hash(previous, event_digest(env))
        out.append(previous)
    return out


def as_superuser(store: Store, *statements: str) -> None:
    """What the append-only triggers are there to stop: a superuser who disables them."""
    with psycopg.connect(store.dsn) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER USER")
        conn.execute("ALTER TABLE event_fields DISABLE TRIGGER USER")
        for statement in statements:
            conn.execute(statement.encode())
        conn.execute("ALTER TABLE events ENABLE TRIGGER USER")
        conn.execute("ALTER TABLE event_fields ENABLE TRIGGER USER")
        conn.commit()


def envelope_line(agg: str, i: int, **kw: object) -> bytes:
    env = Envelope(
        event_id=uuid.uuid4(),
        aggregate_id=agg,
        aggregate_type="Account",
        sequence=i + 1,
        timestamp=T0 + timedelta(seconds=i, microseconds=7),
        payload=funded(agg, 1.0 + i, i),
        correlation_id="import",
        metadata={"source": "legacy", "n": [1, 2.5e-7, 1e16], "é": 'q"\\\t'},
        **kw,  # type: ignore[arg-type]
    )
    return encode_envelope(env)


# ----------------------------------------------------------------------- the chain


def test_every_write_path_chains_what_verify_and_python_recompute(fresh_store: Store) -> None:
    store = fresh_store
    store.append("A", [funded("A")], expected_version=0, metadata={"k": 1e16, "s": "x\ny"})
    store.append("A", [trade("A", i) for i in range(1, 4)], expected_version=1)
    store.append("A", [trade("A", 9)], causation_id=uuid.uuid4(), correlation_id="c-1")
    with store.connection() as conn:  # the live processor's way: inside its transaction
        store.append_in(conn, "B", [funded("B"), trade("B", 1)])
        conn.commit()
    store.import_lines([envelope_line("C", i) for i in range(3)])  # into a non-empty store
    with psycopg.connect(store.dsn) as conn:  # raw SQL, no hash: the trigger chains it
        conn.execute(
            "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
            " correlation_id, payload) VALUES (gen_random_uuid(), 'MarginCalled', 'B',"
            " 'Account', 3, 'c', '{\"type\": \"MarginCalled\", \"amount\": 1.50}')"
        )
        conn.commit()
    report = riskbook.verify(store)
    assert report.ok, report
    assert (report.events, report.aggregates) == (11, 3)
    for agg in "AC":  # (B's raw 1.50 reads back as the float 1.5: verify hashes stored text)
        assert stored_hashes(store, agg) == recomputed(store, agg)
    assert report.heads["B"] == (3, stored_hashes(store, "B")[-1].hex())


def test_fast_and_general_imports_chain_alike(make_database: Callable[[], str]) -> None:
    lines = [envelope_line(agg, i) for i in range(4) for agg in ("A", "B")]
    empty, busy = Store(make_database()), Store(make_database())
    try:
        busy.append("Z", [funded("Z")])
        assert empty.import_lines(lines).added == busy.import_lines(lines).added == 8
        query = "SELECT event_id, hash FROM events WHERE aggregate_id <> 'Z' ORDER BY event_id"
        with psycopg.connect(empty.dsn) as a, psycopg.connect(busy.dsn) as b:
            assert a.execute(query).fetchall() == b.execute(query).fetchall()
        assert riskbook.verify(empty).ok and riskbook.verify(busy).ok
        assert empty.import_lines(lines).added == 0  # and a re-import adds nothing
    finally:
        empty.close()
        busy.close()


def test_the_simulators_trusted_copy_is_chained(fresh_store: Store) -> None:
    simulate.stream_to_store(fresh_store, seed=3, events=3_000)
    report = riskbook.verify(fresh_store)
    assert report.ok and report.events == fresh_store.count()
    some = next(iter(report.heads))
    assert stored_hashes(fresh_store, some) == recomputed(fresh_store, some)


def copy_row(event_id: str, seq: int, recorded: str, causation: str = "\\N") -> bytes:
    """A :meth:`Store.trusted_copy` row of aggregate A."""
    payload = (
        '{"type":"AccountFunded","account_id":"A","amount":1.5,'
        '"funded_at":"2024-01-01T00:00:00.000000Z"}'
    )
    fields = [event_id, "AccountFunded", "A", "Account", str(seq), recorded, causation]
    return "\t".join([*fields, "c", "{}", payload]).encode() + b"\n"


def test_a_trusted_copy_hashes_ids_and_times_as_the_server_stores_them(
    fresh_store: Store,
) -> None:
    ids = [uuid.uuid4() for _ in range(6)]
    cause = uuid.uuid4()
    rows = [  # (event_id as given, recorded time as given, causation as given)
        (str(ids[0]).upper(), "2024-03-01T09:30:00.000001Z", str(cause).upper()),
        (ids[1].hex, "2024-03-01T24:00:00.000000Z", "{" + str(cause) + "}"),
        ("{" + str(ids[2]).upper() + "}", "2024-03-01T23:59:60Z", "\\N"),
        (str(ids[3]), "2024-03-01T09:30:00.1234567+05:45", "\\N"),
    ]
    later = [  # into a store that is no longer empty (the other road of trusted_copy)
        (ids[4].hex.upper(), "2024-12-31T24:00:00Z", ids[0].hex.upper()),
        (str(ids[5]), "2024-03-01 09:30:00.9999995-01:00", "\\N"),
    ]
    for batch, first in ((rows, 1), (later, len(rows) + 1)):
        with fresh_store.trusted_copy() as write:
            write([copy_row(e, seq, t, c) for seq, (e, t, c) in enumerate(batch, first)])
    report = riskbook.verify(fresh_store)
    assert report.ok, report
    stored = fresh_store.read("A")
    assert [env.event_id for env in stored] == ids
    assert [env.causation_id for env in stored] == [cause, cause, None, None, ids[0], None]
    assert [env.timestamp for env in stored] == [
        datetime(2024, 3, 1, 9, 30, 0, 1, tzinfo=UTC),
        datetime(2024, 3, 2, tzinfo=UTC),  # 24:00 is the next midnight
        datetime(2024, 3, 2, tzinfo=UTC),  # second 60 the next minute
        datetime(2024, 3, 1, 3, 45, 0, 123457, tzinfo=UTC),  # rounded, as the server does
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2024, 3, 1, 10, 30, 1, tzinfo=UTC),
    ]
    assert stored_hashes(fresh_store, "A") == recomputed(fresh_store, "A")


@pytest.mark.parametrize(
    ("event_id", "recorded", "causation", "refusal"),
    [
        ("not-a-uuid", "2024-03-01T09:30:00.000000Z", "\\N", "event_id 'not-a-uuid' is not a UUID"),
        (None, "2024-03-01T09:30:00.000000Z", "12345", "causation_id '12345' is not a UUID"),
        (None, "2024-03-01T09:30:00", "\\N", "is not an RFC 3339 time with a zone"),
        (None, "2024-03-01T24:00:00.000001Z", "\\N", "is out of range"),
        (None, "2024-02-30T09:30:00+01:00", "\\N", "is out of range"),
        (None, "9999-12-31T23:30:00-01:00", "\\N", "years 1 to 9999"),
        (None, "2024-03-01T09:30:00Z BC", "\\N", "is not an RFC 3339 time"),
    ],
)
def test_a_trusted_copy_refuses_ids_and_times_it_cannot_hash_as_stored(
    fresh_store: Store, event_id: str | None, recorded: str, causation: str, refusal: str
) -> None:
    fresh_store.append("A", [funded("A")])
    line = copy_row(event_id or str(uuid.uuid4()), 2, recorded, causation)
    with pytest.raises(StoreError) as refused, fresh_store.trusted_copy() as write:
        write([line])
    assert "the row of aggregate 'A' with sequence 2" in str(refused.value)
    assert refusal in str(refused.value)
    assert fresh_store.count() == 1 and riskbook.verify(fresh_store).ok


def test_the_migration_chains_events_already_stored(make_database: Callable[[], str]) -> None:
    dsn = make_database()
    old = Store(dsn, migrate=False)
    old.migrate(target=8)
    with psycopg.connect(dsn) as conn:  # history written before hashes existed
        for agg, n in (("A", 3), ("B", 2)):
            for i in range(1, n + 1):
                conn.execute(
                    "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type,"
                    " sequence, causation_id, correlation_id, metadata, payload) VALUES"
                    " (gen_random_uuid(), 'AccountFunded', %s, 'Account', %s, gen_random_uuid(),"
                    ' \'c\', \'{"by": "ops", "n": 1e3}\', %s)',
                    (
                        agg,
                        i,
                        f'{{"type":"AccountFunded","account_id":"{agg}","amount":{i}.5,'
                        f'"funded_at":"2024-01-0{i}T00:00:00.000000Z"}}',
                    ),
                )
        conn.commit()
    old.close()
    store = Store(dsn)  # upgrades in place
    try:
        assert store.schema_version() == migrations.head()
        report = riskbook.verify(store)
        assert report.ok and report.events == 5
        assert stored_hashes(store, "A") == recomputed(store, "A")
        store.append("A", [funded("A")], expected_version=3)  # and the chain goes on
        assert riskbook.verify(store).ok
    finally:
        store.close()


# ----------------------------------------------------------------------- tampering


@pytest.fixture
def history(fresh_store: Store) -> Store:
    fresh_store.append("A", [funded("A")] + [trade("A", i) for i in range(1, 5)])
    fresh_store.append("B", [funded("B"), trade("B", 1), trade("B", 2)])
    return fresh_store


def broken(report: VerifyReport) -> set[tuple[str, int, str]]:
    return {(p.aggregate_id, p.sequence, p.kind) for p in report.problems}


def test_verify_names_an_altered_payload(history: Store) -> None:
    as_superuser(
        history,
        "UPDATE events SET payload = jsonb_set(payload, '{quantity}', '1000')"
        " WHERE aggregate_id = 'A' AND sequence = 3",
    )
    report = riskbook.verify(history)
    assert not report.ok
    assert ("A", 3, "altered") in broken(report)
    assert {p.aggregate_id for p in report.problems} == {"A"}  # one event, not the rest


def test_verify_names_a_removed_event(history: Store) -> None:
    as_superuser(history, "DELETE FROM events WHERE aggregate_id = 'B' AND sequence = 2")
    report = riskbook.verify(history)
    assert ("B", 2, "removed") in broken(report)
    assert "sequence 2 is missing" in str(report)


def chain_breaks(report: VerifyReport) -> set[tuple[str, int, str]]:
    """The breaks of the hash chains (not of the typed copy, which keeps what was written)."""
    return {
        (p.aggregate_id, p.sequence, p.kind)
        for p in report.problems
        if "typed copy" not in p.detail
    }


def swap(store: Store, agg: str, a: int, b: int) -> None:
    """Swap two sequences of an aggregate behind the triggers (three steps: the key is unique)."""
    step = "UPDATE events SET sequence = {} WHERE aggregate_id = '{}' AND sequence = {}"
    as_superuser(
        store, step.format(1000, agg, a), step.format(a, agg, b), step.format(b, agg, 1000)
    )


def test_verify_names_reordered_events(history: Store) -> None:
    swap(history, "A", 2, 4)
    report = riskbook.verify(history)
    # exactly the two moved events: 3 and 5 are untouched (each still chains from the
    # event written before it, which now sits elsewhere)
    assert chain_breaks(report) == {("A", 2, "reordered"), ("A", 4, "reordered")}
    assert "written as sequence 4" in str(report)


def test_verify_tells_a_swap_of_neighbours_as_two_moves_only(history: Store) -> None:
    swap(history, "B", 1, 2)  # 3 follows a moved event, untouched
    report = riskbook.verify(history)
    assert chain_breaks(report) == {("B", 1, "reordered"), ("B", 2, "reordered")}


def test_verify_names_a_version_read_before_the_one_it_follows(history: Store) -> None:
    # Position is not hashed: with the positions of A's versions 2 and 3 swapped (as a
    # store written before migration 0020 could hold them), every chain holds, but a
    # reader of the global order meets version 3 first.
    where = "WHERE aggregate_id = 'A' AND sequence = {}"
    p2, p3 = (history.read("A")[i].position for i in (1, 2))
    steps = []
    for table in ("events", "event_fields"):
        move = f"UPDATE {table} SET position = {{}} {where}"
        steps += [move.format(-1, 2), move.format(p2, 3), move.format(p3, 2)]
    as_superuser(history, *steps)
    assert p2 is not None and p3 is not None and p2 < p3
    report = riskbook.verify(history)
    assert broken(report) == {("A", 3, "reordered")}
    assert f"its position ({p2}) comes before that of sequence 2 ({p3})" in str(report)


def test_verify_names_an_altered_time_and_an_altered_hash(history: Store) -> None:
    as_superuser(
        history,
        'UPDATE events SET "timestamp" = "timestamp" - interval \'1 hour\''
        " WHERE aggregate_id = 'B' AND sequence = 1",
        "UPDATE events SET hash = sha256(hash) WHERE aggregate_id = 'A' AND sequence = 5",
    )
    assert {("B", 1, "altered"), ("A", 5, "altered")} <= broken(riskbook.verify(history))


def test_verify_names_an_altered_typed_copy(history: Store) -> None:
    as_superuser(
        history, "UPDATE event_fields SET quantity = 1 WHERE aggregate_id = 'B' AND sequence = 3"
    )
    report = riskbook.verify(history)
    assert broken(report) == {("B", 3, "altered")}
    assert "event_fields" in str(report)


def test_kept_heads_catch_a_rewritten_chain_and_a_truncation(
    history: Store, tmp_path: Path
) -> None:
    first = riskbook.verify(history)
    heads = first.save_heads(tmp_path / "heads.json")
    assert read_heads(heads) == dict(first.heads)
    # A thorough forger: drops A's last event (and its typed copy), and rewrites B's
    # first event, then recomputes every hash of B so that its chain holds again.
    as_superuser(
        history,
        "DELETE FROM events WHERE aggregate_id = 'A' AND sequence = 5",
        "DELETE FROM event_fields WHERE aggregate_id = 'A' AND sequence = 5",
        "UPDATE events SET payload = jsonb_set(payload, '{amount}', '5.0')"
        " WHERE aggregate_id = 'B' AND sequence = 1",
        "UPDATE event_fields SET amount = 5 WHERE aggregate_id = 'B' AND sequence = 1",
        "UPDATE events e SET hash = c.h FROM (SELECT position, riskbook_chain('\\x'::bytea,"
        " riskbook_event_digest(event_id, event_type, aggregate_id, aggregate_type, sequence,"
        ' "timestamp", causation_id, correlation_id, metadata, payload))'
        " OVER (ORDER BY sequence) AS h FROM events WHERE aggregate_id = 'B') c"
        " WHERE e.position = c.position",
    )
    assert riskbook.verify(history).ok  # a chain without a secret cannot see that...
    report = riskbook.verify(history, heads=heads)  # ...heads kept elsewhere can
    assert broken(report) == {("A", 5, "removed"), ("B", 3, "altered")}


def impossible_times(report: VerifyReport) -> set[tuple[str, int, str]]:
    return {
        (p.aggregate_id, p.sequence, p.kind)
        for p in report.problems
        if "recorded time" in p.detail and "cannot have written" in p.detail
    }


def test_kept_heads_catch_a_recorded_time_moved_to_another_era(history: Store) -> None:
    # The encoding's YYYY has no era: a year BC hashes as the same year AD. A forger who
    # moves a time (and its typed copy) there keeps every hash and every head...
    heads = riskbook.verify(history).heads
    bc = (
        """"timestamp" = ((("timestamp" AT TIME ZONE 'UTC')::text || ' BC')::timestamp"""
        " AT TIME ZONE 'UTC')"
    )
    check = "events_timestamp_in_range"  # keeps honest writers in range; not a superuser
    as_superuser(
        history,
        f"ALTER TABLE events DROP CONSTRAINT IF EXISTS {check}",
        f"UPDATE events SET {bc} WHERE aggregate_id = 'B' AND sequence = 2",
        f"UPDATE event_fields SET {bc} WHERE aggregate_id = 'B' AND sequence = 2",
        f'ALTER TABLE events ADD CONSTRAINT {check} CHECK ("timestamp" >= \'0001-01-01'
        " 00:00:00+00' AND \"timestamp\" < '10000-01-01 00:00:00+00') NOT VALID",  # as it was
    )
    with psycopg.connect(history.dsn) as conn:
        assert stored_hashes(history, "B")[-1].hex() == heads["B"][1]
        era = conn.execute(
            "SELECT to_char(\"timestamp\", 'BC') FROM events"
            " WHERE aggregate_id = 'B' AND sequence = 2"
        ).fetchone()
        assert era == ("BC",)
    # ...but riskbook never writes a time before year 1: verify names it
    report = riskbook.verify(history, heads=heads)
    assert broken(report) == impossible_times(report) == {("B", 2, "altered")}
    assert "BC" in str(report)


def test_verify_names_an_infinite_recorded_time_plainly(make_database: Callable[[], str]) -> None:
    dsn = make_database()
    old = Store(dsn, migrate=False)
    old.migrate(target=11)  # before recorded times were checked
    with psycopg.connect(dsn) as conn:  # raw SQL: the trigger chains what it is given
        for seq, recorded in ((1, "infinity"), (2, "2024-03-01 09:30:00+00"), (3, "-infinity")):
            conn.execute(
                "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type,"
                ' sequence, "timestamp", correlation_id, payload) VALUES (gen_random_uuid(),'
                " 'MarginCalled', 'M', 'Account', %s, %s::timestamptz, 'c',"
                ' \'{"type": "MarginCalled"}\')',
                (seq, recorded),
            )
        conn.commit()
    old.close()
    store = Store(dsn)  # upgrades: the check does not scan what is stored
    try:
        assert store.schema_version() == migrations.head()
        report = riskbook.verify(store)
        # told as what they are, once each, not as a content that does not hash
        assert (
            broken(report) == impossible_times(report) == {("M", 1, "altered"), ("M", 3, "altered")}
        )
        assert "(infinity)" in str(report) and "(-infinity)" in str(report)
    finally:
        store.close()


@pytest.mark.parametrize(
    "recorded",
    ["infinity", "-infinity", "0044-03-15 12:00:00 BC", "0001-12-31 23:59:59.999999+00 BC",
     "10000-01-01 00:00:00+00", "0001-01-01 00:30:00+01:00"],
)  # fmt: skip
def test_the_store_refuses_a_recorded_time_riskbook_cannot_write(
    shared_store: Store, recorded: str
) -> None:
    agg = f"R-{uuid.uuid4()}"
    insert = (
        "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
        " \"timestamp\", correlation_id, payload) VALUES (gen_random_uuid(), 'MarginCalled',"
        " %s, 'Account', %s, %s::timestamptz, 'c', '{\"type\": \"MarginCalled\"}')"
    )
    with psycopg.connect(shared_store.dsn) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="events_timestamp_in_range"):
            conn.execute(insert, (agg, 1, recorded))
        conn.rollback()
        for seq, edge in ((1, "0001-01-01 00:00:00+00"), (2, "9999-12-31 23:59:59.999999+00")):
            conn.execute(insert, (agg, seq, edge))  # the first and last times riskbook writes
        conn.commit()
    assert [env.timestamp for env in shared_store.read(agg)] == [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ]


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The riskbook command, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "riskbook.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
    )


def test_cli_verify_prints_its_rate_and_fails_on_tampering(history: Store) -> None:
    done = run("verify", "-q", "--dsn", history.dsn)
    assert done.returncode == 0, done.stderr
    assert "every chain holds" in done.stdout and "events/s" in done.stdout
    as_superuser(history, "DELETE FROM events WHERE aggregate_id = 'A' AND sequence = 1")
    done = run("verify", "-q", "--dsn", history.dsn)
    assert done.returncode == 1
    assert "'A' sequence 1: removed" in done.stdout and "problem(s)" in done.stdout


def test_cli_verify_keeps_the_heads_when_it_finds_tampering(
    history: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a nightly `--heads F --save-heads F` wrote the heads of the history it had just
    # found tampered with: every later night passed
    kept = tmp_path / "heads.json"
    assert cli.main(["verify", "-q", "--dsn", history.dsn, "--save-heads", str(kept)]) == 0
    saved = kept.read_text()
    as_superuser(
        history,
        "DELETE FROM events WHERE aggregate_id = 'A' AND sequence = 5",
        "DELETE FROM event_fields WHERE aggregate_id = 'A' AND sequence = 5",
    )
    capsys.readouterr()
    for _night in range(2):
        argv = [
            "verify",
            "-q",
            "--dsn",
            history.dsn,
            "--heads",
            str(kept),
            "--save-heads",
            str(kept),
        ]
        assert cli.main(argv) == 1
        out, err = capsys.readouterr()
        assert "'A' sequence 5: removed" in out and f"heads not written to {kept}" in err
        assert kept.read_text() == saved


def test_verify_names_an_event_moved_past_every_fence(history: Store) -> None:
    # Position is not hashed: moved past any transaction id the server has reached, an
    # event would never be read by riskbook.load or the live processor, and every chain
    # holds. Readers refuse such a store (as they do a copy from another server).
    heads = riskbook.verify(history).heads
    far = (1 << 62) + 1
    where = "WHERE aggregate_id = 'B' AND sequence = 3"
    as_superuser(
        history,
        f"UPDATE events SET position = {far} {where}",
        f"UPDATE event_fields SET position = {far} {where}",
    )
    with pytest.raises(riskbook.StoreError, match="positions were altered"):
        riskbook.load(history, cache=False)
    report = riskbook.verify(history, heads=heads)
    assert broken(report) == {("B", 3, "altered")}
    assert f"its position ({far}) is beyond any the server has handed out" in str(report)


def store_problems(report: VerifyReport) -> list[str]:
    return [p.detail for p in report.problems if not p.aggregate_id and p.sequence == 0]


def test_verify_names_a_replaced_or_shadowed_sql_function(history: Store) -> None:
    # riskbook_settled_fence() bounds what riskbook.load reads: replaced, it hid the
    # latest events from it while verify (which reads without it) said all held
    as_superuser(
        history,
        "CREATE OR REPLACE FUNCTION riskbook_settled_fence() RETURNS bigint"
        " LANGUAGE sql STABLE AS $$ SELECT 0::bigint $$",
    )
    assert riskbook.load(history, cache=False).trades.height == 0
    report = riskbook.verify(history)
    assert not report.ok and broken(report) == {("", 0, "altered")}
    assert "the store: altered (riskbook's SQL function riskbook_settled_fence()" in str(report)
    assert "in 0 aggregate(s) and in riskbook's SQL functions" in str(report)
    # a setting counts: without its search_path the insert trigger finds temporary tables
    as_superuser(history, "ALTER FUNCTION riskbook_events_inserted() RESET search_path")
    assert any("riskbook_events_inserted()" in d for d in store_problems(riskbook.verify(history)))
    # an overload takes calls that fit it better; so does a function of the same name in a
    # schema the search path reaches first (a schema named after the user, say)
    with psycopg.connect(history.dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION riskbook_reserve_positions(n integer) RETURNS bigint"
            " LANGUAGE sql AS $$ SELECT 1::bigint $$"
        )
        conn.execute("CREATE SCHEMA shadow")
        conn.execute(
            "CREATE FUNCTION shadow.riskbook_position_fence() RETURNS bigint"
            " LANGUAGE sql STABLE AS $$ SELECT 0::bigint $$"
        )
    found = store_problems(riskbook.verify(history))
    assert any("riskbook_reserve_positions(integer)" in d for d in found)
    assert not any("shadow." in d for d in found)  # not on this connection's path
    parts = psycopg.conninfo.conninfo_to_dict(history.dsn)
    parts["options"] = "-csearch_path=shadow,public"
    shadowed = riskbook.verify(psycopg.conninfo.make_conninfo(**parts))  # type: ignore[arg-type]
    assert any("shadow.riskbook_position_fence()" in d for d in store_problems(shadowed))


def test_verify_knows_the_functions_the_migrations_install(fresh_store: Store) -> None:
    # verify.py's table of riskbook's SQL functions is what the newest migration leaves
    with fresh_store.connection() as conn:
        _, digests, strangers = _installed_functions(conn)
    table = "\n".join(f'    "{key}": "{digest}",' for key, digest in sorted(digests.items()))
    assert digests == _FUNCTIONS, f"riskbook/verify.py's _FUNCTIONS is stale; now:\n{table}"
    assert strangers == [] and riskbook.verify(fresh_store).ok


def test_verify_says_it_cannot_check_the_functions_of_a_store_behind(
    make_database: Callable[[], str],
) -> None:
    old = Store(make_database(), migrate=False)
    try:
        old.migrate(target=migrations.head() - 1)
        old.append("A", [funded("A")])
        report = riskbook.verify(old)
        assert broken(report) == {("", 0, "altered")}
        behind = f"version {migrations.head() - 1}, this riskbook's at {migrations.head()}"
        assert behind in str(report)
    finally:
        old.close()


def test_kept_heads_catch_events_back_dated_to_before_they_were_taken(
    history: Store, tmp_path: Path
) -> None:
    # After the heads were kept, events recorded before then (an import keeps given
    # recorded times) changed what load(known_at=K) says for an earlier K, and verify
    # --heads said every chain held.
    first = riskbook.verify(history)
    path = first.save_heads(tmp_path / "heads.json")
    kept = read_heads(path)
    assert kept == dict(first.heads) and kept.taken_at == first.heads.taken_at is not None
    taken = first.heads
    assert (kept.xmax, kept.next_xid, kept.running) == (taken.xmax, taken.next_xid, taken.running)
    known = riskbook.load(history, known_at=first.heads.taken_at, cache=False).funding.height
    history.append("B", [trade("B", 3)])  # recorded now: fine
    history.import_lines([envelope_line("A", 5), envelope_line("N", 0)])  # recorded in 2024
    assert (
        riskbook.load(history, known_at=first.heads.taken_at, cache=False).funding.height
        == known + 2
    )
    with psycopg.connect(history.dsn) as conn:  # and one given a position from the past
        xid = conn.execute("SELECT min(position) >> 28 FROM events").fetchone()[0]  # type: ignore[index]
    as_superuser(
        history,
        "INSERT INTO events (position, event_id, event_type, aggregate_id, aggregate_type,"
        ' sequence, "timestamp", correlation_id, payload, hash)'
        " SELECT p, i, 'MarginCalled', 'Z', 'Account', 1, t, 'c', m,"
        "        sha256(riskbook_event_digest(i, 'MarginCalled', 'Z', 'Account', 1, t, NULL,"
        "                                     'c', '{}', m))"
        f"  FROM (SELECT ({xid} << 28) + 1000 AS p, gen_random_uuid() AS i,"
        '               clock_timestamp() AS t, \'{"type": "MarginCalled"}\'::jsonb AS m) v',
        f"SELECT riskbook_fill_event_fields(({xid} << 28) + 1000, ({xid} << 28) + 1000)",
    )
    assert riskbook.verify(history).ok  # every chain holds: only the heads can tell
    expected = {("A", 6, "back-dated"), ("N", 1, "back-dated"), ("Z", 1, "back-dated")}
    for heads in (path, first.heads):
        report = riskbook.verify(history, heads=heads)
        assert broken(report) == expected, report
    assert "recorded at 2024-03-01T09:30:05.000007Z, at or before the heads were taken" in str(
        report
    )
    assert "a transaction that had ended when the heads were taken" in str(report)


def test_events_of_a_transaction_running_when_the_heads_are_taken_are_not_back_dated(
    history: Store,
) -> None:
    with history.connection() as busy:  # the live processor, in the middle of a batch
        history.append_in(busy, "B", [trade("B", 3)])
        xid = busy.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]  # type: ignore[index]
        heads = riskbook.verify(history).heads  # taken after that event's recorded time
        assert heads["B"][0] == 3  # not committed yet
        assert xid in heads.running or heads.xmax <= xid < heads.next_xid
        busy.commit()
    with history.connection() as idle:  # a transaction begun before, writing after
        idle.execute("SELECT 1")
        later = riskbook.verify(history).heads
        history.append_in(idle, "B", [trade("B", 4)])
        idle.commit()
    history.append("A", [trade("A", 5)])
    for kept in (heads, later):
        report = riskbook.verify(history, heads=kept)
        assert report.ok, report


def test_heads_files_of_older_versions_are_still_read(history: Store, tmp_path: Path) -> None:
    heads = riskbook.verify(history).heads
    old = tmp_path / "old.json"  # what riskbook verify --save-heads wrote before
    old.write_text(json.dumps({a: list(h) for a, h in heads.items()}))
    kept = read_heads(old)
    assert kept == dict(heads) and kept.taken_at is None
    history.import_lines([envelope_line("N", 0)])  # when they were taken is not known
    assert riskbook.verify(history, heads=old).ok
    assert riskbook.verify(history, heads=dict(heads)).ok
    (tmp_path / "bad.json").write_text('{"heads": {"A": [1, "ab"]}, "taken_at": "2024-01-01"}')
    with pytest.raises(ValueError, match="not a heads file written by riskbook verify"):
        read_heads(tmp_path / "bad.json")


# ----------------------------------------------------------------------- roles


@pytest.fixture
def role(fresh_store: Store) -> Iterator[str]:
    name = f"rk_role_{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(fresh_store.dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def raw_refused(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement.encode())


def test_a_reader_reads_and_verifies_but_cannot_write(history: Store, role: str) -> None:
    grant = roles.grant_reader(history, role)
    assert grant.created and grant.kind == "reader" and f"user={role}" in grant.dsn
    reader = Store(grant.dsn)  # connects: the schema is current, nothing to migrate
    try:
        h = riskbook.load(reader, cache=False)
        assert h.trades.height == 6
        assert riskbook.verify(reader).ok
        with pytest.raises(StoreError, match=r"permission denied for table events.*grant-"):
            reader.append("A", [funded("A")])
        with pytest.raises(StoreError, match="permission denied"):
            reader.import_lines([envelope_line("R", 0)])
    finally:
        reader.close()
    for statement in (
        "UPDATE events SET correlation_id = 'x'",
        "DELETE FROM events",
        "UPDATE event_fields SET quantity = 1",
        "INSERT INTO processor_checkpoints (name) VALUES ('sneaky')",
        "REFRESH MATERIALIZED VIEW account_positions",
    ):
        raw_refused(grant.dsn, statement)
    with psycopg.connect(grant.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM account_positions").fetchone() is not None
    assert history.count() == 8


def test_a_processor_appends_and_keeps_its_checkpoint_only(history: Store, role: str) -> None:
    grant = roles.grant_processor(history, role)
    processor = Store(grant.dsn)
    try:
        processor.append("A", [funded("A", 5.0)], expected_version=5)
        with processor.connection() as conn:
            conn.execute("INSERT INTO processor_checkpoints (name, position) VALUES ('p', 1)")
            conn.execute("UPDATE processor_checkpoints SET position = 2 WHERE name = 'p'")
            conn.commit()
    finally:
        processor.close()
    assert riskbook.verify(history).ok and history.count() == 9
    for statement in (
        "UPDATE events SET correlation_id = 'x'",
        "DELETE FROM events",
        "INSERT INTO event_fields (position, event_id, event_type, aggregate_id, aggregate_type,"
        " sequence, \"timestamp\", correlation_id) VALUES (1, gen_random_uuid(), 'X', 'A', 'A',"
        " 1, now(), 'c')",
        "DELETE FROM processor_checkpoints",
        "INSERT INTO position_snapshots (account_id, sequence, position, snapshot_at, state)"
        " VALUES ('A', 1, 1, now(), '{}')",
    ):
        raw_refused(grant.dsn, statement)
    # made a reader again, it loses what it could write
    assert not roles.grant_reader(history, role).created
    raw_refused(grant.dsn, "INSERT INTO processor_checkpoints (name) VALUES ('q')")


PROCESSOR_INSERT = (
    "INSERT INTO {} (position, event_id, event_type, aggregate_id, aggregate_type, sequence,"
    " \"timestamp\", correlation_id, payload) VALUES (%s, %s, 'TradeExecuted', 'A',"
    " 'Account', %s, {}, 'c', %s)"
)


def fill(account: str, quantity: float, i: int = 9) -> str:
    return json.dumps({
        "type": "TradeExecuted", "trade_id": f"T-{i}", "account_id": account,
        "symbol": "AAPL", "side": "Buy", "quantity": quantity, "price": 100.0,
        "executed_at": "2024-03-01T09:31:00Z",
    })  # fmt: skip


def test_a_processor_cannot_shadow_the_stores_tables_with_temporary_ones(
    history: Store, role: str
) -> None:
    # The insert trigger runs with the owner's rights, and pg_temp was searched first for
    # the tables it names: a temporary `events` fed it forged rows for the typed copy
    # (load said 1,000,000 where events held 1), a temporary `event_fields` took the
    # typed copy and its checks away (a trade of -5 was stored).
    grant = roles.grant_processor(history, role)
    with psycopg.connect(grant.dsn) as conn:
        conn.execute("CREATE TEMP TABLE events AS SELECT * FROM public.events WITH NO DATA")
        position = conn.execute("SELECT riskbook_next_position()").fetchone()[0]  # type: ignore[index]
        event_id = uuid.uuid4()
        forged = PROCESSOR_INSERT.format("pg_temp.events", "clock_timestamp()")
        conn.execute(forged, (position, event_id, 6, fill("A", 1e6)))
        conn.execute(
            PROCESSOR_INSERT.format("public.events", "clock_timestamp()"),
            (position, event_id, 6, fill("A", 1.0)),
        )
        conn.commit()
    trades = riskbook.load(history, cache=False).trades
    assert trades.filter(trades["sequence"] == 6)["quantity"].to_list() == [1.0]
    assert riskbook.verify(history).ok
    with psycopg.connect(grant.dsn) as conn:
        conn.execute("CREATE TEMP TABLE event_fields (LIKE public.event_fields)")
        with pytest.raises(psycopg.errors.CheckViolation, match="event_fields_trade_positive"):
            conn.execute(
                PROCESSOR_INSERT.format("public.events", "clock_timestamp()"),
                (conn.execute("SELECT riskbook_next_position()").fetchone()[0], uuid.uuid4(), 7,  # type: ignore[index]
                 fill("A", -5.0, 10)),
            )  # fmt: skip
    assert history.count() == 9 and riskbook.verify(history).ok


def test_a_processor_cannot_back_date_by_waiting_in_an_open_transaction(
    history: Store, role: str
) -> None:
    # A transaction without a transaction id holds no reader back: opened, left idle and
    # then inserting at transaction_timestamp(), it back-dated its event by the wait.
    grant = roles.grant_processor(history, role)
    processor = Store(grant.dsn)
    try:
        with processor.connection() as conn:
            conn.execute("SELECT 1")  # the transaction begins; no id, nothing written
            time.sleep(0.05)
            with pytest.raises(psycopg.DatabaseError, match="recorded time") as info:
                conn.execute(
                    PROCESSOR_INSERT.format("events", "transaction_timestamp()"),
                    (conn.execute("SELECT riskbook_next_position()").fetchone()[0],  # type: ignore[index]
                     uuid.uuid4(), 6, fill("A", 1.0)),
                )  # fmt: skip
            assert info.value.sqlstate == "RK003"
            conn.rollback()
            conn.execute("SELECT 1")  # riskbook's own writers are not refused after a wait
            time.sleep(0.05)
            processor.append_in(conn, "A", [trade("A", 5)], expected_version=5)
            processor.append_in(conn, "B", [trade("B", 3), trade("B", 4)], expected_version=3)
            conn.commit()
    finally:
        processor.close()
    assert history.count() == 11 and riskbook.verify(history).ok


def test_a_reader_on_a_store_behind_is_told_who_must_upgrade(
    make_database: Callable[[], str], role: str
) -> None:
    dsn = make_database()
    owner = Store(dsn, migrate=False)
    owner.migrate(target=8)
    grant = roles.grant_reader(owner, role)
    try:
        with pytest.raises(StoreError, match=r"version 8 .* needs \d+.*riskbook db upgrade"):
            Store(grant.dsn)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:  # the role fixture cleans the other
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        owner.close()


def test_grants_refuse_what_cannot_be_made_least_privilege(history: Store, role: str) -> None:
    with psycopg.connect(history.dsn, autocommit=True) as conn:
        user = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
    with pytest.raises(StoreError, match="riskbook connects with"):
        roles.grant_reader(history, user)
    with pytest.raises(ValueError, match="reserved"):
        roles.grant_reader(history, "pg_monitor")
    with psycopg.connect(history.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} SUPERUSER").format(sql.Identifier(role)))
    with pytest.raises(StoreError, match="superuser"):
        roles.grant_reader(history, role)


def test_grants_see_column_privileges_inherited_from_a_group(history: Store, role: str) -> None:
    # UPDATE (position) on the checkpoints through a group: the reader could rewind the
    # live processor, and the grant said "can read ... and nothing else".
    group = f"{role}_team"
    with psycopg.connect(history.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(group)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
            sql.Identifier(role), sql.Identifier(group)))  # fmt: skip
        conn.execute(sql.SQL("GRANT UPDATE (position) ON processor_checkpoints TO {}").format(
            sql.Identifier(group)))  # fmt: skip
    try:
        with pytest.raises(StoreError, match="UPDATE on columns of processor_checkpoints"):
            roles.grant_reader(history, role)
    finally:
        with psycopg.connect(history.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(group)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(group)))


def test_a_role_without_grants_is_told_to_ask_for_one(history: Store, role: str) -> None:
    with psycopg.connect(history.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    parts = psycopg.conninfo.conninfo_to_dict(history.dsn)
    parts["user"] = role
    parts.pop("password", None)
    stranger = psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match=rf"role '{role}' may not read this store.*grant-reader"):
        Store(stranger)  # it was told the schema was at version 0 and to upgrade it


def test_a_reader_finds_a_store_kept_outside_public(
    make_database: Callable[[], str], role: str
) -> None:
    # The owner keeps the store in a schema of its own: the printed DSN reached nothing
    # (and where the role could create in public, connecting made an empty store there).
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:  # "$user", first on the path
        me = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(me)))
        conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")  # as PostgreSQL <= 14 did
    owner = Store(dsn)
    try:
        owner.append("A", [funded("A")])
        grant = roles.grant_reader(owner, role)
        reader = Store(grant.dsn)
        try:
            assert reader.count() == 1 and reader.schema_version() == migrations.head()
        finally:
            reader.close()
        with psycopg.connect(dsn) as conn:
            schemas = conn.execute(
                "SELECT relnamespace::regnamespace::text FROM pg_class WHERE relname = 'events'"
            ).fetchall()
        assert schemas == [(me,)]
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:  # the role fixture cleans the other
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        owner.close()


def test_cli_grant_reader_reads_the_password_from_stdin(history: Store, role: str) -> None:
    password = "Pa55-word;DROP ROLE x--'"
    done = run("db", "grant-reader", role, "--password", "--dsn", history.dsn, stdin=password)
    assert done.returncode == 0, done.stderr
    assert f"role '{role}' created" in done.stdout and password not in done.stdout + done.stderr
    with psycopg.connect(history.dsn) as conn:
        stored = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)
        ).fetchone()[0]  # type: ignore[index]
    assert stored.startswith("SCRAM-SHA-256$") and password not in stored


# ----------------------------------------------------------------------- secrets

SECRET = "s3cr3t-XYZ"
BAD_DSNS = [
    f"postgresql://u:{SECRET}@127.0.0.1:1/x",
    f"host=127.0.0.1 port=1 user=u password={SECRET} dbname=x",
    f"postgresql://u:{SECRET.replace('-', '%2D')}@127.0.0.1:1/x",  # URL-encoded
    f"postgresql://u:{SECRET}@127.0.0.1:notaport/x",  # libpq cannot even parse it
    f"host=127.0.0.1 password='{SECRET}' port=1 junk",  # nor this
]


def no_secret(exc: BaseException) -> None:
    seen = []
    while exc is not None:  # the message, and whatever a traceback could show with it
        seen.append(f"{exc!s} {exc!r}")
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    assert SECRET not in " ".join(seen) and SECRET.replace("-", "%2D") not in " ".join(seen)


@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_failed_connections_never_show_the_password(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    calls: list[Callable[[], object]] = [
        lambda: Store(dsn),
        lambda: riskbook.connect(dsn),
        lambda: riskbook.load(dsn, cache=False),
        lambda: riskbook.verify(dsn),
        lambda: Store(dsn, migrate=False).count(),
        lambda: next(Store(dsn, migrate=False).follow(idle_timeout=0.1)),
        lambda: roles.grant_reader(Store(dsn, migrate=False), "someone"),
    ]
    for call in calls:
        with pytest.raises(StoreError) as info:
            call()
        no_secret(info.value)
        assert "***" in str(info.value) or "<unparseable DSN>" in str(info.value)
    assert SECRET not in repr(Store(dsn, migrate=False))
    assert SECRET not in caplog.text


def test_a_password_is_starred_where_a_message_quotes_it_not_wherever_its_text_appears() -> None:
    from riskbook.store.eventstore import redact, scrub

    # the password "riskbook" starred every "riskbook" of a message, and so told what it was
    dsn = "postgresql://riskbook:riskbook@127.0.0.1:1/x"
    message = 'FATAL:  password authentication failed for user "riskbook"'
    assert scrub(message, dsn) == message
    assert scrub(f"bad {dsn}", dsn) == "bad postgresql://riskbook:***@127.0.0.1:1/x"
    assert scrub("at host=h password='a b' port=1", dsn) == "at host=h password=*** port=1"
    # libpq's errors about the DSN's syntax quote pieces of it: there, every appearance
    assert (
        scrub('missing "=" after "riskbook" in', dsn, fragments=True)
        == 'missing "=" after "***" in'
    )
    # the passphrase of the client key is a password too
    with_key = f"host=127.0.0.1 port=1 user=u sslpassword={SECRET} dbname=x"
    assert SECRET not in redact(with_key) and "sslpassword=***" in redact(with_key)
    with pytest.raises(StoreError) as info:
        Store(with_key)
    no_secret(info.value)


def test_adbc_connection_errors_never_show_the_password() -> None:
    from riskbook.frames import _adbc

    with pytest.raises(StoreError) as info, _adbc(Store(BAD_DSNS[0], migrate=False)):
        pass
    no_secret(info.value)


def test_a_working_dsn_with_a_password_is_never_shown(fresh_store: Store) -> None:
    # The embedded server trusts its private socket: any password works, and must still
    # never be printed.
    parts = psycopg.conninfo.conninfo_to_dict(fresh_store.dsn)
    parts["password"] = SECRET
    store = Store(psycopg.conninfo.make_conninfo(**parts))  # type: ignore[arg-type]
    try:
        store.append("A", [funded("A")])
        history = riskbook.load(store, cache=False)
        report = riskbook.verify(store)
        shown = [repr(store), str(store), repr(history), history._repr_markdown_(), str(report)]
        assert all(SECRET not in text for text in shown)
        with pytest.raises(StoreError) as info, store.connection() as conn:
            conn.execute("SELECT * FROM no_such_table")
        no_secret(info.value)
    finally:
        store.close()


def test_the_cli_never_prints_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("RISKBOOK_DSN", BAD_DSNS[0])
    monkeypatch.setenv("RISKBOOK_HOME", str(tmp_path / "home"))  # no embedded server here
    for argv in (
        ["db", "url"],
        ["db", "status"],
        ["verify", "-q"],
        ["verify", "-q", "--dsn", BAD_DSNS[1]],
        ["db", "grant-reader", "auditor"],
        ["import", "-q", "--dsn", BAD_DSNS[3], str(tmp_path / "none.jsonl")],
        ["positions", "--dsn", BAD_DSNS[2]],
    ):
        cli.main(argv)
        captured = capsys.readouterr()
        assert SECRET not in captured.out + captured.err, argv
        assert SECRET.replace("-", "%2D") not in captured.out + captured.err, argv


def test_a_reader_may_run_db_upgrade_on_a_current_store(history: Store, role: str) -> None:
    grant = roles.grant_reader(history, role)
    reader = Store(grant.dsn, migrate=False)
    try:
        assert reader.migrate() == []  # what `riskbook db upgrade` does: nothing to write
    finally:
        reader.close()
