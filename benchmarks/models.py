"""GMVAE model server and latent-space refinement: speed and accuracy, printed as JSON.

* ``encode_server``: spectra/s through a ``phasestream serve-models`` subprocess (ModelClient,
  msgpack over 0MQ, chunks of ``--chunk`` spectra), and the same model in process for comparison.
* ``refine_1024``: :func:`refine_ambiguous` on a 1024 x 1024 image (60% particle pixels, 40% of
  them ambiguous, 3-D latent points in 5 clusters), seconds per strategy. Target <= 10 s.
* ``accuracy``: simulated particles (256^2, 13 energies, Poisson noise at each dose): accuracy
  against the ground truth (away from domain boundaries) of the ambiguous pixels and of all
  particle pixels, PCC argmax versus each refinement strategy with the pretrained GMVAE.
* GPU figures: TensorFlow here is the CPU build (``tensorflow-cpu``); ``gpu`` reports what is visible.

Usage: ``python benchmarks/models.py [--spectra 200000] [--doses 2000 5000] [--seeds 3]``
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=131072)
    parser.add_argument("--doses", type=float, nargs="+", default=[2000.0, 5000.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
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
