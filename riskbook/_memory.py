"""Whether riskbook's large numpy arrays ask the kernel for transparent huge pages.

NumPy asks for huge pages (``madvise(MADV_HUGEPAGE)``) for every array of 4 MiB or
more. That pays where memory is cheap to get: on most machines a 2 MiB page is zeroed
faster than 512 small ones are faulted in. On a virtual machine whose balloon device
reports free pages to the host (virtio-balloon ``VIRTIO_BALLOON_F_REPORTING``), memory
the guest freed a few seconds ago goes back to the host, and a huge page made of it
costs the host's faults on top. Measured on such a VM (2 cores; 1 GiB written with
``np.empty(...)[:] = 1``): 0.8-2.2 s with huge pages, 0.36-0.41 s without, 0.06 s with
huge pages when the memory was freed less than a second before. A notebook calls
riskbook seconds or minutes apart, so its calls meet the first case: there, the first
call of the projections and breaches on 5M events took about twice as long with huge
pages (see ``benchmarks/projections.py``, which prints the VM's figures).

So riskbook turns NumPy's huge pages off while its own functions run, on such a VM
only, and sets them back as they were after. ``RISKBOOK_HUGEPAGES=on`` or ``off``
overrides the choice (``auto``, the default, makes it as above).
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = ["free_page_reporting", "hugepages", "large_arrays", "with_large_arrays"]

_REPORTING = 5  # VIRTIO_BALLOON_F_REPORTING, a feature bit of the virtio-balloon device
_BALLOONS = Path("/sys/bus/virtio/drivers/virtio_balloon")

F = TypeVar("F", bound=Callable[..., Any])


def free_page_reporting(root: Path = _BALLOONS) -> bool:
    """True when a virtio-balloon device here reports free pages to the host."""
    try:
        for features in root.glob("*/features"):
            bits = features.read_text().strip()  # one '0' or '1' per feature bit, bit 0 first
            if len(bits) > _REPORTING and bits[_REPORTING] == "1":
                return True
    except OSError:
        return False
    return False


@functools.cache
def hugepages() -> bool:
    """Whether riskbook's large arrays get huge pages: ``RISKBOOK_HUGEPAGES`` (on, off,
    auto); auto is on unless the machine reports free pages to its host."""
    setting = os.environ.get("RISKBOOK_HUGEPAGES", "auto").strip().lower()
    if setting in ("on", "1", "true", "yes"):
        return True
    if setting in ("off", "0", "false", "no"):
        return False
    if setting not in ("auto", ""):
        raise ValueError(f"RISKBOOK_HUGEPAGES must be on, off or auto, not {setting!r}")
    return not free_page_reporting()


@functools.cache
def _setter() -> Callable[[bool], bool] | None:
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(module, fromlist=["_set_madvise_hugepage"])
        except ImportError:
            continue
        found = getattr(mod, "_set_madvise_hugepage", None)
        if found is not None:
            return found
    return None


_lock = threading.Lock()
_depth = 0
_before = True


@contextmanager
def large_arrays() -> Iterator[None]:
    """Inside this block, NumPy's large arrays get huge pages as :func:`hugepages` says.

    Blocks nest and may run on several threads at once: the first one in sets the
    policy, the last one out puts NumPy's own setting back.
    """
    global _depth, _before
    set_ = _setter() if not hugepages() else None
    if set_ is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _before = set_(False)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                set_(_before)


def with_large_arrays(fn: F) -> F:
    """``fn`` run inside :func:`large_arrays`."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with large_arrays():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


# ----------------------------------------------------------------------------- reuse

_SMALL = 8 << 20  # arrays under 8 MiB come from numpy's own allocator
_PAGE = 2 << 20


class _Pool:
    """Blocks of anonymous memory for riskbook's large arrays, kept a few seconds after
    their array dies so that the next array of about the same size reuses them.

    NumPy gives a large array's memory back to the kernel as soon as the array dies,
    and the next one faults its pages in again (0.4 s a GiB on the VM above). The
    projections and limits make arrays of the same few sizes one after the other --
    the timeline columns of one call, then of the next -- so a block is found again
    most of the time. Idle blocks are unmapped ``keep`` seconds after they were given
    back (by a timer thread), so the pool holds no memory once riskbook is idle.
    """

    def __init__(self, keep: float = 2.0) -> None:
        self.keep = keep
        # re-entrant: a dying array's finalizer gives its block back, and the garbage
        # collector may run one on this thread while it holds the lock
        self.lock = threading.RLock()
        self.free: list[tuple[int, float, Any]] = []  # (size, freed at, mmap)
        self.timer: threading.Timer | None = None

    def empty(self, n: int, dtype: Any) -> Any:
        dt = np.dtype(dtype)
        nbytes = int(n) * dt.itemsize
        if nbytes < _SMALL:
            return np.empty(n, dt)
        size = -(-nbytes // _PAGE) * _PAGE
        block = None
        with self.lock:
            fits = [i for i, f in enumerate(self.free) if size <= f[0] <= size + size // 4]
            if fits:
                best = min(fits, key=lambda i: self.free[i][0])
                block = self.free.pop(best)[2]
        if block is None:
            block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hugepages():
                block.madvise(mmap.MADV_HUGEPAGE)
        out = np.frombuffer(block, dt, count=n)
        weakref.finalize(out, self._give_back, block)
        return out

    def _give_back(self, block: Any) -> None:
        with self.lock:
            self.free.append((len(block), time.monotonic(), block))
            if self.timer is None:
                self.timer = threading.Timer(self.keep, self._purge)
                self.timer.daemon = True
                self.timer.start()

    def _purge(self) -> None:
        with self.lock:
            self.timer = None
            now = time.monotonic()
            old = [f for f in self.free if now - f[1] >= self.keep]
            self.free = [f for f in self.free if now - f[1] < self.keep]
            if self.free:
                self.timer = threading.Timer(self.keep, self._purge)
                self.timer.daemon = True
                self.timer.start()
        for _, _, block in old:
            try:
                block.close()
            except BufferError:  # an export not released yet: next time
                with self.lock:
                    self.free.append((len(block), time.monotonic(), block))


_pool = _Pool()


def empty(n: int, dtype: Any = float) -> Any:
    """An uninitialised 1-d numpy array of ``n`` items, from the pool when large."""
    return _pool.empty(n, dtype)
