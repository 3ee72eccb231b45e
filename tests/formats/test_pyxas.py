"""PyXAS files written with h5py in PyXAS's layout (its GUI's "combine and save" writer: root
datasets X_eng in keV and img_xanes float32; raw stacks add img_bkg / img_dark), read back."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from phasestream.formats import FormatError, read_stack
from phasestream.formats.pyxas import read_pyxas

KEV = np.array([8.30, 8.33, 8.345, 8.36, 8.40])


def _transmission(shape=(5, 6, 7)) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.uniform(0.2, 0.95, size=shape).astype(np.float32)


def _write(path, **datasets) -> None:
    with h5py.File(path, "w") as handle:
        for key, value in datasets.items():
            handle.create_dataset(key, data=value)


def test_normalized_stack_in_kev(tmp_path):
    images = _transmission()
    path = tmp_path / "xanes.h5"
    _write(path, X_eng=KEV, img_xanes=images, scan_id=12345)
    stack = read_stack(path)  # detected by content
    assert stack.format == "pyxas" and stack.mode == "txm"
    np.testing.assert_allclose(stack.energies, KEV * 1000.0)
    np.testing.assert_array_equal(stack.images, images)
    assert stack.images.dtype == np.float32
    assert stack.metadata == {"energy_unit_in_file": "keV (inferred)", "normalized": True, "scan_id": 12345}
    assert stack.dark is None and stack.i0 is None
    np.testing.assert_array_equal(stack.flat, np.ones((6, 7), np.float32))
    # the OD the mapping gives is PyXAS's norm_txm: -ln(img_xanes)
    od = -np.log((stack.images - 0.0) / stack.flat)
    np.testing.assert_allclose(od, -np.log(images), rtol=1e-6)
    assert stack.hdf5 is not None and stack.hdf5.dataset == "/img_xanes" and stack.hdf5.energy_axis == 0
    assert stack.files == (path,)


def test_raw_stack_with_bkg_and_dark(tmp_path):
    rng = np.random.default_rng(3)
    flat = rng.uniform(900, 1100, size=(6, 7)).astype(np.float32)
    dark = np.full((6, 7), 100.0, np.float32)
    sample = (dark + (flat - dark) * _transmission()).astype(np.float32)
    path = tmp_path / "raw.h5"
    _write(path, X_eng=KEV * 1000.0, img_xanes=sample, img_bkg=flat[np.newaxis], img_dark=dark)
    stack = read_pyxas(path)
    np.testing.assert_allclose(stack.energies, KEV * 1000.0)  # > 100: eV
    assert stack.metadata["energy_unit_in_file"] == "eV (inferred)"
    assert stack.metadata["normalized"] is False
    np.testing.assert_array_equal(stack.flat, flat)
    np.testing.assert_array_equal(stack.dark, dark)
    pyxas_norm = (sample - dark) / (flat - dark)  # what PyXAS's loader computes
    np.testing.assert_allclose((stack.images - stack.dark) / (stack.flat - stack.dark), pyxas_norm, rtol=1e-6)


def test_unit_attribute_and_root_unit_dataset(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("img_xanes", data=_transmission())
        handle.create_dataset("X_eng", data=KEV * 1000.0).attrs["units"] = "eV"
    assert read_pyxas(path).metadata["energy_unit_in_file"] == "eV"
    path = tmp_path / "b.h5"
    _write(path, img_xanes=_transmission(), X_eng=KEV, unit="keV")
    stack = read_pyxas(path)
    np.testing.assert_allclose(stack.energies, KEV * 1000.0)
    assert stack.metadata["energy_unit_in_file"] == "keV"


def test_single_image_and_scalar_energy(tmp_path):
    image = _transmission((1, 6, 7))[0]
    path = tmp_path / "one.h5"
    _write(path, img_xanes=image, X_eng=8.333)
    stack = read_pyxas(path)
    assert stack.images.shape == (1, 6, 7) and stack.hdf5 is None
    np.testing.assert_allclose(stack.energies, [8333.0])


def test_energies_override(tmp_path):
    path = tmp_path / "x.h5"
    _write(path, img_xanes=_transmission(), X_eng=KEV)
    stack = read_pyxas(path, energies=[1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(stack.energies, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert "energy_unit_in_file" not in stack.metadata


@pytest.mark.parametrize(
    ("datasets", "problem"),
    [
        ({"X_eng": KEV}, "no img_xanes dataset"),
        ({"img_xanes": _transmission()}, "no X_eng dataset"),
        ({"img_xanes": _transmission(), "X_eng": KEV[:3]}, "5 images in img_xanes for 3 energies"),
        ({"img_xanes": _transmission(), "X_eng": [8.3, 8.3, 8.4, 8.5, 8.6]}, "duplicate energies"),
        ({"img_xanes": _transmission(), "X_eng": [8.3, np.nan, 8.4, 8.5, 8.6]}, "must be finite"),
        ({"img_xanes": _transmission(), "X_eng": KEV, "unit": "nm"}, "neither keV nor eV"),
        ({"img_xanes": _transmission(), "X_eng": KEV, "img_bkg": np.ones((5, 7))}, "img_bkg has shape"),
        ({"img_xanes": _transmission(), "X_eng": KEV, "img_dark": np.ones((6, 7))}, "img_dark without img_bkg"),
        ({"img_xanes": np.ones((2, 3, 4, 5)), "X_eng": KEV}, "expected \\(energy, y, x\\)"),
    ],
)
def test_bad_files(tmp_path, datasets, problem):
    path = tmp_path / "bad.h5"
    _write(path, **datasets)
    with pytest.raises(FormatError, match=problem) as info:
        read_pyxas(path)
    assert info.value.path == str(path)


def test_truncated_hdf5(tmp_path):
    path = tmp_path / "t.h5"
    _write(path, img_xanes=_transmission((5, 64, 64)), X_eng=KEV)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated") as info:
        read_pyxas(path)
    assert info.value.path == str(path)
    with pytest.raises(FormatError, match="truncated"):
        read_stack(path)


def test_hdf5_that_is_neither(tmp_path):
    path = tmp_path / "other.h5"
    _write(path, data=np.ones((2, 3, 4)))
    with pytest.raises(FormatError, match=r"neither NeXus NXstxm .* nor PyXAS .* top-level keys: \['data'\]"):
        read_stack(path)
    with pytest.raises(FormatError, match="no img_xanes dataset"):
        read_stack(path, format="pyxas", energies=[1.0, 2.0])


def _external_storage(path, other):
    other.write_bytes(np.full(5 * 6 * 7, 42, np.uint8).tobytes())
    with h5py.File(path, "w") as handle:
        handle.create_dataset("X_eng", data=KEV)
        handle.create_dataset("img_xanes", shape=(5, 6, 7), dtype="u1", external=[(str(other), 0, 5 * 6 * 7)])


def _external_link(path, other):
    _write(other, img=_transmission())
    with h5py.File(path, "w") as handle:
        handle.create_dataset("X_eng", data=KEV)
        handle["img_xanes"] = h5py.ExternalLink(str(other), "/img")


def _virtual(path, other):
    _write(other, img=_transmission())
    layout = h5py.VirtualLayout(shape=(5, 6, 7), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(other), "img", shape=(5, 6, 7))
    with h5py.File(path, "w") as handle:
        handle.create_dataset("X_eng", data=KEV)
        handle.create_virtual_dataset("img_xanes", layout)


@pytest.mark.parametrize(("make", "problem"), [(_external_storage, "keeps its data in external files"),
                                                (_external_link, "is an external link to"),
                                                (_virtual, "is a virtual dataset")])
def test_a_file_that_refers_to_other_host_files_is_refused(tmp_path, make, problem):
    """Through HDF5 external storage, external links or virtual datasets an imported file could make
    phasestream (and Tiled, serving the import) read any host file; its checksum would not cover it."""
    (tmp_path / "elsewhere").mkdir()
    path, other = tmp_path / "xanes.h5", tmp_path / "elsewhere" / "other.bin"
    make(path, other)
    with pytest.raises(FormatError, match=f"refers to other files, which are not read: /img_xanes {problem}"):
        read_stack(path)
