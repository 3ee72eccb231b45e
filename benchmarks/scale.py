"""Post-scan reprocessing throughput on Dask distributed versus in process, printed as JSON.

A Tiled server runs in its own process (``phasestream up --only tiled``: generated SQLite
catalog, API key); ``--runs`` simulated STXM scans are written into it as raw runs by TiledWriter;
then every run is reprocessed (PCC maps recomputed from the raw run, results written back):

* ``in_process``: :func:`phasestream.jobs.executors.run_jobs`, one run after the other here;
* ``dask_1_worker``, ``dask_2_workers``: :func:`submit_jobs` on a ``LocalCluster`` with 1 and 2
  worker processes (one thread each; numba threads = cores / workers). Cluster start-up and one
  warm-up run per worker (imports, numba cache load) are timed separately, not in the throughput;
* ``dask_overhead_per_run_s``: (1-worker Dask time - in-process time) / runs: what going through
  the scheduler costs per run (task submission, result transfer; the worker's own Tiled
  connection), and ``empty_task_roundtrip_s``: submit + gather of a no-op task.

Everything shares the machine's cores (Tiled server, benchmark process, workers), as on a single
beamline host. Usage: ``python benchmarks/scale.py [--runs 12] [--size 192] [--energies 13]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from bluesky import RunEngine

from phasestream.app.stack import StackConfig, down, read_env, up
from phasestream.jobs.cluster import dask_client
from phasestream.jobs.executors import Job, run_jobs, submit_jobs
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import connect, raw_run_writer


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_runs(client, n: int, size: int, n_energies: int) -> list[str]:
    energies = select_energies(load_references("nvpf-synthetic"), n_energies - 1)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client, batch_size=100))
    uids = []
    for i in range(n):
        sample = make_sample((size, size), state_of_charge=(3.0, 2.4, 2.0, 1.0)[i % 4], seed=i, n_particles=3)
        energy = make_energy()
        det = TransmissionDetector(sample, energy, mode="stxm", i0=5000.0, seed=i)
        (uid,) = RE(energy_stack_scan([det], energy, energies, sample=sample, mode="stxm", i0_key=det.i0_key))
        uids.append(uid)
    return uids


def _noop() -> int:
    return 0


def dask_case(uids: list[str], warmup: list[str], uri: str, key: str, workers: int, backend: str) -> dict:
    options = {"backend": backend, "replace": True}  # the same runs again at each worker count
    t0 = time.perf_counter()
    with dask_client(n_workers=workers) as client:
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        submit_jobs(client, [Job(u, (("reprocess", options),)) for u in warmup[:workers]], uri,
                    api_key=key, progress=False)
        warm = time.perf_counter() - t1
        t2 = time.perf_counter()
        for _ in range(20):
            client.submit(_noop, pure=False).result()
        roundtrip = (time.perf_counter() - t2) / 20
        report = submit_jobs(client, [Job(u, (("reprocess", options),)) for u in uids], uri,
                             api_key=key, progress=False)
    assert report.ok, report.failures
    return {"workers": workers, "seconds": report.seconds, "runs_per_min": 60 * len(uids) / report.seconds,
            "cluster_start_s": startup, "warmup_s": warm, "empty_task_roundtrip_s": roundtrip}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--size", type=int, default=192, help="image size in pixels (square)")
    parser.add_argument("--energies", type=int, default=13)
    parser.add_argument("--backend", default="numba")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="phasestream-scale-"))
    cfg = StackConfig(run_dir=run_dir, components=("tiled",), tiled_port=_free_port()).validate()
    up(cfg)
    try:
        env = read_env(run_dir)
        uri, key = env["TILED_URI"], env["TILED_API_KEY"]
        client = connect(uri, api_key=key)
        t0 = time.perf_counter()
        uids = write_runs(client, args.runs, args.size, args.energies)
        warmup = write_runs(client, 2, args.size, args.energies)
        write_s = time.perf_counter() - t0
        jobs = [Job(u, (("reprocess", {"backend": args.backend, "replace": True}),)) for u in uids]
        run_jobs(jobs[:1], uri, api_key=key)  # warm-up: imports, numba cache
        local = run_jobs(jobs, uri, api_key=key)
        assert local.ok, local.failures
        in_process = {"seconds": local.seconds, "runs_per_min": 60 * len(uids) / local.seconds,
                      "per_run_s": local.seconds / len(uids)}
        one = dask_case(uids, warmup, uri, key, 1, args.backend)
        two = dask_case(uids, warmup, uri, key, 2, args.backend)
    finally:
        down(run_dir)
    print(json.dumps({
        "benchmark": "scale",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": args.runs, "image": [args.size, args.size], "energies": args.energies, "backend": args.backend,
        "tiled": "separate process, SQLite catalog (phasestream up --only tiled)",
        "write_raw_runs_s": write_s,
        "in_process": in_process,
        "dask_1_worker": one,
        "dask_2_workers": two,
        "speedup_2_vs_1_workers": one["seconds"] / two["seconds"],
        "dask_overhead_per_run_s": (one["seconds"] - local.seconds) / len(uids),
    }, indent=2))


if __name__ == "__main__":
    main()
