"""What an HDF5 dataset stores, against what it declares: chunks never written and data that expand far
beyond the bytes the file holds (phasestream/formats/hdf5storage.py), through the NXstxm and PyXAS readers.

The oracle is the file as h5py writes it: which chunks were written (``get_num_chunks``), how many bytes it
stores (``get_storage_size``) and the counts written; every file is a few kB to a few MB."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from formats_support import write_nxstxm

from phasestream.formats import FormatError, LazyImages, read_stack
from phasestream.formats.nxstxm import read_nxstxm
from phasestream.formats.pyxas import read_pyxas
from phasestream.formats.stack import EXPANSION_ALLOWANCE, MAX_EXPANSION

KEV = np.array([8.30, 8.33, 8.345, 8.36, 8.40])


def _counts(shape=(5, 4, 6)) -> np.ndarray:
    return np.random.default_rng(4).integers(2000, 9000, size=shape)


# --- data that expand far beyond what the file stores (decompression and fill bombs) -------------------------

def test_pyxas_chunks_never_written_are_refused_before_they_are_allocated(tmp_path):
    """A 3 kB file declaring a 64 MiB stack of chunks never written: refused, naming the dataset (before, it was
    allocated and filled with zeros: 4 GiB for the same few kB at 2048 x 2048 x 128)."""
    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("img_xanes", shape=(16, 1024, 1024), dtype="f4", chunks=(1, 1024, 1024),
                              compression="gzip")
        handle["X_eng"] = np.linspace(8.3, 8.4, 16)
    assert os.path.getsize(path) < 10_000
    with pytest.raises(FormatError, match=r"img_xanes \(/img_xanes\) declares 64\.0 MiB but stores 0 bytes") as info:
        read_stack(path)
    assert info.value.path == str(path)


def test_nxstxm_gzipped_zeros_are_refused_as_the_signal(tmp_path):
    """Written zeros, deflated about 1000-fold (deflate's ceiling): over MAX_EXPANSION, refused before the read."""
    shape = (4, 512, 512)

    def zeros(group, name="data"):
        group.create_dataset(name, data=np.zeros(shape, np.float32), chunks=(1, 512, 512), compression="gzip",
                             compression_opts=9)

    path = tmp_path / "zeros.h5"
    write_nxstxm(path, zeros)
    with h5py.File(path) as handle:
        node = handle["entry0/counter0/data"]
        stored = node.id.get_storage_size()
        assert node.nbytes > MAX_EXPANSION * stored + EXPANSION_ALLOWANCE  # the oracle: this is a bomb
    with pytest.raises(FormatError, match=r"data \(/entry0/counter0/data\) declares 4\.0 MiB but stores"):
        read_nxstxm(path)


def test_a_constant_monitor_beside_a_real_signal_is_read(tmp_path):
    """A monitor no larger than the signal costs no more than the signal, which met the bound: one recorded as a
    constant (no I0 counter) deflates far beyond MAX_EXPANSION, and refusing it refused the whole file."""
    shape = (4, 1024, 1024)
    counts = _counts(shape).astype(np.float32)

    def constant(group):
        group.create_dataset("data", data=np.full(shape, 3.0, np.float32), chunks=(1, 1024, 1024),
                             compression="gzip", compression_opts=9)

    path = tmp_path / "monitor.h5"
    write_nxstxm(path, lambda g: g.create_dataset("data", data=counts), monitor=constant)
    with h5py.File(path) as handle:
        node = handle["entry0/control/data"]
        assert node.nbytes > MAX_EXPANSION * node.id.get_storage_size() + EXPANSION_ALLOWANCE  # over the bound
    stack = read_nxstxm(path)
    np.testing.assert_array_equal(stack.images, counts[: len(stack.energies)])
    np.testing.assert_array_equal(stack.monitor, np.full(shape, 3.0))


def test_monitor_of_the_wrong_size_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A monitor larger than the signal is refused by its declared shape, not read first."""
    path = tmp_path / "big_monitor.h5"
    write_nxstxm(path, lambda g: g.create_dataset("data", data=_counts()),
            monitor=lambda group: group.create_dataset("data", data=np.ones((5, 4, 7))))
    read = []
    original = h5py.Dataset.read_direct

    def counted(self, *args, **kwargs):
        read.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "read_direct", counted)
    with pytest.raises(FormatError, match=r"control data has shape \(5, 4, 7\); expected \(5, 4, 6\) or \(5,\)"):
        read_nxstxm(path)
    assert "/entry0/counter0/energy" in read  # the oracle: reads are seen
    assert "/entry0/control/data" not in read


def test_well_compressed_real_counts_still_read(tmp_path):
    """Counts with shot noise deflate a few times: far inside the bound, read as written."""
    counts = _counts((5, 64, 64)).astype(np.uint16)
    path = tmp_path / "gzip.h5"
    write_nxstxm(path, lambda g: g.create_dataset("data", data=counts, chunks=(1, 64, 64), compression="gzip"))
    np.testing.assert_array_equal(np.asarray(read_nxstxm(path).images), counts)


# --- chunks never written are unmeasured: NaN, listed, never counts of 0 ------------------------------------

@pytest.mark.parametrize("dtype", ["i4", "f4"])
def test_nxstxm_aborted_scan_frames_never_written_are_unmeasured(tmp_path, dtype):
    """A scan that stopped after 3 of 5 energies (chunks 3 and 4 never written): those planes are NaN and
    listed as unmeasured, not counts of 0; the import cannot point at the file, which reads them as 0."""
    counts = _counts()
    path = tmp_path / f"aborted_{dtype}.h5"

    def signal(group):
        node = group.create_dataset("data", shape=counts.shape, dtype=dtype, chunks=(1, 4, 6))
        node[:3] = counts[:3]

    write_nxstxm(path, signal)
    with h5py.File(path) as handle:
        assert handle["entry0/counter0/data"].id.get_num_chunks() == 3
        assert not handle["entry0/counter0/data"][3:].any()  # the oracle: h5py reads them as 0
    stack = read_stack(path)
    images = np.asarray(stack.images)
    np.testing.assert_array_equal(images[:3], counts[:3])
    assert np.isnan(images[3:]).all()
    assert stack.metadata["unmeasured_energy_indices"] == [3, 4]
    assert stack.hdf5 is None
    if dtype == "i4":
        assert isinstance(stack.images, LazyImages)
        assert np.isnan(stack.images[4]).all() and not np.isnan(stack.images[2]).any()


def test_part_of_a_plane_never_written_is_masked_not_zero(tmp_path):
    """Chunks of half a plane: the half never written is NaN (masked pixels), the plane is not unmeasured."""
    counts = _counts()
    path = tmp_path / "half.h5"

    def signal(group):  # every chunk written but the lower half of plane 2
        node = group.create_dataset("data", shape=counts.shape, dtype="f4", chunks=(1, 2, 6))
        for index in range(5):
            node[index, :2] = counts[index, :2]
            if index != 2:
                node[index, 2:] = counts[index, 2:]

    write_nxstxm(path, signal)
    with h5py.File(path) as handle:
        assert handle["entry0/counter0/data"].id.get_num_chunks() == 9
    stack = read_nxstxm(path)
    expected = counts.astype(np.float64)
    expected[2, 2:] = np.nan
    np.testing.assert_array_equal(stack.images, expected)
    assert "unmeasured_energy_indices" not in stack.metadata


def test_pyxas_frames_never_written_are_unmeasured(tmp_path):
    images = np.random.default_rng(7).uniform(0.2, 0.9, (5, 6, 7)).astype(np.float32)
    path = tmp_path / "aborted.h5"
    with h5py.File(path, "w") as handle:
        node = handle.create_dataset("img_xanes", shape=images.shape, dtype="f4", chunks=(1, 6, 7))
        node[:4] = images[:4]
        handle["X_eng"] = KEV
    stack = read_pyxas(path)
    np.testing.assert_array_equal(stack.images[:4], images[:4])
    assert np.isnan(stack.images[4]).all()
    assert stack.metadata["unmeasured_energy_indices"] == [4]
    assert stack.hdf5 is None


def test_contiguous_dataset_never_written_is_unmeasured(tmp_path):
    """Contiguous storage never written (no address in the file): every plane unmeasured, not zeros."""
    path = tmp_path / "contiguous.h5"
    write_nxstxm(path, lambda g: g.create_dataset("data", shape=(2, 4, 6), dtype="f4"))
    with h5py.File(path) as handle:
        assert handle["entry0/counter0/data"].id.get_offset() is None  # the oracle: never allocated
    stack = read_nxstxm(path)
    assert np.isnan(stack.images).all()
    assert stack.metadata["unmeasured_energy_indices"] == [0, 1]


# --- frames read later go through the checked opener --------------------------------------------------------

def test_lazy_frames_reopen_the_file_through_the_outside_reference_check(tmp_path):
    """A file replaced after the import's check, its signal now an external link to another host file: the
    frames read later are refused, not read from that file."""
    (tmp_path / "elsewhere").mkdir()
    secret = tmp_path / "elsewhere" / "secret.h5"
    with h5py.File(secret, "w") as handle:
        handle["s"] = np.full((3, 4, 6), 4242, np.int32)
    path = tmp_path / "swap.h5"
    counts = _counts((3, 4, 6)).astype(np.int32)
    write_nxstxm(path, lambda g: g.create_dataset("data", data=counts))
    stack = read_stack(path)
    assert isinstance(stack.images, LazyImages)
    np.testing.assert_array_equal(stack.images[0], counts[0])
    swapped = tmp_path / "swap.new.h5"

    def link(group):
        group["data"] = h5py.ExternalLink(str(secret), "/s")

    with h5py.File(secret) as handle:  # _nxstxm reads the signal's shape through the link
        assert handle["s"].shape == (3, 4, 6)
    write_nxstxm(swapped, link)
    os.replace(swapped, path)
    with pytest.raises(FormatError, match="refers to other files") as info:
        stack.images[0]
    assert info.value.path == str(path)


def test_lazy_frames_refuse_a_dataset_that_changed_shape_or_type(tmp_path):
    path = tmp_path / "changed.h5"
    counts = _counts((3, 4, 6)).astype(np.int32)
    write_nxstxm(path, lambda g: g.create_dataset("data", data=counts))
    images = read_nxstxm(path).images
    assert isinstance(images, LazyImages)
    write_nxstxm(path, lambda g: g.create_dataset("data", data=counts.astype(np.int16)))
    with pytest.raises(FormatError, match=r"changed since it was checked: .*int16"):
        images[1]
