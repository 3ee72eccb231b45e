"""STXM noise model: each term against the statistics its parameters set."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from phasestream.sim import LINE_CORRELATED, STXMNoise, make_sample, simulate_stack
from phasestream.sim.noise import beam_fluctuation, sample_drift

ENERGIES = (505.0, 515.0, 525.0)


def _autocorrelation(rows: np.ndarray, lag: int) -> float:
    """Mean lag-``lag`` autocorrelation along axis 1 of zero-mean rows."""
    return float((rows[:, :-lag] * rows[:, lag:]).mean() / (rows * rows).mean())


def test_default_noise_is_todays_poisson_counts():
    sample = make_sample((48, 48), seed=3)
    stack = simulate_stack(sample, ENERGIES, dose=300.0, rng=np.random.default_rng(5))
    rng = np.random.default_rng(5)
    expected = np.stack([sample.transmitted(e, i0=300.0, rng=rng) for e in ENERGIES])
    np.testing.assert_array_equal(stack.counts, expected)
    np.testing.assert_array_equal(stack.beam, 1.0)
    np.testing.assert_array_equal(stack.shifts, 0.0)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(stack.od, np.where(expected > 0, -np.log(expected / 300.0), np.nan))


def test_per_line_i0_variance_matches_line_i0():
    noise = STXMNoise(line_i0=0.03)
    beam = beam_fluctuation((4000, 64), noise, np.random.default_rng(0))
    assert np.allclose(beam, beam[:, :1])  # one factor per line
    assert np.std(beam[:, 0] - 1.0) == pytest.approx(0.03, rel=0.05)
    lines = beam[:, 0] - 1.0
    assert abs(np.corrcoef(lines[:-1], lines[1:])[0, 1]) < 0.05  # independent between lines


@pytest.mark.parametrize("length", [0.0, 4.0, 15.0])
def test_along_line_noise_is_ar1_with_the_given_correlation_length(length):
    noise = STXMNoise(along_line=0.02, along_line_px=length)
    b = beam_fluctuation((3000, 128), noise, np.random.default_rng(1)) - 1.0
    r = np.exp(-1.0 / length) if length else 0.0
    assert b.std() == pytest.approx(0.02, rel=0.03)
    assert b[:, 0].std() == pytest.approx(0.02, rel=0.05)  # stationary from the first pixel
    for lag in (1, 3, 8):
        assert _autocorrelation(b, lag) == pytest.approx(r**lag, abs=0.02)
    between = float((b[:-1] * b[1:]).mean() / (b * b).mean())
    assert abs(between) < 0.02  # none between lines


def test_line_noise_in_measured_od_of_an_empty_field():
    sample = make_sample((256, 256), n_particles=1, seed=0)
    sample.thickness[:] = 0.0
    noise = STXMNoise(poisson=False, line_i0=0.02, along_line=0.01, along_line_px=8.0)
    stack = simulate_stack(sample, ENERGIES, dose=1000.0, noise=noise, rng=1)
    residual = stack.od - stack.clean_od
    np.testing.assert_allclose(residual, -np.log(stack.beam), atol=1e-12)
    line_means = residual.mean(axis=2)
    assert line_means.std() == pytest.approx(0.02, rel=0.12)  # b averages out over 256 px
    within = residual - line_means[..., None]
    assert _autocorrelation(within.reshape(-1, 256), 1) == pytest.approx(np.exp(-1 / 8), abs=0.04)


def test_dark_and_read_noise_add_variance_without_bias():
    sample = make_sample((200, 200), n_particles=1, seed=0)
    sample.thickness[:] = 0.0
    noise = STXMNoise(dark_counts=4.0, read_sigma=3.0)
    stack = simulate_stack(sample, (505.0,), dose=2000.0, noise=noise, rng=2)
    expected = 2000.0 * np.exp(-sample.substrate_od)
    net = stack.counts - 4.0
    assert net.mean() == pytest.approx(expected, rel=2e-3)
    assert net.var() == pytest.approx(expected + 4.0 + 9.0, rel=0.03)


def test_drift_is_a_random_walk_and_moves_the_truth():
    steps = np.diff(sample_drift(20001, 0.5, np.random.default_rng(3)), axis=0)
    assert steps.std(axis=0) == pytest.approx([0.5, 0.5], rel=0.03)
    sample = make_sample((64, 64), seed=2)
    stack = simulate_stack(sample, ENERGIES, dose=500.0, noise=STXMNoise(drift_px=1.0), rng=4)
    assert np.all(stack.shifts[0] == 0) and np.abs(stack.shifts[1:]).max() > 0
    moved = ndimage.shift(sample.optical_density(ENERGIES[2]), stack.shifts[2], order=1, mode="nearest")
    np.testing.assert_allclose(stack.clean_od[2], moved)


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="line_i0"):
        STXMNoise(line_i0=-0.1)
    assert LINE_CORRELATED.line_correlated and not STXMNoise().line_correlated
