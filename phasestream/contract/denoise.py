"""The start document's ``denoise`` request and the arrays a denoising writes (docs/contract.md).

A run asks for self-supervised denoising after the scan with ``phasestream: {denoise: true}`` or
``{denoise: {model, version, fine_tune_steps}}``. :func:`denoise_request` parses that value once,
when :class:`~phasestream.contract.RunSettings` is made. A malformed value never refuses the run:
the request carries the error, and the denoising job records it on the result as ``failed``
(the PCC result is not affected).

This module imports nothing from phasestream (the contract package's ``__init__`` imports it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["AVERAGING_SETTINGS", "DEFAULT_DENOISE_MODEL", "DENOISED_LAYOUT", "DENOISING_ARRAYS", "MAX_FINE_TUNE_STEPS",
           "DenoiseRequest", "averaging_settings", "denoise_request"]

#: the shipped denoiser (docs/models.md, Denoising)
DEFAULT_DENOISE_MODEL = "denoise-stxm-synthetic"
#: the spectral-shape averaging's settings that the model server's reply and the ``denoising`` record
#: carry as ``shape_averaging`` (``phasestream.models.spectra.shape_averaging_settings``)
AVERAGING_SETTINGS = ("radius", "tolerance", "thickness_tolerance", "rounds")
#: the most self-supervised fine-tuning steps the model server's ``denoise`` op accepts
MAX_FINE_TUNE_STEPS = 5000
#: longest model name or version accepted from a start document
_MAX_NAME = 128
_KEYS = ("model", "version", "fine_tune_steps")

#: Arrays of a denoising, beside the live ones (never replacing them): name -> (dtype, dims)
DENOISED_LAYOUT: dict[str, tuple[np.dtype, tuple[str, ...]]] = {
    "denoised": (np.dtype("float32"), ("energy", "y", "x")),
    "pcc_denoised": (np.dtype("float32"), ("phase", "y", "x")),
    "phase_denoised": (np.dtype("int16"), ("y", "x")),
    "reliability_denoised": (np.dtype("float32"), ("y", "x")),
    "ambiguous_denoised": (np.dtype("uint8"), ("y", "x")),
}
#: removed before every denoising, so that they always belong to the ``denoising`` record beside them
DENOISING_ARRAYS = tuple(DENOISED_LAYOUT)


@dataclass(frozen=True)
class DenoiseRequest:
    """What a run's ``denoise`` block asks for.

    ``model``, ``version`` (None: the highest) name the denoise artifact; ``fine_tune_steps``
    self-supervised steps on the scan before denoising (0 to :data:`MAX_FINE_TUNE_STEPS`);
    ``error`` says why the block's value is malformed (empty when it is not).
    """

    model: str = DEFAULT_DENOISE_MODEL
    version: str | None = None
    fine_tune_steps: int = 0
    error: str = ""


def _name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_NAME


def denoise_request(value: Any, uid: str = "?") -> DenoiseRequest | None:
    """The request of a ``phasestream.denoise`` value: None when absent or false, a :class:`DenoiseRequest`
    otherwise; a malformed value gives a request whose ``error`` names the run, the key and what was expected."""
    if value is None or value is False:
        return None
    if value is True:
        return DenoiseRequest()
    expected = (f"run {uid}: phasestream.denoise must be true or {{model: str, version: str, fine_tune_steps: "
                f"int 0..{MAX_FINE_TUNE_STEPS}}}")
    if not isinstance(value, Mapping):
        return DenoiseRequest(error=f"{expected}, got {value!r:.60}")
    unknown = sorted(str(k) for k in value if k not in _KEYS)
    if unknown:
        return DenoiseRequest(error=f"{expected}; unknown keys {unknown}"[:500])
    model = value.get("model", DEFAULT_DENOISE_MODEL)
    version = value.get("version")
    steps = value.get("fine_tune_steps", 0)
    if not _name(model):
        return DenoiseRequest(error=f"{expected}; model must be a name of 1-{_MAX_NAME} characters, got {model!r:.60}")
    if version is not None and not _name(version):
        return DenoiseRequest(error=f"{expected}; version must be a string, got {version!r:.60}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_FINE_TUNE_STEPS:
        return DenoiseRequest(error=f"{expected}; fine_tune_steps must be an integer in 0..{MAX_FINE_TUNE_STEPS}, "
                                    f"got {steps!r:.60}")
    return DenoiseRequest(model=model, version=version, fine_tune_steps=steps)


def averaging_settings(value: Any) -> dict[str, int | float] | None:
    """A model server's ``shape_averaging`` (the settings its spectral-shape averaging ran with, or
    None when no component was averaged), checked before a ``denoising`` record carries it: the keys
    of :data:`AVERAGING_SETTINGS`, each a finite number. Raises ValueError naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != set(AVERAGING_SETTINGS):
        keys = sorted(map(str, value)) if isinstance(value, Mapping) else type(value).__name__
        raise ValueError(f"shape_averaging must map exactly {', '.join(AVERAGING_SETTINGS)}, got {str(keys)[:200]}")
    for key in AVERAGING_SETTINGS:
        number = value[key]
        if isinstance(number, bool) or not isinstance(number, int | float) or not np.isfinite(number):
            raise ValueError(f"shape_averaging.{key} must be a finite number, got {str(number)[:100]!r}")
    return {key: value[key] for key in AVERAGING_SETTINGS}
