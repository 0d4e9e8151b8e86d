# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Per-channel statistics of the context coder's encoder (seqkv/stages/context_ans.py), one row at a time.

Each row (one channel's symbols along the tokens) is centred on its rounded mean, and its
spread (standard deviation) picks its context class.  One pass per row instead of numpy's
float64 copy of the whole tensor.  The offsets equal numpy's ``round(mean)`` exactly (the
integer sum is exact in float64 below 2**53); the spread is summed in order, so it may
differ from numpy's pairwise sum in the last bits, which only matters to a class boundary
and changes no decoder: the classes are stored.
"""
from libc.math cimport rint, sqrt
from libc.stdint cimport int32_t, int64_t

import numpy as np

__all__ = ["center_rows", "MAX_TOKENS"]

MAX_TOKENS = (1 << 22) - 1   # |q| < 2**31 and T < 2**22: a row's integer sum is exact as a double


def center_rows(const int32_t[:, :] q):
    """q int32 [R, T] (any strides) -> (centred int64 [R, T], offsets int64 [R], spread float64 [R])."""
    cdef Py_ssize_t rows = q.shape[0], tokens = q.shape[1], r, t
    if tokens > MAX_TOKENS:
        raise ValueError(f"{tokens} tokens per row: the exact-sum bound (2**53) allows at most {MAX_TOKENS}")
    out_arr = np.empty((rows, tokens), dtype=np.int64)
    offsets_arr = np.zeros(rows, dtype=np.int64)
    spread_arr = np.zeros(rows, dtype=np.float64)
    if tokens == 0:
        return out_arr, offsets_arr, spread_arr
    cdef int64_t[:, ::1] out = out_arr
    cdef int64_t[::1] offsets = offsets_arr
    cdef double[::1] spread = spread_arr
    cdef int64_t total, off, v
    cdef double mean, d, acc0, acc1
    with nogil:
        for r in range(rows):
            total = 0
            for t in range(tokens):   # |q| < 2**31 and T < 2**22: |total| < 2**53, exact as a double
                total += q[r, t]
            off = <int64_t>rint(<double>total / tokens)   # round half to even, as np.round
            offsets[r] = off
            mean = <double>(total - off * tokens) / tokens
            acc0 = 0.0
            acc1 = 0.0
            t = 0
            while t + 1 < tokens:
                v = q[r, t] - off
                out[r, t] = v
                d = v - mean
                acc0 += d * d
                v = q[r, t + 1] - off
                out[r, t + 1] = v
                d = v - mean
                acc1 += d * d
                t += 2
            if t < tokens:
                v = q[r, t] - off
                out[r, t] = v
                d = v - mean
                acc0 += d * d
            spread[r] = sqrt((acc0 + acc1) / tokens)
    return out_arr, offsets_arr, spread_arr
