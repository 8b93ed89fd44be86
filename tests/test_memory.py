"""riskbook._memory: the huge-page policy and the pool of large arrays."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from riskbook import _memory


def _balloon(root: Path, name: str, bits: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "features").write_text(bits + "\n")


def test_free_page_reporting_reads_the_balloons_feature_bit(tmp_path: Path) -> None:
    assert not _memory.free_page_reporting(tmp_path / "absent")
    _balloon(tmp_path, "virtio3", "0110000100000000")  # bit 5 off
    assert not _memory.free_page_reporting(tmp_path)
    _balloon(tmp_path, "virtio4", "0110010100000000")  # bit 5 on (this VM's)
    assert _memory.free_page_reporting(tmp_path)


@pytest.mark.parametrize(
    ("setting", "expected"), [("on", True), ("OFF", False), ("1", True), ("no", False)]
)
def test_the_environment_overrides_the_choice(
    monkeypatch: pytest.MonkeyPatch, setting: str, expected: bool
) -> None:
    monkeypatch.setenv("RISKBOOK_HUGEPAGES", setting)
    _memory.hugepages.cache_clear()
    try:
        assert _memory.hugepages() is expected
    finally:
        _memory.hugepages.cache_clear()


def test_a_bad_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RISKBOOK_HUGEPAGES", "sometimes")
    _memory.hugepages.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"RISKBOOK_HUGEPAGES.*'sometimes'"):
            _memory.hugepages()
    finally:
        _memory.hugepages.cache_clear()


def test_large_arrays_turns_numpys_hugepages_off_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    setter = _memory._setter()
    assert setter is not None
    monkeypatch.setenv("RISKBOOK_HUGEPAGES", "off")
    _memory.hugepages.cache_clear()
    before = setter(True)
    try:
        with _memory.large_arrays():
            with _memory.large_arrays():  # nested: still off inside
                assert setter(False) is False
            assert setter(False) is False  # the outer block still holds it off
        assert setter(True) is True  # numpy's own setting is back
    finally:
        setter(before)
        _memory.hugepages.cache_clear()


def test_the_pool_gives_a_dead_arrays_block_to_the_next_array() -> None:
    pool = _memory._Pool(keep=60.0)
    a = pool.empty(2_000_000, np.float64)
    assert a.flags.writeable and a.shape == (2_000_000,)
    a[:] = 3.0
    where = a.ctypes.data
    s = pl.Series("x", a)  # zero-copy: the Series keeps the array, so the block, alive
    del a
    gc.collect()
    assert pool.free == []
    assert s.sum() == 6_000_000.0
    del s
    gc.collect()
    assert len(pool.free) == 1
    b = pool.empty(1_900_000, np.int64)  # about the same size: the same block
    assert b.ctypes.data == where and b.dtype == np.int64 and pool.free == []
    c = pool.empty(100, np.float64)  # small: numpy's own
    assert c.base is None


def test_idle_blocks_are_unmapped_after_keep_seconds() -> None:
    # keep long enough that a loaded machine does not purge before the first look
    pool = _memory._Pool(keep=1.5)
    a = pool.empty(2_000_000, np.float64)
    a[:] = 1.0
    del a
    gc.collect()
    assert len(pool.free) == 1
    deadline = time.monotonic() + 10
    while pool.free and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.free == [] and pool.timer is None
