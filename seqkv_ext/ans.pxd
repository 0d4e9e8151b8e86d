# The decoder's tables and its coarse-lookup step, shared by ans.pyx (one stream per call) and
# context_sections.pyx (all the class streams of a context_ans section per call, two at a time).
# Implemented in ans.pyx, whose docstrings give the stream format and the lookup strategies.
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t


cdef struct Tables:
    uint32_t* freqs         # K entries, table domain (a private copy)
    uint32_t* cdf           # K + 1 entries, table domain
    uint16_t* fsym          # 2**table_bits entries: slot -> symbol
    uint32_t* fent          # 2**table_bits entries: freq | cdf << 16 of the slot's symbol
    uint16_t* cf            # 2**coarse_bits entries: freq of a block's symbol, 0 at boundaries
    uint16_t* cr            # 2**coarse_bits entries: slot offset of a block inside its symbol
    uint16_t* csym          # 2**coarse_bits entries: symbol of a block
    Py_ssize_t k


cdef struct Cursor:
    # one stream being decoded: words[0 .. pos-1] are unread (``words`` points at >= 1 readable word,
    # a dummy when the stream is empty), ``state`` the coder state, ``block`` its next coarse block
    Py_ssize_t pos
    uint64_t state
    uint64_t block


cdef bint _build_cdf(Tables* t, int table_bits) noexcept nogil
cdef Py_ssize_t _build_coarse(Tables* t, int table_bits, int coarse_bits) noexcept nogil
cdef int _decode_nogil(const uint32_t* words, Py_ssize_t n_words, const uint32_t* freqs,
                       Py_ssize_t k, int shift, int32_t* out, Py_ssize_t count,
                       int strategy, bint* clean) noexcept nogil


cdef inline uint64_t coarse_step(const Tables* t, const uint32_t* words, Cursor* c, int shift, int cshift,
                                 uint64_t cmask, uint64_t lowmask) noexcept nogil:
    """Decode one symbol with the coarse block table (``cshift`` = 24 - coarse bits; the masks are
    ``2**(24 - cshift) - 1`` and ``2**cshift - 1``); returns it.  Every index stays in range whatever the
    words say (see ans.pyx: q < 2**24 and the tables cover the 24-bit range)."""
    cdef uint64_t q, f, s, bias, st1, nxt, limit
    cdef uint64_t state = c.state, b = c.block
    cdef uint64_t hi = (state >> 24) << shift
    f = t.cf[b]
    if f != 0:
        s = t.csym[b]
        # q - (cdf << shift), with q = b << cshift | (state & lowmask)
        bias = (state & lowmask) + (<uint64_t>t.cr[b] << shift)
    else:  # a block holding a symbol boundary: scan from its first symbol
        q = state & 0xFFFFFF
        s = t.csym[b]
        while t.cdf[s + 1] <= (q >> shift):  # stops at s < k: cdf[k] = 2**table_bits
            s += 1
        f = t.freqs[s]
        bias = q - (<uint64_t>t.cdf[s] << shift)
    limit = (<uint64_t>1 << 32) if c.pos > 0 else 0
    nxt = words[c.pos - 1 if c.pos > 0 else 0]
    st1 = hi * f + bias
    if st1 < limit:
        c.pos -= 1
        c.state = (st1 << 32) | nxt
        c.block = (nxt >> cshift) & cmask
    else:
        c.state = st1
        c.block = (st1 >> cshift) & cmask
    return s
