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

    result = run("demo", "--summary-only", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
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
