"""The exceptions riskbook raises. Nothing above ``riskbook.store`` sees a driver exception."""

from __future__ import annotations


class RiskbookError(Exception):
    """Base class of every error riskbook raises on purpose."""


class InvalidEvent(RiskbookError, ValueError):
    """An event (or an envelope) failed validation; nothing of its batch was written.

    Attributes
    ----------
    event_type : the event type that was refused (``"TradeExecuted"``, or ``"?"`` if unknown)
    field : the field that was wrong (``"quantity"``, ``"payload.side"``, ...)
    reason : what was wrong with it
    line : for imports, the 1-based line number of the bad record
    """

    def __init__(self, event_type: str, field: str, reason: str, *, line: int | None = None):
        self.event_type = event_type
        self.field = field
        self.reason = reason
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{event_type}.{field}: {reason}")

    def at_line(self, line: int) -> InvalidEvent:
        """The same error, located at a line of an import file."""
        return InvalidEvent(self.event_type, self.field, self.reason, line=line)


class ConcurrencyConflict(RiskbookError):
    """An append's ``expected_version`` was stale: another writer got there first.

    Nothing of the batch was written. ``expected`` is what the caller passed, ``actual``
    the aggregate's version when the conflict was detected.
    """

    def __init__(self, aggregate_id: str, expected: int, actual: int):
        self.aggregate_id = aggregate_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"aggregate {aggregate_id!r}: expected version {expected}, actual version {actual}"
        )


class StoreError(RiskbookError):
    """The database refused an operation, or could not be reached."""


class ImportFailed(StoreError):
    """An import was refused as a whole; nothing of its file was written."""


class EmbeddedServerError(StoreError):
    """The embedded PostgreSQL server could not be started, attached to or stopped."""
