"""Reading reference files: CSV (with a YAML sidecar) and two-column files, for trusted callers
(:func:`load_references`) and, restricted to the configured reference folders, for start
documents (:func:`load_document_references`; docs/security.md).
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import reprlib
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from phasestream.references.spectra import (
    _KEV_THRESHOLD,
    _SHOWN_CHARS,
    DEFAULT_MAX_REFERENCE_BYTES,
    REFERENCE_FOLDERS_ENV,
    REGISTRY,
    ReferenceAccessError,
    ReferenceFormatError,
    ReferenceSet,
    from_registry,
    registered_references,
)

__all__ = ["load_document_references", "load_references", "reference_folders_from_env"]

#: ``units`` accepted by :func:`load_references`.
ENERGY_UNITS = ("auto", "eV", "keV")
#: ``auto``: medians below this are keV (hard X-ray edges, 1-20 keV: no XAS is measured at 1-20 eV) ...
_SURELY_KEV = 20.0
# ... at or above _KEV_THRESHOLD (100) eV; in between (eV M-edges or keV K-edges of heavy elements) ambiguous.


def load_references(source: str | Path | Sequence[str | Path] | ReferenceSet, *, units: str = "auto") -> ReferenceSet:
    """Load reference spectra from a CSV file, two-column file(s) or a registered name.

    For trusted callers (CLI, tests, benchmarks): any path is opened. References named by a
    start document go through :func:`load_document_references` instead.

    Parameters
    ----------
    source
        A ``ReferenceSet`` (returned as is), a registered name (see
        :func:`registered_references`), a CSV path (header ``energy_eV,<phases>``, optional
        ``<stem>.yaml`` sidecar), a two-column whitespace file (energy in keV or eV, one
        phase named after the file stem without a ``ref_`` prefix), or a list of two-column
        files. Several two-column files are merged on the energy grid of the first file,
        restricted to the range all files cover; the others are linearly interpolated.
    units
        The energy column's unit in the files: ``"eV"``, ``"keV"`` (converted to eV) or ``"auto"``
        (default): a median energy below 20 is keV, 100 or above is eV, and in between (eV
        M-edges or keV K-edges of heavy elements) the file is refused with a message naming the
        option to pass. A CSV's header says eV (``energy_eV``): ``"keV"`` is refused for it, and
        keV-sized values (median below 20) are refused whatever ``units`` says, unless ``"eV"``.

    Returns
    -------
    ReferenceSet

    Raises
    ------
    FileNotFoundError
        if ``source`` is neither a registered name nor an existing path.
    ReferenceAccessError
        if a file is not a regular file or is larger than :data:`DEFAULT_MAX_REFERENCE_BYTES`.
    ReferenceFormatError
        if a file is not valid reference spectra, or its energies' unit is ambiguous or contradicts
        its header.
    """
    if units not in ENERGY_UNITS:
        raise ValueError(f"units must be one of {ENERGY_UNITS}, got {units!r}")
    if isinstance(source, ReferenceSet):
        return source
    if isinstance(source, str) and source in REGISTRY:
        return from_registry(source)
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        if len(paths) == 1:
            return load_references(paths[0], units=units)
        return _merge_two_column(paths, units)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"references {str(source)!r}: no such file and not a registered name "
            f"(registered: {registered_references()})"
        )
    return _references_from_file(path, DEFAULT_MAX_REFERENCE_BYTES, units=units)


def load_document_references(
    name: str,
    *,
    folders: Sequence[str | Path] = (),
    max_bytes: int = DEFAULT_MAX_REFERENCE_BYTES,
) -> ReferenceSet:
    """Load the references a start document names: a registered name or a file in the folders.

    The value comes from the network, so it is not trusted as a host path. Allowed are a
    registered name (:func:`registered_references`) or a file that, after following
    symlinks, lies inside one of ``folders`` (also resolved). A relative name is looked up
    in each folder in order; an absolute name must resolve inside a folder. The file is
    opened without following a final symlink and without blocking, must be a regular file
    of at most ``max_bytes``, and is parsed from the bytes read (the path is not opened
    again). A ``<stem>.yaml`` sidecar next to it is read under the same rules.

    Parameters
    ----------
    name : str
        The start document's ``phasestream.references`` value.
    folders : sequence of str or Path
        The reference folders (``serve --references-dir``, :func:`reference_folders_from_env`).
        Empty: only registered names are allowed.
    max_bytes : int
        Size limit for each file read, in bytes.

    Returns
    -------
    ReferenceSet

    Raises
    ------
    ReferenceAccessError
        for a value that is not a string, a path that resolves outside the folders (``..``,
        an absolute path, a symlink pointing out), a missing file, a FIFO, device or
        directory, or a file larger than ``max_bytes``.
    ReferenceFormatError
        if the file is not valid reference spectra (the message never quotes its content).
    """
    roots = [Path(folder).resolve() for folder in folders]
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise _refused(name, "not a registered name or a file name", roots)
    if name in REGISTRY:
        return from_registry(name)
    if not roots:
        raise _refused(name, "not a registered name, and no reference folders are configured", roots)
    return _references_from_file(_find_in_folders(name, roots), max_bytes, roots)


def reference_folders_from_env() -> list[Path]:
    """The reference folders named by ``PHASESTREAM_REFERENCES`` (``os.pathsep``-separated).

    Returns
    -------
    list of Path
        In the order given, ``~`` expanded, empty entries skipped; empty when the variable
        is unset.
    """
    value = os.environ.get(REFERENCE_FOLDERS_ENV, "")
    return [Path(part.strip()).expanduser() for part in value.split(os.pathsep) if part.strip()]


def _shown(value: object) -> str:
    """``repr(value)`` cut to about ``_SHOWN_CHARS`` characters, for error messages."""
    if isinstance(value, str):
        return repr(value[:_SHOWN_CHARS]) + ("..." if len(value) > _SHOWN_CHARS else "")
    text = reprlib.repr(value)
    return text[:_SHOWN_CHARS] + ("..." if len(text) > _SHOWN_CHARS else "")


def _refused(value: object, reason: str, roots: Sequence[Path]) -> ReferenceAccessError:
    folders = ", ".join(repr(str(root)) for root in roots) or "none configured"
    return ReferenceAccessError(
        f"references {_shown(value)}: {reason}; allowed are registered names: "
        f"{', '.join(registered_references())}; files inside the reference folders configured with "
        f"--references-dir / {REFERENCE_FOLDERS_ENV}: {folders}"
    )


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path != root and path.is_relative_to(root) for root in roots)


def _find_in_folders(name: str, roots: Sequence[Path]) -> Path:
    """The resolved path of ``name`` inside one of ``roots`` (relative names: each root in order)."""
    requested = Path(name)
    candidates = [requested] if requested.is_absolute() else [root / requested for root in roots]
    escaped = False
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):  # symlink loop, name too long
            continue
        if not _inside(resolved, roots):
            escaped = True
        elif os.path.exists(resolved):
            return resolved
    if escaped:
        raise _refused(name, "lies outside the reference folders (after following symlinks)", roots)
    raise _refused(name, "not a registered name and no such file in the reference folders", roots)


def _read_limited(path: Path, max_bytes: int, roots: Sequence[Path] = ()) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes``; never blocks on a FIFO.

    With ``roots`` (a document's references, ``path`` already resolved) a final symlink is
    not followed and the file actually opened must lie inside ``roots``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if roots:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not roots:
            raise
        raise ReferenceAccessError(f"{path}: cannot open ({exc.strerror})") from None
    chunks: list[bytes] = []
    remaining = max_bytes + 1  # one byte more than allowed tells a file that grew past the limit
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ReferenceAccessError(
                f"{path}: not a regular file (a FIFO, device, socket or directory); "
                "references are read from regular files only"
            )
        if roots:
            opened = _opened_path(fd)
            if opened is not None and not _inside(opened, roots):
                raise ReferenceAccessError(f"{path}: the file opened lies outside the reference folders")
        if info.st_size > max_bytes:
            raise ReferenceAccessError(f"{path}: {info.st_size} bytes, more than the limit of {max_bytes} bytes")
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    if remaining <= 0:
        raise ReferenceAccessError(f"{path}: more than the limit of {max_bytes} bytes")
    return b"".join(chunks)


def _opened_path(fd: int) -> Path | None:
    """The path the open file ``fd`` refers to (Linux ``/proc``), or None where unknown."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _decode(data: bytes, path: Path) -> str:
    if b"\x00" in data:
        raise ReferenceFormatError(f"{path}: binary content (NUL bytes), not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        raise ReferenceFormatError(f"{path}: not UTF-8 text (undecodable byte at offset {offset})") from None


def _references_from_file(path: Path, max_bytes: int, roots: Sequence[Path] = (), units: str = "auto"
                          ) -> ReferenceSet:
    text = _decode(_read_limited(path, max_bytes, roots), path)
    if "," in text.partition("\n")[0]:
        return _parse_csv(text, path, _read_sidecar(path, max_bytes, roots), units)
    energies, values = _parse_two_column(text, path, units)
    return ReferenceSet(energies, (_phase_name(path),), values[None, :], name=path.stem,
                        attrs={"source": str(path)})


def _read_sidecar(path: Path, max_bytes: int, roots: Sequence[Path] = ()) -> tuple[Path, str] | None:
    """``(path, text)`` of the ``<stem>.yaml`` sidecar of ``path``, or None if there is none."""
    sidecar = path.with_suffix(".yaml")
    if not os.path.lexists(sidecar):
        return None
    if roots:
        try:
            sidecar = sidecar.resolve()
        except (OSError, RuntimeError):
            raise ReferenceAccessError(f"{path.with_suffix('.yaml')}: sidecar cannot be resolved") from None
        if not _inside(sidecar, roots):
            raise ReferenceAccessError(f"{path.with_suffix('.yaml')}: sidecar lies outside the reference folders")
    if not sidecar.exists():  # dangling symlink
        return None
    return sidecar, _decode(_read_limited(sidecar, max_bytes, roots), sidecar)


def _phase_name(path: Path) -> str:
    stem = path.stem
    return stem[4:] if stem.lower().startswith("ref_") else stem


def _energies_in_ev(energies: np.ndarray, path: Path, units: str, *, header_ev: bool = False) -> np.ndarray:
    """The energy column in eV, or ReferenceFormatError when its unit is ambiguous or contradicts the header."""
    median = float(np.median(energies))
    if header_ev:
        if units == "keV":
            raise ReferenceFormatError(f"{path}: the header says energy_eV but units='keV' was passed; "
                                       "give the energies in eV or fix the header")
        if units == "auto" and median < _KEV_THRESHOLD:
            size = "keV-sized" if median < _SURELY_KEV else "ambiguous (eV M-edges or keV)"
            raise ReferenceFormatError(f"{path}: the header says energy_eV but the values are {size} (median "
                                       f"{median:g}); convert them to eV, or pass units='eV' if they are eV")
        return energies
    if units == "eV":
        return energies
    if units == "keV":
        if median >= _KEV_THRESHOLD:
            raise ReferenceFormatError(f"{path}: units='keV' but the energies look like eV (median {median:g}); "
                                       "pass units='eV' or 'auto'")
        return energies * 1000.0
    if median < _SURELY_KEV:
        return energies * 1000.0
    if median < _KEV_THRESHOLD:
        raise ReferenceFormatError(f"{path}: energies with median {median:g} could be eV (M-edges) or keV; "
                                   "pass units='eV' or units='keV'")
    return energies


def _parse_csv(text: str, path: Path, sidecar: tuple[Path, str] | None, units: str = "auto") -> ReferenceSet:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []  # (line number, fields)
    try:
        for row in reader:
            if row and not row[0].lstrip().startswith("#"):
                rows.append((reader.line_num, row))
    except csv.Error:
        raise ReferenceFormatError(f"{path}: not valid CSV at line {reader.line_num}") from None
    expected = "header must be 'energy_eV,<phase 1>,<phase 2>,...'"
    if not rows:
        raise ReferenceFormatError(f"{path}: {expected}: no header line")
    header = [h.strip() for h in rows[0][1]]
    if header[0] != "energy_eV":
        raise ReferenceFormatError(f"{path}: {expected}: first field of line {rows[0][0]} is not energy_eV")
    if len(header) < 2:
        raise ReferenceFormatError(f"{path}: {expected}: no phase columns")
    table = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, (line, row) in enumerate(rows[1:]):
        if len(row) != len(header):
            raise ReferenceFormatError(f"{path}: line {line} has {len(row)} columns, every row needs {len(header)}")
        for j, value in enumerate(row):
            try:
                table[i, j] = float(value)
            except ValueError:
                raise ReferenceFormatError(f"{path}: non-numeric value at line {line}, column {j + 1}") from None
            if not math.isfinite(table[i, j]):
                raise ReferenceFormatError(f"{path}: non-finite value at line {line}, column {j + 1}")
    table = table[np.argsort(table[:, 0], kind="stable")]
    if table.shape[0]:
        table[:, 0] = _energies_in_ev(table[:, 0], path, units, header_ev=True)
    if np.any(np.diff(table[:, 0]) == 0):
        dup = table[1:, 0][np.diff(table[:, 0]) == 0][0]
        raise ReferenceFormatError(f"{path}: duplicate energy {dup} eV")
    meta, attrs = {}, {"source": str(path)}
    if sidecar is not None:
        meta, doc = _parse_sidecar(*sidecar)
        unknown = set(meta) - set(header[1:])
        if unknown:
            raise ReferenceFormatError(f"{sidecar[0]}: phases {sorted(unknown)} are not columns of {path.name}")
        attrs.update(doc)
    name = attrs.pop("name", path.stem)
    if sidecar is not None and not isinstance(name, str):  # a YAML set or alias bomb went into every result
        raise ReferenceFormatError(f"{sidecar[0]}: 'name' must be text, got {type(name).__name__}")
    return ReferenceSet(table[:, 0], tuple(header[1:]), table[:, 1:].T, name=name, metadata=meta, attrs=attrs)


def _parse_sidecar(path: Path, text: str) -> tuple[dict, dict]:
    """``(per-phase metadata, set-level attrs)`` from a YAML sidecar."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ReferenceFormatError(f"{path}: not valid YAML{where}") from None
    if not isinstance(doc, dict):
        raise ReferenceFormatError(f"{path}: must be a mapping (name, phases, ...)")
    phases = doc.pop("phases", None) or {}
    if not isinstance(phases, dict) or not all(v is None or isinstance(v, dict) for v in phases.values()):
        raise ReferenceFormatError(f"{path}: 'phases' must map each phase name to a mapping of metadata")
    return {str(k): dict(v or {}) for k, v in phases.items()}, doc


def _parse_two_column(text: str, path: Path, units: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    rows: list[list[float]] = []
    for line, content in enumerate(text.splitlines(), start=1):
        fields = content.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ReferenceFormatError(
                f"{path}: expected 2 columns (energy, value), found {len(fields)} at line {line}"
            )
        row = []
        for column, field_text in enumerate(fields, start=1):
            try:
                row.append(float(field_text))
            except ValueError:
                raise ReferenceFormatError(
                    f"{path}: not a two-column numeric file: non-numeric value at line {line}, column {column}"
                ) from None
            if not math.isfinite(row[-1]):  # a NaN energy made the keV file's median NaN: read as eV
                raise ReferenceFormatError(f"{path}: non-finite value at line {line}, column {column}")
        rows.append(row)
    if not rows:
        raise ReferenceFormatError(f"{path}: not a two-column numeric file: no data rows")
    data = np.array(rows, dtype=np.float64)
    energies, values = data[:, 0], data[:, 1]
    energies = _energies_in_ev(energies, path, units)
    order = np.argsort(energies, kind="stable")
    energies, values = energies[order], values[order]
    keep = np.concatenate([[True], np.diff(energies) > 0])  # drop repeated energies
    return energies[keep], values[keep]


def _merge_two_column(paths: Sequence[Path], units: str = "auto") -> ReferenceSet:
    columns = [
        _parse_two_column(_decode(_read_limited(p, DEFAULT_MAX_REFERENCE_BYTES), p), p, units) for p in paths
    ]
    name = "+".join(_phase_name(p) for p in paths)
    low = max(e[0] for e, _ in columns)
    high = min(e[-1] for e, _ in columns)
    if low >= high:
        raise ReferenceFormatError(f"references {name!r}: the files share no energy range")
    grid = columns[0][0]
    grid = grid[(grid >= low) & (grid <= high)]
    spectra = np.stack([np.interp(grid, e, v) for e, v in columns])
    return ReferenceSet(grid, tuple(_phase_name(p) for p in paths), spectra, name=name,
                        attrs={"source": [str(p) for p in paths]})


