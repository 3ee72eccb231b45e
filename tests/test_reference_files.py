"""References named by a start document: only registered names and files in the reference folders."""

import os
import threading
import traceback
from pathlib import Path

import numpy as np
import pytest

from phasestream.references import (
    ReferenceAccessError,
    ReferenceFormatError,
    ReferenceSet,
    load_document_references,
    load_references,
    reference_folders_from_env,
    write_references,
)
from phasestream.references.synthetic import nvpf_references

SECRET = "s3cr3tvalue"
TOY = ReferenceSet(np.array([500.0, 510.0, 520.0]), ("A", "B"), np.array([[0.1, 0.5, 0.2], [0.2, 0.3, 0.9]]),
                   name="toy", metadata={"A": {"na_content": 3.0}}, attrs={"synthetic": True})


@pytest.fixture
def folder(tmp_path):
    """A reference folder holding ``toy.csv`` (+ sidecar) and a CSV outside it, ``outside.csv``."""
    refs = tmp_path / "refs"
    write_references(TOY, refs / "toy.csv")
    (tmp_path / "outside.csv").write_text("energy_eV,A\n500,1\n510,2\n")
    return refs


def _full_text(exc: BaseException) -> str:
    """The message and the traceback as a log handler would print them."""
    return "".join(traceback.format_exception(exc))


def _finishes_within(call, seconds: float, release: Path | None = None):
    """Run ``call`` in a thread; return (finished, raised exception)."""
    outcome: dict = {}

    def target():
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["exc"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    finished = not thread.is_alive()
    if not finished and release is not None:  # unblock a reader stuck on the FIFO
        os.close(os.open(release, os.O_WRONLY | os.O_NONBLOCK))
    return finished, outcome.get("exc")


def test_registered_name_loads_without_folders():
    refs = load_document_references("nvpf-synthetic")
    oracle = nvpf_references()
    assert refs.phases == oracle.phases
    np.testing.assert_array_equal(refs.energies, oracle.energies)
    np.testing.assert_array_equal(refs.spectra, oracle.spectra)


@pytest.mark.parametrize("how", ["bare", "absolute", "nested"])
def test_csv_inside_the_folder_loads_like_load_references(folder, how):
    if how == "nested":
        write_references(TOY, folder / "beamtime" / "toy.csv")
    name = {"bare": "toy.csv", "absolute": str(folder / "toy.csv"), "nested": "beamtime/toy.csv"}[how]
    refs = load_document_references(name, folders=[folder])
    trusted = load_references(folder / "toy.csv")
    assert refs.phases == trusted.phases == ("A", "B")
    np.testing.assert_array_equal(refs.energies, trusted.energies)
    np.testing.assert_array_equal(refs.spectra, trusted.spectra)
    np.testing.assert_allclose(refs.spectra, TOY.spectra)
    assert refs.name == "toy" and refs.metadata == {"A": {"na_content": 3.0}} and refs.attrs["synthetic"] is True


def test_two_column_file_inside_the_folder_loads(folder):
    (folder / "ref_NiO.txt").write_text("# E (keV)  mu\n8.330 0.1\n8.340 0.7\n8.350 1.0\n")
    refs = load_document_references("ref_NiO.txt", folders=[str(folder)])
    assert refs.phases == ("NiO",)
    np.testing.assert_allclose(refs.energies, [8330.0, 8340.0, 8350.0])
    np.testing.assert_allclose(refs.spectra, [[0.1, 0.7, 1.0]])


def test_relative_names_are_looked_up_in_each_folder_in_order(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "r.csv").write_text("energy_eV,First\n500,1\n510,2\n")
    (second / "r.csv").write_text("energy_eV,Second\n500,1\n510,2\n")
    (second / "only.csv").write_text("energy_eV,Only\n500,1\n510,2\n")
    assert load_document_references("r.csv", folders=[first, second]).phases == ("First",)
    assert load_document_references("r.csv", folders=[second, first]).phases == ("Second",)
    assert load_document_references("only.csv", folders=[first, second]).phases == ("Only",)


def test_escape_with_dotdot_is_refused(folder):
    assert load_references(folder.parent / "outside.csv").phases == ("A",)  # a valid file: refused for where it is
    with pytest.raises(ReferenceAccessError, match="outside the reference folders") as info:
        load_document_references("../outside.csv", folders=[folder])
    message = str(info.value)
    assert "'../outside.csv'" in message and "nvpf-synthetic" in message
    assert repr(str(folder.resolve())) in message and "PHASESTREAM_REFERENCES" in message


def test_absolute_path_outside_is_refused(folder):
    with pytest.raises(ReferenceAccessError, match="outside the reference folders"):
        load_document_references(str(folder.parent / "outside.csv"), folders=[folder])


def test_symlink_inside_the_folder_pointing_outside_is_refused(folder):
    (folder / "link.csv").symlink_to(folder.parent / "outside.csv")
    with pytest.raises(ReferenceAccessError, match="outside the reference folders"):
        load_document_references("link.csv", folders=[folder])


def test_symlinked_folder_is_resolved_and_still_allowed(folder, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(folder)
    assert load_document_references("toy.csv", folders=[alias]).phases == ("A", "B")
    assert load_document_references(str(folder / "toy.csv"), folders=[alias]).phases == ("A", "B")


def test_sidecar_symlink_pointing_outside_is_refused(folder, tmp_path):
    (tmp_path / "secret.yaml").write_text(f"name: {SECRET}\n")
    (folder / "toy.yaml").unlink()
    (folder / "toy.yaml").symlink_to(tmp_path / "secret.yaml")
    with pytest.raises(ReferenceAccessError, match="sidecar lies outside the reference folders") as info:
        load_document_references("toy.csv", folders=[folder])
    assert SECRET not in _full_text(info.value)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_proc_self_environ_is_refused(folder, monkeypatch):
    monkeypatch.setenv("PHASESTREAM_TEST_SECRET", SECRET)
    with pytest.raises(ReferenceAccessError, match="outside the reference folders"):
        load_document_references("/proc/self/environ", folders=[folder])
    (folder / "env.csv").symlink_to("/proc/self/environ")
    with pytest.raises(ReferenceAccessError, match="outside the reference folders"):
        load_document_references("env.csv", folders=[folder])
    # the same format inside the folder (/proc/self/environ is the environment at exec, without
    # the monkeypatched variable): refused, and the secret is not echoed
    environ = b"\0".join(f"{key}={value}".encode() for key, value in os.environ.items())
    (folder / "environ.csv").write_bytes(environ)
    assert SECRET.encode() in environ
    with pytest.raises(ReferenceFormatError, match="binary content") as info:
        load_document_references("environ.csv", folders=[folder])
    assert SECRET not in _full_text(info.value)
    # the trusted loader on the real file: refused, none of its entries echoed
    entries = [e.decode(errors="replace") for e in Path("/proc/self/environ").read_bytes().split(b"\0") if e]
    with pytest.raises(ReferenceFormatError, match="binary content") as info:
        load_references("/proc/self/environ")
    assert not any(entry in _full_text(info.value) for entry in entries)


@pytest.mark.parametrize(
    ("filename", "template", "message"),
    [
        ("header.csv", "PHASESTREAM_TEST_SECRET={secret},A\n500,1\n510,2\n", "first field of line 1 is not energy_eV"),
        ("header2.csv", "energy_eV {secret},A\n500,1\n510,2\n", "first field of line 1 is not energy_eV"),
        ("value.csv", "energy_eV,A\n500,1\n510,{secret}\n", "non-numeric value at line 3, column 2"),
        ("energy.csv", "energy_eV,A\n500,1\n{secret},2\n", "non-numeric value at line 3, column 1"),
        ("columns.csv", "energy_eV,A\n500,1\n510,2,{secret}\n", "line 3 has 3 columns, every row needs 2"),
        ("two.txt", "500 1\n510 {secret}\n", "non-numeric value at line 2, column 2"),
        ("three.txt", "500 1\n510 2 {secret}\n", "found 3 at line 2"),
    ],
)
def test_parse_errors_do_not_echo_file_content(folder, monkeypatch, filename, template, message):
    monkeypatch.setenv("PHASESTREAM_TEST_SECRET", SECRET)
    (folder / filename).write_text(template.format(secret=os.environ["PHASESTREAM_TEST_SECRET"]))
    for load in (lambda: load_document_references(filename, folders=[folder]),
                 lambda: load_references(folder / filename)):
        with pytest.raises(ReferenceFormatError, match=message) as info:
            load()
        assert SECRET not in _full_text(info.value)


def test_invalid_yaml_sidecar_error_does_not_echo_content(folder):
    (folder / "toy.yaml").write_text(f"name: toy\nphases: [{SECRET}\n")
    with pytest.raises(ReferenceFormatError, match=r"toy\.yaml: not valid YAML at line \d+, column \d+") as info:
        load_document_references("toy.csv", folders=[folder])
    assert SECRET not in _full_text(info.value)


def test_fifo_inside_the_folder_is_refused_quickly(folder):
    fifo = folder / "pipe.csv"
    os.mkfifo(fifo)
    finished, exc = _finishes_within(lambda: load_document_references("pipe.csv", folders=[folder]), 5.0, fifo)
    assert finished, "load_document_references blocked on a FIFO"
    assert isinstance(exc, ReferenceAccessError) and "not a regular file" in str(exc)
    finished, exc = _finishes_within(lambda: load_references(fifo), 5.0, fifo)
    assert finished, "load_references blocked on a FIFO"
    assert isinstance(exc, ReferenceAccessError) and "not a regular file" in str(exc)


def test_directory_inside_the_folder_is_refused(folder):
    (folder / "sub.csv").mkdir()
    with pytest.raises(ReferenceAccessError, match="not a regular file"):
        load_document_references("sub.csv", folders=[folder])


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_dev_zero_is_refused(folder):
    with pytest.raises(ReferenceAccessError, match="outside the reference folders"):
        load_document_references("/dev/zero", folders=[folder])
    (folder / "zero.csv").symlink_to("/dev/zero")
    with pytest.raises(ReferenceAccessError, match="outside the reference folders"):
        load_document_references("zero.csv", folders=[folder])
    finished, exc = _finishes_within(lambda: load_references("/dev/zero"), 5.0)
    assert finished and isinstance(exc, ReferenceAccessError) and "not a regular file" in str(exc)


def test_file_larger_than_max_bytes_is_refused(folder):
    rows = "".join(f"{500 + i},{i}\n" for i in range(200))
    (folder / "big.csv").write_text("energy_eV,A\n" + rows)
    size = (folder / "big.csv").stat().st_size
    assert load_document_references("big.csv", folders=[folder], max_bytes=size).energies.size == 200
    with pytest.raises(ReferenceAccessError, match=f"{size} bytes, more than the limit of {size - 1} bytes"):
        load_document_references("big.csv", folders=[folder], max_bytes=size - 1)


def test_sidecar_larger_than_max_bytes_is_refused(folder):
    csv_size = (folder / "toy.csv").stat().st_size
    (folder / "toy.yaml").write_text("name: toy\ndescription: " + "x" * (2 * csv_size) + "\n")
    with pytest.raises(ReferenceAccessError, match=r"toy\.yaml: \d+ bytes, more than the limit"):
        load_document_references("toy.csv", folders=[folder], max_bytes=csv_size + 10)


def test_invalid_utf8_is_refused_without_echoing_bytes(folder):
    (folder / "latin.csv").write_bytes(b"energy_eV,A\n500,1\n510,\xff\xfe" + SECRET.encode() + b"\n")
    with pytest.raises(ReferenceFormatError, match=r"not UTF-8 text \(undecodable byte at offset 22\)") as info:
        load_document_references("latin.csv", folders=[folder])
    text = _full_text(info.value)
    assert SECRET not in text and "xff" not in text and "\xff" not in text


def test_without_folders_only_registered_names_are_allowed(folder, monkeypatch):
    monkeypatch.chdir(folder)
    for name in ("toy.csv", str(folder / "toy.csv")):
        with pytest.raises(ReferenceAccessError, match="no reference folders are configured") as info:
            load_document_references(name)
        assert "none configured" in str(info.value) and "nvpf-synthetic" in str(info.value)
    assert load_document_references("nvpf-synthetic").phases == nvpf_references().phases


def test_missing_file_and_non_string_values_are_refused(folder):
    with pytest.raises(ReferenceAccessError, match="no such file in the reference folders"):
        load_document_references("nope.csv", folders=[folder])
    for value in (["toy.csv"], {"path": "toy.csv"}, None, "", "toy\x00.csv"):
        with pytest.raises(ReferenceAccessError, match="not a registered name or a file name"):
            load_document_references(value, folders=[folder])


def test_long_value_is_truncated_in_the_message(folder):
    with pytest.raises(ReferenceAccessError) as info:
        load_document_references("../" + "a" * 5000, folders=[folder])
    message = str(info.value)
    assert "a" * 190 in message and "a" * 300 not in message and "..." in message


def test_reference_folders_from_env(monkeypatch, folder, tmp_path):
    monkeypatch.delenv("PHASESTREAM_REFERENCES", raising=False)
    assert reference_folders_from_env() == []
    other = tmp_path / "other"
    monkeypatch.setenv("PHASESTREAM_REFERENCES", os.pathsep.join([str(other), "", str(folder)]))
    assert reference_folders_from_env() == [other, folder]
    assert load_document_references("toy.csv", folders=reference_folders_from_env()).name == "toy"


@pytest.mark.parametrize(
    ("name", "text", "units", "message"),
    [
        ("m.txt", "60.0 1\n61.0 2\n62.0 3\n", "auto", "could be eV .M-edges. or keV; pass units='eV' or units='keV'"),
        ("kev.csv", "energy_eV,A\n8.30,1\n8.31,2\n", "auto", "header says energy_eV but the values are keV-sized"),
        ("kev.csv", "energy_eV,A\n8.30,1\n8.31,2\n", "keV", "header says energy_eV but units='keV'"),
        ("ev.txt", "8300 1\n8310 2\n", "keV", "energies look like eV"),
    ],
)
def test_energy_units_refusals(tmp_path, name, text, units, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ReferenceFormatError, match=message):
        load_references(p, units=units)


def test_energy_units_explicit(tmp_path):
    m_edge = tmp_path / "m.txt"
    m_edge.write_text("60.0 1\n61.0 2\n62.0 3\n")
    np.testing.assert_array_equal(load_references(m_edge, units="eV").energies, [60.0, 61.0, 62.0])
    np.testing.assert_array_equal(load_references(m_edge, units="keV").energies, [60000.0, 61000.0, 62000.0])
    kev = tmp_path / "k.txt"
    kev.write_text("8.300 1\n8.310 2\n")  # hard X-ray keV: unambiguous, converted by auto as before
    np.testing.assert_allclose(load_references(kev).energies, [8300.0, 8310.0])
    np.testing.assert_allclose(load_references(kev, units="keV").energies, [8300.0, 8310.0])
    small_ev = tmp_path / "s.csv"
    small_ev.write_text("energy_eV,A\n60,1\n61,2\n")
    np.testing.assert_array_equal(load_references(small_ev, units="eV").energies, [60.0, 61.0])
    with pytest.raises(ValueError, match="units must be one of"):
        load_references(kev, units="MeV")


@pytest.mark.parametrize(("text", "message"), [
    ("nan 0.5\n", r"k\.txt: non-finite value at line 3, column 1"),  # the median was NaN: keV read as eV
    ("8.320 inf\n", r"k\.txt: non-finite value at line 3, column 2"),
])
def test_a_non_finite_value_is_refused_naming_its_line(tmp_path, text, message):
    kev = tmp_path / "k.txt"
    kev.write_text("8.300 1\n8.310 2\n" + text)
    with pytest.raises(ReferenceFormatError, match=message):
        load_references(kev)
    table = tmp_path / "t.csv"
    table.write_text("energy_eV,A\n8300,1\n8310,nan\n")
    with pytest.raises(ReferenceFormatError, match=r"t\.csv: non-finite value at line 3, column 2"):
        load_references(table)


@pytest.mark.parametrize(("sidecar", "message"), [
    ("name: !!set {a, b}\n", "'name' must be text, got set"),
    ("name: 5\n", "'name' must be text, got int"),
    # a "billion laughs" of YAML aliases: 10**9 elements if it were ever expanded (repr'd or written to Tiled)
    ('a: &a ["x","x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
     'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n'
     'e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n'
     'g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]\nname: [*h,*h,*h,*h]\n',
     "'name' must be text, got list"),
])
def test_a_sidecar_name_that_is_not_text_is_refused_without_expanding_it(folder, sidecar, message):
    """The set's name goes into every result's metadata: a YAML set failed the result's creation (no result at
    all), an alias bomb held the worker for a minute and gigabytes, then timed Tiled out."""
    (folder / "toy.yaml").write_text(sidecar)
    finished, exc = _finishes_within(lambda: load_document_references("toy.csv", folders=[folder]), 10)
    assert finished and isinstance(exc, ReferenceFormatError) and message in str(exc), exc


def test_a_set_of_more_phases_than_the_bound_is_refused(tmp_path):
    """40,000 phases in a 1 MB file overflowed the int16 phase map, the run reported complete."""
    from phasestream.references import MAX_PHASES

    many = tmp_path / "many.csv"
    header = ",".join(f"P{i}" for i in range(MAX_PHASES + 1))
    many.write_text(f"energy_eV,{header}\n" + "\n".join(f"{8300 + i}," + ",".join(["1"] * (MAX_PHASES + 1))
                                                       for i in range(3)) + "\n")
    with pytest.raises(ReferenceFormatError, match=f"{MAX_PHASES + 1} phases, more than the {MAX_PHASES}"):
        load_references(many)
    with pytest.raises(ReferenceFormatError, match=r"the set's name \(list\) is not text"):
        ReferenceSet(np.array([1.0, 2.0]), ("A",), np.array([[1.0, 2.0]]), name=["a"])
