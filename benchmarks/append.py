"""Append and follow: riskbook beside the eventsourcing library, and beside raw psycopg.

Side by side with ``eventsourcing`` (``benchmarks/peers.py``: the library's Application
on PostgreSQL, on the same scratch database), each measure of each side in a fresh
process so that its peak memory (as the OS counts it) is its own:

* one event per append (one writer, with riskbook's ``expected_version``; the peer's
  aggregate version does the same);
* 1,000-event batches;
* four concurrent writers (processes), one event per append each;
* reading everything in order (``Store.iter_all``; the peer's notification log, each
  event decoded);
* the gap test: four writers append while a reader tails by position
  (``Store.follow``; the peer's own subscription), counting the events it never saw --
  the peer with its table lock (gap-free, the write rate counts) and without it.

Then riskbook beside the floors: a raw psycopg ``INSERT`` + ``COMMIT`` per row (one
writer in this process, and four writer processes as the sides have), and a raw
``COPY`` of the same rows into a bare table with no constraints (for the batches and
the bulk import of a JSON Lines file); and for the import, the floor of riskbook's own
schema: the rows it stored, made in advance and COPYed into its empty tables, the
indexes built once, as the import does on the server whatever the client does.

    uv run --group bench python benchmarks/append.py                  # 1M-event import
    uv run --group bench python benchmarks/append.py --events 100000  # quicker
    uv run --group bench python benchmarks/append.py --json rows.json # + the report rows

The machine is shared and noisy: read the ratios and the medians, not single times.
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import multiprocessing as mp
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_json, peak_rss_mb, scratch_database, timed

import riskbook
from riskbook.events import Envelope, encode_envelope, encode_event, format_time
from riskbook.store import Store

HERE = Path(__file__).resolve()
WRITERS = 4
SIDES = ("riskbook", "eventsourcing", "eventsourcing-nolock")

BARE = """CREATE TABLE bare_events (
    position bigint, event_id uuid, event_type text, aggregate_id text, aggregate_type text,
    sequence bigint, "timestamp" timestamptz, causation_id uuid, correlation_id text,
    metadata jsonb, payload jsonb)"""
T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def make_events(n: int, accounts: int = 1000, seed: int = 1) -> list[Envelope]:
    rng = random.Random(seed)
    out = []
    seq: dict[str, int] = {}
    for i in range(n):
        acc = f"ACC-{rng.randrange(accounts):05d}"
        seq[acc] = seq.get(acc, 0) + 1
        t = T0 + timedelta(milliseconds=37 * i)
        payload = _trade(rng, f"T-{i}", acc, t)
        out.append(
            Envelope(
                event_id=uuid.UUID(int=rng.getrandbits(128), version=4),
                aggregate_id=acc,
                aggregate_type="Account",
                sequence=seq[acc],
                timestamp=t + timedelta(milliseconds=3),
                payload=payload,
                correlation_id=f"req-{i}",
            )
        )
    return out


def copy_text(envs: list[Envelope]) -> bytes:
    buf = io.StringIO()
    for i, e in enumerate(envs, 1):
        buf.write(
            f"{i}\t{e.event_id}\t{e.event_type}\t{e.aggregate_id}\t{e.aggregate_type}\t{e.sequence}\t"
            f"{format_time(e.timestamp)}\t\\N\t{e.correlation_id}\t{{}}\t"
            f"{encode_event(e.payload).decode()}\n"  # type: ignore[arg-type]
        )
    return buf.getvalue().encode()


def raw_copy(dsn: str, data: bytes) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("DROP TABLE IF EXISTS bare_events")
        conn.execute(BARE)
        conn.commit()
        with conn.cursor().copy("COPY bare_events FROM STDIN") as copy:
            for i in range(0, len(data), 1 << 20):
                copy.write(data[i : i + (1 << 20)])
        conn.commit()


def raw_insert_commit(dsn: str, envs: list[Envelope]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("DROP TABLE IF EXISTS bare_events")
        conn.execute(BARE)
        conn.commit()
        for e in envs:
            conn.execute(
                "INSERT INTO bare_events (event_id, event_type, aggregate_id, sequence, payload)"
                " VALUES (%s, %s, %s, %s, %s::jsonb)",
                (
                    e.event_id,
                    e.event_type,
                    e.aggregate_id,
                    e.sequence,
                    encode_event(e.payload).decode(),  # type: ignore[arg-type]
                ),
            )
            conn.commit()


# ------------------------------------------------------------------ the two sides


def make_trades(n: int, account: str, seed: int) -> list[riskbook.TradeExecuted]:
    """``n`` trades of one account, the same for both sides."""
    rng = random.Random(seed)
    return [
        _trade(rng, f"{account}-{i}", account, T0 + timedelta(milliseconds=37 * i))
        for i in range(n)
    ]


def _trade(rng: random.Random, trade_id: str, account: str, at: datetime) -> riskbook.TradeExecuted:
    """A random fill of ``account`` at ``at``."""
    return riskbook.TradeExecuted(
        trade_id=trade_id,
        account_id=account,
        symbol=f"SYM{rng.randrange(50):02d}",
        side=riskbook.Side.Buy if rng.random() < 0.5 else riskbook.Side.Sell,
        quantity=float(rng.randrange(1, 500)),
        price=round(rng.uniform(5, 500), 2),
        executed_at=at,
    )


class RiskbookSide:
    """riskbook's side: ``riskbook.connect(dsn)``; the peer's is ``peers.Eventsourcing``."""

    name = "riskbook"

    def __init__(self, dsn: str) -> None:
        self.store = riskbook.connect(dsn)

    def close(self) -> None:
        self.store.close()

    def stream(self, name: str) -> list[Any]:
        return [name, 0]  # the aggregate and its version as this writer last saw it

    def append(self, stream: list[Any], trades: Sequence[riskbook.TradeExecuted]) -> None:
        self.store.append(stream[0], trades, expected_version=stream[1])
        stream[1] += len(trades)

    def read_all(self) -> int:
        return sum(1 for _ in self.store.iter_all())

    def head(self) -> int:
        return self.store.head()

    def tail(self, after: int, seen: list[int], stop: threading.Event) -> None:
        while not stop.is_set():
            for batch in self.store.follow(after=after, idle_timeout=0.2):
                seen.extend(e.position or 0 for e in batch)
                after = seen[-1]

    def ids_after(self, after: int) -> list[int]:
        with self.store.connection() as conn:
            return [
                r[0]
                for r in conn.execute("SELECT position FROM events WHERE position > %s", (after,))
            ]


class RawSide:
    """The floor for the writers: a raw psycopg ``INSERT`` + ``COMMIT`` per event into a
    bare table with no constraints, no index, no trigger: the least a durable single
    append costs on this server, with as many writers as the sides have."""

    name = "raw"

    def __init__(self, dsn: str, *, create: bool = False) -> None:
        self.conn = psycopg.connect(dsn)
        if create:
            self.conn.execute("DROP TABLE IF EXISTS bare_events")
            self.conn.execute(BARE)
            self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    def stream(self, name: str) -> list[Any]:
        return [name, 0]

    def append(self, stream: list[Any], trades: Sequence[riskbook.TradeExecuted]) -> None:
        for t in trades:
            stream[1] += 1
            self.conn.execute(
                "INSERT INTO bare_events (event_id, event_type, aggregate_id, sequence, payload)"
                " VALUES (%s, %s, %s, %s, %s::jsonb)",
                (uuid.uuid4(), "TradeExecuted", stream[0], stream[1], encode_event(t).decode()),
                prepare=True,
            )
            self.conn.commit()


def open_side(name: str, dsn: str, *, create: bool = False) -> Any:
    """One side on ``dsn``; ``create``: make its tables (once, before any measure)."""
    if name == "riskbook":
        return RiskbookSide(dsn)
    if name == "raw":
        return RawSide(dsn, create=create)
    import peers

    return peers.Eventsourcing(dsn, lock=name != "eventsourcing-nolock", create_table=create)


# ------------------------------------------------------------------ measures (child side)


def writer(name: str, dsn: str, n: int, seed: int, go: Any, results: Any) -> None:
    """One of the concurrent writers: ``n`` single-event appends to an account of its own."""
    side = open_side(name, dsn)
    account = f"W{seed}-{uuid.uuid4().hex[:8]}"
    stream = side.stream(account)
    trades = make_trades(n + 1, account, seed)
    side.append(stream, trades[:1])  # warm: the connection, the statements
    trades = trades[1:]
    results.put("ready")
    go.wait()
    started = time.time()
    for t in trades:
        side.append(stream, [t])
    results.put((started, time.time(), n, peak_rss_mb()))
    side.close()


def concurrent_writers(name: str, dsn: str, n: int, *, tailed: bool) -> dict[str, float]:
    """``WRITERS`` processes append ``n`` events in all, one per append; with ``tailed``,
    a reader in this process follows them by position and counts what it never saw."""
    # fork: the writers start in milliseconds, not in the seconds that importing riskbook
    # (Polars) takes; nothing here has a connection open yet
    ctx = mp.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=writer, args=(name, dsn, n // WRITERS, 100 + i, go, results))
        for i in range(WRITERS)
    ]

    def collect() -> list[Any]:
        out: list[Any] = []
        while len(out) < WRITERS:
            try:
                out.append(results.get(timeout=0.5))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"{name}: a writer process failed") from None
        return out

    for p in procs:
        p.start()
    side = open_side(name, dsn)
    seen: list[int] = []
    stop = threading.Event()
    start = side.head() if tailed else 0
    reader = threading.Thread(target=lambda: side.tail(start, seen, stop))
    if tailed:
        reader.start()
    try:
        collect()  # every writer connected and warm
        go.set()
        done = collect()
    except BaseException:
        stop.set()
        for p in procs:
            p.terminate()
        raise
    for p in procs:
        p.join()
    out: dict[str, float] = {
        "events": sum(d[2] for d in done),
        "seconds": max(d[1] for d in done) - min(d[0] for d in done),
        "writer_peak_mb": max(d[3] for d in done),
    }
    if tailed:
        written = side.ids_after(start)
        last, deadline = max(written), time.monotonic() + 10
        while (not seen or seen[-1] < last) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        reader.join()
        out["missed"] = len(set(written) - set(seen))
        out["out_of_order"] = sum(b <= a for a, b in itertools.pairwise(seen))
        out["seen"] = len(seen)
    side.close()
    return out


def child(measure: str, name: str, dsn: str, n: int) -> dict[str, float]:
    """Run one measure of one side in this (fresh) process."""
    if measure in ("writers", "tail"):
        out = concurrent_writers(name, dsn, n, tailed=measure == "tail")
        return {**out, "peak_rss_mb": max(peak_rss_mb(), out["writer_peak_mb"])}
    side = open_side(name, dsn)
    if measure == "read":
        side.head()  # warm: the connection
        t = time.perf_counter()
        count = side.read_all()
        seconds = time.perf_counter() - t
    else:
        size = 1 if measure == "singles" else 1000
        count = n * size
        account = f"{measure[0].upper()}-{uuid.uuid4().hex[:8]}"
        stream = side.stream(account)
        trades = make_trades(count + size, account, seed=3)
        side.append(stream, trades[:size])  # warm: the connection, the statements
        trades = trades[size:]
        t = time.perf_counter()
        for i in range(0, count, size):
            side.append(stream, trades[i : i + size])
        seconds = time.perf_counter() - t
    side.close()
    return {"events": count, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------ parent side


def side_by_side(dsn: str, args: argparse.Namespace) -> dict[tuple[str, str], dict[str, float]]:
    """Every measure of every side, each in a fresh process; the sides take turns (and
    their repeats alternate) so that a busy moment of a shared machine hits both."""
    for name in (*SIDES[:2], "raw"):
        open_side(name, dsn, create=True).close()  # the schema of each, before anything

    def measure(what: str, sides: tuple[str, ...], n: int, repeat: int = 1) -> None:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        for _ in range(repeat):
            for name in sides:
                argv = ["--child", what, "--side", name, "--dsn", dsn, "--n", str(n)]
                r = child_json([str(HERE), *argv])
                runs[name].append({**r, "rate": r["events"] / r["seconds"]})
        for name, rs in runs.items():
            med = statistics.median(r["rate"] for r in rs)
            res[what, name] = {**min(rs, key=lambda r: abs(r["rate"] - med)), "rate": med}

    res: dict[tuple[str, str], dict[str, float]] = {}
    measure("singles", SIDES[:2], args.singles, args.repeat)
    measure("batches", SIDES[:2], args.batches, args.repeat)
    measure("writers", (*SIDES[:2], "raw"), args.writer_events)
    measure("read", SIDES[:2], 0)
    measure("tail", SIDES, args.writer_events)
    return res


def floors(dsn: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of the raw psycopg floors, and of riskbook's bulk import, in this process."""
    out = {}
    singles = make_events(args.singles, accounts=50, seed=2)
    out["insert_commit"], _ = timed(lambda: raw_insert_commit(dsn, singles), args.repeat)
    data = copy_text(make_events(1000 * args.batches, accounts=1, seed=3))
    out["copy_batches"], _ = timed(lambda: raw_copy(dsn, data), args.repeat)

    bulk = make_events(args.events, seed=4)
    data = copy_text(bulk)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bulk.jsonl.gz"
        with gzip.open(path, "wb", compresslevel=1) as fh:
            for e in bulk:
                fh.write(encode_envelope(e) + b"\n")
        del bulk
        with scratch_database(args.dsn) as bulk_dsn:
            bulk_store = Store(bulk_dsn)
            out["import"], _ = timed(lambda: bulk_store.import_jsonl(path))
            out["reimport"], _ = timed(lambda: bulk_store.import_jsonl(path))
            bulk_store.close()
            tables = copy_out(bulk_dsn, ("events", "event_fields"))
        out["copy_bulk"], _ = timed(lambda: raw_copy(dsn, data))
        with scratch_database(args.dsn) as floor_dsn:
            Store(floor_dsn).close()  # riskbook's schema, empty
            out["schema_floor"], _ = timed(lambda: schema_copy(floor_dsn, tables))
    return out


def copy_out(dsn: str, tables: Sequence[str]) -> dict[str, bytes]:
    """Each table's rows as COPY text."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for table in tables:
            with conn.cursor().copy(f"COPY {table} TO STDOUT") as copy:
                out[table] = b"".join(bytes(block) for block in copy)
    return out


def schema_copy(dsn: str, tables: dict[str, bytes]) -> None:
    """The floor of riskbook's own schema: rows already made (positions, hashes, typed
    fields) COPYed into its empty tables with the indexes dropped, the indexes built
    once at the end and the tables analyzed -- what an import into an empty store must
    do on the server whatever the client does."""
    from riskbook.store.eventstore import _index_definitions

    with psycopg.connect(dsn) as conn:
        indexes = [i for t in tables for i in _index_definitions(conn, t)]
        for table, name, constraint, _ in indexes:
            conn.execute(
                f"ALTER TABLE {table} DROP CONSTRAINT {name}"
                if constraint
                else f"DROP INDEX {name}"
            )
        conn.execute("ALTER TABLE events DISABLE TRIGGER USER")
        for table, data in tables.items():
            with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
                for i in range(0, len(data), 1 << 20):
                    copy.write(data[i : i + (1 << 20)])
        conn.execute("SET LOCAL maintenance_work_mem = '256MB'")  # as the import does
        for _, _, _, definition in indexes:
            conn.execute(definition.encode())
        conn.execute("ALTER TABLE events ENABLE TRIGGER USER")
        conn.execute(f"ANALYZE {', '.join(tables)}")
        conn.commit()


def report_rows(
    res: dict[tuple[str, str], dict[str, float]], floor: dict[str, float], args: argparse.Namespace
) -> list[Any]:
    from _report import Row

    def versus(group: str, measure: str, key: str, peer: str = "eventsourcing", **kw: Any) -> Row:
        ours, theirs = res[key, "riskbook"], res[key, peer]
        return Row(
            group=group,
            measure=measure,
            unit="events/s",
            riskbook=ours["rate"],
            peer=theirs["rate"],
            peer_name="eventsourcing" + ("" if peer == "eventsourcing" else ", table lock off"),
            riskbook_peak_mb=ours["peak_rss_mb"],
            peer_peak_mb=theirs["peak_rss_mb"],
            **kw,
        )

    tail, nolock = res["tail", "riskbook"], res["tail", "eventsourcing-nolock"]
    w = f"{WRITERS} writer processes, {int(tail['events']):,} events"
    n_read = f"{int(res['read', 'riskbook']['events']):,} events"
    rows = [
        versus("append", "one event per append", "singles", note="expected version checked"),
        versus("append", "1,000-event batches", "batches"),
        versus("append", f"{WRITERS} concurrent writers, one event per append", "writers", note=w),
        versus("follow", "reading everything in order, decoded", "read", note=n_read),
        versus(
            "follow",
            f"{WRITERS} writers + a reader tailing by position: write rate",
            "tail",
            note="the peer's table lock keeps its reader gap-free",
        ),
        Row(
            group="follow",
            measure=f"{WRITERS} writers + a reader tailing by position: events never seen",
            unit="events",
            riskbook=tail["missed"],
            peer=nolock["missed"],
            peer_name="eventsourcing, table lock off",
            higher_is_better=False,
            riskbook_peak_mb=tail["peak_rss_mb"],
            peer_peak_mb=nolock["peak_rss_mb"],
            note=f"of {int(tail['events']):,} written; the peer without its lock wrote"
            f" {nolock['rate']:,.0f} events/s",
        ),
    ]
    n_single, n_batch = args.singles, 1000 * args.batches
    for measure, ours, floor_s, floor_name, n in (
        ("one event per append", n_single / res["singles", "riskbook"]["rate"],
         floor["insert_commit"], "raw INSERT + COMMIT per row (floor)", n_single),
        ("1,000-event batches", n_batch / res["batches", "riskbook"]["rate"],
         floor["copy_batches"], "raw COPY, no constraints (floor)", n_batch),
        ("bulk import of a .jsonl.gz, validated", floor["import"], floor["copy_bulk"],
         "raw COPY, no constraints (floor)", args.events),
        ("re-import of the same file (adds nothing)", floor["reimport"], floor["copy_bulk"],
         "raw COPY, no constraints (floor)", args.events),
        ("bulk import of a .jsonl.gz, validated", floor["import"], floor["schema_floor"],
         "its rows made in advance, COPYed into riskbook's tables, indexes built (floor)",
         args.events),
    ):  # fmt: skip
        rows.append(
            Row(
                group="append",
                measure=measure,
                unit="events/s",
                riskbook=n / ours,
                peer=n / floor_s,
                peer_name=floor_name,
                note=f"{n:,} events",
            )
        )
    ours, raw = res["writers", "riskbook"], res["writers", "raw"]
    rows.append(
        Row(
            group="append",
            measure=f"{WRITERS} concurrent writers, one event per append",
            unit="events/s",
            riskbook=ours["rate"],
            peer=raw["rate"],
            peer_name=f"raw INSERT + COMMIT per row, {WRITERS} writers (floor)",
            note=f"{int(raw['events']):,} events; a bare table, no constraints",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1_000_000, help="size of the bulk import")
    ap.add_argument("--singles", type=int, default=2_000, help="single-event appends per run")
    ap.add_argument("--batches", type=int, default=50, help="1,000-event batches per run")
    ap.add_argument(
        "--writer-events", type=int, default=6_000, help="events of the four writers, in all"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each small test (median)")
    ap.add_argument("--dsn", default=None, help="server to use (default: RISKBOOK_DSN or embedded)")
    ap.add_argument("--json", default=None, help="write the report rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.side, args.dsn, args.n)))
        return 0

    with scratch_database(args.dsn) as dsn:
        with psycopg.connect(dsn) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        print(
            f"PostgreSQL {version}; median of {args.repeat} runs for single appends and"
            " batches, 1 run otherwise; each measure of each side in a fresh process\n"
        )
        res = side_by_side(dsn, args)
        print(
            "| test | riskbook events/s | eventsourcing events/s | ratio | peak RSS MiB (riskbook / peer) |"
        )
        print("|---|---:|---:|---:|---:|")
        names = {
            "singles": f"one event per append ({args.singles:,})",
            "batches": f"1,000-event batches ({args.batches})",
            "writers": f"{WRITERS} concurrent writers ({args.writer_events:,} in all)",
            "read": "reading everything in order",
            "tail": f"{WRITERS} writers + a tailing reader",
        }
        for key, label in names.items():
            ours, theirs = res[key, "riskbook"], res[key, "eventsourcing"]
            print(f"| {label} | {ours['rate']:,.0f} | {theirs['rate']:,.0f} |"
                  f" {ours['rate'] / theirs['rate']:.2f}x |"
                  f" {ours['peak_rss_mb']:,.0f} / {theirs['peak_rss_mb']:,.0f} |")  # fmt: skip
        print(
            f"\ngap test ({WRITERS} writers, {args.writer_events:,} events, a reader tailing by position):"
        )
        for name in SIDES:
            r = res["tail", name]
            print(f"  {name:<22} {r['rate']:>8,.0f} events/s; the reader missed {int(r['missed']):,}"
                  f" (out of order: {int(r['out_of_order'])})")  # fmt: skip

        floor = floors(dsn, args)
    rows = report_rows(res, floor, args)
    print("\n| test | riskbook events/s | floor | floor events/s | time ratio |")
    print("|---|---:|---|---:|---:|")
    for r in rows[6:]:
        print(f"| {r.measure} | {r.riskbook:,.0f} | {r.peer_name} | {r.peer:,.0f} |"
              f" {r.peer / r.riskbook:.2f}x |")  # fmt: skip
    print(f"\npeak RSS of this process: {peak_rss_mb():,.0f} MiB")
    if args.json:
        from _report import write_rows

        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
