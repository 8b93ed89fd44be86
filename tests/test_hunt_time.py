"""A correctness hunt in riskbook's handling of time: every parameter that takes a time
(at, known_at, since, until, set_at, ...) in every spelling of one instant, and every
rule that depends on the UTC day (MaxDailyVolume), at and around midnights of unusual
dates, against the plain reference folds of the other test files (DESIGN.md §4-§7).

Failing tests named ``test_bug_...`` are findings: each docstring says what is expected,
by which line of the contract, and what happens instead. The others held and are kept
as guards.
"""

from __future__ import annotations

import itertools
import json
import random
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import riskbook
from riskbook import (
    History,
    limits,
)
from riskbook import projections as P
from riskbook.events import as_time, format_time
from riskbook.frames import Filters
from riskbook.limits import metric_at
from riskbook.live import Engine
from riskbook.store import Store
from tests.test_hunt_store import Rec
from tests.test_limits import Book, reference_breaches, rows, show
from tests.test_live_busts import envelopes_of

US = timedelta(microseconds=1)
HOUR = timedelta(hours=1)
M = datetime(2024, 3, 2, tzinfo=UTC)  # a UTC midnight
NY = ZoneInfo("America/New_York")


def spellings(t: datetime) -> dict[str, Any]:
    """One instant (UTC, whole microseconds) in every spelling riskbook accepts."""
    z = format_time(t)  # 2024-03-02T00:00:00.000000Z
    plus = t.astimezone(timezone(timedelta(hours=5, minutes=30)))
    minus = t.astimezone(timezone(timedelta(hours=-5)))
    out: dict[str, Any] = {
        "utc": t,
        "+05:30": plus,
        "-05:00": minus,
        "New York": t.astimezone(NY),
        "ZoneInfo UTC": t.astimezone(ZoneInfo("UTC")),
        "Z": z,
        "z lower": z.lower(),
        "space": z.replace("T", " "),
        "-00:00": z[:-1] + "-00:00",
        "+00:00": z[:-1] + "+00:00",
        "9 digits": z[:-1] + "000Z",
        "9 digits, truncated": z[:-1] + "999Z",
        "+05:30 text": plus.isoformat(),
        "-05:00 text": minus.isoformat(),
    }
    if t.microsecond == 0:
        out["no fraction"] = z[:19] + "Z"
    else:
        out["trimmed fraction"] = z[:-1].rstrip("0") + "Z"
    try:
        import pandas as pd

        out["pandas"] = pd.Timestamp(t)
        out["pandas New York"] = pd.Timestamp(t).tz_convert("America/New_York")
        if t.year < 2200:  # nanoseconds since 1970 in an int64
            out["pandas ns, truncated"] = pd.Timestamp(t) + pd.Timedelta(nanoseconds=999)
    except ImportError:  # pragma: no cover
        pass
    return out


# ============================================================================ spellings


@pytest.mark.parametrize("t", [M, M - US, datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC),
                               datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                               datetime(1970, 1, 1, tzinfo=UTC),
                               datetime(9999, 12, 31, 18, tzinfo=UTC)])  # fmt: skip
def test_every_spelling_of_an_instant_is_that_instant(t: datetime) -> None:
    for name, value in spellings(t).items():
        got = as_time(value, "at")
        assert got is not None and got.utcoffset() == timedelta(0), name
        if "ns" not in name:
            assert got == t, name
        assert P._bound(value, "at") == P._bound(t, "at"), name


def test_naive_and_zoneless_times_are_refused() -> None:
    for value in (datetime(2024, 3, 2), "2024-03-02T00:00:00", "2024-03-02", "2024-03-02T00:00Z"):
        with pytest.raises(ValueError):
            as_time(value, "at")
    with pytest.raises(TypeError):
        as_time(date(2024, 3, 2), "at")  # type: ignore[arg-type]


def _midnight_book() -> Book:
    """Limits of two kinds, fills one microsecond either side of midnight and at it, a
    mark at midnight, a limit change at midnight."""
    b = Book()
    b.fund("A", 10_000, M - 2 * HOUR)
    b.mark("X", 10, M - 2 * HOUR)
    b.limit("A", "MaxDailyVolume", 100, M - HOUR)
    b.limit("A", "MaxPositionSize", 150, M - HOUR)
    b.trade("A", "X", "Buy", 160, 10, M - US)
    b.trade("A", "X", "Buy", 60, 11, M)
    b.mark("X", 12, M)
    b.limit("A", "MaxPositionSize", 100, M, recorded=M + 3 * US)
    b.trade("A", "X", "Sell", 60, 10, M + US, recorded=M + 2 * US)
    b.fund("A", 5, M + HOUR)
    return b


def _answers(h: History, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "positions": P.positions(h, **kw).to_dicts(),
        "accounts": P.accounts(h, **kw).to_dicts(),
        "breaches": rows(limits.breaches(h, **kw)),
        "effective_limits": limits.effective_limits(h, **kw).to_dicts(),
        "limit_history": limits.limit_history(h, **kw).to_dicts(),
        "marks": P.marks(h, **kw).to_dicts(),
    }
    if "at" in kw:
        for kind, sym in (("MaxDailyVolume", None), ("MaxPositionSize", "X")):
            out[kind] = metric_at(h, kind, account="A", symbol=sym, at=kw["at"])
        hyp = [{"account_id": "*", "limit_type": "MaxDailyVolume", "value": 50.0}]
        out["backtest"] = rows(limits.backtest(h, hyp, at=kw["at"]).drop("scenario"))
    return out


@pytest.mark.parametrize("instant", [M - US, M, M + US, M + 2 * US, M + 3 * US])
def test_equal_instants_in_any_spelling_give_identical_answers(instant: datetime) -> None:
    h = _midnight_book().history()
    for param in ("at", "known_at"):
        want = _answers(h, **{param: instant})
        for name, value in spellings(instant).items():
            assert _answers(h, **{param: value}) == want, (param, name)


# ============================================================================ days


MIDNIGHTS = [
    datetime(2024, 3, 1, tzinfo=UTC),  # after Feb 29
    datetime(2025, 1, 1, tzinfo=UTC),  # after Dec 31
    datetime(1970, 1, 1, tzinfo=UTC),  # the epoch: the day before is negative
    datetime(1969, 12, 31, tzinfo=UTC),
    datetime(2100, 3, 1, tzinfo=UTC),  # 2100 has no Feb 29
    datetime(1, 1, 2, tzinfo=UTC),
]


def _around(d: datetime) -> list[datetime]:
    return [d - US, d, d + US, d + HOUR]


def _random_day_book(rng: random.Random, d: datetime) -> Book:
    """Fills, limits (some scheduled, recorded before their set_at), marks and funding
    at and one microsecond either side of a midnight, recorded in business order (each
    when it happened, a scheduled limit earlier), ending with an event after them all."""
    b = Book()
    b.fund("A", 5000, d - 2 * HOUR)
    b.mark("X", 10, d - 2 * HOUR)
    events: list[tuple[datetime, int, Any]] = []
    for i in range(rng.randint(1, 10)):
        t = rng.choice(_around(d))
        kind = rng.choice(["trade"] * 4 + ["limit"] * 2 + ["mark", "fund"])
        events.append((t, i, (kind, rng.random(), rng.randint(1, 60), rng.randint(5, 15))))
    for t, _, (kind, r, n, p) in sorted(events, key=lambda x: (x[0], x[1])):
        if kind == "trade":
            b.trade("A", "X", "Buy" if r < 0.6 else "Sell", n, p, t)
        elif kind == "limit":
            lt = ["MaxDailyVolume", "MaxPositionSize", "MaxLeverage"][int(r * 3)]
            value = n / 20 if lt == "MaxLeverage" else float(n + 10)
            b.limit("A", lt, value, t, recorded=t - US if r < 0.2 else None)
        elif kind == "mark":
            b.mark("X", p, t)
        else:
            b.fund("A", -100 if r < 0.5 else 100, t)
    b.fund("A", 1, d + 2 * HOUR)
    return b


def _engine_starts(envs: list[Any], cuts: list[int]) -> list[tuple[Any, ...]]:
    eng, out = Engine(critical=None), []
    for lo, hi in itertools.pairwise([0, *cuts, len(envs)]):
        if hi > lo:
            out += eng.apply(History.from_envelopes(envs[lo:hi]))
    return sorted((x.causation_id, x.limit_type, x.value) for x in out
                  if x.kind == "LimitViolationDetected")  # fmt: skip


def _breach_starts(h: History) -> list[tuple[Any, ...]]:
    b = limits.breaches(h, levels=1.0)
    return sorted((r["trigger_event_id"], str(r["limit_type"]), r["trigger_value"])
                  for r in b.iter_rows(named=True))  # fmt: skip


@pytest.mark.parametrize("d", MIDNIGHTS, ids=lambda d: d.date().isoformat())
def test_days_at_midnight_equal_the_reference_and_the_live_engine(d: datetime) -> None:
    rng = random.Random(d.toordinal())
    for _ in range(15):
        b = _random_day_book(rng, d)
        envs = sorted(b.envelopes, key=lambda e: e.timestamp)  # the store's order
        envs = envelopes_of([(e.payload, e.timestamp) for e in envs])
        h = History.from_envelopes(envs)
        assert rows(limits.breaches(h, levels=1.0)) == reference_breaches(envs, levels=(1.0,))
        for t in _around(d)[:3]:
            for k in (None, t):
                got = rows(limits.breaches(h, at=t, known_at=k, levels=1.0))
                assert got == reference_breaches(envs, at=t, known_at=k, levels=(1.0,)), (t, k)
        want = _breach_starts(h)
        cut = rng.randint(1, len(envs) - 1)
        assert _engine_starts(envs, []) == want
        assert _engine_starts(envs, [cut]) == want, cut


def test_far_future_day_never_ends() -> None:
    """A daily breach on 9999-12-31 (the last day there is) stays open: its midnight is
    past the end of time; the figures at the last microsecond there is."""
    d = datetime(9999, 12, 31, tzinfo=UTC)
    b = Book()
    b.limit("A", "MaxDailyVolume", 10, d)
    b.trade("A", "X", "Buy", 20, 10, d + HOUR)
    b.trade("A", "X", "Buy", 5, 10, datetime.max.replace(tzinfo=UTC))
    h = b.history()
    end = datetime.max.replace(tzinfo=UTC)
    for at in (None, end, format_time(end)):
        got = limits.breaches(h, at=at, levels=1.0)
        assert show(rows(got)) == [("MaxDailyVolume", None, 1.0, d + HOUR, None, 25.0, 10.0)]
    assert P.positions(h, at=end)["quantity"].to_list() == [25.0]
    assert metric_at(h, "MaxDailyVolume", account="A", at=end) == 25.0
    assert _engine_starts(b.envelopes, []) == _breach_starts(h)


# ============================================================================ the store


def _load(store: Store, **kw: Any) -> History:
    return riskbook.load(store, cache=False, progress=False, **kw)


def _midnight_rec() -> Rec:
    """Two accounts around a midnight: fills, a mark, funding, a bust and a limit, at
    and one microsecond either side of it, some recorded late (by a microsecond or an
    hour), recorded times on whole microseconds of their own."""
    rec = Rec()
    rec.fund("A", 10_000.0, M - 2 * HOUR)
    rec.fund("B", 10_000.0, M - 2 * HOUR)
    rec.mark("X", 10.0, M - 2 * HOUR)
    rec.limit("A", "MaxDailyVolume", 100.0, M - HOUR)
    rec.trade("A", "X", "Buy", 160.0, 10.0, M - US)
    t2 = rec.trade("A", "X", "Buy", 60.0, 11.0, M)
    rec.trade("B", "X", "Sell", 30.0, 11.0, M, recorded=M + US)
    rec.mark("X", 12.0, M, recorded=M + 2 * US)
    rec.trade("A", "X", "Sell", 60.0, 10.0, M + US, recorded=M + HOUR)
    rec.limit("A", "MaxDailyVolume", 50.0, M, recorded=M + 3 * US)
    rec.fund("B", -500.0, M - US, recorded=M + 4 * US)
    rec.cancel("A", t2, M + 2 * HOUR, recorded=M + 2 * HOUR + 7 * US)
    rec.trade("B", "X", "Buy", 1.0, 12.5, M + 3 * HOUR)
    return rec


INSTANTS = [M - US, M, M + US, M + 2 * US, M + 3 * US, M + 4 * US, M + HOUR,
            M + 2 * HOUR + 7 * US, M + 2 * HOUR + 6 * US]  # fmt: skip


def test_times_round_trip_the_store_and_parquet_to_the_microsecond(
    fresh_store: Store, tmp_path: Path
) -> None:
    rec = _midnight_rec()
    envs = list(rec.envelopes)
    rec.flush(fresh_store)
    stored = _load(fresh_store)
    mem = History.from_envelopes(envs)
    cols = ["event_id", "occurred_at", "timestamp"]
    assert_frame_equal(stored.events.select(cols).sort("event_id"),
                       mem.events.select(cols).sort("event_id"))  # fmt: skip
    back = History.from_parquet(stored.to_parquet(tmp_path / "copy"))
    for name, frame in stored.frames().items():
        assert_frame_equal(back.frame(name) if name != "events" else back.events, frame)
    # a copy loaded until a midnight in another spelling keeps its filter exactly
    until = _load(fresh_store, until="2024-03-01T19:00:00-05:00")
    assert until.filters.until == M
    again = History.from_parquet(until.to_parquet(tmp_path / "until"))
    assert again.filters == until.filters
    assert rows(limits.breaches(again)) == rows(limits.breaches(until))
    assert rows(limits.breaches(until)) == rows(limits.breaches(stored, at=M))


def test_state_at_equals_the_projections_at_every_edge_and_in_every_spelling(
    fresh_store: Store,
) -> None:
    rec = _midnight_rec()
    rec.flush(fresh_store)
    full = _load(fresh_store)

    def same(at: Any, known_at: Any, label: Any) -> None:
        got = P.state_at(fresh_store, at, known_at=known_at)
        want_p = P.positions(full, at=at, known_at=known_at)
        want_a = P.accounts(full, at=at, known_at=known_at)
        assert got[0].equals(want_p), ("positions", label, got[0], want_p)
        assert got[1].equals(want_a), ("accounts", label, got[1], want_a)

    ks = [M, M + US, M + 2 * US, M + 4 * US, M + 2 * HOUR + 7 * US, None]
    for at, k in itertools.product([*INSTANTS, None], ks):
        same(at, k, (at, k))
    # with snapshots at the midnight and a microsecond before it
    assert P.write_snapshots(fresh_store, full, at=[M - US, M, M + US]) > 0
    for at, k in itertools.product([*INSTANTS, None], ks):
        same(at, k, ("snapshots", at, k))
    later = list(spellings(M + 2 * US).values())
    for n, (name, value) in enumerate(spellings(M).items()):
        same(value, later[n % len(later)], name)


def test_pre_trade_check_counts_the_day_of_its_at_in_any_spelling(fresh_store: Store) -> None:
    """A daily-volume limit of 100 with 90 traded by 23:00: a buy of 20 is over it a
    microsecond before midnight, and not at midnight (a new UTC day) or after it."""
    rec = Rec()
    rec.fund("A", 100_000.0, M - 3 * HOUR)
    rec.limit("A", "MaxDailyVolume", 100.0, M - 2 * HOUR)
    rec.trade("A", "X", "Buy", 90.0, 10.0, M - HOUR)
    rec.flush(fresh_store)
    for t, accepted in ((M - HOUR, False), (M - US, False), (M, True), (M + US, True)):
        for name, value in spellings(t).items():
            if "pandas" in name:
                continue  # test_bug_check_and_unblock_refuse_a_datetime_subclass_at
            got = riskbook.check("A", "X", "Buy", 20, 10.0, store=fresh_store, at=value)
            assert got.accepted is accepted, (t, name, got)


class Moment(datetime):
    """A datetime subclass, as pandas.Timestamp, pendulum.DateTime or arrow's are."""


def test_bug_check_and_unblock_refuse_a_datetime_subclass_at(fresh_store: Store) -> None:
    """``at`` is a ``datetime | str`` everywhere (events.as_time): a pandas Timestamp or
    any datetime subclass is taken by positions, accounts, breaches, state_at, load, ...
    (test_equal_instants_in_any_spelling_give_identical_answers). riskbook.check and
    riskbook.unblock take it too (as_time), then put it as it is into the event they
    build, whose strict validation refuses anything but a plain datetime.

    Expected: the same answer as for the equal plain datetime (the check accepts; the
    unblock is written at that time). Actual: InvalidEvent "TradeExecuted.executed_at:
    expected `datetime`, got `Moment`" (a field the caller never gave), and likewise
    for AccountUnblocked.unblocked_at. Cause: events.as_time returns the subclass
    unchanged (astimezone keeps it); live/_check.py builds the event with it.
    """
    rec = Rec()
    rec.fund("A", 100_000.0, M - 3 * HOUR)
    rec.add(riskbook.AccountBlocked(account_id="A", reason="test", blocked_by="ops",
                                    blocked_at=M - 2 * HOUR))  # fmt: skip
    rec.flush(fresh_store)
    when = Moment(2024, 3, 2, tzinfo=UTC)
    plain = riskbook.check("A", "X", "Buy", 20, 10.0, store=fresh_store, at=M)
    assert plain.reasons and plain.reasons[0].kind == "blocked"
    got = riskbook.check("A", "X", "Buy", 20, 10.0, store=fresh_store, at=when)
    assert got.accepted is plain.accepted and got.reasons == plain.reasons
    riskbook.unblock("A", by="ops", reason="test", store=fresh_store, at=when)
    assert _load(fresh_store).blocks["blocked"].to_list() == [True, False]


# ============================================================================ the command


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from riskbook.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    assert code in (0, None), out.err
    return out.out


def test_cli_answers_alike_for_every_text_spelling_and_equal_the_api(
    fresh_store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rec = _midnight_rec()
    rec.flush(fresh_store)
    full = _load(fresh_store)
    dsn = fresh_store.dsn
    texts = {n: v for n, v in spellings(M).items() if isinstance(v, str)}
    k_texts = list(v for v in spellings(M + 2 * US).values() if isinstance(v, str))
    for command in (["positions"], ["exposure"], ["breaches"], ["limits", "history"]):
        want = None
        for n, (name, value) in enumerate(texts.items()):
            out = _cli(capsys, *command, "--dsn", dsn, "--at", value,
                       "--known-at", k_texts[n % len(k_texts)], "--format", "json")  # fmt: skip
            if want is None:
                want = out
            assert out == want, (command, name)
        got = json.loads(want or "[]")
        if command == ["positions"]:
            api = P.positions(full, at=M, known_at=M + 2 * US)
            assert [r["quantity"] for r in got] == api["quantity"].to_list()
            assert [r["last_event_at"] for r in got] == [
                format_time(t) for t in api["last_event_at"].to_list()
            ]
        if command == ["breaches"]:
            api = limits.breaches(full, at=M, known_at=M + 2 * US)
            assert [r["started_at"] for r in got] == [
                format_time(t) for t in api["started_at"].to_list()
            ]
            assert [r["ended_at"] for r in got] == [
                None if t is None else format_time(t) for t in api["ended_at"].to_list()
            ]
    # export: the same window in two spellings, the same copy
    a, b = tmp_path / "a", tmp_path / "b"
    _cli(capsys, "export", str(a), "--dsn", dsn, "-q", "--since", format_time(M - US),
         "--until", format_time(M + US), "--known-at", format_time(M + 2 * US))  # fmt: skip
    _cli(capsys, "export", str(b), "--dsn", dsn, "-q",
         "--since", "2024-03-01 18:59:59.9999990-05:00", "--until", "2024-03-02t05:30:00.000001+05:30",
         "--known-at", "2024-03-02T00:00:00.0000029z")  # fmt: skip
    ha, hb = History.from_parquet(a), History.from_parquet(b)
    assert ha.filters == hb.filters == Filters(since=M - US, until=M + US, known_at=M + 2 * US)
    for name, frame in ha.frames().items():
        assert_frame_equal(hb.frames()[name], frame)
    # in [M - 1 us, M + 1 us] and recorded by M + 2 us: the fills at M - 1 us, M, M
    # (B's, recorded at M + 1 us) and the mark at M (recorded at M + 2 us)
    assert (ha.trades.height, ha.marks.height, ha.events.height) == (3, 1, 4)


def test_hypothetical_set_at_in_any_form_is_the_same_instant() -> None:
    """A hypothetical limit set at 23:00 UTC (a fill then: 60 > 50) in every form the
    backtest takes: Python datetimes and text in any offset, polars columns in any time
    unit and zone, pandas values and frames."""
    import pandas as pd

    t = M - HOUR
    b = Book()
    b.trade("A", "X", "Buy", 60, 10, t - US)
    b.trade("A", "X", "Buy", 60, 10, t)
    h = b.history()

    def frame(value: Any) -> pl.DataFrame:
        return pl.DataFrame({"account_id": ["A"], "limit_type": ["MaxDailyVolume"],
                             "value": [50.0], "set_at": [value]})  # fmt: skip

    forms: dict[str, Any] = {
        n: [{"account_id": "A", "limit_type": "MaxDailyVolume", "value": 50.0, "set_at": v}]
        for n, v in spellings(t).items()
    }
    forms["pl ns"] = frame(t).with_columns(pl.col("set_at").dt.cast_time_unit("ns"))
    forms["pl ms"] = frame(t).with_columns(pl.col("set_at").dt.cast_time_unit("ms"))
    forms["pl New York"] = frame(t).with_columns(pl.col("set_at").dt.convert_time_zone(str(NY)))
    forms["pl text"] = frame(t.astimezone(NY).isoformat())
    forms["pandas NY"] = frame(t).to_pandas().assign(set_at=[pd.Timestamp(t).tz_convert(str(NY))])
    want = [("MaxDailyVolume", None, 1.0, t, None, 120.0, 50.0)]
    for name, value in forms.items():
        got = limits.backtest(h, value, levels=1.0).filter(pl.col("scenario") == "hypothetical")
        assert show(rows(got.drop("scenario"))) == want, name
