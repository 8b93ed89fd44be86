"""The pre-trade check and the unblock command."""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import polars as pl

from riskbook._reasons import figure
from riskbook.errors import ConcurrencyConflict, InvalidEvent, RiskbookError
from riskbook.events import (
    STORED_INFINITY,
    AccountUnblocked,
    Envelope,
    Side,
    TradeExecuted,
    as_time,
    format_time,
    validate,
)
from riskbook.frames import Filters, History, load
from riskbook.limits._evaluate import _is_number
from riskbook.live._engine import Engine, describe
from riskbook.live._processor import Processor
from riskbook.store import Store, connect

__all__ = ["CheckResult", "Reason", "check", "unblock"]


@dataclass(frozen=True)
class Reason:
    """Why a proposed trade is rejected.

    ``kind`` is ``"blocked"`` (the account is blocked) or ``"limit"`` (the trade would
    take ``limit_type`` over its limit: ``value`` after the trade, ``limit_value`` in
    force, ``excess = value - limit_value``). An infinite metric (leverage with equity
    <= 0) has ``value`` and ``excess`` ``inf`` and a message that says "infinite"; in
    :meth:`CheckResult.to_dict` (JSON holds no infinity) they are the largest finite
    double, as in a stored LimitViolationDetected.
    """

    kind: str
    message: str
    limit_type: str | None = None
    symbol: str | None = None
    value: float | None = None
    limit_value: float | None = None
    excess: float | None = None


@dataclass(frozen=True)
class CheckResult:
    """The answer of :func:`check`: accepted, or rejected with every reason."""

    accepted: bool
    account_id: str
    symbol: str
    side: str
    quantity: float
    price: float
    at: datetime
    reasons: tuple[Reason, ...] = field(default=())

    def __bool__(self) -> bool:
        return self.accepted

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for reason in out["reasons"]:
            for key in ("value", "excess"):
                if isinstance(reason[key], float) and math.isinf(reason[key]):
                    reason[key] = math.copysign(STORED_INFINITY, reason[key])
        out["at"] = format_time(self.at)
        out["decision"] = "accept" if self.accepted else "reject"
        return out

    def __str__(self) -> str:
        head = (
            f"{'ACCEPT' if self.accepted else 'REJECT'} {self.side} {figure(self.quantity)} "
            f"{self.symbol} @ {figure(self.price)} for {self.account_id}"
        )
        return "\n".join([head, *(f"  - {r.message}" for r in self.reasons)])

    def _repr_markdown_(self) -> str:
        lines = [f"**{'accept' if self.accepted else 'reject'}** — " + str(self).splitlines()[0]]
        lines += [f"- {r.message}" for r in self.reasons]
        return "\n".join(lines)


def _engine_for(
    account: str, store: Store | str | None, processor: Processor | None, wait: float
) -> Engine:
    if processor is not None:
        if isinstance(processor, Processor) and not processor.running and processor.caught_up:
            processor.catch_up(wait=wait)  # a processor caught up before: current again
            return processor.engine
        if isinstance(processor, Processor) and not processor.wait_ready(wait):
            # Never from a state that is not current: a check must not fail open.
            why = processor.status
            if processor.running:
                why += f"; not ready after {wait:g} s"
            raise RiskbookError(
                f"processor {processor.name!r} cannot answer a pre-trade check ({why}): its"
                " state is not current (start it and wait for it, or check from the store)"
            )
        return processor.engine
    # the account's events, and the limits stored for every account ("*"), which an
    # accounts filter keeps
    if isinstance(store, Store):
        history = load(store, accounts=[account], progress=False)
    else:
        with connect(store) as own:
            history = load(own, accounts=[account], progress=False)
    engine = Engine()
    engine.apply(history, written=False)  # blocks it would decide are not stored: none count
    return engine


def check(
    account: str,
    symbol: str,
    side: str | Side,
    quantity: float,
    price: float,
    *,
    store: Store | str | None = None,
    processor: Processor | None = None,
    at: datetime | str | None = None,
    wait: float = 5.0,
) -> CheckResult:
    """Would this trade be accepted now? Accept, or reject with every reason.

    Rejected when the account is blocked (its latest block event is an AccountBlocked,
    or the running ``processor`` has decided a block it is writing), and for each limit
    the trade would breach: after the trade the metric is over the limit in force, and
    the trade took it there or further (a trade that reduces a breach is not refused for
    it). The state is the running ``processor``'s if given, else the account's stored
    history (and every mark) folded the way the processor folds it; the metric after the
    trade comes from the limit types' own metric functions and
    :func:`riskbook.limits.evaluate`, as for a real trade.

    One difference remains from the store: the processor takes a late event (business
    time before the latest it has folded, of any account) as happening on arrival, and
    folding one account cannot see how far other accounts' events had moved that clock.
    A fill booked late for this account after another account's next-day events counts
    in its own day here and in the next day for the processor, so a MaxDailyVolume check
    from the store can accept what the processor then flags. Give ``processor=`` for its
    exact state.

    Parameters
    ----------
    account, symbol, side, quantity, price : the proposed trade (validated like a
        TradeExecuted: ``InvalidEvent`` names a bad field).
    store : where the history is (default store) when no ``processor`` is given.
    processor : a running :class:`~riskbook.live.Processor` to take the state from
        (or one caught up by its ``catch_up``, which the check repeats first, so that it
        commits what has come since). Until a running one is ready (attached, its state
        rebuilt, its last commit through) the check waits, at most ``wait`` seconds,
        then raises
        :class:`~riskbook.RiskbookError` naming it and its status; a stopped or failed
        processor is refused at once. The check never answers from a state that is not
        current.
    at : the trade's business time (default: now).
    wait : seconds to wait for ``processor`` to be ready (default 5).

    Examples
    --------
    >>> import riskbook  # doctest: +SKIP
    >>> r = riskbook.check("ACC-001", "ACME", "Buy", 5_000, 101.5)  # doctest: +SKIP
    >>> r.accepted, [x.message for x in r.reasons]  # doctest: +SKIP
    """
    when = as_time(at, "at") or datetime.now(UTC)
    # Validated as the store validates an appended event (InvalidEvent names the field:
    # a side "buy", a quantity "10" or None, an account 7); a number of another type
    # (numpy's, from a frame) is taken as the float it is.
    proposed = TradeExecuted(
        trade_id=f"pre-trade-check-{uuid.uuid4()}",
        account_id=account,
        symbol=symbol,
        side=side,  # type: ignore[arg-type]  # validate makes the Side
        quantity=_number(quantity),
        price=_number(price),
        executed_at=when,
    )
    trade = cast(TradeExecuted, validate(proposed))
    # The state before the trade: with the scheduled limits due by then in force, as in
    # the trade's own fold (so a trade reducing a breach they start is not refused).
    engine = _engine_for(account, store, processor, wait).as_of(when)
    trial = engine.copy()
    envelope = Envelope(
        event_id=uuid.uuid4(),
        aggregate_id=account,
        aggregate_type="Account",
        sequence=1,
        timestamp=max(datetime.now(UTC), when),
        payload=trade,
        correlation_id="pre-trade-check",
        position=max(engine.horizon, 1),
    )
    trial.apply(History._of_envelopes([envelope], Filters()), written=False)  # checked above
    reasons: list[Reason] = []
    if engine.blocked.get(account):
        reasons.append(Reason("blocked", f"account {account} is blocked"))
    for name in trial.active:
        after = trial.open_now.get(name)
        if after is None or after.height == 0:
            continue
        # every key of the account: a trade in one symbol can take another over a limit
        # of the user's (a symbol's share of the account's exposure, say)
        mine = after.filter(
            (pl.col("account_id").cast(pl.String) == account) & (pl.col("level") == 1.0)
        ).sort(pl.col("symbol").cast(pl.String) != symbol, pl.col("symbol").cast(pl.String))
        for row in mine.iter_rows(named=True):
            key_symbol = None if row["symbol"] is None else str(row["symbol"])
            value = _metric(trial, name, account, key_symbol)
            before = _metric(engine, name, account, key_symbol, day_of=trial)
            was_open = _is_open(engine, name, account, key_symbol)
            if value is None or (
                was_open
                and before is not None
                and not _further(value, before, trial, engine, account)
            ):
                continue
            limit = row["limit_value_at_end"]
            if limit is None:
                limit = row["limit_value"]
            where = f" {key_symbol}" if key_symbol else ""
            reasons.append(
                Reason(
                    "limit",
                    f"{name}{where}: {describe(value, name)} > limit {figure(limit)}"
                    f" (by {describe(value - limit)})",
                    name,
                    key_symbol,
                    value,
                    limit,
                    value - limit,
                )
            )
    return CheckResult(not reasons, account, symbol, trade.side.value, trade.quantity,
                       trade.price, when, tuple(reasons))  # fmt: skip


def _number(value: Any) -> Any:
    """A real number as a float; anything else as it is, for validation to refuse."""
    if _is_number(value):
        return float(value)
    return value


def _metric(
    engine: Engine, name: str, account: str, symbol: str | None, day_of: Engine | None = None
) -> float | None:
    state = engine.breach.get(name)
    if state is None:
        return None
    rows = state.metrics.filter(_key(account, symbol))
    if rows.height == 0:
        return None
    row = rows.row(0, named=True)
    if day_of is not None and row["day"] is not None:
        other = day_of.breach[name].metrics.filter(_key(account, symbol))
        if other.height and other["day"][0] != row["day"]:
            return 0.0  # a new day: yesterday's volume does not count
    return float(row["value"])


def _further(value: float, before: float, trial: Engine, engine: Engine, account: str) -> bool:
    """Did the trade take the metric further? Higher, or -- an infinite leverage staying
    infinite (equity <= 0) -- with more gross exposure than before."""
    if math.isinf(value) and math.isinf(before) and value > 0 and before > 0:
        return _gross(trial, account) > _gross(engine, account)
    return value > before


def _gross(engine: Engine, account: str) -> float:
    """The account's gross exposure in the engine's state: ``sum(|q * mark|)``, a
    position with no mark valued at its own average cost (as the projections do)."""
    state = engine.projection
    rows = state.positions.filter(pl.col("account_id").cast(pl.String) == account)
    if rows.height == 0:
        return 0.0
    marks = state.marks.select(pl.col("symbol").cast(pl.String), "mark_price")
    priced = rows.with_columns(pl.col("symbol").cast(pl.String)).join(
        marks, on="symbol", how="left"
    )
    price = pl.coalesce("mark_price", "avg_price")
    return float(priced.select((pl.col("quantity") * price).abs().sum()).item())


def _is_open(engine: Engine, name: str, account: str, symbol: str | None) -> bool:
    found = engine.open_now.get(name)
    if found is None or found.height == 0:
        return False
    return found.filter(_key(account, symbol) & (pl.col("level") == 1.0)).height > 0


def _key(account: str, symbol: str | None) -> pl.Expr:
    """Rows of one metric key: the account, and the symbol (none for account scopes)."""
    sym = pl.col("symbol").cast(pl.String)
    return (pl.col("account_id").cast(pl.String) == account) & (
        sym.is_null() if symbol is None else sym == symbol
    )


_BLOCK_STATE_SQL = """
SELECT (SELECT coalesce(max(sequence), 0) FROM events WHERE aggregate_id = %(account)s),
       (SELECT event_type FROM event_fields
         WHERE account_id = %(account)s AND event_type IN ('AccountBlocked', 'AccountUnblocked')
         ORDER BY position DESC LIMIT 1)
"""
"""The account's version and its latest block event, in one statement (one snapshot):
an unblock appended after it moves the version, so the append expecting it fails."""


def unblock(
    account: str,
    *,
    by: str,
    reason: str,
    store: Store | str | None = None,
    at: datetime | str | None = None,
) -> Envelope:
    """Append AccountUnblocked for a blocked account: who (``by``) and why (``reason``).

    Raises :class:`~riskbook.RiskbookError` if the account is not blocked (nothing is
    written), and ``InvalidEvent`` for an empty ``by`` or ``reason``.
    """
    if not by or not by.strip():  # (the event's own check, said before the store is read)
        raise InvalidEvent("AccountUnblocked", "unblocked_by", "unblock needs who unblocks (--by)")
    if not reason or not reason.strip():
        raise InvalidEvent("AccountUnblocked", "reason", "unblock needs a reason (--reason)")
    if not isinstance(store, Store):
        with connect(store) as own:
            return unblock(account, by=by, reason=reason, store=own, at=at)
    st = store
    when = as_time(at, "at") or datetime.now(UTC)
    event = AccountUnblocked(account_id=account, reason=reason, unblocked_by=by, unblocked_at=when)
    for _ in range(5):
        with st.connection() as conn:
            row = conn.execute(_BLOCK_STATE_SQL, {"account": account}).fetchone()
            conn.rollback()
        assert row is not None
        version, latest = int(row[0]), row[1]
        if latest != "AccountBlocked":
            raise RiskbookError(f"account {account!r} is not blocked: nothing to unblock")
        try:
            return st.append(
                account, [event], expected_version=version, correlation_id=f"unblock-{account}"
            )[0]
        except ConcurrencyConflict:
            continue  # something was appended meanwhile: look again
    raise RiskbookError(f"account {account!r}: too many concurrent changes, try again")
