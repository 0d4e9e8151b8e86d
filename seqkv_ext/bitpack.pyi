import sys

import numpy as np
import numpy.typing as npt

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

__all__ = ["pack_low_bits", "unpack_low_bits"]

def pack_low_bits(
    values: npt.NDArray[np.uint16] | npt.NDArray[np.uint32], nbits: int
) -> npt.NDArray[np.uint8]: ...
def unpack_low_bits(
    buf: npt.NDArray[np.uint8] | Buffer, nbits: int, count: int
) -> npt.NDArray[np.uint32]: ...
