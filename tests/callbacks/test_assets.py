"""Files named by documents (StreamResource uri, Resource path, NPY_SEQ datum index) are read only when
they are regular files inside the configured asset folders; oracle: the frames written, and the refusal."""

import copy
import os
import threading

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from ophyd.sim import SynSignal, SynSignalWithRegistry

from phasestream.callbacks.assets import (
    HDF5_MIMETYPE,
    NPY_MIMETYPE,
    AssetFolders,
    AssetRefused,
    NumpySeqHandler,
    read_stream_frames,
)
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.contract import DocumentBounds
from phasestream.references import load_references, select_energies
from phasestream.sim import HDF5TransmissionDetector, energy_stack_scan, make_energy, make_sample

FRAMES = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
DATUM = {"uid": "d1", "stream_resource": "r1", "indices": {"start": 1, "stop": 3}}


def _resource(path, mimetype=HDF5_MIMETYPE, dataset="/entry/data/data"):
    return {"uid": "r1", "mimetype": mimetype, "uri": f"file://localhost{path}", "parameters": {"dataset": dataset}}


@pytest.fixture
def assets(tmp_path):
    folder = tmp_path / "assets"
    folder.mkdir()
    with h5py.File(folder / "frames.h5", "w") as f:
        f["entry/data/data"] = FRAMES
    np.save(folder / "frames.npy", FRAMES)
    return folder


def test_frames_inside_the_folder_are_read(assets):
    folders = AssetFolders([assets])
    for name, mimetype in (("frames.h5", HDF5_MIMETYPE), ("frames.npy", NPY_MIMETYPE)):
        frames = read_stream_frames(_resource(assets / name, mimetype), DATUM, folders=folders)
        np.testing.assert_array_equal(frames, FRAMES[1:3])


def test_a_file_outside_the_folders_or_through_a_link_out_is_refused(assets, tmp_path):
    outside = tmp_path / "elsewhere.h5"
    with h5py.File(outside, "w") as f:
        f["entry/data/data"] = FRAMES
    (assets / "link.h5").symlink_to(outside)
    with pytest.raises(AssetRefused, match="no asset folder is configured"):
        read_stream_frames(_resource(assets / "frames.h5"), DATUM, folders=AssetFolders())
    for path in (outside, assets / "link.h5", assets / ".." / "elsewhere.h5"):
        with pytest.raises(AssetRefused, match="lies outside the asset folders"):
            read_stream_frames(_resource(path), DATUM, folders=AssetFolders([assets]))


def test_a_fifo_in_the_folder_is_refused_without_blocking(assets):
    os.mkfifo(assets / "pipe.npy")  # np.load of a FIFO blocks until a writer comes: forever
    done = []

    def read() -> None:
        try:
            read_stream_frames(_resource(assets / "pipe.npy", NPY_MIMETYPE), DATUM, folders=AssetFolders([assets]))
        except AssetRefused as error:
            done.append(str(error))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and "not a regular file" in done[0]


def test_hdf5_data_in_other_files_is_refused(assets, tmp_path):
    np.save(tmp_path / "secret.npy", FRAMES)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = FRAMES
    with h5py.File(assets / "tricks.h5", "w") as f:
        f["entry/linked"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/")
        f.create_dataset("entry/raw", shape=FRAMES.shape, dtype=FRAMES.dtype,
                         external=[(str(tmp_path / "secret.npy"), 128, FRAMES.nbytes)])
        layout = h5py.VirtualLayout(shape=FRAMES.shape, dtype=FRAMES.dtype)
        layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "data", shape=FRAMES.shape)
        f.create_virtual_dataset("entry/virtual", layout)
    folders = AssetFolders([assets])
    for dataset, reason in (("/entry/linked/data", "external link"), ("/entry/raw", "external or virtual"),
                            ("/entry/virtual", "external or virtual")):
        with pytest.raises(AssetRefused, match=reason):
            read_stream_frames(_resource(assets / "tricks.h5", dataset=dataset), DATUM, folders=folders)


@pytest.mark.parametrize("indices, reason", [
    ({"start": 2, "stop": 1}, "0 <= start < stop"),
    ({"start": "0", "stop": 1}, "0 <= start < stop"),
    ({"start": 0, "stop": 10_001}, "more than --max-num-points"),
    (None, "0 <= start < stop"),
])
def test_the_frames_a_datum_selects_are_checked_before_reading(assets, indices, reason):
    with pytest.raises(ValueError, match=reason):
        read_stream_frames(_resource(assets / "frames.h5"), {**DATUM, "indices": indices},
                           folders=AssetFolders([assets]))
    with pytest.raises(ValueError, match="at most 19 pixels"):
        read_stream_frames(_resource(assets / "frames.h5"), DATUM, folders=AssetFolders([assets]),
                           bounds=DocumentBounds(max_image_pixels=19))


def test_npy_seq_reads_an_integer_index_inside_the_folder_only(assets, tmp_path):
    np.save(assets / "img_0.npy", FRAMES[0])
    np.save(tmp_path / "img_0.npy", FRAMES[1])
    handler = NumpySeqHandler("img", root=str(assets), folders=AssetFolders([assets]))
    np.testing.assert_array_equal(handler(0), FRAMES[0])
    for index in ("0", "x/../../img_0", -1, True):  # a string index could walk out of the folder
        with pytest.raises(ValueError, match="non-negative integer"):
            handler(index)
    escaped = NumpySeqHandler("../img", root=str(assets), folders=AssetFolders([assets]))
    with pytest.raises(AssetRefused, match="outside"):
        escaped(0)


ENERGIES = select_energies(load_references("nvpf-synthetic"), 12)


def _feed(docs, **options):
    cb = PhaseMapCallback(None, backend="numpy", **options)
    for name, doc in docs:
        cb(name, doc)
    cb.flush()
    return cb.results[docs[0][1]["uid"]]


def test_a_run_whose_hdf5_images_lie_outside_the_folders_fails_with_the_reason(tmp_path):
    sample = make_sample((24, 24), state_of_charge=2.0, seed=5, n_particles=1)
    energy = make_energy()
    det = HDF5TransmissionDetector(sample, energy, i0=8000.0, seed=1, write_path=tmp_path / "detector")
    docs = []
    RunEngine({})(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key),
                  lambda n, d: docs.append((n, copy.deepcopy(d))))
    (tmp_path / "other").mkdir()
    for folders, reason in (((), "no asset folder is configured"), ([tmp_path / "other"], "outside the asset")):
        result = _feed(docs, asset_folders=folders)
        assert result.status == "failed" and any(reason in e for e in result.errors), (result.status, result.errors)
    assert _feed(docs, asset_folders=[tmp_path / "detector"]).status == "complete"


def test_resource_datum_images_outside_the_folders_are_not_read(tmp_path):
    sample = make_sample((24, 24), state_of_charge=2.0, seed=6, n_particles=1)
    energy = make_energy()
    rng = np.random.default_rng(0)
    (tmp_path / "npy").mkdir()
    img = SynSignalWithRegistry(lambda: sample.transmitted(energy.position, i0=8000.0, rng=rng).astype(np.uint16),
                                name="det_img", save_path=str(tmp_path / "npy"), labels={"detectors"})
    i0 = SynSignal(lambda: 8000.0, name="det_i0")
    docs = []
    RunEngine({})(energy_stack_scan([img, i0], energy, ENERGIES, sample={"name": "npy", "state_of_charge": 2.0},
                                    image_key="det_img", i0_key="det_i0"),
                  lambda n, d: docs.append((n, copy.deepcopy(d))))
    result = _feed(docs)
    assert result.status == "failed" and any("no asset folder is configured" in e for e in result.errors), \
        result.errors
    assert _feed(docs, asset_folders=[tmp_path / "npy"]).status == "complete"
