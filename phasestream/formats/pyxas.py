"""PyXAS energy stacks: an HDF5 file with ``img_xanes`` (E, Y, X) and ``X_eng`` (E,).

The layout is PyXAS's own (M. Ge, PyXAS, BNL FXI 18-ID; read from its GUI loader and its
"combine and save" writer): datasets at the file root,

- ``img_xanes``: (E, Y, X) float32 images, or (Y, X) for one energy;
- ``X_eng``: the energies, in keV ("Generally, it is in unit of keV" in PyXAS), a scalar for
  one energy; PyXAS also writes a ``unit`` dataset (``"keV"``) beside fitted results;
- optional ``img_bkg`` and ``img_dark``: when present, ``img_xanes`` is the raw sample-in stack
  and PyXAS normalizes it as ``(img_xanes - img_dark) / (img_bkg - img_dark)``;
- optional ``scan_id``.

Frames never written (chunks an aborted writer left) are NaN, listed in
``metadata["unmeasured_energy_indices"]`` as NXstxm's are, never counts of 0.

Mapping to :class:`ImportedStack` (always ``mode="txm"``):

- with ``img_bkg``: ``images`` = ``img_xanes``, ``flat`` = ``img_bkg``, ``dark`` = ``img_dark``
  (or None), so ``OD = -ln((I - dark) / (flat - dark))`` is PyXAS's normalization;
- without: ``img_xanes`` is already flat-field normalized transmission, so ``flat`` is an
  all-ones (Y, X) image and ``dark`` None: ``OD = -ln(img_xanes / 1)``, what PyXAS's
  ``norm_txm`` computes. ``metadata["normalized"]`` says which case it was. A file whose
  ``img_xanes`` already holds OD (PyXAS run with ``norm_txm_flag = 0``) cannot be told apart
  from transmission by its layout: import it as TIFF/with care.

Energies: the unit is taken from an ``X_eng`` ``units``/``unit`` attribute or a root ``unit``
dataset (``keV`` or ``eV``); without either, values below 100 are keV (PyXAS's convention;
TXM K edges lie at 4-30 keV) and others eV. ``metadata["energy_unit_in_file"]`` records what
was used, with ``"(inferred)"`` when guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from phasestream.formats.energies import check_energies, load_energies
from phasestream.formats.hdf5storage import unwritten
from phasestream.formats.hdf5util import MAX_AXIS_VALUES, is_empty, open_hdf5, read_array, read_text, scalar, text
from phasestream.formats.stack import FormatError, HDF5Source, ImportedStack, intensity_dtype

__all__ = ["read_pyxas"]

_UNITS = {"kev": 1000.0, "ev": 1.0}
# below this, an energy without a unit is keV (PyXAS writes keV; TXM works at 4-30 keV)
_KEV_BELOW = 100.0


def _energy_unit(handle: h5py.File, energies: h5py.Dataset, values: np.ndarray) -> tuple[float, str]:
    for key in ("units", "unit"):
        if key in energies.attrs:
            return _named_unit(handle.filename, text(energies.attrs[key]))
    unit = handle.get("unit")
    if isinstance(unit, h5py.Dataset) and not is_empty(unit):  # an empty unit is none
        return _named_unit(handle.filename, read_text(Path(handle.filename), unit, "unit"))
    if values.size and np.nanmax(np.abs(values)) < _KEV_BELOW:
        return 1000.0, "keV (inferred)"
    return 1.0, "eV (inferred)"


def _named_unit(path, name: str) -> tuple[float, str]:
    factor = _UNITS.get(name.strip().lower())
    if factor is None:
        raise FormatError(path, f"X_eng unit {name!r} is neither keV nor eV")
    return factor, name.strip()


def _reference(path: Path, handle: h5py.File, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    node = handle.get(key)
    if node is None:
        return None
    if not isinstance(node, h5py.Dataset):
        raise FormatError(path, f"{key} is not a dataset")
    _, rows, cols = shape
    if node.shape == (rows, cols) or node.shape == (1, rows, cols):
        return read_array(path, node, np.float32, what=key).reshape(rows, cols)
    if node.shape == shape:
        return read_array(path, node, np.float32, what=key)
    raise FormatError(path, f"{key} has shape {node.shape}; expected {(rows, cols)} or {shape} like img_xanes")


def read_pyxas(path: str | Path, *, energies: Sequence[float] | np.ndarray | str | Path | None = None) -> ImportedStack:
    """Read a PyXAS HDF5 energy stack (see the module doc for the layout and the OD mapping).

    Parameters
    ----------
    path : the ``.h5`` file
    energies : (E,) energies in eV or an energy file, replacing ``X_eng`` (same count)

    Returns
    -------
    ImportedStack, ``mode="txm"``: images (E, Y, X) float32 (float64 for wide types),
    energies (E,) eV, ``flat`` (Y, X) or (E, Y, X), ``dark`` or None,
    ``hdf5=HDF5Source(path, "/img_xanes")`` (None for a single (Y, X) image).

    Raises
    ------
    FormatError
        not HDF5 or truncated, ``img_xanes`` or ``X_eng`` missing, an image count different
        from the energy count, bad energies, or reference images of the wrong shape.
    """
    path = Path(path)
    with open_hdf5(path) as handle:
        images_node = handle.get("img_xanes")
        if not isinstance(images_node, h5py.Dataset):
            raise FormatError(path, f"no img_xanes dataset (PyXAS layout); top-level keys: {sorted(handle)[:20]}")
        if images_node.ndim not in (2, 3):
            raise FormatError(path, f"img_xanes has shape {images_node.shape}; expected (energy, y, x)")
        dtype = intensity_dtype(path, images_node.dtype)
        images = read_array(path, images_node, dtype, what="img_xanes")
        # the import points at the file only when it holds every value (never written reads there as 0)
        source = HDF5Source(path, "/img_xanes", 0) if images.ndim == 3 and unwritten(images_node) is None else None
        if images.ndim == 2:
            images = images[np.newaxis]
        metadata: dict = {}
        unmeasured = [int(i) for i in np.flatnonzero(np.all(np.isnan(images), axis=(1, 2)))]
        if unmeasured:
            metadata["unmeasured_energy_indices"] = unmeasured
        if energies is None:
            energy_node = handle.get("X_eng")
            if not isinstance(energy_node, h5py.Dataset):
                raise FormatError(path, "no X_eng dataset: the energies are missing (pass energies=)")
            raw = read_array(path, energy_node, np.float64, what="X_eng", max_values=MAX_AXIS_VALUES).ravel()
            factor, unit = _energy_unit(handle, energy_node, raw)
            values = check_energies(path, raw * factor)
            metadata["energy_unit_in_file"] = unit
        else:
            values = load_energies(energies, path)
        if images.shape[0] != values.size:
            raise FormatError(path, f"{images.shape[0]} images in img_xanes for {values.size} energies")
        flat = _reference(path, handle, "img_bkg", images.shape)
        dark = _reference(path, handle, "img_dark", images.shape)
        if dark is not None and flat is None:
            raise FormatError(path, "img_dark without img_bkg: cannot normalize")
        metadata["normalized"] = flat is None
        if flat is None:
            flat = np.ones(images.shape[1:], dtype=np.float32)
        scan_id = scalar(handle.get("scan_id"))
        if scan_id is not None:
            metadata["scan_id"] = scan_id
    return ImportedStack(
        source=path,
        format="pyxas",
        energies=values,
        images=images,
        mode="txm",
        flat=flat,
        dark=dark,
        metadata=metadata,
        files=(path, Path(energies)) if isinstance(energies, str | Path) else (path,),
        hdf5=source,
    )
