"""The public surface: ``__all__`` is complete and every name in it exists; docs run."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

MODULES = [
    "riskbook",
    "riskbook.events",
    "riskbook.store",
    "riskbook.store.embedded",
    "riskbook.errors",
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


@pytest.mark.parametrize("name", ["riskbook.events"])
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
