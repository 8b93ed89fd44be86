"""Migrations in odd databases: the store's schema not first on the search_path, a
store in a schema the connection does not reach, old rows written by raw SQL, and
followers woken by strangers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

import riskbook
from riskbook.errors import StoreError
from riskbook.store import Store, migrations


def with_options(dsn: str, options: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    parts["options"] = options
    return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]


def tables_named(dsn: str, name: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relname = %s ORDER BY 1",
                (name,),
            )
        ]


def funded(account: str) -> riskbook.AccountFunded:
    return riskbook.AccountFunded(
        account_id=account, amount=5.0, funded_at=datetime(2024, 1, 1, tzinfo=UTC)
    )


def test_an_upgrade_stays_in_the_stores_schema(make_database: Callable[[], str]) -> None:
    # A schema named after the role ("$user", first on the default path) made after the
    # store: the upgrade made a second, empty store there and the history disappeared.
    dsn = make_database()
    old = Store(dsn, migrate=False)
    old.migrate(target=migrations.head() - 1)
    old.append("A", [funded("A")])
    old.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        me = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(me)))
    store = Store(dsn)
    try:
        assert store.schema_version() == migrations.head()
        assert store.count() == 1 and store.read("A")[0].payload == funded("A")
        assert tables_named(dsn, "events") == ["public"]
        assert tables_named(dsn, "riskbook_migrations") == ["public"]
        store.append("A", [funded("A")], expected_version=1)
        assert riskbook.verify(store).ok
    finally:
        store.close()


def test_a_store_the_search_path_misses_is_not_made_again(make_database: Callable[[], str]) -> None:
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA rk")
    kept = Store(with_options(dsn, "-csearch_path=rk"))
    kept.append("A", [funded("A")])
    kept.close()
    with pytest.raises(StoreError, match=r"store in schema 'rk'.*options=-csearch_path=rk"):
        Store(dsn)
    assert tables_named(dsn, "events") == ["rk"]  # nothing was made in public
    second = Store(dsn, migrate=False)  # what `riskbook db upgrade` does: asked for
    try:
        assert second.migrate() == list(range(1, migrations.head() + 1))
        assert second.count() == 0 and tables_named(dsn, "events") == ["public", "rk"]
    finally:
        second.close()


def test_old_rows_of_another_aggregate_type_do_not_stop_the_upgrade(
    make_database: Callable[[], str],
) -> None:
    # The seed article's writer says "Account" for every event, marks included: such a
    # row, stored before the rule existed (0008), stopped every upgrade for good (and
    # it cannot be corrected: the log is append-only).
    dsn = make_database()
    old = Store(dsn, migrate=False)
    old.migrate(target=7)
    old.close()
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
            " correlation_id, payload) VALUES (gen_random_uuid(), 'PriceMarked', 'X', 'Account',"
            ' 1, \'c\', \'{"type":"PriceMarked","symbol":"X","price":2.0,'
            '"marked_at":"2024-01-01T00:00:00Z"}\')'
        )
        conn.commit()
    store = Store(dsn)
    try:
        assert store.schema_version() == migrations.head()
        assert riskbook.verify(store).ok
        assert riskbook.load(store, cache=False).marks["price"].to_list() == [2.0]
        with (
            pytest.raises(psycopg.errors.CheckViolation, match="events_aggregate_type_matches"),
            psycopg.connect(dsn) as conn,  # new rows still keep the rule
        ):
            conn.execute(
                "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type,"
                " sequence, correlation_id, payload) VALUES (gen_random_uuid(),"
                " 'PriceMarked', 'Y', 'Account', 1, 'c', '{\"type\":\"PriceMarked\"}')"
            )
    finally:
        store.close()


def test_a_failed_migration_is_named(make_database: Callable[[], str]) -> None:
    dsn = make_database()
    old = Store(dsn, migrate=False)
    old.migrate(target=2)
    old.close()
    with psycopg.connect(dsn) as conn:  # a value 0003's typed copy cannot take
        conn.execute(
            "INSERT INTO events (event_id, event_type, aggregate_id, aggregate_type, sequence,"
            " correlation_id, payload) VALUES (gen_random_uuid(), 'AccountFunded', 'A',"
            ' \'Account\', 1, \'c\', \'{"type":"AccountFunded","account_id":"A",'
            '"amount":"1,000","funded_at":"2024-01-01T00:00:00Z"}\')'
        )
        conn.commit()
    with pytest.raises(
        StoreError, match=r"migration 0003_\w+ failed, the schema stays at version 2"
    ):
        Store(dsn)


def test_a_stranger_notify_does_not_stop_a_follower(fresh_store: Store) -> None:
    # Any role that can connect may NOTIFY on the channel: a payload that is not a
    # position killed every follower with a ValueError.
    fresh_store.append("A", [funded("A")])
    seen: list[int] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            for batch in fresh_store.follow(max_wait=0.2, idle_timeout=3.0):
                seen.extend(e.sequence for e in batch)
                if len(seen) == 2:
                    return
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.3)
    with psycopg.connect(fresh_store.dsn, autocommit=True) as conn:
        conn.execute("NOTIFY riskbook_events, 'not a position'")
    time.sleep(0.3)
    fresh_store.append("A", [funded("A")], expected_version=1)
    thread.join(10)
    assert not errors and seen == [1, 2]


def test_db_upgrade_makes_a_deleted_identity_anew(fresh_store: Store) -> None:
    # load refused without it and sent the owner to `riskbook db upgrade`, which said
    # "up to date" and did nothing, for ever
    fresh_store.append("A", [funded("A")])
    with psycopg.connect(fresh_store.dsn) as conn:
        conn.execute("DELETE FROM riskbook_store")
        conn.commit()
    with pytest.raises(StoreError, match=r"no identity row.*riskbook db upgrade"):
        riskbook.load(fresh_store, cache=False)
    assert fresh_store.migrate() == []
    assert riskbook.load(fresh_store, cache=False).funding.height == 1


def test_an_upgrade_says_what_it_could_not_make_unique(make_database: Callable[[], str]) -> None:
    # 0015 makes trade ids unique only where no two fills share one; the warning it
    # gave otherwise was dropped, so the store silently kept the defect it fixes
    dsn = make_database()
    old = Store(dsn, migrate=False)
    old.migrate(target=14)
    fill = riskbook.TradeExecuted(trade_id="T-1", account_id="A", symbol="X",
                                  side=riskbook.Side.Buy, quantity=1.0, price=1.0,
                                  executed_at=datetime(2024, 1, 1, tzinfo=UTC))  # fmt: skip
    old.append("A", [fill, fill])
    said: list[str] = []
    assert old.migrate(target=15, notices=said) == [15]
    assert said == [
        "migration 0015_one_fill_per_trade_id: trade id T-1 of account A names more than one"
        " fill: trade ids are not made unique in this store"
    ]
    old.close()
    assert tables_named(dsn, "event_fields_trade_key") == []
    dsn2 = make_database()
    other = Store(dsn2, migrate=False)
    other.migrate(target=14)
    other.append("A", [fill, fill])
    with pytest.warns(UserWarning, match="trade ids are not made unique"):
        other.migrate()  # no list given: a warning
    other.close()


def test_the_functions_the_insert_trigger_runs_see_no_temporary_tables(
    make_database: Callable[[], str],
) -> None:
    # 0016: pg_temp was searched first for the tables they name (events, event_fields),
    # so a session's temporary tables stood in for the store's inside the trigger, which
    # runs with the owner's rights. They now search the store's schema, whatever it is
    # called, then pg_temp.
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Rk"')
    dsn = with_options(dsn, '-csearch_path="Rk"')
    old = Store(dsn, migrate=False)
    old.migrate(target=15)
    old.append("A", [funded("A")])
    assert old.migrate()[0] == 16  # and any newer ones
    old.close()
    with psycopg.connect(dsn) as conn:
        pinned = conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = '\"Rk\"'::regnamespace"
            " AND 'search_path=\"Rk\", pg_temp' = ANY (proconfig) ORDER BY 1"
        ).fetchall()
        assert [r[0] for r in pinned] == [
            "riskbook_chain_event", "riskbook_events_inserted", "riskbook_fill_event_fields",
            "riskbook_refuse_change",
        ]  # fmt: skip
        conn.execute('CREATE TEMP TABLE events AS SELECT * FROM "Rk".events WITH NO DATA')
        conn.execute(
            'CREATE TEMP TABLE event_fields AS SELECT * FROM "Rk".event_fields WITH NO DATA'
        )
        conn.execute(  # raw SQL: the triggers chain it and make its typed copy
            'INSERT INTO "Rk".events (event_id, event_type, aggregate_id, aggregate_type,'
            " sequence, correlation_id, payload) VALUES (gen_random_uuid(), 'AccountFunded',"
            ' \'A\', \'Account\', 2, \'c\', \'{"type": "AccountFunded", "account_id": "A",'
            ' "amount": 5.0, "funded_at": "2024-01-01T00:00:00Z"}\')'
        )
        assert conn.execute("SELECT count(*) FROM pg_temp.event_fields").fetchone() == (0,)
        conn.commit()
    store = Store(dsn)
    try:
        report = riskbook.verify(store)  # chains, typed copy and riskbook's functions
        assert report.ok, report
        assert riskbook.load(store, cache=False).funding["amount"].to_list() == [5.0, 5.0]
    finally:
        store.close()


def test_account_positions_made_again_keeps_its_grants_and_loses_its_dust(
    make_database: Callable[[], str],
) -> None:
    # 0019 makes the materialized view again (its query changed: quantities summed as
    # numeric, so Buy 0.1, Buy 0.2, Sell 0.3 closes to 0, not 5.55e-17): a reader granted
    # before the upgrade still reads it
    from riskbook.store import roles

    old = Store(make_database(), migrate=False)
    old.migrate(target=18)
    for side, quantity, minute in (("Buy", 0.1, 1), ("Buy", 0.2, 2), ("Sell", 0.3, 3)):
        old.append("A", [riskbook.TradeExecuted(
            trade_id=f"T-{minute}", account_id="A", symbol="X", side=riskbook.Side(side),
            quantity=quantity, price=10.0, executed_at=datetime(2024, 3, 1, 14, minute, tzinfo=UTC),
        )])  # fmt: skip
    reader = roles.grant_reader(old, f"rk_reader_{time.monotonic_ns()}")
    assert old.migrate()[0] == 19  # and any newer ones
    old.close()
    with psycopg.connect(old.dsn) as conn:
        conn.execute("REFRESH MATERIALIZED VIEW account_positions")
        conn.commit()
    with psycopg.connect(reader.dsn) as conn:
        rows = conn.execute(
            "SELECT symbol, net_quantity, trade_count FROM account_positions"
        ).fetchall()
    assert rows == [("X", 0.0, 3)]
