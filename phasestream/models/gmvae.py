"""Gaussian-mixture variational autoencoder (GMVAE) of per-pixel XANES spectra.

The network of the PCC-GMVAE phase-mapping paper ("AI-Driven Phase Identification from X-ray Hyperspectral
Imaging of cycled Na-ion Cathode Materials", doi:10.48550/arXiv.2603.07666; docs/models.md), sections 3.3
and 6.6, in Keras 3 on TensorFlow:

* input normalization (:class:`SpectrumNormalization`, part of the saved model),
* encoder: dense 512-256-128-64, each ReLU then batch normalization then dropout, to the mean and
  log-variance of a 3-D latent ``z`` and the probabilities ``q(c|x)`` of ``K`` mixture components,
* a learned Gaussian-mixture prior ``p(z|c) = N(mu_c, diag(sigma_c^2))`` with uniform ``p(c)``,
* decoder: dense 64-128-256-512 (ReLU, batch normalization, dropout) and a linear output layer that
  reconstructs the normalized spectrum.

Training is :func:`train_gmvae`: spectra in, ``(model, metrics)`` out. Inference is
:meth:`GMVAE.encode` (latent means and component probabilities) and :meth:`GMVAE.decode`.
Importing this module imports TensorFlow: callbacks never do; they go through the model server.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3  # noqa: F401 - before TensorFlow: its bundled SQLite (no FTS5) would shadow Python's, which Tiled needs
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

__all__ = ["GMVAE", "NORMALIZATIONS", "SpectrumNormalization", "TrainingResult", "cluster_purity", "fit_normalization",
           "per_phase_purity", "train_gmvae"]

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("spectrum", "feature")
_EPS = 1e-6
_LOG_2PI = math.log(2.0 * math.pi)


@keras.saving.register_keras_serializable(package="phasestream")
class SpectrumNormalization(layers.Layer):
    """Input normalization of spectra (N, E), saved with the model.

    ``mode="spectrum"``: each spectrum to zero mean and unit standard deviation over its energies
    (its shape only, as the Pearson correlation sees it), then ``(x - mean) / scale`` per energy
    with the training set's statistics of those standardized spectra.
    ``mode="feature"``: ``(x - mean) / scale`` per energy on the spectra as measured (OD), so that
    the latent also carries thickness (overall absorption).
    """

    def __init__(self, mode: str = "spectrum", mean: Sequence[float] = (), scale: Sequence[float] = (), **kwargs):
        super().__init__(**kwargs)
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization mode must be one of {NORMALIZATIONS}, got {mode!r}")
        self.mode = mode
        self.mean_values = [float(v) for v in mean]
        self.scale_values = [float(v) for v in scale]
        if len(self.mean_values) != len(self.scale_values):
            raise ValueError("normalization mean and scale must have the same length")
        if any(s <= 0 for s in self.scale_values):
            raise ValueError("normalization scales must be > 0")

    def call(self, x):
        if self.mode == "spectrum":
            x = standardize_spectra(x)
        if self.mean_values:
            x = (x - ops.convert_to_tensor(self.mean_values, dtype=x.dtype)) / ops.convert_to_tensor(
                self.scale_values, dtype=x.dtype)
        return x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode, "mean": self.mean_values, "scale": self.scale_values}


def standardize_spectra(x):
    """Each spectrum (last axis) to zero mean, unit standard deviation (works on NumPy and tensors)."""
    mean = ops.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    std = ops.sqrt(ops.mean(centred * centred, axis=-1, keepdims=True))
    return centred / (std + _EPS)


def fit_normalization(spectra: np.ndarray, mode: str = "spectrum") -> dict[str, Any]:
    """The normalization (``{"mode", "mean", "scale"}``) fitted on training spectra (N, E)."""
    x = np.asarray(spectra, dtype=np.float64)
    if mode == "spectrum":
        x = np.asarray(standardize_spectra(x))
    elif mode not in NORMALIZATIONS:
        raise ValueError(f"normalization mode must be one of {NORMALIZATIONS}, got {mode!r}")
    scale = x.std(axis=0)
    scale = np.where(scale > _EPS, scale, 1.0)
    return {"mode": mode, "mean": x.mean(axis=0).tolist(), "scale": scale.tolist()}


def _dense_block(units: Sequence[int], dropout: float, prefix: str) -> list[layers.Layer]:
    block: list[layers.Layer] = []
    for i, n in enumerate(units):
        block += [layers.Dense(n, activation="relu", name=f"{prefix}_dense_{i}"),
                  layers.BatchNormalization(name=f"{prefix}_bn_{i}"),
                  layers.Dropout(dropout, name=f"{prefix}_dropout_{i}")]
    return block


@keras.saving.register_keras_serializable(package="phasestream")
class GMVAE(keras.Model):
    """Gaussian-mixture VAE of spectra with ``n_energies`` points.

    Loss per spectrum (averaged over a batch), with ``x~`` the normalized input, ``x^`` the
    reconstruction, ``q(z|x) = N(mu, diag(sigma^2))``, ``q(c|x) = pi`` (softmax of the encoder's
    component head) and the prior ``p(z|c) = N(mu_c, diag(sigma_c^2))``, ``p(c) = 1/K``::

        L = sum_e (x~_e - x^_e)^2                                  reconstruction (E x MSE)
            + beta * sum_c pi_c * KL(N(mu, sigma^2) || N(mu_c, sigma_c^2))   mixture KL of z
            + beta * sum_c pi_c * log(K * pi_c)                    KL(q(c|x) || uniform), categorical
            - gamma * [y >= 0] * log pi_y                          supervision (semi-supervised training)

    with the Gaussian KL in closed form,
    ``KL = 1/2 sum_d [log(sigma_c^2 / sigma^2) + (sigma^2 + (mu - mu_c)^2) / sigma_c^2 - 1]``.
    ``z`` is sampled with the reparameterization trick while training; inference uses ``mu``.

    Semi-supervised training (Kingma et al., "Semi-supervised learning with deep generative models",
    NeurIPS 2014, arXiv:1406.5298): a spectrum with a component label ``y >= 0`` (a confident PCC
    phase, component ``k`` = phase ``k``) adds the cross-entropy of ``q(c|x)`` against ``y``,
    weighted by ``gamma`` (``supervision_weight``); a spectrum with ``y = -1`` is trained as without
    labels. ``fit(x, y)`` trains with labels, ``fit(x)`` without.

    Parameters
    ----------
    n_energies : spectrum length E
    n_components : mixture components K (usually the number of reference phases)
    latent_dim : latent dimensions (3 in the paper)
    hidden : encoder widths; the decoder mirrors them
    dropout : dropout rate after each hidden layer
    beta : weight of the KL terms
    normalization : ``{"mode", "mean", "scale"}`` of :class:`SpectrumNormalization`
    supervision_weight : ``gamma``, weight of the cross-entropy of labelled spectra
    """

    def __init__(
        self,
        n_energies: int,
        n_components: int = 5,
        latent_dim: int = 3,
        hidden: Sequence[int] = (512, 256, 128, 64),
        dropout: float = 0.1,
        beta: float = 1.0,
        normalization: dict[str, Any] | None = None,
        supervision_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if n_energies < 2 or n_components < 1 or latent_dim < 1:
            raise ValueError(f"need n_energies >= 2, n_components >= 1, latent_dim >= 1; got "
                             f"{n_energies}, {n_components}, {latent_dim}")
        self.n_energies, self.n_components, self.latent_dim = int(n_energies), int(n_components), int(latent_dim)
        self.hidden, self.dropout_rate, self.beta = [int(h) for h in hidden], float(dropout), float(beta)
        self.supervision_weight = float(supervision_weight)
        self.normalization = dict(normalization or {"mode": "spectrum"})
        self.normalize = SpectrumNormalization(**self.normalization, name="normalize")
        self.encoder_layers = _dense_block(self.hidden, self.dropout_rate, "encoder")
        self.z_mean = layers.Dense(self.latent_dim, name="z_mean")
        self.z_log_var = layers.Dense(self.latent_dim, name="z_log_var")
        self.component_logits = layers.Dense(self.n_components, name="component_logits")
        self.decoder_layers = _dense_block(self.hidden[::-1], self.dropout_rate, "decoder")
        self.reconstruction = layers.Dense(self.n_energies, activation=None, name="reconstruction")
        spread = 2.0 * np.array([[math.cos(2 * math.pi * c / self.n_components + d) for d in range(self.latent_dim)]
                                 for c in range(self.n_components)], dtype="float32")
        self.prior_mean = self.add_weight(shape=(self.n_components, self.latent_dim), name="prior_mean",
                                          initializer=keras.initializers.Constant(spread))
        self.prior_log_var = self.add_weight(shape=(self.n_components, self.latent_dim), name="prior_log_var",
                                             initializer="zeros")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.supervision_tracker = keras.metrics.Mean(name="supervision")

    # ------------------------------------------------------------------ network

    def encode_tensors(self, x, training: bool = False):
        """``(z_mean, z_log_var, component_probabilities)`` of raw spectra ``x`` (N, E)."""
        h = self.normalize(x)
        for layer in self.encoder_layers:
            h = layer(h, training=training)
        return self.z_mean(h), self.z_log_var(h), ops.softmax(self.component_logits(h), axis=-1)

    def decode_tensors(self, z, training: bool = False):
        """Normalized spectra (N, E) reconstructed from latent points ``z`` (N, latent_dim)."""
        h = z
        for layer in self.decoder_layers:
            h = layer(h, training=training)
        return self.reconstruction(h)

    def call(self, x, training: bool = False):
        z_mean, z_log_var, probabilities = self.encode_tensors(x, training=training)
        if training:
            eps = keras.random.normal(ops.shape(z_mean), seed=self._seed_generator())
            z = z_mean + ops.exp(0.5 * z_log_var) * eps
        else:
            z = z_mean
        return {"z_mean": z_mean, "z_log_var": z_log_var, "components": probabilities,
                "reconstruction": self.decode_tensors(z, training=training)}

    def _seed_generator(self):
        if not hasattr(self, "_seeds"):
            self._seeds = keras.random.SeedGenerator(0)
        return self._seeds

    # ------------------------------------------------------------------ loss and training steps

    def losses_of(self, x, outputs, y=None):
        """Per-batch mean ``(total, reconstruction, kl, supervision)``; the formula is in the class docstring.

        ``y`` (N,) int component labels, -1 where a spectrum has none (None: no labels at all).
        """
        target = self.normalize(x)
        reconstruction = ops.sum(ops.square(target - outputs["reconstruction"]), axis=-1)
        mu, log_var = outputs["z_mean"][:, None, :], outputs["z_log_var"][:, None, :]
        prior_mu, prior_log_var = self.prior_mean[None], self.prior_log_var[None]
        kl_gauss = 0.5 * ops.sum(prior_log_var - log_var
                                 + (ops.exp(log_var) + ops.square(mu - prior_mu)) / ops.exp(prior_log_var) - 1.0,
                                 axis=-1)  # (N, K)
        pi = outputs["components"]
        kl_z = ops.sum(pi * kl_gauss, axis=-1)
        kl_c = ops.sum(pi * ops.log(pi * self.n_components + _EPS), axis=-1)
        kl = kl_z + kl_c
        total = reconstruction + self.beta * kl
        supervision = ops.zeros_like(reconstruction)
        if y is not None:
            y = ops.reshape(ops.cast(y, "int32"), (-1,))
            labelled = ops.cast(y >= 0, pi.dtype)
            chosen = ops.sum(ops.one_hot(ops.maximum(y, 0), self.n_components, dtype=pi.dtype) * pi, axis=-1)
            supervision = -labelled * ops.log(chosen + _EPS)
            total = total + self.supervision_weight * supervision
        return ops.mean(total), ops.mean(reconstruction), ops.mean(kl), ops.mean(supervision)

    @staticmethod
    def _unpack(data):
        if isinstance(data, tuple):
            return data[0], (data[1] if len(data) > 1 else None)
        return data, None

    def train_step(self, data):
        x, y = self._unpack(data)
        with tf.GradientTape() as tape:
            outputs = self(x, training=True)
            losses = self.losses_of(x, outputs, y)
        grads = tape.gradient(losses[0], self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights, strict=True))
        return self._track(*losses)

    def test_step(self, data):
        x, y = self._unpack(data)
        return self._track(*self.losses_of(x, self(x, training=False), y))

    def _track(self, total, reconstruction, kl, supervision) -> dict[str, Any]:
        self.loss_tracker.update_state(total)
        self.reconstruction_tracker.update_state(reconstruction)
        self.kl_tracker.update_state(kl)
        self.supervision_tracker.update_state(supervision)
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        return [self.loss_tracker, self.reconstruction_tracker, self.kl_tracker, self.supervision_tracker]

    # ------------------------------------------------------------------ inference on NumPy arrays

    def _checked(self, spectra: np.ndarray) -> np.ndarray:
        x = np.asarray(spectra, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_energies:
            raise ValueError(f"spectra must have shape (N, {self.n_energies}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("spectra contain NaN or infinite values: pass particle pixels only")
        return x

    @tf.function(reduce_retracing=True)
    def _encode_batch(self, x):
        return self.encode_tensors(x, training=False)

    @tf.function(reduce_retracing=True)
    def _decode_batch(self, z):
        return self.decode_tensors(z, training=False)

    def encode(self, spectra: np.ndarray, *, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Latent means (N, latent_dim) and component probabilities (N, K) of spectra (N, E), float32."""
        x = self._checked(spectra)
        means, probs = [], []
        for i in range(0, max(len(x), 1), batch_size):
            z_mean, _, p = self._encode_batch(tf.constant(x[i:i + batch_size]))
            means.append(z_mean.numpy())
            probs.append(p.numpy())
        return np.concatenate(means), np.concatenate(probs)

    def decode(self, latent: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
        """Normalized spectra (N, E) reconstructed from latent points (N, latent_dim), float32."""
        z = np.asarray(latent, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"latent points must have shape (N, {self.latent_dim}), got {z.shape}")
        out = [self._decode_batch(tf.constant(z[i:i + batch_size])).numpy() for i in range(0, max(len(z), 1),
                                                                                             batch_size)]
        return np.concatenate(out)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "n_energies": self.n_energies, "n_components": self.n_components,
                "latent_dim": self.latent_dim, "hidden": self.hidden, "dropout": self.dropout_rate,
                "beta": self.beta, "normalization": self.normalization,
                "supervision_weight": self.supervision_weight}

    def build_for_inference(self) -> GMVAE:
        """Create the weights (a forward pass on zeros); returns ``self``."""
        self(np.zeros((2, self.n_energies), dtype="float32"), training=False)
        return self


@dataclass
class TrainingResult:
    """A trained GMVAE and what is known about it."""

    model: GMVAE
    metrics: dict[str, float]
    history: dict[str, list[float]] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)
    #: the training report (``phasestream.jobs.training_report``), filled in by ``train_artifact``
    report: dict[str, Any] = field(default_factory=dict)


def cluster_purity(components: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of spectra whose mixture component's majority label equals their own label.

    ``components`` (N, K) component probabilities; ``labels`` (N,) reference labels (PCC phases).
    """
    assigned = np.argmax(components, axis=1)
    labels = np.asarray(labels)
    agree = 0
    for c in np.unique(assigned):
        members = labels[assigned == c]
        agree += np.bincount(members - members.min()).max() if members.size else 0
    return float(agree / max(1, labels.size))


def per_phase_purity(components: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per label: the fraction of its spectra whose mixture component's majority label is that label.

    ``components`` (N, K) component probabilities; ``labels`` (N,) reference labels (PCC phases, >= 0).
    A phase whose spectra share components with another, larger phase scores low: the latent space
    does not keep it apart.
    """
    assigned = np.argmax(components, axis=1)
    labels = np.asarray(labels)
    majority = {int(c): int(np.bincount(labels[assigned == c]).argmax()) for c in np.unique(assigned)}
    owner = np.array([majority[int(c)] for c in assigned]) if len(assigned) else np.zeros(0, int)
    return {int(k): float(np.mean(owner[labels == k] == k)) for k in np.unique(labels)}


def train_gmvae(
    spectra: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    supervised: np.ndarray | None = None,
    supervision_weight: float = 5.0,
    n_components: int = 5,
    latent_dim: int = 3,
    normalization: str = "spectrum",
    epochs: int = 30,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    dropout: float = 0.1,
    beta: float = 1.0,
    hidden: Sequence[int] = (512, 256, 128, 64),
    seed: int = 0,
    progress: bool = True,
) -> TrainingResult:
    """Train a GMVAE on spectra (N, E) of particle pixels; split 95/2.5/2.5 (train/validation/test).

    Parameters
    ----------
    spectra : (N, E) OD spectra, finite
    labels : (N,) int PCC phase labels, for the cluster-purity metric (and the supervision)
    supervised : (N,) bool, the spectra whose label is trained as their mixture component
        (semi-supervised: cross-entropy of ``q(c|x)``; the others as without labels); None or none
        True: unsupervised. Component ``k`` is then phase ``k``: ``n_components`` >= the phases
    supervision_weight : weight of that cross-entropy (``GMVAE``'s ``gamma``)
    normalization : input normalization mode (:data:`NORMALIZATIONS`), fitted on the training split
    seed : seeds the split, the weights and the sampling (``keras.utils.set_random_seed``)
    progress : show a progress bar (one step per epoch)

    Returns
    -------
    TrainingResult
        ``metrics``: ``test_reconstruction_mse`` (held-out test split, normalized units, per energy),
        ``validation_loss``, ``train_loss``, ``cluster_purity`` (test split, when ``labels`` are given),
        ``supervised_spectra`` (labelled spectra trained on, 0 when unsupervised).
    """
    x = np.asarray(spectra, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 40:
        raise ValueError(f"need at least 40 spectra as an (N, E) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("training spectra contain NaN or infinite values")
    if labels is not None and len(labels) != len(x):
        raise ValueError(f"labels has {len(labels)} entries for {len(x)} spectra")
    targets = None
    if supervised is not None and np.any(supervised):
        if labels is None or len(supervised) != len(x):
            raise ValueError(f"supervised training needs labels and a supervised flag per spectrum ({len(x)})")
        targets = np.where(np.asarray(supervised, bool), np.asarray(labels), -1).astype(np.int32)
        if targets.max() >= n_components:
            raise ValueError(f"label {int(targets.max())} has no mixture component (n_components={n_components})")
    keras.utils.set_random_seed(seed)
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = n_test = max(1, round(0.025 * len(x)))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    norm = fit_normalization(x[train], normalization)
    model = GMVAE(x.shape[1], n_components=n_components, latent_dim=latent_dim, hidden=hidden, dropout=dropout,
                  beta=beta, normalization=norm, supervision_weight=supervision_weight)
    model._seeds = keras.random.SeedGenerator(seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    callbacks = [_ProgressBar(epochs)] if progress else []
    if targets is None:
        fit = model.fit(x[train], validation_data=(x[val],), epochs=epochs, batch_size=batch_size, shuffle=True,
                        verbose=0, callbacks=callbacks)
    else:
        fit = model.fit(x[train], targets[train], validation_data=(x[val], targets[val]), epochs=epochs,
                        batch_size=batch_size, shuffle=True, verbose=0, callbacks=callbacks)
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    reconstruction = model.decode(model.encode(x[test])[0])
    target = np.asarray(model.normalize(x[test]))
    metrics = {
        "test_reconstruction_mse": float(np.mean((reconstruction - target) ** 2)),
        "train_loss": history["loss"][-1],
        "validation_loss": history["val_loss"][-1],
        "supervised_spectra": 0 if targets is None else int(np.sum(targets[train] >= 0)),
    }
    if labels is not None:
        metrics["cluster_purity"] = cluster_purity(model.encode(x[test])[1], np.asarray(labels)[test])
    logger.info("trained GMVAE on %d spectra: %s", len(train), metrics)
    return TrainingResult(model=model, metrics=metrics, history=history,
                          split={"train": len(train), "validation": len(val), "test": len(test)})


class _ProgressBar(keras.callbacks.Callback):
    """A tqdm bar over epochs showing the losses."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.bar = None

    def on_train_begin(self, logs=None):
        from tqdm import tqdm

        self.bar = tqdm(total=self.epochs, desc="GMVAE", unit="epoch")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}",
                             val=f"{logs.get('val_loss', float('nan')):.3f}", refresh=False)
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()
