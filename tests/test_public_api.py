"""The public surface: ``__all__`` is complete and every name in it exists; docs run."""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

import riskbook
from riskbook import projections
from riskbook.store import Store

MODULES = [
    "riskbook",
    "riskbook.events",
    "riskbook.store",
    "riskbook.store.embedded",
    "riskbook.errors",
    "riskbook.audit",
    "riskbook.lanes",
    "riskbook.verify",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
    assert missing == []


def test_every_public_error_and_event_is_exported_at_the_top() -> None:
    import riskbook.errors
    import riskbook.events

    errors = {
        n
        for n, v in vars(riskbook.errors).items()
        if inspect.isclass(v) and issubclass(v, Exception)
    }
    assert errors <= set(riskbook.__all__)
    assert set(riskbook.events.EVENT_TYPES) <= set(riskbook.__all__)
    for n in ("connect", "Store", "Envelope", "RawEvent", "Side", "LimitType"):
        assert n in riskbook.__all__


def test_the_audit_reports_do_not_import_altair() -> None:
    # `riskbook explain` and `riskbook incidents` print text: importing Altair for them
    # cost a second or more per command.
    code = "import sys, riskbook.audit, riskbook.cli; print('altair' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["riskbook.events"])
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- arguments

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("account", "side", "quantity", "told"),
    [
        ("ACC-1", "buy", 10, "TradeExecuted.side: invalid enum value 'buy'"),
        ("ACC-1", "Buy", None, "TradeExecuted.quantity: expected `float`, got `null`"),
        ("ACC-1", "Buy", "10", "TradeExecuted.quantity: expected `float`, got `str`"),
        (7, "Buy", 10, "TradeExecuted.account_id: expected `str`, got `int`"),
        ("", "Buy", 10, "TradeExecuted.account_id: must not be empty"),
    ],
)
def test_check_validates_its_trade_like_a_trade_executed(
    shared_store: Store, account: Any, side: Any, quantity: Any, told: str
) -> None:
    # a side "buy" gave Side()'s ValueError, a quantity None float()'s TypeError, an
    # account 7 a TypeError naming no field, and a quantity "10" was accepted
    with pytest.raises(riskbook.InvalidEvent, match=f"^{re.escape(told)}"):
        riskbook.check(account, "ACME", side, quantity, 10.0, store=shared_store, at=T0)


def test_check_takes_a_side_of_either_kind_and_numbers_of_any_type(shared_store: Store) -> None:
    import numpy as np

    account = f"ACC-{uuid.uuid4().hex[:10]}"
    for side, quantity, price in [
        ("Buy", 10, 10.0),
        (riskbook.Side.Sell, np.float64(10.0), np.int64(10)),
        ("Sell", Decimal("10"), np.float32(10.0)),
    ]:
        r = riskbook.check(account, "ACME", side, quantity, price, store=shared_store, at=T0)
        assert r.accepted and (r.quantity, r.price) == (10.0, 10.0)
        assert type(r.quantity) is float and r.side == str(side)


def test_a_processor_takes_one_limit_type_by_name(shared_store: Store) -> None:
    # types="MaxLeverage" was read as the types "M", "a", "x", ...: KeyError "M"
    from riskbook.live import Processor

    p = Processor(shared_store, types="MaxLeverage")
    assert p.engine.types == ("MaxLeverage",)
    assert Processor(shared_store, types=["MaxLeverage", "MaxDrawdown"]).engine.types == (
        "MaxLeverage", "MaxDrawdown",
    )  # fmt: skip
    with pytest.raises(KeyError, match="no limit type 'MaxNothing'"):
        Processor(shared_store, types="MaxNothing")
    from riskbook.live import Engine

    assert Engine(types="MaxLeverage").types == ("MaxLeverage",)  # type: ignore[arg-type]


def test_the_store_functions_of_the_projections_take_a_dsn_as_load_does(
    make_database: Callable[[], str],
) -> None:
    # state_at and the others called store.connection() on whatever they were given:
    # a DSN, None or a History gave "'str' object has no attribute 'connection'"
    dsn = make_database()
    with Store(dsn) as store:
        store.append("A", [
            riskbook.AccountFunded(account_id="A", amount=1_000.0, funded_at=T0),
            riskbook.TradeExecuted(trade_id="T-1", account_id="A", symbol="X",
                                   side=riskbook.Side.Buy, quantity=10.0, price=10.0,
                                   executed_at=T0 + timedelta(minutes=1)),
        ])  # fmt: skip
        by_store = riskbook.state_at(store, "2024-03-01T15:00:00Z")
    by_dsn = riskbook.state_at(dsn, "2024-03-01T15:00:00Z")
    for mine, theirs in zip(by_dsn, by_store, strict=True):
        assert mine.equals(theirs)
    assert by_dsn[0]["quantity"].to_list() == [10.0]
    assert projections.write_snapshots(dsn) == 1
    assert projections.refresh_account_positions(dsn, concurrently=False) == 1
    assert projections.account_positions(dsn)["net_quantity"].to_list() == [10.0]
    history = riskbook.History.empty()
    told = "store must be a Store, a DSN or None (the default store), got History"
    calls: list[Callable[[], object]] = [
        lambda: riskbook.state_at(history, T0),  # type: ignore[arg-type]
        lambda: projections.write_snapshots(history),  # type: ignore[arg-type]
        lambda: projections.refresh_account_positions(history),  # type: ignore[arg-type]
        lambda: projections.account_positions(history),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(TypeError, match=f"^{re.escape(told)}$"):
            call()
