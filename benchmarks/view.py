"""Latency of ``phasestream view``: a result update written to Tiled -> that update drawn in a browser.

The real topology on one machine: an embedded Tiled server (streaming cache in memory), a 0MQ proxy
subprocess, a ``phasestream serve`` worker subprocess, the view as its own process
(``phasestream view``, as ``phasestream up`` and the systemd unit run it; ``--view-in-process``: a
``ViewServer`` thread of this process, sharing its interpreter with the embedded Tiled server) and
a headless Chromium (selenium, the system chromedriver). ``--scans`` simulated scans (``--size``
square, K = 5 references, ``--energies`` images each) are published one after the other at
``--rate`` frames/s, each while the page (opened on that run) shows it; the worker runs with its
defaults (one partial map per 20-image scan), so several scans give the statistics their samples.

* ``update_to_drawn_s``: for every map update (an update with maps) of the runs that the page drew, the time from the
  worker's metadata write (``updated_at``, stamped just before the write to Tiled) to the moment
  the page's phase image had loaded and decoded (the page's own timestamp,
  ``window.phasestreamLog``); median, p95, max and count. ``update_to_received_s``: the same up to
  the page receiving the update (server-sent event). Both on one clock (same machine).
* ``list_50_finished_s``: time from opening the page to the list showing ``--runs`` finished results
  (and the time of the ``/api/state`` request that carries them).

Usage: ``python benchmarks/view.py [--size 512] [--energies 20] [--rate 2] [--scans 4] [--runs 50]``. Needs
``/usr/bin/chromium``, chromedriver and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from bluesky import RunEngine

from phasestream.app.live import ServeProcess
from phasestream.app.view import ViewServer
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import wait_for_result
from phasestream.store.tiled import connect, public_uri, start_embedded_tiled
from phasestream.transport.proxy import start_proxy
from phasestream.transport.wire import DocumentPublisher

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from view_support import chromium, missing


def finished_results(client, n: int) -> None:
    """``n`` finished results (metadata and a phase map each), as the worker leaves them."""
    root = client["phasestream"] if "phasestream" in client else client.create_container("phasestream")
    phases = list(load_references("nvpf-synthetic").phases)
    for i in range(n):
        fr = np.random.default_rng(i).dirichlet(np.ones(len(phases)))
        node = root.create_container(f"bench-{i:03d}", metadata={
            "run_uid": f"bench-{i:03d}", "scan_id": i, "sample": {"name": f"P{i}"},
            "state_of_charge": round(3.0 - 0.04 * i, 2), "status": "complete", "n_energies_seen": 13,
            "references": {"name": "nvpf-synthetic", "phases": phases}, "errors": [],
            "phase_fractions": dict(zip(phases, fr.tolist(), strict=True)), "ambiguous_fraction": 0.01,
            "refined_fractions": {}, "updated_at": time.time() - 3600 + i}, specs=["PhaseMap"])
        node.write_array(np.zeros((8, 8), np.int16), key="phase")


@contextlib.contextmanager
def view_process(uri: str, api_key: str, log_path: str | None = None):
    """``phasestream view --port 0`` as its own process (the key in its environment); yields its URL.

    With ``log_path``, the view logs at debug level (``-vv``, timestamps to the millisecond) to that file.
    """
    verbose = ["-vv"] if log_path else []
    log_file = open(log_path, "w") if log_path else None  # closed below
    proc = subprocess.Popen([sys.executable, "-m", "phasestream.app.cli", *verbose, "view", "--tiled", uri,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=log_file, text=True,
                            env={**os.environ, "TILED_API_KEY": api_key})
    try:
        line = proc.stdout.readline()  # {"ready": true, "url": ...} once it serves
        if not line:
            raise RuntimeError(f"phasestream view exited ({proc.wait(10)}) before it served")
        yield json.loads(line)["url"].rstrip("/")
    finally:
        proc.terminate()
        proc.wait(30)
        if log_file is not None:
            log_file.close()


@contextlib.contextmanager
def view_thread(uri: str):
    with ViewServer(uri) as view:
        yield view.url


def scan_documents(size: int, n_energies: int, seed: int = 1):
    sample = make_sample((size, size), state_of_charge=2.0, seed=seed, n_particles=4)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=6000.0, seed=seed)
    docs: list[tuple[str, dict]] = []
    energies = select_energies(load_references("nvpf-synthetic"), n_energies - 1)
    RunEngine({})(energy_stack_scan([det], energy, energies, sample=sample, i0_key=det.i0_key),
                  lambda name, doc: docs.append((name, doc)))
    return docs


def run_scan(docs, publisher, client, driver, rate: float) -> tuple[dict, list[dict]]:
    """Publish one scan at ``rate`` images/s; its final result metadata and the page's latency log."""
    uid = docs[0][1]["uid"]
    start = time.perf_counter()
    i = 0
    for name, doc in docs:
        if name == "event":
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            i += 1
        publisher(name, doc)
    md = dict(wait_for_result(client, uid, timeout=300).metadata)
    deadline = time.monotonic() + 30
    log: list[dict] = []
    while time.monotonic() < deadline:
        log = driver.execute_script("return window.phasestreamLog")
        final = [e for e in log if e["uid"] == uid and e["status"] == md["status"]]
        if final and final[-1]["drawn"]:
            break
        time.sleep(0.1)
    return md, log


def stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    return {"median": round(float(np.median(a)), 4), "p95": round(float(np.percentile(a, 95)), 4),
            "max": round(float(a.max()), 4), "count": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--energies", type=int, default=20)
    parser.add_argument("--rate", type=float, default=2.0, help="frames per second")
    parser.add_argument("--scans", type=int, default=4, help="scans in a row (the samples add up)")
    parser.add_argument("--runs", type=int, default=50, help="finished results in the list")
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--partial-every", type=int, default=0,
                        help="partial maps every N images, unthinned (serve --update-every N --partial-budget none); "
                             "default 0: the worker's defaults")
    parser.add_argument("--view-in-process", action="store_true",
                        help="the view on a thread of this process (beside the embedded Tiled) instead of its own")
    parser.add_argument("--view-log", metavar="FILE",
                        help="the view process logs at debug level to FILE (where the time goes; slows it a little)")
    args = parser.parse_args()
    if missing():
        sys.exit(f"benchmarks/view.py: {missing()}")

    server = start_embedded_tiled()
    client = connect(server.uri)
    report: dict = {"benchmark": "view", "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                    "size": args.size, "energies": args.energies, "rate_fps": args.rate, "references": 5,
                    "scans": args.scans,
                    "view": "thread of the benchmark process" if args.view_in_process else "own process"}
    try:
        finished_results(client, args.runs)
        worker_args = ("--backend", args.backend, "--no-refine")
        if args.partial_every:
            worker_args += ("--update-every", str(args.partial_every), "--partial-budget", "none")
        report["worker_args"] = list(worker_args)
        entries: list[dict] = []
        statuses: list[str] = []
        partial_maps: list = []
        with start_proxy() as proxy, DocumentPublisher(proxy.in_address) as publisher, \
                ServeProcess(proxy.out_address, server.uri, args=worker_args), \
                (view_thread(server.uri) if args.view_in_process
                 else view_process(public_uri(server.uri), client.context.api_key, args.view_log)) as url, \
                chromium() as driver:
            assert publisher.wait_for_subscriber(10)
            t0 = time.perf_counter()
            httpx.get(f"{url}/api/state", timeout=30)
            report["api_state_s"] = round(time.perf_counter() - t0, 4)
            for scan in range(args.scans):
                docs = scan_documents(args.size, args.energies, seed=1 + scan)
                uid = docs[0][1]["uid"]
                t0 = time.perf_counter()
                driver.get(f"{url}/?scan={scan}#{uid}")  # a fresh page per scan (a new query: not a mere
                # fragment change), waiting for the run named in its URL
                while len(driver.find_elements("css selector", "#runs tr")) < args.runs + scan:
                    time.sleep(0.01)
                if scan == 0:
                    report[f"list_{args.runs}_finished_s"] = round(time.perf_counter() - t0, 3)
                md, log = run_scan(docs, publisher, client, driver, args.rate)
                statuses.append(md["status"])
                partial_maps.append((md.get("timings") or {}).get("partial_maps", {}).get("written"))
                entries += [e for e in log if e["uid"] == uid and e["updated_at"]]
        report["status"] = statuses
        report["partial_maps_written"] = partial_maps
        report["updates_received"] = len(entries)
        report["update_to_received_s"] = stats([e["received"] - e["updated_at"] for e in entries])
        maps = [e for e in entries if e["maps"]]  # the result's first update has no maps to draw yet
        report["map_updates_received"] = len(maps)
        report["update_to_drawn_s"] = stats([e["drawn"] - e["updated_at"] for e in maps if e["drawn"]])
        report["map_updates_never_drawn"] = sum(1 for e in maps if not e["drawn"])  # superseded while loading
        report["updates"] = [{k: e[k] for k in ("n", "maps", "status")}
                             | {f"{k}_s": e.get(k) and round(e[k] - e["updated_at"], 3)
                                for k in ("received", "requested", "loaded", "drawn")} for e in entries]
    finally:
        server.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
