"""The riskbook command, run as a user would run it (a subprocess)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

import riskbook
from riskbook.events import Envelope, encode_envelope
from riskbook.store import Store


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "riskbook.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def history(path: Path, n: int = 20, bad_line: int | None = None) -> Path:
    t0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)
    lines = []
    for i in range(n):
        env = Envelope(
            event_id=uuid.uuid4(),
            aggregate_id="ACC-1",
            aggregate_type="Account",
            sequence=i + 1,
            timestamp=t0 + timedelta(seconds=i),
            payload=riskbook.AccountFunded(account_id="ACC-1", amount=10.0 + i, funded_at=t0),
            correlation_id="cli-test",
        )
        line = encode_envelope(env)
        if bad_line == i + 1:
            line = line.replace(b'"amount":', b'"amount":"lots","was":')
        lines.append(line)
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return path


def test_import_reports_what_it_did_and_is_idempotent(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = make_database()
    path = history(tmp_path / "h.jsonl.gz")
    first = run("import", str(path), "--dsn", dsn)
    assert first.returncode == 0, first.stderr
    assert "added 20" in first.stdout
    second = run("import", str(path), "--dsn", dsn, "--quiet")
    assert second.returncode == 0 and "added 0, already present 20" in second.stdout
    assert second.stderr == ""


def test_a_bad_import_exits_1_naming_the_line_and_writes_nothing(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = make_database()
    path = history(tmp_path / "bad.jsonl.gz", bad_line=13)
    result = run("import", str(path), "--dsn", dsn)
    assert result.returncode == 1
    assert "line 13: AccountFunded.payload.amount" in result.stderr
    assert "Traceback" not in result.stderr
    store = Store(dsn)
    assert store.count() == 0
    store.close()


def test_passwords_never_reach_the_output(tmp_path: Path) -> None:
    dsn = f"postgresql://auditor:hunter2-secret@/riskbook?host={tmp_path}&connect_timeout=2"
    url = run("db", "url", env={"RISKBOOK_DSN": dsn})
    assert url.returncode == 0 and "hunter2" not in url.stdout and "***" in url.stdout
    failed = run("import", str(history(tmp_path / "h.jsonl.gz")), env={"RISKBOOK_DSN": dsn})
    assert failed.returncode == 1
    assert "hunter2" not in failed.stderr + failed.stdout
    assert "cannot connect" in failed.stderr
    # libpq puts its hint on a line of its own: the error is still one line
    assert one_line_error(failed).endswith("accepting connections on that socket?\n")


def test_usage_errors_exit_2() -> None:
    result = run("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert run("--help").returncode == 0


def test_export_writes_a_reloadable_copy(make_database: Callable[[], str], tmp_path: Path) -> None:
    from riskbook.frames import History

    dsn = make_database()
    run("import", str(history(tmp_path / "h.jsonl.gz")), "--dsn", dsn, "--quiet")
    out = run(
        "export", str(tmp_path / "audit"), "--dsn", dsn, "--known-at", "2030-01-01T00:00:00Z", "-q"
    )
    assert out.returncode == 0, out.stderr
    assert "funding 20" in out.stdout
    copy = History.from_parquet(tmp_path / "audit")
    assert copy.funding["amount"].sum() == sum(10.0 + i for i in range(20))
    bad = run("export", str(tmp_path / "x"), "--dsn", dsn, "--known-at", "yesterday")
    assert bad.returncode == 1 and "known_at" in bad.stderr and "Traceback" not in bad.stderr


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The stderr of a refused command: exit 1, one line, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.startswith("riskbook: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_everyday_file_mistakes_are_one_line_errors_naming_the_path(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    # each of these ended in a traceback (FileNotFoundError, IsADirectoryError, ...)
    dsn = make_database()
    run("import", str(history(tmp_path / "h.jsonl.gz")), "--dsn", dsn, "--quiet")
    missing = tmp_path / "no-such-folder" / "out.txt"
    afile = tmp_path / "h.jsonl.gz"
    cases: list[tuple[list[str], str]] = [
        (["positions", "-o", str(missing)], f"--output {missing}: no such directory"),
        (["exposure", "--format", "csv", "-o", str(tmp_path)], f"{tmp_path}: is a directory"),
        (["positions", "--format", "parquet", "-o", str(tmp_path)], "is a directory, not a file"),
        (["breaches", "-o", str(missing)], f"--output {missing}: no such directory"),
        (["export", str(afile), "-q"], f"{afile}: is a file, not a directory"),
        (["verify", "-q", "--save-heads", str(missing)], f"--save-heads {missing}: no such"),
        (["verify", "-q", "--save-heads", str(tmp_path)], "is a directory, not a file"),
        (["import", "-q", str(tmp_path)], f"{tmp_path}: is a directory, not a file"),
    ]
    if Path("/dev/full").exists():  # a write that fails midway: the disk is full
        cases += [
            (["positions", "-o", "/dev/full"], "--output /dev/full: no space left on device"),
            (["positions", "--format", "parquet", "-o", "/dev/full"], "--output /dev/full: "),
        ]
    for args, told in cases:
        result = run(*args, "--dsn", dsn)
        assert told in one_line_error(result), (args, result.stderr)
        if args[0] == "verify":  # refused before the work, not after "every chain holds"
            assert result.stdout == ""
    assert not (tmp_path / "no-such-folder").exists()


def test_times_beyond_the_years_1_to_9999_in_utc_are_one_line_errors(
    make_database: Callable[[], str],
) -> None:
    # once a bare OverflowError
    dsn = make_database()
    early = "0001-01-01T00:00:00+01:00"
    for args in (
        ["positions", "--at", early],
        ["exposure", "--known-at", "9999-12-31T23:00:00-05:00"],
        ["check", "ACC-001", "AAPL", "Buy", "1", "1", "--at", early],
    ):
        told = one_line_error(run(*args, "--dsn", dsn))
        assert "is out of range: in UTC it falls outside the years 1 to 9999" in told, told


def test_demo_summary_names_the_event_that_caused_each_block(
    make_database: Callable[[], str],
) -> None:
    # The processor records causation_id = the triggering event (a trade, a mark, a limit
    # change) on both the violation and the block. The summary assumed block -> violation
    # -> trade: a block caused by a limit change crashed it (float(None)), and a block
    # caused by a trade printed only "TradeExecuted", without the trade or the values.
    from riskbook import LimitSet, PriceMarked, Side, TradeExecuted

    dsn = make_database()
    store = Store(dsn)
    t0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)

    def at(minute: int) -> datetime:
        return t0 + timedelta(minutes=minute)

    def fund(account: str, amount: float) -> riskbook.AccountFunded:
        return riskbook.AccountFunded(account_id=account, amount=amount, funded_at=at(0))

    def trade(account: str, trade_id: str, symbol: str, side: str, minute: int,
              price: float = 187.5) -> TradeExecuted:  # fmt: skip
        return TradeExecuted(trade_id=trade_id, account_id=account, symbol=symbol,
                             side=Side(side), quantity=100, price=price,
                             executed_at=at(minute))  # fmt: skip

    def limit(account: str, kind: str, value: float, minute: int,
              symbol: str | None = None) -> LimitSet:  # fmt: skip
        return LimitSet(account_id=account, limit_type=kind, value=value, set_by="cro",
                        set_at=at(minute), symbol=symbol)  # fmt: skip

    # a limit change: the position of 100 was there before the limit of 10
    store.append("ACC-1", [fund("ACC-1", 1e6), trade("ACC-1", "T-AAPL-1", "AAPL", "Buy", 1)])
    store.append("ACC-1", [limit("ACC-1", "MaxPositionSize", 10, 2, "AAPL")])
    # a trade over an existing limit
    store.append("ACC-2", [fund("ACC-2", 1e6), limit("ACC-2", "MaxPositionSize", 10, 1, "MSFT")])
    store.append("ACC-2", [trade("ACC-2", "T-MSFT-9", "MSFT", "Buy", 2)])
    # a mark: a short position whose price rises past the leverage limit
    store.append("ACC-3", [fund("ACC-3", 10_000), limit("ACC-3", "MaxLeverage", 2, 1)])
    store.append("ACC-3", [trade("ACC-3", "T-ZZZ-3", "ZZZ", "Sell", 2, price=100.0)])
    store.append("ZZZ", [PriceMarked(symbol="ZZZ", price=150.0, marked_at=at(3))])
    # infinite leverage: a trade without any equity
    store.append("ACC-4", [limit("ACC-4", "MaxLeverage", 2, 1)])
    store.append("ACC-4", [trade("ACC-4", "T-NOCASH-4", "AAPL", "Buy", 2)])
    processor = riskbook.Processor(store, start="beginning")
    processor.catch_up()
    processor.stop()
    blocked = {e.aggregate_id for e in store.read_all() if e.event_type == "AccountBlocked"}
    store.close()
    assert blocked == {"ACC-1", "ACC-2", "ACC-3", "ACC-4"}

    # the days it says events were recorded are UTC days, whatever the session's zone:
    # a zone 12 hours away puts every event of this test on another local day
    now = datetime.now(UTC)
    zone, local = ("Etc/GMT+12", now - timedelta(hours=12))  # POSIX signs: UTC-12
    if now.hour >= 12:
        zone, local = ("Etc/GMT-12", now + timedelta(hours=12))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET timezone = '{zone}'")
    result = run("demo", "--summary-only", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    overview = result.stdout.split("What the store holds:")[1].split("\n\n")[0]
    assert now.date().isoformat() in overview, overview
    assert local.date().isoformat() not in overview, overview
    lines = {
        line.split()[0]: line
        for line in result.stdout.split("caused them")[1].splitlines()
        if line.strip().startswith("ACC-")
    }
    assert set(lines) == {"ACC-1", "ACC-2", "ACC-3", "ACC-4"}, result.stdout
    assert "LimitSet MaxPositionSize AAPL" in lines["ACC-1"], lines["ACC-1"]
    assert "100.00 > 10.00" in lines["ACC-1"], lines["ACC-1"]
    assert "TradeExecuted T-MSFT-9" in lines["ACC-2"], lines["ACC-2"]
    assert "100.00 > 10.00" in lines["ACC-2"], lines["ACC-2"]
    assert "PriceMarked ZZZ" in lines["ACC-3"], lines["ACC-3"]
    assert "TradeExecuted T-NOCASH-4" in lines["ACC-4"], lines["ACC-4"]
    assert "infinite > 2.00" in lines["ACC-4"], lines["ACC-4"]
    assert "1.797" not in result.stdout and "e+308" not in result.stdout
    assert "`riskbook explain EVENT_ID` reconstructs one" in result.stdout
    first = result.stdout.splitlines()[0]  # where, in a few words: not the whole conninfo
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert first.startswith(f"riskbook store: database {dbname} on "), first
    assert "sslmode" not in first and "channel_binding" not in first, first


def test_the_demo_gives_jupyterlab_an_absolute_home(tmp_path: Path) -> None:
    # The kernels run in notebooks/: a relative RISKBOOK_HOME (or RISKBOOK_CACHE) named
    # another folder there, and the notebooks started a second, empty server.
    from riskbook import demo

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        env = demo.lab_env(None, {"RISKBOOK_HOME": "rel/home", "RISKBOOK_CACHE": "c", "X": "1"})
    finally:
        os.chdir(here)
    assert env["RISKBOOK_HOME"] == str(tmp_path.resolve() / "rel" / "home")
    assert env["RISKBOOK_CACHE"] == str(tmp_path.resolve() / "c")
    assert env["X"] == "1" and "RISKBOOK_DSN" not in env
    assert demo.lab_env("postgresql:///x", {})["RISKBOOK_DSN"] == "postgresql:///x"


def test_the_demo_makes_its_sample_in_the_riskbook_home(tmp_path: Path, monkeypatch) -> None:
    # Installed without the repository's data/, the demo makes the sample on the fly: in
    # RISKBOOK_HOME (it went to ~/.riskbook whatever the home), with its answer key, and
    # the same bytes as the bundled one; nothing half-made is left beside it.
    from riskbook import demo

    bundled = demo.SAMPLE
    monkeypatch.setattr(demo, "SAMPLE", tmp_path / "absent" / "sample.jsonl.gz")
    monkeypatch.setenv("RISKBOOK_HOME", str(tmp_path / "home"))
    made = demo._sample_file(None)
    assert made == tmp_path / "home" / "sample.jsonl.gz"
    assert made.read_bytes() == bundled.read_bytes()
    assert demo._answer_key(made) == demo._answer_key(bundled)
    assert sorted(p.name for p in made.parent.iterdir()) == ["sample.jsonl.gz", "sample.key.json"]
    assert demo._sample_file(None) == made  # made once


def test_tables_show_event_ids_whole(fresh_store: Store) -> None:
    # an auditor copies the id of the event that set a limit from the default table;
    # it was cut to 30 characters ("4f561c45-6661-4747-ad21-db4315…")
    limit = riskbook.LimitSet(
        account_id="ACC-1", limit_type="MaxLeverage", value=2.0, set_by="risk",
        set_at=datetime(2024, 3, 1, tzinfo=UTC),
    )  # fmt: skip
    fresh_store.append("ACC-1", [limit])
    event_id = str(fresh_store.read("ACC-1")[0].event_id)
    shown = run("limits", "history", "--dsn", fresh_store.dsn)
    assert shown.returncode == 0, shown.stderr
    assert event_id in shown.stdout, shown.stdout


def test_bench_help_names_its_command() -> None:
    shown = run("bench", "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: riskbook bench"), shown.stdout[:200]
    assert "benchmarks/run_all.py --events" not in shown.stdout


# ------------------------------------------------------------------ a bug hunt's findings


def _funded(dsn: str) -> None:
    """ACC-1, funded (in this process: faster than `riskbook import`)."""
    store = Store(dsn)
    t0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)
    store.append("ACC-1", [riskbook.AccountFunded(account_id="ACC-1", amount=10.0, funded_at=t0)])
    store.close()


def test_outputs_go_to_paths_that_are_not_utf8(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    # Legal on Linux: polars took no such path ("TypeError: Object does not have a .write()
    # method", a traceback), and export left an empty folder behind.
    dsn = make_database()
    _funded(dsn)
    parquet = os.fsdecode(bytes(tmp_path) + b"/p\xff.parquet")  # a surrogate-escaped str
    out = run("exposure", "--format", "parquet", "-o", parquet, "--dsn", dsn)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    with open(parquet, "rb") as file:
        import polars as pl

        assert pl.read_parquet(file)["account_id"].to_list() == ["ACC-1"]
    folder = os.fsdecode(bytes(tmp_path) + b"/x\xff")
    said = subprocess.run([sys.executable, "-m", "riskbook.cli", "export", folder, "-q",
                           "--dsn", dsn], capture_output=True, timeout=120)  # fmt: skip
    assert said.returncode == 0 and said.stderr == b"", said.stderr
    assert b"funding 1" in said.stdout  # the path as the locale shows it: bytes, or escaped
    assert sorted(os.listdir(os.fsencode(folder)))[:2] == [
        b"adjustments.parquet",
        b"blocks.parquet",
    ]


def test_an_export_that_fails_leaves_nothing_behind(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    # A folder path so long that a file in it cannot be named (ENAMETOOLONG): the folders
    # are made, the first write fails; they were left behind, empty.
    dsn = make_database()
    _funded(dsn)
    top = tmp_path / "deep"
    folder = top
    while len(str(folder)) < 4070:
        folder /= "d" * min(200, 4070 - len(str(folder)) - 1)
    out = run("export", str(folder), "-q", "--dsn", dsn)
    assert "trades.parquet.tmp-" in one_line_error(out) and "file name too long" in out.stderr
    assert not top.exists()


def test_every_command_says_a_warning_on_one_line(make_database: Callable[[], str]) -> None:
    # `breaches` said a limit type without a definition here in one plain line; `check`
    # printed Python's raw UserWarning, with a path, a line number and a line of code.
    dsn = make_database()
    name = f"MaxCliElsewhere{uuid.uuid4().hex[:8]}"
    riskbook.events.register_limit_type_name(name)  # stored, defined in another process
    store = Store(dsn)
    store.append("ACC-1", [riskbook.LimitSet(account_id="ACC-1", limit_type=name, value=1.0,
                                             set_by="nb", set_at=datetime(2024, 3, 1, tzinfo=UTC))])  # fmt: skip
    store.close()
    out = run("check", "ACC-1", "AAPL", "Buy", "1", "10", "--dsn", dsn)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        f"riskbook: warning: limit type(s) {name} not registered here: their stored limits are"
        " not evaluated (register them, e.g. by an entry point in the group"
        " 'riskbook.limit_types', where this engine runs)"
    ]


def _non_ascii_book(dsn: str) -> None:
    t0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)
    store = Store(dsn)
    store.append("账户-1", [
        riskbook.AccountFunded(account_id="账户-1", amount=1000.0, funded_at=t0),
        riskbook.TradeExecuted(trade_id="T-1", account_id="账户-1", symbol="ÆØÅ",
                               side=riskbook.Side.Buy, quantity=2, price=10.0, executed_at=t0),
    ])  # fmt: skip
    store.close()


def test_outputs_to_a_stdout_that_is_not_utf8(make_database: Callable[[], str]) -> None:
    # "'charmap' codec can't encode characters": csv and json are UTF-8 (data formats,
    # written alike), a table shows what the console lacks escaped, with ASCII borders
    dsn = make_database()
    _non_ascii_book(dsn)
    cp1252 = {"PYTHONIOENCODING": "cp1252"}
    csv = run("positions", "--format", "csv", "--dsn", dsn, env=cp1252)
    assert csv.returncode == 0, csv.stderr
    assert csv.stdout.splitlines()[1].startswith("账户-1,ÆØÅ,2.0,10.0,")
    table = subprocess.run([sys.executable, "-m", "riskbook.cli", "positions", "--dsn", dsn],
                           capture_output=True, timeout=120, env={**os.environ, **cp1252})  # fmt: skip
    assert table.returncode == 0, table.stderr
    text = table.stdout.decode("cp1252")
    assert "\\u8d26\\u6237-1" in text and "ÆØÅ" in text and text.startswith("+-"), text


def test_a_critical_factor_must_be_finite() -> None:
    # "--critical inf" was refused with "must be >= 1, got inf"
    from riskbook.live import Engine

    out = run("live", "--critical", "inf", "--once")
    assert out.returncode == 2 and "--critical: must be a finite number >= 1" in out.stderr
    assert "--no-block" in out.stderr
    with pytest.raises(ValueError, match="must be a finite number >= 1, got inf"):
        Engine(critical=float("inf"))


def test_an_empty_account_or_symbol_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # refused by some commands, "(no breaches)" in others, ignored by export
    from riskbook.cli import main

    for args in (["positions", "--account", ""], ["exposure", "--account=", "--account", "A"],
                 ["breaches", "--account", ""], ["limits", "history", "--account", ""],
                 ["export", "out", "--account", ""], ["export", "out", "--symbol", ""]):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            main(args)
        flag = "--symbol" if "--symbol" in args else "--account"
        assert exited.value.code == 2, args
        assert f"error: argument {flag}: must not be empty" in capsys.readouterr().err, args
