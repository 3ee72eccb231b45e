"""What every facility-file reader returns: one energy stack, its energies and its provenance.

A reader is a function ``read_<format>(path, *, energies=None) -> ImportedStack``. It reads
arrays and metadata only: no Tiled, no Bluesky, no logging in loops. The import job
(:mod:`phasestream.jobs.importing`) turns an :class:`ImportedStack` into a Bluesky run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FormatError", "HDF5Source", "ImportedStack", "sha256_of"]

MODES = ("stxm", "txm")


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
class ImportedStack:
    """One energy stack read from a facility file.

    Attributes
    ----------
    source : the file (or folder, for a folder of TIFFs) the stack came from
    format : reader name (``"nxstxm"``, ``"axis2000"``, ``"tiff"``, ``"pyxas"``, ``"xrm"``)
    energies : (E,) float64, eV, in acquisition order
    images : (E, Y, X) float32 or float64: transmitted counts (STXM) or sample-in images (TXM)
    mode : ``"stxm"`` or ``"txm"``
    i0 : None, (E,) or (E, Y, X): incident flux for STXM (counts per pixel in the open beam)
    flat : None or (E, Y, X) / (Y, X): TXM sample-out images; ``dark`` likewise (Y, X)
    metadata : facility metadata (sample name, dwell in ms, beamline, pixel size in um, ...);
        plain JSON values only
    files : every file read, for provenance; ``sha256`` is over them in this order
    hdf5 : where the images lie in HDF5, when they do (see :class:`HDF5Source`)
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

    def __post_init__(self) -> None:
        energies = np.asarray(self.energies, dtype=np.float64)
        if energies.ndim != 1 or energies.size == 0:
            raise FormatError(self.source, f"energies must be a non-empty list, got shape {energies.shape}")
        if not np.all(np.isfinite(energies)):
            raise FormatError(self.source, "energies contain NaN or inf")
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
        """SHA-256 over the bytes of every file read, in order: the identity of an import."""
        return sha256_of(self.files)


def sha256_of(paths) -> str:
    """SHA-256 over the bytes of ``paths`` in order (1 MiB reads)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
