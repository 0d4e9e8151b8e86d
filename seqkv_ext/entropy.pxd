# Shared by predict.pyx and quantize.pyx (inline, so nothing to link).
from libc.math cimport log2
from libc.stdint cimport int32_t, int64_t


cdef inline double range_entropy_bits(const int32_t* values, Py_ssize_t n, int32_t lo, int32_t hi,
                                      int64_t* hist, Py_ssize_t hist_size) noexcept nogil:
    """Plug-in entropy (total bits) of n ints lying in [lo, hi]; -1 when the range exceeds hist_size."""
    cdef Py_ssize_t t
    cdef double bits
    cdef int64_t c
    if <int64_t>hi - <int64_t>lo >= hist_size:
        return -1.0
    for t in range(hi - lo + 1):
        hist[t] = 0
    for t in range(n):
        hist[values[t] - lo] += 1
    bits = n * log2(<double>n)
    for t in range(hi - lo + 1):
        c = hist[t]
        if c > 1:
            bits -= c * log2(<double>c)
    return bits
