"""GMVAE network, loss and training (real TensorFlow, small sizes)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from phasestream.models.gmvae import GMVAE, cluster_purity, fit_normalization, train_gmvae


def _spectra(n=600, e=13, seed=0):
    """Two spectral shapes with thickness variation and noise; labels 0/1."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, e)
    shapes = np.stack([np.exp(-((grid - 0.3) / 0.1) ** 2), np.exp(-((grid - 0.7) / 0.1) ** 2)]) + 0.2
    labels = rng.integers(0, 2, n)
    thickness = rng.uniform(0.5, 1.5, n)[:, None]
    x = thickness * shapes[labels] + rng.normal(0, 0.01, (n, e))
    return x.astype(np.float32), labels


def _numpy_loss(model: GMVAE, x: np.ndarray, y: np.ndarray | None = None) -> tuple[float, ...]:
    """The documented loss, recomputed in NumPy from the network's outputs (training=False)."""
    out = {k: np.asarray(v, dtype=np.float64) for k, v in model(x, training=False).items()}
    norm = model.normalization
    target = x.astype(np.float64)
    if norm["mode"] == "spectrum":
        c = target - target.mean(axis=1, keepdims=True)
        target = c / (np.sqrt((c**2).mean(axis=1, keepdims=True)) + 1e-6)
    target = (target - np.asarray(norm["mean"])) / np.asarray(norm["scale"])
    rec = ((target - out["reconstruction"]) ** 2).sum(axis=1)
    mu, lv, pi = out["z_mean"], out["z_log_var"], out["components"]
    pm, plv = np.asarray(model.prior_mean), np.asarray(model.prior_log_var)
    k = pi.shape[1]
    kl_gauss = np.zeros((len(x), k))
    for c in range(k):
        kl_gauss[:, c] = 0.5 * (plv[c] - lv + (np.exp(lv) + (mu - pm[c]) ** 2) / np.exp(plv[c]) - 1).sum(axis=1)
    kl = (pi * kl_gauss).sum(axis=1) + (pi * np.log(pi * k + 1e-6)).sum(axis=1)
    total = rec + model.beta * kl
    supervision = np.zeros(len(x))
    if y is not None:
        labelled = y >= 0
        supervision[labelled] = -np.log(pi[labelled, y[labelled]] + 1e-6)
        total = total + model.supervision_weight * supervision
    return total.mean(), rec.mean(), kl.mean(), supervision.mean()


@pytest.mark.parametrize("mode", ["feature", "spectrum"])
def test_loss_matches_numpy(mode):
    x, _ = _spectra(64)
    model = GMVAE(13, n_components=3, hidden=(32, 16, 8, 4), beta=0.7, normalization=fit_normalization(x, mode))
    model.build_for_inference()
    outputs = model(x, training=False)
    got = [float(v) for v in model.losses_of(x, outputs)]
    np.testing.assert_allclose(got, _numpy_loss(model, x), rtol=1e-4)


def test_supervised_loss_matches_numpy():
    """Labelled spectra add gamma x the cross-entropy of q(c|x); unlabelled ones (-1) add nothing."""
    x, labels = _spectra(64)
    y = np.where(np.arange(64) % 3 == 0, -1, labels)
    model = GMVAE(13, n_components=3, hidden=(32, 16, 8, 4), beta=0.7, supervision_weight=2.5,
                  normalization=fit_normalization(x, "feature"))
    model.build_for_inference()
    got = [float(v) for v in model.losses_of(x, model(x, training=False), y)]
    expected = _numpy_loss(model, x, y)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert expected[3] > 0 and got[0] > float(model.losses_of(x, model(x, training=False))[0])


def test_normalization_is_part_of_the_model():
    x, _ = _spectra(200)
    norm = fit_normalization(x, "feature")
    np.testing.assert_allclose(norm["mean"], x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(norm["scale"], x.std(axis=0), rtol=1e-4)
    model = GMVAE(13, hidden=(8, 8, 8, 8), normalization=norm).build_for_inference()
    z = np.asarray(model.normalize(x))
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-3)
    spectrum = fit_normalization(x, "spectrum")
    scaled = GMVAE(13, hidden=(8, 8, 8, 8), normalization=spectrum).build_for_inference()
    # shape-only: a spectrum and twice it normalize the same
    np.testing.assert_allclose(np.asarray(scaled.normalize(x[:5])), np.asarray(scaled.normalize(2 * x[:5])),
                               atol=1e-4)


@pytest.mark.slow  # make test-stack
def test_training_learns_and_reports_metrics():
    x, labels = _spectra(800)
    result = train_gmvae(x, labels=labels, n_components=2, hidden=(64, 32, 16, 8), epochs=40, batch_size=32,
                         learning_rate=3e-3, dropout=0.0, beta=0.2, normalization="spectrum", progress=False, seed=1)
    assert result.split == {"train": 760, "validation": 20, "test": 20}
    assert result.history["loss"][-1] < result.history["loss"][0]
    # two clean shapes: reconstruction far better than predicting the mean (MSE 1 in normalized units)
    assert result.metrics["test_reconstruction_mse"] < 0.3
    assert result.metrics["cluster_purity"] >= 0.5
    latent, components = result.model.encode(x)
    assert latent.shape == (800, 3) and components.shape == (800, 2)
    np.testing.assert_allclose(components.sum(axis=1), 1, rtol=1e-5)
    # the two shapes separate in the latent space: a linear classifier on the latent is nearly perfect
    from sklearn.linear_model import LogisticRegression

    assert LogisticRegression().fit(latent, labels).score(latent, labels) > 0.95


def test_cluster_purity_oracle():
    comps = np.eye(3)[[0, 0, 0, 1, 1, 2]]
    labels = np.array([4, 4, 2, 2, 2, 3])
    assert cluster_purity(comps, labels) == pytest.approx(5 / 6)


def test_bad_training_input_is_refused():
    x, _ = _spectra(100)
    with pytest.raises(ValueError, match="at least 40"):
        train_gmvae(x[:10], progress=False)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_gmvae(x, progress=False)
    model = GMVAE(13, hidden=(8, 8, 8, 8)).build_for_inference()
    with pytest.raises(ValueError, match=r"\(N, 13\)"):
        model.encode(np.zeros((4, 12), np.float32))
