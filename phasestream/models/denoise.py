"""Self-supervised denoising of (E, Y, X) energy stacks: spectral components and a blind-row network.

Why this design (docs/models.md#denoising):

* **Energy axis: spectral components.** A stack of a few phases has spectra in a
  low-dimensional space: the signal of 13 energies lies in about as many components as there are
  phases, and the other components are noise. The OD is whitened per energy (by its own noise
  level), and the components that hold signal are found from the covariance *across* scan lines,
  to which noise independent between lines adds nothing on average (``models/spectra.py``; the
  ordinary covariance lost weak phases under line-correlated noise). Dropping the rest removes
  most of the noise of the spectral dimensions at no spatial cost, and it cannot make a new phase:
  every denoised spectrum is the mean plus a combination of the stack's own leading components.
  The alternative, a 2.5-D network with neighbouring energies as channels, learns the same
  redundancy slowly and differently per energy set; the components work for any energies and let
  one small network serve every component image, so training and inference are per image.
* **Noise correlated along the scan lines: a blind-row network.** In a scanning microscope the
  incident flux changes from line to line and drifts along a line (``phasestream.sim.noise``). A
  blind-spot denoiser (Noise2Void, Noise2Self) that sees the other pixels of the line learns to
  predict that noise and keeps it. structN2V masks a segment of the line around the blind spot;
  here the mask is the whole line, built into the network instead of drawn on the input (the
  blind-spot construction of Laine et al.): one branch sees only the rows above, one (the same
  weights on the flipped image) only the rows below, each shifted by one row, and 1x1 convolutions
  combine them into per-pixel weights of local means of the other lines, a convex combination (a
  first version that predicted the value freely learned to shrink weak components, the phase
  contrast, towards zero). Its likelihood under the predicted mean and variance is the loss (the
  pixel itself being the mean plus unit noise), and the output is the posterior mean in the strong
  components, the predicted mean in the weak ones (``POSTERIOR_SNR``). The
  prediction for a pixel never depends on its own scan line, so noise that is
  independent between lines is unpredictable, every pixel is a training target (Noise2Self:
  the expected loss is that against the clean image plus a constant), no input pixels are
  replaced, and inference needs no masks.
* **Speed.** Each component image is normalized by its noise level, so a network pretrained on
  simulated stacks (``denoise-stxm-synthetic``) is fine-tuned on the scan itself in a few hundred
  steps; a guide channel (the first, highest-SNR component) gives every component the sample's edges.

References: J. Batson, L. Royer, "Noise2Self", ICML 2019, arXiv:1901.11365; A. Krull et al.,
"Noise2Void", CVPR 2019, arXiv:1811.10980; C. Broaddus et al., "Removing structured noise with
self-supervised blind-spot networks" (structN2V), ISBI 2020, doi:10.1109/ISBI45749.2020.9098336;
S. Laine et al., "High-quality self-supervised deep image denoising", NeurIPS 2019,
arXiv:1901.10277.

Importing this module imports TensorFlow: callbacks never do; they go through the model server.
"""

from __future__ import annotations

import logging
import os
import sqlite3  # noqa: F401 - before TensorFlow (its bundled SQLite would shadow Python's; Tiled needs FTS5)
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from phasestream.models.spectra import (
    SpectralComponents,
    line_noise_level,
    shape_average,
    shape_averaging_settings,
    spectral_components,
)

__all__ = ["BlindRowNet", "DenoiseTraining", "Denoised", "SpectralComponents", "blind_row_loss", "denoise_stack",
           "image_denoiser", "line_noise_level", "posterior_mean", "shape_average", "spectral_components",
           "train_denoiser"]

logger = logging.getLogger(__name__)

#: A component's own pixel value enters its denoised value (the posterior mean) only where the
#: component rises this far above the noise floor (its variance / floor: its signal variance is then at
#: least 3 times the noise's). In the weak components, where the phase contrast lies, a pixel is
#: mostly noise and the network's predicted mean is kept (measured in docs/models.md#denoising).
POSTERIOR_SNR = 4.0


# ---------------------------------------------------------------------------------------------- network


@keras.saving.register_keras_serializable(package="phasestream")
class UpwardConv(layers.Layer):
    """3x3 convolution whose output row ``r`` sees input rows ``r - 2d .. r`` only (``d`` the dilation)."""

    def __init__(self, filters: int, dilation: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.dilation = int(filters), int(dilation)
        self.conv = layers.Conv2D(self.filters, 3, dilation_rate=self.dilation, padding="valid")

    def call(self, x):
        d = self.dilation
        return self.conv(ops.pad(x, [[0, 0], [2 * d, 0], [d, d], [0, 0]]))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "filters": self.filters, "dilation": self.dilation}


def upward_box_mean(x, k: int, side: str = "centre"):
    """Mean of ``x`` (B, Y, X, C) over rows ``r - k .. r`` and columns ``c - k .. c + k`` (``side``
    ``"left"``: ``c - k .. c``, ``"right"``: ``c .. c + k``); zeros outside the image."""
    left, right = {"centre": (k, k), "left": (k, 0), "right": (0, k)}[side]
    padded = ops.pad(x, [[0, 0], [k, 0], [left, right], [0, 0]])
    return ops.average_pool(padded, (k + 1, left + right + 1), strides=1, padding="valid")


def _shift_down(x):
    """Row ``r`` of the result is row ``r - 1`` of ``x`` (zeros in row 0)."""
    return ops.pad(x, [[0, 0], [1, 0], [0, 0], [0, 0]])[:, :-1]


def candidate_means(x, box_sizes: Sequence[int]):
    """(B, Y, X, M) local means of ``x`` (B, Y, X, 1) over the lines strictly above each pixel, and
    over those strictly below: the pixel right above (below) it, and boxes of half-width ``k`` that
    are centred on its column or end at it on the left or the right; ``M = 2 (1 + 3 len(box_sizes))``.
    Averages weight their pixels by the share of the box inside the image."""
    n = ops.shape(x)[0]
    both = ops.concatenate([x, ops.flip(x, axis=1)], axis=0)
    ones = ops.ones_like(both)
    means = [both]
    for k in box_sizes:
        for side in ("centre", "left", "right"):
            means.append(upward_box_mean(both, k, side) / ops.maximum(upward_box_mean(ones, k, side), 1e-6))
    up = _shift_down(ops.concatenate(means, axis=-1))
    return ops.concatenate([up[:n], ops.flip(up[n:], axis=1)], axis=-1)


@keras.saving.register_keras_serializable(package="phasestream")
class BlindRowNet(keras.Model):
    """Predicts each pixel of a component image from the other scan lines only (module docstring).

    Input (B, Y, X, 2): the component image in units of its noise and the guide (the first
    component, of unit standard deviation); the branch sees the component through ``asinh``.
    Output (B, Y, X, 2): the mean ``mu`` and log-variance ``log s^2`` of the clean component
    predicted from the other lines (Laine et al.'s prior; :func:`blind_row_loss`,
    :func:`posterior_mean`). ``mu`` is a convex combination of local means of the other lines
    (:func:`candidate_means`) with weights the network predicts per pixel (kernel prediction): it
    chooses the scale and side of its smoothing but cannot shrink a contrast. Row ``r`` of the
    output depends on input rows above ``r`` (one branch)
    and below ``r`` (the same branch on the flipped image), never on row ``r``.

    Parameters
    ----------
    filters : width of the branch's convolutions
    dilations : one upward 3x3 convolution per entry (residual after the first); the receptive
        field reaches ``1 + 2 * sum(dilations)`` rows up or down and ``sum(dilations)`` columns aside
    head : width of the two 1x1 convolutions that combine the branches
    box_sizes : half-widths ``k`` of the fixed upward box means given to the branch beside its
        input (:func:`upward_box_mean`), and of the local means the output mean is a convex
        combination of (:func:`candidate_means`; the network predicts the weights)
    """

    def __init__(self, filters: int = 16, dilations: Sequence[int] = (1, 2, 4, 8), head: int = 32,
                 box_sizes: Sequence[int] = (2, 4, 8, 16), **kwargs):
        super().__init__(**kwargs)
        self.box_sizes = [int(k) for k in box_sizes]
        self.filters, self.head_width = int(filters), int(head)
        self.dilations = [int(d) for d in dilations]
        if not self.dilations or self.filters < 1 or any(k < 1 for k in self.box_sizes):
            raise ValueError("need at least one convolution, one filter and box sizes >= 1")
        self.convs = [UpwardConv(self.filters, d) for d in self.dilations]
        self.head1 = layers.Conv2D(self.head_width, 1)
        self.head2 = layers.Conv2D(self.head_width, 1)
        self.out = layers.Conv2D(2 * (1 + 3 * len(self.box_sizes)) + 1, 1)

    def call(self, x, training: bool = False):
        n = ops.shape(x)[0]
        h = ops.concatenate([x, ops.flip(x, axis=1)], axis=0)
        h = ops.concatenate([ops.arcsinh(h[..., :1]), h[..., 1:]], axis=-1)  # strong components compressed
        h = ops.concatenate([h] + [upward_box_mean(h, k) for k in self.box_sizes], axis=-1)
        for i, conv in enumerate(self.convs):
            h = ops.silu(conv(h)) if i == 0 else h + ops.silu(conv(h))
        h = _shift_down(h)  # row r sees rows < r
        h = ops.concatenate([h[:n], ops.flip(h[n:], axis=1)], axis=-1)
        out = self.out(ops.silu(self.head2(ops.silu(self.head1(h)))))
        # the mean is a convex combination of local means of the other lines: it can choose the scale
        # and side of its smoothing, but never scale a contrast down or make a value none of them has
        weights = ops.softmax(out[..., :-1], axis=-1)
        mu = ops.sum(weights * candidate_means(x[..., :1], self.box_sizes), axis=-1, keepdims=True)
        return ops.concatenate([mu, out[..., -1:]], axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "filters": self.filters, "dilations": self.dilations, "head": self.head_width,
                "box_sizes": self.box_sizes}

    def build_for_inference(self) -> BlindRowNet:
        self(np.zeros((1, 16, 16, 2), "float32"))
        return self

    @tf.function(reduce_retracing=True)
    def predict_images(self, x):
        return self(x, training=False)


# ---------------------------------------------------------------------------------------------- training


def blind_row_loss(y, out):
    """Self-supervised loss: negative log-likelihood (up to constants) of the noisy pixel ``y``
    (B, Y, X) under ``N(mu, s^2 + 1)``, the predicted clean value plus noise of unit variance."""
    mu, v = out[..., 0], ops.exp(ops.clip(out[..., 1], -12.0, 12.0)) + 1.0
    return ops.mean(ops.square(y - mu) / v + ops.log(v))


def posterior_mean(y, out):
    """The clean value given the prediction ``N(mu, s^2)`` and the pixel ``y`` with unit noise:
    ``(mu + s^2 y) / (s^2 + 1)``. Where the other lines predict the pixel well (``s^2`` small) it is
    ``mu``; at an edge along the line, where they cannot, the pixel's own value weighs in."""
    mu, s2 = out[..., 0], np.exp(np.clip(out[..., 1], -12.0, 12.0))
    return (mu + s2 * y) / (s2 + 1.0)


def _inputs(sc: SpectralComponents) -> np.ndarray:
    """(K, Y, X, 2) float32 network inputs: each component in units of its noise, and the guide
    (the first component) scaled to unit standard deviation."""
    c = sc.components / sc.noise[:, None, None]
    guide = sc.components[0] / max(float(sc.components[0].std()), 1e-12)
    return np.stack([c, np.broadcast_to(guide, c.shape)], axis=-1).astype(np.float32)


@dataclass
class DenoiseTraining:
    """A trained (or fine-tuned) blind-row network, its loss history and metrics."""

    model: BlindRowNet
    metrics: dict[str, Any]
    history: list[float] = field(default_factory=list)


def _crops(images: list[np.ndarray], n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, size, size, 2), np.float32)
    for k in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        r, c = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        a = img[r:r + size, c:c + size]
        if rng.random() < 0.5:  # flips keep the scan lines horizontal; no transposes, no 90-degree turns
            a = a[::-1]
        if rng.random() < 0.5:
            a = a[:, ::-1]
        out[k] = a * rng.choice([-1.0, 1.0], 2).astype(np.float32)  # component signs are arbitrary
    return out


def train_denoiser(
    stacks: Sequence[np.ndarray],
    *,
    model: BlindRowNet | None = None,
    steps: int = 300,
    crop: int = 48,
    batch_size: int = 8,
    learning_rate: float = 2e-3,
    filters: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> DenoiseTraining:
    """Train a :class:`BlindRowNet` on noisy OD stacks alone (each (E, Y, X)): self-supervised.

    The stacks' spectral components (:func:`spectral_components`) are the training images; the
    loss (:func:`blind_row_loss`) compares the network's prediction from the other lines with the
    noisy input over every pixel of random ``crop``-pixel crops (flips and sign changes only). With ``model``
    the given network is fine-tuned (a copy; the original is untouched), else a new one with
    ``filters`` is trained. Adam, learning rate cosine-decayed over ``steps``.
    """
    images = []
    for i, od in enumerate(stacks):
        sc = spectral_components(od)
        if min(sc.components.shape[1:]) < crop:
            raise ValueError(f"stack {i}: images {sc.components.shape[1:]} are smaller than the crop {crop}")
        images.extend(_inputs(sc))
    if not images:
        raise ValueError("no stacks to train on")
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if model is None:
        net = BlindRowNet(filters=filters).build_for_inference()
    else:
        net = BlindRowNet.from_config(model.get_config()).build_for_inference()
        net.set_weights(model.get_weights())
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps)))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = blind_row_loss(x[..., 0], net(x, training=True))
        grads = tape.gradient(loss, net.trainable_weights)
        optimizer.apply_gradients(zip(grads, net.trainable_weights, strict=True))
        return loss

    t0 = time.perf_counter()
    history = []
    for i in range(steps):
        history.append(float(step(tf.constant(_crops(images, batch_size, crop, rng)))))
        if progress and i % 50 == 0:
            logger.info("denoiser step %d: loss %.4f", i, np.mean(history[-50:]))
    seconds = time.perf_counter() - t0
    metrics = {"steps": steps, "crop": crop, "batch_size": batch_size, "images": len(images),
               "final_loss": float(np.mean(history[-50:])) if history else None, "seconds": round(seconds, 2)}
    return DenoiseTraining(model=net, metrics=metrics, history=history)


# ---------------------------------------------------------------------------------------------- inference


@dataclass
class Denoised:
    """A denoised stack and how it was made.

    Attributes
    ----------
    od : (E, Y, X) float32 denoised OD
    components : number of spectral components kept
    info : eigenvalues (ordinary and across-line), noise levels, fine-tuning metrics, seconds; with a
        model, ``posterior_components``, ``shape_averaged_components`` and ``shape_averaging`` (the
        averaging's settings, :func:`~phasestream.models.spectra.shape_averaging_settings`; None when
        no component was averaged)
    """

    od: np.ndarray
    components: int
    info: dict[str, Any]


def _predict(model: BlindRowNet, inputs: np.ndarray, tile_rows: int, *,
             posterior: bool | Sequence[bool] = True) -> np.ndarray:
    """(K, Y, X) denoised components, in row tiles with a margin of the receptive field (memory stays
    bounded; the result equals whole-image inference): the :func:`posterior_mean` of each component
    where ``posterior`` (one flag, or one per component) is true, the predicted mean elsewhere."""
    k, h = inputs.shape[:2]
    flags = np.broadcast_to(np.asarray(posterior, bool), (k,))
    margin = 2 + 2 * sum(model.dilations) + max(model.box_sizes, default=0)
    out = np.empty(inputs.shape[:3], np.float32)
    for i in range(k):
        for r0 in range(0, h, tile_rows):
            a, b = max(0, r0 - margin), min(h, r0 + tile_rows + margin)
            pred = np.asarray(model.predict_images(tf.constant(inputs[i:i + 1, a:b])))[0]
            rows = slice(r0 - a, r0 - a + min(tile_rows, h - r0))
            out[i, r0:min(h, r0 + tile_rows)] = (posterior_mean(inputs[i, a:b, :, 0][rows], pred[rows]) if flags[i]
                                                 else pred[rows, :, 0])
    return out


def denoise_stack(
    model: BlindRowNet | None,
    od: np.ndarray,
    *,
    fine_tune_steps: int = 0,
    components: int | None = None,
    tile_rows: int = 256,
    seed: int = 0,
    shape_averaging: bool = True,
    **train_options: Any,
) -> Denoised:
    """Denoise an OD stack (E, Y, X): spectral components, the blind-row network on each, back.

    With ``fine_tune_steps`` the network is first fine-tuned on this stack
    (:func:`train_denoiser`, self-supervised; ``model=None`` trains a new one from scratch). With
    ``model=None`` and no steps only the spectral projection is applied (components above the noise
    floor, no spatial denoising). The network's predicted mean of the weak components is then the
    pilot of :func:`shape_average` (unless ``shape_averaging`` is false). NaN pixels are filled (with
    the energy's median) before and denoised like the rest.
    """
    t0 = time.perf_counter()
    od = np.asarray(od, np.float64)
    sc = spectral_components(od, components=components)
    info: dict[str, Any] = {"eigenvalues": [round(float(v), 4) for v in sc.eigenvalues],
                            "signal_eigenvalues": [round(float(v), 4) for v in sc.signal],
                            "noise_floor": round(sc.noise_floor, 4), "component_noise": sc.noise.round(5).tolist()}
    if fine_tune_steps > 0:
        trained = train_denoiser([od], model=model, steps=fine_tune_steps, seed=seed, **train_options)
        model, info["fine_tune"] = trained.model, trained.metrics
    if model is None:
        out = sc.reconstruct()
    else:
        posterior = sc.variance >= POSTERIOR_SNR * sc.noise_floor
        info["posterior_components"] = int(posterior.sum())
        pred = _predict(model, _inputs(sc), tile_rows, posterior=posterior) * sc.noise[:, None, None]
        averaged = 0
        if shape_averaging:
            pred, averaged = shape_average(sc, pred, ~posterior)
        info["shape_averaged_components"] = averaged
        info["shape_averaging"] = shape_averaging_settings() if averaged else None
        out = sc.reconstruct(pred)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return Denoised(out.astype(np.float32), int(sc.basis.shape[1]), info)


def image_denoiser(model: BlindRowNet, *, tile_rows: int = 256):
    """The network as a plug-and-play denoiser ``(image, sigma) -> image`` of one (Y, X) image with
    noise of standard deviation ``sigma`` (RUM-PnP's ``denoiser``; its name is ``"learned"``).

    The image (less its mean) in units of ``sigma`` is the component channel and, scaled to unit
    standard deviation, its own guide. The result is the network's mean from the other lines
    (not the posterior mean: its variance head is calibrated on component images, not on the
    ADMM's iterates, and the ADMM weighs the data itself).
    """

    def learned(image: np.ndarray, sigma: float) -> np.ndarray:
        img = np.asarray(image, np.float64)
        s, mean = max(float(sigma), 1e-12), float(img.mean())
        centred = img - mean
        inputs = np.stack([centred / s, centred / max(float(centred.std()), 1e-12)], axis=-1)[None]
        return _predict(model, inputs.astype(np.float32), tile_rows, posterior=False)[0].astype(np.float64) * s + mean

    return learned
