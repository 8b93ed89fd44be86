"""The rows every benchmark writes with ``--json PATH``, and how the report reads them.

One row is one measure: riskbook's figure beside its peer's (or floor's), measured in
the same run on the same server, with the peak memory of each as the OS counted it::

    {"rows": [{"group": "append", "measure": "one event per append", "unit": "events/s",
               "riskbook": 2582.0, "peer": 950.0, "peer_name": "eventsourcing",
               "higher_is_better": true, "riskbook_peak_mb": 112.0, "peer_peak_mb": 98.0,
               "note": ""}]}

The ratio is not stored by the scripts: the report computes it (:attr:`Row.ratio`), as
riskbook / peer when higher is better and peer / riskbook when lower is better, so
that above 1 always means riskbook is ahead.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

TIMES = "\N{MULTIPLICATION SIGN}"
GROUPS = ("append", "follow", "load", "projections", "breaches", "live", "simulate", "notebook")
"""The report's sections, in its order."""
SPEED_UNITS = ("s", "ms", "µs", "events/s", "rows/s")


@dataclass(frozen=True)
class Row:
    group: str
    measure: str
    unit: str
    riskbook: float
    peer: float
    peer_name: str
    higher_is_better: bool = True
    riskbook_peak_mb: float | None = None
    peer_peak_mb: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        """How far riskbook is ahead (> 1) or behind (< 1); inf when riskbook's figure
        is 0 where lower is better (no events missed, say) and the peer's is not."""
        ours, theirs = (
            (self.riskbook, self.peer) if self.higher_is_better else (self.peer, self.riskbook)
        )
        if theirs == 0:
            return 1.0 if ours == 0 else math.inf
        return ours / theirs

    @property
    def ratio_text(self) -> str:
        """``2.4x faster``, ``1.9x slower``, ``3.0x less``, ``∞x less`` ... (with a
        multiplication sign for the x)."""
        r = self.ratio
        if self.unit in SPEED_UNITS:
            ahead, behind = "faster", "slower"
        elif self.higher_is_better:
            ahead, behind = "more", "less"
        else:  # events missed, megabytes
            ahead, behind = "less", "more"
        if r == 1:
            return "even"
        if math.isinf(r):
            return f"∞{TIMES} {ahead}"
        if r >= 1:
            return f"{times(r)} {ahead}"
        return f"{times(1 / r)} {behind}"

    def as_dict(self) -> dict[str, Any]:
        """The row as written to JSON, with the computed ratio (``null`` when infinite)."""
        r = self.ratio
        return {
            **asdict(self),
            "ratio": r if math.isfinite(r) else None,
            "ratio_text": self.ratio_text,
        }


def times(r: float) -> str:
    """A multiplier: 2.4, 46.0, 1,583 (one decimal below 100), with the sign."""
    return f"{r:.1f}{TIMES}" if r < 100 else f"{r:,.0f}{TIMES}"


def row_from_dict(d: dict[str, Any]) -> Row:
    names = {f.name for f in fields(Row)}
    return Row(**{k: v for k, v in d.items() if k in names})


def write_rows(path: str | Path, rows: list[Row]) -> None:
    """Write ``{"rows": [...]}`` to ``path`` (what every script's ``--json`` does)."""
    Path(path).write_text(json.dumps({"rows": [asdict(r) for r in rows]}, indent=1) + "\n")


def read_rows(path: str | Path) -> list[Row]:
    """The rows of a file written by :func:`write_rows` (or a whole report.json)."""
    data = json.loads(Path(path).read_text())
    return [row_from_dict(d) for d in data["rows"]]


def figure(value: float, unit: str) -> str:
    """A figure as the report prints it: thousands separated, digits as the size needs."""
    if unit == "events" or (value == int(value) and abs(value) >= 100):
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def megabytes(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


# --------------------------------------------------------------------------- goals


@dataclass(frozen=True)
class Goal:
    """One goal an issue sets, checked against a row of the same run.

    ``how``: ``ahead`` -- the row's ratio is at least ``target`` (riskbook that many
    times ahead of the peer); ``within`` -- riskbook's figure is at most ``target``
    times the peer's (a floor, where lower is better); ``at_most`` / ``at_least`` --
    riskbook's own figure against ``target``.
    """

    issue: int
    goal: str
    group: str
    measure: str
    peer: str  # the start of the row's peer_name ("" for any)
    how: str
    target: float

    def row(self, rows: list[Row]) -> Row | None:
        for r in rows:
            same = r.group == self.group and r.measure == self.measure
            if same and r.peer_name.startswith(self.peer):
                return r
        return None

    def check(self, rows: list[Row]) -> tuple[str, bool | None]:
        """(the figure as the report shows it, whether the goal is met; None: no row)."""
        r = self.row(rows)
        if r is None:
            return "not measured in this run", None
        if self.how == "ahead":
            return f"{times(r.ratio)}", r.ratio >= self.target
        if self.how == "within":
            factor = 1 / r.ratio
            shown = f"{figure(r.riskbook, r.unit)} against {figure(r.peer, r.unit)} {r.unit}"
            return f"{factor:.2f}{TIMES} ({shown})", factor <= self.target
        shown = f"{figure(r.riskbook, r.unit)} {r.unit}"
        if self.how == "at_most":
            return shown, r.riskbook <= self.target
        if self.how == "at_least":
            return shown, r.riskbook >= self.target
        raise ValueError(f"unknown goal kind {self.how!r}")


_COLD = "history into Polars, cold (no cache)"
_TIMELINES = "position + account timelines (sort + fold + frames)"
_REFERENCE = "reference"

GOALS = (
    Goal(2, "bulk import within 2x of a raw COPY", "append",
         "bulk import of a .jsonl.gz, validated", "raw COPY", "within", 2.0),
    Goal(3, "5M simulated events into the store in under 2 minutes (41,667 events/s)", "simulate",
         "simulated history into the store (stream_to_store)", "", "at_least", 5_000_000 / 120),
    Goal(4, "cold load ≥ 8x faster than pandas read_sql", "load", _COLD, "pandas", "ahead", 8.0),
    Goal(4, "cold load within 1.5x of the server's own COPY", "load", _COLD, "server's own COPY",
         "within", 1.5),
    Goal(4, "warm load ≥ 20x faster than cold", "load", "history into Polars, warm",
         "riskbook's own cold load", "ahead", 20.0),
    Goal(4, "refresh of 10k events under 2% of a cold load (≥ 50x faster)", "load",
         "History.refresh() after 10,000 new events", "riskbook's own cold load", "ahead", 50.0),
    Goal(4, "cold load's peak RSS under 2x the frames' size", "load",
         "peak memory of the cold load", "", "within", 1.0),
    Goal(5, "timelines ≥ 30x faster than the reference fold", "projections", _TIMELINES,
         _REFERENCE, "ahead", 30.0),
    Goal(5, "state of all accounts at a random T in memory: median under 100 ms", "projections",
         "state of every account at a random T, in memory (median)", "", "at_most", 100.0),
    Goal(5, "state at T from snapshots ≥ 10x faster than load + replay", "projections",
         "state of every account at a random T, from PostgreSQL", "", "ahead", 10.0),
    Goal(6, "breach intervals ≥ 30x faster than the reference evaluator", "breaches",
         "breach intervals of every limit, from a loaded History", "", "ahead", 30.0),
    Goal(6, "backtest of a hypothetical limit under 5 s from a loaded History", "breaches",
         "backtest of one hypothetical limit, from a freshly loaded History", "", "at_most", 5.0),
    Goal(7, "live: ≥ 20,000 events/s sustained", "live", "sustained events/s, writer flat out",
         "", "at_least", 20_000),
    Goal(7, "live: trade → violation p99 under 50 ms at 5,000 events/s", "live",
         "trade -> violation commit p99, 5,000 events/s", "", "at_most", 50.0),
    Goal(8, "exposure explorer: slider to redrawn chart under 300 ms", "notebook",
         "exposure explorer: time slider move → redrawn chart (median)", "", "at_most", 300.0),
    Goal(10, "single appends ≥ 2x eventsourcing's", "append", "one event per append",
         "eventsourcing", "ahead", 2.0),
    Goal(10, "four writers ≥ 3x eventsourcing's", "append",
         "4 concurrent writers, one event per append", "eventsourcing", "ahead", 3.0),
    Goal(10, "the tailing reader misses 0 events", "follow",
         "4 writers + a reader tailing by position: events never seen", "", "at_most", 0.0),
)  # fmt: skip
"""The goals the issues set that the report's rows measure (the soak of issue 9 runs
apart: ``benchmarks/soak.py``)."""


def goal_lines(rows: list[Row]) -> list[str]:
    """The report's table of goals: each with this run's figure and whether it is met."""
    lines = ["| issue | goal | this run | met |", "|---:|---|---|---|"]
    for g in GOALS:
        shown, met = g.check(rows)
        mark = "—" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {g.issue} | {g.goal} | {shown} | {mark} |")
    return lines
