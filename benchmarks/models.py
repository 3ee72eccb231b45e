"""GMVAE model server and latent-space refinement: speed and accuracy, printed as JSON.

* ``encode_server``: spectra/s through a ``phasestream serve-models`` subprocess (ModelClient,
  msgpack over 0MQ, chunks of ``--chunk`` spectra), and the same model in process for comparison.
* ``refine_1024``: :func:`refine_ambiguous` on a 1024 x 1024 image (60% particle pixels, 40% of
  them ambiguous, 3-D latent points in 5 clusters), seconds per strategy. Target <= 10 s.
* ``accuracy``: simulated particles (256^2, 13 energies, Poisson noise at each dose): accuracy
  against the ground truth (away from domain boundaries) of the ambiguous pixels and of all
  particle pixels, PCC argmax versus each refinement strategy with the pretrained GMVAE.
* ``burst`` (``--burst``, alone): ``--burst-clients`` clients each send one encode request of ``--burst-mb`` MB at
  once, queued behind a long decode, to a model server with the default batch bound (``--max-batch-mb`` = the
  request limit) and with none (64 GiB, as before the bound): the batches they took, the seconds until the
  last reply, and the server's peak resident memory above its resident memory before the burst.
* GPU figures: TensorFlow here is the CPU build (``tensorflow-cpu``); ``gpu`` reports what is visible.

Usage: ``python benchmarks/models.py [--spectra 200000] [--doses 2000 5000] [--seeds 3]``;
``python benchmarks/models.py --burst [--burst-clients 8] [--burst-mb 64]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from phasestream.app.process import ModelServerProcess
from phasestream.kernels.pearson import pearson_maps
from phasestream.kernels.phases import assign_phases, particle_mask
from phasestream.models.refine import STRATEGIES, refine_ambiguous
from phasestream.models.registry import ModelRegistry
from phasestream.modelserver.client import ModelClient
from phasestream.references import load_references, select_energies
from phasestream.sim.samples import make_sample

MODEL = "gmvae-nvpf-synthetic"


def encode_throughput(model, art, n: int, chunk: int) -> dict:
    rng = np.random.default_rng(0)
    base = np.linspace(0.3, 1.2, len(art.energies))
    x = (rng.uniform(0.5, 1.5, (n, 1)) * base + rng.normal(0, 0.02, (n, len(base)))).astype(np.float32)
    model.encode(x[:1000])
    t0 = time.perf_counter()
    model.encode(x)
    local = time.perf_counter() - t0
    with ModelServerProcess(args=("--preload", MODEL)) as proc, ModelClient(proc.address, max_spectra=chunk) as c:
        c.encode(MODEL, x[:1000])
        t0 = time.perf_counter()
        c.encode(MODEL, x)
        served = time.perf_counter() - t0
    return {"spectra": n, "chunk": chunk, "server_spectra_per_s": n / served, "in_process_spectra_per_s": n / local,
            "server_seconds": served}


def refine_timing(size: int = 1024, ambiguous: float = 0.4) -> dict:
    rng = np.random.default_rng(0)
    shape = (size, size)
    mask = rng.random(shape) < 0.6
    truth = rng.integers(0, 5, shape)
    centres = rng.normal(0, 3, (5, 3))
    latent = (centres[truth] + rng.normal(0, 1, (*shape, 3))).astype(np.float32)
    amb = mask & (rng.random(shape) < ambiguous)
    phase = np.where(mask, np.where(amb, rng.integers(0, 5, shape), truth), -1).astype(np.int16)
    pcc = rng.uniform(0, 1, (5, *shape)).astype(np.float32)
    out = {"shape": list(shape), "particle_pixels": int(mask.sum()), "ambiguous_pixels": int(amb.sum()),
           "seconds": {}}
    for strategy in STRATEGIES:
        t0 = time.perf_counter()
        refine_ambiguous(latent, phase, amb, mask, strategy, anchors=centres, pcc=pcc)
        out["seconds"][strategy] = time.perf_counter() - t0
    return out


def accuracy(model, doses, seeds, states=(2.0, 1.0), size=256) -> dict:
    refs = load_references("nvpf-synthetic")
    energies = select_energies(refs, 12)
    ref_spectra = refs.interpolate(energies)
    anchors = model.encode(ref_spectra.astype(np.float32))[0]
    rows = []
    for soc in states:
        for dose in doses:
            for seed in range(seeds):
                sample = make_sample((size, size), state_of_charge=soc, seed=seed)
                rng = np.random.default_rng(seed + 1000)
                counts = np.stack([sample.transmitted(e, i0=dose, rng=rng) for e in energies])
                with np.errstate(divide="ignore"):
                    od = -np.log(np.where(counts > 0, counts, np.nan) / dose)
                pcc = pearson_maps(od, ref_spectra)
                mask = particle_mask(od)
                phase, _, amb = assign_phases(pcc, mask)
                spectra = od[:, mask].T
                usable = np.isfinite(spectra).all(axis=1)
                latent = np.full((*mask.shape, 3), np.nan, np.float32)
                rows_, cols_ = np.nonzero(mask)
                latent[rows_[usable], cols_[usable]] = model.encode(spectra[usable])[0]
                good = mask & sample.particle & ~sample.boundary
                sel = good & amb
                row = {"soc": soc, "dose": dose, "seed": seed, "ambiguous_fraction": float(amb[mask].mean()),
                       "pcc": {"ambiguous": float(np.mean(phase[sel] == sample.phase[sel])),
                               "overall": sample.accuracy(phase)}}
                for strategy in STRATEGIES:
                    t0 = time.perf_counter()
                    r = refine_ambiguous(latent, phase, amb, mask & np.isfinite(latent).all(axis=-1), strategy,
                                         pcc=pcc, anchors=anchors)
                    row[strategy] = {"ambiguous": float(np.mean(r.refined_phase[sel] == sample.phase[sel])),
                                     "overall": sample.accuracy(r.refined_phase),
                                     "seconds": time.perf_counter() - t0}
                rows.append(row)
    summary = {}
    for key in ("pcc", *STRATEGIES):
        summary[key] = {"ambiguous_mean": float(np.mean([r[key]["ambiguous"] for r in rows])),
                        "ambiguous_min": float(np.min([r[key]["ambiguous"] for r in rows])),
                        "overall_mean": float(np.mean([r[key]["overall"] for r in rows])),
                        "better_than_pcc": None if key == "pcc" else
                        int(sum(r[key]["overall"] > r["pcc"]["overall"] for r in rows))}
    return {"runs": rows, "summary": summary, "n_runs": len(rows)}


def _memory_mb(pid: int, field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak) of process ``pid``, MB (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def burst(clients: int, mb: float, batch_mb: float | None) -> dict:
    """Peak memory and batches of a model server taking ``clients`` requests of ``mb`` MB that arrive at once."""
    import zmq

    from phasestream.transport.wire import deserialize, serialize

    n = int(mb * (1 << 20) / (13 * 4))
    args = ("--max-request-mb", str(max(mb * 1.1, 1.0)), "--preload", MODEL,
            *(("--max-batch-mb", str(batch_mb)) if batch_mb is not None else ()))
    rng = np.random.default_rng(0)
    base = np.linspace(0.3, 1.2, 13)
    payloads = [serialize({"op": "encode", "model": MODEL, "id": i, "array": (
        rng.uniform(0.5, 1.5, (n, 1)) * base + rng.normal(0, 0.02, (n, 13))).astype(np.float32)})
        for i in range(clients)]
    blocker = serialize({"op": "decode", "model": MODEL, "array": rng.normal(size=(300_000, 3)).astype(np.float32)})
    with ModelServerProcess(args=args, timeout=180) as server, ModelClient(server.address, timeout=600) as client:
        socks = []
        for _ in range(clients + 1):
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(server.address)
            sock.send(serialize({"op": "health"}))
            assert sock.poll(60_000) and deserialize(sock.recv())["ok"]
            socks.append(sock)
        client.encode(MODEL, np.ones((1000, 13), np.float32))  # warmed up
        pid = server.proc.pid
        before, batches = _memory_mb(pid, "VmRSS"), client.health()["stats"].get("batches", 0)
        t0 = time.perf_counter()
        socks[0].send(blocker)
        time.sleep(0.2)  # the server decodes: the burst queues up behind it
        for sock, payload in zip(socks[1:], payloads, strict=True):
            sock.send(payload)
        replies = []
        for sock in socks:
            assert sock.poll(600_000), "no reply"
            replies.append(deserialize(sock.recv()))
        seconds = time.perf_counter() - t0
        peak = _memory_mb(pid, "VmHWM")
        stats = client.health()["stats"]
        for sock in socks:
            sock.close()
    assert all(r["ok"] for r in replies), [r.get("error") for r in replies if not r["ok"]]
    return {"max_batch_mb": "default (the request limit)" if batch_mb is None else batch_mb,
            "batches": stats["batches"] - batches - 1, "seconds": round(seconds, 2),
            "rss_before_mb": round(before), "peak_above_before_mb": round(peak - before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=131072)
    parser.add_argument("--doses", type=float, nargs="+", default=[2000.0, 5000.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--burst", action="store_true", help="only the burst measure (see above)")
    parser.add_argument("--burst-clients", type=int, default=8)
    parser.add_argument("--burst-mb", type=float, default=64.0)
    args = parser.parse_args()
    if args.burst:
        print(json.dumps({"benchmark": "models burst", "machine": {"platform": platform.platform(),
                                                                   "cpus": os.cpu_count()},
                          "clients": args.burst_clients, "request_mb": args.burst_mb,
                          "burst": [burst(args.burst_clients, args.burst_mb, batch)
                                    for batch in (None, 65536.0)]}, indent=2))
        return
    art, model = ModelRegistry().load(MODEL)
    import tensorflow as tf

    report = {
        "benchmark": "models",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": {"name": art.name, "version": art.version, "sha256": art.sha256},
        "gpu": [d.name for d in tf.config.list_physical_devices("GPU")],
        "encode_server": encode_throughput(model, art, args.spectra, args.chunk),
        "refine_1024": refine_timing(),
    }
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(model, args.doses, args.seeds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
