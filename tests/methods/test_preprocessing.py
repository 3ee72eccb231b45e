"""Flat-field and -ln against Beer-Lambert ground truth."""

from __future__ import annotations

import numpy as np

from phasestream.kernels.od import optical_density
from phasestream.methods.preprocessing import flat_field, minus_log, txm_optical_density


def test_flat_field_and_minus_log_recover_the_optical_density():
    rng = np.random.default_rng(0)
    od = rng.uniform(0.0, 3.0, (4, 16, 20))
    illumination = rng.uniform(500, 2000, (4, 16, 20))  # per-energy flat pattern
    dark = rng.uniform(90, 110, (16, 20))
    images = illumination * np.exp(-od) + dark
    flats = illumination + dark
    np.testing.assert_allclose(flat_field(images, flats, dark), np.exp(-od), rtol=1e-6)
    got, valid = txm_optical_density(images, flats, dark)
    np.testing.assert_allclose(got, od, atol=1e-5)
    assert got.dtype == np.float32 and valid.all()


def test_bad_counts_are_nan_with_a_mask_as_in_the_kernels():
    """Zero counts, counts below the dark, no beam: NaN and invalid, the kernels' convention."""
    images = np.array([[[50.0, 10.0, 5.0, 10.0, np.nan]]])
    flats = np.array([[[100.0, 10.0, 100.0, 100.0, 100.0]]])
    t = flat_field(images, flats, 10.0)
    assert t[0, 0, 0] == np.float32(40 / 90) and np.isnan(t[0, 0, 1]) and t[0, 0, 2] < 0 and t[0, 0, 3] == 0
    od, valid = minus_log(t)
    assert valid.tolist() == [[[True, False, False, False, False]]]
    assert np.isnan(od[~valid]).all() and np.isfinite(od[valid]).all()
    np.testing.assert_allclose(od[0, 0, 0], -np.log(40 / 90), rtol=1e-6)
    txm, txm_valid = txm_optical_density(images, flats, 10.0)
    kernel, kernel_valid = optical_density(images[0], flat=flats[0], dark=10.0, backend="numpy")
    np.testing.assert_array_equal(txm_valid[0], kernel_valid)
    np.testing.assert_array_equal(txm[0], kernel)  # NaN where the kernel says NaN, equal elsewhere
    np.testing.assert_array_equal(txm_valid, valid)
