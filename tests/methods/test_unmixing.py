"""Robust unmixing: simplex projection vs SLSQP, ADMM objective and constraints, RUM-TV accuracy
gain over LCF on a small simulated sample built from the measured Ni K-edge references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from phasestream.methods import linear_combination_fit, project_simplex, robust_unmixing, rum_objective
from phasestream.references import load_references
from phasestream.sim.phantoms import particle_phantom

NI = Path(__file__).resolve().parents[1] / "data" / "ni-k-edge"  # tests/data/ni-k-edge/README.md
E = np.linspace(8300.0, 8450.0, 60)


@pytest.fixture(scope="module")
def refs():
    return load_references([NI / "ref_NiO.txt", NI / "ref_LiNiO2.txt"]).interpolate(E)


def _sample(size, seed, n_domains=6):
    rng = np.random.default_rng(seed)
    thickness = particle_phantom((size, size), n_particles=4, seed=seed).astype(np.float64)
    centres = rng.uniform(0, size, (n_domains, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    cell = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, axis=-1)
    return thickness, rng.uniform(0, 1, n_domains)[cell]


def _stack(refs, thickness, fraction, sigma, seed):
    clean = np.tensordot(refs.T, np.stack([fraction, 1 - fraction]) * thickness, axes=1)
    return clean + np.random.default_rng(seed).normal(0, sigma, clean.shape)


def test_project_simplex_equals_slsqp():
    v = np.random.default_rng(0).normal(0, 1, (4, 30))
    got = project_simplex(v)
    for j in range(30):
        res = minimize(lambda x, j=j: np.sum((x - v[:, j]) ** 2), np.full(4, 0.25), method="SLSQP",
                       bounds=[(0, None)] * 4, constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
                       options={"ftol": 1e-14})
        np.testing.assert_allclose(got[:, j], res.x, atol=1e-6)


@pytest.mark.parametrize("prior", ["tv", "pnp"])
def test_admm_decreases_the_objective_and_satisfies_the_constraints(refs, prior):
    thickness, fraction = _sample(40, seed=1)
    y = _stack(refs, thickness, fraction, 0.1, seed=2)
    res = robust_unmixing(y, refs, prior=prior, strength=2.0, max_iter=60, denoiser="tv")
    x, s = res.fractions, res.scale
    assert (x >= 0).all() and (s >= 0).all()
    np.testing.assert_allclose(x.sum(axis=0), 1.0, atol=1e-5)
    objective = res.history["objective"]
    assert len(objective) == res.iterations + 1
    lam = res.parameters["lam"]
    # the recorded objective is eq. (7) at the returned point (independent NumPy evaluation)
    assert objective[-1] == pytest.approx(rum_objective(y, refs, x, s, lam), rel=1e-4)
    # from the per-pixel optimum without prior (the start), the regularized objective falls a lot
    assert objective[-1] < 0.97 * objective[0]
    assert objective[-1] <= min(objective[:5])
    if prior == "tv":  # ADMM converges: the constraint residuals vanish
        assert res.history["primal"][-1] < 0.05 * max(res.history["primal"][1:5])


def test_default_penalty_converges_under_strong_noise(refs):
    """Noise 0.5 per unit edge jump and a strong prior: with rho = c_A^2 (the old default) X still
    changed 18% per iteration after 100 iterations and the objective stayed 6.5% above the optimum.
    The default penalty converges to what a long run with another rho finds: rho sets the speed of
    the ADMM, not its solution."""
    thickness, fraction = _sample(64, seed=3)
    y = _stack(refs, thickness, fraction, 0.5, seed=4)
    res = robust_unmixing(y, refs, strength=1.0)
    c_a2 = res.parameters["reference_contrast"] ** 2
    assert res.parameters["rho"] > c_a2
    ref = robust_unmixing(y, refs, strength=1.0, rho=8.0 * c_a2, max_iter=800, tol=0)
    assert res.history["change"][-1] < 0.01
    assert res.history["objective"][-1] == pytest.approx(ref.history["objective"][-1], rel=1e-3)
    assert np.abs(res.fractions - ref.fractions).mean() < 0.02


def test_rum_tv_gains_over_lcf_at_high_noise(refs):
    """The paper's protocol at small size: PSNR of the NiO fraction over the particle pixels.

    Measured 10.8 dB (LCF) and 24.9 dB (RUM-TV, +14.2 dB) here (128 x 128, 60 energies); the
    issue's +15 dB is reached at the paper's image scale (``benchmarks/methods_accuracy.py``
    at 512 x 512), where the same phantom's structures span 4x more pixels.
    """
    thickness, fraction = _sample(128, seed=3)
    mask = thickness >= 0.3
    y = _stack(refs, thickness, fraction, 0.2, seed=4)
    m = linear_combination_fit(y, refs, method="nnls").fractions
    lcf = m[0] / np.maximum(m.sum(axis=0), 1e-12)
    rum = robust_unmixing(y, refs, prior="tv", strength=0.5).fractions[0]

    def psnr(est):
        return 10 * np.log10(1.0 / np.mean((est[mask] - fraction[mask]) ** 2))

    assert psnr(rum) >= psnr(lcf) + 12.0, (psnr(lcf), psnr(rum))


def test_strength_does_not_depend_on_how_much_background_is_in_view(refs):
    """The same sample framed by eight times its area of background gets the same regularization: the
    strength is relative to the sample's scale, not to the field of view's median (the background)."""
    _, fraction = _sample(32, seed=3)
    thickness = np.full((32, 32), 0.8)  # a field of view filled by the sample ...
    padded_t = np.pad(thickness, 32, constant_values=0.1)  # ... and the same sample, 1/9 of the view
    padded_f = np.pad(fraction, 32, constant_values=0.5)
    lam = [robust_unmixing(_stack(refs, t, f, 0.05, seed=4), refs, strength=1.0, max_iter=1).parameters["lam"]
           for t, f in ((thickness, fraction), (padded_t, padded_f))]
    assert lam[1] == pytest.approx(lam[0], rel=0.1)


def test_bad_arguments(refs):
    y = np.zeros((E.size, 8, 8))
    with pytest.raises(ValueError, match="prior"):
        robust_unmixing(y, refs, prior="l0")
    with pytest.raises(ValueError, match="energies"):
        robust_unmixing(y[:-1], refs)
    with pytest.raises(ValueError, match="denoiser"):
        robust_unmixing(y + 0.1, refs, prior="pnp", denoiser="median", max_iter=1)
