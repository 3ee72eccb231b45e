"""What the model server does with a request once it is parsed: the input checks and each op's work.

:class:`~phasestream.modelserver.server.ModelServer` receives, groups and answers requests; the
functions here check one request's array against the model (:func:`check_input`) and compute the
reply of each op: ``encode``/``decode`` for a batch (:func:`infer`), ``enhance`` (:func:`enhance`)
and ``denoise`` (:func:`denoise`) for one request. A request they refuse raises
:class:`RequestError` or gets an ``ok: false`` reply (:func:`error_reply`); a failure inside a model
becomes :func:`inference_error`'s reply. Nothing here logs a request or an array.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from phasestream.models.domain import DOMAINS, DomainMismatchError, ModelRefusedError, check_domain, check_gain
from phasestream.modelserver.protocol import MODEL_DTYPE, truncated

__all__ = ["MAX_ENHANCE_STEPS", "MAX_FINE_TUNE_STEPS", "Loaded", "RequestError", "check_input", "denoise",
           "enhance", "error_reply", "infer", "inference_error", "refusal"]

logger = logging.getLogger(__name__)

#: largest ``options.steps`` of ``enhance`` and ``options.fine_tune_steps`` of ``denoise``
MAX_ENHANCE_STEPS = 100
MAX_FINE_TUNE_STEPS = 5000


class RequestError(ValueError):
    """A request the server refuses (turned into an ``ok: false`` reply)."""


@dataclass
class Loaded:
    """A model loaded from its artifact."""

    artifact: Any
    model: Any

    @property
    def info(self) -> dict[str, Any]:
        return {"model": self.artifact.name, "version": self.artifact.version, "sha256": self.artifact.sha256}


def error_reply(message: str, **info: Any) -> dict[str, Any]:
    """An ``ok: false`` reply; ``info`` gives its ``model``, ``version`` and ``sha256``."""
    return {"ok": False, "error": truncated(message), "model": info.get("model"),
            "version": info.get("version"), "sha256": info.get("sha256")}


def inference_error(op: str, loaded: Loaded, exc: Exception) -> dict[str, Any]:
    """The reply to a request that failed inside the model; logged without the request or a traceback
    (an exception's text can quote the input), the traceback only at DEBUG level."""
    name, version = loaded.artifact.name, loaded.artifact.version
    text = f"{op} failed in model {name!r} {version}: {type(exc).__name__}: {exc}"
    logger.error("%s", truncated(text, 300))
    logger.debug("%s with %s %s failed", op, name, version, exc_info=True)
    return error_reply(text, **loaded.info)


def _step_count(options: dict[str, Any], key: str, default: Any, low: int, high: int) -> int:
    steps = options.get(key, default)
    if not isinstance(steps, int) or isinstance(steps, bool) or not low <= steps <= high:
        raise RequestError(f"options.{key} must be an integer in {low}..{high}, got {truncated(repr(steps), 60)}")
    return steps


def check_input(op: str, loaded: Loaded, array: np.ndarray, max_bytes: int) -> np.ndarray:
    """The request's array as :data:`MODEL_DTYPE`, checked in that dtype (shape, size, finite values).

    Raises
    ------
    RequestError
        naming what does not fit the model or the server's limit of ``max_bytes``.
    """
    model, art = loaded.model, loaded.artifact
    if array.dtype.kind not in "fiu":
        raise RequestError(f"array must be numeric, got dtype {array.dtype}")
    if op == "enhance":
        if array.ndim not in (2, 3) or min(array.shape[-2:]) < 8 or array.size == 0:
            raise RequestError(f"model {art.name} {art.version} enhances an image (Y, X) or images (N, Y, X) "
                               f"of at least 8 x 8 pixels; got shape {list(array.shape)}")
    elif op == "denoise":
        if array.ndim != 3 or array.shape[0] < 2 or min(array.shape[1:]) < 8:
            raise RequestError(f"model {art.name} {art.version} denoises an OD stack (E, Y, X) of at least 2 "
                               f"energies and 8 x 8 pixels; got shape {list(array.shape)}")
    elif op == "encode":
        n = model.n_energies
        if array.ndim != 2 or array.shape[1] != n:
            energies = ", ".join(f"{e:g}" for e in art.energies)
            raise RequestError(f"model {art.name} {art.version} takes spectra of {n} energies ({energies} eV) "
                               f"as an (N, {n}) array; got shape {list(array.shape)}")
    else:
        d = model.latent_dim
        if array.ndim != 2 or array.shape[1] != d:
            raise RequestError(f"model {art.name} {art.version} decodes latent points as an (N, {d}) array; "
                               f"got shape {list(array.shape)}")
    converted_bytes = array.size * MODEL_DTYPE.itemsize
    if converted_bytes > max_bytes:  # uint8 grows 4 times as float32
        raise RequestError(f"array of shape {list(array.shape)} and dtype {array.dtype} is {converted_bytes} "
                           f"bytes as {MODEL_DTYPE}, over the server's limit of {max_bytes} "
                           "bytes: send fewer spectra or images per request")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
        x = array.astype(MODEL_DTYPE, copy=False)
    finite = np.isfinite(x)
    if finite.all():
        return x
    if array.dtype.itemsize > MODEL_DTYPE.itemsize and (np.isfinite(array) & ~finite).any():
        raise RequestError(f"array has non-finite values after conversion to {MODEL_DTYPE} ({array.dtype} "
                           f"values beyond {MODEL_DTYPE} range, max {np.finfo(MODEL_DTYPE).max:.4g}?)")
    if op not in ("enhance", "denoise"):
        raise RequestError("array contains NaN or infinite values: send particle pixels only")
    if not finite.any():  # enhance_image and denoise_stack fill NaN pixels with the median
        raise RequestError("the image has no finite pixel")
    return x


def infer(op: str, loaded: Loaded, arrays: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``encode`` or ``decode``: the model's outputs for each of ``arrays``, computed as one batch."""
    sizes = list(itertools.accumulate(len(a) for a in arrays))
    joined = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if op == "encode":
        latent, components = loaded.model.encode(joined)
        outputs = {"array": latent, "components": components}
    else:
        outputs = {"array": loaded.model.decode(joined)}
    return [{key: np.ascontiguousarray(value[start:end]) for key, value in outputs.items()}
            for start, end in zip([0, *sizes[:-1]], sizes, strict=True)]


def refusal(art, options: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(the reply refusing to enhance with art, None)`` for an image of another domain or a model whose
    validated gain is too low (unless ``options.allow_low_gain``); else ``(None, the low-gain mark or None)``.
    A refusal by the model's domain or gain carries ``refused``."""
    info = {"model": art.name, "version": art.version, "sha256": art.sha256}
    domain = options.get("domain")
    if not isinstance(domain, str) or domain not in DOMAINS:
        return error_reply(f"options.domain must say what the image is, one of {list(DOMAINS)}; got "
                           f"{truncated(repr(domain), 60)}", **info), None
    try:
        check_domain(art.manifest, domain)
        return None, check_gain(art.manifest, allow_low_gain=options.get("allow_low_gain") is True)
    except ModelRefusedError as exc:
        reason = "domain" if isinstance(exc, DomainMismatchError) else "low_gain"
        return {**error_reply(str(exc), **info), "refused": reason}, None


def enhance(loaded: Loaded, array: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
    """InDI: the reply to one request, its image (Y, X) or images (N, Y, X) enhanced one at a time."""
    from phasestream.models.indi import enhance_image

    art = loaded.artifact
    try:
        steps = _step_count(options, "steps", art.manifest.get("steps", 8), 1, MAX_ENHANCE_STEPS)
    except RequestError as exc:
        return error_reply(str(exc), **loaded.info)
    refused, low_gain = refusal(art, options)
    if refused is not None:
        return refused
    try:
        images = array[None] if array.ndim == 2 else array
        out = np.stack([enhance_image(loaded.model, im, steps=steps, scale=int(art.manifest.get("scale", 2)))
                        for im in images])
    except Exception as exc:  # noqa: BLE001 - nor one in enhancing an image
        return inference_error("enhance", loaded, exc)
    reply = {"ok": True, **loaded.info, "steps": steps, "array": out[0] if array.ndim == 2 else out,
             "demo": bool(art.manifest.get("demo", False))}
    if low_gain is not None:
        reply["low_gain"] = low_gain
    return reply


def denoise(loaded: Loaded, array: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request: its OD stack (E, Y, X) denoised, optionally fine-tuned on it first."""
    from phasestream.models.denoise import denoise_stack

    try:
        steps = _step_count(options, "fine_tune_steps", 0, 0, MAX_FINE_TUNE_STEPS)
    except RequestError as exc:
        return error_reply(str(exc), **loaded.info)
    try:
        result = denoise_stack(loaded.model, array, fine_tune_steps=steps)
    except Exception as exc:  # noqa: BLE001 - nor one in denoising a stack
        return inference_error("denoise", loaded, exc)
    return {"ok": True, **loaded.info, "array": result.od, "components": result.components,
            "posterior_components": result.info["posterior_components"],
            "shape_averaged_components": result.info["shape_averaged_components"],
            "shape_averaging": result.info["shape_averaging"],
            "fine_tune_steps": steps, "seconds": result.info["seconds"]}
