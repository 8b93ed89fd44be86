"""Hunt: the live commands as a user drives them -- ``riskbook live``, ``processors``,
``unblock``, ``check`` -- and their Python counterparts, on the real PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest

import riskbook
from riskbook import Store
from riskbook.cli import main
from riskbook.live import Processor, check, processors, unblock
from tests.test_cli import run
from tests.test_live import T0, fund, limit, stored_effects, trade

AT = "2024-03-01T15:00:00Z"


def _kinds(store: Store) -> list[str]:
    return [e.event_type for e in stored_effects(store)]


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("riskbook: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- bugs


def test_bug_check_text_misstates_the_quantity_and_says_a_limit_exceeds_itself(
    fresh_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """`riskbook check` (text) formats the trade and every reason with ``%g`` (six
    significant digits).

    Proposed: Buy 1,000,001 @ 10.125 against a MaxPositionSize limit of 1,000,000.
    Expected: the head names the trade as given ("REJECT Buy 1000001 ACME @ 10.125 ...")
    and the reason shows a value above its limit ("1000001 > limit 1e+06/1000000 (by 1)").
    Actual: "REJECT Buy 1e+06 ACME @ 10.125 for ACC-1" and
    "MaxPositionSize ACME: 1e+06 > limit 1e+06 (by 1)" -- a metric shown greater than
    itself, and a quantity that is not the one checked (the JSON form is exact).
    Contract (README, pre-trade check): reject "with every reason ... by how much".
    Cause: riskbook/live/_check.py CheckResult.__str__ (``quantity:g``, ``price:g``,
    ``limit:g``) and riskbook/live/_engine.py describe() (``f"{value:g}"``).
    """
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 1_000_000.0)])
    code = main(["check", "ACC-1", "ACME", "Buy", "1000001", "10.125", "--at", AT,
                 "--dsn", s.dsn])  # fmt: skip
    assert code == 3
    out = capsys.readouterr().out
    head, reason = out.splitlines()[:2]
    assert "1000001" in head, out
    value, _, rest = reason.split(": ", 1)[1].partition(" > limit ")
    assert value != rest.split(" ")[0], out  # "X > limit X" says nothing


def test_bug_live_violation_line_shows_value_equal_to_its_limit(
    fresh_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """`riskbook live` prints each effect with ``%g``: a position of 1,000,001 over a
    limit of 1,000,000 is printed "VIOLATION ACC-1 MaxPositionSize ACME: 1e+06 (limit
    1e+06)". Expected: the value the stored LimitViolationDetected holds (1000001), so
    the line shows a breach (metric > limit, DESIGN §5). Cause: riskbook/live/_cli.py
    _describe (``limit_value:g``) and riskbook/live/_engine.py describe()."""
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 1_000_000.0)])
    s.append("ACC-1", [trade("ACC-1", "Buy", 1_000_001, 1)])
    assert main(["live", "--once", "--no-block", "--dsn", s.dsn]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("VIOLATION ACC-1 MaxPositionSize ACME")
    assert "1000001" in line, line


# ----------------------------------------------------------------------------- held


def test_cli_and_python_check_agree_and_exit_codes(
    fresh_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    s = fresh_store
    dsn = ["--dsn", s.dsn]
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    s.append("ACC-1", [trade("ACC-1", "Buy", 150, 1)])
    assert main(["live", "--once", *dsn]) == 0
    capsys.readouterr()
    assert main(["check", "ACC-1", "ACME", "Buy", "1", "10", "--at", AT,
                 "--format", "json", *dsn]) == 3  # fmt: skip
    cli = json.loads(capsys.readouterr().out)
    p = Processor(s, name="py")
    p.catch_up()
    for answer in (check("ACC-1", "ACME", "Buy", 1, 10, store=s, at=AT),
                   check("ACC-1", "ACME", "Buy", 1, 10, processor=p, at=AT)):  # fmt: skip
        assert json.loads(json.dumps(answer.to_dict())) == cli
    p.stop()
    # stopped: refused, never a stale answer
    with pytest.raises(riskbook.RiskbookError, match="stopped"):
        check("ACC-1", "ACME", "Buy", 1, 10, processor=p, at=AT)
    # unknown account and symbol: nothing against it
    assert main(["check", "NOPE", "ZZZ", "Sell", "1", "10", *dsn]) == 0
    assert capsys.readouterr().out == "ACCEPT Sell 1 ZZZ @ 10 for NOPE\n"


def test_limits_for_every_account_apply_to_an_unknown_account_both_ways(
    fresh_store: Store,
) -> None:
    s = fresh_store
    s.append("*", [limit("*", 100.0)])
    s.append("ACC-2", [fund("ACC-2")])
    p = Processor(s)
    p.catch_up()
    for acc in ("ACC-2", "NEW"):
        assert not check(acc, "ACME", "Buy", 150, 10, processor=p, at=AT).accepted
        assert not check(acc, "ACME", "Buy", 150, 10, store=s, at=AT).accepted
    p.stop()


def test_unblock_refusals_are_one_line_and_write_nothing(
    fresh_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    s = fresh_store
    dsn = ["--dsn", s.dsn]
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    before = s.count()
    assert "not blocked" in _one_line_error(capsys, main(
        ["unblock", "NOPE", "--by", "a", "--reason", "b", *dsn]))  # fmt: skip
    assert "not blocked" in _one_line_error(capsys, main(
        ["unblock", "ACC-1", "--by", "a", "--reason", "b", *dsn]))  # fmt: skip
    assert "--by" in _one_line_error(capsys, main(
        ["unblock", "ACC-1", "--by", " ", "--reason", "b", *dsn]))  # fmt: skip
    assert "RFC 3339" in _one_line_error(capsys, main(
        ["unblock", "ACC-1", "--by", "a", "--reason", "b", "--at", "2024-13-01T00:00:00Z",
         *dsn]))  # fmt: skip
    assert s.count() == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["Buy", "nan", "10"], "quantity"),
        (["Buy", "1e400", "10"], "quantity"),
        (["Buy", "0", "10"], "quantity"),
        (["Buy", "1", "-10"], "price"),
        (["Buy", "1", "10", "--at", "2024-03-01T14:00:00"], "with a zone"),
        (["Buy", "1", "10", "--at", "0001-01-01T00:00:00+01:00"], "out of range"),
    ],
)
def test_bad_check_input_is_a_one_line_error(
    fresh_store: Store, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    assert says in _one_line_error(
        capsys, main(["check", "ACC-1", "ACME", *args, "--dsn", fresh_store.dsn])
    )


def test_bad_live_flags(fresh_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = ["--dsn", fresh_store.dsn]
    assert "max_batch" in _one_line_error(capsys, main(["live", "--once", "--max-batch", "0",
                                                        *dsn]))  # fmt: skip
    assert "name" in _one_line_error(capsys, main(["live", "--once", "--name", "", *dsn]))
    # a name of spaces only made a checkpoint of that name
    assert "not only spaces" in _one_line_error(
        capsys, main(["live", "--once", "--name", "  ", *dsn])
    )
    assert "201" not in _one_line_error(capsys, main(["live", "--once", "--name", "x" * 201, *dsn]))
    for flags in (["--critical", "0.5"], ["--snapshot-after", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(["live", "--once", *flags, *dsn])
        assert exc.value.code == 2


def test_block_unblock_new_breach_blocks_again_across_restarts(
    fresh_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    s = fresh_store
    dsn = ["--dsn", s.dsn]
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    s.append("ACC-1", [trade("ACC-1", "Buy", 150, 1)])
    assert main(["live", "--once", *dsn]) == 0
    assert main(["unblock", "ACC-1", "--by", "a", "--reason", "b", *dsn]) == 0
    s.append("ACC-1", [trade("ACC-1", "Buy", 10, 2)])  # deeper in the same breach
    assert main(["live", "--once", "--no-snapshot", *dsn]) == 0
    assert _kinds(s) == ["LimitViolationDetected", "AccountBlocked"]
    s.append("ACC-1", [trade("ACC-1", "Buy", 150, 3, symbol="OTHER")])  # a new breach
    assert main(["live", "--once", *dsn]) == 0
    assert _kinds(s) == ["LimitViolationDetected", "AccountBlocked"] * 2
    capsys.readouterr()
    assert main(["check", "ACC-1", "ZZZ", "Buy", "1", "10", *dsn]) == 3
    assert "account ACC-1 is blocked" in capsys.readouterr().out
    # another processor name from the beginning adds nothing; one unblock suffices
    p = Processor(s, name="fresh", snapshots=False)
    p.catch_up()
    p.stop()
    assert _kinds(s) == ["LimitViolationDetected", "AccountBlocked"] * 2
    unblock("ACC-1", by="x", reason="y", store=s)
    with pytest.raises(riskbook.RiskbookError, match="not blocked"):
        unblock("ACC-1", by="x", reason="again", store=s)


def test_back_dated_unblock_store_and_processor_agree(fresh_store: Store) -> None:
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    s.append("ACC-1", [trade("ACC-1", "Buy", 150, 1)])
    p = Processor(s)
    p.catch_up()
    unblock("ACC-1", by="x", reason="y", store=s, at="2024-01-01T00:00:00Z")
    at = T0 + timedelta(minutes=5)
    a = check("ACC-1", "ACME", "Buy", 1, 10, processor=p, at=at)
    b = check("ACC-1", "ACME", "Buy", 1, 10, store=s, at=at)
    assert a.reasons == b.reasons and [r.kind for r in a.reasons] == ["limit"]
    p.stop()


def test_a_breach_growing_critical_blocks_at_the_trade_that_made_it_critical(
    fresh_store: Store,
) -> None:
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0)])
    first = s.append("ACC-1", [trade("ACC-1", "Buy", 110, 1)])[0]
    p = Processor(s)
    p.catch_up()
    second = s.append("ACC-1", [trade("ACC-1", "Buy", 30, 2)])[0]
    p.catch_up()
    p.stop()
    found = [(e.event_type, e.causation_id) for e in stored_effects(s)]
    assert found == [("LimitViolationDetected", first.event_id),
                     ("AccountBlocked", second.event_id)]  # fmt: skip


def test_status_running_then_killed_and_once_refused_while_running(fresh_store: Store) -> None:
    s = fresh_store
    s.append("ACC-1", [fund("ACC-1"), limit("ACC-1", 100.0), trade("ACC-1", "Buy", 150, 1)])
    proc = subprocess.Popen([sys.executable, "-m", "riskbook.cli", "live", "--dsn", s.dsn],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            rows = processors(s)
            if rows.height and rows["working"][0] and rows["behind"][0] == 0:
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        second = run("live", "--once", "--dsn", s.dsn)
        assert second.returncode == 1 and second.stderr.count("\n") == 1
        assert "is working on this store" in second.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    deadline = time.monotonic() + 10
    while processors(s)["working"][0]:  # the lock goes with the killed session
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _kinds(s) == ["LimitViolationDetected", "AccountBlocked"]
