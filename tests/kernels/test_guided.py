"""Guide-weighted local sums (the denoiser's spectral-shape averaging) against SciPy's convolution."""

import numpy as np
import pytest
from scipy import ndimage

from phasestream.kernels.guided import guided_sums, guided_sums_reference


def _disc(radius: int, skip_row: bool = False) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disc = (y**2 + x**2 <= radius**2).astype(float)
    if skip_row:
        disc[radius] = 0.0
    return disc


@pytest.mark.parametrize("skip_row", [False, True])
@pytest.mark.parametrize("radius", [0, 1, 4])
def test_a_flat_guide_gives_disc_sums(backend, radius, skip_row):
    """With one guide value everywhere every weight is 1: the sums are a convolution with the disc."""
    rng = np.random.default_rng(radius)
    values = rng.normal(size=(3, 23, 31))
    out = guided_sums(np.zeros((2, 23, 31)), values, radius, skip_row=skip_row, backend=backend)
    for c in range(3):
        expected = ndimage.convolve(values[c], _disc(radius, skip_row), mode="constant", cval=0.0)
        np.testing.assert_allclose(out[c], expected, atol=1e-10)


def test_far_apart_guide_values_never_mix(backend):
    """Two regions whose guides differ by 40 tolerances: each pixel sums its own region only."""
    rng = np.random.default_rng(5)
    labels = (ndimage.gaussian_filter(rng.normal(size=(40, 40)), 4) > 0).astype(float)
    values = rng.normal(size=(1, 40, 40))
    out = guided_sums(40.0 * labels[None], values, 5, backend=backend)[0]
    disc = _disc(5)
    expected = sum(m * ndimage.convolve(values[0] * m, disc, mode="constant") for m in (labels, 1.0 - labels))
    np.testing.assert_allclose(out, expected, atol=1e-10)


def test_weights_are_gaussian_in_the_guide_distance(backend):
    """Radius 1, one guide step of d between two columns: the cross weight is exp(-d^2 / 2)."""
    guide = np.zeros((1, 3, 2))
    guide[0, :, 1] = 1.5
    out = guided_sums(guide, np.ones((1, 3, 2)), 1, backend=backend)[0]
    # the centre-left pixel sees itself, up, down (weight 1) and its right neighbour (exp(-1.125))
    assert out[1, 0] == pytest.approx(3.0 + np.exp(-0.5 * 1.5**2), abs=1e-12)


def test_numba_matches_the_numpy_reference():
    rng = np.random.default_rng(9)
    guide, values = rng.normal(size=(3, 37, 29)), rng.normal(size=(2, 37, 29))
    for skip_row in (False, True):
        np.testing.assert_allclose(guided_sums(guide, values, 6, skip_row=skip_row, backend="numba"),
                                   guided_sums_reference(guide, values, 6, skip_row=skip_row), atol=1e-10)


@pytest.mark.parametrize(("guide", "values", "radius", "message"), [
    (np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), 1, "share Y, X"),
    (np.zeros((4, 4)), np.zeros((1, 4, 4)), 1, "share Y, X"),
    (np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4)), 1, "finite"),
    (np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), -1, "non-negative integer"),
    (np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), 1.5, "non-negative integer"),
])
def test_bad_inputs_are_named(guide, values, radius, message):
    with pytest.raises(ValueError, match=message):
        guided_sums(guide, values, radius, backend="numpy")
