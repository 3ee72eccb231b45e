"""Energy lists given beside image files: a text file or an explicit sequence, in eV.

A text energy file holds one energy per line, or energies separated by whitespace or commas;
``#`` starts a comment that runs to the end of the line. Energies are kept in the order given
(acquisition order), must be finite, positive and distinct; they need not increase.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from phasestream.formats.stack import FormatError

__all__ = ["MAX_ENERGY_FILE_BYTES", "check_energies", "load_energies", "parse_energy_text"]

#: An energy file is a few kB; a bigger one is not an energy list.
MAX_ENERGY_FILE_BYTES = 4 * 2**20

_SEPARATORS = re.compile(r"[\s,;]+")


def parse_energy_text(text: str, path: str | Path) -> np.ndarray:
    """Parse the energies (eV) of an energy file's text.

    Parameters
    ----------
    text : the file's content
    path : the file, named in errors

    Returns
    -------
    (E,) float64 energies in eV, in file order.
    """
    values: list[float] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        for token in _SEPARATORS.split(line):
            if not token:
                continue
            try:
                values.append(float(token))
            except ValueError:
                raise FormatError(path, f"line {number}: {token!r} is not an energy in eV") from None
    return check_energies(path, values)


def check_energies(path: str | Path, energies: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return ``energies`` as (E,) float64 eV; refuse an empty list, NaN/inf, values <= 0 or duplicates.

    Raises :class:`FormatError` naming ``path``.
    """
    try:
        values = np.asarray(energies, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise FormatError(path, f"energies are not numbers: {error}") from None
    if values.ndim != 1:
        raise FormatError(path, f"energies must be a flat list, got shape {values.shape}")
    if values.size == 0:
        raise FormatError(path, "no energies")
    bad = ~np.isfinite(values)
    if np.any(bad):
        raise FormatError(path, f"energy #{int(np.argmax(bad))} is {values[bad][0]} (energies must be finite, in eV)")
    if np.any(values <= 0):
        raise FormatError(
            path, f"energy #{int(np.argmax(values <= 0))} is {values[values <= 0][0]} (photon energies are > 0 eV)"
        )
    unique, counts = np.unique(values, return_counts=True)
    if np.any(counts > 1):
        raise FormatError(path, f"duplicate energies (eV): {unique[counts > 1].tolist()}")
    return values


def load_energies(source: Sequence[float] | np.ndarray | str | Path, image_path: str | Path) -> np.ndarray:
    """Energies (eV) from a text file (``str`` / ``Path``) or a sequence of numbers.

    Parameters
    ----------
    source : an energy file, or the energies themselves
    image_path : the images these energies belong to, named in errors about a sequence

    Returns
    -------
    (E,) float64 energies in eV.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FormatError(path, "energy file not found")
        size = path.stat().st_size
        if size > MAX_ENERGY_FILE_BYTES:
            raise FormatError(path, f"energy file of {size} bytes is not an energy list (over {MAX_ENERGY_FILE_BYTES})")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise FormatError(path, "energy file is not UTF-8 text") from None
        return parse_energy_text(text, path)
    return check_energies(image_path, source)
