"""Edge normalization of synthetic edges with known pre-edge, post-edge lines and jump."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf

from phasestream.methods.normalization import normalize_edge

E = np.linspace(8250.0, 8450.0, 201)
E0 = 8345.0


def _edges(jump, pre_offset, pre_slope, post_slope):
    """Step (erf, width 2 eV) of height ``jump`` on a pre-edge line; post-edge slope added above E0."""
    de = (E - E0)[:, None, None]
    step = 0.5 * (1 + erf(de / 2.0))
    return pre_offset + pre_slope * de + jump * step + (post_slope - pre_slope) * np.maximum(de, 0) * step


def test_synthetic_edge_is_zero_before_and_one_after():
    rng = np.random.default_rng(0)
    jump = rng.uniform(0.2, 2.0, (5, 6))
    pre_offset, pre_slope = rng.uniform(0.1, 0.5, (5, 6)), rng.uniform(-2e-3, 1e-3, (5, 6))
    post_slope = pre_slope + rng.uniform(-2e-3, -5e-4, (5, 6))
    stack = _edges(jump, pre_offset, pre_slope, post_slope)
    res = normalize_edge(stack, E, pre_edge=(8250, 8320), post_edge=(8370, 8450), edge_energy=E0)
    np.testing.assert_allclose(res.thickness, jump, rtol=1e-4)
    np.testing.assert_allclose(res.pre_edge[1], pre_slope, atol=1e-7)
    np.testing.assert_allclose(res.post_edge[1], post_slope, atol=1e-6)
    np.testing.assert_allclose(res.normalized[E < 8320], 0.0, atol=1e-5)
    np.testing.assert_allclose(res.normalized[E > 8370], 1.0, atol=1e-5)
    np.testing.assert_allclose(res.normalized[E == E0], 0.5, atol=1e-4)
    assert res.normalized.dtype == np.float32 and res.thickness.shape == (5, 6)
    # without flattening the post-edge keeps the slope difference
    raw = normalize_edge(stack, E, pre_edge=(8250, 8320), post_edge=(8370, 8450), edge_energy=E0, flatten=False)
    expected = 1 + (post_slope - pre_slope) * (E[-1] - E0) / jump
    np.testing.assert_allclose(raw.normalized[-1], expected, rtol=1e-4)


def test_default_windows_and_edge_energy_and_noise():
    rng = np.random.default_rng(1)
    stack = _edges(np.full((20, 20), 1.5), 0.3, 1e-4, -1e-3) + rng.normal(0, 0.01, (E.size, 20, 20))
    res = normalize_edge(stack, E)
    assert abs(res.edge_energy - E0) <= 2.0
    assert res.pre_window == (8250.0, 8280.0) and res.post_window == (8400.0, 8450.0)
    # unbiased; the lines extrapolated to E0 from 30 / 50 noisy points scatter by ~0.02
    assert res.thickness.mean() == pytest.approx(1.5, abs=0.005) and res.thickness.std() < 0.04
    assert abs(np.nanmean(res.normalized[E < 8280])) < 0.01 and abs(np.nanmean(res.normalized[E > 8400]) - 1) < 0.01


def test_background_pixels_and_bad_windows():
    stack = _edges(np.array([[1.0, 0.0]]), 0.2, 0.0, 0.0)
    res = normalize_edge(stack, E, min_jump=0.05)
    assert np.isfinite(res.normalized[:, 0, 0]).all() and np.isnan(res.normalized[:, 0, 1]).all()
    with pytest.raises(ValueError, match="must end below"):
        normalize_edge(stack, E, pre_edge=(8250, 8400), post_edge=(8350, 8450))
    with pytest.raises(ValueError, match="needs at least 2"):
        normalize_edge(stack, E, pre_edge=(8100, 8200))
