"""Phase identification on measured standards: PCC versus LCF-argmax, printed as JSON.

For each measured reference set in ``tests/data`` a phantom of ``--size`` x ``--size`` pixels
holds one pure-phase domain per reference (vertical stripes over the top three quarters) and a
mixed region (the bottom quarter: the first two phases, the first one's weight going linearly
from 1 to 0 across the image). Thickness is uniform in 0.7-1.0 (an OD of about 1 above the edge
for normalized references), substrate OD 0.02; at each dose (open-beam counts per pixel) the
transmitted counts are Poisson (``phasestream.sim.pixels``). The scan is ``select_energies(refs,
12, dose=dose)`` (13 energies).

Per dose and set:

* ``pcc``: phase = argmax PCC (``pearson_maps``, ``assign_phases``); ``accuracy`` over the
  pure-domain pixels, ``ambiguous`` (PCC gap below 0.005) over all pixels;
* ``lcf_argmax``: non-negative least squares of each pixel's OD on the references plus a
  constant (offset) column (``scipy.optimize.nnls``); phase = argmax weight;
* ``fraction_error``: half the L1 distance between the phase fractions of the whole phantom
  (true: the mean of the weights; estimated: the share of pixels assigned to each phase) —
  0 is perfect, 1 is disjoint. For LCF also ``fraction_error_mean_weights``: the estimate is the
  mean of the per-pixel normalized LCF weights instead of argmax counts.

GMVAE refinement is not included (its pretrained model is for the synthetic NVPF set only).

Usage: ``python benchmarks/phase_id.py [--doses 20 50 100 300 1000 3000] [--size 48]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from phasestream.kernels import assign_phases, pearson_maps
from phasestream.references import load_references, select_energies
from phasestream.sim.pixels import noisy_pixel_od

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
SETS = ("fe-k-edge", "au-l3-edge", "ni-k-edge")


def phantom(k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, size*size) weights and (size*size,) bool pure-domain flags, row-major."""
    weights = np.zeros((k, size, size))
    top = 3 * size // 4
    stripe = np.minimum(np.arange(size) * k // size, k - 1)
    for i in range(k):
        weights[i, :top][:, stripe == i] = 1.0
    ramp = np.linspace(1.0, 0.0, size)
    weights[0, top:] = ramp
    weights[1, top:] = 1.0 - ramp
    pure = np.zeros((size, size), bool)
    pure[:top] = True
    return weights.reshape(k, -1), pure.ravel()


def fraction_error(estimated: np.ndarray, true: np.ndarray) -> float:
    return round(float(0.5 * np.abs(estimated - true).sum()), 4)


def lcf_weights(od: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """(K, N) normalized NNLS weights (NaN for a masked pixel) of ``od`` (E, N) on ``mu`` (K, E) + offset."""
    design = np.column_stack([mu.T, np.ones(mu.shape[1])])
    out = np.full((mu.shape[0], od.shape[1]), np.nan)
    for p in range(od.shape[1]):
        if np.all(np.isfinite(od[:, p])):
            w = nnls(design, od[:, p])[0][:-1]
            total = w.sum()
            out[:, p] = w / total if total > 0 else np.nan
    return out


def evaluate(refs, dose: float, size: int, seed: int) -> dict:
    k = len(refs.phases)
    weights, pure = phantom(k, size)
    truth = np.argmax(weights, axis=0)
    true_fractions = weights.mean(axis=1)
    energies = select_energies(refs, 12, dose=dose)
    labels = truth  # only used for shape; weights drive the mixture
    od = noisy_pixel_od(refs, energies, labels, dose=dose, rng=np.random.default_rng(seed), weights=weights)
    mu = refs.interpolate(energies)
    phase, _, ambiguous = assign_phases(pearson_maps(od[:, None, :], mu), backend="numpy")
    phase, ambiguous = phase[0], ambiguous[0]
    lcf = lcf_weights(od, mu)
    lcf_phase = np.where(np.isfinite(lcf).all(axis=0), np.argmax(np.nan_to_num(lcf, nan=-1.0), axis=0), -1)
    share = lambda ph: np.bincount(ph[ph >= 0], minlength=k)[:k] / ph.size  # noqa: E731
    return {
        "pcc": {"accuracy": round(float(np.mean(phase[pure] == truth[pure])), 4),
                "ambiguous": round(float(np.mean(ambiguous)), 4),
                "fraction_error": fraction_error(share(phase), true_fractions)},
        "lcf_argmax": {"accuracy": round(float(np.mean(lcf_phase[pure] == truth[pure])), 4),
                       "fraction_error": fraction_error(share(lcf_phase), true_fractions),
                       "fraction_error_mean_weights": fraction_error(np.nanmean(lcf, axis=1), true_fractions)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[20.0, 50.0, 100.0, 300.0, 1000.0, 3000.0])
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    report = {"benchmark": "phase_id", "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "size": args.size, "energies": 13, "sets": {}}
    for name in SETS:
        refs = load_references(sorted((DATA / name).glob("ref_*.txt")))
        report["sets"][name] = {"phases": list(refs.phases),
                                "doses": {f"{d:g}": evaluate(refs, d, args.size, args.seed) for d in args.doses}}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
