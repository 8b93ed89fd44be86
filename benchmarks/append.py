"""Append throughput of the event store, each beside a raw psycopg baseline.

Prints events/s for: single-event appends with ``expected_version``, 1,000-event
batches, and the bulk import of a JSON Lines file -- each beside a raw psycopg
``COPY`` of the same rows into a bare table with no constraints (and, for single
appends, beside a bare ``INSERT`` + ``COMMIT`` per row, the floor of one transaction
per event). Everything runs in one process, on a scratch database of the same server.

    uv run python benchmarks/append.py                 # 1M-event import, ~2-4 minutes
    uv run python benchmarks/append.py --events 100000 # quicker

The machine is shared and noisy: read the ratios and the medians, not single times.
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, scratch_database, timed

import riskbook
from riskbook.events import Envelope, encode_envelope, encode_event, format_time
from riskbook.store import Store

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
        payload = riskbook.TradeExecuted(
            trade_id=f"T-{i}",
            account_id=acc,
            symbol=f"SYM{rng.randrange(50):02d}",
            side=riskbook.Side.Buy if rng.random() < 0.5 else riskbook.Side.Sell,
            quantity=float(rng.randrange(1, 500)),
            price=round(rng.uniform(5, 500), 2),
            executed_at=t,
        )
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
                    encode_event(e.payload).decode(),
                ),  # type: ignore[arg-type]
            )
            conn.commit()


def row(name: str, n: int, ours: float, base_name: str, base: float) -> None:
    r_ours, r_base = n / ours, n / base
    print(
        f"| {name:<34} | {n:>9,} | {r_ours:>12,.0f} | {base_name:<28} | {r_base:>12,.0f} | {ours / base:>6.2f}x |",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1_000_000, help="size of the bulk import")
    ap.add_argument("--singles", type=int, default=2_000, help="single-event appends per run")
    ap.add_argument("--batches", type=int, default=50, help="1,000-event batches per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each small test (median)")
    ap.add_argument("--dsn", default=None, help="server to use (default: RISKBOOK_DSN or embedded)")
    args = ap.parse_args()

    with scratch_database(args.dsn) as dsn:
        with psycopg.connect(dsn) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        print(f"PostgreSQL {version}; time = median of {args.repeat} runs (bulk: 1 run)\n")
        print(
            "| test                               |    events | riskbook ev/s | baseline                     |  base ev/s |  time ratio |"
        )
        print("|---|---:|---:|---|---:|---:|")

        # 1. single-event appends with expected_version, one writer
        singles = make_events(args.singles, accounts=50, seed=2)
        store = Store(dsn)

        def append_singles() -> None:
            acc = f"S-{uuid.uuid4().hex[:8]}"
            for v, e in enumerate(singles):
                p = e.payload
                store.append(
                    acc,
                    [
                        riskbook.TradeExecuted(
                            **{**{f: getattr(p, f) for f in p.__struct_fields__}, "account_id": acc}
                        )
                    ],
                    expected_version=v,
                )

        t_ours, _ = timed(append_singles, args.repeat)
        t_ins, _ = timed(lambda: raw_insert_commit(dsn, singles), args.repeat)
        data = copy_text(singles)
        t_copy, _ = timed(lambda: raw_copy(dsn, data), args.repeat)
        row(
            "single appends, expected_version",
            len(singles),
            t_ours,
            "raw INSERT+COMMIT per row",
            t_ins,
        )
        row(
            "single appends, expected_version",
            len(singles),
            t_ours,
            "raw COPY, no constraints",
            t_copy,
        )

        # 2. 1,000-event batches
        batch_events = make_events(1000 * args.batches, accounts=1, seed=3)

        def append_batches() -> None:
            acc = f"B-{uuid.uuid4().hex[:8]}"
            for b in range(args.batches):
                chunk = batch_events[b * 1000 : (b + 1) * 1000]
                store.append(
                    acc,
                    [
                        riskbook.TradeExecuted(
                            **{
                                **{f: getattr(e.payload, f) for f in e.payload.__struct_fields__},
                                "account_id": acc,
                            }
                        )
                        for e in chunk
                    ],
                    expected_version=b * 1000,
                )

        t_ours, _ = timed(append_batches, args.repeat)
        data = copy_text(batch_events)
        t_copy, _ = timed(lambda: raw_copy(dsn, data), args.repeat)
        row("1,000-event batches", len(batch_events), t_ours, "raw COPY, no constraints", t_copy)
        store.close()

        # 3. bulk import of a JSON Lines file, into a database of its own
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
                t_ours, _ = timed(lambda: bulk_store.import_jsonl(path))
                again, _ = timed(lambda: bulk_store.import_jsonl(path))
                bulk_store.close()
            t_copy, _ = timed(lambda: raw_copy(dsn, data))
        row(
            "bulk import (file, validated)", args.events, t_ours, "raw COPY, no constraints", t_copy
        )
        row(
            "re-import of the same file (no-op)",
            args.events,
            again,
            "raw COPY, no constraints",
            t_copy,
        )
        print(f"\npeak RSS of this process: {peak_rss_mb():,.0f} MiB")


if __name__ == "__main__":
    main()
