"""The live engine's fold alone: milliseconds per micro-batch, no database.

20 accounts with MaxPositionSize limits, batches of ``--batch`` trades (default 90,
about what the processor takes per cycle at 5,000 events/s), each folded by
``riskbook.live.Engine.apply`` from the state the previous one left; after a warm-up,
prints the median and p99 per batch.

    uv run python benchmarks/live_fold.py
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np

import riskbook
from riskbook.live import Engine

T0 = datetime(2024, 1, 2, tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=90)
    ap.add_argument("--batches", type=int, default=300)
    args = ap.parse_args(argv)
    rnd = random.Random(1)
    position = 0

    def envelope(event: riskbook.Event) -> riskbook.Envelope:
        nonlocal position
        position += 1
        return riskbook.Envelope(uuid.uuid4(), event.aggregate_id, event.aggregate_type, 1,
                                 event.business_time or T0, event, "bench", position=position)  # fmt: skip

    setup = []
    for a in range(20):
        setup.append(envelope(riskbook.AccountFunded(account_id=f"A{a}", amount=1e7, funded_at=T0)))
        setup.append(envelope(riskbook.LimitSet(account_id=f"A{a}", limit_type="MaxPositionSize",
                                                value=1000.0, set_by="bench", set_at=T0)))  # fmt: skip
    engine = Engine(critical=100.0)
    engine.apply(riskbook.History.from_envelopes(setup))
    t = T0
    batches = []
    for _ in range(args.batches):
        trades = []
        for _ in range(args.batch):
            t += timedelta(milliseconds=1)
            trades.append(envelope(riskbook.TradeExecuted(
                trade_id=uuid.uuid4().hex, account_id=f"A{rnd.randrange(20)}",
                symbol=f"S{rnd.randrange(5)}", side=riskbook.Side.Buy if rnd.random() < 0.5
                else riskbook.Side.Sell, quantity=float(rnd.randint(5, 60)), price=100.0,
                executed_at=t)))  # fmt: skip
        batches.append(trades)
    warm = max(1, args.batches // 6)
    for trades in batches[:warm]:
        engine.apply(riskbook.History.from_envelopes(trades))
    times = []
    for trades in batches[warm:]:
        began = time.perf_counter()
        engine.apply(riskbook.History.from_envelopes(trades))
        times.append(time.perf_counter() - began)
    ms = np.array(times) * 1e3
    print(f"{len(ms)} batches of {args.batch} trades: median {np.median(ms):.1f} ms, "
          f"p99 {np.percentile(ms, 99):.1f} ms per batch (decode + fold)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
