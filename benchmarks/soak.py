"""Soak test of the live path: many simulated scans through the whole topology, printed as JSON.

Topology as in production (and as in ``phasestream demo``)::

    RunEngine (this process, ophyd sim devices) --DocumentPublisher--> 0MQ proxy (subprocess)
        --> ``phasestream serve`` worker (subprocess, numba, no refinement) --> Tiled
    RunEngine --TiledWriter (batch_size=1)--> Tiled (raw runs)

Tiled runs in its own process (``--tiled process``, default: ``phasestream up --only tiled``,
generated SQLite catalog, as ``phasestream up`` deploys it) or embedded in this process (``--tiled
embedded``). Embedded, it is the bottleneck: TiledWriter (batch_size=1) waits ~0.2-0.5 s per
event on the server, and in process that server shares the GIL with the RunEngine (12 runs on 2
shared cores: 6.1 runs/min embedded, 8.9 in its own process). The live OD cube is written as in
the deployed configuration (``--od store``: external zarr that the worker writes and Tiled
reads). ``--samples`` simulated fields (different seeds, states of charge cycling through the
demo's) are made once; each run is a new RunEngine run with its own uid over one of them, with
fresh counting noise. One warm-up run (numba JIT, Tiled containers) is not counted.

Reported:

* ``documents_lost``: documents the worker's receiver saw missing (sequence gaps, ``lost`` and
  ``missed_at_join``), plus documents sent that it never received (a loss at the end of the
  stream leaves no gap), plus one for each run that has no result in Tiled at the end;
* ``wrong_statuses``: results whose status is not ``complete``, whose ``n_energies_seen`` is
  not the number of energies, or whose phase map agrees with the simulator's truth on fewer than
  90 % of the particle pixels away from domain boundaries (``SimulatedSample.accuracy``);
* the worker's resident memory (``psutil``, the ``serve`` process and its children) after run 10
  and after the last run, and every 10 runs (the Tiled server's process too);
* latency per run: the stop document leaving the publisher -> the result reading ``status:
  complete`` in Tiled (its metadata polled every ``--poll`` s), median and p95;
* wall time of the counted runs and runs per minute.

Nothing is asserted. Usage: ``python benchmarks/soak.py [--runs 200] [--size 256] [--energies 13]
[--seed 0] [--samples 5] [--tiled process|embedded] [--od store|upload|off]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from bluesky import RunEngine

from phasestream.app.demo import DEMO_STATES
from phasestream.app.live import ServeProcess
from phasestream.app.stack import StackConfig, down, read_env, status, up
from phasestream.contract import FINAL_STATUSES
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import connect, raw_run_writer, start_embedded_tiled
from phasestream.transport.proxy import start_proxy
from phasestream.transport.wire import DocumentPublisher

ROOT = "phasestream"
MIN_ACCURACY = 0.9  # fraction of particle pixels (boundaries excluded) whose phase matches the truth
DOSE = 5000.0  # open-beam counts per pixel, the demo's default


class StopClock:
    """RunEngine callback: publish every document, and note when each run's stop document has left."""

    def __init__(self, publisher: DocumentPublisher):
        self.publisher = publisher
        self.stop_sent: dict[str, float] = {}  # run uid -> perf_counter() after the stop was published

    def __call__(self, name: str, doc: dict) -> None:
        self.publisher(name, doc)
        if name == "stop":
            self.stop_sent[doc["run_start"]] = time.perf_counter()


def tree_rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` and all its descendants, MB."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 1e6


def wait_final(client, uid: str, *, timeout: float, poll: float):
    """The result node of ``uid`` and perf_counter() when its status was first seen final (None, None on timeout).

    One request per poll: the node is looked up by its full path until it exists, then refreshed.
    """
    end = time.perf_counter() + timeout
    node = None
    while time.perf_counter() < end:
        if node is None:
            with contextlib.suppress(KeyError):
                node = client[ROOT, uid]
        else:
            node.refresh()
        if node is not None and node.metadata.get("status") in FINAL_STATUSES:
            return node, time.perf_counter()
        time.sleep(poll)
    return None, None


def judge(node, sample, n_energies: int) -> tuple[list[str], float]:
    """Why a final result is wrong (empty when right), and the phase map's accuracy against the truth."""
    md = node.metadata
    reasons = []
    if md.get("status") != "complete":
        reasons.append(f"status {md.get('status')!r}, errors {list(md.get('errors') or [])[:3]}")
    if md.get("n_energies_seen") != n_energies:
        reasons.append(f"n_energies_seen {md.get('n_energies_seen')} != {n_energies}")
    accuracy = sample.accuracy(node["phase"].read())
    if not accuracy >= MIN_ACCURACY:
        reasons.append(f"accuracy {accuracy:.3f} < {MIN_ACCURACY}")
    return reasons, accuracy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tiled_server(kind: str, od_store: str | None):
    """``(client, uri with ?api_key=, pid of the server's process)`` of an embedded server or of one in
    its own process."""
    if kind == "embedded":
        server = start_embedded_tiled(readable_storage=[od_store] if od_store else None)
        try:
            yield connect(server.uri), server.uri, os.getpid()
        finally:
            server.close()
        return
    with tempfile.TemporaryDirectory(prefix="phasestream-soak-") as folder:
        run_dir = Path(folder)
        env = {"PHASESTREAM_OD_STORE": od_store} if od_store else {}
        up(StackConfig(run_dir=run_dir, components=("tiled",), tiled_port=_free_port(), env=env))
        try:
            stack_env = read_env(run_dir)
            uri, key = stack_env["TILED_URI"], stack_env["TILED_API_KEY"]
            yield connect(uri, api_key=key), f"{uri}?api_key={key}", status(run_dir)["tiled"]["pid"]
        finally:
            down(run_dir)


def _mb(series: dict[int, float]) -> dict[str, float]:
    return {str(k): round(v, 1) for k, v in sorted(series.items())}


def summarize(records: list[dict], present: set[str], stats: dict, sent: int, rss: dict[int, float],
              tiled_rss: dict[int, float], wall: float) -> dict:
    """The report's numbers from the per-run records, the results present in Tiled at the end, the worker's
    receiver statistics, the documents sent, the RSS series (run -> MB) and the wall time of the runs."""
    runs = len(records)
    missing = [r["uid"] for r in records if r["uid"] not in present]
    wrong = [r for r in records if r["uid"] in present and r["reasons"]]
    latencies = np.array([r["stop_to_final_s"] for r in records
                          if r.get("status") == "complete" and "stop_to_final_s" in r])
    worker_latency = np.array([r["worker_last_image_to_result_s"] for r in records
                               if isinstance(r.get("worker_last_image_to_result_s"), int | float)])
    accuracies = np.array([r["accuracy"] for r in records if "accuracy" in r])
    gaps = int(stats.get("lost") or 0) + int(stats.get("missed_at_join") or 0)
    unreceived = max(0, sent - int(stats.get("received") or 0))
    first = min(10, runs)
    if first not in rss and rss:  # stopped early: the first sample taken
        first = min(rss)
    rss_first, rss_last = rss.get(first), rss.get(runs)
    statuses = sorted({str(r.get("status")) for r in records})
    return {
        "runs": runs,
        "documents_lost": gaps + unreceived + len(missing),
        "documents_lost_detail": {"receiver_gaps": gaps, "sent_not_received": unreceived,
                                  "runs_without_result": len(missing), "sent": sent},
        "wrong_statuses": len(wrong),
        "wrong": [{"run": r["run"], "uid": r["uid"], "reasons": r["reasons"]} for r in wrong[:20]],
        "statuses": {s: sum(str(r.get("status")) == s for r in records) for s in statuses},
        "accuracy": {"min": float(accuracies.min()), "median": float(np.median(accuracies))}
        if accuracies.size else None,
        "worker_rss_mb": {"run": first, "at_run": rss_first, "last_run": runs, "at_last": rss_last,
                          "growth": None if rss_first is None or rss_last is None else rss_last - rss_first,
                          "every_10_runs": _mb(rss)},
        "tiled_rss_mb": {"every_10_runs": _mb(tiled_rss)},
        "latency_stop_to_complete_s": {"median": float(np.median(latencies)),
                                       "p95": float(np.percentile(latencies, 95)),
                                       "max": float(latencies.max()), "n": int(latencies.size)}
        if latencies.size else None,
        "worker_last_image_to_result_s_median": float(np.median(worker_latency)) if worker_latency.size else None,
        "plan_s_median": float(np.median([r["plan_s"] for r in records])) if records else None,
        "wall_s": wall,
        "runs_per_min": 60.0 * runs / wall if wall > 0 else None,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "worker_stats": {k: stats.get(k) for k in ("received", "lost", "missed_at_join", "out_of_order",
                                                   "undecodable", "oversize", "callback_errors")},
    }


def soak(args: argparse.Namespace) -> dict:
    """Start the topology, make one warm-up run and ``args.runs`` counted runs; the report."""
    refs = load_references("nvpf-synthetic")
    energies = select_energies(refs, args.energies - 1)  # discriminating energies + 1 pre-edge
    samples = []
    for i in range(args.samples):
        sample = make_sample((args.size, args.size), state_of_charge=DEMO_STATES[i % len(DEMO_STATES)],
                             references=refs, n_particles=3, seed=args.seed + i)
        energy = make_energy()
        det = TransmissionDetector(sample, energy, name="det", i0=DOSE, seed=args.seed + 100 + i)
        samples.append((sample, energy, det))

    report: dict = {
        "benchmark": "soak",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "image": [args.size, args.size], "energies": len(energies), "samples": args.samples,
        "dose_counts_per_px": DOSE, "backend": "numba", "refinement": "off (serve --no-refine)",
        "tiled": {"embedded": "embedded server in the benchmark process (SQLite catalog, DuckDB tables)",
                  "process": "separate process, SQLite catalog (phasestream up --only tiled)"}[args.tiled],
        "od": args.od, "poll_s": args.poll,
    }
    store = tempfile.TemporaryDirectory(prefix="phasestream-od-") if args.od == "store" else None
    records: list[dict] = []
    rss_series: dict[int, float] = {}  # run -> worker RSS, MB
    tiled_rss: dict[int, float] = {}  # run -> RSS of the Tiled server's process, MB
    stats: dict = {}
    with contextlib.ExitStack() as stack:
        if store is not None:
            stack.callback(store.cleanup)
        client, uri, tiled_pid = stack.enter_context(tiled_server(args.tiled, store.name if store else None))
        proxy = stack.enter_context(start_proxy())
        worker = ServeProcess(proxy.out_address, uri, args=(
            "--backend", "numba", "--no-refine",
            *(("--no-od",) if args.od == "off" else ()), *(("--od-store", store.name) if store else ()),
        )).start()
        publisher = stack.enter_context(DocumentPublisher(proxy.in_address))
        try:
            if not publisher.wait_for_subscriber(10):
                raise RuntimeError("the 0MQ proxy did not subscribe to the publisher")
            clock = StopClock(publisher)
            RE = RunEngine({})
            RE.subscribe(raw_run_writer(client))
            RE.subscribe(clock)

            def one_run(i: int) -> dict:
                sample, energy, det = samples[i % len(samples)]
                t0 = time.perf_counter()
                (uid,) = RE(energy_stack_scan([det], energy, energies, sample=sample, i0_key=det.i0_key))
                plan_s = time.perf_counter() - t0
                node, seen = wait_final(client, uid, timeout=args.timeout, poll=args.poll)
                record = {"run": i, "uid": uid, "sample": i % len(samples), "plan_s": plan_s, "reasons": []}
                if node is None:
                    record["reasons"] = [f"no final result within {args.timeout:.0f} s"]
                    return record
                record["stop_to_final_s"] = seen - clock.stop_sent[uid]
                record["status"] = node.metadata.get("status")
                record["worker_last_image_to_result_s"] = (node.metadata.get("timings") or {}).get(
                    "last_image_to_result_s")
                record["reasons"], record["accuracy"] = judge(node, sample, len(energies))
                return record

            warmup = one_run(0)  # numba JIT, Tiled containers: not counted
            report["warmup"] = {k: warmup.get(k) for k in ("status", "stop_to_final_s", "plan_s", "reasons")}
            t_start = time.perf_counter()
            for i in range(args.runs):
                records.append(one_run(i))
                n = i + 1
                if n % 10 == 0 or n == args.runs:
                    rss_series[n] = tree_rss_mb(worker.proc.pid)
                    tiled_rss[n] = tree_rss_mb(tiled_pid)
                if worker.proc.poll() is not None:
                    report["worker_exited"] = {"after_run": n, "returncode": worker.proc.returncode}
                    break
            wall = time.perf_counter() - t_start
        finally:
            sent = publisher.stats["sent"]
            publisher.close()
            stats = worker.stop()
        # the final account, read from Tiled once the worker has finished every run it had
        present = set(client[ROOT].keys()) if ROOT in client else set()
        for record in records:
            if "status" not in record and record["uid"] in present:  # late: judge what it became
                node = client[ROOT, record["uid"]]
                record["status"] = node.metadata.get("status")
                record["reasons"] += judge(node, samples[record["sample"]][0], len(energies))[0]

    report.update(summarize(records, present, stats, sent, rss_series, tiled_rss, wall))
    report["tiled_rss_mb"]["process"] = ("this benchmark process (RunEngine, TiledWriter and the server)"
                                         if args.tiled == "embedded" else "the Tiled server process")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (square)")
    parser.add_argument("--energies", type=int, default=13, help="energies per run, pre-edge included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=5, help="simulated fields made once and scanned in turn")
    parser.add_argument("--tiled", choices=("process", "embedded"), default="process",
                        help="Tiled in its own process (phasestream up --only tiled, default) or embedded in this "
                             "one, where it shares the GIL with the RunEngine and TiledWriter")
    parser.add_argument("--od", choices=("store", "upload", "off"), default="store",
                        help="the live OD cube: external zarr (serve --od-store, default), uploaded, or not written")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between polls of the result metadata")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a run's final result")
    args = parser.parse_args()
    if args.runs < 1 or args.samples < 1 or args.energies < 3 or args.size < 32:
        parser.error("need --runs >= 1, --samples >= 1, --energies >= 3 and --size >= 32")
    print(json.dumps(soak(args), indent=2))


if __name__ == "__main__":
    main()
