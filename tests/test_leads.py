"""Leads left by the correctness hunts, each confirmed by a test that failed before its fix
(beside a few that guard what the fix must keep): verify's report of an altered hash,
the event lanes of an unknown event type, the grouped bar of the exposure chart, the
exposure explorer's controls at K and ``riskbook import -``. Two leads are kept as they
were, on purpose: a repeated key in an import line is taken last-wins, as JSON parsers
do (a check made every import's parse 1.5 to 7 times slower), and a UTC offset without a
colon is read as the same instant (below)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

import riskbook
from riskbook.events import Envelope, RawEvent, encode_envelope
from riskbook.store import Store
from tests.test_trust import as_superuser, chain_breaks, funded, trade

T0 = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)

# ------------------------------------------------------------------ 1. verify


@pytest.mark.parametrize("seq", [1, 2, 4])
def test_verify_names_only_the_event_whose_stored_hash_was_altered(
    fresh_store: Store, seq: int
) -> None:
    """The event after it still chains from the hash that event was written with (what
    its content hashes to): it was not touched, and is not named."""
    fresh_store.append("A", [funded("A")] + [trade("A", i) for i in range(1, 5)])
    as_superuser(
        fresh_store,
        f"UPDATE events SET hash = sha256(hash) WHERE aggregate_id = 'A' AND sequence = {seq}",
    )
    report = riskbook.verify(fresh_store)
    assert chain_breaks(report) == {("A", seq, "altered")}, str(report)


def test_verify_still_names_both_when_the_next_event_was_altered_too(fresh_store: Store) -> None:
    fresh_store.append("A", [funded("A")] + [trade("A", i) for i in range(1, 5)])
    as_superuser(
        fresh_store,
        "UPDATE events SET hash = sha256(hash) WHERE aggregate_id = 'A' AND sequence = 2",
        "UPDATE events SET payload = jsonb_set(payload, '{quantity}', '1000')"
        " WHERE aggregate_id = 'A' AND sequence = 3",
    )
    report = riskbook.verify(fresh_store)
    assert chain_breaks(report) == {("A", 2, "altered"), ("A", 3, "altered")}, str(report)


# ------------------------------------------------------------------ 3. viz


def test_exposure_at_chart_keeps_the_summed_bar_apart_from_a_symbol_named_other() -> None:
    from riskbook import viz

    symbols = ["other", *(f"S{s:02d}" for s in range(11))]
    positions = pl.DataFrame(
        {
            "account_id": ["A"] * len(symbols),
            "symbol": symbols,
            "quantity": [100.0] + [float(s + 1) for s in range(11)],  # "other" the largest
            "avg_price": [10.0] * len(symbols),
            "mark_price": [10.0] * len(symbols),
        }
    ).with_columns((pl.col("quantity") * pl.col("mark_price")).alias("market_value"))
    chart = viz.exposure_at_chart(positions, max_rows=6)
    rows = [r for rs in chart.to_dict()["datasets"].values() for r in rs]
    real = [r for r in rows if r["symbol"] == "other"]
    assert [r["market_value"] for r in real] == [1000.0]  # the symbol alone, not summed in
    summed = [r for r in rows if r["symbol"] == "(other)"]
    assert summed and sum(r["market_value"] for r in summed) == pytest.approx(
        10.0 * sum(range(1, 12)) - sum(r["market_value"] for r in rows if r["symbol"][0] == "S")
    )
    assert 'the rest summed as "(other)"' in chart.to_dict()["title"]["subtitle"]


# ------------------------------------------------------------------ 5. import -


def _lines(n: int = 5, bad_line: int | None = None) -> bytes:
    out = []
    for i in range(n):
        env = Envelope(
            event_id=uuid.uuid4(),
            aggregate_id="ACC-1",
            aggregate_type="Account",
            sequence=i + 1,
            timestamp=T0 + timedelta(seconds=i),
            payload=riskbook.AccountFunded(account_id="ACC-1", amount=10.0 + i, funded_at=T0),
            correlation_id="stdin",
        )
        line = encode_envelope(env)
        if bad_line == i + 1:
            line = line.replace(b'"amount":', b'"amount":"lots","was":')
        out.append(line)
    return b"\n".join(out) + b"\n"


def _cli(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "riskbook.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env=dict(os.environ),
    )


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
def test_import_dash_reads_standard_input(make_database: Callable[[], str], packed: bool) -> None:
    dsn = make_database()
    data = _lines()
    done = _cli("import", "-", "--dsn", dsn, stdin=gzip.compress(data) if packed else data)
    assert done.returncode == 0, done.stderr.decode()
    assert "added 5" in done.stdout.decode()
    again = _cli("import", "-", "--dsn", dsn, "-q", stdin=data)
    assert again.returncode == 0 and "added 0, already present 5" in again.stdout.decode()


def test_import_dash_names_the_bad_line_and_writes_nothing(
    make_database: Callable[[], str],
) -> None:
    dsn = make_database()
    done = _cli("import", "-", "--dsn", dsn, stdin=_lines(bad_line=4))
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err
    assert "<stdin>: line 4: AccountFunded.payload.amount" in err, err
    store = Store(dsn)
    assert store.count() == 0
    store.close()


# ------------------------------------------------------------------ 2. lanes


def _env(seq: int, payload: object, at: datetime, agg: str = "A") -> Envelope:
    return Envelope(
        event_id=uuid.uuid4(),
        aggregate_id=agg,
        aggregate_type="Account",
        sequence=seq,
        timestamp=at,
        payload=payload,  # type: ignore[arg-type]
        correlation_id="c",
    )


def _raw_history() -> riskbook.History:
    """Funding, an event of a type a newer riskbook wrote (kept raw), then a trade."""
    raw = RawEvent("MarginCalled", {"account_id": "A", "called_at": "x"})
    return riskbook.History.from_envelopes(
        [
            _env(1, funded("A"), T0),
            _env(2, raw, T0 + timedelta(minutes=1)),
            _env(3, trade("A", 2), T0 + timedelta(minutes=2)),
        ]
    )


def test_event_lanes_show_an_unknown_event_type_in_the_other_lane() -> None:
    from riskbook import viz

    history = _raw_history()
    lanes = viz.event_lanes(history, start=T0, end=T0 + timedelta(minutes=5), accounts="A")
    assert lanes["event_type"].to_list() == ["AccountFunded", "MarginCalled", "TradeExecuted"]
    raw = lanes.row(1, named=True)
    assert raw["lane"] == "other" and raw["account_id"] == "A"
    assert raw["occurred_at"] == T0 + timedelta(minutes=1)  # its recorded time
    assert "MarginCalled" in raw["summary"] and "kept raw" in raw["summary"]
    viz.event_chart(lanes).to_dict()
    # outside the window by its recorded time, or of another account: not there
    later = viz.event_lanes(history, start=T0 + timedelta(minutes=2), end=T0 + timedelta(minutes=5))
    assert "MarginCalled" not in later["event_type"].to_list()
    other = viz.event_lanes(history, start=T0, end=T0 + timedelta(minutes=5), accounts="B")
    assert other.height == 0
    assert (
        viz.event_lanes(history, start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=2)).columns
        == lanes.columns
    )


# ------------------------------------------------------------------ 4. widgets


def test_exposure_explorer_fits_its_accounts_and_t_range_to_k() -> None:
    from riskbook import widgets

    minute = timedelta(minutes=1)
    history = riskbook.History.from_envelopes(
        [
            _env(1, funded("A"), T0),
            _env(2, trade("A", 1), T0 + minute),
            # B's funding happened at +10 min but was recorded only at +30 min
            _env(1, funded("B", i=600), T0 + 30 * minute, agg="B"),
        ]
    )
    panel = widgets.ExposureExplorer(history)
    assert list(panel.account.options) == ["all accounts", "A", "B"]
    assert (panel.at.start, panel.at.end) == (T0, T0 + 10 * minute)
    panel.account.value = "B"
    panel.at.value = T0 + minute
    panel.known_at.value = T0 + 5 * minute  # before B was known
    assert list(panel.account.options) == ["all accounts", "A"]
    assert panel.account.value == "all accounts" and panel.picked is None
    assert (panel.at.start, panel.at.end) == (T0, T0 + minute)
    assert panel.at.value == T0 + minute
    assert panel.accounts_at["account_id"].cast(pl.String).to_list() == ["A"]
    assert panel.at.slider.value == panel.at.slider.max  # drawn at its place on the slider
    panel.known_at.value = panel.known_at.end  # everything again
    assert list(panel.account.options) == ["all accounts", "A", "B"]
    assert (panel.at.start, panel.at.end) == (T0, T0 + 10 * minute)
    assert panel.at.value == T0 + minute  # T stays where it was put


def test_exposure_explorer_keeps_a_t_outside_what_was_known_at_k() -> None:
    from riskbook import widgets

    minute = timedelta(minutes=1)
    history = riskbook.History.from_envelopes(
        [
            _env(1, funded("A"), T0),
            _env(2, trade("A", 1), T0 + minute),
            _env(3, trade("A", 9, qty=1.0), T0 + 20 * minute),
        ]
    )
    panel = widgets.ExposureExplorer(history)
    panel.at.value = T0 + 9 * minute
    panel.known_at.value = T0 + 2 * minute
    # widened to keep T, as a T given outside the history's times is
    assert (panel.at.start, panel.at.end, panel.at.value) == (T0, T0 + 9 * minute, T0 + 9 * minute)


# ------------------------------------------------------------------ the import's fast road


def _line(**replace: bytes) -> bytes:
    """One canonical envelope line of a trade (``replace``: old text -> new text)."""
    line = encode_envelope(_env(1, trade("A", 1), T0))
    for old, new in replace.values():  # type: ignore[misc]
        assert old in line
        line = line.replace(old, new, 1)
    return line


def test_plain_lines_stay_on_the_fast_road(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines as riskbook writes them, and as other systems do (fields left out, null
    ones, metadata), are vouched for without the reference decode."""
    from riskbook.store import eventstore

    checked: list[int] = []
    reference = eventstore._checked_record

    def counted(lineno: int, line: bytes, source: str) -> object:
        checked.append(lineno)
        return reference(lineno, line, source)

    monkeypatch.setattr(eventstore, "_checked_record", counted)
    limit = riskbook.LimitSet(
        account_id="A", limit_type="MaxLeverage", value=2.0, set_by="ops", set_at=T0
    )
    lines = [
        _line(),
        encode_envelope(_env(2, funded("A"), T0)),
        _line(m=(b'"metadata":{}', b'"metadata":{"who":"ops","n":[1,{"k":"v"}]}')),
        _line(drop=(b'"causation_id":null,', b""), seq=(b'"sequence":1,', b"")),
        _line(t=(b'"event_type":"TradeExecuted",', b'"event_type":null,')),
        encode_envelope(_env(3, limit, T0)),
        encode_envelope(_env(3, limit, T0)).replace(b',"symbol":null', b""),
        _line(offset=(b'00.000000Z"', b'00.000000+05:30"')),
    ]
    list(eventstore._records_from_lines(lines, "test", None))
    assert checked == []


# ------------------------------------------------------------------ 7. UTC offsets


def test_an_offset_without_a_colon_is_read_as_the_same_instant_everywhere(
    fresh_store: Store,
) -> None:
    """ISO 8601's basic offset (+0530) is read, as RFC 3339's +05:30, wherever riskbook
    reads a time: the two spell one instant, so refusing it would protect nothing, and
    a check of every import line cost the import's parse 10 to 20% (measured). riskbook
    writes RFC 3339 itself."""
    from riskbook.events import as_time, parse_time

    instant = datetime(2024, 3, 1, 4, 0, tzinfo=UTC)
    for text in ("2024-03-01T09:30:00+0530", "2024-03-01T09:30:00+05:30"):
        assert parse_time(text) == as_time(text, "at") == instant
    payload = (
        b'{"type":"PriceMarked","symbol":"A","price":1,"marked_at":"2024-03-01T09:30:00+0530"}'
    )
    assert riskbook.events.decode_event(payload).marked_at == instant  # type: ignore[attr-defined]
    line = _line(edit=(b'00.000000Z"', b'00.000000+0530"'))
    assert fresh_store.import_lines([line]).added == 1
    assert fresh_store.read_all()[0].timestamp == datetime(2024, 3, 1, 4, 0, tzinfo=UTC)
