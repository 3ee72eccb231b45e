"""PCC phase-identification accuracy of scan-energy choices on measured standards, printed as JSON.

For each measured reference set in ``tests/data`` (full range, as measured) and each dose
(open-beam counts per pixel; Poisson noise on the transmitted counts), pure-phase pixel spectra
of random thickness are simulated (``phasestream.sim.pixels``) and assigned by PCC with
phasestream's kernels (``pearson_maps``, ``assign_phases``). Energy sets, each of ``n``
energies plus the first (pre-edge) energy of the grid:

* ``selected``: ``select_energies(refs, n, dose=dose)`` (method ``pcc``, the default)
* ``score``: ``select_energies(refs, n, method="score")``, the earlier whole-grid ranking (before)
* ``score_edge_cut``: the same ranking on the references cut to the edge region (low - 20 eV
  ... high + 100 eV), the manual workaround
* ``uniform``: ``n`` energies evenly spaced over ``edge_region(refs, dose=dose)``
* ``random_best`` / ``random_median``: the best and the median of ``--subsets`` random subsets of
  the grid energies in the edge region (the best is optimistic: it is chosen on the same noise)

Every set is scored on the same noisy pixels (paired comparison).

Usage: ``python benchmarks/energy_selection.py [--doses 30 300 3000] [--n 12] [--pixels 2000]
[--subsets 200]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from phasestream.references import ReferenceSet, edge_region, load_references, select_energies
from phasestream.sim.pixels import noisy_pixel_od, pcc_accuracy

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
SETS = ("fe-k-edge", "au-l3-edge", "ni-k-edge")


def measured_sets() -> dict:
    return {name: load_references(sorted((DATA / name).glob("ref_*.txt"))) for name in SETS}


def cut(refs: ReferenceSet, low: float, high: float) -> ReferenceSet:
    keep = (refs.energies >= low) & (refs.energies <= high)
    return ReferenceSet(refs.energies[keep], refs.phases, refs.spectra[:, keep], name=f"{refs.name} cut")


def score(refs, energies, labels, dose, seed) -> dict:
    od = noisy_pixel_od(refs, energies, labels, dose=dose, rng=np.random.default_rng(seed))
    acc, amb = pcc_accuracy(refs, energies, od, labels)
    return {"accuracy": round(acc, 4), "ambiguous": round(amb, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[30.0, 300.0, 3000.0])
    parser.add_argument("--n", type=int, default=12, help="energies besides the pre-edge one")
    parser.add_argument("--pixels", type=int, default=2000, help="pixels per phase")
    parser.add_argument("--subsets", type=int, default=200, help="random subsets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    report = {"benchmark": "energy_selection", "machine": {"platform": platform.platform(),
              "cpus": os.cpu_count()}, "n": args.n, "pixels_per_phase": args.pixels,
              "random_subsets": args.subsets, "sets": {}}
    for name, refs in measured_sets().items():
        labels = np.repeat(np.arange(len(refs.phases)), args.pixels)
        e = refs.energies
        per_dose = {}
        for dose in args.doses:
            low, high = edge_region(refs, dose=dose)
            pool = e[(e >= low) & (e <= high)]
            chosen = select_energies(refs, args.n, dose=dose)
            sets = {
                "selected": chosen,
                "score": select_energies(refs, args.n, method="score"),
                "score_edge_cut": select_energies(cut(refs, low - 20.0, high + 100.0), args.n, method="score"),
                "uniform": np.concatenate([[e[0]], np.linspace(low, high, args.n)]),
            }
            row = {key: score(refs, energies, labels, dose, args.seed) for key, energies in sets.items()}
            rng = np.random.default_rng(args.seed + 1)
            random_acc = [score(refs, np.concatenate([[e[0]], np.sort(rng.choice(pool, args.n, replace=False))]),
                                labels, dose, args.seed)["accuracy"] for _ in range(args.subsets)]
            row["random_best"] = {"accuracy": float(np.max(random_acc))}
            row["random_median"] = {"accuracy": float(np.median(random_acc))}
            row["edge_region_eV"] = [round(low, 2), round(high, 2)]
            row["selected_eV"] = [round(float(v), 2) for v in chosen]
            per_dose[f"{dose:g}"] = row
        report["sets"][name] = {"phases": list(refs.phases), "range_eV": [float(e[0]), float(e[-1])],
                                "doses": per_dose}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
