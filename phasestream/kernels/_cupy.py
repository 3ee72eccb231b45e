"""CuPy (GPU) implementations of the streaming kernels.

Imported only when the cupy backend is selected. Inputs may be NumPy (copied to the GPU) or
CuPy arrays; outputs stay on the GPU. Each kernel has a NumPy reference that the tests
compare it to (``tests/kernels``, skipped without a GPU).
"""

from __future__ import annotations

import cupy as cp
import numpy as np

_od_kernel = cp.ElementwiseKernel(
    "T image, float64 ref, float64 dark",
    "float32 od, bool valid",
    """
    double num = (double)image - dark;
    double den = ref - dark;
    if (num > 0.0 && den > 0.0 && isfinite(num) && isfinite(den)) {
        od = (float)(-log(num / den));
        valid = true;
    } else {
        od = CUDART_NAN_F;
        valid = false;
    }
    """,
    "phasestream_od",
    preamble="#include <cupy/math_constants.h>",
)

_update_kernel = cp.RawKernel(
    r"""
extern "C" __global__ void pcc_update(
    const float* od, const bool* frame_valid, double* mean, double* m2, double* comoment,
    bool* ok, const double* coef, const int k_refs, const double inv_n, const long long npix)
{
    long long i = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= npix || !ok[i]) return;
    double v = (double)od[i];
    if (!frame_valid[i] || !isfinite(v)) { ok[i] = false; return; }
    double dx = v - mean[i];
    double mn = mean[i] + dx * inv_n;
    mean[i] = mn;
    m2[i] += dx * (v - mn);
    for (int k = 0; k < k_refs; ++k) comoment[k * npix + i] += dx * coef[k];
}
""",
    "pcc_update",
)


def optical_density(image, ref, dark):
    img = cp.asarray(image)
    return _od_kernel(img, cp.asarray(ref, dtype=cp.float64), cp.asarray(dark, dtype=cp.float64))


def pearson_update(od, valid, mean, m2, comoment, ok, coef: np.ndarray, inv_n: float) -> None:
    od32 = cp.ascontiguousarray(cp.asarray(od, dtype=cp.float32))
    if valid is None:
        fv = cp.ones(od32.shape, dtype=cp.bool_)
    else:
        fv = cp.ascontiguousarray(cp.asarray(valid, dtype=cp.bool_))
    npix = od32.size
    threads = 256
    blocks = (npix + threads - 1) // threads
    _update_kernel(
        (blocks,),
        (threads,),
        (od32, fv, mean, m2, comoment, ok, cp.asarray(coef, dtype=cp.float64), np.int32(coef.size),
         np.float64(inv_n), np.int64(npix)),
    )
