# The unpacking loop, for the per-section decoder (seqkv_ext/context_sections.pyx).  Implemented in bitpack.pyx.
from libc.stdint cimport uint8_t, uint32_t

cdef void _unpack(const uint8_t* buf, Py_ssize_t nbuf, int nbits, uint32_t* out, Py_ssize_t count) noexcept nogil
