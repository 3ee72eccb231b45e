"""What every facility-file reader returns: one energy stack, its energies and its provenance.

A reader is a function ``read_<format>(path, *, energies=None) -> ImportedStack``. It reads
arrays and metadata only: no Tiled, no Bluesky, no logging in loops. The import job
(:mod:`phasestream.jobs.importing`) turns an :class:`ImportedStack` into a Bluesky run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EXPANSION_ALLOWANCE",
    "MAX_EXPANSION",
    "MAX_STACK_BYTES",
    "MODES",
    "FormatError",
    "HDF5Source",
    "ImportedStack",
    "LazyImages",
    "TiffSource",
    "check_expansion",
    "check_stack_size",
    "intensity_dtype",
    "sha256_of",
]

MODES = ("stxm", "txm")

#: Largest stack (images, as read) a reader allocates: a header that promises more is refused before
#: any array is made. 16 GiB is far beyond a STXM/TXM energy stack (E ~ 100-500, 2048 x 2048 float32
#: is 2-8 GiB) and below what a header with corrupt sizes asks for.
MAX_STACK_BYTES = 16 * 2**30

#: How many times its stored bytes an array may take once read: a dataset or TIFF page whose declared
#: size is over ``MAX_EXPANSION`` x its stored bytes + ``EXPANSION_ALLOWANCE`` is refused before it is
#: allocated (chunks never written, or a decompression bomb). STXM/TXM counts deflate 2-20 times; deflate's
#: own ceiling is about 1032 to 1, so a bound near it would let a zlib bomb through (a 1.2 MB TIFF of zeros
#: declares 895 times its size). At 200, a stack that is mostly constant (an aborted scan pre-filled with NaN)
#: reaches the bound only when under 1 % of it was measured. The allowance lets small fields (energies, a
#: scalar) be stored in a few bytes.
MAX_EXPANSION = 200
EXPANSION_ALLOWANCE = 2**20


class FormatError(ValueError):
    """A file that cannot be imported; the message names the file and what is wrong."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class HDF5Source:
    """Where the images already lie in an HDF5 file, so a run can point at them
    (StreamResource/StreamDatum) instead of copying them.

    ``dataset`` is the HDF5 path of a dataset whose first axis is energy after
    ``energy_axis`` is moved to the front (0 when it already is).
    """

    path: Path
    dataset: str
    energy_axis: int = 0


@dataclass(frozen=True)
class TiffSource:
    """Where the images already lie in TIFF files, so a run can point at them instead of copying them.

    ``files``: one multi-page file whose pages are the stack in order (one page per energy), or one
    single-page file per energy, in the stack's order. ``dtype``: the pixels' type as stored (the
    reader returns them as float); every page has it.
    """

    files: tuple[Path, ...]
    dtype: str


class LazyImages:
    """An (E, Y, X) image stack left in its file and read when indexed: what a reader returns instead of a
    copy of the pixels when the images lie in the file as stored (an uncompressed multi-page TIFF, an HDF5
    dataset of integer counts with energy first), so that an import that leaves them there reads only the
    frames it checks.

    Indexing the first axis (an int or a slice) reads those frames and returns them as ``dtype`` (the
    reader's float type, :func:`intensity_dtype`); ``np.asarray(stack)`` reads them all. ``stored_dtype``
    is the pixels' type in the file. ``read(key)`` is the reader's: it returns the stored frames of ``key``.
    """

    ndim = 3

    def __init__(self, shape: tuple[int, int, int], stored_dtype, dtype, read):
        self.shape = tuple(int(n) for n in shape)
        self.stored_dtype = np.dtype(stored_dtype)
        self.dtype = np.dtype(dtype)
        self._read = read

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            first, rest = key[0], key[1:]
            return self[first][(slice(None), *rest) if isinstance(first, slice) else rest]
        if isinstance(key, slice):
            return np.asarray(self._read(slice(*key.indices(self.shape[0]))), dtype=self.dtype)
        index = int(key)
        if not -self.shape[0] <= index < self.shape[0]:
            raise IndexError(f"frame {index} of {self.shape[0]}")
        return np.asarray(self._read(index % self.shape[0]), dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):
        frames = self[:]
        return frames if dtype is None else frames.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyImages(shape={self.shape}, stored_dtype={self.stored_dtype}, dtype={self.dtype})"


@dataclass(frozen=True)
class ImportedStack:
    """One energy stack read from a facility file.

    Attributes
    ----------
    source : the file (or folder: of TIFFs, of Zeiss .xrm frames) the stack came from
    format : reader name (``"nxstxm"``, ``"axis2000"``, ``"tiff"``, ``"pyxas"``, ``"xrm"``, ``"xrm-series"``)
    energies : (E,) float64, eV, in acquisition order: finite and distinct (not necessarily increasing)
    images : (E, Y, X) float32 or float64: transmitted counts (STXM) or sample-in images (TXM); an array,
        or :class:`LazyImages` (same shape and dtype, read from the file when indexed) when the reader
        left them in the file
    mode : ``"stxm"`` or ``"txm"``
    i0 : None, (E,) or (E, Y, X): incident flux for STXM (counts per pixel in the open beam)
    flat : None or (E, Y, X) / (Y, X): TXM sample-out images; ``dark`` likewise (Y, X)
    metadata : facility metadata (sample name, dwell in ms, beamline, pixel size in um, ...);
        plain JSON values only
    files : every file read, for provenance; ``sha256`` is over them in this order
    hdf5 : where the images lie in HDF5, when they do (see :class:`HDF5Source`)
    tiff : where the images lie in TIFF files, when they do as stored pages (see :class:`TiffSource`)
    part : which of several stacks in the same files was read, when they hold several (NXstxm
        ``{"entry": ..., "channel": ...}``); empty otherwise. Part of the import's identity (:meth:`sha256`)
    monitor : None, (E,) or (E, Y, X): a flux monitor recorded with the images (NXstxm
        ``control``: usually the storage-ring current). Relative, not an I0: it corrects
        flux changes between points (divide the images by ``monitor / median(monitor)``); the
        absolute I0 still comes from the open beam
    """

    source: Path
    format: str
    energies: np.ndarray
    images: np.ndarray
    mode: str = "stxm"
    i0: np.ndarray | None = None
    flat: np.ndarray | None = None
    dark: np.ndarray | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()
    hdf5: HDF5Source | None = None
    monitor: np.ndarray | None = None
    tiff: TiffSource | None = None
    part: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        energies = np.asarray(self.energies, dtype=np.float64)
        if energies.ndim != 1 or energies.size == 0:
            raise FormatError(self.source, f"energies must be a non-empty list, got shape {energies.shape}")
        if not np.all(np.isfinite(energies)):
            raise FormatError(self.source, "energies contain NaN or inf")
        unique, counts = np.unique(energies, return_counts=True)
        if np.any(counts > 1):
            raise FormatError(self.source, f"duplicate energies (eV): {unique[counts > 1].tolist()}")
        images = self.images
        if images.ndim != 3:
            raise FormatError(self.source, f"images must be (energy, y, x), got shape {images.shape}")
        if images.shape[0] != energies.size:
            raise FormatError(self.source, f"{images.shape[0]} images for {energies.size} energies")
        if self.mode not in MODES:
            raise FormatError(self.source, f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "energies", energies)
        object.__setattr__(self, "files", tuple(Path(p) for p in (self.files or (self.source,))))

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape (Y, X)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def sha256(self) -> str:
        """SHA-256 over the bytes of every file read, in order, then over the ``part`` read when the files hold
        several stacks (its JSON, keys sorted): the identity of an import, one per stack."""
        return sha256_of(self.files, json.dumps(dict(self.part), sort_keys=True).encode() if self.part else b"")


def check_stack_size(path: str | Path, shape: tuple[int, ...], dtype, limit: int = MAX_STACK_BYTES) -> None:
    """Refuse a stack of ``shape`` and ``dtype`` larger than ``limit`` bytes, before allocating it.

    Raises :class:`FormatError` naming ``path`` for a negative size or one over the limit.
    """
    if any(int(n) < 0 for n in shape):
        raise FormatError(path, f"negative image size {tuple(shape)}")
    nbytes = int(np.dtype(dtype).itemsize)
    for n in shape:
        nbytes *= int(n)
    if nbytes > limit:
        raise FormatError(
            path,
            f"a stack of shape {tuple(int(n) for n in shape)} ({np.dtype(dtype)}) is {nbytes / 2**30:.1f} GiB, "
            f"over the {limit / 2**30:.0f} GiB bound of a reader (corrupt header?)",
        )


def check_expansion(path: str | Path, what: str, declared_bytes: int, stored_bytes: int) -> None:
    """Refuse ``what``, which declares ``declared_bytes`` and stores ``stored_bytes`` in ``path``, when it would
    expand over ``MAX_EXPANSION`` times (see there), before it is read.

    Raises :class:`FormatError` naming ``path`` and ``what``.
    """
    if declared_bytes > MAX_EXPANSION * stored_bytes + EXPANSION_ALLOWANCE:
        raise FormatError(
            path,
            f"{what} declares {declared_bytes / 2**20:.1f} MiB but stores {stored_bytes} bytes, a {MAX_EXPANSION}-fold "
            "expansion or more: data never written or a decompression bomb, not read",
        )


def intensity_dtype(path: str | Path, dtype) -> np.dtype:
    """The float type images of ``dtype`` are returned in: float32 for 8/16-bit integers and
    float32 (exact), float64 for wider integers and float64. Refuses non-numeric types."""
    dtype = np.dtype(dtype)
    if (dtype.kind in "ui" and dtype.itemsize <= 2) or dtype == np.float32:
        return np.dtype(np.float32)
    if dtype.kind in "uif" and dtype.itemsize <= 8:
        return np.dtype(np.float64)
    raise FormatError(path, f"pixel type {dtype} is not an intensity (integer or float)")


def sha256_of(paths, suffix: bytes = b"") -> str:
    """SHA-256 over the bytes of ``paths`` in order (1 MiB reads), then over ``suffix``."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(suffix)
    return digest.hexdigest()
