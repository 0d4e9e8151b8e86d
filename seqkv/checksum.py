"""CRC-32C (Castagnoli) of byte strings, via seqkv_ext's slicing-by-8 loop."""
from __future__ import annotations

try:
    from seqkv_ext.crc32c import crc32c
except ImportError:  # pragma: no cover - only when the extension was not built
    _TABLE = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
        _TABLE.append(_c)

    def crc32c(data, value: int = 0) -> int:
        """Pure-Python fallback (slow); `pip install -e .` builds the fast one."""
        crc = value ^ 0xFFFFFFFF
        for b in bytes(data):
            crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

__all__ = ["crc32c"]
