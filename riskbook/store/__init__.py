"""PostgreSQL: schema and migrations, append / read / follow / import, the embedded server."""

from __future__ import annotations

from riskbook.store.eventstore import (
    Append,
    ImportResult,
    Store,
    TransientStoreError,
    connect,
    redact,
)

__all__ = ["Append", "ImportResult", "Store", "TransientStoreError", "connect", "redact"]
