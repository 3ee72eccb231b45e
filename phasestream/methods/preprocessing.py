"""Flat-field correction and -ln for TXM image stacks (PyXAS, Ge & Lee 2020, section 4, eq. 1).

``OD(E) = -ln((I(E) - I_dark) / (I_bkg(E) - I_dark))``: the dark image is subtracted from sample
and background (flat) images, the sample image is divided by the flat of the same energy, and the
negative natural log gives the optical density (integrated attenuation) that the fits work on.
One convention for bad counts everywhere (the kernels', docs/methods.md): NaN with a validity
mask, never a large number.
"""

from __future__ import annotations

import numpy as np

from phasestream.kernels.od import optical_density_reference

__all__ = ["flat_field", "minus_log", "txm_optical_density"]


def flat_field(
    images: np.ndarray,
    flats: np.ndarray,
    darks: np.ndarray | float | None = None,
    *,
    min_counts: float = 1e-6,
) -> np.ndarray:
    """Flat-field corrected transmission ``(I - dark) / (flat - dark)``.

    Parameters
    ----------
    images : (E, Y, X) or (Y, X) sample images (counts)
    flats : background (open-beam) images, one per energy (E, Y, X) or one for all (Y, X)
    darks : dark image (Y, X), one per energy (E, Y, X), a scalar dark level, or None (0)
    min_counts : denominators (flat - dark) below this are treated as no beam: NaN there

    Returns
    -------
    float32 array of ``images``' shape: transmission (1 in the open beam, < 1 behind the sample);
    NaN where the flat has no counts above the dark.
    """
    i = np.asarray(images, np.float64)
    f = np.asarray(flats, np.float64)
    d = 0.0 if darks is None else np.asarray(darks, np.float64)
    num = i - d
    den = np.broadcast_to(f - d, num.shape)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > min_counts)
    return out.astype(np.float32)


def minus_log(transmission: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optical density ``-ln(T)`` and its validity mask, by the kernels' convention
    (:func:`phasestream.kernels.od.optical_density_reference`).

    Returns
    -------
    od : float32 array of ``transmission``'s shape; NaN where ``T`` is not positive or not finite
        (counts lost in the dark level, no beam): never clipped to a large number
    valid : bool array, False exactly where ``od`` is NaN
    """
    return optical_density_reference(transmission, 1.0)


def txm_optical_density(
    images: np.ndarray,
    flats: np.ndarray,
    darks: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The OD stack (E, Y, X) float32 of a TXM scan, ``-ln((I - dark) / (flat - dark))``, and its
    validity mask: the kernels' implementation (:func:`phasestream.kernels.od.optical_density_reference`),
    NaN (and ``valid`` False) where the counts or the flat are at or below the dark level."""
    return optical_density_reference(images, flats, 0.0 if darks is None else darks)
