"""refine_ambiguous against SciPy / scikit-learn oracles on synthetic latent clusters."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from scipy.stats import chi2
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

from phasestream.models.refine import STRATEGIES, latent_clusters, mahalanobis_squared, refine_ambiguous

COVS = [np.array([[1.0, 0.6, 0.0], [0.6, 1.0, 0.2], [0.0, 0.2, 0.5]]),
        np.array([[0.2, 0.0, 0.0], [0.0, 3.0, -0.5], [0.0, -0.5, 0.4]]),
        np.array([[0.5, 0.1, 0.1], [0.1, 0.5, 0.1], [0.1, 0.1, 0.5]])]
MEANS = [np.array([0.0, 0.0, 0.0]), np.array([4.0, 0.0, 1.0]), np.array([0.0, 5.0, -2.0])]


def _scene(n_side=60, seed=0, p_ambiguous=0.3):
    """(Y, X) image of three latent Gaussian clusters, a mask and random ambiguity; truth labels."""
    rng = np.random.default_rng(seed)
    shape = (n_side, n_side)
    truth = rng.integers(0, 3, shape)
    latent = np.empty((*shape, 3))
    for k in range(3):
        sel = truth == k
        latent[sel] = rng.multivariate_normal(MEANS[k], COVS[k], sel.sum())
    mask = np.ones(shape, bool)
    mask[:5] = False  # background rows
    phase = np.where(mask, truth, -1).astype(np.int16)
    ambiguous = mask & (rng.random(shape) < p_ambiguous)
    # PCC argmax of ambiguous pixels is unreliable: scramble it
    phase[ambiguous] = rng.integers(0, 3, ambiguous.sum())
    return latent, phase, ambiguous, mask, truth


def test_clusters_and_mahalanobis_match_scipy():
    latent, phase, ambiguous, mask, _ = _scene()
    sure = mask & ~ambiguous
    clusters = latent_clusters(latent[sure], phase[sure])
    assert list(clusters.phases) == [0, 1, 2]
    points = latent[ambiguous][:50]
    d2 = mahalanobis_squared(points, clusters)
    for c, k in enumerate(clusters.phases):
        member = latent[sure & (phase == k)]
        cov = np.cov(member, rowvar=False)
        inv = np.linalg.inv(cov)
        expected = [mahalanobis(p, member.mean(axis=0), inv) ** 2 for p in points]
        np.testing.assert_allclose(d2[:, c], expected, rtol=1e-4)


def test_mahalanobis_strategy_equals_scipy_argmin_and_recovers_truth():
    latent, phase, ambiguous, mask, truth = _scene()
    result = refine_ambiguous(latent, phase, ambiguous, mask, "mahalanobis")
    sure = mask & ~ambiguous
    inverses, means = [], []
    for k in range(3):
        member = latent[sure & (phase == k)]
        means.append(member.mean(axis=0))
        inverses.append(np.linalg.inv(np.cov(member, rowvar=False)))
    expected = np.array([np.argmin([mahalanobis(z, means[k], inverses[k]) for k in range(3)])
                         for z in latent[ambiguous]])
    np.testing.assert_array_equal(result.refined_phase[ambiguous], expected)
    np.testing.assert_array_equal(result.refined_phase[sure], phase[sure])  # unambiguous pixels untouched
    assert (result.refined_phase[~mask] == -1).all()
    assert result.reassigned.sum() == ambiguous.sum()
    assert np.mean(result.refined_phase[ambiguous] == truth[ambiguous]) > 0.97


def test_knn_strategy_equals_scikit_learn():
    latent, phase, ambiguous, mask, _ = _scene(seed=1)
    sure = mask & ~ambiguous
    result = refine_ambiguous(latent, phase, ambiguous, mask, "knn", n_neighbors=7, min_agreement=0)
    oracle = KNeighborsClassifier(n_neighbors=7).fit(latent[sure], phase[sure])
    expected = oracle.predict(latent[ambiguous])
    agree = np.mean(result.refined_phase[ambiguous] == expected)
    assert agree > 0.995  # ties in the vote may break differently


def test_knn_keeps_the_pcc_phase_when_neighbours_disagree():
    latent, phase, ambiguous, mask, _ = _scene(seed=1)
    sure = mask & ~ambiguous
    result = refine_ambiguous(latent, phase, ambiguous, mask, "knn", n_neighbors=10, min_agreement=0.8)
    oracle = KNeighborsClassifier(n_neighbors=10).fit(latent[sure], phase[sure])
    proba = oracle.predict_proba(latent[ambiguous])
    confident = proba.max(axis=1) >= 0.8
    assert 0 < confident.sum() < confident.size  # both cases occur
    np.testing.assert_array_equal(result.refined_phase[ambiguous][confident],
                                  oracle.classes_[proba.argmax(axis=1)][confident])
    np.testing.assert_array_equal(result.refined_phase[ambiguous][~confident], phase[ambiguous][~confident])
    assert result.reassigned[ambiguous].sum() == confident.sum()


def test_centroid_strategy_equals_nearest_centroid():
    latent, phase, ambiguous, mask, _ = _scene(seed=2)
    sure = mask & ~ambiguous
    result = refine_ambiguous(latent, phase, ambiguous, mask, "centroid")
    oracle = NearestCentroid().fit(latent[sure], phase[sure])
    np.testing.assert_array_equal(result.refined_phase[ambiguous], oracle.predict(latent[ambiguous]))


def test_anchor_strategy_is_nearest_reference():
    latent, phase, ambiguous, mask, _ = _scene(seed=3)
    anchors = np.array(MEANS) + 0.1
    result = refine_ambiguous(latent, phase, ambiguous, mask, "anchor", anchors=anchors)
    d = np.linalg.norm(latent[ambiguous][:, None, :] - anchors[None], axis=-1)
    np.testing.assert_array_equal(result.refined_phase[ambiguous], np.argmin(d, axis=1))
    with pytest.raises(ValueError, match="anchors"):
        refine_ambiguous(latent, phase, ambiguous, mask, "anchor")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_candidates_restrict_to_phases_in_question(strategy):
    latent, phase, ambiguous, mask, _ = _scene(seed=4)
    rng = np.random.default_rng(0)
    pcc = rng.uniform(0.0, 0.5, (3, *phase.shape))
    pcc[1] = 0.9  # phase 1 is the best everywhere...
    pcc[2] = 0.898  # ...and phase 2 within the ambiguity gap: only they are in question
    result = refine_ambiguous(latent, phase, ambiguous, mask, strategy, pcc=pcc, ambiguity=0.005,
                              anchors=np.array(MEANS), min_agreement=0)
    assert set(np.unique(result.refined_phase[ambiguous])) <= {1, 2}


def test_false_positives_are_outliers_nearer_another_cluster():
    latent, phase, ambiguous, mask, truth = _scene(seed=5, p_ambiguous=0.0)
    sure = mask & ~ambiguous
    # mislabel 30 pixels of cluster 1 as phase 0 (a PCC false positive)
    idx = np.argwhere(sure & (truth == 1))[:30]
    wrong = np.zeros_like(mask)
    wrong[tuple(idx.T)] = True
    phase[wrong] = 0
    result = refine_ambiguous(latent, phase, ambiguous, mask, "mahalanobis", outlier_quantile=0.999)
    clusters = latent_clusters(latent[sure], phase[sure])
    d2 = mahalanobis_squared(latent[sure], clusters)
    own = d2[np.arange(d2.shape[0]), phase[sure]]
    expected = (own > chi2.ppf(0.999, 3)) & (np.argmin(d2, axis=1) != phase[sure])
    np.testing.assert_array_equal(result.false_positive[sure], expected)
    assert result.false_positive[wrong].mean() > 0.5  # the mislabelled points also widen cluster 0
    assert result.false_positive[sure & ~wrong].mean() < 0.01


def test_without_clusters_nothing_changes():
    latent, phase, _, mask, _ = _scene(seed=6)
    result = refine_ambiguous(latent, phase, np.zeros_like(mask) | mask, mask, "mahalanobis")
    np.testing.assert_array_equal(result.refined_phase, phase)
    assert not result.false_positive.any()


def test_bad_input_names_the_problem():
    latent, phase, ambiguous, mask, _ = _scene()
    with pytest.raises(ValueError, match="strategy"):
        refine_ambiguous(latent, phase, ambiguous, mask, "nearest")
    with pytest.raises(ValueError, match="latent"):
        refine_ambiguous(latent[:-1], phase, ambiguous, mask)
    with pytest.raises(ValueError, match="mask"):
        refine_ambiguous(latent, phase, ambiguous, mask[:-1])
