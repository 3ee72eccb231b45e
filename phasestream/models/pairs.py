"""InDI training pairs before any network: normalization, registration, range and validation-region checks.

Pure NumPy, SciPy and scikit-image, so that every error about the data is raised before TensorFlow is
loaded (:mod:`phasestream.models.indi` imports it). Images are mapped to the network's [-1, 1] range
by the (upscaled) LQ image's 0.5 and 99.5 percentiles (the same map for HQ and LQ, so it is known at
inference); HQ and LQ must therefore share an intensity scale, which :func:`check_pair_range` checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from phasestream.kernels.resample import upscale

__all__ = ["PERCENTILES", "check_pair_range", "from_unit", "normalization_of", "prepare_pair", "split_field",
           "to_unit"]

PERCENTILES = (0.5, 99.5)


def normalization_of(lq_up: np.ndarray, percentiles: Sequence[float] = PERCENTILES) -> tuple[float, float]:
    """``(low, high)`` intensities of the (upscaled) LQ image mapped to -1 and 1."""
    lo, hi = np.nanpercentile(np.asarray(lq_up, np.float64), percentiles)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def to_unit(a, lo: float, hi: float) -> np.ndarray:
    """Intensities ``a`` mapped to the network's range: ``lo`` -> -1, ``hi`` -> 1."""
    return (2.0 * (np.asarray(a, np.float32) - lo) / (hi - lo) - 1.0).astype(np.float32)


def from_unit(a, lo: float, hi: float) -> np.ndarray:
    """The inverse of :func:`to_unit`."""
    return ((np.asarray(a, np.float32) + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)


def prepare_pair(lq: np.ndarray, hq: np.ndarray, *, scale: int = 2,
                 search: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Match an LQ scan to its HQ partner: upscale LQ ``scale``x (bicubic), find the HQ field of view
    in it, register by sub-pixel phase correlation, return ``(hq_crop, lq_aligned, info)``.

    The LQ scan may cover a larger field of view than the HQ one (the usual case: a fast, wide scan
    and a slow, small one). With ``search``, the HQ field is located in the upscaled LQ image by
    normalized cross-correlation (``skimage.feature.match_template``); the residual translation is
    then measured by ``skimage.registration.phase_cross_correlation`` (upsample factor 20, the HQ
    image blurred by a Gaussian of ``scale / 2`` pixels to the LQ resolution, both tapered by a Hann
    window) and applied to the LQ image with cubic spline interpolation. Registration is rigid (translation
    only); no non-rigid step is made. Both outputs have the HQ image's shape (minus the borders
    lost to the shift, trimmed to a multiple of 4 pixels).
    """
    from skimage.feature import match_template
    from skimage.registration import phase_cross_correlation

    hq = np.asarray(hq, np.float32)
    up = upscale(lq, scale)
    offset = (0, 0)
    if search and (up.shape[0] > hq.shape[0] or up.shape[1] > hq.shape[1]):
        score = match_template(up, hq)
        offset = tuple(int(v) for v in np.unravel_index(np.argmax(score), score.shape))
    window = up[offset[0]:offset[0] + hq.shape[0], offset[1]:offset[1] + hq.shape[1]]
    if window.shape != hq.shape:
        raise ValueError(f"the upscaled LQ image {up.shape} does not cover the HQ image {hq.shape}")
    from scipy import ndimage

    # register at a common resolution: the HQ image blurred to the LQ scan's (about half its pixel)
    from skimage.filters import window as taper

    hann = taper("hann", hq.shape)  # no wrap-around edges in the Fourier transform
    reference = ndimage.gaussian_filter(hq, scale / 2)
    shift, error, _ = phase_cross_correlation((reference - reference.mean()) * hann, (window - window.mean()) * hann,
                                              upsample_factor=20, normalization=None)

    aligned = ndimage.shift(window, shift, order=3, mode="nearest").astype(np.float32)
    margin = int(np.ceil(np.abs(shift).max())) + 1
    sl = slice(margin, None)
    h, w = ((n - 2 * margin) // 4 * 4 for n in hq.shape)
    hq_c = hq[sl, sl][:h, :w]
    lq_c = aligned[sl, sl][:h, :w]
    return hq_c, lq_c, {"offset_px": list(offset), "shift_px": [float(s) for s in shift], "margin_px": margin,
                        "registration_error": float(error)}


def check_pair_range(hq: np.ndarray, lq_up: np.ndarray, *, max_outside: float = 0.5, what: str = "pair") -> float:
    """The fraction of HQ pixels outside [-1, 1] after the LQ image's normalization; raises above ``max_outside``.

    The network's output is a tanh: HQ intensities mapped outside [-1, 1] cannot be learned. That
    happens when HQ and LQ are not on one intensity scale, e.g. raw counts at two doses (3000 vs
    120 counts/px): normalize each by its own dose or open beam first.
    """
    lo, hi = normalization_of(lq_up)
    unit = to_unit(hq, lo, hi)
    finite = np.isfinite(unit)
    outside = float(np.mean(np.abs(unit[finite]) > 1.0)) if finite.any() else 1.0
    if outside > max_outside:
        raise ValueError(
            f"{what}: after normalization by the LQ image's {PERCENTILES[0]}-{PERCENTILES[1]} percentiles "
            f"({lo:.4g}..{hi:.4g} -> -1..1), {100 * outside:.0f}% of the HQ pixels fall outside the network's range "
            f"(HQ spans {np.nanmin(hq):.4g}..{np.nanmax(hq):.4g}): HQ and LQ are not on one intensity scale. Normalize "
            "each scan by its own open beam or dose (train on --domain transmission or od, or give --open-beam LQ HQ)")
    return outside


def split_field(shape: Sequence[int], *, crop: int, fraction: float = 0.2, gap: int = 8,
                multiple: int = 4) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """``(training region, validation region)`` of a (Y, X) field: the validation region is a band at the end
    of the longer axis (``fraction`` of it, a multiple of ``multiple`` pixels, at least 32), separated from
    the training region by ``gap`` pixels, so that validation measures an area of the field never trained on.

    Raises ``ValueError`` when the training region cannot hold a ``crop``-pixel crop.
    """
    h, w = (int(n) for n in shape)
    axis = 0 if h >= w else 1
    length, other = (h, w) if axis == 0 else (w, h)
    band = max(32, round(fraction * length) // multiple * multiple)
    train = length - band - gap
    if train < crop or other < crop:
        raise ValueError(
            f"image {h} x {w} px is too small to train on: a validation band of {band} px (a separate area of the "
            f"field) and a {gap}-px gap leave {max(train, 0)} x {other} px for training crops of {crop} px; use a "
            f"smaller --crop or larger images")
    other_len = other // multiple * multiple
    if axis == 0:
        return (slice(0, train), slice(0, w)), (slice(length - band, length), slice(0, other_len))
    return (slice(0, h), slice(0, train)), (slice(0, other_len), slice(length - band, length))
