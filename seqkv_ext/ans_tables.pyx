# cython: language_level=3
# distutils: language = c
"""Frequency tables of the ANS coder, validated once for the encoder and the decoder.

``seqkv_ext.ans`` (decode) and ``seqkv_ext.ans_encode`` (encode) both take a table of K
integer frequencies that must sum to exactly ``2**table_bits`` (``table_bits = 24 - shift``,
1..16), every one >= 1, with 2 <= K <= 32768.  They cimport the functions below
(declared in ``ans_tables.pxd``), so they accept and refuse the same tables.

Thread safety: the coders release the GIL while they run.  :func:`private_freqs` returns a
private copy of the caller's table and checks *that copy*, so the table the coder uses can
never differ from the table that was checked, whatever another thread does to the caller's
array meanwhile (the copy is never handed out before the coder is done with it).
"""
cimport cython
from libc.stdint cimport uint32_t, uint64_t

import operator

import numpy as np

__all__ = ["checked_table"]


cdef int table_bits_of(object shift) except -1:
    """``24 - shift`` for a valid ``shift`` (8..23); ValueError otherwise."""
    cdef long sh
    try:
        sh = operator.index(shift)
    except (TypeError, OverflowError):
        raise ValueError("shift must be a (small enough) integer") from None
    if sh < ANS_PRECISION - ANS_MAX_TABLE_BITS or sh > ANS_PRECISION - 1:
        raise ValueError(f"shift must be in {ANS_PRECISION - ANS_MAX_TABLE_BITS}..{ANS_PRECISION - 1} (got {sh})")
    return <int>(ANS_PRECISION - sh)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t check_freqs(const uint32_t* freqs, Py_ssize_t k, int table_bits) except -1:
    """``k`` if ``freqs[0 .. k-1]`` is a valid table for ``table_bits``; ValueError otherwise.

    The caller owns ``freqs`` (no other thread may write it)."""
    cdef Py_ssize_t j
    cdef uint64_t total = 0
    cdef uint32_t lowest = 0xFFFFFFFF
    if k < 2 or k > ANS_MAX_ALPHABET:
        raise ValueError(f"alphabet of {k} symbols: need 2 <= K <= {ANS_MAX_ALPHABET}")
    for j in range(k):  # k <= 32768 values < 2**32: the uint64 sum cannot wrap
        total += freqs[j]
        if freqs[j] < lowest:
            lowest = freqs[j]
    if lowest < 1:
        raise ValueError("every freq must be >= 1")
    if total != (<uint64_t>1 << table_bits):
        raise ValueError(f"freqs must sum to exactly 2**{table_bits} = {1 << table_bits} (got {total})")
    return k


cdef object private_freqs(object freqs, int table_bits):
    """A private, checked, C-contiguous uint32 copy of ``freqs`` (any 1-D integer array-like).

    ValueError for anything else: not 1-D, not integers, a value outside 1 .. 2**32 - 1, K outside
    2 .. 32768, or a sum other than ``2**table_bits``.  The check runs on the copy, after copying."""
    arr = np.asarray(freqs)
    if arr.ndim != 1:
        raise ValueError(f"freqs must be 1-D (got ndim={arr.ndim})")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"freqs must be integers (got {arr.dtype})")
    if arr.dtype != np.uint32 and arr.size and (int(arr.min()) < 1 or int(arr.max()) > 0xFFFFFFFF):
        raise ValueError("every freq must be >= 1 (and < 2**32)")
    # always a copy: the caller's array may be shared with another thread
    own = np.array(arr, dtype=np.uint32, copy=True, order="C")
    cdef const uint32_t[::1] fv = own
    cdef Py_ssize_t k = fv.shape[0]
    check_freqs(&fv[0] if k > 0 else NULL, k, table_bits)
    return own


def checked_table(freqs, shift):
    """The table both coders would use for ``freqs`` and ``shift``: a private, checked uint32 copy.

    Raises ValueError exactly where :func:`seqkv_ext.ans.decode` and :func:`seqkv_ext.ans_encode.encode`
    refuse the table or the shift."""
    return private_freqs(freqs, table_bits_of(shift))
