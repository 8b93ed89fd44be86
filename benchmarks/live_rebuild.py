"""The live engine's busts: a processor's rebuild at its start, and one bust after it.

A processor rebuilds its state at its start by folding the whole history below its
checkpoint in one batch (``Engine().apply(history, written=False)``), and each
TradeCancelled in it refolds the busted account. This simulates ``--events`` events
(with their planted busts) into a scratch database, reads them as the processor does,
and times, in this process:

* the rebuild with the engine (the account refolded from a kept state: the events
  since the busted trade) and with the reference (``Engine(_reference=True)``, the
  implementation before it: the account's whole history refolded at every bust), and
  checks that both decide the same effects;
* the rebuilt state kept as a snapshot and read back (a processor's next start does
  that instead of the rebuild: see ``riskbook.live._snapshot``); and micro-batches of
  90 trades folded on it alone, then while a snapshot is written in a background
  thread, as a running processor keeps one (``snapshot_after``); and the longest the
  snapshot's writer holds up another thread, with frames pickled in pieces and whole;
* a batch of one bust folded on the rebuilt state (the steady state's cost of a bust):
  of the account's latest trade, of a trade some thousand events back, of one in the
  middle of the history, and of a trade id that is not there.

    uv run python benchmarks/live_rebuild.py                       # 200,000 events
    uv run python benchmarks/live_rebuild.py --events 30000 --repeat 5
    uv run python benchmarks/live_rebuild.py --no-reference --events 1000000

``--dsn`` uses that database (simulated into if empty, kept) instead of a scratch one.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, simulated_store


def _bust_batch(history: Any, horizon: int, row: dict[str, Any] | None) -> Any:
    """A batch of one TradeCancelled after ``history`` (at ``horizon``, the engine's):
    of the trade ``row`` (None: of a trade id that is not in it)."""
    import riskbook

    t = history.events["occurred_at"].max() + timedelta(seconds=1)
    account = "ACC-001" if row is None else str(row["account_id"])
    trade_id = f"T-none-{uuid.uuid4().hex[:8]}" if row is None else row["trade_id"]
    cancel = riskbook.TradeCancelled(trade_id=trade_id, account_id=account, reason="bench",
                                     cancelled_at=t)  # fmt: skip
    envelope = riskbook.Envelope(uuid.uuid4(), account, "Account", 1, t, cancel, "bench",
                                 position=horizon)  # fmt: skip
    return riskbook.History.from_envelopes([envelope])


def _per_bust(engine: Any, batch: Any, repeat: int) -> float:
    """Median milliseconds to fold ``batch`` on copies of ``engine``."""
    times = []
    for _ in range(repeat):
        copy = engine.copy()
        gc.collect()  # not the collection of what the rebuilds left, in the bust's time
        began = time.perf_counter()
        copy.apply(batch, written=False)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def _snapshot_figures(engine: Any, history: Any, rebuild_s: float) -> dict[str, Any]:
    """Keep the rebuilt state as a processor does after a long rebuild, read it back
    (as its next start does), and check the copy folds on as the original."""
    import tempfile

    from riskbook.live import _snapshot

    kept = _snapshot.Snapshot(
        engine, int(history.events["position"][-1]), str(history.events["event_id"][-1])
    )
    key = _snapshot.key(engine, "bench", "bench")
    with tempfile.TemporaryDirectory(prefix="riskbook-snapshot-") as folder:
        path = Path(folder) / "bench.snapshot"
        saves, loads = [], []
        for _ in range(3):
            began = time.perf_counter()
            size = _snapshot.save(path, kept, key)
            saves.append(time.perf_counter() - began)
            gc.collect()
            began = time.perf_counter()
            back, why = _snapshot.load(path, key)
            loads.append(time.perf_counter() - began)
            if back is None:
                raise SystemExit(f"the snapshot was not read back: {why}")
    trades = history.trades.sort("position")
    batch = _bust_batch(history, engine.horizon, trades.row(trades.height - 1, named=True))
    same = [(e.kind, e.causation_id) for e in back.engine.copy().apply(batch, written=False)] == [
        (e.kind, e.causation_id) for e in engine.copy().apply(batch, written=False)
    ]
    save_s, load_s = statistics.median(saves), statistics.median(loads)
    print(f"snapshot of the rebuilt state: {size / 1e6:,.0f} MB, kept in {save_s:.2f} s, read"
          f" back in {load_s:.2f} s (medians of 3); a restart at the same checkpoint reads it"
          f" instead of rebuilding: {rebuild_s / load_s:.0f}x faster; the copy folds a bust"
          f" as the original: {'yes' if same else 'NO'}")  # fmt: skip
    if not same:
        raise SystemExit("the snapshot's engine folds differently from the one kept")
    return {"bytes": size, "save_s": save_s, "load_s": load_s, "ratio": rebuild_s / load_s}


def _trade_batch(last: dict[str, Any], engine: Any, size: int, n: int) -> Any:
    """The ``n``-th batch of ``size`` trades like ``last`` (the history's last trade),
    after ``last["after"]`` (business time) and at the positions from the engine's
    horizon on (a live micro-batch: about 90 events at 5,000 events/s)."""
    import riskbook

    t = last["after"] + timedelta(seconds=1 + n)
    envelopes = []
    for j in range(size):
        side = riskbook.Side.Buy if j % 2 else riskbook.Side.Sell
        trade = riskbook.TradeExecuted(
            trade_id=f"T-bg-{n}-{j}", account_id=last["account_id"], symbol=last["symbol"],
            side=side, quantity=1.0, price=float(last["price"]), executed_at=t,
        )  # fmt: skip
        envelopes.append(riskbook.Envelope(uuid.uuid4(), trade.account_id, "Account", 1, t,
                                           trade, "bench", position=engine.horizon + j))  # fmt: skip
    return riskbook.History.from_envelopes(envelopes)


def _background_figures(engine: Any, history: Any, size: int = 90) -> dict[str, Any]:
    """A running processor keeps its snapshot in a thread while its batches go on:
    batches of ``size`` trades folded one after the other on the rebuilt state, alone
    and while a snapshot of it is written in the background (GIL and cores shared)."""
    import tempfile
    import threading

    from riskbook.live import _snapshot

    last = history.trades.sort("position").row(history.trades.height - 1, named=True)
    last["after"] = history.events["occurred_at"].max()  # the batches come after it all

    def fold(state: Any, n: int) -> tuple[Any, float]:
        began = time.perf_counter()  # the batch made too: a processor decodes its batches
        batch = _trade_batch(last, state, size, n)
        state = state.copy()
        state.apply(batch)
        return state, time.perf_counter() - began

    state, alone = engine, []
    for n in range(40):
        state, took = fold(state, n)
        alone.append(took)
    key = _snapshot.key(engine, "bench", "bench")
    kept = _snapshot.Snapshot(state.as_rebuilt()[0], state.horizon - 1, "x")
    with tempfile.TemporaryDirectory(prefix="riskbook-snapshot-") as folder:
        wrote: list[float] = []

        def keep() -> None:
            began = time.perf_counter()
            _snapshot.save(Path(folder) / "bg.snapshot", kept, key)
            wrote.append(time.perf_counter() - began)

        keeper = threading.Thread(target=keep)
        during, n = [], 40
        keeper.start()
        while keeper.is_alive():
            state, took = fold(state, n)
            during.append(took)
            n += 1
        keeper.join()

    def ms(values: list[float], q: float) -> float:
        return float(np.percentile(np.array(values) * 1e3, q))

    out = {
        "batch_ms_alone": [ms(alone, 50), ms(alone, 100)],
        "batch_ms_during": [ms(during, 50), ms(during, 100)] if during else None,
        "batches_during": len(during),
        "save_s_in_background": wrote[0],
    }
    print(f"batches of {size} trades made and folded on the rebuilt state: median"
          f" {out['batch_ms_alone'][0]:.1f} ms, max {out['batch_ms_alone'][1]:.1f} alone; while a"
          f" snapshot of it is kept in the background ({wrote[0]:.2f} s): {len(during)} batches,"
          f" median {ms(during, 50) if during else float('nan'):.1f} ms, max"
          f" {ms(during, 100) if during else float('nan'):.1f}")  # fmt: skip
    return out


def _gil_figures(engine: Any) -> dict[str, Any]:
    """The longest the snapshot's writer keeps other threads waiting (a thread that
    sleeps 1 ms at a time records its longest gap), with long frames and series pickled
    in pieces (riskbook's way) and whole (the baseline, as pickle does by itself)."""
    import tempfile
    import threading

    from riskbook.live import _snapshot

    key = _snapshot.key(engine, "bench", "bench")
    kept = _snapshot.Snapshot(engine, 1, "x")

    def longest_wait(piece_rows: int) -> tuple[float, float]:
        gaps: list[float] = []
        stop = threading.Event()

        def tick() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                time.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        saved, _snapshot._PIECE_ROWS = _snapshot._PIECE_ROWS, piece_rows
        ticker = threading.Thread(target=tick)
        try:
            with tempfile.TemporaryDirectory(prefix="riskbook-snapshot-") as folder:
                ticker.start()
                began = time.perf_counter()
                _snapshot.save(Path(folder) / "gil.snapshot", kept, key)
                took = time.perf_counter() - began
        finally:
            stop.set()
            if ticker.is_alive():
                ticker.join()
            _snapshot._PIECE_ROWS = saved
        return max(gaps) * 1e3, took

    pieces_ms, pieces_s = longest_wait(_snapshot._PIECE_ROWS)
    whole_ms, whole_s = longest_wait(2**62)
    print(f"the snapshot's writer kept another thread waiting {pieces_ms:.0f} ms at most with"
          f" frames in pieces ({pieces_s:.2f} s to write), {whole_ms:.0f} ms with whole frames"
          f" ({whole_s:.2f} s): {whole_ms / pieces_ms:.1f}x shorter")  # fmt: skip
    return {"longest_wait_ms": pieces_ms, "longest_wait_ms_whole_frames": whole_ms,
            "save_s": pieces_s, "save_s_whole_frames": whole_s}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--accounts", type=int, default=20)
    ap.add_argument("--symbols", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the engine's rebuild")
    ap.add_argument("--reference-repeat", type=int, default=1, help="runs of the reference's")
    ap.add_argument("--no-reference", action="store_true", help="time the engine only")
    ap.add_argument("--busts", type=int, default=5, help="runs of each steady-state bust")
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    import polars as pl

    from riskbook.frames import Filters
    from riskbook.live import Engine
    from riskbook.live._processor import _read

    out: dict[str, Any] = {"events_asked": args.events, "accounts": args.accounts}
    with simulated_store(args.dsn, seed=args.seed, accounts=args.accounts,
                         symbols=args.symbols, events=args.events) as store:  # fmt: skip
        t = time.perf_counter()
        history = _read(store, Filters(), after=0, before=2**62, progress=False)
        print(f"read {history.events.height:,} events ({history.cancels.height} busts) in"
              f" {time.perf_counter() - t:.1f} s")  # fmt: skip
    out.update(events=history.events.height, busts=history.cancels.height)

    def rebuild(**kwargs: Any) -> tuple[float, Any, list[Any]]:
        engine = Engine(**kwargs)
        began = time.perf_counter()
        effects = engine.apply(history, written=False)
        return time.perf_counter() - began, engine, effects

    runs = [rebuild() for _ in range(args.repeat)]
    new = statistics.median(r[0] for r in runs)
    engine, effects = runs[-1][1], runs[-1][2]
    busts = max(history.cancels.height, 1)
    print(f"rebuild, engine:    {new:7.2f} s  (median of {args.repeat}: "
          f"{', '.join(f'{r[0]:.2f}' for r in runs)}), {len(effects)} effects, "
          f"{new / busts * 1e3:.0f} ms per bust in all")  # fmt: skip
    out.update(rebuild_s=new, rebuild_runs_s=[r[0] for r in runs], effects=len(effects))
    reference = None
    if not args.no_reference:
        ref_runs = [rebuild(_reference=True) for _ in range(args.reference_repeat)]
        old = statistics.median(r[0] for r in ref_runs)
        reference = ref_runs[-1][1]
        same = ref_runs[-1][2] == effects
        print(f"rebuild, reference: {old:7.2f} s  (median of {args.reference_repeat}), "
              f"{old / busts * 1e3:.0f} ms per bust in all; same effects: "
              f"{'yes' if same else 'NO'}")  # fmt: skip
        print(f"ratio reference / engine: {old / new:.1f}x")
        out.update(reference_s=old, ratio=old / new, same_effects=same)
        if not same:
            raise SystemExit("the engine and the reference decided different effects")

    out["snapshot"] = _snapshot_figures(engine, history, new)
    out["snapshot"]["gil"] = _gil_figures(engine)
    out["snapshot"]["background"] = _background_figures(engine, history)

    trades = history.trades.sort("position")
    n = trades.height
    cases = {
        "the account's latest trade": trades.row(n - 1, named=True),
        "a trade ~1,000 events back": trades.filter(
            pl.col("position") >= int(history.events["position"].max()) - 1_000
        ).row(0, named=True),
        "a trade in the middle": trades.row(n // 2, named=True),
        "a trade id not there": None,
    }
    print(f"one bust after the history (median of {args.busts}, ms):")
    out["bust_ms"] = {}
    for label, row in cases.items():
        batch = _bust_batch(history, engine.horizon, row)
        ms = _per_bust(engine, batch, args.busts)
        line = f"  {label:28s} engine {ms:8.1f}"
        figures = {"engine": ms}
        if reference is not None:
            ref_ms = _per_bust(reference, batch, max(1, args.busts // 2))
            line += f"   reference {ref_ms:8.1f}   ratio {ref_ms / ms:5.1f}x"
            figures.update(reference=ref_ms, ratio=ref_ms / ms)
        print(line)
        out["bust_ms"][label] = figures
    out["peak_rss_mb"] = peak_rss_mb()
    print(f"peak memory: {out['peak_rss_mb']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
