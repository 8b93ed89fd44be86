"""The compiled folds behind :mod:`riskbook.projections` (numba, imported on first use).

Plain loops over the arrays of a book sorted by (business time, recorded time,
position): the same floating-point operations, in the same order, as a per-event fold
of DESIGN.md §4.

Each account keeps a segment tree over the market values of its positions (leaves
``q * mark``, or ``q * a`` before the symbol's first mark), one for net and one for
gross exposure. A node is always recomputed from its two children, so an account's
net and gross exposure are a function of its current positions only, with no drift
however many updates, at a cost of log2(positions) additions per update. Each node
is a double-double (its high part at 2 x its index, its low part next to it): the sum of the leaves carried to about 106 bits and rounded once, at the root.
A plain sum of doubles depends on how it is grouped -- ((0.1 + 0.1) + (0.1 + 0.4)) is
0.7 and (((0.1 + 0.1) + 0.1) + 0.4) is 0.7000000000000001 -- and the tree's grouping on
which positions the History holds: a trade in another symbol, later, moved an
account's leverage at T by its last bit, and a limit met exactly was breached or not
depending on it (and on how the live engine cut its batches). Rounded once, the sum is
the same however the leaves are laid out.
(Numba helpers that take arrays cost reference counting on every call, so the hot
loop below is written out in one function.)
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "DUST",
    "account_figures",
    "first_rows",
    "fold",
    "gather",
    "gather_dense",
    "group",
    "last_before",
    "last_before_each",
    "merge_runs",
    "pair_codes",
    "settle",
    "strays",
    "tree_init",
]


# A sum whose result is this small against its terms is rounding left over from binary
# fractions, not a quantity: 0.1 + 0.2 - 0.3 is 5.6e-17. Left as it is, it is an open
# position of dust (revalued at every mark), and a peak of dust that makes a drawdown
# of 9e16 -- a MaxDrawdown breach and a block. Doubles carry 16 digits; the rounding of
# a few hundred sums stays below 1e-13 of their terms, and a real remainder is far above
# 1e-12 of them (a million shares leave a millionth of a share).
DUST = 1e-12


@numba.njit(cache=True, nogil=True, inline="always")
def settle(x, d):  # type: ignore[no-untyped-def]
    """``x + d``, or exactly 0.0 where it cancels to within :data:`DUST` of its terms."""
    y = x + d
    if abs(y) <= DUST * max(abs(x), abs(d)) and abs(y) < np.inf:
        return 0.0
    return y


@numba.njit(cache=True, nogil=True, inline="always")
def _dd_sum(ah, al, bh, bl):  # type: ignore[no-untyped-def]
    """(ah + al) + (bh + bl) as a double-double (high, low): Knuth's TwoSum of the high
    parts, the low parts added to its error, then renormalised (high = the sum rounded
    once). An infinite or NaN sum has no low part."""
    s = ah + bh
    if not abs(s) < np.inf:
        return s, 0.0
    bb = s - ah
    e = ((ah - (s - bb)) + (bh - bb)) + (al + bl)
    h = s + e
    return h, e - (h - s)


@numba.njit(cache=True, nogil=True)
def tree_init(q, a, pair_sym, mark, has_mark, acct_ptr, tree_off, tree_size, tree_net, tree_gross):  # type: ignore[no-untyped-def]
    """Build every account's trees from the state (a snapshot's) in place."""
    tree_net[:] = 0.0
    tree_gross[:] = 0.0
    for ac in range(acct_ptr.shape[0] - 1):
        off = tree_off[ac]
        size = tree_size[ac]
        for p in range(acct_ptr[ac], acct_ptr[ac + 1]):
            v = 0.0
            if q[p] != 0.0:
                s = pair_sym[p]
                v = q[p] * (mark[s] if has_mark[s] else a[p])
            leaf = 2 * (off + size + p - acct_ptr[ac])
            tree_net[leaf] = v
            tree_gross[leaf] = abs(v)
        for node in range(size - 1, 0, -1):
            i, lt = 2 * (off + node), 2 * (off + 2 * node)
            tree_net[i], tree_net[i + 1] = _dd_sum(
                tree_net[lt], tree_net[lt + 1], tree_net[lt + 2], tree_net[lt + 3]
            )
            tree_gross[i], tree_gross[i + 1] = _dd_sum(
                tree_gross[lt], tree_gross[lt + 1], tree_gross[lt + 2], tree_gross[lt + 3]
            )


@numba.njit(cache=True, nogil=True, error_model="numpy")
def fold(  # type: ignore[no-untyped-def]
    start, stop, kind, bt, acct, sym, pair, x, y, live,
    pair_acct, pair_sym, acct_ptr, sym_ptr, sym_pairs, tree_off, tree_size, since,
    q, a, r, ntr, pseen, plast,
    cash, peak, equity, gross, net, aseen, alast,
    mark, has_mark, tree_net, tree_gross,
    emit, pi, ai, p_ev, p_q, p_a, p_r, p_n, p_before,
    a_ev, a_acct, a_cash, a_gross, a_net, a_peak,
):  # fmt: skip
    """Fold book rows [start, stop) that are ``live``, in order, into the state arrays.

    Per event: a trade or an adjustment moves its (account, symbol) and then its
    account; a funding moves its account; a mark moves the mark of its symbol and then
    every account holding the symbol. State arrays are updated in place. With ``emit``,
    writes a row per position move (book index, q, a, R, trades, q before) from ``pi``
    and one per account move (book index, account, cash, gross, net, peak; equity is
    cash + net) from ``ai``. Account moves at or before ``since[account]`` are skipped
    (a snapshot has them). Returns (next row, pi, ai): the next row is < ``stop`` when
    the account outputs are full (grow them and call again from there).
    """
    cap = a_ev.shape[0]
    p = 0
    ac = 0
    for i in range(start, stop):
        if not live[i]:
            continue
        k = kind[i]
        t = bt[i]
        if k == 2:  # PriceMarked: revalue every holder
            s = sym[i]
            lo = sym_ptr[s]
            hi = sym_ptr[s + 1]
            if emit and ai + (hi - lo) > cap:
                return i, pi, ai
            mark[s] = x[i]
            has_mark[s] = True
        else:
            ac = acct[i]
            if t <= since[ac]:
                continue
            if emit and ai + 1 > cap:
                return i, pi, ai
            lo = -1  # one pass of the loop below, for this account
            hi = 0
            if k == 3:  # AccountFunded: flows move the peak too
                cash[ac] = settle(cash[ac], x[i])
                peak[ac] = settle(peak[ac], x[i])
            else:
                p = pair[i]
                before = q[p]
                if k == 0:  # TradeExecuted
                    s_qty = x[i]
                    price = y[i]
                    qq = q[p]
                    if qq == 0.0 or (s_qty > 0.0) == (qq > 0.0):  # opening or adding
                        a[p] = (qq * a[p] + s_qty * price) / (qq + s_qty)
                        q[p] = qq + s_qty
                    else:  # reducing, closing or flipping
                        closed = min(abs(s_qty), abs(qq))
                        sign = 1.0 if qq > 0.0 else -1.0
                        r[p] += closed * (price - a[p]) * sign
                        q[p] = settle(qq, s_qty)
                        if q[p] == 0.0:  # closed (to within rounding: settle)
                            a[p] = 0.0
                        elif abs(s_qty) > abs(qq):  # flipped: the rest opens at p
                            a[p] = price
                    cash[ac] = settle(cash[ac], -(s_qty * price))
                    ntr[p] += 1
                else:  # PositionUpdated: keep the cost basis q*a
                    new = x[i]
                    if new == 0.0:
                        a[p] = 0.0
                    else:
                        a[p] = (q[p] * a[p]) / new
                    q[p] = new
                pseen[p] = True
                plast[p] = t
                if emit:
                    p_ev[pi] = i
                    p_q[pi] = q[p]
                    p_a[pi] = a[p]
                    p_r[pi] = r[p]
                    p_n[pi] = ntr[p]
                    p_before[pi] = before
                    pi += 1
        for j in range(lo, hi):
            moved = k != 3  # a position's value changed: update the account's trees
            if j >= 0:  # a mark: each account holding the symbol
                p = sym_pairs[j]
                if q[p] == 0.0:
                    continue
                ac = pair_acct[p]
            if moved:
                v = 0.0
                if q[p] != 0.0:
                    ps = pair_sym[p]
                    v = q[p] * (mark[ps] if has_mark[ps] else a[p])
                off = tree_off[ac]
                node = tree_size[ac] + p - acct_ptr[ac]
                tree_net[2 * (off + node)] = v  # (its low part stays 0)
                tree_gross[2 * (off + node)] = abs(v)
                node >>= 1
                while node >= 1:
                    n, lt = 2 * (off + node), 2 * (off + 2 * node)
                    tree_net[n], tree_net[n + 1] = _dd_sum(
                        tree_net[lt], tree_net[lt + 1], tree_net[lt + 2], tree_net[lt + 3]
                    )
                    tree_gross[n], tree_gross[n + 1] = _dd_sum(
                        tree_gross[lt], tree_gross[lt + 1], tree_gross[lt + 2], tree_gross[lt + 3]
                    )
                    node >>= 1
            if t <= since[ac]:
                continue
            net_ = tree_net[2 * (tree_off[ac] + 1)]
            gross_ = tree_gross[2 * (tree_off[ac] + 1)]
            eq = settle(cash[ac], net_)
            if eq > peak[ac]:
                peak[ac] = eq
            equity[ac] = eq
            gross[ac] = gross_
            net[ac] = net_
            aseen[ac] = True
            alast[ac] = t
            if emit:
                a_ev[ai] = i
                a_acct[ai] = ac
                a_cash[ai] = cash[ac]
                a_gross[ai] = gross_
                a_net[ai] = net_
                a_peak[ai] = peak[ac]
                ai += 1
    return stop, pi, ai


@numba.njit(cache=True, nogil=True)
def group(keys, n_groups):  # type: ignore[no-untyped-def]
    """Counting sort: ``order`` lists the row indices of group g in ptr[g]:ptr[g+1],
    in their original (ascending) order."""
    ptr = np.zeros(n_groups + 1, np.int64)
    for k in keys:
        ptr[k + 1] += 1
    for g in range(n_groups):
        ptr[g + 1] += ptr[g]
    fill = ptr[:-1].copy()
    order = np.empty(keys.shape[0], np.int64)
    for i in range(keys.shape[0]):
        k = keys[i]
        order[fill[k]] = i
        fill[k] += 1
    return ptr, order


@numba.njit(cache=True, nogil=True)
def last_before(ptr, order, ev, cut):  # type: ignore[no-untyped-def]
    """Per group: the row (index into ``ev``) of its last entry with ``ev < cut``; -1 if none."""
    n = ptr.shape[0] - 1
    out = np.full(n, -1, np.int64)
    for g in range(n):
        lo = ptr[g]
        hi = ptr[g + 1]
        while lo < hi:
            mid = (lo + hi) // 2
            if ev[order[mid]] < cut:
                lo = mid + 1
            else:
                hi = mid
        if lo > ptr[g]:
            out[g] = order[lo - 1]
    return out


@numba.njit(cache=True, nogil=True)
def last_before_each(ptr, order, ev, groups, cuts):  # type: ignore[no-untyped-def]
    """Like :func:`last_before`, for one (group, cut) per query."""
    out = np.full(groups.shape[0], -1, np.int64)
    for k in range(groups.shape[0]):
        g = groups[k]
        lo = ptr[g]
        hi = ptr[g + 1]
        first = lo
        while lo < hi:
            mid = (lo + hi) // 2
            if ev[order[mid]] < cuts[k]:
                lo = mid + 1
            else:
                hi = mid
        if lo > first:
            out[k] = order[lo - 1]
    return out


# ----------------------------------------------------------------------------- the book's order
#
# These write into arrays the caller allocates with numpy: numpy asks the kernel for
# huge pages for large arrays, numba's allocator does not, and on a VM the page faults
# of fresh 4 KiB pages cost more than the work itself (a gather into a new numba array
# took 6x as long as into a numpy one).


@numba.njit(cache=True, nogil=True)
def strays(bt, ts, pos, starts, out):  # type: ignore[no-untyped-def]
    """Mark in ``out`` the rows that break the order (bt, ts, pos) of their part: those
    below the part's running maximum.

    Parts are ``starts[k]:starts[k + 1]``. What is left of each part is in order; the
    strays, once sorted, are one more ordered run (see :func:`merge_runs`).
    """
    for k in range(starts.shape[0] - 1):
        lo = starts[k]
        hi = starts[k + 1]
        if lo >= hi:
            continue
        mb = bt[lo]
        mt = ts[lo]
        mp = pos[lo]
        out[lo] = False
        for i in range(lo + 1, hi):
            b = bt[i]
            if b > mb or (b == mb and (ts[i] > mt or (ts[i] == mt and pos[i] >= mp))):
                mb = b
                mt = ts[i]
                mp = pos[i]
                out[i] = False
            else:
                out[i] = True


@numba.njit(cache=True, nogil=True)
def merge_runs(bt, ts, pos, src, bounds, out):  # type: ignore[no-untyped-def]
    """Merge the ordered runs ``src[bounds[r]:bounds[r + 1]]`` (row indices) by
    (bt, ts, pos) into ``out``.

    There are a handful of runs (one per kind, and the strays): each step takes the
    least head, a run listed earlier first on equal keys.
    """
    n_runs = bounds.shape[0] - 1
    head = bounds[:-1].copy()
    for j in range(src.shape[0]):
        best = -1
        b = 0
        for r in range(n_runs):
            h = head[r]
            if h >= bounds[r + 1]:
                continue
            c = src[h]
            if best < 0 or (
                bt[c] < bt[b]
                or (bt[c] == bt[b] and (ts[c] < ts[b] or (ts[c] == ts[b] and pos[c] < pos[b])))
            ):
                best = r
                b = c
        out[j] = b
        head[best] += 1


@numba.njit(cache=True, nogil=True)
def gather(perm, src, out):  # type: ignore[no-untyped-def]
    """``out[j] = src[perm[j]]``."""
    for j in range(perm.shape[0]):
        out[j] = src[perm[j]]


@numba.njit(cache=True, nogil=True)
def gather_dense(perm, codes, lut, out):  # type: ignore[no-untyped-def]
    """``out[j] = lut[codes[perm[j]]]``, -1 where the code is -1 (none)."""
    for j in range(perm.shape[0]):
        c = codes[perm[j]]
        out[j] = lut[c] if c >= 0 else -1


@numba.njit(cache=True, nogil=True)
def first_rows(codes, first):  # type: ignore[no-untyped-def]
    """The first row of each code among ``codes`` into ``first`` (left -1 for none)."""
    for i in range(codes.shape[0]):
        c = codes[i]
        if c >= 0 and first[c] < 0:
            first[c] = i


@numba.njit(cache=True, nogil=True)
def pair_codes(kind, acct, sym, n_sym, extra_keys, index, pair):  # type: ignore[no-untyped-def]
    """Dense (account, symbol) pairs of the trades and adjustments (kind <= 1) and of
    ``extra_keys``, key ``acct * n_sym + sym``: writes each row's pair (-1: none) into
    ``pair`` and returns the keys present, in order. ``index`` (one int32 per key, all
    0) is scratch space."""
    for i in range(kind.shape[0]):
        if kind[i] <= 1:
            index[acct[i] * n_sym + sym[i]] = 1
    for k in extra_keys:
        index[k] = 1
    keys = np.flatnonzero(index)
    for p in range(keys.shape[0]):
        index[keys[p]] = p
    for i in range(kind.shape[0]):
        pair[i] = index[acct[i] * n_sym + sym[i]] if kind[i] <= 1 else -1
    return keys


@numba.njit(cache=True, nogil=True, error_model="numpy")
def account_figures(cash, gross, net, peak, equity, lev, dd):  # type: ignore[no-untyped-def]
    """Equity ``cash + net`` (:func:`settle`), leverage and drawdown of account timeline rows, with the
    operations of :func:`riskbook.projections.leverage` and ``drawdown``: leverage 0
    with no exposure, +inf when equity <= 0, else gross / equity; drawdown 0 while the
    peak is <= 0, else (peak - equity) / peak. An output of length 0 is not written."""
    w_e, w_l, w_d = equity.shape[0] > 0, lev.shape[0] > 0, dd.shape[0] > 0
    for i in range(cash.shape[0]):
        e = settle(cash[i], net[i])
        if w_e:
            equity[i] = e
        if w_l:
            g = gross[i]
            if g == 0.0:
                lev[i] = 0.0
            elif e <= 0.0:
                lev[i] = np.inf
            else:
                lev[i] = g / e
        if w_d:
            p = peak[i]
            dd[i] = 0.0 if p <= 0.0 else (p - e) / p
