"""Soak: writers, the live processor and readers under kills and server restarts.

For ``--seconds`` on a private embedded PostgreSQL (its own home, so restarting it
disturbs nobody), this runs:

* ``--writers`` threads appending trades with optimistic concurrency to a few hot
  accounts (so they conflict), retrying conflicts; an append whose outcome is unknown
  (the server went away mid-call) is looked up by trade id before it is retried, so a
  trade is never written twice;
* the live processor (``riskbook live``) in a subprocess, SIGKILLed and restarted
  ``--kills`` times;
* ``--readers`` threads refreshing a History, checking that positions only go forward
  and no event is seen twice;
* ``--restarts`` restarts of the PostgreSQL server under all of them.

At the end it checks that every acknowledged append is in the store exactly once, that
every hash chain verifies, and that the processor's effects equal those of one replay
of the stored history; it prints the figures and exits non-zero if any check fails.

    uv run python benchmarks/soak.py                       # 120 s
    uv run python benchmarks/soak.py --seconds 20 --json soak.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from riskbook.store.embedded import EmbeddedServer

ACCOUNTS = 6
SYMBOLS = 3
T0 = datetime(2024, 1, 2, tzinfo=UTC)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acknowledged: set[str] = set()  # trade ids whose append returned
        self.conflicts = 0
        self.unknown = 0  # appends whose outcome had to be looked up
        self.errors: list[str] = []
        self.backwards = 0
        self.seen_twice = 0
        self.refreshes = 0

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


def _trade(account: str, rnd: random.Random, seq: int) -> object:
    import riskbook

    return riskbook.TradeExecuted(
        trade_id=f"{account}-{uuid.uuid4().hex}",
        account_id=account,
        symbol=f"S{rnd.randrange(SYMBOLS)}",
        side=riskbook.Side.Buy if rnd.random() < 0.55 else riskbook.Side.Sell,
        quantity=float(rnd.randint(1, 60)),
        price=100.0,
        executed_at=T0 + timedelta(seconds=time.time() - 1.7e9 + seq * 1e-6),
    )


def _present(store: object, trade_ids: list[str]) -> set[str]:
    with store.connection() as conn:  # type: ignore[attr-defined]
        rows = conn.execute(
            "SELECT trade_id FROM event_fields WHERE event_type = 'TradeExecuted'"
            " AND trade_id = ANY(%s)",
            (trade_ids,),
        ).fetchall()
        conn.rollback()
    return {r[0] for r in rows}


def writer(dsn: str, n: int, stop: threading.Event, tally: Tally) -> None:
    import riskbook
    from riskbook.errors import ConcurrencyConflict, RiskbookError

    rnd = random.Random(n)
    store = riskbook.connect(dsn, migrate=False)
    seq = 0
    try:
        while not stop.is_set():
            account = f"ACC-{rnd.randrange(ACCOUNTS)}"
            events = [_trade(account, rnd, seq + i) for i in range(rnd.randint(1, 5))]
            seq += len(events)
            ids = [e.trade_id for e in events]  # type: ignore[attr-defined]
            while not stop.is_set():
                try:
                    version = store.version(account)
                    store.append(account, events, expected_version=version)  # type: ignore[arg-type]
                    tally.add()
                    with tally.lock:
                        tally.acknowledged.update(ids)
                    break
                except ConcurrencyConflict:
                    tally.add(conflicts=1)  # someone else appended first: read again, retry
                except RiskbookError:
                    # The server went away: did the append commit before it did?
                    tally.add(unknown=1)
                    while not stop.is_set():
                        try:
                            found = _present(store, ids)
                            break
                        except RiskbookError:
                            time.sleep(0.2)
                    else:
                        return
                    if found == set(ids):
                        with tally.lock:
                            tally.acknowledged.update(ids)
                        break
                    if found:
                        with tally.lock:
                            tally.errors.append(f"half an append is stored: {sorted(found)}")
                        break
                    time.sleep(0.1)  # not stored: retry the same trades
    finally:
        store.close()


def reader(dsn: str, stop: threading.Event, tally: Tally) -> None:
    import riskbook
    from riskbook.errors import RiskbookError

    store = riskbook.connect(dsn, migrate=False)
    try:
        history = None
        while history is None and not stop.is_set():
            try:
                history = riskbook.load(store, progress=False, cache=False)
            except RiskbookError:
                time.sleep(0.2)
        if history is None:
            return
        seen = set(history.events["event_id"].to_list())
        top = int(history.events["position"].max() or 0)
        while not stop.is_set():
            before = history.events.height
            try:
                history.refresh(progress=False)
            except RiskbookError:
                time.sleep(0.2)
                continue
            new = history.events.slice(before)
            positions = new["position"].to_list()
            backwards = sum(1 for p in positions if p <= top)
            backwards += sum(1 for a, b in itertools.pairwise(positions) if b <= a)
            twice = sum(1 for e in new["event_id"].to_list() if e in seen)
            seen.update(new["event_id"].to_list())
            top = max([top, *positions])
            tally.add(backwards=backwards, seen_twice=twice, refreshes=1)
            time.sleep(0.05)
    finally:
        store.close()


def _processor(dsn: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "riskbook.cli", "live", "--dsn", dsn, "--name", "soak",
         "--max-batch", "400"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, object]:
    from riskbook.store.embedded import EmbeddedServer, _remove_outside_files

    home = Path(args.home or tempfile.mkdtemp(prefix="riskbook-soak-"))
    server = EmbeddedServer(home)
    try:
        return _soak(args, server)
    finally:
        server.stop()
        _remove_outside_files(server)  # as root, a whole cluster under /var/lib/riskbook
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)


def _soak(args: argparse.Namespace, server: EmbeddedServer) -> dict[str, object]:
    import riskbook
    from riskbook.live import Engine

    dsn = server.start()
    store = riskbook.connect(dsn)
    for a in range(ACCOUNTS):
        acc = f"ACC-{a}"
        store.append(acc, [
            riskbook.AccountFunded(account_id=acc, amount=1e7, funded_at=T0),
            riskbook.LimitSet(account_id=acc, limit_type="MaxPositionSize", value=300.0,
                              set_by="soak", set_at=T0),
        ])  # fmt: skip
    store.close()
    tally = Tally()
    stop = threading.Event()
    threads = [
        threading.Thread(target=writer, args=(dsn, n, stop, tally)) for n in range(args.writers)
    ]
    threads += [threading.Thread(target=reader, args=(dsn, stop, tally)) for _ in range(args.readers)]  # fmt: skip
    for t in threads:
        t.start()
    processor = _processor(dsn)
    began = time.monotonic()
    kills = restarts = 0
    chaos = ["kill"] * args.kills + ["restart"] * args.restarts
    random.Random(0).shuffle(chaos)
    gap = args.seconds / (len(chaos) + 1)
    for i, what in enumerate(chaos, 1):
        time.sleep(max(0.0, began + i * gap - time.monotonic()))
        if what == "kill":
            processor.send_signal(signal.SIGKILL)
            processor.wait()
            processor = _processor(dsn)
            kills += 1
            print(
                f"  {time.monotonic() - began:5.1f} s: processor killed and restarted", flush=True
            )
        else:
            server.stop()
            time.sleep(0.5)
            server.start()
            restarts += 1
            print(f"  {time.monotonic() - began:5.1f} s: PostgreSQL restarted", flush=True)
    time.sleep(max(0.0, began + args.seconds - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(60)
    processor.send_signal(signal.SIGTERM)
    processor.wait(60)
    # The processor catches up, then the checks.
    subprocess.run([sys.executable, "-m", "riskbook.cli", "live", "--dsn", dsn, "--name", "soak",
                    "--once"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    store = riskbook.connect(dsn)
    with store.connection() as conn:
        rows = conn.execute(
            "SELECT trade_id, count(*) FROM event_fields WHERE event_type = 'TradeExecuted'"
            " GROUP BY trade_id"
        ).fetchall()
        conn.rollback()
    stored = dict(rows)
    lost = sum(1 for t in tally.acknowledged if t not in stored)
    duplicates = sum(c - 1 for c in stored.values() if c > 1)
    report = riskbook.verify(store)
    history = riskbook.load(store, progress=False, cache=False)
    replay = Counter((e.kind, e.account_id, e.causation_id) for e in Engine().apply(history))
    effects = Counter(
        (e.event_type, e.aggregate_id, str(e.causation_id))
        for e in store.read_all()
        if e.metadata.get("processor") == "soak"
    )
    store.close()
    server.stop()
    elapsed = time.monotonic() - began
    return {
        "seconds": round(elapsed, 1),
        "writers": args.writers,
        "readers": args.readers,
        "trades_acknowledged": len(tally.acknowledged),
        "events_stored": int(history.events.height),
        "conflicts_retried": tally.conflicts,
        "unknown_outcomes_resolved": tally.unknown,
        "processor_kills_survived": kills,
        "server_restarts_survived": restarts,
        "events_lost": lost,
        "duplicates": duplicates,
        "chains_verified": report.ok,
        "effects": sum(effects.values()),
        "effects_equal_replay": effects == replay,
        "reader_refreshes": tally.refreshes,
        "reader_saw_backwards": tally.backwards,
        "reader_saw_twice": tally.seen_twice,
        "errors": tally.errors,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--kills", type=int, default=3, help="processor SIGKILLs (default 3)")
    ap.add_argument("--restarts", type=int, default=2, help="PostgreSQL restarts (default 2)")
    ap.add_argument("--home", default=None, help="the private server's home (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    print(f"soak: {args.writers} writers, {args.readers} readers, the live processor, "
          f"{args.kills} kills and {args.restarts} restarts over {args.seconds:g} s", flush=True)  # fmt: skip
    out = run(args)
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"  {k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool)
              else f"  {k:<{width}}  {v}")  # fmt: skip
    ok = (
        out["events_lost"] == 0
        and out["duplicates"] == 0
        and out["chains_verified"]
        and out["effects_equal_replay"]
        and out["reader_saw_backwards"] == 0
        and out["reader_saw_twice"] == 0
        and not out["errors"]
    )
    print("soak: OK" if ok else "soak: FAILED")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
