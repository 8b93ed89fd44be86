"""A query's rows into Polars through PostgreSQL's binary COPY, decoded by compiled loops.

The route of :func:`riskbook.load` for large reads (ADBC's driver for small ones, and
where this one cannot run):

1. ``COPY (query) TO STDOUT (FORMAT binary)`` on a psycopg connection; on a thread of
   its own, a compiled loop calls libpq's ``PQgetCopyData`` (the libpq psycopg itself
   uses) and appends each row to a large buffer, checking and measuring the row while
   it is in the cache -- without the GIL and without a Python call per row;
2. meanwhile a compiled pass decodes the other buffer, in one go, into an array per
   fixed-width column and, per text column, Arrow's offsets and bytes -- or, for the
   columns a load wants Categorical or Enum, each distinct value once and a code per
   row (no Polars cast of millions of strings afterwards);
3. those arrays become Arrow arrays (nanoarrow, no copy) and then Polars Series.

ADBC's driver does the same work in C++ but appends value by value to growing Arrow
builders, and leaves the categorical casts to Polars: at 5M events, a cold load's
CPU time in the client is 2.4-2.5 s here against 4.3-4.5 s.
Only the column types riskbook's loads select are decoded (integers, floats, bool,
timestamps, text); a query with another type is refused with :class:`Unsupported`
before anything is read, and the caller falls back to ADBC.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib
import os
import queue
import threading
from collections.abc import Mapping
from typing import Any

import numba
import numpy as np
import polars as pl

from riskbook._columns import BOOL, FLOAT4, FLOAT8, INT8, TEXT, Unsupported, finish, use_utf8
from riskbook._columns import describe as _describe
from riskbook._columns import query_error as _error
from riskbook._memory import empty as _empty

__all__ = ["Unsupported", "available", "read"]

_CHUNK = 64 << 20  # bytes of COPY rows decoded at once
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970-01-01

# --------------------------------------------------------------------------- libpq


@functools.cache
def _libpq() -> tuple[Any, ...] | None:
    """``PQgetCopyData``, ``PQconsumeInput``, ``PQfreemem``, ``memcpy`` and ``usleep`` as
    ctypes functions taking plain integers (so that compiled code can call them), from
    the libpq psycopg loaded and the C library."""
    try:
        import psycopg.pq

        if psycopg.pq.__impl__ == "binary":
            import psycopg_binary

            root = os.path.dirname(os.path.dirname(psycopg_binary.__file__))
            found = glob.glob(os.path.join(root, "psycopg_binary.libs", "libpq*.so*"))
            lib = ctypes.CDLL(found[0]) if found else None
        else:  # the python or c implementation: the system's libpq, as psycopg finds it
            lib = importlib.import_module("psycopg.pq._pq_ctypes").pq
        if lib is None:
            return None
        libc = ctypes.CDLL(None)
    except (ImportError, OSError, AttributeError):
        return None
    ptr, size = ctypes.c_ssize_t, ctypes.c_size_t
    return (
        _function(lib.PQgetCopyData, [ptr, ptr, ctypes.c_int], ctypes.c_int),
        _function(lib.PQconsumeInput, [ptr], ctypes.c_int),
        _function(lib.PQfreemem, [ptr], None),
        _function(libc.memcpy, [ptr, ptr, size], ptr),
        _function(libc.usleep, [ctypes.c_uint], ctypes.c_int),
    )


def _function(fn: Any, argtypes: list[Any], restype: Any) -> Any:
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


def available() -> bool:
    """Whether this route can run here (psycopg's libpq found)."""
    return _libpq() is not None


_WAIT_US = 200  # how long the receiving loop lets the server's rows pile up when it has none


@numba.njit(nogil=True, cache=True)
def _drain(get, consume, free, memcpy, usleep, conn, slot, out, off, codes, stats):  # type: ignore[no-untyped-def]
    """Append COPY rows to ``out`` from ``off``; (new off, status): 0 the COPY is over,
    1 ``out`` is full (the next row is kept in ``slot``), -2 an error. The functions
    are libpq's and libc's (passed in, so that the compiled code is cached: it holds no
    address of this process).

    When libpq has no complete row, the loop sleeps ``_WAIT_US`` and then reads all the
    socket holds, instead of waiting in ``poll`` to be woken for each of the server's
    8 KB sends: at 5M events, about 100,000 wakeups of this thread became a few
    thousand (a context switch costs several microseconds in a virtual machine).

    Each message is checked while it is in the cache and its rows counted (the server
    sends a row per message, the header with the first one): ``stats[0]`` rows,
    ``stats[1 + c]`` bytes of text column ``c``; ``stats[-1]`` is set to 1 if a
    message is not the header, rows of ``len(codes)`` fields and the trailer that fill
    it exactly. ``slot[3]``: whether the header was read.
    """
    cap = out.shape[0]
    base = out.ctypes.data
    ncols = codes.shape[0]
    while True:
        if slot[1] != 0:  # the row that did not fit last time
            n = slot[2]
            src = slot[1]
        else:
            n = get(conn, slot.ctypes.data, 1)
            while n == 0:  # no complete row in libpq's buffer: read what the socket has
                if consume(conn) == 0:
                    return off, -2
                n = get(conn, slot.ctypes.data, 1)
                if n == 0:  # nor had the socket: let the server's rows pile up
                    usleep(_WAIT_US)
            if n == -1:
                return off, 0
            if n < 0:
                return off, -2
            src = slot[0]
        if off + n > cap:
            slot[1] = src
            slot[2] = n
            return off, 1
        memcpy(base + off, src, n)
        free(src)
        slot[1] = 0
        q = off
        stop = off + n
        if slot[3] == 0:  # the header comes first, in one message with the first row
            slot[3] = 1
            if n < 19 or out[q] != 80 or out[q + 1] != 71:  # "PG"
                stats[-1] = 1
            else:
                q += 19 + _be32(out, q + 15)
        while q + 2 <= stop:
            fc = (np.int64(out[q]) << 8) | np.int64(out[q + 1])
            q += 2
            if fc == 0xFFFF:  # the trailer
                continue
            if fc != ncols:
                stats[-1] = 1
                break
            for c in range(ncols):
                if q + 4 > stop:
                    stats[-1] = 1
                    break
                m = _be32(out, q)
                q += 4
                if m > 0:
                    if codes[c] == 7:
                        stats[1 + c] += m
                    q += m
            stats[0] += 1
        if q != stop:
            stats[-1] = 1
        off += n


def warm() -> bool:
    """Load the compiled parser (numba's first call in a process costs 0.15 s or more);
    whether the route can run here."""
    if not available():
        return False
    codes = np.array([INT8, TEXT], np.int64)
    buf = np.array([0, 2, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 1, 65], np.uint8)
    columns = [("i", INT8, pl.Int64()), ("t", TEXT, pl.String())]
    text = np.array([0, 1], np.int64)
    _decode(buf, 0, 1, text, codes, columns, {})
    _decode(buf, 0, 1, text, codes, columns, {1: pl.Categorical()})
    return True


# --------------------------------------------------------------------------- parser


@numba.njit(nogil=True, cache=True)
def _be32(buf, i):  # type: ignore[no-untyped-def]
    v = (np.int64(buf[i]) << 24) | (np.int64(buf[i + 1]) << 16) | (np.int64(buf[i + 2]) << 8)
    v |= np.int64(buf[i + 3])
    if v >= 0x80000000:
        v -= 0x100000000
    return v


@numba.njit(nogil=True, cache=True)
def _be64(buf, i):  # type: ignore[no-untyped-def]
    v = np.uint64(0)
    for k in range(8):
        v = (v << np.uint64(8)) | np.uint64(buf[i + k])
    return np.int64(v)


@numba.njit(nogil=True, cache=True)
def _fill(  # type: ignore[no-untyped-def]
    buf, pos, r0, rows, codes, slots, fixed, fixedf, valid, nulls, offsets, data, data_at,
    fill, dslot, dcodes, table, hashes, nuniq, f4, f4v,
):  # fmt: skip
    """Decode rows ``r0 .. rows - 1`` from ``buf[pos:]``: fixed-width values into row
    ``slots[c]`` of ``fixed`` (``fixedf``: the same memory as float64), text into Arrow
    offsets (row ``slots[c]`` of ``offsets``) and bytes (``data`` at ``fill[slots[c]]``,
    from ``data_at[slots[c]]``); ``valid[c, r]`` is set to 0 for a NULL (the caller set
    1) and ``nulls[c]`` counts them. ``f4`` / ``f4v``: one uint32 and its float32 view.

    A text column with ``dslot[c] = d >= 0`` is dictionary-encoded: its distinct values
    go to offsets and bytes once each, in order of appearance, and ``dcodes[d, r]`` is
    the row's index among them (-1 for NULL), found by open addressing in ``table[d]``
    (``hashes[d]`` keeps each distinct value's hash, ``nuniq[d]`` counts them).

    Returns (next row, its offset): ``rows`` when done, less when a table is half full
    (the caller grows the tables and calls again from there).
    """
    ncols = codes.shape[0]
    mask = table.shape[1] - 1
    for r in range(r0, rows):
        for d in range(nuniq.shape[0]):
            if 2 * (nuniq[d] + 1) > table.shape[1]:
                return r, pos
        pos += 2
        for c in range(ncols):
            n = _be32(buf, pos)
            pos += 4
            code = codes[c]
            s = slots[c]
            if n < 0:
                valid[c, r] = 0
                nulls[c] += 1
                if code == 7:
                    d = dslot[c]
                    if d >= 0:
                        dcodes[d, r] = -1
                    else:
                        offsets[s, r + 1] = fill[s] - data_at[s]
                continue
            if code == 7:
                d = dslot[c]
                if d >= 0:
                    h = np.uint64(14695981039346656037)
                    for k in range(n):
                        h = (h ^ np.uint64(buf[pos + k])) * np.uint64(1099511628211)
                    j = np.int64(h & np.uint64(mask))
                    while True:
                        u = table[d, j]
                        if u < 0:  # a value not seen before
                            u = nuniq[d]
                            f = fill[s]
                            for k in range(n):
                                data[f + k] = buf[pos + k]
                            fill[s] = f + n
                            offsets[s, u + 1] = fill[s] - data_at[s]
                            hashes[d, u] = h
                            table[d, j] = u
                            nuniq[d] = u + 1
                            break
                        if hashes[d, u] == h:
                            a = data_at[s] + offsets[s, u]
                            if offsets[s, u + 1] - offsets[s, u] == n:
                                same = True
                                for k in range(n):
                                    if data[a + k] != buf[pos + k]:
                                        same = False
                                        break
                                if same:
                                    break
                        j = (j + 1) & mask
                    dcodes[d, r] = u
                else:
                    f = fill[s]
                    for k in range(n):
                        data[f + k] = buf[pos + k]
                    fill[s] = f + n
                    offsets[s, r + 1] = fill[s] - data_at[s]
            elif code == 0 or code == 3:  # int8, float8: the bits as they are
                fixed[s, r] = _be64(buf, pos)
            elif code == 6:  # timestamp: microseconds since 2000-01-01
                v = _be64(buf, pos)
                if v != 9223372036854775807 and v != -9223372036854775808:  # not infinity
                    v += _PG_EPOCH_US
                fixed[s, r] = v
            elif code == 1:
                fixed[s, r] = _be32(buf, pos)
            elif code == 2:
                v = (np.int64(buf[pos]) << 8) | np.int64(buf[pos + 1])
                fixed[s, r] = v - 0x10000 if v >= 0x8000 else v
            elif code == 4:  # float4, widened
                f4[0] = np.uint32(_be32(buf, pos) & 0xFFFFFFFF)
                fixedf[s, r] = np.float64(f4v[0])
            else:  # bool
                fixed[s, r] = buf[pos]
            pos += n
    return rows, pos


@numba.njit(nogil=True, cache=True)
def _rehash(table, hashes, nuniq):  # type: ignore[no-untyped-def]
    """Put every distinct value of each column (by its kept hash) into ``table``."""
    mask = table.shape[1] - 1
    for d in range(nuniq.shape[0]):
        for u in range(nuniq[d]):
            j = np.int64(hashes[d, u] & np.uint64(mask))
            while table[d, j] >= 0:
                j = (j + 1) & mask
            table[d, j] = u


# --------------------------------------------------------------------------- the route


def read(
    conn: Any, query: str, categories: Mapping[int, pl.DataType] | None = None
) -> pl.DataFrame:
    """The rows of ``query`` (parameters inlined) on psycopg connection ``conn``, which
    must be idle and is not usable by others meanwhile (its ``client_encoding`` is left
    at UTF8); raises :class:`Unsupported` before reading anything if a column's type is
    not decoded here.

    ``categories``: text columns (by index) to read straight into this Categorical or
    Enum type, each distinct value converted once per buffer, not once per row.
    """
    import psycopg.pq

    functions = _libpq()
    if functions is None:
        raise Unsupported("psycopg's libpq was not found")
    pgconn = conn.pgconn
    use_utf8(pgconn)
    columns = _describe(pgconn, query.encode())
    pgconn.send_query(b"COPY (" + query.encode() + b") TO STDOUT (FORMAT binary)")
    res = pgconn.get_result()
    if res is None or res.status != psycopg.pq.ExecStatus.COPY_OUT:
        finish(pgconn)
        raise _error(res)
    codes = np.array([c for _, c, _ in columns], np.int64)
    frames: list[pl.DataFrame] = []
    pump = _Pump(functools.partial(_drain, *functions), pgconn, codes)
    try:
        start = -1  # the header not read yet
        for buf, end, stats in pump:
            if start < 0:  # the header: signature, flags, extension
                if end < 19 or bytes(buf[:11]) != _SIGNATURE:
                    raise _broken("no COPY binary header")
                start = 19 + int(_be32(buf, 15))
            else:
                start = 0
            if stats[-1]:
                raise _broken("a malformed message")
            rows = int(stats[0])
            text_bytes = stats[1:-1]
            frames.append(_decode(buf, start, rows, text_bytes, codes, columns, categories or {}))
            pump.done(buf)
    finally:
        pump.stop()
    final = pgconn.get_result()
    finish(pgconn)
    if pump.status == -2 or final is None or final.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise _error(final) if final is not None else _broken("the COPY ended early")
    if not frames:
        wanted = categories or {}
        return pl.DataFrame(schema={n: wanted.get(i, t) for i, (n, _, t) in enumerate(columns)})
    return pl.concat(frames, rechunk=False) if len(frames) > 1 else frames[0]


class _Pump:
    """Receives the COPY rows on a thread of its own, into two buffers in turn, while
    the caller decodes the other one: the server's work, the wait for it and the
    decoding overlap. Iterate for (buffer, bytes used, its counts: see :func:`_drain`);
    give each buffer back with ``done``."""

    def __init__(self, drain: Any, pgconn: Any, codes: np.ndarray) -> None:
        self.status = 1
        self._drain = drain
        self._codes = codes
        self._conn = pgconn.pgconn_ptr
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        self._full: queue.Queue[tuple[np.ndarray, int, np.ndarray] | None] = queue.Queue()
        self._stopping = False
        self._ended = False  # the thread's last item (None) taken from _full
        for _ in range(2):
            self._free.put(_empty(_CHUNK, np.uint8))
        self._thread = threading.Thread(target=self._run, name="riskbook-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # PQgetCopyData's out pointer; a row kept for later (address, size); header read
        slot = np.zeros(4, np.int64)
        try:
            while self.status == 1 and not self._stopping:
                buf = self._free.get()
                if self._stopping:
                    break
                stats = np.zeros(self._codes.shape[0] + 2, np.int64)
                end, self.status = self._drain(self._conn, slot, buf, 0, self._codes, stats)
                if self.status == 1 and end == 0:  # a row larger than a buffer: one for it
                    buf = _empty(int(slot[2]) + _CHUNK, np.uint8)
                    end, self.status = self._drain(self._conn, slot, buf, 0, self._codes, stats)
                if self.status != -2:
                    self._full.put((buf, end, stats))
        finally:
            self._full.put(None)

    def __iter__(self) -> Any:
        while (item := self._full.get()) is not None:
            yield item
        self._ended = True

    def done(self, buf: np.ndarray) -> None:
        self._free.put(buf)

    def stop(self) -> None:
        """Wait for the thread (after an error here: let it drain the COPY to its end).

        Once its last item is taken, the thread is ending: only joined. (Looking at
        whether it was alive instead, a thread caught between its last put and its end
        -- a COPY cut short, say -- had this wait for an item that never came.)"""
        if not self._ended:
            for _ in range(2):
                self._free.put(_empty(_CHUNK, np.uint8))  # room for whatever is left
            while self._full.get() is not None:
                self._free.put(_empty(_CHUNK, np.uint8))
            self._ended = True
        self._thread.join()


def _broken(what: str) -> Exception:
    from riskbook.errors import StoreError

    return StoreError(f"the server's COPY stream could not be read: {what}")


def _decode(
    buf: np.ndarray,
    start: int,
    rows: int,
    text_bytes: np.ndarray,
    codes: np.ndarray,
    columns: list[Any],
    categories: Mapping[int, pl.DataType],
) -> pl.DataFrame:
    """The ``rows`` rows from ``buf[start:]`` (checked whole by :func:`_drain`, which
    counted ``text_bytes`` of each column) as a frame."""
    import nanoarrow as na

    ncols = len(columns)
    is_text = codes == TEXT
    slots = np.zeros(ncols, np.int64)
    slots[is_text] = np.arange(int(is_text.sum()))
    slots[~is_text] = np.arange(int((~is_text).sum()))
    dslot = np.full(ncols, -1, np.int64)
    encoded = [c for c in sorted(categories) if codes[c] == TEXT]
    dslot[encoded] = np.arange(len(encoded))
    n_fixed, n_text, n_dict = int((~is_text).sum()), int(is_text.sum()), len(encoded)
    fixed = _empty(n_fixed * rows, np.int64).reshape(n_fixed, rows)
    valid = _empty(ncols * rows, np.uint8).reshape(ncols, rows)
    valid[:] = 1
    null_counts = np.zeros(ncols, np.int64)
    offsets = _empty(n_text * (rows + 1), np.int32).reshape(n_text, rows + 1)
    offsets[:, 0] = 0
    sizes = text_bytes[is_text]
    data_at = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    data = _empty(int(sizes.sum()), np.uint8)
    dcodes = _empty(n_dict * rows, np.int32).reshape(n_dict, rows)
    hashes = np.empty((n_dict, rows + 1), np.uint64)
    nuniq = np.zeros(n_dict, np.int64)
    table = np.full((n_dict, 1024), -1, np.int32)
    f4 = np.zeros(1, np.uint32)
    fill = data_at.copy()
    r, pos = 0, start
    while True:
        r, pos = _fill(buf, pos, r, rows, codes, slots, fixed, fixed.view(np.float64), valid,
                       null_counts, offsets, data, data_at, fill, dslot, dcodes, table, hashes,
                       nuniq, f4, f4.view(np.float32))  # fmt: skip
        if r >= rows:
            break
        table = np.full((n_dict, 4 * table.shape[1]), -1, np.int32)  # a table half full
        _rehash(table, hashes, nuniq)
    out = []
    for c, (name, code, dtype) in enumerate(columns):
        s = int(slots[c])
        ok = valid[c]
        nulls = int(null_counts[c])
        bitmap = np.packbits(ok.view(np.bool_), bitorder="little") if nulls else None
        if code == TEXT and dslot[c] >= 0:
            d, n = int(dslot[c]), int(nuniq[dslot[c]])
            lo = int(data_at[s])
            arr = na.c_array_from_buffers(na.string(), n, [None, offsets[s, : n + 1], data[lo:]])
            values = pl.Series(name, arr).cast(categories[c])
            index = pl.Series(name, dcodes[d])
            if nulls:
                index = index.scatter(np.flatnonzero(ok == 0), None)
            out.append(values.gather(index).alias(name))
            continue
        if code == TEXT:
            lo = int(data_at[s])
            arr = na.c_array_from_buffers(
                na.string(), rows, [bitmap, offsets[s], data[lo : lo + int(sizes[s])]],
                null_count=nulls,
            )  # fmt: skip
            out.append(pl.Series(name, arr).alias(name))
            continue
        values = fixed[s]
        if code in (FLOAT8, FLOAT4):
            values = values.view(np.float64)
        elif code == BOOL:
            values = values.astype(np.bool_)
        series = pl.Series(name, values)
        if nulls:
            series = series.scatter(np.flatnonzero(ok == 0), None)
        out.append(series.cast(dtype) if series.dtype != dtype else series)
    return pl.DataFrame(out)
