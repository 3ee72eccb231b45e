"""Small h5py helpers shared by the HDF5 readers (NXstxm, PyXAS): text values, bounded reads."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from phasestream.formats.stack import FormatError, check_stack_size

__all__ = ["open_hdf5", "read_array", "scalar", "text"]


def open_hdf5(path: str | Path) -> h5py.File:
    """Open ``path`` read-only; a missing, truncated or non-HDF5 file is a :class:`FormatError`."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise FormatError(path, f"not a readable HDF5 file (truncated or corrupt?): {error}") from None


def text(value) -> str:
    """A string from an HDF5 value: bytes, str, or a one-element array of either (NeXus writers
    store ``definition`` both as a scalar and as a (1,) array)."""
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return " ".join(text(v) for v in value.ravel())
        value = value.ravel()[0]
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "replace").rstrip("\x00").strip()
    return str(value).strip()


def scalar(node) -> float | str | None:
    """A JSON-able value of a small dataset (number or text), None for anything else."""
    if not isinstance(node, h5py.Dataset) or node.size > 1:
        return None
    value = node[()]
    if isinstance(value, np.ndarray):
        value = value.ravel()[0]
    if isinstance(value, bytes | str | np.bytes_):
        return text(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating) and np.isfinite(value):
        return float(value)
    return None


def read_array(path: Path, dataset: h5py.Dataset, dtype, *, what: str) -> np.ndarray:
    """Read all of ``dataset`` as ``dtype`` after checking its size; HDF5 read errors (a
    truncated file) become :class:`FormatError` naming ``what``."""
    if dataset.dtype.kind not in "uif":
        raise FormatError(path, f"{what} ({dataset.name}) holds {dataset.dtype}, not numbers")
    check_stack_size(path, dataset.shape, dtype)
    out = np.empty(dataset.shape, dtype=dtype)
    try:
        if out.size:
            dataset.read_direct(out)
    except (OSError, TypeError, ValueError) as error:
        raise FormatError(path, f"cannot read {what} ({dataset.name}): {error} (truncated file?)") from None
    return out
