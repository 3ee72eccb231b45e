import numpy as np

from phasestream.references.synthetic import NVPF_PHASES, nvpf_references


def test_nvpf_references_are_labelled_synthetic_and_have_the_paper_features():
    refs = nvpf_references()
    assert refs.phases == NVPF_PHASES and refs.attrs["synthetic"] is True and refs.name == "nvpf-synthetic"
    assert refs.energy_range == (505.0, 540.0)
    l3 = (refs.energies > 514) & (refs.energies < 521)
    l3_peaks = refs.energies[l3][np.argmax(refs.spectra[:, l3], axis=1)]
    assert abs(l3_peaks[0] - 517.5) < 1.0  # pristine L3 near 517.5 eV
    assert np.all(np.diff(l3_peaks) >= 0)  # weight shifts up in energy on charge
    i530 = np.argmin(np.abs(refs.energies - 530.3))
    assert np.all(np.diff(refs.spectra[:, i530]) > 0)  # O K pre-edge grows on charge
    c = np.corrcoef(refs.spectra)
    closest = np.unravel_index(np.argmax(np.where(np.eye(5, dtype=bool), -np.inf, c)), c.shape)
    assert sorted(int(i) for i in closest) == [2, 3]  # Na2.0 / Na1.0 closest (c is symmetric only to rounding)


def test_seeded_sets_are_reproducible_and_differ():
    a, b, c = nvpf_references(seed=1), nvpf_references(seed=1), nvpf_references(seed=2)
    np.testing.assert_array_equal(a.spectra, b.spectra)
    assert not np.allclose(a.spectra, c.spectra)
