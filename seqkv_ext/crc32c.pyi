import sys

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

__all__ = ["crc32c", "POLY"]

POLY: int

def crc32c(data: Buffer, value: int = 0) -> int: ...
