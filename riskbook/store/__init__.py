"""PostgreSQL: schema and migrations, append / read / follow / import, the embedded server."""

from __future__ import annotations

from riskbook.store.eventstore import ImportResult, Store, connect, redact

__all__ = ["ImportResult", "Store", "connect", "redact"]
