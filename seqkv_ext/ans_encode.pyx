# cython: language_level=3
# distutils: language = c
"""Encoder for static-model ANS streams, word for word equal to constriction's ``AnsCoder``.

The inverse of the decoder in ``seqkv_ext/ans.pyx`` (whose docstring gives the
format): ``AnsCoder().encode_reverse(idx, Categorical(freqs / 2**table_bits,
perfect=True))`` followed by ``get_compressed()``, with constriction's defaults
(uint32 words, uint64 state, 24-bit precision), so that its fixed-point
frequencies are exactly ``f = freqs << shift`` and ``cdf`` their prefix sums.

Symbols are encoded from the last to the first, starting from state 0:

    if state >> 40 >= f[s]:                 # the state would overflow 64 bits
        push the low 32 bits of state; state >>= 32
    state = (state // f[s]) << 24 | (cdf[s] + state % f[s])

and the final state is appended as its low word then its high word, leaving
out high zero words (so state 0 adds nothing, a state below 2**32 one word).
"""
cimport cython
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from .ans_tables cimport ANS_PRECISION, private_freqs, table_bits_of

import numpy as np

__all__ = ["encode"]

cdef enum:
    _PRECISION = ANS_PRECISION


cdef Py_ssize_t _encode_nogil(const int32_t* idx, Py_ssize_t n, const uint32_t* freqs,
                              Py_ssize_t k, int shift, uint32_t* out) noexcept nogil:
    """Encode into ``out`` (room for n + 2 words); the word count, -1 when out of
    memory, -2 for a symbol outside 0..k-1 (``out`` then holds partial words, which the
    caller discards).

    ``freqs`` is a private, checked table (ans_tables.private_freqs).  ``idx`` may be the
    caller's array: each symbol is read once, and that value is both checked and used, so
    another thread writing the array meanwhile can change the words, never index outside ``tab``."""
    cdef uint64_t* tab = <uint64_t*>malloc(k * sizeof(uint64_t))  # f | cdf << 32
    cdef Py_ssize_t i, nw = 0
    cdef uint64_t state = 0, f, c, e, cum = 0
    cdef uint32_t s
    if tab == NULL:
        return -1
    for i in range(k):
        tab[i] = (<uint64_t>freqs[i] << shift) | ((cum << shift) << 32)
        cum += freqs[i]
    for i in range(n - 1, -1, -1):
        s = <uint32_t>idx[i]
        if s >= <uint32_t>k:
            free(tab)
            return -2
        e = tab[s]
        f = <uint32_t>e
        c = e >> 32
        if (state >> (64 - _PRECISION)) >= f:
            out[nw] = <uint32_t>state
            nw += 1
            state >>= 32
        state = ((state // f) << _PRECISION) | (c + state % f)
    free(tab)
    if state != 0:
        out[nw] = <uint32_t>state
        nw += 1
        if state >> 32:
            out[nw] = <uint32_t>(state >> 32)
            nw += 1
    return nw


def _as_symbols(idx):
    arr = np.asarray(idx)
    if arr.ndim != 1:
        raise ValueError(f"symbols must be 1-D (got ndim={arr.ndim})")
    if arr.dtype == np.int32:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind not in "iu" and arr.size:
        raise ValueError(f"symbols must be integers (got {arr.dtype})")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0x7FFFFFFF):
        raise ValueError("symbol outside the table's alphabet")
    return np.ascontiguousarray(arr, dtype=np.int32)


@cython.boundscheck(False)  # iv[0] only when n > 0; fv has k >= 2 entries
@cython.wraparound(False)
def encode(idx, freqs, shift):
    """ANS-encode alphabet indices; returns constriction's uint32 words exactly.

    ``idx``: 1-D integer array of symbols in ``0 .. K-1`` (int32 is used as is).
    ``freqs``: the K integer frequencies (2 <= K <= 32768, each >= 1) summing to
    exactly ``2**(24 - shift)``; ``shift``: 24 minus the table bits, 8 <= shift <= 23.
    The result equals ``AnsCoder().encode_reverse(idx, Categorical(freqs / 2**(24 -
    shift), perfect=True))`` then ``get_compressed()``; ``seqkv_ext.ans.decode``
    inverts it.  Raises ValueError for invalid arguments (and then returns nothing).
    """
    cdef const int32_t[::1] iv
    cdef const uint32_t[::1] fv
    cdef uint32_t* buf
    cdef uint32_t[::1] ov
    cdef Py_ssize_t n, k, nw
    cdef int sh, table_bits
    table_bits = table_bits_of(shift)
    sh = _PRECISION - table_bits
    # a private, checked copy (seqkv_ext.ans_tables): no other thread can change it while the GIL is released
    fv = private_freqs(freqs, table_bits)
    iv = _as_symbols(idx)
    n = iv.shape[0]
    k = fv.shape[0]
    buf = <uint32_t*>malloc((n + 2) * sizeof(uint32_t))  # at most one word per symbol + the state
    if buf == NULL:
        raise MemoryError("out of memory for the ANS words")
    with nogil:
        nw = _encode_nogil(&iv[0] if n > 0 else NULL, n, &fv[0], k, sh, buf)
    if nw < 0:
        free(buf)
        if nw == -1:
            raise MemoryError("out of memory for the ANS encode table")
        raise ValueError("symbol outside the table's alphabet")
    out = np.empty(nw, dtype=np.uint32)
    if nw > 0:
        ov = out
        memcpy(&ov[0], buf, nw * sizeof(uint32_t))
    free(buf)
    return out
