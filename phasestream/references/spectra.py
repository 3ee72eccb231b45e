"""Reference spectra: the :class:`ReferenceSet`, its errors, the registry of named sets, the discrimination score.

Energy selection is in :mod:`phasestream.references.selection`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

__all__ = [
    "DEFAULT_MAX_REFERENCE_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_PHASES",
    "REFERENCE_FOLDERS_ENV",
    "EnergyOutOfRangeError",
    "ReferenceAccessError",
    "ReferenceFormatError",
    "ReferenceSet",
    "discrimination_score",
    "register_references",
    "registered_references",
    "write_references",
]

# Median energy below this value means the file is in keV (hard X-ray edges are >= 2 keV,
# soft X-ray edges in eV are >= ~100 eV).
_KEV_THRESHOLD = 100.0

# Reference files are a few hundred rows; anything much larger is not a reference file.
DEFAULT_MAX_REFERENCE_BYTES = 16 * 1024 * 1024

# Phases of one set: a phase map is int16 and the PCC maps hold one (Y, X) plane per phase; a set of
# 40,000 phases in a 1 MB file overflowed the phase map, with status complete.
MAX_PHASES = 256

# Longest set or phase name (the set's name is written into every result's metadata).
MAX_NAME_LENGTH = 4096

# Environment variable with the reference folders (os.pathsep-separated).
REFERENCE_FOLDERS_ENV = "PHASESTREAM_REFERENCES"

# Longest part of a requested value quoted in an error message.
_SHOWN_CHARS = 200

REGISTRY: dict[str, Callable[[], ReferenceSet] | str] = {
    "nvpf-synthetic": "phasestream.references.synthetic:nvpf_references",
    "kedge-synthetic": "phasestream.references.synthetic:kedge_references",
    "ledge-close-synthetic": "phasestream.references.synthetic:ledge_close_references",
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
        if not (isinstance(self.name, str) and 0 < len(self.name) <= MAX_NAME_LENGTH):  # never repr'd: a YAML
            what = type(self.name).__name__ if not isinstance(self.name, str) else f"{len(self.name)} characters"
            raise ReferenceFormatError(f"references: the set's name ({what}) is not text of 1 to "  # alias bomb
                                       f"{MAX_NAME_LENGTH} characters")
        energies = np.asarray(self.energies, dtype=np.float64)
        spectra = np.atleast_2d(np.asarray(self.spectra, dtype=np.float64))
        if energies.ndim != 1 or energies.size < 2:
            raise ReferenceFormatError(f"references {self.name!r}: need >= 2 energies, got shape {energies.shape}")
        if spectra.shape != (len(self.phases), energies.size):
            raise ReferenceFormatError(
                f"references {self.name!r}: spectra shape {spectra.shape} does not match "
                f"{len(self.phases)} phases x {energies.size} energies"
            )
        if len(self.phases) > MAX_PHASES:
            raise ReferenceFormatError(f"references {self.name!r:.{_SHOWN_CHARS}}: {len(self.phases)} phases, more "
                                       f"than the {MAX_PHASES} a set may have")
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
    REGISTRY[name] = factory


def registered_references() -> list[str]:
    return sorted(REGISTRY)


def from_registry(name: str) -> ReferenceSet:
    factory = REGISTRY[name]
    if isinstance(factory, str):
        module, func = factory.split(":")
        factory = getattr(importlib.import_module(module), func)
    return factory()


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

