"""Render the README's pictures of the main charts from the bundled sample.

    uv run python benchmarks/readme_charts.py            # into docs/images/
    uv run python benchmarks/readme_charts.py --out DIR

The sample is imported into a scratch database (dropped afterwards), loaded, and each
chart is drawn by :mod:`riskbook.viz` and written as a PNG through vl-convert (offline).
The same code draws them in the notebooks.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import scratch_database

import riskbook
from riskbook import viz, widgets
from riskbook.demo import SAMPLE

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--dsn", default=None, help="server to make the scratch database on")
    args = parser.parse_args(argv)

    with scratch_database(args.dsn) as dsn:
        store = riskbook.Store(dsn)
        store.import_jsonl(SAMPLE)
        history = riskbook.load(store, cache=False, progress=False)
        store.close()

    timeline = riskbook.account_timeline(history)
    positions = riskbook.position_timeline(history)
    found = widgets.incidents(history)
    block = found.filter(pl.col("event_type") == "AccountBlocked").row(0, named=True)
    at = block["occurred_at"]
    window = viz.event_lanes(
        history,
        start=at - timedelta(minutes=15),
        end=at + timedelta(minutes=30),
        accounts=[block["account_id"]],
        symbols=[block["symbol"]] if block["symbol"] else None,
    )
    charts = {
        "exposure.png": viz.exposure_chart(timeline, measure="gross_exposure"),
        "positions_at.png": viz.exposure_at_chart(riskbook.positions(history, at=at), at=at),
        "positions.png": viz.position_chart(
            positions, account=block["account_id"], limits=history.limits, at=at
        ),
        "equity_drawdown.png": viz.equity_chart(timeline, account="ACC-002", limits=history.limits),
        "leverage.png": viz.leverage_chart(timeline, history.limits, account="ACC-003"),
        "incident_events.png": viz.event_chart(
            window,
            focus=block["event_id"],
            cursor=at,
            title=f"{block['account_id']}: the block and the events around it",
        ),
    }
    try:
        from riskbook.limits import breaches
    except ImportError:
        print("breaches.png: skipped (riskbook.limits.breaches is not available)")
    else:
        # an open breach runs to the history's last event, not to its own start
        horizon = history.events["occurred_at"].max()
        charts["breaches.png"] = viz.breach_chart(breaches(history), horizon=horizon)
    for name, chart in charts.items():
        started = time.perf_counter()
        path = viz.save_png(chart, args.out / name)
        print(
            f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
            f"  {path.stat().st_size / 1024:,.0f} KiB  {time.perf_counter() - started:.2f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
