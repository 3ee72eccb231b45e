"""Reference spectra: loading, interpolation onto scan energies, energy selection.

Formats (see DESIGN.md, "Reference spectra"):

* CSV with header ``energy_eV,<phase 1>,<phase 2>,...``, one row per energy, values in OD or
  normalized absorption; optional sidecar ``<stem>.yaml`` with per-phase metadata, e.g.
  ``phases: {Na3.0: {na_content: 3.0}}``.
* Two-column whitespace files (energy, value; keV or eV, detected by magnitude), one phase
  each; several of them load as one set.
* A registered name (``"nvpf-synthetic"``), resolved by :func:`load_references`.
"""

from __future__ import annotations

import csv
import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

__all__ = [
    "EnergyOutOfRangeError",
    "ReferenceFormatError",
    "ReferenceSet",
    "load_references",
    "register_references",
    "registered_references",
    "select_energies",
    "write_references",
]

# Median energy below this value means the file is in keV (hard X-ray edges are >= 2 keV,
# soft X-ray edges in eV are >= ~100 eV).
_KEV_THRESHOLD = 100.0

_REGISTRY: dict[str, Callable[[], ReferenceSet] | str] = {
    "nvpf-synthetic": "phasestream.sim.references:nvpf_references",
}


class ReferenceFormatError(ValueError):
    """A reference file could not be read as reference spectra."""


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
    with path.open() as f:
        first = f.readline()
    if "," in first:
        return _read_csv(path)
    energies, values = _read_two_column(path)
    return ReferenceSet(energies, (_phase_name(path),), values[None, :], name=path.stem,
                        attrs={"source": str(path)})


def _phase_name(path: Path) -> str:
    stem = path.stem
    return stem[4:] if stem.lower().startswith("ref_") else stem


def _read_csv(path: Path) -> ReferenceSet:
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    header = [h.strip() for h in rows[0]]
    if header[0] != "energy_eV" or len(header) < 2:
        raise ReferenceFormatError(
            f"{path}: header must be 'energy_eV,<phase 1>,<phase 2>,...', got {','.join(header)!r}"
        )
    try:
        table = np.array([[float(v) for v in r] for r in rows[1:]], dtype=np.float64)
    except ValueError as exc:
        raise ReferenceFormatError(f"{path}: non-numeric value ({exc})") from None
    if table.ndim != 2 or table.shape[1] != len(header):
        raise ReferenceFormatError(f"{path}: every row needs {len(header)} columns")
    table = table[np.argsort(table[:, 0], kind="stable")]
    if np.any(np.diff(table[:, 0]) == 0):
        dup = table[1:, 0][np.diff(table[:, 0]) == 0][0]
        raise ReferenceFormatError(f"{path}: duplicate energy {dup} eV")
    meta, attrs = {}, {"source": str(path)}
    sidecar = path.with_suffix(".yaml")
    if sidecar.exists():
        doc = yaml.safe_load(sidecar.read_text()) or {}
        meta = {str(k): dict(v or {}) for k, v in (doc.pop("phases", None) or {}).items()}
        unknown = set(meta) - set(header[1:])
        if unknown:
            raise ReferenceFormatError(f"{sidecar}: phases {sorted(unknown)} are not columns of {path.name}")
        attrs.update(doc)
    name = attrs.pop("name", path.stem)
    return ReferenceSet(table[:, 0], tuple(header[1:]), table[:, 1:].T, name=name, metadata=meta, attrs=attrs)


def _read_two_column(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise ReferenceFormatError(f"{path}: not a two-column numeric file ({exc})") from None
    if data.shape[1] != 2:
        raise ReferenceFormatError(f"{path}: expected 2 columns (energy, value), found {data.shape[1]}")
    energies, values = data[:, 0], data[:, 1]
    if np.median(energies) < _KEV_THRESHOLD:
        energies = energies * 1000.0
    order = np.argsort(energies, kind="stable")
    energies, values = energies[order], values[order]
    keep = np.concatenate([[True], np.diff(energies) > 0])  # drop repeated energies
    return energies[keep], values[keep]


def _merge_two_column(paths: Sequence[Path]) -> ReferenceSet:
    columns = [_read_two_column(p) for p in paths]
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
