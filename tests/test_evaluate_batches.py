"""``limits.evaluate`` batch by batch (what the live processor does) against one call over
everything: random metric and limit streams, random batchings, the same intervals and the
same final state (hypothesis)."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from riskbook import limits

T0 = datetime(2024, 3, 1, 22, 0, tzinfo=UTC)  # two hours before midnight
SPAN = 3000  # minutes: the stream crosses two midnights
ACCOUNTS = ["A", "B", "C"]
SYMBOLS = ["X", "Y", "Z"]
LEVELS = (0.5, 1.0)


def _no_metric(history: Any, *, known_at: Any = None) -> pl.DataFrame:
    raise NotImplementedError  # the tests give the metric rows themselves


DEFINITIONS = {
    scope: limits.LimitSpec(f"Batches_{scope}", scope, "x", _no_metric) for scope in limits.SCOPES
}


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


@dataclass
class Stream:
    metric: pl.DataFrame
    limits: pl.DataFrame

    @property
    def horizon(self) -> datetime:
        times = [*self.metric["time"].to_list(), *self.limits["set_at"].drop_nulls().to_list()]
        return max(times, default=T0)


values = st.one_of(
    st.integers(0, 12).map(float),
    st.sampled_from([math.nan, None, 2.5, 7.5]),
)
minutes = st.integers(0, SPAN)


@st.composite
def streams(draw: st.DrawFn, max_rows: int = 40, max_limits: int = 10) -> Stream:
    """Metric rows (several keys, NaN and null values, late and same-time rows) and limit
    rows (account-wide, per symbol, ``"*"``, "from the start", same-time changes)."""
    hot = draw(st.integers(0, SPAN - 60))  # rows crowd around here: breaches open and close
    near = st.integers(hot, hot + 60)
    same = st.integers(hot, hot + 2)  # same-time rows: breaches that open and close at once
    n = draw(st.integers(0, max_rows))
    metric = []
    for i in range(n):
        t = draw(st.one_of(minutes, near, near, same))
        metric.append(
            {
                "account_id": draw(st.sampled_from(ACCOUNTS)),
                "symbol": draw(st.sampled_from(SYMBOLS)),
                "time": at(t),
                "timestamp": at(t + draw(st.sampled_from([0, 0, 0, 1, 30]))),
                "position": 1000 + i,
                "value": draw(values),
                "event_id": f"m-{i}",
            }
        )
    lim = []
    for i in range(draw(st.integers(0, max_limits))):
        start = draw(st.sampled_from([None, "t", "t", "t", "t"]))  # None: from the start
        t = draw(st.one_of(minutes, near))
        hypothetical = start is None or draw(st.integers(0, 3)) == 0
        lim.append(
            {
                "account_id": draw(st.sampled_from([*ACCOUNTS, "*"])),
                "symbol": draw(st.sampled_from([None, None, *SYMBOLS])),
                "value": float(draw(st.integers(1, 12))),
                "set_by": draw(st.sampled_from(["p", "q"])),
                "set_at": None if start is None else at(t),
                "timestamp": None if hypothetical else at(t + draw(st.sampled_from([0, 0, 5]))),
                "position": None if hypothetical else 1000 + n + i,
                "event_id": None if hypothetical else f"l-{i}",
            }
        )
    return Stream(
        pl.DataFrame(
            metric,
            schema={
                "account_id": pl.String,
                "symbol": pl.String,
                "time": pl.Datetime("us", "UTC"),
                "timestamp": pl.Datetime("us", "UTC"),
                "position": pl.Int64,
                "value": pl.Float64,
                "event_id": pl.String,
            },
        ),
        pl.DataFrame(lim, schema=limits.LIMIT_ROWS_SCHEMA),
    )


def window(f: pl.DataFrame, col: str, lo: datetime | None, hi: datetime) -> pl.DataFrame:
    """The rows of ``f`` with ``lo < col <= hi`` (a null ``col``: in the first window)."""
    keep = pl.col(col) <= hi
    if lo is not None:
        keep &= pl.col(col) > lo
    else:
        keep |= pl.col(col).is_null()
    return f.filter(keep)


def plain(frame: pl.DataFrame) -> pl.DataFrame:
    """Intervals comparable as a set of rows: categoricals as strings, sorted."""
    out = frame.drop("carried", strict=False).with_columns(pl.col(pl.Categorical).cast(pl.String))
    return out.sort(out.columns, nulls_last=False)


def same(got: pl.DataFrame, want: pl.DataFrame, what: str) -> None:
    try:
        assert_frame_equal(got, want)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def by_hand(state: limits.BreachState) -> limits.BreachState:
    """The same state made from its public fields only (nothing kept from the last call)."""
    return limits.BreachState(
        state.limit_type, state.scope, state.levels, state.limits, state.metrics, state.open,
        state.through,
    )  # fmt: skip


CARRY = {
    "as returned": lambda state: state,
    "made by hand": by_hand,
    "pickled": lambda state: pickle.loads(pickle.dumps(state)),
}


def fold(
    d: limits.LimitSpec, s: Stream, cuts: list[int], carry: list[str]
) -> tuple[pl.DataFrame, limits.BreachState]:
    """``s`` evaluated in batches ending at ``cuts`` and at its horizon, the state carried
    from batch to batch as ``carry`` says; the intervals that closed in any batch and those
    still open after the last; the last state."""
    horizon = s.horizon
    bounds = [*sorted({at(c) for c in cuts if at(c) < horizon}), horizon]
    state = limits.BreachState.empty(d, LEVELS)
    closed, last, lo = [], None, None
    for b, hi in enumerate(bounds):
        state = CARRY[carry[b % len(carry)]](state)
        part, state = limits.evaluate(
            d, window(s.metric, "time", lo, hi), window(s.limits, "set_at", lo, hi),
            levels=LEVELS, state=state, through=hi,
        )  # fmt: skip
        if lo is not None:  # what started in an earlier batch is reported as carried
            assert part["carried"].to_list() == (part["started_at"] <= lo).to_list()
        open_now = part.filter(pl.col("ended_at").is_null())
        assert state.open.height == open_now.height
        closed.append(part.filter(pl.col("ended_at").is_not_null()))
        last, lo = open_now, hi
    assert last is not None
    return pl.concat([*closed, last]), state


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    s=streams(),
    cuts=st.lists(st.integers(-1, SPAN), max_size=8),
    carry=st.lists(st.sampled_from(["as returned", "as returned", *CARRY]), min_size=1, max_size=4),
)
@example(
    s=Stream(
        pl.DataFrame(
            {
                "account_id": ["A", "A", "A", "B", "C", "C", "C"],
                "symbol": ["X", "X", "Y", "X", "Z", "Z", "Z"],
                "time": [at(1), at(3), at(130), at(140), at(200), at(200), at(200)],
                "timestamp": [at(1), at(3), at(130), at(140), at(200), at(200), at(200)],
                "position": [1, 2, 4, 5, 6, 7, 8],
                "value": [5.0, 9.0, 9.0, 9.0, 9.0, 1.0, 9.0],  # C/Z: in, out, in at once
                "event_id": ["a", "b", "c", "d", "e", "f", "g"],
            }
        ),
        pl.DataFrame(
            [
                {"account_id": "*", "symbol": None, "value": 8.0, "set_by": "p", "set_at": None},
                {
                    "account_id": "A",
                    "symbol": "X",
                    "value": 4.0,
                    "set_by": "q",
                    "set_at": at(2),
                    "timestamp": at(2),
                    "position": 3,
                    "event_id": "l",
                },
            ],
            schema=limits.LIMIT_ROWS_SCHEMA,
        ),
    ),
    cuts=[2, 60, 120, 125],
    carry=["as returned"],
)
def test_batches_give_the_one_call_result(s: Stream, cuts: list[int], carry: list[str]) -> None:
    for scope, d in DEFINITIONS.items():
        whole, state = limits.evaluate(d, s.metric, s.limits, levels=LEVELS, through=s.horizon)
        batched, folded = fold(d, s, cuts, carry)
        same(plain(batched), plain(whole), scope)
        for name in ("limits", "metrics", "open"):
            same(getattr(folded, name), getattr(state, name), f"{scope} {name}")
        assert folded.through == state.through


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=streams(max_rows=25, max_limits=6), cuts=st.lists(st.integers(-1, SPAN), max_size=5))
def test_a_batch_reports_the_same_from_a_state_made_by_hand(s: Stream, cuts: list[int]) -> None:
    """What a state keeps for the next call changes nothing: each batch's intervals and
    state are those from the same state rebuilt from its public fields (its limits in
    any order)."""
    horizon = s.horizon
    bounds = [*sorted({at(c) for c in cuts if at(c) < horizon}), horizon]
    for d in DEFINITIONS.values():
        state, lo = limits.BreachState.empty(d, LEVELS), None
        for hi in bounds:
            args = (d, window(s.metric, "time", lo, hi), window(s.limits, "set_at", lo, hi))
            part, after = limits.evaluate(*args, levels=LEVELS, state=state, through=hi)
            again, after_again = limits.evaluate(
                *args, levels=LEVELS, state=by_hand(state), through=hi
            )
            assert_frame_equal(part, again)
            for name in ("limits", "metrics", "open"):
                assert_frame_equal(getattr(after, name), getattr(after_again, name))
            shuffled = by_hand(replace(state, limits=state.limits.reverse()))
            third, after_third = limits.evaluate(*args, levels=LEVELS, state=shuffled, through=hi)
            assert_frame_equal(plain(third), plain(part))
            for name in ("metrics", "open"):
                assert_frame_equal(getattr(after_third, name), getattr(after, name))
            assert_frame_equal(after_third.limits.sort(pl.all()), after.limits.sort(pl.all()))
            state, lo = after, hi


def test_nothing_new_reports_the_open_breaches_again() -> None:
    """A batch with no rows: the open breaches again (carried), a day-scope one closed at
    midnight once its day has ended, the state otherwise as it was."""
    metric = pl.DataFrame(
        {"account_id": ["A", "B"], "symbol": ["X", "X"], "time": [at(10), at(20)],
         "timestamp": [at(10), at(20)], "position": [1, 2], "value": [9.0, 1.0]}
    )  # fmt: skip
    lim = pl.DataFrame(
        [{"account_id": "*", "symbol": None, "value": 5.0, "set_by": "p", "set_at": at(0)}],
        schema=limits.LIMIT_ROWS_SCHEMA,
    )
    none = lim.clear()
    for scope, d in DEFINITIONS.items():
        first, state = limits.evaluate(d, metric, lim, levels=LEVELS, state=None, through=at(30))
        assert first.height == 2 and not first["carried"].any()
        again, same = limits.evaluate(d, metric.clear(), none, levels=LEVELS, state=state,
                                      through=at(60))  # fmt: skip
        assert_frame_equal(again, first.with_columns(carried=pl.lit(True)))
        assert same.through == at(60)
        for name in ("limits", "metrics", "open"):
            assert_frame_equal(getattr(same, name), getattr(state, name))
        later, after = limits.evaluate(d, metric.clear(), none, levels=LEVELS, state=same,
                                       through=at(24 * 60))  # fmt: skip
        if scope.endswith("_day"):  # the day ended at midnight (120 minutes after T0)
            assert later["ended_at"].to_list() == [at(120)] * 2
            assert after.open.height == 0
            assert after.metrics["value"].to_list() == [0.0, 0.0]
        else:
            assert_frame_equal(later, again)


def test_rows_before_the_state_are_refused_and_leave_it_usable() -> None:
    d = DEFINITIONS["account_symbol"]
    rows = pl.DataFrame(
        {"account_id": ["A", "A"], "symbol": ["X", "X"], "time": [at(5), at(1)],
         "timestamp": [at(5), at(1)], "position": [2, 1], "value": [9.0, 1.0]}
    )  # fmt: skip
    lim = pl.DataFrame(
        [{"account_id": "A", "symbol": None, "value": 5.0, "set_by": "p", "set_at": at(0)}],
        schema=limits.LIMIT_ROWS_SCHEMA,
    )
    first, state = limits.evaluate(d, rows.head(1), lim, levels=LEVELS)
    with pytest.raises(ValueError, match="comes before"):
        limits.evaluate(d, rows.tail(1), lim.clear(), levels=LEVELS, state=state)
    # the state was not changed by the failed call
    again, _ = limits.evaluate(d, rows.head(0), lim.clear(), levels=LEVELS, state=state)
    assert_frame_equal(again, first.with_columns(carried=pl.lit(True)))
