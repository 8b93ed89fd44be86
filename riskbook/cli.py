"""The ``riskbook`` command.

Exit codes: 0 success, 1 a refused operation (bad input, conflict, unreachable
database), 2 bad usage. Errors go to stderr as one line naming what was wrong;
progress of long work goes to stderr too, so stdout stays clean for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from riskbook.errors import RiskbookError
from riskbook.events import STORED_INFINITY

__all__ = ["main"]


def _err(msg: str) -> None:
    # one line, whatever the message: a driver's or the OS's may span several
    text = "; ".join(part.strip() for part in str(msg).splitlines() if part.strip())
    print(f"riskbook: {text}", file=sys.stderr)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A warning as one plain ``riskbook: ...`` line on stderr, whatever raised it (a
    command, or the live processor's thread): no source path and line of riskbook's
    code, which say nothing to the user of the command."""
    from riskbook.limits._api import _UnregisteredTypes

    if isinstance(message, _UnregisteredTypes):
        _err(
            "not evaluated, no definition is installed for the limit type(s) "
            f"{', '.join(message.names)} (entry-point group riskbook.limit_types)"
        )
        return
    text = str(message)
    _err(f"warning: {text.removeprefix('riskbook: ')}")


def _stdout_gone() -> None:
    """Point stdout at /dev/null: its reader went away (``riskbook ... | head``). What
    is still buffered, or printed later, goes nowhere instead of failing again (at exit,
    Python's own flush would print an "Exception ignored" traceback)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture)
        pass


def _write_data(text: str) -> None:
    """csv or json to stdout: UTF-8, whatever stdout's encoding (a data format, read by
    a program, not a console)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text stream only (an embedding program's): as it takes text
        sys.stdout.write(text)
        return
    sys.stdout.flush()  # what was written as text first
    buffer.write(text.encode("utf-8"))
    buffer.flush()


def _os_error(exc: OSError) -> str:
    """An OS error as ``PATH: what went wrong`` (Python's own text starts with
    ``[Errno 2]`` and quotes the path at the end)."""
    if exc.filename is None or not exc.strerror:
        return str(exc)
    what = (
        exc.strerror[:1].lower() + exc.strerror[1:] if exc.strerror[1:2].islower() else exc.strerror
    )
    paths = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(paths)}: {what}"


def _identifier(text: str) -> str:
    """argparse type of --account and --symbol: an id, never empty (an empty one matched
    nothing in some commands and was refused, or ignored, in others)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _writable_file(path: str | None, option: str) -> None:
    """Refuse, before any work, an output FILE that cannot be written: a directory, or
    one in a folder that does not exist (other failures are told when writing)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory, not a file")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: no such directory {str(target.parent)!r}")


class _Progress:
    """Progress of long work on stderr: a line at most every half second."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.started = time.perf_counter()
        self.last = 0.0

    def __call__(self, stage: str, count: int) -> None:
        now = time.perf_counter()
        if self.quiet or (now - self.last < 0.5 and stage not in ("written",)):
            return
        self.last = now
        elapsed = now - self.started
        print(f"  {stage} {count:,} events ({elapsed:.1f} s)", file=sys.stderr, flush=True)


_opened: list[Any] = []  # the stores a command opened: closed when it ends (_run)


def _store(dsn: str | None):  # type: ignore[no-untyped-def]
    from riskbook.store import connect

    store = connect(dsn)
    _opened.append(store)
    return store


# ----------------------------------------------------------------------- db


def _server(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from riskbook.store.embedded import EmbeddedServer

    return EmbeddedServer(args.home)


def cmd_db_start(args: argparse.Namespace) -> int:
    dsn = _server(args).start()
    print(dsn)
    return 0


def cmd_db_stop(args: argparse.Namespace) -> int:
    was_running = _server(args).stop()
    print("stopped" if was_running else "not running")
    return 0


def cmd_db_status(args: argparse.Namespace) -> int:
    if os.environ.get("RISKBOOK_DSN") and args.home is None:
        from riskbook.store import redact

        print(f"using RISKBOOK_DSN: {redact(os.environ['RISKBOOK_DSN'])}")
    st = _server(args).status()
    print(f"embedded server: {'running' if st.running else 'stopped'} (PostgreSQL {st.version})")
    if st.running:
        print(f"  pid:        {st.pid}")
        print(f"  url:        {st.dsn}")
        holders = ", ".join(str(p) for p in st.attached_pids) or "none"
        print(f"  held by:    {holders}{' (pinned by riskbook db start)' if st.pinned else ''}")
        reaper = f"pid {st.reaper_pid}" if st.reaper_pid else "none (the next attach starts one)"
        print(f"  reaper:     {reaper} (stops the server once nothing holds it, unless pinned)")
    print(f"  data dir:   {st.data_dir}")
    print(f"  socket dir: {st.socket_dir}")
    return 0 if st.running else 3


def cmd_db_url(args: argparse.Namespace) -> int:
    if os.environ.get("RISKBOOK_DSN") and args.home is None:
        from riskbook.store import redact

        print(redact(os.environ["RISKBOOK_DSN"]))
        return 0
    server = _server(args)
    if not server.status().running:
        _err("the embedded server is not running; start it with `riskbook db start`")
        return 1
    print(server.url())
    return 0


def cmd_db_renumber(args: argparse.Namespace) -> int:
    done = _store(args.dsn).renumber()
    print(
        f"renumbered {done:,} events: readers and writers can use the store"
        if done
        else "nothing to renumber: the store's positions are this server's"
    )
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from riskbook.store import connect

    store = connect(args.dsn, migrate=False)
    said: list[str] = []
    ran = store.migrate(notices=said)
    for text in said:
        print(f"riskbook: warning: {text}", file=sys.stderr)
    print(
        f"schema version {store.schema_version()}"
        + (f" (applied {ran})" if ran else " (up to date)")
    )
    return 0


# ----------------------------------------------------------------------- import


def cmd_import(args: argparse.Namespace) -> int:
    store = _store(args.dsn)
    progress = _Progress(args.quiet)
    for path in args.files:
        if not args.quiet:
            print(f"importing {path}", file=sys.stderr)
        # "-" is standard input, as for most commands; a file named so is ./-
        given = sys.stdin.buffer if path == "-" else path
        result = store.import_jsonl(given, progress=progress)
        print(f"{path}: {result}")
    return 0


# ----------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from riskbook.frames import load

    if Path(args.directory).exists() and not Path(args.directory).is_dir():
        raise ValueError(f"{args.directory}: is a file, not a directory")
    history = load(
        _store(args.dsn),
        accounts=args.account,
        symbols=args.symbol,
        since=args.since,
        until=args.until,
        known_at=args.known_at,
        cache=False,
        progress=None if not args.quiet else False,
    )
    import polars as pl

    try:
        out = history.to_parquet(args.directory)
    except pl.exceptions.PolarsError as exc:  # a full disk, said polars' way
        raise ValueError(f"{args.directory}: {exc}") from None
    counts = ", ".join(f"{n} {f.height:,}" for n, f in history.frames().items())
    print(f"{out}: {counts}")
    return 0


# ----------------------------------------------------------------------- positions / exposure

_FORMATS = ("table", "csv", "json", "parquet")
_FORMAT_HELP = (
    "default: table; in json an infinite figure (leverage with equity <= 0) is the largest "
    "double, 1.7976931348623157e+308, as in stored events"
)


def _state(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from riskbook.projections import state_at

    _writable_file(args.output, "--output")
    return state_at(_store(args.dsn), args.at, accounts=args.account, known_at=args.known_at)


def _emit(frame, args: argparse.Namespace, *, empty: str | None = None) -> int:  # type: ignore[no-untyped-def]
    """Write a frame to --output or stdout in --format (one row per position or account).

    ``empty``: what a table with no rows says (default: that there is nothing at the
    --at time, or nothing found when no --at was given).
    """
    import polars as pl

    frame = frame.with_columns(pl.col(pl.Categorical).cast(pl.String))
    if args.format == "parquet":
        if args.output is None:
            raise ValueError("--format parquet needs --output FILE")
        output = args.output

        def write() -> None:
            with open(output, "wb") as file:  # polars takes no path that is not UTF-8
                frame.write_parquet(file)

        _write_output(output, write)
        return 0
    if args.format == "csv":
        text = frame.write_csv(datetime_format="%Y-%m-%dT%H:%M:%S%.6fZ")
    elif args.format == "json":
        # JSON has no infinity: an infinite leverage (equity <= 0 with exposure) is the
        # largest double, as in a stored violation and `riskbook check` (null would read
        # as "no value"); NaN is null.
        floats = pl.col(pl.Float64)
        text = (
            frame.with_columns(
                pl.when(floats.is_nan())
                .then(None)
                .when(floats == float("inf"))
                .then(STORED_INFINITY)
                .when(floats == float("-inf"))
                .then(-STORED_INFINITY)
                .otherwise(floats)
                .name.keep()
            )
            .with_columns(pl.col(pl.Datetime).dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"))
            .write_json()
            + "\n"
        )
    else:
        # A console that cannot show the box-drawing characters (cp1252) gets ASCII ones;
        # a file is UTF-8.
        encoding = "utf-8" if args.output is not None else sys.stdout.encoding or "utf-8"
        try:
            "┌─┬╞═│".encode(encoding)
            borders = {}
        except (UnicodeEncodeError, LookupError):
            borders = {"tbl_formatting": "ASCII_FULL_CONDENSED"}
        with pl.Config(
            **borders,  # type: ignore[arg-type]
            tbl_rows=-1,
            tbl_cols=-1,
            tbl_width_chars=400,
            tbl_hide_dataframe_shape=True,
            tbl_hide_column_data_types=True,
            float_precision=6,
            fmt_str_lengths=256,  # ids whole (up to 256 characters): an auditor copies them
        ):
            if empty is None:
                given = getattr(args, "at", None) is not None
                empty = "(nothing at that time)" if given else "(nothing found)"
            text = f"{frame}\n" if frame.height else f"{empty}\n"
    if args.output is not None:
        _write_output(args.output, lambda: Path(args.output).write_text(text, encoding="utf-8"))
    elif args.format == "table":
        sys.stdout.write(text)  # what stdout's encoding lacks is escaped: see _run
    else:
        _write_data(text)
    return 0


def _write_output(path: str, write: Callable[[], object]) -> None:
    """Run ``write``; its failure (a full disk, a path that cannot be written) as one
    error naming --output and the path."""
    import polars as pl

    try:
        write()
    except OSError as exc:
        what = exc.strerror or str(exc)
        raise ValueError(f"--output {path}: {what[:1].lower() + what[1:]}") from None
    except pl.exceptions.PolarsError as exc:  # polars' own writers say it their way
        raise ValueError(f"--output {path}: {exc}") from None


def cmd_positions(args: argparse.Namespace) -> int:
    positions, _ = _state(args)
    return _emit(positions, args)


def cmd_exposure(args: argparse.Namespace) -> int:
    _, accounts = _state(args)
    return _emit(accounts, args)


def cmd_db_refresh(args: argparse.Namespace) -> int:
    from riskbook.projections import refresh_account_positions

    started = time.perf_counter()
    rows = refresh_account_positions(_store(args.dsn))
    print(f"account_positions: {rows:,} rows ({time.perf_counter() - started:.2f} s)")
    return 0


# ----------------------------------------------------------------------- limits


def _history(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from riskbook.frames import load

    return load(_store(args.dsn), accounts=args.account, cache=False, progress=False)


def cmd_breaches(args: argparse.Namespace) -> int:
    from riskbook.limits import breaches

    _writable_file(args.output, "--output")
    levels = tuple(args.level) if args.level else (0.8, 0.9, 1.0)
    history = _history(args)
    # limit types without a definition here: one line on stderr (_show_warning)
    found = breaches(history, at=args.at, known_at=args.known_at, levels=levels)
    return _emit(found, args, empty="(no breaches)")


def cmd_limits_history(args: argparse.Namespace) -> int:
    from riskbook.limits import limit_history

    _writable_file(args.output, "--output")
    return _emit(limit_history(_history(args), at=args.at, known_at=args.known_at), args)


# ----------------------------------------------------------------------- audit


def cmd_incidents(args: argparse.Namespace) -> int:
    import polars as pl

    from riskbook.audit import incidents
    from riskbook.frames import load

    _writable_file(args.output, "--output")
    history = load(
        _store(args.dsn),
        accounts=args.account,
        known_at=args.known_at,
        cache=False,
        progress=False,
    )
    found = incidents(history).select(
        "occurred_at",
        pl.col("timestamp").alias("recorded_at"),
        "event_type",
        "account_id",
        "limit_type",
        "symbol",
        "event_id",
        "causation_id",
        "correlation_id",
    )
    return _emit(found, args, empty="(no violations or blocks)")


def cmd_explain(args: argparse.Namespace) -> int:
    import uuid

    from riskbook.audit import ACCOUNT_EVENT_TYPES, explain
    from riskbook.frames import load

    _writable_file(args.output, "--output")
    try:
        event_id = str(uuid.UUID(args.event_id))
    except ValueError:
        raise ValueError(f"{args.event_id!r} is not an event id (a UUID)") from None
    store = _store(args.dsn)
    with store.connection() as conn:
        found = conn.execute(
            "SELECT event_type, payload->>'account_id' FROM events WHERE event_id = %s",
            (event_id,),
        ).fetchone()
    if found is None:
        raise ValueError(f"no event {event_id} in this store")
    kind, account = found
    # an account's event: its history (and every mark) is enough; a mark: everything
    accounts = [account] if account and kind in ACCOUNT_EVENT_TYPES else None
    history = load(store, accounts=accounts, cache=False, progress=False)
    incident = explain(history, event_id, critical=args.critical)
    text = incident.to_json() + "\n" if args.format == "json" else incident.report()
    if args.output is not None:
        _write_output(args.output, lambda: Path(args.output).write_text(text, encoding="utf-8"))
    elif args.format == "json":
        _write_data(text)
    else:
        sys.stdout.write(text)
    return 0


# ----------------------------------------------------------------------- simulate / demo


def cmd_simulate(args: argparse.Namespace) -> int:
    from riskbook import simulate

    return simulate.cli(args.rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from riskbook import demo

    return demo.run(
        dsn=args.dsn,
        sample=Path(args.sample) if args.sample else None,
        lab=not args.summary_only,
        browser=not args.no_browser,
        port=args.port,
    )


# ----------------------------------------------------------------------- trust


def cmd_verify(args: argparse.Namespace) -> int:
    from riskbook.verify import verify

    _writable_file(args.save_heads, "--save-heads")
    store = _store(args.dsn)
    try:
        report = verify(store, heads=args.heads, progress=None if args.quiet else _Progress())
    finally:
        store.close()
    print(report)
    if args.save_heads and not report.ok:
        # heads of a history found tampered with would vouch for it at the next check
        # (a nightly `--heads F --save-heads F` would pass from then on)
        print(
            f"heads not written to {args.save_heads}: verify found problems (the heads kept"
            " there, if any, still hold what was checked before)",
            file=sys.stderr,
        )
    elif args.save_heads:
        report.save_heads(args.save_heads)
        print(f"heads of {len(report.heads):,} aggregates written to {args.save_heads}")
    return 0 if report.ok else 1


def _read_password(args: argparse.Namespace) -> str | None:
    """The new role's password: asked twice on a terminal, else one line of stdin.

    Never an argument: the command line of a process is visible to every local user.
    """
    if not args.password:
        return None
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass(f"password for {args.role}: ")
        if getpass.getpass("again: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def cmd_db_grant(args: argparse.Namespace) -> int:
    from riskbook.store import roles

    grant = roles.grant_reader if args.db_command == "grant-reader" else roles.grant_processor
    print(grant(_store(args.dsn), args.role, password=_read_password(args)))
    return 0


def _add_trust_commands(
    add: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser],
    dbsub: argparse._SubParsersAction,
    dsn_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    ver = add(
        "verify",
        cmd_verify,
        "recompute every event's hash chain; name each aggregate and sequence where history"
        " was altered, removed or reordered (exit 1 then)",
    )
    ver.add_argument(
        "--heads", default=None, metavar="FILE", help="heads saved earlier: each must still hold"
    )
    ver.add_argument(
        "--save-heads",
        default=None,
        metavar="FILE",
        help="write each aggregate's head to FILE (only if every chain holds)",
    )
    ver.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    dsn_option(ver)
    for name, text in [
        (
            "grant-reader",
            "create or update a LOGIN role that can read history and views, and nothing else",
        ),
        (
            "grant-processor",
            "create or update a LOGIN role that can append events and keep its checkpoint,"
            " but not alter history",
        ),
    ]:
        sp = dbsub.add_parser(name, help=text, description=text)
        sp.add_argument("role", metavar="ROLE")
        sp.add_argument(
            "--password",
            action="store_true",
            help="set a password, asked on the terminal or read from stdin (not needed on the"
            " embedded server)",
        )
        dsn_option(sp)
        sp.set_defaults(func=cmd_db_grant)


def cmd_cache_list(args: argparse.Namespace) -> int:
    """``riskbook cache``: each store's entries, the least recently used store first."""
    from riskbook import cache

    folder = cache.root()
    listed = cache.entries()
    if not listed:
        print(f"the cache is empty ({folder})")
        return 0
    stores: dict[str, list[cache.CacheEntry]] = {}
    for e in listed:  # least recently used first: a store's last entry is its latest
        stores.setdefault(e.store_id, []).append(e)
    for store_id, items in sorted(stores.items(), key=lambda kv: kv[1][-1].last_used):
        where = items[0].database or "where: not noted"
        print(
            f"store {store_id}  {where}  {_human_bytes(sum(e.bytes for e in items))},"
            f" last used {_when(items[-1].last_used)}"
        )
        for e in items:
            print(f"  {e.kind:<4}  {_human_bytes(e.bytes):>8}  {_when(e.last_used)}  {e.what}")
    total = sum(e.bytes for e in listed)
    print(
        f"{len(listed)} entr{'y' if len(listed) == 1 else 'ies'} of {len(stores)}"
        f" store{'' if len(stores) == 1 else 's'}, {_human_bytes(total)} in {folder}"
        " (only copies: `riskbook cache prune` removes them)"
    )
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    """``riskbook cache prune``: remove the entries asked for."""
    from riskbook import cache

    asked = (args.older_than, args.max_size)  # 0 and 0s are asked for too
    if all(a is None for a in asked) and not (args.store or args.all):
        raise RiskbookError(
            "say what to remove: --older-than AGE, --max-size SIZE, --store ID or --all"
        )
    gone = cache.prune(
        older_than=args.older_than,
        max_bytes=args.max_size,
        stores=args.store or None,
        everything=args.all,
        dry_run=args.dry_run,
    )
    verb = "would remove" if args.dry_run else "removed"
    for e in gone:
        print(f"{verb} {e.kind} {e.store_id} {e.what} ({_human_bytes(e.bytes)})")
    left = sum(e.bytes for e in cache.entries())
    print(
        f"{verb} {len(gone)} entr{'y' if len(gone) == 1 else 'ies'},"
        f" {_human_bytes(sum(e.bytes for e in gone))};"
        f" {_human_bytes(left)} left in {cache.root()}"
    )
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _when(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
               "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12}  # fmt: skip
_AGE_UNITS = {"": 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "w": 7 * 86400}


def _size_arg(text: str) -> int:
    """A size: bytes, or a number with kB, MB, GB or TB (powers of 1000): ``500MB``."""
    number, unit = _split_unit(text)
    if unit.lower() not in _SIZE_UNITS or number is None or number < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (bytes, or a number with kB, MB, GB or TB: 500MB)"
        )
    return int(number * _SIZE_UNITS[unit.lower()])


def _age_arg(text: str) -> timedelta:
    """An age: days, or a number with w, d, h, m or s: ``30d``, ``12h``."""
    number, unit = _split_unit(text)
    if unit.lower() not in _AGE_UNITS or number is None or number < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age (days, or a number with w, d, h, m or s: 30d, 12h)"
        )
    return timedelta(seconds=number * _AGE_UNITS[unit.lower()])


def _split_unit(text: str) -> tuple[float | None, str]:
    stripped = text.strip()
    i = len(stripped)
    while i and not (stripped[i - 1].isdigit() or stripped[i - 1] == "."):
        i -= 1
    try:
        number = float(stripped[:i])
    except ValueError:
        return None, ""
    return (number if number == number and number != float("inf") else None), stripped[i:].strip()


def cmd_bench(argv: list[str]) -> int:
    """``riskbook bench …``: benchmarks/run_all.py of a source checkout, arguments as given."""
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (here / "run_all.py").is_file():
        raise RiskbookError(
            "riskbook bench runs the benchmarks of a source checkout (benchmarks/run_all.py),"
            " which this installation does not have"
        )
    sys.path.insert(0, str(here))
    import run_all

    return int(run_all.main(argv, prog="riskbook bench"))


# ----------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="riskbook",
        description="Event-sourced trading risk: PostgreSQL history, Polars projections, live limits.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    def dsn_option(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--dsn",
            default=None,
            help="PostgreSQL to use (default: $RISKBOOK_DSN, else the embedded server)",
        )

    db = sub.add_parser("db", help="the database: embedded server and schema")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, func, text in [
        ("start", cmd_db_start, "start the embedded server and keep it running until `db stop`"),
        ("stop", cmd_db_stop, "stop the embedded server"),
        ("status", cmd_db_status, "is the embedded server running, where, for whom"),
        ("url", cmd_db_url, "print the connection URL (a password is shown as ***)"),
    ]:
        sp = dbsub.add_parser(name, help=text, description=text)
        sp.add_argument(
            "--home", default=None, help="riskbook home (default: $RISKBOOK_HOME or ~/.riskbook)"
        )
        sp.set_defaults(func=func)
    up = dbsub.add_parser(
        "upgrade",
        help="apply schema migrations (also done on every connect)",
        description="Bring the store's schema to this riskbook's version, in place (every "
        "connect does it too). Unlike a connect, it also makes a new store where the "
        "search_path finds none even if the database holds one in another schema.",
    )
    dsn_option(up)
    up.set_defaults(func=cmd_db_upgrade)
    ren = dbsub.add_parser(
        "renumber",
        help="give a store copied from another server (pg_dump, pg_restore) this server's"
        " positions",
        description="A store restored on another server holds positions made of the old"
        " server's transaction ids: riskbook refuses to read or append to it until this has"
        " given its events positions below every transaction of this server, in the same"
        " order (one transaction, as the store's owner). Nothing is done to a store that"
        " needs it not.",
    )
    dsn_option(ren)
    ren.set_defaults(func=cmd_db_renumber)
    ref = dbsub.add_parser(
        "refresh",
        help="refresh the account_positions view (concurrently: readers are not blocked)",
        description="refresh the account_positions view (concurrently: readers are not blocked)",
    )
    dsn_option(ref)
    ref.set_defaults(func=cmd_db_refresh)

    imp = add("import", cmd_import, "import JSON Lines files of event envelopes (plain or gzip)")
    imp.add_argument("files", nargs="+", metavar="FILE", help="a file, or - for standard input")
    imp.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    dsn_option(imp)

    exp = add("export", cmd_export, "write the history as Parquet files an auditor can reload")
    exp.add_argument("directory", metavar="DIR")
    exp.add_argument(
        "--account",
        action="append",
        type=_identifier,
        default=None,
        help="only this account (repeatable)",
    )
    exp.add_argument(
        "--symbol",
        action="append",
        type=_identifier,
        default=None,
        help="only this symbol (repeatable)",
    )
    exp.add_argument("--since", default=None, help="business time from (RFC 3339)")
    exp.add_argument("--until", default=None, help="business time to (RFC 3339)")
    exp.add_argument("--known-at", default=None, help="only what was recorded by then (RFC 3339)")
    exp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dsn_option(exp)

    for name, func, text in [
        (
            "positions",
            cmd_positions,
            "positions per (account, symbol): quantity, average cost, realized and unrealized PnL",
        ),
        (
            "exposure",
            cmd_exposure,
            "per account: cash, equity, gross and net exposure, leverage, drawdown",
        ),
    ]:
        sp = add(name, func, text)
        sp.add_argument(
            "--at", default=None, help="business time T (RFC 3339; default: everything recorded)"
        )
        sp.add_argument(
            "--known-at", default=None, help="only what was recorded by then (RFC 3339)"
        )
        sp.add_argument(
            "--account",
            action="append",
            type=_identifier,
            default=None,
            help="only this account (repeatable)",
        )
        sp.add_argument("--format", choices=_FORMATS, default="table", help=_FORMAT_HELP)
        sp.add_argument("--output", "-o", default=None, help="write to FILE (needed for parquet)")
        dsn_option(sp)

    def output_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--known-at", default=None, help="only what was recorded by then (RFC 3339)"
        )
        sp.add_argument(
            "--account",
            action="append",
            type=_identifier,
            default=None,
            help="only this account (repeatable)",
        )
        sp.add_argument("--format", choices=_FORMATS, default="table", help=_FORMAT_HELP)
        sp.add_argument("--output", "-o", default=None, help="write to FILE (needed for parquet)")
        dsn_option(sp)

    br = add(
        "breaches",
        cmd_breaches,
        "limit breach intervals: when each limit was exceeded, by how much, what triggered it",
    )
    br.add_argument(
        "--at", default=None, help="business time T (RFC 3339; default: everything recorded)"
    )
    br.add_argument(
        "--level",
        action="append",
        type=float,
        default=None,
        help="a fraction of the limit to report (repeatable; default 0.8, 0.9 and 1.0)",
    )
    output_options(br)
    lim = sub.add_parser("limits", help="limits: their audit trail")
    limsub = lim.add_subparsers(dest="limits_command", required=True, metavar="ACTION")
    text = "every limit change: old and new value, who set it, business and recorded time"
    lh = limsub.add_parser("history", help=text, description=text)
    lh.set_defaults(func=cmd_limits_history)
    lh.add_argument(
        "--at", default=None, help="only the changes that apply by business time T (RFC 3339)"
    )
    output_options(lh)

    from riskbook.live._cli import _critical

    inc = add(
        "incidents",
        cmd_incidents,
        "every alarm on record: each LimitViolationDetected and AccountBlocked, with its"
        " event id (for `riskbook explain`)",
    )
    output_options(inc)
    exp_ = add(
        "explain",
        cmd_explain,
        "reconstruct an alarm (or any event) from the history: its cause, the limit in force"
        " and who set it, the metric as the engine knew it and as corrected since, the"
        " unblock, and where the record and the history disagree",
    )
    exp_.add_argument("event_id", metavar="EVENT_ID", help="the event (see `riskbook incidents`)")
    exp_.add_argument(
        "--critical",
        type=functools.partial(_critical, hint=""),  # (explain has no --no-block)
        default=None,
        help="the processor's critical factor, for blocks (as `riskbook live --critical`;"
        " default: the factor its blocks on record state, else 1.2)",
    )
    exp_.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text (default): a report for people; json: every part, times as RFC 3339",
    )
    exp_.add_argument("--output", "-o", default=None, help="write to FILE")
    dsn_option(exp_)

    from riskbook.live._cli import add_live_commands

    add_live_commands(add, dsn_option)

    _add_trust_commands(add, dbsub, dsn_option)

    _add_cache_commands(sub)

    bench = add(
        "bench",
        lambda args: cmd_bench(args.rest),
        "run every benchmark against its peers and write benchmarks/REPORT.md"
        " (a source checkout; see `riskbook bench --help`)",
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="see `riskbook bench --help`")

    sim = add("simulate", cmd_simulate, "generate a synthetic history with planted incidents")
    sim.add_argument("rest", nargs=argparse.REMAINDER, help="see `riskbook simulate --help`")

    demo = add(
        "demo",
        cmd_demo,
        "load the sample history (into an empty store), show what riskbook computes,"
        " and open the notebooks in JupyterLab",
    )
    demo.add_argument(
        "--sample",
        default=None,
        help="import this JSON Lines history (default: the bundled sample, into an empty store)",
    )
    demo.add_argument(
        "--summary-only",
        action="store_true",
        help="print the summary and stop (no JupyterLab): for scripts and CI",
    )
    demo.add_argument(
        "--no-browser",
        action="store_true",
        help="print JupyterLab's URL instead of opening a browser",
    )
    demo.add_argument(
        "--port", type=int, default=None, help="JupyterLab's port (default: 8888 or the next free)"
    )
    dsn_option(demo)
    return p


def _add_cache_commands(sub: argparse._SubParsersAction) -> None:
    text = (
        "what riskbook keeps under its cache folder (copies of loaded histories, live"
        " processors' snapshots), and removing it"
    )
    c = sub.add_parser("cache", help=text, description=text)
    c.set_defaults(func=cmd_cache_list)
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION")
    text = "each store's entries: what, how large, when last used (the default action)"
    csub.add_parser("list", help=text, description=text).set_defaults(func=cmd_cache_list)
    text = (
        "remove entries: unused for AGE, the least recently used beyond SIZE, a store's,"
        " or all (only copies: the next load reads the store, the next processor rebuilds)"
    )
    pr = csub.add_parser("prune", help=text, description=text)
    pr.add_argument(
        "--older-than",
        type=_age_arg,
        default=None,
        metavar="AGE",
        help="entries not used for AGE: days, or with w, d, h, m or s (30d, 12h)",
    )
    pr.add_argument(
        "--max-size",
        type=_size_arg,
        default=None,
        metavar="SIZE",
        help="then the least recently used until the rest fit in SIZE (500MB, 10GB)",
    )
    pr.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="ID",
        help="every entry of this store (its id as `riskbook cache` lists it; repeatable)",
    )
    pr.add_argument("--all", action="store_true", help="every entry")
    pr.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    pr.set_defaults(func=cmd_cache_prune)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":  # forwarded whole, --help included
        from riskbook import simulate

        return _run(lambda: simulate.cli(argv[1:]))
    if argv and argv[0] == "bench":  # forwarded whole to benchmarks/run_all.py
        return _run(lambda: cmd_bench(argv[1:]))
    args = build_parser().parse_args(argv)
    return _run(lambda: args.func(args))


def _run(call: Callable[[], int]) -> int:
    # Text for a reader (a table, a message, a path) goes out whatever stdout's encoding:
    # what it cannot encode is escaped (\u8d26, as Python does on stderr) instead of
    # failing once the work is done.
    stdout = sys.stdout
    opened = len(_opened)  # main() may run in a process that goes on (a test, a notebook)
    strict = getattr(stdout, "errors", None) == "strict" and hasattr(stdout, "reconfigure")
    if strict:
        stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    try:
        with warnings.catch_warnings():
            # each warning once, as one line (also from the live processor's thread),
            # whatever the filters of a host that runs main() (pytest's "error"); a
            # user's own -W or PYTHONWARNINGS still rules
            if not sys.warnoptions:
                warnings.simplefilter("default", UserWarning)
            warnings.showwarning = _show_warning
            return _run_command(call)
    finally:
        while len(_opened) > opened:
            with contextlib.suppress(Exception):  # closing: nothing left to say
                _opened.pop().close()
        if strict and not stdout.closed:
            with contextlib.suppress(OSError):  # a broken pipe flushed: nothing to say
                stdout.reconfigure(errors="strict")  # type: ignore[union-attr]


def _run_command(call: Callable[[], int]) -> int:
    try:
        return call()
    except (RiskbookError, ValueError) as exc:  # ValueError: a bad time or id given
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (`riskbook positions | head`): quietly
        _stdout_gone()
        return 0
    except OSError as exc:  # a file to read or write: missing, a directory, not allowed
        _err(_os_error(exc))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
