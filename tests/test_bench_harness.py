"""The benchmark harness end to end, at a few thousand events.

``benchmarks/run_all.py --quick`` runs every benchmark but the browser one against the
test server and writes its report; every row must carry riskbook's figure, the peer's
and a ratio. The speeds themselves are not checked: that is the full run's job, on a
quiet machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"append", "follow", "load", "projections", "breaches", "live", "simulate"}

for _package in ("eventsourcing", "pandas", "connectorx"):
    pytest.importorskip(_package, reason="the bench dependency group: uv sync --group bench")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_all_quick_reports_every_row(server_dsn: str, tmp_path: Path) -> None:
    env = {**os.environ, "RISKBOOK_DSN": server_dsn}
    run = subprocess.run(
        [
            sys.executable,
            "benchmarks/run_all.py",
            "--quick",
            "--timeout",
            "300",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=570,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["machine"]["cores"] >= 1
    assert report["machine"]["memory_gib"] > 0
    assert report["machine"]["postgres_server_version"]
    failed = [s["name"] for s in report["scripts"] if not s["ok"] and "skipped" not in s]
    assert failed == []

    rows = report["rows"]
    assert GROUPS - {r["group"] for r in rows} == set()
    for r in rows:
        what = f"{r['group']}: {r['measure']} vs {r['peer_name']}"
        assert r["measure"] and r["unit"] and r["peer_name"], what
        for side in ("riskbook", "peer"):
            assert isinstance(r[side], int | float) and math.isfinite(r[side]), what
            assert r[side] >= 0, what
        if r["ratio"] is None:  # riskbook 0 where lower is better (no event missed)
            assert r["riskbook"] == 0 < r["peer"] and r["ratio_text"].startswith("∞"), what
        else:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, what
        assert r["ratio_text"], what
        for peak in ("riskbook_peak_mb", "peer_peak_mb"):
            assert r[peak] is None or r[peak] > 0, what

    md = (tmp_path / "REPORT.md").read_text()
    assert "| cores | " in md and "| PostgreSQL | " in md
    for group in GROUPS:
        assert f"\n## {group}\n" in md

    # every goal an issue sets finds its row (the browser's is not in a quick run)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _report import GOALS, row_from_dict

    got = [row_from_dict(r) for r in rows]
    unmeasured = [g.goal for g in GOALS if g.group != "notebook" and g.row(got) is None]
    assert unmeasured == []
    assert "\n## goals\n" in md and md.count("| yes |") + md.count("| **no** |") >= len(GOALS) - 1

    image = tmp_path / "benchmarks.png"
    readme = subprocess.run(
        [sys.executable, "benchmarks/readme_perf.py", "--report", str(tmp_path / "report.json"),
         "--image", str(image)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert readme.stdout.startswith("## Performance\n")
    assert "benchmarks/run_all.py" in readme.stdout
    assert image.stat().st_size > 10_000
