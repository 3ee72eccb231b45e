"""Particle phantoms for image enhancement: high-quality images and their degraded low-quality scans.

``particle_phantom`` draws a field of cathode-like particles (ellipses with sharp rims, internal
grain texture, pores and cracks) at full resolution; ``degrade`` makes the low-quality scan the
InDI model learns to invert: Gaussian blur (the larger probe / pixel of a fast, wide-field scan),
2x down-sampling and Gaussian noise. The pair has exact ground truth at the high-quality scale.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from phasestream.kernels.resample import upscale

__all__ = ["degrade", "particle_phantom", "phantom_pairs", "upscale"]


def particle_phantom(shape: tuple[int, int] = (256, 256), *, n_particles: int = 10, seed: int = 0) -> np.ndarray:
    """A (Y, X) float32 image in [0, 1]: particles (0.45-0.95) with texture, pores and cracks on a
    0.1 background."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.full(shape, 0.1)
    size = min(shape)
    for _ in range(n_particles):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        a, b = rng.uniform(0.04, 0.16, 2) * size
        theta = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / a
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / b
        r = np.sqrt(u**2 + v**2)
        inside = r < 1.0
        level = rng.uniform(0.45, 0.95)
        grains = ndimage.gaussian_filter(rng.normal(0, 1, shape), rng.uniform(1.0, 3.0))
        grains /= grains.std() + 1e-12
        value = level + 0.08 * grains - 0.1 * r**2
        rim = inside & (r > 0.9)
        value = np.where(rim, value + 0.1, value)
        image = np.where(inside, value, image)
        for _ in range(rng.integers(0, 4)):  # pores
            py, px = cy + rng.normal(0, a / 3), cx + rng.normal(0, b / 3)
            pr = rng.uniform(1.0, 3.0)
            image = np.where(inside & ((yy - py) ** 2 + (xx - px) ** 2 < pr**2), 0.2, image)
        if rng.random() < 0.5:  # a crack through the particle
            angle = rng.uniform(0, np.pi)
            dist = (xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle)
            image = np.where(inside & (np.abs(dist) < rng.uniform(0.5, 1.2)), 0.15, image)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def degrade(hq: np.ndarray, *, scale: int = 2, blur_sigma: float = 1.5, noise: float = 0.03,
            seed: int = 0) -> np.ndarray:
    """Low-quality scan of ``hq``: Gaussian blur (``blur_sigma`` in HQ pixels), ``scale``-fold
    down-sampling by block averaging, additive Gaussian noise of standard deviation ``noise``."""
    rng = np.random.default_rng(seed)
    blurred = ndimage.gaussian_filter(np.asarray(hq, np.float64), blur_sigma)
    h, w = (s // scale * scale for s in blurred.shape)
    small = blurred[:h, :w].reshape(h // scale, scale, w // scale, scale).mean(axis=(1, 3))
    return (small + rng.normal(0, noise, small.shape)).astype(np.float32)


def phantom_pairs(n: int, shape: tuple[int, int] = (256, 256), *, seed: int = 0, scale: int = 2,
                  blur_sigma: float = 1.5, noise: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (HQ, LQ) pairs: HQ (n, Y, X) and LQ (n, Y/scale, X/scale), seeds ``seed * 10000 + i``."""
    hq = np.stack([particle_phantom(shape, seed=seed * 10000 + i) for i in range(n)])
    lq = np.stack([degrade(h, scale=scale, blur_sigma=blur_sigma, noise=noise, seed=seed * 10000 + i + 5000)
                   for i, h in enumerate(hq)])
    return hq, lq
