"""How fast riskbook.simulate makes histories (issue 3): events/s into a file and a store.

    uv run python benchmarks/simulate.py                     # 5M events, one run each
    uv run python benchmarks/simulate.py --events 200000     # small: median of 3 runs
    uv run python benchmarks/simulate.py --json rows.json    # + the report row

Measures, for the same seed and sizes:

* ``file``: :func:`riskbook.simulate.stream_jsonl` into a ``.jsonl.gz`` (the import format);
* ``store``: :func:`riskbook.simulate.stream_to_store` into a fresh database created on
  the server of ``--dsn`` (default ``RISKBOOK_DSN``, else the embedded server) and
  dropped afterwards;
* ``objects``: ``generate()`` + ``to_store()`` through ``Store.import_envelopes`` (the
  path that builds every Envelope), only up to 1M events.

The goal from the issue: 5M events into the store in under 2 minutes on the project's
2-core machine (41,667 events/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from riskbook import simulate
from riskbook.store import Store, connect, redact

GOAL_SECONDS = 120.0
GOAL_EVENTS = 5_000_000


def _with_dbname(dsn: str, dbname: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    parts["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]


def _fresh_database(server_dsn: str) -> tuple[str, Callable[[], None]]:
    name = f"riskbook_bench_{uuid.uuid4().hex[:10]}"
    admin = _with_dbname(server_dsn, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    return _with_dbname(server_dsn, name), drop


def _median(runs: int, once: Callable[[], tuple[int, float]]) -> tuple[int, float, list[float]]:
    results = [once() for _ in range(runs)]
    n = results[0][0]
    seconds = [s for _, s in results]
    return n, statistics.median(seconds), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=GOAL_EVENTS)
    parser.add_argument("--dsn", default=None, help="server to create the scratch database on")
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=None, help="default: 3 up to 1M events, else 1")
    parser.add_argument("--skip-file", action="store_true")
    parser.add_argument("--json", default=None, help="write the report rows here")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.events <= 1_000_000 else 1)
    params: dict[str, Any] = dict(
        seed=args.seed, accounts=args.accounts, symbols=args.symbols, events=args.events
    )

    server_dsn = args.dsn or os.environ.get("RISKBOOK_DSN")
    if not server_dsn:
        with connect() as store:  # the embedded server, started or attached to
            server_dsn = store.dsn
    print(f"server: {redact(server_dsn)}")
    print(f"history: {params}, {runs} run(s) each, median shown")

    rows: list[tuple[str, int, float, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_file:

            def to_file() -> tuple[int, float]:
                started = time.perf_counter()
                n, _ = simulate.stream_jsonl(Path(tmp) / "h.jsonl.gz", **params)
                return n, time.perf_counter() - started

            rows.append(("file (.jsonl.gz)", *_median(runs, to_file)))
            size = (Path(tmp) / "h.jsonl.gz").stat().st_size
            print(f"  file: {size / 1e6:,.1f} MB gzipped")

    def to_store() -> tuple[int, float]:
        dsn, drop = _fresh_database(server_dsn)
        try:
            with Store(dsn) as store:
                started = time.perf_counter()
                result, _ = simulate.stream_to_store(store, **params)
                seconds = time.perf_counter() - started
                assert store.count() == result.added
            return result.added, seconds
        finally:
            drop()

    rows.append(("store (stream_to_store)", *_median(runs, to_store)))

    if args.events <= 1_000_000:

        def objects() -> tuple[int, float]:
            dsn, drop = _fresh_database(server_dsn)
            try:
                with Store(dsn) as store:
                    started = time.perf_counter()
                    sim = simulate.generate(**params)
                    result = simulate.to_store(sim, store)
                    return result.added, time.perf_counter() - started
            finally:
                drop()

        rows.append(("objects (generate + to_store)", *_median(runs, objects)))

    print()
    print(f"{'path':<32} {'events':>11} {'seconds':>9} {'events/s':>11}   runs (s)")
    for name, n, seconds, all_runs in rows:
        print(
            f"{name:<32} {n:>11,} {seconds:>9.1f} {n / seconds:>11,.0f}   "
            + ", ".join(f"{s:.1f}" for s in all_runs)
        )
    store_n, store_s = rows[-1 if args.events > 1_000_000 else -2][1:3]
    need = GOAL_EVENTS / GOAL_SECONDS
    print(
        f"\ngoal: {GOAL_EVENTS:,} events into the store in {GOAL_SECONDS:.0f} s "
        f"= {need:,.0f} events/s; store path: {store_n / store_s:,.0f} events/s "
        f"({store_n / store_s / need:.2f} x the goal)"
    )
    if args.json and not args.skip_file:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _report import Row, write_rows

        file_n, file_s = rows[0][1:3]
        row = Row(
            group="simulate",
            measure="simulated history into the store (stream_to_store)",
            unit="events/s",
            riskbook=store_n / store_s,
            peer=file_n / file_s,
            peer_name="the same into a .jsonl.gz (stream_jsonl): no database",
            note=f"{store_n:,} events; goal {need:,.0f} events/s",
        )
        write_rows(args.json, [row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
