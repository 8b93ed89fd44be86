"""riskbook: event-sourced trading risk for people who work in notebooks.

Every fact about an account is an immutable event in PostgreSQL; riskbook loads that
history into Polars, computes positions, exposure, limit breaches and point-in-time
state, and runs the same rules live. See README.md and DESIGN.md.
"""

from __future__ import annotations

from riskbook.errors import (
    ConcurrencyConflict,
    EmbeddedServerError,
    ImportFailed,
    InvalidEvent,
    RiskbookError,
    StoreError,
)
from riskbook.events import (
    AccountBlocked,
    AccountFunded,
    AccountUnblocked,
    Envelope,
    Event,
    LimitSet,
    LimitType,
    LimitViolationDetected,
    PositionUpdated,
    PriceMarked,
    RawEvent,
    Side,
    TradeCancelled,
    TradeExecuted,
)
from riskbook.frames import Filters, History, load
from riskbook.limits import backtest, breaches, effective_limits, limit_history, reconcile
from riskbook.live import CheckResult, Processor, check, unblock
from riskbook.projections import (
    account_timeline,
    accounts,
    adjustment_mismatches,
    marks,
    position_timeline,
    positions,
    state_at,
)
from riskbook.store import ImportResult, Store, connect
from riskbook.verify import Heads, VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "AccountBlocked",
    "AccountFunded",
    "AccountUnblocked",
    "CheckResult",
    "ConcurrencyConflict",
    "EmbeddedServerError",
    "Envelope",
    "Event",
    "Filters",
    "Heads",
    "History",
    "ImportFailed",
    "ImportResult",
    "InvalidEvent",
    "LimitSet",
    "LimitType",
    "LimitViolationDetected",
    "PositionUpdated",
    "PriceMarked",
    "Processor",
    "RawEvent",
    "RiskbookError",
    "Side",
    "Store",
    "StoreError",
    "TradeCancelled",
    "TradeExecuted",
    "VerifyReport",
    "__version__",
    "account_timeline",
    "accounts",
    "adjustment_mismatches",
    "backtest",
    "breaches",
    "check",
    "connect",
    "effective_limits",
    "limit_history",
    "load",
    "marks",
    "position_timeline",
    "positions",
    "reconcile",
    "state_at",
    "unblock",
    "verify",
]
