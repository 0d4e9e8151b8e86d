import numpy as np
import numpy.typing as npt

__all__ = ["center_rows", "MAX_TOKENS"]

MAX_TOKENS: int

def center_rows(q: npt.NDArray[np.int32]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...
