import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from phasestream.kernels import estimate_i0, optical_density, optical_density_reference, to_numpy
from phasestream.sim.samples import make_sample


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
def test_stxm_od_matches_beer_lambert(backend, dtype):
    rng = np.random.default_rng(1)
    image = rng.integers(1, 60000, size=(37, 53)).astype(dtype)
    od, valid = optical_density(image, 61000.0, backend=backend)
    od, valid = to_numpy(od), to_numpy(valid)
    assert od.dtype == np.float32 and valid.dtype == bool and valid.all()
    np.testing.assert_allclose(od, -np.log(image.astype(np.float64) / 61000.0), rtol=1e-6, atol=1e-6)


def test_txm_od_with_flat_and_dark(backend):
    rng = np.random.default_rng(2)
    dark = np.full((16, 16), 100.0)
    flat = rng.uniform(3000, 5000, (16, 16))
    image = (flat - 100.0) * np.exp(-rng.uniform(0, 2, (16, 16))) + 100.0
    od, valid = optical_density(image, flat=flat, dark=dark, backend=backend)
    expected = -np.log((image - dark) / (flat - dark))
    np.testing.assert_allclose(to_numpy(od), expected, rtol=1e-6, atol=1e-6)
    assert to_numpy(valid).all()


def test_bad_counts_are_masked_not_numbers(backend):
    image = np.array([[1000.0, 0.0, -5.0], [np.nan, np.inf, 500.0]])
    od, valid = optical_density(image, 2000.0, backend=backend)
    od, valid = to_numpy(od), to_numpy(valid)
    np.testing.assert_array_equal(valid, [[True, False, False], [False, False, True]])
    assert np.isnan(od[~valid]).all()
    assert np.isfinite(od[valid]).all()


def test_txm_flat_not_above_dark_is_masked(backend):
    image = np.full((2, 3), 500.0)
    flat = np.array([[1000.0, 100.0, 50.0], [1000.0, np.nan, 1000.0]])
    dark = np.array([[100.0, 100.0, 100.0], [600.0, 100.0, 100.0]])  # image - dark <= 0 at [1, 0]
    od, valid = optical_density(image, flat=flat, dark=dark, backend=backend)
    np.testing.assert_array_equal(to_numpy(valid), [[True, False, False], [False, False, True]])
    assert np.isnan(to_numpy(od)[~to_numpy(valid)]).all()


def test_i0_image_with_non_positive_pixels_masks_them(backend):
    image = np.full((2, 2), 100.0)
    i0 = np.array([[200.0, 0.0], [-1.0, 400.0]])
    od, valid = optical_density(image, i0, backend=backend)
    np.testing.assert_array_equal(to_numpy(valid), [[True, False], [False, True]])
    np.testing.assert_allclose(to_numpy(od)[[0, 1], [0, 1]], [np.log(2), np.log(4)], rtol=1e-6)


@pytest.mark.parametrize("i0", [0.0, -3.0, np.nan, np.inf])
def test_bad_scalar_i0_is_a_clear_error(i0):
    with pytest.raises(ValueError, match="I0 must be a positive finite"):
        optical_density(np.ones((4, 4)), i0)


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="expected a 2D image"):
        optical_density(np.ones((2, 4, 4)), 10.0)
    with pytest.raises(TypeError, match="not an integer or float image"):
        optical_density(np.ones((4, 4), dtype=np.complex64), 10.0)
    with pytest.raises(ValueError, match=r"flat: shape \(3, 3\) does not match \(4, 4\)"):
        optical_density(np.ones((4, 4)), flat=np.ones((3, 3)), dark=0.0)
    with pytest.raises(ValueError, match="dark given without flat"):
        optical_density(np.ones((4, 4)), dark=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="no finite positive counts"):
        optical_density(np.zeros((4, 4)))


def test_estimated_i0_recovers_open_beam_of_simulated_field():
    sample = make_sample((128, 128), n_particles=3, seed=4, substrate_od=0.0)
    counts = sample.transmitted(520.0, i0=8000.0, rng=np.random.default_rng(0))
    # Poisson noise: the median of the open beam is within a few counts of I0
    assert abs(estimate_i0(counts) - 8000.0) < 0.01 * 8000.0
    od, valid = optical_density(counts.astype(np.uint16))
    truth = sample.optical_density(520.0)
    inside = sample.particle & valid
    assert np.median(np.abs(od[inside] - truth[inside])) < 0.03


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, (5, 7), elements=st.floats(allow_nan=True, allow_infinity=True) | st.floats(-1e6, 1e6)))
def test_numba_equals_numpy_reference_on_any_input(image):
    from phasestream.kernels import _numba

    ref, dark = np.float64(1234.5), np.float64(0.0)
    od_np, valid_np = optical_density_reference(image, ref, dark)
    od_nb, valid_nb = _numba.optical_density(image, ref, dark)
    np.testing.assert_array_equal(valid_nb, valid_np)
    np.testing.assert_allclose(od_nb, od_np, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("dark", [0.0, 100.0])
def test_numba_table_path_equals_reference_for_every_count(dtype, dark):
    from phasestream.kernels import _numba

    counts = np.arange(np.iinfo(dtype).max + 1, dtype=dtype).reshape(-1, 64 if dtype == np.uint16 else 16)
    od_nb, valid_nb = _numba.optical_density(counts, 70000.0, dark)
    od_np, valid_np = optical_density_reference(counts, 70000.0, dark)
    np.testing.assert_array_equal(valid_nb, valid_np)
    np.testing.assert_array_equal(valid_nb, counts.astype(float) - dark > 0)
    np.testing.assert_allclose(od_nb, od_np, rtol=2e-7, atol=1e-7, equal_nan=True)
