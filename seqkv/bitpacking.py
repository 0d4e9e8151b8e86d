"""Dense packing of the low bits of integers (LSB-first), via seqkv_ext when built."""
from __future__ import annotations

import numpy as np

from .errors import FormatError

try:
    from seqkv_ext import bitpack as _ext
except ImportError:  # pragma: no cover - the extension is built by `pip install`
    _ext = None


def pack_low_bits(values: np.ndarray, nbits: int) -> bytes:
    values = np.ascontiguousarray(values.ravel(), dtype=np.uint32)
    if nbits == 0 or values.size == 0:
        return b""
    if _ext is not None:
        return _ext.pack_low_bits(values, nbits).tobytes()
    bits = ((values[:, None] >> np.arange(nbits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def unpack_low_bits(buf: bytes, nbits: int, count: int) -> np.ndarray:
    need = (count * nbits + 7) // 8
    if len(buf) < need:
        raise FormatError(f"packed bits truncated: {len(buf)} bytes, need {need}")
    if nbits == 0 or count == 0:
        return np.zeros(count, dtype=np.uint32)
    arr = np.frombuffer(buf, dtype=np.uint8, count=need)
    if _ext is not None:
        return _ext.unpack_low_bits(arr, nbits, count)
    bits = np.unpackbits(arr, bitorder="little")[: count * nbits].reshape(count, nbits).astype(np.uint32)
    return (bits << np.arange(nbits, dtype=np.uint32)).sum(1, dtype=np.uint32)
