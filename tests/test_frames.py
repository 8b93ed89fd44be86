"""History into Polars frames: dtypes, filters, refresh, cache, export."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal

import riskbook
from riskbook.frames import EVENTS_SCHEMA, KINDS, Filters, History, load
from riskbook.store import Store

T0 = datetime(2024, 3, 4, 14, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))


def one_of_each(account: str = "ACC-1", symbol: str = "AAPL") -> list[riskbook.Event]:
    t = T0
    return [
        riskbook.AccountFunded(account_id=account, amount=1e6, funded_at=t),
        riskbook.LimitSet(
            account_id=account,
            limit_type="MaxPositionSize",
            value=500.0,
            set_by="alice",
            set_at=t,
            symbol=symbol,
        ),
        riskbook.TradeExecuted(
            trade_id="T-1",
            account_id=account,
            symbol=symbol,
            side=riskbook.Side.Buy,
            quantity=100.0,
            price=10.5,
            executed_at=t + timedelta(seconds=1),
        ),
        riskbook.TradeExecuted(
            trade_id="T-2",
            account_id=account,
            symbol=symbol,
            side=riskbook.Side.Sell,
            quantity=40.0,
            price=11.0,
            executed_at=t + timedelta(seconds=2),
        ),
        riskbook.TradeCancelled(
            trade_id="T-2", account_id=account, reason="bust", cancelled_at=t + timedelta(seconds=3)
        ),
        riskbook.PositionUpdated(
            account_id=account,
            symbol=symbol,
            previous_quantity=100.0,
            new_quantity=200.0,
            reason="split",
            updated_at=t + timedelta(seconds=4),
        ),
        riskbook.LimitViolationDetected(
            account_id=account,
            limit_type="MaxLeverage",
            current_value=5.0,
            limit_value=4.0,
            detected_at=t + timedelta(seconds=5),
        ),
        riskbook.AccountBlocked(
            account_id=account,
            reason="leverage",
            blocked_by="engine",
            blocked_at=t + timedelta(seconds=6),
        ),
        riskbook.AccountUnblocked(
            account_id=account,
            reason="reviewed",
            unblocked_by="bob",
            unblocked_at=t + timedelta(seconds=7),
        ),
    ]


def assert_same(a: History, b: History) -> None:
    for name in [*KINDS, "events"]:
        assert_frame_equal(a.frame(name), b.frame(name), check_row_order=True)


def test_every_kind_round_trips_with_typed_columns(fresh_store: Store) -> None:
    fresh_store.append("ACC-1", one_of_each())
    fresh_store.append(
        "AAPL",
        [
            riskbook.PriceMarked(
                symbol="AAPL", price=10.75, marked_at=T0 + timedelta(seconds=1, microseconds=250)
            )
        ],
    )
    with psycopg.connect(fresh_store.dsn) as conn:  # a type written by a newer riskbook
        conn.execute(
            "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
            " correlation_id, payload) VALUES (gen_random_uuid(), 'MarginCalled', 'ACC-1',"
            ' \'Account\', 10, \'c\', \'{"type":"MarginCalled","amount":"lots"}\')'
        )
        conn.commit()
    h = load(fresh_store, cache=False)
    for name, kind in KINDS.items():
        assert dict(h.frame(name).schema) == kind.schema, name
    assert dict(h.events.schema) == EVENTS_SCHEMA
    assert [h.frame(n).height for n in KINDS] == [2, 1, 1, 1, 1, 1, 1, 2]
    assert h.events.height == 11
    assert h.events["event_type"].cast(pl.String).to_list()[-1] == "MarginCalled"
    trades = h.trades.to_dicts()
    assert trades[0]["side"] == "Buy" and trades[1]["side"] == "Sell"
    assert trades[0]["executed_at"] == T0 + timedelta(seconds=1)
    assert h.marks["marked_at"][0] == T0 + timedelta(seconds=1, microseconds=250)
    assert h.limits.row(0, named=True) | {} == h.limits.row(0, named=True)
    assert h.limits["set_by"][0] == "alice" and h.limits["symbol"][0] == "AAPL"
    assert h.blocks["blocked"].to_list() == [True, False]
    assert h.blocks["by"].cast(pl.String).to_list() == ["engine", "bob"]
    # the same frames as building them from the envelopes in memory
    assert_same(h, History.from_envelopes(fresh_store.read_all()))
    assert h.horizon > h.events["position"].max()  # type: ignore[operator]


def random_history(store: Store, n: int = 400, seed: int = 5) -> None:
    rng = random.Random(seed)
    accounts = [f"ACC-{i}" for i in range(5)]
    symbols = ["AAPL", "MSFT", "TSLA"]
    trades: dict[str, list[str]] = {a: [] for a in accounts}
    for i in range(n):
        t = T0 + timedelta(minutes=rng.randrange(0, 60 * 24 * 5))
        r = rng.random()
        if r < 0.15:
            s = rng.choice(symbols)
            store.append(s, [riskbook.PriceMarked(symbol=s, price=rng.uniform(5, 50), marked_at=t)])
            continue
        a = rng.choice(accounts)
        if r < 0.65:
            tid = f"T{seed}-{i}"  # one fill per id, however many histories a store gets
            trades[a].append(tid)
            e: riskbook.Event = riskbook.TradeExecuted(
                trade_id=tid,
                account_id=a,
                symbol=rng.choice(symbols),
                side=rng.choice(list(riskbook.Side)),
                quantity=float(rng.randrange(1, 100)),
                price=rng.uniform(5, 50),
                executed_at=t,
            )
        elif r < 0.72 and trades[a]:
            e = riskbook.TradeCancelled(
                trade_id=rng.choice(trades[a]), account_id=a, reason="bust", cancelled_at=t
            )
        elif r < 0.8:
            e = riskbook.AccountFunded(
                account_id=a, amount=rng.choice([1, -1]) * rng.uniform(1e3, 1e5), funded_at=t
            )
        elif r < 0.9:
            kind = rng.choice(list(riskbook.LimitType)).value
            value, by = rng.uniform(1, 1000), rng.choice(["alice", "bob"])
            symbol = rng.choice([None, *symbols])  # drawn always: the same stream of choices
            e = riskbook.LimitSet(
                account_id=a,
                limit_type=kind,
                value=value,
                set_by=by,
                set_at=t,
                symbol=symbol if kind == "MaxPositionSize" else None,  # per symbol only there
            )
        else:
            e = riskbook.PositionUpdated(
                account_id=a,
                symbol=rng.choice(symbols),
                previous_quantity=0.0,
                new_quantity=10.0,
                reason="recon",
                updated_at=t,
            )
        store.append(a, [e])


@pytest.fixture(scope="module")
def populated(make_database: Callable[[], str]) -> Iterator[Store]:
    store = Store(make_database())
    random_history(store)
    yield store
    store.close()


FILTERS = [
    Filters(),
    Filters(accounts=("ACC-1",)),
    Filters(accounts=("ACC-1", "ACC-3")),
    Filters(symbols=("MSFT",)),
    Filters(accounts=("ACC-2",), symbols=("AAPL", "TSLA")),
    Filters(since=T0 + timedelta(days=1), until=T0 + timedelta(days=3)),
    Filters(accounts=("nobody",)),
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: f.key())
def test_filters_give_exactly_the_matching_events(populated: Store, filters: Filters) -> None:
    h = load(
        populated,
        accounts=filters.accounts,
        symbols=filters.symbols,
        since=filters.since,
        until=filters.until,
        cache=False,
    )
    envs = populated.read_all()
    assert_same(h, History.from_envelopes(envs, filters=filters))
    # and, independently of both implementations, by hand:
    bust_symbol = {
        (e.payload.account_id, e.payload.trade_id): e.payload.symbol
        for e in envs
        if e.event_type == "TradeExecuted"
    }  # type: ignore[union-attr]
    expected = set()
    for e in envs:
        p = e.payload
        acc, sym = getattr(p, "account_id", None), getattr(p, "symbol", None)
        if e.event_type == "TradeCancelled":
            sym = bust_symbol[(acc, p.trade_id)]  # type: ignore[union-attr]
        if filters.accounts and e.event_type != "PriceMarked" and acc not in filters.accounts:
            continue
        if filters.symbols and sym is not None and sym not in filters.symbols:
            continue
        if filters.symbols and sym is None and e.event_type in ("PositionUpdated",):
            continue
        busted = e.event_type == "TradeCancelled"  # a bust: whatever its business time
        if not busted and filters.since and p.business_time < filters.since:  # type: ignore[union-attr]
            continue
        if not busted and filters.until and p.business_time > filters.until:  # type: ignore[union-attr]
            continue
        expected.add(str(e.event_id))
    assert set(h.events["event_id"].to_list()) == expected


def test_a_window_keeps_the_busts_that_say_a_later_time(fresh_store: Store) -> None:
    # A trade inside [since, until] busted with a cancelled_at after until: the bust acts
    # as soon as it is known, whatever its cancelled_at (DESIGN §4), so the window's
    # positions are those of the whole history at until. The window dropped the bust
    # and the fat finger counted again, in load, in memory and in exports.
    t = T0 + timedelta(hours=1)

    def buy(trade_id: str, quantity: float) -> riskbook.TradeExecuted:
        return riskbook.TradeExecuted(
            trade_id=trade_id, account_id="ACC-1", symbol="AAPL", side=riskbook.Side.Buy,
            quantity=quantity, price=10.0, executed_at=t,
        )  # fmt: skip

    def bust(trade_id: str, when: datetime) -> riskbook.TradeCancelled:
        return riskbook.TradeCancelled(
            trade_id=trade_id, account_id="ACC-1", reason="bust", cancelled_at=when
        )

    fresh_store.append(
        "ACC-1",
        [buy("good", 100), buy("fat", 900), bust("fat", t + timedelta(hours=2)),
         bust("none", T0 - timedelta(days=1))],
    )  # fmt: skip
    until = t + timedelta(minutes=1)
    whole = riskbook.positions(load(fresh_store, cache=False), at=until)
    assert whole["quantity"].to_list() == [100.0]
    envs = fresh_store.read_all()
    for since in (None, t - timedelta(minutes=1)):
        filters = Filters(since=since, until=until)
        for h in (
            load(fresh_store, since=since, until=until, cache=False),
            History.from_envelopes(envs, filters=filters),
        ):
            assert h.cancels.height == 2  # both busts; the one of no trade changes nothing
            if since is None:
                assert riskbook.positions(h)["quantity"].to_list() == [100.0]
            else:  # what came before since is missing: no figures from it
                with pytest.raises(riskbook.RiskbookError, match="needs every earlier event"):
                    riskbook.positions(h)


def test_known_at_keeps_what_was_recorded_by_then(populated: Store) -> None:
    envs = populated.read_all()
    cut = envs[len(envs) // 2].timestamp
    h = load(populated, known_at=cut, cache=False)
    assert set(h.events["event_id"].to_list()) == {
        str(e.event_id) for e in envs if e.timestamp <= cut
    }
    assert h.events["timestamp"].max() <= cut  # type: ignore[operator]


def test_bad_filters_are_clear_errors(populated: Store) -> None:
    with pytest.raises(ValueError, match="known_at has no time zone"):
        load(populated, known_at=datetime(2024, 1, 1), cache=False)
    with pytest.raises(ValueError, match="since"):
        load(populated, since="last tuesday", cache=False)


def test_refresh_after_concurrent_appends_equals_a_fresh_load(fresh_store: Store) -> None:
    random_history(fresh_store, n=100, seed=1)
    h = load(fresh_store, cache=False)
    before = h.horizon

    def writer(w: int) -> None:
        for i in range(30):
            fresh_store.append(
                f"W-{w}",
                [riskbook.AccountFunded(account_id=f"W-{w}", amount=1.0 + i, funded_at=T0)],
            )

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for _ in range(5):  # refresh while they write
        h.refresh()
    for t in threads:
        t.join()
    added = h.refresh()
    assert h.horizon > before and added >= 0
    assert_same(h, load(fresh_store, cache=False))
    assert h.refresh() == 0


def test_cache_hit_equals_a_fresh_load_and_reads_only_the_delta(fresh_store: Store) -> None:
    random_history(fresh_store, n=120, seed=2)
    first = load(fresh_store)
    fresh_store.append("ACC-9", one_of_each("ACC-9"))
    again = load(fresh_store)  # from the cache, plus the 9 new events
    assert again.events.height == first.events.height + 9
    assert_same(again, load(fresh_store, cache=False))
    third = load(fresh_store)  # cache now has two segments
    assert_same(third, again)


def test_a_cache_of_another_or_rewritten_database_is_not_used(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = make_database()
    store = Store(dsn)
    store.append("ACC-1", one_of_each())
    cached = load(store)
    assert cached.events.height == 9
    # another database gets a cache of its own
    other = Store(make_database())
    other.append("ACC-2", one_of_each("ACC-2")[:3])
    assert load(other).events.height == 3
    # the same store id with a different history (a restored older copy, say): the
    # cached last event is not where the cache says, so the cache is not used
    with psycopg.connect(dsn) as conn:
        store_id = conn.execute("SELECT store_id FROM riskbook_store").fetchone()[0]  # type: ignore[index]
    with psycopg.connect(other.dsn) as conn:
        conn.execute("ALTER TABLE riskbook_store DISABLE TRIGGER ALL")
        conn.execute("UPDATE riskbook_store SET store_id = %s", (store_id,))
        conn.commit()
    h = load(other)
    assert h.events.height == 3
    assert set(h.events["aggregate_id"].cast(pl.String)) == {"ACC-2"}
    store.close()
    other.close()


def test_export_round_trips(populated: Store, tmp_path: Path) -> None:
    h = load(populated, accounts=["ACC-1", "ACC-4"], cache=False)
    h.to_parquet(tmp_path / "copy")
    back = History.from_parquet(tmp_path / "copy")
    assert_same(back, h)
    assert back.filters == h.filters and back.horizon == h.horizon and back.store_id == h.store_id
    (tmp_path / "copy" / "trades.parquet").unlink()
    with pytest.raises(riskbook.RiskbookError):
        History.from_parquet(tmp_path / "copy")


def test_load_of_an_empty_store(fresh_store: Store) -> None:
    h = load(fresh_store, cache=False)
    assert len(h) == 0 and h.trades.schema == pl.Schema(KINDS["trades"].schema)
    fresh_store.append("ACC-1", one_of_each()[:2])
    assert h.refresh() == 2 and h.limits.height == 1


def test_unique_event_ids(populated: Store) -> None:
    h = load(populated, cache=False)
    assert h.events["event_id"].n_unique() == h.events.height
    assert all(uuid.UUID(x) for x in h.trades["event_id"].head(5))


def _trade(trade_id: str, symbol: str, account: str = "ACC-1") -> riskbook.TradeExecuted:
    return riskbook.TradeExecuted(
        trade_id=trade_id,
        account_id=account,
        symbol=symbol,
        side=riskbook.Side.Buy,
        quantity=5.0,
        price=10.0,
        executed_at=T0,
    )


def _bust(trade_id: str, account: str = "ACC-1") -> riskbook.TradeCancelled:
    return riskbook.TradeCancelled(
        trade_id=trade_id, account_id=account, reason="bust", cancelled_at=T0 + timedelta(hours=1)
    )


@pytest.mark.parametrize("route", ["copy", "csv", "adbc"])
def test_a_bust_recorded_before_its_trade_comes_in_with_the_trade(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    monkeypatch.setenv("RISKBOOK_LOAD_ROUTE", route)
    s = fresh_store
    s.append("ACC-1", [_trade("T-1", "MSFT"), _bust("T-9"), _bust("T-1")])
    s.append("ACC-2", [_bust("T-9", "ACC-2")])  # another account's, same trade id
    s.append("ACC-3", [_bust("T-7", "ACC-3")])  # a trade of another symbol will come
    filters = [{"symbols": ["MSFT"]}, {"symbols": ["MSFT"], "accounts": ["ACC-1"]}]
    cached = [load(s, **f) for f in filters]  # both through the cache
    plain = [load(s, **f, cache=False) for f in filters]
    assert [h.cancels.height for h in plain] == [1, 1]  # T-1's bust; T-9's trade is not here
    s.append("ACC-1", [_trade("T-9", "MSFT")])
    s.append("ACC-2", [_trade("T-9", "MSFT", "ACC-2")])
    s.append("ACC-3", [_trade("T-7", "AAPL", "ACC-3")])
    for f, a, b in zip(filters, cached, plain, strict=True):
        want = load(s, **f, cache=False)
        new = want.events.height - b.events.height
        assert new == (4 if "accounts" not in f else 2)  # the trades and their busts
        assert a.refresh() == new and b.refresh() == new
        assert_same(a, want)
        assert_same(b, want)
        envelopes = s.read_all()
        assert_same(want, History.from_envelopes(envelopes, filters=want.filters))
        assert_same(load(s, **f), want)  # the cache has them too
        busted = set(want.cancels["trade_id"])
        assert busted == {"T-1", "T-9"}
        assert want.cancels["position"].is_sorted() and want.events["position"].is_sorted()
        assert riskbook.positions(a).filter(pl.col("quantity") != 0).height == 0
    assert plain[0].cancels.height == 3 and plain[1].cancels.height == 2
    # a trade of the same id again is refused (one fill per id); another trade of the
    # symbol comes in alone: the busts are in already, not brought in again
    with pytest.raises(riskbook.InvalidEvent, match="is stored already"):
        s.append("ACC-1", [_trade("T-9", "MSFT")])
    s.append("ACC-1", [_trade("T-10", "MSFT")])
    for f, a, b in zip(filters, cached, plain, strict=True):
        assert a.refresh() == b.refresh() == 1
        assert_same(a, load(s, **f, cache=False))
        assert_same(b, a)
        assert_same(load(s, **f), a)


def test_figures_refuse_a_history_that_lost_what_they_fold(fresh_store: Store) -> None:
    # Reloaded from a `riskbook export --since` copy, the account had cash -5,000 and
    # infinite leverage instead of equity 10,000, with no word: the state before since
    # was missing. A symbols filter leaves out the account's other symbols likewise.
    fresh_store.append("ACC-1", one_of_each())
    since = load(fresh_store, since=T0 + timedelta(seconds=2), cache=False)
    for figures in (riskbook.positions, riskbook.accounts, riskbook.position_timeline,
                    riskbook.account_timeline, riskbook.marks):  # fmt: skip
        with pytest.raises(riskbook.RiskbookError, match="needs every earlier event"):
            figures(since)
    one_symbol = load(fresh_store, symbols="AAPL", cache=False)
    for figures in (riskbook.accounts, riskbook.account_timeline):
        with pytest.raises(riskbook.RiskbookError, match="needs every symbol of an account"):
            figures(one_symbol)
    whole = load(fresh_store, cache=False)
    assert_frame_equal(riskbook.positions(one_symbol), riskbook.positions(whole))
    until = load(fresh_store, until=T0 + timedelta(seconds=2), cache=False)
    assert_frame_equal(
        riskbook.accounts(until), riskbook.accounts(whole, at=T0 + timedelta(seconds=2))
    )


def _funded(amount: float, account: str = "ACC-1") -> list[riskbook.Event]:
    return [riskbook.AccountFunded(account_id=account, amount=amount, funded_at=T0)]


def test_refresh_refuses_a_store_whose_history_was_rewritten(fresh_store: Store) -> None:
    # A restored older backup keeps the store's identity, not its history: refreshed,
    # the History chained the two histories and cached the mixture for every load.
    s = fresh_store
    s.append("ACC-1", _funded(1.0))
    s.append("ACC-1", _funded(1000.0))
    h = load(s)  # cached
    with psycopg.connect(s.dsn) as conn:  # as the backup had it: the first event only
        conn.execute("SET session_replication_role = replica")  # past the append-only guards
        last = h.events["position"][-1]
        conn.execute("DELETE FROM event_fields WHERE position = %s", (last,))
        conn.execute("DELETE FROM events WHERE position = %s", (last,))
        conn.commit()
    s.append("ACC-2", _funded(7.0, "ACC-2"))  # trading goes on
    with pytest.raises(riskbook.RiskbookError, match=r"rewritten or replaced.*Load it again"):
        h.refresh()
    assert h.funding["amount"].to_list() == [1.0, 1000.0]  # nothing was added
    fresh = load(s, cache=False)
    assert fresh.funding["amount"].to_list() == [1.0, 7.0]
    assert_same(load(s), fresh)  # nor cached
    # a History with no events yet checks the identity alone, and refreshes as before
    empty = load(s, accounts=["nobody"])
    s.append("ACC-3", _funded(3.0, "ACC-3"))
    assert empty.refresh() == 0 and empty.horizon > fresh.horizon


def test_refresh_refuses_a_database_dropped_and_created_again(
    make_database: Callable[[], str],
) -> None:
    dsn = make_database()
    store = Store(dsn)
    store.append("OLD", _funded(100.0, "OLD"))
    h = load(store)
    store.close()
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(psycopg.conninfo.make_conninfo(dsn, dbname="postgres")) as admin:
        admin.autocommit = True
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    again = Store(dsn)  # the same DSN, a new store
    again.append("NEW", _funded(5.0, "NEW"))
    with pytest.raises(riskbook.RiskbookError, match="rewritten or replaced"):
        h.refresh()
    assert h.funding["account_id"].cast(pl.String).to_list() == ["OLD"]
    assert_same(load(again), load(again, cache=False))
    again.close()
    store.close()  # the connection the refresh opened


def _trade_of(**changes: object) -> riskbook.TradeExecuted:
    fields: dict[str, object] = {
        "trade_id": "T-1",
        "account_id": "ACC-1",
        "symbol": "AAPL",
        "side": riskbook.Side.Buy,
        "quantity": 3.0,
        "price": 10.0,
        "executed_at": T0,
    }
    return riskbook.TradeExecuted(**(fields | changes))  # type: ignore[arg-type]


def test_histories_built_in_memory_check_events_as_append_does() -> None:
    # a quantity given as text was taken (as 3.0), which append refuses; a time given
    # as RFC 3339 text, which append takes, failed with a raw Polars error
    for bad, field_name in (
        (_trade_of(quantity="3"), "quantity"),
        (_trade_of(executed_at=T0.date()), "executed_at"),
        (_trade_of(side="buy"), "side"),
    ):
        with pytest.raises(riskbook.InvalidEvent, match=f"TradeExecuted.{field_name}"):
            History.from_events(bad)
        envelope = riskbook.Envelope(uuid.uuid4(), "ACC-1", "Account", 1, T0, bad, "c")
        with pytest.raises(riskbook.InvalidEvent, match=f"TradeExecuted.{field_name}"):
            History.from_envelopes([envelope])
    text = _trade_of(executed_at="2024-03-04T15:30:00+01:00")
    h = History.from_events(text)
    assert h.trades["executed_at"].to_list() == [T0] and h.events["timestamp"].to_list() == [T0]
    envelope = riskbook.Envelope(uuid.uuid4(), "ACC-1", "Account", 1, T0, text, "c")
    same = riskbook.Envelope(envelope.event_id, "ACC-1", "Account", 1, T0, _trade_of(), "c")
    assert_same(History.from_envelopes([envelope]), History.from_envelopes([same]))
    filtered = History.from_envelopes([envelope], filters=Filters(until=T0))
    assert filtered.trades.height == 1
    # but a stored limit of a type no plugin here registers reads, as in load and read
    from riskbook.events import read_payload

    stored = read_payload(
        "LimitSet",
        b'{"type":"LimitSet","account_id":"ACC-1","limit_type":"MaxVaRNotHere","value":5.0,'
        b'"set_by":"r","set_at":"2024-03-04T14:30:00Z"}',
    )
    assert not isinstance(stored, riskbook.RawEvent)
    read = riskbook.Envelope(uuid.uuid4(), "ACC-1", "Account", 1, T0, stored, "c")
    assert History.from_envelopes([read]).limits["limit_type"].to_list() == ["MaxVaRNotHere"]


def test_an_envelopes_recorded_time_without_a_zone_reads_as_utc() -> None:
    # the frames are built from microseconds since the epoch: a naive recorded time (an
    # envelope built by hand) is UTC, as it was when Polars took the datetimes itself
    naive = T0.replace(tzinfo=None)
    paris = T0.astimezone(timezone(timedelta(hours=1)))
    built = [
        History.from_envelopes(
            [riskbook.Envelope(uuid.UUID(int=1), "ACC-1", "Account", 1, at, _trade_of(), "c")]
        )
        for at in (T0, naive, paris)
    ]
    for h in built:
        assert h.events["timestamp"].to_list() == [T0]
        assert h.trades["timestamp"].to_list() == [T0]
        assert_same(built[0], h)
