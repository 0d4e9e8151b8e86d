import numpy as np
import numpy.typing as npt

__all__ = ["rotate_heads"]

def rotate_heads(x_in: npt.NDArray[np.float32], cos: npt.NDArray[np.float32], sin: npt.NDArray[np.float32],
                 scale: float) -> npt.NDArray[np.float32]: ...
