"""Small h5py helpers shared by the HDF5 readers (NXstxm, PyXAS): text values, bounded and lazy reads."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from phasestream.formats.stack import FormatError, LazyImages, check_stack_size

__all__ = ["MAX_AXIS_VALUES", "MAX_TEXT_ELEMENTS", "lazy_frames", "open_hdf5", "outside_references", "read_array",
           "read_text", "scalar", "text"]

MAX_TEXT_ELEMENTS = 16  # a text field (definition, stxm_scan_type, units) is one string, a few at most
MAX_AXIS_VALUES = 1_000_000  # energies (or positions) along one axis: read only below this count


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
    found = outside_references(handle)
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


def read_text(path: Path, node, what: str) -> str:
    """The text of a short string dataset (:func:`text`), its size checked before it is read: a field that
    should hold one string and holds millions is a :class:`FormatError`, not a read."""
    if not isinstance(node, h5py.Dataset):
        raise FormatError(path, f"{what} is not a dataset")
    if node.dtype.kind not in "SUO" or node.size > MAX_TEXT_ELEMENTS:
        raise FormatError(path, f"{what} ({node.name}) is {node.size} values of {node.dtype}, not a text")
    try:
        return text(node[()])
    except (OSError, TypeError, ValueError) as error:
        raise FormatError(path, f"cannot read {what} ({node.name}): {error}") from None


def read_array(path: Path, dataset: h5py.Dataset, dtype, *, what: str, max_values: int | None = None) -> np.ndarray:
    """Read all of ``dataset`` as ``dtype`` after checking its size (and its count against ``max_values``);
    HDF5 read errors (a truncated file) become :class:`FormatError` naming ``what``."""
    if dataset.dtype.kind not in "uif":
        raise FormatError(path, f"{what} ({dataset.name}) holds {dataset.dtype}, not numbers")
    if max_values is not None and dataset.size > max_values:
        raise FormatError(path, f"{what} ({dataset.name}) has {dataset.size} values, over the {max_values} read")
    check_stack_size(path, dataset.shape, dtype)
    out = np.empty(dataset.shape, dtype=dtype)
    try:
        if out.size:
            dataset.read_direct(out)
    except (OSError, TypeError, ValueError) as error:
        raise FormatError(path, f"cannot read {what} ({dataset.name}): {error} (truncated file?)") from None
    return out


def _stored_extent(dataset: h5py.Dataset) -> int:
    """The end (byte offset) of the last byte ``dataset``'s stored data occupy in its file (0 for data kept in
    the object header or not yet written)."""
    ident = dataset.id
    layout = ident.get_create_plist().get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = ident.get_offset()
        return 0 if offset is None else int(offset) + int(ident.get_storage_size())
    if layout == h5py.h5d.CHUNKED:
        ends = [0]
        # one pass over the chunk index (get_chunk_info(i) walks it from the start: quadratic in the chunks)
        ident.chunk_iter(lambda info: ends.append(int(info.byte_offset) + int(info.size)))
        return max(ends)
    return 0


def lazy_frames(path: Path, dataset: h5py.Dataset, dtype, *, what: str) -> LazyImages:
    """``dataset`` (energy first, 3-D) as :class:`LazyImages` read from ``path`` when indexed, after checking
    its size and that its stored bytes lie within the file (a truncated file is refused here, as a full read
    would refuse it). Each read opens the file; an HDF5 error then is a :class:`FormatError` naming ``what``."""
    if dataset.dtype.kind not in "uif" or dataset.ndim != 3:
        raise FormatError(path, f"{what} ({dataset.name}) is {dataset.shape} {dataset.dtype}, not (energy, y, x) "
                          "numbers")
    check_stack_size(path, dataset.shape, dtype)
    end, size = _stored_extent(dataset), Path(path).stat().st_size
    if end > size:
        raise FormatError(path, f"cannot read {what} ({dataset.name}): its data end at byte {end} of a {size}-byte "
                          "file (truncated file?)")
    name = dataset.name

    def read(key):
        try:
            with h5py.File(path, "r") as handle:
                return handle[name][key]
        except (OSError, KeyError, TypeError, ValueError) as error:
            raise FormatError(path, f"cannot read {what} ({name}): {error} (truncated file?)") from None

    return LazyImages(dataset.shape, dataset.dtype, dtype, read)
