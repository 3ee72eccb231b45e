from pathlib import Path

import numpy as np
import pytest

from phasestream.references import (
    EnergyOutOfRangeError,
    ReferenceFormatError,
    ReferenceSet,
    discrimination_score,
    load_references,
    select_energies,
    write_references,
)

NI = Path(__file__).resolve().parent / "data" / "ni-k-edge"  # tests/data/ni-k-edge/README.md


def test_two_column_kev_files_load_in_ev():
    raw = np.loadtxt(NI / "ref_NiO.txt")
    refs = load_references(NI / "ref_NiO.txt")
    assert refs.phases == ("NiO",)
    np.testing.assert_allclose(refs.energies, raw[:, 0] * 1000.0)
    np.testing.assert_allclose(refs.spectra[0], raw[:, 1])


def test_several_two_column_files_merge_on_common_grid():
    refs = load_references([NI / "ref_NiO.txt", NI / "ref_LiNiO2.txt"])
    assert refs.phases == ("NiO", "LiNiO2")
    li = np.loadtxt(NI / "ref_LiNiO2.txt")
    e = np.array([8333.0, 8350.0, 8412.5])
    np.testing.assert_allclose(refs.interpolate(e)[1], np.interp(e, li[:, 0] * 1000, li[:, 1]), atol=1e-9)


def test_csv_with_yaml_sidecar_round_trip(tmp_path):
    refs = ReferenceSet(np.array([500.0, 510.0, 520.0]), ("A", "B"), np.array([[0.1, 0.5, 0.2], [0.2, 0.3, 0.9]]),
                        name="toy", metadata={"A": {"na_content": 3.0}}, attrs={"synthetic": True})
    path = write_references(refs, tmp_path / "toy.csv")
    assert path.read_text().splitlines()[0] == "energy_eV,A,B"
    back = load_references(path)
    assert back.phases == ("A", "B") and back.name == "toy"
    assert back.metadata["A"] == {"na_content": 3.0} and back.attrs["synthetic"] is True
    np.testing.assert_allclose(back.spectra, refs.spectra)
    np.testing.assert_allclose(back.interpolate([505.0, 515.0]), [[0.3, 0.35], [0.25, 0.6]])


def test_csv_rows_are_sorted_by_energy(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("energy_eV,A,B\n520,3,30\n500,1,10\n510,2,20\n")
    refs = load_references(p)
    np.testing.assert_array_equal(refs.energies, [500, 510, 520])
    np.testing.assert_array_equal(refs.spectra, [[1, 2, 3], [10, 20, 30]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("energy,A\n500,1\n510,2\n", "header must be 'energy_eV"),
        ("energy_eV,A\n500,1\n500,2\n", "duplicate energy 500"),
        ("energy_eV,A\n500,x\n510,2\n", "non-numeric value"),
        ("energy_eV,A,A\n500,1,1\n510,2,2\n", "duplicate phase names"),
        ("energy_eV,A\n500,nan\n510,2\n", "non-finite"),
    ],
)
def test_bad_csv_is_a_clear_error(tmp_path, text, message):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(ReferenceFormatError, match=message):
        load_references(p)


def test_sidecar_naming_unknown_phase_is_refused(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("energy_eV,A\n500,1\n510,2\n")
    p.with_suffix(".yaml").write_text("phases: {Z: {na_content: 1.0}}\n")
    with pytest.raises(ReferenceFormatError, match=r"phases \['Z'\] are not columns"):
        load_references(p)


def test_unknown_source_names_the_registered_sets():
    with pytest.raises(FileNotFoundError, match="nvpf-synthetic"):
        load_references("no-such-references")


def test_energy_outside_range_is_an_error_naming_energy_and_range():
    refs = load_references("nvpf-synthetic")
    with pytest.raises(EnergyOutOfRangeError, match=r"energy 545\.000 eV is outside .*505\.000-540\.000 eV"):
        refs.interpolate([510.0, 545.0])
    with pytest.raises(EnergyOutOfRangeError):
        refs.interpolate(np.nan)


def test_score_selection_spreads_picks_and_adds_pre_edge():
    refs = load_references("nvpf-synthetic")
    e = select_energies(refs, 12, method="score")
    assert len(e) == 13 and e[0] == 505.0 and np.all(np.diff(e) > 0)
    assert np.min(np.diff(e[1:])) >= (35.0 / 48) - 1e-9
    assert set(e) <= set(refs.energies)
    # every pick scores above the median energy of the grid
    score = discrimination_score(refs)
    picked = np.searchsorted(refs.energies, e[1:])
    assert np.all(score[picked] > np.median(score))
    # the close pair Na2.0 / Na1.0 is better separated at the picks than on a uniform grid
    def gap(energies):
        v = refs.subset(["Na2.0", "Na1.0"]).interpolate(energies)
        return 1.0 - np.corrcoef(v)[0, 1]
    assert gap(e) > gap(np.linspace(505.0, 540.0, 13))
    assert gap(select_energies(refs, 12)) > gap(np.linspace(505.0, 540.0, 13))  # the default (pcc) too


def test_select_energies_refuses_impossible_spacing():
    refs = load_references("nvpf-synthetic")
    with pytest.raises(ValueError, match="could only place"):
        select_energies(refs, 12, min_separation_eV=10.0)


def test_registered_names_load_like_files(tmp_path):
    from phasestream.references import register_references, registered_references

    p = tmp_path / "beamtime.csv"
    p.write_text("energy_eV,A,B\n500,1,2\n510,2,1\n")
    register_references("beamtime-2026", lambda: load_references(p))
    assert "beamtime-2026" in registered_references()
    assert load_references("beamtime-2026").phases == ("A", "B")
