"""One pixel of a result, for the view's spectrum panel: why the phase map says what it says there.

The page asks for a pixel it was clicked at; the answer holds the pixel's OD spectrum over the energies
seen, the maps' values there (phase, reliability, ambiguous, mask, the PCC with each reference) and each
reference *fitted* to the spectrum with an offset and a scale, the two things the PCC ignores (the
least-squares line ``od ~ a + b * reference``, over the energies where the pixel's OD is finite): a
reference whose fitted curve follows the points is one the pixel correlates with. Every array is checked
against the contract and the result's ``image_shape`` before it is read (``arrays.py``), and only the
pixel's own values are read (one Tiled slice per array). The references are the values the run's PCC used
(``reference_values``, stored with the result, docs/contract.md); a result without them, or with a table
that is not K x E numbers, gets the spectrum and the maps alone, never references loaded from elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np
from tiled.queries import KeysFilter
from tiled.structures.core import StructureFamily

from phasestream.app.view.arrays import drawn_as
from phasestream.contract import DEFAULT_MAX_NUM_POINTS
from phasestream.contract.metadata import finite_number, image_shape_of, recorded_energies

__all__ = ["PixelError", "fitted_references", "pixel_from_query", "pixel_spectrum"]

#: the maps read at the pixel (their values, not images); ``pcc`` is (K, Y, X), the others (Y, X)
PIXEL_MAPS = ("phase", "reliability", "ambiguous", "mask", "pcc", "refined_phase", "phase_denoised")
#: the spectra read at the pixel: (E, Y, X), the OD cube and a denoising's ``denoised`` (docs/models.md)
PIXEL_SPECTRA = ("od", "denoised")


#: the most energies of a pixel's spectrum read (ten times the worker's default bound on a run's energies): a
#: result edited to declare more is shown up to it, never read whole
MAX_SPECTRUM_ENERGIES = 10 * DEFAULT_MAX_NUM_POINTS


class PixelError(ValueError):
    """A pixel request the view will not answer; the message says why (the view answers 400 or 422)."""


def pixel_from_query(params: Mapping[str, str], image_shape: tuple[int, int] | None) -> tuple[int, int]:
    """``(y, x)`` from the query parameters ``y`` and ``x``: integers within ``image_shape`` (Y, X)."""
    if image_shape is None:
        raise PixelError("the result has no image_shape yet")
    pixel = []
    for axis, size in zip(("y", "x"), image_shape, strict=True):
        text = params.get(axis, "")
        if not (text.isascii() and text.isdigit() and len(text) <= 9):
            raise PixelError(f"{axis} must be a pixel index (0 to {size - 1}), got {text[:20]!r}")
        if int(text) >= size:
            raise PixelError(f"{axis} {int(text)} is outside the image (0 to {size - 1})")
        pixel.append(int(text))
    return pixel[0], pixel[1]


def fitted_references(od: np.ndarray, references: np.ndarray) -> list[list[float] | None]:
    """Each reference (K, E) fitted to the spectrum ``od`` (E,) by least squares as ``a + b * reference`` over the
    energies where ``od`` is finite, evaluated at every energy; None for a reference the fit cannot place (fewer
    than two finite energies, or a reference constant over them)."""
    finite = np.isfinite(od)
    fitted: list[list[float] | None] = []
    for values in np.asarray(references, dtype=np.float64):
        r = values[finite]
        if r.size < 2 or not np.all(np.isfinite(r)) or np.ptp(r) == 0:
            fitted.append(None)
            continue
        design = np.stack([np.ones_like(r), r], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, od[finite].astype(np.float64), rcond=None)
        fitted.append([float(v) for v in a + b * values])
    return fitted


def _number(value: Any) -> float | None:
    return finite_number(float(value)) if np.ndim(value) == 0 else None


def _reference_table(md: Mapping, k: int, n: int) -> np.ndarray | None:
    """The result's ``reference_values`` at its first ``n`` energies if it is a (K, >= n) table of finite numbers."""
    stored = md.get("reference_values")
    if not isinstance(stored, list | tuple) or len(stored) != k or k == 0:
        return None
    try:
        table = np.asarray([list(row) for row in stored], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if table.ndim != 2 or table.shape[1] < n or not np.all(np.isfinite(table[:, :n])):
        return None
    return table[:, :n]


def pixel_spectrum(client, path: str, md: Mapping, y: int, x: int, executor: Executor) -> dict[str, Any]:
    """What the result at ``path`` (its metadata ``md``) holds at pixel ``(y, x)``: ``energies_eV``, ``od`` (None
    where masked), ``phase`` (its name; None: outside the particle mask), ``refined_phase``, ``denoised`` and
    ``phase_denoised`` (a denoising's spectrum and phase; None: not denoised), ``reliability``,
    ``ambiguous``, ``mask``, ``pcc`` (phase -> value) and ``fitted`` (phase -> the fitted reference at each energy,
    or None), JSON-ready; a map the result lacks is None.

    ``(y, x)`` lies within the result's ``image_shape`` (:func:`pixel_from_query`). The arrays are read on
    ``executor``, at once. Raises ``arrays.NoImageError`` for an array off the contract and ValueError for
    ``n_energies_seen`` or ``energies_eV`` that are not a count and a list of energies."""
    image_shape = image_shape_of(md)
    seen, energies = recorded_energies(path, md)
    phases = list(md["references"]["phases"])

    # the arrays wanted, found in one search of the result (a lookup each cost as much as reading the pixel)
    nodes = dict(client[path].search(KeysFilter(keys=[*PIXEL_SPECTRA, *PIXEL_MAPS])).items())

    def read(name: str) -> tuple[str, np.ndarray | None]:
        node = nodes.get(name)
        if node is None or getattr(node, "structure_family", None) != StructureFamily.array:
            return name, None
        dtype, _ = drawn_as(name, tuple(node.shape), node.dtype, image_shape, whole=False)
        if name in PIXEL_SPECTRA:  # the energies the maps used and the metadata names, and no more than the cap
            n = min(seen, node.shape[0], len(energies), MAX_SPECTRUM_ENERGIES)
            values = node[:n, y, x] if n else np.empty(0)
        else:
            values = node[:, y, x] if name == "pcc" else node[y, x]
        return name, np.asarray(values).astype(dtype, copy=False)

    got = dict(executor.map(read, (*PIXEL_SPECTRA, *PIXEL_MAPS)))
    od = (got["od"] if got["od"] is not None else np.empty(0)).astype(np.float64)
    n = min(od.size, len(energies))
    od, energies = od[:n], energies[:n]

    def named(label: np.ndarray | None) -> str | None:  # a phase label's name; None: none (-1) or no array
        return phases[int(label)] if label is not None and 0 <= int(label) < len(phases) else None

    pcc = got["pcc"]
    table = _reference_table(md, len(phases), od.size)
    fitted = fitted_references(od, table) if table is not None else [None] * len(phases)
    return {
        "y": y, "x": x,
        "energies_eV": energies,
        "od": [_number(v) for v in od],
        "phase": named(got["phase"]),
        "refined_phase": named(got["refined_phase"]),  # the GMVAE refinement's, when it ran
        "denoised": None if got["denoised"] is None else [_number(v) for v in got["denoised"][:n]],
        "phase_denoised": named(got["phase_denoised"]),  # the maps of the denoised OD, when denoised
        "reliability": None if got["reliability"] is None else _number(got["reliability"]),
        "ambiguous": None if got["ambiguous"] is None else bool(got["ambiguous"]),
        "mask": None if got["mask"] is None else bool(got["mask"]),
        "pcc": {} if pcc is None or pcc.shape != (len(phases),) else
        {p: _number(v) for p, v in zip(phases, pcc, strict=True)},
        "fitted": dict(zip(phases, fitted, strict=True)),
        "references": "stored" if table is not None else "none stored with the result",
    }
