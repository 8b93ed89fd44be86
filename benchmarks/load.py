"""Loading history into Polars: riskbook against the usual routes, in one run.

Makes a synthetic history (``riskbook.simulate``) in a scratch database, then times,
each in a fresh process so that its peak memory (as the OS counts it) is its own:

* riskbook cold load (``riskbook.load``, no cache), and the same writing its cache;
* warm load (cache on disk + the empty delta from PostgreSQL);
* ``History.refresh()`` after 10,000 new events;
* the same rows and columns (riskbook's queries: one narrow query per event kind over
  the typed ``event_fields``) read by pandas ``read_sql``, ``pl.read_database`` over
  psycopg, connectorx, and ADBC straight into Arrow;
* the floor: the server's own ``COPY (same queries) TO '/dev/null'``.

    uv run --group bench python benchmarks/load.py                  # 5M events, ~15 min
    uv run --group bench python benchmarks/load.py --events 200000  # a quick look
    uv run --group bench python benchmarks/load.py --json rows.json # + the report rows

Times are medians of ``--repeat`` runs (the machine is shared and noisy); read the
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_json, peak_rss_mb, scratch_database, settle

HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------- child side


def _kind_queries() -> list[str]:
    """The queries riskbook.load runs (one narrow query per event kind), unfiltered."""
    from riskbook.frames import KINDS, _kind_query

    return [_kind_query(k) + "TRUE" for k in KINDS.values()]


def child(route: str, dsn: str, cache: str) -> dict[str, float]:
    """Run one route in this (fresh) process; return its time, rows and peak RSS."""
    os.environ["RISKBOOK_CACHE"] = cache
    import polars as pl

    import riskbook
    from riskbook.store import Store

    store = Store(dsn)
    t = time.perf_counter()
    rows = 0
    size = views = 0.0
    if route in ("cold", "cold+cache", "warm"):
        h = riskbook.load(store, cache=route != "cold", progress=False)
        rows = len(h)
        size, views = frames_size(h.frames().values())
    elif route == "refresh":
        h = riskbook.load(store, progress=False)  # warm, from the cache
        _append_new(store, 10_000)
        t = time.perf_counter()
        rows = h.refresh(progress=False)
    elif route == "pandas":
        import pandas as pd

        rows = sum(len(pd.read_sql(q, store.engine)) for q in _kind_queries())
    elif route == "read_database":
        with store.connection() as conn:
            rows = sum(
                pl.read_database(q, conn, infer_schema_length=None).height for q in _kind_queries()
            )
    elif route == "connectorx":
        import connectorx as cx

        rows = sum(
            cx.read_sql(_cx_uri(dsn), q, return_type="polars").height for q in _kind_queries()
        )
    elif route == "adbc":
        import adbc_driver_postgresql.dbapi as adbc

        with adbc.connect(dsn) as conn, conn.cursor() as cur:
            for q in _kind_queries():
                cur.execute(q)
                rows += pl.from_arrow(cur.fetch_arrow_table()).height  # type: ignore[union-attr]
    elif route == "floor":
        with store.connection() as conn:
            for q in _kind_queries():
                conn.execute(f"COPY ({q}) TO '/dev/null' (FORMAT binary)")
        rows = -1
    else:
        raise SystemExit(f"unknown route {route}")
    seconds = time.perf_counter() - t
    store.close()
    return {
        "seconds": seconds,
        "rows": rows,
        "peak_rss_mb": peak_rss_mb(),
        "frames_mb": size,
        "views_mb": views,
    }


def frames_size(frames: Any) -> tuple[float, float]:
    """The frames' size in memory (MiB), and the part of it Polars' ``estimated_size``
    leaves out: the 16-byte view of every String / Binary value.

    Polars keeps a string column as 16-byte views (a short string inline, a longer one
    as a pointer into shared data buffers) and ``estimated_size`` counts only the
    strings' bytes: a million 36-character ids give 36 MB where the column holds 52 MB,
    and a million 3-character strings 3 MB where it holds 16 MB. Measured here: a
    gather of a million ids (new views, the same data) adds about 35 MiB to the RSS.
    """
    import polars as pl

    estimated = views = 0
    for frame in frames:
        estimated += frame.estimated_size()
        views += 16 * sum(frame.height for dtype in frame.dtypes if dtype in (pl.String, pl.Binary))
    return (estimated + views) / 2**20, views / 2**20


def _cx_uri(dsn: str) -> str:
    # connectorx wants a URL; a Unix socket folder goes percent-encoded in the host part
    from urllib.parse import quote

    import psycopg

    p = psycopg.conninfo.conninfo_to_dict(dsn)
    auth = quote(str(p.get("user", "postgres")))
    if p.get("password"):
        auth += ":" + quote(str(p["password"]))
    host = quote(str(p.get("host", "localhost")), safe="")
    return f"postgresql://{auth}@{host}:{p.get('port', 5432)}/{p['dbname']}"


def _append_new(store: object, n: int) -> None:
    import uuid
    from datetime import UTC, datetime, timedelta

    import riskbook
    from riskbook.events import Envelope

    t0 = datetime(2030, 1, 2, tzinfo=UTC)
    envs = [
        Envelope(
            event_id=uuid.uuid4(),
            aggregate_id=f"NEW-{i % 100}",
            aggregate_type="Account",
            sequence=0,
            timestamp=t0 + timedelta(milliseconds=i),
            correlation_id="bench",
            payload=riskbook.AccountFunded(
                account_id=f"NEW-{i % 100}", amount=1.0 + i, funded_at=t0
            ),
        )
        for i in range(n)
    ]
    store.import_envelopes(envs)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------- parent side

ROUTES = {
    "cold": "riskbook cold load (no cache)",
    "cold+cache": "riskbook cold load, writing its cache",
    "warm": "riskbook warm load (cache + empty delta)",
    "refresh": "riskbook refresh, 10,000 new events",
    "adbc": "ADBC into Arrow -> Polars (same columns)",
    "connectorx": "connectorx -> Polars (same columns)",
    "read_database": "pl.read_database over psycopg",
    "pandas": "pandas read_sql (same columns)",
    "floor": "server's own COPY ... TO '/dev/null'",
}
PEERS = {
    "pandas": "pandas read_sql",
    "read_database": "pl.read_database (psycopg)",
    "connectorx": "connectorx",
    "adbc": "ADBC (adbc-driver-postgresql)",
    "floor": "server's own COPY … TO '/dev/null' (floor)",
}


def run_child(route: str, dsn: str, cache: str) -> dict[str, float]:
    return child_json([str(HERE), "--child", route, "--dsn", dsn, "--cache", cache])


def measure_routes(
    dsn: str, cache: str, *, repeat: int, skip: Collection[str] = ()
) -> dict[str, dict[str, float]]:
    """Every route on the history in ``dsn`` (``cache``: an empty folder for riskbook's
    cache), each run in a fresh process: its median seconds, rows, peak RSS (MiB)."""

    def measure(route: str, repeat_: int | None = None) -> dict[str, float]:
        runs = [run_child(route, dsn, cache) for _ in range(repeat_ or repeat)]
        med = statistics.median(r["seconds"] for r in runs)
        best = min(runs, key=lambda r: abs(r["seconds"] - med))
        return {**best, "seconds": med}

    res: dict[str, dict[str, float]] = {}
    res["floor"] = measure("floor")
    res["cold"] = measure("cold")
    res["cold+cache"] = measure("cold+cache", 1)
    res["warm"] = measure("warm")
    # each run appends 10,000 more events (a few tenths of a percent of a large history)
    res["refresh"] = measure("refresh")
    for route in ("adbc", "connectorx", "read_database", "pandas"):
        if route not in skip:
            res[route] = measure(route, 1 if route in ("pandas", "read_database") else None)
    return res


def report_rows(res: dict[str, dict[str, float]], events: int) -> list[Any]:
    """The report's rows: riskbook's cold load beside each peer route and the floor,
    and its warm load beside the fastest peer (which has no cache: it reads it all)."""
    from _report import Row

    cold = res["cold"]
    rows = [
        Row(
            group="load",
            measure="history into Polars, cold (no cache)",
            unit="s",
            riskbook=cold["seconds"],
            peer=res[route]["seconds"],
            peer_name=PEERS[route],
            higher_is_better=False,
            riskbook_peak_mb=cold["peak_rss_mb"],
            peer_peak_mb=None if route == "floor" else res[route]["peak_rss_mb"],
            note=f"{events:,} events, the same rows and columns",
        )
        for route in ("pandas", "read_database", "connectorx", "adbc", "floor")
        if route in res
    ]
    fastest = min(
        (r for r in ("adbc", "connectorx", "read_database", "pandas") if r in res),
        key=lambda r: res[r]["seconds"],
    )
    rows.append(
        Row(
            group="load",
            measure="history into Polars, warm (its Arrow cache + any new events)",
            unit="s",
            riskbook=res["warm"]["seconds"],
            peer=res[fastest]["seconds"],
            peer_name=PEERS[fastest] + ", reading it all again",
            higher_is_better=False,
            riskbook_peak_mb=res["warm"]["peak_rss_mb"],
            peer_peak_mb=res[fastest]["peak_rss_mb"],
            note="the peer has no cache",
        )
    )
    for route, measure, note in (
        ("warm", "history into Polars, warm", "its cache and an empty delta from PostgreSQL"),
        ("refresh", "History.refresh() after 10,000 new events", "only the new events read"),
    ):
        rows.append(
            Row(
                group="load",
                measure=measure,
                unit="s",
                riskbook=res[route]["seconds"],
                peer=cold["seconds"],
                peer_name="riskbook's own cold load of the whole history",
                higher_is_better=False,
                riskbook_peak_mb=res[route]["peak_rss_mb"],
                peer_peak_mb=cold["peak_rss_mb"],
                note=note,
            )
        )
    rows.append(
        Row(
            group="load",
            measure="peak memory of the cold load",
            unit="MiB",
            riskbook=cold["peak_rss_mb"],
            peer=2 * cold["frames_mb"],
            peer_name="twice the loaded frames' own size (the goal)",
            higher_is_better=False,
            note=f"frames {cold['frames_mb']:,.0f} MiB: Polars' estimated_size"
            f" {cold['frames_mb'] - cold['views_mb']:,.0f} + string views"
            f" {cold['views_mb']:,.0f} that it leaves out",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each route (median)")
    ap.add_argument("--skip", default="", help="comma-separated routes to skip (e.g. pandas)")
    ap.add_argument("--dsn", default=None, help="server to use (default: RISKBOOK_DSN or embedded)")
    ap.add_argument("--json", default=None, help="write the report rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dsn, args.cache)))
        return 0

    from riskbook import simulate
    from riskbook.store import Store

    skip = set(filter(None, args.skip.split(",")))
    with scratch_database(args.dsn) as dsn, tempfile.TemporaryDirectory() as cache:
        store = Store(dsn)
        t = time.perf_counter()
        result, _ = simulate.stream_to_store(
            store, seed=11, accounts=60, symbols=40, events=args.events
        )
        made = time.perf_counter() - t
        settle(store)
        with store.connection() as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        store.close()
        print(
            f"PostgreSQL {version}; history: {result.added:,} events made in {made:.1f} s; "
            f"median of {args.repeat} runs, each route in a fresh process\n"
        )
        res = measure_routes(dsn, cache, repeat=args.repeat, skip=skip)

    cold = res["cold"]["seconds"]
    print("| route | seconds | peak RSS MiB | vs riskbook cold |")
    print("|---|---:|---:|---:|")
    for route, r in res.items():
        rss = "" if route == "floor" else f"{r['peak_rss_mb']:,.0f}"
        print(f"| {ROUTES[route]} | {r['seconds']:.2f} | {rss} | {r['seconds'] / cold:.2f}x |")
    frames, views = res["cold"]["frames_mb"], res["cold"]["views_mb"]
    print()
    print(
        f"frames in memory: {frames:,.0f} MiB ({frames - views:,.0f} by Polars' estimated_size"
        f" + {views:,.0f} of string views it leaves out); cold-load peak RSS / frames = "
        f"{res['cold']['peak_rss_mb'] / frames:.2f} (goal < 2;"
        f" {res['cold']['peak_rss_mb'] / (frames - views):.2f} against estimated_size alone)"
    )
    if "pandas" in res:
        print(
            f"cold load vs pandas read_sql: {res['pandas']['seconds'] / cold:.1f}x faster (goal >= 8x)"
        )
    print(
        f"cold load vs the server's COPY floor: {cold / res['floor']['seconds']:.2f}x (goal <= 1.5x)"
    )
    print(f"warm load vs cold: {cold / res['warm']['seconds']:.1f}x faster (goal >= 20x)")
    print(
        f"refresh of 10k events: {100 * res['refresh']['seconds'] / cold:.2f}% of a cold load (goal < 2%)"
    )
    if args.json:
        from _report import write_rows

        write_rows(args.json, report_rows(res, result.added))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
