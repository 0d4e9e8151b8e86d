# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""A compact counting token trie (the "sessions" prefix store), with a PPM-style predictor.

``TokenTrie`` stores sequences of token ids (ints in ``0 .. 2**31 - 1``).  Every node
counts how many inserted sequences (weighted by ``count``) pass through it; the root's
count is the total inserted count, and a node's count is at least the sum of its
children's counts (sequences may end anywhere).

Memory layout
-------------
No per-node Python objects: flat C arrays indexed by node number (root = 0, nodes
numbered in creation order), grown by 1.5x:

* ``key``   uint64: ``parent << 32 | token`` (all ones for the root)
* ``cnt``   int64:  the node's count
* ``first`` int32:  the node's first-created child (-1: none)
* ``next``  int32:  next sibling (-1: none); a new child goes right after ``first``

Finding child ``t`` of ``u``: compare ``t`` with ``first[u]``'s token (a new sequence's
nodes are created consecutively, so along a chain this reads adjacent memory); if that
fails and ``u`` has other children, look ``(u, t)`` up in an open-addressing hash table
(linear probing, load <= 1/2, power-of-two size) that holds only the children that are
*not* first children.  So a lookup is O(1) whatever the fan-out (a 50k-token vocabulary
at the root included), and a trie of long, mostly unbranched sequences needs little
more than its 24 bytes per node.  ``nbytes`` reports everything allocated.

Next-token distribution (``next_token_probs(prefix, V, escape)``)
-----------------------------------------------------------------
Walk ``prefix`` from the root as far as it matches; call the node reached ``u``
(the root when even the first token is absent).  Children of ``u`` whose token is
``>= V`` are ignored; among the others let ``c_t`` be the count of child ``t``,
``C = sum c_t`` and ``n`` their number.  The back-off distribution is the root's
children's counts ``r_t`` (tokens < V), add-one smoothed over the vocabulary::

    B(t) = (r_t + 1) / (R + V),       R = sum_{t < V} r_t,   r_t = 0 if t is no root child

and, with the escape method (``escape=``, PPM's A, C or D; C by default)::

    method  seen-token term s(t)        escape mass e
    "A"     c_t / (C + 1)               1 / (C + 1)
    "C"     c_t / (C + n)               n / (C + n)
    "D"     (c_t - 1/2) / C             n / (2 C)
    (any)   0 when n = 0                1 when n = 0

    P(t) = s(t) + e * B(t)          (s(t) = 0 for tokens that are no child of u)

The escape mass goes to *every* token by ``B`` (no exclusion), so ``P(t) > 0`` for all
``t < V`` and ``sum P = 1`` (up to float64 rounding).

Binary format, version 1 (``tobytes`` / ``frombytes``); all integers little-endian
------------------------------------------------------------------------------------
::

    offset       size  field
    0            8     magic b"SKVTRIE\\0"
    8            2     u16 version = 1
    10           2     u16 flags = 0 (every bit reserved, must be 0)
    12           8     u64 N = number of node records, the root included (1 <= N <= 2**31 - 1)
    20           16*N  N node records, 16 bytes each:
                         +0  u32 parent: index of the parent record (0xFFFFFFFF for the root)
                         +4  u32 token   (0xFFFFFFFF for the root; < 2**31 otherwise)
                         +8  u64 count   (< 2**63; >= 1 except for the root)
    20 + 16*N    4     u32 CRC-32 (zlib.crc32, the ISO-HDLC polynomial) of bytes 0 .. 20+16*N-1

    total length: 24 + 16*N bytes

Record 0 is the root; the others are in canonical breadth-first order: children of
earlier records first, siblings by increasing token.  Equivalently, for i >= 1:
``parent[i] < i`` and the pairs ``(parent[i], token[i])`` strictly increase.  So a trie's
bytes do not depend on the order its sequences were inserted in, and
``frombytes(b).tobytes() == b`` for every accepted ``b``.  ``frombytes`` checks, in
this order: length >= 20, magic, version, flags, N's range, ``length == 24 + 16*N``, the CRC, the
root record, then every record (parent index, token range, order -- which also rules
out duplicate siblings, cycles and unreachable nodes -- count >= 1, count < 2**63, and
children's counts summing to at most their parent's); anything else raises ValueError.
It allocates at most about 2.5x the data's length.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy, memset

import operator
import zlib

import numpy as np

cimport numpy as cnp

cnp.import_array()

__all__ = ["TokenTrie", "FORMAT_VERSION", "MAGIC", "MAX_TOKEN"]

MAGIC = b"SKVTRIE\0"
FORMAT_VERSION = 1
MAX_TOKEN = 0x7FFFFFFF  # token ids are 0 .. MAX_TOKEN

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint64_t seqkv_trie_ld64(const uint8_t *p) {
        uint64_t v; memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline uint32_t seqkv_trie_ld32(const uint8_t *p) {
        uint32_t v; memcpy(&v, p, 4);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        return v;
    }
    static inline void seqkv_trie_st64(uint8_t *p, uint64_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        memcpy(p, &v, 8);
    }
    static inline void seqkv_trie_st32(uint8_t *p, uint32_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        memcpy(p, &v, 4);
    }
    static int seqkv_trie_cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
        return (x > y) - (x < y);
    }
    """
    uint64_t _ld64 "seqkv_trie_ld64"(const uint8_t* p) noexcept nogil
    uint32_t _ld32 "seqkv_trie_ld32"(const uint8_t* p) noexcept nogil
    void _st64 "seqkv_trie_st64"(uint8_t* p, uint64_t v) noexcept nogil
    void _st32 "seqkv_trie_st32"(uint8_t* p, uint32_t v) noexcept nogil
    int _cmp_u64 "seqkv_trie_cmp_u64"(const void* a, const void* b) noexcept nogil

cdef enum:
    _HEADER = 20
    _RECORD = 16
    _TRAILER = 4

cdef uint64_t _ROOT_KEY = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t _GOLDEN = 0x9E3779B97F4A7C15ULL
cdef int64_t _I64_MAX = 0x7FFFFFFFFFFFFFFFLL
cdef uint32_t _NONE32 = 0xFFFFFFFFU  # parent/token of the root record
cdef int64_t _MAX_TOKEN = 0x7FFFFFFF
cdef Py_ssize_t _MAX_NODES = 0x7FFFFFFF  # root included; node numbers fit in int32
cdef Py_ssize_t _MIN_CAP = 16

_EMPTY_IDS = np.zeros(0, dtype=np.int32)
_EMPTY_IDS.setflags(write=False)
_ESCAPES = {"A": 0, "C": 1, "D": 2}


cdef inline int _check_range(int64_t v, Py_ssize_t i) except -1:
    if v < 0 or v > _MAX_TOKEN:
        raise ValueError(f"token ids must be in 0..{MAX_TOKEN} (got {v} at index {i})")
    return 0


cdef cnp.ndarray _as_ids(object token_ids):
    """Any 1-D integer array-like -> aligned C-contiguous native int32 ndarray, ids in 0..MAX_TOKEN.

    Such arrays are used in place; lists and tuples of ints and other integer arrays are
    converted in one C loop; anything else goes through ``np.asarray``.
    """
    cdef Py_ssize_t i
    cdef cnp.npy_intp n
    cdef int32_t* out
    cdef const int32_t* v32
    cdef const int64_t* v64
    cdef int64_t x
    cdef cnp.ndarray a, arr
    if type(token_ids) is list or type(token_ids) is tuple:
        n = len(token_ids)
        arr = cnp.PyArray_EMPTY(1, &n, cnp.NPY_INT32, 0)
        out = <int32_t*>cnp.PyArray_DATA(arr)
        for i in range(n):
            item = token_ids[i]
            if type(item) is not int:
                break  # numpy scalars, bools, floats, nested lists...: the general path
            try:
                x = item
            except OverflowError:
                raise ValueError(f"token ids must be in 0..{MAX_TOKEN} (got {item} at index {i})") from None
            if x < 0 or x > _MAX_TOKEN:
                _check_range(x, i)
            out[i] = <int32_t>x
        else:
            return arr
    if cnp.PyArray_Check(token_ids):
        a = <cnp.ndarray>token_ids
    else:
        a = np.asarray(token_ids)
    if cnp.PyArray_NDIM(a) != 1:
        raise ValueError(f"token_ids must be 1-D (got {cnp.PyArray_NDIM(a)} dimensions)")
    n = cnp.PyArray_DIM(a, 0)
    if n == 0:
        return _EMPTY_IDS
    if cnp.PyArray_TYPE(a) == cnp.NPY_INT32:
        if not (cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISBEHAVED_RO(a)):
            a = np.ascontiguousarray(a, dtype=np.int32)
        v32 = <const int32_t*>cnp.PyArray_DATA(a)
        for i in range(n):
            if v32[i] < 0:
                _check_range(v32[i], i)
        return a
    # every other integer dtype through int64
    if a.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers (got dtype {a.dtype})")
    if cnp.PyArray_TYPE(a) == cnp.NPY_UINT64 and a.max() > MAX_TOKEN:
        raise ValueError(f"token ids must be in 0..{MAX_TOKEN} (got {a.max()})")
    a = np.ascontiguousarray(a, dtype=np.int64)
    v64 = <const int64_t*>cnp.PyArray_DATA(a)
    arr = cnp.PyArray_EMPTY(1, &n, cnp.NPY_INT32, 0)
    out = <int32_t*>cnp.PyArray_DATA(arr)
    for i in range(n):
        x = v64[i]
        if x < 0 or x > _MAX_TOKEN:
            _check_range(x, i)
        out[i] = <int32_t>x
    return arr


cdef inline int32_t _tok(uint64_t key) noexcept nogil:
    """The token of a node key (its low 32 bits)."""
    return <int32_t><uint32_t>key


cdef inline uint64_t _key_of(Py_ssize_t parent, int32_t token) noexcept nogil:
    return ((<uint64_t>parent) << 32) | <uint32_t>token


@cython.final
@cython.auto_pickle(False)
cdef class TokenTrie:
    """A counting trie over token-id sequences, stored in flat C arrays (see the module doc).

    ``TokenTrie()`` is empty; ``insert`` adds sequences, ``tobytes``/``frombytes``
    serialize it (format version 1).  Token ids are ints in ``0 .. 2**31 - 1``; every
    method taking ids accepts any 1-D integer array-like and raises ValueError for
    other input.  Not thread-safe for concurrent mutation (all methods hold the GIL).
    """
    cdef uint64_t* _key
    cdef int64_t* _cnt
    cdef int32_t* _first
    cdef int32_t* _next
    cdef Py_ssize_t _n          # nodes, root included
    cdef Py_ssize_t _cap        # capacity of the four node arrays
    cdef int32_t* _slots        # hash table of the non-first children, -1 = empty
    cdef Py_ssize_t _nslots     # power of two
    cdef Py_ssize_t _nhashed    # nodes in the hash table
    cdef int _shift             # 64 - log2(_nslots)
    cdef int32_t* _path         # scratch for insert: the matched path
    cdef Py_ssize_t _path_cap
    cdef object _total          # total_tokens, a Python int (cannot overflow)

    def __cinit__(self):
        self._n = 0
        self._cap = 0
        self._nslots = 0
        self._nhashed = 0
        self._path_cap = 0
        self._total = 0
        self._grow_nodes(_MIN_CAP)
        self._rehash(2 * _MIN_CAP)
        self._key[0] = _ROOT_KEY
        self._cnt[0] = 0
        self._first[0] = -1
        self._next[0] = -1
        self._n = 1

    def __dealloc__(self):
        free(self._key)
        free(self._cnt)
        free(self._first)
        free(self._next)
        free(self._slots)
        free(self._path)

    # ------------------------------------------------------------------ storage

    cdef int _grow_nodes(self, Py_ssize_t cap) except -1:
        """Make the node arrays hold ``cap`` nodes; on failure nothing observable changes."""
        cdef void* p
        if cap <= self._cap:
            return 0
        p = realloc(self._key, cap * sizeof(uint64_t))
        if p == NULL:
            raise MemoryError()
        self._key = <uint64_t*>p
        p = realloc(self._cnt, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self._cnt = <int64_t*>p
        p = realloc(self._first, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self._first = <int32_t*>p
        p = realloc(self._next, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self._next = <int32_t*>p
        self._cap = cap
        return 0

    cdef int _rehash(self, Py_ssize_t nslots) except -1:
        """Rebuild the hash table of the non-first children with ``nslots`` (a power of two)."""
        cdef int32_t* s = <int32_t*>malloc(nslots * sizeof(int32_t))
        cdef Py_ssize_t i, j, nh = 0
        cdef uint64_t mask = <uint64_t>nslots - 1
        cdef int shift = 64
        if s == NULL:
            raise MemoryError()
        while (<Py_ssize_t>1 << (64 - shift)) < nslots:
            shift -= 1
        memset(s, 0xFF, nslots * sizeof(int32_t))
        for i in range(1, self._n):
            if self._first[self._key[i] >> 32] == i:
                continue  # first children are found through first[], not hashed
            j = <Py_ssize_t>((self._key[i] * _GOLDEN) >> shift)
            while s[j] >= 0:
                j = <Py_ssize_t>((j + 1) & mask)
            s[j] = <int32_t>i
            nh += 1
        free(self._slots)
        self._slots = s
        self._nslots = nslots
        self._shift = shift
        self._nhashed = nh
        return 0

    cdef int _reserve(self, Py_ssize_t extra, Py_ssize_t hashed) except -1:
        """Room for ``extra`` more nodes, ``hashed`` of them non-first children, before any mutation."""
        cdef Py_ssize_t need = self._n + extra, cap, ns
        if extra > _MAX_NODES - self._n:
            raise MemoryError(f"TokenTrie holds at most {_MAX_NODES - 1} nodes")
        if need > self._cap:
            cap = self._cap + (self._cap >> 1)
            if cap < need:
                cap = need
            if cap > _MAX_NODES:
                cap = _MAX_NODES
            self._grow_nodes(cap)
        if 2 * (self._nhashed + hashed) >= self._nslots:  # keep the load below 1/2
            ns = self._nslots
            while 2 * (self._nhashed + hashed) >= ns:
                ns *= 2
            self._rehash(ns)
        return 0

    cdef inline Py_ssize_t _find(self, Py_ssize_t parent, int32_t token) noexcept:
        """Node number of child ``token`` of ``parent``, or -1."""
        cdef int32_t s = self._first[parent]
        cdef uint64_t key, mask
        cdef Py_ssize_t j
        if s < 0:
            return -1
        if _tok(self._key[s]) == token:
            return s
        if self._next[s] < 0:  # an only child
            return -1
        key = _key_of(parent, token)
        mask = <uint64_t>self._nslots - 1
        j = <Py_ssize_t>((key * _GOLDEN) >> self._shift)
        while True:
            s = self._slots[j]
            if s < 0:
                return -1
            if self._key[s] == key:
                return s
            j = <Py_ssize_t>((j + 1) & mask)

    cdef inline Py_ssize_t _add(self, Py_ssize_t parent, int32_t token, int64_t c) noexcept:
        """Append a new child (room reserved, the child known absent); returns its number."""
        cdef Py_ssize_t i = self._n, j
        cdef int32_t f = self._first[parent]
        cdef uint64_t key = _key_of(parent, token)
        cdef uint64_t mask
        self._key[i] = key
        self._cnt[i] = c
        self._first[i] = -1
        if f < 0:
            self._first[parent] = <int32_t>i
            self._next[i] = -1
        else:
            self._next[i] = self._next[f]
            self._next[f] = <int32_t>i
            mask = <uint64_t>self._nslots - 1
            j = <Py_ssize_t>((key * _GOLDEN) >> self._shift)
            while self._slots[j] >= 0:
                j = <Py_ssize_t>((j + 1) & mask)
            self._slots[j] = <int32_t>i
            self._nhashed += 1
        self._n = i + 1
        return i

    cdef Py_ssize_t _walk(self, cnp.ndarray a, Py_ssize_t* node) noexcept:
        """Follow the ids in ``a`` (from _as_ids) from the root; returns the matched length
        and the node reached in *node."""
        cdef const int32_t* ids = <const int32_t*>cnp.PyArray_DATA(a)
        cdef Py_ssize_t m = 0, L = cnp.PyArray_DIM(a, 0), u = 0, ch
        while m < L:
            ch = self._find(u, ids[m])
            if ch < 0:
                break
            u = ch
            m += 1
        node[0] = u
        return m

    cdef Py_ssize_t _node_at(self, prefix) except -2:
        """Node number of ``prefix``, or -1 when it is not a path."""
        cdef cnp.ndarray a = _as_ids(prefix)
        cdef Py_ssize_t u
        if self._walk(a, &u) != cnp.PyArray_DIM(a, 0):
            return -1
        return u

    # ------------------------------------------------------------------ mutation

    def insert(self, token_ids, count=1):
        """Add the sequence ``token_ids`` ``count`` times (``count >= 1``).

        Adds ``count`` to the root and to every node on the sequence's path, creating
        the missing ones; returns how many nodes were created.  Atomic: on any error
        (ValueError for bad ids or count, MemoryError) the trie is unchanged.
        """
        cdef cnp.ndarray a
        cdef const int32_t* ids
        cdef Py_ssize_t L, m = 0, u = 0, ch, i, new
        cdef int64_t c
        cdef void* p
        # count first: its __index__ is the only foreign code, and runs before the ids are read
        try:
            cc = operator.index(count)
        except TypeError:
            raise ValueError(f"count must be an int (got {type(count).__name__})") from None
        if cc < 1:
            raise ValueError(f"count must be >= 1 (got {cc})")
        if cc > _I64_MAX - self._cnt[0]:
            raise ValueError(f"count {cc} would overflow the root count {self._cnt[0]} past 2**63 - 1")
        c = cc
        a = _as_ids(token_ids)
        ids = <const int32_t*>cnp.PyArray_DATA(a)
        L = cnp.PyArray_DIM(a, 0)
        if L > self._path_cap:
            p = realloc(self._path, L * sizeof(int32_t))
            if p == NULL:
                raise MemoryError()
            self._path = <int32_t*>p
            self._path_cap = L
        while m < L:
            ch = self._find(u, ids[m])
            if ch < 0:
                break
            self._path[m] = <int32_t>ch
            u = ch
            m += 1
        new = L - m
        if new:  # the only step that can fail: nothing has changed yet
            self._reserve(new, 1 if self._first[u] >= 0 else 0)
        self._cnt[0] += c
        for i in range(m):
            self._cnt[self._path[i]] += c
        for i in range(m, L):
            u = self._add(u, ids[i], c)
        self._total += L * cc
        return new

    # ------------------------------------------------------------------ queries

    def longest_prefix(self, token_ids):
        """Length of the longest prefix of ``token_ids`` that is a path from the root."""
        cdef Py_ssize_t u
        return self._walk(_as_ids(token_ids), &u)

    def count(self, prefix):
        """Count of the node at ``prefix`` (0 when absent; ``count([])`` is the total inserted count)."""
        cdef Py_ssize_t u = self._node_at(prefix)
        return 0 if u < 0 else self._cnt[u]

    def children(self, prefix):
        """``[(token, count), ...]`` of the children of the node at ``prefix``, by token ([] when absent)."""
        cdef Py_ssize_t u = self._node_at(prefix)
        cdef int32_t ch
        out = []
        if u < 0:
            return out
        ch = self._first[u]
        while ch >= 0:
            out.append((_tok(self._key[ch]), self._cnt[ch]))
            ch = self._next[ch]
        out.sort()
        return out

    def next_token_probs(self, prefix, vocab_size, escape="C"):
        """P(next token | prefix) over ``0 .. vocab_size - 1`` as a float64 array (module doc).

        ``escape`` is the PPM escape method, "A", "C" (default) or "D".  The node used is
        the one reached by following ``prefix`` from the root as far as it matches.
        """
        cdef cnp.ndarray a
        cdef Py_ssize_t u, t, n = 0
        cdef int64_t V, R = 0, C = 0
        cdef int32_t ch
        cdef double e, denom, sc, scale
        cdef int method
        cdef double[::1] P
        try:
            vv = operator.index(vocab_size)
        except TypeError:
            raise ValueError(f"vocab_size must be an int (got {type(vocab_size).__name__})") from None
        if vv < 1 or vv > MAX_TOKEN + 1:
            raise ValueError(f"vocab_size must be in 1..2**31 (got {vv})")
        if not isinstance(escape, str) or escape not in _ESCAPES:
            raise ValueError(f"escape must be 'A', 'C' or 'D' (got {escape!r})")
        method = _ESCAPES[escape]
        V = vv
        a = _as_ids(prefix)
        self._walk(a, &u)
        out = np.empty(V, dtype=np.float64)
        P = out
        # back-off B(t) = (r_t + 1) / (R + V); R <= root count < 2**63, so no overflow
        ch = self._first[0]
        while ch >= 0:
            t = _tok(self._key[ch])
            if t < V:
                R += self._cnt[ch]
            ch = self._next[ch]
        ch = self._first[u]
        while ch >= 0:
            if _tok(self._key[ch]) < V:
                C += self._cnt[ch]  # <= count of u
                n += 1
            ch = self._next[ch]
        if n == 0:
            e = 1.0
            sc = 0.0
        elif method == 0:  # A
            denom = <double>C + 1.0
            e = 1.0 / denom
            sc = 1.0 / denom
        elif method == 1:  # C
            denom = <double>C + <double>n
            e = <double>n / denom
            sc = 1.0 / denom
        else:  # D
            e = <double>n / (2.0 * <double>C)
            sc = 1.0 / <double>C
        scale = e / (<double>R + <double>V)
        for t in range(V):
            P[t] = scale
        ch = self._first[0]
        while ch >= 0:
            t = _tok(self._key[ch])
            if t < V:
                P[t] = scale * (<double>self._cnt[ch] + 1.0)
            ch = self._next[ch]
        if n:
            ch = self._first[u]
            while ch >= 0:
                t = _tok(self._key[ch])
                if t < V:
                    if method == 2:
                        P[t] += (<double>self._cnt[ch] - 0.5) * sc
                    else:
                        P[t] += <double>self._cnt[ch] * sc
                ch = self._next[ch]
        return out

    def __len__(self):
        """Number of nodes, the root excluded."""
        return self._n - 1

    @property
    def total_tokens(self):
        """Sum over insertions of length x count (= the sum of all non-root counts)."""
        return self._total

    @property
    def nbytes(self):
        """Bytes of C memory held: node arrays (capacity), hash table and insert scratch."""
        return (self._cap * (sizeof(uint64_t) + sizeof(int64_t) + 2 * sizeof(int32_t))
                + self._nslots * sizeof(int32_t) + self._path_cap * sizeof(int32_t))

    def __sizeof__(self):
        return object.__sizeof__(self) + self.nbytes

    def __repr__(self):
        return f"TokenTrie(nodes={self._n - 1}, total_tokens={self._total}, count={self._cnt[0]})"

    # ------------------------------------------------------------------ serialization

    def tobytes(self):
        """The trie in format version 1 (module doc): canonical, independent of insertion order."""
        cdef Py_ssize_t N = self._n, head = 0, tail = 1, k, j, size
        cdef Py_ssize_t old
        cdef int32_t ch
        cdef uint8_t* buf
        cdef uint8_t* rec
        cdef int32_t* order = NULL
        cdef uint64_t* tmp = NULL
        size = _HEADER + _RECORD * N + _TRAILER
        blob = PyBytes_FromStringAndSize(NULL, size)
        buf = <uint8_t*>PyBytes_AS_STRING(blob)
        order = <int32_t*>malloc(N * sizeof(int32_t))
        tmp = <uint64_t*>malloc(N * sizeof(uint64_t))
        try:
            if order == NULL or tmp == NULL:
                raise MemoryError()
            memcpy(buf, b"SKVTRIE\0", 8)
            buf[8] = FORMAT_VERSION
            buf[9] = 0
            buf[10] = 0
            buf[11] = 0
            _st64(buf + 12, <uint64_t>N)
            rec = buf + _HEADER
            _st32(rec, _NONE32)
            _st32(rec + 4, _NONE32)
            _st64(rec + 8, <uint64_t>self._cnt[0])
            order[0] = 0
            while head < tail:
                old = order[head]
                k = 0
                ch = self._first[old]
                while ch >= 0:  # (token << 32 | node): sorting sorts by token (unique here)
                    tmp[k] = ((<uint64_t>_tok(self._key[ch])) << 32) | <uint32_t>ch
                    k += 1
                    ch = self._next[ch]
                if k > 1:
                    qsort(tmp, k, sizeof(uint64_t), _cmp_u64)
                for j in range(k):
                    ch = <int32_t><uint32_t>tmp[j]
                    order[tail] = ch
                    rec = buf + _HEADER + _RECORD * tail
                    _st32(rec, <uint32_t>head)
                    _st32(rec + 4, <uint32_t>(tmp[j] >> 32))
                    _st64(rec + 8, <uint64_t>self._cnt[ch])
                    tail += 1
                head += 1
        finally:
            free(order)
            free(tmp)
        crc = zlib.crc32(memoryview(blob)[: size - _TRAILER])
        _st32(buf + size - _TRAILER, <uint32_t>crc)
        return blob

    @classmethod
    def frombytes(cls, data):
        """Parse format version 1 (module doc).  Any malformed input raises ValueError."""
        cdef const uint8_t[::1] d
        cdef Py_ssize_t L, N, i, cur = -1
        cdef uint64_t p, t, c, prev_p = 0, prev_t = 0, lo = 0, hi = 0
        cdef int64_t rem = 0
        cdef TokenTrie trie
        cdef Py_ssize_t ns, nh
        try:
            mv = memoryview(data)
            if not mv.c_contiguous:
                mv = memoryview(mv.tobytes())
            mv = mv.cast("B")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"data must be a bytes-like object ({type(data).__name__}: {exc})") from None
        d = mv
        L = d.shape[0]
        if L < _HEADER:
            raise ValueError(f"TokenTrie data too short: {L} bytes, the header alone is {_HEADER}")
        if mv[:8] != MAGIC:
            raise ValueError(f"not TokenTrie data: bad magic {mv[:8].tobytes()!r}")
        version = d[8] | (d[9] << 8)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported TokenTrie format version {version} "
                             f"(this build reads version {FORMAT_VERSION})")
        flags = d[10] | (d[11] << 8)
        if flags != 0:
            raise ValueError(f"reserved TokenTrie flag bits set: 0x{flags:04x}")
        nn = _ld64(&d[12])
        if nn < 1:
            raise ValueError("TokenTrie node count is 0 (the root record is required)")
        if nn > _MAX_NODES:
            raise ValueError(f"TokenTrie node count {nn} exceeds {_MAX_NODES}")
        if L != _HEADER + _RECORD * nn + _TRAILER:
            raise ValueError(f"TokenTrie data is {L} bytes; {nn} nodes need exactly "
                             f"{_HEADER + _RECORD * nn + _TRAILER}")
        N = nn
        stored = _ld32(&d[L - _TRAILER])
        actual = zlib.crc32(mv[: L - _TRAILER])
        if stored != actual:
            raise ValueError(f"TokenTrie checksum mismatch: stored 0x{stored:08x}, computed 0x{actual:08x}")
        if _ld32(&d[_HEADER]) != _NONE32 or _ld32(&d[_HEADER + 4]) != _NONE32:
            raise ValueError("TokenTrie record 0 is not a root (parent and token must be 0xFFFFFFFF)")
        c = _ld64(&d[_HEADER + 8])
        if c > <uint64_t>_I64_MAX:
            raise ValueError(f"TokenTrie root count {c} exceeds 2**63 - 1")

        trie = TokenTrie.__new__(TokenTrie)
        trie._grow_nodes(N)  # bounded: N <= (L - 24) / 16
        trie._cnt[0] = <int64_t>c
        trie._first[0] = -1
        trie._next[0] = -1
        for i in range(1, N):
            p = _ld32(&d[_HEADER + _RECORD * i])
            t = _ld32(&d[_HEADER + _RECORD * i + 4])
            c = _ld64(&d[_HEADER + _RECORD * i + 8])
            if p >= <uint64_t>i:
                raise ValueError(f"TokenTrie node {i}: parent {p} is not an earlier node")
            if t > <uint64_t>_MAX_TOKEN:
                raise ValueError(f"TokenTrie node {i}: token {t} exceeds {MAX_TOKEN}")
            if i > 1 and (p < prev_p or (p == prev_p and t <= prev_t)):
                raise ValueError(f"TokenTrie node {i}: (parent {p}, token {t}) breaks the canonical "
                                 f"order after ({prev_p}, {prev_t}) (or repeats a sibling)")
            if c < 1 or c > <uint64_t>_I64_MAX:
                raise ValueError(f"TokenTrie node {i}: count {c} is not in 1..2**63-1")
            if <Py_ssize_t>p != cur:
                cur = <Py_ssize_t>p
                rem = trie._cnt[cur]
            rem -= <int64_t>c  # both in 0..2**63-1: no overflow
            if rem < 0:
                raise ValueError(f"TokenTrie node {p}: children's counts exceed its count {trie._cnt[cur]}")
            trie._key[i] = (p << 32) | t
            trie._cnt[i] = <int64_t>c
            trie._first[i] = -1
            lo += c
            if lo < c:
                hi += 1
            prev_p = p
            prev_t = t
        for i in range(N - 1, 0, -1):  # sibling lists come out sorted by token
            p = trie._key[i] >> 32
            trie._next[i] = trie._first[p]
            trie._first[p] = <int32_t>i
        trie._n = N
        nh = 0
        for i in range(1, N):
            if trie._first[trie._key[i] >> 32] != i:
                nh += 1
        ns = 2 * _MIN_CAP
        while 2 * nh >= ns:
            ns *= 2
        trie._rehash(ns)
        trie._total = (<object>hi << 64) | <object>lo
        return trie
