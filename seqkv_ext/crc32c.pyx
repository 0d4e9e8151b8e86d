# cython: language_level=3
"""CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, init and final XOR 0xFFFFFFFF.

Table-driven slicing-by-8 (endian-neutral: it reads the input byte by byte).
``crc32c(b, crc32c(a)) == crc32c(a + b)``; ``crc32c(b"123456789") == 0xE3069283``.
"""
from cpython.buffer cimport PyBUF_ANY_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint32_t

import operator

__all__ = ["crc32c", "POLY"]

POLY = 0x82F63B78

cdef uint32_t _T[8][256]
# Releasing the GIL costs more than checksumming a few KiB.
cdef Py_ssize_t _NOGIL_ABOVE = 1 << 15


cdef void _init_tables() noexcept:
    cdef uint32_t c
    cdef int i, j
    for i in range(256):
        c = <uint32_t>i
        for j in range(8):
            c = (c >> 1) ^ (0x82F63B78 if (c & 1) else 0)
        _T[0][i] = c
    for i in range(256):
        c = _T[0][i]
        for j in range(1, 8):
            c = (c >> 8) ^ _T[0][c & 0xFF]
            _T[j][i] = c


_init_tables()


cdef uint32_t _update(uint32_t crc, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Raw (pre-/post-inverted) CRC register update over n bytes at p."""
    while n >= 8:  # slicing-by-8: 8 table lookups per 8 bytes, independent of each other
        crc = (_T[7][(crc ^ p[0]) & 0xFF]
               ^ _T[6][((crc >> 8) ^ p[1]) & 0xFF]
               ^ _T[5][((crc >> 16) ^ p[2]) & 0xFF]
               ^ _T[4][((crc >> 24) ^ p[3]) & 0xFF]
               ^ _T[3][p[4]]
               ^ _T[2][p[5]]
               ^ _T[1][p[6]]
               ^ _T[0][p[7]])
        p += 8
        n -= 8
    while n > 0:
        crc = _T[0][(crc ^ p[0]) & 0xFF] ^ (crc >> 8)
        p += 1
        n -= 1
    return crc


def crc32c(data, value=0):
    """CRC-32C of a bytes-like object (any C- or Fortran-contiguous buffer, in memory order).

    ``value`` is the CRC of the data before this one (0 to start), so checksums
    can be computed piecewise.  Raises TypeError when ``data`` does not support
    the buffer protocol, ValueError for a non-contiguous buffer or a ``value``
    outside 0..2**32-1.
    """
    cdef Py_buffer view
    cdef uint32_t crc
    cdef const uint8_t* p
    cdef Py_ssize_t n
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"value must be an int in 0..2**32-1 (got {type(value).__name__})") from None
    if v < 0 or v > 0xFFFFFFFF:
        raise ValueError(f"value must be in 0..2**32-1 (got {v})")
    try:
        PyObject_GetBuffer(data, &view, PyBUF_ANY_CONTIGUOUS)
    except BufferError as exc:
        raise ValueError(f"crc32c needs a contiguous buffer: {exc}") from None
    try:
        crc = (<uint32_t>v) ^ 0xFFFFFFFF
        p = <const uint8_t*>view.buf
        n = view.len
        if n >= _NOGIL_ABOVE:
            with nogil:
                crc = _update(crc, p, n)
        else:
            crc = _update(crc, p, n)
    finally:
        PyBuffer_Release(&view)
    return crc ^ 0xFFFFFFFF
