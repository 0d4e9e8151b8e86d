import numpy as np
import numpy.typing as npt

__all__ = ["decode_uvarints"]

def decode_uvarints(buf: bytes | memoryview | npt.NDArray[np.uint8], start: int, end: int,
                    count: int) -> tuple[npt.NDArray[np.int64], int, int]: ...
