"""Cost of reprocessing a run that already has a finished result: analysed in memory first (a finished result
is replaced only by one at least as good, docs/security.md), then again writing, against a run without one.

A simulated energy scan (``--size``² pixels, the demo's 13 energies of ``nvpf-synthetic``) is stored by
TiledWriter in an embedded Tiled server; ``new_s`` is :func:`~phasestream.jobs.reprocess.reprocess_results`
of the run while it has no result, ``replace_s`` the same with ``replace=True`` once the result is
``complete`` (in-memory analysis, comparison, then the analysis that writes), ``ratio`` = replace_s / new_s
(2 if the analysis were all the cost). Each is the median of ``--repeat`` runs, each on its own scan.

Usage: ``python benchmarks/reprocess.py [--size 256] [--repeat 3]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from bluesky import RunEngine

from phasestream.jobs.reprocess import ReprocessOptions, reprocess_results
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import connect, raw_run_writer, start_embedded_tiled


def scan(client, size: int, seed: int) -> str:
    """A simulated scan stored in ``client`` by TiledWriter; its uid."""
    energies = select_energies(load_references("nvpf-synthetic"), 13)
    sample = make_sample((size, size), state_of_charge=2.0, seed=seed, n_particles=3)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=3000.0, seed=seed)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    uids = RE(energy_stack_scan([det], energy, energies, sample=sample, references="nvpf-synthetic",
                                i0_key=det.i0_key))
    return uids[0]


def timed(client, uid: str, replace: bool) -> float:
    t0 = time.perf_counter()
    results = reprocess_results(client, uid, ReprocessOptions(backend="numba", replace=replace).validate())
    seconds = time.perf_counter() - t0
    statuses = {r.status for r in results.values()}
    if statuses != {"complete"}:
        raise RuntimeError(f"run {uid} reprocessed {statuses}, not complete")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = start_embedded_tiled(directory=Path(folder))
        try:
            client = connect(server.uri)
            timed(client, scan(client, 32, seed=99), replace=False)  # warm-up: numba compiles, Tiled's first calls
            new, replace = [], []
            for k in range(args.repeat):
                uid = scan(client, args.size, seed=k)
                new.append(timed(client, uid, replace=False))
                replace.append(timed(client, uid, replace=True))
        finally:
            server.close()
    new_s, replace_s = statistics.median(new), statistics.median(replace)
    print(json.dumps({"benchmark": "reprocess", "size": args.size, "energies": 13, "repeat": args.repeat,
                      "new_s": round(new_s, 3), "replace_s": round(replace_s, 3),
                      "ratio": round(replace_s / new_s, 2), "new_all_s": [round(x, 3) for x in new],
                      "replace_all_s": [round(x, 3) for x in replace],
                      "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                  "processor": platform.processor() or platform.machine()}}, indent=1))


if __name__ == "__main__":
    main()
