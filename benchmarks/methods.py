"""Speed and memory of the classic methods, printed as JSON (the machine noted).

* LCF (NNLS and fully constrained, 2 and 5 references) on ``--energies`` energies x ``--size``^2
  pixels (default 100 x 2048^2, float32 stack: 1.6 GB);
* RUM-TV seconds per ADMM iteration at ``--rum-size``^2 (default 512^2, 2 references): a run of
  ``--rum-iterations`` + 1 iterations minus a run of one (the best of two), after a warm-up run, so
  that the setup (NNLS start and noise estimate, reported as ``setup_seconds``) cancels.

Each measurement runs in its own subprocess, which reports its peak RSS (``resource.getrusage``),
so the numbers do not mix. The first LCF call compiles the numba kernel (cached on disk); the time
reported is the second call.

Usage: python benchmarks/methods.py [--size 2048] [--energies 100] [--rum-size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def _lcf(size: int, n_e: int, k: int, method: str) -> dict:
    from phasestream.methods import linear_combination_fit

    rng = np.random.default_rng(0)
    e = np.linspace(8300, 8450, n_e)
    refs = np.stack([1 / (1 + np.exp(-(e - c) / 3.0)) + 0.2 * np.exp(-((e - c - 8) / 4) ** 2)
                     for c in np.linspace(8330, 8345, k)])
    stack = np.empty((n_e, size, size), np.float32)
    x = rng.dirichlet(np.ones(k), size * size).T.astype(np.float32)  # (k, N)
    for i in range(n_e):  # plane by plane: no (E, N) float64 temporary
        stack[i] = (refs[:, i] @ x).reshape(size, size) + rng.normal(0, 0.02, (size, size)).astype(np.float32)
    linear_combination_fit(stack[:, :8, :8], refs, method=method)  # compile
    t = time.perf_counter()
    linear_combination_fit(stack, refs, method=method)
    return {"seconds": round(time.perf_counter() - t, 3)}


def _rum(size: int, n_e: int, iterations: int) -> dict:
    from phasestream.methods import robust_unmixing

    rng = np.random.default_rng(0)
    e = np.linspace(8300, 8450, n_e)
    refs = np.stack([1 / (1 + np.exp(-(e - c) / 3.0)) for c in (8335.0, 8340.0)])
    frac = rng.uniform(0, 1, (size, size))
    stack = np.tensordot(refs.T, np.stack([frac, 1 - frac]), axes=1) + rng.normal(0, 0.05, (n_e, size, size))
    robust_unmixing(stack, refs, prior="tv", max_iter=1, min_iter=1)  # warm-up (numba NNLS kernel)
    # the same setup (NNLS start, noise estimate) in both runs: the difference is the iterations alone
    setup = min(robust_unmixing(stack, refs, prior="tv", max_iter=1, min_iter=1).seconds for _ in range(2))
    res = robust_unmixing(stack, refs, prior="tv", max_iter=iterations + 1, min_iter=iterations + 1, tol=0)
    return {"seconds_per_iteration": round((res.seconds - setup) / iterations, 4),
            "setup_seconds": round(setup, 3), "iterations": iterations}


def _child(spec: dict) -> None:
    out = _lcf(**spec["args"]) if spec["what"] == "lcf" else _rum(**spec["args"])
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


def _run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="phasestream classic methods benchmark")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--energies", type=int, default=100)
    parser.add_argument("--rum-size", type=int, default=512)
    parser.add_argument("--rum-iterations", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    results = {}
    for k in (2, 5):
        for method in ("nnls", "fcls"):
            results[f"lcf_{method}_k{k}"] = _run({"what": "lcf", "args": {"size": args.size, "n_e": args.energies,
                                                                          "k": k, "method": method}})
            print(json.dumps({f"lcf_{method}_k{k}": results[f"lcf_{method}_k{k}"]}), file=sys.stderr, flush=True)
    results["rum_tv"] = _run({"what": "rum", "args": {"size": args.rum_size, "n_e": args.energies,
                                                      "iterations": args.rum_iterations}})
    print(json.dumps({"benchmark": "methods", "machine": platform.machine(), "processor": platform.processor(),
                      "cpus": os.cpu_count(), "numba_threads": os.environ.get("NUMBA_NUM_THREADS"),
                      "lcf_shape": [args.energies, args.size, args.size], "rum_shape": [args.energies, args.rum_size,
                                                                                        args.rum_size],
                      "results": results}))


if __name__ == "__main__":
    main()
