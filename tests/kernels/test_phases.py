import numpy as np
import pytest
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

from phasestream.kernels import PearsonAccumulator, assign_phases, optical_density, particle_mask, phase_fractions
from phasestream.references import load_references, select_energies
from phasestream.sim.samples import make_sample


def test_assign_phases_by_hand():
    pcc = np.array(
        [
            [[0.90, 0.50], [np.nan, 0.10]],
            [[0.80, 0.502], [np.nan, 0.30]],
            [[0.10, 0.501], [np.nan, np.nan]],
        ],
        dtype=np.float32,
    )
    mask = np.array([[True, True], [True, False]])
    phase, rel, amb = assign_phases(pcc, mask)
    np.testing.assert_array_equal(phase, [[0, 1], [-1, -1]])
    assert phase.dtype == np.int16 and rel.dtype == np.float32 and amb.dtype == bool
    np.testing.assert_allclose(rel[0], [0.1, 0.001], atol=1e-6)
    assert np.isnan(rel[1]).all()
    np.testing.assert_array_equal(amb, [[False, True], [False, False]])


def test_reliability_equals_sorted_gap_and_ambiguity_threshold():
    rng = np.random.default_rng(0)
    pcc = rng.uniform(-1, 1, (5, 20, 20)).astype(np.float32)
    phase, rel, amb = assign_phases(pcc, None, ambiguity=0.05)
    s = np.sort(pcc, axis=0)
    np.testing.assert_array_equal(phase, np.argmax(pcc, axis=0))
    np.testing.assert_allclose(rel, s[-1] - s[-2], atol=1e-7)
    np.testing.assert_array_equal(amb, (s[-1] - s[-2]) < 0.05)


def test_single_reference_has_no_reliability():
    phase, rel, amb = assign_phases(np.full((1, 2, 2), 0.9, np.float32))
    assert (phase == 0).all() and np.isnan(rel).all() and not amb.any()


def test_phase_fractions_over_particle_mask():
    phase = np.array([[0, 0, 1, -1], [2, 1, 1, 0]], np.int16)
    mask = np.array([[True, True, True, True], [True, True, False, False]])
    amb = np.array([[True, False, False, False], [False, False, True, True]])
    fr = phase_fractions(phase, mask, amb, n_phases=4)
    np.testing.assert_allclose(fr.fractions, [2 / 6, 2 / 6, 1 / 6, 0])
    assert fr.ambiguous == pytest.approx(1 / 6) and fr.unassigned == pytest.approx(1 / 6) and fr.n_particle == 6
    assert fr.as_dict("abcd") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 6, "d": 0.0})
    assert np.isnan(phase_fractions(phase, np.zeros_like(mask), amb, 4).fractions).all()


def test_particle_mask_uses_otsu_and_drops_noise():
    rng = np.random.default_rng(1)
    od = rng.normal(0.01, 0.01, (3, 64, 64))
    od[:, 10:30, 10:30] += 1.0
    od[:, 50, 50] += 1.0  # a single hot pixel
    od[:, 0, 0] = np.nan
    mask = particle_mask(od)
    level = od.mean(axis=0)
    expected = np.nan_to_num(level, nan=-1.0) > threshold_otsu(level[np.isfinite(level)])
    expected = remove_small_objects(expected, max_size=8)
    assert not expected[50, 50]
    np.testing.assert_array_equal(mask, expected)
    assert not particle_mask(rng.normal(0.01, 0.01, (3, 32, 32))).any()  # empty field
    assert particle_mask(od, threshold=0.5).sum() == 400


def _noisy_stack(sample, energies, dose, seed):
    rng = np.random.default_rng(seed)
    return np.stack([optical_density(sample.transmitted(e, i0=dose, rng=rng), i0=dose)[0] for e in energies])


@pytest.mark.parametrize(("max_thickness", "dose", "min_recall"), [(1.2, 300.0, 0.995), (1.2, 3000.0, 0.995),
                                                                   (0.3, 300.0, 0.975)])
def test_particle_mask_keeps_thin_rims(max_thickness, dose, min_recall):
    # truth: the phantom's particle mask; Otsu alone (rims=False) loses the thin outer rim
    refs = load_references("nvpf-synthetic")
    energies = select_energies(refs, 12, method="score")
    before, after = [], []
    for seed in range(6):
        sample = make_sample((96, 96), state_of_charge=(3.0, 2.0, 1.0)[seed % 3], seed=seed,
                             n_particles=3 + seed % 3, max_thickness=max_thickness)
        od = _noisy_stack(sample, energies, dose, seed)
        for mask, out in ((particle_mask(od, rims=False), before), (particle_mask(od), after)):
            hit = (mask & sample.particle).sum()
            out.append((hit / sample.particle.sum(), hit / mask.sum()))
    recall_before, recall_after = np.array(before)[:, 0], np.array(after)[:, 0]
    assert recall_after.min() >= min_recall and np.all(recall_after > recall_before)
    assert np.array(after)[:, 1].min() >= 0.995  # precision: noise outside particles stays out


@pytest.mark.parametrize("soc", [3.0, 2.4, 2.0, 1.0, 0.8])
def test_noiseless_stack_recovers_ground_truth_phase(soc):
    refs = load_references("nvpf-synthetic")
    energies = select_energies(refs, 12)
    values = refs.interpolate(energies)
    sample = make_sample((128, 128), state_of_charge=soc, seed=int(10 * soc))
    acc = PearsonAccumulator(sample.shape, len(refs.phases), backend="numba")
    ods = []
    for j, e in enumerate(energies):
        od, valid = optical_density(sample.transmitted(e, i0=1e4, noise=False))
        acc.update(od, values[:, j], valid)
        ods.append(od)
    mask = particle_mask(np.stack(ods))
    phase, _, _ = assign_phases(acc.maps(), mask)
    assert sample.accuracy(phase) >= 0.99
    inner = sample.particle & ~sample.boundary
    assert mask[inner].mean() > 0.99 and not mask[~sample.particle].any()


@pytest.mark.parametrize("k", [1, 2, 5])
def test_numba_assign_equals_numpy_reference(k):
    rng = np.random.default_rng(k)
    pcc = rng.uniform(-1, 1, (k, 40, 30)).astype(np.float32)
    pcc[:, :3] = np.nan  # undefined pixels
    pcc[0, 5:8] = np.nan  # one reference undefined
    pcc[:, 10, :] = 0.5  # exact ties
    mask = rng.random((40, 30)) > 0.2
    ref = assign_phases(pcc, mask, 0.05, backend="numpy")
    fast = assign_phases(pcc, mask, 0.05, backend="numba")
    for a, b in zip(ref, fast, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
