"""Static-model ANS coding of integer symbols, on top of constriction.

A *table* is a probability model over a contiguous alphabet ``[lo, lo + K)``
given as integer frequencies that sum to ``2**TABLE_BITS`` (every entry >= 1).
Because the table is exactly representable, constriction's ``Categorical``
model with ``perfect=True`` reproduces it bit for bit, so the bytes written
here are fully specified by docs/format.md ("ANS stream"), and the Cython
decoder in ``seqkv_ext`` can decode them without constriction, much faster
(``seqkv_ext.ans_encode`` writes the same words as constriction, also faster).

Words are constriction's ``AnsCoder`` words: uint32, 24-bit precision,
64-bit state; the table frequencies are scaled by ``2**(24 - TABLE_BITS)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

from .errors import FormatError
from .wire import Reader, write_uvarint, zigzag

TABLE_BITS = 16
TABLE_TOTAL = 1 << TABLE_BITS
CODER_PRECISION = 24
MAX_ALPHABET = 4096  # larger alphabets are split into a coded high part and raw low bits

try:  # the fast decoder; constriction is the reference and the fallback
    from seqkv_ext import ans as _ext_ans
except ImportError:  # pragma: no cover - the extension is built by `pip install`
    _ext_ans = None
try:  # the fast encoder, word for word equal to constriction's
    from seqkv_ext import ans_encode as _ext_ans_encode
except ImportError:  # pragma: no cover
    _ext_ans_encode = None


@dataclass(frozen=True)
class FreqTable:
    """Integer frequencies over symbols ``lo .. lo + len(freqs) - 1``."""

    lo: int
    freqs: np.ndarray  # uint32, sum == TABLE_TOTAL, all >= 1

    @property
    def size(self) -> int:
        return len(self.freqs)

    def bits_for(self, counts: np.ndarray) -> float:
        """Ideal code length in bits of symbols with these per-symbol counts."""
        return float(-(counts * (np.log2(self.freqs) - TABLE_BITS)).sum())


def table_from_counts(lo: int, counts: np.ndarray) -> FreqTable:
    """Quantize a histogram to a table summing to ``TABLE_TOTAL``, every entry >= 1."""
    counts = np.asarray(counts, dtype=np.float64)
    k = len(counts)
    if k < 2:  # constriction cannot represent a one-symbol alphabet; pad with a dummy symbol
        counts = np.concatenate([counts, [0.0]])
        k = 2
    if k > TABLE_TOTAL // 2:
        raise ValueError(f"alphabet of {k} symbols is too large for a {TABLE_BITS}-bit table")
    total = counts.sum()
    spare = TABLE_TOTAL - k
    if total <= 0:
        freqs = np.ones(k, dtype=np.int64)
        freqs[0] += spare
    else:
        freqs = 1 + np.floor(counts * (spare / total)).astype(np.int64)
        # hand out the rounding remainder to the largest fractional parts (deterministic order)
        short = TABLE_TOTAL - int(freqs.sum())
        if short:
            frac = counts * (spare / total) - np.floor(counts * (spare / total))
            order = np.argsort(-frac, kind="stable")[:short]
            freqs[order] += 1
    return FreqTable(int(lo), freqs.astype(np.uint32))


def table_from_symbols(symbols: np.ndarray) -> FreqTable:
    if symbols.size == 0:
        return table_from_counts(0, np.ones(2))
    lo = int(symbols.min())
    counts = np.bincount((symbols - lo).ravel().astype(np.int64))
    return table_from_counts(lo, counts)


def write_table(out: bytearray, table: FreqTable) -> None:
    """Table bytes: zigzag varint lo, varint K, then K varints (freq - 1)."""
    write_uvarint(out, zigzag(table.lo))
    write_uvarint(out, table.size)
    for f in table.freqs.tolist():
        write_uvarint(out, f - 1)


def read_table(reader: Reader) -> FreqTable:
    lo = reader.svarint(max_abs=1 << 40)
    k = reader.uvarint(max_value=TABLE_TOTAL // 2)
    if k < 2:
        raise FormatError(f"{reader.what}: entropy table with {k} symbols (need >= 2)")
    freqs = (reader.uvarint_array(k, max_value=TABLE_TOTAL - 1) + 1).astype(np.uint32)
    if int(freqs.sum(dtype=np.uint64)) != TABLE_TOTAL:
        raise FormatError(f"{reader.what}: entropy table does not sum to 2**{TABLE_BITS}")
    return FreqTable(lo, freqs)


def _model(table: FreqTable):
    return constriction.stream.model.Categorical(
        table.freqs.astype(np.float64) / TABLE_TOTAL, perfect=True
    )


def encode_symbols(symbols: np.ndarray, table: FreqTable, *, use_ext: bool = True) -> np.ndarray:
    """ANS-encode ``symbols`` (all inside the table's alphabet); returns uint32 words."""
    idx = np.asarray(symbols).ravel().astype(np.int64) - table.lo  # checked before narrowing: no wrap-around
    if idx.size and (idx.min() < 0 or idx.max() >= table.size):
        raise ValueError("symbol outside the table's alphabet")
    return _encode_indices(idx.astype(np.int32), table, use_ext)


def table_and_words(symbols: np.ndarray) -> tuple[FreqTable, np.ndarray]:
    """The table of ``symbols``' own histogram and their ANS words: :func:`table_from_symbols` then
    :func:`encode_symbols`, with one pass over the symbols fewer (the encoder's usual pair)."""
    symbols = np.asarray(symbols).ravel()
    if symbols.size == 0:
        table = table_from_symbols(symbols)
        return table, encode_symbols(symbols, table)
    lo = int(symbols.min())
    idx = symbols.astype(np.int64, copy=False) - lo
    table = table_from_counts(lo, np.bincount(idx))  # raises for an alphabet too large for a table
    return table, _encode_indices(idx.astype(np.int32), table, True)


def _encode_indices(idx: np.ndarray, table: FreqTable, use_ext: bool) -> np.ndarray:
    """int32 alphabet indices, all in [0, K) -> the ANS words."""
    if use_ext and _ext_ans_encode is not None:
        return _ext_ans_encode.encode(idx, table.freqs, CODER_PRECISION - TABLE_BITS)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(idx, _model(table))
    return coder.get_compressed().astype(np.uint32)


def decode_symbols(words: np.ndarray, table: FreqTable, count: int, *, use_ext: bool = True) -> np.ndarray:
    """Decode ``count`` symbols; raises FormatError unless the stream ends exactly.

    An ANS stream written by :func:`encode_symbols` starts from state 0, so a
    correct decode must end with every word consumed and the state back at 0:
    that check catches corrupted streams that the checksums did not.
    """
    words = np.ascontiguousarray(words, dtype=np.uint32)
    if use_ext and _ext_ans is not None:
        idx, clean = _ext_ans.decode(words, table.freqs, count, CODER_PRECISION - TABLE_BITS)
    else:
        try:
            coder = constriction.stream.stack.AnsCoder(words)
            idx = coder.decode(_model(table), count) if count else np.zeros(0, np.int32)
        except Exception as exc:  # constriction reports exhausted/invalid streams as generic errors
            raise FormatError(f"ANS stream is invalid: {exc}") from None
        clean = coder.is_empty()
    _check_clean(clean)
    return idx.astype(np.int32) + np.int32(table.lo)


def _check_clean(clean: bool) -> None:
    if not clean:
        raise FormatError("ANS stream did not end cleanly (corrupted or mismatched data)")


def decode_symbols_into_rows(words: np.ndarray, table: FreqTable, out: np.ndarray, rows: np.ndarray,
                             offsets: np.ndarray) -> np.ndarray:
    """Decode ``len(rows) * out.shape[1]`` symbols into ``out[rows[i]]`` (int32 [N, T], C-contiguous),
    adding ``offsets[i]`` to row ``i``: :func:`decode_symbols`, its checks, and the scatter in one pass.
    The caller has checked that the sums fit in int32.  Returns the histogram of the decoded alphabet
    indices (int64 [K]), for :func:`check_table_is_histogram`."""
    if _ext_ans is None:
        symbols = decode_symbols(words, table, rows.size * out.shape[1]).reshape(rows.size, out.shape[1])
        out[rows] = symbols + offsets[:, None].astype(np.int32)
        return np.bincount((symbols - np.int32(table.lo)).ravel(), minlength=table.size).astype(np.int64)
    # the extension adds the alphabet's start and the row's offset in one, and counts the indices
    hist = np.empty(table.size, dtype=np.int64)
    _check_clean(_ext_ans.decode_rows(np.ascontiguousarray(words, dtype=np.uint32), table.freqs,
                                      CODER_PRECISION - TABLE_BITS, out, rows.astype(np.int64, copy=False),
                                      offsets.astype(np.int64) + table.lo, hist))
    return hist


def check_table_is_histogram(table: FreqTable, hist: np.ndarray, what: str) -> None:
    """The cross-check between a stream's symbol count and its bytes (docs/format.md §6.3): the table of a
    ``context_ans`` class is the §7.3 quantisation of the histogram of the symbols it codes, over exactly the
    range they span (``lo`` their minimum, ``lo + K - 1`` their maximum, or ``K = 2`` when they are all
    ``lo``).  An ANS stream decodes any number of extra ``lo`` symbols after its words run out, cleanly
    (§7.2), so a count larger than the encoder's shows here, unless every symbol is the same.
    ``hist``: the count of each alphabet index among the decoded symbols (at least one symbol)."""
    spans = hist[0] > 0 and (hist[-1] > 0 or (table.size == 2 and hist[1] == 0))
    if not spans or not np.array_equal(table_from_counts(table.lo, hist).freqs, table.freqs):
        raise FormatError(f"{what}: the entropy table is not the histogram of the symbols it codes "
                          "(a token count that does not match the section?)")
