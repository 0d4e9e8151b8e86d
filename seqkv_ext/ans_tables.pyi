import numpy as np
import numpy.typing as npt

__all__ = ["checked_table"]

def checked_table(freqs: npt.ArrayLike, shift: int) -> npt.NDArray[np.uint32]: ...
