"""A result's arrays for the view's images, checked against the contract before they are read.

The catalog is writable by anyone holding the key, so a result's arrays may be of any shape and
dtype whatever its metadata says. Before an array is read (or a streamed one drawn), its
structure is checked against the result's ``image_shape`` and the contract's layout
(``phasestream.contract.MAP_LAYOUT``, ``OD_DTYPE``): the number of dimensions, the image axes,
a dtype that casts to the contract's within its kind (an ``int64`` phase is drawn as ``int16``, a
``float`` phase is refused), and three caps: :data:`MAX_IMAGE_PIXELS` per image, :data:`MAX_DRAWN_PIXELS`
per image drawn and :data:`MAX_READ_VALUES` per array read. An image larger than :data:`MAX_DRAWN_PIXELS`
is read and drawn at every ``stride``-th row and column (a Tiled slice with a step: the page shows maps at
256 pixels, and nearest sampling keeps the phase labels what they are). A refusal is a :class:`NoImageError`
saying why (the view answers 422 "no image: ..."); nothing of the array is read.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import NamedTuple

import numpy as np

from phasestream.contract import MAP_LAYOUT, OD_DTYPE
from phasestream.references import MAX_PHASES

__all__ = ["MAX_DRAWN_PIXELS", "MAX_IMAGE_PIXELS", "MAX_READ_VALUES", "Drawn", "NoImageError", "drawn_as",
           "read_arrays", "read_checked", "read_checked_plane", "read_od_plane", "strided"]

MAX_DRAWN_PIXELS = 4096 * 4096
"""The largest image (Y * X) the view draws: a larger one is drawn at every ``stride``-th row and column."""
MAX_IMAGE_PIXELS = 16384 * 16384
"""The largest image (Y * X) the view reads from at all, four times the worker's default bound (8192²): larger
results are listed, their images are not."""
MAX_READ_VALUES = 2**26
"""The most values read for one array of an image (``pcc``: K * Y * X), 256 MiB of float32."""

LAYOUT: dict[str, tuple[np.dtype, tuple[str, ...]]] = {**MAP_LAYOUT, "od": (OD_DTYPE, ("energy", "y", "x"))}


class NoImageError(ValueError):
    """A result's array the view will not read or draw; the message says why."""


class Drawn(NamedTuple):
    """How an array is drawn: in the contract's ``dtype``, at every ``stride``-th row and column."""

    dtype: np.dtype
    stride: int


def draw_stride(pixels: tuple[int, int]) -> int:
    """The smallest step ``s`` that brings an image of ``pixels`` (Y, X) within :data:`MAX_DRAWN_PIXELS` when
    every ``s``-th row and column is taken (1 for an image within it)."""
    ny, nx = pixels
    stride = max(1, int((ny * nx / MAX_DRAWN_PIXELS) ** 0.5))
    while -(-ny // stride) * -(-nx // stride) > MAX_DRAWN_PIXELS:
        stride += 1
    return stride


def strided(array, stride: int):
    """Every ``stride``-th row and column of the last two axes of ``array`` (a NumPy or Tiled array)."""
    return array[(Ellipsis, slice(None, None, stride), slice(None, None, stride))]


def drawn_as(name: str, shape: tuple[int, ...], dtype: np.dtype, image_shape: tuple[int, int] | None,
             *, whole: bool = True) -> Drawn:
    """How array ``name`` of ``shape`` and ``dtype`` is drawn: the contract's dtype and the stride.

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
    if pixels[0] * pixels[1] > MAX_IMAGE_PIXELS:
        raise NoImageError(f"{name} images are {pixels[0]} x {pixels[1]} pixels, more than the "
                           f"{MAX_IMAGE_PIXELS} the view reads")
    if dims[0] == "phase" and shape[0] > MAX_PHASES:
        raise NoImageError(f"{name} has {shape[0]} phases, more than the {MAX_PHASES} a result may have")
    stride = draw_stride(pixels)
    drawn = -(-pixels[0] // stride) * -(-pixels[1] // stride)
    values = int(np.prod(shape[:-2] if whole else shape[1:-2], dtype=np.int64)) * drawn
    if values > MAX_READ_VALUES:
        raise NoImageError(f"{name} of shape {shape} is {values} values drawn, more than the {MAX_READ_VALUES} "
                           "the view reads for an image")
    if dtype.kind not in "biuf" or not np.can_cast(dtype, expected, "same_kind"):
        raise NoImageError(f"{name} is {dtype}, expected {expected} (docs/contract.md)")
    return Drawn(expected, stride)


def read_checked(node, name: str, image_shape: tuple[int, int] | None) -> np.ndarray:
    """Array ``name`` (its Tiled client ``node``), checked (:func:`drawn_as`), then read at its stride, in the
    contract's dtype."""
    dtype, stride = drawn_as(name, tuple(node.shape), node.dtype, image_shape)
    values = node.read() if stride == 1 else strided(node, stride)
    return np.asarray(values).astype(dtype, copy=False)


def read_checked_plane(node, index: int, image_shape: tuple[int, int] | None) -> np.ndarray | None:
    """Plane ``index`` of the ``od`` array (its Tiled client ``node``), checked and read at its stride, or None if
    it has no such plane."""
    dtype, stride = drawn_as("od", tuple(node.shape), node.dtype, image_shape, whole=False)
    if index < 0 or index >= node.shape[0]:
        return None
    values = node[index] if stride == 1 else node[index, ::stride, ::stride]
    return np.asarray(values).astype(dtype, copy=False)


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
