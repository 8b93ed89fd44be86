"""Per-call cost of :func:`riskbook.limits.evaluate` on micro-batches (the live processor's use).

A synthetic stream like the live processor's: ~12 accounts, ~100 (account, symbol) keys,
``--rows`` metric rows per batch, a few breaches open most of the time, a limit change now
and then (account-wide, per symbol, ``"*"``), one UTC midnight crossed. It is folded batch
by batch with the state carried, for one limit type of each scope, and the per-call wall
times are printed (median, p90, p99, after ``--warmup`` batches), with the sum per batch of
the four calls. Nothing here touches a database.

    uv run python benchmarks/evaluate_batches.py
    uv run python benchmarks/evaluate_batches.py --batches 1000 --rows 200

The machine is shared and noisy: compare medians of a few runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from riskbook import limits

T0 = datetime(2024, 3, 1, 23, 50, tzinfo=UTC)


def _no_metric(history: Any, *, known_at: Any = None) -> pl.DataFrame:
    raise NotImplementedError  # the benchmark gives the metric rows itself


SCOPES = ("account_symbol", "account_day", "account", "account_symbol_day")
DEFINITIONS = [limits.LimitSpec(f"Bench_{s}", s, "x", _no_metric) for s in SCOPES]
LEVELS = (1.0, 1.2)


def stream(
    batches: int, rows: int, accounts: int, symbols: int, seed: int
) -> list[tuple[pl.DataFrame, pl.DataFrame, datetime]]:
    """(metric rows, limit rows, through) per batch."""
    rng = np.random.default_rng(seed)
    accts = [f"ACC-{a:02d}" for a in range(accounts)]
    syms = [f"SYM-{s:02d}" for s in range(symbols)]
    keys = [(a, s) for a in accts for s in syms if rng.random() < 0.85]
    base = {k: rng.uniform(10, 80) for k in [*keys, *accts]}  # each key's metric level
    for k in rng.choice(len(keys), 4, replace=False):  # these stay over their limit a while
        base[keys[k]] = 110.0
    base[accts[0]] = 110.0
    out = []
    pos = 0
    t_us = int((T0 - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))
    step = 3_000_000 // rows  # a batch spans 3 s of business time
    empty_limits = pl.DataFrame(schema=limits.LIMIT_ROWS_SCHEMA)
    for b in range(batches):
        pick = rng.integers(0, len(keys), rows)
        acct = [keys[p][0] for p in pick]
        sym = [keys[p][1] for p in pick]
        noise = 1 + 0.03 * rng.standard_normal(rows)
        value = np.array([base[keys[p]] for p in pick]) * noise
        account_value = np.array([base[a] for a in acct]) * noise
        value[rng.random(rows) < 0.005] = np.nan
        times = t_us + np.arange(rows, dtype=np.int64) * step
        t_us += rows * step
        position = np.arange(pos, pos + rows, dtype=np.int64)
        pos += rows
        tt = pl.Series(times).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
        metric = pl.DataFrame(
            {
                "account_id": pl.Series(acct, dtype=pl.Categorical),
                "symbol": pl.Series(sym, dtype=pl.Categorical),
                "time": tt,
                "timestamp": tt,
                "position": position,
                "event_id": [f"ev-{p}" for p in position],
                "value": value,
                "_account_value": account_value,
            }
        )
        lim_rows: list[dict[str, Any]] = []
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(times[0]))
        if b == 0:
            lim_rows.append({"account_id": "*", "symbol": None, "value": 100.0})
            for a in accts[::2]:
                lim_rows.append({"account_id": a, "symbol": None, "value": 110.0})
            for a, s in keys[::15]:
                lim_rows.append({"account_id": a, "symbol": s, "value": 90.0})
        elif b % 25 == 0:
            a, s = keys[int(rng.integers(0, len(keys)))]
            lim_rows.append(
                {"account_id": a if b % 50 else "*", "symbol": s if b % 75 == 0 else None,
                 "value": float(rng.choice([60.0, 100.0, 140.0]))}
            )  # fmt: skip
            k = keys[int(rng.integers(0, len(keys)))]
            base[k] = 110.0 if base[k] < 100 else rng.uniform(10, 80)
        if lim_rows:
            lim = pl.DataFrame(
                [
                    {**r, "set_by": "risk", "set_at": at, "timestamp": at,
                     "position": pos + i, "event_id": f"lim-{pos + i}"}
                    for i, r in enumerate(lim_rows)
                ],
                schema=limits.LIMIT_ROWS_SCHEMA,
            )  # fmt: skip
            pos += len(lim_rows)
        else:
            lim = empty_limits
        through = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(times[-1]))
        out.append((metric, lim, through))
    return out


def account_only(metric: pl.DataFrame) -> pl.DataFrame:
    """The rows as an account-scope metric would give them (one key per account)."""
    return metric.select(
        pl.col("account_id").cast(pl.String),
        "time",
        "timestamp",
        "position",
        "event_id",
        value="_account_value",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--rows", type=int, default=150, help="metric rows per batch")
    ap.add_argument("--accounts", type=int, default=12)
    ap.add_argument("--symbols", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    batches = stream(args.batches, args.rows, args.accounts, args.symbols, args.seed)
    per_def: dict[str, list[float]] = {d.name: [] for d in DEFINITIONS}
    per_batch = np.zeros(len(batches))
    found = dict.fromkeys(per_def, 0)
    states: dict[str, limits.BreachState] = {}
    for n, (metric, lim, through) in enumerate(batches):
        for d in DEFINITIONS:
            m = metric.drop("_account_value") if "symbol" in d.scope else account_only(metric)
            t = time.perf_counter()
            out, states[d.name] = limits.evaluate(
                d, m, lim, levels=LEVELS, state=states.get(d.name), through=through
            )
            dt = time.perf_counter() - t
            found[d.name] += int((~out["carried"]).sum())
            if n >= args.warmup:
                per_def[d.name].append(dt * 1e3)
                per_batch[n] += dt * 1e3
    print(f"{len(batches)} batches of {args.rows} metric rows, levels {LEVELS} "
          f"(first {args.warmup} not timed); per call, ms:")  # fmt: skip
    every: list[float] = []
    for name, ms in per_def.items():
        every += ms
        st = states[name]
        print(f"  {name:<26} median {statistics.median(ms):6.2f}  p90 "
              f"{np.percentile(ms, 90):6.2f}  p99 {np.percentile(ms, 99):6.2f}   "
              f"(keys {st.metrics.height}, open at end {st.open.height}, "
              f"breach starts {found[name]})")  # fmt: skip
    print(f"  {'all calls':<26} median {statistics.median(every):6.2f}  p90 "
          f"{np.percentile(every, 90):6.2f}  p99 {np.percentile(every, 99):6.2f}")  # fmt: skip
    pb = per_batch[args.warmup :]
    print(f"  {'per batch (4 calls)':<26} median {statistics.median(pb):6.2f}  p90 "
          f"{np.percentile(pb, 90):6.2f}  p99 {np.percentile(pb, 99):6.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
