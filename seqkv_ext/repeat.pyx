# cython: boundscheck=False, wraparound=False, cdivision=False
"""Repeat prediction (issue 13, lever 3): a token whose preceding tokens occurred earlier in the cache is
predicted from that earlier occurrence's symbols.

``longest_matches`` finds, for every token, the earlier position whose run of equal ids ending there is the
longest; ``repeat_undo`` undoes the residuals of rows coded that way, with the temporal predictor's lag-1
rule for the tokens without a long enough match; ``rows_entropy_bits`` is the encoder's per-row cost.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t
from .entropy cimport range_entropy_bits

cnp.import_array()


def longest_matches(const int32_t[::1] ids, Py_ssize_t max_candidates=64, Py_ssize_t max_len=32):
    """(src int32 [T], length int32 [T]): for token ``t``, the earlier position ``s`` (-1: none) maximising the
    number of equal ids ending at ``t`` and ``s`` (at most ``max_len``), among the ``max_candidates`` most
    recent earlier occurrences of ``ids[t]``; ties go to the most recent.  ``ids`` must lie in [0, T)."""
    cdef Py_ssize_t T = ids.shape[0], t, s, n, L, best, count
    src_arr = np.full(T, -1, dtype=np.int32)
    len_arr = np.zeros(T, dtype=np.int32)
    if T == 0:
        return src_arr, len_arr
    last_arr = np.full(T, -1, dtype=np.intp)
    prev_arr = np.full(T, -1, dtype=np.intp)
    cdef int32_t[::1] src = src_arr
    cdef int32_t[::1] length = len_arr
    cdef Py_ssize_t[::1] last = last_arr
    cdef Py_ssize_t[::1] prev = prev_arr
    for t in range(T):
        if ids[t] < 0 or ids[t] >= T:
            raise ValueError(f"token id {ids[t]} outside [0, {T})")
    with nogil:
        for t in range(T):
            s = last[ids[t]]
            best = 0
            count = 0
            while s >= 0 and count < max_candidates:
                L = 1
                while L < max_len and s - L >= 0 and ids[t - L] == ids[s - L]:
                    L += 1
                if L > best:
                    best = L
                    src[t] = <int32_t>s
                    if best == max_len:   # no later candidate can be longer: ties go to the most recent
                        break
                s = prev[s]
                count += 1
            length[t] = <int32_t>best
            prev[t] = last[ids[t]]
            last[ids[t]] = t
    return src_arr, len_arr


def rows_entropy_bits(const int32_t[:, ::1] rows, Py_ssize_t max_range=1 << 16):
    """Plug-in entropy (total bits) of each row; +inf for a row whose range exceeds ``max_range``."""
    cdef Py_ssize_t n_rows = rows.shape[0], n = rows.shape[1], r, t
    out_arr = np.zeros(n_rows, dtype=np.float64)
    if n == 0:
        return out_arr
    cdef double[::1] out = out_arr
    cdef int64_t[::1] hist = np.empty(max_range, dtype=np.int64)
    cdef int32_t lo, hi
    cdef double bits
    with nogil:
        for r in range(n_rows):
            lo = rows[r, 0]
            hi = rows[r, 0]
            for t in range(1, n):
                lo = rows[r, t] if rows[r, t] < lo else lo
                hi = rows[r, t] if rows[r, t] > hi else hi
            bits = range_entropy_bits(&rows[r, 0], n, lo, hi, &hist[0], hist.shape[0])
            out[r] = bits if bits >= 0 else 1e300
    return out_arr


def repeat_undo(int32_t[:, ::1] columns, const uint8_t[::1] k, const uint8_t[::1] use, const int32_t[::1] src,
                const int32_t[::1] length, Py_ssize_t min_len):
    """In place, for the rows with ``use[r]``: token ``t`` with ``length[t] >= min_len`` is
    ``res + q[src[t]]``, any other ``res + floor((k[r] * q[t-1] + 2) / 4)`` (``q[-1] = 0``).  Other rows are
    left alone (undo them with ``predict.ar_undo``).  Raises ValueError when a symbol would leave int32."""
    cdef Py_ssize_t rows = columns.shape[0], tokens = columns.shape[1], r, t
    if k.shape[0] != rows or use.shape[0] != rows:
        raise ValueError(f"k/use have {k.shape[0]}/{use.shape[0]} entries for {rows} rows")
    if src.shape[0] != tokens or length.shape[0] != tokens:
        raise ValueError(f"the match map covers {src.shape[0]} tokens, the section {tokens}")
    for t in range(tokens):
        if length[t] >= min_len and not 0 <= src[t] < t:
            raise ValueError(f"token {t} is predicted from position {src[t]}, not an earlier one")
    for r in range(rows):
        if k[r] > 4:
            raise ValueError(f"prediction coefficient {k[r]} out of range")
    cdef int64_t prev, v, kk, lo = 0, hi = 0
    cdef int32_t* row
    with nogil:
        for r in range(rows):
            if not use[r]:
                continue
            row = &columns[r, 0]
            kk = k[r]
            prev = 0
            for t in range(tokens):
                if length[t] >= min_len:
                    v = <int64_t>row[t] + row[src[t]]
                else:
                    v = row[t] + ((kk * prev + 2) >> 2)
                lo = v if v < lo else lo
                hi = v if v > hi else hi
                row[t] = <int32_t>v
                prev = v
    if lo < -2147483648 or hi > 2147483647:
        raise ValueError("predicted symbols overflow int32")
