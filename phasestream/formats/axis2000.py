"""aXis2000 / SDF stacks: a ``.hdr`` text header plus one ``.xim`` text image per energy.

The format (the "SDF" header written by the STXM control programs of ALS 5.3.2/11.0.2, CLS,
MAXYMUS, PolLux, and read by aXis2000 and MANTiS) as this parser implements it; the description
was taken from MANTiS's SDF plugin (``mantis_xray/file_plugins/file_sdf.py`` of
mlerotic/spectromicroscopy, read, not copied) and checked against a MAXYMUS header
(``sample-data/maximus_scan`` of stonerlab/Stoner-PythonCode):

- the header is a list of ``Name = value;`` assignments; a value is a number, a quoted string,
  a bare word (``true``), a structure ``{ ... }`` of assignments, or an array ``( ... )`` of
  values separated by commas. Arrays that list points start with their count:
  ``Points = (3, 700.0, 705.0, 710.0);``;
- ``ScanDefinition`` holds ``Type`` (``"NEXAFS Image Scan"``), ``Flags`` (``"Image Stack"``
  or ``"Image"``), ``Dwell`` (ms), ``Regions = (1, { PAxis = {...}; QAxis = {...}; })`` whose
  ``PAxis`` / ``QAxis`` are the horizontal (Sample X, columns) and vertical (Sample Y, rows)
  axes with ``Points`` in ``Unit`` (um), ``StackAxis = { Name = "Energy"; Points = (E, ...) }``
  in eV, and ``Channels = (n, { Name = "..."; Unit = "counts"; }, ...)``;
- each image of a single-region stack is ``<stem>_<c><iii>.xim`` next to the header, ``c`` the
  channel letter (``a`` for the first detector channel), ``iii`` the energy index from 000; a
  single image (``Flags = "Image"``) is ``<stem>_<c>.xim``;
- an ``.xim`` holds one text row per Q (y) position, each row the P (x) values separated by
  whitespace (tabs): the (Y, X) image as it reads.

Multi-region stacks, line scans and point spectra are refused (they are not one image stack).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phasestream.formats.energies import check_energies, load_energies
from phasestream.formats.stack import FormatError, ImportedStack, check_stack_size

__all__ = ["MAX_HEADER_BYTES", "parse_hdr", "read_axis2000"]

#: A header is a few kB (the MAXYMUS one in tests/data/axis2000-real is 5.8 kB; 2048-point axes and 500
#: energies make about 50 kB); bigger is not a header.
MAX_HEADER_BYTES = 2**20
#: Bytes an .xim may take per pixel (values of about 10 characters and a separator; far more is not this image).
XIM_BYTES_PER_PIXEL = 32
MAX_NESTING = 32  # structures and arrays inside each other (a real header nests 4 deep)

_TOKEN = re.compile(r'\s+|"(?P<string>[^"]*)"|(?P<punct>[{}();=,])|(?P<word>[^\s{}();=,"]+)')
_IMAGE_TYPES = ("NEXAFS Image Scan", "Image Scan")
_IMAGE_FLAGS = ("Image Stack", "Image")


def _tokens(text: str, path: Path) -> Iterator[tuple[str, str]]:
    """The header's tokens ``(kind, text)``, made as the parser asks for them (a list of every token took 60
    times the header's size)."""
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:  # only an unclosed quote gets here
            raise FormatError(path, f"unterminated string at character {position}")
        position = match.end()
        if match.lastgroup is not None:
            yield match.lastgroup, match.group(match.lastgroup)


class _Parser:
    """Recursive descent over the header's tokens (see the module doc for the grammar)."""

    def __init__(self, text: str, path: Path):
        self.path = path
        self.tokens = _tokens(text, path)
        self.ahead: tuple[str, str] | None = None  # a token looked at and not yet taken
        self.index = 0  # tokens taken, for messages
        self.depth = 0

    def _peek(self) -> tuple[str, str]:
        """The next token without taking it; ``("", "")`` at the end of the header."""
        if self.ahead is None:
            self.ahead = next(self.tokens, ("", ""))
        return self.ahead

    def _next(self) -> tuple[str, str]:
        token = self._peek()
        if token == ("", ""):
            raise FormatError(self.path, "header ends inside a structure or array (truncated?)")
        self.ahead = None
        self.index += 1
        return token

    def structure(self, closed: bool) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        while closed or self._peek() != ("", ""):
            kind, value = self._next()
            if kind == "punct" and value == "}" and closed:
                return fields
            if kind == "punct" and value in ";,":
                continue
            if kind not in ("word", "string"):
                raise FormatError(self.path, f"expected a field name, found {value!r} (token {self.index})")
            equals = self._next()
            if equals != ("punct", "="):
                raise FormatError(self.path, f"expected '=' after {value!r}, found {equals[1]!r}")
            fields[value] = self.value()
        return fields

    def array(self) -> list[Any]:
        items: list[Any] = []
        while True:
            kind, value = self._peek()
            if kind == "punct" and value == ")":
                self._next()
                return items
            if kind == "punct" and value in ",;}":  # a stray '}' is a known PolLux converter bug
                self._next()
                continue
            items.append(self.value())

    def value(self) -> Any:
        kind, value = self._next()
        if kind == "string":
            return value
        if kind == "punct" and value in "{(":
            if self.depth >= MAX_NESTING:
                raise FormatError(self.path, f"structures and arrays nested over {MAX_NESTING} deep "
                                  f"(token {self.index})")
            self.depth += 1
            try:
                return self.structure(closed=True) if value == "{" else self.array()
            finally:
                self.depth -= 1
        if kind == "word":
            for convert in (int, float):
                try:
                    return convert(value)
                except ValueError:
                    pass
            return value
        raise FormatError(self.path, f"unexpected {value!r} where a value belongs (token {self.index})")


def parse_hdr(path: str | Path) -> dict[str, Any]:
    """Parse an SDF ``.hdr`` header into nested dicts (structures) and lists (arrays)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such header file")
    size = path.stat().st_size
    if size > MAX_HEADER_BYTES:
        raise FormatError(path, f"header of {size} bytes is over the {MAX_HEADER_BYTES} byte bound")
    text = path.read_bytes().decode("latin-1")
    return _Parser(text, path).structure(closed=False)


def _points(path: Path, axis: Any, what: str) -> np.ndarray:
    """An axis's ``Points = (n, v1, ..., vn)`` as (n,) float64, the count checked."""
    points = axis.get("Points") if isinstance(axis, dict) else None
    if not isinstance(points, list) or not points:
        raise FormatError(path, f"{what} has no Points")
    count = points[0]
    if not isinstance(count, int) or count != len(points) - 1:
        raise FormatError(path, f"{what} Points says {count} values but lists {len(points) - 1}")
    try:
        return np.asarray(points[1:], dtype=np.float64)
    except (TypeError, ValueError):
        raise FormatError(path, f"{what} Points are not numbers") from None


def _counted(path: Path, value: Any, what: str) -> list[Any]:
    if not isinstance(value, list) or not value or not isinstance(value[0], int):
        raise FormatError(path, f"{what} is not a counted list (n, ...)")
    return value[1:]


def _read_xim(path: Path, image: np.ndarray) -> None:
    """Read the text image into ``image`` (rows, cols), row by row: a row of the wrong width, or one row too
    many, is refused when it is met (blank lines are skipped)."""
    rows, cols = image.shape
    if not path.is_file():
        raise FormatError(path, "missing .xim image")
    size = path.stat().st_size
    if size > XIM_BYTES_PER_PIXEL * rows * cols + 4096:
        raise FormatError(path, f"{size} bytes is too large for a {rows} x {cols} text image")
    row_bytes = XIM_BYTES_PER_PIXEL * cols + 4096
    row = 0
    with open(path, encoding="latin-1", newline=None) as handle:  # rows end in LF, CR LF or CR alone
        for line in iter(lambda: handle.readline(row_bytes + 1), ""):
            if len(line) > row_bytes:
                raise FormatError(path, f"row {row + 1} is over {row_bytes} bytes, too long for {cols} values (PAxis)")
            values = line.split()
            if not values:
                continue
            if row == rows:
                raise FormatError(path, f"image has over {rows} rows; the header says {rows} rows (QAxis)")
            if len(values) != cols:
                raise FormatError(path, f"row {row + 1} holds {len(values)} values; the header says {cols} (PAxis)")
            try:
                image[row] = np.array(values, dtype=np.float64)
            except ValueError:
                raise FormatError(path, f"row {row + 1} holds values that are not numbers") from None
            row += 1
    if row != rows:
        raise FormatError(path, f"image is {row} rows; the header says {rows} rows (QAxis) of {cols} (PAxis)")


def read_axis2000(
    path: str | Path,
    *,
    energies: Sequence[float] | np.ndarray | str | Path | None = None,
    channel: int | str = 0,
) -> ImportedStack:
    """Read an aXis2000 / SDF image stack from its ``.hdr`` header (see the module doc).

    Parameters
    ----------
    path : the ``.hdr`` file; the ``.xim`` images lie beside it
    energies : (E,) energies in eV or an energy file, replacing the StackAxis points (same count)
    channel : detector channel, by index (0 is ``a``) or by name

    Returns
    -------
    ImportedStack, ``mode="stxm"``: images (E, Y, X) float64 counts (rows = QAxis, columns =
    PAxis), energies (E,) eV, ``files`` the header then the images in energy order.

    Raises
    ------
    FormatError
        a header that does not parse, a scan that is not a single-region image stack, a missing
        or mis-sized ``.xim``, or a number of ``.xim`` files different from the header's energies.
    """
    path = Path(path)
    header = parse_hdr(path)
    scan = header.get("ScanDefinition")
    if not isinstance(scan, dict):
        raise FormatError(path, "no ScanDefinition in the header (not an SDF .hdr?)")
    scan_type, flags = str(scan.get("Type", "")), str(scan.get("Flags", ""))
    if scan_type not in _IMAGE_TYPES or flags not in _IMAGE_FLAGS:
        raise FormatError(path, f"a {scan_type!r} scan with flags {flags!r} is not an image stack")
    regions = _counted(path, scan.get("Regions"), "ScanDefinition Regions")
    if len(regions) != 1 or not isinstance(regions[0], dict):
        raise FormatError(path, f"{len(regions)} regions: only single-region stacks are read")
    x = _points(path, regions[0].get("PAxis"), "PAxis")
    y = _points(path, regions[0].get("QAxis"), "QAxis")
    channels = _counted(path, scan.get("Channels", header.get("Channels")), "Channels")
    names = [str(c.get("Name", "")) if isinstance(c, dict) else "" for c in channels]
    index = names.index(channel) if isinstance(channel, str) and channel in names else channel
    if not isinstance(index, int) or not 0 <= index < min(len(names), 26):
        raise FormatError(path, f"no channel {channel!r}; channels: {names}")
    letter = string.ascii_lowercase[index]
    stack_axis = scan.get("StackAxis")
    if flags == "Image Stack":
        if not isinstance(stack_axis, dict) or str(stack_axis.get("Name", "")) != "Energy":
            name = stack_axis.get("Name") if isinstance(stack_axis, dict) else None
            raise FormatError(path, f"the stack axis is {name!r}, not Energy")
        header_energies = _points(path, stack_axis, "StackAxis")
        image_names = [f"{path.stem}_{letter}{i:03d}.xim" for i in range(header_energies.size)]
    else:
        image_scan = scan.get("ImageScan") or header.get("ImageScan")
        regions_e = image_scan.get("EnergyRegions") if isinstance(image_scan, dict) else None
        listed = _counted(path, regions_e, "ImageScan EnergyRegions") if regions_e else []
        first = listed[0] if listed and isinstance(listed[0], dict) else {}
        header_energies = np.asarray([first.get("StartEnergy", np.nan)], dtype=np.float64)
        image_names = [f"{path.stem}_{letter}.xim"]
    values = check_energies(path, header_energies) if energies is None else load_energies(energies, path)
    if values.size != len(image_names):
        raise FormatError(path, f"{len(image_names)} images in the header for {values.size} energies")
    pattern = re.compile(re.escape(path.stem) + "_" + letter + r"\d{3,}\.xim$")
    found = sorted(p.name for p in path.parent.iterdir() if pattern.match(p.name))
    missing = [name for name in image_names if not (path.parent / name).is_file()]
    if flags == "Image Stack" and (missing or len(found) != len(image_names)):
        raise FormatError(
            path,
            f"the header lists {len(image_names)} energies but {len(found)} {path.stem}_{letter}###.xim files "
            f"lie beside it" + (f"; missing: {missing[:5]}" if missing else ""),
        )
    check_stack_size(path, (len(image_names), y.size, x.size), np.float64)
    files = [path.parent / name for name in image_names]
    images = np.empty((len(files), y.size, x.size), dtype=np.float64)
    for i, image_path in enumerate(files):
        _read_xim(image_path, images[i])
    metadata: dict[str, Any] = {"scan_type": scan_type, "flags": flags, "channel": names[index]}
    if isinstance(scan.get("Dwell"), int | float):
        metadata["dwell_ms"] = float(scan["Dwell"])
    for axis, values_um, key in (("PAxis", x, "pixel_size_x_um"), ("QAxis", y, "pixel_size_y_um")):
        unit = str(regions[0][axis].get("Unit", "um"))
        if values_um.size > 1 and unit in ("um", "µm"):
            metadata[key] = float(np.median(np.abs(np.diff(values_um))))
    if isinstance(header.get("Time"), str):
        metadata["start_time"] = header["Time"]
    if isinstance(scan.get("Label"), str):
        metadata["label"] = scan["Label"]
    provenance = [path, *files]
    if isinstance(energies, str | Path):
        provenance.append(Path(energies))
    return ImportedStack(
        source=path, format="axis2000", energies=values, images=images, mode="stxm", metadata=metadata, files=provenance
    )
