"""Optical density (Beer-Lambert) of a transmission image, with a validity mask.

STXM: ``OD = -ln(I / I0)``; TXM: ``OD = -ln((I - dark) / (flat - dark))``. Pixels whose
counts are not positive after dark subtraction, whose reference (I0 or flat - dark) is not
positive, or where any input is not finite are masked: their OD is NaN and ``valid`` is
False. Nothing is clipped or replaced by a number.
"""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu

from phasestream.kernels.backend import resolve_backend, to_numpy

__all__ = ["check_image", "estimate_i0", "optical_density", "optical_density_reference"]

_ACCEPTED_KINDS = ("u", "i", "f")


def check_image(image, name: str = "image", shape: tuple[int, int] | None = None):
    """Validate a 2D numeric detector image (NumPy or CuPy); return it unchanged.

    Raises ``TypeError`` for non-numeric dtypes and ``ValueError`` for a wrong
    dimensionality or a shape different from ``shape``.
    """
    dtype = np.dtype(image.dtype)
    if dtype.kind not in _ACCEPTED_KINDS:
        raise TypeError(f"{name}: dtype {dtype} is not an integer or float image (uint16, int32, float32, ...)")
    if image.ndim != 2:
        raise ValueError(f"{name}: expected a 2D image (Y, X), got shape {tuple(image.shape)}")
    if shape is not None and tuple(image.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(image.shape)} does not match {tuple(shape)}")
    return image


def estimate_i0(image: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Estimate the STXM incident intensity I0 from the brightest background region of ``image``.

    The finite, positive pixels are split by Otsu's threshold; the bright class is open beam
    (substrate, no particle) and I0 is its median. The estimate is biased by at most a few
    tenths of the Poisson width when the field holds no particle at all.

    Returns
    -------
    I0 in counts (float). Raises ``ValueError`` when no pixel is usable.
    """
    values = to_numpy(image).astype(np.float64, copy=False)
    ok = np.isfinite(values) & (values > 0)
    if valid is not None:
        ok &= to_numpy(valid)
    values = values[ok]
    if values.size == 0:
        raise ValueError("cannot estimate I0: the image has no finite positive counts")
    if values.min() == values.max():
        return float(values[0])
    bright = values[values > threshold_otsu(values)]
    return float(np.median(bright))


def _reference_and_dark(image, i0, flat, dark):
    """Resolve the (ref, dark) pair of ``-ln((I - dark) / (ref - dark))`` for STXM or TXM."""
    if flat is not None:
        check_image(flat, "flat", image.shape)
        ref = flat
        if dark is None:
            dark = 0.0
        elif np.ndim(dark) == 2:
            check_image(dark, "dark", image.shape)
        if i0 is not None:
            raise ValueError("give either i0 (STXM) or flat/dark (TXM), not both")
        return ref, dark
    if dark is not None:
        raise ValueError("dark given without flat: TXM needs flat (and dark); STXM takes i0")
    if i0 is None:
        return estimate_i0(image), 0.0
    if np.ndim(i0) == 0:
        value = float(i0)
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"I0 must be a positive finite number of counts, got {value}")
        return value, 0.0
    check_image(i0, "i0", image.shape)
    return i0, 0.0


def optical_density_reference(image, ref, dark=0.0) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference: ``-ln((image - dark) / (ref - dark))`` as float32 plus validity mask.

    Computed in float64 and rounded once to float32. ``ref`` and ``dark`` are scalars or
    arrays broadcastable to ``image``.
    """
    i = np.asarray(image, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    d = np.asarray(dark, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        num = i - d
        den = r - d
        valid = np.isfinite(num) & np.isfinite(den) & (num > 0) & (den > 0)
        od = np.where(valid, -np.log(num / den), np.nan).astype(np.float32)
    return od, np.broadcast_to(valid, i.shape).copy()


def optical_density(
    image,
    i0=None,
    *,
    flat=None,
    dark=None,
    backend: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Optical density of one transmission image and its validity mask.

    Parameters
    ----------
    image : (Y, X) counts, uint16/int32/float32/float64 (NumPy, or CuPy on the cupy backend)
    i0 : STXM incident intensity: a positive scalar, a (Y, X) image, or None to estimate it
        from the brightest background region (:func:`estimate_i0`)
    flat, dark : TXM flat-field (Y, X) and dark (scalar or (Y, X)) images;
        ``OD = -ln((I - dark) / (flat - dark))``
    backend : ``numpy``, ``numba``, ``cupy`` or ``auto``; default ``PHASESTREAM_BACKEND``

    Returns
    -------
    od : (Y, X) float32, NaN where not valid
    valid : (Y, X) bool; False where counts - dark <= 0, reference - dark <= 0 or any input
        is not finite

    Raises
    ------
    TypeError, ValueError
        for a non-numeric or non-2D image, mismatched shapes, a non-positive or non-finite
        scalar I0, or an image with no usable pixel when I0 must be estimated.

    Notes
    -----
    Beer-Lambert law, eq. (2) of the PCC-GMVAE paper (doi:10.48550/arXiv.2603.07666; docs/methods.md).
    """
    check_image(image)
    ref, dk = _reference_and_dark(image, i0, flat, dark)
    name = resolve_backend(backend)
    if name == "numpy":
        return optical_density_reference(to_numpy(image), to_numpy(ref), to_numpy(dk))
    if name == "numba":
        from phasestream.kernels import _numba

        return _numba.optical_density(to_numpy(image), to_numpy(ref), to_numpy(dk))
    from phasestream.kernels import _cupy

    return _cupy.optical_density(image, ref, dk)
