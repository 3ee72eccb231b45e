"""A result's arrays for the view's images, checked against the contract before they are read.

The catalog is writable by anyone holding the key, so a result's arrays may be of any shape and
dtype whatever its metadata says. Before an array is read (or a streamed one drawn), its
structure is checked against the result's ``image_shape`` and the contract's layout
(``phasestream.contract.MAP_LAYOUT``, ``OD_DTYPE``): the number of dimensions, the image axes,
a dtype that casts to the contract's within its kind (an ``int64`` phase is drawn as ``int16``, a
``float`` phase is refused), and two caps: :data:`MAX_DRAWN_PIXELS` per image and
:data:`MAX_READ_VALUES` per array read. A refusal is a :class:`NoImageError` saying why (the view
answers 422 "no image: ..."); nothing of the array is read.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

from phasestream.contract import MAP_LAYOUT, OD_DTYPE
from phasestream.references import MAX_PHASES

__all__ = ["MAX_DRAWN_PIXELS", "MAX_READ_VALUES", "NoImageError", "checked_dtype",
           "read_arrays", "read_checked", "read_checked_plane", "read_od_plane"]

MAX_DRAWN_PIXELS = 4096 * 4096
"""The largest image (Y * X) the view draws: larger results are listed, their images are not."""
MAX_READ_VALUES = 2**26
"""The most values read for one array of an image (``pcc``: K * Y * X), 256 MiB of float32."""

LAYOUT: dict[str, tuple[np.dtype, tuple[str, ...]]] = {**MAP_LAYOUT, "od": (OD_DTYPE, ("energy", "y", "x"))}


class NoImageError(ValueError):
    """A result's array the view will not read or draw; the message says why."""


def checked_dtype(name: str, shape: tuple[int, ...], dtype: np.dtype, image_shape: tuple[int, int] | None,
                  *, whole: bool = True) -> np.dtype:
    """The contract's dtype to draw array ``name`` of ``shape`` and ``dtype`` as.

    ``whole``: the array is read whole (else one plane along its first axis: ``od``).

    Raises
    ------
    NoImageError : the array does not fit the contract's layout, the result's ``image_shape`` or the caps.
    """
    if name not in LAYOUT:
        raise NoImageError(f"{name} is not an array the view draws")
    expected, dims = LAYOUT[name]
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    if len(shape) != len(dims):
        raise NoImageError(f"{name} has shape {shape}, expected {len(dims)} dimensions ({', '.join(dims)})")
    pixels = shape[-2:]
    if image_shape is not None and pixels != tuple(image_shape):
        raise NoImageError(f"{name} has shape {shape}, not the result's image_shape {list(image_shape)}")
    if pixels[0] * pixels[1] > MAX_DRAWN_PIXELS:
        raise NoImageError(f"{name} images are {pixels[0]} x {pixels[1]} pixels, more than the "
                           f"{MAX_DRAWN_PIXELS} the view draws")
    if dims[0] == "phase" and shape[0] > MAX_PHASES:
        raise NoImageError(f"{name} has {shape[0]} phases, more than the {MAX_PHASES} a result may have")
    values = int(np.prod(shape if whole else shape[1:], dtype=np.int64))
    if values > MAX_READ_VALUES:
        raise NoImageError(f"{name} of shape {shape} is {values} values, more than the {MAX_READ_VALUES} "
                           "the view reads for an image")
    if dtype.kind not in "biuf" or not np.can_cast(dtype, expected, "same_kind"):
        raise NoImageError(f"{name} is {dtype}, expected {expected} (docs/contract.md)")
    return expected


def read_checked(node, name: str, image_shape: tuple[int, int] | None) -> np.ndarray:
    """Array ``name`` (its Tiled client ``node``), checked (:func:`checked_dtype`), then read, in the contract's
    dtype."""
    expected = checked_dtype(name, tuple(node.shape), node.dtype, image_shape)
    return np.asarray(node.read()).astype(expected, copy=False)


def read_checked_plane(node, index: int, image_shape: tuple[int, int] | None) -> np.ndarray | None:
    """Plane ``index`` of the ``od`` array (its Tiled client ``node``), checked, or None if it has no such plane."""
    expected = checked_dtype("od", tuple(node.shape), node.dtype, image_shape, whole=False)
    if index < 0 or index >= node.shape[0]:
        return None
    return np.asarray(node[index]).astype(expected, copy=False)


def read_arrays(client, path: str, names: tuple[str, ...], image_shape: tuple[int, int] | None,
                executor: Executor) -> dict[str, np.ndarray]:
    """The arrays ``names`` of the result at ``path`` that exist (missing ones are left out), each checked and
    read (:func:`read_checked`) on ``executor``: one path lookup per array, all at once (a round trip each, not
    one per path segment)."""
    def read(name: str):
        try:
            return name, read_checked(client[f"{path}/{name}"], name, image_shape)
        except KeyError:
            return name, None

    return {name: array for name, array in executor.map(read, names) if array is not None}


def read_od_plane(client, path: str, index: int, image_shape: tuple[int, int] | None) -> np.ndarray | None:
    """OD plane ``index`` of the result at ``path``, checked (:func:`read_checked_plane`), or None when there is
    none."""
    try:
        od = client[f"{path}/od"]
    except KeyError:
        return None
    return read_checked_plane(od, index, image_shape)
