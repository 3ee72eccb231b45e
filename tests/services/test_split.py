"""One result split across a LocalCluster of 2 workers: the stitched arrays equal the unsplit job's."""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from phasestream.jobs.cluster import dask_client
from phasestream.jobs.methods import run_methods
from phasestream.jobs.methods_options import MethodsOptions
from phasestream.jobs.split import LCF_ARRAYS, split_ranges, submit_split_enhance, submit_split_lcf
from phasestream.jobs.staging import STAGING_KEY
from phasestream.references import load_references
from phasestream.sim.phantoms import particle_phantom
from phasestream.store.results import ResultWriter

NI = Path(__file__).resolve().parents[1] / "data" / "ni-k-edge"  # tests/data/ni-k-edge/README.md
ENERGIES = np.linspace(8300.0, 8450.0, 30)


@pytest.fixture(scope="module")
def dask(tiled_server, ni_csv):
    # workers started after ni_csv: they see its folder as a configured reference folder
    # not the default scheduler: this process's Tiled reads stay here
    with dask_client(n_workers=2, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def ni_csv(tmp_path_factory):
    refs = load_references([NI / "ref_NiO.txt", NI / "ref_LiNiO2.txt"])
    path = tmp_path_factory.mktemp("refs") / "ni.csv"
    np.savetxt(path, np.column_stack([refs.energies, refs.spectra.T]), delimiter=",",
               header="energy_eV,NiO,LiNiO2", comments="")
    with pytest.MonkeyPatch.context() as env:  # the folder the deployment allows start documents to name
        env.setenv("PHASESTREAM_REFERENCES", str(path.parent))
        yield path


def _result(client, uid, refs, energies, shape, references=None):
    """A raw run (start document) and a result whose OD cube is a noisy two-phase mixture."""
    thickness = particle_phantom(shape, n_particles=3, seed=5).astype(np.float64)
    frac = np.clip(np.linspace(0, 1, shape[1])[None, :] + 0 * thickness, 0, 1)
    spectra = refs.interpolate(np.sort(energies)).T[np.argsort(np.argsort(energies))]
    od = np.tensordot(spectra, np.stack([frac, 1 - frac]) * thickness, axes=1)
    od += np.random.default_rng(0).normal(0, 0.01, od.shape)
    client.create_container(uid, metadata={"start": {"uid": uid, "phasestream": {"references": references}}})
    writer = ResultWriter(client, uid, shape=shape, phases=refs.phases, n_energies=len(energies),
                          metadata={"energies_eV": list(energies), "references": {"name": refs.name}})
    writer.write_od_planes(0, od.astype(np.float32))
    writer.finalize_od(len(energies))


def test_split_ranges():
    assert split_ranges(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert split_ranges(9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert split_ranges(2, 5) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError):
        split_ranges(0, 2)


def test_staging_copies_block_by_block_and_refuses_a_block_not_as_written(tiled_client):
    """The staging of a split job, without Dask: blocks written as tasks do, read back, copied one band at a
    time (a budget of one band) bit for bit; a staged band changed after its task is refused."""
    from phasestream.jobs.staging import ArrayLayout, Staging, StagingError, block_digest

    result = tiled_client.create_container("staging-blocks")
    full = np.random.default_rng(3).normal(size=(2, 7, 5)).astype(np.float32)
    full[0, 0, 0] = np.nan
    layout = ArrayLayout((2, 7, 5), ((2,), (3, 3, 1), (5,)), np.dtype(np.float32), ("phase", "y", "x"))
    staging = Staging(result, {"fractions_lcf": layout}, job="test", block_bytes=full[:, :3].nbytes)
    staging.create()
    digests = {"fractions_lcf": {}}
    for band, (y0, y1) in enumerate(split_ranges(7, 3)):
        block = np.ascontiguousarray(full[:, y0:y1])
        staging.node["fractions_lcf"].write_block(block, block=(0, band, 0))
        digests["fractions_lcf"][(0, band, 0)] = block_digest(block)
    staging.read_back(digests)
    staging.copy("fractions_lcf", result, "fractions_lcf", digests)
    staging.verify_copy("fractions_lcf", result["fractions_lcf"], digests)
    copy = tiled_client["staging-blocks"]["fractions_lcf"]
    assert copy.chunks == layout.chunks and copy.read().tobytes() == full.tobytes()
    staging.node["fractions_lcf"].write_block(np.zeros((2, 1, 5), np.float32), block=(0, 2, 0))
    with pytest.raises(StagingError, match=r"block \(0, 2, 0\): read back other than written"):
        staging.read_back(digests)
    staging.remove()
    assert list(tiled_client["staging-blocks"]) == ["fractions_lcf"]


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_split_lcf_equals_the_unsplit_job(tiled_server, tiled_client, dask, ni_csv):
    refs = load_references(ni_csv)
    energies = np.random.default_rng(1).permutation(ENERGIES)  # stored out of order: the job sorts them
    _result(tiled_client, "split-lcf", refs, energies, (37, 32), references=str(ni_csv))
    uri, _, key = tiled_server.uri.partition("?api_key=")
    record = submit_split_lcf(dask, uri, "split-lcf", parts=3, api_key=key)
    assert record["status"] == "complete", record
    assert record["split"]["ranges"] == [[0, 13], [13, 26], [26, 37]]
    node = tiled_client["phasestream"]["split-lcf"]
    assert node["fractions_lcf"].chunks == ((2,), (13, 13, 11), (32,))
    split = {name: node[name].read() for name in LCF_ARRAYS}
    assert node.metadata["methods"]["lcf"]["split"]["parts"] == 3
    # the oracle: the unsplit methods job on the same result
    assert run_methods(tiled_client, "split-lcf", MethodsOptions(methods=("lcf",)))["lcf"]["status"] == "complete"
    for name in LCF_ARRAYS:
        np.testing.assert_allclose(split[name], node[name].read(), rtol=1e-6, atol=1e-7, equal_nan=True, err_msg=name)
    assert np.isfinite(split["fractions_lcf"]).sum() > 100


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_split_lcf_failure_is_recorded(tiled_server, tiled_client, dask, ni_csv):
    refs = load_references(ni_csv)
    _result(tiled_client, "split-lcf-bad", refs, ENERGIES, (16, 16), references=str(ni_csv))
    # recorded energies outside the references' range (8200-9000 eV)
    ResultWriter.open(tiled_client, "split-lcf-bad").update_metadata(energies_eV=list(ENERGIES + 1000.0))
    record = submit_split_lcf(dask, tiled_server.uri, "split-lcf-bad", parts=2, retries=0)
    assert record["status"] == "failed" and "outside the range" in record["errors"][0]
    assert tiled_client["phasestream"]["split-lcf-bad"].metadata["methods"]["lcf"]["status"] == "failed"


INDI = "indi-particles-synthetic"


@pytest.fixture(scope="module")
def models():
    if importlib.util.find_spec("tensorflow") is None:  # the model server process runs it
        pytest.skip("TensorFlow is not installed")
    from phasestream.app.process import ModelServerProcess

    with ModelServerProcess(args=("--preload", INDI)) as proc:
        yield proc


def _od_result(client, uid):
    """A result of 4 OD planes (32 x 32) of a particle phantom; returns its OD cube."""
    thickness = particle_phantom((32, 32), n_particles=2, seed=3).astype(np.float32)
    od = np.stack([thickness * (0.5 + 0.2 * i) for i in range(4)])
    od += np.random.default_rng(2).normal(0, 0.02, od.shape).astype(np.float32)
    writer = ResultWriter(client, uid, shape=(32, 32), phases=["a", "b"], n_energies=4,
                          metadata={"energies_eV": [500.0, 510.0, 520.0, 530.0]})
    writer.write_od_planes(0, od)
    writer.finalize_od(4)
    return od


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_split_enhancement_equals_the_unsplit_job(tiled_server, tiled_client, dask, models):
    from phasestream.jobs.enhance import EnhanceOptions, enhance_result

    _od_result(tiled_client, "split-enhance")
    options = EnhanceOptions(address=models.address, steps=2, timeout=120)
    record = submit_split_enhance(dask, tiled_server.uri, "split-enhance", options, parts=2)
    assert record["status"] == "complete", record
    assert record["split"]["ranges"] == [[0, 2], [2, 4]] and record["scale"] == 2.0
    node = tiled_client["phasestream"]["split-enhance"]
    path = f"enhanced/{INDI}/{record['version']}/2"
    assert record["path"] == path
    split = node[path].read()
    assert split.shape == (4, 64, 64) and node[path].chunks[0] == (1, 1, 1, 1)
    assert node.metadata["enhancement"]["split"]["parts"] == 2
    # the oracle: the unsplit job, one plane per request, as the tasks send them (same model and steps: same key)
    assert enhance_result(tiled_client, "split-enhance", options)["status"] == "complete"
    np.testing.assert_allclose(split, node[path].read(), rtol=1e-5, atol=1e-5)
    assert np.abs(split).max() > 0


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_reprocess_split_command(tiled_server, tiled_client, ni_csv, capsys):
    """``reprocess --method lcf --method edge50 --split 3``: LCF in 3 bands on Dask, edge50 in the run's job."""
    from phasestream.app.cli import main

    refs = load_references(ni_csv)
    _result(tiled_client, "split-cli", refs, ENERGIES, (30, 32), references=str(ni_csv))
    code = main(["reprocess", "--tiled", tiled_server.uri, "--refine-only", "--method", "lcf", "--method", "edge50",
                 "--split", "3", "--workers", "2", "--json", "split-cli"])
    out = capsys.readouterr().out
    assert code == 0, out
    node = tiled_client["phasestream"]["split-cli"]
    md = node.metadata["methods"]
    assert md["lcf"]["split"]["ranges"] == [[0, 10], [10, 20], [20, 30]] and md["edge50"]["status"] == "complete"
    split = node["fractions_lcf"].read()
    run_methods(tiled_client, "split-cli", MethodsOptions(methods=("lcf",)))
    np.testing.assert_allclose(split, node["fractions_lcf"].read(), rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_split_steps_run_on_fields_and_partial_runs_and_go_on_past_an_error(tiled_server, tiled_client, dask, ni_csv):
    """A run of several fields (results <uid>.f0, <uid>.f1) gets its split steps per field; a partial run
    (usable) gets them too; a run whose result cannot be opened fails alone: the later runs go on."""
    from dataclasses import asdict

    from phasestream.contract import JobOutcome, JobStatus
    from phasestream.jobs.executors import JobReport
    from phasestream.jobs.split import run_split_steps

    refs = load_references(ni_csv)
    _result(tiled_client, "ss-ok", refs, ENERGIES, (16, 16), references=str(ni_csv))
    _result(tiled_client, "ss-partial", refs, ENERGIES, (16, 16), references=str(ni_csv))
    _result(tiled_client, "ss-mf", refs, ENERGIES, (16, 16), references=str(ni_csv))
    od = tiled_client["phasestream"]["ss-mf"]["od"].read()
    for key in ("ss-mf.f0", "ss-mf.f1"):  # what reprocess writes for a run of two fields
        writer = ResultWriter(tiled_client, "ss-mf", key=key, shape=(16, 16), phases=refs.phases,
                              n_energies=len(ENERGIES),
                              metadata={"energies_eV": list(ENERGIES), "references": {"name": refs.name}})
        writer.write_od_planes(0, od)
        writer.finalize_od(len(ENERGIES))
    fields = {"steps": {"reprocess": {"details": {"fields": {"ss-mf.f0": "complete", "ss-mf.f1": "complete"}}}}}
    report = JobReport()
    report.add(JobOutcome("ss-gone", "reprocess", JobStatus.COMPLETE))  # its result is not in Tiled
    report.add(JobOutcome("ss-mf", "reprocess", JobStatus.COMPLETE, details=fields))
    report.add(JobOutcome("ss-partial", "reprocess", JobStatus.PARTIAL, reason="reprocess partial: 28 of 30"))
    report.add(JobOutcome("ss-ok", "reprocess", JobStatus.COMPLETE))
    # the references named: a field's key is no raw run, so its start document does not name them
    lcf = asdict(MethodsOptions(methods=("lcf",), references=str(ni_csv)))
    seen = []
    uri, _, key = tiled_server.uri.partition("?api_key=")
    run_split_steps(dask, [(uid, "lcf", lcf) for uid in ("ss-gone", "ss-mf", "ss-partial", "ss-ok")], uri,
                    report, parts=2, api_key=key, retries=0, on_done=seen.append)
    results = tiled_client["phasestream"]
    for uid in ("ss-mf.f0", "ss-mf.f1", "ss-partial", "ss-ok"):
        assert results[uid].metadata["methods"]["lcf"]["status"] == "complete", uid
    outcomes = {o["run_uid"]: o for o in [*report.successes, *report.failures]}
    gone = outcomes["ss-gone"]
    assert gone["status"] == "failed" and "split lcf" in gone["reason"] and "ss-gone" in gone["reason"], gone
    assert outcomes["ss-mf"]["status"] == "complete"
    assert set(outcomes["ss-mf"]["details"]["steps"]) >= {"lcf (split 2) ss-mf.f0", "lcf (split 2) ss-mf.f1"}
    partial = outcomes["ss-partial"]
    assert partial["status"] == "partial" and partial["details"]["steps"]["lcf (split 2)"]["status"] == "complete"
    assert [o["run_uid"] for o in seen] == ["ss-gone"]  # the only outcome the split steps changed
    assert {o["run_uid"] for o in report.successes} == {"ss-mf", "ss-ok"}


# --------------------------------------------------------------------------- re-runs: nothing complete is lost


def _stored(node, names):
    """Each array's dtype, shape and bytes: equal only when bit for bit equal (NaN included)."""
    return {name: (node[name].dtype, node[name].shape, node[name].read().tobytes()) for name in names}


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_split_lcf_rerun_that_fails_keeps_the_earlier_arrays_and_one_that_completes_replaces_them(
        tiled_server, tiled_client, dask, ni_csv):
    refs = load_references(ni_csv)
    # 5 energies: the default LCF (2 weights) fits them, one with a background of order 5 (8 parameters) cannot
    _result(tiled_client, "rerun-lcf", refs, ENERGIES[::6], (16, 16), references=str(ni_csv))
    uri, _, key = tiled_server.uri.partition("?api_key=")
    assert submit_split_lcf(dask, uri, "rerun-lcf", parts=2, api_key=key)["status"] == "complete"
    node = tiled_client["phasestream"]["rerun-lcf"]
    earlier, before = dict(node.metadata["methods"]["lcf"]), _stored(node, LCF_ARRAYS)
    # options that pass the submit's checks; every band raises in its task
    failed = submit_split_lcf(dask, uri, "rerun-lcf", {"background_order": 5}, parts=2, api_key=key, retries=0)
    assert failed["status"] == "failed" and "8 free parameters need more than 5 energies" in failed["errors"][0]
    node = tiled_client["phasestream"]["rerun-lcf"]
    assert _stored(node, LCF_ARRAYS) == before  # the earlier arrays, bit for bit
    assert set(node) == {"od", *LCF_ARRAYS}  # nothing staged is left behind
    record = node.metadata["methods"]["lcf"]
    assert record["status"] == "failed" and record["errors"] == failed["errors"]
    assert dict(record["kept"]) == earlier == failed["kept"]
    # a re-run that completes replaces record and arrays; the oracle: the unsplit job with the same options
    done = submit_split_lcf(dask, uri, "rerun-lcf", {"lcf_sum_to_one": False}, parts=3, api_key=key)
    assert done["status"] == "complete" and "kept" not in done and done["split"]["ranges"] == [[0, 6], [6, 12],
                                                                                                 [12, 16]]
    node = tiled_client["phasestream"]["rerun-lcf"]
    assert set(node) == {"od", *LCF_ARRAYS} and node["fractions_lcf"].chunks == ((2,), (6, 6, 4), (16,))
    assert node.metadata["methods"]["lcf"]["parameters"]["sum_to_one"] is False
    split = {name: node[name].read() for name in LCF_ARRAYS}
    assert not np.allclose(split["fractions_lcf"], np.frombuffer(before["fractions_lcf"][2], np.float32).reshape(
        split["fractions_lcf"].shape), equal_nan=True)
    assert run_methods(tiled_client, "rerun-lcf", MethodsOptions(methods=("lcf",), lcf_sum_to_one=False)
                       )["lcf"]["status"] == "complete"
    for name in LCF_ARRAYS:
        np.testing.assert_allclose(split[name], node[name].read(), rtol=1e-6, atol=1e-7, equal_nan=True, err_msg=name)


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_split_lcf_refuses_an_od_that_disagrees_with_the_metadata(tiled_server, tiled_client, dask, ni_csv):
    refs = load_references(ni_csv)
    _result(tiled_client, "rerun-lcf-shape", refs, ENERGIES, (16, 16), references=str(ni_csv))
    uri, _, key = tiled_server.uri.partition("?api_key=")
    assert submit_split_lcf(dask, uri, "rerun-lcf-shape", parts=2, api_key=key)["status"] == "complete"
    node = tiled_client["phasestream"]["rerun-lcf-shape"]
    earlier, before = dict(node.metadata["methods"]["lcf"]), _stored(node, LCF_ARRAYS)
    writer = ResultWriter.open(tiled_client, "rerun-lcf-shape")
    # more energies recorded than od holds; then images larger than od's
    for edit, said in (({"n_energies_seen": 35, "energies_eV": list(np.linspace(8300.0, 8450.0, 35))}, "(35, 16, 16)"),
                       ({"image_shape": [20, 16]}, "(30, 20, 16)")):
        writer.update_metadata(**edit)
        record = submit_split_lcf(dask, uri, "rerun-lcf-shape", parts=2, api_key=key, retries=0)
        node = tiled_client["phasestream"]["rerun-lcf-shape"]
        assert _stored(node, LCF_ARRAYS) == before and set(node) == {"od", *LCF_ARRAYS}
        assert record["status"] == "failed" and said in record["errors"][0] and "(30, 16, 16)" in record["errors"][0]
        assert dict(node.metadata["methods"]["lcf"]["kept"]) == earlier
        writer.update_metadata(n_energies_seen=30, energies_eV=list(ENERGIES), image_shape=[16, 16])


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_split_enhancement_rerun_that_fails_keeps_the_earlier_array(tiled_server, tiled_client, dask, models):
    from phasestream.jobs.enhance import EnhanceOptions, enhance_images

    od = _od_result(tiled_client, "rerun-enhance")
    options = EnhanceOptions(address=models.address, steps=2, timeout=120)
    first = submit_split_enhance(dask, tiled_server.uri, "rerun-enhance", options, parts=2, retries=0)
    assert first["status"] == "complete", first
    path, entry = first["path"], first["path"].removeprefix("enhanced/")
    node = tiled_client["phasestream"]["rerun-enhance"]
    earlier, before = dict(node.metadata["enhancements"][entry]), _stored(node, [path])
    # a plane with no finite pixel: the model server refuses it (the version probe before the tasks passes)
    writer = ResultWriter.open(tiled_client, "rerun-enhance")
    writer.write_od(3, np.full((32, 32), np.nan, np.float32))
    failed = submit_split_enhance(dask, tiled_server.uri, "rerun-enhance", options, parts=2, retries=0)
    assert failed["status"] == "failed" and "no finite pixel" in failed["reason"], failed
    node = tiled_client["phasestream"]["rerun-enhance"]
    assert _stored(node, [path]) == before and set(node) == {"od", "enhanced"}
    assert dict(node.metadata["enhancements"][entry]) == earlier  # the record of the array that is still there
    assert dict(node.metadata["enhancement"]["kept"]) == earlier and dict(failed["kept"]) == earlier
    # more OD planes recorded than od holds: refused before any task, naming both shapes
    writer.write_od(3, od[3] * 0.8)
    writer.update_metadata(n_energies_seen=6)
    refused = submit_split_enhance(dask, tiled_server.uri, "rerun-enhance", options, parts=2, retries=0)
    assert refused["status"] == "failed" and "(6, 32, 32)" in refused["reason"] and "(4, 32, 32)" in refused["reason"]
    node = tiled_client["phasestream"]["rerun-enhance"]
    assert dict(node.metadata["enhancement"]["kept"]) == earlier and _stored(node, [path]) == before
    # a re-run that completes replaces the array; the oracle: the earlier planes, and the new plane 3 enhanced alone
    writer.update_metadata(n_energies_seen=4)
    done = submit_split_enhance(dask, tiled_server.uri, "rerun-enhance", options, parts=4, retries=0)
    assert done["status"] == "complete" and "kept" not in done and done["split"]["parts"] == 4, done
    node = tiled_client["phasestream"]["rerun-enhance"]
    assert set(node) == {"od", "enhanced"} and node.metadata["enhancements"][entry]["split"]["parts"] == 4
    enhanced = node[path].read()
    old = np.frombuffer(before[path][2], np.float32).reshape(enhanced.shape)
    np.testing.assert_allclose(enhanced[:3], old[:3], rtol=1e-5, atol=1e-5)
    alone = enhance_images(od[3] * 0.8, domain="od", model=INDI, version=first["version"], steps=2,
                           address=models.address, timeout=120)["array"]
    np.testing.assert_allclose(enhanced[3], alone, rtol=1e-5, atol=1e-5)
    assert not np.allclose(enhanced[3], old[3], rtol=1e-3, atol=1e-3)


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_concurrent_split_lcfs_never_stitch_bands_of_both(tiled_server, tiled_client, dask, ni_csv):
    """Two split LCFs of one result at once, by two fit methods: each stages its own bands, so the result ends
    with the arrays of the one its record names (or, had their copies crossed, a failed record and none)."""
    from concurrent.futures import ThreadPoolExecutor

    refs = load_references(ni_csv)
    _result(tiled_client, "split-lcf-twice", refs, ENERGIES, (24, 16), references=str(ni_csv))
    uri, _, key = tiled_server.uri.partition("?api_key=")
    with ThreadPoolExecutor(2) as pool:
        records = list(pool.map(lambda method: submit_split_lcf(dask, uri, "split-lcf-twice", {"lcf_method": method},
                                                                parts=4, api_key=key), ("nnls", "fcls")))
    node = tiled_client["phasestream"]["split-lcf-twice"]
    record = node.metadata["methods"]["lcf"]
    assert set(node) <= {"od", *LCF_ARRAYS}, set(node)  # nothing staged is left behind
    if record["status"] != "complete":  # their copies crossed: no array stays that no record describes
        assert set(node) == {"od"} and all(r["status"] == "failed" for r in records), records
        return
    split = {name: node[name].read() for name in LCF_ARRAYS}
    method = record["parameters"]["method"]
    assert run_methods(tiled_client, "split-lcf-twice", MethodsOptions(methods=("lcf",), lcf_method=method)
                       )["lcf"]["status"] == "complete"
    for name in LCF_ARRAYS:
        np.testing.assert_allclose(split[name], node[name].read(), rtol=1e-6, atol=1e-7, equal_nan=True,
                                   err_msg=f"{name} of {method}")


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_split_lcf_record_beats_while_it_copies_after_finalizing_a_stale_one(tiled_server, tiled_client, dask, ni_csv):
    """A split LCF finds the ``running`` record of one killed on another host (heartbeat 10 minutes old): it
    records it ``failed`` (interrupted) and runs; while it copies, its own ``running`` record says who runs it and
    beats. Every state of ``methods.lcf`` is watched from here as the job writes it."""
    refs = load_references(ni_csv)
    _result(tiled_client, "split-lcf-beats", refs, ENERGIES[::3], (16, 16), references=str(ni_csv))
    node = tiled_client["phasestream"]["split-lcf-beats"]
    stale = {"status": "running", "staging": "_staging-00000000000000cc", "host": "beamline-gpu-7", "pid": 4242,
             "started_at": time.time() - 900, "heartbeat_at": time.time() - 600, "heartbeat_seconds": 15.0}
    node.patch_metadata(metadata_patch=[{"op": "add", "path": "/methods", "value": {"lcf": stale}}],
                        drop_revision=True)
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            record = dict(node.refresh().metadata["methods"]["lcf"])
            if not seen or seen[-1] != record:
                seen.append(record)

    watcher = threading.Thread(target=watch)
    watcher.start()
    uri, _, key = tiled_server.uri.partition("?api_key=")
    try:
        record = submit_split_lcf(dask, uri, "split-lcf-beats", parts=2, api_key=key, heartbeat_seconds=0.05)
    finally:
        done.set()
        watcher.join()
    assert record["status"] == "complete", record
    interrupted = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stale["heartbeat_at"]))
    assert {**stale, "status": "failed", "unverified_arrays": [],
            "reason": f"interrupted: no heartbeat since {interrupted} (the job's process stopped)"} in seen, seen
    running = [r for r in seen if r["status"] == "running" and r["staging"] != stale["staging"]]
    assert running, seen
    for r in running:
        assert (r["host"], r["pid"], r["pid_namespace"]) == (socket.gethostname(), os.getpid(),
                                                             os.readlink("/proc/self/ns/pid")), r
        assert STAGING_KEY.fullmatch(r["staging"]) and r["heartbeat_seconds"] == 0.05, r
        assert time.time() - 60 < r["started_at"] <= r["heartbeat_at"] <= time.time(), r
    assert seen[-1] == node.metadata["methods"]["lcf"] and set(node) == {"od", *LCF_ARRAYS}
