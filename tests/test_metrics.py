"""Image-quality metrics against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import erf

from phasestream.metrics import cnr, edge_fwhm, edge_points, line_profile, psnr, sift_matches, ssim
from phasestream.sim.phantoms import particle_phantom


def test_psnr_is_the_formula():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 2, (64, 64))
    img = ref + rng.normal(0, 0.1, ref.shape)
    mse = np.mean((img - ref) ** 2)
    assert psnr(ref, img) == pytest.approx(10 * np.log10((ref.max() - ref.min()) ** 2 / mse), rel=1e-9)
    assert psnr(ref, img, data_range=1.0) == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-9)


def test_ssim_is_one_for_identical_and_falls_with_noise():
    ref = particle_phantom((96, 96), seed=1)
    rng = np.random.default_rng(1)
    assert ssim(ref, ref) == pytest.approx(1.0)
    values = [ssim(ref, ref + rng.normal(0, s, ref.shape)) for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2]


def test_cnr_is_the_formula():
    rng = np.random.default_rng(2)
    image = np.zeros((100, 100))
    fg = np.zeros_like(image, bool)
    fg[:50] = True
    image[fg] = rng.normal(5.0, 0.5, fg.sum())
    image[~fg] = rng.normal(1.0, 0.3, (~fg).sum())
    expected = abs(image[fg].mean() - image[~fg].mean()) / np.sqrt(image[fg].var() + image[~fg].var())
    assert cnr(image, fg, ~fg) == pytest.approx(expected)
    assert cnr(image, fg, ~fg) == pytest.approx(4.0 / np.sqrt(0.25 + 0.09), rel=0.05)


@pytest.mark.parametrize("sigma", [1.5, 3.0, 5.0])
def test_edge_fwhm_of_a_gaussian_blurred_step(sigma):
    x = np.arange(-40, 41, 0.5)
    profile = 0.5 * (1 + erf(x / (np.sqrt(2) * sigma)))  # derivative: Gaussian of width sigma
    assert edge_fwhm(profile, spacing=0.5) == pytest.approx(2 * np.sqrt(2 * np.log(2)) * sigma, rel=0.02)


def test_edge_points_and_profiles_measure_blur():
    image = np.zeros((96, 96))
    image[:, 48:] = 1.0
    blurred = ndimage.gaussian_filter(image, 2.0)
    points, normals = edge_points(image, n=5, min_distance=10)
    assert len(points) > 0 and np.allclose(np.abs(normals[:, 1]), 1.0, atol=1e-6)
    widths = [edge_fwhm(line_profile(blurred, p, n, length=31), spacing=0.5) for p, n in zip(points, normals,
                                                                                             strict=True)]
    assert np.median(widths) == pytest.approx(2.3548 * 2.0, rel=0.05)


def test_sift_congruent_points():
    a = particle_phantom((192, 192), seed=3)
    noise = np.random.default_rng(3).uniform(0, 1, a.shape)
    same = sift_matches(a, a)
    assert same >= 10
    assert sift_matches(a, noise) < same / 3


def test_hf_correlation_against_a_difference_of_gaussians_oracle():
    from scipy import ndimage

    from phasestream.metrics import hf_correlation

    rng = np.random.default_rng(4)
    reference = ndimage.gaussian_filter(rng.normal(size=(64, 64)), 1.0)
    image = reference + 0.5 * ndimage.gaussian_filter(rng.normal(size=(64, 64)), 0.8)

    def dog(a):
        return ndimage.gaussian_filter(a, 0.75) - ndimage.gaussian_filter(a, 2.0)

    expected = np.corrcoef(dog(reference).ravel(), dog(image).ravel())[0, 1]
    assert hf_correlation(reference, image) == pytest.approx(expected, rel=1e-9)
    assert hf_correlation(reference, reference) == pytest.approx(1.0)
    smooth = ndimage.gaussian_filter(reference, 3.0)  # fine detail lost
    assert hf_correlation(reference, smooth) < hf_correlation(reference, image)
