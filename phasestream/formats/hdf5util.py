"""Small h5py helpers shared by the HDF5 readers (NXstxm, PyXAS): text values, bounded and lazy reads."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from phasestream.formats.hdf5storage import check_stored, stored_extent, unwritten
from phasestream.formats.stack import FormatError, LazyImages, check_stack_size

__all__ = ["MAX_AXIS_VALUES", "MAX_TEXT_ELEMENTS", "is_empty", "lazy_frames", "open_hdf5", "outside_references",
           "read_array", "read_text", "scalar", "text"]

MAX_TEXT_ELEMENTS = 16  # a text field (definition, stxm_scan_type, units) is one string, a few at most
MAX_AXIS_VALUES = 1_000_000  # energies (or positions) along one axis: read only below this count
# what h5py raises on a corrupt object header, link or chunk index (a checksum that fails: RuntimeError)
HDF5_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)


def outside_references(handle: h5py.File) -> list[str]:
    """What in an open HDF5 file makes h5py read another host file: external links, datasets with
    external storage (raw bytes of any file) and virtual datasets (``[]`` when none). Such a file names
    host files that no configured folder vouches for, and its checksum does not cover their bytes."""
    found: list[str] = []

    def link(name: str, info: h5py.ExternalLink | h5py.SoftLink | h5py.HardLink) -> None:
        if isinstance(info, h5py.ExternalLink):
            found.append(f"/{name} is an external link to {info.filename!r:.80}")

    def dataset(name: str, node) -> None:
        if isinstance(node, h5py.Dataset) and node.external:
            found.append(f"/{name} keeps its data in external files")
        elif isinstance(node, h5py.Dataset) and node.is_virtual:
            found.append(f"/{name} is a virtual dataset (its data lies in other files)")

    handle.visititems_links(link)
    handle.visititems(dataset)
    return found


def open_hdf5(path: str | Path) -> h5py.File:
    """Open ``path`` read-only; a missing, truncated or non-HDF5 file is a :class:`FormatError`, and so
    is a file that refers to other host files (:func:`outside_references`): only the file named is read."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise FormatError(path, f"not a readable HDF5 file (truncated or corrupt?): {error}") from None
    try:
        found = outside_references(handle)
    except HDF5_ERRORS as error:
        handle.close()
        raise FormatError(path, f"cannot walk the file's objects (corrupt file?): {type(error).__name__}: {error}") \
            from None
    if found:
        handle.close()
        raise FormatError(path, "refers to other files, which are not read: " + "; ".join(found[:3])
                          + (f" (and {len(found) - 3} more)" if len(found) > 3 else ""))
    return handle


def text(value) -> str:
    """A string from an HDF5 value: bytes (UTF-8, else Latin-1), str, or a one-element array of either
    (NeXus writers store ``definition`` both as a scalar and as a (1,) array)."""
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return " ".join(text(v) for v in value.ravel())
        value = value.ravel()[0]
    if isinstance(value, bytes | np.bytes_):
        raw = bytes(value)
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:  # Latin-1, as some writers store units: b"\xb5m" is "µm"
            decoded = raw.decode("latin-1")
        return decoded.rstrip("\x00").strip()
    return str(value).strip()


def is_empty(node: h5py.Dataset) -> bool:
    """True for a dataset with no value: a null dataspace (``h5py.Empty``) or a shape with a 0."""
    return node.shape is None or node.size == 0


def scalar(node) -> float | str | None:
    """A JSON-able value of a small dataset (number or text), None for anything else (an empty one included:
    an optional field without a value is absent)."""
    if not isinstance(node, h5py.Dataset) or is_empty(node) or node.size > 1:
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


def read_text(path: Path, node, what: str) -> str:
    """The text of a short string dataset (:func:`text`), its size checked before it is read: a field that
    should hold one string and holds millions is a :class:`FormatError`, not a read."""
    if not isinstance(node, h5py.Dataset):
        raise FormatError(path, f"{what} is not a dataset")
    if is_empty(node):
        raise FormatError(path, f"{what} ({node.name}) is empty")
    if node.dtype.kind not in "SUO" or node.size > MAX_TEXT_ELEMENTS:
        raise FormatError(path, f"{what} ({node.name}) is {node.size} values of {node.dtype}, not a text")
    try:
        return text(node[()])
    except (OSError, TypeError, ValueError) as error:
        raise FormatError(path, f"cannot read {what} ({node.name}): {error}") from None


def read_array(path: Path, dataset: h5py.Dataset, dtype, *, what: str, max_values: int | None = None,
               within_signal: bool = False) -> np.ndarray:
    """Read all of ``dataset`` as the float ``dtype`` after checking its size (and its count against ``max_values``)
    and that it stores what it declares (:func:`~phasestream.formats.hdf5storage.check_stored`; not for a dataset
    ``within_signal``, checked by the caller to hold no more values than the signal, which met the check: a
    constant monitor compresses far beyond it). What was never written is NaN, unmeasured, not the fill value.
    An empty dataset and HDF5 read errors (a truncated file) are :class:`FormatError` naming ``what``."""
    if dataset.dtype.kind not in "uif":
        raise FormatError(path, f"{what} ({dataset.name}) holds {dataset.dtype}, not numbers")
    if is_empty(dataset):
        raise FormatError(path, f"{what} ({dataset.name}) is empty")
    if max_values is not None and dataset.size > max_values:
        raise FormatError(path, f"{what} ({dataset.name}) has {dataset.size} values, over the {max_values} read")
    check_stack_size(path, dataset.shape, dtype)
    if not within_signal:
        check_stored(path, dataset, what)
    out = np.empty(dataset.shape, dtype=dtype)
    try:
        dataset.read_direct(out)
        missing = unwritten(dataset)
    except HDF5_ERRORS as error:
        raise FormatError(path, f"cannot read {what} ({dataset.name}): {error} (truncated file?)") from None
    if missing is not None:
        missing.mark(out, range(out.shape[0]) if out.ndim else ())
    return out


def lazy_frames(path: Path, dataset: h5py.Dataset, dtype, *, what: str) -> LazyImages:
    """``dataset`` (energy first, 3-D) as :class:`LazyImages` read from ``path`` when indexed, after checking
    its size, that it stores what it declares and that its stored bytes lie within the file (a truncated file
    is refused here, as a full read would refuse it).

    Each read opens the file again through :func:`open_hdf5` (a file replaced since, that now refers to other
    host files, is refused) and checks the dataset still has its shape and type; what was never written reads
    as NaN. An HDF5 error then is a :class:`FormatError` naming ``what``."""
    if dataset.dtype.kind not in "uif" or is_empty(dataset) or dataset.ndim != 3:
        raise FormatError(path, f"{what} ({dataset.name}) is {dataset.shape} {dataset.dtype}, not (energy, y, x) "
                          "numbers")
    check_stack_size(path, dataset.shape, dtype)
    check_stored(path, dataset, what)
    end, size = stored_extent(dataset), Path(path).stat().st_size
    if end > size:
        raise FormatError(path, f"cannot read {what} ({dataset.name}): its data end at byte {end} of a {size}-byte "
                          "file (truncated file?)")
    name, shape, stored = dataset.name, tuple(dataset.shape), dataset.dtype

    def read(key):
        with open_hdf5(path) as handle:
            node = handle.get(name)
            if not isinstance(node, h5py.Dataset) or node.shape != shape or node.dtype != stored:
                now = f"{node.shape} {node.dtype}" if isinstance(node, h5py.Dataset) else "not a dataset"
                raise FormatError(path, f"{what} ({name}) changed since it was checked: now {now}, was {shape} "
                                  f"{stored}")
            check_stored(path, node, what)
            try:
                frames = node[key]
                missing = unwritten(node)
            except HDF5_ERRORS as error:
                raise FormatError(path, f"cannot read {what} ({name}): {error} (truncated file?)") from None
        if missing is None:
            return frames
        indices = range(shape[0])[key] if isinstance(key, slice) else [key]
        frames = np.array(frames, dtype=dtype, ndmin=3)
        missing.mark(frames, indices)
        return frames if isinstance(key, slice) else frames[0]

    return LazyImages(dataset.shape, dataset.dtype, dtype, read)
