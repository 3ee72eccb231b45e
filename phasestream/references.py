"""Reference spectra: loading, interpolation onto scan energies, energy selection.

Formats (see DESIGN.md, "Reference spectra"):

* CSV with header ``energy_eV,<phase 1>,<phase 2>,...``, one row per energy, values in OD or
  normalized absorption; optional sidecar ``<stem>.yaml`` with per-phase metadata, e.g.
  ``phases: {Na3.0: {na_content: 3.0}}``.
* Two-column whitespace files (energy, value; keV or eV, detected by magnitude), one phase
  each; several of them load as one set.
* A registered name (``"nvpf-synthetic"``), resolved by :func:`load_references`.

Text files are UTF-8 and at most :data:`DEFAULT_MAX_REFERENCE_BYTES`; only regular files are
read (no FIFOs or devices). Error messages name the file, line and column, never its content.

References named by a start document (``phasestream.references``) come from the network and
are loaded with :func:`load_document_references`: a registered name, or a file inside the
reference folders configured with ``serve --references-dir`` or ``PHASESTREAM_REFERENCES``
(:func:`reference_folders_from_env`). :func:`load_references` is for trusted callers (CLI,
tests, benchmarks) and opens any path it is given.
"""

from __future__ import annotations

import codecs
import csv
import importlib
import io
import os
import reprlib
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

__all__ = [
    "DEFAULT_MAX_REFERENCE_BYTES",
    "REFERENCE_FOLDERS_ENV",
    "EnergyOutOfRangeError",
    "ReferenceAccessError",
    "ReferenceFormatError",
    "ReferenceSet",
    "load_document_references",
    "load_references",
    "reference_folders_from_env",
    "register_references",
    "registered_references",
    "select_energies",
    "write_references",
]

# Median energy below this value means the file is in keV (hard X-ray edges are >= 2 keV,
# soft X-ray edges in eV are >= ~100 eV).
_KEV_THRESHOLD = 100.0

# Reference files are a few hundred rows; anything much larger is not a reference file.
DEFAULT_MAX_REFERENCE_BYTES = 16 * 1024 * 1024

# Environment variable with the reference folders (os.pathsep-separated).
REFERENCE_FOLDERS_ENV = "PHASESTREAM_REFERENCES"

# Longest part of a requested value quoted in an error message.
_SHOWN_CHARS = 200

_REGISTRY: dict[str, Callable[[], ReferenceSet] | str] = {
    "nvpf-synthetic": "phasestream.sim.references:nvpf_references",
}


class ReferenceFormatError(ValueError):
    """A reference file could not be read as reference spectra."""


class ReferenceAccessError(ValueError):
    """References that may not be read: not allowed for a document, or not a readable file.

    Raised for a document value that is neither a registered name nor a file inside the
    reference folders, and for any file that is not a regular file or exceeds the size
    limit. The message names the requested value (truncated) and what is allowed, never
    the content of a file.
    """


class EnergyOutOfRangeError(ValueError):
    """A scan energy lies outside the energy range covered by the references."""

    def __init__(self, energy: float, low: float, high: float, name: str = ""):
        self.energy, self.low, self.high = float(energy), float(low), float(high)
        which = f" {name!r}" if name else ""
        super().__init__(
            f"energy {self.energy:.3f} eV is outside the range of references{which} "
            f"({self.low:.3f}-{self.high:.3f} eV); measure references over this energy "
            "or drop it from the scan"
        )


@dataclass(frozen=True)
class ReferenceSet:
    """K reference spectra on a common energy grid.

    Attributes
    ----------
    energies : (E,) float64, eV, strictly increasing
    phases : K phase names
    spectra : (K, E) float64
    name : a short name (file stem or registered name)
    metadata : per-phase metadata, ``{phase: {...}}`` (from the YAML sidecar)
    attrs : set-level metadata (source, synthetic flag, description, ...)
    """

    energies: np.ndarray
    phases: tuple[str, ...]
    spectra: np.ndarray
    name: str = "references"
    metadata: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        energies = np.asarray(self.energies, dtype=np.float64)
        spectra = np.atleast_2d(np.asarray(self.spectra, dtype=np.float64))
        if energies.ndim != 1 or energies.size < 2:
            raise ReferenceFormatError(f"references {self.name!r}: need >= 2 energies, got shape {energies.shape}")
        if spectra.shape != (len(self.phases), energies.size):
            raise ReferenceFormatError(
                f"references {self.name!r}: spectra shape {spectra.shape} does not match "
                f"{len(self.phases)} phases x {energies.size} energies"
            )
        if len(set(self.phases)) != len(self.phases):
            raise ReferenceFormatError(f"references {self.name!r}: duplicate phase names {self.phases}")
        if not (np.all(np.isfinite(energies)) and np.all(np.isfinite(spectra))):
            raise ReferenceFormatError(f"references {self.name!r}: non-finite energies or values")
        if np.any(np.diff(energies) <= 0):
            raise ReferenceFormatError(f"references {self.name!r}: energies must be strictly increasing")
        energies.setflags(write=False)
        spectra.setflags(write=False)
        object.__setattr__(self, "energies", energies)
        object.__setattr__(self, "spectra", spectra)
        object.__setattr__(self, "phases", tuple(str(p) for p in self.phases))

    @property
    def energy_range(self) -> tuple[float, float]:
        return float(self.energies[0]), float(self.energies[-1])

    def check_energies(self, energies: float | Iterable[float]) -> np.ndarray:
        """Return ``energies`` as a 1D array; raise :class:`EnergyOutOfRangeError` for the first outside the range."""
        e = np.atleast_1d(np.asarray(energies, dtype=np.float64))
        low, high = self.energy_range
        for value in e:
            if not (np.isfinite(value) and low <= value <= high):
                raise EnergyOutOfRangeError(value, low, high, self.name)
        return e

    def interpolate(self, energies: float | Iterable[float]) -> np.ndarray:
        """Reference values at ``energies`` (eV), linear interpolation.

        Returns
        -------
        (K, N) float64 array for N energies.

        Raises
        ------
        EnergyOutOfRangeError
            if any energy lies outside the reference range (no extrapolation).
        """
        e = self.check_energies(energies)
        return np.stack([np.interp(e, self.energies, s) for s in self.spectra])

    def subset(self, phases: Sequence[str]) -> ReferenceSet:
        """The same set restricted to ``phases`` (in that order)."""
        missing = [p for p in phases if p not in self.phases]
        if missing:
            raise KeyError(f"phases {missing} not in references {self.name!r} (have {list(self.phases)})")
        idx = [self.phases.index(p) for p in phases]
        meta = {p: self.metadata[p] for p in phases if p in self.metadata}
        return ReferenceSet(self.energies, tuple(phases), self.spectra[idx], self.name, meta, dict(self.attrs))



def register_references(name: str, factory: Callable[[], ReferenceSet] | str) -> None:
    """Register a reference set under ``name`` (a callable or ``"module:function"``)."""
    _REGISTRY[name] = factory


def registered_references() -> list[str]:
    return sorted(_REGISTRY)


def _from_registry(name: str) -> ReferenceSet:
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, func = factory.split(":")
        factory = getattr(importlib.import_module(module), func)
    return factory()


def load_references(source: str | Path | Sequence[str | Path] | ReferenceSet) -> ReferenceSet:
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
        if a file is not valid reference spectra.
    """
    if isinstance(source, ReferenceSet):
        return source
    if isinstance(source, str) and source in _REGISTRY:
        return _from_registry(source)
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        if len(paths) == 1:
            return load_references(paths[0])
        return _merge_two_column(paths)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"references {str(source)!r}: no such file and not a registered name "
            f"(registered: {registered_references()})"
        )
    return _references_from_file(path, DEFAULT_MAX_REFERENCE_BYTES)


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
    if name in _REGISTRY:
        return _from_registry(name)
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


def _references_from_file(path: Path, max_bytes: int, roots: Sequence[Path] = ()) -> ReferenceSet:
    text = _decode(_read_limited(path, max_bytes, roots), path)
    if "," in text.partition("\n")[0]:
        return _parse_csv(text, path, _read_sidecar(path, max_bytes, roots))
    energies, values = _parse_two_column(text, path)
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


def _parse_csv(text: str, path: Path, sidecar: tuple[Path, str] | None) -> ReferenceSet:
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
    table = table[np.argsort(table[:, 0], kind="stable")]
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


def _parse_two_column(text: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
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
        rows.append(row)
    if not rows:
        raise ReferenceFormatError(f"{path}: not a two-column numeric file: no data rows")
    data = np.array(rows, dtype=np.float64)
    energies, values = data[:, 0], data[:, 1]
    if np.median(energies) < _KEV_THRESHOLD:
        energies = energies * 1000.0
    order = np.argsort(energies, kind="stable")
    energies, values = energies[order], values[order]
    keep = np.concatenate([[True], np.diff(energies) > 0])  # drop repeated energies
    return energies[keep], values[keep]


def _merge_two_column(paths: Sequence[Path]) -> ReferenceSet:
    columns = [
        _parse_two_column(_decode(_read_limited(p, DEFAULT_MAX_REFERENCE_BYTES), p), p) for p in paths
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


def write_references(references: ReferenceSet, path: str | Path) -> Path:
    """Write ``references`` as CSV plus YAML sidecar (phase metadata, attrs); return the CSV path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = np.column_stack([references.energies, references.spectra.T])
    np.savetxt(path, table, delimiter=",", header="energy_eV," + ",".join(references.phases),
               comments="", fmt="%.6f")
    sidecar = {"name": references.name, **references.attrs, "phases": references.metadata}
    path.with_suffix(".yaml").write_text(yaml.safe_dump(sidecar, sort_keys=False))
    return path


def discrimination_score(references: ReferenceSet) -> np.ndarray:
    """Per-energy score of how well the energy separates the references (E,).

    Each reference is standardized over the whole grid (PCC is blind to offset and scale).
    For every pair of phases (i, j), the squared difference of the standardized spectra is
    divided by its sum over the grid, so each pair carries equal weight; the score is the sum
    over pairs. Energies that separate a close pair (Na2.0 / Na1.0) score as high as those
    that separate very different phases.
    """
    s = references.spectra
    z = (s - s.mean(axis=1, keepdims=True)) / s.std(axis=1, keepdims=True)
    score = np.zeros(s.shape[1])
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            d2 = (z[i] - z[j]) ** 2
            total = d2.sum()
            if total > 0:
                score += d2 / total
    return score


def select_energies(
    references: ReferenceSet,
    n: int,
    *,
    pre_edge: bool = True,
    pre_edge_eV: float | None = None,
    min_separation_eV: float | None = None,
) -> np.ndarray:
    """Choose ``n`` energies where the references differ most, plus one pre-edge energy.

    Criterion: :func:`discrimination_score` (pairwise-balanced squared differences of the
    standardized spectra). Energies are picked greedily by decreasing score, each at least
    ``min_separation_eV`` (default: range / (4 n)) from those already picked, so that the
    picks spread over the distinct features instead of crowding one peak.

    Parameters
    ----------
    references : ReferenceSet
    n : number of discriminating energies
    pre_edge : add one pre-edge energy (OD baseline; thickness) to the selection
    pre_edge_eV : the pre-edge energy; default the first energy of the reference grid
    min_separation_eV : minimum spacing between picks

    Returns
    -------
    (n + pre_edge,) float64, sorted, eV, all on the reference grid.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    e = references.energies
    low, high = references.energy_range
    sep = (high - low) / (4 * n) if min_separation_eV is None else float(min_separation_eV)
    picks: list[float] = []
    if pre_edge:
        pe = low if pre_edge_eV is None else float(references.check_energies(pre_edge_eV)[0])
        picks.append(pe)
    chosen: list[float] = []
    for idx in np.argsort(discrimination_score(references))[::-1]:
        if all(abs(e[idx] - c) >= sep for c in chosen + picks):
            chosen.append(float(e[idx]))
            if len(chosen) == n:
                break
    if len(chosen) < n:
        raise ValueError(
            f"could only place {len(chosen)} of {n} energies {sep:.3f} eV apart in "
            f"{low:.1f}-{high:.1f} eV; lower n or min_separation_eV"
        )
    return np.array(sorted(picks + chosen))
