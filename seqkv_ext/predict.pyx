# cython: boundscheck=False, wraparound=False, cdivision=False
"""Integer lag-1 prediction along rows (seqkv's temporal predictor), both directions.

Row r is coded as ``res[r, t] = q[r, t] - (k[r] * q[r, t-1] + 2) // 4`` (floor division,
``q[r, -1] = 0``).  Undoing it is sequential in t, hence compiled.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t
from .entropy cimport range_entropy_bits

cnp.import_array()


cdef inline int64_t _floor_div4(int64_t num):
    if num >= 0:
        return num // 4
    return -((-num + 3) // 4)


def ar_undo(int32_t[:, ::1] columns, const uint8_t[::1] k):
    """In place: rows coded as residuals with coefficient k[r]/4 (0 = untouched) become symbols again.

    Raises ValueError when a symbol would leave int32 (only corrupted input does that).
    """
    cdef Py_ssize_t rows = columns.shape[0], tokens = columns.shape[1], r, t
    if k.shape[0] != rows:
        raise ValueError(f"k has {k.shape[0]} entries for {rows} rows")
    cdef int64_t prev, kk
    for r in range(rows):
        kk = k[r]
        if kk == 0:
            continue
        if kk > 4:
            raise ValueError(f"prediction coefficient {kk} out of range")
        prev = 0
        for t in range(tokens):
            prev = columns[r, t] + _floor_div4(kk * prev + 2)
            if prev > 2147483647 or prev < -2147483648:
                raise ValueError("predicted symbols overflow int32")
            columns[r, t] = <int32_t>prev


cdef double _entropy_bits(const int32_t* values, Py_ssize_t n, int64_t[::1] hist) except -1.0:
    """Plug-in entropy (total bits) of n ints; -2 when their range exceeds the histogram."""
    cdef Py_ssize_t t
    cdef int32_t lo = values[0], hi = values[0]
    cdef double bits
    for t in range(1, n):
        if values[t] < lo:
            lo = values[t]
        elif values[t] > hi:
            hi = values[t]
    bits = range_entropy_bits(values, n, lo, hi, &hist[0], hist.shape[0])
    return -2.0 if bits < 0 else bits


def ar_encode(const int32_t[:, ::1] columns, Py_ssize_t max_range=1 << 16):
    """Choose and apply per-row lag-1 prediction (the encoder side of :func:`ar_undo`).

    Per row: k = the least-squares lag-1 coefficient rounded to quarters (0..4); the row is
    predicted only when its residuals' plug-in entropy is below the symbols' own.
    Returns (residuals int32 [rows, T], k uint8 [rows], bits saved (estimate, float)).
    """
    cdef Py_ssize_t rows = columns.shape[0], tokens = columns.shape[1], r, t
    res_arr = np.empty((rows, tokens), dtype=np.int32)
    k_arr = np.zeros(rows, dtype=np.uint8)
    cdef int32_t[:, ::1] res = res_arr
    cdef uint8_t[::1] k = k_arr
    cdef int64_t[::1] hist = np.empty(max_range, dtype=np.int64)
    cdef double sxx, sxy, rho, bits0, bits1, saved = 0.0
    cdef int64_t kk, pred
    for r in range(rows):
        res[r, :] = columns[r, :]
        if tokens < 2:
            continue
        sxx = 0.0
        sxy = 0.0
        for t in range(1, tokens):
            sxx += <double>columns[r, t - 1] * columns[r, t - 1]
            sxy += <double>columns[r, t - 1] * columns[r, t]
        if sxx <= 0:
            continue
        rho = sxy / sxx
        kk = <int64_t>(4 * rho + 0.5) if rho > 0 else 0
        if kk > 4:
            kk = 4
        if kk == 0:
            continue
        for t in range(1, tokens):
            pred = _floor_div4(kk * columns[r, t - 1] + 2)
            if columns[r, t] - pred > 2147483647 or columns[r, t] - pred < -2147483648:
                kk = 0
                break
            res[r, t] = <int32_t>(columns[r, t] - pred)
        if kk == 0:
            res[r, :] = columns[r, :]
            continue
        bits0 = _entropy_bits(&columns[r, 0], tokens, hist)
        bits1 = _entropy_bits(&res[r, 0], tokens, hist)
        if bits0 < 0 or bits1 < 0 or bits1 >= bits0:
            res[r, :] = columns[r, :]
            continue
        k[r] = <uint8_t>kk
        saved += bits0 - bits1
    return res_arr, k_arr, saved
