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
