"""Every shipped notebook runs top to bottom on a fresh store, and computes the right thing.

Each notebook is executed by nbclient in a real kernel (always with a finite per-cell
timeout: nbclient can stall on widget output, jupyter/nbclient#312) against a new
empty database given by RISKBOOK_DSN, so its first cell imports the sample. A cell
appended by the test then prints, as JSON, what the notebook computed, and moves its
widgets the way a user would (observers run in the kernel, as in a browser).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from riskbook.demo import NOTEBOOKS, SAMPLE

KEY = json.loads(SAMPLE.with_name("sample.key.json").read_text())
FAT_FINGER = next(i for i in KEY["incidents"] if i["kind"] == "fat_finger")
CELL_TIMEOUT = 120


def run(
    name: str, probe: str, *, dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[nbformat.NotebookNode, dict[str, Any]]:
    monkeypatch.setenv("RISKBOOK_DSN", dsn)
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        startup_timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{name}: {out.get('ename')}: {out.get('evalue')}"
    text = "".join(
        o.get("text", "") for o in nb.cells[-1]["outputs"] if o["output_type"] == "stream"
    )
    return nb, json.loads(text.strip().splitlines()[-1])


def has_chart(nb: nbformat.NotebookNode) -> int:
    return sum(
        1
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in out.get("data", {})
    )


@pytest.mark.slow
def test_exposure_explorer_runs_and_its_slider_moves_the_state(
    make_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = """
import json
from datetime import datetime, timedelta, timezone
out = {"imported": imported.added if imported else None, "hottest": hottest, "deepest": deepest,
       "accounts": now.height, "acme_at_1630": dict(explorer.positions_at.select(
           pl.col("symbol").cast(pl.String), "quantity").iter_rows())["ACME"]}
bars_before = explorer.snapshot.chart.to_dict()["datasets"]
explorer.at.value = datetime(2024, 1, 9, 17, 0, tzinfo=timezone.utc)   # after the unwind
out["acme_at_1700"] = dict(explorer.positions_at.select(
    pl.col("symbol").cast(pl.String), "quantity").iter_rows()).get("ACME")
out["bars_changed"] = explorer.snapshot.chart.to_dict()["datasets"] != bars_before
out["rule_at"] = explorer.overview.params.at
print(json.dumps(out))
"""
    nb, got = run(
        "exposure_explorer.ipynb",
        probe,
        dsn=make_database(),
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
    )
    assert got["imported"] == 30_472  # the empty store got the sample
    assert got["accounts"] == 12
    assert got["hottest"] == "ACC-003"  # the leverage creep of the answer key
    assert got["deepest"] == "ACC-002"  # the drawdown spiral
    assert got["acme_at_1630"] == FAT_FINGER["value_at_trigger"]
    assert abs(got["acme_at_1700"]) < FAT_FINGER["limit_value"] and got["bars_changed"]
    assert got["rule_at"] == pytest.approx(1704819600000)
    assert has_chart(nb) >= 4


@pytest.mark.slow
def test_incident_reconstruction_finds_the_fat_finger_block(
    make_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = """
import json
bust = corrections.filter(~pl.col("still_a_breach")).row(0, named=True)
print(json.dumps({
    "block": block["event_id"], "account": block["account_id"], "cause": trigger["event_id"],
    "chain": dict(zip(chain["event_id"], chain["relation"])),
    "limit": limit["value"], "set_by": limit["set_by"], "limit_event": limit["event_id"],
    "held": held, "before": before, "after": after,
    "alarms": corrections.height, "bust_account": bust["account_id"],
    "bust_engine": bust["engine_saw"],
    "panel_incident": panel.current["event_id"], "panel_step": panel.step_event["event_id"],
}))
"""
    nb, got = run(
        "incident_reconstruction.ipynb",
        probe,
        dsn=make_database(),
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
    )
    assert got["block"] == FAT_FINGER["block_event_id"] and got["account"] == "ACC-001"
    assert got["cause"] == FAT_FINGER["trigger_event_id"]
    assert got["chain"][FAT_FINGER["unblock_event_id"]] == "effect"
    assert got["limit"] == FAT_FINGER["limit_value"] and got["set_by"] == FAT_FINGER["limit_set_by"]
    assert got["limit_event"] == FAT_FINGER["limit_event_id"]
    assert got["held"] == got["after"] == FAT_FINGER["value_at_trigger"]
    assert got["before"] < FAT_FINGER["limit_value"]
    busted = next(i for i in KEY["incidents"] if i["kind"] == "busted_trade")
    assert got["alarms"] == 5
    assert (got["bust_account"], got["bust_engine"]) == ("ACC-005", busted["value_at_trigger"])
    assert got["panel_incident"] == FAT_FINGER["block_event_id"]
    assert got["panel_step"] == FAT_FINGER["trigger_event_id"]
    assert has_chart(nb) >= 2


# ----------------------------------------------------------------------------- demo


def test_demo_summary_only_loads_the_sample_into_an_empty_store(
    make_database: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    from riskbook.cli import main

    dsn = make_database()
    assert main(["demo", "--summary-only", "--dsn", dsn]) == 0
    first = capsys.readouterr().out
    assert "the store is empty: importing the sample" in first and "added 30,472" in first
    assert "fat_finger" in first and "ACC-001" in first
    assert main(["demo", "--summary-only", "--dsn", dsn]) == 0
    again = capsys.readouterr().out
    assert "holds 30,472 events" in again and "importing" not in again
    assert "fat_finger" in again  # the store holds the sample: its key is shown


def test_demo_opens_jupyterlab_on_the_notebooks(make_database: Callable[[], str]) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    dsn = make_database()
    proc = subprocess.Popen(
        [sys.executable, "-m", "riskbook.cli", "demo", "--no-browser", "--port", "0", "--dsn", dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"},
    )
    try:
        assert proc.stdout is not None
        url = ""
        deadline = time.monotonic() + 60
        while not url and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if line.strip().startswith("http://127.0.0.1:"):
                url = line.strip()
        assert "/lab/tree/exposure_explorer.ipynb?token=" in url
        base, token = url.split("/lab/")[0], url.split("token=")[1]
        for _ in range(100):  # JupyterLab starts after the URL is printed
            try:
                with urllib.request.urlopen(f"{base}/api/contents?token={token}", timeout=2) as r:
                    listing = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("JupyterLab did not answer")
        names = {item["name"] for item in listing["content"]}
        assert {"exposure_explorer.ipynb", "incident_reconstruction.ipynb"} <= names
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0  # stopped, with its JupyterLab, by the signal
