"""Snapshots of a processor's state: a restart folds only what came since.

At its start a processor rebuilds its engine's state by folding the whole history
below its checkpoint (each bust in it refolds its account): minutes at a few million
events. So after a long rebuild, and at a clean stop (:meth:`Processor.stop`, the end
of a catch-up) when folding again what it folded since would take a second or more, it
keeps the state in a file; the next start of a processor of the same name, on the same
store and with the same rules, loads it and folds only the events between the snapshot
and its checkpoint. Folding a history in two batches gives the same states and effects
as folding it in one (the engine's contract, and its property tests), and a state kept
while running is kept as a rebuild has it (:meth:`Engine.as_rebuilt`: the blocks a
rebuild's fold decides included, which the processor matches against the blocks stored
ahead of its checkpoint), so the state is the one a full rebuild gives.

A snapshot is a cache: any doubt and it is not used (the processor rebuilds in full,
and says why in its log). It is used only if

* its layout, riskbook's code (a digest of the package's source files), Polars',
  NumPy's and Python's versions, the engine's settings (critical factors, limit types,
  actor) and the definitions of the limit types it may evaluate are the same;
* its store is this one (the store's identity), the event it ended with is still
  there (a store restored from an older backup is not), and its position is not past
  the checkpoint;
* its body's SHA-256 is the one in its trailer (a torn or corrupted file);
* its body unpickles with only the classes an engine is made of (a restricted
  unpickler: the file cannot make this process run anything else).

Files live under the load cache's folder (``$RISKBOOK_HOME/cache``, or
``$RISKBOOK_CACHE``), one per store and processor name, readable by their owner only,
and are replaced atomically (what a writer killed midway left is removed by the next
one). At 1M events one took 290 MB.
"""

from __future__ import annotations

import copyreg
import functools
import hashlib
import json
import logging
import os
import pickle
import platform
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from riskbook.live._engine import Engine

__all__ = ["Snapshot", "header", "load", "path_for", "save"]

log = logging.getLogger("riskbook.live")

_MAGIC = b"riskbook-engine-snapshot\n"
_FORMAT = 2  # 2: long frames and series pickled in pieces


@dataclass
class Snapshot:
    """An engine folded to its horizon as a rebuild (``written=False``) has it, and the
    last event it folded."""

    engine: Engine
    """As :meth:`Engine.as_rebuilt` gives it (the blocks its fold decided included)."""
    last_position: int
    last_event_id: str
    """The last event folded: it must still be in the store."""


def path_for(root: Path, store_id: str, name: str) -> Path:
    """The snapshot file of processor ``name`` on the store ``store_id``."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    return root / store_id / "live" / f"{digest}.snapshot"


def key(engine: Engine, store_id: str, name: str) -> dict[str, Any]:
    """What must match for a snapshot to be used (see the module docstring)."""
    from riskbook.limits import get, names

    critical: Any = engine.critical
    if isinstance(critical, Mapping):
        critical = sorted((str(k), v) for k, v in critical.items())
    types = sorted(engine.types) if engine.types is not None else sorted(names())
    return {
        "format": _FORMAT,
        "code": _code_digest(),
        "versions": [platform.python_version(), pl.__version__, np.__version__],
        "store_id": store_id,
        "name": name,
        "critical": repr(critical),
        "types": None if engine.types is None else list(engine.types),
        "actor": engine.actor,
        "definitions": {n: _definition_digest(get(n)) for n in types},
    }


def save(path: Path, snapshot: Snapshot, key: dict[str, Any]) -> int:
    """Write ``snapshot`` to ``path`` (atomically: a new file renamed over the old one);
    its size in bytes. One writer per path at a time (the processor's lock).

    The layout: a magic line, the key as one line of JSON, the pickle, and a trailer
    of fixed length with the pickle's SHA-256 and size. The pickle is streamed to the
    file (hashed on the way), not held in memory whole.
    """
    from riskbook._home import make_private_dirs

    make_private_dirs(path.parent)
    for left in path.parent.glob(f"{path.name}.tmp-*"):  # a writer killed midway
        left.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC)
            f.write(json.dumps(dict(key, horizon=snapshot.engine.horizon)).encode() + b"\n")
            body = _Hashing(f)
            pickler = pickle.Pickler(body, protocol=5)
            pickler.dispatch_table = _DISPATCH  # type: ignore[assignment]
            pickler.dump(snapshot)
            f.write(_trailer(body.digest.hexdigest(), body.size))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return body.size


def load(path: Path, key: dict[str, Any]) -> tuple[Snapshot | None, str]:
    """The snapshot at ``path`` if it can be used with ``key``, else None; and why not
    (empty when it can)."""
    try:
        with open(path, "rb") as f:
            if f.readline() != _MAGIC:
                return None, "not a snapshot file"
            header = json.loads(f.readline())
            for field, want in key.items():
                if header.get(field) != want:
                    return None, f"made with another {field.replace('_', ' ')}"
            start = f.tell()
            end = os.fstat(f.fileno()).st_size - _TRAILER_SIZE
            if end < start:
                return None, "it is cut short (a torn file)"
            f.seek(end)
            trailer = f.read()
            digest, size = hashlib.sha256(), 0
            f.seek(start)
            while size < end - start:
                chunk = f.read(min(1 << 22, end - start - size))
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
            if trailer != _trailer(digest.hexdigest(), size):
                return None, "its contents do not match their digest (a torn or damaged file)"
            f.seek(start)
            try:
                snapshot = _Unpickler(f).load()
            except Exception as exc:  # a snapshot is never worth a failure: rebuild instead
                return None, f"it does not unpickle ({type(exc).__name__}: {exc})"
    except FileNotFoundError:
        return None, "none kept"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({exc})"
    if not isinstance(snapshot, Snapshot) or not isinstance(snapshot.engine, Engine):
        return None, "it holds something else"
    return snapshot, ""


def header(path: Path) -> dict[str, Any] | None:
    """The key line of the snapshot at ``path`` (its processor's name, store, horizon),
    read without the rest; None if it is not a snapshot file."""
    try:
        with open(path, "rb") as f:
            if f.readline() != _MAGIC:
                return None
            head = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


_TRAILER_SIZE = 1 + 7 + 64 + 1 + 20 + 1


def _trailer(sha256: str, size: int) -> bytes:
    out = f"\nsha256 {sha256} {size:020d}\n".encode()
    assert len(out) == _TRAILER_SIZE
    return out


_PIECE_ROWS = 1 << 16
"""Rows of each piece a long frame or series is pickled in. Serialising one holds the
GIL throughout, and a running processor writes its snapshot in a thread beside its
batches: they wait for a piece at most, not a whole frame (at 1M events a whole one
held them up to 450 ms; `benchmarks/live_rebuild.py`)."""


def _reduce_frame(frame: pl.DataFrame) -> Any:
    if frame.height <= _PIECE_ROWS or frame.width == 0:
        return frame.__reduce_ex__(5)
    pieces = tuple(frame.slice(i, _PIECE_ROWS) for i in range(0, frame.height, _PIECE_ROWS))
    return _frame_of_pieces, (pieces,)


def _reduce_series(series: pl.Series) -> Any:
    if series.len() <= _PIECE_ROWS:
        return series.__reduce_ex__(5)
    pieces = tuple(series.slice(i, _PIECE_ROWS) for i in range(0, series.len(), _PIECE_ROWS))
    return _series_of_pieces, (pieces,)


def _frame_of_pieces(pieces: tuple[pl.DataFrame, ...]) -> pl.DataFrame:
    if not pieces or not all(type(p) is pl.DataFrame for p in pieces):
        raise pickle.UnpicklingError("a frame's pieces are not frames")
    return pl.concat(pieces, how="vertical", rechunk=True)


def _series_of_pieces(pieces: tuple[pl.Series, ...]) -> pl.Series:
    if not pieces or not all(type(p) is pl.Series for p in pieces):
        raise pickle.UnpicklingError("a series' pieces are not series")
    return pl.concat(pieces, rechunk=True)


_DISPATCH = {**copyreg.dispatch_table, pl.DataFrame: _reduce_frame, pl.Series: _reduce_series}


class _Hashing:
    """A file's writer that hashes and counts what goes through it."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self.size += len(memoryview(data).cast("B"))
        return int(self._f.write(data))


# ------------------------------------------------------------------ what must match


@functools.cache
def _code_digest() -> str:
    """SHA-256 of riskbook's source files (their paths and contents)."""
    package = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _definition_digest(definition: Any) -> str:
    """A digest of a limit type's definition: its class, scope, and its metric's code
    (a changed metric function in a notebook makes a snapshot of it unusable)."""
    h = hashlib.sha256()
    cls = type(definition)
    h.update(f"{cls.__module__}.{cls.__qualname__}\0".encode())
    for attr in ("name", "scope", "unit", "incremental"):
        h.update(repr(getattr(definition, attr, None)).encode() + b"\0")
    for code in _codes(getattr(definition, "metric", None)):
        h.update(code.co_code)
        h.update(repr([c for c in code.co_consts if not hasattr(c, "co_code")]).encode())
        h.update(repr(code.co_names).encode())
    return h.hexdigest()


def _codes(fn: Any) -> Iterable[Any]:
    """The code objects of a callable, its nested functions' included."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:  # a callable object: its __call__
        call = vars(type(fn)).get("__call__")
        code = getattr(call, "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        yield c
        stack.extend(k for k in c.co_consts if hasattr(k, "co_code"))


# ------------------------------------------------------------------ reading it back


def _zoneinfo_unpickle(*args: Any) -> Any:
    from zoneinfo import ZoneInfo

    return ZoneInfo._unpickle(*args)  # type: ignore[attr-defined]


@functools.cache
def _allowed() -> dict[tuple[str, str], Any]:
    """The globals an engine's pickle names, each mapped to what it may load."""
    import datetime

    from riskbook import frames, projections
    from riskbook.limits import _evaluate

    classes = (Snapshot, Engine, frames.History, frames.Filters, projections.ProjectionState,
               _evaluate.BreachState, _evaluate._Derived, pl.DataFrame, pl.Series, np.dtype,
               datetime.datetime, datetime.date, datetime.timedelta, datetime.timezone)  # fmt: skip
    allowed: dict[tuple[str, str], Any] = {
        (c.__module__, c.__qualname__): c for c in (*classes, _frame_of_pieces, _series_of_pieces)
    }
    allowed |= {
        ("zoneinfo", "ZoneInfo"): _ZoneInfoName,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "getattr"): _getattr,
    }
    for module in ("numpy._core.numeric", "numpy.core.numeric"):
        numeric = sys.modules.get(module)
        if numeric is not None and hasattr(numeric, "_frombuffer"):
            allowed[(module, "_frombuffer")] = numeric._frombuffer
    return allowed


class _ZoneInfoName:
    """Stands for the ZoneInfo class in a snapshot, whose pickle reads one attribute of
    it, ``getattr(ZoneInfo, "_unpickle")``: :func:`_getattr` answers that alone."""


def _getattr(obj: Any, name: str) -> Any:
    if obj is _ZoneInfoName and name == "_unpickle":
        return _zoneinfo_unpickle
    raise pickle.UnpicklingError(f"a snapshot may not look up {name!r}")


class _Unpickler(pickle.Unpickler):
    """Loads only what an engine is made of (the pattern of the ``pickle`` docs'
    "Restricting Globals")."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"a snapshot may not load {module}.{name}")
        return allowed[(module, name)]
