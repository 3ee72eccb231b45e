"""Facility STXM/TXM file readers: each turns a file into an :class:`ImportedStack`.

:func:`read_stack` picks the reader from the file (or ``format=``); the readers themselves are
``read_<format>`` in the module of that name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from phasestream.formats.axis2000 import read_axis2000
from phasestream.formats.detect import detect_format
from phasestream.formats.nxstxm import read_nxstxm
from phasestream.formats.pyxas import read_pyxas
from phasestream.formats.stack import FormatError, HDF5Source, ImportedStack, LazyImages, TiffSource, sha256_of
from phasestream.formats.tiff import read_tiff
from phasestream.formats.xrm import read_xrm
from phasestream.formats.xrm_series import read_xrm_series

__all__ = ["FORMATS", "SELECTIONS", "FormatError", "HDF5Source", "ImportedStack", "LazyImages", "TiffSource",
           "detect_format", "read_stack", "sha256_of"]

_READERS: dict[str, Callable[..., ImportedStack]] = {
    "tiff": read_tiff,
    "nxstxm": read_nxstxm,
    "pyxas": read_pyxas,
    "axis2000": read_axis2000,
    "xrm": read_xrm,
    "xrm-series": read_xrm_series,
}
#: Reader names :func:`read_stack` accepts as ``format=``.
FORMATS: tuple[str, ...] = tuple(_READERS)
#: What :func:`read_stack`'s ``select`` may name, per reader: which part of files holding several to read
SELECTIONS: dict[str, tuple[str, ...]] = {
    "nxstxm": ("entry", "channel"),
    "axis2000": ("channel",),
    "xrm-series": ("field", "pattern"),
}
# readers whose files do not say whether the images are STXM or TXM: they take mode=
_MODE_FREE = ("tiff",)


def read_stack(
    path: str | Path,
    *,
    format: str | None = None,
    energies: Sequence[float] | np.ndarray | str | Path | None = None,
    mode: str | None = None,
    select: Mapping[str, str] | None = None,
) -> ImportedStack:
    """Read one energy stack from a facility file.

    Parameters
    ----------
    path : the file, or a folder: of TIFFs, or of Zeiss ``.xrm`` frames (``xrm-series``)
    format : one of :data:`FORMATS`; detected from the name and content when None
    energies : (E,) energies in eV or an energy file: required by formats without energies
        (TIFF; found beside the file when None), else they replace the file's energies
        (same count)
    mode : ``"stxm"`` or ``"txm"`` for formats that do not say (TIFF, default ``"stxm"``);
        for the others it must agree with the file
    select : which part of files that hold several to read, by the names of :data:`SELECTIONS` for the
        format (NXstxm ``entry`` and ``channel``, aXis2000 ``channel``, ``xrm-series`` ``field`` and
        ``pattern``); a name the format does not take is refused

    Returns
    -------
    ImportedStack (images (E, Y, X), energies (E,) eV, provenance).

    Raises
    ------
    FormatError
        unknown format, a file that cannot be read, or a stack that is not consistent.
    """
    path = Path(path)
    try:
        name = detect_format(path) if format is None else format.lower()
    except FormatError:
        raise
    except Exception as exc:  # anything detection meets in a file is still that file's error
        raise FormatError(path, f"could not tell the format of this file: {type(exc).__name__}: {exc}") from exc
    reader = _READERS.get(name)
    if reader is None:
        raise FormatError(path, f"no reader for format {name!r}; known: {', '.join(FORMATS)}")
    chosen = dict(select or {})
    unknown = sorted(set(chosen) - set(SELECTIONS.get(name, ())))
    if unknown:
        takes = ", ".join(f"{key}=" for key in SELECTIONS.get(name, ())) or "none"
        raise FormatError(path, f"{', '.join(f'{key}=' for key in unknown)} is not a choice of the {name} reader "
                          f"(it takes: {takes})")
    try:
        if name in _MODE_FREE:
            return reader(path, energies=energies, mode=mode or "stxm")
        stack = reader(path, energies=energies, **chosen)
    except (FormatError, OSError, MemoryError):
        raise
    except Exception as exc:  # a file the reader's checks did not foresee: still that file's error, not a crash
        raise FormatError(path, f"the {name} reader could not read this file: {type(exc).__name__}: {exc}") from exc
    if mode is not None and mode != stack.mode:
        raise FormatError(path, f"a {name} file holds a {stack.mode} stack, not {mode}")
    return stack
