import numpy as np
import numpy.typing as npt

__all__ = ["decode", "decode_rows", "PRECISION", "MAX_TABLE_BITS", "MAX_ALPHABET"]

PRECISION: int
MAX_TABLE_BITS: int
MAX_ALPHABET: int

def decode(
    words: npt.NDArray[np.uint32],
    freqs: npt.ArrayLike,
    count: int,
    shift: int,
) -> tuple[npt.NDArray[np.int32], bool]: ...
def _decode_with(
    words: npt.NDArray[np.uint32],
    freqs: npt.ArrayLike,
    count: int,
    shift: int,
    strategy: str,
) -> tuple[npt.NDArray[np.int32], bool]: ...
def decode_rows(
    words: npt.NDArray[np.uint32],
    freqs: npt.ArrayLike,
    shift: int,
    out: npt.NDArray[np.int32],
    rows: npt.NDArray[np.int64],
    add: npt.NDArray[np.int64],
    hist: npt.NDArray[np.int64] | None = None,
) -> bool: ...
