"""riskbook.audit.explain and `riskbook incidents` / `riskbook explain`: an alarm
reconstructed from the history, checked against the sample's answer key and against
small histories built to disagree with their own record."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import riskbook
from riskbook import audit, limits
from riskbook.demo import SAMPLE
from riskbook.events import register_limit_type_name
from tests.test_cli import run
from tests.test_widgets import (
    T0,
    _at,
    _Envelopes,
    _fill,
    _limit,
    _violation,
    gross_notional,
)

KEY = {
    i["kind"]: i for i in json.loads(SAMPLE.with_name("sample.key.json").read_text())["incidents"]
}


@pytest.fixture(scope="module")
def sample_dsn(make_database: Callable[[], str]) -> Iterator[str]:
    dsn = make_database()
    with riskbook.Store(dsn) as store:
        store.import_jsonl(SAMPLE)
    yield dsn


@pytest.fixture(scope="module")
def sample(sample_dsn: str) -> riskbook.History:
    with riskbook.Store(sample_dsn) as store:
        return riskbook.load(store, cache=False, progress=False)


# ----------------------------------------------------------------------------- the sample


@pytest.mark.parametrize("kind", sorted(KEY))
def test_every_planted_alarm_is_explained_as_the_answer_key_has_it(
    sample: riskbook.History, kind: str
) -> None:
    key = KEY[kind]
    incident = audit.explain(sample, key["violation_event_id"])
    assert incident.event["event_type"] == "LimitViolationDetected"
    assert incident.event["account_id"] == key["account_id"]
    assert (incident.limit_type, incident.symbol) == (key["limit_type"], key["symbol"])
    assert incident.cause is not None and incident.cause["event_id"] == key["trigger_event_id"]
    assert incident.limit is not None
    assert incident.limit["event_id"] == key["limit_event_id"]
    assert incident.limit["set_by"] == key["limit_set_by"]
    assert incident.limit["value"] == key["limit_value"]
    assert incident.engine_saw == pytest.approx(key["value_at_trigger"], rel=1e-9)
    assert incident.violation is not None and incident.violation["same_cause"]
    assert incident.violation["current_value"] == pytest.approx(incident.engine_saw, rel=1e-9)
    # just before its cause was recorded the account was within the limit
    assert incident.before is not None and incident.before <= key["limit_value"]
    if kind == "busted_trade":  # right on what was known; gone from the corrected history
        assert incident.still_a_breach is False
        assert len(incident.findings) == 1
        assert "1 trade of the account busted after the alarm" in incident.findings[0]
    else:
        assert incident.still_a_breach is True
        assert incident.findings == []
    text = incident.report()
    assert key["trigger_event_id"] in text and key["limit_set_by"] in text
    assert ("Findings\n  none:" in text) is (kind != "busted_trade")


def test_a_block_is_explained_with_its_violation_and_the_unblock(
    sample: riskbook.History,
) -> None:
    key = KEY["fat_finger"]
    block = audit.explain(sample, key["block_event_id"])
    assert block.event["event_type"] == "AccountBlocked"
    assert block.violation is not None and block.violation["same_cause"]
    assert block.violation["event_id"] == key["violation_event_id"]
    assert block.unblocked is not None
    assert block.unblocked["event_id"] == key["unblock_event_id"]
    relations = dict(zip(block.chain["event_id"], block.chain["relation"], strict=True))
    assert relations[key["trigger_event_id"]] == "cause"
    assert relations[key["violation_event_id"]] == "same cause"
    assert "Unblocked 2024-01-09 16:45:02.790691 UTC by r.silva" in block.report()

    # a block later in the breach than its start: the violation is the breach's start,
    # found through the correlation; its figures are not the block's own
    spiral = KEY["drawdown_spiral"]
    later = audit.explain(sample, spiral["block_event_id"])
    assert later.violation is not None and not later.violation["same_cause"]
    assert later.violation["event_id"] == spiral["violation_event_id"]
    assert later.findings == []
    assert later.engine_saw is not None and later.engine_saw > 1.2 * spiral["limit_value"]
    assert "the breach began" in later.report()


def test_an_event_that_is_not_an_alarm_is_explained_by_its_effects(
    sample: riskbook.History,
) -> None:
    key = KEY["drawdown_spiral"]
    mark = audit.explain(sample, key["trigger_event_id"])  # a mark: no account
    assert mark.event["account_id"] is None and mark.limit_type is None
    assert mark.cause is None and mark.findings == []
    effects = mark.chain.filter(mark.chain["relation"] == "effect")["event_id"].to_list()
    assert key["violation_event_id"] in effects
    text = mark.report()
    assert "Findings" not in text and "none on record" in text
    # the report shows a few of the 80-odd marks of its correlation, and the alarms
    assert "more events of the same correlation" in text
    assert key["block_event_id"] in text

    with pytest.raises(KeyError, match="no event"):
        audit.explain(sample, "00000000-0000-4000-8000-000000000000")
    with pytest.raises(KeyError, match="not a UUID"):
        audit.explain(sample, "nope")


# ----------------------------------------------------------------------------- disagreements


def _alarm(value_written: float, limit_written: float, *, limit_value: float = 40.0) -> _Envelopes:
    """Account A with a MaxPositionSize limit, a fill of 50 and a violation of it."""
    e = _Envelopes()
    e.add(riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0))
    e.add(_limit("MaxPositionSize", limit_value))
    fill = e.add(_fill(1, 50.0, _at(1)))
    e.add(
        _violation("MaxPositionSize", value_written, limit_written, _at(1, seconds=1), "ACME"),
        cause=fill,
    )
    return e


def test_findings_name_each_disagreement_between_record_and_history() -> None:
    agreeing = _alarm(50.0, 40.0)
    assert audit.explain(agreeing.history(), _alarm_id(agreeing)).findings == []

    wrong_metric = _alarm(55.0, 40.0)
    found = audit.explain(wrong_metric.history(), _alarm_id(wrong_metric)).findings
    assert found == ["the engine wrote a metric of 55; the history as known then rebuilds 50"]

    wrong_limit = _alarm(50.0, 45.0)
    found = audit.explain(wrong_limit.history(), _alarm_id(wrong_limit)).findings
    assert len(found) == 1 and "wrote a limit of 45, but the MaxPositionSize in force" in found[0]

    within = _alarm(50.0, 60.0, limit_value=60.0)  # 50 is within 60: no breach at all
    found = audit.explain(within.history(), _alarm_id(within)).findings
    assert len(found) == 1 and "was within the limit (60)" in found[0]

    e = _Envelopes()  # no limit in force: the violation names a limit nobody set
    fill = e.add(_fill(1, 50.0, _at(1)))
    e.add(_violation("MaxPositionSize", 50.0, 40.0, _at(1), "ACME"), cause=fill)
    incident = audit.explain(e.history(), e.items[-1].event_id)
    assert incident.limit is None
    assert incident.findings[0].startswith("no MaxPositionSize was in force")
    assert "no MaxPositionSize on ACME was in force" in incident.report()


def _alarm_id(e: _Envelopes) -> str:
    return str(e.items[-1].event_id)


def test_the_limit_is_the_one_known_when_the_alarm_was_recorded() -> None:
    """A limit raised with a set_at before the alarm but recorded after it: the engine
    could not know it. The alarm is judged against the old limit; today the breach is
    gone, which the findings say."""
    e = _alarm(50.0, 40.0)
    e.add(_limit("MaxPositionSize", 100.0, _at(0.5)), recorded=_at(30))
    incident = audit.explain(e.history(), str(e.items[3].event_id))
    assert incident.limit is not None and incident.limit["value"] == 40.0
    assert incident.corrected == 50.0 and incident.engine_saw == 50.0
    assert incident.still_a_breach is True  # against the limit known then
    assert incident.findings == []


def test_a_registered_limit_type_is_judged_by_its_own_metric() -> None:
    limits.register(
        limits.LimitSpec("MaxGrossAudit", "account", "USD", gross_notional), replace=True
    )
    e = _Envelopes()
    e.add(riskbook.AccountFunded(account_id="A", amount=1000.0, funded_at=T0))
    e.add(_limit("MaxGrossAudit", 40.0))
    fill = e.add(_fill(1, 10.0, _at(1)))  # 10 @ 5: a gross exposure of 50
    v = e.add(_violation("MaxGrossAudit", 50.0, 40.0, _at(1)), cause=fill)
    register_limit_type_name("MaxNobodyKnows", per_symbol=False)  # a name, no definition
    e.add(_limit("MaxNobodyKnows", 1.0))
    w = e.add(_violation("MaxNobodyKnows", 2.0, 1.0, _at(2)), cause=fill)
    h = e.history()
    incident = audit.explain(h, str(v.event_id))
    assert (incident.before, incident.engine_saw, incident.findings) == (0.0, 50.0, [])
    assert incident.metric_name == "metric"
    unknown = audit.explain(h, str(w.event_id))
    assert unknown.engine_saw is None
    assert "no definition of the limit type MaxNobodyKnows" in unknown.findings[0]
    assert "not available" in unknown.report()


def test_a_block_with_no_unblock_says_the_account_is_still_blocked() -> None:
    e = _alarm(50.0, 40.0)
    fill = e.items[2]
    block = e.add(
        riskbook.AccountBlocked(
            account_id="A",
            reason="critical",
            blocked_by="risk-engine",
            blocked_at=_at(1, seconds=2),
        ),
        cause=fill,
    )
    incident = audit.explain(e.history(), str(block.event_id))
    assert incident.unblocked is None
    assert "Unblocked: not on record (the account is still blocked)" in incident.report()


def test_to_dict_is_json_with_times_as_text_and_infinity_as_the_largest_double() -> None:
    e = _Envelopes()
    e.add(_limit("MaxLeverage", 3.0))
    fill = e.add(_fill(1, 50.0, _at(1)))  # no funding: equity <= 0, an infinite leverage
    v = e.add(_violation("MaxLeverage", riskbook.events.STORED_INFINITY, 3.0, _at(1)), cause=fill)
    incident = audit.explain(e.history(), str(v.event_id))
    assert incident.engine_saw == math.inf and incident.findings == []
    data = json.loads(incident.to_json())
    assert data["metric"]["engine_saw"] == riskbook.events.STORED_INFINITY
    assert data["event"]["occurred_at"].endswith("Z") and data["chain"][0]["relation"] == "cause"
    assert "infinite" in incident.report()


# ----------------------------------------------------------------------------- the command


def test_incidents_and_explain_commands(sample_dsn: str, tmp_path: Path) -> None:
    listed = run("incidents", "--dsn", sample_dsn, "--format", "csv")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.strip().splitlines()
    assert header.startswith("occurred_at,recorded_at,event_type,account_id,limit_type")
    ids = {k["violation_event_id"] for k in KEY.values()}
    ids |= {k["block_event_id"] for k in KEY.values() if k["block_event_id"]}
    assert {r.split(",")[6] for r in rows} == ids

    key = KEY["fat_finger"]
    text = run("explain", key["block_event_id"].upper(), "--dsn", sample_dsn)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"AccountBlocked {key['block_event_id']}\n")
    assert f"set by {key['limit_set_by']}" in text.stdout
    assert "Unblocked 2024-01-09 16:45:02.790691 UTC by r.silva" in text.stdout

    out = tmp_path / "incident.json"
    as_json = run(
        "explain", KEY["busted_trade"]["violation_event_id"], "--format", "json", "-o", str(out),
        "--dsn", sample_dsn,
    )  # fmt: skip
    assert as_json.returncode == 0 and as_json.stdout == "", as_json.stderr
    data = json.loads(out.read_text())
    assert data["metric"]["still_a_breach"] is False and len(data["findings"]) == 1

    for bad, said in (
        ("nope", "'nope' is not an event id (a UUID)"),
        ("00000000-0000-4000-8000-000000000000", "no event 00000000-0000-4000-8000-000000000000"),
    ):
        failed = run("explain", bad, "--dsn", sample_dsn)
        assert failed.returncode == 1 and said in failed.stderr and failed.stdout == ""
        assert len(failed.stderr.strip().splitlines()) == 1
