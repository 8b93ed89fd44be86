"""`riskbook processors`: each live processor's checkpoint, lag, lock and snapshot."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from riskbook.errors import StoreError
from riskbook.live import Processor, _processor, processors
from riskbook.live._status import PROCESSORS_SCHEMA
from riskbook.store import Store, roles
from tests.test_live import trade


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))


def test_each_processor_says_where_it_is_whether_it_works_and_its_snapshot(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    none = processors(fresh_store)
    assert none.height == 0 and none.schema == PROCESSORS_SCHEMA

    for i in range(10):  # no limits: no effects, so the counts are the events appended
        fresh_store.append("ACC-1", [trade("ACC-1", "Buy", 1.0, i)])
    monkeypatch.setattr(_processor, "_KEEP_AFTER", 0.0)  # a snapshot at its stop
    stopped = Processor(fresh_store, name="desk-a")
    stopped.catch_up()
    for i in range(10, 15):
        fresh_store.append("ACC-1", [trade("ACC-1", "Buy", 1.0, i)])

    running = Processor(fresh_store, name="desk-b", snapshots=False).start()
    try:
        deadline = time.monotonic() + 30
        while running.engine.events_seen < 15:  # its batch committed: checkpoint moved
            assert time.monotonic() < deadline and running.error is None
            time.sleep(0.02)
        rows = {r["name"]: r for r in processors(fresh_store).iter_rows(named=True)}
        a, b = rows["desk-a"], rows["desk-b"]
        assert a["checkpoint"] == stopped.engine.horizon and a["behind"] == 5
        assert a["working"] is False and b["working"] is True
        assert a["snapshot_position"] == stopped.engine.horizon and a["snapshot_bytes"] > 0
        assert a["last_commit"] is not None and a["snapshot_at"] is not None
        assert b["behind"] == 0 and b["snapshot_position"] is None
    finally:
        running.stop()
    rows = {r["name"]: r for r in processors(fresh_store).iter_rows(named=True)}
    assert rows["desk-b"]["working"] is False  # its lock let go

    out = subprocess.run(
        [sys.executable, "-m", "riskbook.cli", "processors", "--format", "json",
         "--dsn", fresh_store.dsn],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [r["name"] for r in listed] == ["desk-a", "desk-b"]
    assert listed[0]["behind"] == 5 and listed[0]["snapshot_position"] == stopped.engine.horizon


def test_a_reader_sees_the_processors_and_a_role_refused_them_gets_one_line(
    fresh_store: Store,
) -> None:
    role = f"rk_procs_{uuid.uuid4().hex[:8]}"
    reader = Store(roles.grant_reader(fresh_store, role).dsn)
    try:
        fresh_store.append("ACC-1", [trade("ACC-1", "Buy", 1.0, 0)])
        Processor(fresh_store, name="desk").catch_up()
        assert processors(reader)["name"].to_list() == ["desk"]  # an auditor sees them
        with psycopg.connect(fresh_store.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("REVOKE SELECT ON processor_checkpoints FROM {}").format(
                    sql.Identifier(role)
                )
            )
        with pytest.raises(StoreError, match="permission denied for table processor_checkpoints"):
            processors(reader)
    finally:
        reader.close()
        with psycopg.connect(fresh_store.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
