# cython: language_level=3, boundscheck=False, wraparound=False
"""Decoding of consecutive unsigned LEB128 varints (seqkv/wire.py's ``Reader.uvarint_array``).

Each value is 1 to 9 bytes, 7 bits per byte, least significant group first, the high
bit set on every byte but the last; 9 bytes carry 63 bits, so every value fits int64.
"""
from libc.stdint cimport int64_t, uint8_t, uint64_t

import numpy as np

__all__ = ["decode_uvarints"]


def decode_uvarints(const uint8_t[::1] buf, Py_ssize_t start, Py_ssize_t end, Py_ssize_t count):
    """``count`` varints from ``buf[start:end]`` -> ``(values int64 [count], status, n)``.

    status 0: ok, ``n`` = bytes consumed; 1: truncated, ``n`` = values complete before the end;
    2: a varint longer than 9 bytes (63 bits), ``n`` = its index.
    """
    if start < 0 or end > buf.shape[0] or start > end or count < 0:
        raise ValueError("bad range or count")
    values_arr = np.empty(count, dtype=np.int64)
    cdef int64_t[::1] values = values_arr
    cdef Py_ssize_t pos = start, i
    cdef int shift, status = 0
    cdef uint64_t acc
    cdef uint8_t b
    with nogil:
        for i in range(count):
            acc = 0
            shift = 0
            while True:
                if pos >= end:
                    status = 1
                    break
                if shift > 56:
                    status = 2
                    break
                b = buf[pos]
                pos += 1
                acc |= (<uint64_t>(b & 0x7F)) << shift
                if not (b & 0x80):
                    break
                shift += 7
            if status:
                break
            values[i] = <int64_t>acc
    if status:
        return values_arr, status, i
    return values_arr, 0, pos - start
