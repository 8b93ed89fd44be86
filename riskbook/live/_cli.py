"""``riskbook live``, ``riskbook check`` and ``riskbook unblock``."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["EXIT_REJECTED", "add_live_commands"]

EXIT_REJECTED = 3
"""Exit code of ``riskbook check`` when the trade is rejected (0: accepted)."""


def _describe(effect: Any) -> str:
    from riskbook._reasons import figure
    from riskbook.live._engine import describe

    where = f" {effect.symbol}" if effect.symbol else ""
    what = "VIOLATION" if effect.kind == "LimitViolationDetected" else "BLOCK"
    return (
        f"{what} {effect.account_id} {effect.limit_type}{where}: "
        f"{describe(effect.value, effect.limit_type)} "
        f"(limit {figure(effect.limit_value)}) caused by {effect.causation_id}"
    )


def cmd_live(args: argparse.Namespace) -> int:
    from riskbook.cli import _stdout_gone
    from riskbook.live import Commit, Processor

    started = time.monotonic()
    shown = [started, 0]
    stop = threading.Event()

    def report(commit: Commit) -> None:  # in the processor's thread (unless --once)
        try:
            for effect in commit.effects:
                print(_describe(effect), flush=True)
        except BrokenPipeError:  # the reader went away (`riskbook live | head`): stop
            _stdout_gone()  # the batch is committed: nothing is lost
            stop.set()
            if args.once:
                raise  # ends the catch-up; the command exits quietly (cli._run)
            return
        now = time.monotonic()
        if now - shown[0] >= 5 or args.once:
            done = processor.engine.events_seen
            rate = (done - shown[1]) / max(now - shown[0], 1e-9)
            print(f"  {done:,} events processed, {rate:,.0f}/s, horizon {commit.horizon}",
                  file=sys.stderr, flush=True)  # fmt: skip
            shown[0], shown[1] = now, done

    processor = Processor(
        args.dsn,
        name=args.name,
        critical=None if args.no_block else args.critical,  # None: no type blocks
        start=args.start,
        on_commit=report,
        max_batch=args.max_batch,
        snapshots=not args.no_snapshot,
        **_snapshot_kwargs(args.snapshot_after),
    )
    if args.once:
        done = threading.Event()

        def say_rebuild() -> None:  # a long history's rebuild, as the loop below says it
            said: list[str] = []
            last: dict[str, Any] = {}
            while not done.wait(_POLL):
                status = processor.status
                if status.startswith("rebuilding"):
                    _say_status(args.name, status, said, last)
                elif status.startswith("stopping") and "stopping" not in said:
                    print(f"riskbook live {args.name!r}: {status}", file=sys.stderr, flush=True)
                    said.append("stopping")

        threading.Thread(target=say_rebuild, daemon=True).start()
        try:
            processor.catch_up()  # refuses at once while another of that name works
        finally:
            done.set()
            processor.stop()
        if processor.rebuilt:
            print(f"riskbook live {args.name!r}: {processor.rebuilt}", file=sys.stderr)
        held = sum(len(c.already_stored) for c in processor.commits)
        print(f"caught up: {processor.engine.events_seen:,} events, horizon "
              f"{processor.engine.horizon}"
              + (f"; {held:,} effects already stored, not appended again" if held else ""),
              file=sys.stderr)  # fmt: skip
        return 0

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: leave now (without the snapshot)
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    processor.start()
    said: list[str] = []
    last: dict[str, Any] = {}
    rebuilt = kept = None
    while not stop.wait(0.1):
        if processor.rebuilt != rebuilt:  # set at the end of a rebuild
            rebuilt = processor.rebuilt
            print(f"riskbook live {args.name!r}: {rebuilt}", file=sys.stderr, flush=True)
        if processor.kept != kept:  # a snapshot kept while running
            kept = processor.kept
            print(f"riskbook live {args.name!r}: {kept}", file=sys.stderr, flush=True)
        _say_status(args.name, processor.status, said, last)
        if not processor.running:
            break
    _stop(processor, args.name)
    if processor.error is not None:
        raise processor.error
    return 0


def _stop(processor: Any, name: str) -> None:
    """Stop the processor and wait for it, saying so while it keeps a snapshot of its
    state for the next start (seconds at a few million events)."""
    stopper = threading.Thread(target=processor.stop, kwargs={"timeout": None}, daemon=True)
    stopper.start()
    said = False
    while stopper.is_alive():
        stopper.join(0.2)
        if not said and processor.status.startswith("stopping"):
            print(f"riskbook live {name!r}: {processor.status} (Ctrl-C again leaves without"
                  " it)", file=sys.stderr, flush=True)  # fmt: skip
            said = True


_PROGRESS_EVERY = 5.0
"""Seconds between two lines of a rebuild's progress."""
_POLL = 0.2
"""Seconds between two looks at the status of ``riskbook live --once``'s processor."""


def _say_status(
    name: str, status: str, said: list[str], last: dict[str, Any] | None = None
) -> None:
    """Say on stderr what the processor does when that changes: waiting for another
    processor of its name (it holds the lock), rebuilding its state (and how far the
    rebuild is, every few seconds: a long history's takes minutes), following the
    store. ``said``: what was said so far (the last one last); ``last``: the last line
    said and when (kept by the caller, for the rebuild's progress)."""
    kind = status.split(":")[0].split(" ")[0]
    if kind == "rebuilding" and said and said[-1] == kind and last is not None:
        now = time.monotonic()
        if (
            " folded " in status
            and status != last.get("status")
            and now - last.get("at", 0.0) >= _PROGRESS_EVERY
        ):
            print(f"riskbook live {name!r}: {status}", file=sys.stderr, flush=True)
            last.update(status=status, at=now)
        return
    if kind not in ("waiting", "rebuilding", "running") or (said and said[-1] == kind):
        return
    if last is not None:
        last.update(status=status, at=time.monotonic())
    if kind == "waiting":
        text = (f"waiting: another processor named {name!r} is working on this store; this"
                " one takes over when it stops (Ctrl-C stops)")  # fmt: skip
    elif kind == "rebuilding":
        text = status
    else:
        got = "got the lock; " if "waiting" in said else ""
        text = f"{got}following the store (Ctrl-C stops)"
    print(f"riskbook live {name!r}: {text}", file=sys.stderr, flush=True)
    said.append(kind)


def _critical(text: str, *, hint: str = " (--no-block: never block)") -> float:
    """argparse type of --critical: a finite factor >= 1 (``hint``: how to say "never
    block" to the command that takes it)."""
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor >= 1.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1, got {text!r}{hint}")
    return factor


def _snapshot_after(text: str) -> float:
    """argparse type of --snapshot-after: seconds >= 0, or ``never`` (infinity)."""
    if text.strip().lower() == "never":
        return math.inf
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise argparse.ArgumentTypeError(f"must be seconds >= 0 or 'never', got {text!r}")
    return seconds


def _snapshot_kwargs(after: float | None) -> dict[str, Any]:
    """The Processor's snapshot_after from --snapshot-after (none given: its default)."""
    if after is None:
        return {}
    return {"snapshot_after": None if math.isinf(after) else after}


def cmd_check(args: argparse.Namespace) -> int:
    from riskbook.live import check

    result = check(args.account, args.symbol, args.side, args.quantity, args.price,
                   store=args.dsn, at=args.at)  # fmt: skip
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result)
    return 0 if result.accepted else EXIT_REJECTED


def cmd_unblock(args: argparse.Namespace) -> int:
    from riskbook.live import unblock

    env = unblock(args.account, by=args.by, reason=args.reason, store=args.dsn, at=args.at)
    print(f"unblocked {args.account} (event {env.event_id}, sequence {env.sequence})")
    return 0


def cmd_processors(args: argparse.Namespace) -> int:
    from riskbook.cli import _emit, _writable_file
    from riskbook.live import processors

    _writable_file(args.output, "--output")
    return _emit(processors(args.dsn), args, empty="(no processor has run on this store)")


def add_live_commands(
    add: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser],
    dsn_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``live``, ``processors``, ``check`` and ``unblock`` to the ``riskbook`` parser."""
    from riskbook.cli import _FORMAT_HELP, _FORMATS

    pr = add(
        "processors",
        cmd_processors,
        "the store's live processors: where each has got (checkpoint, events behind, last"
        " commit), whether one is working now, and the snapshot its next start here folds on"
        " from",
    )
    pr.add_argument("--format", choices=_FORMATS, default="table", help=_FORMAT_HELP)
    pr.add_argument("--output", "-o", default=None, help="write to FILE (needed for parquet)")
    dsn_option(pr)
    lv = add(
        "live",
        cmd_live,
        "run the live risk processor: follow the store, append violations and blocks",
    )
    lv.add_argument("--name", default="live", help="the checkpoint's name (default: live)")
    lv.add_argument(
        "--critical",
        type=_critical,
        default=1.2,
        help="block the account when a metric goes over this many times its limit (default 1.2)",
    )
    lv.add_argument("--no-block", action="store_true", help="report violations, never block")
    lv.add_argument(
        "--start",
        choices=["beginning", "head"],
        default="beginning",
        help="with no checkpoint yet: process the stored history too (beginning, the default)"
        " or only what comes next (head)",
    )
    lv.add_argument("--once", action="store_true", help="catch up with the store, then exit")
    lv.add_argument("--max-batch", type=int, default=None, help="events per micro-batch at most")
    lv.add_argument(
        "--no-snapshot",
        action="store_true",
        help="rebuild the state from the whole history, not from the snapshot a processor"
        " of its name kept at a long rebuild or a clean stop, and keep none",
    )
    lv.add_argument(
        "--snapshot-after",
        type=_snapshot_after,
        default=None,
        metavar="SECONDS",
        help="while running, keep a snapshot in the background whenever a rebuild of what"
        " was folded since the last one would take this long, so that a processor killed"
        " restarts in about this long at most (default 60; never: only at a long rebuild"
        " and a clean stop)",
    )
    dsn_option(lv)

    ck = add(
        "check",
        cmd_check,
        f"pre-trade check: accept (exit 0) or reject (exit {EXIT_REJECTED}) with every reason",
    )
    ck.add_argument("account")
    ck.add_argument("symbol")
    ck.add_argument("side", choices=["Buy", "Sell"])
    ck.add_argument("quantity", type=float)
    ck.add_argument("price", type=float)
    ck.add_argument("--at", default=None, help="the trade's business time (default: now)")
    ck.add_argument("--format", choices=["text", "json"], default="text")
    dsn_option(ck)

    ub = add("unblock", cmd_unblock, "unblock a blocked account, saying who and why")
    ub.add_argument("account")
    ub.add_argument("--by", required=True, help="who unblocks it")
    ub.add_argument("--reason", required=True, help="why")
    ub.add_argument(
        "--at", default=None, help="the unblock's business time, RFC 3339 (default: now)"
    )
    dsn_option(ub)
