"""Where an imported stack's images can stay: the StreamResource that points at the facility file instead of
copying its images into Tiled (docs/import.md, "Images stay in their file").

:func:`external_images` decides from what the reader says (``ImportedStack.hdf5``, ``ImportedStack.tiff``)
and the file headers, reading no pixel:

* an HDF5 dataset, energy first, of the stack's shape: ``application/x-hdf5`` (``dataset``);
* one multi-page TIFF, a page per energy: ``image/tiff`` (:mod:`phasestream.store.external`);
* one single-page TIFF per energy, named as one numbered sequence (``img_001.tif``, ``img_002.tif``, ...):
  ``multipart/related;type=image/tiff`` with a file-name template; the StreamDatum's indices are the
  files' numbers.

Whether the Tiled server will actually read the file is known only by reading it back through Tiled
(the import job does, and copies the images when it does not). The HDF5 file is opened through
:func:`phasestream.formats.hdf5util.open_hdf5`, which refuses a file that refers to other host files (external
links, external storage, virtual datasets): one replaced after the reader read it is copied, not pointed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlunparse

import h5py
import numpy as np

from phasestream.formats import FormatError, ImportedStack
from phasestream.formats.hdf5util import open_hdf5
from phasestream.store.external import TIFF_FILE_MIMETYPE, TIFF_SEQUENCE_MIMETYPE

__all__ = ["HDF5_MIMETYPE", "ExternalImages", "external_images", "file_uri", "numbered_template"]

HDF5_MIMETYPE = "application/x-hdf5"
_HDF5_PATH = re.compile(r"/?[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_NUMBERED = re.compile(r"(.*?)(\d+)(\D*)")


@dataclass(frozen=True)
class ExternalImages:
    """The ``primary`` images of an import left in their file(s): what its StreamResource says.

    ``dtype``: the pixels as stored (and as Tiled serves them); ``first_index``: the StreamDatum's first
    index (0, or the number of the first file of a numbered sequence); ``what``: the file(s), for messages.
    """

    mimetype: str
    uri: str
    dtype: str
    what: str
    parameters: dict[str, Any] = field(default_factory=dict)
    first_index: int = 0


def file_uri(path: str | Path, *, folder: bool = False) -> str:
    """``file://localhost/<absolute path>`` (a trailing ``/`` for a folder), as Tiled's ``ensure_uri`` writes it:
    not percent-encoded, because Tiled's ``path_from_uri`` does not decode."""
    return urlunparse(("file", "localhost", str(Path(path).absolute()) + ("/" if folder else ""), "", "", ""))


def numbered_template(names: list[str]) -> tuple[str, int] | None:
    """``(template, first number)`` when ``names`` are one numbered sequence in order: the same prefix and
    suffix around consecutive numbers, all zero-padded to one width (``{:03d}``) or none padded (``{:d}``);
    else None. Braces are escaped; names with ``%`` (TiledWriter reads ``%d`` templates) are refused."""
    parts = [_NUMBERED.fullmatch(name) for name in names]
    if not parts or any(p is None or "%" in name for p, name in zip(parts, names, strict=True)):
        return None
    prefix, _, suffix = parts[0].groups()
    digits = [p.group(2) for p in parts]
    numbers = [int(d) for d in digits]
    if any(p.group(1) != prefix or p.group(3) != suffix for p in parts):
        return None
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        return None
    widths = {len(d) for d in digits}
    if len(widths) == 1:
        spec = f"{{:0{widths.pop()}d}}"
    elif not any(len(d) > 1 and d.startswith("0") for d in digits):
        spec = "{:d}"
    else:
        return None

    def escape(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    return f"{escape(prefix)}{spec}{escape(suffix)}", numbers[0]


def _hdf5(stack: ImportedStack) -> tuple[ExternalImages | None, str]:
    src = stack.hdf5
    if src.energy_axis != 0:
        return None, f"the images lie with energy on axis {src.energy_axis} of {src.dataset}, not axis 0"
    if not isinstance(src.dataset, str) or _HDF5_PATH.fullmatch(src.dataset) is None:
        return None, f"HDF5 dataset path {src.dataset!r:.60} is not a plain path"
    try:  # checked again for outside references: the file may have been replaced since the reader read it
        with open_hdf5(src.path) as f:
            dataset = f.get(src.dataset)
            if not isinstance(dataset, h5py.Dataset):
                return None, f"{src.dataset} is not a dataset of {src.path}"
            shape, dtype = tuple(dataset.shape), dataset.dtype
    except FormatError as exc:  # names the file and what it refers to
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot open {src.path}: {exc}"
    if shape != tuple(stack.images.shape) or dtype.kind not in "iuf":
        return None, f"{src.dataset} is {shape} {dtype}, the stack {tuple(stack.images.shape)}"
    return ExternalImages(HDF5_MIMETYPE, file_uri(src.path), dtype.str, "the HDF5 file",
                          {"dataset": src.dataset, "chunk_shape": [1, *stack.shape], "swmr": False}), ""


def _tiff(stack: ImportedStack) -> tuple[ExternalImages | None, str]:
    src = stack.tiff
    dtype = np.dtype(src.dtype)
    if dtype.kind not in "iuf":
        return None, f"the TIFF pixels are {dtype}, not numbers"
    n = len(stack.energies)
    if len(src.files) == 1:
        return ExternalImages(TIFF_FILE_MIMETYPE, file_uri(src.files[0]), dtype.str, "the TIFF file"), ""
    folders = {Path(p).absolute().parent for p in src.files}
    numbered = numbered_template([Path(p).name for p in src.files]) if len(folders) == 1 else None
    if len(src.files) != n or numbered is None:
        return None, ("the TIFF files are not one numbered sequence in one folder (a prefix, consecutive numbers, "
                      "a suffix)")
    template, first = numbered
    return ExternalImages(TIFF_SEQUENCE_MIMETYPE, file_uri(folders.pop(), folder=True), dtype.str, "the TIFF files",
                          {"template": template}, first_index=first), ""


def external_images(stack: ImportedStack) -> tuple[ExternalImages | None, str]:
    """Where the stack's images can stay (None when they cannot, and why; ``""`` when the reader says
    nothing). Only headers are read."""
    if stack.hdf5 is not None:
        return _hdf5(stack)
    if stack.tiff is not None:
        return _tiff(stack)
    return None, ""
