"""The live processors of a store, as an operator asks after them: how far each has
got, whether one is working now, and what its next start would fold."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

from riskbook.store import Store, connect

__all__ = ["processors"]

PROCESSORS_SCHEMA: dict[str, pl.DataType] = {
    "name": pl.String(),
    "checkpoint": pl.Int64(),
    "behind": pl.Int64(),
    "last_commit": pl.Datetime("us", "UTC"),
    "working": pl.Boolean(),
    "snapshot_position": pl.Int64(),
    "snapshot_bytes": pl.Int64(),
    "snapshot_at": pl.Datetime("us", "UTC"),
}

# A processor of name N holds the session advisory lock hashtextextended(LOCK_PREFIX || N,
# 0) while it works (see Processor._attach); pg_locks shows a bigint key as its high and
# low 32 bits (classid, objid) with objsubid 1.
_SQL = """
SELECT c.name, c.position, c.updated_at,
       (SELECT count(*) FROM events e WHERE e.position >= c.position),
       EXISTS (
           SELECT 1 FROM pg_locks l
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND l.classid::bigint = (k.key >> 32) & 4294967295
              AND l.objid::bigint = k.key & 4294967295)
  FROM processor_checkpoints c
 CROSS JOIN LATERAL (SELECT hashtextextended(%(prefix)s || c.name, 0) AS key) k
 ORDER BY c.name
"""


def processors(store_or_dsn: Store | str | None = None) -> pl.DataFrame:
    """Every live processor that has a checkpoint in the store, one row each:

    * ``checkpoint``: the position it goes on from (everything below it is processed);
    * ``behind``: the events stored at or after it, not processed yet;
    * ``last_commit``: when it last moved its checkpoint (UTC);
    * ``working``: a processor of this name holds its lock now (running, or waiting
      for the store);
    * ``snapshot_position``, ``snapshot_bytes``, ``snapshot_at``: the snapshot of its
      state kept on this machine (``$RISKBOOK_HOME/cache``), which its next start here
      folds on from; null if there is none.

    Raises
    ------
    StoreError
        The store cannot be read (a role that may not read the checkpoints, say).
    """
    from riskbook.frames import _cache_root, _identity
    from riskbook.live import _snapshot
    from riskbook.live._processor import LOCK_PREFIX

    owned = not isinstance(store_or_dsn, Store)
    store = store_or_dsn if isinstance(store_or_dsn, Store) else connect(store_or_dsn)
    try:
        with store.connection() as conn:  # its errors are StoreErrors, saying what to do
            rows = conn.execute(_SQL, {"prefix": LOCK_PREFIX}).fetchall()
        store_id = _identity(store)[0] if rows else None
    finally:
        if owned:
            store.close()
    out = []
    for name, position, updated_at, behind, working in rows:
        snapshot: tuple[int | None, int | None, datetime | None] = (None, None, None)
        kept = _snapshot.path_for(_cache_root(), store_id, name) if store_id else None
        head = _snapshot.header(kept) if kept is not None else None
        if kept is not None and head is not None and isinstance(head.get("horizon"), int):
            try:
                stat = kept.stat()
            except OSError:  # removed meanwhile
                pass
            else:
                when = datetime.fromtimestamp(stat.st_mtime, UTC)
                snapshot = (head["horizon"], stat.st_size, when)
        out.append((name, position, behind, updated_at, working, *snapshot))
    return pl.DataFrame(out, schema=PROCESSORS_SCHEMA, orient="row")
