"""What riskbook keeps under its cache folder, and removing it.

The cache (``$RISKBOOK_HOME/cache``, or ``$RISKBOOK_CACHE``) holds two kinds of
entries, in one folder per store (named by the store's identity):

* ``load``: a :func:`riskbook.load`'s copy of the history, one per set of filters
  (Arrow files, mapped by the next load: about 1.5 GB at 5M events);
* ``live``: a live processor's snapshot of its state, one per processor name (about
  300 MB at 1M events).

Both are only copies: removing an entry loses nothing, the next load reads the store
again and the next processor start rebuilds its state (slower, once). Nothing removes
them by itself, so a store dropped, or a notebook's filters used once, leave theirs
behind: :func:`entries` lists them with their size and when each was last used, and
:func:`prune` removes the ones asked for (``riskbook cache`` and ``riskbook cache
prune`` on the command line).

Removing an entry in use is safe: a load that maps its files keeps its pages (POSIX),
a load that finds it gone reads the store, and a load entry is removed under the lock
its writers take.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

__all__ = ["CacheEntry", "entries", "prune", "root"]

_STORE_FILE = "store.json"


def root() -> Path:
    """The cache folder: ``$RISKBOOK_CACHE`` if set, else ``$RISKBOOK_HOME/cache``."""
    from riskbook.frames import _cache_root

    return _cache_root()


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache."""

    store_id: str
    """The identity of the store it copies (``riskbook_store.store_id``)."""
    kind: Literal["load", "live"]
    """``load``: a loaded history's copy; ``live``: a live processor's snapshot."""
    what: str
    """For a load, its filters (``whole history`` if none); for a snapshot, the
    processor's name."""
    path: Path
    bytes: int
    last_used: datetime
    """When it was last written or read (UTC)."""
    database: str | None
    """Where the store was when it was cached (``dbname on host:port``; None when the
    entry predates riskbook noting it)."""


def entries(folder: Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache (``folder``, default :func:`root`), least recently used
    first."""
    folder = root() if folder is None else folder
    out: list[CacheEntry] = []
    try:
        stores = sorted(p for p in folder.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    for store in stores:
        database = _database(store)
        for entry in sorted(store.iterdir()):
            if entry.name == "live" and entry.is_dir():
                # a snapshot with what its writers left (killed midway), or that alone
                names = {p.name.split(".snapshot", 1)[0] for p in entry.glob("*.snapshot*")}
                for name in sorted(names):
                    out.append(_snapshot_entry(store.name, entry / f"{name}.snapshot", database))
            elif entry.is_dir():
                out.append(_load_entry(store.name, entry, database))
    out.sort(key=lambda e: (e.last_used, str(e.path)))
    return out


def prune(
    *,
    older_than: timedelta | None = None,
    max_bytes: int | None = None,
    stores: Iterable[str] | None = None,
    everything: bool = False,
    dry_run: bool = False,
    folder: Path | None = None,
) -> list[CacheEntry]:
    """Remove entries; the ones removed (or, with ``dry_run``, that would be).

    An entry goes if any of these asks for it:

    * ``older_than``: it was last used longer ago than this;
    * ``max_bytes``: the least recently used go until the rest fit in this many bytes;
    * ``stores``: it copies one of these stores (identities as :func:`entries` lists);
    * ``everything``.

    Raises
    ------
    ValueError
        Nothing asked for (no criterion given), a negative age or size, or a store
        named in ``stores`` that has no entry (a typo must not pass for "done").
    """
    if isinstance(stores, str):
        stores = [stores]  # one id, not its characters
    wanted = set(stores) if stores is not None else set()
    if older_than is None and max_bytes is None and not wanted and not everything:
        raise ValueError("say what to remove: older_than, max_bytes, stores or everything")
    if older_than is not None and older_than < timedelta(0):
        raise ValueError(f"older_than must not be negative, got {older_than}")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
    listed = entries(folder)
    unknown = wanted - {e.store_id for e in listed}
    if unknown:
        raise ValueError(f"no cache entries of store {', '.join(sorted(unknown))}")
    now = datetime.now(UTC)
    doomed = [
        e
        for e in listed
        if everything
        or e.store_id in wanted
        or (older_than is not None and now - e.last_used > older_than)
    ]
    if max_bytes is not None:
        kept = [e for e in listed if e not in doomed]
        total = sum(e.bytes for e in kept)
        for e in kept:  # least recently used first
            if total <= max_bytes:
                break
            doomed.append(e)
            total -= e.bytes
    if not dry_run:
        for e in doomed:
            _remove(e)
        for store in {e.path.parent.parent if e.kind == "live" else e.path.parent for e in doomed}:
            _drop_if_empty(store)
    return doomed


# ------------------------------------------------------------------ noting use


def note_store(store_dir: Path, dsn: str) -> None:
    """Note where the store of ``store_dir`` is (no password), once; best effort."""
    path = store_dir / _STORE_FILE
    try:
        where = _where(dsn)
        try:
            if json.loads(path.read_text()).get("database") == where:
                return
        except (OSError, ValueError, AttributeError):
            pass
        tmp = path.with_name(f"{_STORE_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"database": where}))
        tmp.replace(path)
    except (OSError, ValueError):
        pass


def touch(path: Path) -> None:
    """Mark an entry used now (its folder's or file's modification time)."""
    with contextlib.suppress(OSError):
        os.utime(path)


# ------------------------------------------------------------------ internals


def _where(dsn: str) -> str:
    from riskbook.store.eventstore import where

    return where(dsn).removeprefix("database ")


def _database(store_dir: Path) -> str | None:
    try:
        where = json.loads((store_dir / _STORE_FILE).read_text()).get("database")
    except (OSError, ValueError, AttributeError):
        return None
    return where if isinstance(where, str) else None


def _size(path: Path) -> int:
    if path.is_file():
        return _file_size(path)
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += _file_size(Path(dirpath) / name)
    return total


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # removed meanwhile
        return 0


def _mtime(*paths: Path) -> datetime:
    stamps = []
    for p in paths:
        with contextlib.suppress(OSError):
            stamps.append(p.stat().st_mtime)
    return datetime.fromtimestamp(max(stamps, default=time.time()), UTC)


def _load_entry(store_id: str, entry: Path, database: str | None) -> CacheEntry:
    from riskbook.frames import _segments

    segments = _segments(entry)
    what = "?"
    if segments:
        try:
            meta = json.loads((segments[0][0] / "history.json").read_text())
            what = _describe_filters(meta.get("filters") or {})
        except (OSError, ValueError, AttributeError):
            pass
    else:
        what = "unusable (another layout, or torn)"
    return CacheEntry(
        store_id=store_id,
        kind="load",
        what=what,
        path=entry,
        bytes=_size(entry),
        last_used=_mtime(entry, entry / "segments.json"),
        database=database,
    )


def _describe_filters(filters: dict[str, object]) -> str:
    parts = []
    for name, value in filters.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        parts.append(f"{name}={value}")
    return " ".join(parts) or "whole history"


def _snapshot_entry(store_id: str, path: Path, database: str | None) -> CacheEntry:
    from riskbook.live._snapshot import header

    left = sorted(path.parent.glob(f"{path.name}.tmp-*"))  # writers killed midway
    head = header(path)
    name = head.get("name") if head else None
    if isinstance(name, str):
        what = f"processor {name}"
    elif path.exists():
        what = "unreadable snapshot"
    else:
        what = "unfinished snapshot (its writer stopped midway)"
    if left and path.exists():
        what += f", and {len(left)} unfinished"
    return CacheEntry(
        store_id=store_id,
        kind="live",
        what=what,
        path=path,
        bytes=sum(_file_size(p) for p in (path, *left)),
        last_used=_mtime(path, *left),
        database=database,
    )


def _remove(entry: CacheEntry) -> None:
    if entry.kind == "live":
        entry.path.unlink(missing_ok=True)
        for left in entry.path.parent.glob(f"{entry.path.name}.tmp-*"):
            left.unlink(missing_ok=True)
        return
    from riskbook.frames import _cache_lock

    try:
        with _cache_lock(entry.path):  # no writer midway through a segment
            shutil.rmtree(entry.path, ignore_errors=True)
    except FileNotFoundError:
        pass  # removed meanwhile


def _drop_if_empty(store_dir: Path) -> None:
    """Remove a store's folder left with nothing but its note."""
    try:
        for sub in (store_dir / "live",):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        if all(p.name == _STORE_FILE for p in store_dir.iterdir()):
            (store_dir / _STORE_FILE).unlink(missing_ok=True)
            store_dir.rmdir()
    except OSError:
        pass  # something was added meanwhile: keep it
