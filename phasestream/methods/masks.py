"""Pixel masks: thresholds on maps, their combinations, and k-means clusters of spectra.

Threshold masks select the particle (edge jump / thickness above a level) or drop badly fitted
pixels (LCF fit error above a level); k-means (scikit-learn :class:`~sklearn.cluster.KMeans`) on
the per-pixel spectra groups pixels of similar chemistry and gives each cluster's mean spectrum
(PyXAS, Ge & Lee 2020, section 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

__all__ = ["ClusterResult", "combine_masks", "kmeans_clusters", "threshold_mask"]


def threshold_mask(values: np.ndarray, *, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Boolean mask ``low <= values <= high`` (a missing bound is open); NaN is outside.

    Parameters
    ----------
    values : a map of any shape (thickness, fit error, edge-50 energy, ...)
    low, high : inclusive bounds; at least one
    """
    if low is None and high is None:
        raise ValueError("threshold_mask needs low, high or both")
    v = np.asarray(values)
    mask = np.isfinite(v)
    with np.errstate(invalid="ignore"):
        if low is not None:
            mask &= v >= low
        if high is not None:
            mask &= v <= high
    return mask


def combine_masks(*masks: np.ndarray, how: str = "and") -> np.ndarray:
    """Pixel-wise ``and`` (all) or ``or`` (any) of boolean masks of one shape."""
    if not masks:
        raise ValueError("combine_masks needs at least one mask")
    if how not in ("and", "or"):
        raise ValueError(f"how must be 'and' or 'or', got {how!r}")
    stacked = np.stack([np.asarray(m, bool) for m in masks])
    return stacked.all(axis=0) if how == "and" else stacked.any(axis=0)


@dataclass(frozen=True)
class ClusterResult:
    """k-means clusters of per-pixel spectra.

    Attributes
    ----------
    labels : (...) int16 cluster of each pixel, -1 outside the mask (or with non-finite spectra)
    mean_spectra : (n_clusters, E) float64 mean (input, not normalized) spectrum of each cluster
    counts : (n_clusters,) pixels per cluster
    inertia : k-means sum of squared distances of the clustered (possibly normalized) spectra
    """

    labels: np.ndarray
    mean_spectra: np.ndarray
    counts: np.ndarray
    inertia: float


def kmeans_clusters(
    spectra: np.ndarray,
    n_clusters: int,
    *,
    mask: np.ndarray | None = None,
    normalize: bool = False,
    remove_components: int = 0,
    max_samples: int | None = 200_000,
    seed: int = 0,
    n_init: int = 4,
) -> ClusterResult:
    """Cluster the pixels' spectra with k-means.

    Parameters
    ----------
    spectra : (E, ...) stack, e.g. (E, Y, X)
    n_clusters : number of clusters
    mask : (...) bool, pixels to cluster (default all with finite spectra)
    normalize : divide each spectrum by its Euclidean norm first (cluster on shape, not thickness)
    remove_components : remove this many leading principal components of the (centred) spectra
        before clustering (1: the first, which follows thickness or overall intensity, as the
        cluster analysis of MANTiS does; M. Lerotic et al., "Cluster analysis of soft X-ray
        spectromicroscopy data", Ultramicroscopy 100 (2004) 35, doi:10.1016/j.ultramic.2004.01.008)
    max_samples : fit on at most this many randomly drawn pixels, then assign every pixel to its
        nearest centre (None: fit on all)
    seed : random state of the draw and of k-means
    n_init : k-means restarts

    Returns
    -------
    ClusterResult
    """
    y = np.asarray(spectra, np.float64)
    n_e, pixels = y.shape[0], y.shape[1:]
    flat = y.reshape(n_e, -1).T
    valid = np.isfinite(flat).all(axis=1)
    if mask is not None:
        m = np.asarray(mask, bool)
        if m.shape != pixels:
            raise ValueError(f"mask shape {m.shape} differs from the pixel shape {pixels}")
        valid &= m.ravel()
    data = flat[valid]
    if normalize:
        norms = np.linalg.norm(data, axis=1, keepdims=True)
        data = data / np.where(norms > 0, norms, 1.0)
    if remove_components > 0 and data.shape[0] > remove_components:
        centred = data - data.mean(axis=0)
        components = np.linalg.svd(centred, full_matrices=False)[2][:remove_components]  # (C, E)
        data = centred - (centred @ components.T) @ components
    if data.shape[0] < n_clusters:
        raise ValueError(f"{data.shape[0]} pixels to cluster, fewer than n_clusters={n_clusters}")
    rng = np.random.default_rng(seed)
    fit_on = data
    if max_samples is not None and data.shape[0] > max_samples:
        fit_on = data[rng.choice(data.shape[0], max_samples, replace=False)]
    model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(fit_on)
    assigned = model.predict(data) if fit_on is not data else model.labels_
    labels = np.full(flat.shape[0], -1, np.int16)
    labels[valid] = assigned
    counts = np.bincount(assigned, minlength=n_clusters)
    inside = flat[valid]
    means = np.stack([inside[assigned == c].mean(axis=0) if counts[c] else np.full(n_e, np.nan)
                      for c in range(n_clusters)])
    inertia = float(((data - model.cluster_centers_[assigned]) ** 2).sum())
    return ClusterResult(labels.reshape(pixels), means, counts, inertia)
