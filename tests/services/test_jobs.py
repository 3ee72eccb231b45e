"""Post-scan jobs on Dask distributed: same results as in-process, failed runs reported, the others complete."""

from __future__ import annotations

import json
import pathlib

import dask
import numpy as np
import pytest
from bluesky import RunEngine
from distributed import get_task_stream

from phasestream.jobs.cluster import dask_client
from phasestream.jobs.executors import JOBS, Job, JobContext, run_job, run_jobs, submit_jobs
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import raw_run_writer

ENERGIES = select_energies(load_references("nvpf-synthetic"), 5)
ARRAYS = ("od", "pcc", "phase", "reliability", "ambiguous", "mask")


def write_raw_runs(client, states, *, shape=(32, 32)) -> list[str]:
    """Simulated STXM scans stored as raw runs by TiledWriter; their uids."""
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    uids = []
    for i, soc in enumerate(states):
        sample = make_sample(shape, state_of_charge=soc, seed=10 + i, n_particles=2)
        energy = make_energy()
        det = TransmissionDetector(sample, energy, mode="stxm", i0=5000.0, seed=i)
        (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, mode="stxm", i0_key=det.i0_key))
        uids.append(uid)
    return uids


def corrupt_raw_images(server_directory, uid: str) -> None:
    """Overwrite the stored image chunks of a raw run: reading them back fails on the server."""
    chunks = [p for p in pathlib.Path(server_directory, "data", uid).rglob("*")
              if p.is_file() and "det_img" in p.parts and p.name != "zarr.json"]
    assert chunks, f"no image chunks of {uid} under {server_directory}"
    for path in chunks:
        path.write_bytes(b"corrupted")


def results(client, uids) -> dict[str, dict[str, np.ndarray]]:
    return {uid: {k: client["phasestream"][uid][k].read() for k in ARRAYS} for uid in uids}


@pytest.fixture(autouse=True)
def fail_fast(monkeypatch):
    """Tiled's client retries a server error for up to 45 s: a few attempts within 3 s are enough
    for a corrupted run.

    Not a single attempt: the embedded server keeps event tables in DuckDB behind one shared
    connection, and two Dask workers reading tables at the same moment can get a 500 ("closed
    pending query result") that the next attempt does not. Set in the environment too, for the
    Dask worker processes started by the test.
    """
    import tiled.client.utils

    monkeypatch.setenv("TILED_RETRY_ATTEMPTS", "5")
    monkeypatch.setenv("TILED_RETRY_TIMEOUT", "3")
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 5)
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 3.0)


@pytest.fixture(scope="module")
def runs(tiled_server, tiled_client):
    good = write_raw_runs(tiled_client, (3.0, 2.0, 1.0))
    (bad,) = write_raw_runs(tiled_client, (2.0,))
    corrupt_raw_images(tiled_server.directory, bad)
    return good, bad


def test_registry_has_the_post_scan_jobs():
    assert {"reprocess", "refine", "enhance"} <= set(JOBS)
    with pytest.raises(ValueError, match="unknown job"):
        Job("uid", (("no-such-job", {}),)).validate()


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_dask_equals_in_process_and_failures_are_reported(tiled_server, tiled_client, runs):
    good, bad = runs
    jobs = [Job(uid, (("reprocess", {"backend": "numba"}),)) for uid in [*good, bad]]
    local = run_jobs(jobs, tiled_server.uri)
    assert sorted(s["run_uid"] for s in local.successes) == sorted(good)
    assert [f["run_uid"] for f in local.failures] == [bad]
    reference = results(tiled_client, good)
    for uid in good:  # clear the results, so that Dask has to write them again
        tiled_client["phasestream"].delete_contents(uid, recursive=True, external_only=False)

    seen = []
    with dask_client(n_workers=2) as client, get_task_stream(client) as stream:
        assert len(client.scheduler_info()["workers"]) == 2
        report = submit_jobs(client, jobs, tiled_server.uri, retries=1, progress=False, on_done=seen.append)
    # the jobs' own Tiled reads (dask arrays) ran inside their tasks, not as tasks of the cluster
    assert {t["key"] for t in stream.data} and all(str(t["key"]).startswith("phasestream-") for t in stream.data)
    assert sorted(s["run_uid"] for s in report.successes) == sorted(good)
    assert all(s["status"] == "complete" for s in report.successes)
    (failure,) = report.failures
    assert failure["run_uid"] == bad and failure["status"] == "failed"
    # the same record either way: the server's refusal to read the corrupted images, named
    for reason in (failure["reason"], local.failures[0]["reason"]):
        assert reason.startswith("HTTPStatusError: Server error '500 Internal Server Error'"), reason
        assert f"/{bad}/primary/det_img" in reason, reason
    assert failure.keys() == local.failures[0].keys()
    assert len(seen) == len(jobs)
    distributed = results(tiled_client, good)
    for uid in good:
        for key in ARRAYS:
            np.testing.assert_array_equal(distributed[uid][key], reference[uid][key], err_msg=f"{uid} {key}")


def test_unknown_run_fails_without_stopping_the_others(tiled_server, runs):
    good, _ = runs
    jobs = [Job("no-such-run"), Job(good[0], (("reprocess", {"backend": "numpy", "replace": True}),))]
    with dask_client(n_workers=1) as client:
        # the workers' profiler, which can deadlock them on Python 3.11 < 3.11.9, is off
        assert set(client.run(lambda: dask.config.get("distributed.worker.profile.enabled")).values()) == {False}
        report = submit_jobs(client.scheduler.address, jobs, tiled_server.uri, retries=0, progress=False)
    assert [s["run_uid"] for s in report.successes] == [good[0]]
    assert report.failures[0]["run_uid"] == "no-such-run"
    assert report.failures[0]["reason"].startswith("KeyError: ") and "no-such-run" in report.failures[0]["reason"]


def test_api_key_travels_separately(tiled_server, runs):
    good, _ = runs
    uri, _, key = tiled_server.uri.partition("?api_key=")
    outcome = run_job(Job(good[1], (("reprocess", {"backend": "numpy", "replace": True}),)), JobContext(uri, key))
    assert outcome.status == "complete" and outcome.run_uid == good[1]
    assert outcome.details["steps"]["reprocess"]["run_uid"] == good[1]
    assert key not in repr(JobContext(uri, key))


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_a_later_step_that_raises_leaves_the_earlier_ones_reported(tiled_server, runs, monkeypatch):
    """A post-scan step raising (a bug) after a complete reprocess made the whole job one ``failed`` outcome:
    the live worker recorded the recovery as failed although the result was complete. The step that raised is
    failed with its error, the reprocess reported complete, and the steps after it still run."""
    good, _ = runs

    def broken(context, run_uid, options):
        raise RuntimeError("a bug in this step")

    monkeypatch.setitem(JOBS, "refine", broken)
    steps = (("reprocess", {"backend": "numpy", "replace": True}), ("refine", {}),
             ("methods", {"methods": ["lcf"]}))
    outcome = run_job(Job(good[2], steps), JobContext(tiled_server.uri))
    assert outcome.status == "failed", outcome
    done = outcome.details["steps"]
    assert done["reprocess"]["status"] == "complete"
    assert done["refine"]["status"] == "failed" and done["refine"]["reason"] == "internal error: RuntimeError: a bug " \
                                                                                "in this step"
    # the step after it ran (these runs' 5 energies are too few for an LCF with offset: its own reason)
    assert done["methods"]["reason"] == "lcf: ValueError: 6 free parameters need more than 6 energies", done
    assert "refine failed: internal error: RuntimeError" in outcome.reason
    with pytest.raises(RuntimeError, match="a bug in this step"):  # nothing done yet: raised, for a retry
        run_job(Job(good[2], (("refine", {}),)), JobContext(tiled_server.uri))


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_reprocess_command_by_state_of_charge_on_dask(tiled_server, runs, capsys):
    from phasestream.app.cli import main

    good, bad = runs  # states 3.0, 2.0, 1.0; the corrupted run is at 2.0 too
    code = main(["reprocess", "--tiled", tiled_server.uri, "--soc", "2.0", "--workers", "2", "--retries", "0",
                 "--backend", "numpy", "--json", "--replace"])
    out, err = capsys.readouterr()
    assert code == 1  # one run failed
    summary = json.loads(out[out.index("{"):])
    assert [s["run_uid"] for s in summary["successes"]] == [good[1]]
    assert [f["run_uid"] for f in summary["failures"]] == [bad]
    assert f"{bad}: failed" in err


def test_reprocess_command_in_process_and_query(tiled_server, runs, capsys):
    from phasestream.app.cli import main

    good, _ = runs
    code = main(["reprocess", "--tiled", tiled_server.uri, "--query", "sample.state_of_charge=3.0", "--in-process",
                 "--backend", "numpy", "--replace"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{good[0]}: complete" in out and "1 of 1 runs complete, 0 skipped, 0 failed" in out


def test_query_and_reprocess_use_the_stack_configuration(tiled_server, runs, capsys, monkeypatch, tmp_path):
    """With only the stack's env file sourced (TILED_URI, TILED_API_KEY, PHASESTREAM_DASK_SCHEDULER), no flags."""
    from phasestream.app.cli import main

    good, _ = runs  # state of charge 3.0, 2.0, 1.0
    uri, _, key = tiled_server.uri.partition("?api_key=")
    monkeypatch.setenv("TILED_URI", uri)
    monkeypatch.setenv("TILED_API_KEY", key)
    monkeypatch.setenv("PHASESTREAM_DASK_SCHEDULER", "none")  # in this process
    assert main(["reprocess", "--soc", "1.0", "--backend", "numpy", "--replace", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])  # after the per-run lines
    assert [s["run_uid"] for s in summary["successes"]] == [good[2]] and not summary["failures"]
    assert main(["query", "--soc", "1.0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_uid"] for r in rows] == [good[2]]
    # --catalog DIR still means a catalog of its own: an embedded server, not TILED_URI
    assert main(["query", "--catalog", str(tmp_path / "catalog"), "--soc", "1.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_reprocess_of_several_runs_stays_in_process_without_a_scheduler(tiled_server, runs, capsys, monkeypatch):
    """No --scheduler, no PHASESTREAM_DASK_SCHEDULER, no --workers: no LocalCluster, whatever the number of runs."""
    from phasestream.app.cli import main

    good, _ = runs
    monkeypatch.delenv("PHASESTREAM_DASK_SCHEDULER", raising=False)
    code = main(["reprocess", "--tiled", tiled_server.uri, good[0], good[2], "--backend", "numpy", "--replace"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 of 2 runs complete, 0 skipped, 0 failed" in out and out.rstrip().endswith("in process"), out
