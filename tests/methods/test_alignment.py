"""Stack alignment recovers known sub-pixel shifts and a known rotation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.transform import AffineTransform, warp

from phasestream.methods.alignment import align_stack, register_pair
from phasestream.sim.phantoms import particle_phantom


def _fourier_shift(image, shift):
    return np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(image), shift)).real


@pytest.fixture(scope="module")
def image():
    # particles inside a flat 16-pixel border: crops and shifts see no edge discontinuity
    inner = particle_phantom((64, 64), n_particles=5, seed=3).astype(np.float64)
    return ndimage.gaussian_filter(np.pad(inner, 16, constant_values=0.1), 1.0)


SHIFTS = np.array([[0.0, 0.0], [1.37, -2.62], [-0.41, 0.88], [3.05, 1.5], [-2.2, -0.73]])


@pytest.mark.parametrize("chain", [False, True])
def test_translation_recovers_subpixel_shifts(image, chain):
    # the contrast changes from image to image, as across an absorption edge
    stack = np.stack([(0.5 + 0.2 * i) * _fourier_shift(image, s) for i, s in enumerate(SHIFTS)])
    result = align_stack(stack, reference=0, chain=chain)
    np.testing.assert_allclose(result.shifts, -SHIFTS, atol=0.03)
    np.testing.assert_allclose(result.matrices[:, :2, 2], SHIFTS[:, ::-1], atol=0.03)
    inner = (slice(None), slice(8, -8), slice(8, -8))
    undone = result.aligned / (0.5 + 0.2 * np.arange(5))[:, None, None]
    assert np.abs(undone[inner] - image[8:-8, 8:-8]).max() < 0.05 * np.ptp(image)


def test_reference_and_roi(image):
    stack = np.stack([_fourier_shift(image, s) for s in SHIFTS])
    result = align_stack(stack, reference=-1, roi=(slice(6, 90), slice(4, 88)))
    assert result.reference == 4
    np.testing.assert_allclose(result.shifts, SHIFTS[4] - SHIFTS, atol=0.03)


@pytest.mark.parametrize("transform", ["rigid", "affine"])
def test_rotation_is_recovered(image, transform):
    angle = np.deg2rad(2.0)
    centre = np.array([47.5, 47.5])
    rot = AffineTransform(rotation=angle)
    # inverse map about the centre, plus a shift
    truth = AffineTransform(translation=centre + np.array([1.3, -0.8])).params @ rot.params @ \
        AffineTransform(translation=-centre).params
    moving = warp(image, np.linalg.inv(truth), order=3, mode="edge", preserve_range=True)  # image at truth(x)
    _, matrix = register_pair(image, moving, transform=transform)
    np.testing.assert_allclose(matrix[:2, :2], truth[:2, :2], atol=0.002)
    # the recovered map sends the centre where the true map does, within a twentieth of a pixel
    np.testing.assert_allclose((matrix @ [*centre, 1])[:2], (truth @ [*centre, 1])[:2], atol=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="transform"):
        align_stack(np.zeros((2, 8, 8)), transform="elastic")
    with pytest.raises(ValueError, match="reference"):
        align_stack(np.zeros((2, 8, 8)), reference=5)
