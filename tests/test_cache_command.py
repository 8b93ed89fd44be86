"""`riskbook cache`: listing what the cache holds, and removing it safely."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from riskbook import cache
from riskbook.frames import load
from riskbook.live import Processor, _processor
from riskbook.store import Store
from tests.test_frames import assert_same, random_history


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("RISKBOOK_CACHE", str(folder))
    return folder


def _age(entry: cache.CacheEntry, days: float) -> None:
    """Make ``entry`` look last used ``days`` ago."""
    then = time.time() - days * 86400
    paths = [entry.path] if entry.kind == "live" else [entry.path, entry.path / "segments.json"]
    for p in paths:
        os.utime(p, (then, then))


def _cli(*args: str, folder: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RISKBOOK_CACHE=str(folder))
    return subprocess.run(
        [sys.executable, "-m", "riskbook.cli", "cache", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_entries_name_each_store_its_filters_and_processors(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    random_history(fresh_store, n=120, seed=11)
    whole = load(fresh_store)
    load(fresh_store, accounts=["ACC-1", "ACC-2"])
    monkeypatch.setattr(_processor, "_KEEP_AFTER", 0.0)  # keep one at the stop, whatever
    Processor(fresh_store, name="desk-7").catch_up()

    listed = cache.entries()
    assert {(e.kind, e.what) for e in listed} == {
        ("load", "whole history"),
        ("load", "accounts=ACC-1,ACC-2"),
        ("live", "processor desk-7"),
    }
    dbname = conninfo_to_dict(fresh_store.dsn)["dbname"]
    for e in listed:
        assert e.store_id == whole.store_id
        assert e.database is not None and e.database.startswith(f"{dbname} on ")
        assert e.bytes > 0 and e.path.exists()
        assert abs(time.time() - e.last_used.timestamp()) < 600
    on_disk = sum(f.stat().st_size for f in cache.root().rglob("*") if f.is_file())
    assert sum(e.bytes for e in listed) <= on_disk  # the notes and locks are not entries


def test_a_warm_load_marks_its_entry_used(fresh_store: Store) -> None:
    random_history(fresh_store, n=60, seed=12)
    load(fresh_store)
    [entry] = cache.entries()
    _age(entry, 40)
    assert cache.prune(older_than=timedelta(days=30), dry_run=True) == [
        cache.entries()[0]
    ]  # it would go now
    load(fresh_store)  # warm
    assert cache.prune(older_than=timedelta(days=30)) == []
    assert cache.entries()[0].path == entry.path


def test_prune_by_age_size_and_store_removes_only_those(
    fresh_store: Store, make_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    random_history(fresh_store, n=150, seed=13)
    other = Store(make_database())
    random_history(other, n=50, seed=14)
    try:
        load(fresh_store)
        load(fresh_store, accounts=["ACC-3"])
        load(other)
        monkeypatch.setattr(_processor, "_KEEP_AFTER", 0.0)
        Processor(fresh_store, name="desk").catch_up()
        by = {(e.store_id, e.kind, e.what): e for e in cache.entries()}
        mine = load(fresh_store, cache=False).store_id
        theirs = load(other, cache=False).store_id
        old_load = by[mine, "load", "accounts=ACC-3"]
        old_snap = by[mine, "live", "processor desk"]
        _age(old_load, 45)
        _age(old_snap, 31)
        _age(by[theirs, "load", "whole history"], 2)

        # a dry run lists, removes nothing
        would = cache.prune(older_than=timedelta(days=30), dry_run=True)
        assert {e.path for e in would} == {old_load.path, old_snap.path}
        assert len(cache.entries()) == 4

        gone = cache.prune(older_than=timedelta(days=30))
        assert {e.path for e in gone} == {old_load.path, old_snap.path}
        assert not old_load.path.exists() and not old_snap.path.exists()
        assert {(e.store_id, e.what) for e in cache.entries()} == {
            (mine, "whole history"),
            (theirs, "whole history"),
        }

        # by size: the least recently used goes first (the other store's, aged 2 days)
        rest = cache.entries()
        mine_entry = next(e for e in rest if e.store_id == mine)
        gone = cache.prune(max_bytes=mine_entry.bytes)
        assert [e.store_id for e in gone] == [theirs]
        assert [e.store_id for e in cache.entries()] == [mine]

        # a store unknown to the cache is refused, naming it, and nothing goes
        with pytest.raises(ValueError, match="no cache entries of store nope"):
            cache.prune(stores=[mine, "nope"])
        assert len(cache.entries()) == 1
        with pytest.raises(ValueError, match="say what to remove"):
            cache.prune()

        # loads still work, and are the same, after their entries went
        cache.prune(stores=mine)  # one id, as a string
        assert cache.entries() == [] and not (cache.root() / mine).exists()
        assert_same(load(fresh_store), load(fresh_store, cache=False))
        assert [e.what for e in cache.entries()] == ["whole history"]
    finally:
        other.close()


def test_removing_the_entry_of_a_history_in_use_only_costs_a_reload(fresh_store: Store) -> None:
    random_history(fresh_store, n=100, seed=15)
    h = load(fresh_store)
    cache.prune(everything=True)
    random_history(fresh_store, n=20, seed=16)
    h.refresh()  # its entry is gone: the delta is not cached, nothing fails
    assert_same(h, load(fresh_store, cache=False))
    assert_same(load(fresh_store), h)  # a cold load, cached again
    assert len(cache.entries()) == 1


def test_the_cli_lists_and_prunes(fresh_store: Store, _private_cache: Path) -> None:
    random_history(fresh_store, n=60, seed=17)
    h = load(fresh_store)
    assert cache.entries()[0].database is not None  # noted at the first load already
    out = _cli(folder=_private_cache)
    assert out.returncode == 0, out.stderr
    assert f"store {h.store_id}" in out.stdout and "whole history" in out.stdout
    assert "1 entry of 1 store" in out.stdout

    out = _cli("prune", folder=_private_cache)
    assert out.returncode == 1 and "say what to remove" in out.stderr
    out = _cli("prune", "--max-size", "lots", folder=_private_cache)
    assert out.returncode == 2 and "'lots' is not a size" in out.stderr
    out = _cli("prune", "--older-than=-3d", folder=_private_cache)
    assert out.returncode == 2 and "is not an age" in out.stderr
    out = _cli("prune", "--store", "nope", folder=_private_cache)
    assert out.returncode == 1 and "no cache entries of store nope" in out.stderr
    assert len(cache.entries()) == 1  # nothing went

    out = _cli("prune", "--max-size", "10GB", "--dry-run", folder=_private_cache)
    assert out.returncode == 0 and "would remove 0 entries" in out.stdout
    out = _cli("prune", "--older-than", "0", "--dry-run", folder=_private_cache)  # 0 asks too
    assert out.returncode == 0 and "would remove 1 entry" in out.stdout, out.stderr
    out = _cli("prune", "--store", str(h.store_id), folder=_private_cache)
    assert out.returncode == 0, out.stderr
    assert "removed 1 entry" in out.stdout and "removed load" in out.stdout
    assert cache.entries() == []
    out = _cli("list", folder=_private_cache)
    assert out.returncode == 0 and "the cache is empty" in out.stdout


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://alice:s3cret@db.example.com:6543/risk",
            "database risk on db.example.com:6543 as alice",
        ),
        ("postgresql+psycopg://bob:pw@localhost/book", "database book on localhost:5432 as bob"),
        ("host=/run/pg dbname=r user=u password=s3cret", "database r on /run/pg:5432 as u"),
        ("dbname=x", "database x on localhost:5432"),
        ("not a dsn ===", "<unparseable DSN>"),
    ],
)
def test_where_names_the_database_never_the_password(dsn: str, expected: str) -> None:
    from riskbook.store.eventstore import where

    assert where(dsn) == expected


def test_what_killed_snapshot_writers_left_is_listed_and_pruned(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    random_history(fresh_store, n=40, seed=18)
    monkeypatch.setattr(_processor, "_KEEP_AFTER", 0.0)
    Processor(fresh_store, name="desk").catch_up()
    [snap] = cache.entries()
    (snap.path.parent / f"{snap.path.name}.tmp-0badf00d").write_bytes(b"x" * 1000)
    (snap.path.parent / "0123abcd.snapshot.tmp-deadbeef").write_bytes(b"y" * 500)
    by = {e.path.name: e for e in cache.entries()}
    assert by[snap.path.name].bytes == snap.bytes + 1000
    assert by[snap.path.name].what == "processor desk, and 1 unfinished"
    orphan = by["0123abcd.snapshot"]
    assert (orphan.bytes, orphan.what) == (500, "unfinished snapshot (its writer stopped midway)")
    cache.prune(everything=True)
    assert cache.entries() == [] and not snap.path.parent.exists()
