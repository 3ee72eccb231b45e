"""Vectorized LCF against per-pixel SciPy / NumPy oracles and a small QP solver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize, nnls

from phasestream.methods.lcf import linear_combination_fit, polynomial_background
from phasestream.references import load_references

NI = Path(__file__).resolve().parents[1] / "data" / "ni-k-edge"  # tests/data/ni-k-edge/README.md


def _problem(k=3, n_e=40, shape=(6, 7), seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    e = np.linspace(8300.0, 8400.0, n_e)
    refs = np.stack([1 / (1 + np.exp(-(e - c) / 3.0)) + 0.2 * np.exp(-((e - c - 8) / 4) ** 2)
                     for c in np.linspace(8330, 8345, k)])
    x = rng.uniform(-0.3, 1.0, (k, *shape))  # some weights negative: constraints become active
    y = np.tensordot(refs.T, x, axes=1) * scale + rng.normal(0, 0.05, (n_e, *shape))
    return e, refs, y


def test_lstsq_equals_numpy_per_pixel():
    e, refs, y = _problem()
    res = linear_combination_fit(y, refs, method="lstsq")
    flat = y.reshape(len(e), -1)
    coef, rss = np.linalg.lstsq(refs.T, flat, rcond=None)[:2]
    np.testing.assert_allclose(res.fractions.reshape(3, -1), coef, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.fit_error.ravel(), rss, rtol=1e-4)
    np.testing.assert_allclose(res.reduced_chi2.ravel(), rss / (len(e) - 3), rtol=1e-4)
    assert res.fractions.shape == (3, 6, 7) and res.fractions.dtype == np.float32


def test_lstsq_with_background_equals_numpy():
    e, refs, y = _problem(seed=1)
    y = y + (0.3 - 0.002 * (e - 8350))[:, None, None]
    res = linear_combination_fit(y, refs, method="lstsq", energies=e, background_order=1)
    design = np.concatenate([refs.T, polynomial_background(e, 1)], axis=1)
    coef, rss = np.linalg.lstsq(design, y.reshape(len(e), -1), rcond=None)[:2]
    np.testing.assert_allclose(res.fractions.reshape(3, -1), coef[:3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.background.reshape(2, -1), coef[3:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.fit_error.ravel(), rss, rtol=1e-4)


@pytest.mark.parametrize("background_order", [None, 0, 2])
def test_nnls_equals_scipy_per_pixel(background_order):
    e, refs, y = _problem(k=4, seed=2)
    res = linear_combination_fit(y, refs, method="nnls", energies=e, background_order=background_order)
    flat = y.reshape(len(e), -1)
    bg = polynomial_background(e, background_order)
    # oracle: eliminate the free background by projection, then scipy's NNLS
    proj = np.eye(len(e)) - bg @ np.linalg.pinv(bg) if bg.shape[1] else np.eye(len(e))
    assert (res.fractions >= 0).all()
    n_active = 0
    for j in range(flat.shape[1]):
        x, norm = nnls(proj @ refs.T, proj @ flat[:, j])
        np.testing.assert_allclose(res.fractions.reshape(4, -1)[:, j], x, atol=2e-5)
        np.testing.assert_allclose(res.fit_error.ravel()[j], norm**2, rtol=1e-4)
        n_active += (x == 0).any()
    assert n_active > 5  # the test exercises active constraints


def _slsqp(a, y):
    k = a.shape[1]
    result = minimize(lambda x: np.sum((a @ x - y) ** 2), np.full(k, 1 / k), jac=lambda x: 2 * a.T @ (a @ x - y),
                      bounds=[(0, None)] * k, constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
                      method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    return result.x, result.fun


def test_fully_constrained_equals_slsqp():
    e, refs, y = _problem(k=3, seed=3, shape=(5, 8))
    res = linear_combination_fit(y, refs, method="fcls")
    np.testing.assert_allclose(res.fractions.sum(axis=0), 1.0, atol=1e-5)
    assert (res.fractions >= 0).all()
    flat = y.reshape(len(e), -1)
    on_boundary = 0
    for j in range(flat.shape[1]):
        x, fun = _slsqp(refs.T, flat[:, j])
        np.testing.assert_allclose(res.fractions.reshape(3, -1)[:, j], x, atol=2e-4)
        assert res.fit_error.ravel()[j] <= fun * (1 + 1e-5) + 1e-9  # never worse than the QP solver
        on_boundary += (x < 1e-6).any()
    assert on_boundary > 5
    assert res.reduced_chi2.ravel()[0] == pytest.approx(res.fit_error.ravel()[0] / (len(e) - 2), rel=1e-5)


def test_fully_constrained_is_the_best_feasible_point_on_a_grid():
    """Exhaustive check for K = 2: the sum-to-one line sampled finely never beats the fit."""
    refs_set = load_references([f"{NI}/ref_NiO.txt", f"{NI}/ref_LiNiO2.txt"])
    e = np.linspace(8320, 8400, 60)
    refs = refs_set.interpolate(e)
    rng = np.random.default_rng(4)
    truth = rng.uniform(-0.2, 1.2, 50)
    y = np.outer(refs[0], truth) + np.outer(refs[1], 1 - truth) + rng.normal(0, 0.05, (60, 50))
    res = linear_combination_fit(y, refs, method="fcls")
    grid = np.linspace(0, 1, 20001)
    rss = ((y[:, None, :] - (np.outer(refs[0], grid)[:, :, None] + np.outer(refs[1], 1 - grid)[:, :, None])) ** 2)\
        .sum(axis=0)
    best = grid[np.argmin(rss, axis=0)]
    np.testing.assert_allclose(res.fractions[0], best, atol=1e-4)
    assert ((res.fractions[0] == 0) | (res.fractions[0] == 1)).sum() > 3  # clipped cases exist


def test_reduced_chi2_with_known_noise():
    _e, refs, y = _problem(k=2, n_e=200, shape=(40, 40), seed=5)
    res = linear_combination_fit(y, refs, method="lstsq", noise_sigma=0.05)
    # E[chi2 / (E - K)] = 1; 1600 pixels with 198 degrees of freedom: standard error 0.0025
    assert res.reduced_chi2.mean() == pytest.approx(1.0, abs=0.01)
    sigma_map = np.full((40, 40), 0.1)
    np.testing.assert_allclose(linear_combination_fit(y, refs, method="lstsq", noise_sigma=sigma_map).reduced_chi2,
                               res.reduced_chi2 / 4, rtol=1e-5)


def test_bad_input():
    _e, refs, y = _problem()
    with pytest.raises(ValueError, match="method"):
        linear_combination_fit(y, refs, method="ridge")
    with pytest.raises(ValueError, match="energies"):
        linear_combination_fit(y[:-1], refs)
    with pytest.raises(ValueError, match="linearly dependent"):
        linear_combination_fit(y, np.stack([refs[0], 2 * refs[0]]))
    with pytest.raises(ValueError, match="needs the energies"):
        linear_combination_fit(y, refs, background_order=1)


@pytest.mark.parametrize("method", ["lstsq", "nnls", "fcls"])
def test_nan_in_nan_out(method):
    """A pixel with a NaN at one energy gives NaN everywhere; the finite pixels match SciPy / NumPy."""
    e, refs, y = _problem(k=3, seed=5, shape=(4, 5))
    y[7, 1, 2] = np.nan  # one energy of one pixel
    y[:, 3, 4] = np.nan  # a whole pixel
    res = linear_combination_fit(y, refs, method=method, energies=e, background_order=0)
    bad = np.zeros((4, 5), bool)
    bad[1, 2] = bad[3, 4] = True
    assert np.isnan(res.fractions[:, bad]).all() and np.isnan(res.background[:, bad]).all()
    assert np.isnan(res.fit_error[bad]).all() and np.isnan(res.reduced_chi2[bad]).all()
    assert np.isfinite(res.fractions[:, ~bad]).all()
    flat, good = y.reshape(len(e), -1), ~bad.ravel()
    bg = polynomial_background(e, 0)
    proj = np.eye(len(e)) - bg @ np.linalg.pinv(bg)
    for j in np.flatnonzero(good):
        if method == "lstsq":
            x = np.linalg.lstsq(np.concatenate([refs.T, bg], axis=1), flat[:, j], rcond=None)[0][:3]
        elif method == "nnls":
            x = nnls(proj @ refs.T, proj @ flat[:, j])[0]
        else:
            x = _slsqp(proj @ refs.T, proj @ flat[:, j])[0]
        np.testing.assert_allclose(res.fractions.reshape(3, -1)[:, j], x, atol=2e-4)
    if method == "fcls":  # sum to one wherever defined
        np.testing.assert_allclose(res.fractions[:, ~bad].sum(axis=0), 1.0, atol=1e-5)
