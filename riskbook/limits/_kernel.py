"""The compiled breach fold behind :mod:`riskbook.limits` (numba, imported on first use).

One loop over two streams, each already in business order (time, recorded time,
position): the metric rows of one limit type and its limit changes. It merges them as
it goes (a limit change goes first on a tie), keeps per-key state in arrays (the
metric, the limits in force, the open breach of each level) and writes one record per
breach interval that closes. See the module docstring of :mod:`riskbook.limits`.

Start and end kinds: 0 a metric row, 1 a limit row (index into the limit table), 2 a
breach carried in from an earlier batch (start only), 3 the end of a UTC day (end only).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["DAY_US", "dense_keys", "fold_breaches", "in_order"]

DAY_US = 86_400_000_000


@numba.njit(cache=True, nogil=True, error_model="numpy")
def fold_breaches(  # type: ignore[no-untyped-def]
    i, j, stop_i, stop_j, finish,
    m_key, m_bt, m_ts, m_pos, m_val,
    l_acct, l_key, l_bt, l_ts, l_pos, l_val, l_src,
    key_acct, acct_ptr, acct_keys, thr, daily, horizon,
    val, has_val, day, last_bt,
    spec_has, spec_val, spec_src, gen_has, gen_val, gen_src,
    open_, s_kind, s_idx, s_bt, peak, trig, s_lim, s_lsrc,
    n, o_key, o_lvl, o_skind, o_sidx, o_sbt, o_ekind, o_eidx, o_ebt,
    o_peak, o_trig, o_slim, o_slsrc, o_elim, o_elsrc,
):  # fmt: skip
    """Fold metric rows [i, stop_i) and limit rows [j, stop_j) into the state, in order.

    State arrays are per key (``val``, ``has_val``, ``day``, ``last_bt``, ``spec_*``:
    the key's own limit), per account (``gen_*``: its limit for keys without their
    own) and per (key, level) (the open breach). Closed intervals are written to the
    ``o_*`` arrays from ``n``. With ``finish``, daily breaches whose day ended by
    ``horizon`` are closed at the end. Returns (i, j, n, status): status 0 done, 1 the
    outputs are full (grow them and call again from i, j), 2 row i (or limit row j,
    status 3) comes before what its key already folded.
    """
    n_lvl = thr.shape[0]
    cap = o_key.shape[0]
    nan = np.nan
    while i < stop_i or j < stop_j:
        take_limit = j < stop_j and (
            i >= stop_i
            or l_bt[j] < m_bt[i]
            or (
                l_bt[j] == m_bt[i]
                and (l_ts[j] < m_ts[i] or (l_ts[j] == m_ts[i] and l_pos[j] <= m_pos[i]))
            )
        )
        # The keys this row touches: its own, or every key of the account it sets.
        if take_limit:
            t = l_bt[j]
            k0 = l_key[j]
            lo = 0 if k0 >= 0 else acct_ptr[l_acct[j]]
            hi = 1 if k0 >= 0 else acct_ptr[l_acct[j] + 1]
        else:
            t = m_bt[i]
            k0 = m_key[i]
            lo = 0
            hi = 1
        if n + (hi - lo) * 2 * n_lvl > cap:
            return i, j, n, 1
        for p in range(lo, hi):
            k = k0 if k0 >= 0 else acct_keys[p]
            if has_val[k] and t < last_bt[k]:
                return i, j, n, 3 if take_limit else 2
        # 1. Time passes: a day-scope key whose day is over closes its breaches at
        #    midnight, under the limit in force then, and its metric restarts from 0.
        if daily:
            d = t // DAY_US
            for p in range(lo, hi):
                k = k0 if k0 >= 0 else acct_keys[p]
                if not has_val[k] or day[k] >= d:
                    continue
                ac = key_acct[k]
                lim, lsrc = nan, -1
                if spec_has[k]:
                    lim, lsrc = spec_val[k], spec_src[k]
                elif gen_has[ac]:
                    lim, lsrc = gen_val[ac], gen_src[ac]
                for lv in range(n_lvl):
                    if open_[k, lv]:
                        o_key[n] = k
                        o_lvl[n] = lv
                        o_skind[n] = s_kind[k, lv]
                        o_sidx[n] = s_idx[k, lv]
                        o_sbt[n] = s_bt[k, lv]
                        o_ekind[n] = 3
                        o_eidx[n] = -1
                        o_ebt[n] = (day[k] + 1) * DAY_US
                        o_peak[n] = peak[k, lv]
                        o_trig[n] = trig[k, lv]
                        o_slim[n] = s_lim[k, lv]
                        o_slsrc[n] = s_lsrc[k, lv]
                        o_elim[n] = lim
                        o_elsrc[n] = lsrc
                        n += 1
                        open_[k, lv] = False
                day[k] = d
                val[k] = 0.0
        # 2. The row itself: a limit change, or a new metric value.
        if take_limit:
            src = l_src[j]
            if k0 >= 0:
                spec_has[k0] = True
                spec_val[k0] = l_val[j]
                spec_src[k0] = src
            else:
                a = l_acct[j]
                gen_has[a] = True
                gen_val[a] = l_val[j]
                gen_src[a] = src
            kind = 1
            idx = src
            j += 1
        else:
            val[k0] = m_val[i]
            if not has_val[k0]:
                has_val[k0] = True
                if daily:
                    day[k0] = t // DAY_US
            kind = 0
            idx = i
            i += 1
        # 3. Compare each touched key with its limit at every level.
        for p in range(lo, hi):
            k = k0 if k0 >= 0 else acct_keys[p]
            if not has_val[k]:
                continue  # no metric yet: nothing to compare
            if kind == 1 and k0 < 0 and spec_has[k]:
                continue  # the key's own limit overrides the account's
            last_bt[k] = t
            ac = key_acct[k]
            lim, lsrc = nan, -1
            if spec_has[k]:
                lim, lsrc = spec_val[k], spec_src[k]
            elif gen_has[ac]:
                lim, lsrc = gen_val[ac], gen_src[ac]
            v = val[k]
            for lv in range(n_lvl):
                over = lsrc != -1 and v > thr[lv] * lim
                if open_[k, lv]:
                    if over:
                        if v > peak[k, lv]:
                            peak[k, lv] = v
                    else:
                        o_key[n] = k
                        o_lvl[n] = lv
                        o_skind[n] = s_kind[k, lv]
                        o_sidx[n] = s_idx[k, lv]
                        o_sbt[n] = s_bt[k, lv]
                        o_ekind[n] = kind
                        o_eidx[n] = idx
                        o_ebt[n] = t
                        o_peak[n] = peak[k, lv]
                        o_trig[n] = trig[k, lv]
                        o_slim[n] = s_lim[k, lv]
                        o_slsrc[n] = s_lsrc[k, lv]
                        o_elim[n] = lim
                        o_elsrc[n] = lsrc
                        n += 1
                        open_[k, lv] = False
                elif over:
                    open_[k, lv] = True
                    s_kind[k, lv] = kind
                    s_idx[k, lv] = idx
                    s_bt[k, lv] = t
                    peak[k, lv] = v
                    trig[k, lv] = v
                    s_lim[k, lv] = lim
                    s_lsrc[k, lv] = lsrc
    if finish and daily:
        for k in range(val.shape[0]):
            if not has_val[k] or (day[k] + 1) * DAY_US > horizon:
                continue
            if n + n_lvl > cap:
                return i, j, n, 1
            ac = key_acct[k]
            lim, lsrc = nan, -1
            if spec_has[k]:
                lim, lsrc = spec_val[k], spec_src[k]
            elif gen_has[ac]:
                lim, lsrc = gen_val[ac], gen_src[ac]
            for lv in range(n_lvl):
                if open_[k, lv]:
                    o_key[n] = k
                    o_lvl[n] = lv
                    o_skind[n] = s_kind[k, lv]
                    o_sidx[n] = s_idx[k, lv]
                    o_sbt[n] = s_bt[k, lv]
                    o_ekind[n] = 3
                    o_eidx[n] = -1
                    o_ebt[n] = (day[k] + 1) * DAY_US
                    o_peak[n] = peak[k, lv]
                    o_trig[n] = trig[k, lv]
                    o_slim[n] = s_lim[k, lv]
                    o_slsrc[n] = s_lsrc[k, lv]
                    o_elim[n] = lim
                    o_elsrc[n] = lsrc
                    n += 1
                    open_[k, lv] = False
            day[k] = horizon // DAY_US
            val[k] = 0.0
    return i, j, n, 0


@numba.njit(cache=True, nogil=True)
def in_order(bt, ts, pos):  # type: ignore[no-untyped-def]
    """Whether rows are sorted by (business time, recorded time, position)."""
    for r in range(1, bt.shape[0]):
        if bt[r] != bt[r - 1]:
            if bt[r] < bt[r - 1]:
                return False
        elif ts[r] != ts[r - 1]:
            if ts[r] < ts[r - 1]:
                return False
        elif pos[r] < pos[r - 1]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def dense_keys(acct, sym, width, size):  # type: ignore[no-untyped-def]
    """Dense key per row of (account code, symbol code + 1 or 0), numbered in order of
    first appearance; and the first row of each key."""
    index = np.full(size, -1, np.int32)
    first = np.empty(min(size, acct.shape[0]), np.int64)
    out = np.empty(acct.shape[0], np.int32)
    n = 0
    for r in range(acct.shape[0]):
        c = acct[r] * width + (sym[r] if sym.shape[0] else 0)
        k = index[c]
        if k < 0:
            k = n
            index[c] = k
            first[k] = r
            n += 1
        out[r] = k
    return out, first[:n]
