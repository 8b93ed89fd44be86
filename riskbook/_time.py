"""Times as riskbook's kernels hold them: microseconds since the Unix epoch, UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["EPOCH", "us"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


def us(t: datetime) -> int:
    """``t`` (timezone-aware) as microseconds since the epoch."""
    return (t - EPOCH) // _ONE_US
