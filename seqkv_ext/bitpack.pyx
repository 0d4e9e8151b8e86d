# cython: language_level=3
"""Dense LSB-first packing of the low ``nbits`` (0..32) of unsigned integers.

Value ``i`` occupies bits ``i*nbits .. (i+1)*nbits - 1`` of the stream, where bit
``b`` is bit ``b % 8`` of byte ``b // 8`` (little-endian bit order, the same as
``np.packbits(..., bitorder="little")``).  The stream is ``ceil(n*nbits/8)``
bytes; unused high bits of the last byte are zero.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

import operator

import numpy as np

__all__ = ["pack_low_bits", "unpack_low_bits"]

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint64_t seqkv_load_le64(const uint8_t *p) {
        uint64_t v;
        memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline void seqkv_store_le32(uint8_t *p, uint32_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        memcpy(p, &v, 4);
    }
    """
    uint64_t seqkv_load_le64(const uint8_t* p) noexcept nogil
    void seqkv_store_le32(uint8_t* p, uint32_t v) noexcept nogil

ctypedef fused uint_t:
    uint16_t
    uint32_t


cdef void _pack(const uint_t* v, Py_ssize_t n, int nbits, uint8_t* out) noexcept nogil:
    """Writes exactly ceil(n*nbits/8) bytes to out (1 <= nbits <= 32)."""
    cdef uint64_t mask = ((<uint64_t>1) << nbits) - 1
    cdef uint64_t acc = 0
    cdef int fill = 0
    cdef Py_ssize_t i, o = 0
    for i in range(n):
        acc |= ((<uint64_t>v[i]) & mask) << fill  # fill < 32, so this fits in 64 bits
        fill += nbits
        if fill >= 32:  # 4 whole bytes are ready; they lie inside the output
            seqkv_store_le32(out + o, <uint32_t>acc)
            o += 4
            acc >>= 32
            fill -= 32
    while fill > 0:
        out[o] = <uint8_t>acc
        o += 1
        acc >>= 8
        fill -= 8


cdef void _unpack(const uint8_t* buf, Py_ssize_t nbuf, int nbits, uint32_t* out,
                  Py_ssize_t count) noexcept nogil:
    """Requires nbuf >= ceil(count*nbits/8) and 1 <= nbits <= 32."""
    cdef uint64_t mask = ((<uint64_t>1) << nbits) - 1
    cdef uint64_t w, bitpos
    cdef Py_ssize_t i, byte, j, fast = 0
    if nbuf >= 8:
        # value i can use an 8-byte load iff (i*nbits >> 3) + 8 <= nbuf
        fast = ((nbuf - 8) * 8) // nbits + 1
        if fast > count:
            fast = count
    for i in range(fast):
        bitpos = <uint64_t>i * nbits
        w = seqkv_load_le64(buf + (bitpos >> 3))
        out[i] = <uint32_t>((w >> (bitpos & 7)) & mask)
    for i in range(fast, count):
        bitpos = <uint64_t>i * nbits
        byte = <Py_ssize_t>(bitpos >> 3)
        w = 0
        j = 0
        while j < 8 and byte + j < nbuf:  # the bits needed are inside the buffer
            w |= (<uint64_t>buf[byte + j]) << (8 * j)
            j += 1
        out[i] = <uint32_t>((w >> (bitpos & 7)) & mask)


cdef int _as_nbits(nbits) except -1:
    try:
        nb = operator.index(nbits)
    except TypeError:
        raise ValueError(f"nbits must be an int (got {type(nbits).__name__})") from None
    if nb < 0 or nb > 32:
        raise ValueError(f"nbits must be in 0..32 (got {nb})")
    return nb


def pack_low_bits(values, nbits):
    """Pack the low ``nbits`` of each value (1-D C-contiguous uint16 or uint32 array).

    Returns a uint8 array of ``ceil(len(values) * nbits / 8)`` bytes.
    """
    cdef int nb = _as_nbits(nbits)
    cdef const uint16_t[::1] v16
    cdef const uint32_t[::1] v32
    cdef uint8_t[::1] ov
    cdef Py_ssize_t n
    if not isinstance(values, np.ndarray):
        raise ValueError(f"values must be a numpy array (got {type(values).__name__})")
    if values.ndim != 1 or not values.flags.c_contiguous:
        raise ValueError("values must be a 1-D C-contiguous array")
    if values.dtype != np.uint16 and values.dtype != np.uint32:
        raise ValueError(f"values must be uint16 or uint32 (got {values.dtype})")
    n = values.shape[0]
    out = np.empty((n * nb + 7) // 8, dtype=np.uint8)
    if nb == 0 or n == 0:
        return out
    ov = out
    if values.dtype == np.uint16:
        v16 = values
        with nogil:
            _pack(&v16[0], n, nb, &ov[0])
    else:
        v32 = values
        with nogil:
            _pack(&v32[0], n, nb, &ov[0])
    return out


def unpack_low_bits(buf, nbits, count):
    """Inverse of :func:`pack_low_bits`: ``count`` uint32 values from a uint8 buffer.

    ``buf`` is a 1-D C-contiguous uint8 array (or bytes-like object); it must hold
    at least ``ceil(count * nbits / 8)`` bytes (ValueError otherwise); extra bytes
    are ignored.
    """
    cdef int nb = _as_nbits(nbits)
    cdef const uint8_t[::1] bv
    cdef uint32_t[::1] ov
    cdef Py_ssize_t n, nbuf
    try:
        n = operator.index(count)
    except (TypeError, OverflowError):
        raise ValueError("count must be a (small enough) int") from None
    if n < 0:
        raise ValueError(f"count must be >= 0 (got {n})")
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
            raise ValueError("buf must be a 1-D C-contiguous uint8 array")
    else:
        try:
            buf = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
        except (TypeError, ValueError):
            raise ValueError("buf must be a 1-D C-contiguous uint8 array or bytes-like object") from None
    nbuf = buf.shape[0]
    need = (n * nb + 7) // 8
    if nbuf < need:
        raise ValueError(f"packed bits truncated: {nbuf} bytes, need {need}")
    if nb == 0 or n == 0:
        return np.zeros(n, dtype=np.uint32)
    out = np.empty(n, dtype=np.uint32)
    ov = out
    bv = buf
    with nogil:
        _unpack(&bv[0], nbuf, nb, &ov[0], n)
    return out
