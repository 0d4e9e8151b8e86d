# cython: language_level=3, boundscheck=False, wraparound=False
"""RoPE rotation of [H, T, D] key tensors in one pass, into a fresh C-contiguous tensor.

The input may have any layout with contiguous channels: the calibrated decoder's inverse KLT
yields a [H, T, D] view of token rows ([T, H*D] memory), which the copy into the cache's
[H, T, D] order would otherwise read a second time.  Each (i, i + D/2) channel pair is rotated
and rounded like seqkv/stages/rope.py's torch code (float32 products, then their difference or
sum, then the scaling; built with -ffp-contract=off), so the results are the same floats.
"""
import numpy as np

__all__ = ["rotate_heads"]


def rotate_heads(x_in, const float[:, ::1] cos, const float[:, ::1] sin, float scale):
    """x float32 [H, T, D] (channels contiguous, any other strides); cos, sin [T, D/2] -> float32 [H, T, D]
    C-contiguous: ``(lo*cos - hi*sin, hi*cos + lo*sin)`` per channel pair, times ``scale`` unless it is 1."""
    cdef const float[:, :, :] x = x_in
    cdef Py_ssize_t heads = x.shape[0], tokens = x.shape[1], dim = x.shape[2], half = dim // 2, h, t, i
    if dim % 2:
        raise ValueError(f"head dim {dim} is odd")
    if cos.shape[0] != tokens or sin.shape[0] != tokens or cos.shape[1] != half or sin.shape[1] != half:
        raise ValueError(f"cos and sin must be [{tokens}, {half}]")
    if heads and tokens and dim > 1 and x.strides[2] != sizeof(float):
        raise ValueError("channels must be contiguous")
    out_arr = np.empty((heads, tokens, dim), dtype=np.float32)
    if heads == 0 or tokens == 0 or dim == 0:
        return out_arr
    cdef float[:, :, ::1] out = out_arr
    cdef const float* src
    cdef const float* c
    cdef const float* s
    cdef float* dst
    cdef float lo, hi
    cdef bint scaled = scale != 1.0
    with nogil:
        for t in range(tokens):
            c = &cos[t, 0]
            s = &sin[t, 0]
            for h in range(heads):
                src = &x[h, t, 0]
                dst = &out[h, t, 0]
                for i in range(half):
                    lo = src[i]
                    hi = src[i + half]
                    dst[i] = lo * c[i] - hi * s[i]
                    dst[i + half] = hi * c[i] + lo * s[i]
                if scaled:
                    for i in range(dim):
                        dst[i] = dst[i] * scale
    return out_arr
