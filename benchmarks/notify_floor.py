"""The floor of live latency: a bare NOTIFY -> LISTEN round trip, beside Store.follow.

Measures, each in a fresh process on a scratch database of the same server:

* the floor: one connection LISTENs (in a thread), another sends ``NOTIFY`` (autocommit,
  so it is delivered at its commit); time from sending to the listener holding it;
* riskbook: ``Store.append`` of one event, then ``Store.follow`` (in a thread) yields
  it; time from the append call to the follower holding the envelope.

Both are measured the same way (a thread hands the arrival time back), so the ratio
is what ``append`` + ``follow`` add to the server's own notification.

    uv run python benchmarks/notify_floor.py               # 500 round trips each
    uv run python benchmarks/notify_floor.py --n 100 --json floor.json

``notify_round_trip(dsn, n)`` is also what ``benchmarks/live.py`` compares against.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_json, peak_rss_mb, scratch_database

CHANNEL = "riskbook_bench_floor"
HERE = Path(__file__).resolve()


def notify_round_trip(dsn: str, n: int, *, warmup: int = 20) -> list[float]:
    """Seconds of ``n`` bare NOTIFY -> LISTEN round trips on the server of ``dsn``.

    The listener runs in a thread of its own connection; each NOTIFY is sent on a
    second, autocommit connection and timed until the listener has it.
    """
    return _round_trips(dsn, n, warmup=warmup, durable=False)


def durable_round_trip(dsn: str, n: int, *, warmup: int = 20) -> list[float]:
    """As :func:`notify_round_trip`, but each NOTIFY is sent in a transaction that also
    INSERTs one row into a bare table: the commit waits for the disk (fsync), as any
    durable append must, before the notification goes out."""
    return _round_trips(dsn, n, warmup=warmup, durable=True)


def _round_trips(dsn: str, n: int, *, warmup: int, durable: bool) -> list[float]:
    arrived: queue.Queue[tuple[str, float]] = queue.Queue()
    with (
        psycopg.connect(dsn, autocommit=True) as listener,
        psycopg.connect(dsn, autocommit=True) as sender,
    ):
        listener.execute(f"LISTEN {CHANNEL}")
        if durable:
            sender.execute("CREATE TABLE IF NOT EXISTS bench_floor (i bigint, at timestamptz)")
        send = (
            "WITH w AS (INSERT INTO bench_floor VALUES (%s::bigint, now()))"
            " SELECT pg_notify(%s, %s::text)"
            if durable
            else "SELECT pg_notify(%s, %s::text)"
        )
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                for note in listener.notifies(timeout=0.2):
                    arrived.put((note.payload, time.perf_counter()))

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        times = []
        try:
            for i in range(warmup + n):
                t = time.perf_counter()
                sender.execute(send, (i, CHANNEL, i) if durable else (CHANNEL, i))
                payload, got = arrived.get(timeout=10)
                assert payload == str(i), (payload, i)
                if i >= warmup:
                    times.append(got - t)
        finally:
            stop.set()
            thread.join()
    return times


def follow_round_trip(dsn: str, n: int, *, warmup: int = 20) -> list[float]:
    """Seconds from ``Store.append`` of one event to ``Store.follow`` yielding it."""
    from datetime import UTC, datetime

    import riskbook

    arrived: queue.Queue[tuple[int, float]] = queue.Queue()
    with riskbook.connect(dsn) as store:
        stop = threading.Event()
        start = store.head()

        def follow() -> None:
            for batch in store.follow(after=start, max_wait=0.2):
                now = time.perf_counter()
                for env in batch:
                    arrived.put((env.position or 0, now))
                if stop.is_set():
                    return

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        times = []
        at = datetime(2024, 1, 2, tzinfo=UTC)
        try:
            for i in range(warmup + n):
                event = riskbook.AccountFunded(account_id="FLOOR", amount=1.0 + i, funded_at=at)
                t = time.perf_counter()
                (stored,) = store.append("FLOOR", [event], expected_version=i)
                position, got = arrived.get(timeout=10)
                assert position == stored.position, (position, stored.position)
                if i >= warmup:
                    times.append(got - t)
        finally:
            stop.set()
            store.append("FLOOR", [event])  # wake the follower so that it sees stop
            thread.join(timeout=10)
    return times


def summary(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
        "n": len(ms),
    }


MEASURES = {
    "floor": (notify_round_trip, "bare NOTIFY→LISTEN (floor)"),
    "durable": (durable_round_trip, "INSERT + NOTIFY, commit → LISTEN (durable floor)"),
    "follow": (follow_round_trip, "append → Store.follow"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=500, help="round trips of each (default 500)")
    ap.add_argument("--events", type=int, default=None, help="ignored (run_all's common flag)")
    ap.add_argument("--dsn", default=None, help="server to use (default: RISKBOOK_DSN or embedded)")
    ap.add_argument("--json", default=None, help="write the report rows here")
    ap.add_argument("--child", choices=tuple(MEASURES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        out = summary(MEASURES[args.child][0](args.dsn, args.n))
        print(json.dumps({**out, "peak_rss_mb": peak_rss_mb()}))
        return 0

    import riskbook

    res = {}
    with scratch_database(args.dsn) as dsn:
        riskbook.connect(dsn).close()  # the schema, before anything is timed
        for name in MEASURES:
            res[name] = child_json([str(HERE), "--child", name, "--dsn", dsn, "--n", str(args.n)])
    print(f"{args.n} round trips each, each in a fresh process\n")
    print("| measure | p50 ms | p99 ms | peak RSS MiB |")
    print("|---|---:|---:|---:|")
    for name, r in res.items():
        print(
            f"| {MEASURES[name][1]} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['peak_rss_mb']:,.0f} |"
        )
    ours = res["follow"]
    for name in ("floor", "durable"):
        print(f"append → follow / {MEASURES[name][1]}: p50 {ours['p50_ms'] / res[name]['p50_ms']:.2f}x,"
              f" p99 {ours['p99_ms'] / res[name]['p99_ms']:.2f}x")  # fmt: skip
    if args.json:
        from _report import Row, write_rows

        rows = [
            Row(
                group="live",
                measure=f"append → Store.follow yields it ({q})",
                unit="ms",
                riskbook=ours[f"{q}_ms"],
                peer=res[name][f"{q}_ms"],
                peer_name=MEASURES[name][1],
                higher_is_better=False,
                riskbook_peak_mb=ours["peak_rss_mb"],
                peer_peak_mb=res[name]["peak_rss_mb"],
                note=f"{args.n} round trips",
            )
            for name in ("floor", "durable")
            for q in ("p50", "p99")
        ]
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
