"""The live processor under a writer: sustained events/s, and latency from a trade's
commit to its violation's commit, beside the floor (a bare NOTIFY -> LISTEN round trip).

A writer process appends trades at a fixed rate (1k, 5k, 20k events/s, then flat out)
to 20 accounts with MaxPositionSize limits that positions cross now and then (about
one trade in a hundred starts a breach), while the processor runs in this process.
Per rate it prints:

* events/s written and events/s the processor processed over the same seconds, and
  how far behind it was at the end;
* latency of every trade: from the trade's commit (its recorded time) to the commit
  of the processor's batch that covered it; and of every violation: from the trade's
  commit to the violation's commit (the violation's recorded time), p50 and p99;
* the floor: bare NOTIFY -> LISTEN round trips on the same server.

    uv run python benchmarks/live.py                    # 10 s per rate
    uv run python benchmarks/live.py --seconds 5 --rates 1000,5000 --json live.json

The processor's peak memory is this process's (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, scratch_database

ACCOUNTS = 20
SYMBOLS = 5
LIMIT = 1_000.0
T0 = datetime(2024, 1, 2, tzinfo=UTC)


def _writer(
    dsn: str, rate: float, seconds: float, run: int, part: int, parts: int, tick: float = 0.01
) -> None:
    """Append trades at ``rate`` events/s (0: flat out) for ``seconds``; print a JSON
    summary. Positions walk around the limit so that breaches start now and then."""
    import riskbook

    store = riskbook.connect(dsn, migrate=False)
    rnd = random.Random(run * 100 + part)
    mine = [a for a in range(ACCOUNTS) if a % parts == part]
    q = {(a, s): _opening(a, s) for a in range(ACCOUNTS) for s in range(SYMBOLS)}
    started = time.perf_counter()
    written = 0
    batch = 1000 if rate == 0 else max(1, round(rate * tick))
    n = 0
    while True:
        now = time.perf_counter() - started
        if now >= seconds:
            break
        if rate:
            due = int(now * rate)
            if written >= due:
                time.sleep(min(tick, (written + batch) / rate - now))
                continue
        a = mine[n % len(mine)]
        n += 1
        events = []
        for _ in range(batch):
            s = rnd.randrange(SYMBOLS)
            pos = q[(a, s)]
            # A random walk held in [200, 1,020]: over the 1,000 limit now and then.
            step = rnd.uniform(5, 60)
            buy = pos < 200 or (pos < 1_020 and rnd.random() < 0.5)
            q[(a, s)] = pos + (step if buy else -step)
            events.append(
                riskbook.TradeExecuted(
                    trade_id=uuid.uuid4().hex,
                    account_id=_account(run, a),
                    symbol=f"S{s}",
                    side=riskbook.Side.Buy if buy else riskbook.Side.Sell,
                    quantity=step,
                    price=100.0,
                    executed_at=T0 + timedelta(seconds=time.time() - 1.7e9),
                )
            )
        store.append(_account(run, a), events)
        written += batch
    elapsed = time.perf_counter() - started
    store.close()
    print(json.dumps({"written": written, "seconds": elapsed}))


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def _run_rate(dsn: str, rate: float, seconds: float, seed: int) -> dict[str, float]:
    import riskbook
    from riskbook.live import Processor

    store = riskbook.connect(dsn)
    with store.connection() as conn:
        start_pos = int(conn.execute("SELECT riskbook_position_fence()").fetchone()[0])  # type: ignore[index]
        conn.rollback()
    processor = Processor(store, name=f"bench-{rate:g}-{seed}", start="head", critical=100.0)
    processor.start()
    while processor.status != "running":
        time.sleep(0.01)
        if processor.error is not None:
            raise processor.error
    parts = 2 if rate == 0 else 1  # flat out: two writer processes
    writers = [
        subprocess.Popen(
            [sys.executable, __file__, "--writer", dsn, str(rate), str(seconds), str(seed),
             str(w), str(parts)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(parts)
    ]  # fmt: skip
    reports = []
    for w in writers:
        out, _ = w.communicate()
        if w.returncode != 0:
            raise SystemExit("a writer failed")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    wrote = {
        "written": sum(r["written"] for r in reports),
        "seconds": max(r["seconds"] for r in reports),
    }
    writer_done = time.perf_counter()
    with store.connection() as conn:  # the last event written
        head = int(conn.execute("SELECT max(position) FROM events").fetchone()[0])  # type: ignore[index]
        conn.rollback()
    while processor.engine.horizon <= head:  # let it finish, to measure every latency
        time.sleep(0.01)
        if time.perf_counter() - writer_done > 120:
            raise SystemExit("the processor did not catch up within 2 minutes")
    drained = time.perf_counter()
    processor.stop()
    commits = sorted(processor.commits, key=lambda c: c.horizon)
    horizons = np.array([c.horizon for c in commits], np.int64)
    committed = np.array([c.committed_at for c in commits])
    with store.connection() as conn:
        trades = conn.execute(
            'SELECT position, extract(epoch FROM "timestamp")::float8 FROM events'
            " WHERE position >= %s AND event_type = 'TradeExecuted'",
            (start_pos,),
        ).fetchall()
        violations = conn.execute(
            'SELECT extract(epoch FROM v."timestamp" - t."timestamp")::float8'
            "  FROM events v JOIN events t ON t.event_id = v.causation_id"
            " WHERE v.position >= %s AND v.event_type = 'LimitViolationDetected'",
            (start_pos,),
        ).fetchall()
        conn.rollback()
    store.close()
    pos = np.array([r[0] for r in trades], np.int64)
    rec = np.array([r[1] for r in trades])
    covering = np.searchsorted(horizons, pos, side="right")  # first commit with horizon > pos
    event_lat = committed[covering] - rec
    # Sustained: the trades over the time from the first one's commit to the commit of
    # the batch that covered the last one.
    sustained = pos.size / (committed[covering].max() - rec.min()) if pos.size else 0.0
    batch_ms = np.array([c.seconds for c in commits]) * 1e3
    viol_lat = np.array([r[0] for r in violations])
    e50, e99 = _percentiles(event_lat * 1e3)
    v50, v99 = _percentiles(viol_lat * 1e3)
    return {
        "rate": rate,
        "written": wrote["written"],
        "write_rate": wrote["written"] / wrote["seconds"],
        "processed_rate": sustained,
        "batch_p50_ms": float(np.median(batch_ms)) if batch_ms.size else float("nan"),
        "drain_seconds": drained - writer_done,
        "batches": len(commits),
        "violations": len(viol_lat),
        "event_p50_ms": e50,
        "event_p99_ms": e99,
        "violation_p50_ms": v50,
        "violation_p99_ms": v99,
    }


def _catch_up(dsn: str, seconds: float, run: int) -> dict[str, float]:
    """A backlog written while the processor is attached but idle, then caught up."""
    import riskbook
    from riskbook.live import Processor

    store = riskbook.connect(dsn)
    processor = Processor(store, name=f"bench-backlog-{run}", start="head", critical=100.0)
    processor.catch_up()  # attached at the head, the state of what is there rebuilt
    writers = [
        subprocess.Popen(
            [sys.executable, __file__, "--writer", dsn, "0", str(seconds), str(run), str(w), "2"],
            stdout=subprocess.DEVNULL,
        )
        for w in range(2)
    ]
    for w in writers:
        w.wait()
    began = time.perf_counter()
    before = processor.engine.events_seen
    processor.catch_up()
    elapsed = time.perf_counter() - began
    events = processor.engine.events_seen - before
    processor.stop()
    store.close()
    return {"events": events, "seconds": elapsed, "rate": events / elapsed}


def _opening(a: int, s: int) -> float:
    """The position each (account, symbol) starts a run with, set up by :func:`_setup`."""
    return 200.0 + ((a * 7 + s * 13) % 75) * 10.0


def _account(run: int, a: int) -> str:
    return f"R{run}-ACC-{a:02d}"  # each run its own accounts, positions from zero


def _setup(dsn: str, run: int) -> None:
    import riskbook

    store = riskbook.connect(dsn)
    for a in range(ACCOUNTS):
        acc = _account(run, a)
        store.append(
            acc,
            [
                riskbook.AccountFunded(account_id=acc, amount=10_000_000.0, funded_at=T0),
                riskbook.LimitSet(
                    account_id=acc,
                    limit_type="MaxPositionSize",
                    value=LIMIT,
                    set_by="bench",
                    set_at=T0,
                ),
                *[
                    riskbook.TradeExecuted(
                        trade_id=f"open-{acc}-{s}",
                        account_id=acc,
                        symbol=f"S{s}",
                        side=riskbook.Side.Buy,
                        quantity=_opening(a, s),
                        price=100.0,
                        executed_at=T0,
                    )
                    for s in range(SYMBOLS)
                ],
            ],
        )
    store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="writer run per rate (default 10)")
    ap.add_argument("--rates", default="1000,5000,20000,0",
                    help="events/s to write, 0 = flat out (default 1000,5000,20000,0)")  # fmt: skip
    ap.add_argument("--events", type=int, default=None,
                    help="scale (run_all): seconds per rate = events / 20000, from 3 to 30")  # fmt: skip
    ap.add_argument("--floor", type=int, default=300, help="NOTIFY round trips for the floor")
    ap.add_argument("--dsn", default=None, help="server to use (default: RISKBOOK_DSN or embedded)")
    ap.add_argument("--json", default=None, help="write the report rows here")
    ap.add_argument("--writer", nargs=6, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.writer:
        dsn, rate, seconds, run, part, parts = args.writer
        _writer(dsn, float(rate), float(seconds), int(run), int(part), int(parts))
        return 0
    seconds = args.seconds if args.events is None else min(30.0, max(3.0, args.events / 20_000))
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    from notify_floor import notify_round_trip

    results = []
    with scratch_database(args.dsn) as dsn:
        floor = np.array(notify_round_trip(dsn, args.floor)) * 1e3
        f50, f99 = _percentiles(floor)
        print(f"floor: NOTIFY -> LISTEN round trip  p50 {f50:.2f} ms  p99 {f99:.2f} ms")
        for i, rate in enumerate(rates):
            _setup(dsn, i)
            r = _run_rate(dsn, rate, seconds, seed=i)
            results.append(r)
            label = "flat out" if rate == 0 else f"{rate:,.0f}/s"
            print(
                f"writer {label:>9}: wrote {r['write_rate']:8,.0f}/s, processed "
                f"{r['processed_rate']:8,.0f}/s (drained {r['drain_seconds']:.2f} s after), "
                f"{r['batches']:,} batches, median {r['batch_p50_ms']:.0f} ms | trade->covered p50 {r['event_p50_ms']:6.1f} ms "
                f"p99 {r['event_p99_ms']:6.1f} ms | trade->violation p50 "
                f"{r['violation_p50_ms']:6.1f} ms p99 {r['violation_p99_ms']:6.1f} ms "
                f"({r['violations']:,} violations)",
                flush=True,
            )
        _setup(dsn, len(rates))
        backlog = _catch_up(dsn, seconds, len(rates))
        print(
            f"catch-up of a backlog: {backlog['events']:,.0f} events in "
            f"{backlog['seconds']:.2f} s = {backlog['rate']:,.0f} events/s",
            flush=True,
        )
    rss = peak_rss_mb()
    print(f"peak RSS of this process (processor + driver): {rss:,.0f} MB")
    if args.json:
        from _report import Row, write_rows

        rows = []
        flat = next((r for r in results if r["rate"] == 0), None)
        if flat is not None:
            rows.append(Row("live", "sustained events/s, writer flat out", "events/s",
                            flat["processed_rate"], flat["write_rate"], "the writer's own rate",
                            riskbook_peak_mb=rss,
                            note="ratio ~1: the processor keeps up with the writer"))  # fmt: skip
        mid = next((r for r in results if r["rate"] == 5000), results[0] if results else None)
        if mid is not None:
            for q, floor_q in (("p50", f50), ("p99", f99)):
                rows.append(Row("live", f"trade -> violation commit {q}, {mid['rate']:,.0f} events/s",
                                "ms", mid[f"violation_{q}_ms"], floor_q,
                                "bare NOTIFY -> LISTEN", higher_is_better=False,
                                riskbook_peak_mb=rss))  # fmt: skip
        write_rows(args.json, rows)
    print(json.dumps({"floor_p50_ms": f50, "floor_p99_ms": f99, "runs": results,
                      "catch_up": backlog}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
