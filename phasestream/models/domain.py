"""The image domain an InDI model was trained on, and the checks that keep enhancement in it.

A network trained on one kind of image learns that image's statistics: transmission images
(``I / I0``, particles dark on a bright open beam), optical density (``OD = -ln(I / I0)``,
particles bright) and raw detector counts are different images. An InDI artifact declares its
domain in its manifest (docs/models.md, "Image domain")::

    "domain": {"image": "transmission" | "od" | "counts",
               "normalization": {"mode": "open_beam" | "dose" | "none",
                                 "lq": {"i0": 120.0, "from": "..."}, "hq": {...}}}

and enhancement refuses an image of another domain (:func:`check_domain`) instead of applying the
model silently. ``open_beam`` (transmission, OD) and ``dose`` (counts) divide each scan by its own
incident intensity, so that scans taken at different doses share one scale.

Pure NumPy: imported by the jobs, the CLI and the model server before any TensorFlow is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["DOMAINS", "MIN_GAIN_DB", "SYNTHETIC_DOMAIN", "DomainMismatchError", "LowGainError", "ModelRefusedError",
           "check_domain", "check_gain", "domain_of", "to_domain", "validated_gain"]

#: the image domains an InDI model can be trained on
DOMAINS = ("transmission", "od", "counts")
#: the domain of the simulated particle phantoms (phasestream.sim.phantoms) the shipped model learned from
SYNTHETIC_DOMAIN = {
    "image": "od",
    "normalization": {"mode": "none", "note": "simulated absorption-contrast images, not computed from counts: "
                      "particles 0.45-0.95 (bright) on a 0.1 background, additive Gaussian noise of 0.03 in LQ; the "
                      "appearance of an OD image, which is what the model is applied to"},
}


class ModelRefusedError(ValueError):
    """A model that must not be applied to this image (another domain, too little validated gain)."""


class DomainMismatchError(ModelRefusedError):
    """The image is not in the domain the model was trained on."""


class LowGainError(ModelRefusedError):
    """The model's validated gain over bicubic up-sampling is below :data:`MIN_GAIN_DB` (or unknown)."""


#: enhancement with a model that gained less than this over bicubic on its validation data is refused
MIN_GAIN_DB = 1.0


def validated_gain(manifest: Mapping[str, Any]) -> float | None:
    """The PSNR gain (dB) over bicubic the model showed on its held-out validation data, or None."""
    metrics = manifest.get("metrics") or {}
    gain = metrics.get("gain_over_bicubic_db", (metrics.get("validation") or {}).get("gain_over_bicubic_db"))
    try:
        return float(gain) if gain is not None and np.isfinite(float(gain)) else None
    except (TypeError, ValueError):
        return None


def check_gain(manifest: Mapping[str, Any], *, allow_low_gain: bool = False) -> dict[str, Any] | None:
    """None when the model's validated gain is at least :data:`MIN_GAIN_DB`; the mark for the record when it is
    not but ``allow_low_gain`` is set; raises :class:`LowGainError` otherwise."""
    gain = validated_gain(manifest)
    if gain is not None and gain >= MIN_GAIN_DB:
        return None
    shown = "unknown (the manifest has no validation gain)" if gain is None else f"{gain:.2f} dB"
    if allow_low_gain:
        return {"gain_over_bicubic_db": gain, "min_db": MIN_GAIN_DB, "allowed": True}
    raise LowGainError(
        f"InDI model {manifest.get('name')} {manifest.get('version')} gained {shown} over bicubic up-sampling on "
        f"its validation data, below {MIN_GAIN_DB:g} dB: refused (it may make images worse). Train a model on "
        "pairs from your beamline, or pass --allow-low-gain to write the result marked as such")


def domain_of(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``domain`` an InDI manifest declares, or None for an artifact that declares none."""
    domain = manifest.get("domain")
    if not isinstance(domain, Mapping) or domain.get("image") not in DOMAINS:
        return None
    return dict(domain)


def check_domain(manifest: Mapping[str, Any], image_domain: str) -> dict[str, Any]:
    """Return the model's domain if images of ``image_domain`` may be enhanced by it; raise otherwise.

    Raises
    ------
    DomainMismatchError
        naming the model, the domain it was trained on and the image's, and what to do.
    """
    if image_domain not in DOMAINS:
        raise ValueError(f"image domain must be one of {DOMAINS}, got {image_domain!r}")
    name = f"{manifest.get('name')} {manifest.get('version')}"
    domain = domain_of(manifest)
    if domain is None:
        raise DomainMismatchError(
            f"InDI model {name} declares no image domain (its manifest has no 'domain'): it cannot be checked "
            f"against these {image_domain} images; retrain it with `phasestream train indi --domain "
            f"{image_domain}`")
    if domain["image"] != image_domain:
        raise DomainMismatchError(
            f"InDI model {name} was trained on {domain['image']} images and these images are {image_domain}: "
            f"refused (a model applied to another domain invents structure). Enhance {domain['image']} images "
            f"with it, or train a model on {image_domain} (`phasestream train indi --domain {image_domain}`)")
    return domain


def to_domain(counts: np.ndarray, domain: str, i0: float | None = None) -> np.ndarray:
    """Detector counts as an image of ``domain``: ``counts / i0`` (transmission, or counts with a dose),
    ``-ln(counts / i0)`` (OD; counts that are not positive become NaN), or the counts themselves
    (counts, ``i0`` None)."""
    c = np.asarray(counts, np.float64)
    if domain == "counts" and i0 is None:
        return c.astype(np.float32)
    if i0 is None or not np.isfinite(i0) or i0 <= 0:
        raise ValueError(f"converting counts to {domain} needs a positive open-beam intensity (I0), got {i0!r}")
    t = c / float(i0)
    if domain in ("transmission", "counts"):
        return t.astype(np.float32)
    if domain == "od":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(t > 0, -np.log(np.where(t > 0, t, 1.0)), np.nan).astype(np.float32)
    raise ValueError(f"image domain must be one of {DOMAINS}, got {domain!r}")
