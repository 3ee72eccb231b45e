"""Cost of the post-scan methods job on a result in Tiled (``run_methods``): LCF and edge normalization of a
``--size``² OD cube of ``--energies`` planes, each method's arrays written and (since 3d5e394) read back from
Tiled bit for bit before the record says ``complete``.

One result per repeat, a noisy two-phase mixture of the Ni K-edge references in tests/data/ni-k-edge, in a
Tiled server of its own process (SQLite catalog, on the same cores). ``seconds``: the whole job, median over
``--repeats``; ``read_back_s``: the part spent reading the arrays back (0 for code without it);
``<method>_s``: each method's recorded seconds (compute, write and read-back).

Usage: ``python benchmarks/methods_job.py [--size 512] [--energies 30] [--repeats 3]``; prints JSON. Set
PYTHONPATH to another checkout to time its code (``phasestream_file`` says which ran).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import phasestream
import phasestream.jobs.methods as methods_job
from phasestream.jobs.methods import run_methods
from phasestream.jobs.methods_options import MethodsOptions
from phasestream.references import load_references
from phasestream.sim.phantoms import particle_phantom
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import close_embedded_tiled, connect, start_embedded_tiled

NI = Path(__file__).resolve().parents[1] / "tests" / "data" / "ni-k-edge"
METHODS = ("lcf", "normalize")


def serve_tiled(directory: str, uri_queue, stop) -> None:
    """Child process: an embedded Tiled server until ``stop`` is set."""
    server = start_embedded_tiled(directory=directory)
    uri_queue.put(server.uri)
    stop.wait()
    close_embedded_tiled(server)


def make_result(client, uid: str, refs_path: Path, size: int, n_energies: int) -> None:
    """A result with an OD cube of a noisy two-phase mixture, and the raw run's start naming the references."""
    refs = load_references(refs_path)
    energies = np.linspace(8300.0, 8450.0, n_energies)
    thickness = particle_phantom((size, size), n_particles=6, seed=5).astype(np.float32)
    frac = np.clip(np.linspace(0, 1, size, dtype=np.float32)[None, :] + 0 * thickness, 0, 1)
    values = refs.interpolate(energies).astype(np.float32)  # (2, E)
    client.create_container(uid, metadata={"start": {"uid": uid, "phasestream": {"references": str(refs_path)}}})
    writer = ResultWriter(client, uid, shape=(size, size), phases=refs.phases, n_energies=n_energies,
                          metadata={"energies_eV": list(energies), "references": {"name": refs.name}})
    rng = np.random.default_rng(0)
    for i in range(n_energies):
        plane = thickness * (values[0, i] * frac + values[1, i] * (1 - frac))
        writer.write_od_planes(i, (plane + rng.normal(0, 0.01, plane.shape).astype(np.float32))[None])
    writer.finalize_od(n_energies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--energies", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spent = [0.0]
    real = getattr(methods_job, "read_back", None)
    if real is not None:
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        methods_job.read_back = timed
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        refs = Path(tmp) / "ni.csv"
        ref_set = load_references([NI / "ref_NiO.txt", NI / "ref_LiNiO2.txt"])
        np.savetxt(refs, np.column_stack([ref_set.energies, ref_set.spectra.T]), delimiter=",",
                   header="energy_eV,NiO,LiNiO2", comments="")
        os.environ["PHASESTREAM_REFERENCES"] = tmp
        uri_queue, stop = ctx.Queue(), ctx.Event()
        tiled = ctx.Process(target=serve_tiled, args=(str(Path(tmp) / "tiled"), uri_queue, stop))
        tiled.start()
        try:
            client = connect(uri_queue.get(timeout=120))
            rows = []
            for repeat in range(args.repeats):
                uid = f"methods-bench-{repeat}"
                make_result(client, uid, refs, args.size, args.energies)
                spent[0] = 0.0
                t = time.perf_counter()
                record = run_methods(client, uid, MethodsOptions(methods=METHODS))
                seconds = time.perf_counter() - t
                assert all(record[m]["status"] == "complete" for m in METHODS), record
                rows.append({"seconds": seconds, "read_back_s": spent[0],
                             **{f"{m}_s": record[m]["seconds"] for m in METHODS}})
        finally:
            stop.set()
            tiled.join(30)
    print(json.dumps({
        "benchmark": "methods_job", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "phasestream_file": phasestream.__file__, "size": args.size, "energies": args.energies,
        "repeats": args.repeats, "methods": list(METHODS),
        **{f"{key}_median": round(statistics.median(r[key] for r in rows), 3) for key in rows[0]},
    }, indent=1))


if __name__ == "__main__":
    main()
