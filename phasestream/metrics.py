"""Image-quality metrics for enhanced images (the InDI paper's evaluation: PSNR, SSIM, CNR, edge
resolution, SIFT congruent points).

All functions take 2D arrays and return floats (or an int for :func:`sift_matches`).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["band_pass", "cnr", "edge_fwhm", "edge_points", "hf_correlation", "line_profile", "median_edge_fwhm", "psnr",
           "sift_matches", "ssim"]


def _range(reference: np.ndarray, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    span = float(np.nanmax(reference) - np.nanmin(reference))
    if span <= 0:
        raise ValueError("the reference image is constant: give data_range")
    return span


def psnr(reference: np.ndarray, image: np.ndarray, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio (dB) of ``image`` against ``reference`` (scikit-image).

    ``data_range`` defaults to the reference's max minus min (not the dtype's range).
    """
    ref, img = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    if ref.shape != img.shape:
        raise ValueError(f"image {img.shape} and reference {ref.shape} shapes differ")
    return float(peak_signal_noise_ratio(ref, img, data_range=_range(ref, data_range)))


def ssim(reference: np.ndarray, image: np.ndarray, *, data_range: float | None = None) -> float:
    """Structural similarity (scikit-image, 7x7 window) of ``image`` against ``reference``."""
    ref, img = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    if ref.shape != img.shape:
        raise ValueError(f"image {img.shape} and reference {ref.shape} shapes differ")
    return float(structural_similarity(ref, img, data_range=_range(ref, data_range)))


def cnr(image: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> float:
    """Contrast-to-noise ratio ``|mean_f - mean_b| / sqrt(var_f + var_b)`` between two masks.

    Parameters
    ----------
    image : (Y, X)
    foreground, background : (Y, X) bool masks (e.g. particle and background segmentation)
    """
    img = np.asarray(image, np.float64)
    f, b = img[np.asarray(foreground, bool)], img[np.asarray(background, bool)]
    if f.size < 2 or b.size < 2:
        raise ValueError("each mask needs at least 2 pixels")
    noise = np.sqrt(f.var() + b.var())
    return float(abs(f.mean() - b.mean()) / noise) if noise > 0 else float("inf")


def edge_fwhm(profile: np.ndarray, *, spacing: float = 1.0) -> float:
    """Edge resolution: FWHM of the derivative of a line profile across one edge (InDI paper).

    The derivative (central differences) is taken in absolute value and resampled 20x by a cubic
    spline; the half-maximum crossings on each side of its peak are found by linear interpolation on
    that fine grid. Returns the width in units of ``spacing`` (pixel size); ``inf`` when the peak
    does not fall to half on both sides within the profile.
    """
    from scipy.interpolate import CubicSpline

    p = np.asarray(profile, np.float64)
    if p.ndim != 1 or p.size < 5:
        raise ValueError("profile must be 1D with at least 5 samples")
    fine = 20
    grid = np.linspace(0, p.size - 1, fine * (p.size - 1) + 1)
    d = np.abs(CubicSpline(np.arange(p.size), np.gradient(p))(grid))
    i = int(np.argmax(d))
    half = d[i] / 2
    left = i
    while left > 0 and d[left] > half:
        left -= 1
    right = i
    while right < d.size - 1 and d[right] > half:
        right += 1
    if d[left] > half or d[right] > half:
        return float("inf")
    x_left = left + (half - d[left]) / (d[left + 1] - d[left])
    x_right = right - (half - d[right]) / (d[right - 1] - d[right])
    return float((x_right - x_left) * spacing / fine)


def sift_matches(a: np.ndarray, b: np.ndarray, *, max_ratio: float = 0.8, upsampling: int = 1) -> int:
    """Number of congruent SIFT features of two images (scikit-image SIFT, mutual nearest neighbours
    passing Lowe's ratio test ``max_ratio``). More congruent points: more shared structure."""
    from skimage.feature import SIFT, match_descriptors

    def describe(image):
        img = np.asarray(image, np.float64)
        lo, hi = np.percentile(img, [0.5, 99.5])
        img = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        sift = SIFT(upsampling=upsampling)
        try:
            sift.detect_and_extract(img)
        except RuntimeError:  # no keypoints at all
            return None
        return sift.descriptors

    da, db = describe(a), describe(b)
    if da is None or db is None or len(da) == 0 or len(db) == 0:
        return 0
    return len(match_descriptors(da, db, max_ratio=max_ratio, cross_check=True))


def edge_points(reference: np.ndarray, *, n: int = 50, min_distance: int = 8, sigma: float = 1.0,
                border: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` strongest, well-separated edge points of ``reference`` and their edge normals.

    Returns ``(points (m, 2), normals (m, 2))`` in (row, col), ``m <= n``: local maxima of the
    Gaussian-gradient magnitude at least ``min_distance`` apart and ``border`` pixels from the sides.
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max

    ref = np.asarray(reference, np.float64)
    gy = ndimage.gaussian_filter(ref, sigma, order=(1, 0))
    gx = ndimage.gaussian_filter(ref, sigma, order=(0, 1))
    magnitude = np.hypot(gy, gx)
    points = peak_local_max(magnitude, min_distance=min_distance, num_peaks=n, exclude_border=border)
    normals = np.stack([gy[tuple(points.T)], gx[tuple(points.T)]], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    return points, normals


def line_profile(image: np.ndarray, point, normal, *, length: int = 21, step: float = 0.5) -> np.ndarray:
    """Cubic-interpolated values of ``image`` along ``normal`` through ``point`` (``length`` px long,
    sampled every ``step`` px)."""
    from scipy import ndimage

    s = np.arange(-length / 2, length / 2 + 1e-9, step)
    coords = np.asarray(point, np.float64)[:, None] + np.asarray(normal, np.float64)[:, None] * s[None, :]
    return ndimage.map_coordinates(np.asarray(image, np.float64), coords, order=3, mode="nearest")


def band_pass(image: np.ndarray, *, sigmas: tuple[float, float] = (0.75, 2.0)) -> np.ndarray:
    """Difference of Gaussians: the detail of ``image`` between the scales ``sigmas`` (px, fine to coarse)."""
    from scipy import ndimage

    img = np.asarray(image, np.float64)
    return ndimage.gaussian_filter(img, sigmas[0]) - ndimage.gaussian_filter(img, sigmas[1])


def hf_correlation(reference: np.ndarray, image: np.ndarray, *, sigmas: tuple[float, float] = (0.75, 2.0)) -> float:
    """High-frequency fidelity: Pearson correlation of the band-passed detail (:func:`band_pass`) of
    ``image`` with that of ``reference``. Detail that is invented (hallucinated texture, speckle, grids)
    or lost lowers it; PSNR hardly sees either on a small area."""
    a, b = band_pass(reference, sigmas=sigmas).ravel(), band_pass(image, sigmas=sigmas).ravel()
    if a.shape != b.shape:
        raise ValueError(f"image {np.shape(image)} and reference {np.shape(reference)} shapes differ")
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def median_edge_fwhm(reference: np.ndarray, image: np.ndarray, *, n: int = 30, spacing: float = 0.5,
                     border: int = 12) -> float | None:
    """Median :func:`edge_fwhm` (px) of ``image`` across the ``n`` strongest edges of ``reference``; None
    without edges. ``spacing`` is the profile's sampling step (:func:`line_profile`)."""
    points, normals = edge_points(reference, n=n, border=border)
    widths = [edge_fwhm(line_profile(image, p, q, step=spacing), spacing=spacing)
              for p, q in zip(points, normals, strict=True)]
    widths = [w for w in widths if np.isfinite(w)]
    return float(np.median(widths)) if widths else None
