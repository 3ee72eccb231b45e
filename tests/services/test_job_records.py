"""A post-scan job record never says ``running`` for good: while a refinement or denoising works, or a split LCF
or split enhancement copies its staged arrays in, its record carries a heartbeat; one left ``running`` by a
process that stopped (SIGKILL here) is finalized ``failed``
(``interrupted``) by the live worker's sweep or by the next run of the job, keeping the earlier complete record
and every array as it is; a run that finds a live record is refused. A ``complete`` record means its arrays were
read back from Tiled and are bit for bit what was written (phasestream.jobs.heartbeat, phasestream.store.readback,
docs/contract.md#post-scan-job-records)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
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
from phasestream.jobs.heartbeat import JobHeartbeat, JobRunningError, finalize_interrupted
from phasestream.jobs.interrupted import finalize_interrupted_jobs
from phasestream.jobs.refine import REFINEMENT_ARRAYS, RefineOptions, refine_result
from phasestream.jobs.split import LCF_ARRAYS, submit_split_enhance, submit_split_lcf
from phasestream.jobs.staging import ArrayLayout, Staging
from phasestream.references import load_references, select_energies
from phasestream.store.readback import ReadBackError, read_back, read_back_planes, uncompressed
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


#: where a split enhancement of 2 steps by version 1 of the InDI model writes its array
ENHANCED_PATH = "enhanced/indi-particles-synthetic/1/2"
#: the model server address where nothing listens
NOWHERE = "tcp://127.0.0.1:1"


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


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
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


def test_read_back_reads_uncompressed_through_the_same_server_and_key(tiled_client):
    """Arrays are read back through a client asking for uncompressed responses (half the time for float data);
    it is a client of the same server with the same API key, in a header, and the writer's own client keeps
    its compression."""
    writer = ResultWriter(tiled_client, "read-back-plain", shape=(16, 16), phases=["a", "b"], n_energies=5)
    planes = np.random.default_rng(2).random((5, 16, 16), dtype=np.float32)
    writer.write_od_planes(0, planes[:3])
    writer.write_od_planes(3, planes[3:])
    reader = uncompressed(writer.container)
    assert reader.context.http_client.headers["accept-encoding"] == "identity"
    assert "identity" not in tiled_client.context.http_client.headers["accept-encoding"]
    assert reader.context.api_key == tiled_client.context.api_key and "api_key" not in str(reader.uri)
    np.testing.assert_array_equal(reader["od"].read(), planes)
    # the OD cube, plane by plane against the digests taken as it was written (blocks of two planes)
    digest = read_back_planes(writer, "od", (5, 16, 16), np.float32, writer.od.digests, block_bytes=2 * 16 * 16 * 4)
    assert digest == hashlib.sha256(planes.tobytes()).hexdigest()
    assert writer.od.digests == {i: hashlib.sha256(p.tobytes()).hexdigest() for i, p in enumerate(planes)}
    # the planes written in order and read back (as the live sink does while idle): the cube's digest
    # without reading it again
    assert not writer.od.verified and writer.od.read_back_digest(5) is None
    writer.read_back_od_written()
    assert writer.od.verified == set(range(5)) and writer.od.read_back_digest(5) == digest
    assert writer.read_back({}, 5) == {"od": digest}
    # a plane written again (out of order): nothing to go by but reading the whole cube back
    writer.write_od_planes(1, planes[1:2])
    assert writer.od.read_back_digest(5) is None and writer.read_back({}, 5) == {"od": digest}
    with pytest.raises(ReadBackError, match=r"od: 1 of its 6 planes were never written \(the first: 5\)"):
        read_back_planes(writer, "od", (6, 16, 16), np.float32, writer.od.digests)
    changed = planes.copy()
    changed[4, 2, 2] = -1.0
    tiled_client["phasestream"]["read-back-plain"]["od"].write_block(changed[4:], block=(4, 0, 0))
    with pytest.raises(ReadBackError, match=r"od: plane 4 read back from Tiled is not what was written"):
        read_back_planes(writer, "od", (5, 16, 16), np.float32, writer.od.digests, block_bytes=2 * 16 * 16 * 4)


def _split_result(tiled_client, key: str) -> str:
    """A result as split jobs killed while they copied leave it: three of the four LCF arrays copied, an enhanced
    array, a staging container still there (its key returned); no OD image."""
    writer = ResultWriter(tiled_client, key, shape=(8, 8), phases=["a", "b"], n_energies=3)
    rng = np.random.default_rng(2)
    writer.write_maps(fractions_lcf=rng.random((2, 8, 8), dtype=np.float32),
                      fit_error=rng.random((8, 8), dtype=np.float32), reduced_chi2=rng.random((8, 8), dtype=np.float32))
    node = tiled_client["phasestream"][key]
    parent, _, array = ENHANCED_PATH.rpartition("/")
    for container in parent.split("/"):
        node = node.create_container(container)
    node.write_array(rng.random((3, 16, 16), dtype=np.float32), key=array)
    staging = Staging(writer.container, {"scale_lcf": ArrayLayout((8, 8), ((8,), (8,)), np.dtype(np.float32),
                                                                  ("y", "x"))}, job=f"split LCF of {writer.path}")
    staging.create()
    return staging.key


def test_split_jobs_killed_while_they_copied_are_finalized_by_the_sweep(tiled_client):
    """``methods.lcf`` and ``enhancement`` say ``running`` while a split job copies its staged arrays in. The
    sweep finalizes one whose process is gone from this host (its heartbeat still fresh), and one of another host
    whose heartbeat is old: ``failed``, naming the arrays no complete record describes, keeping ``staging`` and
    every other field; nothing is deleted, the staging container included."""
    staging = _split_result(tiled_client, "split-killed")
    node = tiled_client["phasestream"]["split-killed"]
    before = _arrays(node, [*LCF_ARRAYS, ENHANCED_PATH])
    assert set(before) == {"fractions_lcf", "fit_error", "reduced_chi2", ENHANCED_PATH}
    gone = subprocess.Popen(["true"])  # a process of this host that has ended
    gone.wait()
    now = time.time()
    lcf = {"status": "running", "parameters": {"method": "nnls"}, "arrays": sorted(LCF_ARRAYS), "errors": [],
           "staging": staging, "reason": "replacing the LCF arrays with the staged ones (read back as written)",
           "host": socket.gethostname(), "pid": gone.pid, "pid_namespace": os.readlink("/proc/self/ns/pid"),
           "started_at": now - 5, "heartbeat_at": now - 1, "heartbeat_seconds": 15.0}
    normalize = {"status": "skipped", "parameters": {}, "arrays": [], "errors": [], "reason": "no pre-edge"}
    enhancement = {"status": "running", "model": "indi-particles-synthetic", "source": "od", "path": ENHANCED_PATH,
                   "staging": "_staging-00000000000000aa", "reason": f"replacing {ENHANCED_PATH}",
                   "host": "beamline-gpu-7", "pid": 4242, "started_at": now - 900, "heartbeat_at": now - 600,
                   "heartbeat_seconds": 15.0}
    _patch(node, methods={"normalize": normalize, "lcf": lcf}, enhancement=enhancement)
    finalized = finalize_interrupted_jobs(tiled_client, "phasestream", stale_after=60)
    assert {("split-killed", "methods.lcf"), ("split-killed", "enhancement")} <= set(finalized), finalized
    md = node.refresh().metadata
    assert dict(md["methods"]["lcf"]) == {
        **lcf, "status": "failed", "unverified_arrays": ["fit_error", "fractions_lcf", "reduced_chi2"],
        "reason": f"interrupted: no heartbeat since {_utc(lcf['heartbeat_at'])} (the job's process stopped)"}
    assert dict(md["enhancement"]) == {
        **enhancement, "status": "failed", "unverified_arrays": [ENHANCED_PATH],
        "reason": f"interrupted: no heartbeat since {_utc(enhancement['heartbeat_at'])} (the job's process stopped)"}
    assert md["methods"]["normalize"] == normalize
    assert _arrays(node, [*LCF_ARRAYS, ENHANCED_PATH]) == before and staging in node


def test_a_split_record_left_running_by_an_earlier_version_counts_from_the_result_update(tiled_client):
    """What the split jobs wrote before their records had a heartbeat: ``running`` with ``staging``. Interrupted
    once the result's ``updated_at`` is older than the limit; not before. An enhancement record whose ``path``
    is not an enhancement's (edited by hand) names no array."""
    staging = _split_result(tiled_client, "split-legacy")
    node = tiled_client["phasestream"]["split-legacy"]
    lcf = {"status": "running", "parameters": {}, "arrays": sorted(LCF_ARRAYS), "errors": [], "staging": staging,
           "reason": "replacing the LCF arrays with the staged ones (read back as written)"}
    enhancement = {"status": "running", "model": "indi-particles-synthetic", "source": "od", "path": ENHANCED_PATH,
                   "staging": staging, "reason": f"replacing {ENHANCED_PATH} with the staged enhancement"}
    _patch(node, methods={"lcf": lcf}, enhancement=enhancement, updated_at=time.time() - 30)
    finalized = finalize_interrupted_jobs(tiled_client, "phasestream", stale_after=60)
    assert not {("split-legacy", "methods.lcf"), ("split-legacy", "enhancement")} & set(finalized)
    assert node.refresh().metadata["methods"]["lcf"] == lcf and node.metadata["enhancement"] == enhancement
    last = time.time() - 600
    reason = f"interrupted: no heartbeat since {_utc(last)} (the job's process stopped)"
    # one record at a time: a finalization touches the result's updated_at, the other record's last sign of life
    _patch(node, enhancement={"status": "complete"}, updated_at=last)
    assert ("split-legacy", "methods.lcf") in finalize_interrupted_jobs(tiled_client, "phasestream", stale_after=60)
    assert dict(node.refresh().metadata["methods"]["lcf"]) == {**lcf, "status": "failed", "reason": reason,
                                                               "unverified_arrays": ["fit_error", "fractions_lcf",
                                                                                     "reduced_chi2"]}
    _patch(node, enhancement=enhancement, updated_at=last)
    assert ("split-legacy", "enhancement") in finalize_interrupted_jobs(tiled_client, "phasestream", stale_after=60)
    assert dict(node.refresh().metadata["enhancement"]) == {**enhancement, "status": "failed", "reason": reason,
                                                            "unverified_arrays": [ENHANCED_PATH]}
    for path in ("fit_error", "../fit_error", f"{ENHANCED_PATH}/../../1/2"):
        _patch(node, enhancement={**enhancement, "path": path}, updated_at=last)
        finalize_interrupted_jobs(tiled_client, "phasestream", stale_after=60)
        assert node.refresh().metadata["enhancement"]["unverified_arrays"] == [], path


def test_a_split_job_is_refused_by_a_live_record_and_finalizes_a_stale_one(tiled_server, tiled_client, caplog):
    """Records of split jobs on another host: only the heartbeat's age tells. A live one refuses the next split
    job of its kind on the result (``skipped``, naming it; nothing written); a stale one is finalized by it,
    which then runs (here on a result without OD images: both end before any Dask task)."""
    staging = _split_result(tiled_client, "split-rerun")
    node = tiled_client["phasestream"]["split-rerun"]
    now = time.time()
    who = {"host": "beamline-gpu-7", "pid": 4242, "started_at": now - 50, "heartbeat_at": now - 2,
           "heartbeat_seconds": 15.0}
    lcf = {"status": "running", "arrays": sorted(LCF_ARRAYS), "staging": staging, **who}
    enhancement = {"status": "running", "model": "indi-particles-synthetic", "path": ENHANCED_PATH,
                   "staging": staging, **who}
    _patch(node, methods={"lcf": lcf}, enhancement=enhancement)
    options = {"address": NOWHERE, "timeout": 0.5}
    refused = [submit_split_lcf(None, tiled_server.uri, "split-rerun", parts=2, retries=0),
               submit_split_enhance(None, tiled_server.uri, "split-rerun", options, parts=2, retries=0)]
    for job, record in zip(("split LCF", "split enhancement"), refused, strict=True):
        assert record["status"] == "skipped", record
        assert re.match(rf"a {job} of result phasestream/split-rerun is already running: host beamline-gpu-7, "
                        r"pid 4242, started .*, last heartbeat \d+ s ago", record["reason"]), record
    assert refused[1]["retry"] == "phasestream reprocess --enhance --split 2 split-rerun"
    md = node.refresh().metadata
    assert md["methods"]["lcf"] == lcf and md["enhancement"] == enhancement  # refused: nothing written
    assert not {("split-rerun", "methods.lcf"), ("split-rerun", "enhancement")} & set(
        finalize_interrupted_jobs(tiled_client, "phasestream", stale_after=60))  # fresh: left running
    # the same records, their heartbeat 10 minutes old: the next split jobs finalize them and run
    last = now - 600
    _patch(node, methods={"lcf": {**lcf, "heartbeat_at": last}}, enhancement={**enhancement, "heartbeat_at": last})
    with caplog.at_level(logging.WARNING, logger="phasestream.jobs.heartbeat"):
        record = submit_split_lcf(None, tiled_server.uri, "split-rerun", parts=2, retries=0)
        enhanced = submit_split_enhance(None, tiled_server.uri, "split-rerun", options, parts=2, retries=0)
    finalized = [r.getMessage() for r in caplog.records if r.name == "phasestream.jobs.heartbeat"]
    reason = f"interrupted: no heartbeat since {_utc(last)} (the job's process stopped)"
    assert len(finalized) == 2 and all(m.endswith(reason) for m in finalized), finalized
    assert "methods.lcf record of a job on beamline-gpu-7 (pid 4242)" in finalized[0]
    assert "enhancement record of a job on beamline-gpu-7 (pid 4242)" in finalized[1]
    assert record["status"] == "failed" and "has 0 OD planes" in record["errors"][0], record
    assert enhanced["status"] == "skipped" and "no OD image" in enhanced["reason"], enhanced
    md = node.refresh().metadata
    assert md["methods"]["lcf"]["status"] == "failed" and md["enhancement"]["status"] == "skipped"
    # the LCF arrays the interrupted one left, which no complete record describes: removed by the next one
    assert not set(LCF_ARRAYS) & set(node)


def test_the_heartbeat_of_a_record_inside_a_map_touches_it_alone(tiled_client):
    """``methods.lcf``: the heartbeat advances that record's ``heartbeat_at``, the other methods' records stay as
    they are, and it stops once the record is no longer this job's ``running`` one."""
    writer = ResultWriter(tiled_client, "nested-beat", shape=(4, 4), phases=["a", "b"], n_energies=2)
    node = tiled_client["phasestream"]["nested-beat"]
    beat = JobHeartbeat(tiled_client, writer.path, "methods.lcf", every=0.05)
    running = beat.running(status="complete", staging="_staging-00000000000000bb")
    assert running["status"] == "running" and running["pid"] == os.getpid() and running["heartbeat_seconds"] == 0.05
    normalize = {"status": "skipped", "parameters": {}, "arrays": [], "errors": [], "reason": "no pre-edge"}
    writer.update_metadata(methods={"normalize": normalize, "lcf": running})

    def lcf():
        return node.refresh().metadata["methods"]["lcf"]

    with beat:
        beaten = _wait_for(lambda: (r := lcf())["heartbeat_at"] > running["heartbeat_at"] and r, 10, "a heartbeat")
        done = {"status": "complete", "staging": running["staging"]}
        with beat.paused():
            writer.update_metadata(methods={"normalize": normalize, "lcf": done})
        time.sleep(0.3)  # several of its beats
        assert lcf() == done  # not its running record: no heartbeat written into it
    assert dict(beaten) == {**running, "heartbeat_at": beaten["heartbeat_at"]}
    assert node.metadata["methods"]["normalize"] == normalize


def test_of_two_refinements_begun_at_the_same_moment_one_runs(tiled_client, monkeypatch):
    """Both passed the running-record check before either wrote its record (Tiled has no lock): both ran, each
    replacing the other's arrays. Each now reads its ``running`` record back before it changes anything else: the
    one whose record stands runs, the other is refused (JobRunningError), having written nothing else."""
    import threading

    from phasestream.jobs import keeping

    uid = _scan(tiled_client, seed=21, shape=(32, 32))
    together = threading.Barrier(2, timeout=30)
    real = keeping.ensure_not_running

    def checked_together(*args, **kwargs):
        found = real(*args, **kwargs)
        together.wait()  # both have found no running record; now both write theirs
        return found

    monkeypatch.setattr(keeping, "ensure_not_running", checked_together)
    outcomes: list = [None, None]

    def refinement(i: int) -> None:
        try:
            outcomes[i] = refine_result(tiled_client, uid, SPATIAL)
        except JobRunningError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=refinement, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    refused = [o for o in outcomes if isinstance(o, JobRunningError)]
    ran = [o for o in outcomes if isinstance(o, dict)]
    assert len(refused) == 1 and len(ran) == 1, outcomes
    assert "began at the same moment" in str(refused[0])
    assert ran[0]["status"] == "complete", ran[0]
    node = tiled_client["phasestream"][uid]
    assert node.metadata["refinement"]["array_sha256"] == ran[0]["array_sha256"]
    digests = {name: hashlib.sha256(node[name].read().tobytes()).hexdigest() for name in ran[0]["array_sha256"]}
    assert digests == ran[0]["array_sha256"]


def test_the_next_enhancement_removes_the_array_an_interrupted_one_left(tiled_client):
    """An interrupted split enhancement's record names the array it left (``unverified_arrays``); the next
    enhancement wrote its own record over that one, of another path or not run at all, and the array stayed with
    nothing naming it. The next enhancement removes it first; the LCF arrays beside it stay."""
    from phasestream.jobs.enhance import EnhanceOptions, enhance_result

    _split_result(tiled_client, "split-orphan")
    node = tiled_client["phasestream"]["split-orphan"]
    lcf_before = _arrays(node, LCF_ARRAYS)
    now = time.time()
    _patch(node, enhancement={"status": "running", "model": "indi-particles-synthetic", "source": "od",
                              "path": ENHANCED_PATH, "staging": "_staging-00000000000000bb", "host": "beamline-gpu-7",
                              "pid": 4242, "started_at": now - 900, "heartbeat_at": now - 600,
                              "heartbeat_seconds": 15.0})
    assert ("split-orphan", "enhancement") in finalize_interrupted_jobs(tiled_client, "phasestream", stale_after=60)
    assert node.refresh().metadata["enhancement"]["unverified_arrays"] == [ENHANCED_PATH]
    record = enhance_result(tiled_client, "split-orphan", EnhanceOptions(address=NOWHERE, timeout=0.5, retries=0))
    assert record["status"] == "skipped", record  # no model server: the new enhancement did not run
    node = tiled_client["phasestream"]["split-orphan"]
    assert ENHANCED_PATH not in _arrays(node, [ENHANCED_PATH]) and _arrays(node, LCF_ARRAYS) == lcf_before


def test_a_final_record_another_update_took_back_is_written_again(tiled_client, monkeypatch):
    """Tiled applies a metadata patch by reading the node's metadata and writing it whole. A process that read the
    ``running`` record before the job's final record went in and wrote after it took that record back: the record
    said ``running`` with no heartbeat, and the next run of the job recorded the completed refinement as
    interrupted. The job now reads its final record back and writes it again."""
    uid = _scan(tiled_client, seed=61)
    update = ResultWriter.update_metadata
    taken_back = []

    def raced(self, **fields):
        if (fields.get("refinement") or {}).get("status") != "complete" or taken_back:
            return update(self, **fields)
        node = tiled_client["phasestream"][uid]
        stale = dict(node.metadata)  # another process reads the metadata ...
        update(self, **fields)
        node.replace_metadata(stale)  # ... and writes it whole after the job's final record
        taken_back.append(stale["refinement"]["status"])

    monkeypatch.setattr(ResultWriter, "update_metadata", raced)
    record = refine_result(tiled_client, uid, SPATIAL)
    monkeypatch.undo()
    held = tiled_client["phasestream"][uid].metadata["refinement"]
    assert taken_back == ["running"]
    assert record["status"] == "complete" and held["status"] == "complete", held
    assert held == record
    # the next run finds a complete record to keep, not a running one to call interrupted
    again = refine_result(tiled_client, uid, SPATIAL)
    assert again["status"] == "complete" and "interrupted" not in str(again)


def test_models_and_enhancements_another_job_added_meanwhile_stay(tiled_client, monkeypatch):
    """A refinement wrote the result's whole ``models`` map from the copy it read when it began: a model another
    job (an enhancement, a denoising) added while it worked was taken back. Now a job sets and removes its own
    entries alone."""
    uid = _scan(tiled_client, seed=62)
    node = tiled_client["phasestream"][uid]
    other = {"version": "2.0.0", "sha256": "ab" * 32}
    enhancement = {"status": "complete", "model": "indi-x", "path": "enhanced/indi-x/2.0.0/3"}
    real_read_back = refine.read_back

    def meanwhile(writer, arrays, *args, **kwargs):  # while the refinement works, another job records its model
        models = dict(node.refresh().metadata.get("models") or {})
        node.patch_metadata(metadata_patch=[{"op": "add", "path": "/models", "value": {**models, "indi-x": other}},
                                            {"op": "add", "path": "/enhancements",
                                             "value": {"indi-x/2.0.0/3": enhancement}}])
        return real_read_back(writer, arrays, *args, **kwargs)

    monkeypatch.setattr(refine, "read_back", meanwhile)
    assert refine_result(tiled_client, uid, SPATIAL)["status"] == "complete"
    monkeypatch.undo()
    md = node.refresh().metadata
    assert md["models"]["indi-x"] == other and md["enhancements"] == {"indi-x/2.0.0/3": enhancement}
    # a refinement run again clears its own earlier entries, never the other job's
    assert refine_result(tiled_client, uid, SPATIAL)["status"] == "complete"
    md = node.refresh().metadata
    assert md["models"]["indi-x"] == other and md["refinement"]["status"] == "complete"
