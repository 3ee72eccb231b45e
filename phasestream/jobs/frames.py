"""A raw run's image frames as scientists have them, for InDI training and enhancement.

:func:`raw_frames` reads the ``primary`` images of a raw run in Tiled (any plan: an energy stack, a
``count`` of one frame), its start document, its pixel size and each frame's open-beam intensity
(I0), with where each came from, so that a model's manifest can say how its images were normalized.

Keys read from the start document (docs/models.md, "Pairs"):

* the image: ``phasestream.image_key``, else the only 2-D data key of the ``primary`` stream;
* I0: the ``phasestream.i0_key`` column (counts per pixel, one value per frame), else estimated
  from each frame's bright background (:func:`phasestream.kernels.od.estimate_i0`);
* the pixel size: ``sample.pixel_size_um`` (micrometres), else the older ``pixel_size`` with
  ``pixel_unit``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from phasestream.contract.metadata import shown
from phasestream.kernels.od import estimate_i0
from phasestream.store.tiled import open_raw_run

__all__ = ["PIXEL_SIZE_KEY", "RawFrames", "pixel_size_of", "raw_frames"]

#: the documented start-document key of the pixel size, in micrometres
PIXEL_SIZE_KEY = "sample.pixel_size_um"
_UNITS_UM = {"um": 1.0, "µm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3}


@dataclass
class RawFrames:
    """Images (N, Y, X) float32 of a raw run, its start document, I0 per frame and where it came from."""

    uid: str
    images: np.ndarray
    start: dict[str, Any]
    i0: np.ndarray
    i0_from: str
    pixel_size_um: float | None
    pixel_size_from: str | None

    def normalization(self) -> dict[str, Any]:
        """How the frames were divided by their open beam, for a manifest or a record."""
        values = [round(float(v), 4) for v in self.i0]
        return {"i0": values[0] if len(set(values)) == 1 else values, "from": self.i0_from}


def pixel_size_of(start: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """``(pixel size in µm, the key it came from)`` of a start document, or ``(None, None)``."""
    sample = start.get("sample") if isinstance(start.get("sample"), Mapping) else {}
    value = sample.get("pixel_size_um")
    if value is not None:
        return _positive(value, PIXEL_SIZE_KEY), PIXEL_SIZE_KEY
    if start.get("pixel_size") is not None:
        unit = str(start.get("pixel_unit") or "um")
        if unit not in _UNITS_UM:
            raise ValueError(f"pixel_unit {unit!r} is not one of {sorted(_UNITS_UM)}: give {PIXEL_SIZE_KEY} in µm")
        return _positive(start["pixel_size"], "pixel_size") * _UNITS_UM[unit], f"pixel_size ({unit})"
    return None, None


def _positive(value: Any, key: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"start document {key} must be a positive number, got {value!r}")
    return v


def _block(start: Mapping[str, Any]) -> Mapping[str, Any]:
    """The start document's ``phasestream`` block ({} when absent); ValueError when it is not a map."""
    block = start.get("phasestream")
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        raise ValueError(f"start document phasestream must be a map, got {shown(block)}")
    return block


def _data_key(value: Any, field: str) -> str | None:
    """A start document's data key (None when absent); ValueError naming ``field`` when it is not a string."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"start document {field} must be a data key (a string), got {shown(value)}")
    return value


def _image_key(uid: str, start: Mapping[str, Any], primary) -> str:
    for field, value in (("phasestream.image_key", _block(start).get("image_key")),
                         ("image_key", start.get("image_key"))):
        key = _data_key(value, field)
        if key is not None:
            if key not in primary:
                raise ValueError(f"run {uid}: {field} {shown(key)} is not a data key of the primary stream "
                                 f"(keys: {shown(sorted(primary))})")
            return key
    data_keys = primary.metadata.get("data_keys")
    data_keys = data_keys if isinstance(data_keys, Mapping) else {}
    arrays = [k for k, v in data_keys.items()
              if isinstance(v, Mapping) and isinstance(v.get("shape"), list | tuple) and len(v["shape"]) == 2]
    if len(arrays) != 1:
        raise ValueError(f"run {uid}: name the image key in the start document (phasestream.image_key); "
                         f"2D data keys found: {arrays}")
    return arrays[0]


def raw_frames(client, uid: str, *, raw: str = "") -> RawFrames:
    """The ``primary`` images of the raw run ``uid`` with their open beam and pixel size (see the module)."""
    run = open_raw_run(client, uid, raw)
    start = dict(run.metadata["start"])
    primary = run["primary"]
    key = _image_key(uid, start, primary)
    images = np.asarray(primary[key].read(), np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or min(images.shape[1:]) < 8:
        raise ValueError(f"run {uid}: {key} holds arrays of shape {list(images.shape)}, not images of at least 8 x 8")
    i0_key = _data_key(_block(start).get("i0_key"), "phasestream.i0_key")
    if i0_key is not None and i0_key in primary:
        i0 = np.asarray(primary[i0_key].read(), np.float64).reshape(len(images), -1).mean(axis=1)
        i0_from = f"i0 data key {i0_key}"
    else:
        i0 = np.array([estimate_i0(im) for im in images])
        i0_from = "estimated from each frame's open-beam background"
    size, size_from = pixel_size_of(start)
    return RawFrames(uid, images, start, i0, i0_from, size, size_from)
