"""Edge normalization of synthetic edges with known pre-edge, post-edge lines and jump."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.special import erf

from phasestream.methods.normalization import (
    edge_fit_coverage,
    find_edge_energy,
    normalize_by_references,
    normalize_edge,
)
from phasestream.references import load_references

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
    # larch's defaults relative to E0: pre from E[1] - E0 rounded to 5 eV to half way, post from 5 eV to the end
    assert res.pre_window == (res.edge_energy - 95.0, res.edge_energy - 47.5)
    assert res.post_window == (res.edge_energy + 5.0, 8450.0) and res.post_order == 1
    # unbiased; the lines extrapolated to E0 from 30 / 50 noisy points scatter by ~0.02
    assert res.thickness.mean() == pytest.approx(1.5, abs=0.005) and res.thickness.std() < 0.04
    assert abs(np.nanmean(res.normalized[E < 8290])) < 0.01 and abs(np.nanmean(res.normalized[E > 8360]) - 1) < 0.01


def test_background_pixels_and_bad_windows():
    stack = _edges(np.array([[1.0, 0.0]]), 0.2, 0.0, 0.0)
    res = normalize_edge(stack, E, min_jump=0.05)
    assert np.isfinite(res.normalized[:, 0, 0]).all() and np.isnan(res.normalized[:, 0, 1]).all()
    with pytest.raises(ValueError, match="must end below"):
        normalize_edge(stack, E, pre_edge=(8250, 8400), post_edge=(8350, 8450))
    with pytest.raises(ValueError, match="holds no energy"):
        normalize_edge(stack, E, pre_edge=(8100, 8200))


# xraylarch 2026.3.1 ``preedge`` on the measured spectra: the output of
# ``/tmp/larchenv/bin/python tests/data/larch-fe-standards/larch_pre_edge.py`` (that script says how
# to install larch in its own environment; it is not a phasestream dependency). "fixed": e0 as
# larch found it, pre -150..-40 eV, post 60..400 eV, nnorm 2.
LARCH = {
    "fe2o3_rt1": {"e0": 7125.6176, "edge_step": 1.293084, "edge_step_fixed": 1.368705},
    "feo_rt1": {"e0": 7122.9272, "edge_step": 1.354364, "edge_step_fixed": 1.351625},
    "NiO": {"e0": 8342.5, "edge_step": 0.98465, "edge_step_fixed": 0.982829},
    "LiNiO2": {"e0": 8347.0, "edge_step": 0.96435, "edge_step_fixed": 1.023755},
}
DATA = Path(__file__).resolve().parents[1] / "data"
FILES = {"fe2o3_rt1": ("larch-fe-standards/fe2o3_rt1.xmu", 1.0), "feo_rt1": ("larch-fe-standards/feo_rt1.xmu", 1.0),
         "NiO": ("ni-k-edge/ref_NiO.txt", 1000.0), "LiNiO2": ("ni-k-edge/ref_LiNiO2.txt", 1000.0)}


def _measured(name):
    path, scale = FILES[name]
    data = np.loadtxt(DATA / path, comments="#")
    return data[:, 0] * scale, data[:, 1]


@pytest.mark.parametrize("name", sorted(LARCH))
def test_edge_jump_matches_larch_on_measured_spectra(name):
    e, mu = _measured(name)
    larch = LARCH[name]
    res = normalize_edge(mu[:, None], e)  # all defaults
    assert abs(res.edge_energy - larch["e0"]) <= 2.0
    assert float(res.thickness[0]) == pytest.approx(larch["edge_step"], rel=0.03)
    # the same E0 and windows (larch's point selection: pre from index_of(pre1) up to, not including,
    # index_nearest(pre2); the same for the post-edge window)
    e0 = larch["e0"]
    p1, p2 = _index_of(e, e0 - 150), _index_nearest(e, e0 - 40)
    n1, n2 = _index_of(e, e0 + 60), _index_nearest(e, e0 + 400)
    same = normalize_edge(mu[:, None], e, edge_energy=e0, pre_edge=(e[p1], e[p2 - 1]), post_edge=(e[n1], e[n2 - 1]),
                          post_order=2)
    assert float(same.thickness[0]) == pytest.approx(larch["edge_step_fixed"], rel=1e-3)


def _index_of(e, value):
    return int(np.flatnonzero(e <= value).max()) if value >= e.min() else 0


def _index_nearest(e, value):
    return int(np.argmin(np.abs(e - value)))


def test_sparse_scan_normalized_by_the_reference_fit():
    """One pre-edge energy and 12 at the edge: the edge fit cannot run; the reference fit recovers the
    pre-edge level and the jump (thickness) of a known mixture of the measured Ni references."""
    refs = load_references([DATA / "ni-k-edge" / "ref_NiO.txt", DATA / "ni-k-edge" / "ref_LiNiO2.txt"])
    e = np.concatenate([[8300.0], np.linspace(8336.0, 8358.0, 12)])
    mu = refs.interpolate(e)
    rng = np.random.default_rng(3)
    jump, frac, level = rng.uniform(0.2, 1.5, (4, 5)), rng.uniform(0, 1, (4, 5)), rng.uniform(0.05, 0.5, (4, 5))
    od = jump * (np.multiply.outer(mu[0], frac) + np.multiply.outer(mu[1], 1 - frac)) + level
    assert "post-edge window" in edge_fit_coverage(e, find_edge_energy(e, od.mean(axis=(1, 2))))
    assert edge_fit_coverage(E, E0) is None
    res = normalize_by_references(od, e, mu)
    assert res.method == "reference fit"
    np.testing.assert_allclose(res.thickness, jump, rtol=1e-4)
    np.testing.assert_allclose(res.pre_edge[0], level, atol=1e-4)
    np.testing.assert_allclose(res.normalized, (od - level) / jump, atol=1e-4)
