"""The README's performance section, made from a run_all report: a table and one chart.

    uv run python benchmarks/readme_perf.py                      # benchmarks/report.json
    uv run python benchmarks/readme_perf.py --report other.json --image /tmp/perf.png

Prints the Markdown section (paste it over the README's "## Performance") and draws
the chart -- every row's ratio, with :func:`riskbook.viz.ratio_chart` -- as a PNG
(default ``docs/images/benchmarks.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import GROUPS, Row, figure, goal_lines, megabytes, row_from_dict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGE = ROOT / "docs" / "images" / "benchmarks.png"


def in_order(rows: list[Row]) -> list[Row]:
    """Rows grouped, groups in the report's order, rows as the scripts wrote them."""
    rank = {g: i for i, g in enumerate(GROUPS)}
    return sorted(rows, key=lambda r: rank.get(r.group, len(rank)))


def label(row: Row, width: int = 80) -> str:
    text = f"{row.measure} vs {row.peer_name}"
    return text if len(text) <= width else text[: width - 1] + "…"


def chart_frame(rows: list[Row]) -> Any:
    """One row per report row: label, group, ratio (an infinite one capped) and its text."""
    import polars as pl

    finite = [r.ratio for r in rows if math.isfinite(r.ratio)]
    cap = max([10.0, *finite]) * 2

    def text(r: Row) -> str:
        if math.isfinite(r.ratio):
            return r.ratio_text
        return f"{r.ratio_text} ({figure(r.riskbook, r.unit)} vs {figure(r.peer, r.unit)})"

    return pl.DataFrame(
        {
            "label": [label(r) for r in rows],
            "group": [r.group for r in rows],
            "ratio": [r.ratio if math.isfinite(r.ratio) else cap for r in rows],
            "ratio_text": [text(r) for r in rows],
        }
    )


def draw(report: dict[str, Any], rows: list[Row], path: Path) -> Path:
    from riskbook import viz

    m = report["machine"]
    chart = viz.ratio_chart(
        chart_frame(rows),
        title="riskbook against what you would use instead (same run, same PostgreSQL)",
        subtitle=f"about {report['events']:,} events; {m['cores']} cores, {m['memory_gib']} GiB,"
        f" PostgreSQL {m['postgres_server_version']}; right of 1: riskbook ahead",
    )
    return viz.save_png(chart.configure_axisX(grid=False), path, scale=1.5)


def section(report: dict[str, Any], rows: list[Row], image: str) -> str:
    """The Markdown of the README's performance section."""
    m = report["machine"]
    minutes = report["wall_seconds"] / 60
    lines = [
        "## Performance",
        "",
        "Every figure below is riskbook beside what you would use instead (or, marked"
        " *floor*, the least the server itself needs), measured in the same run on the same"
        " PostgreSQL server, by one command:",
        "",
        "```bash",
        "uv sync --group bench",
        f"uv run --group bench python benchmarks/run_all.py --events {report['events']}",
        "```",
        "",
        f"It took {minutes:.0f} minutes here (the default, `--events 300000`, about ten)"
        " and writes [benchmarks/REPORT.md](benchmarks/REPORT.md), with every row, the peak"
        " memory of each side as the OS counted it and the machine, and the raw numbers in"
        " `benchmarks/report.json`; this section and its chart are made from that file by"
        " `uv run python benchmarks/readme_perf.py`.",
        "",
        f"This run: {report['started'][:10]}, {m['cores']} cores ({m['cpu']}),"
        f" {m['memory_gib']} GiB, PostgreSQL {m['postgres_server_version']}"
        f" ({m['postgres']}, fsync {m['postgres_fsync']}), about {report['events']:,} events;"
        f" load average {report['load_before'][0]:.1f} before and"
        f" {report['load_after'][0]:.1f} after (read the ratios, not single times). The"
        " ratio is riskbook / peer, or peer / riskbook where lower is better: above 1,"
        " riskbook is ahead.",
        "",
        f"![riskbook against the alternatives: ratios]({image})",
        "",
        "| | measure | riskbook | instead | its figure | ratio | peak MiB |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    group = None
    for r in rows:
        peaks = ""
        if r.riskbook_peak_mb is not None or r.peer_peak_mb is not None:
            peaks = f"{megabytes(r.riskbook_peak_mb)} / {megabytes(r.peer_peak_mb)}"
        lines.append(
            f"| {'**' + r.group + '**' if r.group != group else ''} | {r.measure} ({r.unit}) |"
            f" {figure(r.riskbook, r.unit)} | {r.peer_name} | {figure(r.peer, r.unit)} |"
            f" {r.ratio_text} | {peaks} |"
        )
        group = r.group
    lines += [
        "",
        "Peak MiB: riskbook / the peer, each measured in a process of its own.",
        "",
        "The goals the issues set, each checked against its row of this same run:",
        "",
        *goal_lines(rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--report", type=Path, default=HERE / "report.json")
    ap.add_argument("--image", type=Path, default=IMAGE, help="where to write the chart (PNG)")
    ap.add_argument("--no-image", action="store_true", help="print the section only")
    args = ap.parse_args(argv)

    report = json.loads(args.report.read_text())
    rows = in_order([row_from_dict(d) for d in report["rows"]])
    if not args.no_image:
        path = draw(report, rows, args.image)
        print(f"chart: {path}", file=sys.stderr)
    image = args.image.resolve()
    shown = str(image.relative_to(ROOT)) if image.is_relative_to(ROOT) else str(image)
    print(section(report, rows, shown), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
