"""Held-out check: does latent-space refinement beat PCC on this run?

Each run carries its own validation data: the particle pixels PCC is sure of. The check makes some
of them ambiguous the way real ones are, by adding noise matched to the run's own OD noise to their
spectra until their PCC gap (best minus second-best) falls below the ambiguity threshold, and then
resolves them with each strategy through the same latent-space path as the real ambiguous pixels
(:func:`~phasestream.models.refine.refine_ambiguous`, with the held-out pixels removed from the
clusters). Their unperturbed PCC label is the truth; PCC's own accuracy on the perturbed spectra is
the baseline a strategy has to beat (docs/models.md, "Refinement").

The strategies that read the image neighbourhood (``spatial``, ``spatial+knn``) are checked on the
image (:func:`score_spatial`): a held-out pixel's own label is hidden from the neighbour vote, and so
are the confident pixels around it, out to a distance drawn from the run's real ambiguous pixels'
distances to their nearest confident pixel. Real ambiguous pixels come in patches (thin edges,
domain boundaries, whole regions of a close phase); a held-out pixel alone among confident
neighbours would be far easier to vote on than they are.

Pure NumPy: the perturbed spectra are encoded by the caller (through the model server).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from phasestream.kernels.pearson import pearson_maps
from phasestream.models.refine import SPATIAL, refine_ambiguous
from phasestream.models.spatial import distance_to_evidence, hidden_discs, pcc_reliability

__all__ = ["NOISE_SCALES", "HeldOut", "od_noise_level", "pcc_rows", "perturb_confident", "score_spatial",
           "score_strategies"]

#: multiples of the run's OD noise tried in turn, smallest first
NOISE_SCALES = (0.5, 1.0)


@dataclass
class HeldOut:
    """Confident pixels made ambiguous: ``index`` (M,) into the spectra given to
    :func:`perturb_confident`, their perturbed ``spectra`` (M, E), PCC ``pcc`` (M, K) of the
    perturbed spectra, ``truth`` (M,) their unperturbed labels and ``scale`` (M,) the noise multiple."""

    index: np.ndarray
    spectra: np.ndarray
    pcc: np.ndarray
    truth: np.ndarray
    scale: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    @property
    def pcc_accuracy(self) -> float:
        """Fraction of held-out pixels whose perturbed PCC argmax is their true label."""
        return float(np.mean(np.argmax(self.pcc, axis=1) == self.truth)) if len(self) else float("nan")

    def confused_pair(self) -> tuple[int, int] | None:
        """The two phases (indices) most often at the top of the held-out pixels' PCC."""
        if not len(self):
            return None
        top2 = np.sort(np.argsort(-self.pcc, axis=1)[:, :2], axis=1)
        (pair, _), = Counter(map(tuple, top2.tolist())).most_common(1)
        return int(pair[0]), int(pair[1])


def od_noise_level(od: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-energy OD noise (E,) of a cube ``od`` (E, Y, X) inside ``mask`` (Y, X).

    Robust: 1.4826 times the median absolute difference of horizontally adjacent particle pixels,
    over sqrt(2). Phase boundaries barely move a median; NaN pixels are ignored.
    """
    od = np.asarray(od, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    pair = m[:, 1:] & m[:, :-1]
    diff = (od[:, :, 1:] - od[:, :, :-1])[:, pair]
    with np.errstate(all="ignore"):
        sigma = 1.4826 * np.nanmedian(np.abs(diff - np.nanmedian(diff, axis=1, keepdims=True)), axis=1) / np.sqrt(2)
    return np.where(np.isfinite(sigma), sigma, 0.0)


def pcc_rows(spectra: np.ndarray, ref_values: np.ndarray) -> np.ndarray:
    """PCC (N, K) of spectra (N, E) with references (K, E), by the reference kernel ``pearson_maps``."""
    spectra = np.asarray(spectra, dtype=np.float64)
    return pearson_maps(spectra.T[:, :, None], ref_values)[:, :, 0].T


def perturb_confident(
    spectra: np.ndarray,
    labels: np.ndarray,
    ref_values: np.ndarray,
    sigma: np.ndarray,
    *,
    ambiguity: float = 0.005,
    n_max: int = 2000,
    scales: tuple[float, ...] = NOISE_SCALES,
    seed: int = 0,
) -> HeldOut:
    """Make confidently-labelled pixels ambiguous by adding Gaussian noise matched to the run's.

    Parameters
    ----------
    spectra : (N, E) OD spectra of confident pixels at the run's energies (the PCC's)
    labels : (N,) their PCC phase, the truth of the check
    ref_values : (K, E) reference values at the same energies
    sigma : (E,) the run's OD noise per energy (:func:`od_noise_level`)
    ambiguity : a perturbed pixel is held out when its PCC gap falls below this and its own phase's PCC
        is within this of the best (a pixel pushed to a clear wrong phase is a PCC error, not an ambiguity)
    n_max : at most this many held-out pixels
    scales : noise multiples of ``sigma`` tried in turn on the pixels not yet held out
    seed : random seed (pixel order and noise)

    Returns
    -------
    HeldOut
        Possibly empty: a run whose confident pixels stay confident under its own noise added again
        has nothing like an ambiguous pixel to test on.
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pool = rng.permutation(len(spectra))[: max(20 * n_max, 1)]
    taken: list[np.ndarray] = []
    parts: dict[str, list] = {"spectra": [], "pcc": [], "scale": []}
    n = 0
    for scale in scales:
        if n >= n_max or not len(pool):
            break
        noisy = spectra[pool] + rng.normal(size=(len(pool), spectra.shape[1])) * (scale * np.asarray(sigma))
        pcc = pcc_rows(noisy, ref_values)
        ordered = np.sort(np.where(np.isfinite(pcc), pcc, -np.inf), axis=1)
        own = np.where(np.isfinite(pcc), pcc, -np.inf)[np.arange(len(pool)), labels[pool]]
        # ambiguous as real pixels are: in a near tie, with its own phase among those in question
        hit = np.flatnonzero(np.isfinite(ordered[:, -2]) & (ordered[:, -1] - ordered[:, -2] < ambiguity)
                             & (own >= ordered[:, -1] - ambiguity))
        hit = hit[: n_max - n]
        taken.append(pool[hit])
        parts["spectra"].append(noisy[hit])
        parts["pcc"].append(pcc[hit])
        parts["scale"].append(np.full(len(hit), scale))
        n += len(hit)
        pool = np.delete(pool, hit)
    if not taken:
        k = np.asarray(ref_values).shape[0]
        return HeldOut(np.zeros(0, np.int64), np.zeros((0, spectra.shape[1])), np.zeros((0, k)),
                       np.zeros(0, labels.dtype), np.zeros(0))
    index = np.concatenate(taken)
    return HeldOut(index, np.concatenate(parts["spectra"]), np.concatenate(parts["pcc"]), labels[index],
                   np.concatenate(parts["scale"]))


def score_strategies(
    latent_sure: np.ndarray,
    labels_sure: np.ndarray,
    held_index: np.ndarray,
    latent_held: np.ndarray,
    held: HeldOut,
    strategies: tuple[str, ...],
    *,
    ambiguity: float = 0.005,
    candidates: bool = True,
    anchors: np.ndarray | None = None,
    folds: int = 5,
) -> dict[str, float]:
    """Accuracy of each strategy on the held-out pixels, resolved as ambiguous pixels are.

    ``latent_sure`` (M, D) and ``labels_sure`` (M,) are the confident pixels; ``held_index`` (H,)
    the rows of the held-out ones among them, ``latent_held`` (H, D) their perturbed latent points.
    The held-out pixels are scored in ``folds`` folds: each fold's own unperturbed points are left
    out of the clusters (no pixel votes for itself) while the rest stay in, so that the neighbourhood
    of the decision boundary is as populated as it is for the real ambiguous pixels. Each held-out
    point chooses among its perturbed PCC's candidates (``candidates``). ``anchor`` is scored only
    with ``anchors``.
    """
    held_index = np.asarray(held_index)
    fold_of = np.arange(len(held_index)) % max(int(folds), 1)
    right = {s: np.zeros(len(held_index), bool) for s in strategies if s != "anchor" or anchors is not None}
    for fold in np.unique(fold_of):
        rows = np.flatnonzero(fold_of == fold)
        keep = np.ones(len(latent_sure), bool)
        keep[held_index[rows]] = False
        n_sure = int(keep.sum())
        latent = np.concatenate([latent_sure[keep], latent_held[rows]]).astype(np.float64)
        phase = np.concatenate([labels_sure[keep], np.argmax(held.pcc[rows], axis=1)]).astype(np.int16)
        ambiguous = np.r_[np.zeros(n_sure, bool), np.ones(len(rows), bool)]
        pcc = None
        if candidates:
            pcc = np.concatenate([np.zeros((n_sure, held.pcc.shape[1])), held.pcc[rows]]).T
        for strategy in right:
            result = refine_ambiguous(latent, phase, ambiguous, np.ones(len(latent), bool), strategy, pcc=pcc,
                                      ambiguity=ambiguity, anchors=anchors)
            right[strategy][rows] = result.refined_phase[n_sure:] == held.truth[rows]
    return {strategy: float(hits.mean()) for strategy, hits in right.items()}


def score_spatial(
    phase: np.ndarray,
    ambiguous: np.ndarray,
    mask: np.ndarray,
    pcc: np.ndarray | None,
    held_pixels: np.ndarray,
    held: HeldOut,
    strategies: tuple[str, ...],
    *,
    latent: np.ndarray | None = None,
    latent_held: np.ndarray | None = None,
    ambiguity: float = 0.005,
    candidates: bool = True,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of the image strategies (:data:`~phasestream.models.refine.SPATIAL`) on the held-out pixels.

    ``phase``, ``ambiguous``, ``mask`` (Y, X) and ``pcc`` (K, Y, X) are the run's maps, ``held_pixels``
    (H,) the flat image index of each held-out pixel, ``latent`` (Y, X, D) and ``latent_held`` (H, D)
    the latent points (``spatial+knn`` only). In each of ``folds`` folds the fold's held-out pixels
    take their perturbed PCC (phase, candidates) and latent point and become ambiguous, and every
    confident pixel within a radius drawn from the distances of the run's real ambiguous pixels to
    their nearest confident pixel (at least the pixel itself) is hidden from the vote. Returns
    ``{strategy: accuracy}`` against ``held.truth``.
    """
    strategies = tuple(s for s in strategies if s in SPATIAL and (s == "spatial" or latent is not None))
    phase = np.asarray(phase)
    mask = np.asarray(mask, bool)
    ambiguous = np.asarray(ambiguous, bool)
    held_pixels = np.asarray(held_pixels, np.int64)
    sure = mask & ~ambiguous & (phase >= 0)
    real = distance_to_evidence(sure)[ambiguous & mask]
    real = real[np.isfinite(real)]
    rng = np.random.default_rng(seed)
    radii = rng.choice(real, len(held_pixels)) if len(real) else np.ones(len(held_pixels))
    radii = np.maximum(radii, 1.0)
    weight = None if pcc is None else pcc_reliability(pcc)
    fold_of = np.arange(len(held_pixels)) % max(int(folds), 1)
    right = {s: np.zeros(len(held_pixels), bool) for s in strategies}
    for fold in np.unique(fold_of):
        rows = np.flatnonzero(fold_of == fold)
        at = held_pixels[rows]
        hidden = hidden_discs(phase.shape, at, radii[rows]) & sure
        fold_phase = phase.astype(np.int16, copy=True)
        fold_phase.flat[at] = np.argmax(held.pcc[rows], axis=1)
        fold_pcc = None
        if candidates and pcc is not None:
            fold_pcc = np.array(pcc, dtype=np.float64, copy=True).reshape(len(pcc), -1)
            fold_pcc[:, at] = held.pcc[rows].T
            fold_pcc = fold_pcc.reshape(np.shape(pcc))
        fold_latent = None
        if latent is not None:
            fold_latent = np.array(latent, dtype=np.float64, copy=True).reshape(-1, latent.shape[-1])
            fold_latent[at] = latent_held[rows]
            fold_latent = fold_latent.reshape(latent.shape)
        for strategy in strategies:
            use = None if strategy == "spatial" else fold_latent
            inside = mask if use is None else mask & np.isfinite(use).all(axis=-1)
            result = refine_ambiguous(use, fold_phase, ambiguous | hidden, inside, strategy, pcc=fold_pcc,
                                      ambiguity=ambiguity, reliability=weight)
            right[strategy][rows] = result.refined_phase.flat[at] == held.truth[rows]
    return {strategy: float(hits.mean()) for strategy, hits in right.items()}
