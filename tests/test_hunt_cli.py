"""A bug hunt over the CLI, the import/export routes and bad input.

``test_bug_*`` tests fail on the code as it is: each says what is expected, what
happens, and which promise of DESIGN.md / README.md it breaks. The other tests are
properties that held and are kept as regressions.
"""

from __future__ import annotations

import gc
import gzip
import json
import random
import uuid
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import pytest

import riskbook
from riskbook.cli import main
from riskbook.events import Envelope, encode_envelope
from riskbook.frames import History
from riskbook.store import Store
from tests.test_cli import one_line_error, run
from tests.test_store import _envelope_lines, _write

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The riskbook command in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # main() closes the stores it opened
        code = main(list(args))
        gc.collect()
    out, err = capsys.readouterr()
    return code, out, err


def refused(said: tuple[int, str, str]) -> str:
    """The stderr of a command refused in this process: exit 1, one line (as one_line_error)."""
    code, _, err = said
    assert code == 1 and err.startswith("riskbook: ") and err.count("\n") == 1, (code, err)
    return err


def envelope_line(payload: riskbook.Event, *, ts: datetime = T0, **changes: Any) -> bytes:
    env = Envelope(
        event_id=uuid.uuid4(),
        aggregate_id=payload.aggregate_id,
        aggregate_type=payload.aggregate_type,
        sequence=0,
        timestamp=ts,
        payload=payload,
        correlation_id="hunt",
    )
    d = env.to_dict()
    del d["sequence"]
    d.update(changes)
    return msgspec.json.encode(d)


def funded(account: str, amount: float, minute: int = 0) -> riskbook.AccountFunded:
    return riskbook.AccountFunded(
        account_id=account, amount=amount, funded_at=T0 + timedelta(minutes=minute)
    )


def trade(account: str, trade_id: str, symbol: str, side: str, qty: float, price: float,
          minute: int = 0) -> riskbook.TradeExecuted:  # fmt: skip
    return riskbook.TradeExecuted(trade_id=trade_id, account_id=account, symbol=symbol,
                                  side=riskbook.Side(side), quantity=qty, price=price,
                                  executed_at=T0 + timedelta(minutes=minute))  # fmt: skip


# ============================================================================ bugs


def _star_limit_store(dsn: str) -> None:
    """A MaxPositionSize of 5 stored for every account ("*"), and ACC-1 buying 10 AAPL."""
    store = Store(dsn)
    store.append("*", [riskbook.LimitSet(account_id="*", limit_type="MaxPositionSize",
                                         value=5.0, set_by="cro", set_at=T0)])  # fmt: skip
    store.append("ACC-1", [trade("ACC-1", "T1", "AAPL", "Buy", 10.0, 10.0, minute=1)])
    store.close()


def test_bug_cli_breaches_of_one_account_leave_out_limits_stored_for_every_account(
    make_database: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    # A LimitSet stored with account_id "*" applies to every account: riskbook.breaches
    # over the whole history, `riskbook breaches` without --account, riskbook.check
    # (README: "the limits stored for every account ("*")") and the live processor all
    # find ACC-1 over it. `riskbook breaches --account ACC-1` says "(no breaches)":
    # cli._history loads with accounts=[ACC-1] only, which drops the "*" limit rows.
    # Expected: the --account view is the unfiltered one restricted to the account.
    # Same cause: `riskbook limits history --account ACC-1` shows no limit at all.
    dsn = make_database()
    _star_limit_store(dsn)
    code, everything, _ = cli(capsys, "breaches", "--level", "1", "--format", "json",
                              "--dsn", dsn)  # fmt: skip
    assert code == 0
    rows = json.loads(everything)
    assert [(r["account_id"], r["symbol"], r["limit_value"]) for r in rows] == [
        ("ACC-1", "AAPL", 5.0)
    ]
    verdict = riskbook.check("ACC-1", "AAPL", "Buy", 1, 10.0, store=dsn, at=T0 + timedelta(hours=1))
    assert not verdict.accepted  # the API applies the "*" limit to ACC-1 too
    code, mine, _ = cli(capsys, "breaches", "--level", "1", "--account", "ACC-1",
                        "--format", "json", "--dsn", dsn)  # fmt: skip
    assert code == 0
    assert json.loads(mine) == rows, "breaches --account ACC-1 lost the limit for every account"


def test_bug_cli_limits_history_of_one_account_leaves_out_limits_stored_for_every_account(
    make_database: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Expected: the limit changes that apply to ACC-1 include the one set for every
    # account (it is what breaches and check apply to ACC-1). Actual: "[]".
    dsn = make_database()
    _star_limit_store(dsn)
    code, everything, _ = cli(capsys, "limits", "history", "--format", "json", "--dsn", dsn)
    assert code == 0 and len(json.loads(everything)) == 1
    code, mine, _ = cli(capsys, "limits", "history", "--account", "ACC-1", "--format", "json",
                        "--dsn", dsn)  # fmt: skip
    assert code == 0
    assert len(json.loads(mine)) == 1, mine


def test_bug_explain_finds_no_limit_where_the_processor_applied_one_for_every_account(
    make_database: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    # The live processor raises a MaxPositionSize violation for ACC-1 from the limit
    # stored for every account ("*"). `riskbook explain <that violation>` (and
    # riskbook.audit.explain over the whole history alike) replays the engine and says
    # "decides no alarm at the cause ... no MaxPositionSize on AAPL in force", i.e. it
    # reports the engine's own alarm as unfounded. Cause: audit._account_history keeps
    # only limits rows with account_id == the account, so the "*" row is gone before
    # the replay (and cmd_explain loads accounts=[account] besides).
    dsn = make_database()
    _star_limit_store(dsn)
    store = Store(dsn)
    processor = riskbook.Processor(store, start="beginning")
    processor.catch_up()
    processor.stop()
    [violation] = [e for e in store.read_all() if e.event_type == "LimitViolationDetected"]
    store.close()
    code, out, err = cli(capsys, "explain", str(violation.event_id), "--dsn", dsn)
    assert code == 0, err
    assert "no MaxPositionSize on AAPL in force" not in out, out
    assert "decides no alarm" not in out, out


# ============================================================ properties that held


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_line_endings_boms_blank_lines_and_no_final_newline_import_alike(
    fresh_store: Store, tmp_path: Path, gz: bool
) -> None:
    lines = _envelope_lines(n_accounts=2, per_account=3)
    shapes = {
        "crlf": b"\r\n".join(lines) + b"\r\n",
        "no-final-newline": b"\n".join(lines),
        "blank-lines": b"\n\n \t\n".join(lines) + b"\n\n",
        "bom-crlf": b"\xef\xbb\xbf" + b"\r\n".join(lines),
        "bom-then-blank": b"\xef\xbb\xbf\n" + b"\n".join(lines),
    }
    first = True
    for name, data in shapes.items():
        path = tmp_path / (name + (".jsonl.gz" if gz else ".jsonl"))
        path.write_bytes(gzip.compress(data) if gz else data)
        result = fresh_store.import_jsonl(path)
        assert result.read == 6, name
        assert result.added == (6 if first else 0), name  # the same events each time
        first = False
    assert [e.sequence for e in fresh_store.read("ACC-1")] == [1, 2, 3]


def test_empty_inputs_import_nothing_and_say_so(
    make_database: Callable[[], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = make_database()
    for name, data in {"empty": b"", "blank": b"\n \n\r\n", "bom": b"\xef\xbb\xbf\n",
                       "empty.gz": gzip.compress(b"")}.items():  # fmt: skip
        path = tmp_path / name
        path.write_bytes(data)
        code, out, err = cli(capsys, "import", str(path), "--dsn", dsn, "-q")
        assert code == 0 and err == "", (name, err)
        assert "read 0 events, added 0" in out, name


def test_bad_bytes_and_damaged_compression_are_one_line_errors_writing_nothing(
    make_database: Callable[[], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = make_database()
    lines = _envelope_lines(n_accounts=1, per_account=4)
    good = b"\n".join(lines) + b"\n"
    cases = {
        "truncated.gz": (gzip.compress(good)[:-10], "cannot read"),
        "garbage-after.gz": (gzip.compress(good) + b"garbage", "cannot read"),
        "bom-on-line-3": (b"\n".join([*lines[:2], b"\xef\xbb\xbf" + lines[2]]), "line 3"),
        "latin-1": (good.replace(b"ACC-0", "ACC-\xe9".encode("latin-1")), "line 1"),
        "cr-only": (b"\r".join(lines), "line 1"),
    }
    for name, (data, told) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        error = refused(cli(capsys, "import", str(path), "--dsn", dsn, "-q"))
        assert told in error and "Traceback" not in error, (name, error)
    store = Store(dsn)
    assert store.count() == 0
    # a gzip of several members (cat a.gz b.gz) is one file
    both = tmp_path / "members.gz"
    both.write_bytes(
        gzip.compress(b"\n".join(lines[:2]) + b"\n") + gzip.compress(b"\n".join(lines[2:]))
    )
    assert store.import_jsonl(both).added == 4
    store.close()


def test_spellings_of_the_same_event_are_already_present(fresh_store: Store) -> None:
    event_id = str(uuid.uuid4())
    base: dict[str, Any] = {
        "event_id": event_id, "aggregate_id": "ACC-1", "aggregate_type": "Account",
        "timestamp": "2024-03-01T14:30:00Z", "correlation_id": "c", "metadata": {"a": 1},
        "payload": {"type": "TradeExecuted", "trade_id": "T1", "account_id": "ACC-1",
                    "symbol": "X", "side": "Buy", "quantity": 10, "price": 2.5,
                    "executed_at": "2024-03-01T14:30:00Z"},
    }  # fmt: skip
    assert fresh_store.import_lines([json.dumps(base).encode()]).added == 1

    def variant(**changes: Any) -> bytes:
        d = json.loads(json.dumps(base))
        for key, value in changes.items():
            where = d["payload"] if key.startswith("p_") else d
            where[key.removeprefix("p_")] = value
        return json.dumps(d).encode()

    same = [
        variant(timestamp="2024-03-01T15:30:00+01:00"),
        variant(timestamp="2024-03-01T14:30:00.000000000Z"),
        variant(timestamp="2024-03-01t14:30:00z"),
        variant(p_executed_at="2024-03-01T09:30:00-05:00"),
        variant(p_quantity=10.0),
        variant(event_id=event_id.upper()),
        variant(event_type="TradeExecuted", position=12345, causation_id=None),
        variant(sequence=1),
    ]
    for n, line in enumerate(same):
        result = fresh_store.import_lines([line])
        assert (result.added, result.skipped) == (0, 1), n
    assert fresh_store.count() == 1


def test_store_to_jsonl_to_a_fresh_store_and_back_is_identical(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    # odd precision and offsets, unicode ids, metadata with huge and tiny numbers,
    # appends and imports mixed on one aggregate
    a = Store(make_database())
    meta = {"ü": "日本", "big": 10**30, "f": 1e16, "tiny": 5e-324, "l": [1, 2.5, None, True]}
    a.append("账户-1", [funded("账户-1", 1e-300)], metadata=meta)
    lines = [
        envelope_line(trade("账户-1", "T-Æ", "ÆØÅ", "Buy", 1e-7, 3e-9, 1),
                      timestamp="2024-03-01T16:00:00.1234567+01:30"),
        envelope_line(trade("账户-1", "T-big", "BIG", "Sell", 1e15, 123456789.123456789, 2),
                      timestamp="2024-03-01T14:31:00Z"),
        envelope_line(riskbook.PriceMarked(symbol="ÆØÅ", price=2e-9, marked_at=T0),
                      timestamp="2024-03-01T14:32:00.5-00:00"),
    ]  # fmt: skip
    a.import_lines(lines)
    a.append("账户-1", [funded("账户-1", -1.0, 3)])
    exported = [encode_envelope(e) for e in a.read_all()]
    assert [e.sequence for e in a.read("账户-1")] == [1, 2, 3, 4]
    path = tmp_path / "copy.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(exported)))
    b = Store(make_database())
    assert b.import_jsonl(path).added == len(exported)
    assert [encode_envelope(e) for e in b.read_all()] == exported
    assert b.import_jsonl(path).added == 0 and a.import_jsonl(path).added == 0
    assert riskbook.verify(b).ok
    # `riskbook export` of both: the same frames but for the global positions
    for store, name in ((a, "a"), (b, "b")):
        out = run("export", str(tmp_path / name), "--dsn", store.dsn, "-q")
        assert out.returncode == 0, out.stderr
    ha, hb = History.from_parquet(tmp_path / "a"), History.from_parquet(tmp_path / "b")
    for frame, fa in ha.frames().items():
        assert fa.drop("position").equals(hb.frame(frame).drop("position")), frame
    a.close()
    b.close()


def test_a_bad_file_among_several_writes_nothing_of_itself(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = make_database()
    good = _write(tmp_path / "good.jsonl", _envelope_lines(n_accounts=1, per_account=2))
    lines = _envelope_lines(n_accounts=2, per_account=3)
    bad_lines = [lines[0], lines[1], envelope_line(funded("ACC-1", 1.0), timestamp="x")]
    bad = _write(tmp_path / "bad.jsonl", [lines[2], *bad_lines])
    result = run("import", str(good), str(bad), "--dsn", dsn, "-q")
    assert "line 4: AccountFunded.timestamp" in one_line_error(result)
    assert "good.jsonl: read 2 events, added 2" in result.stdout
    store = Store(dsn)
    assert store.count() == 2
    store.close()


@pytest.mark.parametrize(
    ("change", "told"),
    [
        ({"quantity": 0}, "TradeExecuted.payload.quantity"),
        ({"price": -1.5}, "TradeExecuted.payload.price"),
        ({"price": "1e400"}, "TradeExecuted.payload.price"),
        ({"side": "buy"}, "TradeExecuted.payload.side"),
        ({"quantity": "10"}, "TradeExecuted.payload.quantity"),
        ({"quantity": True}, "TradeExecuted.payload.quantity"),
    ],
)
def test_invalid_trades_are_refused_naming_type_and_field_on_every_road(
    fresh_store: Store, change: dict[str, Any], told: str
) -> None:
    d = json.loads(envelope_line(trade("ACC-1", "T1", "X", "Buy", 1.0, 1.0)))
    d["payload"].update(change)
    bad = json.dumps(d).encode().replace(b'"1e400"', b"1e400")  # a number JSON cannot hold
    with pytest.raises(riskbook.ImportFailed, match=f"line 2: {told}"):
        fresh_store.import_lines([envelope_line(funded("ACC-1", 1.0)), bad])
    assert fresh_store.count() == 0
    payload = {k: v for k, v in json.loads(bad)["payload"].items() if k != "type"}
    with pytest.raises(riskbook.InvalidEvent) as info:
        fresh_store.append("ACC-1", [riskbook.TradeExecuted(**payload)])
    assert (info.value.event_type, info.value.field) == ("TradeExecuted", told.split(".")[-1])
    assert fresh_store.count() == 0


def test_invalid_limits_are_refused_naming_type_and_field(fresh_store: Store) -> None:
    for change, field in (({"limit_type": "MaxFoo"}, "limit_type"), ({"value": -1.0}, "value"),
                          ({"value": "1e400"}, "value")):  # fmt: skip
        line = envelope_line(riskbook.LimitSet(account_id="ACC-1", limit_type="MaxLeverage",
                                               value=1.0, set_by="x", set_at=T0))  # fmt: skip
        d = json.loads(line)
        d["payload"].update(change)
        bad = json.dumps(d).encode().replace(b'"1e400"', b"1e400")
        with pytest.raises(riskbook.ImportFailed, match=f"line 1: LimitSet.payload.{field}"):
            fresh_store.import_lines([bad])
    assert fresh_store.count() == 0


def test_check_refuses_bad_numbers_in_one_line(
    make_database: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = make_database()
    for qty, price, told in (("nan", "1", "quantity: must be a finite number"),
                             ("1e400", "1", "quantity: must be a finite number"),
                             ("0", "1", "quantity: must be > 0"),
                             ("1", "nan", "price: must be a finite number")):  # fmt: skip
        said = cli(capsys, "check", "ACC-1", "AAPL", "Buy", qty, price,
                   "--at", "2024-03-01T15:00:00Z", "--dsn", dsn)  # fmt: skip
        assert f"TradeExecuted.{told}" in refused(said)


def test_cli_positions_and_exposure_agree_with_the_api_after_a_backfill(
    make_database: Callable[[], str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The CLI folds from snapshots in SQL (state_at); the API folds the loaded history.
    from riskbook import simulate
    from riskbook.projections import write_snapshots

    dsn = make_database()
    store = Store(dsn)
    sim = simulate.generate(seed=5, accounts=5, symbols=3, days=3)
    simulate.write_jsonl(sim, tmp_path / "h.jsonl.gz")
    store.import_jsonl(tmp_path / "h.jsonl.gz")
    write_snapshots(store, every=40)
    history = riskbook.load(store, cache=False, progress=False)
    rnd = random.Random(2)
    business = sorted(history.events["occurred_at"].drop_nulls().to_list())
    accounts = sorted(set(history.trades["account_id"].cast(pl.String).to_list()))
    symbols = sorted(set(history.trades["symbol"].cast(pl.String).to_list()))
    now = datetime.now(UTC)
    late = []
    for j in range(30):  # late trades, marks and busts, imported after the snapshots
        acc, sym, when = rnd.choice(accounts), rnd.choice(symbols), rnd.choice(business)
        side = rnd.choice(["Buy", "Sell"])
        t = trade(
            acc, f"LATE-{j}", sym, side, float(rnd.randint(1, 50)), float(rnd.randint(50, 150))
        )
        t = msgspec.structs.replace(t, executed_at=when)
        late.append(envelope_line(t, timestamp=(now + timedelta(seconds=j)).isoformat()))
        if j % 5 == 0:
            mark = riskbook.PriceMarked(symbol=sym, price=float(rnd.randint(50, 150)),
                                        marked_at=rnd.choice(business))  # fmt: skip
            late.append(envelope_line(mark, timestamp=(now + timedelta(seconds=j)).isoformat()))
        if j % 7 == 0:
            ids = history.trades.filter(pl.col("account_id") == acc)["trade_id"].to_list()
            bust = riskbook.TradeCancelled(trade_id=rnd.choice(ids), account_id=acc,
                                           reason="bust", cancelled_at=rnd.choice(business))  # fmt: skip
            late.append(envelope_line(bust, timestamp=(now + timedelta(seconds=j)).isoformat()))
    code, _, err = cli(capsys, "import", str(_write(tmp_path / "late.jsonl", late)), "-q",
                       "--dsn", dsn)  # fmt: skip
    assert code == 0, err
    history = riskbook.load(store, cache=False, progress=False)
    recorded = sorted(history.events["timestamp"].to_list())
    business = sorted(history.events["occurred_at"].drop_nulls().to_list())
    store.close()

    def text(t: datetime) -> str:
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def same(api: pl.DataFrame, out: str) -> None:
        rows = json.loads(out)
        assert len(rows) == api.height
        for row, want in zip(rows, api.iter_rows(named=True), strict=True):
            for key, value in want.items():
                got = row[key]
                if isinstance(value, float) and value == float("inf"):
                    assert got == 1.7976931348623157e308, key
                elif isinstance(value, float):
                    assert got == pytest.approx(value, rel=1e-9, abs=1e-9), (key, want)
                elif isinstance(value, datetime):
                    assert got == text(value), key
                else:
                    assert got == value, key

    for i in range(12):
        at = rnd.choice(business) if i % 3 else None
        known = rnd.choice(recorded) if i % 2 else None
        args = (["--at", text(at)] if at else []) + (["--known-at", text(known)] if known else [])
        code, out, err = cli(capsys, "positions", *args, "--format", "json", "--dsn", dsn)
        assert code == 0, err
        same(riskbook.positions(history, at=at, known_at=known), out)
        code, out, err = cli(capsys, "exposure", *args, "--format", "json", "--dsn", dsn)
        assert code == 0, err
        same(riskbook.accounts(history, at=at, known_at=known), out)


def test_csv_and_json_outputs_keep_every_digit_and_odd_ids(
    fresh_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv
    import io

    fresh_store.append("A-ü", [
        funded("A-ü", 1e-9),
        trade("A-ü", "T1", 'X,"y"', "Buy", 1e-7, 3e-9),
        trade("A-ü", "T2", "BIG", "Sell", 1e15, 123456789.123456789, 1),
        trade("A-ü", "T3", "PREC", "Buy", 0.1, 0.30000000000000004, 1),
    ])  # fmt: skip
    api = riskbook.positions(riskbook.load(fresh_store, cache=False, progress=False))
    _, as_json, _ = cli(capsys, "positions", "--format", "json", "--dsn", fresh_store.dsn)
    _, as_csv, _ = cli(capsys, "positions", "--format", "csv", "--dsn", fresh_store.dsn)
    from_csv = list(csv.DictReader(io.StringIO(as_csv)))
    for want, j, c in zip(api.iter_rows(named=True), json.loads(as_json), from_csv, strict=True):
        for key in ("quantity", "avg_price", "market_value", "realized_pnl"):
            assert j[key] == want[key] and float(c[key]) == want[key], key
        assert j["symbol"] == c["symbol"] == want["symbol"]
