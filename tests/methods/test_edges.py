"""Edge-50 and peak-position maps on spectra with known edge and peak energies."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from phasestream.methods.edges import edge50_map, fit_curves, peak_position_map

E = np.arange(8300.0, 8400.0, 1.0)


@pytest.mark.parametrize("fit", ["polynomial", "spline"])
def test_edge50_recovers_known_edge_positions(fit):
    rng = np.random.default_rng(0)
    centres = rng.uniform(8340, 8350, (6, 5))
    stack = expit((E[:, None, None] - centres) / 2.0)  # crosses 0.5 exactly at the centre
    window = (centres.min() - 6, centres.max() + 6)
    got = edge50_map(stack, E, window, fit=fit, order=7, knot_spacing=3.0)
    np.testing.assert_allclose(got, centres, atol=0.05)
    assert got.dtype == np.float32 and got.shape == (6, 5)


@pytest.mark.parametrize(("fit", "atol"), [("polynomial", 0.1), ("spline", 0.05)])
def test_peak_position_recovers_known_peaks(fit, atol):
    rng = np.random.default_rng(1)
    peaks = rng.uniform(8355, 8365, (4, 7))
    stack = 1.0 + 0.5 * np.exp(-(((E[:, None, None] - peaks) / 6.0) ** 2))
    got = peak_position_map(stack, E, (8348, 8372), fit=fit, order=8, knot_spacing=2.0, step=0.01)
    np.testing.assert_allclose(got, peaks, atol=atol)


def test_polynomial_fit_equals_numpy_polyfit_and_missing_crossings_are_nan():
    rng = np.random.default_rng(2)
    y = rng.normal(0, 1, (E.size, 3))
    grid, curves = fit_curves(y, E, (8320, 8340), order=2, step=0.5)
    inside = (E >= 8320) & (E <= 8340)
    for j in range(3):
        np.testing.assert_allclose(curves[:, j], np.polyval(np.polyfit(E[inside], y[inside, j], 2), grid), atol=1e-8)
    flat = np.zeros((E.size, 2, 2))
    flat[:, 0, 0] = np.nan
    assert np.isnan(edge50_map(flat, E, (8320, 8360))).all()
    with pytest.raises(ValueError, match="fit must be"):
        fit_curves(y, E, (8320, 8340), fit="lowess")
    with pytest.raises(ValueError, match="holds 2 energies"):
        fit_curves(y, E, (8320, 8321))
