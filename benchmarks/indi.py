"""InDI enhancement: quality against the number of steps, speed and memory, printed as JSON.

* ``quality``: held-out simulated particle phantoms (256^2 HQ; LQ = blur + 2x down-sampling +
  noise), PSNR / SSIM against the HQ image and the median edge FWHM (px) at the 30 strongest HQ
  edges of each image, for bicubic up-sampling and for the pretrained artifact at 1..20 steps.
* ``speed``: ms per 512^2 image per step on this CPU (network evaluation ``F(x_t, t)``).
* ``memory``: peak resident memory of a fresh process enhancing a 2048^2 image (1024^2 LQ) in
  512-pixel tiles, and without tiling, for comparison.
* ``gpu``: TensorFlow here is the CPU build; the list of visible GPUs is reported.
* ``workflow`` (``--workflow``): the user workflow of issue 23 (benchmarks/indi_workflow.py): an
  independently made sample scanned into Tiled, ``phasestream train indi`` on one LQ/HQ frame pair,
  a held-out field enhanced through ``phasestream enhance --source raw`` and through the Python API
  (gains over bicubic, which must agree within 0.3 dB), HF correlation by steps, and the shipped demo
  model's gain on the same sample.

Usage: ``python benchmarks/indi.py [--pairs 4] [--steps 1 2 ... 20] [--workflow [--iterations 300] [--size 256]
[--filters 16] [--depth 2] [--sample dense|sparse] [--frames 1]]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

MODEL = "indi-particles-synthetic"

_MEMORY_PROBE = """
import resource, sys, numpy as np
from phasestream.models.registry import ModelRegistry
from phasestream.models.indi import enhance_image
art, model = ModelRegistry().load("{model}")
lq = np.random.default_rng(0).uniform(0, 1, (1024, 1024)).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
enhance_image(model, lq, steps=2, tile={tile})
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def quality(model, art, n_pairs: int, steps_list) -> dict:
    from phasestream.metrics import edge_fwhm, edge_points, line_profile, psnr, ssim
    from phasestream.models.indi import enhance_image
    from phasestream.sim.phantoms import phantom_pairs, upscale

    hq, lq = phantom_pairs(n_pairs, (256, 256), seed=999)
    rows = {"bicubic": [], **{str(n): [] for n in steps_list}}
    for h, low in zip(hq, lq, strict=True):
        points, normals = edge_points(h, n=30)
        candidates = {"bicubic": upscale(low), **{str(n): enhance_image(model, low, steps=n) for n in steps_list}}
        for key, image in candidates.items():
            widths = [edge_fwhm(line_profile(image, p, q), spacing=0.5) for p, q in zip(points, normals, strict=True)]
            rows[key].append((psnr(h, image), ssim(h, image), float(np.median(widths))))
    out = {key: {"psnr_db": float(np.mean([r[0] for r in v])), "ssim": float(np.mean([r[1] for r in v])),
                 "edge_fwhm_px": float(np.mean([r[2] for r in v]))} for key, v in rows.items()}
    hq_widths = []
    for h in hq:
        points, normals = edge_points(h, n=30)
        hq_widths.append(np.median([edge_fwhm(line_profile(h, p, q), spacing=0.5)
                                    for p, q in zip(points, normals, strict=True)]))
    out["hq_edge_fwhm_px"] = float(np.mean(hq_widths))
    out["default_steps"] = art.manifest["steps"]
    return out


def speed(model, size: int = 512, repeats: int = 5) -> dict:
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (1, size, size, 1)).astype(np.float32))
    t = tf.constant([0.5], tf.float32)
    model.predict_x(x, t)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.asarray(model.predict_x(x, t))
        times.append(time.perf_counter() - t0)
    return {"image": [size, size], "ms_per_step_median": 1e3 * float(np.median(times)),
            "ms_per_step_min": 1e3 * float(np.min(times))}


def memory(tile: int) -> dict:
    code = _MEMORY_PROBE.format(model=MODEL, tile=tile)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = (int(v) for v in out.stdout.split()[-2:])
    return {"tile": tile, "peak_rss_mb": after / 1024, "rss_before_enhancing_mb": before / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=list(range(1, 21)))
    parser.add_argument("--workflow", action="store_true", help="only the user-workflow benchmark (issue 23)")
    parser.add_argument("--iterations", type=int, default=300, help="--workflow: training iterations")
    parser.add_argument("--size", type=int, default=256, help="--workflow: field size (px)")
    parser.add_argument("--filters", type=int, default=16, help="--workflow: base filters of the U-Net")
    parser.add_argument("--depth", type=int, default=2, help="--workflow: down-sampling blocks of the U-Net")
    parser.add_argument("--sample", choices=("dense", "sparse"), default="dense",
                        help="--workflow: the sample (benchmarks/indi_workflow.py SAMPLES)")
    parser.add_argument("--frames", type=int, default=1, help="--workflow: frames of the training LQ and HQ runs")
    args = parser.parse_args()
    if args.workflow:
        from indi_workflow import run_workflow  # benchmarks/indi_workflow.py, beside this script

        report = {"benchmark": "indi-workflow", "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                  **run_workflow(size=args.size, iterations=args.iterations, filters=args.filters,
                                 depth=args.depth, sample=args.sample, frames=args.frames)}
        print(json.dumps(report, indent=2))
        return
    import tensorflow as tf

    from phasestream.models.registry import ModelRegistry

    art, model = ModelRegistry().load(MODEL)
    report = {
        "benchmark": "indi",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": {"name": art.name, "version": art.version, "sha256": art.sha256,
                  "base_filters": art.manifest["config"].get("base_filters")},
        "gpu": [d.name for d in tf.config.list_physical_devices("GPU")],
        "speed": speed(model),
        "memory_2048": [memory(512), memory(4096)],
        "quality": quality(model, art, args.pairs, args.steps),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
