"""The load's parallel ranges and the Arrow IPC cache: same frames, safe misses."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import riskbook
from riskbook.frames import Filters, History, _cache_root, _read, load
from riskbook.store import Store
from tests.test_frames import T0, assert_same, one_of_each, random_history


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))


def _entry(store: Store, filters: Filters | None = None) -> Path:
    with store.connection() as conn:
        store_id = conn.execute("SELECT store_id::text FROM riskbook_store").fetchone()[0]  # type: ignore[index]
    return _cache_root() / store_id / (filters or Filters()).key()


def test_a_load_cut_into_ranges_equals_one_read(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    random_history(fresh_store, n=600, seed=7)
    whole = load(fresh_store, cache=False)
    # every sampled page makes ranges, and every kind is read range by range
    monkeypatch.setattr("riskbook.frames._SMALL_ROWS", 100)  # else 600 rows are one read
    monkeypatch.setattr("riskbook.frames._SAMPLE", 100.0)
    monkeypatch.setattr("riskbook.frames._PART_ROWS", 40)
    monkeypatch.setattr("riskbook.frames._WORKERS", 3)
    cut = load(fresh_store, cache=False)
    assert cut.trades.n_chunks() > 1  # it was cut
    assert_same(cut, whole)
    for name, frame in cut.frames().items():
        assert frame["position"].is_sorted(), name
    filtered = load(fresh_store, accounts=["ACC-1"], cache=False)
    monkeypatch.undo()
    assert_same(filtered, load(fresh_store, accounts=["ACC-1"], cache=False))
    before = _read(fresh_store, Filters(), after=0, before=whole.horizon - 5, progress=False)
    assert before.events["position"].max() < whole.horizon - 5  # type: ignore[operator]


def test_warm_load_with_nothing_new_equals_a_refreshed_one(fresh_store: Store) -> None:
    random_history(fresh_store, n=80, seed=3)
    first = load(fresh_store)
    warm = load(fresh_store)
    assert_same(warm, first)
    assert warm.horizon >= first.horizon and warm.store_id == first.store_id
    fresh_store.append("ACC-9", one_of_each("ACC-9"))
    assert warm.refresh() == 9
    assert_same(warm, load(fresh_store, cache=False))


def test_a_cache_entry_of_the_parquet_layout_is_rebuilt(fresh_store: Store) -> None:
    random_history(fresh_store, n=50, seed=4)
    h = load(fresh_store, cache=False)
    entry = _entry(fresh_store)
    h.store_id = h.store_id or load(fresh_store, cache=False).store_id
    h.to_parquet(entry / "seg-old")
    (entry / "segments.json").write_text(json.dumps(["seg-old"]))  # the old layout
    again = load(fresh_store)
    assert_same(again, h)
    assert json.loads((entry / "segments.json").read_text())["format"].startswith("arrow")
    assert not (entry / "seg-old").exists()  # the old layout's files are removed


def test_the_cache_keeps_only_the_segments_it_lists(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("riskbook.frames._MAX_SEGMENTS", 3)
    random_history(fresh_store, n=40, seed=9)
    load(fresh_store)
    entry = _entry(fresh_store)
    for i in range(5):  # each refresh adds a segment; past 3 they are merged into one
        fresh_store.append(f"ACC-{i}", one_of_each(f"ACC-{i}"))
        warm = load(fresh_store)
        listed = json.loads((entry / "segments.json").read_text())["segments"]
        assert sorted(listed) == sorted(p.name for p in entry.glob("seg-*")), i
        assert len(listed) <= 3
    assert_same(warm, load(fresh_store, cache=False))


def test_a_damaged_cache_file_is_a_miss(fresh_store: Store) -> None:
    random_history(fresh_store, n=50, seed=6)
    load(fresh_store)
    segment = next(_entry(fresh_store).glob("seg-*"))
    (segment / "trades.arrow").write_bytes(b"not arrow at all")
    assert_same(load(fresh_store), load(fresh_store, cache=False))
    # a truncated file too
    segment = next(_entry(fresh_store).glob("seg-*"))
    data = (segment / "events.arrow").read_bytes()
    (segment / "events.arrow").write_bytes(data[: len(data) // 2])
    assert_same(load(fresh_store), load(fresh_store, cache=False))


def test_export_is_still_parquet(fresh_store: Store, tmp_path: Path) -> None:
    random_history(fresh_store, n=30, seed=8)
    h = load(fresh_store)
    out = h.to_parquet(tmp_path / "copy")
    assert (out / "trades.parquet").exists()
    assert_same(History.from_parquet(out), h)


def _funding(store: Store, account: str, n: int) -> None:
    store.append(
        account,
        [
            riskbook.AccountFunded(account_id=account, amount=float(i + 1), funded_at=T0)
            for i in range(n)
        ],
    )


def test_two_histories_refreshing_the_same_events_cache_them_once(fresh_store: Store) -> None:
    random_history(fresh_store, n=40, seed=11)
    h1 = load(fresh_store)  # writes the cache
    h2 = load(fresh_store)  # another kernel: a cache hit
    _funding(fresh_store, "ACC-N", 5)
    assert h1.refresh() == 5 and h2.refresh() == 5  # both add the same delta
    fresh = load(fresh_store, cache=False)
    assert_same(h1, fresh)
    assert_same(h2, fresh)
    assert_same(load(fresh_store), fresh)  # served once, not twice
    # a kernel that loaded an older state and refreshes later (from below the cache's
    # horizon, past it)
    old = load(fresh_store)
    _funding(fresh_store, "ACC-N", 3)
    assert h1.refresh() == 3  # the cache moves on
    _funding(fresh_store, "ACC-M", 2)
    assert old.refresh() == 5
    fresh = load(fresh_store, cache=False)
    assert_same(old, fresh)
    assert_same(load(fresh_store), fresh)
    assert h1.refresh() == 2 and h2.refresh() == 5
    assert_same(load(fresh_store), load(fresh_store, cache=False))
    assert_same(h2, load(fresh_store, cache=False))
    # a History whose refreshes found nothing since it matched the cache still adds its
    # next delta (the cache's horizon is below the delta's start, with nothing between)
    h = load(fresh_store, accounts=["ACC-1"])
    entry = _entry(fresh_store, h.filters)
    _funding(fresh_store, "ACC-2", 2)  # not this History's: its horizon moves past the cache's
    assert h.refresh() == 0
    _funding(fresh_store, "ACC-1", 2)
    assert h.refresh() == 2
    listed = json.loads((entry / "segments.json").read_text())
    assert len(listed["segments"]) == 2  # the delta was added, from the cache's horizon
    assert_same(load(fresh_store, accounts=["ACC-1"]), h)
    assert_same(h, load(fresh_store, accounts=["ACC-1"], cache=False))


def test_segments_that_do_not_chain_are_a_miss(fresh_store: Store) -> None:
    random_history(fresh_store, n=40, seed=13)
    load(fresh_store)
    _funding(fresh_store, "ACC-N", 4)
    load(fresh_store)  # the cache gets a second segment
    entry = _entry(fresh_store)
    listed = json.loads((entry / "segments.json").read_text())
    assert len(listed["segments"]) == 2
    for key in ("segments", "ranges"):  # the second one listed twice
        if key in listed:
            listed[key].append(listed[key][-1])
    (entry / "segments.json").write_text(json.dumps(listed))
    fresh = load(fresh_store, cache=False)
    assert_same(load(fresh_store), fresh)
    assert_same(load(fresh_store), fresh)
    listed = json.loads((entry / "segments.json").read_text())
    assert len(listed["segments"]) == 1  # the entry was rebuilt


_KERNEL = """
import sys
import riskbook
store = riskbook.connect(sys.argv[1])
h = riskbook.load(store)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "refresh":
        break
    print(h.refresh(), flush=True)
"""


def test_two_processes_refreshing_the_same_events_cache_them_once(
    fresh_store: Store, tmp_path: Path
) -> None:
    random_history(fresh_store, n=40, seed=14)
    load(fresh_store)  # the cache both kernels start from
    env = {**os.environ, "RISKBOOK_CACHE": str(tmp_path / "cache")}
    kernels = [
        subprocess.Popen(
            [sys.executable, "-c", _KERNEL, fresh_store.dsn],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        for k in kernels:
            assert k.stdout is not None and k.stdout.readline().strip() == "ready"
        for round in range(6):
            _funding(fresh_store, f"ACC-{round}", 5)
            # even rounds one after the other, odd ones both at once
            for k in kernels:
                assert k.stdin is not None and k.stdout is not None
                k.stdin.write("refresh\n")
                k.stdin.flush()
                if round % 2 == 0:
                    assert k.stdout.readline().strip() == "5"
            if round % 2:
                for k in kernels:
                    assert k.stdout is not None and k.stdout.readline().strip() == "5"
            assert_same(load(fresh_store, cache=True), load(fresh_store, cache=False))
    finally:
        for k in kernels:
            assert k.stdin is not None and k.stdout is not None
            k.stdin.close()
            k.wait(timeout=60)
            k.stdout.close()


def test_a_cache_that_creates_the_home_creates_it_as_the_server_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a load before any `riskbook db start` must not decide where the server's files go
    from riskbook._home import home_mode, make_private_dirs

    home = tmp_path / "above" / "home"
    monkeypatch.setenv("RISKBOOK_HOME", str(home))
    umask = os.umask(0)
    os.umask(umask)
    make_private_dirs(home / "cache" / "store" / "seg-1")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "above") == 0o777 & ~umask  # above the home: the default
    assert mode(home) == home_mode()  # 0711 as root: the server's user can reach its files
    for folder in (home / "cache", home / "cache" / "store", home / "cache" / "store" / "seg-1"):
        assert mode(folder) == 0o700


def test_the_cache_never_takes_frames_a_caller_changed(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past _MAX_SEGMENTS refreshes, the segments were merged from the refreshing
    # History's own frames: a notebook's narrowed copy became every later load's.
    monkeypatch.setattr("riskbook.frames._MAX_SEGMENTS", 3)
    random_history(fresh_store, n=40, seed=15)
    entry = _entry(fresh_store)
    h = load(fresh_store)
    h.trades = h.trades.filter(pl.col("account_id") == "ACC-1")  # a notebook narrows its copy
    narrowed = h.trades.height
    for i in range(3):  # the third merges the segments
        fresh_store.append(f"ACC-{i}", one_of_each(f"ACC-{i}", symbol=f"S-{i}"))
        assert h.refresh() == 9
    assert len(json.loads((entry / "segments.json").read_text())["segments"]) == 1
    assert_same(load(fresh_store), load(fresh_store, cache=False))
    assert h.trades.height == narrowed + 3 * 2  # the caller's own, and what was new
    warm = load(fresh_store)
    other = dataclasses.replace(warm, marks=warm.marks.head(0))  # another way to change one
    for i in range(3, 6):
        fresh_store.append(f"ACC-{i}", one_of_each(f"ACC-{i}", symbol=f"S-{i}"))
        assert other.refresh() == 9
    assert len(json.loads((entry / "segments.json").read_text())["segments"]) == 1
    assert_same(load(fresh_store), load(fresh_store, cache=False))
    assert other.marks.height == 0


def test_a_cache_file_that_makes_polars_panic_is_a_miss(fresh_store: Store) -> None:
    # dictionary codes past the dictionary (a few flipped bytes): Polars panicked, and
    # load() raised pyo3's PanicException (a BaseException) instead of reading afresh
    import pyarrow as pa
    import pyarrow.ipc

    random_history(fresh_store, n=30, seed=16)
    load(fresh_store)
    path = next(_entry(fresh_store).glob("seg-*")) / "events.arrow"
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    i = table.schema.get_field_index("aggregate_id")
    codes = table.column(i).chunk(0)
    bad = pa.DictionaryArray.from_arrays(
        pa.array([99] * len(codes), codes.indices.type), codes.dictionary, safe=False
    )
    table = table.set_column(i, table.schema.field(i), bad)
    with pa.OSFile(str(path) + ".new", "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    os.replace(str(path) + ".new", path)
    assert_same(load(fresh_store), load(fresh_store, cache=False))
