# cython: language_level=3
# distutils: language = c
"""Fast decoder for static-model ANS streams written by constriction's ``AnsCoder``.

The stream format is constriction's ``constriction.stream.stack.AnsCoder`` with its
defaults (uint32 words, uint64 state, 24-bit precision) and a
``Categorical(freqs / 2**table_bits, perfect=True)`` model whose integer frequencies
sum to exactly ``2**table_bits`` (``table_bits = 24 - shift``).  Constriction then
uses exactly ``freqs << shift`` as its 24-bit frequencies, so this decoder
reproduces its output bit for bit (see docs/format.md, "ANS streams").

Decoding pops words from the *end* of the array:

    state = words[-1]; if more words: state = state << 32 | words[-2]
    repeat count times:
        q = state & 0xFFFFFF
        k = the symbol with cdf[k] <= q < cdf[k] + f[k]     (f = freqs << shift)
        state = (state >> 24) * f[k] + (q - cdf[k])
        if state < 2**32 and words remain: state = state << 32 | next word from the end

Symbol lookup, picked per call (all give identical results):

* "coarse" (the usual one): a 4096-entry block table that fits the L1 cache; a
  block lying inside one symbol gives that symbol, its freq and the block's offset
  in it directly; the few blocks that straddle a symbol boundary scan the cdf
  from their first symbol (<= 16 steps);
* "fine": the full ``2**table_bits``-slot table, for long streams over large flat
  alphabets, where many blocks straddle boundaries;
* "search": a binary search over the cdf, for short streams (nothing to build).

Every memory access is provably in range whatever the content of ``words``: the
decoder never reads outside them and runs exactly ``count`` steps.
"""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from .ans_tables cimport ANS_MAX_ALPHABET, ANS_MAX_TABLE_BITS, ANS_PRECISION, private_freqs, table_bits_of

import operator

import numpy as np

__all__ = ["decode", "decode_rows", "PRECISION", "MAX_TABLE_BITS", "MAX_ALPHABET"]

PRECISION = ANS_PRECISION            # constriction's default AnsCoder precision
MAX_TABLE_BITS = ANS_MAX_TABLE_BITS  # the table entries pack freq and cdf into 16 bits each
MAX_ALPHABET = ANS_MAX_ALPHABET

cdef enum:
    _PRECISION = ANS_PRECISION
    _COARSE_BITS = 12

# Strategies (``_decode_with`` lets the tests force one).
cdef enum:
    _AUTO = 0
    _SEARCH = 1   # binary search over the cdf: no tables to build
    _COARSE = 2   # 2**12-entry block table (L1-resident), scan at symbol boundaries
    _FINE = 3     # full 2**table_bits slot table (L2-resident)
_STRATEGIES = {"auto": _AUTO, "search": _SEARCH, "coarse": _COARSE, "fine": _FINE}

# Below 64 + K/8 symbols the binary search beats building any table (measured).
cdef Py_ssize_t _SEARCH_BELOW = 64
# The fine table (384 KiB to build) pays off when more than this fraction of the
# coarse blocks straddle a symbol boundary (large, flat alphabets) ...
cdef double _BOUNDARY_LIMIT = 0.25
# ... and there are at least this many symbols.
cdef Py_ssize_t _FINE_FROM = 1 << 15


# Tables and Cursor are declared in ans.pxd (context_sections.pyx uses them too).


cdef bint _build_cdf(Tables* t, int table_bits) noexcept nogil:
    """Fill cdf; False unless every freq >= 1 and they sum to 2**table_bits.

    The caller checked a private copy of the freqs already (seqkv_ext.ans_tables),
    which no other thread can reach; checking again here, on the copy the tables are
    built from, keeps the proof that they never index out of range local.
    """
    cdef uint64_t c = 0
    cdef Py_ssize_t s
    for s in range(t.k):
        if t.freqs[s] == 0:
            return False
        t.cdf[s] = <uint32_t>c
        c += t.freqs[s]
    t.cdf[t.k] = <uint32_t>c
    return c == (<uint64_t>1 << table_bits)


cdef void _build_fine(Tables* t) noexcept nogil:
    """Fill fsym/fent (cdf must be built)."""
    cdef Py_ssize_t s, j
    cdef uint32_t c, e
    for s in range(t.k):
        c = t.cdf[s]
        e = t.freqs[s] | (c << 16)  # freq, cdf < 2**16 as table_bits <= 16 and K >= 2
        for j in range(c, c + t.freqs[s]):  # the freqs sum to 2**table_bits, so j is in range
            t.fsym[j] = <uint16_t>s
            t.fent[j] = e


cdef Py_ssize_t _build_coarse(Tables* t, int table_bits, int coarse_bits) noexcept nogil:
    """Fill cf/cr/csym (cdf must be built); returns the number of boundary blocks.

    Block b covers the table slots [b << d, (b + 1) << d) with d = table_bits -
    coarse_bits; csym[b] is the symbol of its first slot.  When the whole block
    belongs to that symbol, cf[b] is its freq and cr[b] the block's slot offset
    inside it; otherwise cf[b] == 0 (freqs are >= 1, so 0 marks a boundary block).
    """
    cdef int d = table_bits - coarse_bits
    cdef Py_ssize_t s, b, lo, hi, m = ((<Py_ssize_t>1) << d) - 1, nboundary = 0
    cdef uint16_t f, off
    for s in range(t.k):
        lo = t.cdf[s]
        hi = t.cdf[s + 1]
        f = <uint16_t>t.freqs[s]
        # the blocks whose first slot lies in [lo, hi) get symbol s (so every block
        # gets exactly one); those below hi >> d lie wholly inside the symbol
        b = (lo + m) >> d
        off = <uint16_t>((b << d) - lo)  # 0 <= offset < freq < 2**16
        while b < (hi >> d):
            t.csym[b] = <uint16_t>s
            t.cf[b] = f
            t.cr[b] = off
            off += <uint16_t>(m + 1)
            b += 1
        if b < ((hi + m) >> d):  # at most one more block, which straddles hi
            t.csym[b] = <uint16_t>s
            t.cf[b] = 0
            t.cr[b] = 0
            nboundary += 1
    return nboundary


ctypedef uint64_t (*loop_fn)(const Tables*, const uint32_t*, Py_ssize_t*, uint64_t, int32_t*,
                             Py_ssize_t, int, int) noexcept nogil

# The decode loops share this contract: ``pos`` words (words[0 .. pos-1]) are still
# unread, and ``words`` points at >= 1 readable word (a dummy when the stream is
# empty), so ``words[pos - 1 if pos > 0 else 0]`` is always in range.  Every table
# index is below the table's size because q < 2**24 and the tables cover the whole
# 24-bit range.  The next word is loaded before it is known to be needed, and on a
# refill the next table index comes straight from that word, which keeps the
# state -> table lookup -> multiply dependency chain short (decoding a single ANS
# stream is bound by the latency of that chain, ~13 cycles per symbol here).

cdef uint64_t _loop_coarse(const Tables* t, const uint32_t* words, Py_ssize_t* pos_io,
                           uint64_t state, int32_t* out, Py_ssize_t count,
                           int shift, int cshift) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint64_t cmask = (<uint64_t>1 << (_PRECISION - cshift)) - 1
    cdef uint64_t lowmask = (<uint64_t>1 << cshift) - 1
    cdef Cursor c
    c.pos = pos_io[0]
    c.state = state
    c.block = (state >> cshift) & cmask
    for i in range(count):
        out[i] = <int32_t>coarse_step(t, words, &c, shift, cshift, cmask, lowmask)
    pos_io[0] = c.pos
    return c.state


cdef uint64_t _loop_fine(const Tables* t, const uint32_t* words, Py_ssize_t* pos_io,
                         uint64_t state, int32_t* out, Py_ssize_t count,
                         int shift, int cshift) noexcept nogil:
    cdef Py_ssize_t i, pos = pos_io[0]
    cdef uint64_t q, e, f, c, s, hi, st1, nxt, limit
    cdef uint64_t fmask = (<uint64_t>1 << (_PRECISION - shift)) - 1
    cdef uint64_t b = (state >> shift) & fmask
    for i in range(count):
        q = state & 0xFFFFFF
        hi = (state >> 24) << shift
        e = t.fent[b]
        s = t.fsym[b]
        f = e & 0xFFFF
        c = e >> 16
        limit = (<uint64_t>1 << 32) if pos > 0 else 0
        nxt = words[pos - 1 if pos > 0 else 0]
        st1 = hi * f + (q - (c << shift))
        out[i] = <int32_t>s
        if st1 < limit:
            pos -= 1
            state = (st1 << 32) | nxt
            b = (nxt >> shift) & fmask
        else:
            state = st1
            b = (st1 >> shift) & fmask
    pos_io[0] = pos
    return state


cdef uint64_t _loop_search(const Tables* t, const uint32_t* words, Py_ssize_t* pos_io,
                           uint64_t state, int32_t* out, Py_ssize_t count,
                           int shift, int cshift) noexcept nogil:
    cdef Py_ssize_t i, lo, hi, mid, pos = pos_io[0]
    cdef uint64_t q, qt
    for i in range(count):
        q = state & 0xFFFFFF
        qt = q >> shift
        # the largest lo with cdf[lo] <= qt; cdf[0] == 0 <= qt < cdf[k] == 2**table_bits
        lo = 0
        hi = t.k
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if t.cdf[mid] <= qt:
                lo = mid
            else:
                hi = mid
        state = (state >> 24) * (<uint64_t>t.freqs[lo] << shift) + (q - (<uint64_t>t.cdf[lo] << shift))
        out[i] = <int32_t>lo
        if (state >> 32) == 0 and pos > 0:
            pos -= 1
            state = (state << 32) | words[pos]
    pos_io[0] = pos
    return state


cdef int _decode_nogil(const uint32_t* words, Py_ssize_t n_words, const uint32_t* freqs,
                       Py_ssize_t k, int shift, int32_t* out, Py_ssize_t count,
                       int strategy, bint* clean) noexcept nogil:
    """Returns 0 on success, -1 when out of memory, -2 for invalid freqs (never for a table
    from ans_tables.private_freqs)."""
    cdef Tables t
    cdef int table_bits = _PRECISION - shift
    cdef int coarse_bits = table_bits if table_bits < _COARSE_BITS else _COARSE_BITS
    cdef Py_ssize_t pos = n_words
    cdef uint64_t state = 0
    cdef uint32_t dummy = 0
    cdef const uint32_t* wp = words if n_words > 0 else &dummy
    cdef int rc = 0
    cdef Py_ssize_t nboundary
    cdef loop_fn loop

    t.k = k
    t.freqs = <uint32_t*>malloc(k * sizeof(uint32_t))
    t.cdf = <uint32_t*>malloc((k + 1) * sizeof(uint32_t))
    t.fsym = NULL
    t.fent = NULL
    t.cf = NULL
    t.cr = NULL
    t.csym = NULL
    if t.freqs == NULL or t.cdf == NULL:
        free(t.freqs)
        free(t.cdf)
        return -1
    memcpy(t.freqs, freqs, k * sizeof(uint32_t))

    if pos > 0:
        pos -= 1
        state = wp[pos]
    if pos > 0:
        pos -= 1
        state = (state << 32) | wp[pos]

    if not _build_cdf(&t, table_bits):
        rc = -2
        strategy = _SEARCH  # build nothing more, decode nothing
    # The loop is called through a pointer, which keeps the compiler from inlining
    # it into this function (its registers are then all for the loop).
    loop = _loop_search
    if strategy == _AUTO and count < _SEARCH_BELOW + k // 8:
        strategy = _SEARCH
    if strategy != _SEARCH:
        t.cf = <uint16_t*>malloc(((<size_t>1) << coarse_bits) * sizeof(uint16_t))
        t.cr = <uint16_t*>malloc(((<size_t>1) << coarse_bits) * sizeof(uint16_t))
        t.csym = <uint16_t*>malloc(((<size_t>1) << coarse_bits) * sizeof(uint16_t))
        if t.cf == NULL or t.cr == NULL or t.csym == NULL:
            rc = -1
        else:
            nboundary = _build_coarse(&t, table_bits, coarse_bits)
            loop = _loop_coarse
            if strategy == _AUTO and count >= _FINE_FROM and (
                    nboundary > _BOUNDARY_LIMIT * (1 << coarse_bits)):
                strategy = _FINE
    if rc == 0 and strategy == _FINE:
        # many symbol boundaries: look every symbol up in the full slot table
        t.fsym = <uint16_t*>malloc(((<size_t>1) << table_bits) * sizeof(uint16_t))
        t.fent = <uint32_t*>malloc(((<size_t>1) << table_bits) * sizeof(uint32_t))
        if t.fsym == NULL or t.fent == NULL:
            rc = -1
        else:
            _build_fine(&t)
            loop = _loop_fine
    if rc == 0:
        state = loop(&t, wp, &pos, state, out, count, shift, _PRECISION - coarse_bits)

    # constriction never writes a zero as the last word (and refuses such input),
    # so a stream ending in a zero word is not one of its streams.
    clean[0] = pos == 0 and state == 0 and (n_words == 0 or words[n_words - 1] != 0)
    free(t.freqs)
    free(t.cdf)
    free(t.fsym)
    free(t.fent)
    free(t.cf)
    free(t.cr)
    free(t.csym)
    return rc


def _as_words(words):
    if type(words) is np.ndarray and words.dtype == np.uint32 and words.ndim == 1:
        if words.flags.c_contiguous:
            return words
    elif not isinstance(words, np.ndarray):
        try:
            words = np.asarray(memoryview(words))
        except TypeError:
            raise ValueError("words must be a 1-D C-contiguous uint32 array") from None
    if words.dtype != np.uint32 or words.ndim != 1 or not words.flags.c_contiguous:
        raise ValueError(
            f"words must be a 1-D C-contiguous uint32 array (got {words.dtype}, "
            f"ndim={words.ndim}, c_contiguous={words.flags.c_contiguous})"
        )
    return words


def decode(words, freqs, count, shift):
    """Decode ``count`` symbols of an ANS stream; returns ``(symbols, clean)``.

    ``words``: the stream, a 1-D C-contiguous uint32 array (constriction's
    ``get_compressed()``).  ``freqs``: the K integer frequencies (2 <= K <= 32768,
    each >= 1) summing to exactly ``2**(24 - shift)``.  ``shift``: 24 minus the
    table bits (8 for a 16-bit table); 8 <= shift <= 23.

    Returns the int32 alphabet indices ``0 .. K-1`` and ``clean``, which is True
    iff afterwards every word was consumed, the state is back to 0, and the
    stream does not end with a zero word (constriction never writes one) - as
    for every stream constriction writes for ``count`` symbols.  Output and
    ``clean`` equal constriction's ``decode`` and ``is_empty()`` on any input.
    Garbage words decode to garbage symbols, never a crash; ``clean`` catches
    most corruption but not all (a stream whose words run out early can decay to
    state 0), so integrity needs a checksum too.
    Raises ValueError for invalid arguments.
    """
    return _decode(words, freqs, count, shift, _AUTO)


def _decode_with(words, freqs, count, shift, strategy):
    """``decode`` with a forced lookup strategy: "auto", "search", "coarse" or "fine"."""
    if strategy not in _STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    return _decode(words, freqs, count, shift, _STRATEGIES[strategy])


cdef _decode(words, freqs, count, shift, int strategy):
    out, clean, _k = _decode_k(words, freqs, count, shift, strategy)
    return out, clean


cdef tuple _decode_k(words, freqs, count, shift, int strategy):
    """(symbols, clean, K of the table used)."""
    cdef const uint32_t[::1] wv
    cdef const uint32_t[::1] fv
    cdef int32_t[::1] ov
    cdef Py_ssize_t n_words, k, n
    cdef int sh, table_bits
    cdef bint clean = False
    cdef int rc
    cdef const uint32_t* wp = NULL
    cdef int32_t* op = NULL

    try:
        n = operator.index(count)
    except (TypeError, OverflowError):
        raise ValueError("count and shift must be (small enough) integers") from None
    if n < 0:
        raise ValueError(f"count must be >= 0 (got {n})")
    table_bits = table_bits_of(shift)
    sh = _PRECISION - table_bits
    wv = _as_words(words)
    # a private, checked copy (seqkv_ext.ans_tables): no other thread can change it while the GIL is released
    fv = private_freqs(freqs, table_bits)
    n_words = wv.shape[0]
    k = fv.shape[0]
    out = np.empty(n, dtype=np.int32)
    ov = out
    if n_words > 0:
        wp = &wv[0]
    if n > 0:
        op = &ov[0]
    with nogil:
        rc = _decode_nogil(wp, n_words, &fv[0], k, sh, op, n, strategy, &clean)
    if rc == -1:
        raise MemoryError("out of memory building the ANS decode tables")
    if rc != 0:
        raise ValueError("invalid freqs")  # unreachable: the private copy was checked
    return out, bool(clean), k


@cython.boundscheck(False)  # i < n_rows == rv.shape[0] == av.shape[0], rv[i] checked, j < tokens
@cython.wraparound(False)
def decode_rows(words, freqs, shift, int32_t[:, ::1] out, const int64_t[::1] rows, const int64_t[::1] add,
                hist=None):
    """Decode ``len(rows) * out.shape[1]`` symbols straight into rows of ``out``:
    ``out[rows[i], j] = symbol[i * T + j] + add[i]`` (T = out.shape[1]).  Returns ``clean`` as :func:`decode`.

    ``hist`` (optional, int64 [K], C-contiguous): receives the count of each decoded alphabet index (it is
    overwritten), for the reader's check that the table is the quantisation of the symbols' histogram.

    One pass where decode, the alphabet offset, a per-row offset and the scatter into a
    [rows, tokens] array took five.  Raises ValueError for invalid arguments, a row
    outside ``out``, or a sum outside int32 (checked before anything is written).
    ``rows`` and ``add`` are copied before they are checked, and the scatter (without the
    GIL) reads only the checked copies, so another thread changing them cannot move a write.
    """
    cdef Py_ssize_t n_rows = rows.shape[0], tokens = out.shape[1], total_rows = out.shape[0]
    cdef Py_ssize_t i, j, k
    cdef int64_t lo_add, hi_add
    if add.shape[0] != n_rows:
        raise ValueError(f"{add.shape[0]} offsets for {n_rows} rows")
    own_rows = np.array(rows, dtype=np.int64, copy=True)
    own_add = np.array(add, dtype=np.int64, copy=True)
    cdef const int64_t[::1] rv = own_rows
    cdef const int64_t[::1] av = own_add
    for i in range(n_rows):
        if rv[i] < 0 or rv[i] >= total_rows:
            raise ValueError(f"row {rv[i]} outside [0, {total_rows})")
    symbols, clean, k = _decode_k(words, freqs, n_rows * tokens, shift, _AUTO)
    cdef int64_t[::1] hv
    cdef bint counting = hist is not None
    if counting:
        hv = hist
        if hv.shape[0] != k:
            raise ValueError(f"hist has {hv.shape[0]} entries for an alphabet of {k}")
        hv[:] = 0
    if n_rows == 0 or tokens == 0:
        return clean
    lo_add, hi_add = av[0], av[0]
    for i in range(n_rows):
        lo_add = av[i] if av[i] < lo_add else lo_add
        hi_add = av[i] if av[i] > hi_add else hi_add
    # symbols lie in [0, k): every sum stays inside int32 iff the extreme offsets do
    if lo_add < -(1 << 31) or hi_add + k - 1 >= (1 << 31):
        raise ValueError("decoded values would overflow int32")
    cdef const int32_t[::1] sv = symbols
    cdef const int32_t* src
    cdef int32_t* dst
    cdef int32_t a
    with nogil:
        for i in range(n_rows):
            src = &sv[i * tokens]
            dst = &out[rv[i], 0]
            a = <int32_t>av[i]
            for j in range(tokens):
                dst[j] = src[j] + a
        if counting:  # every symbol lies in [0, k): the decoder emits table indices only
            for j in range(n_rows * tokens):
                hv[sv[j]] += 1
    return clean
