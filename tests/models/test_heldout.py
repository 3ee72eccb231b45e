"""The held-out check's parts against independent oracles (NumPy corrcoef, known noise, known truth)."""

from __future__ import annotations

import numpy as np

from phasestream.models.heldout import HeldOut, od_noise_level, pcc_rows, perturb_confident, score_strategies

REFS = np.array([[0.1, 0.3, 0.9, 1.0, 0.8, 0.7],
                 [0.1, 0.35, 0.85, 1.0, 0.82, 0.7],   # close to the first
                 [0.2, 0.2, 0.4, 0.9, 1.0, 1.0]])


def test_noise_level_recovers_the_noise_added_to_a_smooth_cube():
    rng = np.random.default_rng(0)
    sigma = np.array([0.01, 0.02, 0.05])
    y, x = np.mgrid[0:80, 0:80]
    cube = (0.5 + 0.002 * x + 0.001 * y)[None] * np.array([1.0, 1.5, 2.0])[:, None, None]
    cube = cube + rng.normal(size=cube.shape) * sigma[:, None, None]
    mask = np.ones((80, 80), bool)
    mask[:10] = False
    cube[:, :10] = np.nan
    np.testing.assert_allclose(od_noise_level(cube, mask), sigma, rtol=0.05)


def test_pcc_rows_equal_numpy_corrcoef():
    rng = np.random.default_rng(1)
    spectra = rng.normal(size=(7, REFS.shape[1]))
    expected = np.array([[np.corrcoef(s, r)[0, 1] for r in REFS] for s in spectra])
    np.testing.assert_allclose(pcc_rows(spectra, REFS), expected, atol=1e-6)


def test_perturbed_pixels_are_ambiguous_and_keep_their_label():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 3000)
    spectra = REFS[labels] * rng.uniform(0.5, 1.5, (3000, 1)) + rng.normal(0, 0.01, (3000, REFS.shape[1]))
    held = perturb_confident(spectra, labels, REFS, np.full(REFS.shape[1], 0.01), ambiguity=0.005, n_max=400)
    assert 50 <= len(held) <= 400
    np.testing.assert_array_equal(held.truth, labels[held.index])
    assert len(np.unique(held.index)) == len(held)
    # each held-out spectrum's PCC gap, recomputed with corrcoef, is below the threshold
    pcc = np.array([[np.corrcoef(s, r)[0, 1] for r in REFS] for s in held.spectra])
    top = np.sort(pcc, axis=1)
    assert np.all(top[:, -1] - top[:, -2] < 0.005)
    np.testing.assert_allclose(held.pcc, pcc, atol=1e-6)
    # the close pair (0, 1) is what becomes ambiguous
    assert held.confused_pair() == (0, 1)


def _latent_scene(separable: bool, seed: int = 3):
    """Confident points of 3 phases and 600 held-out points of phases 0/1 whose PCC is right 70% of the time."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 6.0, 0.0]])
    if not separable:
        centres[1] = centres[0]  # the latent space cannot tell phase 1 from phase 0
    labels = rng.integers(0, 3, 6000)
    latent = centres[labels] + rng.normal(0, 0.5, (6000, 3))
    index = np.flatnonzero(labels < 2)[:600]
    truth = labels[index]
    pcc = np.full((600, 3), 0.5)
    right = rng.random(600) < 0.7
    pcc[np.arange(600), np.where(right, truth, 1 - truth)] = 0.999
    pcc[np.arange(600), np.where(right, 1 - truth, truth)] = 0.997
    held = HeldOut(index, np.zeros((600, 1)), pcc, truth, np.ones(600))
    latent_held = latent[index] + rng.normal(0, 0.2, (600, 3))
    return latent, labels, held, latent_held


def test_strategies_beat_pcc_where_the_latent_space_separates_the_phases():
    latent, labels, held, latent_held = _latent_scene(separable=True)
    scores = score_strategies(latent, labels, held.index, latent_held, held, ("knn", "mahalanobis", "centroid"))
    assert abs(held.pcc_accuracy - 0.7) < 0.05
    assert all(acc > 0.95 for acc in scores.values()), scores


def test_no_strategy_beats_pcc_where_the_latent_space_cannot_separate_them():
    latent, labels, held, latent_held = _latent_scene(separable=False)
    scores = score_strategies(latent, labels, held.index, latent_held, held, ("knn", "mahalanobis", "centroid"))
    # chance between two coinciding clusters, or PCC's own phase where knn abstains: never better than PCC
    assert all(acc <= held.pcc_accuracy + 0.01 for acc in scores.values()), (scores, held.pcc_accuracy)
