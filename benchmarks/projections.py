"""Projections on a large simulated history, each beside its baseline (issue 5).

Prints, in one run:

1. full position and account timelines (``position_timeline`` + ``account_timeline``)
   from an in-memory History, cold (the book sorted on first use) and warm (sorted
   book reused), against the reference fold of the tests (plain Python, DESIGN.md §4,
   one event at a time) and against a tight Python fold of average cost alone (the
   issue's ~400k events/s baseline) -- seconds, events/s and ratios; both folds run in
   a child process so that their memory is not counted in this one's peak, and their
   results are checked against the fast ones;
2. the state of all accounts (``accounts``) and positions at random T from the
   in-memory History: the first call and the median over ``--slider`` random T;
3. the state at random T from snapshots straight from PostgreSQL (``state_at``)
   against a full load (``riskbook.load``) plus replay -- medians and ratio, with the
   results checked equal;
4. peak RSS of this process.

    uv run python benchmarks/projections.py                      # 5M events, ~10 minutes
    uv run python benchmarks/projections.py --events 200000      # quicker
    uv run python benchmarks/projections.py --json rows.json     # + the report rows

The history is made by ``riskbook.simulate`` (``--accounts`` x ``--symbols``, sized by
``--events``) in a scratch database that is dropped afterwards (or in ``--dsn``, left
there). The machine is shared and noisy: read the ratios and medians, not single times.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import in_spawned_child, peak_rss_mb, simulated_store

import riskbook
from riskbook import projections as P
from riskbook._memory import hugepages
from riskbook.frames import History

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KEEP_EVERY = 2_500  # timeline rows of the reference fold kept for the comparison
FIGURES = (
    "cash",
    "equity",
    "gross_exposure",
    "net_exposure",
    "leverage",
    "drawdown",
    "peak_equity",
)


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


# --------------------------------------------------------------------------- the folds


def tight_fold(trades: list[tuple[Any, ...]]) -> list[tuple[float, float, float]]:
    """Average cost only, as tight as plain Python gets: one tuple per trade, in order."""
    book: dict[tuple[str, str], list[float]] = {}
    out = []
    append = out.append
    for account, symbol, s, p in trades:
        st = book.get((account, symbol))
        if st is None:
            st = book[(account, symbol)] = [0.0, 0.0, 0.0]
        q, a, r = st
        if q == 0 or (s > 0) == (q > 0):
            a = (q * a + s * p) / (q + s)
            q += s
        else:
            closed = min(abs(s), abs(q))
            r += closed * (p - a) * (1.0 if q > 0 else -1.0)
            if abs(s) <= abs(q):
                q += s
                if q == 0:
                    a = 0.0
            else:
                q += s
                a = p
        st[0], st[1], st[2] = q, a, r
        append((q, a, r))
    return out


def reference_child(directory: str, queue: Any) -> None:
    """Run the tests' reference fold and the tight fold on the History in ``directory``."""
    from tests.test_projections import reference_events, reference_fold

    h = History.from_parquet(directory)
    t = clock()
    events = reference_events(h)
    convert = since(t)
    t = clock()
    folded = reference_fold(events, keep_every=KEEP_EVERY)
    fold = since(t)
    # the tight fold's input: live trades in order, as tuples (not timed)
    busted = {(e.account, e.trade_id) for e in events if e.kind == "cancel"}
    trades = sorted(
        (e for e in events if e.kind == "trade" and (e.account, e.trade_id) not in busted),
        key=lambda e: (e.bt, e.ts, e.pos),
    )
    tuples = [(e.account, e.symbol, e.s, e.price) for e in trades]
    t = clock()
    tight = tight_fold(tuples)
    tight_time = since(t)
    queue.put(
        {
            "events": len(events),
            "trades": len(tuples),
            "convert": convert,
            "fold": fold,
            "tight": tight_time,
            "position_rows": folded.n_position_rows,
            "account_rows": folded.n_account_rows,
            "positions": {k: (p.q, p.a, p.r, p.trades) for k, p in folded.positions.items()},
            "figures": folded.figures,
            "position_sample": folded.position_rows,
            "account_sample": folded.account_rows,
            "tight_last": tight[-1] if tight else None,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def run_reference(h: History) -> dict[str, Any]:
    return in_spawned_child(h, reference_child)


# --------------------------------------------------------------------------- checks


def check_timelines(ref: dict[str, Any], pt: pl.DataFrame, at: pl.DataFrame) -> None:
    assert pt.height == ref["position_rows"], (pt.height, ref["position_rows"])
    assert at.height == ref["account_rows"], (at.height, ref["account_rows"])
    rows = pt.select(
        "event_id", "account_id", "symbol", "quantity", "avg_price", "realized_pnl", "trades"
    )
    got = list(rows.gather_every(KEEP_EVERY).iter_rows())
    assert got == ref["position_sample"], "position timeline differs from the reference fold"
    sample = at.gather_every(KEEP_EVERY)
    assert sample.height == len(ref["account_sample"])
    for row, values in zip(sample.iter_rows(named=True), ref["account_sample"], strict=True):
        want = dict(zip(FIGURES, values[2:], strict=True))
        assert (row["event_id"], row["account_id"]) == values[:2]
        scale = abs(want["cash"]) + want["gross_exposure"] + abs(want["peak_equity"]) + 1
        for k in ("cash", "equity", "gross_exposure", "net_exposure", "peak_equity"):
            assert abs(row[k] - want[k]) <= 1e-9 * scale, (values[0], k, row[k], want[k])


def check_state(ref: dict[str, Any], pos: pl.DataFrame, acc: pl.DataFrame) -> None:
    got = {(r[0], r[1]): (r[2], r[3], r[4], r[5]) for r in
           pos.select("account_id", "symbol", "quantity", "avg_price", "realized_pnl", "trades").iter_rows()}  # fmt: skip
    assert got == ref["positions"], "positions differ from the reference fold"
    for r in acc.iter_rows(named=True):
        want = ref["figures"][r["account_id"]]
        scale = abs(want["cash"]) + want["gross_exposure"] + abs(want["peak_equity"]) + 1
        assert abs(r["equity"] - want["equity"]) <= 1e-9 * scale


# --------------------------------------------------------------------------- main


def first_touch_child(queue: Any) -> None:
    import numpy as np

    from riskbook._memory import _setter

    set_hugepages = _setter()
    times = {}
    for huge in (True, False):
        if set_hugepages is not None:
            set_hugepages(huge)
        for again in (False, True):
            t = time.perf_counter()
            block = np.ones(1 << 27)  # 1 GiB
            times[huge, again] = time.perf_counter() - t
            del block
        time.sleep(6)  # long enough for a VM to give the freed memory back to its host
    queue.put(times)


def first_touch() -> dict[tuple[bool, bool], float]:
    """Seconds per GiB to write memory a process never had, then memory it freed just
    before, with NumPy's huge pages and without.

    On a VM whose host backs guest memory lazily the first is large, and every
    first-call figure below pays it (riskbook turns huge pages off there: see
    riskbook/_memory.py). Measured in a child process.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=first_touch_child, args=(queue,))
    child.start()
    times: dict[tuple[bool, bool], float] = queue.get()
    child.join()
    return times


def rss_gib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / (1 << 30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=5_000_000, help="approximate size (default 5M)")
    ap.add_argument("--accounts", type=int, default=100)
    ap.add_argument("--symbols", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--slider", type=int, default=20, help="random T per measure (default 20)")
    ap.add_argument("--every", type=int, default=1000, help="snapshot every N events per account")
    ap.add_argument("--full-loads", type=int, default=3, help="full load + replay runs (default 3)")
    ap.add_argument("--dsn", default=None, help="use this database (kept) instead of a scratch one")
    ap.add_argument("--json", default=None, help="write the report rows here")
    ap.add_argument(
        "--no-first-touch",
        action="store_true",
        help="skip measuring how fast this machine hands out fresh memory (~17 s)",
    )
    args = ap.parse_args(argv)

    touch = None if args.no_first_touch else first_touch()
    with simulated_store(
        args.dsn, seed=args.seed, accounts=args.accounts, symbols=args.symbols, events=args.events
    ) as store:
        t = time.perf_counter()
        h = riskbook.load(store, cache=False, progress=False)
        load_s = time.perf_counter() - t
        n = len(h)
        print(f"history: {h!r}")
        print(f"  full load from PostgreSQL: {load_s:.2f} s")
        moving = h.trades.height + h.adjustments.height + h.marks.height + h.funding.height

        # 1. timelines ---------------------------------------------------------------
        print("\n1. full position and account timelines")
        # load the compiled kernels (numba's cache) for these array types first
        small = History(**{n: f.head(2000) for n, f in h.frames().items()})  # type: ignore[arg-type]
        P.position_timeline(small)
        P.account_timeline(small)
        P.positions(small, at=small.events["occurred_at"].max())
        P._cache.entries.clear()
        before = rss_gib()
        t = clock()
        pt = P.position_timeline(h)
        at = P.account_timeline(h)
        first = since(t)
        touched = rss_gib() - before

        def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
            return min(runs, key=lambda w: w[0])

        colds, warms, books, kernels = [], [], [], []
        for _ in range(3):
            del pt, at
            P._cache.entries.clear()  # everything again: sort, fold, frames
            t = clock()
            pt = P.position_timeline(h)
            at = P.account_timeline(h)
            colds.append(since(t))
            del pt, at
            P._cache.book(h)[1].clear()  # keep the sorted book, drop the folds
            t = clock()
            pt = P.position_timeline(h)
            at = P.account_timeline(h)
            warms.append(since(t))
            t = clock()
            book = P._build_book(h)
            books.append(since(t))
            del book
            book = P._cache.book(h)[0]
            t = clock()
            P._Timelines.compute(book, P._NEVER - 1, None)
            kernels.append(since(t))
            del book
        cold, warm, book_s, kernel_s = (best(x) for x in (colds, warms, books, kernels))
        print(
            f"  rows: {pt.height:,} position moves, {at.height:,} account moves, from {moving:,} events"
        )
        ref = run_reference(h)
        check_timelines(ref, pt, at)
        check_state(ref, P.positions(h), P.accounts(h))
        print("  fast results equal the reference fold's (quantities, averages, PnL exactly; "
              "account figures to 1e-9)")  # fmt: skip
        ev = ref["events"]
        rows = [
            ("reference fold (tests), per event", ref["fold"], ev),
            ("  its input: frames -> Python events", ref["convert"], ev),
            ("tight Python fold of average cost only", ref["tight"], ref["trades"]),
            ("riskbook, first call: sort + fold + frames", first, ev),
            ("riskbook, sort + fold + frames (best of 3)", cold, ev),
            ("riskbook, book kept: fold + frames (best of 3)", warm, ev),
            ("  sorting the book alone (best of 3)", book_s, ev),
            ("  the compiled fold alone (best of 3)", kernel_s, ev),
        ]
        for label, (wall, cpu), count in rows:
            print(f"  {label:<42} {wall:8.2f} s (cpu {cpu:6.2f})  {count / wall:>12,.0f} events/s")
        for name, base in (("reference fold", ref["fold"][0]), ("tight fold", ref["tight"][0])):
            print(f"  ratio {name} / riskbook: first call {base / first[0]:5.1f}x,"
                  f" sort + fold + frames {base / cold[0]:5.1f}x, book kept {base / warm[0]:5.1f}x,"
                  f" compiled fold alone {base / kernel_s[0]:5.1f}x")  # fmt: skip
        if touch is not None:
            print(f"  (this VM, seconds per GiB written: fresh memory {touch[True, False]:.2f} with huge pages,"
                  f" {touch[False, False]:.2f} without; memory freed just before {touch[True, True]:.2f} and"
                  f" {touch[False, True]:.2f}; riskbook's huge pages here: {'on' if hugepages() else 'off'};"
                  f" the first call kept {touched:.2f} GiB more)")  # fmt: skip
        print(f"  reference child peak RSS: {ref['peak_rss_mb']:,.0f} MiB")
        timelines_peak = peak_rss_mb()
        del pt, at

        # 2. state at T in memory ------------------------------------------------------
        print("\n2. state of all accounts at a random T, in memory")
        rng = random.Random(args.seed)
        lo, hi = h.events["occurred_at"].min(), h.events["occurred_at"].max()
        span = int((hi - lo) / timedelta(microseconds=1))  # type: ignore[operator]
        ts = [lo + timedelta(microseconds=rng.randrange(span)) for _ in range(args.slider)]  # type: ignore[operator]
        P._cache.entries.clear()
        t = clock()
        P.accounts(h, at=ts[0])
        first_t = since(t)
        acc_t, pos_t = [], []
        for at_t in ts:
            t = time.perf_counter()
            P.accounts(h, at=at_t)
            acc_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            P.positions(h, at=at_t)
            pos_t.append(time.perf_counter() - t)
        print(f"  first call (sorts the book, folds the timelines): {first_t[0]:.2f} s")
        print(
            f"  accounts(at=T):  median {statistics.median(acc_t) * 1000:7.2f} ms  (max {max(acc_t) * 1000:.2f} ms, {len(ts)} T)"
        )
        print(
            f"  positions(at=T): median {statistics.median(pos_t) * 1000:7.2f} ms  (max {max(pos_t) * 1000:.2f} ms)"
        )

        print(f"  peak RSS so far: {peak_rss_mb():,.0f} MiB")

        # 3. state at T from snapshots ---------------------------------------------------
        print("\n3. state at a random T from PostgreSQL: snapshots vs full load + replay")
        with store.connection() as conn:
            conn.execute("TRUNCATE position_snapshots")
            conn.commit()
        t = time.perf_counter()
        written = P.write_snapshots(store, h, every=args.every)
        print(
            f"  write_snapshots(every={args.every}): {written:,} snapshots in {time.perf_counter() - t:.2f} s"
        )
        P.state_at(store, ts[-1])  # warm: the server's caches, the kernels for its types
        snap_t = []
        for at_t in ts:
            t = time.perf_counter()
            got = P.state_at(store, at_t)
            snap_t.append(time.perf_counter() - t)
            from polars.testing import assert_frame_equal

            assert_frame_equal(got[0], P.positions(h, at=at_t))
            assert_frame_equal(got[1], P.accounts(h, at=at_t))
        P._cache.entries.clear()  # h's book and timelines are not needed any more
        full_t = []
        for at_t in ts[: args.full_loads]:
            t = time.perf_counter()
            full = riskbook.load(store, cache=False, progress=False)
            P.positions(full, at=at_t)
            P.accounts(full, at=at_t)
            full_t.append(time.perf_counter() - t)
            del full
        snap_m, full_m = statistics.median(snap_t), statistics.median(full_t)
        print(
            f"  state_at from snapshots: median {snap_m * 1000:8.1f} ms (max {max(snap_t) * 1000:.1f} ms, {len(ts)} T; equal to the full rebuild)"
        )
        print(f"  full load + replay:      median {full_m * 1000:8.1f} ms ({len(full_t)} runs)")
        print(f"  ratio: {full_m / snap_m:.1f}x")

        # 4. the view --------------------------------------------------------------------
        t = time.perf_counter()
        rows_mv = P.refresh_account_positions(store)
        print(
            f"\n4. REFRESH MATERIALIZED VIEW CONCURRENTLY account_positions: {rows_mv:,} rows in {time.perf_counter() - t:.2f} s"
        )
    print(f"\npeak RSS of this process: {peak_rss_mb():,.0f} MiB ({n:,} events in memory)")
    if args.json:
        from _report import Row, write_rows

        timelines = f"{n:,} events -> {ref['position_rows']:,} + {ref['account_rows']:,} rows"

        def fold(measure: str, ours: float, peer: float, peer_name: str, note: str) -> Row:
            return Row(group="projections", measure=measure, unit="s", riskbook=ours, peer=peer,
                       peer_name=peer_name, higher_is_better=False,
                       riskbook_peak_mb=timelines_peak, peer_peak_mb=ref["peak_rss_mb"],
                       note=note)  # fmt: skip

        reference = "reference fold of the tests (plain Python, per event)"
        rows = [
            fold("position + account timelines, first call (sort + fold + frames)", first[0],
                 ref["fold"][0], reference, timelines + "; its memory fresh from the OS"),
            fold("position + account timelines (sort + fold + frames)", cold[0],
                 ref["fold"][0], reference, timelines + "; best of 3"),
            fold("position + account timelines, sorted book kept", warm[0],
                 ref["fold"][0], reference, timelines),
            fold("position + account timelines (sort + fold + frames)", cold[0],
                 ref["tight"][0], "tight Python fold of average cost alone",
                 f"the tight fold computes less: {ref['trades']:,} trades, no account figures"),
            Row(group="projections", measure="state of every account at a random T, in memory (median)",
                unit="ms", riskbook=statistics.median(acc_t) * 1000, peer=first_t[0] * 1000,
                peer_name="its first call, which sorts the book and folds the timelines",
                higher_is_better=False, note=f"accounts(at=T); median of {len(acc_t)} T"),
            Row(group="projections", measure="state of every account at a random T, from PostgreSQL",
                unit="ms", riskbook=snap_m * 1000, peer=full_m * 1000,
                peer_name="riskbook.load + replay", higher_is_better=False,
                note=f"state_at from snapshots (every {args.every}); median of {len(snap_t)} T"),
        ]  # fmt: skip
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
