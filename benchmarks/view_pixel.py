"""Time of a click on the view's phase map: ``/api/runs/<uid>/pixel`` (the pixel's spectrum, its maps and the fitted
references; ``phasestream/app/view/pixel.py``) against an embedded Tiled holding one complete result of ``--size``²
pixels, ``--energies`` OD planes (one chunk a plane, as the worker writes them) and ``--phases`` PCC maps.

* ``pixel_request_s``: each of ``--clicks`` requests at pixels spread over the image, from request to reply, through
  the view's HTTP server (a ``ViewServer`` thread of this process, as ``phasestream demo --view`` runs it); median and
  max.

Usage: ``python benchmarks/view_pixel.py [--size 2048] [--energies 13] [--phases 5] [--clicks 9]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import httpx
import numpy as np

from phasestream.app.view import ViewServer
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import connect, start_embedded_tiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--energies", type=int, default=13)
    parser.add_argument("--phases", type=int, default=5)
    parser.add_argument("--clicks", type=int, default=9)
    args = parser.parse_args()
    n, e, k = args.size, args.energies, args.phases
    rng = np.random.default_rng(0)
    with start_embedded_tiled(api_key="benchmarkKey1") as server:
        client = connect(server.uri)
        writer = ResultWriter(client, "bench-pixel", shape=(n, n), phases=[f"p{i}" for i in range(k)], n_energies=e,
                              metadata={"energies_eV": [500.0 + i for i in range(e)],
                                        "reference_values": rng.random((k, e)).tolist()})
        for index in range(e):
            writer.write_maps(od_planes=(index, rng.random((1, n, n), dtype=np.float32)))
        writer.write_maps(pcc=rng.random((k, n, n), dtype=np.float32) * 2 - 1,
                          phase=rng.integers(0, k, (n, n)).astype(np.int16),
                          reliability=rng.random((n, n), dtype=np.float32),
                          ambiguous=np.zeros((n, n), np.uint8), mask=np.ones((n, n), np.uint8))
        writer.update_metadata(n_energies_seen=e, status="complete")
        with ViewServer(client) as view, httpx.Client(base_url=view.url, timeout=120) as http:
            end = time.monotonic() + 60
            while "bench-pixel" not in view.follower.runs:
                if time.monotonic() > end:
                    raise SystemExit("the view never listed the result")
                time.sleep(0.1)
            times = []
            for click in range(args.clicks):
                y, x = (click * 7919) % n, (click * 104729) % n
                t0 = time.perf_counter()
                reply = http.get("/api/runs/bench-pixel/pixel", params={"y": y, "x": x})
                times.append(time.perf_counter() - t0)
                reply.raise_for_status()
    print(json.dumps({
        "benchmark": "view_pixel", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "image": [n, n], "energies": e, "phases": k, "clicks": args.clicks,
        "pixel_request_s": {"median": round(float(np.median(times)), 3), "max": round(max(times), 3),
                            "each": [round(t, 3) for t in times]},
    }))


if __name__ == "__main__":
    main()
