"""The exposure explorer on a large history: "run all" to the first chart, slider to redraw.

Prints, for a simulated history of ``--events`` events:

1. in the browser (Voila, which runs the notebook on page load, in Debian's headless
   Chromium driven by Playwright, nothing fetched from outside 127.0.0.1): seconds from
   opening the notebook to the first chart drawn, and milliseconds from a move of the
   explorer's time slider (one step) to the redrawn bars -- median and worst of
   ``--moves`` moves; the goal is under 300 ms;
2. in the kernel alone (no browser): the explorer's update for a new T -- the state at
   T, its table and chart -- median of ``--moves`` random T; and what the notebook's
   setup costs, step by step (load, timeline, first chart spec).

    uv run python benchmarks/notebook.py                    # 200,000 events, ~1 minute
    uv run python benchmarks/notebook.py --events 5000000   # the issue's size
    uv run python benchmarks/notebook.py --json rows.json   # + the report row

The history is made by ``riskbook.simulate.stream_to_store`` in a scratch database
that is dropped afterwards (or in ``--dsn``, kept). The machine is shared and noisy:
read medians.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import peak_rss_mb, scratch_database, settle

import riskbook
from riskbook import simulate, viz, widgets
from riskbook.demo import NOTEBOOKS
from riskbook.store import Store

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL = ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:", "about:")


def in_kernel(dsn: str, moves: int, cache: Path) -> dict[str, float]:
    t = time.perf_counter()
    history = riskbook.load(Store(dsn), cache=False, progress=False)
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    timeline = riskbook.account_timeline(history)
    folded = time.perf_counter() - t
    t = time.perf_counter()
    spec = viz.exposure_chart(timeline).to_dict()
    drawn = time.perf_counter() - t
    rows = sum(len(v) for v in spec["datasets"].values())
    print(
        f"kernel: load {loaded:.2f} s ({len(history):,} events), account timeline {folded:.2f} s"
        f" ({timeline.height:,} rows), first chart spec {drawn:.2f} s ({rows:,} rows drawn)"
    )
    t = time.perf_counter()
    panel = widgets.ExposureExplorer(history)
    print(f"kernel: explorer built in {time.perf_counter() - t:.2f} s")
    lo, hi = panel.at.start, panel.at.end
    rng = random.Random(1)
    times = []
    for _ in range(moves):
        at = lo + (hi - lo) * rng.random()
        t = time.perf_counter()
        panel.at.value = at  # observers run synchronously: state, table, bars, rules
        times.append(time.perf_counter() - t)
    print(
        f"kernel: slider update (state at T + table + bars spec) median"
        f" {statistics.median(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms"
        f" over {moves} random T"
    )
    return {"update_ms": statistics.median(times) * 1000, "load_s": loaded}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_browser(dsn: str, moves: int, cache: Path, timeout_s: float) -> dict[str, float]:
    port = free_port()
    env = {
        **os.environ,
        "RISKBOOK_DSN": dsn,
        "RISKBOOK_CACHE": str(cache),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    with tempfile.TemporaryFile() as log:
        return _drive(env, port, log, moves, timeout_s)


def _drive(
    env: dict[str, str], port: int, log: Any, moves: int, timeout_s: float
) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "voila",
            str(NOTEBOOKS / "exposure_explorer.ipynb"),
            "--no-browser",
            f"--port={port}",
            "--Voila.ip=127.0.0.1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=NOTEBOOKS,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(
                        f"voila did not start: {log.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.2)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.route(
                "**/*", lambda r: r.continue_() if r.request.url.startswith(LOCAL) else r.abort()
            )
            t = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/", timeout=timeout_s * 1000)
            page.locator(".vega-embed svg .mark-line path").first.wait_for(timeout=timeout_s * 1000)
            first = time.perf_counter() - t
            page.locator(".vega-embed", has_text="Positions by account and symbol").first.wait_for(
                timeout=timeout_s * 1000
            )
            print(f"browser: run all to the first chart drawn: {first:.1f} s")
            handle = page.locator(".widget-slider", has_text="at (T)").locator(".noUi-handle").first
            handle.focus()
            waits = []
            for i in range(moves):
                before = page.evaluate(
                    """() => [...document.querySelectorAll('.vega-embed')]
                         .find(e => e.innerText.includes('Positions by account')).innerText"""
                )
                t = time.perf_counter()
                page.keyboard.press("ArrowLeft" if i % 2 else "PageDown")
                page.wait_for_function(
                    """(before) => [...document.querySelectorAll('.vega-embed')]
                         .some(e => e.innerText.includes('Positions by account')
                                    && e.innerText !== before)""",
                    arg=before,
                    timeout=30_000,
                    polling="raf",
                )
                waits.append(time.perf_counter() - t)
            browser.close()
        print(
            f"browser: slider move to redrawn bars: median {statistics.median(waits) * 1000:.0f} ms,"
            f" worst {max(waits) * 1000:.0f} ms over {moves} moves (goal < 300 ms)"
        )
        return {"first_chart_s": first, "redraw_ms": statistics.median(waits) * 1000}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--accounts", type=int, default=12)
    p.add_argument("--symbols", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--moves", type=int, default=15)
    p.add_argument("--dsn", default=None, help="use (and keep) this database")
    p.add_argument("--no-browser", action="store_true", help="kernel timings only")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the page to draw")
    p.add_argument("--json", default=None, help="write the report row here (needs the browser)")
    args = p.parse_args(argv)

    ctx = nullcontext(args.dsn) if args.dsn else scratch_database()
    with ctx as dsn, tempfile.TemporaryDirectory() as tmp:
        store = Store(dsn)
        if store.count() == 0:
            t = time.perf_counter()
            result, _ = simulate.stream_to_store(
                store,
                seed=args.seed,
                accounts=args.accounts,
                symbols=args.symbols,
                events=args.events,
            )
            print(f"history: simulated {result.added:,} events in {time.perf_counter() - t:.1f} s")
            settle(store)
        store.close()
        kernel = in_kernel(dsn, args.moves, Path(tmp) / "cache")
        kernel_peak = peak_rss_mb()
        browser = None
        if not args.no_browser:
            browser = in_browser(dsn, args.moves, Path(tmp) / "cache", args.timeout)
    print(f"peak RSS of this process: {peak_rss_mb():,.0f} MiB (Voila's kernel not counted)")
    if args.json:
        from _report import Row, write_rows

        rows = []
        if browser is not None:
            rows.append(
                Row(
                    group="notebook",
                    measure="exposure explorer: time slider move → redrawn chart (median)",
                    unit="ms",
                    riskbook=browser["redraw_ms"],
                    peer=kernel["update_ms"],
                    peer_name="the kernel's part alone: state at T + table + chart spec (floor)",
                    higher_is_better=False,
                    peer_peak_mb=kernel_peak,
                    note=f"real browser (Voila, Chromium); goal < 300 ms; {args.moves} moves",
                )
            )
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
