"""InDI as a user runs it (issue 23): one LQ/HQ pair of an independently made sample, scanned into Tiled,
``phasestream train indi``, then a held-out field enhanced through ``phasestream enhance --source raw``
(the CLI path) and through ``phasestream.jobs.enhance.enhance_images`` (the Python API).

The sample is not made by :mod:`phasestream.sim.phantoms`: irregular particles (thresholded smooth noise,
sharp edges) filled with lamellae (square waves of 3-6 px period at random angles) and fine texture, as
optical density. HQ: 3000 counts/px, Poisson. LQ: transmission blurred by 1.5 px, 2x2 binned, 120
counts/px, Poisson. Field A trains, field B (other particles) is held out. Gains are PSNR over bicubic
against HQ B in transmission (each scan divided by its own open beam, estimated from its background).

``run_workflow(...)`` returns the report (JSON-ready); ``benchmarks/indi.py --workflow`` prints it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

LQ_DOSE, HQ_DOSE = 120.0, 3000.0
USER_MODEL = "indi-user"
SHIPPED = "indi-particles-synthetic"


# Two independently made samples (neither from phasestream.sim.phantoms). "dense": particles cover 45% of the
# field, 0.25 OD lamellae, so the LQ scan's blur dominates its error (a perfect denoiser gains 1.1-1.6 dB).
# "sparse": fewer, larger particles (12% of the field), 0.1 OD lamellae; chosen because its bicubic scores
# (PSNR, SSIM, edge FWHM) are the closest of a grid of samples to the ones issue 23 measured on its own sample
# (20.9 dB, 0.19, 3.01 px), where counting noise, not blur, dominates the LQ scan's error.
SAMPLES = {
    "dense": {"sigma": 9.0, "quantile": 0.55, "od": (0.6, 1.2), "lamellae": 0.25},
    "sparse": {"sigma": 16.0, "quantile": 0.88, "od": (0.6, 1.2), "lamellae": 0.1},
}


def lamellar_sample(shape: tuple[int, int], seed: int, *, sigma: float = 9.0, quantile: float = 0.55,
                    od: tuple[float, float] = (0.6, 1.2), lamellae: float = 0.25) -> np.ndarray:
    """OD (Y, X) of irregular particles with 3-6 px lamellae and fine texture on a thin background.

    Particles: smooth noise (Gaussian of ``sigma`` px) above its ``quantile``; each has a uniform OD in
    ``od`` plus a square wave of amplitude ``lamellae`` (OD), period 3-6 px, at a random angle."""
    rng = np.random.default_rng(seed)
    h, w = shape
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    particles = field > np.quantile(field, quantile)
    labels, n = ndimage.label(particles)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.full(shape, 0.05)
    for k in range(1, n + 1):
        inside = labels == k
        period, angle = rng.uniform(3.0, 6.0), rng.uniform(0, np.pi)
        phase = 2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period
        image = np.where(inside, rng.uniform(*od) + lamellae * np.sign(np.sin(phase)), image)
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 0.7)
    return (image + 0.04 * texture / texture.std()).clip(0.0, None).astype(np.float32)


def scans(od: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lq counts (Y/2, X/2), hq counts (Y, X))`` of one field."""
    rng = np.random.default_rng(seed)
    transmission = np.exp(-od.astype(np.float64))
    hq = rng.poisson(HQ_DOSE * transmission)
    return rng.poisson(LQ_DOSE * noiseless_lq(od)).astype(np.float32), hq.astype(np.float32)


def noiseless_lq(od: np.ndarray) -> np.ndarray:
    """The LQ scan of ``od`` without counting noise (transmission blurred 1.5 px, 2x2 binned)."""
    blurred = ndimage.gaussian_filter(np.exp(-od.astype(np.float64)), 1.5)
    h, w = (s // 2 * 2 for s in blurred.shape)
    return blurred[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def ceilings(od: np.ndarray, reference: np.ndarray, bicubic: np.ndarray) -> dict:
    """What a perfect *denoiser* of the LQ scan could gain over bicubic on this field: bicubic of the noiseless LQ
    scan (``denoising_db``); anything above it must restore detail the blur and the binning removed (the
    lamellae). For scale, the truth blurred by 1 px (``truth_blurred_1px_db``), and the truth itself (the HQ
    scan's own noise, ``truth_db``). Gains in dB over ``bicubic``, against ``reference`` (HQ, transmission)."""
    from phasestream.kernels.resample import upscale

    truth = np.exp(-od.astype(np.float64))
    return {"denoising_db": _gain(reference, upscale(noiseless_lq(od)), bicubic),
            "truth_blurred_1px_db": _gain(reference, ndimage.gaussian_filter(truth, 1.0), bicubic),
            "truth_db": _gain(reference, truth, bicubic),
            "note": "denoising_db: bicubic of the noiseless LQ scan, the most a model that only removes noise gains"}


def _frame_run(client, images: list[np.ndarray], pixel_size_um: float, name: str) -> str:
    """A raw run of ``images``, one frame per event, that a RunEngine takes from an ophyd sim signal."""
    import bluesky.plan_stubs as bps
    from bluesky import RunEngine
    from bluesky.preprocessors import run_decorator
    from ophyd.sim import SynSignal

    from phasestream.store.tiled import raw_run_writer

    current = {"frame": images[0]}
    det = SynSignal(func=lambda: current["frame"], name="cam_image")

    @run_decorator(md={"sample": {"name": name, "pixel_size_um": pixel_size_um},
                       "phasestream": {"image_key": "cam_image"}})
    def count():
        for image in images:
            current["frame"] = image
            yield from bps.trigger_and_read([det])

    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    (uid,) = RE(count())
    return uid


def _cli(*argv: str) -> int:
    out = subprocess.run([sys.executable, "-c", "import sys; from phasestream.app.cli import main; "
                          "sys.exit(main(sys.argv[1:]))", *argv], capture_output=True, text=True)
    if out.returncode not in (0, 3):
        raise RuntimeError(f"phasestream {' '.join(argv[:2])} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.returncode


def _gain(reference: np.ndarray, image: np.ndarray, bicubic: np.ndarray) -> float:
    from phasestream.metrics import psnr

    return psnr(reference, image) - psnr(reference, bicubic)


def run_workflow(*, size: int = 256, iterations: int = 300, steps_list=(1, 2, 4, 7), filters: int = 16,
                 depth: int = 2, sample: str = "dense", frames: int = 1) -> dict:
    from phasestream.app.process import ModelServerProcess
    from phasestream.jobs.enhance import enhance_images
    from phasestream.kernels.od import estimate_i0
    from phasestream.kernels.resample import upscale
    from phasestream.metrics import hf_correlation, median_edge_fwhm, psnr, ssim
    from phasestream.store.tiled import close_embedded_tiled, connect, start_embedded_tiled

    params = SAMPLES[sample]
    # training runs of ``frames`` frames: field A, then other fields of the same sample (seeds 103, 105, ...)
    lq_a, hq_a = zip(*(scans(lamellar_sample((size, size), seed=101 + 2 * i, **params), seed=1 + 10 * i)
                       for i in range(frames)), strict=True)
    od_b = lamellar_sample((size, size), seed=202, **params)
    lq_b, hq_b = scans(od_b, seed=2)
    report: dict = {"sample": {"name": sample, **params, "size": size, "training_frames": frames,
                               "lq_dose": LQ_DOSE, "hq_dose": HQ_DOSE,
                               "blur_px": 1.5, "binning": 2,
                               "texture": "irregular particles, 3-6 px lamellae, sharp edges"}}
    with tempfile.TemporaryDirectory() as tmp:
        server = start_embedded_tiled(directory=Path(tmp) / "tiled")
        try:
            client = connect(server.uri)
            uids = {key: _frame_run(client, frames_of_run, size_um, key) for key, frames_of_run, size_um in
                    (("lq_a", list(lq_a), 0.04), ("hq_a", list(hq_a), 0.02),
                     ("lq_b", [lq_b], 0.04), ("hq_b", [hq_b], 0.02))}
            models = Path(tmp) / "models"
            t0 = time.perf_counter()
            _cli("train", "indi", "--tiled", server.uri, "--lq", uids["lq_a"], "--hq", uids["hq_a"], "--domain",
                 "transmission", "--iterations", str(iterations), "--filters", str(filters), "--depth", str(depth),
                 "--out", str(models), "--name", USER_MODEL)
            report["training"] = {"iterations": iterations, "filters": filters, "depth": depth,
                                  "seconds": round(time.perf_counter() - t0, 1),
                                  "pairs": f"{frames} frame(s) each (field A and {frames - 1} more)",
                                  "domain": "transmission"}
            from phasestream.models.registry import Artifact

            manifest = Artifact.read(models / f"{USER_MODEL}-1.0.0").manifest
            report["training"]["validation"] = manifest["metrics"]["validation"]
            steps = manifest["steps"]
            low_gain = manifest["metrics"]["gain_over_bicubic_db"] < 1.0
            with ModelServerProcess(args=("--models-dir", str(models))) as proc:
                enhance = ["enhance", uids["lq_b"], "--source", "raw", "--model", USER_MODEL, "--tiled", server.uri,
                           "--models", proc.address]
                code = _cli(*enhance)
                report["refused_below_1_db"] = code == 3
                if code == 3:  # refused: the model's validated gain is below 1 dB; measured all the same, marked
                    _cli(*enhance, "--allow-low-gain")
                node = client["phasestream"][uids["lq_b"]]
                cli_out = node[f"enhanced/{USER_MODEL}/1.0.0/{steps}"].read()[0]
                lq_t = lq_b / estimate_i0(lq_b)
                reference = hq_b / estimate_i0(hq_b)
                bicubic = upscale(lq_t)
                api = {n: enhance_images(lq_t, domain="transmission", model=USER_MODEL, steps=n,
                                         allow_low_gain=low_gain, address=proc.address)["array"]
                       for n in sorted({*steps_list, steps})}
                shipped = enhance_images(-np.log(np.clip(lq_t, 1e-3, None)), domain="od", model=SHIPPED,
                                         address=proc.address)
        finally:
            close_embedded_tiled(server)
    report["held_out"] = {
        "default_steps": steps,
        "gain_cli_db": _gain(reference, cli_out, bicubic),
        "gain_api_db": _gain(reference, api[steps], bicubic),
        "bicubic": {"psnr_db": psnr(reference, bicubic), "ssim": ssim(reference, bicubic),
                    "edge_fwhm_px": median_edge_fwhm(reference, bicubic), "hf_correlation": hf_correlation(reference,
                                                                                                          bicubic)},
        "by_steps": {str(n): {"psnr_db": psnr(reference, out), "ssim": ssim(reference, out),
                              "edge_fwhm_px": median_edge_fwhm(reference, out),
                              "hf_correlation": hf_correlation(reference, out)} for n, out in api.items()},
    }
    held_out = report["held_out"]
    held_out["ceilings"] = ceilings(od_b, reference, bicubic)
    held_out["cli_api_difference_db"] = abs(held_out["gain_cli_db"] - held_out["gain_api_db"])
    od_reference = -np.log(np.clip(reference, 1e-3, None))
    od_bicubic = upscale(-np.log(np.clip(lq_t, 1e-3, None)))
    report["shipped_model_on_od"] = {"model": SHIPPED, "steps": shipped["steps"],
                                     "gain_db": _gain(od_reference, shipped["array"], od_bicubic),
                                     "hf_correlation": hf_correlation(od_reference, shipped["array"]),
                                     "hf_correlation_bicubic": hf_correlation(od_reference, od_bicubic)}
    return report
