"""One result split across a LocalCluster of 2 workers: the stitched arrays equal the unsplit job's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from phasestream.jobs.cluster import dask_client
from phasestream.jobs.methods import MethodsOptions, run_methods
from phasestream.jobs.split import LCF_ARRAYS, split_ranges, submit_split_enhance, submit_split_lcf
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


@pytest.mark.cluster  # a LocalCluster: make test-stack (keeps make test under 15 minutes)
def test_split_enhancement_equals_the_unsplit_job(tiled_server, tiled_client, dask, models):
    from phasestream.jobs.enhance import EnhanceOptions, enhance_result

    thickness = particle_phantom((32, 32), n_particles=2, seed=3).astype(np.float32)
    od = np.stack([thickness * (0.5 + 0.2 * i) for i in range(4)])
    od += np.random.default_rng(2).normal(0, 0.02, od.shape).astype(np.float32)
    writer = ResultWriter(tiled_client, "split-enhance", shape=(32, 32), phases=["a", "b"], n_energies=4,
                          metadata={"energies_eV": [500.0, 510.0, 520.0, 530.0]})
    writer.write_od_planes(0, od)
    writer.finalize_od(4)
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
