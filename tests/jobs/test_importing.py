"""``phasestream import`` (issue 20): a facility stack becomes a raw run that analyses to the same phase map as
the same scan taken live through the simulator; refused input and failed writes leave nothing in Tiled; the
same file imported twice is one run."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.formats import HDF5Source, ImportedStack
from phasestream.jobs import importing
from phasestream.jobs.importing import ImportOptions, find_import, import_stack, import_uid
from phasestream.jobs.reprocess import ReprocessOptions, reprocess_run
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import open_raw_run, raw_run_writer

ENERGIES = select_energies(load_references("nvpf-synthetic"), 12)  # 13 energies with the pre-edge one
SHAPE = (32, 32)
ARRAYS = ("od", "pcc", "phase", "reliability", "ambiguous", "mask")
SOC = 1.5
REFS = "nvpf-synthetic"  # an import names its references: a facility file does not
IMPORT = ["import", "--references", REFS]


def _detector(mode: str, seed: int):
    sample = make_sample(SHAPE, state_of_charge=SOC, seed=seed, n_particles=2)
    energy = make_energy()
    return sample, energy, TransmissionDetector(sample, energy, mode=mode, i0=6000.0, seed=seed)


def _live(client, mode: str, seed: int) -> str:
    """The scan taken live: RunEngine, simulated devices, TiledWriter; the raw run's uid."""
    sample, energy, det = _detector(mode, seed)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, mode=mode,
                                  i0_key=det.i0_key if mode == "stxm" else None))
    return uid


def _frames(mode: str, seed: int) -> dict[str, np.ndarray]:
    """The frames the live scan's detector draws, in the same order (same seed): darks, then per energy the
    flat (TXM) and the image. What a facility file of that scan holds."""
    _, energy, det = _detector(mode, seed)
    out: dict[str, list] = {"images": [], "flat": [], "i0": []}
    if mode == "txm":
        det.shutter.put("closed")
        out["dark"] = det.acquire()[0]
        det.shutter.put("open")
    for e in ENERGIES:
        energy.set(e).wait(5)
        if mode == "txm":
            det.sample_position.put("out")
            out["flat"].append(det.acquire()[0])
            det.sample_position.put("in")
        frame, i0 = det.acquire()
        out["images"].append(frame)
        out["i0"].append(i0)
    return {k: np.asarray(v) for k, v in out.items()}


def _stack(frames, mode: str, path, *, hdf5: bool = False, images=None) -> ImportedStack:
    """An ImportedStack of ``frames``, as a reader returns it; with ``hdf5`` the images lie in ``path`` (NXstxm
    layout) and the stack points there."""
    if hdf5:
        with h5py.File(path, "w") as f:
            f["/entry/data/data"] = frames["images"]
            f["/entry"].attrs["file_name"] = str(path)  # two files of the same frames are two imports
    else:
        np.save(path, frames["images"])
    txm = mode == "txm"
    return ImportedStack(path, "nxstxm" if hdf5 else "tiff", np.asarray(ENERGIES),
                         frames["images"] if images is None else images, mode=mode,
                         i0=None if txm else frames["i0"], flat=frames["flat"] if txm else None,
                         dark=frames.get("dark"), metadata={"sample": "P7", "state_of_charge": SOC, "dwell_ms": 1.0},
                         files=(path,), hdf5=HDF5Source(path, "/entry/data/data") if hdf5 else None)


def _result(client, uid: str) -> dict[str, np.ndarray]:
    result = reprocess_run(client, uid, ReprocessOptions(backend="numpy", replace=True))
    assert result.status == "complete", result.errors
    node = client["phasestream"][uid]
    return {key: node[key].read() for key in ARRAYS}


def _run_uids(client) -> set[str]:
    return {uid for uid in client if uid != "phasestream"}


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
@pytest.mark.parametrize("mode", ["stxm", "txm"])
def test_an_imported_stack_analyses_to_the_phase_map_of_the_same_scan_taken_live(
        tiled_client, detector_files, tmp_path, mode):
    client = tiled_client
    seed = 5 if mode == "stxm" else 6
    live = _result(client, _live(client, mode, seed))
    frames = _frames(mode, seed)
    cases = {
        "copied": (_stack(frames, mode, tmp_path / f"{mode}.npy"), "copied"),
        "hdf5 in readable storage": (_stack(frames, mode, detector_files / f"{mode}.h5", hdf5=True), "external"),
    }
    if mode == "stxm":  # the server may not read this folder: it refuses the file, the images go into Tiled
        cases["hdf5 elsewhere"] = (_stack(frames, mode, tmp_path / f"{mode}.h5", hdf5=True), "copied")
    for case, (stack, images) in cases.items():
        outcome = import_stack(client, stack, ImportOptions(references=REFS))
        assert outcome.status == "complete", (case, outcome.reason)
        assert outcome.details["images"] == images, case
        assert ("copy_reason" in outcome.details) == (case == "hdf5 elsewhere"), case
        run = open_raw_run(client, outcome.run_uid)
        start = run.metadata["start"]
        assert start["sample"] == {"name": "P7", "state_of_charge": SOC}
        assert start["import"]["sha256"] == stack.sha256() and start["import"]["files"] == [str(stack.source)]
        assert start["phasestream"]["mode"] == mode and start["num_points"] == len(ENERGIES)
        assert sorted(run) == (["dark", "flat", "primary"] if mode == "txm" else ["primary"])
        imported = _result(client, outcome.run_uid)
        for key in ARRAYS:
            np.testing.assert_array_equal(imported[key], live[key], err_msg=f"{case}: {key}")
        assert client["phasestream"][outcome.run_uid].metadata["status"] == "complete"


def test_importing_the_same_file_again_writes_nothing_and_names_the_run(tiled_client, tmp_path):
    client = tiled_client
    stack = _stack(_frames("stxm", 7), "stxm", tmp_path / "again.npy")
    first = import_stack(client, stack, ImportOptions(references=REFS))
    before = _run_uids(client)
    again = import_stack(client, stack, ImportOptions(references=REFS, sample="another name"))
    assert again.status == "complete" and again.details["already_imported"] is True
    assert again.run_uid == first.run_uid and _run_uids(client) == before
    assert find_import(client, stack.sha256()) == (first.run_uid, True)


def test_two_imports_of_the_same_file_at_the_same_moment_write_one_run(tiled_client, tmp_path, monkeypatch):
    """Both imports look for the file's run before either writes (held at a barrier after the real lookup):
    the run's uid comes from the raw path and the SHA-256, so Tiled refuses the second start and that import
    names the first one's run, writing nothing; the first import's run is complete and untouched."""
    client = tiled_client
    stack = _stack(_frames("stxm", 8), "stxm", tmp_path / "twice.npy")
    searched = threading.Barrier(2, timeout=60)
    real_lookup = importing._import_at
    calls = []

    def look_up_then_wait(runs, uid, sha256):
        found = real_lookup(runs, uid, sha256)
        calls.append(found)
        if len(calls) <= 2:  # the two first lookups, one per import; later ones (after a refusal) go on
            searched.wait()
        return found

    monkeypatch.setattr(importing, "_import_at", look_up_then_wait)
    before = _run_uids(client)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: import_stack(client, stack, ImportOptions(references=REFS)), range(2)))
    assert calls[0] is None and calls[1] is None  # neither saw the other's run: the race was real
    uid = import_uid("", stack.sha256())
    assert {o.run_uid for o in outcomes} == {uid}
    wrote = [o for o in outcomes if o.details.get("already_imported") is False]
    assert len(wrote) == 1 and wrote[0].status == "complete", [o.reason for o in outcomes]
    (other,) = [o for o in outcomes if o is not wrote[0]]
    # the second either found the run complete or still being written: never a second run, never removed it
    assert other.status == "complete" or "being written by another import" in other.reason, other.reason
    assert _run_uids(client) - before == {uid}
    assert find_import(client, stack.sha256()) == (uid, True)
    assert open_raw_run(client, uid).metadata["stop"]["exit_status"] == "success"


def _refused(client, stack, options=None):
    before = _run_uids(client)
    outcome = import_stack(client, stack, options or ImportOptions(references=REFS))
    assert outcome.status == "failed" and outcome.run_uid == ""
    assert _run_uids(client) == before
    return outcome.reason


def test_bad_input_is_refused_with_the_reason_and_nothing_is_written(tiled_client, tmp_path):
    client = tiled_client
    frames = _frames("stxm", 8)
    path = tmp_path / "bad.npy"
    stack = _stack(frames, "stxm", path)
    far = ImportedStack(path, "tiff", np.asarray(ENERGIES) + 2000.0, frames["images"], files=(path,))
    assert "outside the range of references 'nvpf-synthetic'" in _refused(client, far)
    txm = ImportedStack(path, "tiff", np.asarray(ENERGIES), frames["images"], mode="txm", files=(path,))
    assert "needs flat-field" in _refused(client, txm)
    text = ImportedStack(path, "tiff", np.asarray(ENERGIES), frames["images"].astype(str), files=(path,))
    assert "must be numbers" in _refused(client, text)
    i0 = ImportedStack(path, "tiff", np.asarray(ENERGIES), frames["images"], i0=np.zeros(3), files=(path,))
    assert "i0 has shape (3,)" in _refused(client, i0)
    odd = tmp_path / os.fsdecode(b"scan-\xff.npy")  # a name in no UTF-8: failed in TiledWriter before
    np.save(odd, frames["images"])
    named = ImportedStack(odd, "tiff", np.asarray(ENERGIES), frames["images"], files=(odd,))
    assert "is not valid UTF-8, which the run's documents and Tiled need: rename" in _refused(client, named)
    nan_soc = ImportOptions(references=REFS, soc=float("nan"))
    assert "state of charge must be a finite number" in _refused(client, stack, nan_soc)
    assert "no such" in _refused(client, stack, ImportOptions(references="no-such-references")).lower()
    with pytest.raises(ValueError, match="references must be given"):
        import_stack(client, stack, ImportOptions())


class _FailingFrames(np.ndarray):
    """Images whose 7th frame cannot be read (a corrupt chunk of a lazily read file)."""

    def __getitem__(self, index):
        if isinstance(index, int | np.integer) and index == 6:
            raise OSError("frame 6: corrupt chunk")
        return super().__getitem__(index)


def test_a_write_that_fails_half_way_leaves_nothing_in_tiled(tiled_client, detector_files, tmp_path, monkeypatch):
    client = tiled_client
    frames = _frames("txm", 9)
    # frames are written one by one (one image per batch): six are in Tiled when the seventh fails
    one = ImportOptions(references=REFS, batch_bytes=1)
    failing = _stack(frames, "txm", tmp_path / "fail.npy", images=frames["images"].view(_FailingFrames))
    reason = _refused(client, failing, one)
    assert "corrupt chunk" in reason and "was removed" in reason

    # the server refuses mid-way (a full disk on the tenth request for array data)
    from tiled.client.array import ArrayClient

    calls = {"n": 0}
    patch = ArrayClient.patch

    def refusing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            request = httpx.Request("PATCH", str(self.uri))
            raise httpx.HTTPStatusError("507 Insufficient Storage", request=request,
                                        response=httpx.Response(507, request=request))
        return patch(self, *args, **kwargs)

    monkeypatch.setattr(ArrayClient, "patch", refusing)
    stack = _stack(frames, "txm", detector_files / "refused.h5", hdf5=True)
    reason = _refused(client, stack, one)
    assert "507" in reason and "was removed" in reason and calls["n"] >= 10
    assert (detector_files / "refused.h5").exists()  # the original file is never touched
    monkeypatch.undo()
    assert import_stack(client, stack, one).status == "complete"  # and nothing blocks a retry


@pytest.mark.parametrize("mode, stream, hdf5", [("txm", "flat", False), ("stxm", "primary", False),
                                               ("txm", "flat", True)])
def test_a_copied_run_that_does_not_read_back_as_written_is_failed_and_removed(tiled_client, tmp_path, monkeypatch,
                                                                                detector_files, mode, stream, hdf5):
    """An import is ``complete`` only once what it copied into Tiled reads back as it was written: every
    event's images, energy, I0, flat and dark, paired by ``seq_num`` as reprocess reads them (with the images
    left in their HDF5 file, the rest). A pixel that reached Tiled other than the file holds it (altered on its
    way here) fails the import, which removes its run; the file stays, and a retry imports it. The import used
    to say ``complete`` (with the images in their file, until 2026-12-07: the flats were not read back)."""
    frames = _frames(mode, 11)
    path = (detector_files if hdf5 else tmp_path) / f"altered-{mode}.{'h5' if hdf5 else 'npy'}"
    stack = _stack(frames, mode, path, hdf5=hdf5)
    write_documents, made = importing.run_documents, []

    def altered(checked, **kwargs):  # the documents written carry one pixel that the file does not
        uid, documents = write_documents(checked, **kwargs)
        made.append(uid)
        if len(made) > 1:  # made again, to compare the run with: as the file holds it
            return uid, documents

        def documents_on_their_way():
            names = {}
            for name, doc in documents:
                if name == "descriptor":
                    names[doc["uid"]] = doc["name"]
                if name == "event_page" and names[doc["descriptor"]] == stream and 3 in doc["seq_num"]:
                    frame = np.array(doc["data"]["det_img"][doc["seq_num"].index(3)], copy=True)
                    frame[2, 5] += 1
                    doc = {**doc, "data": {**doc["data"], "det_img": [
                        frame if seq == 3 else image for seq, image in zip(doc["seq_num"], doc["data"]["det_img"],
                                                                          strict=True)]}}
                yield name, doc
        return uid, documents_on_their_way()

    monkeypatch.setattr(importing, "run_documents", altered)
    reason = _refused(tiled_client, stack)
    assert f"does not read back from Tiled as it was written: 'det_img' of event 3 of the '{stream}' stream" in reason
    assert "was removed" in reason and len(made) == 2 and path.exists()
    monkeypatch.undo()
    outcome = import_stack(tiled_client, stack, ImportOptions(references=REFS))
    assert outcome.status == "complete", outcome
    assert outcome.details["images"] == ("external" if hdf5 else "copied"), outcome
    np.testing.assert_array_equal(open_raw_run(tiled_client, outcome.run_uid)["primary"]["det_img"].read(),
                                  frames["images"])


def _nxstxm(path, frames) -> None:
    """An NXstxm file (the definition's layout: NXentry / NXdata ``data`` (energy, sample_y, sample_x))."""
    from nexusformat.nexus import NXdata, NXentry, NXfield, NXroot, NXsample

    entry = NXentry()
    entry.definition = NXfield("NXstxm")
    entry.sample = NXsample()
    entry.sample["name"] = NXfield("P7")
    axes = [NXfield(np.asarray(ENERGIES), name="energy", units="eV"),
            NXfield(np.arange(SHAPE[0]) * 0.05, name="sample_y", units="um"),
            NXfield(np.arange(SHAPE[1]) * 0.05, name="sample_x", units="um")]
    entry.counter0 = NXdata(NXfield(frames["images"], name="data"), axes)
    entry.counter0.stxm_scan_type = NXfield("sample image stack")
    root = NXroot()
    root["entry0"] = entry
    root.save(str(path), "w")


def _imported(out: str) -> dict[str, tuple[str, str]]:
    """``FILE: imported UID (...)`` / ``FILE: already imported UID`` lines: file name -> (word, uid)."""
    found = {}
    for line in out.splitlines():
        path, _, rest = line.partition(": ")
        words = rest.split()
        if words[:1] == ["imported"]:
            found[path.rsplit("/", 1)[-1]] = ("imported", words[1])
        elif words[:2] == ["already", "imported"]:
            found[path.rsplit("/", 1)[-1]] = ("already", words[2])
    return found


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_each_format_imported_with_analyze_gives_the_phase_map_of_the_scan_taken_live(
        tiled_server, tiled_client, detector_files, tmp_path, capsys):
    import tifffile

    from phasestream.app.cli import main

    client = tiled_client
    # facility files carry no I0 count: the live scans record none either (I0 from the image background)
    sample, energy, det = _detector("stxm", 21)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    (stxm_live,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample))
    txm_live = _live(client, "txm", 22)
    live = {"stxm": _result(client, stxm_live), "txm": _result(client, txm_live)}
    stxm, txm = _frames("stxm", 21), _frames("txm", 22)
    tifffile.imwrite(tmp_path / "stack.tif", stxm["images"], photometric="minisblack")
    _nxstxm(detector_files / "stack.nxs", stxm)
    with h5py.File(tmp_path / "txm.h5", "w") as f:  # PyXAS: raw sample-in images with flats and a dark
        f["img_xanes"], f["X_eng"] = txm["images"], np.asarray(ENERGIES)
        f["img_bkg"], f["img_dark"] = txm["flat"], txm["dark"]
    files = {"stack.tif": "stxm", "stack.nxs": "stxm", "txm.h5": "txm"}
    paths = [str(tmp_path / "stack.tif"), str(detector_files / "stack.nxs"), str(tmp_path / "txm.h5")]
    energies = ",".join(repr(float(e)) for e in ENERGIES)
    before = _run_uids(client)
    capsys.readouterr()
    assert main([*IMPORT, "--tiled", tiled_server.uri, "--energies", energies, "--soc", str(SOC), "--analyze",
                 "--backend", "numpy", *paths]) == 0
    out = capsys.readouterr().out
    lines = _imported(out)
    assert sorted(lines) == sorted(files) and {word for word, _ in lines.values()} == {"imported"}, out
    assert "stack.nxs: imported" in out and "images left in the HDF5 file" in out
    assert _run_uids(client) - before == {uid for _, uid in lines.values()}
    for name, mode in files.items():
        uid = lines[name][1]
        start = open_raw_run(client, uid).metadata["start"]
        assert start["sample"]["state_of_charge"] == SOC and start["import"]["format"] in ("tiff", "nxstxm", "pyxas")
        result = client["phasestream"][uid]
        assert result.metadata["status"] == "complete", (name, result.metadata.get("errors"))
        for key in ARRAYS:
            np.testing.assert_array_equal(result[key].read(), live[mode][key], err_msg=f"{name}: {key}")

    # again: nothing written, each file names its run
    assert main([*IMPORT, "--tiled", tiled_server.uri, "--energies", energies, "--analyze", *paths]) == 0
    again = _imported(capsys.readouterr().out)
    assert again == {name: ("already", uid) for name, (_, uid) in lines.items()}
    assert _run_uids(client) - before == {uid for _, uid in lines.values()}

    # a file that is not a stack: an error naming it, exit 1, nothing written; the good file still imports
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    np.save(tmp_path / "other.npy", stxm["images"])
    tifffile.imwrite(tmp_path / "other.tif", stxm["images"][::-1].copy(), photometric="minisblack")
    assert main([*IMPORT, "--tiled", tiled_server.uri, "--energies", energies, "--sample", "P8",
                 str(tmp_path / "broken.tif"), str(tmp_path / "other.tif")]) == 1
    captured = capsys.readouterr()
    assert f"{tmp_path / 'broken.tif'}: error: " in captured.err and "other.tif: imported" in captured.out
    assert len(_run_uids(client) - before) == len(files) + 1
    assert main([*IMPORT, "--tiled", tiled_server.uri, "--refine", paths[0]]) == 2  # --refine needs --analyze
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # no references: refused before anything is read
        main(["import", "--tiled", tiled_server.uri, paths[0]])
    assert exited.value.code == 2 and "--references" in capsys.readouterr().err


def test_whole_counts_read_as_floats_are_stored_as_16_bit_counts():
    from phasestream.jobs.import_documents import counts_dtype

    counts = np.random.default_rng(1).poisson(3000.0, size=(20, 4, 4)).astype(np.float32)
    assert counts_dtype(counts) == np.uint16
    assert counts_dtype(counts.astype(np.uint16)) == np.uint16  # integers keep their type
    for value in (0.25, -1.0, 70000.0):  # in the last block: every block is looked at
        changed = counts.copy()
        changed[-1, 0, 0] = value
        assert counts_dtype(changed) == np.float32


def test_a_txm_stack_without_a_dark_image_has_no_dark_stream_and_is_analysed(tiled_client, tmp_path):
    client = tiled_client
    frames = _frames("txm", 23)
    stack = _stack({k: v for k, v in frames.items() if k != "dark"}, "txm", tmp_path / "nodark.npy")
    outcome = import_stack(client, stack, ImportOptions(references=REFS))
    assert outcome.status == "complete", outcome.reason
    assert sorted(open_raw_run(client, outcome.run_uid)) == ["flat", "primary"]
    result = reprocess_run(client, outcome.run_uid, ReprocessOptions(backend="numpy"))
    assert result.status == "complete", result.errors


@pytest.mark.parametrize("hdf5", [False, True])
def test_images_of_sixteen_pixels_or_fewer_are_imported_and_analysed(tiled_client, tmp_path, hdf5):
    """TiledWriter's default put arrays of up to 16 elements into the event table, where a 4 x 4 image failed
    in Arrow ("Can only convert 1-dimensional array values") and the import with it."""
    client = tiled_client
    frames = {k: v[..., 10:14, 10:14] if v.ndim >= 2 else v for k, v in _frames("txm", 29).items()}
    stack = _stack(frames, "txm", tmp_path / ("tiny.h5" if hdf5 else "tiny.npy"), hdf5=hdf5)
    outcome = import_stack(client, stack, ImportOptions(references=REFS))
    assert outcome.status == "complete", outcome.reason
    raw = open_raw_run(client, outcome.run_uid)
    np.testing.assert_array_equal(raw["primary"]["det_img"].read(), frames["images"])
    result = reprocess_run(client, outcome.run_uid, ReprocessOptions(backend="numpy"))
    assert result.status in ("complete", "partial"), result.errors
    images, flat, dark = (frames[k].astype(np.float64) for k in ("images", "flat", "dark"))
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = -np.log((images - dark) / (flat - dark))  # the oracle: TXM optical density
    np.testing.assert_allclose(client["phasestream"][outcome.run_uid]["od"].read(), expected, rtol=1e-5, atol=1e-5)


def test_a_float_stack_with_an_unrecorded_pixel_stays_in_its_file(tiled_client, detector_files):
    """A NaN pixel (not recorded) among float images: Tiled serves what the file holds, NaN included; before,
    the read-back compared NaN unequal to itself and copied the images "because they differ"."""
    frames = _frames("stxm", 31)
    frames["images"] = frames["images"].astype(np.float32)
    frames["images"][0, 0, 0] = np.nan  # a pixel the read-back compares
    stack = _stack(frames, "stxm", detector_files / "nan-pixel.h5", hdf5=True)
    outcome = import_stack(tiled_client, stack, ImportOptions(references=REFS))
    assert outcome.status == "complete", outcome.reason
    assert outcome.details["images"] == "external", outcome.details.get("copy_reason")
    served = open_raw_run(tiled_client, outcome.run_uid)["primary"]["det_img"].read()
    np.testing.assert_array_equal(served, frames["images"])  # NaN where NaN


def test_import_under_a_raw_path_creates_the_container_and_finds_re_imports_there(
        tiled_server, tiled_client, tmp_path, capsys):
    import tifffile

    from phasestream.app.cli import main

    client = tiled_client
    frames = _frames("stxm", 24)
    path = tmp_path / "raw.tif"
    tifffile.imwrite(path, frames["images"], photometric="minisblack")
    (tmp_path / "raw.txt").write_text("\n".join(repr(float(e)) for e in ENERGIES))  # found beside the TIFF
    capsys.readouterr()
    assert main([*IMPORT, "--tiled", tiled_server.uri, "--raw", "beamline/imports", str(path)]) == 0
    captured = capsys.readouterr()
    ((word, uid),) = _imported(captured.out).values()
    assert word == "imported" and "created container" in captured.err
    assert open_raw_run(client, uid, "beamline/imports").metadata["start"]["import"]["files"][-1].endswith("raw.txt")
    assert main([*IMPORT, "--tiled", tiled_server.uri, "--raw", "beamline/imports", str(path)]) == 0
    assert _imported(capsys.readouterr().out) == {"raw.tif": ("already", uid)}
    assert main([*IMPORT, "--tiled", tiled_server.uri, "--raw", "../x", str(path)]) == 2  # refused path


def _axis2000(folder, images, stem: str = "Scan_001") -> None:
    """An aXis2000 stack as the format describes it (docs/formats.md): a text ``.hdr`` with the energy list
    (full precision) and one tab-separated ``.xim`` of counts per energy (``<stem>_a000.xim``, ...)."""
    ny, nx = images.shape[1:]

    def points(values) -> str:
        return "(" + ", ".join([str(len(values))] + [repr(float(v)) for v in values]) + ")"

    region = ('{\n PAxis = { Name = "Sample X"; Unit = "um"; Min = 0; Max = 1; Dir = 1;\n'
              f"  Points = {points(np.arange(nx) * 0.05)};\n}};\n"
              ' QAxis = { Name = "Sample Y"; Unit = "um"; Min = 0; Max = 1; Dir = 1;\n'
              f"  Points = {points(np.arange(ny) * 0.05)};\n}};\n}}")
    (folder / f"{stem}.hdr").write_text(
        f'\nScanDefinition = {{ Label = "{stem}.hdr"; Type = "NEXAFS Image Scan"; Flags = "Image Stack"; '
        f"Dwell = 1.0;\n Regions = (1,\n{region});\n"
        f' StackAxis = {{ Name = "Energy"; Unit = "eV"; Min = 0; Max = 1; Dir = 1;\n'
        f"  Points = {points(ENERGIES)};\n}};\n"
        ' Channels = (1,\n{ Name = "PMT"; Unit = "counts";});\n};\n Time = "2026 December 3 10:00:00";\n')
    for i, image in enumerate(images):
        (folder / f"{stem}_a{i:03d}.xim").write_text(
            "".join("".join(f"{int(v)}\t" for v in row) + "\n" for row in image))


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_axis2000_and_tiffs_the_server_reads_analyse_to_the_scan_taken_live(
        tiled_server, tiled_client, detector_files, tmp_path, capsys):
    """aXis2000 (copied into Tiled), one multi-page TIFF and a numbered sequence of TIFFs in the server's readable
    storage (left in their files): each imported with --analyze gives the live scan's phase map."""
    import tifffile

    from phasestream.app.cli import main

    client = tiled_client
    sample, energy, det = _detector("stxm", 23)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    (uid_live,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample))
    live = _result(client, uid_live)
    images = _frames("stxm", 23)["images"]
    assert np.array_equal(images, np.round(images))  # counts: the .xim text holds them exactly
    axis = tmp_path / "axis"
    axis.mkdir()
    _axis2000(axis, images)
    one = detector_files / "one.tif"
    tifffile.imwrite(one, images.astype(np.uint16), photometric="minisblack")
    sequence = detector_files / "sequence"
    sequence.mkdir()
    for i, image in enumerate(images):
        tifffile.imwrite(sequence / f"img_{i + 1:03d}.tif", image.astype(np.uint16))
    energies = ",".join(repr(float(e)) for e in ENERGIES)
    expected = {"axis2000": "images written into Tiled", "tiff-file": "images left in the TIFF file",
                "tiff-sequence": "images left in the TIFF files"}
    paths = {"axis2000": [str(axis / "Scan_001.hdr")], "tiff-file": [str(one)],
             "tiff-sequence": [str(sequence)]}
    for case, files in paths.items():
        extra = [] if case == "axis2000" else ["--energies", energies]
        capsys.readouterr()
        assert main([*IMPORT, "--tiled", tiled_server.uri, *extra, "--soc", str(SOC), "--analyze",
                     "--backend", "numpy", *files]) == 0, case
        out = capsys.readouterr().out
        assert expected[case] in out, (case, out)
        uid = out.split(": imported ", 1)[1].split()[0]
        result = client["phasestream"][uid]
        assert result.metadata["status"] == "complete", (case, result.metadata.get("errors"))
        for key in ARRAYS:
            np.testing.assert_array_equal(result[key].read(), live[key], err_msg=f"{case}: {key}")


@pytest.mark.parametrize("names, expected", [
    (["img_001.tif", "img_002.tif", "img_003.tif"], ("img_{:03d}.tif", 1)),
    (["s9.tif", "s10.tif", "s11.tif"], ("s{:d}.tif", 9)),
    (["a{1}_0.tif", "a{1}_1.tif"], ("a{{1}}_{:01d}.tif", 0)),
    (["img_001.tif", "img_003.tif"], None),  # a gap
    (["img_001.tif", "pic_002.tif"], None),  # another prefix
    (["s09.tif", "s10.tif"], ("s{:02d}.tif", 9)),
    (["s9.tif", "s010.tif"], None),  # padded and unpadded mixed
    (["img_%d_1.tif", "img_%d_2.tif"], None),  # TiledWriter reads %-templates
])
def test_numbered_template_names_a_sequence_or_nothing(names, expected):
    from phasestream.jobs.import_external import numbered_template

    assert numbered_template(names) == expected
    if expected is not None:
        template, first = expected
        assert [template.format(first + i) for i in range(len(names))] == names


@pytest.mark.parametrize("per_pixel", [True, False])
def test_the_files_flux_monitor_is_kept_in_the_raw_run_as_the_file_holds_it(tiled_client, tmp_path, per_pixel):
    """NXstxm ``control`` (the ring current, per pixel or per energy) is stored as ``det_monitor`` beside the
    images, NaN where the file never wrote it; before, the import dropped it and the raw run lacked it."""
    from nexusformat.nexus import NXfield, NXmonitor

    from phasestream.formats import read_stack

    frames = _frames("stxm", 33)
    path = tmp_path / "monitored.nxs"
    _nxstxm(path, frames)
    rng = np.random.default_rng(33)
    shape = frames["images"].shape if per_pixel else (len(ENERGIES),)
    control = 400.0 - rng.uniform(0.0, 2.0, shape)  # a decaying ring current, mA
    control[(1, 2, 3) if per_pixel else 1] = np.nan  # a value never written
    from nexusformat.nexus import nxload

    root = nxload(str(path), "rw")
    root["entry0/control"] = NXmonitor(data=NXfield(control, name="data"))
    root.close()
    with h5py.File(path, "r") as f:  # the oracle: the file as h5py reads it
        expected = f["entry0/control/data"][()]
    outcome = import_stack(tiled_client, read_stack(path), ImportOptions(references=REFS))
    assert outcome.status == "complete", outcome.reason
    raw = open_raw_run(tiled_client, outcome.run_uid)
    assert raw.metadata["start"]["import"]["monitor_key"] == "det_monitor"
    np.testing.assert_array_equal(raw["primary"]["det_monitor"].read(), expected)  # NaN where NaN
    result = reprocess_run(tiled_client, outcome.run_uid, ReprocessOptions(backend="numpy"))
    assert result.status == "complete", result.errors


def test_a_folder_of_zeiss_frames_imports_with_a_flat_per_energy_and_analyses_to_its_od(tiled_client, tmp_path):
    """An ``xrm-series`` folder (one .xrm per frame, references exposed 0.3 s, samples 0.5 s) becomes a TXM run
    with one flat event per energy; its OD is ``-ln(sample / (reference * 0.5 / 0.3))`` of the frames as olefile
    reads them."""
    import shutil
    import struct

    import olefile

    chip = Path(__file__).resolve().parents[1] / "data" / "xrm" / "test_chip00.xrm"  # 512 x 512 uint16
    folder = tmp_path / "xanes_fov01"
    folder.mkdir()
    energies = (7110.0, 7125.0, 7140.0)
    rng = np.random.default_rng(41)
    counts = {}
    for i, energy in enumerate(energies):
        for kind, exposure, level in (("", 0.5, 300 + 40 * i), ("000007_ref_", 0.3, 700)):
            path = folder / f"rep01_{kind}chip_{energy:07.1f}_eV_001of001.xrm"
            shutil.copy(chip, path)
            frame = rng.poisson(level, (512, 512)).astype("<u2")
            with olefile.OleFileIO(str(path), write_mode=True) as ole:
                ole.write_stream("ImageInfo/Energy", struct.pack("<f", energy))
                ole.write_stream("ImageInfo/ExpTimes", struct.pack("<f", exposure))
                ole.write_stream("ImageData1/Image1", frame.tobytes())
            counts[(energy, bool(kind))] = frame.astype(np.float64)
    grid = np.linspace(7000.0, 7300.0, 301)
    edge = 1 / (1 + np.exp(-(grid - 7120.0) / 3.0))
    refs = tmp_path / "refs.csv"
    np.savetxt(refs, np.column_stack([grid, edge, 0.9 * edge + 0.1 * np.exp(-((grid - 7130.0) / 5) ** 2)]),
               delimiter=",", header="energy_eV,A,B", comments="")
    from phasestream.formats import read_stack

    outcome = import_stack(tiled_client, read_stack(folder), ImportOptions(references=str(refs)))
    assert outcome.status == "complete", outcome.reason
    raw = open_raw_run(tiled_client, outcome.run_uid)
    assert raw.metadata["start"]["import"]["format"] == "xrm-series"
    assert raw.metadata["start"]["phasestream"]["mode"] == "txm"
    flats = raw["flat"]["det_img"].read()
    assert flats.shape == (3, 512, 512)
    scaled = [counts[(e, True)] * 0.5 / np.float32(0.3) for e in energies]  # ExpTimes is a float32
    np.testing.assert_allclose(flats, np.asarray(scaled, np.float32), rtol=1e-6)
    options = ReprocessOptions(backend="numpy", reference_folders=(str(tmp_path),))  # the run names refs.csv
    result = reprocess_run(tiled_client, outcome.run_uid, options)
    assert result.status == "complete", result.errors
    with np.errstate(divide="ignore"):
        expected = -np.log(np.asarray([counts[(e, False)] for e in energies]) / np.asarray(scaled))
    od = tiled_client["phasestream"][outcome.run_uid]["od"].read()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(od[finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_a_float_flat_beside_16_bit_images_in_their_file_is_stored_as_measured(tiled_client, detector_files):
    """TiledWriter keeps one dtype per data key name across a run's streams (the last descriptor's): a float flat
    beside 16-bit images kept in their HDF5 file was stored as 16-bit, truncated, and the import failed its
    read-back. The images are copied instead, as float32, and the flat reads back as the file gave it."""
    frames = _frames("txm", 35)
    frames["images"] = frames["images"].astype(np.uint16)
    frames["flat"] = frames["flat"].astype(np.float32) + np.float32(0.25)  # e.g. a mean of reference frames
    stack = _stack(frames, "txm", detector_files / "float-flat.h5", hdf5=True)
    outcome = import_stack(tiled_client, stack, ImportOptions(references=REFS))
    assert outcome.status == "complete", outcome.reason
    assert outcome.details["images"] == "copied" and "one dtype per data key" in outcome.details["copy_reason"]
    raw = open_raw_run(tiled_client, outcome.run_uid)
    np.testing.assert_array_equal(raw["flat"]["det_img"].read(), frames["flat"])
    np.testing.assert_array_equal(raw["primary"]["det_img"].read(), frames["images"])


def test_each_entry_of_an_nxstxm_file_of_several_is_its_own_import(tiled_server, tiled_client, tmp_path, capsys):
    """``--select entry=...`` reads one region of a multi-region NXstxm file; each entry is its own run (its
    identity is the file's bytes and the part read), and importing one again names its run. Before, only the
    first entry could be imported, and a second import of the same file was 'already imported'."""
    from nexusformat.nexus import nxload

    from phasestream.app.cli import main

    frames = {name: _frames("stxm", seed) for name, seed in (("entry0", 36), ("entry1", 37))}
    path = tmp_path / "regions.nxs"
    _nxstxm(path, frames["entry0"])  # entry0; entry1 beside it, a second region of other frames
    other = tmp_path / "other.nxs"
    _nxstxm(other, frames["entry1"])
    root, second = nxload(str(path), "rw"), nxload(str(other), "r")
    root["entry1"] = second["entry0"].copy()
    root.close()
    uids = {}
    for entry in ("entry0", "entry1"):
        assert main([*IMPORT, "--tiled", tiled_server.uri, "--select", f"entry={entry}", str(path)]) == 0
        (word, uid), = _imported(capsys.readouterr().out).values()
        assert word == "imported"
        uids[entry] = uid
        start = open_raw_run(tiled_client, uid).metadata["start"]
        assert start["import"]["part"] == {"entry": entry, "channel": "counter0"}
        with h5py.File(path, "r") as f:  # the oracle: the entry's signal as h5py reads it
            expected = f[f"{entry}/counter0/data"][()]
        np.testing.assert_array_equal(open_raw_run(tiled_client, uid)["primary"]["det_img"].read(), expected)
    assert uids["entry0"] != uids["entry1"]
    assert main([*IMPORT, "--tiled", tiled_server.uri, "--select", "entry=entry1", str(path)]) == 0
    assert _imported(capsys.readouterr().out) == {"regions.nxs": ("already", uids["entry1"])}
    # a choice the reader does not take: the file's error, nothing written
    assert main([*IMPORT, "--tiled", tiled_server.uri, "--select", "field=fov03", str(path)]) == 1
    assert "field= is not a choice of the nxstxm reader (it takes: entry=, channel=)" in capsys.readouterr().err


def test_a_failed_import_names_the_command_that_imports_the_file_again(tiled_client, tmp_path):
    """The retry repeats the references, the raw path and the choices (before: ``phasestream import FILE``,
    which is refused for want of --references)."""
    from phasestream.jobs.context import JobContext

    missing = tmp_path / "no such file.nxs"
    options = {"references": REFS, "raw": "bl/raw", "select": {"entry": "entry 2"}}
    outcome = importing.run(JobContext(client=tiled_client), str(missing), options)
    assert outcome.status == "failed"
    assert outcome.retry == f"phasestream import --references {REFS} --raw bl/raw --select 'entry=entry 2' " \
                            f"'{missing}'"


def test_a_scan_of_thousands_of_frame_files_names_them_in_its_start_document(tmp_path):
    """A folder scan (one .xrm per frame) names its files by their names in the folder, not by absolute path:
    3000 SSRL-style frames with their folder were over the start document's 256 KiB, and the import was
    refused."""
    from phasestream.jobs.import_documents import checked_import

    folder = tmp_path / "20161456_NCA_Pg41-10_pristine_fov08_XANES_XANES_160529_1457"
    folder.mkdir()
    names = [f"rep01_{i:06d}_ref_20161456_NCA_Pg41-10_pristine_fov08_XANES_{8300 + i / 10:07.1f}_eV_001of010.xrm"
             for i in range(3000)]
    n = len(ENERGIES)
    stack = ImportedStack(folder, "xrm-series", np.asarray(ENERGIES), np.ones((n, 4, 4), np.float32), mode="txm",
                          flat=np.full((n, 4, 4), 2.0, np.float32), files=tuple(folder / name for name in names))
    checked = checked_import(stack, references=load_references(REFS), reference_name=REFS, sha256="0" * 64)
    assert checked.metadata["import"]["files"] == names
    assert checked.metadata["import"]["source"] == str(folder.absolute())
