import numpy as np
import numpy.typing as npt

__all__ = ["encode"]

def encode(
    idx: npt.ArrayLike,
    freqs: npt.ArrayLike,
    shift: int,
) -> npt.NDArray[np.uint32]: ...
