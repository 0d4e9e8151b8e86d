"""Entropy stage: ANS coding of quantized symbols with per-channel-class contexts.

Channels differ a lot in offset and spread (pre-RoPE keys especially), so
each (head, channel) is first centred on its own rounded mean, then assigned
a context from the spread of its symbols (a quarter-octave class); all
channels of one class share one frequency table.  This gets within a few
percent of per-channel entropy while storing only a few tables per tensor.

Section bytes (see docs/format.md, "context_ans"): the offset and class of
every channel, then per used class: the low-bit shift, the table, the ANS
words and the raw low bits.
"""
from __future__ import annotations

import numpy as np

from ..ans_coding import (
    MAX_ALPHABET, check_table_is_histogram, decode_symbols, decode_symbols_into_rows, read_table, table_and_words,
    write_table,
)
from ..bitpacking import pack_low_bits, unpack_low_bits
from ..errors import ConfigError, FormatError
from ..wire import Reader, write_uvarint, zigzag
from .base import SymbolCoder, register

try:  # the encoder's per-channel pass; numpy below is the reference and the fallback
    from seqkv_ext import channels as _ext_channels
except ImportError:  # pragma: no cover - the extension is built by `pip install`
    _ext_channels = None
try:  # a section decoded in one call; decode_section below is the reference and the fallback
    from seqkv_ext import context_sections as _ext_sections
except ImportError:  # pragma: no cover
    _ext_sections = None

MAX_CLASSES = 64


def _shift_for(symbols: np.ndarray) -> int:
    """Smallest right shift that brings the alphabet within MAX_ALPHABET symbols."""
    if symbols.size == 0:
        return 0
    lo, hi = int(symbols.min()), int(symbols.max())
    shift = 0
    while (hi >> shift) - (lo >> shift) + 1 > MAX_ALPHABET:
        shift += 1
    return shift


@register
class ContextANS(SymbolCoder):
    id = "context_ans"
    params = {"classes_per_octave": (int, 4)}

    def validate(self) -> None:
        if not 1 <= self.classes_per_octave <= 8:
            raise ConfigError(f"context_ans: classes_per_octave must be in [1, 8], got {self.classes_per_octave}")

    def channel_classes(self, spread: np.ndarray) -> np.ndarray:
        """Each channel's context class from the spread (standard deviation) of its centred symbols."""
        cls = np.floor(self.classes_per_octave * np.log2(1.0 + spread))
        return np.clip(cls, 0, MAX_CLASSES - 1).astype(np.uint8)

    @staticmethod
    def centred_channels(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q [H, T, D] -> (symbols int64 [H*D, T] centred on each channel's rounded mean, the offsets, the spreads)."""
        heads, tokens, dim = q.shape
        rows = q.transpose(0, 2, 1).reshape(heads * dim, tokens)
        if _ext_channels is not None and rows.dtype == np.int32 and tokens <= _ext_channels.MAX_TOKENS:
            return _ext_channels.center_rows(rows)  # one compiled pass per channel
        columns = rows.astype(np.int64)
        offsets = np.round(columns.mean(axis=1)).astype(np.int64) if tokens else np.zeros(heads * dim, np.int64)
        columns -= offsets[:, None]
        spread = columns.astype(np.float64).std(axis=1) if tokens else np.zeros(heads * dim)
        return columns, offsets, spread

    def encode(self, q: np.ndarray) -> bytes:
        """q: int32 [H, T, D] -> bytes."""
        columns, offsets, spread = self.centred_channels(q)
        classes = self.channel_classes(spread)
        out = bytearray()
        for off in offsets.tolist():
            write_uvarint(out, zigzag(off))
        out += classes.tobytes()
        for c in np.unique(classes).tolist():
            symbols = columns[classes == c].ravel()
            shift = _shift_for(symbols)
            table, words = table_and_words(symbols >> shift if shift else symbols)
            out.append(shift)
            write_table(out, table)
            write_uvarint(out, len(words))
            out += words.astype("<u4").tobytes()
            if shift:
                out += pack_low_bits((symbols & ((1 << shift) - 1)).astype(np.uint32), shift)
        return bytes(out)

    def decode(self, reader: Reader, shape: tuple[int, int, int]) -> np.ndarray:
        heads, tokens, dim = shape
        if _ext_sections is None:
            columns = decode_section(reader, heads * dim, tokens)
        else:  # the whole section in one compiled call: the same bytes, the same checks
            try:
                columns, reader.pos = _ext_sections.decode_section(reader.buf, reader.pos, reader.end, heads * dim,
                                                                   tokens, MAX_CLASSES)
            except _ext_sections.StreamError as exc:
                raise FormatError(f"{reader.what}: {exc}") from None
        # a transposed view: the caller's dequantization copies it into [H, T, D] order anyway
        return columns.reshape(heads, dim, tokens).transpose(0, 2, 1)


def decode_section(reader: Reader, channels: int, tokens: int) -> np.ndarray:
    """A section's channel offsets, classes and class streams -> int32 [channels, tokens]: the reference for
    (and the fallback without) ``seqkv_ext.context_sections.decode_section``, one class at a time."""
    offsets = reader.svarint_array(channels)
    if offsets.size and np.abs(offsets).max() > 1 << 31:
        raise FormatError(f"{reader.what}: channel offset out of range")
    classes = np.frombuffer(reader.bytes(channels), dtype=np.uint8)
    if classes.size and classes.max() >= MAX_CLASSES:
        raise FormatError(f"{reader.what}: channel class out of range")
    columns = np.empty((channels, tokens), dtype=np.int32)
    for c in np.unique(classes).tolist():
        rows = np.flatnonzero(classes == c)
        count = rows.size * tokens
        shift = reader.u8()
        if shift > 31:
            raise FormatError(f"{reader.what}: low-bit shift {shift} out of range")
        table = read_table(reader)
        # every decoded value lies in [lo << shift, (lo + K) << shift) + offset: check int32 room once
        lo, hi = table.lo << shift, (table.lo + table.size) << shift
        if lo + int(offsets[rows].min()) < -(1 << 31) or hi + int(offsets[rows].max()) > (1 << 31):
            raise FormatError(f"{reader.what}: decoded symbols would overflow int32")
        # a symbol costs at most 16 bits (the smallest frequency is 2**-16), the final state 64: the words
        # of a stream any encoder writes are bounded by its symbol count (§6.3)
        n_words = reader.uvarint(max_value=min(count // 2 + 3, reader.remaining() // 4))
        words = reader.array("<u4", n_words)
        if not shift:  # the usual case: decoded straight into place
            hist = decode_symbols_into_rows(words, table, columns, rows, offsets[rows])
            if count:
                check_table_is_histogram(table, hist, f"{reader.what}: class {c}")
            continue
        low_bytes = reader.bytes((count * shift + 7) // 8)  # present before anything is decoded
        symbols = decode_symbols(words, table, count).reshape(rows.size, tokens)
        if count:
            hist = np.bincount((symbols - np.int32(table.lo)).ravel(), minlength=table.size)
            check_table_is_histogram(table, hist, f"{reader.what}: class {c}")
        low = unpack_low_bits(low_bytes, shift, count)
        symbols = (symbols.astype(np.int64) << shift | low.reshape(rows.size, tokens)).astype(np.int32)
        symbols += offsets[rows, None].astype(np.int32)
        columns[rows] = symbols
    return columns
