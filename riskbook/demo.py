"""``riskbook demo``: load the sample history and show what riskbook knows about it.

The main job on the embedded default: start (or attach to) the private PostgreSQL,
import the bundled sample (idempotent: a second run adds nothing), then tell the story
an auditor would ask for first -- what is in the store, and for every block the engine
recorded, which event caused it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from riskbook.store import Store, connect, redact

__all__ = ["SAMPLE", "run"]

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample.jsonl.gz"


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

    out = Path.home() / ".riskbook" / "sample.jsonl.gz"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _say(f"generating the sample history into {out} ...")
        simulate.write_jsonl(simulate.generate(**simulate.SAMPLE_PARAMS), out)
    return out


def _answer_key(sample: Path) -> dict[str, Any] | None:
    name = sample.name
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            key = sample.with_name(name[: -len(suffix)] + ".key.json")
            if key.exists():
                return json.loads(key.read_text())
    return None


def run(*, dsn: str | None = None, sample: Path | None = None) -> int:
    started = time.perf_counter()
    store = connect(dsn)
    _say(f"riskbook store: {redact(store.dsn)}")
    path = _sample_file(sample)
    _say(f"importing {path} ...")
    result = store.import_jsonl(path)
    _say(f"  {result}")
    _overview(store)
    _blocks(store)
    key = _answer_key(path)
    if key:
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
    _say(
        f"\ndone in {time.perf_counter() - started:.1f} s. Next: `riskbook db url` for psql, or the notebooks in notebooks/."
    )
    store.close()
    return 0


def _overview(store: Store) -> None:
    with store.connection() as conn:
        by_type = conn.execute(
            "SELECT event_type, count(*), count(DISTINCT aggregate_id),"
            ' min("timestamp")::date, max("timestamp")::date'
            " FROM events GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
    _say("\nWhat the store holds:")
    _say(
        _table(
            [tuple(r) for r in by_type],
            ("event type", "events", "aggregates", "first recorded", "last recorded"),
        )
    )


def _blocks(store: Store) -> None:
    """Every AccountBlocked with the event that caused it (through causation_id)."""
    with store.connection() as conn:
        rows = conn.execute(
            """
            SELECT b.aggregate_id, b.payload->>'blocked_at', b.payload->>'reason',
                   c.event_type, c.payload->>'limit_type', c.payload->>'current_value',
                   c.payload->>'limit_value', t.event_type, t.payload->>'trade_id'
              FROM events b
              LEFT JOIN events c ON c.event_id = b.causation_id
              LEFT JOIN events t ON t.event_id = c.causation_id
             WHERE b.event_type = 'AccountBlocked'
             ORDER BY b.position
            """
        ).fetchall()
    if not rows:
        return
    _say("\nBlocks the engine recorded, and what caused them (causation chain):")
    out = []
    for acc, at, reason, cause_type, limit, current, limit_value, trigger_type, trade in rows:
        chain = cause_type or "?"
        if limit:
            chain += f" {limit} {float(current):,.2f} > {float(limit_value):,.2f}"
        if trigger_type:
            chain += f" <- {trigger_type} {trade or ''}".rstrip()
        out.append((acc, at, reason, chain))
    _say(_table(out, ("account", "blocked at", "reason", "caused by")))


if __name__ == "__main__":
    sys.exit(run())
