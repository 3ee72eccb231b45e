"""InDI (Inversion by Direct Iteration) image enhancement: network, training, inference.

Method: "GenAI-enhanced 4D nano-tomography for advanced battery microstructure analysis"
(doi:10.1039/D5TA03471J; docs/models.md), "Training details and model architecture". A network
``F(x_t, t)`` is trained to predict the high-quality (HQ) image ``x`` from the blend
``x_t = (1 - t) x + t y`` of ``x`` and the low-quality (LQ) scan ``y`` (bicubic-upscaled to x's
size), ``t`` in [0, 1]. Restoration starts at ``x_1 = y`` and walks ``t`` down to 0 in ``N`` steps
of size ``d = 1/N``::

    x_{t-d} = (d / t) F(x_t, t) + (1 - d / t) x_t

(the last step, ``t = d``, returns ``F(x_d, d)``).

Network (:class:`InDINet`): a U-Net with 7x7 first and last convolutions and 3x3 elsewhere, base
filters doubled per down-sampling block, residual blocks with Swish activations to which a dense
projection of a sin/cos embedding of ``t`` is added, a bottleneck of plain and dilated
convolutions, nearest-neighbour up-sampling except the last up-sampling which is a sub-pixel
convolution (depth-to-space), and a tanh output. Images are normalized to [-1, 1] by the LQ
image's 0.5 and 99.5 percentiles (the same map for x and y, so it is known at inference).

Importing this module imports TensorFlow: callbacks never do; they go through the model server.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3  # noqa: F401 - before TensorFlow (its bundled SQLite would shadow Python's; Tiled needs FTS5)
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from phasestream.kernels.resample import upscale
from phasestream.metrics import hf_correlation, median_edge_fwhm, psnr, ssim
from phasestream.models.pairs import PERCENTILES, from_unit, normalization_of, prepare_pair, split_field, to_unit

__all__ = ["PERCENTILES", "InDINet", "InDITraining", "choose_steps", "enhance_image", "enhance_volume", "huber_like",
           "indi_restore", "normalization_of", "prepare_pair", "train_indi", "validate"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- network


@keras.saving.register_keras_serializable(package="phasestream")
class PixelShuffle(layers.Layer):
    """Sub-pixel convolution output rearrangement: (B, H, W, C r^2) -> (B, H r, W r, C)."""

    def __init__(self, factor: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)

    def call(self, x):
        return tf.nn.depth_to_space(x, self.factor)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor}


def time_embedding(t, dim: int):
    """sin/cos positional embedding (B, dim) of times ``t`` (B,) in [0, 1]."""
    half = dim // 2
    freqs = ops.exp(-math.log(10000.0) * ops.arange(half, dtype="float32") / max(half - 1, 1))
    angles = ops.cast(ops.reshape(t, (-1, 1)), "float32") * 1000.0 * freqs[None, :]
    return ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)


@keras.saving.register_keras_serializable(package="phasestream")
class ResidualBlock(layers.Layer):
    """conv - swish - (+ time) - conv - swish, plus a 1x1 projection of the input when widths differ."""

    def __init__(self, filters: int, dilation: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.dilation = int(filters), int(dilation)
        self.conv1 = layers.Conv2D(self.filters, 3, padding="same", dilation_rate=self.dilation)
        self.conv2 = layers.Conv2D(self.filters, 3, padding="same", dilation_rate=self.dilation)
        self.time = layers.Dense(self.filters)
        self.project = None

    def build(self, input_shape):
        if input_shape[-1] != self.filters:
            self.project = layers.Conv2D(self.filters, 1)

    def call(self, x, temb):
        h = ops.silu(self.conv1(x))
        h = h + self.time(temb)[:, None, None, :]
        h = ops.silu(self.conv2(h))
        return h + (self.project(x) if self.project is not None else x)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "filters": self.filters, "dilation": self.dilation}


@keras.saving.register_keras_serializable(package="phasestream")
class InDINet(keras.Model):
    """The InDI U-Net ``F(x_t, t)`` on single-channel images (see the module docstring).

    Parameters
    ----------
    base_filters : filters of the first block (64 in the paper; 16 trains on a CPU)
    depth : down-sampling blocks (image sides must be multiples of ``2**depth``)
    dilations : dilation rates of the bottleneck's residual blocks (1 = plain convolution)
    time_dim : size of the sin/cos time embedding
    """

    def __init__(self, base_filters: int = 16, depth: int = 2, dilations: Sequence[int] = (1, 2, 4, 1),
                 time_dim: int = 64, **kwargs):
        super().__init__(**kwargs)
        if depth < 1 or base_filters < 1:
            raise ValueError("depth and base_filters must be >= 1")
        self.base_filters, self.depth, self.time_dim = int(base_filters), int(depth), int(time_dim)
        self.dilations = [int(d) for d in dilations]
        widths = [self.base_filters * 2**i for i in range(self.depth + 1)]
        self.time_mlp = layers.Dense(self.time_dim, activation="silu")
        self.stem = layers.Conv2D(widths[0], 7, padding="same")
        self.down_blocks = [ResidualBlock(widths[i]) for i in range(self.depth)]
        self.downsample = [layers.Conv2D(widths[i + 1], 3, strides=2, padding="same") for i in range(self.depth)]
        self.bottleneck = [ResidualBlock(widths[-1], dilation=d) for d in self.dilations]
        self.upsample = []
        for i in reversed(range(self.depth)):
            if i == 0:  # the last up-sampling: sub-pixel convolution
                self.upsample.append([layers.Conv2D(widths[0] * 4, 3, padding="same"), PixelShuffle(2)])
            else:
                self.upsample.append([layers.UpSampling2D(2, interpolation="nearest"),
                                      layers.Conv2D(widths[i], 3, padding="same")])
        self.up_blocks = [ResidualBlock(widths[i]) for i in reversed(range(self.depth))]
        self.head = layers.Conv2D(1, 7, padding="same", activation="tanh")

    def call(self, inputs, training: bool = False):
        x, t = inputs
        temb = self.time_mlp(time_embedding(t, self.time_dim))
        h = self.stem(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downsample, strict=True):
            h = block(h, temb)
            skips.append(h)
            h = ops.silu(down(h))
        for block in self.bottleneck:
            h = block(h, temb)
        for (first, second), block, skip in zip(self.upsample, self.up_blocks, reversed(skips), strict=True):
            h = second(first(h))  # conv then pixel shuffle (last), or nearest up-sampling then conv
            h = block(ops.concatenate([ops.silu(h), skip], axis=-1), temb)
        return self.head(h)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this."""
        return 2**self.depth

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "base_filters": self.base_filters, "depth": self.depth,
                "dilations": self.dilations, "time_dim": self.time_dim}

    def build_for_inference(self) -> InDINet:
        n = 4 * self.multiple
        self((np.zeros((1, n, n, 1), "float32"), np.ones((1,), "float32")))
        return self

    @tf.function(reduce_retracing=True)
    def predict_x(self, x, t):
        return self((x, t), training=False)


# ---------------------------------------------------------------------------------------------- inference


def indi_restore(predict, y: np.ndarray, steps: int) -> np.ndarray:
    """The InDI iteration from ``x_1 = y`` in ``steps`` equal steps.

    ``predict(x, t)`` returns ``F(x_t, t)`` for an array ``x`` and a scalar ``t``. Pure NumPy around
    ``predict``, so it can be checked against closed forms.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = np.asarray(y, np.float32)
    d = 1.0 / steps
    for i in range(steps):
        t = 1.0 - i * d
        x = (d / t) * np.asarray(predict(x, t), np.float32) + (1.0 - d / t) * x
    return x


def _predict_tiled(model: InDINet, x: np.ndarray, t: float, tile: int, overlap: int) -> np.ndarray:
    """``F(x, t)`` of a (H, W) image in overlapping tiles; each tile keeps its centre."""
    h, w = x.shape
    m = model.multiple
    core = max(m, (tile - 2 * overlap) // m * m)
    if h <= tile and w <= tile:
        ph, pw = -h % m, -w % m
        padded = np.pad(x, ((0, ph), (0, pw)), mode="reflect")
        out = model.predict_x(tf.constant(padded[None, :, :, None]), tf.constant([t], tf.float32))
        return np.asarray(out)[0, :h, :w, 0]
    pad = overlap
    padded = np.pad(x, ((pad, pad + core), (pad, pad + core)), mode="reflect")
    out = np.empty_like(x)
    for y0 in range(0, h, core):
        for x0 in range(0, w, core):
            patch = padded[y0:y0 + core + 2 * pad, x0:x0 + core + 2 * pad]
            pred = np.asarray(model.predict_x(tf.constant(patch[None, :, :, None]), tf.constant([t], tf.float32)))
            y1, x1 = min(y0 + core, h), min(x0 + core, w)
            out[y0:y1, x0:x1] = pred[0, pad:pad + (y1 - y0), pad:pad + (x1 - x0), 0]
    return out


def enhance_image(model: InDINet, lq: np.ndarray, *, steps: int = 8, scale: int = 2, tile: int = 512,
                  overlap: int = 64, upscaled: bool = False) -> np.ndarray:
    """Enhance a low-quality image (Y, X): bicubic ``scale``x, normalize, InDI in ``steps``, back to
    intensities. Large images are processed in ``tile``-pixel tiles overlapping by ``overlap`` (memory
    bounded by the tile size; equal to whole-image inference where ``overlap`` exceeds the network's
    receptive field). NaN pixels are filled with the image median first.

    Returns (Y*scale, X*scale) float32 (or (Y, X) with ``upscaled=True``: ``lq`` is already upscaled).
    """
    lq = np.asarray(lq, np.float32)
    if lq.ndim != 2:
        raise ValueError(f"enhance_image takes a 2D image, got shape {lq.shape}")
    if min(lq.shape) < 4:
        raise ValueError(f"image {lq.shape} is too small to enhance")
    if not np.isfinite(lq).all():
        lq = np.where(np.isfinite(lq), lq, np.nanmedian(lq) if np.isfinite(lq).any() else 0.0)
    y = lq if upscaled else upscale(lq, scale)
    lo, hi = normalization_of(y)
    x = indi_restore(lambda a, t: _predict_tiled(model, a, t, tile, overlap), to_unit(y, lo, hi), steps)
    return from_unit(x, lo, hi)


def enhance_volume(model: InDINet, volume: np.ndarray, *, steps: int = 8, scale: int = 2, **kwargs) -> np.ndarray:
    """Enhance a (Z, Y, X) volume slice by slice, then bicubic interpolation by ``scale`` along Z."""
    from scipy import ndimage

    v = np.asarray(volume, np.float32)
    if v.ndim != 3:
        raise ValueError(f"enhance_volume takes a (Z, Y, X) volume, got shape {v.shape}")
    slices = np.stack([enhance_image(model, s, steps=steps, scale=scale, **kwargs) for s in v])
    if v.shape[0] < 2:
        return slices
    return ndimage.zoom(slices, (scale, 1, 1), order=3, mode="nearest").astype(np.float32)


# ---------------------------------------------------------------------------------------------- training


def huber_like(target, prediction):
    """Per-pixel mean of ``|e|`` where ``|e| <= 0.5`` and ``e^2 + 0.25`` above (continuous, with
    continuous slope at 0.5): MAE for small errors, MSE for large ones, as in the paper."""
    e = ops.abs(target - prediction)
    return ops.mean(ops.where(e <= 0.5, e, e * e + 0.25))


@dataclass
class InDITraining:
    """A trained InDI network, its validation metrics and the chosen number of steps."""

    model: InDINet
    metrics: dict[str, Any]
    steps: int
    history: list[float] = field(default_factory=list)


def _crops(hq: list[np.ndarray], lq: list[np.ndarray], n: int, size: int, rng: np.random.Generator):
    xs, ys = np.empty((n, size, size, 1), np.float32), np.empty((n, size, size, 1), np.float32)
    for k in range(n):
        i = rng.integers(len(hq))
        h, w = hq[i].shape
        r, c = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        a, b = hq[i][r:r + size, c:c + size], lq[i][r:r + size, c:c + size]
        rot = rng.integers(4)
        a, b = np.rot90(a, rot), np.rot90(b, rot)
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        xs[k, ..., 0], ys[k, ..., 0] = a, b
    return xs, ys


def train_indi(
    hq: Sequence[np.ndarray],
    lq_upscaled: Sequence[np.ndarray],
    *,
    base_filters: int = 16,
    depth: int = 2,
    crop: int = 64,
    batch_size: int = 8,
    iterations: int = 2000,
    max_learning_rate: float = 5e-4,
    validation_fraction: float = 0.2,
    step_candidates: Sequence[int] = (1, 2, 4, 6, 8, 10, 15, 20),
    t_one_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> InDITraining:
    """Train InDI on registered pairs (one is enough): HQ images and LQ images upscaled to the same shape.

    Each pair's field is split (:func:`phasestream.models.pairs.split_field`): a band at the end of its
    longer axis (``validation_fraction``) is held out, a separate area of the field, never a frame of
    the same area. Training crops of ``crop`` pixels come from the rest, with random flips and 90-degree
    rotations; ``t`` is drawn uniformly in [0, 1] with a fraction ``t_one_fraction`` set exactly to 1
    (the pure-LQ start of every restoration); Adam with a one-cycle schedule (linear warm-up over 30% of
    the iterations to ``max_learning_rate``, cosine decay after); loss :func:`huber_like` on
    ``F(x_t, t)`` vs ``x``.

    The validation bands choose the number of steps (:func:`choose_steps`: by PSNR, never past a step
    count whose high-frequency correlation with HQ falls below that of 1 step) and give the metrics the
    manifest keeps: PSNR, SSIM, edge FWHM, high-frequency correlation, and the same for bicubic
    up-sampling, with the gain over it (``metrics["validation"]``).
    """
    from tqdm import tqdm

    if len(hq) != len(lq_upscaled) or len(hq) < 1:
        raise ValueError(f"need HQ/LQ pairs of equal count (one is enough), got {len(hq)} and {len(lq_upscaled)}")
    train, val = [], []
    for i, (h, lqu) in enumerate(zip(hq, lq_upscaled, strict=True)):
        h, lqu = np.asarray(h, np.float32), np.asarray(lqu, np.float32)
        if h.shape != lqu.shape:
            raise ValueError(f"pair {i}: HQ {h.shape} and upscaled LQ {lqu.shape} differ; use prepare_pair")
        region, held_out = split_field(h.shape, crop=crop, fraction=validation_fraction)
        lo, hi = normalization_of(lqu[region])
        train.append((to_unit(h[region], lo, hi), to_unit(lqu[region], lo, hi)))
        val.append((h[held_out], lqu[held_out], (lo, hi)))
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = InDINet(base_filters=base_filters, depth=depth).build_for_inference()
    warm = max(1, int(0.3 * iterations))
    schedule = keras.optimizers.schedules.CosineDecay(max_learning_rate / 25, decay_steps=max(1, iterations - warm),
                                                      warmup_target=max_learning_rate, warmup_steps=warm)
    optimizer = keras.optimizers.Adam(schedule)

    @tf.function
    def step(x, y, t):
        tt = tf.reshape(t, (-1, 1, 1, 1))
        xt = (1.0 - tt) * x + tt * y
        with tf.GradientTape() as tape:
            loss = huber_like(x, model((xt, t), training=True))
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
        return loss

    history = []
    hq_tr, lq_tr = [p[0] for p in train], [p[1] for p in train]
    bar = tqdm(range(iterations), desc="InDI", unit="it", disable=not progress)
    for i in bar:
        x, y = _crops(hq_tr, lq_tr, batch_size, crop, rng)
        t = rng.uniform(0, 1, batch_size).astype(np.float32)
        t[rng.random(batch_size) < t_one_fraction] = 1.0
        loss = float(step(tf.constant(x), tf.constant(y), tf.constant(t)))
        history.append(loss)
        if i % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-20:]):.4f}", refresh=False)
    validation = validate(model, val, step_candidates)
    validation["region"] = {"fraction": validation_fraction, "where": "a band at the end of each field's longer axis",
                            "shapes": [list(v[0].shape) for v in val]}
    steps = validation["steps"]
    metrics: dict[str, Any] = {
        "iterations": iterations, "final_loss": float(np.mean(history[-50:])), "validation_pairs": len(val),
        "psnr_by_steps": {n: v["psnr_db"] for n, v in validation["by_steps"].items()},
        "validation_psnr": validation["psnr_db"], "validation_psnr_bicubic": validation["bicubic"]["psnr_db"],
        "gain_over_bicubic_db": validation["gain_over_bicubic_db"], "steps": steps, "validation": validation}
    logger.info("trained InDI: %s", {k: v for k, v in metrics.items() if k != "validation"})
    return InDITraining(model=model, metrics=metrics, steps=steps, history=history)


def choose_steps(by_steps: dict[str, dict[str, float]], *, tolerance_db: float = 0.05) -> int:
    """The default number of steps: the fewest within ``tolerance_db`` of the best PSNR among the step counts
    below the first one whose high-frequency correlation with HQ is lower than at the fewest steps (more
    steps past that point add texture the truth does not have)."""
    counts = sorted(int(n) for n in by_steps)
    floor = by_steps[str(counts[0])]["hf_correlation"]
    allowed = []
    for n in counts:
        if by_steps[str(n)]["hf_correlation"] < floor:
            break
        allowed.append(n)
    best = max(by_steps[str(n)]["psnr_db"] for n in allowed)
    return min(n for n in allowed if by_steps[str(n)]["psnr_db"] >= best - tolerance_db)


def _quality(reference: np.ndarray, image: np.ndarray) -> dict[str, float | None]:
    return {"psnr_db": psnr(reference, image), "ssim": ssim(reference, image),
            "edge_fwhm_px": median_edge_fwhm(reference, image, border=4),
            "hf_correlation": hf_correlation(reference, image)}


def _mean(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def validate(model: InDINet, pairs: Sequence[tuple[np.ndarray, np.ndarray, tuple[float, float]]],
             step_candidates: Sequence[int] = (1, 2, 4, 6, 8, 10, 15, 20)) -> dict[str, Any]:
    """Quality of ``model`` on held-out ``(hq, lq_upscaled, (lo, hi))`` pairs, in their intensities: PSNR and
    high-frequency correlation by steps, the chosen steps (:func:`choose_steps`), PSNR, SSIM, median edge
    FWHM (px) and HF correlation at those steps and for bicubic up-sampling, and the gain over bicubic."""
    by_steps: dict[str, dict[str, float]] = {}
    outputs = {}
    for n in sorted(set(int(s) for s in step_candidates)):
        rows = []
        outputs[n] = []
        for h, lqu, (lo, hi) in pairs:
            out = from_unit(indi_restore(lambda a, t: _predict_tiled(model, a, t, 512, 64), to_unit(lqu, lo, hi), n),
                            lo, hi)
            outputs[n].append(out)
            rows.append({"psnr_db": psnr(h, out), "hf_correlation": hf_correlation(h, out)})
        by_steps[str(n)] = _mean(rows)
    steps = choose_steps(by_steps)
    chosen = _mean([_quality(h, out) for (h, _, _), out in zip(pairs, outputs[steps], strict=True)])
    bicubic = _mean([_quality(h, lqu) for h, lqu, _ in pairs])
    hq_fwhm = _mean([{"w": median_edge_fwhm(h, h, border=4)} for h, _, _ in pairs])["w"]
    return {"pairs": len(pairs), "steps": steps, "by_steps": by_steps, **chosen, "bicubic": bicubic,
            "hq_edge_fwhm_px": hq_fwhm, "gain_over_bicubic_db": chosen["psnr_db"] - bicubic["psnr_db"]}
