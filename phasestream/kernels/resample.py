"""Resampling of images between scan resolutions (InDI's low- and high-quality scans)."""

from __future__ import annotations

import numpy as np

__all__ = ["upscale"]


def upscale(image: np.ndarray, scale: int = 2) -> np.ndarray:
    """Bicubic up-sampling by ``scale`` (pixel centres aligned with block-averaged down-sampling)."""
    from skimage.transform import rescale

    return rescale(np.asarray(image, np.float64), scale, order=3, mode="reflect", anti_aliasing=False)\
        .astype(np.float32)
