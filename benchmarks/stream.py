"""Throughput and latency of the live path, printed as JSON.

Topology as in production: this process publishes documents (DocumentPublisher, msgpack) to a
0MQ proxy subprocess; a ``phasestream serve`` worker subprocess runs PhaseMapCallback (K = 5
references) and writes results to an embedded Tiled server living in this process.

* ``stream_<size>``: one run of N uint16 frames (distinct energies), published as fast as the
  publisher goes, or at ``--rate`` frames/s (a detector's pace: the worker keeps up when the
  latency stays flat). Reported: publish rate, the worker's sustained analysis rate (images/s between
  its first and last analysed image), per-image latency (event time -> image analysed in the
  worker, transport included; median and p95), documents lost (from the worker's sequence
  numbers), and last image -> final result in Tiled (which includes draining the OD-plane writes
  queued behind the stream and reading the final maps and the OD cube back, ``read_back_s``). The
  live OD cube: ``--od store`` (default, the deployed configuration): the worker writes it as
  external zarr data (``serve --od-store``, a temporary directory the embedded Tiled may read);
  ``--od upload``: uploaded to Tiled (``serve`` without ``--od-store``); ``--od off``: not written
  (``serve --no-od``).
* ``end_of_scan_1024x13``: a 13-energy scan of 1024^2 frames at a beamline-like pace (one image
  every ``--pace`` s), reporting last image -> final result in Tiled.

Usage: ``python benchmarks/stream.py [--frames 200] [--sizes 512 2048] [--rate 20] [--pace 0.2]
[--od store|upload|off]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from event_model import compose_run

from phasestream.app.live import ServeProcess
from phasestream.store.catalog import wait_for_result
from phasestream.store.tiled import connect, start_embedded_tiled
from phasestream.transport.proxy import start_proxy
from phasestream.transport.wire import DocumentPublisher


def _documents(size: int, n: int, *, seed: int = 0):
    """A STXM run of ``n`` uint16 frames at distinct energies in 505-540 eV (synthetic counts)."""
    rng = np.random.default_rng(seed)
    energies = np.linspace(505.0, 540.0, n)
    bundle = compose_run(metadata={
        "sample": {"name": f"bench-{size}", "state_of_charge": 2.0},
        "phasestream": {"references": "nvpf-synthetic", "image_key": "det_img", "energy_key": "energy",
                        "i0_key": "det_i0", "mode": "stxm"},
        "num_points": n,
    })
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "det_img": {"source": "bench", "dtype": "array", "shape": [size, size], "dtype_numpy": "<u2"},
        "energy": {"source": "bench", "dtype": "number", "shape": []},
        "det_i0": {"source": "bench", "dtype": "number", "shape": []},
    })
    base = rng.integers(2000, 6000, (size, size)).astype(np.uint16)
    frames = [np.roll(base, i, axis=0) for i in range(min(n, 8))]

    def events(pace: float = 0.0):
        start = time.perf_counter()
        for i, e in enumerate(energies):
            if pace and i:  # a detector's clock: image i at start + i * pace, however long publishing took
                time.sleep(max(0.0, start + i * pace - time.perf_counter()))
            now = time.time()
            yield "event", desc.compose_event(
                data={"det_img": frames[i % len(frames)], "energy": float(e), "det_i0": 8000.0},
                timestamps={"det_img": now, "energy": now, "det_i0": now}, seq_num=i + 1)

    return bundle, desc, events


def run_stream(client, publisher, size: int, n: int, pace: float = 0.0) -> dict:
    bundle, desc, events = _documents(size, n)
    publisher("start", bundle.start_doc)
    publisher("descriptor", desc.descriptor_doc)
    t0 = time.perf_counter()
    for name, doc in events(pace):
        publisher(name, doc)
    publish_s = time.perf_counter() - t0
    publisher("stop", bundle.compose_stop())
    md = dict(wait_for_result(client, bundle.start_doc["uid"], timeout=600.0).metadata)
    t = md["timings"]
    return {
        "frames": n,
        "frame_shape": [size, size],
        "status": md["status"],
        "publish_frames_per_s": n / publish_s,
        "worker_images_per_s": t.get("images_per_s"),
        "worker_median_frame_ms": t.get("median_frame_ms"),
        "event_latency_ms": t.get("event_latency_ms"),
        "last_image_to_result_s": t.get("last_image_to_result_s"),
        "read_back_s": t.get("read_back_s"),
        "n_energies_seen": md["n_energies_seen"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--pace", type=float, default=0.2, help="seconds between images of the end-of-scan run")
    parser.add_argument("--od", choices=("store", "upload", "off"), default="store",
                        help="the live OD cube: written by the worker as external zarr (serve --od-store, default), "
                             "uploaded to Tiled, or not written (serve --no-od)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="publish the stream runs at this many frames/s (0: as fast as possible)")
    args = parser.parse_args()
    report: dict = {"benchmark": "stream", "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    store = tempfile.TemporaryDirectory(prefix="phasestream-od-") if args.od == "store" else None
    server = start_embedded_tiled(readable_storage=[store.name] if store else None)
    client = connect(server.uri)
    proxy = start_proxy()
    worker = ServeProcess(proxy.out_address, server.uri, args=(
        "--backend", "numba", "--update-every", "8", "--update-seconds", "2", "--no-refine",
        *(("--no-od",) if args.od == "off" else ()), *(("--od-store", store.name) if store else ()),
    )).start()
    report["write_od"] = args.od
    publisher = DocumentPublisher(proxy.in_address)
    try:
        publisher.wait_for_subscriber(10)
        time.sleep(0.5)
        run_stream(client, publisher, 256, 4)  # warm-up: JIT, Tiled containers
        for size in args.sizes:
            pace = 1.0 / args.rate if args.rate > 0 else 0.0
            report[f"stream_{size}"] = run_stream(client, publisher, size, args.frames, pace=pace)
        report["end_of_scan_1024x13"] = run_stream(client, publisher, 1024, 13, pace=args.pace)
    finally:
        publisher.close()
        stats = worker.stop()
        proxy.stop()
        server.close()
        if store is not None:
            store.cleanup()
    report["worker_stats"] = {k: stats.get(k) for k in ("received", "lost", "undecodable", "callback_errors")}
    report["documents_lost"] = stats.get("lost")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
