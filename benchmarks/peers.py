"""The peer of the append and follow benchmarks: the ``eventsourcing`` library (PyPI).

Used as its documentation shows: an :class:`~eventsourcing.application.Application`
on ``eventsourcing.postgres`` (psycopg 3, on the same server and database as riskbook's
store), whose aggregate records one ``TradeExecuted`` event per trade -- the same
fields riskbook stores -- and saves them with ``app.save``. Everything in order is
read from its notification log (``recorder.select_notifications``, each decoded back
into its domain event, as riskbook's ``read_all`` decodes into envelopes), and tailed
with the library's own LISTEN/NOTIFY subscription (``recorder.subscribe``).

By default it takes ``LOCK TABLE ... IN EXCLUSIVE MODE`` around every insert, so that
a reader tailing the log by notification id never skips a slower transaction's events;
``lock=False`` turns that off (its insert function without the lock), which is faster
with several writers, and lets such a reader miss events.

Each side of the benchmark is a small class with the same methods (``stream``,
``append``, ``read_all``, ``tail``, ``ids_after``): :class:`Eventsourcing` here, and
``RiskbookSide`` in ``append.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from psycopg import sql


class Account(Aggregate):
    """An account whose events are trades (no state kept: the benchmark is storage)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @event("TradeExecuted")
    def trade_executed(
        self,
        trade_id: str,
        account_id: str,
        symbol: str,
        side: str,
        quantity: float,
        price: float,
        executed_at: datetime,
    ) -> None:
        pass


class TradingBook(Application):  # type: ignore[type-arg]
    """The application: its events go to the table ``tradingbook_events``."""


def environment(dsn: str, *, create_table: bool = True, pool_size: int = 2) -> dict[str, str]:
    """The library's settings (it reads them from the environment) for ``dsn``."""
    p = psycopg.conninfo.conninfo_to_dict(dsn)
    return {
        "CREATE_TABLE": "yes" if create_table else "no",
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(p["dbname"]),
        "POSTGRES_HOST": str(p.get("host") or "localhost"),
        "POSTGRES_PORT": str(p.get("port") or 5432),
        "POSTGRES_USER": str(p.get("user") or "postgres"),
        "POSTGRES_PASSWORD": str(p.get("password") or ""),
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": "2",
    }


def trade_fields(trade: Any) -> dict[str, Any]:
    """The fields of a riskbook ``TradeExecuted`` as the peer's event takes them."""
    return {
        "trade_id": trade.trade_id,
        "account_id": trade.account_id,
        "symbol": trade.symbol,
        "side": str(trade.side.value),
        "quantity": trade.quantity,
        "price": trade.price,
        "executed_at": trade.executed_at,
    }


class Eventsourcing:
    """The eventsourcing side: one application on ``dsn``, with or without its lock."""

    def __init__(self, dsn: str, *, lock: bool = True, create_table: bool = True) -> None:
        self.name = "eventsourcing" if lock else "eventsourcing, table lock off"
        self.dsn = dsn
        # create_table=False where several processes start at once: the library's
        # CREATE ... IF NOT EXISTS statements are not safe to run concurrently
        self.app = TradingBook(env=environment(dsn, create_table=create_table))
        if not lock:
            self.app.recorder.lock_table_statements = []  # type: ignore[attr-defined]
        self.table = self.app.recorder.events_table_name  # type: ignore[attr-defined]

    def close(self) -> None:
        self.app.close()

    def stream(self, name: str) -> Account:
        """A new account, saved (its creation event is not part of any timing)."""
        account = Account(name)
        self.app.save(account)
        return account

    def append(self, stream: Account, trades: Sequence[Any]) -> None:
        """All ``trades`` to ``stream`` in one save (one transaction)."""
        for t in trades:
            stream.trade_executed(**trade_fields(t))
        self.app.save(stream)

    def read_all(self, batch_size: int = 10_000) -> int:
        """Every event in notification order, decoded; returns how many."""
        recorder, mapper = self.app.recorder, self.app.mapper
        last, n = 0, 0
        while True:
            batch = recorder.select_notifications(
                start=last, limit=batch_size, inclusive_of_start=False
            )
            for note in batch:
                mapper.to_domain_event(note)
            n += len(batch)
            if len(batch) < batch_size:
                return n
            last = batch[-1].id

    def head(self) -> int:
        return int(self.app.recorder.max_notification_id() or 0)

    def tail(self, after: int, seen: list[int], stop: threading.Event) -> None:
        """Append every notification id after ``after`` to ``seen`` as the library's
        subscription delivers them, until ``stop`` is set."""
        with self.app.recorder.subscribe(gt=after) as subscription:
            watchdog = threading.Thread(target=_stop_on, args=(stop, subscription), daemon=True)
            watchdog.start()
            for note in subscription:
                seen.append(note.id)
            watchdog.join()

    def ids_after(self, after: int) -> list[int]:
        """Every notification id after ``after`` committed in the table now."""
        with psycopg.connect(self.dsn) as conn:
            query = sql.SQL("SELECT notification_id FROM {} WHERE notification_id > %s").format(
                sql.Identifier(self.table)
            )
            return [r[0] for r in conn.execute(query, (after,))]


def _stop_on(stop: threading.Event, subscription: Any) -> None:
    stop.wait()
    subscription.stop()
