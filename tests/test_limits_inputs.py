"""What the limits layer is given (DESIGN.md §5): hypothetical limits of every shape,
metric frames of the wrong types, limit rows of other types, and where it says that
limits of an unregistered type were skipped."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import polars as pl
import pytest

import riskbook
from riskbook import limits
from riskbook.events import (
    AccountFunded,
    Event,
    LimitSet,
    LimitViolationDetected,
    PriceMarked,
    Side,
    TradeExecuted,
    register_limit_type_name,
)
from riskbook.frames import History

T0 = datetime(2024, 3, 1, 20, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def fund(acct: str, amount: float, t: datetime) -> AccountFunded:
    return AccountFunded(account_id=acct, amount=amount, funded_at=t)


def trade(acct: str, sym: str, qty: float, price: float, t: datetime) -> TradeExecuted:
    return TradeExecuted(trade_id=f"T-{acct}-{sym}-{t:%H%M}", account_id=acct, symbol=sym,
                         side=Side.Buy, quantity=qty, price=price, executed_at=t)  # fmt: skip


def limit(acct: str, kind: str, value: float, t: datetime, symbol: str | None = None) -> LimitSet:
    return LimitSet(account_id=acct, limit_type=kind, value=value, set_by="risk", set_at=t,
                    symbol=symbol)  # fmt: skip


def gross(history: History, *, known_at: Any = None) -> pl.DataFrame:
    """Gross exposure in currency after every event that moves the account."""
    return riskbook.account_timeline(history, known_at=known_at).select(
        "account_id", "timestamp", "position", "event_id",
        time="occurred_at", value="gross_exposure",
    )  # fmt: skip


GROSS = limits.LimitSpec("MaxGrossInputs", "account", "USD", gross)

ONE = {"account_id": "A", "limit_type": "MaxPositionSize", "value": 50.0}


# ============================================================================ hypothetical limits


def test_more_than_100_mappings_keep_every_key_and_value() -> None:
    # typed from the first 100 rows, a later 2.5 was read as 2.0 and the later keys
    # symbol and set_at were dropped: an account-wide limit from the start
    policy: list[dict[str, Any]] = [
        {"account_id": f"ACC-{i}", "limit_type": "MaxPositionSize", "value": 1000}
        for i in range(120)
    ]
    policy.append({"account_id": "ACC-X", "limit_type": "MaxPositionSize", "value": 2.5,
                   "symbol": "ACME", "set_at": at(2), "set_by": "cro"})  # fmt: skip
    rows = limits.hypothetical_limits(policy)
    assert rows.height == 121
    assert rows.row(-1, named=True) == {
        "limit_type": "MaxPositionSize", "account_id": "ACC-X", "symbol": "ACME", "value": 2.5,
        "set_by": "cro", "set_at": at(2), "timestamp": None, "position": None, "event_id": None,
    }  # fmt: skip
    assert rows["value"].head(120).to_list() == [1000.0] * 120
    assert rows["symbol"].head(120).null_count() == 120
    h = History.from_events(trade("ACC-X", "ACME", 3.0, 10.0, at(1)))
    got = limits.breaches(h, limits=policy, levels=1.0)
    assert got.select("symbol", "started_at", "limit_value").rows() == [("ACME", at(2), 2.5)]


def test_set_at_may_mix_datetimes_and_text_and_a_naive_one_is_refused_anywhere() -> None:
    east = timezone(timedelta(hours=2))
    rows = limits.hypothetical_limits(
        [
            {**ONE, "set_at": at(1).astimezone(east)},
            {**ONE, "set_at": "2024-03-01T20:05:00Z"},
            {**ONE, "set_at": None},
        ]
    )
    assert rows["set_at"].to_list() == [at(1), at(5), None]
    assert rows.schema["set_at"] == pl.Datetime("us", "UTC")
    late_naive = [{**ONE, "set_at": at(i)} for i in range(150)]
    late_naive.append({**ONE, "set_at": datetime(2024, 3, 1, 23, 0)})
    with pytest.raises(ValueError, match="hypothetical limit 150: set_at has no time zone"):
        limits.hypothetical_limits(late_naive)


@pytest.mark.parametrize(
    ("bad", "told"),
    [
        ({"value": "100"}, "hypothetical limit 1: 'value' must be a number, got str '100'"),
        ({"value": True}, "hypothetical limit 1: 'value' must be a number, got bool"),
        ({"account_id": 7}, "hypothetical limit 1: 'account_id' must be a string, got int"),
        ({"symbol": 3}, "hypothetical limit 1: 'symbol' must be a string, got int"),
        ({"set_at": "yesterday"}, "hypothetical limit 1: set_at: 'yesterday' is not an RFC"),
        ({"set_at": 5}, "hypothetical limit 1: set_at must be a datetime"),
    ],
)
def test_a_bad_value_in_a_mapping_names_its_record_and_key(bad: dict[str, Any], told: str) -> None:
    with pytest.raises(ValueError, match=f"^{told}"):
        limits.hypothetical_limits([ONE, {**ONE, **bad}])


@pytest.mark.parametrize("typo", ["symbl", "Symbol", "set_time"])
def test_unknown_keys_and_columns_are_refused_and_stored_frames_given_back(typo: str) -> None:
    # a typo made an account-wide limit from the start, silently
    told = (
        rf"unknown (key|column)\(s\) '{typo}' \(the (keys|columns) are account_id, "
        r"limit_type, value, symbol, set_at, set_by"
    )
    with pytest.raises(ValueError, match=f"hypothetical limit 0: {told}"):
        limits.hypothetical_limits([{**ONE, typo: "X"}])
    with pytest.raises(ValueError, match=f"hypothetical limits: {told}"):
        limits.hypothetical_limits(pl.DataFrame([{**ONE, typo: "X"}]))
    h = History.from_events(
        limit("A", "MaxPositionSize", 100, at(0)),
        limit("A", "MaxPositionSize", 50, at(1), symbol="X"),
        trade("A", "X", 60, 10, at(2)),
    )
    # what history.limits and effective_limits() carry besides: accepted and ignored
    expected = [("A", None, 100.0, at(0), "risk"), ("A", "X", 50.0, at(1), "risk")]
    for given in (h.limits, limits.effective_limits(h), limits.effective_limits(h).to_dicts()):
        rows = limits.hypothetical_limits(given)
        assert rows.select("account_id", "symbol", "value", "set_at", "set_by").rows() == expected
        assert rows["event_id"].null_count() == 2  # hypothetical: no event
    with pytest.raises(ValueError, match="unknown column\\(s\\) 'old_value', 'new_value'"):
        limits.hypothetical_limits(limits.limit_history(h))


def test_one_mapping_or_limitset_alone_is_one_limit() -> None:
    # a single dict was iterated as its keys ("got str"); a LimitSet was "not iterable"
    assert limits.hypothetical_limits(ONE).select("account_id", "value").rows() == [("A", 50.0)]
    one = limit("A", "MaxPositionSize", 5, at(1), symbol="X")
    rows = limits.hypothetical_limits(one)
    assert rows.select("symbol", "value", "set_at", "set_by").rows() == [("X", 5.0, at(1), "risk")]
    with pytest.raises(TypeError, match="got str"):
        limits.hypothetical_limits("MaxPositionSize")


def test_a_pandas_frame_is_read_as_a_frame() -> None:
    import pandas as pd  # the bench group, installed by default (pyproject: default-groups)

    given = pd.DataFrame([{**ONE, "set_at": "2024-03-01T20:05:00Z"}, {**ONE, "value": 7}])
    rows = limits.hypothetical_limits(given)
    assert rows.select("account_id", "value", "set_at").rows() == [
        ("A", 50.0, at(5)),
        ("A", 7.0, None),
    ]


# ============================================================================ evaluate


def test_evaluate_uses_only_the_limit_rows_of_its_type() -> None:
    # every row was applied: a position limit of 5 gave a "breach" of a 1M gross limit
    limits.register(GROSS, replace=True)
    h = History.from_events(
        fund("A", 10_000, at(0)),
        limit("A", "MaxGrossInputs", 1_000_000, at(0)),
        limit("A", "MaxPositionSize", 5, at(0)),
        trade("A", "X", 300, 10, at(1)),
    )
    found, state = limits.evaluate(GROSS, GROSS.metric(h), h.limits, levels=[1.0])
    assert found.height == 0
    assert state.limits["value"].to_list() == [1_000_000.0]
    size = limits.get("MaxPositionSize")
    found, _ = limits.evaluate(size, size.metric(h), h.limits, levels=[1.0])
    assert found.select("limit_value", "peak_value").rows() == [(5.0, 300.0)]


# ============================================================================ metric frames


def _register_metric(name: str, change: Callable[[pl.DataFrame], pl.DataFrame]) -> None:
    def metric(history: History, *, known_at: Any = None) -> pl.DataFrame:
        return change(gross(history, known_at=known_at))

    limits.register(limits.LimitSpec(name, "account", "USD", metric), replace=True)


def _book(*more: Event) -> History:
    return History.from_events(
        fund("A", 10_000, at(0)), PriceMarked(symbol="X", price=10, marked_at=at(0)),
        trade("A", "X", 300, 10, at(1)), trade("A", "X", 300, 10, at(2)), *more,
    )  # fmt: skip


def test_a_metric_without_recorded_times_is_refused_by_breaches_and_reconcile() -> None:
    # breaches took it (trigger_recorded_at null) and reconcile failed with a TypeError
    _register_metric("MaxNoRecordedTime", lambda m: m.with_columns(timestamp=None))
    h = _book()
    what_if = [{"account_id": "A", "limit_type": "MaxNoRecordedTime", "value": 1000.0}]
    told = "MaxNoRecordedTime has 3 row\\(s\\) with a null 'timestamp'"
    with pytest.raises(ValueError, match=told):
        limits.breaches(h, limits=what_if, levels=1.0)
    with pytest.raises(ValueError, match=told):
        limits.reconcile(_book(limit("A", "MaxNoRecordedTime", 1000, at(0))))


@pytest.mark.parametrize(
    ("change", "told"),
    [
        (lambda m: m.with_columns(pl.col("time").dt.to_string()),
         "column 'time' is String, expected Datetime\\(UTC\\)"),
        (lambda m: m.with_columns(pl.col("timestamp").cast(pl.Int64)),
         "column 'timestamp' is Int64, expected Datetime\\(UTC\\)"),
        (lambda m: m.with_columns(account_id=pl.lit(7)),
         "column 'account_id' is Int32, expected String"),
        (lambda m: m.with_columns(value=pl.lit("n/a")),
         "column 'value' is String, expected Float64"),
        (lambda m: m.with_columns(pl.col("time").dt.replace_time_zone(None)),
         "column 'time' has no time zone: give UTC explicitly"),
    ],
)  # fmt: skip
def test_a_metric_column_of_the_wrong_type_is_named_with_its_limit_type(
    change: Callable[[pl.DataFrame], pl.DataFrame], told: str
) -> None:
    # raw polars errors that named neither; a string value and a naive time were taken
    _register_metric("MaxOddColumn", change)
    what_if = [{"account_id": "A", "limit_type": "MaxOddColumn", "value": 1000.0}]
    with pytest.raises(ValueError, match=f"^the metric of limit type MaxOddColumn: {told}"):
        limits.breaches(_book(), limits=what_if, levels=1.0)


def test_metric_columns_are_read_by_their_type_not_cast_from_anything() -> None:
    # a zoned time, an integer value, a Categorical account: they read as their types
    zoned = lambda m: m.with_columns(  # noqa: E731
        pl.col("time").dt.convert_time_zone("America/New_York"),
        pl.col("value").cast(pl.Int64),
        pl.col("account_id").cast(pl.Categorical),
    )
    _register_metric("MaxOddButFine", zoned)
    what_if = [{"account_id": "A", "limit_type": "MaxOddButFine", "value": 4000.0}]
    got = limits.breaches(_book(), limits=what_if, levels=1.0)
    assert got.select("started_at", "peak_value").rows() == [(at(2), 6000.0)]
    # numbers as text were cast to numbers, silently
    _register_metric("MaxOddButFine", lambda m: m.with_columns(pl.col("value").cast(pl.String)))
    with pytest.raises(ValueError, match="column 'value' is String, expected Float64"):
        limits.breaches(_book(), limits=what_if, levels=1.0)


# ============================================================================ skipped types


def _unregistered() -> list[Event]:
    register_limit_type_name("MaxNeverDefined", per_symbol=False)  # a name, no definition
    return [limit("A", "MaxNeverDefined", 1, at(0)), trade("A", "X", 300, 10, at(1))]


def test_the_skipped_types_warning_points_at_the_callers_line() -> None:
    # it pointed at riskbook/_memory.py (the with_large_arrays wrapper)
    h = History.from_events(*_unregistered())
    calls: list[Callable[[], object]] = [
        lambda: limits.breaches(h, levels=1.0),
        lambda: limits.reconcile(h),  # through breaches: one riskbook call deeper
    ]
    for call in calls:
        with pytest.warns(UserWarning, match="not evaluated: MaxNeverDefined") as caught:
            call()
        assert [w.filename for w in caught] == [__file__]


def test_cli_breaches_names_skipped_types_on_one_line(make_database: Callable[[], str]) -> None:
    from riskbook.store import Store

    dsn = make_database()
    store = Store(dsn)
    try:
        for e in _unregistered():
            store.append(e.aggregate_id, [e])
    finally:
        store.close()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "riskbook.cli", *args, "--dsn", dsn],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    out = run("breaches")  # a fresh process: MaxNeverDefined has no definition there
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "riskbook: not evaluated, no definition is installed for the limit type(s) "
        "MaxNeverDefined (entry-point group riskbook.limit_types)"
    ]
    assert out.stdout == "(no breaches)\n"  # not "(nothing at that time)": no --at given
    csv = run("breaches", "--format", "csv")
    assert csv.stdout.startswith("account_id,limit_type,") and len(csv.stdout.splitlines()) == 1


def test_a_pandas_sheet_with_empty_optional_columns_is_read() -> None:
    # pd.read_csv makes an empty optional column float NaN, its missing value
    import pandas as pd  # the bench group, installed by default (pyproject: default-groups)

    sheet = pd.DataFrame({"account_id": ["A", "B"], "limit_type": ["MaxLeverage"] * 2,
                          "value": [2.5, 3.0], "symbol": [float("nan")] * 2,
                          "set_at": [float("nan")] * 2})  # fmt: skip
    rows = limits.hypothetical_limits(sheet)
    assert rows["symbol"].to_list() == [None, None] and rows["set_at"].to_list() == [None, None]
    records = limits.hypothetical_limits(sheet.to_dict("records"))
    assert records["value"].to_list() == [2.5, 3.0] and records["symbol"].null_count() == 2


# ============================================================================ arguments


def _reported(at_seconds: float) -> History:
    """A breach at minute 1 and the engine's report of it, without a cause: matched by
    time only."""
    return History.from_events(
        limit("A", "MaxPositionSize", 100, at(0)),
        trade("A", "X", 150, 10, at(1)),
        LimitViolationDetected(account_id="A", limit_type="MaxPositionSize", symbol="X",
                               current_value=150.0, limit_value=100.0,
                               detected_at=at(1) + timedelta(seconds=at_seconds)),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("tolerance", "error", "told"),
    [
        (60, TypeError, "tolerance must be a timedelta, got int 60"),
        (60.0, TypeError, "tolerance must be a timedelta, got float 60.0"),
        ("1m", TypeError, "tolerance must be a timedelta, got str '1m'"),
        (None, TypeError, "tolerance must be a timedelta, got NoneType None"),
        (timedelta(seconds=-1), ValueError, "tolerance must be >= 0, got -1 s"),
    ],
)
def test_reconcile_refuses_a_tolerance_that_is_not_a_timedelta_of_zero_or_more(
    tolerance: Any, error: type[Exception], told: str
) -> None:
    # a number or text failed deep inside with "'<=' not supported between timedelta and
    # int", and only when a report had to be matched by time; a negative one matched no
    # report by time, silently
    h = _reported(30)
    assert limits.reconcile(h)["status"].to_list() == ["matched"]
    assert limits.reconcile(h, tolerance=timedelta(0))["status"].to_list() == ["matched"]
    with pytest.raises(error, match=f"^{re.escape(told)}$"):
        limits.reconcile(h, tolerance=tolerance)
    with pytest.raises(error, match=r"^tolerance"):  # refused with nothing to match, too
        limits.reconcile(History.empty(), tolerance=tolerance)


@pytest.mark.parametrize(
    ("levels", "told"),
    [
        ("1.0", "levels must be a number or a sequence of numbers (fractions of the limit), "
                "got str '1.0'"),
        (None, "levels must be a number or a sequence of numbers (fractions of the limit), "
               "got NoneType None"),
        (True, "got bool True"),
        ([0.5, "1"], "levels must be numbers (fractions of the limit), got str '1' in "
                     "(0.5, '1')"),
    ],
)  # fmt: skip
def test_levels_must_be_a_number_or_numbers(levels: Any, told: str) -> None:
    # "1.0" was read as the levels "1", "." and "0" (a ValueError about '.'), "1" as 1.0,
    # None failed with "'NoneType' object is not iterable"
    h = _reported(0)
    with pytest.raises(TypeError, match=re.escape(told)):
        limits.breaches(h, levels=levels)
    with pytest.raises(TypeError, match=re.escape(told)):
        limits.backtest(h, [ONE], levels=levels)


def test_levels_may_be_one_number_of_any_numeric_type() -> None:
    import numpy as np

    h = _reported(0)
    one = limits.breaches(h, levels=1.0)
    assert one.height == 1
    for levels in (1, np.float64(1.0), Decimal("1"), (1,), [np.int64(1)]):
        assert limits.breaches(h, levels=levels).equals(one), levels  # type: ignore[arg-type]


def test_metric_at_takes_its_times_as_every_projection_does() -> None:
    # RFC 3339 text failed with a polars InvalidOperationError, a naive datetime with a
    # SchemaError, and a date was taken as midnight, silently
    h = History.from_events(
        fund("A", 1_000, at(0)), limit("A", "MaxLeverage", 2.0, at(0)),
        trade("A", "X", 100, 10.0, at(1)),
    )  # fmt: skip
    value = limits.metric_at(h, "MaxLeverage", account="A", at=at(2))
    assert value == 1.0
    text = "2024-03-01T20:02:00Z"
    assert limits.metric_at(h, "MaxLeverage", account="A", at=text) == value
    assert limits.metric_at(h, "MaxLeverage", account="A", at=text, known_at=text) == value
    assert limits.metric_at(h, "MaxLeverage", account="A", at="2024-03-01T20:00:30Z") == 0.0
    with pytest.raises(ValueError, match=r"^at has no time zone: give UTC explicitly$"):
        limits.metric_at(h, "MaxLeverage", account="A", at=datetime(2024, 3, 1, 21))
    with pytest.raises(ValueError, match=r"^at: 'yesterday' is not an RFC 3339 time"):
        limits.metric_at(h, "MaxLeverage", account="A", at="yesterday")
    with pytest.raises(TypeError, match=r"^at must be a datetime or an RFC 3339 string, got date"):
        limits.metric_at(h, "MaxLeverage", account="A", at=date(2024, 3, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^known_at has no time zone"):
        limits.metric_at(h, "MaxLeverage", account="A", at=at(2),
                         known_at=datetime(2024, 3, 1, 21))  # fmt: skip
    with pytest.raises(TypeError, match=r"^metric_at needs at"):
        limits.metric_at(h, "MaxLeverage", account="A", at=None)  # type: ignore[arg-type]
