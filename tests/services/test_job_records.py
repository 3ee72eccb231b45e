"""A post-scan job record never says ``running`` for good: while a refinement or denoising works, its record
carries a heartbeat; one left ``running`` by a process that stopped (SIGKILL here) is finalized ``failed``
(``interrupted``) by the live worker's sweep or by the next run of the job, keeping the earlier complete record
and every array as it is; a run that finds a live record is refused. A ``complete`` record means its arrays were
read back from Tiled and are bit for bit what was written (phasestream.jobs.heartbeat, phasestream.jobs.readback,
docs/contract.md#post-scan-job-records)."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from support import analysed_scan

from phasestream.app.live import LiveService
from phasestream.contract.denoise import DENOISING_ARRAYS
from phasestream.jobs import refine
from phasestream.jobs.context import JobContext
from phasestream.jobs.denoise import DenoiseOptions, denoise_result
from phasestream.jobs.heartbeat import JobRunningError, finalize_interrupted
from phasestream.jobs.interrupted import finalize_interrupted_jobs
from phasestream.jobs.readback import ReadBackError, read_back
from phasestream.jobs.refine import REFINEMENT_ARRAYS, RefineOptions, refine_result
from phasestream.references import load_references, select_energies
from phasestream.store.results import ResultWriter

ENERGIES = select_energies(load_references("nvpf-synthetic"), 6)
#: a refinement that needs no model server: it completes here, in a second or so
SPATIAL = RefineOptions(address="tcp://127.0.0.1:1", timeout=0.5, retries=0, strategy="spatial", check=False)
#: a refinement killed mid-work: its model server never answers (nothing listens), so it waits in its first
#: request (5 s per attempt) with its record `running` and its heartbeat beating every 0.2 s. It reads the
#: run uid from stdin, once its imports are done (they overlap with the scan).
KILLED_JOB = """
import sys
from phasestream.jobs.refine import RefineOptions, refine_result
from phasestream.store.tiled import connect
uri, uid = sys.argv[1], sys.stdin.readline().strip()
refine_result(connect(uri), uid, RefineOptions(address="tcp://127.0.0.1:1", timeout=30, retries=3, strategy="knn",
                                               check=False, heartbeat_seconds=0.2))
"""


def _scan(client, seed: int, shape=(48, 48)) -> str:
    return analysed_scan(client, ENERGIES, shape=shape, seed=seed)


def _utc(seconds: float) -> str:  # the oracle of the reason's time: time.gmtime, not the job's formatting
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _wait_for(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def _arrays(node, names) -> dict[str, tuple[str, tuple, bytes]]:
    """Arrays read back as bytes with dtype and shape: compared bit for bit."""
    return {name: (node[name].dtype.str, node[name].shape, node[name].read().tobytes()) for name in names
            if name in node}


def _patch(node, **fields) -> None:
    """Metadata written as another process (an earlier version of a job, a person) writes it: no job code."""
    node.patch_metadata(metadata_patch=[{"op": "add", "path": f"/{k}", "value": v} for k, v in fields.items()],
                        drop_revision=True)


def test_a_refinement_killed_mid_work_is_finalized_failed_and_a_live_one_never_runs_twice(tiled_server,
                                                                                            tiled_client):
    job = subprocess.Popen([sys.executable, "-c", KILLED_JOB, tiled_server.uri], stdin=subprocess.PIPE, text=True)
    live = None
    try:
        uid = _scan(tiled_client, seed=1)
        first = refine_result(tiled_client, uid, SPATIAL)
        assert first["status"] == "complete", first
        node = tiled_client["phasestream"][uid]
        before, md0 = _arrays(node, REFINEMENT_ARRAYS), node.metadata
        assert set(before) == {"refined_phase", "false_positive"}
        job.stdin.write(uid + "\n")
        job.stdin.close()

        def record():
            return tiled_client["phasestream"][uid].metadata["refinement"]

        running = _wait_for(lambda: (r := record())["status"] == "running" and r, 30, "the job's running record")
        # the record says who runs it, and its heartbeat advances while the job waits for the model server
        assert running["host"] == socket.gethostname() and running["pid"] == job.pid, running
        assert running["kept"] == md0["refinement"] and running["heartbeat_seconds"] == 0.2
        assert time.time() - 30 < running["started_at"] <= running["heartbeat_at"] <= time.time()
        _wait_for(lambda: record()["heartbeat_at"] > running["heartbeat_at"], 5, "a second heartbeat")
        # alive: the live worker's sweep leaves it running, and a second refinement is refused, naming it
        live = LiveService(tiled_client, backend="numba", poll_seconds=0.1, stale_after=3.0)
        time.sleep(0.5)  # its first sweep runs at once, on its own thread; one more here
        live.find_stale()
        assert record()["status"] == "running" and record()["pid"] == job.pid
        with pytest.raises(JobRunningError, match=rf"refinement .* already running: host {socket.gethostname()}, "
                                                  rf"pid {job.pid}, started "):
            refine_result(tiled_client, uid, SPATIAL)
        outcome = refine.run(JobContext(client=tiled_client), uid, {"address": "tcp://127.0.0.1:1", "timeout": 0.5,
                                                                    "strategy": "spatial", "check": False})
        assert outcome.status == "skipped" and f"pid {job.pid}" in outcome.reason, outcome
        assert outcome.retry.startswith("phasestream reprocess ") and outcome.retry.endswith(uid)
        assert record()["pid"] == job.pid and record()["status"] == "running"  # the live job's record untouched
        job.send_signal(signal.SIGKILL)
        assert job.wait(30) == -signal.SIGKILL
        # killed: the live worker's periodic sweep finalizes it, with the reason, keeping the earlier refinement
        failed = _wait_for(lambda: (r := record())["status"] == "failed" and r, 10, "the interrupted record")
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(30)
        if live is not None:
            live.close()
    assert failed["reason"] == (f"interrupted: no heartbeat since {_utc(failed['heartbeat_at'])} "
                                "(the job's process stopped)"), failed
    assert failed["kept"] == md0["refinement"] and failed["pid"] == job.pid
    assert failed["retry"].startswith("phasestream reprocess ") and "--strategy knn" in failed["retry"]
    node = tiled_client["phasestream"][uid]
    md = node.metadata
    assert _arrays(node, REFINEMENT_ARRAYS) == before  # bit for bit, read back
    assert md["refined_fractions"] == md0["refined_fractions"] and md["models"] == md0["models"]
    assert md["status"] == md0["status"] == "complete"  # the PCC result is not the job's to change


def _denoised_result(tiled_client, key: str) -> dict:
    """A result holding the arrays of a complete denoising and its record, as the denoising job leaves them."""
    writer = ResultWriter(tiled_client, key, shape=(8, 8), phases=["a", "b"], n_energies=3)
    rng = np.random.default_rng(0)
    arrays = {"denoised": rng.random((3, 8, 8), dtype=np.float32), "pcc_denoised": rng.random((2, 8, 8), np.float32),
              "phase_denoised": rng.integers(0, 2, (8, 8)).astype(np.int16),
              "reliability_denoised": rng.random((8, 8), np.float32),
              "ambiguous_denoised": rng.integers(0, 2, (8, 8)).astype(np.uint8)}
    assert set(arrays) == set(DENOISING_ARRAYS)
    writer.write_maps(**arrays)
    complete = {"status": "complete", "reason": "", "model": "denoise-stxm-synthetic", "version": "1", "seconds": 2.0}
    writer.update_metadata(status="complete", denoising=complete, phase_fractions_denoised={"a": 0.5, "b": 0.5})
    return complete


def test_a_record_left_running_by_an_earlier_version_is_finalized_once_the_result_is_old(tiled_client):
    """What the denoising wrote before records had a heartbeat: ``{status: running, model, kept}``. It counts as
    interrupted once the result's ``updated_at`` is older than the limit; not before."""
    complete = _denoised_result(tiled_client, "legacy-running")
    node = tiled_client["phasestream"]["legacy-running"]
    before = _arrays(node, DENOISING_ARRAYS)
    legacy = {"status": "running", "model": "denoise-stxm-synthetic", "kept": complete}
    _patch(node, denoising=legacy, updated_at=time.time() - 30)
    assert ("legacy-running", "denoising") not in finalize_interrupted_jobs(tiled_client, "phasestream",
                                                                            stale_after=60)
    assert node.refresh().metadata["denoising"] == legacy
    last = time.time() - 600
    _patch(node, updated_at=last)
    # the live worker's sweep: on its own thread at once, and here
    live = LiveService(tiled_client, backend="numba", poll_seconds=0.1, stale_after=60)
    try:
        live.find_stale()
    finally:
        live.close()
    md = node.refresh().metadata
    assert md["denoising"]["status"] == "failed" and md["denoising"]["kept"] == complete, md["denoising"]
    assert md["denoising"]["reason"] == f"interrupted: no heartbeat since {_utc(last)} (the job's process stopped)"
    assert _arrays(node, DENOISING_ARRAYS) == before and md["phase_fractions_denoised"] == {"a": 0.5, "b": 0.5}
    # a record without `kept` names the arrays beside it that no complete record describes; nothing is deleted
    _patch(node, denoising={"status": "running", "model": "denoise-stxm-synthetic"}, updated_at=last)
    assert ("legacy-running", "denoising") in finalize_interrupted_jobs(tiled_client, "phasestream", stale_after=60)
    md = node.refresh().metadata
    assert md["denoising"]["status"] == "failed" and "kept" not in md["denoising"]
    assert md["denoising"]["unverified_arrays"] == sorted(DENOISING_ARRAYS)
    assert _arrays(node, DENOISING_ARRAYS) == before


def test_a_rerun_proceeds_over_a_stale_record_and_is_refused_by_a_live_one(tiled_client):
    """Records of a job on another host (its pid means nothing here): only the heartbeat's age tells."""
    uid = _scan(tiled_client, seed=2, shape=(32, 32))
    node = tiled_client["phasestream"][uid]
    now = time.time()
    live = {"status": "running", "model": "denoise-stxm-synthetic", "host": "beamline-gpu-7", "pid": 4242,
            "started_at": now - 50, "heartbeat_at": now - 2, "heartbeat_seconds": 15.0}
    _patch(node, denoising=live)
    with pytest.raises(JobRunningError, match=r"denoising of result phasestream/\S+ is already running: host "
                                              r"beamline-gpu-7, pid 4242, started .* last heartbeat \d+ s ago"):
        denoise_result(tiled_client, uid, DenoiseOptions(address="tcp://127.0.0.1:1", timeout=0.5))
    assert node.refresh().metadata["denoising"] == live  # refused: nothing written
    assert (uid, "denoising") not in finalize_interrupted_jobs(tiled_client, "phasestream", stale_after=60)
    assert node.refresh().metadata["denoising"] == live  # fresh: left running
    # the same record, its heartbeat 10 minutes old: the next refinement finalizes it and runs
    stale = {**live, "heartbeat_at": now - 600}
    _patch(node, refinement={**stale, "model": None})
    record = refine_result(tiled_client, uid, SPATIAL)
    assert record["status"] == "complete", record
    assert node.refresh().metadata["refinement"]["status"] == "complete" and "refined_phase" in node
    # and the stale denoising record: the next denoising finalizes it and records its own outcome
    _patch(node, denoising=stale)
    record = denoise_result(tiled_client, uid, DenoiseOptions(address="tcp://127.0.0.1:1", timeout=0.5, retries=0))
    assert record["status"] == "skipped" and "no reply from the model server" in record["reason"], record


def test_a_finalization_never_overwrites_a_record_that_beat_again(tiled_client):
    """The sweep found the record stale; before it wrote, the job beat again (it was only slow): nothing is
    written. The record is read again and compared with the one judged, not the one found."""
    complete = _denoised_result(tiled_client, "beat-again")
    node = tiled_client["phasestream"]["beat-again"]
    found = {"status": "running", "model": "m", "kept": complete, "host": "elsewhere", "pid": 7,
             "started_at": time.time() - 900, "heartbeat_at": time.time() - 800, "heartbeat_seconds": 15.0}
    _patch(node, denoising=found)
    beat = {**found, "heartbeat_at": time.time()}
    _patch(node, denoising=beat)
    assert finalize_interrupted(node, "denoising", DENOISING_ARRAYS, stale_after=60, seen=found) is None
    assert node.refresh().metadata["denoising"] == beat
    # judged on what it reads now, the same call finalizes a record that is still the stale one it found
    _patch(node, denoising=found)
    failed = finalize_interrupted(node, "denoising", DENOISING_ARRAYS, stale_after=60, seen=found)
    assert failed["status"] == "failed" and node.refresh().metadata["denoising"] == failed


def test_a_complete_refinement_read_its_arrays_back(tiled_client):
    uid = _scan(tiled_client, seed=3, shape=(32, 32))
    record = refine_result(tiled_client, uid, SPATIAL)
    assert record["status"] == "complete", record
    node = tiled_client["phasestream"][uid]
    # the digests are those of the arrays as Tiled serves them (read here independently)
    digests = {name: hashlib.sha256(node[name].read().tobytes()).hexdigest() for name in REFINEMENT_ARRAYS
               if name in node}
    assert set(digests) == {"refined_phase", "false_positive"}
    assert record["array_sha256"] == digests == node.metadata["refinement"]["array_sha256"]


def test_read_back_finds_an_array_that_is_not_what_was_written(tiled_client):
    """Read in blocks of a few rows (bounded memory): a difference in a later block is found and named."""
    writer = ResultWriter(tiled_client, "read-back", shape=(16, 16), phases=["a", "b"], n_energies=4)
    rng = np.random.default_rng(1)
    written = {"denoised": rng.random((4, 16, 16), dtype=np.float32),
               "phase_denoised": rng.integers(0, 2, (16, 16)).astype(np.int16),
               "ambiguous_denoised": rng.random((16, 16)) > 0.5}  # bool: stored as uint8, compared as stored
    writer.write_maps(**written)
    digests = read_back(writer, written, block_bytes=2 * 16 * 4)
    expected = np.asarray(written["ambiguous_denoised"], np.uint8)
    assert digests["ambiguous_denoised"] == hashlib.sha256(expected.tobytes()).hexdigest()
    assert digests["denoised"] == hashlib.sha256(written["denoised"].tobytes()).hexdigest()
    # another writer changes one value of the cube in Tiled, in its last energy plane
    changed = written["denoised"].copy()
    changed[3, 9, 4] += 1.0
    tiled_client["phasestream"]["read-back"]["denoised"].write(changed)
    with pytest.raises(ReadBackError, match=r"denoised: read back .* at \(3, 9, 4\)"):
        read_back(writer, written, block_bytes=2 * 16 * 4)
    # an array of another shape or dtype in Tiled: named, without reading its data
    tiled_client["phasestream"]["read-back"].delete_contents("phase_denoised", external_only=False)
    tiled_client["phasestream"]["read-back"].write_array(np.zeros((16, 16), np.float32), key="phase_denoised")
    with pytest.raises(ReadBackError, match=r"phase_denoised: .*float32 in Tiled, expected .*int16"):
        read_back(writer, {"phase_denoised": written["phase_denoised"]})
