"""Which reader a file needs: by its name, else by its first bytes and, for HDF5, by its content."""

from __future__ import annotations

import os
from pathlib import Path

import h5py

from phasestream.formats.hdf5util import HDF5_ERRORS, open_hdf5
from phasestream.formats.nxstxm import nxstxm_entries
from phasestream.formats.stack import FormatError

__all__ = ["HDF5_SUFFIXES", "detect_format", "folder_format", "hdf5_flavour"]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".nxs", ".nx5", ".nx", ".cxi")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def hdf5_flavour(path: str | Path) -> str:
    """``"nxstxm"`` for a NeXus file with an NXstxm entry, ``"pyxas"`` for PyXAS's layout.

    Raises :class:`FormatError` for an unreadable HDF5 file or one that is neither.
    """
    path = Path(path)
    with open_hdf5(path) as handle:
        try:
            if nxstxm_entries(handle):
                return "nxstxm"
            if isinstance(handle.get("img_xanes"), h5py.Dataset) and isinstance(handle.get("X_eng"), h5py.Dataset):
                return "pyxas"
            keys = sorted(handle)[:20]
        except HDF5_ERRORS as error:  # a corrupt object header or link
            raise FormatError(path, f"cannot tell the HDF5 flavour (corrupt file?): {type(error).__name__}: "
                              f"{error}") from None
    raise FormatError(
        path,
        f"HDF5 file is neither NeXus NXstxm (an NXentry with definition 'NXstxm') nor PyXAS "
        f"(img_xanes and X_eng); top-level keys: {keys}",
    )


def folder_format(path: str | Path) -> str:
    """``"xrm-series"`` for a folder that holds ``.xrm`` files and no TIFF, else ``"tiff"`` (a folder of
    TIFFs, or one with neither, which the TIFF reader refuses as holding no TIFF). By the names of the
    folder's entries (hidden ones skipped); nothing is opened.

    Raises :class:`FormatError` for a folder that holds both, naming the formats to choose from.
    """
    path = Path(path)
    with os.scandir(path) as entries:
        suffixes = {os.path.splitext(e.name)[1].lower() for e in entries if not e.name.startswith(".")}
    has_xrm, has_tiff = ".xrm" in suffixes, bool(suffixes & {".tif", ".tiff"})
    if has_xrm and has_tiff:
        raise FormatError(path, "the folder holds both .xrm and TIFF files: pass format= 'xrm-series' or 'tiff'")
    return "xrm-series" if has_xrm else "tiff"


def detect_format(path: str | Path) -> str:
    """The reader name for ``path``: ``tiff``, ``nxstxm``, ``pyxas``, ``axis2000``, ``xrm`` or ``xrm-series``.

    A folder is a Zeiss series when it holds ``.xrm`` files, else a folder of TIFFs (:func:`folder_format`).
    A file is known by its suffix (``.tif``, ``.hdr``, ``.xrm`` / ``.txrm``, HDF5 suffixes), else by its
    first bytes; an HDF5 file is told apart by content (:func:`hdf5_flavour`).
    """
    path = Path(path)
    if path.is_dir():
        return folder_format(path)
    if not path.is_file():
        raise FormatError(path, "no such file or folder")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return "tiff"
    if suffix == ".hdr":
        return "axis2000"
    if suffix in (".xrm", ".txrm"):
        return "xrm"
    with open(path, "rb") as handle:
        head = handle.read(8)
    if suffix in HDF5_SUFFIXES or head == _HDF5_MAGIC:
        return hdf5_flavour(path)
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if head == _OLE_MAGIC:
        return "xrm"
    raise FormatError(path, f"unknown stack format (suffix {suffix!r}); pass format= one of the known formats")
