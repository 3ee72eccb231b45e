"""Resolving ambiguous PCC pixels from their image neighbours: phases form domains.

Method: a Potts Markov random field on the phase map, solved by iterated conditional modes (ICM;
J. Besag, "On the statistical analysis of dirty pictures", J. R. Stat. Soc. B 48, 259-302 (1986),
doi:10.1111/j.2517-6161.1986.tb01412.x), with the confident PCC pixels clamped to their labels. An
ambiguous pixel's data term is flat among its candidate phases (their PCC lies within the ambiguity
threshold of the best one: PCC cannot tell them apart), so the ICM update of that pixel is the
Potts neighbour term alone: the candidate phase with the largest weight of confident neighbours.
Each confident neighbour votes with its PCC reliability (best minus second-best PCC), so a pixel
PCC was barely sure of counts less than one deep inside a domain.

The neighbourhood is the smallest square window (half-widths :data:`RADII`) that holds a confident
vote for one of the pixel's candidates: an ambiguous patch is resolved from its rim inwards. A
pixel with no vote within the largest window keeps its PCC argmax. Resolved ambiguous pixels do
not vote (one ICM sweep from the confident pixels only): a wrong call never spreads.

Pure NumPy/SciPy; no model. :func:`neighbour_prior` returns the votes as class probabilities, so
that they can multiply latent-space class probabilities (``spatial+knn`` in
:mod:`phasestream.models.refine`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["RADII", "distance_to_evidence", "hidden_discs", "neighbour_prior", "pcc_reliability"]

#: half-widths (px) of the growing vote window: 3x3, 5x5, 9x9, 17x17, 33x33
RADII = (1, 2, 4, 8, 16)


def pcc_reliability(pcc: np.ndarray) -> np.ndarray:
    """Best minus second-best PCC (...) of PCC maps ``pcc`` (K, ...); 0 where not finite."""
    p = np.asarray(pcc, dtype=np.float64)
    p = np.where(np.isfinite(p), p, -np.inf)
    top = np.sort(p, axis=0)[-2:]
    gap = top[1] - top[0]
    return np.where(np.isfinite(gap), gap, 0.0)


def neighbour_prior(
    phase: np.ndarray,
    evidence: np.ndarray,
    targets: np.ndarray,
    n_phases: int,
    *,
    weight: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    radii: tuple[int, ...] = RADII,
) -> tuple[np.ndarray, np.ndarray]:
    """Reliability-weighted votes of confident neighbours, as class probabilities.

    Parameters
    ----------
    phase : (Y, X) int phase map (labels >= 0 of the ``evidence`` pixels are read)
    evidence : (Y, X) bool, the pixels whose labels vote (confident particle pixels)
    targets : (N,) flat indices into the image of the pixels to resolve
    n_phases : K, the number of phases
    weight : (Y, X) vote weight of each evidence pixel (its PCC reliability); default 1
    allowed : (N, K) bool, each target's candidate phases; default all
    radii : half-widths of the growing square window

    Returns
    -------
    prior : (N, K) float64, the votes for the allowed phases in the smallest window holding any,
        normalized to sum 1; rows of zeros where no window holds a vote
    radius : (N,) int, the half-width used, 0 where none
    """
    phase = np.asarray(phase)
    evidence = np.asarray(evidence, dtype=bool) & (phase >= 0)
    targets = np.asarray(targets, dtype=np.int64)
    w = np.ones(phase.shape) if weight is None else np.where(np.isfinite(weight), weight, 0.0).astype(np.float64)
    w = np.where(evidence, np.maximum(w, 1e-6), 0.0)
    rows, cols = np.unravel_index(targets, phase.shape)
    # summed-area tables: one box sum per target and radius, whatever the window size; the vote counts are
    # integers, so that round-off in the weight sums never invents a vote in an empty window
    tables = np.zeros((n_phases, phase.shape[0] + 1, phase.shape[1] + 1))
    counts = np.zeros((n_phases, phase.shape[0] + 1, phase.shape[1] + 1), np.int64)
    for k in range(n_phases):
        tables[k, 1:, 1:] = np.cumsum(np.cumsum(np.where(phase == k, w, 0.0), axis=0), axis=1)
        counts[k, 1:, 1:] = np.cumsum(np.cumsum(evidence & (phase == k), axis=0), axis=1)
    prior = np.zeros((len(targets), n_phases))
    radius = np.zeros(len(targets), np.int64)
    todo = np.ones(len(targets), bool)
    for r in radii:
        if not todo.any():
            break
        idx = np.flatnonzero(todo)
        y0, y1 = np.clip(rows[idx] - r, 0, phase.shape[0]), np.clip(rows[idx] + r + 1, 0, phase.shape[0])
        x0, x1 = np.clip(cols[idx] - r, 0, phase.shape[1]), np.clip(cols[idx] + r + 1, 0, phase.shape[1])
        votes = (tables[:, y1, x1] - tables[:, y0, x1] - tables[:, y1, x0] + tables[:, y0, x0]).T
        n = (counts[:, y1, x1] - counts[:, y0, x1] - counts[:, y1, x0] + counts[:, y0, x0]).T
        votes = np.where(n > 0, np.maximum(votes, 1e-12), 0.0)
        if allowed is not None:
            votes = np.where(allowed[idx], votes, 0.0)
        total = votes.sum(axis=1)
        found = total > 0
        prior[idx[found]] = votes[found] / total[found, None]
        radius[idx[found]] = r
        todo[idx[found]] = False
    return prior, radius


def hidden_discs(shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(Y, X) bool: the pixels strictly within ``radii`` (N,) of the flat indices ``centres`` (N,)."""
    hidden = np.zeros(shape, bool)
    rows, cols = np.unravel_index(np.asarray(centres, np.int64), shape)
    for y, x, r in zip(rows, cols, np.asarray(radii, np.float64), strict=True):
        h = int(np.ceil(r))
        y0, y1, x0, x1 = max(y - h, 0), min(y + h + 1, shape[0]), max(x - h, 0), min(x + h + 1, shape[1])
        yy, xx = np.ogrid[y0:y1, x0:x1]
        hidden[y0:y1, x0:x1] |= (yy - y) ** 2 + (xx - x) ** 2 < r * r
    return hidden


def distance_to_evidence(evidence: np.ndarray) -> np.ndarray:
    """(Y, X) Euclidean distance (px) of each pixel to the nearest ``evidence`` pixel (0 on one)."""
    evidence = np.asarray(evidence, dtype=bool)
    if not evidence.any():
        return np.full(evidence.shape, np.inf)
    return ndimage.distance_transform_edt(~evidence)
