"""Lossless coding of IEEE float bit patterns: the coder of the ``lossless`` preset.

One call codes one tensor ``[kv_heads, tokens, head_dim]`` of float16 /
bfloat16 / float32 bit patterns.  Every token row of a head is coded in one
of three ways:

* **duplicate** -- a row equal to an earlier row of the head (layer 0 values
  of a repeated token) is a reference to that row;
* **matched** -- a row close to an earlier row (the same token seen before, or
  the previous token of a smooth key channel) is coded as the difference of
  the two rows in an order-preserving integer image of the floats: the bit
  length and sign of each difference are ANS-coded, the bits below its
  leading one are stored raw;
* **plain** -- all other rows.  Sign and exponent are ANS-coded together as
  ``ds = min(depth, D) * 2 + sign``, where ``depth`` is how far the exponent
  lies below the largest exponent of the value's channel (one (head, dim)
  column); depths >= D are escapes with a raw exponent.  The tables are per
  *channel class* (channels clustered by the shape of their ``ds``
  histogram) and, for every second plain row, per context of the two
  neighbouring rows.  The top mantissa bits are ANS-coded by depth, the low
  mantissa bits (uniform noise) are stored raw.

Every choice the encoder makes is written into the bytes, so decoding needs
only ``(float_format, shape)``; the config only steers the encoder.  The byte
layout is documented in docs/format.md, section 8.
"""
from __future__ import annotations

import numpy as np

from ..ans_coding import FreqTable, decode_symbols, encode_symbols, table_from_counts
from ..bitpacking import pack_low_bits, unpack_low_bits
from ..errors import ConfigError, EncodeError, FormatError
from ..wire import Reader, write_uvarint
from .base import TensorCoder, register

# name -> (total bits, exponent bits, mantissa bits, numpy dtype of the bit patterns)
FORMATS = {
    "float16": (16, 5, 10, np.uint16),
    "bfloat16": (16, 8, 7, np.uint16),
    "float32": (32, 8, 23, np.uint32),
}

MODE_RAW = 0
MODE_CODED = 1

MAX_MANTISSA_BITS = 4       # top mantissa bits that may be entropy-coded
MAX_CLASSES = 16
MAX_BUCKETS = 8             # neighbour / mantissa / residual depth buckets
MAX_TABLE_VALUE = 1 << 20   # bound on one stored (quantized) table count
SIGN_PAIRS = 3              # sign(prev) + sign(next) in {0, 1, 2}
CLASS_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16)
SEARCH_BLOCK = 256          # rows per block of the match search


def _format(float_format: str):
    spec = FORMATS.get(float_format) if isinstance(float_format, str) else None
    if spec is None:
        raise ConfigError(f"lossless_float: unknown float format {float_format!r}; known: {sorted(FORMATS)}")
    return spec


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        heads, tokens, dim = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"lossless_float: shape must be (kv_heads, tokens, head_dim), got {shape!r}") from None
    if heads <= 0 or dim <= 0 or tokens < 0:
        raise ConfigError(f"lossless_float: invalid shape {shape!r}")
    return heads, tokens, dim


def _bit_length(n: int) -> int:
    return int(n).bit_length()


_BIT_LENGTH_16 = np.frexp(np.arange(1 << 16, dtype=np.float64))[1].astype(np.uint8)


def _bit_lengths(a: np.ndarray) -> np.ndarray:
    """Bit length of every non-negative integer below 2**32 (0 -> 0), as uint8."""
    a = a.astype(np.uint32, copy=False)
    high = a >> np.uint32(16)
    if not high.any():
        return _BIT_LENGTH_16[a]
    return np.where(high > 0, _BIT_LENGTH_16[high] + np.uint8(16), _BIT_LENGTH_16[a & np.uint32(0xFFFF)])


# -- tables and ANS streams ----------------------------------------------------------------

def _plan_table(counts: np.ndarray, scale_bits: int):
    """A stored table for a histogram: (lo, q, FreqTable); q is trimmed to the used symbols and
    scaled down to sum to about 2**scale_bits when the histogram holds more samples than that."""
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    c = counts[lo:hi].astype(np.int64)
    total = int(c.sum())
    scale = 1 << scale_bits
    if total > scale:
        q = (c * scale + total // 2) // total
        q[(c > 0) & (q == 0)] = 1
    else:
        q = c
    return lo, q, table_from_counts(lo, q)


def _read_table(reader: Reader, alphabet: int) -> FreqTable:
    lo = reader.uvarint(max_value=alphabet - 1)
    width = reader.uvarint(max_value=alphabet - lo)
    if width < 1:
        raise FormatError(f"{reader.what}: empty entropy table")
    q = np.empty(width, dtype=np.int64)
    for i in range(width):
        q[i] = reader.uvarint(max_value=MAX_TABLE_VALUE)
    if q[0] == 0 or q[-1] == 0:
        raise FormatError(f"{reader.what}: entropy table is not trimmed to its used symbols")
    return table_from_counts(lo, q)


def _write_stream(out: bytearray, symbols: np.ndarray, scale_bits: int, alphabet: int) -> None:
    lo, q, table = _plan_table(np.bincount(symbols, minlength=alphabet), scale_bits)
    write_uvarint(out, lo)
    write_uvarint(out, len(q))
    for v in q.tolist():
        write_uvarint(out, v)
    words = encode_symbols(symbols, table)
    write_uvarint(out, len(words))
    out += words.astype("<u4").tobytes()


def _read_stream(reader: Reader, count: int, alphabet: int) -> np.ndarray:
    table = _read_table(reader, alphabet)
    # a symbol costs at most 16 bits (smallest frequency 2**-16), plus the 64-bit final state
    n_words = reader.uvarint(max_value=min(count // 2 + 3, reader.remaining() // 4))
    words = reader.array("<u4", n_words)
    symbols = decode_symbols(words, table, count)
    if count and int(symbols.max()) >= alphabet:
        raise FormatError(f"{reader.what}: decoded symbol outside its alphabet")
    return symbols


def _write_grouped(out: bytearray, tidx: np.ndarray, symbols: np.ndarray, ntables: int, scale: int,
                   alphabet: int) -> None:
    """One stream per used table index, in index order; each keeps its symbols' element order."""
    tidx = tidx.ravel()
    counts = np.bincount(tidx, minlength=ntables)
    if not tidx.size:
        return
    ordered = symbols.ravel()[np.argsort(tidx, kind="stable")].astype(np.int32)
    ends = np.cumsum(counts)
    for j in np.flatnonzero(counts).tolist():
        _write_stream(out, ordered[ends[j] - counts[j]:ends[j]], scale, alphabet)


def _read_grouped(reader: Reader, tidx: np.ndarray, ntables: int, alphabet: int) -> np.ndarray:
    """Decode the streams of every used table (index order) and scatter them to ``tidx``'s shape."""
    flat = tidx.ravel()
    counts = np.bincount(flat, minlength=ntables)
    parts = [_read_stream(reader, int(counts[j]), alphabet) for j in np.flatnonzero(counts).tolist()]
    result = np.empty(flat.size, dtype=np.uint16)
    if flat.size:
        result[np.argsort(flat, kind="stable")] = np.concatenate(parts)
    return result.reshape(tidx.shape)


def _read_packed(reader: Reader, nbits: int, count: int) -> np.ndarray:
    return unpack_low_bits(reader.bytes((count * nbits + 7) // 8), nbits, count)


def _write_by_length(out: bytearray, lengths: np.ndarray, values: np.ndarray, max_len: int) -> None:
    """The bits of every value below its leading one, grouped by bit length (2 .. max_len);
    each group keeps the element order and is packed with (length - 1) bits per value."""
    lengths = lengths.ravel().astype(np.uint8)
    order = np.argsort(lengths, kind="stable")
    ends = np.cumsum(np.bincount(lengths, minlength=max_len + 1))
    rest = values.ravel()[order].astype(np.uint64)
    for n in range(2, max_len + 1):
        part = rest[ends[n - 1]:ends[n]] - np.uint64(1 << (n - 1))
        out += pack_low_bits(part.astype(np.uint32), n - 1)


def _read_by_length(reader: Reader, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Inverse of :func:`_write_by_length`: the values (0 where the length is 0), as int64."""
    flat = lengths.ravel().astype(np.uint8)
    counts = np.bincount(flat, minlength=max_len + 1)
    if counts.size > max_len + 1:
        raise FormatError(f"{reader.what}: bit length above {max_len}")
    parts = [np.zeros(counts[0], dtype=np.int64), np.ones(counts[1], dtype=np.int64)]
    for n in range(2, max_len + 1):
        parts.append(_read_packed(reader, n - 1, int(counts[n])).astype(np.int64) + (1 << (n - 1)))
    values = np.empty(flat.size, dtype=np.int64)
    values[np.argsort(flat, kind="stable")] = np.concatenate(parts)
    return values.reshape(lengths.shape)


# -- float images ------------------------------------------------------------------------

def _to_ordered(v: np.ndarray, nb: int) -> np.ndarray:
    """Bijective, order-preserving map of float bit patterns (uint32) to [0, 2**nb) (uint32).

    Non-negative floats get their top bit set, negative ones have all bits flipped.
    """
    v = v.astype(np.uint32, copy=False)
    top = np.uint32(1 << (nb - 1))
    return v ^ (top + (v >> np.uint32(nb - 1)) * (top - np.uint32(1)))


def _from_ordered(o: np.ndarray, nb: int) -> np.ndarray:
    o = o.astype(np.uint32, copy=False)
    top = np.uint32(1 << (nb - 1))
    return o ^ (top + (np.uint32(1) - (o >> np.uint32(nb - 1))) * (top - np.uint32(1)))


def _signed_diff(a: np.ndarray, b: np.ndarray, nb: int):
    """(a - b) of two ordered images, wrapped to [-2**(nb-1), 2**(nb-1)): (magnitude uint32, negative bool).

    For the one value -2**(nb-1) the magnitude is 2**(nb-1) with the negative flag set.
    """
    d = a.astype(np.uint32, copy=False) - b.astype(np.uint32, copy=False)     # wraps mod 2**32
    if nb < 32:
        d &= np.uint32((1 << nb) - 1)
    neg = (d >> np.uint32(nb - 1)).astype(bool)
    mag = np.where(neg, (np.uint32(0) - d) & np.uint32((1 << nb) - 1) if nb < 32 else np.uint32(0) - d, d)
    return mag, neg


def _roots(parent: np.ndarray) -> np.ndarray:
    """The root of every node of a forest given by ``parent`` links (roots point at themselves),
    found by pointer jumping; ``parent[i] < i`` for every non-root, so there are no cycles."""
    par = parent.copy()
    while True:
        up = par[par]
        if np.array_equal(up, par):
            return par
        par = up


def _path_sums(parent: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For every node, the (uint32, wrapping) sum of ``values`` over the path from the node up
    to, but excluding, its root.  ``parent[i] < i`` for non-roots; ``values`` of roots are unused."""
    n = parent.size
    is_root = parent == np.arange(n)
    acc = np.where(is_root[:, None], np.uint32(0), values.astype(np.uint32))
    par = parent.copy()
    while True:
        up = par[par]
        if np.array_equal(up, par):
            return acc
        live = np.flatnonzero(up != par)
        acc[live] += acc[par[live]]
        par = up


# -- channel classes ----------------------------------------------------------------------

def _kmeans(hist: np.ndarray, groups: int, iters: int = 12) -> np.ndarray:
    """Cluster channels by their symbol histograms (assignment by code length)."""
    channels, k = hist.shape
    if groups <= 1 or channels <= 1:
        return np.zeros(channels, dtype=np.int64)
    mean = (hist * np.arange(k)).sum(1) / np.maximum(hist.sum(1), 1)
    assign = np.empty(channels, dtype=np.int64)
    assign[np.argsort(mean, kind="stable")] = np.arange(channels) * groups // channels
    for _ in range(iters):
        onehot = np.zeros((groups, channels))
        onehot[assign, np.arange(channels)] = 1.0
        sums = onehot @ hist
        probs = (sums + 0.05) / (sums + 0.05).sum(1, keepdims=True)
        new = np.argmin(-(hist @ np.log2(probs).T), axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
    return np.unique(assign, return_inverse=True)[1].astype(np.int64)


def _estimate_bits(counts: np.ndarray) -> float:
    """Entropy of every row of a [tables, K] histogram plus a rough table cost."""
    totals = counts.sum(1)
    c = counts[totals > 0].astype(np.float64)
    if not c.size:
        return 0.0
    n = c.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = np.where(c > 0, -c * np.log2(c / n), 0.0).sum()
    nonzero = c > 0
    first = nonzero.argmax(1)
    last = c.shape[1] - 1 - nonzero[:, ::-1].argmax(1)
    return float(ent + 8 * (3 + 1.4 * (last - first + 1)).sum())


def _neg_log2_probs(counts: np.ndarray, prior: float = 0.5) -> np.ndarray:
    c = counts.astype(np.float64) + prior
    return -np.log2(c / c.sum(-1, keepdims=True))


# -- row layout of the plain rows ----------------------------------------------------------

class _RowLayout:
    """Where every head's plain rows sit in the stacked [rows, dim] matrix, and their neighbours."""

    def __init__(self, counts: np.ndarray, dim: int):
        heads = counts.size
        self.dim = dim
        self.counts = counts
        self.nrows = int(counts.sum())
        self.row_head = np.repeat(np.arange(heads, dtype=np.int32), counts)
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        pos = np.arange(self.nrows) - self.starts[self.row_head]
        odd = (pos & 1) == 1
        self.odd_rows = np.flatnonzero(odd)
        self.even_rows = np.flatnonzero(~odd)
        self.prev = self.odd_rows - 1
        has_next = pos[self.odd_rows] + 1 < counts[self.row_head[self.odd_rows]]
        self.next = np.where(has_next, self.odd_rows + 1, self.odd_rows - 1)

    def channel_ids(self) -> np.ndarray:
        return self.row_head[:, None] * self.dim + np.arange(self.dim, dtype=np.int32)[None, :]

    def channel_max(self, values: np.ndarray) -> np.ndarray:
        out = np.zeros((self.counts.size, self.dim), dtype=values.dtype)
        used = np.flatnonzero(self.counts > 0)
        if used.size:
            out[used] = np.maximum.reduceat(values, self.starts[used], axis=0)
        return out


def _odd_context(dd: np.ndarray, sign: np.ndarray, lay: _RowLayout, nbuck: int) -> np.ndarray:
    """Context of the odd plain rows from their two even neighbours: depth bucket * 3 + sign sum."""
    p, n = lay.prev, lay.next
    near = np.minimum(np.minimum(dd[p], dd[n]), nbuck - 1)
    return near * SIGN_PAIRS + sign[p] + sign[n]


# -- the stage ----------------------------------------------------------------------------

@register
class LosslessFloatCoder(TensorCoder):
    """Bit-exact coder of float16 / bfloat16 / float32 bit patterns [kv_heads, tokens, head_dim]."""

    id = "lossless_float"
    params = {
        "mantissa_bits": (int, 2),       # top mantissa bits that are entropy-coded (the rest is raw)
        "max_classes": (int, 8),         # upper bound on channel classes (the encoder picks <=)
        "escape_depth": (int, 12),       # exponents this far below the channel max are stored raw
        "neighbour_buckets": (int, 3),   # depth buckets of the odd-row neighbour context
        "mantissa_contexts": (int, 3),   # depth contexts of the mantissa tables
        "residual_buckets": (int, 4),    # depth buckets of the matched-row residual tables
        "table_scale_bits": (int, 12),   # precision of the stored tables (counts sum <= 2**this)
        "match_window": (int, 1024),     # rows searched back for a matching row; 0 = no matching
        "dedup": (bool, True),           # store repeated token rows as references
    }
    _ranges = {
        "mantissa_bits": (0, MAX_MANTISSA_BITS),
        "max_classes": (1, MAX_CLASSES),
        "escape_depth": (1, 255),
        "neighbour_buckets": (1, MAX_BUCKETS),
        "mantissa_contexts": (1, MAX_BUCKETS),
        "residual_buckets": (1, MAX_BUCKETS),
        "table_scale_bits": (4, 16),
        "match_window": (0, 1 << 20),
    }

    def __init__(self, **kwargs):
        for name, value in kwargs.items():
            spec = self.params.get(name)
            if spec is None:
                continue  # the base class reports unknown options
            if spec[0] is bool:
                ok = isinstance(value, (bool, np.bool_))
            else:
                ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
            if not ok:
                raise ConfigError(f"stage {self.id!r}: option {name}={value!r} must be {spec[0].__name__}")
        super().__init__(**kwargs)

    def validate(self) -> None:
        for name, (lo, hi) in self._ranges.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ConfigError(f"lossless_float: {name} must be in [{lo}, {hi}], got {value}")

    @classmethod
    def from_config(cls, config: dict) -> "LosslessFloatCoder":
        if not isinstance(config, dict):
            raise ConfigError(f"lossless_float: config must be a dict, got {type(config).__name__}")
        return super().from_config(config)

    # == encode =================================================================================
    def encode(self, bits: np.ndarray, float_format: str) -> bytes:
        nb, eb, mb, dtype = _format(float_format)
        bits = np.asarray(bits)
        if bits.dtype != np.dtype(dtype) or bits.ndim != 3 or bits.shape[0] <= 0 or bits.shape[2] <= 0:
            raise EncodeError(
                f"lossless_float: {float_format} needs {np.dtype(dtype).name} bit patterns of shape "
                f"[kv_heads > 0, tokens, head_dim > 0], got {bits.dtype} {bits.shape}"
            )
        raw = bytes([MODE_RAW]) + bits.astype(bits.dtype.newbyteorder("<"), copy=False).tobytes()
        if bits.size == 0:
            return raw
        coded = self._encode_coded(np.ascontiguousarray(bits), nb, eb, mb)
        return coded if len(coded) < len(raw) else raw

    def _encode_coded(self, bits: np.ndarray, nb: int, eb: int, mb: int) -> bytes:
        heads, tokens, dim = bits.shape
        out = bytearray([MODE_CODED])

        # 1. exact duplicate rows
        section = bytearray()
        uniq_rows = []
        any_dedup = False
        for h in range(heads):
            keep, info = self._dedup_head(bits[h], nb) if self.dedup else (None, None)
            if keep is None:
                uniq_rows.append(bits[h].astype(np.uint32))
                write_uvarint(section, tokens)
            else:
                any_dedup = True
                uniq_rows.append(bits[h][keep].astype(np.uint32))
                write_uvarint(section, int(keep.size))
                section += info
        out.append(1 if any_dedup else 0)
        if any_dedup:
            out += section
        uniq = np.array([r.shape[0] for r in uniq_rows], dtype=np.int64)
        ustart = np.concatenate([[0], np.cumsum(uniq)[:-1]])
        allrows = np.concatenate(uniq_rows, axis=0) if heads > 1 else uniq_rows[0]     # [U, dim] uint32

        # 2. matched rows: parent[r] = global index of the reference row (itself when plain)
        ordered = _to_ordered(allrows, nb)
        parent = self._choose_matches(allrows, ordered, uniq, ustart, nb, eb, mb)
        matched = parent != np.arange(allrows.shape[0])

        # 3. plain rows
        plain_counts = np.array([int(np.count_nonzero(~matched[s:s + u])) for s, u in zip(ustart, uniq)])
        plain = allrows[~matched]
        plain_part, plain_dd, groups, assign, esc_depth, nbuck = self._encode_plain(plain, plain_counts, nb, eb, mb)

        # 4. matched rows: residuals against their reference rows
        k = min(self.mantissa_bits, mb)
        rbuck = self.residual_buckets
        resid_part = bytearray()
        if matched.any():
            out.append(1)
            for s, u in zip(ustart.tolist(), uniq.tolist()):
                out += pack_low_bits(matched[s:s + u].astype(np.uint32), 1)
            rows = np.flatnonzero(matched)
            dist = rows - parent[rows]
            dn = _bit_lengths(dist).astype(np.int64) - 1
            _write_stream(out, dn.astype(np.int32), self.table_scale_bits, _bit_length(tokens))
            _write_by_length(out, dn + 1, dist, _bit_length(tokens))
            resid_part = self._encode_residuals(ordered, uniq, parent, matched, plain_dd, assign, groups, rbuck, nb)
        else:
            out.append(0)
        out += bytes([k, esc_depth, groups, nbuck, self.mantissa_contexts, rbuck])
        out += plain_part
        out += resid_part
        return bytes(out)

    @staticmethod
    def _dedup_head(x: np.ndarray, nb: int):
        """(indices of the unique rows, dedup bytes) or (None, None) when not worth it."""
        tokens, dim = x.shape
        if tokens < 2:
            return None, None
        rows = np.ascontiguousarray(x).view(np.dtype((np.void, dim * x.itemsize))).ravel()
        _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        inverse = inverse.ravel()
        n_uniq = first.size
        dups = tokens - n_uniq
        width = _bit_length(n_uniq - 1)
        if dups == 0 or dups * dim * (nb // 2) <= tokens + dups * width:
            return None, None
        rank = np.empty(n_uniq, dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(n_uniq)
        is_dup = first[inverse] != np.arange(tokens)
        refs = rank[inverse[is_dup]]
        info = pack_low_bits(is_dup.astype(np.uint32), 1) + pack_low_bits(refs.astype(np.uint32), width)
        return np.sort(first), info

    def _choose_matches(self, rows: np.ndarray, ordered: np.ndarray, uniq, ustart, nb, eb, mb) -> np.ndarray:
        """Pick, per row, an earlier row of its head to code it against, where that is cheaper."""
        total, dim = rows.shape
        parent = np.arange(total)
        if self.match_window == 0 or total < 2:
            return parent
        k = min(self.mantissa_bits, mb)
        heads = uniq.size
        esc = self.escape_depth
        # estimated cost of every row when coded plain: a per-channel model of ds
        row_head = np.repeat(np.arange(heads, dtype=np.int32), uniq)
        expo = ((rows >> mb) & ((1 << eb) - 1)).astype(np.int32)
        emax = np.zeros((heads, dim), dtype=np.int32)
        for h in np.flatnonzero(uniq).tolist():
            emax[h] = expo[ustart[h]:ustart[h] + uniq[h]].max(0)
        dd = np.minimum(emax[row_head] - expo, esc)
        alpha = 2 * esc + 2
        chan = row_head[:, None] * dim + np.arange(dim, dtype=np.int32)[None, :]
        key = (chan * alpha + dd * 2 + (rows >> (nb - 1)).astype(np.int32)).ravel()
        cost = _neg_log2_probs(np.bincount(key, minlength=heads * dim * alpha).reshape(-1, alpha))
        cost[:, 2 * esc:] += eb                                   # escapes carry a raw exponent
        plain_row = cost.ravel()[key].reshape(total, dim).sum(1) + dim * ((mb - k) + 0.97 * k + 0.1)

        # best earlier row of the same head (nearest in the ordered image), and its residual
        cand = np.full(total, -1)
        for h in np.flatnonzero(uniq > 1).tolist():
            lo, hi = ustart[h], ustart[h] + uniq[h]
            cand[lo + 1:hi] = lo + self._nearest_earlier(ordered[lo:hi], nb)[1:]
        has = np.flatnonzero(cand >= 0)
        if not has.size:
            return parent
        mag, neg = _signed_diff(ordered[has], ordered[cand[has]], nb)
        n = _bit_lengths(mag).astype(np.int32)
        ralpha = 2 * nb + 2
        rkey = (np.minimum(dd[cand[has]], self.residual_buckets - 1) * ralpha + n * 2 + neg).ravel()
        raw_bits = np.maximum(n - 1, 0).sum(1)
        ref_bits = 2.0 * _bit_lengths(has - cand[has]) + 1.0
        # two rounds: model the residuals of all candidates, then of the rows that chose them
        use = np.ones(has.size, dtype=bool)
        for _ in range(2):
            sel = np.repeat(use, dim)
            rcost = _neg_log2_probs(np.bincount(rkey[sel], minlength=self.residual_buckets * ralpha)
                                    .reshape(-1, ralpha)).ravel()
            res_row = rcost[rkey].reshape(has.size, dim).sum(1) + raw_bits + ref_bits
            use = res_row + 8 < plain_row[has]
        parent[has[use]] = cand[has[use]]
        return parent

    def _nearest_earlier(self, ordered: np.ndarray, nb: int) -> np.ndarray:
        """For every row, the earlier row (within the window) nearest in squared distance."""
        x = ordered.astype(np.float64)
        x = ((x - x.mean(0)) * (2.0 ** (16 - nb))).astype(np.float32)   # centred: smaller rounding errors
        rows = x.shape[0]
        # distance up to a per-row constant: |c|^2 - 2 x.c, as one product of augmented matrices
        cand = np.concatenate([x, (x * x).sum(1, keepdims=True)], axis=1)
        query = np.concatenate([-2.0 * x, np.ones((rows, 1), dtype=np.float32)], axis=1)
        upper = np.triu(np.ones((SEARCH_BLOCK, SEARCH_BLOCK), dtype=bool))
        best = np.zeros(rows, dtype=np.int64)
        for t0 in range(1, rows, SEARCH_BLOCK):
            t1 = min(rows, t0 + SEARCH_BLOCK)
            n = t1 - t0
            near = query[t0:t1] @ cand[t0:t1].T            # candidates inside the block: earlier rows only
            near[upper[:n, :n]] = np.inf
            b = t0 + np.argmin(near, axis=1)
            v = near[np.arange(n), b - t0]
            c0 = max(0, t0 - self.match_window)
            if c0 < t0:
                far = query[t0:t1] @ cand[c0:t0].T
                bf = np.argmin(far, axis=1)
                vf = far[np.arange(n), bf]
                b = np.where(vf <= v, c0 + bf, b)
            best[t0:t1] = b
        best[0] = 0
        return best

    def _encode_plain(self, v: np.ndarray, counts: np.ndarray, nb: int, eb: int, mb: int):
        """Bytes of the plain rows [R, dim] (uint32), plus what the residual coder reuses."""
        heads = counts.size
        dim = v.shape[1]
        k = min(self.mantissa_bits, mb)
        out = bytearray()
        lay = _RowLayout(counts, dim)
        sign = (v >> (nb - 1)).astype(np.uint8)
        expo = ((v >> mb) & ((1 << eb) - 1)).astype(np.int16)
        emax = lay.channel_max(expo)                                      # [heads, dim]
        depth = emax[lay.row_head] - expo
        esc_depth = int(min(self.escape_depth, int(depth.max()) + 1)) if depth.size else 1
        dd = np.minimum(depth, esc_depth).astype(np.uint8)
        ds = dd.astype(np.uint16) * 2 + sign
        ds_alpha = 2 * esc_depth + 2

        # context slot of every element: 0 for even rows, 1 + neighbour context for odd rows
        nbuck = self.neighbour_buckets
        nslots = 1 + SIGN_PAIRS * nbuck
        slot = np.zeros(ds.shape, dtype=np.uint8)
        slot[lay.odd_rows] = 1 + _odd_context(dd, sign, lay, nbuck)

        # channel classes: the count that minimises the estimated size
        nchan = heads * dim
        chan = lay.channel_ids()
        if nchan * nslots * ds_alpha <= (1 << 22):
            hist3 = np.bincount(((chan * nslots + slot) * ds_alpha + ds).ravel(),
                                minlength=nchan * nslots * ds_alpha).reshape(nchan, nslots * ds_alpha)
        else:  # too many bins: estimate without the neighbour contexts
            hist3 = np.bincount((chan * ds_alpha + ds).ravel(), minlength=nchan * ds_alpha).reshape(nchan, ds_alpha)
        hist = hist3.reshape(nchan, -1, ds_alpha).sum(1).astype(np.float64)
        best = None
        for groups in CLASS_CANDIDATES:
            if groups > self.max_classes or groups > nchan:
                break
            assign = _kmeans(hist, groups)
            g = int(assign.max()) + 1
            if best is not None and g <= best[0]:
                continue
            onehot = np.zeros((g, nchan))
            onehot[assign, np.arange(nchan)] = 1.0
            est = _estimate_bits((onehot @ hist3).reshape(-1, ds_alpha)) + nchan * _bit_length(g - 1)
            if hist3.shape[1] == ds_alpha:
                est += 8 * 3 * g * (nslots - 1)
            if best is None or est < best[1]:
                best = (g, est, assign)
        groups, _, assign = best

        out += pack_low_bits(emax.ravel(), eb)
        out += pack_low_bits(assign, _bit_length(groups - 1))
        # sign + depth symbols, every used table in index order (the even rows' tables come first)
        scale = self.table_scale_bits
        _write_grouped(out, slot.astype(np.uint16) * groups + assign.astype(np.uint16)[chan], ds,
                       groups * nslots, scale, ds_alpha)
        # escaped exponents, raw
        out += pack_low_bits(expo[dd == esc_depth], eb)
        # top mantissa bits by depth context, then the raw low bits
        if k:
            mt = ((v >> (mb - k)) & ((1 << k) - 1)).astype(np.uint8)
            _write_grouped(out, np.minimum(depth, self.mantissa_contexts - 1).astype(np.uint8), mt,
                           self.mantissa_contexts, scale, 1 << k)
        out += pack_low_bits(v & np.uint32((1 << (mb - k)) - 1), mb - k)
        return out, dd, groups, assign, esc_depth, nbuck

    def _encode_residuals(self, ordered, uniq, parent, matched, plain_dd, assign, groups, rbuck, nb) -> bytearray:
        out = bytearray()
        dim = ordered.shape[1]
        mrows = np.flatnonzero(matched)
        mag, neg = _signed_diff(ordered[mrows], ordered[parent[mrows]], nb)
        n = _bit_lengths(mag)
        rsym = n.astype(np.uint16) * 2 + neg
        row_head = np.repeat(np.arange(uniq.size), uniq)
        tidx = self._residual_tables(parent, matched, mrows, row_head, plain_dd, assign, groups, rbuck, dim)
        _write_grouped(out, tidx, rsym, groups * rbuck, self.table_scale_bits, 2 * nb + 2)
        _write_by_length(out, n.ravel(), mag.ravel(), nb)
        return out

    @staticmethod
    def _residual_tables(parent, matched, mrows, row_head, plain_dd, assign, groups, rbuck, dim):
        """Table of every matched element: (depth bucket of its root plain row) * groups + class."""
        root = _roots(parent)
        plain_index = np.cumsum(~matched) - 1                 # global row -> plain row
        root_dd = plain_dd[plain_index[root[mrows]]]          # [M, dim]
        chan = row_head[mrows][:, None] * dim + np.arange(dim)[None, :]
        return np.minimum(root_dd, rbuck - 1).astype(np.uint16) * groups + assign.astype(np.uint16)[chan]

    # == decode =================================================================================
    def decode(self, data, float_format: str, shape: tuple[int, ...]) -> np.ndarray:
        nb, eb, mb, dtype = _format(float_format)
        heads, tokens, dim = _check_shape(shape)
        reader = Reader(data, what="lossless_float")
        mode = reader.u8()
        if mode == MODE_RAW:
            arr = reader.array(np.dtype(dtype), heads * tokens * dim)
            reader.expect_end()
            return arr.astype(dtype, copy=False).reshape(heads, tokens, dim)
        if mode != MODE_CODED:
            raise FormatError(f"lossless_float: unknown mode {mode}")
        if tokens == 0:
            raise FormatError("lossless_float: coded mode with no tokens")
        out = self._decode_coded(reader, nb, eb, mb, heads, tokens, dim)
        reader.expect_end()
        return out.astype(dtype)

    def _decode_coded(self, reader: Reader, nb, eb, mb, heads, tokens, dim) -> np.ndarray:
        # 1. exact duplicate rows
        flag = reader.u8()
        if flag > 1:
            raise FormatError("lossless_float: bad dedup flag")
        uniq = np.full(heads, tokens, dtype=np.int64)
        maps = [None] * heads
        if flag:
            for h in range(heads):
                n_uniq = reader.uvarint(max_value=tokens)
                uniq[h] = n_uniq
                if n_uniq == tokens:
                    continue
                if n_uniq == 0:
                    raise FormatError("lossless_float: a head with tokens but no unique rows")
                is_dup = _read_packed(reader, 1, tokens).astype(bool)
                dups = tokens - n_uniq
                if int(np.count_nonzero(is_dup)) != dups:
                    raise FormatError("lossless_float: dedup flags do not match the unique row count")
                refs = _read_packed(reader, _bit_length(n_uniq - 1), dups).astype(np.int64)
                new = (~is_dup).astype(np.int64)
                seen = np.cumsum(new)                 # unique rows up to and including each token
                if np.any(refs >= (seen - new)[is_dup]):
                    raise FormatError("lossless_float: dedup reference to a row not seen yet")
                row_map = seen - 1
                row_map[is_dup] = refs
                maps[h] = row_map
        ustart = np.concatenate([[0], np.cumsum(uniq)[:-1]])
        total = int(uniq.sum())
        row_head = np.repeat(np.arange(heads), uniq)

        # 2. matched rows and their references
        parent = np.arange(total)
        matched = np.zeros(total, dtype=bool)
        mflag = reader.u8()
        if mflag > 1:
            raise FormatError("lossless_float: bad match flag")
        if mflag:
            for h in range(heads):
                matched[ustart[h]:ustart[h] + uniq[h]] = _read_packed(reader, 1, int(uniq[h])).astype(bool)
            mrows = np.flatnonzero(matched)
            if not mrows.size:
                raise FormatError("lossless_float: match section without matched rows")
            width = _bit_length(tokens)
            dn = _read_stream(reader, mrows.size, width).astype(np.int64)
            dist = _read_by_length(reader, dn + 1, width)
            if np.any(dist > mrows - ustart[row_head[mrows]]):
                raise FormatError("lossless_float: match reference before the start of its head")
            parent[mrows] = mrows - dist

        # 3. header
        k, esc_depth, groups, nbuck, mctx_n, rbuck = reader.unpack("<6B")
        if k > min(MAX_MANTISSA_BITS, mb) or esc_depth < 1 or not 1 <= groups <= MAX_CLASSES \
                or not 1 <= nbuck <= MAX_BUCKETS or not 1 <= mctx_n <= MAX_BUCKETS or not 1 <= rbuck <= MAX_BUCKETS:
            raise FormatError("lossless_float: header field out of range")

        # 4. plain rows
        plain_counts = uniq - np.bincount(row_head[matched], minlength=heads)
        plain, plain_dd, assign = self._decode_plain(reader, plain_counts, dim, nb, eb, mb,
                                                     k, esc_depth, groups, nbuck, mctx_n)
        values = np.empty((total, dim), dtype=np.uint32)
        values[~matched] = plain

        # 5. matched rows: residuals summed along the reference chains, in the ordered image
        if mflag:
            mrows = np.flatnonzero(matched)
            tidx = self._residual_tables(parent, matched, mrows, row_head, plain_dd, assign, groups, rbuck, dim)
            rsym = _read_grouped(reader, tidx, groups * rbuck, 2 * nb + 2).astype(np.int64)
            n = rsym >> 1
            neg = (rsym & 1).astype(bool)
            if np.any(neg & (n == 0)):
                raise FormatError("lossless_float: negative zero residual")
            mag = _read_by_length(reader, n.ravel(), nb).reshape(n.shape)
            # the rows of a chain are consecutive references: sum the residuals down to the root
            sub = np.searchsorted(mrows, parent[mrows])       # position of each parent among mrows
            sub_parent = np.where(matched[parent[mrows]], sub, np.arange(mrows.size))
            step = (np.where(neg, -mag, mag) & ((1 << nb) - 1)).astype(np.uint32)
            acc = _path_sums(sub_parent, step) + step[_roots(sub_parent)]   # + the chain's top row
            root = _roots(parent)[mrows]
            ordered = _to_ordered(values[root], nb) + acc
            if nb < 32:
                ordered &= np.uint32((1 << nb) - 1)
            values[mrows] = _from_ordered(ordered, nb)

        out = np.empty((heads, tokens, dim), dtype=np.uint32)
        for h in range(heads):
            block = values[ustart[h]:ustart[h] + uniq[h]]
            out[h] = block if maps[h] is None else block[maps[h]]
        return out

    @staticmethod
    def _decode_plain(reader: Reader, counts, dim, nb, eb, mb, k, esc_depth, groups, nbuck, mctx_n):
        heads = counts.size
        ds_alpha = 2 * esc_depth + 2
        nslots = 1 + SIGN_PAIRS * nbuck
        emax = _read_packed(reader, eb, heads * dim).astype(np.int16).reshape(heads, dim)
        assign = _read_packed(reader, _bit_length(groups - 1), heads * dim)
        if int(assign.max()) >= groups:
            raise FormatError("lossless_float: channel class out of range")
        lay = _RowLayout(counts, dim)
        cls = assign.astype(np.uint16)[lay.channel_ids()]             # [R, dim]

        # sign + depth symbols: even rows (class tables), then odd rows (neighbour contexts)
        ds = np.empty(cls.shape, dtype=np.uint16)
        ds[lay.even_rows] = _read_grouped(reader, cls[lay.even_rows], groups, ds_alpha)
        sign = (ds & 1).astype(np.uint8)
        dd = (ds >> 1).astype(np.uint8)
        if lay.odd_rows.size:
            slot = 1 + _odd_context(dd, sign, lay, nbuck).astype(np.uint16)
            odd_ds = _read_grouped(reader, slot * groups + cls[lay.odd_rows], groups * nslots, ds_alpha)
            sign[lay.odd_rows] = odd_ds & 1
            dd[lay.odd_rows] = odd_ds >> 1

        # exponents (escaped ones raw)
        ech = emax[lay.row_head]
        expo = ech - dd
        esc = dd == esc_depth
        n_esc = int(np.count_nonzero(esc))
        esc_expo = _read_packed(reader, eb, n_esc).astype(np.int16)
        if n_esc:
            if np.any(esc_expo > ech[esc] - esc_depth):
                raise FormatError("lossless_float: escaped exponent is not below the escape depth")
            expo[esc] = esc_expo
        if np.any(expo < 0):
            raise FormatError("lossless_float: exponent depth below zero")

        # top mantissa bits, raw low bits
        value = (sign.astype(np.uint32) << (nb - 1)) | (expo.astype(np.uint32) << mb)
        if k:
            mctx = np.minimum(ech - expo, mctx_n - 1).astype(np.uint8)
            value |= _read_grouped(reader, mctx, mctx_n, 1 << k).astype(np.uint32) << (mb - k)
        value |= _read_packed(reader, mb - k, value.size).reshape(value.shape)
        return value, dd, assign
