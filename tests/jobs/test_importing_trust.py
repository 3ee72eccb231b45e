"""``phasestream import`` against raw runs it did not write and readers that fail unexpectedly (docs/import.md,
docs/security.md): a run carrying a file's SHA-256 in its start document is not taken for that file's import,
a run squatting the import's uid is neither reported nor replaced, a reader's unforeseen exception is that
file's error and the next file is still imported, and an HDF5 file that refers to other files is not left
for Tiled to read."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest
import tifffile
from event_model import compose_run

from phasestream import formats
from phasestream.formats import HDF5Source, ImportedStack
from phasestream.jobs.import_external import external_images
from phasestream.jobs.importing import ImportOptions, import_stack, import_uid
from phasestream.references import load_references, select_energies
from phasestream.store.tiled import open_raw_run, raw_run_writer

ENERGIES = select_energies(load_references("nvpf-synthetic"), 6)
SHAPE = (8, 8)
REFS = "nvpf-synthetic"


def _images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1000, 5000, (len(ENERGIES), *SHAPE)).astype(np.uint16)


def _stack(path, seed: int) -> ImportedStack:
    """A stack as a reader returns it, its images also saved in ``path`` (what its SHA-256 covers)."""
    images = _images(seed)
    np.save(path, images)
    return ImportedStack(path, "tiff", np.asarray(ENERGIES), images, files=(path,))


def _forge(client, uid: str, sha256: str, *, stop: bool = True, plan_name: str = "import") -> dict:
    """A raw run written from documents anyone may publish: uid and start fields of the publisher's choice."""
    bundle = compose_run(uid=uid, metadata={"plan_name": plan_name, "import": {"sha256": sha256, "format": "tiff"},
                                            "sample": {"name": "forged", "state_of_charge": 0.9}})
    write = raw_run_writer(client)
    write("start", bundle.start_doc)
    if stop:
        write("stop", bundle.compose_stop(exit_status="success"))
    return dict(client[uid].metadata)


def _uids(client) -> set[str]:
    return set(client)


@pytest.mark.parametrize("stop", [True, False])
def test_a_run_carrying_the_files_sha256_under_another_uid_is_not_taken_for_their_import(
        tiled_client, tmp_path, stop):
    """Before: the import searched runs by ``start.import.sha256``, answered ``already imported`` with the forged
    run (complete, nothing imported) or failed on it (no stop document)."""
    client = tiled_client
    stack = _stack(tmp_path / "victim.npy", seed=1 + stop)
    sha = hashlib.sha256((tmp_path / "victim.npy").read_bytes()).hexdigest()  # the oracle: the file's bytes
    forged = _forge(client, f"attacker-run-{stop}", sha, stop=stop)
    before = _uids(client)
    outcome = import_stack(client, stack, ImportOptions(references=REFS, external=False))
    assert outcome.status == "complete", outcome.reason
    assert outcome.details["already_imported"] is False
    assert outcome.run_uid == import_uid("", sha) and _uids(client) - before == {outcome.run_uid}
    run = open_raw_run(client, outcome.run_uid)
    np.testing.assert_array_equal(run["primary"]["det_img"].read(), _images(1 + stop))
    assert run.metadata["start"]["import"]["sha256"] == sha
    assert dict(client[f"attacker-run-{stop}"].metadata) == forged  # the other run is left as it was
    again = import_stack(client, stack, ImportOptions(references=REFS, external=False))
    assert again.status == "complete" and again.details["already_imported"] is True
    assert again.run_uid == outcome.run_uid and _uids(client) - before == {outcome.run_uid}


@pytest.mark.parametrize("forgery", ["other sha256", "no stop, other sha256", "other plan"])
def test_a_run_squatting_the_imports_uid_is_a_conflict_named_and_left_as_it_is(tiled_client, tmp_path, forgery):
    """A run at the very uid the import would write (it is derived from public values), with a start document
    that is not this import's: the import fails naming the uid, writes nothing, deletes nothing."""
    client = tiled_client
    seed = {"other sha256": 11, "no stop, other sha256": 12, "other plan": 13}[forgery]
    stack = _stack(tmp_path / "squatted.npy", seed=seed)
    sha = stack.sha256()
    uid = import_uid("", sha)
    forged = _forge(client, uid, sha if forgery == "other plan" else "0" * 64, stop="no stop" not in forgery,
                    plan_name="count" if forgery == "other plan" else "import")
    before = _uids(client)
    outcome = import_stack(client, stack, ImportOptions(references=REFS, external=False))
    assert outcome.status == "failed" and outcome.run_uid == ""
    assert uid in outcome.reason and "not this import's" in outcome.reason, outcome.reason
    assert outcome.details.get("already_imported") is not True
    assert _uids(client) == before and dict(client[uid].metadata) == forged
    assert sorted(client[uid]) == []  # no stream was added to it


def test_a_reader_failing_unexpectedly_is_that_files_error_and_the_next_file_is_imported(
        tiled_server, tiled_client, tmp_path, monkeypatch, capsys):
    """A reader that raises something other than FormatError (a MemoryError of a decompression bomb, a TypeError
    or RuntimeError from h5py on a corrupt file): before, the CLI ended with a traceback and the next file was
    never imported. The fault is injected into the reader the job calls; the files themselves are good."""
    from phasestream.app.cli import main

    images = _images(21)
    paths = {}
    for name in ("memory.tif", "runtime.tif", "type.tif", "good.tif"):
        paths[name] = tmp_path / name
        tifffile.imwrite(paths[name], images if name == "good.tif" else images[::-1], photometric="minisblack")
    faults = {"memory.tif": MemoryError("cannot allocate 64 GiB"), "runtime.tif": RuntimeError("link visitation"),
              "type.tif": TypeError("'>' not supported between instances of 'NoneType' and 'int'")}
    read_stack = formats.read_stack

    def failing_reader(path, **kwargs):
        fault = faults.get(str(path).rsplit("/", 1)[-1])
        if fault is not None:
            raise fault
        return read_stack(path, **kwargs)

    monkeypatch.setattr(formats, "read_stack", failing_reader)
    energies = ",".join(repr(float(e)) for e in ENERGIES)
    before = _uids(tiled_client)
    capsys.readouterr()
    code = main(["import", "--references", REFS, "--tiled", tiled_server.uri, "--energies", energies,
                 "--copy-images", *(str(p) for p in paths.values())])
    captured = capsys.readouterr()
    assert code == 1, captured
    for name, fault in faults.items():
        (line,) = [x for x in captured.err.splitlines() if x.startswith(f"{paths[name]}: error: ")]
        assert type(fault).__name__ in line and str(paths[name]) in line.split(": error: ", 1)[1], line
    (line,) = [x for x in captured.out.splitlines() if x.startswith(f"{paths['good.tif']}: imported ")]
    uid = line.split(": imported ", 1)[1].split()[0]
    assert _uids(tiled_client) - before == {uid}
    run = open_raw_run(tiled_client, uid)
    np.testing.assert_array_equal(run["primary"]["det_img"].read(), images)
    np.testing.assert_allclose(run.metadata["start"]["energies"], ENERGIES)


def _outside(path, kind: str, images: np.ndarray) -> None:
    """An HDF5 file whose ``/entry/data/data`` is an external link to, or keeps its bytes in, another file."""
    other = path.with_name(f"other-{path.name}")
    if kind == "external storage":
        images.tofile(other)
        with h5py.File(path, "w") as f:
            f.create_dataset("/entry/data/data", shape=images.shape, dtype=images.dtype,
                             external=[(other, 0, images.nbytes)])
        return
    with h5py.File(other, "w") as f:
        f["data"] = images
    with h5py.File(path, "w") as f:
        if kind == "external link":
            f["/entry/data/data"] = h5py.ExternalLink(str(other), "/data")
        else:
            layout = h5py.VirtualLayout(shape=images.shape, dtype=images.dtype)
            layout[...] = h5py.VirtualSource(str(other), "data", shape=images.shape)
            f.create_virtual_dataset("/entry/data/data", layout)


@pytest.mark.parametrize("kind", ["external link", "external storage", "virtual dataset"])
def test_an_hdf5_file_that_refers_to_other_files_is_not_left_for_tiled_to_read(tmp_path, kind):
    """The images' file is opened through the check of outside references each time it is opened for the
    StreamResource: a file that became one after it was read (replaced in between) is copied, not pointed at."""
    images = _images(31)
    path = tmp_path / "stack.h5"
    _outside(path, kind, images)
    with h5py.File(path, "r") as f:  # h5py follows it: the dataset looks like the stack's
        assert f["/entry/data/data"].shape == images.shape
    stack = ImportedStack(path, "nxstxm", np.asarray(ENERGIES), images, files=(path,),
                          hdf5=HDF5Source(path, "/entry/data/data"))
    keep, reason = external_images(stack)
    assert keep is None and "refers to other files" in reason and str(path) in reason, reason


def test_an_import_killed_before_its_stop_is_replaced_only_when_asked(tiled_client, tmp_path):
    """A killed import leaves its run without a stop document: the next import of the files is refused (another
    may be writing it) and said how to go on; with ``replace_incomplete`` that run is removed and the files
    imported again. A complete import is never removed."""
    client = tiled_client
    stack = _stack(tmp_path / "killed.npy", seed=21)
    sha = stack.sha256()
    uid = import_uid("", sha)
    partial = _forge(client, uid, sha, stop=False)  # this import's start document, no events, no stop
    refused = import_stack(client, stack, ImportOptions(references=REFS, external=False))
    assert refused.status == "failed" and "--replace-incomplete" in refused.reason, refused.reason
    assert dict(client[uid].metadata) == partial
    replaced = import_stack(client, stack, ImportOptions(references=REFS, external=False, replace_incomplete=True))
    assert replaced.status == "complete" and replaced.run_uid == uid, replaced.reason
    run = open_raw_run(client, uid)
    assert run.metadata["stop"]["exit_status"] == "success"
    np.testing.assert_array_equal(run["primary"]["det_img"].read(), _images(21))
    again = import_stack(client, stack, ImportOptions(references=REFS, external=False, replace_incomplete=True))
    assert again.status == "complete" and again.details["already_imported"] is True
    assert dict(open_raw_run(client, uid).metadata) == dict(run.metadata)  # the complete run stays as it was
