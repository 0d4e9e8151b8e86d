import sys

import numpy as np
import numpy.typing as npt

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

__all__ = ["decode_section", "StreamError", "TABLE_BITS", "MAX_SHIFT"]

TABLE_BITS: int
MAX_SHIFT: int

class StreamError(ValueError): ...

def decode_section(
    buf: Buffer | npt.NDArray[np.uint8],
    pos: int,
    end: int,
    channels: int,
    tokens: int,
    max_classes: int = 256,
) -> tuple[npt.NDArray[np.int32], int]: ...
