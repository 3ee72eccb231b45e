"""Phase-map accuracy against simulated ground truth versus dose, printed as JSON.

For each dose (open-beam counts per pixel; Poisson noise) and state of charge, runs the demo
pipeline in process (RunEngine, sim devices, PhaseMapCallback, embedded Tiled) and reports the
fraction of particle pixels away from domain boundaries whose phase equals the truth, the
ambiguous fraction, and the noiseless case.

Usage: ``python benchmarks/accuracy.py [--doses 1000 5000 20000] [--size 256] [--seeds 3]``
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from phasestream.app.demo import DEMO_STATES, DemoConfig, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[1000.0, 2000.0, 5000.0, 20000.0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="phasestream-accuracy-")
    report = {"benchmark": "accuracy", "size": args.size, "energies": 13, "seeds": args.seeds, "doses": {}}
    for dose in args.doses:
        per_state = {}
        for soc in DEMO_STATES:
            runs = [run_demo(DemoConfig(states=(soc,), shape=(args.size, args.size), dose=dose, seed=s,
                                        topology="inprocess", figures=False, out_dir=out))[0]
                    for s in range(args.seeds)]
            per_state[str(soc)] = {
                "accuracy": float(np.mean([r.accuracy for r in runs])),
                "accuracy_min": float(np.min([r.accuracy for r in runs])),
                "ambiguous_fraction": float(np.mean([r.ambiguous_fraction for r in runs])),
            }
        report["doses"][f"{dose:g}"] = per_state
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
