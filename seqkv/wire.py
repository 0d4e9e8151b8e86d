"""Bounded little-endian reading and writing of the primitives the container uses.

Every read checks its bounds first and raises :class:`FormatError`, so a
truncated or corrupted byte string can never index out of range.
"""
from __future__ import annotations

import struct

import numpy as np

from .errors import FormatError

try:  # compiled decoding of varint arrays; the numpy version below is the reference and the fallback
    from seqkv_ext.varint import decode_uvarints as _ext_uvarints
except ImportError:  # pragma: no cover - the extension is built by `pip install`
    _ext_uvarints = None


def write_uvarint(out: bytearray, value: int) -> None:
    """Append ``value`` (>= 0) as an unsigned LEB128 varint."""
    if value < 0:
        raise ValueError("uvarint must be non-negative")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def zigzag(value: int) -> int:
    return (value << 1) if value >= 0 else ((-value << 1) - 1)


def unzigzag(value: int) -> int:
    return (value >> 1) if not value & 1 else -((value + 1) >> 1)


class Reader:
    """A cursor over a bytes-like object whose every read is bounds-checked."""

    def __init__(self, data, start: int = 0, end: int | None = None, what: str = "data"):
        self.buf = memoryview(data).cast("B")
        self.pos = start
        self.end = len(self.buf) if end is None else end
        self.what = what

    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise FormatError(
                f"{self.what}: truncated (needs {n} more bytes at offset {self.pos}, "
                f"{self.end - self.pos} left)"
            )

    def bytes(self, n: int) -> bytes:
        self._need(n)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def array(self, dtype, count: int) -> np.ndarray:
        """Read ``count`` little-endian items of ``dtype`` (a copy, aligned)."""
        dt = np.dtype(dtype).newbyteorder("<")
        self._need(count * dt.itemsize)
        arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).astype(dt.newbyteorder("="))
        self.pos += count * dt.itemsize
        return arr

    def u8(self) -> int:
        self._need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self._need(size)
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return vals

    def uvarint(self, max_value: int = (1 << 63) - 1) -> int:
        result = 0
        shift = 0
        while True:
            if shift > 63:
                raise FormatError(f"{self.what}: varint longer than 64 bits at offset {self.pos}")
            b = self.u8()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
        if result > max_value:
            raise FormatError(f"{self.what}: value {result} exceeds its bound {max_value}")
        return result

    def uvarint_array(self, count: int, max_value: int = (1 << 63) - 1) -> np.ndarray:
        """``count`` consecutive uvarints (int64), decoded by seqkv_ext.varint (numpy without the extension)."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        if _ext_uvarints is None:
            values, used = self._uvarint_array_numpy(count)
        else:
            values, status, used = _ext_uvarints(self.buf, self.pos, self.end, count)
            if status == 1:
                raise FormatError(f"{self.what}: truncated varint array ({used} of {count} values)")
            if status == 2:
                raise FormatError(f"{self.what}: varint longer than 63 bits")
        if int(values.max()) > max_value:
            raise FormatError(f"{self.what}: value exceeds its bound {max_value}")
        self.pos += used
        return values

    def _uvarint_array_numpy(self, count: int) -> tuple[np.ndarray, int]:
        window = np.frombuffer(self.buf, dtype=np.uint8, count=min(self.end - self.pos, 10 * count), offset=self.pos)
        ends = np.flatnonzero(window < 0x80)[:count]
        if len(ends) < count:
            raise FormatError(f"{self.what}: truncated varint array ({len(ends)} of {count} values)")
        starts = np.empty(count, dtype=np.int64)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        if int((ends - starts).max()) >= 9:
            raise FormatError(f"{self.what}: varint longer than 63 bits")
        used = window[: int(ends[-1]) + 1].astype(np.int64)
        group = np.repeat(np.arange(count), ends - starts + 1)
        shift = 7 * (np.arange(len(used)) - starts[group])
        values = np.zeros(count, dtype=np.int64)
        np.add.at(values, group, (used & 0x7F) << shift)
        return values, len(used)

    def svarint_array(self, count: int) -> np.ndarray:
        u = self.uvarint_array(count)
        return np.where(u & 1, -((u + 1) >> 1), u >> 1)

    def svarint(self, max_abs: int = (1 << 62)) -> int:
        v = unzigzag(self.uvarint())
        if abs(v) > max_abs:
            raise FormatError(f"{self.what}: value {v} exceeds its bound {max_abs}")
        return v

    def expect_end(self) -> None:
        if self.pos != self.end:
            raise FormatError(f"{self.what}: {self.end - self.pos} unexpected trailing bytes")
