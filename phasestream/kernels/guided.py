"""Guide-weighted local sums (a joint bilateral filter's numerator and denominator).

``guided_sums(guide, values, radius)[c, p] = sum_q w(p, q) values[c, q]`` over the pixels ``q`` of
the disc of ``radius`` around ``p`` inside the image, ``w(p, q) = exp(-|guide[:, p] - guide[:, q]|^2 / 2)``:
the guide is given in the units of its own tolerance. A weighted mean is the ratio of two such sums
(pass a channel of ones); the denoiser's spectral-shape averaging takes a ratio of the sums of the
spectra and of the thickness (``phasestream.models.denoise``). The NumPy function is the reference
the numba kernel is tested against; the ``cupy`` backend runs the numba kernel (the denoiser that
uses it runs on the model server's CPU).
"""

from __future__ import annotations

import numpy as np

from phasestream.kernels.backend import resolve_backend, to_numpy

__all__ = ["guided_sums", "guided_sums_reference"]


def _checked(guide, values, radius) -> tuple[np.ndarray, np.ndarray, int]:
    g, v = np.asarray(to_numpy(guide), np.float64), np.asarray(to_numpy(values), np.float64)
    if g.ndim != 3 or v.ndim != 3 or g.shape[1:] != v.shape[1:]:
        raise ValueError(f"guide (G, Y, X) and values (C, Y, X) must share Y, X; got {g.shape} and {v.shape}")
    if not (np.isfinite(g).all() and np.isfinite(v).all()):
        raise ValueError("guide and values must be finite")
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
    return g, v, int(radius)


def guided_sums_reference(guide, values, radius: int, *, skip_row: bool = False) -> np.ndarray:
    """NumPy reference of :func:`guided_sums` (one shifted copy per offset of the disc)."""
    g, v, r = _checked(guide, values, radius)
    _, ny, nx = g.shape
    out = np.zeros(v.shape)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx > r * r or (skip_row and dy == 0):
                continue
            ys, yd = (slice(dy, ny), slice(0, ny - dy)) if dy >= 0 else (slice(0, ny + dy), slice(-dy, ny))
            xs, xd = (slice(dx, nx), slice(0, nx - dx)) if dx >= 0 else (slice(0, nx + dx), slice(-dx, nx))
            w = np.exp(-0.5 * ((g[:, yd, xd] - g[:, ys, xs]) ** 2).sum(axis=0))
            out[:, yd, xd] += w * v[:, ys, xs]
    return out


def guided_sums(guide, values, radius: int, *, skip_row: bool = False, backend: str | None = None) -> np.ndarray:
    """(C, Y, X) float64 sums of ``values`` (C, Y, X) over the disc of ``radius`` around each pixel,
    each neighbour weighted by ``exp(-|guide[:, p] - guide[:, q]|^2 / 2)`` (``guide``: (G, Y, X)).

    Raises
    ------
    ValueError
        for shapes that differ in Y, X, non-finite inputs or a negative or fractional radius.
    """
    g, v, r = _checked(guide, values, radius)
    if resolve_backend(backend) == "numpy":
        return guided_sums_reference(g, v, r, skip_row=skip_row)
    from phasestream.kernels import _numba

    return _numba.guided_sums(g, v, r, skip_row)
