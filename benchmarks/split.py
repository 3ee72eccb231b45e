"""Cost of the split post-scan jobs on a LocalCluster of 2 workers: LCF by row bands (and, with ``--enhance``,
InDI by energy chunks), first on a result without one (``first_*``), then over the complete one (``rerun_*``:
since 83e388d staged, read back, copied, read back again).

One result per repeat: a ``--size``² OD cube of ``--energies`` planes, a noisy two-phase mixture of the Ni
K-edge references in tests/data/ni-k-edge, in a Tiled server of its own process. ``*_rss_mb``: the most peak
resident memory a call added to the submitting process (``*_tiled_rss_mb``: to Tiled's), from /proc VmHWM
reset before each call (``ru_maxrss`` growth where it cannot be). ``*_steps_median_s``: the time in the job
module's steps (waiting for the bands, staging; nested steps count in both). ``--enhance`` starts a model
server (TensorFlow) as the tests do and enhances ``--enhance-size``² results, 2 InDI steps.

Usage: ``python benchmarks/split.py [--size 512] [--energies 30] [--parts 4] [--repeats 3] [--enhance]``;
prints JSON. Set PYTHONPATH to another checkout to time its code (``phasestream_file`` says which ran).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import phasestream
from phasestream.app.process import ModelServerProcess
from phasestream.jobs.cluster import dask_client
from phasestream.jobs.enhance import EnhanceOptions
from phasestream.jobs.split import submit_split_enhance, submit_split_lcf
from phasestream.references import load_references
from phasestream.sim.phantoms import particle_phantom
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import close_embedded_tiled, connect, start_embedded_tiled

NI = Path(__file__).resolve().parents[1] / "tests" / "data" / "ni-k-edge"
STEPS = ("gather_all", "_create_chunked", "record_methods", "_keep_lcf_claim", "_replace_lcf_arrays",
         "settled_entry", "Staging.create", "Staging.read_back", "Staging.copy", "Staging.verify_copy",
         "Staging.remove", "remove_enhanced", "record_enhancement")


def serve_tiled(directory: str, uri_queue, stop) -> None:
    """Child process: an embedded Tiled server until ``stop`` is set (its memory is not the submitter's)."""
    server = start_embedded_tiled(directory=directory)
    uri_queue.put((server.uri, os.getpid()))
    stop.wait()
    close_embedded_tiled(server)


def _status_kb(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


class PeakRss:
    """Peak resident memory a block adds to process ``pid``, in MB: VmHWM reset through /proc/PID/clear_refs
    (Linux), else this process's ``ru_maxrss`` growth (0 unless the block sets a new peak; any ``pid``)."""

    def __init__(self, pid: int | str = "self"):
        self.pid, self.mb = pid, 0.0

    def __enter__(self) -> PeakRss:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
                refs.write("5")
            self.start, self.method = _status_kb(self.pid, "VmRSS"), "VmHWM"
        except OSError:
            self.start, self.method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        return self

    def __exit__(self, *exc) -> None:
        end = (_status_kb(self.pid, "VmHWM") if self.method == "VmHWM"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        self.mb = round(max(0, end - self.start) / 1024, 1)  # VmRSS is read just after the reset


def timed_steps(modules, seconds: dict) -> None:
    """Wrap the :data:`STEPS` the job ``modules`` have (each once) so that their wall time adds up in ``seconds``."""
    def wrap(owner, name, label):
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def step(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - t0
        setattr(owner, name, step)

    wrapped = set()
    for module, label in ((m, label) for m in modules for label in STEPS):
        cls, _, name = label.rpartition(".")
        owner = getattr(module, cls, None) if cls else module
        if owner is not None and hasattr(owner, name) and (id(owner), name) not in wrapped:
            wrapped.add((id(owner), name))
            wrap(owner, name, label)


def write_result(client, uid: str, refs, references: str, energies: np.ndarray, size: int, seed: int) -> None:
    """A raw run (start document naming the references) and a result whose OD cube is a noisy two-phase
    mixture of ``refs`` over a particle phantom (as tests/services/test_split.py writes one)."""
    thickness = particle_phantom((size, size), n_particles=3, seed=seed).astype(np.float32)
    frac = np.broadcast_to(np.linspace(0, 1, size, dtype=np.float32), (size, size))
    spectra = refs.interpolate(energies).T.astype(np.float32)  # (E, 2)
    client.create_container(uid, metadata={"start": {"uid": uid, "phasestream": {"references": references}}})
    writer = ResultWriter(client, uid, shape=(size, size), phases=refs.phases, n_energies=len(energies),
                          metadata={"energies_eV": [float(e) for e in energies], "references": {"name": refs.name}})
    rng = np.random.default_rng(seed)
    for i0 in range(0, len(energies), 4):
        mix = np.tensordot(spectra[i0:i0 + 4], np.stack([frac, 1 - frac]) * thickness, axes=1)
        writer.write_od_planes(i0, (mix + rng.normal(0, 0.01, mix.shape)).astype(np.float32))
    writer.finalize_od(len(energies))


@dataclass
class Setup:
    """What every measured call shares: the cluster, Tiled (its process), the references and energies."""

    dask: object
    client: object
    uri: str
    key: str
    tiled_pid: int
    refs: object
    references: str
    energies: np.ndarray
    args: argparse.Namespace
    steps: dict = field(default_factory=lambda: defaultdict(float))

    def call(self, submit, uid: str, options=None) -> dict:
        """One call of ``submit``: its wall seconds, peak RSS added (here and in Tiled), seconds in its steps."""
        self.steps.clear()
        with PeakRss() as mine, PeakRss(self.tiled_pid) as tiled:
            t0 = time.perf_counter()
            record = submit(self.dask, self.uri, uid, options, parts=self.args.parts, api_key=self.key)
            seconds = time.perf_counter() - t0
        if record["status"] != "complete":
            raise RuntimeError(f"{uid}: {record['status']} {record.get('errors') or record.get('reason')}")
        return {"s": seconds, "rss_mb": mine.mb, "tiled_rss_mb": tiled.mb, "rss_method": mine.method,
                "steps": dict(self.steps)}

    def measure(self, submit, prefix: str, size: int, options=None) -> dict:
        """``submit`` on ``--repeats`` new results of ``size``², each first without and then with a complete one."""
        runs: dict[str, list] = {"first": [], "rerun": []}
        for k in range(self.args.repeats):
            write_result(self.client, f"{prefix}-{k}", self.refs, self.references, self.energies, size, seed=k)
            for name in runs:
                runs[name].append(self.call(submit, f"{prefix}-{k}", options))
        return {f"{name}_{key}": value for name, calls in runs.items() for key, value in summary(calls).items()}


def summary(calls: list[dict]) -> dict:
    times = [c["s"] for c in calls]
    return {"min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3),
            "all_s": [round(t, 3) for t in times], "rss_mb": max(c["rss_mb"] for c in calls),
            "tiled_rss_mb": max(c["tiled_rss_mb"] for c in calls), "rss_method": calls[0]["rss_method"],
            "steps_median_s": {k: round(statistics.median(c["steps"].get(k, 0.0) for c in calls), 3)
                               for k in calls[0]["steps"]}}


def bench(args, folder: str, uri: str, tiled_pid: int) -> dict:
    csv = Path(folder) / "refs" / "ni.csv"
    csv.parent.mkdir()
    raw = load_references([NI / "ref_NiO.txt", NI / "ref_LiNiO2.txt"])
    np.savetxt(csv, np.column_stack([raw.energies, raw.spectra.T]), delimiter=",",
               header="energy_eV,NiO,LiNiO2", comments="")
    os.environ["PHASESTREAM_REFERENCES"] = str(csv.parent)  # before the workers start: they read it too
    client, (uri, _, key) = connect(uri), uri.partition("?api_key=")
    with dask_client(n_workers=2, set_as_default=False) as dask:
        setup = Setup(dask, client, uri, key, tiled_pid, load_references(csv), str(csv),
                      np.linspace(8300.0, 8450.0, args.energies), args)
        out = {"worker_phasestream": sorted(set(dask.run(lambda: __import__("phasestream").__file__).values()))}
        write_result(client, "warm-up", setup.refs, setup.references, setup.energies[:8], 32, seed=99)
        setup.call(submit_split_lcf, "warm-up")  # worker imports, numba, Tiled's first calls
        timed_steps({sys.modules[f.__module__] for f in (submit_split_lcf, submit_split_enhance)}, setup.steps)
        out["lcf"] = setup.measure(submit_split_lcf, "lcf", args.size)
        if args.enhance:
            with ModelServerProcess(args=("--preload", "indi-particles-synthetic")) as models:
                options = EnhanceOptions(address=models.address, steps=2, timeout=600)
                out["enhance"] = {"size": args.enhance_size, "indi_steps": 2,
                                  **setup.measure(submit_split_enhance, "enhance", args.enhance_size, options)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--energies", type=int, default=30)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enhance", action="store_true", help="also the split enhancement (a model server)")
    parser.add_argument("--enhance-size", type=int, default=128)
    args = parser.parse_args()
    t0 = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        uri_queue, stop = spawn.Queue(), spawn.Event()
        tiled = spawn.Process(target=serve_tiled, args=(str(Path(folder) / "tiled"), uri_queue, stop), daemon=True)
        tiled.start()
        try:
            uri, tiled_pid = uri_queue.get(timeout=120)
            results = bench(args, folder, uri, tiled_pid)
        finally:
            stop.set()
            tiled.join(60)
    print(json.dumps({"benchmark": "split", "size": args.size, "energies": args.energies, "parts": args.parts,
                      "repeats": args.repeats, "workers": 2, "phasestream_file": phasestream.__file__, **results,
                      "total_s": round(time.perf_counter() - t0, 1),
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "python": platform.python_version(),
                                  "processor": platform.processor() or platform.machine()}}, indent=1))


if __name__ == "__main__":
    main()
