"""Zeiss / Xradia TXM files: ``.xrm`` (one image) and ``.txrm`` (a series), read with olefile.

Both are OLE2 compound files. The streams read here, as public readers use them (dxchange
``reader.py`` ``read_txrm`` / ``read_ole_metadata``, MANTiS ``file_xrm.py``; read, not copied):

- ``ImageInfo/ImageWidth``, ``ImageInfo/ImageHeight``: little-endian uint32;
- ``ImageInfo/ImagesTaken`` (images acquired; ``ImageInfo/NoOfImages``, images planned, when
  absent): uint32;
- ``ImageInfo/DataType``: uint32, 5 = uint16 pixels, 10 = float32 pixels;
- ``ImageInfo/Energy``: float32 per image, eV; ``ImageInfo/ExpTimes`` (s),
  ``ImageInfo/PixelSize`` (um), ``ImageInfo/Angles`` (degrees): float32;
- ``ImageData<ceil(k/100)>/Image<k>`` (k from 1, 100 images per storage): H x W pixels, rows
  first (dxchange reshapes to (height, width));
- ``ReferenceData/Image`` with ``ReferenceData/DataType``: the flat (sample-out) image, when
  the file carries one.

The stack is TXM: ``images`` are the sample-in images, ``flat`` the reference image (or None).
An ``ImageInfo/Energy`` stream whose length is not the number of images (dxchange's tomography
example holds 61 values for 7 images) cannot be matched to the images: such files need
``energies=``. Tested on the two small public example files of dxchange (tests/data/xrm);
files with float32 pixels, more than 100 images or several ImageData storages were not
available to test. A folder of single-image ``.xrm`` files, one or several per energy with reference files
beside them (TXM-XANES at SSRL 6-2c, APS 32-ID-C), is read with these streams by
:mod:`phasestream.formats.xrm_series`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import olefile

from phasestream.formats.energies import check_energies, load_energies
from phasestream.formats.stack import FormatError, ImportedStack, check_stack_size

__all__ = ["XRM_DATA_TYPES", "XrmLayout", "XrmStreams", "image_stream", "open_xrm", "read_xrm"]

#: ``ImageInfo/DataType`` codes and the pixel type each means.
XRM_DATA_TYPES = {5: np.dtype("<u2"), 10: np.dtype("<f4")}

# what olefile raises on a truncated or corrupt compound file
_OLE_ERRORS = (OSError, ValueError, struct.error, EOFError, IndexError, KeyError)


def image_stream(k: int) -> str:
    """The stream of image ``k`` (0-based) in an .xrm/.txrm: ``ImageData1/Image1`` for k = 0."""
    return f"ImageData{math.ceil((k + 1) / 100)}/Image{k + 1}"


@dataclass(frozen=True)
class XrmLayout:
    """What an .xrm/.txrm header says of its images: ``count`` images of ``height`` x ``width`` pixels of
    ``dtype``; ``planned`` and ``taken`` as the file writes them (None when absent)."""

    count: int
    height: int
    width: int
    dtype: np.dtype
    planned: int | None = None
    taken: int | None = None


class XrmStreams:
    """Typed reads of one OLE file's streams, errors naming the file and the stream."""

    def __init__(self, ole: olefile.OleFileIO, path: Path):
        self.ole, self.path = ole, path

    def raw(self, name: str) -> bytes | None:
        if not self.ole.exists(name):
            return None
        try:
            return self.ole.openstream(name).read()
        except _OLE_ERRORS as error:
            raise FormatError(self.path, f"cannot read stream {name} ({error}): truncated or corrupt file") from None

    def values(self, name: str, dtype: str) -> np.ndarray | None:
        data = self.raw(name)
        if data is None:
            return None
        size = np.dtype(dtype).itemsize
        return np.frombuffer(data[: len(data) - len(data) % size], dtype=dtype)

    def uint(self, name: str, required: bool = True) -> int | None:
        values = self.values(name, "<u4")
        if values is None or values.size == 0:
            if required:
                raise FormatError(self.path, f"stream {name} is missing (not a Zeiss .xrm/.txrm?)")
            return None
        return int(values[0])

    def text(self, name: str) -> str | None:
        data = self.raw(name)
        if data is None:
            return None
        value = data.split(b"\x00", 1)[0].decode("latin-1").strip()
        return value or None

    def image(self, name: str, dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
        data = self.raw(name)
        if data is None:
            raise FormatError(self.path, f"image stream {name} is missing")
        self._check_size(name, len(data), dtype, shape)
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def _check_size(self, name: str, size: int, dtype: np.dtype, shape: tuple[int, int]) -> None:
        expected = shape[0] * shape[1] * dtype.itemsize
        if size != expected:
            raise FormatError(
                self.path, f"{name} holds {size} bytes; {shape[0]} x {shape[1]} {dtype} pixels need {expected}"
            )

    def layout(self) -> XrmLayout:
        """The images' count, size and pixel type (see the module doc); FormatError naming the stream at fault."""
        width, height = self.uint("ImageInfo/ImageWidth"), self.uint("ImageInfo/ImageHeight")
        taken = self.uint("ImageInfo/ImagesTaken", required=False)
        planned = self.uint("ImageInfo/NoOfImages", required=False)
        count = taken if taken is not None else planned
        if count is None:
            raise FormatError(self.path, "no image count (ImageInfo/ImagesTaken or NoOfImages)")
        if count < 1:
            raise FormatError(self.path, f"ImageInfo/{'ImagesTaken' if taken is not None else 'NoOfImages'} is "
                              f"{count}: the file holds no image")
        dtype = _data_type(self.path, self.uint("ImageInfo/DataType"), "ImageInfo/DataType")
        return XrmLayout(count, height, width, dtype, planned, taken)  # type: ignore[arg-type]

    def check_frame(self, k: int, layout: XrmLayout) -> None:
        """Refuse a missing, mis-sized or cut-off image ``k`` from the stream's directory entry, without reading
        it (olefile reads a stream that runs past the end of the file as a shorter one)."""
        name = image_stream(k)
        if not self.ole.exists(name):
            raise FormatError(self.path, f"image stream {name} is missing")
        declared = self.ole.get_size(name)
        self._check_size(name, declared, layout.dtype, (layout.height, layout.width))
        size = self.path.stat().st_size
        if declared > size:
            raise FormatError(self.path, f"{name} declares {declared} bytes in a file of {size}: truncated file")

    def frame(self, k: int, layout: XrmLayout) -> np.ndarray:
        """Image ``k`` (0-based) as stored: (height, width) of ``layout.dtype``."""
        return self.image(image_stream(k), layout.dtype, (layout.height, layout.width))

    def reference(self, layout: XrmLayout) -> np.ndarray | None:
        """The ``ReferenceData/Image`` flat as float32 (height, width), or None when the file has none."""
        if not self.ole.exists("ReferenceData/Image"):
            return None
        code = self.uint("ReferenceData/DataType", required=False)
        ref_type = _data_type(self.path, code, "ReferenceData/DataType") if code is not None else layout.dtype
        return self.image("ReferenceData/Image", ref_type, (layout.height, layout.width)).astype(np.float32)


@contextmanager
def open_xrm(path: Path) -> Iterator[XrmStreams]:
    """``path`` opened as a Zeiss OLE2 file; FormatError naming it when it is missing, not OLE2 or corrupt."""
    if not path.is_file():
        raise FormatError(path, "no such file")
    if not olefile.isOleFile(str(path)):
        raise FormatError(path, "not an OLE2 compound file (Zeiss .xrm/.txrm)")
    try:
        ole = olefile.OleFileIO(str(path))
    except _OLE_ERRORS as error:
        raise FormatError(path, f"truncated or corrupt OLE2 file: {error}") from None
    with ole:
        yield XrmStreams(ole, path)


def _data_type(path: Path, code: int | None, what: str) -> np.dtype:
    dtype = XRM_DATA_TYPES.get(code) if code is not None else None
    if dtype is None:
        raise FormatError(path, f"{what} {code} is not a known pixel type ({sorted(XRM_DATA_TYPES)})")
    return dtype


def _metadata(streams: XrmStreams, count: int) -> dict:
    """Pixel size (um), median exposure (s), angles (degrees), facility, sample and reference file of the
    first ``count`` images, where the file has them (plain JSON values)."""
    meta: dict = {}
    pixel = streams.values("ImageInfo/PixelSize", "<f4")
    if pixel is not None and pixel.size and np.isfinite(pixel[0]) and pixel[0] > 0:
        meta["pixel_size_um"] = float(pixel[0])
    exposure = streams.values("ImageInfo/ExpTimes", "<f4")
    if exposure is not None and exposure.size:
        meta["exposure_s"] = float(np.median(exposure[:count]))
    angles = streams.values("ImageInfo/Angles", "<f4")
    if angles is not None and angles.size >= count:
        meta["angles_deg"] = [float(a) for a in angles[:count]]
    for key, name in (("facility", "SampleInfo/Facility"), ("sample", "SampleInfo/SampleID")):
        value = streams.text(name)
        if value:
            meta[key] = value
    reference = streams.text("ImageInfo/referencefile")
    if reference:
        meta["reference_file"] = reference
    return meta


def read_xrm(path: str | Path, *, energies: Sequence[float] | np.ndarray | str | Path | None = None) -> ImportedStack:
    """Read a Zeiss ``.xrm`` / ``.txrm`` file as a TXM energy stack (see the module doc).

    Parameters
    ----------
    path : the ``.xrm`` or ``.txrm`` file
    energies : (E,) energies in eV or an energy file, replacing ``ImageInfo/Energy`` (same count)

    Returns
    -------
    ImportedStack, ``mode="txm"``: images (E, H, W) float32, energies (E,) eV, ``flat`` the
    reference image (H, W) float32 or None.

    Raises
    ------
    FormatError
        not an OLE2 file or truncated, a missing or mis-sized image stream, an unknown pixel
        type, an energy stream that does not match the images, bad energies.
    """
    path = Path(path)
    with open_xrm(path) as streams:
        layout = streams.layout()
        count, height, width = layout.count, layout.height, layout.width
        check_stack_size(path, (count, height, width), np.float32)
        if energies is None:
            stored = streams.values("ImageInfo/Energy", "<f4")
            if stored is None:
                raise FormatError(path, "no ImageInfo/Energy stream: pass energies=")
            if stored.size != count:
                raise FormatError(
                    path,
                    f"ImageInfo/Energy holds {stored.size} values for {count} images: which energy goes with "
                    "which image is unknown; pass energies=",
                )
            if count == 1 and stored[0] == 0:  # SSRL 6-2c writes 0: the energy is in the name of each frame's file
                raise FormatError(path, "ImageInfo/Energy is 0: a frame of a scan saved as one file per frame (SSRL "
                                  "6-2c writes the energy in the file name only); import its folder (format "
                                  "'xrm-series'), or pass energies=")
            values = check_energies(path, stored.astype(np.float64))
        else:
            values = load_energies(energies, path)
            if values.size != count:
                raise FormatError(path, f"{count} images for {values.size} energies")
        images = np.empty((count, height, width), dtype=np.float32)
        for k in range(count):
            images[k] = streams.frame(k, layout)
        flat = streams.reference(layout)
        metadata = _metadata(streams, count)
        if layout.planned is not None and layout.taken is not None and layout.planned != layout.taken:
            metadata["images_planned"] = layout.planned
    return ImportedStack(
        source=path,
        format="xrm",
        energies=values,
        images=images,
        mode="txm",
        flat=flat,
        metadata=metadata,
        files=(path, Path(energies)) if isinstance(energies, str | Path) else (path,),
    )
