"""NXstxm files written with nexusformat (an independent NeXus writer) following the NXstxm
application definition (nexusformat/definitions applications/NXstxm.nxdl.xml), read back."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from nexusformat.nexus import (
    NXdata,
    NXdetector,
    NXentry,
    NXfield,
    NXinstrument,
    NXmonitor,
    NXmonochromator,
    NXroot,
    NXsample,
    NXsource,
)

from phasestream.formats import FormatError, LazyImages, read_stack
from phasestream.formats.nxstxm import read_nxstxm

ENERGIES = np.array([700.0, 706.5, 708.0, 709.2, 720.0])
Y = 2680.0 + 0.05 * np.arange(4)
X = -75.0 + 0.04 * np.arange(6)


def _counts(shape=(5, 4, 6)) -> np.ndarray:
    return np.random.default_rng(11).integers(2000, 9000, size=shape).astype(np.int32)


def _entry(counts, *, energy_last=False, scan_type="sample image stack", ring=None, definition="NXstxm"):
    """One NXentry as the definition lays it out; energy first, or last when energy_last."""
    entry = NXentry()
    entry.definition = NXfield(definition)
    entry.title = NXfield("Fe L3 stack")
    entry.start_time = NXfield("2026-11-30T10:00:00")
    entry.instrument = NXinstrument()
    # nexusformat takes name= as the group's own name: the NXsource / NXsample name fields are set after
    entry.instrument.source = NXsource(type="Synchrotron X-ray Source", probe="x-ray")
    entry.instrument.source["name"] = NXfield("CLS SM 10ID-1")
    points = counts.size
    entry.instrument.monochromator = NXmonochromator(energy=NXfield(np.repeat(ENERGIES, points // 5), units="eV"))
    entry.instrument.counter0 = NXdetector(data=NXfield(counts.reshape(-1)))
    entry.sample = NXsample(rotation_angle=NXfield(0.0))
    entry.sample["name"] = NXfield("LiFePO4 particles")
    energy = NXfield(ENERGIES, name="energy", units="eV")
    y = NXfield(Y, name="sample_y", units="um")
    x = NXfield(X, name="sample_x", units="um")
    if energy_last:
        data = NXdata(NXfield(np.transpose(counts, (1, 2, 0)), name="data"), [y, x, energy])
    else:
        data = NXdata(NXfield(counts, name="data"), [energy, y, x])
    data.stxm_scan_type = NXfield(scan_type)
    data.count_time = NXfield(np.full(5, 2.5e-3), units="s")
    entry.counter0 = data
    if ring is not None:
        entry.control = NXmonitor(data=NXfield(ring))
    return entry


def _save(path, **entries) -> None:
    root = NXroot()
    for name, entry in entries.items():
        root[name] = entry
    root.save(str(path), "w")


def test_image_stack_with_control(tmp_path):
    counts = _counts()
    ring = np.linspace(300.0, 298.0, counts.size).reshape(counts.shape)
    path = tmp_path / "Fe_stack.hdf5"
    _save(path, entry0=_entry(counts, ring=ring))
    stack = read_stack(path)  # detected from content
    assert stack.format == "nxstxm" and stack.mode == "stxm"
    np.testing.assert_array_equal(stack.images, counts.astype(np.float64))
    np.testing.assert_array_equal(stack.energies, ENERGIES)
    np.testing.assert_array_equal(stack.monitor, ring)
    assert stack.i0 is None
    meta = stack.metadata
    assert meta["sample"] == "LiFePO4 particles"
    assert meta["beamline"] == "CLS SM 10ID-1"
    assert meta["dwell_ms"] == pytest.approx(2.5)
    assert meta["pixel_size_x_um"] == pytest.approx(0.04)
    assert meta["pixel_size_y_um"] == pytest.approx(0.05)
    assert meta["stxm_scan_type"] == "sample image stack"
    assert meta["entry"] == "entry0" and meta["channel"] == "counter0"
    assert meta["title"] == "Fe L3 stack"
    assert stack.hdf5 is not None and stack.hdf5.dataset == "/entry0/counter0/data" and stack.hdf5.energy_axis == 0
    with h5py.File(path) as handle:  # the HDF5 source really is the stack
        np.testing.assert_array_equal(handle[stack.hdf5.dataset][()], counts)


@pytest.mark.parametrize("micro", ["\u00b5", "\u03bc"])
def test_micro_is_the_micro_sign_or_the_greek_mu(tmp_path, micro):
    """PolLux (SLS) files write their axes in "\u03bcm" (Greek mu, U+03BC; nexusformat/exampledata
    SLS/Sample_Stack_2021-03-16_128.hdf5); others in "\u00b5m" (the micro sign): both are micrometres."""
    path = tmp_path / "mu.hdf5"
    _save(path, entry0=_entry(_counts()))
    with h5py.File(path, "r+") as handle:
        for axis in ("sample_x", "sample_y"):
            handle[f"entry0/counter0/{axis}"].attrs["units"] = f"{micro}m"
        handle["entry0/counter0/count_time"].attrs["units"] = f"{micro}s"
    meta = read_nxstxm(path).metadata
    assert meta["pixel_size_x_um"] == pytest.approx(np.median(np.diff(X)))
    if micro == "\u00b5":  # the micro sign in Latin-1 bytes (PolLux writes some of its units so) reads the same
        with h5py.File(path, "r+") as handle:
            handle["entry0/counter0/sample_x"].attrs["units"] = np.bytes_(b"\xb5m")
        assert read_nxstxm(path).metadata["pixel_size_x_um"] == pytest.approx(np.median(np.diff(X)))
    assert meta["pixel_size_y_um"] == pytest.approx(np.median(np.diff(Y)))
    assert meta["dwell_ms"] == pytest.approx(2.5e-6)


def test_integer_counts_stay_in_the_file_until_read(tmp_path):
    """Integer counts stored energy first are read frame by frame when indexed, as the file holds them."""
    counts = _counts()
    path = tmp_path / "lazy.hdf5"
    _save(path, entry0=_entry(counts))
    images = read_nxstxm(path).images
    assert isinstance(images, LazyImages) and images.dtype == np.float64 and images.stored_dtype == np.int32
    np.testing.assert_array_equal(images[3], counts[3])
    np.testing.assert_array_equal(images[1:4, 2], counts[1:4, 2])
    np.testing.assert_array_equal(np.asarray(images), counts)
    with pytest.raises(IndexError):
        images[len(counts)]


def test_energy_last_axes(tmp_path):
    counts = _counts()
    path = tmp_path / "last.nxs"
    _save(path, entry1=_entry(counts, energy_last=True))
    stack = read_nxstxm(path)
    np.testing.assert_array_equal(stack.images, counts)
    assert stack.hdf5 == stack.hdf5.__class__(path, "/entry1/counter0/data", 2)


def test_old_style_axis_attributes(tmp_path):
    counts = _counts()
    path = tmp_path / "old.hdf5"
    _save(path, entry0=_entry(counts, energy_last=True))
    with h5py.File(path, "r+") as handle:  # before the axes attribute: axis=k (1-based) on each field
        group = handle["entry0/counter0"]
        del group.attrs["axes"]
        for name, axis in (("sample_y", 1), ("sample_x", 2), ("energy", 3)):
            group[name].attrs["axis"] = axis
    np.testing.assert_array_equal(read_nxstxm(path).images, counts)


def test_definition_as_one_element_array_and_scan_type_array(tmp_path):
    counts = _counts()
    path = tmp_path / "pystxm.hdf5"
    _save(path, entry0=_entry(counts))
    with h5py.File(path, "r+") as handle:  # pyStxm's style: (1,) byte-string arrays
        del handle["entry0/definition"], handle["entry0/counter0/stxm_scan_type"]
        handle["entry0"].create_dataset("definition", data=np.array([b"NXstxm"]))
        handle["entry0/counter0"].create_dataset("stxm_scan_type", data=np.array([b"sample image stack"]))
    stack = read_stack(path)
    np.testing.assert_array_equal(stack.images, counts)


def test_single_image_and_aborted_planes(tmp_path):
    image = _counts((1, 4, 6))[0]
    entry = _entry(_counts())
    entry.counter0 = NXdata(NXfield(image, name="data"), [NXfield(Y, name="sample_y"), NXfield(X, name="sample_x")])
    entry.counter0.energy = NXfield([708.0], units="eV")
    entry.counter0.stxm_scan_type = NXfield("sample image")
    path = tmp_path / "image.hdf5"
    _save(path, entry0=entry)
    stack = read_nxstxm(path)
    assert stack.images.shape == (1, 4, 6) and stack.hdf5 is None
    np.testing.assert_array_equal(stack.images[0], image)
    # an aborted stack: the last planes are still NaN
    counts = _counts().astype(np.float32)
    counts[3:] = np.nan
    path = tmp_path / "aborted.hdf5"
    _save(path, entry0=_entry(counts))
    assert read_nxstxm(path).metadata["unmeasured_energy_indices"] == [3, 4]


def test_entries_and_channels(tmp_path):
    first, second = _counts(), _counts() + 1
    entry = _entry(first)
    entry.counter1 = NXdata(
        NXfield(second, name="data"),
        [NXfield(ENERGIES, name="energy"), NXfield(Y, name="sample_y"), NXfield(X, name="sample_x")],
    )
    entry.counter1.stxm_scan_type = NXfield("sample image stack")
    path = tmp_path / "two.hdf5"
    _save(path, entry0=entry, entry1=_entry(second), other=NXentry(definition=NXfield("NXtomo")))
    stack = read_nxstxm(path)
    assert stack.metadata["entries"] == ["entry0", "entry1"]
    assert stack.metadata["channels"] == ["counter0", "counter1"]
    np.testing.assert_array_equal(read_nxstxm(path, channel="counter1").images, second)
    np.testing.assert_array_equal(read_nxstxm(path, entry="entry1").images, second)
    with h5py.File(path, "r+") as handle:
        handle["entry0"].attrs["default"] = "counter1"
    np.testing.assert_array_equal(read_nxstxm(path).images, second)
    with pytest.raises(FormatError, match="no NXstxm entry 'other'"):
        read_nxstxm(path, entry="other")


def _bad(tmp_path, change):
    path = tmp_path / "bad.hdf5"
    _save(path, entry0=_entry(_counts()))
    with h5py.File(path, "r+") as handle:
        change(handle)
    return path


def _set(handle, name, value):
    del handle[name]
    handle[name] = value


def _old_style_axis(handle, value):
    group = handle["entry0/counter0"]
    del group.attrs["axes"]
    for name, axis in (("sample_y", 2), ("sample_x", 3), ("energy", value)):
        group[name].attrs["axis"] = axis


def _sparse(handle, name, dtype, size):
    """``name`` replaced by a dataset of ``size`` values that takes no room in the file (never written)."""
    del handle[name]
    handle.create_dataset(name, shape=(size,), dtype=dtype, chunks=(1024,))


def _attr(node, name, value):
    del node.attrs[name]
    node.attrs[name] = value


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda h: _set(h, "entry0/definition", "NXtomo"), "no NXentry with definition 'NXstxm'"),
        (lambda h: _set(h, "entry0/counter0/stxm_scan_type", "sample line spectrum"), "is not an image stack"),
        (lambda h: _set(h, "entry0/counter0/energy", ENERGIES[:3]), "5 images in /entry0/counter0/data for 3 energies"),
        (lambda h: _set(h, "entry0/counter0/energy", ENERGIES * 0 + 700.0), "duplicate energies"),
        (lambda h: _set(h, "entry0/counter0/energy", np.r_[ENERGIES[:4], np.inf]), "must be finite"),
        (lambda h: _set(h, "entry0/counter0/sample_x", X[:3]), "sample_x has 3 positions for 6 pixels"),
        (lambda h: _attr(h["entry0/counter0"], "axes", ["energy", "sample_y"]), "do not match"),
        (lambda h: _attr(h["entry0/counter0"], "axes", ["energy", "sample_y", "zoneplate_z"]), "lack"),
        (lambda h: h["entry0/counter0"].attrs.modify("signal", "counts"), "no signal dataset 'counts'"),
        (lambda h: h["entry0/counter0/energy"].attrs.modify("units", "J"), "energy unit 'J'"),
        (lambda h: h.create_dataset("entry0/control/data", data=np.ones(7)), "control data has shape"),
        (lambda h: h["entry0"].__delitem__("counter0"), "has no NXdata group"),
        (lambda h: h["entry0/counter0"].__delitem__("stxm_scan_type"), "has no stxm_scan_type"),
        # fields whose type or size the reader did not check before
        (lambda h: _old_style_axis(h, "energy"), "axis attribute that is not a dimension number"),
        (lambda h: _old_style_axis(h, np.array([], np.int64)), "axis attribute that is not a dimension number"),
        (lambda h: _set(h, "entry0/counter0/stxm_scan_type", np.array([b"sample image stack"] * 1000)),
         "1000 values of .* not a text"),
        (lambda h: _sparse(h, "entry0/counter0/stxm_scan_type", "S20", 10**9), "not a text"),
        (lambda h: _sparse(h, "entry0/counter0/energy", np.float64, 10**9), "over the 1000000 read"),
        (lambda h: _sparse(h, "entry0/definition", "S6", 10**9), "no NXentry with definition 'NXstxm'"),
    ],
)
def test_bad_files(tmp_path, change, problem):
    path = _bad(tmp_path, change)
    with pytest.raises(FormatError, match=problem) as info:
        read_nxstxm(path)
    assert info.value.path == str(path)


def test_keV_energies(tmp_path):
    path = _bad(tmp_path, lambda h: _set(h, "entry0/counter0/energy", ENERGIES / 1000.0))
    with h5py.File(path, "r+") as handle:
        handle["entry0/counter0/energy"].attrs["units"] = "keV"
    np.testing.assert_allclose(read_nxstxm(path).energies, ENERGIES)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.hdf5"
    _save(path, entry0=_entry(_counts((5, 64, 64))))
    data = path.read_bytes()
    for keep in (0, 100, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:keep])
        with pytest.raises(FormatError) as info:
            read_nxstxm(path)
        assert info.value.path == str(path)
