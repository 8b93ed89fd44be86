"""Shared helpers for the benchmarks: a scratch database, timing, peak memory."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

# Python's default is to cache each module's bytecode in __pycache__. A shell with
# PYTHONDONTWRITEBYTECODE set makes every fresh process of a measure compile its
# libraries' modules again (numba's first call, say: 0.5 s instead of 0.16), which no
# user's kernel pays twice. The benchmarks and the processes they start use the default.
BYTECODE_WAS_OFF = os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None
sys.dont_write_bytecode = False


def server_dsn(dsn: str | None = None) -> str:
    """``dsn``, else RISKBOOK_DSN, else the embedded server (started if needed)."""
    dsn = dsn or os.environ.get("RISKBOOK_DSN")
    if dsn:
        return dsn
    from riskbook.store.embedded import default_server

    return default_server().attach()


def with_dbname(dsn: str, dbname: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    parts["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]


@contextmanager
def scratch_database(dsn: str | None = None) -> Iterator[str]:
    """A new empty database for one benchmark run, dropped afterwards."""
    admin = with_dbname(server_dsn(dsn), "postgres")
    name = f"riskbook_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(admin, name)
    finally:
        _forget_cached(with_dbname(admin, name))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _forget_cached(dsn: str) -> None:
    """Remove what riskbook cached of the store at ``dsn`` (its load cache, its live
    processors' snapshots: gigabytes at millions of events), which nothing can use once
    the database is dropped."""
    import shutil

    from riskbook.frames import _cache_root

    try:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT store_id::text FROM riskbook_store").fetchone()
    except psycopg.Error:  # never migrated: nothing cached
        return
    if row is not None:
        shutil.rmtree(_cache_root() / str(row[0]), ignore_errors=True)


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``repeat`` runs, and all the times."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, as the OS counts it (MiB).

    Linux's VmHWM: unlike ``getrusage``'s ``ru_maxrss``, it does not start from the
    parent's peak, which a child started by fork (or vfork) + exec inherits.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_json(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python *argv`` in a fresh process (its memory its own) and return the JSON
    object it printed last; its stderr goes to ours."""
    out = subprocess.run(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        env=env,
    )
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@contextmanager
def simulated_store(
    dsn: str | None, *, seed: int, accounts: int, symbols: int, events: int
) -> Iterator[object]:
    """A Store holding a simulated history: ``dsn`` as given (filled if empty), else a
    scratch database made, filled and dropped here. Yields the Store (closed after)."""
    from contextlib import nullcontext

    from riskbook import simulate
    from riskbook.store import Store

    with nullcontext(dsn) if dsn else scratch_database() as target:
        store = Store(target)
        if store.count() == 0:
            t = time.perf_counter()
            result, _ = simulate.stream_to_store(
                store, seed=seed, accounts=accounts, symbols=symbols, events=events
            )
            print(
                f"history: simulated {result.added:,} events into PostgreSQL"
                f" in {time.perf_counter() - t:.1f} s"
            )
            settle(store)
        try:
            yield store
        finally:
            store.close()


def settle(store: Any) -> None:
    """VACUUM (ANALYZE) a store just filled, as autovacuum would soon after a bulk load.

    Without it autovacuum's worker scans the new tables while the benchmarks run: on 2
    cores that took a 5M load from about 4.2 s to 4.3-5.1 s, measured here.
    """
    t = time.perf_counter()
    with store.connection() as conn:
        conn.autocommit = True
        try:
            conn.execute("VACUUM (ANALYZE)")
        finally:
            conn.autocommit = False
    print(f"history: vacuumed and analyzed in {time.perf_counter() - t:.1f} s")


def in_spawned_child(history: Any, child: Callable[[str, Any], None]) -> dict[str, Any]:
    """Run ``child(parquet_dir, queue)`` in a fresh spawned process on a Parquet copy of
    ``history`` (its memory its own); return the dict it puts on the queue."""
    import multiprocessing as mp
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        history.to_parquet(tmp)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        process = ctx.Process(target=child, args=(tmp, queue))
        process.start()
        result: dict[str, Any] = queue.get()
        process.join()
    return result
