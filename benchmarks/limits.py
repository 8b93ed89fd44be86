"""Limit breaches on a large simulated history, beside the tests' reference evaluator (issue 6).

Prints, in one run:

1. ``riskbook.breaches`` of all four built-in limit types at three levels (0.8, 0.9,
   1.0) over the whole loaded History: the first call (it also sorts and folds the
   projections' book) and with the projections already folded (best of ``--repeat``),
   with each type's metric timeline and breach fold timed apart;
2. a backtest of one hypothetical limit (MaxLeverage 2.5 for every account, beside the
   actual MaxLeverage limits) from a freshly loaded History and again warm;
3. the reference evaluator of ``tests/test_limits.py`` (plain Python, one event at a
   time) against ``riskbook.breaches`` on the same events -- all of them, or the first
   ``--reference-events`` (it folds a few tens of thousands of events per second: the
   whole 5M takes minutes and a few GB for the events as Python objects) -- with the
   ratios and a check that both find the same intervals; the reference runs in a child
   process so that its memory is not counted here;
4. peak RSS of this process.

    uv run python benchmarks/limits.py                        # 5M events
    uv run python benchmarks/limits.py --events 200000        # quicker
    uv run python benchmarks/limits.py --json rows.json       # + the report rows

The history is made by ``riskbook.simulate`` in a scratch database that is dropped
afterwards (or in ``--dsn``, left there). The machine is shared and noisy: read the
best-of figures and the ratios, not single times.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import in_spawned_child, peak_rss_mb, simulated_store

import riskbook
from riskbook import limits
from riskbook import projections as P
from riskbook.events import (
    AccountFunded,
    Envelope,
    Event,
    LimitSet,
    PositionUpdated,
    PriceMarked,
    Side,
    TradeCancelled,
    TradeExecuted,
)
from riskbook.frames import History

LEVELS = (0.8, 0.9, 1.0)
WHAT_IF = [{"account_id": "*", "limit_type": "MaxLeverage", "value": 2.5}]


def clock() -> float:
    return time.perf_counter()


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = clock()
        out = fn()
        times.append(clock() - t)
    return min(times), out


# --------------------------------------------------------------------------- the reference


def envelopes(h: History) -> list[Envelope]:
    """The History's events as envelopes, in position order (the reference's input)."""
    out: list[tuple[int, Envelope]] = []

    def add(frame: pl.DataFrame, make: Callable[[dict[str, Any]], Event]) -> None:
        for r in frame.iter_rows(named=True):
            payload = make(r)
            out.append(
                (
                    r["position"],
                    Envelope(
                        event_id=uuid.UUID(r["event_id"]),
                        aggregate_id=r["aggregate_id"],
                        aggregate_type=payload.aggregate_type,
                        sequence=r["sequence"],
                        timestamp=r["timestamp"],
                        payload=payload,
                        correlation_id="bench",
                        position=r["position"],
                    ),
                )
            )

    add(h.trades, lambda r: TradeExecuted(
        trade_id=r["trade_id"], account_id=r["account_id"], symbol=r["symbol"],
        side=Side(r["side"]), quantity=r["quantity"], price=r["price"],
        executed_at=r["executed_at"]))  # fmt: skip
    add(h.cancels, lambda r: TradeCancelled(
        trade_id=r["trade_id"], account_id=r["account_id"], reason=r["reason"] or "",
        cancelled_at=r["cancelled_at"]))  # fmt: skip
    add(h.adjustments, lambda r: PositionUpdated(
        account_id=r["account_id"], symbol=r["symbol"], previous_quantity=r["previous_quantity"],
        new_quantity=r["new_quantity"], reason=r["reason"] or "", updated_at=r["updated_at"]))  # fmt: skip
    add(h.marks, lambda r: PriceMarked(symbol=r["symbol"], price=r["price"],
                                       marked_at=r["marked_at"]))  # fmt: skip
    add(h.funding, lambda r: AccountFunded(account_id=r["account_id"], amount=r["amount"],
                                           funded_at=r["funded_at"]))  # fmt: skip
    add(h.limits, lambda r: LimitSet(
        account_id=r["account_id"], limit_type=r["limit_type"], value=r["value"],
        set_by=r["set_by"], set_at=r["set_at"], symbol=r["symbol"]))  # fmt: skip
    out.sort(key=lambda x: x[0])
    return [e for _, e in out]


def reference_child(directory: str, queue: Any) -> None:
    """Run the tests' reference evaluator on the History in ``directory``."""
    from tests.test_limits import reference_breaches

    h = History.from_parquet(directory)
    t = clock()
    envs = envelopes(h)
    convert = clock() - t
    t = clock()
    found = reference_breaches(envs, levels=LEVELS)
    fold = clock() - t
    queue.put(
        {
            "events": len(envs),
            "convert": convert,
            "fold": fold,
            "intervals": found,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def run_reference(h: History) -> dict[str, Any]:
    return in_spawned_child(h, reference_child)


def same(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> tuple[int, int]:
    """(intervals found by both, found by one only or different): matched by (limit type,
    account, symbol, level, start); ids and times exactly, values to 1e-9 relative."""

    def close(a: Any, b: Any) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return a == b or (math.isfinite(a) and abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0))
        return bool(a == b)

    theirs = {w[:5]: w for w in want}
    ok = sum(
        1
        for g in got
        if g[:5] in theirs and all(close(a, b) for a, b in zip(g, theirs[g[:5]], strict=True))
    )
    return ok, len(got) + len(want) - 2 * ok


def prefix(h: History, n: int) -> History:
    """The first ``n`` events of the history (by global position)."""
    if n <= 0 or n >= len(h):
        return h
    cut = int(h.events["position"].sort()[n - 1])
    return History(**{k: f.filter(pl.col("position") <= cut) for k, f in h.frames().items()})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=5_000_000, help="approximate size (default 5M)")
    ap.add_argument("--accounts", type=int, default=100)
    ap.add_argument("--symbols", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each warm measure (default 3)")
    ap.add_argument(
        "--reference-events",
        type=int,
        default=0,
        help="events the reference evaluator folds (default 0: all of them)",
    )
    ap.add_argument("--dsn", default=None, help="use this database (kept) instead of a scratch one")
    ap.add_argument("--json", default=None, help="write the report rows here")
    args = ap.parse_args(argv)

    with simulated_store(
        args.dsn, seed=args.seed, accounts=args.accounts, symbols=args.symbols, events=args.events
    ) as store:
        t = clock()
        h = riskbook.load(store, cache=False, progress=False)
        print(f"history: {h!r}\n  full load from PostgreSQL: {clock() - t:.2f} s")

    # the compiled kernels (numba's cache) for these array types, loaded once
    small = prefix(h, 5000)
    limits.breaches(small)
    limits.backtest(small, WHAT_IF)
    P._cache.entries.clear()

    # 1. breaches ---------------------------------------------------------------------
    print(f"\n1. breaches of the four built-in limit types at levels {LEVELS}")
    t = clock()
    found = limits.breaches(h, levels=LEVELS)
    first = clock() - t
    warm, _ = best(lambda: limits.breaches(h, levels=LEVELS), args.repeat)
    counts = found.group_by("limit_type").len().sort("limit_type")
    print(f"  intervals: {found.height:,} ("
          + ", ".join(f"{n} {c}" for n, c in counts.iter_rows()) + ")")  # fmt: skip
    print(f"  first call (sorts and folds the projections too): {first:6.2f} s")
    print(f"  projections folded (best of {args.repeat}):            {warm:6.2f} s")
    stored = limits.stored_limits(h)
    for d in limits.BUILT_INS:
        m_s, metric = best(partial(d.metric, h), args.repeat)
        lim = stored.filter(pl.col("limit_type") == d.name).drop("limit_type")
        e_s, _ = best(partial(limits.evaluate, d, metric, lim, levels=LEVELS), args.repeat)
        print(f"    {d.name:<16} metric timeline {m_s:5.2f} s ({metric.height:>11,} rows),"
              f" breach fold {e_s:5.2f} s ({lim.height:,} limits)")  # fmt: skip
        del metric

    # 2. backtest ---------------------------------------------------------------------
    print(f"\n2. backtest of one hypothetical limit: {WHAT_IF}")
    P._cache.entries.clear()  # as if just loaded
    t = clock()
    bt = limits.backtest(h, WHAT_IF, levels=LEVELS)
    cold_bt = clock() - t
    warm_bt, _ = best(lambda: limits.backtest(h, WHAT_IF, levels=LEVELS), args.repeat)
    per = bt.group_by("scenario").len().sort("scenario")
    print("  intervals: " + ", ".join(f"{s} {n:,}" for s, n in per.iter_rows()))
    print(f"  from a freshly loaded History: {cold_bt:5.2f} s (goal: under 5 s)")
    print(f"  again, projections folded (best of {args.repeat}): {warm_bt:5.2f} s")
    print(f"  peak RSS so far: {peak_rss_mb():,.0f} MiB")
    P._cache.entries.clear()
    del bt

    # 3. the reference ------------------------------------------------------------------
    sub = prefix(h, args.reference_events)
    label = "all" if sub is h else f"the first {len(sub):,}"
    print(f"\n3. the reference evaluator (tests/test_limits.py) on {label} events")
    ref = run_reference(sub)
    t = clock()
    mine = limits.breaches(sub, levels=LEVELS)
    sub_first = clock() - t
    sub_warm, mine = best(lambda: limits.breaches(sub, levels=LEVELS), args.repeat)
    from tests.test_limits import rows

    ok, differ = same(rows(mine), ref["intervals"])
    print(f"  intervals: riskbook {mine.height:,}, reference {len(ref['intervals']):,};"
          f" equal {ok:,}, different {differ:,}")  # fmt: skip
    n = ref["events"]
    lines = [
        ("reference evaluator, per event", ref["fold"]),
        ("  its input: frames -> envelopes (not in the ratio)", ref["convert"]),
        ("riskbook.breaches, first call (projections too)", sub_first),
        (f"riskbook.breaches, projections folded (best of {args.repeat})", sub_warm),
    ]
    for what, secs in lines:
        print(f"  {what:<58} {secs:8.2f} s  {n / secs:>12,.0f} events/s")
    print(f"  ratio reference / riskbook: first call {ref['fold'] / sub_first:6.1f}x,"
          f" projections folded {ref['fold'] / sub_warm:6.1f}x (goal: >= 30x)")  # fmt: skip
    if sub is not h:
        rate = n / ref["fold"]
        print(f"  at the reference's rate, all {len(h):,} events would take ~{len(h) / rate:,.0f} s:"
              f" {len(h) / rate / first:5.1f}x riskbook's first call,"
              f" {len(h) / rate / warm:5.1f}x with projections folded (extrapolated)")  # fmt: skip

    print(f"\npeak RSS of this process: {peak_rss_mb():,.0f} MiB ({len(h):,} events in memory)")
    if args.json:
        from _report import Row, write_rows

        note = f"{n:,} events, 4 limit types x {len(LEVELS)} levels; intervals equal: {differ == 0}"
        rows = [
            Row(group="breaches", measure=measure, unit="s", riskbook=ours, peer=ref["fold"],
                peer_name="reference evaluator of the tests (plain Python, per event)",
                higher_is_better=False, riskbook_peak_mb=peak_rss_mb(),
                peer_peak_mb=ref["peak_rss_mb"], note=note)
            for measure, ours in (
                ("breach intervals of every limit, from a loaded History", sub_first),
                ("breach intervals of every limit, projections folded", sub_warm),
            )
        ]  # fmt: skip
        rows.append(
            Row(group="breaches", measure="backtest of one hypothetical limit, from a freshly loaded History",
                unit="s", riskbook=cold_bt, peer=5.0, peer_name="the goal (issue 6)",
                higher_is_better=False, riskbook_peak_mb=peak_rss_mb(),
                note=f"{WHAT_IF}, {len(h):,} events")
        )  # fmt: skip
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
