# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# distutils: language = c
"""Decoding of one ``context_ans`` section (its coder part) in one call.

The coder part of a section (docs/format.md, "context_ans") holds, for C channels of T tokens:

    C zigzag varints: each channel's offset (|offset| <= 2**31) | C bytes: each channel's class
    then for every used class ``c``, in increasing order:
    u8 shift (<= 31) | table: zigzag varint lo (|lo| <= 2**40), varint K (2..32768),
    K varints (freq - 1) (each <= 65535, the freqs summing to 2**16) | varint n_words
    (<= count // 2 + 3 and <= the bytes left // 4) | n_words little-endian uint32 ANS words |
    (shift > 0) ceil(count * shift / 8) bytes of low bits, LSB first

where ``count`` = (channels of class c) x T.  Each stream is an ANS stream of ``seqkv_ext.ans`` (24-bit
precision, 16-bit tables); the channels of class ``c``, in channel order, receive its symbols T at a time,
as ``((lo + index) << shift | low bits) + offset``.

:func:`decode_section` makes exactly the checks of the Python reader (seqkv/stages/context_ans.py's
``decode_section``, the reference), so it accepts exactly the same bytes and decodes them to the same
values:

* every read inside the section (truncation);
* the varint lengths and bounds above (a varint has at most 10 bytes, one of an array of them at most 9,
  as seqkv/wire.py's ``Reader.uvarint`` and ``Reader.uvarint_array``); classes below ``max_classes``;
* int32 room: ``lo << shift`` plus the smallest offset of the class >= -2**31 and
  ``(lo + K) << shift`` plus the largest <= 2**31;
* a clean stream end (every word consumed, state 0, no final zero word);
* with at least one symbol: the table is the 16-bit quantisation of the decoded symbols' histogram
  (seqkv/ans_coding.py's ``table_from_counts`` and ``check_table_is_histogram``), over exactly the
  range they span.

It reads every stream first (they follow each other), then decodes them; the streams that suit the
coarse block lookup (``seqkv_ext.ans``: no low bits, not too short, few symbol boundaries per block) two
at a time, straight into their channels: a single stream is bound by the latency of its state -> table
-> multiply chain, and two independent chains overlap.  The others go through ``seqkv_ext.ans``'s
one-stream decoder.

Failures raise :class:`StreamError` (a ValueError) whose message names the class; seqkv turns it into
its FormatError.  Every memory access stays inside the section and the arrays made here whatever the
bytes say (the words are copied out, aligned), and the decoding runs without the GIL.
"""
from libc.math cimport floor
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from .ans cimport Cursor, Tables, _build_cdf, _build_coarse, _decode_nogil, coarse_step
from .bitpack cimport _unpack

import numpy as np

__all__ = ["decode_section", "StreamError", "TABLE_BITS", "MAX_SHIFT"]

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* n little-endian uint32 words from a byte pointer (any alignment) into an aligned array */
    static inline void seqkv_load_le32_words(uint32_t *dst, const uint8_t *src, Py_ssize_t n) {
        memcpy(dst, src, (size_t)n * 4);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        for (Py_ssize_t i = 0; i < n; i++) dst[i] = __builtin_bswap32(dst[i]);
    #endif
    }
    """
    void seqkv_load_le32_words(uint32_t* dst, const uint8_t* src, Py_ssize_t n) noexcept nogil

TABLE_BITS = 16     # docs/format.md: the context_ans tables sum to 2**16
MAX_SHIFT = 31      # low bits per symbol at most

cdef enum:
    _TABLE_BITS = 16
    _TABLE_TOTAL = 1 << _TABLE_BITS
    _MAX_K = 1 << 15        # K <= TABLE_TOTAL // 2
    _ANS_SHIFT = 8          # 24-bit coder precision - 16 table bits
    _AUTO = 0               # the decoder picks its lookup strategy

# what went wrong (the class and a value go with it)
cdef enum:
    _OK = 0
    _TRUNCATED
    _VARINT_LONG
    _BOUND
    _OFFSET
    _CLASS
    _SHIFT
    _TABLE_SIZE
    _TABLE_SUM
    _OVERFLOW
    _UNCLEAN
    _HISTOGRAM
    _NO_MEMORY


class StreamError(ValueError):
    """The section's class streams are invalid (the message says where and why)."""


cdef struct Fault:
    int code
    int cls
    int64_t value


cdef struct Bytes:
    # a bounded cursor over the section
    const uint8_t* buf
    Py_ssize_t pos
    Py_ssize_t end


cdef inline int _uvarint(Bytes* c, int max_bytes, uint64_t bound, uint64_t* out) noexcept nogil:
    """One LEB128 varint of at most ``max_bytes`` bytes (10: ``Reader.uvarint``, where a 10th byte may only
    add bit 63; 9: ``Reader.uvarint_array``), then ``<= bound`` (< 2**63)."""
    cdef uint64_t result = 0
    cdef int shift = 0, n = 0
    cdef uint8_t b
    cdef bint huge = False
    while True:
        if n == max_bytes:
            return _VARINT_LONG
        if c.pos >= c.end:
            return _TRUNCATED
        b = c.buf[c.pos]
        c.pos += 1
        n += 1
        if shift == 63 and (b & 0x7F) > 1:
            huge = True  # the value is >= 2**64, over any bound
        result |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            break
        shift += 7
    if huge or result > bound:
        return _BOUND
    out[0] = result
    return _OK


cdef inline int64_t _shifted(int64_t v, int shift) noexcept nogil:
    """``v << shift`` for |v| <= 2**41, 0 <= shift <= 31, saturated to +-2**40 (beyond any int32 sum)."""
    cdef int64_t cap = (<int64_t>1) << 40
    if v > (cap >> shift):
        return cap
    if v < -(cap >> shift):
        return -cap
    return v * ((<int64_t>1) << shift)


cdef bint _table_is_histogram(const int64_t* hist, const uint32_t* freqs, Py_ssize_t k) noexcept nogil:
    """Whether ``freqs`` is ``table_from_counts(lo, hist).freqs`` (seqkv/ans_coding.py) and ``hist`` spans the
    alphabet (``check_table_is_histogram``); the histogram holds at least one symbol.

    ``table_from_counts`` gives every symbol ``1 + floor(count * r)`` (r = (2**16 - K) / total, in float64),
    then one more to the ``short`` symbols with the largest fractional parts of ``count * r`` (ties: the lower
    index first), ``short`` being what the sum lacks.  Rather than sorting, check that ``freqs`` exceeds the
    floors by 0 or 1, by ``short`` in all (0 <= short <= K: outside, numpy's slicing gives a table that does
    not sum to 2**16, which ``freqs`` does), and that no symbol left without the extra one ranks before
    one that got it."""
    cdef Py_ssize_t j, worst_in = -1, best_out = -1
    cdef int64_t total = 0, short = _TABLE_TOTAL, given = 0, d
    cdef double r, x, fl
    cdef double frac_in = 0.0, frac_out = 0.0, frac
    if hist[0] <= 0 or not (hist[k - 1] > 0 or (k == 2 and hist[1] == 0)):
        return False
    for j in range(k):
        total += hist[j]
    r = (<double>(_TABLE_TOTAL - k)) / (<double>total)
    for j in range(k):
        x = (<double>hist[j]) * r
        fl = floor(x)
        frac = x - fl
        d = <int64_t>freqs[j] - 1 - <int64_t>fl
        short -= 1 + <int64_t>fl
        if d == 1:
            given += 1
            if worst_in < 0 or frac <= frac_in:  # ties: the highest index ranks last
                worst_in = j
                frac_in = frac
        elif d == 0:
            if best_out < 0 or frac > frac_out:  # ties: the lowest index ranks first
                best_out = j
                frac_out = frac
        else:
            return False
    if short < 0 or short > k or given != short:
        return False
    if worst_in >= 0 and best_out >= 0:
        return frac_in > frac_out or (frac_in == frac_out and worst_in < best_out)
    return True


cdef int _read_table(Bytes* cur, int64_t* lo, Py_ssize_t* k, uint32_t** freqs, Fault* fault) noexcept nogil:
    """A class's table (seqkv/ans_coding.py's ``read_table``); ``freqs`` is malloc'ed (K entries)."""
    cdef uint64_t v, total = 0
    cdef Py_ssize_t j
    cdef int code = _uvarint(cur, 10, (<uint64_t>1 << 63) - 1, &v)
    if code:
        return code
    lo[0] = <int64_t>(v >> 1) if not (v & 1) else -<int64_t>((v - 1) >> 1) - 1  # zigzag
    if lo[0] > (<int64_t>1 << 40) or lo[0] < -(<int64_t>1 << 40):
        fault.value = lo[0]
        return _BOUND
    code = _uvarint(cur, 10, _MAX_K, &v)
    if code:
        return code
    if v < 2:
        fault.value = <int64_t>v
        return _TABLE_SIZE
    k[0] = <Py_ssize_t>v
    freqs[0] = <uint32_t*>malloc(k[0] * sizeof(uint32_t))
    if freqs[0] == NULL:
        return _NO_MEMORY
    for j in range(k[0]):
        code = _uvarint(cur, 9, _TABLE_TOTAL - 1, &v)
        if code:
            return code
        freqs[0][j] = <uint32_t>(v + 1)
        total += v + 1
    return _OK if total == _TABLE_TOTAL else _TABLE_SUM


cdef int _check_histogram(const int32_t* symbols, Py_ssize_t count, const uint32_t* freqs,
                          Py_ssize_t k) noexcept nogil:
    """_HISTOGRAM unless the table is the histogram of ``count`` >= 1 decoded alphabet indices (all < K)."""
    cdef int64_t* hist = <int64_t*>malloc(k * sizeof(int64_t))
    cdef Py_ssize_t i
    cdef bint ok
    if hist == NULL:
        return _NO_MEMORY
    memset(hist, 0, k * sizeof(int64_t))
    for i in range(count):
        hist[symbols[i]] += 1
    ok = _table_is_histogram(hist, freqs, k)
    free(hist)
    return _OK if ok else _HISTOGRAM


cdef struct ClassStream:
    # one class's stream, read and checked (its words copied out, aligned)
    int cls
    int shift
    int64_t lo
    Py_ssize_t k
    uint32_t* freqs             # K entries (malloc'ed)
    const uint32_t* words       # n_words, then at least one readable word
    Py_ssize_t n_words
    const uint8_t* low          # shift > 0: the packed low bits, inside the section
    const int64_t* rows         # its channels, in order
    Py_ssize_t n_rows


cdef int _read_class(Bytes* cur, ClassStream* s, Py_ssize_t tokens, const int64_t* offsets, uint32_t* words,
                     Fault* fault) noexcept nogil:
    """A class's stream up to (not including) its decoding: shift, table, int32 room, words, low bits."""
    cdef Py_ssize_t count = s.n_rows * tokens, i, need
    cdef uint64_t v, bound
    cdef int code
    cdef int64_t mn, mx
    if cur.pos >= cur.end:
        return _TRUNCATED
    s.shift = cur.buf[cur.pos]
    cur.pos += 1
    if s.shift > 31:
        fault.value = s.shift
        return _SHIFT
    code = _read_table(cur, &s.lo, &s.k, &s.freqs, fault)
    if code:
        return code
    # every value lies in [lo << shift, (lo + K) << shift) + the row's offset: room in int32
    mn = offsets[s.rows[0]]
    mx = mn
    for i in range(s.n_rows):
        mn = offsets[s.rows[i]] if offsets[s.rows[i]] < mn else mn
        mx = offsets[s.rows[i]] if offsets[s.rows[i]] > mx else mx
    if _shifted(s.lo, s.shift) + mn < -(<int64_t>1 << 31) or _shifted(s.lo + s.k, s.shift) + mx > (<int64_t>1 << 31):
        return _OVERFLOW
    # a symbol costs at most 16 bits, the final state 64 (docs/format.md §6.3)
    bound = <uint64_t>(count // 2 + 3)
    if <uint64_t>((cur.end - cur.pos) // 4) < bound:
        bound = <uint64_t>((cur.end - cur.pos) // 4)
    code = _uvarint(cur, 10, bound, &v)
    if code:
        return code
    s.n_words = <Py_ssize_t>v
    if cur.end - cur.pos < 4 * s.n_words:
        return _TRUNCATED
    seqkv_load_le32_words(words, cur.buf + cur.pos, s.n_words)
    s.words = words
    cur.pos += 4 * s.n_words
    if s.shift:  # the low bits follow the words
        need = (count * s.shift + 7) // 8
        if cur.end - cur.pos < need:
            return _TRUNCATED
        s.low = cur.buf + cur.pos
        cur.pos += need
    return _OK


cdef bint _ends_clean(const ClassStream* s, const Cursor* c) noexcept nogil:
    """Every word consumed, the state back at 0, and no final zero word (as ``seqkv_ext.ans.decode``)."""
    return c.pos == 0 and c.state == 0 and (s.n_words == 0 or s.words[s.n_words - 1] != 0)


cdef int _decode_alone(const ClassStream* s, Py_ssize_t tokens, const int64_t* offsets, int32_t* out) noexcept nogil:
    """A class stream by ``seqkv_ext.ans``'s decoder (any lookup strategy, low bits), through a buffer."""
    cdef Py_ssize_t count = s.n_rows * tokens, i, j
    cdef bint clean = False
    cdef int code
    cdef int32_t* tmp = <int32_t*>malloc((count + 1) * sizeof(int32_t))
    cdef uint32_t* low = NULL
    cdef int64_t add, scale = (<int64_t>1) << s.shift
    cdef const int32_t* src
    cdef int32_t* dst
    if tmp == NULL:
        return _NO_MEMORY
    code = _decode_nogil(s.words, s.n_words, s.freqs, s.k, _ANS_SHIFT, tmp, count, _AUTO, &clean)
    if code == -1:
        code = _NO_MEMORY
    elif code != 0:
        code = _TABLE_SUM  # unreachable: the table was checked
    elif not clean:
        code = _UNCLEAN
    elif count:
        code = _check_histogram(tmp, count, s.freqs, s.k)
    if code == _OK and s.shift and count:
        low = <uint32_t*>malloc(count * sizeof(uint32_t))
        if low == NULL:
            code = _NO_MEMORY
        else:
            _unpack(s.low, (count * s.shift + 7) // 8, s.shift, low, count)
    if code == _OK:  # into the rows, in channel order; the sums were checked to fit in int32
        for i in range(s.n_rows):
            src = tmp + i * tokens
            dst = out + s.rows[i] * tokens
            add = offsets[s.rows[i]] + s.lo
            if not s.shift:
                for j in range(tokens):
                    dst[j] = <int32_t>(src[j] + add)
            else:
                for j in range(tokens):
                    dst[j] = <int32_t>((src[j] + s.lo) * scale + low[i * tokens + j] + offsets[s.rows[i]])
    free(tmp)
    free(low)
    return code


cdef struct Lane:
    # a class stream decoded by the coarse lookup, straight into its rows, two streams side by side
    const ClassStream* s
    Tables t
    Cursor c
    int64_t* hist               # K counts of the decoded alphabet indices
    Py_ssize_t row              # the next of its rows
    void* memory                # hist, cdf and the block tables in one allocation (or NULL)


cdef enum:
    _COARSE_BITS = 11           # smaller block tables than seqkv_ext.ans' (12 bits): two lanes' stay in L1
    _CSHIFT = 24 - _COARSE_BITS
    _FINE_FROM = 1 << 15        # as seqkv_ext.ans: from this many symbols, with over a quarter of the blocks
    _BOUNDARY_LIMIT = (1 << _COARSE_BITS) // 4  # straddling a symbol boundary, its full slot table is faster


cdef int _open_lane(Lane* lane, const ClassStream* s, Py_ssize_t tokens) noexcept nogil:
    """1 when the stream suits the coarse lookup (as ``seqkv_ext.ans`` picks it: no low bits, enough symbols,
    few boundary blocks) and its tables are built, 0 when it does not suit, or _NO_MEMORY."""
    cdef Py_ssize_t count = s.n_rows * tokens, nboundary
    cdef size_t blocks = (<size_t>1) << _COARSE_BITS
    lane.s = s
    lane.t.k = s.k
    lane.t.freqs = s.freqs
    lane.t.fsym = NULL
    lane.t.fent = NULL
    lane.memory = NULL
    if s.shift or count < 64 + s.k // 8:
        return 0
    # hist (K), cdf (K + 1), then cf, cr, csym (2**_COARSE_BITS each): each part aligned for its type
    lane.memory = malloc(s.k * sizeof(int64_t) + (s.k + 1) * sizeof(uint32_t) + 3 * blocks * sizeof(uint16_t))
    if lane.memory == NULL:
        return _NO_MEMORY
    lane.hist = <int64_t*>lane.memory
    lane.t.cdf = <uint32_t*>(lane.hist + s.k)
    lane.t.cf = <uint16_t*>(lane.t.cdf + s.k + 1)
    lane.t.cr = lane.t.cf + blocks
    lane.t.csym = lane.t.cr + blocks
    if not _build_cdf(&lane.t, _TABLE_BITS):
        return 0  # unreachable: the table was checked; ans' decoder reports it
    nboundary = _build_coarse(&lane.t, _TABLE_BITS, _COARSE_BITS)
    if count >= _FINE_FROM and nboundary > _BOUNDARY_LIMIT:
        return 0
    memset(lane.hist, 0, s.k * sizeof(int64_t))
    lane.row = 0
    lane.c.pos = s.n_words
    lane.c.state = 0
    if lane.c.pos > 0:
        lane.c.pos -= 1
        lane.c.state = s.words[lane.c.pos]
    if lane.c.pos > 0:
        lane.c.pos -= 1
        lane.c.state = (lane.c.state << 32) | s.words[lane.c.pos]
    lane.c.block = (lane.c.state >> _CSHIFT) & ((1 << _COARSE_BITS) - 1)
    return 1


cdef inline void _lane_rows(Lane* a, Lane* b, Py_ssize_t n, Py_ssize_t tokens, const int64_t* offsets,
                            int32_t* out) noexcept nogil:
    """The next ``n`` rows of lane ``a`` and, unless ``b`` is NULL, of lane ``b``, token by token side by side
    (two independent dependency chains: decoding one stream is bound by its chain's latency)."""
    cdef Py_ssize_t r, j
    cdef uint64_t sa, sb
    cdef int32_t* da
    cdef int32_t* db = NULL
    cdef int64_t adda, addb = 0
    cdef Cursor ca = a.c, cb
    cdef uint64_t cmask = (1 << _COARSE_BITS) - 1, lowmask = (1 << _CSHIFT) - 1
    cdef int64_t* ha = a.hist
    cdef int64_t* hb = NULL
    if b != NULL:
        cb = b.c
        hb = b.hist
    for r in range(n):
        da = out + a.s.rows[a.row + r] * tokens
        adda = offsets[a.s.rows[a.row + r]] + a.s.lo
        if b == NULL:
            for j in range(tokens):
                sa = coarse_step(&a.t, a.s.words, &ca, _ANS_SHIFT, _CSHIFT, cmask, lowmask)
                da[j] = <int32_t>(<int64_t>sa + adda)
                ha[sa] += 1
            continue
        db = out + b.s.rows[b.row + r] * tokens
        addb = offsets[b.s.rows[b.row + r]] + b.s.lo
        for j in range(tokens):
            sa = coarse_step(&a.t, a.s.words, &ca, _ANS_SHIFT, _CSHIFT, cmask, lowmask)
            sb = coarse_step(&b.t, b.s.words, &cb, _ANS_SHIFT, _CSHIFT, cmask, lowmask)
            da[j] = <int32_t>(<int64_t>sa + adda)
            db[j] = <int32_t>(<int64_t>sb + addb)
            ha[sa] += 1
            hb[sb] += 1
    a.c = ca
    a.row += n
    if b != NULL:
        b.c = cb
        b.row += n


cdef int _close_lane(Lane* lane, Py_ssize_t tokens, Fault* fault) noexcept nogil:
    """The checks once a lane's rows are all decoded."""
    fault.cls = lane.s.cls
    if not _ends_clean(lane.s, &lane.c):
        return _UNCLEAN
    if lane.s.n_rows * tokens and not _table_is_histogram(lane.hist, lane.s.freqs, lane.s.k):
        return _HISTOGRAM
    return _OK


cdef int _decode_lanes(Lane* a, Lane* b, Py_ssize_t tokens, const int64_t* offsets, int32_t* out,
                       Fault* fault) noexcept nogil:
    """Lanes ``a`` and ``b`` (or ``a`` alone when ``b`` is NULL): side by side while both have rows."""
    cdef Py_ssize_t both = a.s.n_rows
    cdef int code
    if b != NULL:
        both = a.s.n_rows if a.s.n_rows < b.s.n_rows else b.s.n_rows
    _lane_rows(a, b, both, tokens, offsets, out)
    _lane_rows(a, NULL, a.s.n_rows - a.row, tokens, offsets, out)
    if b != NULL:
        _lane_rows(b, NULL, b.s.n_rows - b.row, tokens, offsets, out)
    code = _close_lane(a, tokens, fault)
    if code == _OK and b != NULL:
        code = _close_lane(b, tokens, fault)
    return code


cdef int _decode_streams(ClassStream* streams, int n, Py_ssize_t tokens, const int64_t* offsets, int32_t* out,
                         Fault* fault) noexcept nogil:
    """Every stream, checked; those that suit the coarse lookup two at a time."""
    cdef Lane lanes[2]
    cdef int i, code = _OK, ready, waiting = 0  # waiting: lanes[0] is open, without a partner yet
    for i in range(n):
        ready = _open_lane(&lanes[waiting], &streams[i], tokens)
        if ready == 1 and not waiting:
            waiting = 1
            continue
        if ready == 1:
            code = _decode_lanes(&lanes[0], &lanes[1], tokens, offsets, out, fault)
            free(lanes[0].memory)
            waiting = 0
        elif ready == 0:
            fault.cls = streams[i].cls
            code = _decode_alone(&streams[i], tokens, offsets, out)
        else:
            code = ready
        free(lanes[1 if ready == 1 else waiting].memory)
        if code:
            break
    if waiting:
        if code == _OK:
            code = _decode_lanes(&lanes[0], NULL, tokens, offsets, out, fault)
        free(lanes[0].memory)
    return code


cdef int _read_channels(Bytes* cur, Py_ssize_t n_rows, int max_classes, int64_t* offsets, uint8_t* classes,
                        Fault* fault) noexcept nogil:
    """Every channel's offset (zigzag varints of at most 9 bytes, |offset| <= 2**31) and class (a byte, below
    ``max_classes``)."""
    cdef Py_ssize_t r
    cdef uint64_t v
    cdef int code
    for r in range(n_rows):
        code = _uvarint(cur, 9, (<uint64_t>1 << 63) - 1, &v)
        if code:
            return code
        offsets[r] = <int64_t>(v >> 1) if not (v & 1) else -<int64_t>((v - 1) >> 1) - 1  # zigzag
        if offsets[r] > (<int64_t>1 << 31) or offsets[r] < -(<int64_t>1 << 31):
            fault.value = offsets[r]
            return _OFFSET
    if cur.end - cur.pos < n_rows:
        return _TRUNCATED
    for r in range(n_rows):
        classes[r] = cur.buf[cur.pos + r]
        if classes[r] >= max_classes:
            fault.value = classes[r]
            return _CLASS
    cur.pos += n_rows
    return _OK


cdef int _decode_section(Bytes* cur, Py_ssize_t n_rows, Py_ssize_t tokens, int max_classes, int64_t* offsets,
                         uint8_t* classes, int32_t* out, Fault* fault) noexcept nogil:
    cdef Py_ssize_t start[257]
    cdef Py_ssize_t fill[256]
    cdef ClassStream streams[256]
    cdef Py_ssize_t r, c, used_words = 0
    cdef int n = 0, code, i
    cdef int64_t* rows = NULL
    cdef uint32_t* words = NULL
    code = _read_channels(cur, n_rows, max_classes, offsets, classes, fault)
    if code:
        return code
    rows = <int64_t*>malloc((n_rows + 1) * sizeof(int64_t))
    words = <uint32_t*>malloc(((cur.end - cur.pos) // 4 + 1) * sizeof(uint32_t))
    if rows == NULL or words == NULL:
        code = _NO_MEMORY
    else:
        # the rows of each class, in channel order (a counting sort)
        memset(start, 0, sizeof(start))
        for r in range(n_rows):
            start[classes[r] + 1] += 1
        for c in range(256):
            start[c + 1] += start[c]
            fill[c] = start[c]
        for r in range(n_rows):
            rows[fill[classes[r]]] = r
            fill[classes[r]] += 1
        # every stream read and checked first (they follow each other), then decoded
        for c in range(256):
            if start[c + 1] > start[c]:
                streams[n].cls = fault.cls = <int>c
                streams[n].freqs = NULL
                streams[n].low = NULL
                streams[n].rows = rows + start[c]
                streams[n].n_rows = start[c + 1] - start[c]
                n += 1
                code = _read_class(cur, &streams[n - 1], tokens, offsets, words + used_words, fault)
                if code:
                    break
                used_words += streams[n - 1].n_words
        if code == _OK:
            code = _decode_streams(streams, n, tokens, offsets, out, fault)
    for i in range(n):
        free(streams[i].freqs)
    free(rows)
    free(words)
    return code


_MESSAGES = {
    _TRUNCATED: "truncated",
    _VARINT_LONG: "varint longer than 63 bits",
    _BOUND: "value exceeds its bound",
    _OFFSET: "channel offset {value} out of range",
    _CLASS: "channel class {value} out of range",
    _SHIFT: "low-bit shift {value} out of range",
    _TABLE_SIZE: "entropy table with {value} symbols (need >= 2)",
    _TABLE_SUM: "entropy table does not sum to 2**16",
    _OVERFLOW: "decoded symbols would overflow int32",
    _UNCLEAN: "ANS stream did not end cleanly (corrupted or mismatched data)",
    _HISTOGRAM: "the entropy table is not the histogram of the symbols it codes "
                "(a token count that does not match the section?)",
}


def decode_section(const uint8_t[::1] buf, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t channels, Py_ssize_t tokens,
                   int max_classes=256):
    """Decode the ``context_ans`` section part at ``buf[pos:end]`` (it may be followed by more bytes) for
    ``channels`` channels of ``tokens`` symbols: ``(symbols int32 [channels, tokens], the position after
    it)``.  Classes must be below ``max_classes`` (1..256).  Raises :class:`StreamError` for invalid bytes
    (the module docstring lists the checks), ValueError for invalid arguments, MemoryError."""
    if pos < 0 or end > buf.shape[0] or pos > end:
        raise ValueError(f"bad range [{pos}, {end}) of a {buf.shape[0]}-byte buffer")
    if channels < 0 or tokens < 0 or not 1 <= max_classes <= 256:
        raise ValueError(f"bad shape ({channels}, {tokens}) or max_classes {max_classes}")
    columns = np.empty((channels, tokens), dtype=np.int32)
    if channels == 0:
        return columns, pos
    offsets = np.empty(channels, dtype=np.int64)
    classes = np.empty(channels, dtype=np.uint8)
    cdef int32_t[:, ::1] ov = columns
    cdef int64_t[::1] offv = offsets
    cdef uint8_t[::1] clv = classes
    cdef uint8_t dummy = 0
    cdef Bytes cur
    cdef Fault fault
    cdef int code
    cur.buf = &buf[0] if buf.shape[0] else &dummy
    cur.pos = pos
    cur.end = end
    fault.cls = -1
    fault.value = 0
    with nogil:
        code = _decode_section(&cur, channels, tokens, max_classes, &offv[0], &clv[0], &ov[0, 0], &fault)
    if code == _NO_MEMORY:
        raise MemoryError("out of memory decoding a context_ans section")
    if code:
        where = f"class {fault.cls}: " if fault.cls >= 0 else ""
        raise StreamError(where + _MESSAGES[code].format(value=fault.value))
    return columns, cur.pos
