# Shared by ans.pyx (the decoder) and ans_encode.pyx (the encoder): the ANS coder's constants and the
# one validation of a frequency table.  Declared here once, implemented once in ans_tables.pyx; the two
# coders cimport it, so they accept and refuse exactly the same tables with the same messages.
from libc.stdint cimport uint32_t

cdef enum:
    ANS_PRECISION = 24         # constriction's AnsCoder: 24-bit fixed-point probabilities
    ANS_MAX_TABLE_BITS = 16    # tables sum to 2**table_bits, table_bits = 24 - shift <= 16
    ANS_MAX_ALPHABET = 32768   # K <= 2**15 (so freq and cdf each fit 16 bits)

cdef int table_bits_of(object shift) except -1
cdef Py_ssize_t check_freqs(const uint32_t* freqs, Py_ssize_t k, int table_bits) except -1
cdef object private_freqs(object freqs, int table_bits)
