"""Every shipped notebook runs top to bottom on a fresh store, and computes the right thing.

Each notebook is executed by nbclient in a real kernel (always with a finite per-cell
timeout: nbclient can stall on widget output, jupyter/nbclient#312) against a new
empty database given by RISKBOOK_DSN, so its first cell imports the sample. A cell
appended by the test then prints, as JSON, what the notebook computed, and moves its
widgets the way a user would (observers run in the kernel, as in a browser).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import psycopg
import pytest
from nbclient import NotebookClient
from psycopg import sql

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
    assert got["imported"] == 30_474  # the empty store got the sample
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
    "story": [story.cause["event_id"], story.violation["event_id"], story.findings],
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
    cause, violation, findings = got["story"]
    assert (cause, violation) == (FAT_FINGER["trigger_event_id"], FAT_FINGER["violation_event_id"])
    assert findings == []
    assert has_chart(nb) >= 2


@pytest.mark.slow
def test_limit_lab_registers_backtests_and_tunes_a_new_limit_type(
    make_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = """
import json
out = {"registered": limits.get("MaxConcentration") is MAX_CONCENTRATION, "gap": gap,
       "existing": existing.height, "found": found.height,
       "found_accounts": sorted(found["account_id"].cast(pl.String).unique()),
       "ahead": {r["limit_type"]: r["over_then"] for r in lead.iter_rows(named=True)},
       "sweep": sweep.sort("value").rows(),
       "final": final.select(pl.col("account_id").cast(pl.String), "limit_value").rows(),
       "at_150": lab.breaches.select(pl.col("account_id").cast(pl.String), "started_at").rows()}
out["at_150"] = [(a, t.isoformat()) for a, t in out["at_150"]]
steps = []
for v in (1.5, 1.2, 1.0, 0.8, 0.5):  # the slider dragged tighter, as a user would
    lab.value.value = v
    steps.append({"value": v, "breaches": lab.breaches.height,
                  "hours": lab.summary["hours_in_breach"].sum(),
                  "accounts": sorted(lab.summary.filter(pl.col("breaches") > 0)["account_id"]),
                  "lanes": sorted({r["lane"] for d in lab.timeline.chart.to_dict()["datasets"].values()
                                   for r in d if "lane" in r}),
                  "rule": lab.metric_view.params.limit, "ms": lab.step_ms})
    if v == 1.0:
        out["panel_equals_notebook"] = lab.breaches.equals(found)
out["steps"] = steps
print(json.dumps(out))
"""
    nb, got = run(
        "limit_lab.ipynb", probe, dsn=make_database(), tmp_path=tmp_path, monkeypatch=monkeypatch
    )
    assert got["registered"]  # the cell's definition is the registered one
    assert got["gap"] < 1e-6  # the metric values positions as the engine does
    assert got["existing"] == 4  # the four planted breaches of the stored limits
    assert got["found"] > 0
    assert got["found_accounts"] == ["ACC-002", "ACC-003", "ACC-006", "ACC-009"]
    assert got["ahead"] == {
        "MaxPositionSize": False,  # the fat finger: not a concentration story
        "MaxDailyVolume": False,
        "MaxDrawdown": True,  # ACC-002's CRUX conviction long
        "MaxLeverage": True,  # ACC-003's leverage creep
    }
    # tightening never lowers the time in breach nor the accounts in breach (the count of
    # breach intervals can fall: a tighter limit merges breaches)
    sweep = got["sweep"]
    assert [v for v, *_ in sweep] == sorted(v for v, *_ in sweep) and len(sweep) == 39
    for (_, _, acc_tight, hours_tight), (_, _, acc_loose, hours_loose) in itertools.pairwise(sweep):
        assert hours_tight >= hours_loose - 1e-9 and acc_tight >= acc_loose
    assert got["final"] == [["ACC-002", 1.0], ["ACC-002", 1.0], ["ACC-003", 1.5]]
    assert [a for a, _ in got["at_150"]] == ["ACC-003"]
    assert got["panel_equals_notebook"]
    steps = got["steps"]
    for looser, tighter in itertools.pairwise(steps):
        assert tighter["hours"] >= looser["hours"] - 1e-9
        assert set(looser["accounts"]) <= set(tighter["accounts"])
        assert tighter["lanes"] != looser["lanes"] or tighter["breaches"] != looser["breaches"]
    assert [s["rule"] for s in steps] == [s["value"] for s in steps]
    assert "ACC-006 · MaxConcentration" in steps[-1]["lanes"]
    assert "ACC-002 · MaxDrawdown" in steps[-1]["lanes"]  # the stored limits' beside them
    assert has_chart(nb) >= 4


@pytest.mark.slow
def test_live_monitor_blocks_the_planted_fat_finger_and_the_check_then_rejects(
    make_database: Callable[[], str],
    server_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = """
import json
with riskbook.connect() as main:
    main_events = main.count()
print(json.dumps({
    "fills": sent.height, "planted": planted.height,
    "counters": {k: monitor.counters[k] for k in ("violations", "blocks", "batches")},
    "effects": sorted([r["fill"], r["kind"], r["account_id"], r["limit_type"], r["symbol"],
                       r["value"], r["limit_value"]] for r in effects.iter_rows(named=True)),
    "table_rows": monitor.table.value.count("<tr"),
    "blocked_check": [[r.kind, r.limit_type, r.excess] for r in blocked_check.reasons],
    "too_big": [[r.kind, r.limit_type, r.excess] for r in too_big.reasons],
    "held_104": sent.filter((pl.col("account_id") == "ACC-104") & (pl.col("symbol") == "ACME"))[
        "position"][-1],
    "fine": fine.accepted,
    "unblock_by": unblocked.payload.unblocked_by, "blocked_after": blocked_now,
    "reduce": reduce.accepted, "add": [r.kind for r in add.reasons],
    "to_panel_ms": latency["to_panel_ms"].to_list(),
    "stopped": (processor.status, processor.running, writer.is_alive(), monitor._thread.is_alive()),
    "main_store_events": main_events,
}))
"""
    dsn = make_database()
    live = f"{psycopg.conninfo.conninfo_to_dict(dsn)['dbname']}_live"
    try:
        nb, got = run(
            "live_monitor.ipynb", probe, dsn=dsn, tmp_path=tmp_path, monkeypatch=monkeypatch
        )
    finally:  # the notebook's own database, beside the test's
        admin = psycopg.conninfo.make_conninfo(
            **{**psycopg.conninfo.conninfo_to_dict(server_dsn), "dbname": "postgres"}
        )
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(live))
            )
    assert got["fills"] == 400 and got["planted"] == 3
    assert got["counters"]["violations"] == 3 and got["counters"]["blocks"] == 1
    assert got["counters"]["batches"] > 1  # it followed the writer, batch by batch
    assert got["effects"] == [
        [100, "LimitViolationDetected", "ACC-102", "MaxPositionSize", "BOLT", 5600.0, 5000.0],
        [200, "LimitViolationDetected", "ACC-103", "MaxPositionSize", "ACME", 2300.0, 2000.0],
        [300, "AccountBlocked", "ACC-101", "MaxPositionSize", "CRUX", 7500.0, 5000.0],
        [300, "LimitViolationDetected", "ACC-101", "MaxPositionSize", "CRUX", 7500.0, 5000.0],
    ]
    assert got["table_rows"] == 1 + 4  # the header and the four effects
    # the blocked account is refused even for a reducing trade; the breach itself is not
    # a reason then (the sale reduces it)
    assert got["blocked_check"] == [["blocked", None, None]]
    # a buy of 6,000 over a limit of 5,000: the excess counts what is held already
    assert got["too_big"] == [["limit", "MaxPositionSize", got["held_104"] + 6_000 - 5_000]]
    assert got["fine"]
    assert got["unblock_by"] == "risk.officer" and got["blocked_after"] == []
    assert got["reduce"] and got["add"] == ["limit"]
    assert all(0 < ms < 5_000 for ms in got["to_panel_ms"])
    assert got["stopped"] == ["stopped", False, False, False]
    assert got["main_store_events"] == 0  # the store the other notebooks read is untouched
    assert has_chart(nb) >= 1


# ------------------------------------------------------- a store with a history of its own


def run_in_one_kernel(
    probes: dict[str, str], *, dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Run notebooks one after the other in one kernel (one start, one import of riskbook).

    Each gets its probe appended; returns per notebook what its cells printed and the
    probe's JSON. A cell that raises fails the test with its error (CellExecutionError).
    """
    monkeypatch.setenv("RISKBOOK_DSN", dsn)
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    client = NotebookClient(
        nbformat.v4.new_notebook(),
        timeout=CELL_TIMEOUT,
        startup_timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    with client.setup_kernel():
        for name, probe in probes.items():
            nb = nbformat.read(NOTEBOOKS / name, as_version=4)
            nb.cells.append(nbformat.v4.new_code_cell(probe))
            client.nb = nb
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
            printed = [
                "".join(
                    o.get("text", "")
                    for o in cell.get("outputs", [])
                    if o["output_type"] == "stream"
                )
                for cell in nb.cells
            ]
            out[name] = ("".join(printed[:-1]), json.loads(printed[-1].strip().splitlines()[-1]))
    return out


@pytest.mark.slow
def test_notebooks_run_on_a_store_with_a_history_of_its_own(
    make_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`riskbook demo` opens the notebooks on any store: not empty, so no sample is imported.

    One funded account, a trade and a mark: no block, no violation, no ACC-001. Every
    cell runs; where there is nothing to show, the notebook says so.
    """
    from riskbook import AccountFunded, PriceMarked, Store, TradeExecuted

    dsn = make_database()
    t = "2024-03-01T14:30:00Z"
    with Store(dsn) as store:
        store.append(
            "ACC-1",
            [
                AccountFunded(account_id="ACC-1", amount=1e6, funded_at=t),
                TradeExecuted(
                    trade_id="T-1",
                    account_id="ACC-1",
                    symbol="AAPL",
                    side="Buy",
                    quantity=100.0,
                    price=187.5,
                    executed_at=t,
                ),
            ],
        )
        store.append(
            "AAPL", [PriceMarked(symbol="AAPL", price=190.0, marked_at="2024-03-01T15:00:00Z")]
        )
    got = run_in_one_kernel(
        {
            "incident_reconstruction.ipynb": """
import json
print(json.dumps({"imported": imported is not None, "block": block, "chain": chain,
                  "panel": panel, "alarms": corrections.height}))
""",
            "exposure_explorer.ipynb": """
import json
print(json.dumps({"accounts": explorer.account_names, "hottest": hottest, "deepest": deepest,
                  "picked": explorer.picked, "at": explorer.at.value.isoformat(),
                  "positions": explorer.positions_at.height}))
""",
            "limit_lab.ipynb": """
import json
print(json.dumps({"found": found.height, "leveraged": leveraged, "final": final.height}))
""",
        },
        dsn=dsn,
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
    )
    printed, incident = got["incident_reconstruction.ipynb"]
    assert "nothing to reconstruct: this store has no AccountBlocked" in printed
    assert incident == {
        "imported": False,  # the store's own history, as it is
        "block": None,
        "chain": None,
        "panel": None,
        "alarms": 0,
    }
    printed, explorer = got["exposure_explorer.ipynb"]
    assert "this store has no AccountBlocked: showing ACC-1" in printed
    assert explorer == {
        "accounts": ["ACC-1"],
        "hottest": "ACC-1",
        "deepest": "ACC-1",
        "picked": "ACC-1",  # at its largest gross exposure: after the mark
        "at": "2024-03-01T15:00:00+00:00",
        "positions": 1,
    }
    printed, lab = got["limit_lab.ipynb"]
    assert "150% for no account" in printed
    assert lab == {"found": 0, "leveraged": [], "final": 0}


# ----------------------------------------------------------------------------- demo


def test_demo_summary_only_loads_the_sample_into_an_empty_store(
    make_database: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    from riskbook.cli import main

    dsn = make_database()
    assert main(["demo", "--summary-only", "--dsn", dsn]) == 0
    first = capsys.readouterr().out
    assert "the store is empty: importing the sample" in first and "added 30,474" in first
    assert "fat_finger" in first and "ACC-001" in first
    assert main(["demo", "--summary-only", "--dsn", dsn]) == 0
    again = capsys.readouterr().out
    assert "holds 30,474 events" in again and "importing" not in again
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
