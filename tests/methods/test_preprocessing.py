"""Flat-field and -ln against Beer-Lambert ground truth."""

from __future__ import annotations

import numpy as np

from phasestream.methods.preprocessing import flat_field, minus_log, txm_optical_density


def test_flat_field_and_minus_log_recover_the_optical_density():
    rng = np.random.default_rng(0)
    od = rng.uniform(0.0, 3.0, (4, 16, 20))
    illumination = rng.uniform(500, 2000, (4, 16, 20))  # per-energy flat pattern
    dark = rng.uniform(90, 110, (16, 20))
    images = illumination * np.exp(-od) + dark
    flats = illumination + dark
    np.testing.assert_allclose(flat_field(images, flats, dark), np.exp(-od), rtol=1e-6)
    np.testing.assert_allclose(txm_optical_density(images, flats, dark), od, atol=1e-5)
    assert txm_optical_density(images, flats, dark).dtype == np.float32


def test_no_beam_is_nan_and_dark_pixels_are_clipped():
    images = np.array([[50.0, 10.0, 5.0]])
    flats = np.array([[100.0, 10.0, 100.0]])
    t = flat_field(images, flats, 10.0)
    assert t[0, 0] == np.float32(40 / 90) and np.isnan(t[0, 1]) and t[0, 2] < 0
    od = minus_log(t, floor=1e-3)
    assert np.isnan(od[0, 1]) and od[0, 2] == np.float32(-np.log(1e-3))
    np.testing.assert_allclose(od[0, 0], -np.log(40 / 90), rtol=1e-6)
