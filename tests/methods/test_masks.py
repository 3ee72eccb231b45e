"""Threshold masks and k-means clusters against NumPy and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from phasestream.methods.masks import combine_masks, kmeans_clusters, threshold_mask


def test_threshold_and_combination():
    values = np.array([[0.1, 0.5, np.nan], [0.9, 0.3, 0.7]])
    np.testing.assert_array_equal(threshold_mask(values, low=0.3), [[0, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(threshold_mask(values, high=0.5), [[1, 1, 0], [0, 1, 0]])
    both = combine_masks(threshold_mask(values, low=0.3), threshold_mask(values, high=0.5))
    np.testing.assert_array_equal(both, (values >= 0.3) & (values <= 0.5))
    np.testing.assert_array_equal(combine_masks(values > 0.8, values < 0.2, how="or"), [[1, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError):
        threshold_mask(values)


def _clustered(seed=0, shape=(30, 40), n_e=50):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, n_e))
    truth = rng.integers(0, 3, shape)
    spectra = centres[truth].transpose(2, 0, 1) + rng.normal(0, 0.3, (n_e, *shape))
    return spectra, truth


def test_kmeans_matches_scikit_learn_and_ground_truth():
    spectra, truth = _clustered()
    res = kmeans_clusters(spectra, 3, seed=0, max_samples=None)
    flat = spectra.reshape(spectra.shape[0], -1).T
    oracle = KMeans(3, n_init=4, random_state=0).fit(flat)
    np.testing.assert_array_equal(res.labels.ravel(), oracle.labels_)
    assert res.inertia == pytest.approx(oracle.inertia_, rel=1e-6)
    assert adjusted_rand_score(truth.ravel(), res.labels.ravel()) == 1.0
    for c in range(3):
        np.testing.assert_allclose(res.mean_spectra[c], flat[oracle.labels_ == c].mean(axis=0))
    np.testing.assert_array_equal(res.counts, np.bincount(oracle.labels_))


def test_kmeans_mask_subsampling_and_nan():
    spectra, truth = _clustered(seed=1)
    spectra[:, 0, 0] = np.nan
    mask = np.ones(truth.shape, bool)
    mask[:5] = False
    res = kmeans_clusters(spectra, 3, mask=mask, max_samples=300, seed=1)
    assert (res.labels[:5] == -1).all() and res.labels[5:].min() >= 0
    assert adjusted_rand_score(truth[5:].ravel(), res.labels[5:].ravel()) == 1.0
    assert res.counts.sum() == mask.sum()
    with pytest.raises(ValueError, match="fewer than"):
        kmeans_clusters(spectra, 3, mask=np.zeros(truth.shape, bool))


def test_kmeans_without_the_first_principal_component_matches_scikit_learn_pca():
    """remove_components=1 clusters what is left after the first PC: the same labels as scikit-learn's
    KMeans on the data with PCA's first component projected out."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(7)
    shapes = np.stack([np.sin(np.linspace(0, 3, 30)), np.cos(np.linspace(0, 3, 30))])
    labels_true = rng.integers(0, 2, 400)
    scale = rng.uniform(0.2, 3.0, 400)  # the first PC: overall intensity, which must not drive the clusters
    data = scale[:, None] * (1 + 0.3 * shapes[labels_true]) + rng.normal(0, 0.01, (400, 30))
    res = kmeans_clusters(data.T.reshape(30, 20, 20), 2, remove_components=1)
    pca = PCA(n_components=1).fit(data)
    centred = data - data.mean(axis=0)
    residual = centred - (centred @ pca.components_.T) @ pca.components_
    oracle = KMeans(n_clusters=2, n_init=4, random_state=0).fit(residual).labels_
    assert adjusted_rand_score(oracle, res.labels.ravel()) == pytest.approx(1.0)
