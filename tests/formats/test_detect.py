"""Format detection and the small HDF5 fields it and the readers read (phasestream/formats/detect.py,
hdf5util.py): an empty field, a corrupt object header or anything else detection meets is the file's
FormatError, never a raw h5py or NumPy exception."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from formats_support import write_nxstxm

from phasestream.formats import FormatError, read_stack
from phasestream.formats.nxstxm import read_nxstxm

KEV = np.array([8.33, 8.34, 8.35])


def _pyxas(path, **extra) -> None:
    with h5py.File(path, "w") as handle:
        handle["img_xanes"] = np.full((3, 4, 4), 0.5, np.float32)
        handle["X_eng"] = KEV
        for name, value in extra.items():
            handle.create_dataset(name, data=value)


def _nxstxm(path) -> None:
    counts = np.arange(3 * 4 * 6, dtype=np.float32).reshape(3, 4, 6) + 1
    write_nxstxm(path, lambda g: g.create_dataset("data", data=counts))


def _replace(path, name, value) -> None:
    with h5py.File(path, "r+") as handle:
        if name in handle:
            del handle[name]
        handle.create_dataset(name, data=value)


def test_an_empty_definition_is_not_an_nxstxm_entry(tmp_path):
    """A definition of null dataspace (h5py.Empty): the file is neither format, said as a FormatError (a
    TypeError escaped detection before)."""
    path = tmp_path / "empty_definition.h5"
    with h5py.File(path, "w") as handle:
        entry = handle.create_group("entry0")
        entry.attrs["NX_class"] = "NXentry"
        entry.create_dataset("definition", data=h5py.Empty("S6"))
    with h5py.File(path) as handle:
        assert handle["entry0/definition"].shape is None  # the oracle: a null dataspace
    with pytest.raises(FormatError, match="neither NeXus NXstxm") as info:
        read_stack(path)
    assert info.value.path == str(path)


def _corrupt_object_header(path, which: int) -> None:
    """A file whose ``which``-th child object header (version 2, checksummed) has one byte flipped."""
    with h5py.File(path, "w", libver="latest") as handle:
        entry = handle.create_group("entry0")
        entry.attrs["NX_class"] = "NXentry"
        entry.create_dataset("definition", data=b"NXstxm")
        handle.create_dataset("zzz", data=np.arange(10))
    raw = bytearray(path.read_bytes())
    headers = [i for i in range(len(raw)) if raw.startswith(b"OHDR", i)]
    assert len(headers) == 4  # root, entry0, definition, zzz
    raw[headers[which] + 8] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("which", [1, 2, 3])
def test_a_corrupt_object_header_is_the_files_format_error(tmp_path, which):
    """h5py's RuntimeError from the walk over the file's links (checksum failure) escaped detection before."""
    path = tmp_path / f"corrupt_{which}.h5"
    _corrupt_object_header(path, which)
    with pytest.raises(FormatError) as info:
        read_stack(path)
    assert info.value.path == str(path)


def test_detection_errors_nobody_foresaw_are_the_files_format_error(tmp_path, monkeypatch):
    from phasestream import formats

    path = tmp_path / "x.h5"
    _pyxas(path)

    def broken(path):
        raise KeyError("something nobody foresaw")

    monkeypatch.setattr(formats, "detect_format", broken)
    with pytest.raises(FormatError, match="could not tell the format of this file: KeyError") as info:
        formats.read_stack(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("scan_id", [np.zeros(0, np.int64), h5py.Empty("i8")], ids=["shape (0,)", "null"])
def test_an_empty_optional_field_is_absent(tmp_path, scan_id):
    """PyXAS's optional scan_id, empty: the stack reads, without a scan_id (IndexError / TypeError before)."""
    path = tmp_path / "pyxas.h5"
    _pyxas(path, scan_id=scan_id)
    stack = read_stack(path)
    assert "scan_id" not in stack.metadata
    np.testing.assert_allclose(stack.energies, KEV * 1000)


@pytest.mark.parametrize("empty", [np.zeros(0, np.float64), h5py.Empty("f8")], ids=["shape (0,)", "null"])
def test_empty_optional_nxstxm_fields_are_absent(tmp_path, empty):
    path = tmp_path / "nx.h5"
    _nxstxm(path)
    _replace(path, "entry0/counter0/sample_x", empty)
    _replace(path, "entry0/counter0/count_time", empty)
    with h5py.File(path, "r+") as handle:
        handle["entry0"].create_group("control").attrs["NX_class"] = "NXmonitor"
        handle["entry0/control"].create_dataset("data", data=empty)
    stack = read_nxstxm(path)
    assert "pixel_size_x_um" not in stack.metadata and "dwell_ms" not in stack.metadata
    assert stack.metadata["pixel_size_y_um"] == pytest.approx(0.05)
    assert stack.monitor is None


@pytest.mark.parametrize(("name", "problem"), [
    ("entry0/counter0/stxm_scan_type", r"stxm_scan_type \(/entry0/counter0/stxm_scan_type\) is empty"),
    ("entry0/counter0/energy", r"energy \(/entry0/counter0/energy\) is empty"),
    ("entry0/counter0/data", r"data \(/entry0/counter0/data\) is empty"),
])
@pytest.mark.parametrize("empty", ["shape (0,)", "null"])
def test_an_empty_required_field_is_a_format_error_naming_it(tmp_path, name, problem, empty):
    path = tmp_path / "nx.h5"
    _nxstxm(path)
    dtype = "S20" if name.endswith("scan_type") else "f8"
    _replace(path, name, np.zeros(0, dtype) if empty == "shape (0,)" else h5py.Empty(dtype))
    if name.endswith("/data") and empty == "shape (0,)":
        problem = r"has shape \(0,\)"  # a 1-D signal: its shape is wrong before it is empty
    with pytest.raises(FormatError, match=problem) as info:
        read_stack(path)
    assert info.value.path == str(path)
