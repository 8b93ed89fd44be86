"""PostgreSQL: schema and migrations, append / read / follow / import, the embedded server."""

from __future__ import annotations

from riskbook.store.eventstore import Append, ImportResult, Store, connect, redact

__all__ = ["Append", "ImportResult", "Store", "connect", "redact"]
