"""Per-frame cost of the streaming kernels, printed as JSON.

For 1024^2 and 2048^2 uint16 frames and K = 5 references, for every available backend:

* ``od_ms``: uint16 counts -> float32 OD + validity mask;
* ``update_ms``: one PearsonAccumulator.update (OD -> per-pixel Welford state);
* ``frame_ms``: both, i.e. the work per arriving image;
* ``bound_*_ms``: the memory-bandwidth bound measured in the same run: the time to copy as
  many bytes as the step must read plus write (a copy of N bytes reads N and writes N, so the
  copy moves (read + write) / 2 bytes). The faster of a NumPy copy and a 2-thread numba copy
  is used, so the bound is as tight as this machine allows;
* ``batch_pcc_ms``: recomputing the PCC maps from the whole 13-energy OD stack with the batch
  NumPy reference (what a non-streaming implementation would do after every frame).

Usage: ``python benchmarks/kernels.py [--sizes 1024 2048] [--repeat 7]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numba
import numpy as np

from phasestream.kernels import PearsonAccumulator, cupy_available, optical_density, pearson_maps

K = 5
N_ENERGIES = 13


@numba.njit(parallel=True, cache=True)
def _parallel_copy(src, dst):
    for i in numba.prange(src.size):
        dst[i] = src[i]


def _best(fn, repeat: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def copy_bound_ms(nbytes: int, repeat: int) -> dict:
    """Milliseconds to copy ``nbytes`` (reads nbytes, writes nbytes)."""
    n = nbytes // 8
    src = np.ones(n, np.float64)
    dst = np.empty_like(src)
    _parallel_copy(src[:8], dst[:8])
    numpy_ms = _best(lambda: np.copyto(dst, src), repeat)
    numba_ms = _best(lambda: _parallel_copy(src, dst), repeat)
    return {"numpy_copy_ms": numpy_ms, "numba_copy_ms": numba_ms, "bound_ms": min(numpy_ms, numba_ms)}


def bench_backend(backend: str, image: np.ndarray, refs: np.ndarray, repeat: int) -> dict:
    shape = image.shape
    sync = lambda: None  # noqa: E731
    if backend == "cupy":
        import cupy as cp

        image = cp.asarray(image)
        sync = cp.cuda.Device().synchronize
    # warm-up (JIT compilation, CUDA context)
    od, valid = optical_density(image, 60000.0, backend=backend)
    acc = PearsonAccumulator(shape, K, backend=backend)
    for j in range(3):
        acc.update(od, refs[:, j], valid)
    od_ms = _best(lambda: optical_density(image, 60000.0, backend=backend), repeat, sync)
    acc = PearsonAccumulator(shape, K, backend=backend)
    j = iter(range(10**9))
    update_ms = _best(lambda: acc.update(od, refs[:, next(j) % N_ENERGIES], valid), repeat, sync)

    def frame():
        o, v = optical_density(image, 60000.0, backend=backend)
        acc.update(o, refs[:, next(j) % N_ENERGIES], v)

    frame_ms = _best(frame, repeat, sync)
    return {"od_ms": od_ms, "update_ms": update_ms, "frame_ms": frame_ms, "state_MB": acc.nbytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--backends", nargs="+", default=None)
    args = parser.parse_args()
    backends = args.backends or (["numpy", "numba"] + (["cupy"] if cupy_available() else []))
    rng = np.random.default_rng(0)
    refs = rng.uniform(0.2, 1.5, (K, N_ENERGIES))
    report = {
        "benchmark": "kernels",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "numba_threads": numba.get_num_threads(),
            "numba_threading_layer": os.environ.get("NUMBA_THREADING_LAYER", "default"),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "gpu": cupy_available(),
        },
        "k_refs": K,
        "n_energies": N_ENERGIES,
        "input_dtype": "uint16",
        "sizes": {},
    }
    for size in args.sizes:
        shape = (size, size)
        npix = size * size
        image = rng.integers(1000, 50000, shape).astype(np.uint16)
        # bytes per pixel: update reads OD f4, valid b1, state (8 (K+2) + 1) and writes the state
        state = 8 * (K + 2) + 1
        update_bytes = (4 + 1 + state) + state
        od_bytes = 2 + (4 + 1)  # read uint16, write float32 + bool
        entry: dict = {
            "bytes_per_pixel": {"od": od_bytes, "update": update_bytes},
            "bound_update": copy_bound_ms(npix * update_bytes // 2, args.repeat),
            "bound_frame": copy_bound_ms(npix * (update_bytes + od_bytes) // 2, args.repeat),
        }
        stack = np.stack([optical_density(image, 60000.0, backend="numba")[0]] * N_ENERGIES)
        entry["batch_pcc_ms"] = _best(lambda s=stack: pearson_maps(s, refs), max(2, args.repeat // 3))
        for backend in backends:
            entry[backend] = bench_backend(backend, image, refs, args.repeat)
        if "numba" in entry:
            nb = entry["numba"]
            entry["numba_update_over_bound"] = nb["update_ms"] / entry["bound_update"]["bound_ms"]
            entry["numba_frame_over_bound"] = nb["frame_ms"] / entry["bound_frame"]["bound_ms"]
            entry["batch_over_numba_frame"] = entry["batch_pcc_ms"] / nb["frame_ms"]
        report["sizes"][f"{size}x{size}"] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
