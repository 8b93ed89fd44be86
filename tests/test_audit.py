"""riskbook.audit.explain and `riskbook incidents` / `riskbook explain`: an alarm
reconstructed from the history, checked against the sample's answer key and against
small histories built to disagree with their own record."""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
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
    assert incident.checked and incident.findings == []  # the engine was right
    assert [(r["kind"], r["limit_type"], r["symbol"]) for r in incident.replayed][:1] == [
        ("LimitViolationDetected", key["limit_type"], key["symbol"])
    ]
    if kind == "busted_trade":  # right on what was known; gone from the history known now
        assert incident.still_a_breach is False
        assert any("1 trade of the account busted since" in n for n in incident.notes)
    else:
        assert incident.still_a_breach is True
        assert incident.notes == []
    text = incident.report()
    assert key["trigger_event_id"] in text and key["limit_set_by"] in text
    assert "Findings\n  none: the engine replayed over what it knew decides this alarm" in text


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
    assert (later.limit_type, later.symbol) == ("MaxDrawdown", None)  # from the replay
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
    assert found == ["the engine wrote a metric of 55; replayed over what it knew, it is 50"]

    wrong_limit = _alarm(50.0, 45.0)
    found = audit.explain(wrong_limit.history(), _alarm_id(wrong_limit)).findings
    assert found == [
        "the engine wrote a limit of 45; the limit in force as it knew it was 40 (set by cro)"
    ]

    within = _alarm(50.0, 60.0, limit_value=60.0)  # 50 is within 60: no breach at all
    found = audit.explain(within.history(), _alarm_id(within)).findings
    assert found == [
        "replayed over what it knew up to the cause, after the cause the metric was 50,"
        " within the limit of 60"
    ]

    e = _Envelopes()  # no limit in force: the violation names a limit nobody set
    fill = e.add(_fill(1, 50.0, _at(1)))
    e.add(_violation("MaxPositionSize", 50.0, 40.0, _at(1), "ACME"), cause=fill)
    incident = audit.explain(e.history(), e.items[-1].event_id)
    assert incident.limit is None
    assert incident.findings == [
        "replayed over what it knew up to the cause, no MaxPositionSize on ACME was in force"
        " as the engine knew it"
    ]

    again = _alarm(50.0, 40.0)  # a second violation inside the breach the first started
    fill = again.add(_fill(2, 5.0, _at(2)))
    again.add(_violation("MaxPositionSize", 55.0, 40.0, _at(2), "ACME"), cause=fill)
    found = audit.explain(again.history(), _alarm_id(again)).findings
    assert len(found) == 1 and "the breach was open already before the cause" in found[0]

    e = _alarm(50.0, 40.0)  # the cause is not in the history
    e.items[-1] = dataclasses.replace(e.items[-1], causation_id=uuid.uuid4())
    found = audit.explain(e.history(), _alarm_id(e)).findings
    assert len(found) == 1 and "is not in this history" in found[0]

    e = _alarm(50.0, 40.0)  # detected before its cause happened
    e.items[-1] = dataclasses.replace(
        e.items[-1], payload=msgspec.structs.replace(e.items[-1].payload, detected_at=T0)
    )
    found = audit.explain(e.history(), _alarm_id(e)).findings
    assert len(found) == 1 and found[0].startswith("the engine wrote detected_at")


def test_same_time_fills_are_judged_at_the_one_that_triggered() -> None:
    """Two fills of one order at the same microsecond, the first taking the position
    over: the engine acted after the first; the second does not make it wrong."""
    e = _Envelopes()
    e.add(riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0))
    e.add(_limit("MaxPositionSize", 100.0))
    first = e.add(_fill(1, 110.0, _at(1)))
    e.add(_fill(2, -50.0, _at(1)))  # same business time, stored after
    v = e.add(_violation("MaxPositionSize", 110.0, 100.0, _at(1), "ACME"), cause=first)
    incident = audit.explain(e.history(), str(v.event_id))
    assert incident.findings == [] and incident.engine_saw == 110.0
    assert incident.corrected == 60.0 and incident.still_a_breach is False
    assert "another at the same time" in incident.notes[0]


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
    assert incident.corrected_limit == 100.0 and incident.still_a_breach is False
    assert incident.findings == []
    assert "a limit recorded since applies at that time" in incident.notes[0]


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
    assert unknown.engine_saw is None and not unknown.checked and unknown.findings == []
    assert "no definition of the limit type MaxNobodyKnows" in unknown.notes[0]
    assert "not checked" in unknown.report()


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
    # 50 against 40 is under the critical level (1.2 x 40 = 48 < 50: over it, in fact)
    assert (incident.limit_type, incident.symbol, incident.findings) == (
        "MaxPositionSize",
        "ACME",
        [],
    )
    lenient = audit.explain(e.history(), str(block.event_id), critical=2.0)
    assert len(lenient.findings) == 1 and "critical factor 2" in lenient.findings[0]

    manual = _alarm(50.0, 40.0)
    by_hand = manual.add(
        riskbook.AccountBlocked(
            account_id="A", reason="compliance", blocked_by="j.doe", blocked_at=_at(5)
        )
    )
    incident = audit.explain(manual.history(), str(by_hand.event_id))
    assert not incident.checked and incident.findings == []
    assert "a person's decision" in incident.notes[0]


def _engine_wrote(e: _Envelopes, critical: float) -> None:
    """Append what a live engine of this critical factor decides over ``e``."""
    from riskbook.live import Engine

    by_id = {str(x.event_id): x for x in e.items}
    for effect in Engine(critical=critical).apply(e.history(), written=False):
        e.add(effect.event, cause=by_id[effect.causation_id])


def test_the_critical_factor_is_the_one_the_blocks_on_record_state() -> None:
    # A processor run with --critical 1.5 blocked at 65 against 40, not at 50 (1.25x);
    # judged with the default 1.2, its block read as one the engine would not decide.
    e = _Envelopes()
    e.add(riskbook.AccountFunded(account_id="A", amount=1e6, funded_at=T0))
    e.add(_limit("MaxPositionSize", 40.0))
    e.add(_fill(1, 50.0, _at(1)))
    e.add(_fill(2, 15.0, _at(2)))
    _engine_wrote(e, 1.5)
    block = next(x for x in e.items if isinstance(x.payload, riskbook.AccountBlocked))
    assert block.payload.reason.endswith("> 1.5 x limit 40")
    incident = audit.explain(e.history(), str(block.event_id))
    assert incident.checked and incident.findings == []
    assert incident.engine_saw == 65.0 and incident.violation is not None
    said = [n for n in incident.notes if "critical factor" in n]
    assert said == [
        "the critical factor is the one the engine's blocks on record state: MaxPositionSize"
        " 1.5, any other 1.2 (riskbook explain --critical F says otherwise)"
    ]
    told = audit.explain(e.history(), str(block.event_id), critical=1.2)
    assert len(told.findings) == 1 and "critical factor 1.2" in told.findings[0]

    # another processor's block at 2x on record: this block's own reason still rules
    other = _Envelopes()
    other.items = list(e.items)
    other.add(
        riskbook.AccountBlocked(
            account_id="B",
            reason="critical MaxPositionSize ACME: 99 > 2 x limit 40",
            blocked_by="riskbook-live",
            blocked_at=_at(3),
        )
    )
    assert audit.explain(other.history(), str(block.event_id)).findings == []

    # a block whose reason states no factor, two factors on record: the default, and a
    # note saying so (50 > 1.2 x 40 = 48: the default blocks here)
    mixed = _alarm(50.0, 40.0)
    own = mixed.add(
        riskbook.AccountBlocked(
            account_id="A",
            reason="over the limit",
            blocked_by="riskbook-live",
            blocked_at=_at(1, seconds=2),
        ),
        cause=mixed.items[2],
    )
    for account, level in (("B", 1.5), ("C", 2.0)):
        mixed.add(
            riskbook.AccountBlocked(
                account_id=account,
                reason=f"critical MaxPositionSize ACME: 99 > {level:g} x limit 40",
                blocked_by="riskbook-live",
                blocked_at=_at(3),
            )
        )
    incident = audit.explain(mixed.history(), str(own.event_id))
    assert incident.checked and incident.findings == []
    assert any("more than one critical factor for MaxPositionSize" in n for n in incident.notes)

    # the default factor on record: nothing to say
    plain = _Envelopes()
    plain.items = list(e.items[:4])
    _engine_wrote(plain, 1.2)
    block = next(x for x in plain.items if isinstance(x.payload, riskbook.AccountBlocked))
    incident = audit.explain(plain.history(), str(block.event_id))
    assert incident.findings == [] and not any("critical factor" in n for n in incident.notes)


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
    assert (
        "Findings\n  none: the engine replayed over what it knew decides this alarm" in text.stdout
    )
    lenient = run("explain", key["block_event_id"], "--critical", "2", "--dsn", sample_dsn)
    assert "the engine (critical factor 2) decides no block here" in lenient.stdout

    out = tmp_path / "incident.json"
    as_json = run(
        "explain", KEY["busted_trade"]["violation_event_id"], "--format", "json", "-o", str(out),
        "--dsn", sample_dsn,
    )  # fmt: skip
    assert as_json.returncode == 0 and as_json.stdout == "", as_json.stderr
    data = json.loads(out.read_text())
    assert data["metric"]["still_a_breach"] is False and data["findings"] == []
    assert data["checked"] and len(data["notes"]) == 1

    for bad, said in (
        ("nope", "'nope' is not an event id (a UUID)"),
        ("00000000-0000-4000-8000-000000000000", "no event 00000000-0000-4000-8000-000000000000"),
    ):
        failed = run("explain", bad, "--dsn", sample_dsn)
        assert failed.returncode == 1 and said in failed.stderr and failed.stdout == ""
        assert len(failed.stderr.strip().splitlines()) == 1
