"""The registry of limit types: what a limit type is, and where riskbook finds them."""

from __future__ import annotations

import importlib.metadata
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import polars as pl

from riskbook.events import _install_limit_type_loader, register_limit_type_name

__all__ = [
    "ENTRY_POINT_GROUP",
    "SCOPES",
    "LimitDefinition",
    "LimitSpec",
    "Scope",
    "get",
    "names",
    "register",
]

Scope = Literal["account", "account_symbol", "account_day", "account_symbol_day"]
SCOPES: tuple[str, ...] = ("account", "account_symbol", "account_day", "account_symbol_day")
"""The scopes a limit type can have.

``account``: one metric per account (a LimitSet without a symbol sets it);
``account_symbol``: one per (account, symbol); a LimitSet with a symbol sets that
symbol's limit and overrides one without a symbol, which sets every other symbol's;
``account_day`` / ``account_symbol_day``: the same, for a metric that starts again from
zero at 00:00 UTC every day (a breach ends at the end of its day).
"""

ENTRY_POINT_GROUP = "riskbook.limit_types"
"""Installed packages add limit types with entry points in this group; each names a
limit definition (or an iterable of them). They are loaded on first use of the registry."""


@runtime_checkable
class LimitDefinition(Protocol):
    """What riskbook needs to know about a limit type.

    Attributes
    ----------
    name : the ``limit_type`` LimitSet events name it by (an identifier).
    scope : one of :data:`SCOPES`: what one metric value belongs to.
    unit : what the metric and limit values measure ("quantity", "fraction", "ratio",
        "USD", ...): shown to people, not used in computing.

    ``metric(history, *, known_at=None)`` returns the **metric timeline** of the whole
    History as known at ``known_at``: one row per event that moves the metric, with the
    columns

    ============  ============================================================
    account_id    the account (String or Categorical)
    symbol        the symbol; needed by the ``*_symbol`` scopes, ignored by others
    time          business time of the event (``Datetime("us", "UTC")``)
    timestamp     recorded time of the event
    position      global position of the event
    value         the metric after the event (Float64; null or NaN: not in breach)
    event_id      optional: the event's id (else looked up by position)
    ============  ============================================================

    preferably in business order (time, timestamp, position); other orders are sorted.
    For a ``*_day`` scope, ``value`` is the metric of the UTC day of ``time`` so far.
    Events recorded after ``known_at`` and busted trades known by then must not count:
    build it from :func:`riskbook.position_timeline` / :func:`riskbook.account_timeline`
    (they do both) or filter the frames yourself.

    An optional attribute ``incremental`` (default False) says that the metric also
    takes a History that goes on from a projection state (``history.start`` not None:
    the live engine's batches): its rows are then the metric after each of that
    History's own events, with what came before taken from ``history.start``. The
    built-ins are. Metrics that are point-in-time functions of the timelines (a
    position, an exposure) are too; one that sums or counts over a window (trades per
    day, a day's loss) must read the window so far from ``history.start``, as
    MaxDailyVolume does. A type that does not say so is given everything folded so far
    by the live engine, and the rows of the batch kept: right for any metric, and slower
    on a long history.
    """

    @property
    def name(self) -> str: ...

    @property
    def scope(self) -> str: ...

    @property
    def unit(self) -> str: ...

    def metric(self, history: Any, *, known_at: Any = None) -> pl.DataFrame: ...


@dataclass(frozen=True)
class LimitSpec:
    """A limit type made of a name, a scope, a unit and a metric function.

    The built-ins are four of these; a notebook makes its own the same way and passes
    it to :func:`register`. Two specs are the same definition when their fields are
    equal (the same metric function object).

    Examples
    --------
    >>> import riskbook
    >>> from riskbook import limits
    >>> def gross(history, *, known_at=None):
    ...     return riskbook.account_timeline(history, known_at=known_at).select(
    ...         "account_id", time="occurred_at", timestamp="timestamp",
    ...         position="position", event_id="event_id", value="gross_exposure")
    >>> spec = limits.LimitSpec("MaxGrossNotionalDoc", "account", "USD", gross,
    ...                         description="gross exposure at marks")
    >>> limits.register(spec) is spec
    True
    >>> limits.get("MaxGrossNotionalDoc").unit
    'USD'
    """

    name: str
    scope: str
    unit: str
    metric: Callable[..., pl.DataFrame]
    description: str = ""
    incremental: bool = False
    """The metric takes a History going on from ``history.start`` (see
    :class:`LimitDefinition`); the live engine then gives it each batch alone."""

    def __post_init__(self) -> None:
        _check(self)


def _check(definition: Any) -> None:
    name = getattr(definition, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a limit type's name must be an identifier, got {name!r}")
    scope = getattr(definition, "scope", None)
    if scope not in SCOPES:
        raise ValueError(
            f"limit type {name}: scope must be one of {', '.join(SCOPES)}, got {scope!r}"
        )
    if not isinstance(getattr(definition, "unit", None), str):
        raise ValueError(f"limit type {name}: unit must be a string")
    if not callable(getattr(definition, "metric", None)):
        raise ValueError(f"limit type {name}: metric must be callable")


_lock = threading.RLock()
_registry: dict[str, LimitDefinition] = {}
_entry_points_loaded = False


def register(definition: LimitDefinition, *, replace: bool = False) -> LimitDefinition:
    """Add a limit type to the registry; returns it (so it can decorate or chain).

    Registering the same definition again is a no-op. Registering a name that is
    already taken by a different definition raises ``ValueError``, unless ``replace``
    (a notebook re-running the cell that defines its type). The name also becomes a
    valid ``limit_type`` of LimitSet / LimitViolationDetected events.

    Examples
    --------
    >>> from riskbook import limits
    >>> limits.register(limits.get("MaxLeverage")).name  # the same again: fine
    'MaxLeverage'
    >>> other = limits.LimitSpec("MaxLeverage", "account", "ratio", lambda h, **k: None)
    >>> limits.register(other)
    Traceback (most recent call last):
    ...
    ValueError: limit type 'MaxLeverage' is already registered to a different definition (pass replace=True to replace it)
    """
    _check(definition)
    with _lock:
        existing = _registry.get(definition.name)
        if (
            existing is not None
            and not replace
            and not (existing is definition or existing == definition)
        ):
            raise ValueError(
                f"limit type {definition.name!r} is already registered to a different "
                "definition (pass replace=True to replace it)"
            )
        register_limit_type_name(definition.name, per_symbol="symbol" in definition.scope)
        _registry[definition.name] = definition
    return definition


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = ep.load()
                found: Iterable[Any] = loaded if isinstance(loaded, list | tuple) else [loaded]
                for definition in found:
                    register(definition)
            except Exception as exc:  # a broken plugin must not break riskbook
                warnings.warn(
                    f"riskbook: limit types of entry point {ep.name!r} ({ep.value}) "
                    f"not loaded: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )


# Events refuse a limit type they do not know: before they do, the installed ones are
# loaded (a plugin's type is then valid in an event, an append or an import, without
# anything having asked this registry first).
_install_limit_type_loader(_load_entry_points)


def names() -> list[str]:
    """The names of the registered limit types, sorted (entry points included).

    Examples
    --------
    >>> from riskbook import limits
    >>> {"MaxDailyVolume", "MaxDrawdown", "MaxLeverage", "MaxPositionSize"} <= set(limits.names())
    True
    """
    _load_entry_points()
    with _lock:
        return sorted(_registry)


def get(name: str) -> LimitDefinition:
    """The registered limit type called ``name``; ``KeyError`` if there is none.

    Examples
    --------
    >>> from riskbook import limits
    >>> d = limits.get("MaxDailyVolume")
    >>> d.scope, d.unit
    ('account_day', 'quantity')
    """
    _load_entry_points()
    with _lock:
        try:
            return _registry[name]
        except KeyError:
            raise KeyError(
                f"no limit type {name!r} is registered (registered: {', '.join(sorted(_registry))})"
            ) from None
