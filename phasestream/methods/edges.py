"""Edge position and white-line peak maps from per-pixel curve fits in an energy window.

PyXAS (Ge & Lee 2020, section 5) maps the chemical shift of an absorption edge by the energy at
which the normalized absorption reaches 0.5 (the "edge-50" energy) and the energy of the
white-line peak, each found on a smooth curve fitted to the spectrum in an energy window:

* ``"polynomial"``: a least-squares polynomial in energy (NumPy
  :func:`numpy.polynomial.polynomial.polyfit`, all pixels at once);
* ``"spline"``: a least-squares cubic spline with interior knots every ``knot_spacing`` eV (SciPy
  :func:`scipy.interpolate.make_lsq_spline`, all pixels at once).

The fitted curve is evaluated on a fine grid (``step`` eV) where the crossing (linearly
interpolated) or the maximum is read. Pixels are processed in blocks to bound memory.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import make_lsq_spline

__all__ = ["CURVE_FITS", "edge50_map", "fit_curves", "peak_position_map"]

CURVE_FITS = ("polynomial", "spline")
_BLOCK = 1 << 16  # pixels per block: (fine grid x block) float64 stays ~100 MB at most


def fit_curves(
    spectra: np.ndarray,
    energies: np.ndarray,
    window: tuple[float, float],
    *,
    fit: str = "polynomial",
    order: int = 3,
    knot_spacing: float = 5.0,
    step: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth curves fitted to the spectra inside ``window``, on a fine energy grid.

    Parameters
    ----------
    spectra : (E, N) spectra (pixels flattened)
    energies : (E,) eV
    window : (low, high) eV; the energies inside are fitted
    fit : ``"polynomial"`` or ``"spline"``
    order : polynomial degree (``"polynomial"``)
    knot_spacing : interior knot distance, eV (``"spline"``)
    step : fine grid spacing, eV

    Returns
    -------
    grid : (G,) eV
    curves : (G, N) float64 fitted values; NaN columns for spectra with non-finite values
    """
    if fit not in CURVE_FITS:
        raise ValueError(f"fit must be one of {CURVE_FITS}, got {fit!r}")
    e = np.asarray(energies, np.float64)
    inside = (e >= window[0]) & (e <= window[1])
    ew = e[inside]
    data = np.asarray(spectra, np.float64)[inside]
    need = order + 1 if fit == "polynomial" else 4
    if ew.size < need + 1:
        raise ValueError(f"the window {tuple(window)} eV holds {ew.size} energies; a {fit} fit needs more than {need}")
    grid = np.arange(ew[0], ew[-1] + 0.5 * step, step)
    finite = np.isfinite(data).all(axis=0)
    curves = np.full((grid.size, data.shape[1]), np.nan)
    centre, half = 0.5 * (ew[0] + ew[-1]), 0.5 * (ew[-1] - ew[0])  # scaled energies: a well-conditioned fit
    if fit == "polynomial":
        coef = np.polynomial.polynomial.polyfit((ew - centre) / half, data[:, finite], order)
        curves[:, finite] = np.polynomial.polynomial.polyval((grid - centre) / half, coef).T
    else:
        n_inner = max(int((ew[-1] - ew[0]) // knot_spacing), 0)
        inner = np.linspace(ew[0], ew[-1], n_inner + 2)[1:-1]
        knots = np.concatenate([[ew[0]] * 4, inner, [ew[-1]] * 4])
        curves[:, finite] = make_lsq_spline(ew, data[:, finite], knots, k=3, axis=0)(grid)
    return grid, curves


def _blocks(spectra: np.ndarray):
    flat = np.asarray(spectra).reshape(spectra.shape[0], -1)
    for lo in range(0, flat.shape[1], _BLOCK):
        yield lo, flat[:, lo : lo + _BLOCK]


def edge50_map(
    spectra: np.ndarray,
    energies: np.ndarray,
    window: tuple[float, float],
    *,
    level: float = 0.5,
    fit: str = "polynomial",
    order: int = 3,
    knot_spacing: float = 5.0,
    step: float = 0.05,
) -> np.ndarray:
    """Energy (eV) where each pixel's normalized spectrum first rises through ``level`` in ``window``.

    Parameters
    ----------
    spectra : (E, ...) edge-normalized stack (:func:`~phasestream.methods.normalize_edge`)
    energies : (E,) eV
    window : (low, high) eV around the edge
    level : the normalized absorption of the crossing (0.5: edge-50)
    fit, order, knot_spacing, step : the curve fit, see :func:`fit_curves`

    Returns
    -------
    (...) float32 map, eV; NaN where the fitted curve does not cross ``level`` in the window
    """
    y = np.asarray(spectra)
    out = np.full(int(np.prod(y.shape[1:])), np.nan)
    for lo, block in _blocks(y):
        grid, curves = fit_curves(block, energies, window, fit=fit, order=order, knot_spacing=knot_spacing, step=step)
        above = curves >= level
        rising = above[1:] & ~above[:-1]
        found = rising.any(axis=0)
        i = np.argmax(rising, axis=0)  # last grid point below the level
        cols = np.arange(curves.shape[1])
        c0, c1 = curves[i, cols], curves[i + 1, cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(c1 != c0, (level - c0) / (c1 - c0), 0.0)
        out[lo : lo + block.shape[1]] = np.where(found, grid[i] + frac * step, np.nan)
    return out.reshape(y.shape[1:]).astype(np.float32)


def peak_position_map(
    spectra: np.ndarray,
    energies: np.ndarray,
    window: tuple[float, float],
    *,
    fit: str = "polynomial",
    order: int = 3,
    knot_spacing: float = 5.0,
    step: float = 0.05,
) -> np.ndarray:
    """Energy (eV) of the maximum of each pixel's fitted curve in ``window`` (white-line peak).

    Parameters
    ----------
    spectra : (E, ...) stack (normalized or OD)
    energies : (E,) eV
    window : (low, high) eV around the peak
    fit, order, knot_spacing, step : the curve fit, see :func:`fit_curves`

    Returns
    -------
    (...) float32 map, eV; NaN for spectra with non-finite values
    """
    y = np.asarray(spectra)
    out = np.full(int(np.prod(y.shape[1:])), np.nan)
    for lo, block in _blocks(y):
        grid, curves = fit_curves(block, energies, window, fit=fit, order=order, knot_spacing=knot_spacing, step=step)
        finite = np.isfinite(curves).all(axis=0)
        peak = grid[np.argmax(np.where(np.isfinite(curves), curves, -np.inf), axis=0)]
        out[lo : lo + block.shape[1]] = np.where(finite, peak, np.nan)
    return out.reshape(y.shape[1:]).astype(np.float32)
