"""Reprocessing raw runs from Tiled gives the live results."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.app.cli import main
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.jobs.context import JobContext
from phasestream.jobs.refine import RefineOptions, refine_result
from phasestream.jobs.reprocess import ResultBusyError, reprocess_run, run
from phasestream.references import load_references, select_energies
from phasestream.sim import HDF5TransmissionDetector, TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import raw_run_writer

ENERGIES = select_energies(load_references("nvpf-synthetic"), 6)
ARRAYS = ("od", "pcc", "phase", "reliability", "ambiguous", "mask")


@pytest.fixture
def tiled(tiled_server, tiled_client, detector_files):
    return tiled_server, tiled_client, detector_files


@pytest.mark.parametrize(("mode", "external"), [
    ("stxm", False),
    # make test-stack: keeps make test under 15 minutes (a TXM run is reprocessed in make test by
    # tests/jobs/test_importing.py, the dark-less stack)
    pytest.param("txm", False, marks=pytest.mark.slow),
    pytest.param("stxm", True, marks=pytest.mark.slow),
])
def test_reprocess_equals_live(tiled, mode, external):
    server, client, files = tiled
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    live = PhaseMapCallback(client, backend="numba", update_every=2, asset_folders=[files] if external else ())
    RE.subscribe(live)
    sample = make_sample((40, 40), state_of_charge=1.0, seed=3, n_particles=2)
    energy = make_energy()
    kwargs = {"write_path": files} if external else {}
    cls = HDF5TransmissionDetector if external else TransmissionDetector
    det = cls(sample, energy, mode=mode, i0=6000.0, seed=2, **kwargs)
    i0_key = det.i0_key if mode == "stxm" else None
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, mode=mode, i0_key=i0_key))
    assert live.flush(60)
    live.close()
    before = {k: client["phasestream"][uid][k].read() for k in ARRAYS}
    live_md = client["phasestream"][uid].metadata
    assert live_md["status"] == "complete", live_md["errors"]
    # the reprocess job, with another backend: the same numbers
    outcome = run(JobContext(server.uri), uid, {"backend": "numpy", "replace": True})
    assert outcome.status == "complete" and outcome.job == "reprocess" and outcome.reason == ""
    after = client["phasestream"][uid]
    for k in ARRAYS:
        np.testing.assert_allclose(after[k].read(), before[k], atol=1e-5, equal_nan=True, err_msg=k)
    assert after.metadata["phase_fractions"] == pytest.approx(live_md["phase_fractions"], abs=1e-3)


def test_reprocess_unknown_run_is_a_clear_error(tiled):
    _, client, _ = tiled
    with pytest.raises(KeyError):
        reprocess_run(client, "no-such-uid")


def _live_run(client, *, finish: bool = True) -> str:
    """A raw run in Tiled and its live result (``complete``; ``running`` when not ``finish``ed)."""
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    sample = make_sample((24, 24), state_of_charge=1.0, seed=4, n_particles=1)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=6000.0, seed=4)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
    live = PhaseMapCallback(client, backend="numpy")
    for name, doc in docs if finish else docs[:-1]:
        live(name, doc)
    assert live.flush(60)
    return uid


def test_a_reprocess_that_cannot_analyse_the_run_leaves_the_earlier_result(tiled):
    """Reprocessing with references of another edge (every energy outside them) wiped a complete result and
    left a failed one without arrays. The earlier result stays as it was; the outcome says why it failed."""
    server, client, _ = tiled
    uid = _live_run(client)
    before = {k: client["phasestream"][uid][k].read() for k in ARRAYS}
    outcome = run(JobContext(server.uri), uid, {"backend": "numpy", "replace": True, "references": "kedge-synthetic"})
    assert outcome.status == "failed" and "outside the range" in outcome.reason, outcome
    assert f"{uid} failed" in outcome.reason and "where it is complete; the earlier results are kept" in outcome.reason
    node = client["phasestream"][uid]
    assert node.metadata["status"] == "complete"
    for k in ARRAYS:
        np.testing.assert_array_equal(node[k].read(), before[k], err_msg=k)


def test_a_replace_that_cannot_write_says_the_earlier_result_is_gone(tiled, monkeypatch):
    """The earlier result is removed before the new one is created: when that creation fails, the reason says
    so (before: only "writing the result container failed", the complete result silently gone)."""
    from tiled.client.container import Container

    server, client, _ = tiled
    uid = _live_run(client)
    create = Container.create_container

    def refused(self, key=None, *args, **kwargs):
        if key == uid:
            raise RuntimeError("503 from Tiled")
        return create(self, key, *args, **kwargs)

    monkeypatch.setattr(Container, "create_container", refused)
    outcome = run(JobContext(server.uri), uid, {"backend": "numpy", "replace": True})
    monkeypatch.undo()
    assert outcome.status == "failed", outcome
    assert "the earlier result at phasestream/" in outcome.reason and "(status complete) was removed" in outcome.reason
    assert "503 from Tiled" in outcome.reason


def test_a_replace_records_and_says_what_went_with_the_earlier_result(tiled, capsys):
    """``reprocess --replace`` removes the earlier result whole: its post-scan arrays and records go with it (they
    came from the earlier maps). Before, nothing said so: the command printed "complete", and the new result
    held no trace of the refinement. Now the new result's ``replaced`` names what went, and the command says
    which options compute it again."""
    server, client, _ = tiled
    uid = _live_run(client)
    down = ["--models", "tcp://127.0.0.1:1", "--strategy", "spatial", "--no-check"]  # no model server needed
    spatial = RefineOptions(address="tcp://127.0.0.1:1", timeout=0.5, retries=0, strategy="spatial", check=False)
    assert refine_result(client, uid, spatial)["status"] == "complete"
    arrays = sorted(client["phasestream"][uid])
    assert {"refined_phase", *ARRAYS} <= set(arrays)
    t0 = time.time()
    assert main(["reprocess", "--tiled", server.uri, "--backend", "numpy", "--replace", uid]) == 0
    out = capsys.readouterr().out
    node = client["phasestream"][uid]
    replaced = node.metadata["replaced"]
    assert replaced["status"] == "complete" and replaced["records"] == ["refinement"], replaced
    assert replaced["arrays"] == arrays and t0 <= replaced["at"] <= time.time()
    assert node.metadata["status"] == "complete" and "refinement" not in node.metadata
    assert "refined_phase" not in node
    assert (f"replaced the earlier complete result {uid}; its refinement went with it: compute them again with "
            "--refine") in out
    # the refinement asked for in the same command is computed again: what went is said, with no option to pass
    assert refine_result(client, uid, spatial)["status"] == "complete"
    assert main(["reprocess", "--tiled", server.uri, "--backend", "numpy", "--replace", "--refine", *down, uid]) == 0
    out = capsys.readouterr().out
    node = client["phasestream"][uid]
    assert node.metadata["refinement"]["status"] == "complete" and "refined_phase" in node
    replaced = node.metadata["replaced"]
    assert replaced["records"] == ["refinement"] and "refined_phase" in replaced["arrays"]
    assert f"replaced the earlier complete result {uid}; its refinement went with it\n" in out


def test_a_result_a_live_worker_is_writing_is_not_reprocessed(tiled):
    """A person's reprocess replaced a result the live worker was still writing (its heartbeat fresh): the live
    writer then wrote into the reprocessed result. Refused, naming the result; the live worker's recovery (which
    recovers only results it found stale) passes ``busy_seconds=0``."""
    server, client, _ = tiled
    uid = _live_run(client, finish=False)
    assert client["phasestream"][uid].metadata["status"] == "running"
    with pytest.raises(ResultBusyError, match=rf"result {uid} is running, updated \d+ s ago by pid {os.getpid()} "
                                              r"on host .*: a live worker \(or another reprocess\) is writing it"):
        reprocess_run(client, uid)
    outcome = run(JobContext(server.uri), uid, {"backend": "numpy"})
    assert outcome.status == "skipped" and "is writing it" in outcome.reason
    outcome = run(JobContext(server.uri), uid, {"backend": "numpy", "busy_seconds": 0})
    assert outcome.status == "complete", outcome


def gone_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_result_whose_writer_is_gone_is_reprocessed_at_once(tiled):
    """``phasestream reprocess`` stopped by Ctrl-C or killed left its result ``running``, just updated: the next
    reprocess was refused for 10 minutes, saying a live worker was writing it. The result names its writer
    (``writer``: host, pid, PID namespace); one whose process is gone from this host is not busy."""
    server, client, _ = tiled
    uid = _live_run(client, finish=False)
    node = client["phasestream"][uid]
    writer = dict(node.metadata["writer"])
    assert writer["pid"] == os.getpid() and writer["host"] and writer["started_at"] > 0
    node.patch_metadata(metadata_patch=[{"op": "add", "path": "/writer/pid", "value": gone_pid()}],
                        drop_revision=True)
    outcome = run(JobContext(server.uri), uid, {"backend": "numpy"})
    assert outcome.status == "complete", outcome
    assert client["phasestream"][uid].metadata["writer"]["pid"] == os.getpid()  # the reprocess wrote it
