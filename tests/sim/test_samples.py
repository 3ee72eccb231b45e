import numpy as np
import pytest

from phasestream.sim.samples import dominant_phases, make_sample


def test_sample_is_reproducible_and_consistent():
    a = make_sample((96, 96), state_of_charge=2.0, seed=5)
    b = make_sample((96, 96), state_of_charge=2.0, seed=5)
    np.testing.assert_array_equal(a.phase, b.phase)
    assert a.particle.any() and (a.phase[~a.particle] == -1).all()
    np.testing.assert_allclose(a.weights.sum(axis=0)[a.particle], 1.0)
    assert (a.weights[:, ~a.particle] == 0).all()
    assert (a.thickness[~a.particle] == 0).all() and (a.thickness[a.particle] > 0).all()
    np.testing.assert_allclose(a.true_fractions().sum(), 1.0)


def test_optical_density_is_beer_lambert_of_the_references():
    s = make_sample((64, 64), state_of_charge=1.0, seed=2)
    mu = s.references.interpolate(518.0)[:, 0]
    y, x = np.argwhere(s.particle & ~s.boundary)[0]
    expected = s.thickness[y, x] * mu[s.phase[y, x]] + s.substrate_od
    assert s.optical_density(518.0)[y, x] == pytest.approx(expected)


def test_transmitted_counts_are_poisson_around_the_expectation():
    s = make_sample((64, 64), seed=3)
    mean = s.transmitted(520.0, i0=1000.0, noise=False)
    draws = np.stack([s.transmitted(520.0, i0=1000.0, rng=np.random.default_rng(i)) for i in range(200)])
    z = (draws.mean(axis=0) - mean) / np.sqrt(mean / 200)
    assert abs(z.mean()) < 0.05 and 0.9 < z.std() < 1.1
    np.testing.assert_allclose(draws.var(axis=0).mean() / mean.mean(), 1.0, atol=0.05)


def test_state_of_charge_selects_main_phase():
    refs = make_sample((64, 64), seed=0).references
    assert dominant_phases(refs, 2.0) == (2, [1, 3])
    assert dominant_phases(refs, 3.0) == (0, [1])
    assert dominant_phases(refs, 0.8) == (4, [3])
    for soc, main in ((3.0, 0), (2.0, 2), (0.8, 4)):
        s = make_sample((128, 128), state_of_charge=soc, seed=1)
        assert np.argmax(s.true_fractions()) == main


def test_too_many_particles_is_a_clear_error():
    with pytest.raises(ValueError, match="could not place 40 particles"):
        make_sample((32, 32), n_particles=40)
