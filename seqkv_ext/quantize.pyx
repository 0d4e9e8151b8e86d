# cython: boundscheck=False, wraparound=False, cdivision=True
"""The calibrated quantizer's encoder pass (seqkv/stages/quantize_klt.py), one component row at a time.

Per row: quantize the coefficients plainly and, when a cross-layer prediction is given, as
residuals against it; keep whichever symbols have the lower plug-in entropy (ties: plain);
write the reconstruction and the squared error.  One pass over the data instead of a dozen
tensor-wide operations.  The reconstruction is ``q * step`` (+ ``pred``), rounded exactly as
the decoder's float32 ``q * step + pred * 1`` (built with -ffp-contract=off: no fused
multiply-add), so encoder and decoder chain the same floats into the next layer.
"""
import numpy as np
cimport numpy as cnp
from libc.float cimport FLT_MAX
from libc.math cimport fabsf

from .entropy cimport range_entropy_bits
from libc.stdint cimport int32_t, int64_t, uint8_t

cnp.import_array()

cdef enum:
    MAX_RANGE = 65536
cdef float MAX_SYMBOL = 1073741824.0   # 2**30


class QuantizeError(ValueError):
    pass


cdef inline int _symbols(const float* z, const float* pred, float step, float rounding, int32_t* out,
                         Py_ssize_t n, int32_t* lo, int32_t* hi) nogil:
    """Symbols of one row (of z - pred when pred is not NULL) and their range; 1: z not finite,
    2: a symbol beyond 2**30.  Written without early exits so that the compiler vectorizes it."""
    cdef Py_ssize_t t
    cdef float v, a
    cdef int bad = 0, big = 0
    cdef int32_t s, mn = 0, mx = 0
    for t in range(n):
        v = z[t]
        bad |= not (fabsf(v) <= FLT_MAX)   # NaN and inf both fail
        if pred != NULL:
            v = v - pred[t]
        v = v / step
        a = fabsf(v) + rounding
        big |= a > MAX_SYMBOL
        # truncation is floor for a >= 0, and unlike floorf it vectorizes on plain x86-64 (SSE2)
        s = <int32_t>a
        s = s if v >= 0 else -s
        out[t] = s
        mn = s if s < mn else mn
        mx = s if s > mx else mx
    lo[0] = mn
    hi[0] = mx
    return 1 if bad else (2 if big else 0)


cdef inline void _dequantize(const int32_t* q, const float* pred, float step, float* recon, Py_ssize_t n) noexcept nogil:
    """recon = q * step (+ pred): float32 product, then the sum (no fused multiply-add under -ffp-contract=off).
    The encoder's reconstruction and the decoder's output both come from here, so they are the same floats."""
    cdef Py_ssize_t t
    if pred != NULL:
        for t in range(n):
            recon[t] = <float>q[t] * step + pred[t]
    else:
        for t in range(n):
            recon[t] = <float>q[t] * step


cdef double _reconstruct(const float* z, const int32_t* q, const float* pred, float step, float* recon,
                         Py_ssize_t n) nogil:
    """recon = q * step (+ pred) (:func:`_dequantize`); returns sum((z - recon)**2)."""
    cdef Py_ssize_t t
    cdef float d
    cdef double e0 = 0.0, e1 = 0.0
    _dequantize(q, pred, step, recon, n)
    # two accumulators: half the dependency chain of one
    t = 0
    while t + 1 < n:
        d = z[t] - recon[t]
        e0 += <double>d * d
        d = z[t + 1] - recon[t + 1]
        e1 += <double>d * d
        t += 2
    if t < n:
        d = z[t] - recon[t]
        e0 += <double>d * d
    return e0 + e1


def quantize_rows(z_in, const float[::1] steps, float rounding, pred=None):
    """z float32 [N, T] (rows may be strided, elements within a row contiguous), steps [N] -> (q int32 [N, T],
    recon float32 [N, T], use bool [N] or None, squared error float64 [N]: the row sums of (z - recon)**2).

    ``pred`` (float32 [N, T], C-contiguous) enables the per-row choice of residual coding; ``use`` says
    which rows took it (None without ``pred``).  Raises QuantizeError on NaN/inf or symbols beyond 2**30.
    """
    cdef const float[:, :] z = z_in
    cdef Py_ssize_t rows = z.shape[0], tokens = z.shape[1], r, t
    if steps.shape[0] != rows:
        raise ValueError(f"{steps.shape[0]} steps for {rows} rows")
    if tokens > 1 and z.strides[1] != sizeof(float):
        raise ValueError("z's rows must be contiguous")
    cdef bint predicted = pred is not None
    cdef const float[:, ::1] p
    if predicted:
        p = pred
        if p.shape[0] != rows or p.shape[1] != tokens:
            raise ValueError("pred must have z's shape")
    q_arr = np.empty((rows, tokens), dtype=np.int32)
    recon_arr = np.empty((rows, tokens), dtype=np.float32)
    err_arr = np.zeros(rows, dtype=np.float64)
    use_arr = np.zeros(rows, dtype=np.uint8)
    if tokens == 0:
        return q_arr, recon_arr, (use_arr.astype(bool) if predicted else None), err_arr
    scratch_arr = np.empty(tokens, dtype=np.int32)
    hist_arr = np.empty(MAX_RANGE, dtype=np.int64)
    cdef int32_t[:, ::1] q = q_arr
    cdef float[:, ::1] recon = recon_arr
    cdef double[::1] err = err_arr
    cdef uint8_t[::1] use = use_arr
    cdef int32_t[::1] scratch = scratch_arr
    cdef int64_t[::1] hist = hist_arr
    cdef int status = 0
    cdef int32_t lo, hi, rlo, rhi
    cdef double plain_bits, res_bits
    cdef const float* zr
    cdef const float* pr = NULL
    with nogil:
        for r in range(rows):
            zr = &z[r, 0]
            status = _symbols(zr, NULL, steps[r], rounding, &q[r, 0], tokens, &lo, &hi)
            if status:
                break
            pr = NULL
            if predicted:
                # residuals beyond 2**30 just mean: code this row plainly
                if _symbols(zr, &p[r, 0], steps[r], rounding, &scratch[0], tokens, &rlo, &rhi) == 0:
                    plain_bits = range_entropy_bits(&q[r, 0], tokens, lo, hi, &hist[0], MAX_RANGE)
                    res_bits = range_entropy_bits(&scratch[0], tokens, rlo, rhi, &hist[0], MAX_RANGE)
                    # a row whose range overflows the histogram counts as infinitely costly; ties: plain
                    if res_bits >= 0 and (plain_bits < 0 or res_bits < plain_bits):
                        use[r] = 1
                        pr = &p[r, 0]
                        for t in range(tokens):
                            q[r, t] = scratch[t]
            err[r] = _reconstruct(zr, &q[r, 0], pr, steps[r], &recon[r, 0], tokens)
    if status == 1:
        raise QuantizeError("NaN or Inf values")
    if status == 2:
        raise QuantizeError("values too large for the quantizer")
    return q_arr, recon_arr, (use_arr.astype(bool) if predicted else None), err_arr


def dequantize_rows(q_in, const float[::1] steps, pred=None, use_in=None):
    """The decoder's side of :func:`quantize_rows`: q int32 [N, T] (rows may be strided, elements within a row
    contiguous), steps [N] -> float32 [N, T] = ``q * step`` plus, in the rows ``use`` (bool [N]) marks,
    ``pred`` (float32 [N, T], C-contiguous).  Rounded as quantize_rows' reconstruction (float32, no fused
    multiply-add), so both sides chain the same floats into the next layer; one pass instead of three."""
    cdef const int32_t[:, :] q = q_in
    cdef Py_ssize_t rows = q.shape[0], tokens = q.shape[1], r
    if steps.shape[0] != rows:
        raise ValueError(f"{steps.shape[0]} steps for {rows} rows")
    if tokens > 1 and q.strides[1] != sizeof(int32_t):
        raise ValueError("q's rows must be contiguous")
    cdef const float[:, ::1] p
    cdef const uint8_t[::1] use
    cdef bint predicted = pred is not None
    if predicted:
        if use_in is None:
            raise ValueError("pred needs use")
        p = pred
        use = np.ascontiguousarray(use_in, dtype=np.uint8).reshape(-1)
        if p.shape[0] != rows or p.shape[1] != tokens or use.shape[0] != rows:
            raise ValueError("pred must have q's shape and use one flag per row")
    out_arr = np.empty((rows, tokens), dtype=np.float32)
    cdef float[:, ::1] out = out_arr
    if tokens == 0:
        return out_arr
    with nogil:
        for r in range(rows):
            _dequantize(&q[r, 0], &p[r, 0] if predicted and use[r] else NULL, steps[r], &out[r, 0], tokens)
    return out_arr
