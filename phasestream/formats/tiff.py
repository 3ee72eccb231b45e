"""TIFF energy stacks: one multi-page TIFF, or a folder of single-image TIFFs, plus an energy list.

TIFF carries no energies, so they come from ``energies=`` (a sequence in eV, or an energy file,
see :mod:`phasestream.formats.energies`) or, when that is not given, from a file found beside
the images: ``<stem>.txt`` or ``energies.txt`` next to a multi-page TIFF, ``energies.txt``
inside a folder of TIFFs.

A multi-page file gives one energy per page (2-D greyscale pages of one shape). A folder gives
one energy per ``*.tif`` / ``*.tiff`` file, in natural name order (``img_2.tif`` before
``img_10.tif``); hidden files (``.*``) are skipped. Pages with several samples per pixel (RGB,
or a stack written by ``tifffile.imwrite`` without ``photometric="minisblack"``) are refused.
Images are returned as float32 (8/16-bit integers and float32) or float64 (wider types); ``tiff``
says where they lie as stored, so that an import can leave them in their files. The pages of an
uncompressed multi-page file, stored one after the other, are mapped from the file rather than read
(:class:`~phasestream.formats.stack.LazyImages`): an import that leaves them there reads only the
frames it checks; so are the images of a folder of uncompressed single-page TIFFs of one pixel type.
Pages whose pixels declare far more bytes than the file stores for them (a decompression bomb) are refused
before any is decoded (:func:`~phasestream.formats.stack.check_expansion`).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from phasestream.formats.energies import load_energies
from phasestream.formats.stack import (
    MODES,
    FormatError,
    ImportedStack,
    LazyImages,
    TiffSource,
    check_expansion,
    check_stack_size,
    intensity_dtype,
)

__all__ = ["TIFF_SUFFIXES", "find_energy_file", "natural_key", "read_tiff", "tiff_files"]

TIFF_SUFFIXES = (".tif", ".tiff")

# what tifffile raises on a truncated or corrupt file; zlib.error and RuntimeError (imagecodecs'
# codec errors) come from compressed data that does not decode
_TIFF_ERRORS = (
    tifffile.TiffFileError,
    ValueError,
    OSError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    zlib.error,
    RuntimeError,
)


# tifffile, left to itself, assembles a file's series from its metadata: OME-XML (whose TiffData can
# map planes to pages in any order, and whose UUID FileName entries make it open other files, named
# relative to the file or absolutely), Micro-Manager stacks and NDTiff (index files, other files).
# Every file here is opened alone, on its pages; only these series kinds keep the pages' order.
_ALONE = {"is_ome": False, "is_mmstack": False, "is_ndtiff": False, "_multifile": False}
_PAGE_ORDER_SERIES = ("generic", "uniform", "shaped", "imagej")


def _open(path: Path) -> tifffile.TiffFile:
    """``path`` opened alone (see ``_ALONE``)."""
    return tifffile.TiffFile(path, **_ALONE)


def _series_in_page_order(tif: tifffile.TiffFile) -> bool:
    """True when a reader that takes the file's first series as tifffile makes it by default (Tiled's
    TIFF adapters) gets the pages in their order: no OME-XML or Micro-Manager metadata to reorder them
    (or to name other files), and a series kind that follows the pages."""
    first = tif.pages.first
    return (not first.is_ome and not first.is_micromanager and bool(tif.series)
            and tif.series[0].kind in _PAGE_ORDER_SERIES)


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``a_2`` before ``a_10``."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name))


def tiff_files(folder: str | Path) -> list[Path]:
    """The TIFF files of ``folder`` (not recursive, no hidden files), in natural name order."""
    folder = Path(folder)
    files = [
        p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def find_energy_file(path: str | Path) -> Path | None:
    """The energy file that goes with a TIFF file or folder, if there is one (see module doc)."""
    path = Path(path)
    candidates = [path / "energies.txt"] if path.is_dir() else [path.with_suffix(".txt"), path.parent / "energies.txt"]
    return next((c for c in candidates if c.is_file()), None)


def _page_shape(path: Path, page, index: int) -> tuple[int, int]:
    if getattr(page, "samplesperpixel", 1) != 1 or len(page.shape) != 2:
        raise FormatError(
            path,
            f"page {index} has shape {page.shape} (axes {page.axes}): expected one 2-D greyscale image per energy "
            "(write stacks with photometric='minisblack')",
        )
    empty = sum(1 for count in page.databytecounts if count == 0)
    if empty:  # tifffile would fill them with zeros: counts that were never measured
        raise FormatError(path, f"page {index} has {empty} of {len(page.databytecounts)} strips or tiles without "
                          "data (a sparse TIFF): their pixels were not recorded")
    return tuple(int(n) for n in page.shape)


def _check_stored(path: Path, pages: list) -> None:
    """Refuse ``pages`` whose pixels, decoded, would take over ``MAX_EXPANSION`` times the bytes the file stores
    for them (their strip or tile byte counts, at most the file's size), before any is decoded."""
    declared = sum(int(page.nbytes) for page in pages)
    stored = min(sum(int(count) for page in pages for count in page.databytecounts), path.stat().st_size)
    what = f"the pixel data of {len(pages)} page" + ("s" if len(pages) > 1 else "")
    check_expansion(path, what, declared, stored)


def _ifd_chain_ends(tif: tifffile.TiffFile) -> bool:
    """True when the last page tifffile found ends the IFD chain (next-IFD offset 0).

    tifffile stops at a broken chain with a logged error and fewer pages; a truncated file then
    looks like a shorter stack unless the chain is checked.
    """
    fmt = tif.tiff
    handle = tif.filehandle
    offset = tif.pages[-1].offset
    handle.seek(offset)
    raw = handle.read(fmt.tagnosize)
    if len(raw) < fmt.tagnosize:
        return False
    (count,) = struct.unpack(fmt.tagnoformat, raw)
    handle.seek(offset + fmt.tagnosize + count * fmt.tagsize)
    raw = handle.read(fmt.offsetsize)
    return len(raw) == fmt.offsetsize and struct.unpack(fmt.offsetformat, raw)[0] == 0


def _read_multipage(path: Path) -> tuple[np.ndarray | LazyImages, str | None]:
    """The pages as (E, Y, X) and the pixels' stored dtype when the file's first series is exactly those pages
    (what a TIFF reader that reads the series, such as Tiled's, returns), else None. Such pages stored
    uncompressed, one after the other, are mapped from the file (:func:`_mapped`), not read."""
    try:
        with _open(path) as tif:
            pages = tif.pages
            pages.useframes = False
            count = len(pages)
            if count == 0:
                raise FormatError(path, "TIFF file has no image")
            if not _ifd_chain_ends(tif):
                raise FormatError(path, f"truncated or corrupt TIFF: the page list breaks off after {count} page(s)")
            first = pages[0]
            shape = _page_shape(path, first, 0)
            dtype = intensity_dtype(path, first.dtype)
            check_stack_size(path, (count, *shape), dtype)
            uniform = True
            for index in range(1, count):
                page = pages[index]
                if _page_shape(path, page, index) != shape:
                    raise FormatError(path, f"page {index} has shape {page.shape}, page 0 has {shape}")
                uniform = uniform and page.dtype == first.dtype
            _check_stored(path, [pages[index] for index in range(count)])
            series = tif.series[0] if tif.series else None
            stored = (np.dtype(first.dtype).str if uniform and series is not None and series.dtype == first.dtype
                      and _series_in_page_order(tif) and int(np.prod(series.shape)) == count * shape[0] * shape[1]
                      else None)
            contiguous = stored is not None and series.dataoffset is not None
            data = None if contiguous else _pixels(tif, count, shape, dtype)
        if data is None:
            data = _mapped(path, (count, *shape), dtype)
        if data is None:  # pixel data that run past the end of the file: read them, and fail, the usual way
            with _open(path) as tif:
                data = _pixels(tif, count, shape, dtype)
    except FormatError:
        raise
    except _TIFF_ERRORS as error:
        raise _unreadable(path, error) from None
    return data, stored


def _pixels(tif: tifffile.TiffFile, count: int, shape: tuple[int, int], dtype) -> np.ndarray:
    """Every page's pixels, (E, Y, X) as ``dtype``."""
    data = tif.asarray(key=range(count)) if count > 1 else tif.pages[0].asarray()[np.newaxis]
    return np.asarray(data).reshape(count, *shape).astype(dtype, copy=False)


def _mapped(path: Path, shape: tuple[int, int, int], dtype) -> LazyImages | None:
    """The pages of an uncompressed, contiguous multi-page TIFF mapped from the file (read when indexed), or
    None when the file cannot be mapped (its pixel data run past its end)."""
    try:
        mapped = tifffile.memmap(path, mode="r", **_ALONE)
    except (ValueError, OSError):
        return None
    if mapped.size != shape[0] * shape[1] * shape[2]:
        return None
    frames = mapped.reshape(shape)
    return LazyImages(shape, frames.dtype, dtype, frames.__getitem__)


def _read_folder(folder: Path, files: list[Path]) -> tuple[np.ndarray | LazyImages, str | None]:
    """The files' images as (E, Y, X) and their pixels' stored dtype when every file has the same, else None.

    Every header is read and checked first; when every file holds its pixels uncompressed in one piece of one
    stored type, inside the file, the images are mapped from the files (read when indexed), else read."""
    shape: tuple[int, int] = (0, 0)
    dtype = np.dtype(np.float32)
    stored: set[str] = set()
    mappable = in_order = True
    for index, path in enumerate(files):
        try:
            with _open(path) as tif:
                if len(tif.pages) != 1:
                    raise FormatError(path, f"{len(tif.pages)} pages in one file of a folder stack (expected 1)")
                if not _ifd_chain_ends(tif):
                    raise FormatError(path, "truncated or corrupt TIFF: its page list does not end")
                page = tif.pages[0]
                page_shape = _page_shape(path, page, 0)
                _check_stored(path, [page])
                if index == 0:
                    shape = page_shape
                    dtype = intensity_dtype(path, page.dtype)
                    check_stack_size(folder, (len(files), *shape), dtype)
                elif page_shape != shape:
                    raise FormatError(path, f"image shape {page_shape} differs from {shape} of {files[0].name}")
                elif intensity_dtype(path, page.dtype).itemsize > dtype.itemsize:
                    dtype = np.dtype(np.float64)
                stored.add(np.dtype(page.dtype).str)
                in_order = in_order and _series_in_page_order(tif)
                mappable = mappable and bool(page.is_contiguous) and (
                    page.dataoffsets[0] + sum(page.databytecounts) <= path.stat().st_size)
        except FormatError:
            raise
        except _TIFF_ERRORS as error:
            raise _unreadable(path, error) from None
    one_type = stored.pop() if len(stored) == 1 and in_order else None
    if mappable and one_type is not None:
        def read(key):
            chosen = range(len(files))[key] if isinstance(key, slice) else [key]
            try:
                frames = [tifffile.memmap(files[i], mode="r", **_ALONE) for i in chosen]
            except (ValueError, OSError) as error:
                raise _unreadable(files[chosen[0]], error) from None
            if not isinstance(key, slice):
                return frames[0]
            return np.stack(frames) if frames else np.empty((0, *shape), one_type)

        return LazyImages((len(files), *shape), one_type, dtype, read), one_type
    images = np.empty((len(files), *shape), dtype=dtype)
    for index, path in enumerate(files):
        try:
            images[index] = tifffile.imread(path, **_ALONE)
        except _TIFF_ERRORS as error:
            raise _unreadable(path, error) from None
    return images, one_type


def read_tiff(
    path: str | Path,
    *,
    energies: Sequence[float] | np.ndarray | str | Path | None = None,
    mode: str = "stxm",
) -> ImportedStack:
    """Read a TIFF energy stack (multi-page file or folder of TIFFs).

    Parameters
    ----------
    path : a ``.tif`` / ``.tiff`` file (one page per energy) or a folder of TIFFs (one per energy)
    energies : (E,) energies in eV, or an energy file; found beside the images when None
    mode : ``"stxm"`` (images are transmitted counts; I0 is estimated later) or ``"txm"``

    Returns
    -------
    ImportedStack with images (E, Y, X) float32/float64, energies (E,) eV, ``files`` the
    TIFF files read then the energy file (if one was read), ``tiff`` the TIFF files when their
    pages, as stored, are the stack (one pixel type; for a multi-page file, its first series).

    Raises
    ------
    FormatError
        missing path or energies, a corrupt or truncated TIFF, mixed image shapes, or a number
        of images different from the number of energies.
    """
    path = Path(path)
    if mode not in MODES:
        raise FormatError(path, f"mode must be one of {MODES}, got {mode!r}")
    if path.is_dir():
        files = tiff_files(path)
        if not files:
            raise FormatError(path, f"no TIFF files ({', '.join(TIFF_SUFFIXES)}) in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise FormatError(path, "no such file or folder")
    energy_file: Path | None = None
    if energies is None:
        energy_file = find_energy_file(path)
        if energy_file is None:
            where = "energies.txt in the folder" if path.is_dir() else f"{path.stem}.txt or energies.txt beside it"
            raise FormatError(path, f"TIFF has no energies: pass energies= (eV or an energy file) or put {where}")
        energies = energy_file
    elif isinstance(energies, str | Path):
        energy_file = Path(energies)
    values = load_energies(energies, path)
    if path.is_dir() and len(files) != values.size:
        raise FormatError(path, f"{len(files)} TIFF files for {values.size} energies")
    images, stored = _read_folder(path, files) if path.is_dir() else _read_multipage(path)
    if images.shape[0] != values.size:
        raise FormatError(path, f"{images.shape[0]} images (pages) for {values.size} energies")
    provenance = tuple(files) + ((energy_file,) if energy_file is not None else ())
    metadata = {"image_files": [f.name for f in files]} if path.is_dir() else {}
    return ImportedStack(
        source=path, format="tiff", energies=values, images=images, mode=mode, metadata=metadata, files=provenance,
        tiff=TiffSource(tuple(files), stored) if stored is not None else None,
    )


def _unreadable(path: Path, error: Exception) -> FormatError:
    """tifffile's (or a codec's) error on ``path`` as a FormatError that says what may be wrong."""
    return FormatError(
        path,
        "cannot read the TIFF (truncated, corrupt, or compressed with a codec that is not installed): "
        f"{type(error).__name__}: {error}",
    )
