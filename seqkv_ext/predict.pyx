# cython: boundscheck=False, wraparound=False, cdivision=False
"""Integer lag-1 prediction along rows (seqkv's temporal predictor), both directions.

Row r is coded as ``res[r, t] = q[r, t] - (k[r] * q[r, t-1] + 2) // 4`` (floor division,
``q[r, -1] = 0``).  Undoing it is sequential in t, hence compiled.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memcpy
from .entropy cimport range_entropy_bits

cnp.import_array()


def ar_undo(int32_t[:, ::1] columns, const uint8_t[::1] k):
    """In place: rows coded as residuals with coefficient k[r]/4 (0 = untouched) become symbols again.

    Raises ValueError when a symbol would leave int32 (only corrupted input does that).
    """
    cdef Py_ssize_t rows = columns.shape[0], tokens = columns.shape[1], r, n = 0
    if k.shape[0] != rows:
        raise ValueError(f"k has {k.shape[0]} entries for {rows} rows")
    for r in range(rows):
        if k[r] > 4:
            raise ValueError(f"prediction coefficient {k[r]} out of range")
    if tokens == 0:
        return
    # the predicted rows, undone four at a time: each row is one long dependency chain, and four
    # independent chains in one loop keep the core busy while each waits on its multiply
    predicted_arr = np.flatnonzero(np.asarray(k)).astype(np.intp)
    cdef const Py_ssize_t[::1] predicted = predicted_arr
    cdef Py_ssize_t count = predicted.shape[0]
    cdef int out_of_range = 0
    with nogil:
        while n + 4 <= count:
            out_of_range |= _undo4(columns, k, predicted[n], predicted[n + 1], predicted[n + 2], predicted[n + 3],
                                   tokens)
            n += 4
        while n < count:
            out_of_range |= _undo1(&columns[predicted[n], 0], k[predicted[n]], tokens)
            n += 1
    if out_of_range:
        raise ValueError("predicted symbols overflow int32")


# floor((k * prev + 2) / 4) is an arithmetic right shift by 2 (int64: no overflow for int32 symbols, k <= 4)
cdef inline int _undo1(int32_t* row, int64_t kk, Py_ssize_t tokens) noexcept nogil:
    """One row in place; returns 1 when a symbol left int32 (the row is then garbage, and rejected)."""
    cdef int64_t prev = 0, lo = 0, hi = 0
    cdef Py_ssize_t t
    for t in range(tokens):
        prev = row[t] + ((kk * prev + 2) >> 2)
        lo = prev if prev < lo else lo
        hi = prev if prev > hi else hi
        row[t] = <int32_t>prev
    return lo < -2147483648 or hi > 2147483647


cdef inline int _undo4(int32_t[:, ::1] columns, const uint8_t[::1] k, Py_ssize_t r0, Py_ssize_t r1,
                       Py_ssize_t r2, Py_ssize_t r3, Py_ssize_t tokens) noexcept nogil:
    cdef int32_t* a = &columns[r0, 0]
    cdef int32_t* b = &columns[r1, 0]
    cdef int32_t* c = &columns[r2, 0]
    cdef int32_t* d = &columns[r3, 0]
    cdef int64_t ka = k[r0], kb = k[r1], kc = k[r2], kd = k[r3]
    cdef int64_t pa = 0, pb = 0, pc = 0, pd = 0, lo = 0, hi = 0
    cdef Py_ssize_t t
    for t in range(tokens):
        pa = a[t] + ((ka * pa + 2) >> 2)
        pb = b[t] + ((kb * pb + 2) >> 2)
        pc = c[t] + ((kc * pc + 2) >> 2)
        pd = d[t] + ((kd * pd + 2) >> 2)
        a[t] = <int32_t>pa
        b[t] = <int32_t>pb
        c[t] = <int32_t>pc
        d[t] = <int32_t>pd
        lo = min(lo, min(min(pa, pb), min(pc, pd)))
        hi = max(hi, max(max(pa, pb), max(pc, pd)))
    return lo < -2147483648 or hi > 2147483647


cdef double _entropy_bits(const int32_t* values, Py_ssize_t n, int64_t* hist, Py_ssize_t hist_size) noexcept nogil:
    """Plug-in entropy (total bits) of n ints; -2 when their range exceeds the histogram."""
    cdef Py_ssize_t t
    cdef int32_t lo = values[0], hi = values[0]
    cdef double bits
    for t in range(1, n):
        lo = values[t] if values[t] < lo else lo
        hi = values[t] if values[t] > hi else hi
    bits = range_entropy_bits(values, n, lo, hi, hist, hist_size)
    return -2.0 if bits < 0 else bits


def ar_encode(const int32_t[:, ::1] columns, Py_ssize_t max_range=1 << 16):
    """Choose and apply per-row lag-1 prediction (the encoder side of :func:`ar_undo`).

    Per row: k = the least-squares lag-1 coefficient rounded to quarters (0..4); the row is
    predicted only when its residuals' plug-in entropy is below the symbols' own.
    Returns (residuals int32 [rows, T], k uint8 [rows], bits saved (estimate, float)).
    """
    cdef Py_ssize_t rows = columns.shape[0], tokens = columns.shape[1], r
    res_arr = np.array(columns, dtype=np.int32, copy=True)  # rows left unpredicted stay as they are
    k_arr = np.zeros(rows, dtype=np.uint8)
    if tokens < 2:
        return res_arr, k_arr, 0.0
    cdef int32_t[:, ::1] res = res_arr
    cdef uint8_t[::1] k = k_arr
    cdef int64_t[::1] hist = np.empty(max_range, dtype=np.int64)
    cdef double rho, bits0, bits1, saved = 0.0
    cdef int64_t kk
    with nogil:
        for r in range(rows):
            rho = _lag1_coefficient(&columns[r, 0], tokens)
            kk = <int64_t>(4 * rho + 0.5) if rho > 0 else 0
            if kk > 4:
                kk = 4
            if kk == 0:
                continue
            if _residuals(&columns[r, 0], &res[r, 0], tokens, kk):
                memcpy(&res[r, 0], &columns[r, 0], tokens * sizeof(int32_t))  # beyond int32: code it plainly
                continue
            bits0 = _entropy_bits(&columns[r, 0], tokens, &hist[0], hist.shape[0])
            bits1 = _entropy_bits(&res[r, 0], tokens, &hist[0], hist.shape[0])
            if bits0 < 0 or bits1 < 0 or bits1 >= bits0:
                memcpy(&res[r, 0], &columns[r, 0], tokens * sizeof(int32_t))
                continue
            k[r] = <uint8_t>kk
            saved += bits0 - bits1
    return res_arr, k_arr, saved


cdef double _lag1_coefficient(const int32_t* x, Py_ssize_t n) noexcept nogil:
    """sum(x[t-1] * x[t]) / sum(x[t-1]**2) over t >= 1 (0 when the denominator is 0), summed in float64 in
    order.  When every partial sum is an integer below 2**53 that float64 sum is exact, and the int64 sum
    (independent additions, no rounding chain) gives the same value much faster."""
    cdef Py_ssize_t t
    cdef int64_t peak = 0, a, ixx = 0, ixy = 0
    cdef double sxx = 0.0, sxy = 0.0
    for t in range(n):
        a = x[t]
        a = -a if a < 0 else a
        peak = a if a > peak else peak
    if peak < (1 << 26) and <double>peak * peak * n < 9007199254740992.0:   # 2**53
        for t in range(1, n):
            ixx += <int64_t>x[t - 1] * x[t - 1]
            ixy += <int64_t>x[t - 1] * x[t]
        sxx = <double>ixx
        sxy = <double>ixy
    else:
        for t in range(1, n):
            sxx += <double>x[t - 1] * x[t - 1]
            sxy += <double>x[t - 1] * x[t]
    if sxx <= 0:
        return 0.0
    return sxy / sxx


cdef int _residuals(const int32_t* x, int32_t* out, Py_ssize_t n, int64_t kk) noexcept nogil:
    """out[t] = x[t] - floor((kk * x[t-1] + 2) / 4) for t >= 1 (out[0] = x[0]); 1 when one leaves int32."""
    cdef Py_ssize_t t
    cdef int64_t v, lo = 0, hi = 0
    out[0] = x[0]
    for t in range(1, n):
        v = x[t] - ((kk * x[t - 1] + 2) >> 2)   # an arithmetic shift is the floor division by 4
        lo = v if v < lo else lo
        hi = v if v > hi else hi
        out[t] = <int32_t>v
    return lo < -2147483648 or hi > 2147483647
