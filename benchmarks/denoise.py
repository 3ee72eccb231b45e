"""Self-supervised denoising of STXM energy stacks: PSNR of OD, phase identification, training time (JSON).

Protocol (issue 22). Held-out simulated NVPF samples (``phasestream.sim``; seeds below 1000, never
used to train the shipped model) imaged at the demo's 13 energies with line-correlated STXM noise
(``phasestream.sim.noise.LINE_CORRELATED``: Poisson counts, dark and read noise, 2% per-line I0
noise, 2% along-line I0 fluctuation with a 10 px correlation length).

* ``psnr``: PSNR (dB) of the whole OD stack against the simulator's noiseless OD (data range: the
  clean OD's), at ``--doses`` counts/px, for: ``raw``; ``pca`` (the principal components above the
  noise floor only, no spatial step); ``learned`` (the shipped ``denoise-stxm-synthetic`` as it
  is); ``learned_finetuned`` (fine-tuned on the scan itself for ``--fine-tune-steps``, self-supervised);
  ``tv`` (scikit-image ``denoise_tv_chambolle`` on every energy image); ``bm3d`` (every energy
  image, when the ``bm3d`` package is installed). TV and BM3D strengths are chosen on a separate
  sample (another seed) at the same dose: the best PSNR over ``TV_WEIGHTS`` / ``BM3D_SIGMAS``.
* ``phase_id``: PCC phase identification (``pearson_maps``, ``assign_phases``) of the raw and the
  denoised OD of ``--phase-samples`` samples at ``--phase-dose``: accuracy on the particle pixels
  (``all``; ``interior``: away from domain boundaries and particle edges) and the ambiguous fraction
  of the particle pixels, against the simulator's truth.
* ``training``: seconds to fine-tune (``--fine-tune-steps``) and to train from scratch
  (``--scratch-steps``) on one 13 x ``--timing-size``^2 stack, the machine noted.

Usage: python benchmarks/denoise.py [--size 256] [--doses 300 1000] [--fine-tune-steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
from skimage.restoration import denoise_tv_chambolle

from phasestream.kernels import assign_phases, pearson_maps
from phasestream.methods.unmixing import bm3d_available
from phasestream.metrics import psnr
from phasestream.models.denoise import denoise_stack, train_denoiser
from phasestream.models.registry import ModelRegistry
from phasestream.references import load_references, select_energies
from phasestream.sim import LINE_CORRELATED, make_sample, simulate_stack

TV_WEIGHTS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25)
BM3D_SIGMAS = (0.02, 0.04, 0.06, 0.08, 0.12, 0.16)


def per_energy(fn, od: np.ndarray) -> np.ndarray:
    return np.stack([fn(np.nan_to_num(img)) for img in od])


def tv(od, weight):
    return per_energy(lambda img: denoise_tv_chambolle(img, weight=weight), od)


def bm3d(od, sigma):
    import bm3d as _bm3d

    return per_energy(lambda img: np.asarray(_bm3d.bm3d(img, sigma_psd=sigma)), od)


def score(stack, estimate) -> float:
    clean = stack.clean_od
    return round(psnr(clean, np.nan_to_num(estimate), data_range=float(clean.max() - clean.min())), 2)


def stack_of(energies, refs, size, seed, dose, soc=2.0):
    sample = make_sample((size, size), state_of_charge=soc, references=refs, n_particles=6, seed=seed)
    return sample, simulate_stack(sample, energies, dose=dose, noise=LINE_CORRELATED, rng=seed + 17)


def tuned(method, grid, stack) -> float:
    return max(grid, key=lambda p: score(stack, method(stack.od, p)))


def phase_scores(sample, od, mu) -> dict:
    phase, _, ambiguous = assign_phases(pearson_maps(np.nan_to_num(od), mu), backend="numpy")
    return {"accuracy": round(sample.accuracy(phase, exclude_boundary=False), 4),
            "accuracy_interior": round(sample.accuracy(phase), 4),
            "ambiguous": round(float(ambiguous[sample.particle].mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--doses", type=float, nargs="+", default=[300.0, 1000.0])
    parser.add_argument("--fine-tune-steps", type=int, default=200)
    parser.add_argument("--phase-dose", type=float, default=300.0)
    parser.add_argument("--phase-samples", type=int, default=3)
    parser.add_argument("--timing-size", type=int, default=512)
    parser.add_argument("--scratch-steps", type=int, default=400)
    parser.add_argument("--model", default="denoise-stxm-synthetic")
    args = parser.parse_args()
    started = time.perf_counter()
    refs = load_references("nvpf-synthetic")
    energies = np.asarray(select_energies(refs, 12, method="score"))
    mu = refs.interpolate(energies)
    artifact, model = ModelRegistry().load(args.model)
    report = {"benchmark": "denoise", "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "model": {"name": artifact.name, "version": artifact.version, "sha256": artifact.sha256},
              "noise": LINE_CORRELATED.__dict__, "size": args.size, "energies": len(energies),
              "bm3d": "installed" if bm3d_available() else "not installed (pip install 'phasestream[methods]')",
              "psnr": {}}
    for dose in args.doses:
        _, tune = stack_of(energies, refs, args.size, 901, dose)
        _, test = stack_of(energies, refs, args.size, 902, dose)
        weight = tuned(tv, TV_WEIGHTS, tune)
        row = {"raw": score(test, test.od), "pca": score(test, denoise_stack(None, test.od).od),
               "learned": score(test, denoise_stack(model, test.od).od)}
        fine = denoise_stack(model, test.od, fine_tune_steps=args.fine_tune_steps, learning_rate=5e-4)
        row["learned_finetuned"] = score(test, fine.od)
        row["tv"] = score(test, tv(test.od, weight))
        row["tv_weight"] = weight
        if bm3d_available():
            sigma = tuned(bm3d, BM3D_SIGMAS, tune)
            row["bm3d"], row["bm3d_sigma"] = score(test, bm3d(test.od, sigma)), sigma
        best_classic = max(row["tv"], row.get("bm3d", -np.inf))
        best_learned = max(row["learned"], row["learned_finetuned"])
        row["gain_over_raw_dB"] = round(best_learned - row["raw"], 2)
        row["gain_over_best_classic_dB"] = round(best_learned - best_classic, 2)
        report["psnr"][f"{dose:g}"] = row
    phase = {"dose": args.phase_dose, "samples": []}
    for i in range(args.phase_samples):
        sample, stack = stack_of(energies, refs, args.size, 910 + i, args.phase_dose, soc=(2.0, 1.0, 2.4)[i % 3])
        weight = report["psnr"].get(f"{args.phase_dose:g}", {}).get("tv_weight", 0.1)
        phase["samples"].append({"seed": 910 + i, "raw": phase_scores(sample, stack.od, mu),
                                 "learned": phase_scores(sample, denoise_stack(model, stack.od).od, mu),
                                 "tv": phase_scores(sample, tv(stack.od, weight), mu)})
    for method in ("raw", "learned", "tv"):
        phase[method] = {k: round(float(np.mean([s[method][k] for s in phase["samples"]])), 4)
                         for k in ("accuracy", "accuracy_interior", "ambiguous")}
    report["phase_id"] = phase
    _, timing = stack_of(energies, refs, args.timing_size, 903, 300.0)
    t0 = time.perf_counter()
    denoise_stack(model, timing.od, fine_tune_steps=args.fine_tune_steps, learning_rate=5e-4)
    fine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    inference = denoise_stack(model, timing.od)
    infer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_denoiser([timing.od], steps=args.scratch_steps)
    report["training"] = {"stack": [len(energies), args.timing_size, args.timing_size],
                          "fine_tune_steps": args.fine_tune_steps, "fine_tune_and_denoise_s": round(fine_s, 1),
                          "denoise_only_s": round(infer_s, 1), "components": inference.components,
                          "scratch_steps": args.scratch_steps, "scratch_train_s": round(time.perf_counter() - t0, 1)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
