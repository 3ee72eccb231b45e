"""Resolving ambiguous PCC pixels in a GMVAE latent space.

Method: the PCC-GMVAE paper (doi:10.48550/arXiv.2603.07666; docs/models.md), sections 3.3, 3.4 and 6.5.
Every particle pixel's spectrum is encoded into the latent space; the unambiguous pixels, labelled by PCC, form one
cluster per phase. An ambiguous pixel (best and second-best PCC within 0.005) goes to

* ``mahalanobis``: the cluster with the smallest Mahalanobis distance
  ``sqrt((z - m_k)^T S_k^-1 (z - m_k))`` (cluster mean ``m_k``, covariance ``S_k``), the paper's
  most robust choice;
* ``anchor``: the nearest (Euclidean) of the reference spectra projected into the latent space;
* ``knn``: the majority label of its ``k`` nearest unambiguous neighbours (scikit-learn), when at
  least ``min_agreement`` of them agree (otherwise the pixel keeps its PCC argmax);
* ``centroid``: the nearest cluster mean (Euclidean);
* ``spatial``: no latent space: the reliability-weighted vote of its confident image neighbours in a
  growing window, the ICM update of a Potts random field whose data term is flat among the phases
  in question (:mod:`phasestream.models.spatial`; Besag 1986, doi:10.1111/j.2517-6161.1986.tb01412.x);
* ``spatial+knn``: the ``knn`` class probabilities (without the agreement threshold) times the
  ``spatial`` neighbour prior, each floored at ``SPATIAL_FLOOR`` so that neither alone vetoes a phase.

Unambiguous pixels whose latent point lies outside their own PCC cluster (squared Mahalanobis
distance above the chi-square ``outlier_quantile``) and nearer another phase's cluster are flagged
as likely PCC false positives (section 3.4).

Pure NumPy/SciPy/scikit-learn: no TensorFlow here; latent points come from the model server.
``spatial`` needs no latent points at all (``latent=None``): it refines without a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from phasestream.models.spatial import neighbour_prior

__all__ = ["AUTO", "MODEL_FREE", "SPATIAL", "STRATEGIES", "STRATEGY_CHOICES", "LatentClusters", "Refinement",
           "latent_clusters", "mahalanobis_squared", "refine_ambiguous"]

#: every strategy, in the order the held-out check breaks ties (the paper's first, image context last)
STRATEGIES = ("mahalanobis", "anchor", "knn", "centroid", "spatial", "spatial+knn")
#: the strategies that read the image neighbourhood (their held-out check hides neighbours too)
SPATIAL = ("spatial", "spatial+knn")
#: the strategies that need no GMVAE (refinement runs without a model server)
MODEL_FREE = ("spatial",)
#: ``spatial+knn``: floor of each factor, so that a phase no neighbour (or no latent neighbour) votes for survives
SPATIAL_FLOOR = 0.05
#: the refinement job's choice: the strategy that wins the run's held-out check (docs/models.md)
AUTO = "auto"
STRATEGY_CHOICES = (AUTO, *STRATEGIES)


@dataclass
class LatentClusters:
    """Per-phase clusters of unambiguous latent points: ``phases`` (indices) with ``means`` (C, D),
    ``covariances`` (C, D, D) and ``counts`` (C,). Phases with fewer than ``min_size`` points have no cluster."""

    phases: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.phases)


@dataclass
class Refinement:
    """Result of :func:`refine_ambiguous` (arrays in the shape of the inputs' image axes).

    ``refined_phase`` int16 (-1 outside the mask), ``false_positive`` bool, ``reassigned`` bool
    (ambiguous pixels given a phase from the latent space), ``clusters`` the latent clusters used.
    """

    refined_phase: np.ndarray
    false_positive: np.ndarray
    reassigned: np.ndarray
    clusters: LatentClusters
    strategy: str


def latent_clusters(points: np.ndarray, labels: np.ndarray, *, min_size: int | None = None) -> LatentClusters:
    """Mean and covariance of the latent ``points`` (N, D) of each label in ``labels`` (N,) (>= 0).

    A cluster needs ``min_size`` points (default ``2 * (D + 1)``) to have a usable covariance; a
    ridge of 1e-6 times the mean variance keeps a degenerate covariance invertible.
    """
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels)
    d = points.shape[1]
    min_size = 2 * (d + 1) if min_size is None else max(int(min_size), d + 1)
    phases, means, covs, counts = [], [], [], []
    for k in np.unique(labels[labels >= 0]):
        member = points[labels == k]
        if len(member) < min_size:
            continue
        cov = np.cov(member, rowvar=False).reshape(d, d)
        cov += np.eye(d) * 1e-6 * max(float(np.trace(cov)) / d, 1e-12)
        phases.append(int(k))
        means.append(member.mean(axis=0))
        covs.append(cov)
        counts.append(len(member))
    return LatentClusters(np.asarray(phases, dtype=np.int64), np.asarray(means).reshape(len(phases), d),
                          np.asarray(covs).reshape(len(phases), d, d), np.asarray(counts, dtype=np.int64))


def mahalanobis_squared(points: np.ndarray, clusters: LatentClusters) -> np.ndarray:
    """Squared Mahalanobis distances (N, C) of ``points`` (N, D) to each cluster."""
    points = np.asarray(points, dtype=np.float64)
    out = np.empty((len(points), len(clusters)))
    for c, (mean, cov) in enumerate(zip(clusters.means, clusters.covariances, strict=True)):
        # S^-1 = L^-T L^-1 (Cholesky): d^2 = |L^-1 (z - m)|^2
        chol = np.linalg.cholesky(cov)
        solved = np.linalg.solve(chol, (points - mean).T)
        out[:, c] = np.einsum("ij,ij->j", solved, solved)
    return out


def _squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)


def _candidates(pcc, image_shape, idx: np.ndarray, ambiguity: float, n_phases: int) -> np.ndarray | None:
    """(len(idx), K) bool: phases within ``ambiguity`` of each pixel's best PCC; None without ``pcc``."""
    if pcc is None:
        return None
    p = np.asarray(pcc)
    if p.shape[1:] != image_shape:
        raise ValueError(f"pcc {p.shape} does not match phase {image_shape} (expected (K,) + {image_shape})")
    values = p.reshape(p.shape[0], -1)[:, idx].T.astype(np.float64)
    values = np.where(np.isfinite(values), values, -np.inf)
    allowed = values >= values.max(axis=1, keepdims=True) - ambiguity
    if allowed.shape[1] < n_phases:
        allowed = np.pad(allowed, ((0, 0), (0, n_phases - allowed.shape[1])))
    return allowed


def _best_allowed(scores: np.ndarray, labels: np.ndarray,
                  allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Label of the lowest score per row among the allowed labels, and whether any allowed label is scored
    (a row without one is left alone: the latent space knows nothing of the phases in question)."""
    labels = np.asarray(labels)
    if allowed is None:
        return labels[np.argmin(scores, axis=1)], np.ones(len(scores), bool)
    ok = allowed[:, labels]
    return labels[np.argmin(np.where(ok, scores, np.inf), axis=1)], ok.any(axis=1)


def refine_ambiguous(
    latent: np.ndarray | None,
    phase: np.ndarray,
    ambiguous: np.ndarray,
    mask: np.ndarray,
    strategy: str = "mahalanobis",
    *,
    pcc: np.ndarray | None = None,
    ambiguity: float = 0.005,
    anchors: np.ndarray | None = None,
    reliability: np.ndarray | None = None,
    n_neighbors: int = 15,
    min_agreement: float = 0.7,
    min_cluster_size: int | None = None,
    outlier_quantile: float = 0.99,
    max_knn_points: int = 200_000,
    seed: int = 0,
) -> Refinement:
    """Give ambiguous pixels a phase from the latent space (or their image neighbours); flag likely PCC false positives.

    Parameters
    ----------
    latent : (..., D) latent points of the pixels (e.g. (Y, X, 3)); only mask pixels are read.
        None for a strategy of :data:`MODEL_FREE` (nothing is then flagged)
    phase : (...) int PCC phase (argmax), -1 for background
    ambiguous : (...) bool, PCC gap below the ambiguity threshold
    mask : (...) bool particle mask
    strategy : one of :data:`STRATEGIES` (see the module docstring); the :data:`SPATIAL` ones need
        2-D image maps
    pcc : (K, ...) PCC maps; when given, an ambiguous pixel chooses only among the phases in question,
        those whose PCC is within ``ambiguity`` of its best (as in the paper's figure 4, where the
        ambiguous spectra are projected with the unambiguous spectra of the two phases in question);
        a pixel none of whose candidates has a cluster (or a labelled latent neighbour) keeps its PCC
        phase: the latent space has seen no confident pixel of the phases in question
    ambiguity : the PCC gap defining the candidates (the threshold that marked the pixel ambiguous)
    anchors : (K, D) latent points of the K reference spectra, required by ``anchor``
    reliability : (...) PCC gap of each pixel, the weight of a confident neighbour's vote in the
        :data:`SPATIAL` strategies (default: every vote weighs 1)
    n_neighbors : neighbours of the ``knn`` strategy
    min_agreement : ``knn``: the fraction of the neighbours (among the candidate phases) that must
        vote for the winner; a pixel with a weaker vote keeps its PCC argmax. 0.7 beat both PCC
        and the plain vote on every simulated case of ``benchmarks/models.py``; 0 is the plain vote
    min_cluster_size : points a phase needs for a cluster (default ``2 (D + 1)``)
    outlier_quantile : chi-square quantile (D degrees of freedom) of the squared Mahalanobis
        distance beyond which an unambiguous point is outside its own cluster
    max_knn_points : the ``knn`` training set is a random subset of at most this many points
    seed : seed of that subset

    Returns
    -------
    Refinement
        When no phase has enough unambiguous pixels for a cluster, ``refined_phase`` equals
        ``phase`` and nothing is flagged (not for ``spatial``, which needs no cluster).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    phase = np.asarray(phase)
    image_shape = phase.shape
    if latent is None:
        if strategy not in MODEL_FREE:
            raise ValueError(f"strategy {strategy!r} needs latent points (only {MODEL_FREE} work without a model)")
        latent = np.zeros((*image_shape, 0))
    latent = np.asarray(latent)
    if latent.shape[:-1] != image_shape:
        raise ValueError(f"latent {latent.shape} does not match phase {image_shape} (expected {image_shape} + (D,))")
    for name, arr in (("ambiguous", ambiguous), ("mask", mask)):
        if np.shape(arr) != image_shape:
            raise ValueError(f"{name} shape {np.shape(arr)} does not match phase {image_shape}")
    if strategy in SPATIAL and len(image_shape) != 2:
        raise ValueError(f"strategy {strategy!r} needs (Y, X) image maps, got phase {image_shape}")
    d = latent.shape[-1]
    inside = np.asarray(mask, dtype=bool) & (phase >= 0)
    amb = np.asarray(ambiguous, dtype=bool) & inside
    sure = inside & ~amb
    points = latent.reshape(phase.size, d).astype(np.float64)
    flat_phase = phase.reshape(-1)
    sure_idx = np.flatnonzero(sure.reshape(-1))
    amb_idx = np.flatnonzero(amb.reshape(-1))
    finite = np.isfinite(points).all(axis=1)
    sure_idx = sure_idx[finite[sure_idx]]
    amb_idx = amb_idx[finite[amb_idx]]

    clusters = latent_clusters(points[sure_idx[:0] if d == 0 else sure_idx],
                               flat_phase[sure_idx[:0] if d == 0 else sure_idx], min_size=min_cluster_size)
    refined = phase.astype(np.int16, copy=True).reshape(-1)
    reassigned = np.zeros(refined.shape, bool)
    false_positive = np.zeros(refined.shape, bool)
    if len(clusters) == 0 and strategy not in ("anchor", "spatial"):
        return Refinement(refined.reshape(image_shape), false_positive.reshape(image_shape),
                          reassigned.reshape(image_shape), clusters, strategy)

    if len(amb_idx):
        n_phases = int(max(flat_phase.max(initial=-1) + 1, 0 if anchors is None else len(anchors),
                           0 if pcc is None else np.shape(pcc)[0]))
        allowed = _candidates(pcc, image_shape, amb_idx, ambiguity, n_phases)
        z_amb = points[amb_idx]
        if strategy in SPATIAL:
            prior, radius = neighbour_prior(phase, sure.reshape(image_shape) & finite.reshape(image_shape), amb_idx,
                                            n_phases, weight=reliability, allowed=allowed)
            scores, labels = -prior, np.arange(n_phases)
            voted = radius > 0
            if strategy == "spatial+knn":
                proba = _knn_proba(points, flat_phase, sure_idx, z_amb, n_phases, n_neighbors, max_knn_points, seed)
                scores = -(proba + SPATIAL_FLOOR) * np.where(voted[:, None], prior + SPATIAL_FLOOR, 1.0)
                # evidence from either side for one of the phases in question
                voted |= (proba if allowed is None else np.where(allowed, proba, 0.0)).sum(axis=1) > 0
            amb_idx, scores = amb_idx[voted], scores[voted]
            allowed = None if allowed is None else allowed[voted]
        elif strategy == "anchor":
            if anchors is None:
                raise ValueError("strategy 'anchor' needs anchors: the (K, D) latent points of the references")
            anchors = np.asarray(anchors, dtype=np.float64)
            if anchors.ndim != 2 or anchors.shape[1] != d:
                raise ValueError(f"anchors must be (K, {d}), got {anchors.shape}")
            scores, labels = _squared_distances(z_amb, anchors), np.arange(len(anchors))
        elif strategy == "mahalanobis":
            scores, labels = mahalanobis_squared(z_amb, clusters), clusters.phases
        elif strategy == "centroid":
            scores, labels = _squared_distances(z_amb, clusters.means), clusters.phases
        else:
            proba = _knn_proba(points, flat_phase, sure_idx, z_amb, n_phases, n_neighbors, max_knn_points, seed)
            labels = np.flatnonzero(np.isin(np.arange(n_phases), flat_phase[sure_idx]))
            scores = -proba[:, labels]
        winner, usable = _best_allowed(scores, labels, allowed)
        amb_idx, winner, scores = amb_idx[usable], winner[usable], scores[usable]
        if strategy == "knn" and min_agreement > 0:
            votes = -scores[np.arange(len(winner)), np.searchsorted(labels, winner)]
            sure_vote = votes >= min_agreement - 1e-9
            amb_idx, winner = amb_idx[sure_vote], winner[sure_vote]
        refined[amb_idx] = winner
        reassigned[amb_idx] = True

    if len(sure_idx) and len(clusters) > 1:
        d2 = mahalanobis_squared(points[sure_idx], clusters)
        own = np.searchsorted(clusters.phases, flat_phase[sure_idx])
        has_own = (own < len(clusters.phases)) & (clusters.phases[np.minimum(own, len(clusters) - 1)]
                                                  == flat_phase[sure_idx])
        own_d2 = np.where(has_own, d2[np.arange(len(sure_idx)), np.minimum(own, len(clusters) - 1)], np.inf)
        nearest = clusters.phases[np.argmin(d2, axis=1)]
        limit = stats.chi2.ppf(outlier_quantile, d)
        false_positive[sure_idx] = has_own & (own_d2 > limit) & (nearest != flat_phase[sure_idx])
    return Refinement(refined.reshape(image_shape), false_positive.reshape(image_shape),
                      reassigned.reshape(image_shape), clusters, strategy)


def _knn_proba(points, flat_phase, sure_idx, z_amb, n_phases, n_neighbors, max_points, seed) -> np.ndarray:
    """(len(z_amb), n_phases) class probabilities of the ``n_neighbors`` nearest confident latent points."""
    from sklearn.neighbors import KNeighborsClassifier

    out = np.zeros((len(z_amb), n_phases))
    train = sure_idx
    if len(train) > max_points:
        train = np.random.default_rng(seed).choice(train, max_points, replace=False)
    if not len(train):
        return out
    knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(train))).fit(points[train], flat_phase[train])
    out[:, knn.classes_] = knn.predict_proba(z_amb)
    return out
