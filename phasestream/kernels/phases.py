"""Phase assignment from PCC maps, reliability, ambiguity, fractions and the particle mask.

Method: "AI-Driven Phase Identification from X-ray Hyperspectral Imaging of cycled Na-ion Cathode Materials"
(doi:10.48550/arXiv.2603.07666; docs/methods.md), section 3.3. Each particle pixel
goes to the reference with the highest PCC; its reliability is the best minus the
second-best PCC (eq. 1); a reliability below ``ambiguity`` (0.005 in the paper, the smallest
difference that distinguishes two references) marks the pixel ambiguous.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold, threshold_otsu

from phasestream.kernels.backend import resolve_backend, to_numpy

__all__ = ["DEFAULT_AMBIGUITY", "PhaseFractions", "assign_phases", "particle_mask", "phase_fractions"]

DEFAULT_AMBIGUITY = 0.005


def assign_phases(
    pcc: np.ndarray,
    mask: np.ndarray | None = None,
    ambiguity: float = DEFAULT_AMBIGUITY,
    *,
    backend: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phase, reliability and ambiguity maps from (K, Y, X) PCC maps.

    Parameters
    ----------
    pcc : (K, Y, X) PCC; NaN entries never win
    mask : (Y, X) bool particle mask; None uses every pixel
    ambiguity : reliability below this marks a pixel ambiguous
    backend : ``numpy`` (the reference) or ``numba``; default ``PHASESTREAM_BACKEND`` (cupy
        falls back to numba: the maps are on the host)

    Returns
    -------
    phase : (Y, X) int16, index of the best reference (the first one on a tie); -1 outside
        the mask or where every PCC is NaN
    reliability : (Y, X) float32, best minus second-best PCC; NaN where ``phase`` is -1 or
        fewer than two references have a PCC
    ambiguous : (Y, X) bool, reliability < ``ambiguity`` (False where reliability is NaN)
    """
    p = to_numpy(pcc)
    if p.ndim != 3:
        raise ValueError(f"pcc must be (K, Y, X), got shape {p.shape}")
    if ambiguity < 0:
        raise ValueError(f"ambiguity must be >= 0, got {ambiguity}")
    k = p.shape[0]
    inside = np.ones(p.shape[1:], bool) if mask is None else np.asarray(to_numpy(mask), dtype=bool)
    if inside.shape != p.shape[1:]:
        raise ValueError(f"mask shape {inside.shape} does not match PCC maps {p.shape[1:]}")
    if resolve_backend(backend) != "numpy":
        from phasestream.kernels import _numba

        return _numba.assign_phases(p, inside, ambiguity)
    filled = np.where(np.isfinite(p), p, -np.inf)
    best_idx = np.argmax(filled, axis=0)  # ties go to the first reference, as np.argmax
    best = np.take_along_axis(filled, best_idx[None], axis=0)[0]
    assigned = inside & np.isfinite(best)
    phase = np.where(assigned, best_idx, -1).astype(np.int16)
    reliability = np.full(p.shape[1:], np.nan, dtype=np.float32)
    if k >= 2:
        rest = filled.copy()
        np.put_along_axis(rest, best_idx[None], -np.inf, axis=0)
        second = rest.max(axis=0)
        both = assigned & np.isfinite(second)
        reliability[both] = best[both] - second[both]
    with np.errstate(invalid="ignore"):
        ambiguous = np.isfinite(reliability) & (reliability < ambiguity)
    return phase, reliability, ambiguous


class PhaseFractions(NamedTuple):
    """Fractions of particle pixels: ``fractions[k]`` per phase, ``ambiguous``, ``unassigned``."""

    fractions: np.ndarray
    ambiguous: float
    unassigned: float
    n_particle: int

    def as_dict(self, phases) -> dict[str, float]:
        return {str(name): float(f) for name, f in zip(phases, self.fractions, strict=False)}


def phase_fractions(
    phase: np.ndarray,
    mask: np.ndarray,
    ambiguous: np.ndarray | None = None,
    n_phases: int | None = None,
) -> PhaseFractions:
    """Fraction of particle-mask pixels assigned to each phase.

    Ambiguous pixels count under their argmax phase (as in the paper's PCC fractions) and
    are reported separately as ``ambiguous``; ``unassigned`` are mask pixels with phase -1
    (masked spectra). All fractions are over the particle mask; NaN for an empty mask.
    """
    phase = np.asarray(phase)
    inside = np.asarray(mask, dtype=bool)
    if phase.shape != inside.shape:
        raise ValueError(f"phase {phase.shape} and mask {inside.shape} shapes differ")
    k = int(n_phases if n_phases is not None else max(int(phase.max(initial=-1)) + 1, 0))
    n = int(inside.sum())
    if n == 0:
        return PhaseFractions(np.full(k, np.nan), float("nan"), float("nan"), 0)
    values = phase[inside]
    counts = np.bincount(values[values >= 0], minlength=k)[:k]
    amb = float(np.asarray(ambiguous, dtype=bool)[inside].sum() / n) if ambiguous is not None else 0.0
    return PhaseFractions(counts / n, amb, float((values < 0).sum() / n), n)


def particle_mask(
    od: np.ndarray,
    *,
    threshold: float | None = None,
    min_od: float = 0.05,
    min_size: int = 9,
    rims: bool = True,
    background_sigmas: float = 4.0,
) -> np.ndarray:
    """Particle mask from an OD stack (E, Y, X) or an OD map (Y, X).

    The stack is reduced to the per-pixel mean OD over energies (NaN-aware). Pixels above
    ``threshold`` are particle; without a threshold, Otsu's threshold of the mean OD is used,
    but never below ``min_od`` (so an empty field, or one of thin substrate, yields no
    particle). With ``rims`` (and no explicit ``threshold``) the mask then grows by hysteresis
    (:func:`skimage.filters.apply_hysteresis_threshold`): pixels connected to those above
    Otsu's threshold are kept down to ``background_sigmas`` noise standard deviations above the
    background (median and MAD of the mean OD below Otsu's threshold), so the thin rims of
    particles, whose mean OD falls below Otsu's threshold, stay in the mask while isolated
    noise does not. Connected regions smaller than ``min_size`` pixels are dropped (noise).
    Pixels whose OD is NaN at every energy are never particle.

    Returns
    -------
    (Y, X) bool
    """
    a = to_numpy(od).astype(np.float64, copy=False)
    if a.ndim == 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels give NaN
            level = np.nanmean(a, axis=0)
    elif a.ndim == 2:
        level = a
    else:
        raise ValueError(f"od must be (E, Y, X) or (Y, X), got shape {a.shape}")
    finite = np.isfinite(level)
    if not finite.any():
        return np.zeros(level.shape, bool)
    filled = np.where(finite, level, -np.inf)
    low = None
    if threshold is None:
        values = level[finite]
        t = threshold_otsu(values) if values.min() < values.max() else values.max()
        threshold = max(float(t), min_od)
        background = values[values <= threshold]
        if rims and background.size >= 16:
            centre = float(np.median(background))
            spread = 1.4826 * float(np.median(np.abs(background - centre)))
            low = centre + background_sigmas * spread
    mask = finite & (filled > threshold)
    if low is not None and low < threshold and mask.any():
        mask = finite & apply_hysteresis_threshold(np.where(finite, level, low - 1.0), low, threshold)
    if min_size > 1 and mask.any():
        labels, _ = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())
        mask &= sizes[labels] >= min_size
    return mask
