"""``riskbook demo``: load the sample history, show what riskbook knows, open the notebooks.

The main job on the embedded default: start (or attach to) the private PostgreSQL,
import the bundled sample when the store is empty, tell the story an auditor would ask
for first -- what is in the store, and for every block the engine recorded, which event
caused it -- then open JupyterLab on the notebooks (``--summary-only`` stops after the
summary; ``--no-browser`` prints the notebooks' URL instead of opening a browser).

The notebooks open on the same store with :func:`open_sample`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from riskbook._home import make_private_dirs, riskbook_home
from riskbook.events import STORED_INFINITY
from riskbook.store import ImportResult, Store, connect
from riskbook.store.eventstore import where

__all__ = ["NOTEBOOKS", "SAMPLE", "lab_command", "lab_env", "open_sample", "run"]

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample.jsonl.gz"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FIRST_NOTEBOOK = "exposure_explorer.ipynb"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _table(rows: list[tuple[Any, ...]], headers: tuple[str, ...]) -> str:
    cells = [headers, *[tuple("" if v is None else str(v) for v in r) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                v.rjust(w) if n and v[:1].isdigit() else v.ljust(w)
                for v, w in zip(row, widths, strict=True)
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)


def _sample_file(sample: Path | None) -> Path:
    if sample is not None:
        return sample
    if SAMPLE.exists():
        return SAMPLE
    # Installed without the repository's data/: make the same sample on the fly.
    from riskbook import simulate

    out = riskbook_home() / "sample.jsonl.gz"
    if not out.exists():
        make_private_dirs(out.parent)
        _say(f"generating the sample history into {out} ...")
        # Made aside and moved in, key first: an interrupted run or a second demo at the
        # same time never leaves a half-written sample where the next run would use it.
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sample-") as tmp:
            made = Path(tmp) / out.name
            key = simulate.write_jsonl(simulate.generate(**simulate.SAMPLE_PARAMS), made)
            os.replace(key, simulate.key_path(out))
            os.replace(made, out)
    return out


def _answer_key(sample: Path) -> dict[str, Any] | None:
    name = sample.name
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            key = sample.with_name(name[: -len(suffix)] + ".key.json")
            if key.exists():
                return json.loads(key.read_text())
    return None


def open_sample(
    dsn: str | None = None, *, sample: Path | None = None
) -> tuple[Store, ImportResult | None]:
    """The store (``dsn``, ``RISKBOOK_DSN`` or the embedded server), with the sample in it.

    The sample history is imported only when the store holds no event at all, so a
    store with a history of its own is shown as it is. Returns the store and the
    import's result (None when nothing was imported).
    """
    store = connect(dsn)
    if store.head() > 0:
        return store, None
    return store, store.import_jsonl(_sample_file(sample))


def run(
    *,
    dsn: str | None = None,
    sample: Path | None = None,
    lab: bool = False,
    browser: bool = True,
    port: int | None = None,
) -> int:
    """The demo: summary of the store (the sample imported if empty), then JupyterLab.

    Parameters
    ----------
    dsn : the store (default ``RISKBOOK_DSN``, else the embedded server).
    sample : a history to import (idempotent) instead of the bundled sample, which is
        only imported into an empty store.
    lab : open JupyterLab on the notebooks after the summary (blocks until it stops).
    browser : let JupyterLab open a browser; else print the URL only.
    port : JupyterLab's port (default: the first free one from 8888).
    """
    started = time.perf_counter()
    store = connect(dsn)
    _say(f"riskbook store: {where(store.dsn)}")
    if sample is not None:
        path: Path | None = sample
        _say(f"importing {sample} ...")
        _say(f"  {store.import_jsonl(sample)}")
    elif store.head() == 0:
        path = _sample_file(None)
        _say(f"the store is empty: importing the sample {path} ...")
        _say(f"  {store.import_jsonl(path)}")
    else:
        path = _sample_file(None)
        _say(
            f"the store holds {store.count():,} events (the sample is imported only into an empty store)"
        )
    _overview(store)
    _blocks(store)
    key = _answer_key(path) if path is not None else None
    if key and _holds(store, key):
        _say("\nIncidents planted in the sample (its answer key):")
        rows = [
            (
                i.get("kind"),
                i.get("account_id"),
                i.get("limit_type"),
                i.get("symbol"),
                i.get("breach_started_at") or i.get("started_at"),
            )
            for i in key.get("incidents", [])
        ]
        _say(
            _table(
                rows, ("incident", "account", "limit", "symbol", "breach starts (business time)")
            )
        )
    _say(f"\ndone in {time.perf_counter() - started:.1f} s.")
    if not lab:
        _say(
            "Next: `riskbook demo` opens the notebooks in JupyterLab; `riskbook incidents`"
            " lists every alarm and `riskbook explain EVENT_ID` reconstructs one;"
            " `riskbook db url` for psql."
        )
        store.close()
        return 0
    store_dsn = store.dsn
    store.close()
    return _lab(store_dsn if dsn else None, browser=browser, port=port)


def _holds(store: Store, key: dict[str, Any]) -> bool:
    """Does the store hold the answer key's history (its first trigger event)?"""
    ids = [i["trigger_event_id"] for i in key.get("incidents", []) if i.get("trigger_event_id")]
    if not ids:
        return False
    with store.connection() as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE event_id = %s", (ids[0],)).fetchone()
    return bool(row and row[0])


def _free_port(first: int = 8888, tries: int = 50) -> int:
    for port in range(first, first + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {first}..{first + tries - 1}")


def lab_command(*, port: int, token: str, browser: bool, notebooks: Path = NOTEBOOKS) -> list[str]:
    """The ``jupyter lab`` command line the demo runs (served on 127.0.0.1 only).

    As root, JupyterLab refuses to start without ``--allow-root``; it is added then.
    """
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={notebooks}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        "--ServerApp.log_level=WARN",
        f"--LabApp.default_url=/lab/tree/{FIRST_NOTEBOOK}",
    ]
    if not browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd


def lab_env(dsn: str | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of JupyterLab and its kernels: the store the demo used.

    The kernels run in the notebooks' folder, so a relative ``RISKBOOK_HOME`` or
    ``RISKBOOK_CACHE`` would name other folders there (and start a second server): both
    go to the children resolved, as this process sees them.
    """
    env = dict(os.environ if environ is None else environ)
    if dsn:
        env["RISKBOOK_DSN"] = dsn
    if env.get("RISKBOOK_HOME"):
        env["RISKBOOK_HOME"] = str(Path(env["RISKBOOK_HOME"]).expanduser().resolve())
    if env.get("RISKBOOK_CACHE"):
        env["RISKBOOK_CACHE"] = str(Path(env["RISKBOOK_CACHE"]).expanduser().resolve())
    return env


def _lab(dsn: str | None, *, browser: bool, port: int | None) -> int:
    if not (NOTEBOOKS / FIRST_NOTEBOOK).exists():
        _say(f"no notebooks at {NOTEBOOKS} (riskbook was installed without them)")
        return 1
    port = port or _free_port()
    token = secrets.token_hex(16)
    env = lab_env(dsn)
    url = f"http://127.0.0.1:{port}/lab/tree/{FIRST_NOTEBOOK}?token={token}"
    _say(
        f"\nJupyterLab on the notebooks in {NOTEBOOKS}:\n  {url}\n"
        "Run each notebook with Run > Run All Cells. Stop with Ctrl-C."
    )
    proc = subprocess.Popen(lab_command(port=port, token=token, browser=browser), env=env)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop ends JupyterLab too
    signal.signal(signal.SIGINT, stop)  # even where SIGINT was inherited as ignored
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0


def _overview(store: Store) -> None:
    with store.connection() as conn:
        by_type = conn.execute(
            "SELECT event_type, count(*), count(DISTINCT aggregate_id),"
            " (min(\"timestamp\") AT TIME ZONE 'UTC')::date,"
            " (max(\"timestamp\") AT TIME ZONE 'UTC')::date"
            " FROM events GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
    _say("\nWhat the store holds:")
    _say(
        _table(
            [tuple(r) for r in by_type],
            ("event type", "events", "aggregates", "first recorded", "last recorded"),
        )
    )


_BLOCKS_SQL = """
SELECT b.aggregate_id, b.payload->>'blocked_at', b.payload->>'reason',
       b.causation_id::text, c.event_type, c.payload::text, v.payload::text
  FROM events b
  LEFT JOIN events c ON c.event_id = b.causation_id
  LEFT JOIN LATERAL (
        -- the violation the same event caused on the same account, the blocked limit first
        SELECT v.payload
          FROM events v
         WHERE v.causation_id = b.causation_id
           AND v.aggregate_id = b.aggregate_id
           AND v.event_type = 'LimitViolationDetected'
         ORDER BY starts_with(b.payload->>'reason', 'critical ' || (v.payload->>'limit_type')
                              || coalesce(' ' || (v.payload->>'symbol'), '') || ':') DESC,
                  v.position
         LIMIT 1
       ) v ON true
 WHERE b.event_type = 'AccountBlocked'
 ORDER BY b.position
"""


def _number(raw: Any) -> str:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return "?" if raw is None else str(raw)
    if value >= STORED_INFINITY:
        return "infinite"
    return f"{value:,.2f}"


def _quantity(raw: Any) -> str:
    try:
        return f"{float(raw):,g}"
    except (TypeError, ValueError):
        return str(raw)


def _describe_cause(
    event_type: str | None, payload: dict[str, Any] | None, cause_id: str | None
) -> str:
    """The triggering event: its type and what identifies it (trade, mark, limit, ...)."""
    if event_type is None:  # no causation recorded, or the event is not in this store
        return f"? (event {cause_id} not in the store)" if cause_id else "?"
    p = payload or {}

    def words(*keys: str) -> str:
        return " ".join(str(p[k]) for k in keys if p.get(k) not in (None, ""))

    if event_type in ("TradeExecuted", "TradeCancelled"):
        detail = words("trade_id")
        if event_type == "TradeExecuted":
            fill = words("symbol", "side")
            if p.get("quantity") is not None:
                fill += f" {_quantity(p['quantity'])}"
            if p.get("price") is not None:
                fill += f" @ {_number(p['price'])}"
            detail += f" ({fill})" if fill else ""
    elif event_type == "PriceMarked":
        detail = words("symbol")
        if p.get("price") is not None:
            detail += f" @ {_number(p['price'])}"
    elif event_type == "LimitSet":
        detail = words("limit_type", "symbol")
        if p.get("value") is not None:
            detail += f" = {_number(p['value'])}"
    elif event_type == "PositionUpdated":
        detail = words("symbol")
        if p.get("new_quantity") is not None:
            detail += f" to {_quantity(p['new_quantity'])}"
    elif event_type == "AccountFunded":
        detail = _number(p.get("amount"))
    else:
        detail = cause_id or ""
    return f"{event_type} {detail}".rstrip()


def _json_object(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


def _describe_violation(payload: dict[str, Any]) -> str:
    where = f" {payload['symbol']}" if payload.get("symbol") else ""
    return (
        f"{payload.get('limit_type', '?')}{where} "
        f"{_number(payload.get('current_value'))} > {_number(payload.get('limit_value'))}"
    )


def _blocks(store: Store) -> None:
    """Every AccountBlocked with the event that caused it (its ``causation_id``).

    The processor records the triggering event itself (a trade, a mark, a limit change,
    a bust, ...) as the cause of both the violation and the block; the values come from
    the violation that event caused on the same account, when there is one (a breach
    that started earlier and became critical later has none of its own).
    """
    with store.connection() as conn:
        rows = conn.execute(_BLOCKS_SQL).fetchall()
    if not rows:
        return
    _say("\nBlocks the engine recorded, and what caused them (causation chain):")
    out = []
    for acc, at, reason, cause_id, cause_type, cause_text, violation_text in rows:
        cause = _json_object(cause_text)
        violation = _json_object(violation_text)
        if cause_type == "LimitViolationDetected" and violation is None:
            # a block recorded as caused by the violation itself: describe the violation
            chain = f"{cause_type} {_describe_violation(cause or {})}"
        else:
            chain = _describe_cause(cause_type, cause, cause_id)
            if violation is not None:
                chain += f": {_describe_violation(violation)}"
        out.append((acc, at, reason, chain))
    _say(_table(out, ("account", "blocked at", "reason", "caused by")))


if __name__ == "__main__":
    sys.exit(run())
