"""NeXus NXstxm energy stacks (STXM), read with h5py.

Follows the NXstxm application definition (nexusformat/definitions,
``applications/NXstxm.nxdl.xml``, version 1.1): an ``NXentry`` whose ``definition`` is
``"NXstxm"`` holds

- an ``NXdata`` group with ``data`` (the signal), ``energy`` (eV), ``sample_y``, ``sample_x``
  and ``stxm_scan_type``; for a ``"sample image stack"`` the data are (energy, sample_y,
  sample_x). The group's ``signal`` / ``axes`` attributes name the signal and the axis of each
  dimension, so files that store energy last are read too; files from before the ``axes``
  attribute (an ``axis`` attribute, 1-based, on each axis field) as well;
- ``control`` (``NXmonitor``) ``data`` of the same shape as the signal: "values to use to
  normalise for time-variations in photon flux. Typically, the synchrotron storage ring
  electron beam current" (the definition's words). It is returned as
  :attr:`ImportedStack.monitor`, not as ``i0``: a ring current is not an open-beam count;
- ``NXinstrument/NXsource/name`` (the beamline's source) and ``NXsample/name``.

Writers store ``definition`` and ``stxm_scan_type`` as scalars or as one-element arrays
(pyStxm, MANTiS's reader reads ``[0]``); both are accepted. Several ``NXdata`` groups (one per
detector channel) are allowed: the entry's ``default`` attribute picks one, else the first by
name; ``channel=`` chooses. Planes that are all NaN (pyStxm pre-fills stacks with NaN and an
aborted scan leaves them so) are listed in ``metadata["unmeasured_energy_indices"]``; so are planes
whose chunks were never written (an aborted scan of another writer), read as NaN, not as the fill
value 0 (:mod:`phasestream.formats.hdf5storage`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from phasestream.formats.energies import check_energies, load_energies
from phasestream.formats.hdf5storage import unwritten
from phasestream.formats.hdf5util import (
    MAX_AXIS_VALUES,
    is_empty,
    lazy_frames,
    open_hdf5,
    read_array,
    read_text,
    scalar,
    text,
)
from phasestream.formats.stack import FormatError, HDF5Source, ImportedStack, intensity_dtype

__all__ = ["IMAGE_SCAN_TYPES", "nxstxm_entries", "read_nxstxm"]

#: ``stxm_scan_type`` values that hold images: (energy, y, x) or one (y, x) image.
IMAGE_SCAN_TYPES = ("sample image stack", "sample image", "generic scan")

_ENERGY_FIELDS = ("energy", "photon_energy")
_ENERGY_UNITS = {"ev": 1.0, "kev": 1000.0}
# keys in NFKC form (how _scale looks units up): micro is the Greek mu, U+03BC
_LENGTH_UNITS_UM = {"um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6}
_TIME_UNITS_MS = {"s": 1000.0, "sec": 1000.0, "ms": 1.0, "us": 1e-3, "\u03bcs": 1e-3}


def _nx_class(node) -> str:
    return text(node.attrs.get("NX_class", b""))


def _children(group: h5py.Group, nx_class: str) -> list[str]:
    return sorted(
        name for name in group if isinstance(group.get(name), h5py.Group) and _nx_class(group[name]) == nx_class
    )


def nxstxm_entries(handle: h5py.File) -> list[str]:
    """Names of the root groups that are NXentry with ``definition == "NXstxm"``, sorted."""
    names = []
    for name in _children(handle, "NXentry"):
        try:
            definition = read_text(Path(handle.filename), handle[name].get("definition"), "definition")
        except FormatError:  # none, or not a short text: not an NXstxm entry
            continue
        if definition == "NXstxm":
            names.append(name)
    return names


def _axis_names(path: Path, group: h5py.Group, ndim: int) -> list[str]:
    """The field name of each dimension of the signal, from ``axes`` or from per-field ``axis``."""
    if "axes" in group.attrs:
        raw = group.attrs["axes"]
        names = [text(a) for a in np.atleast_1d(raw)]
        if len(names) == 1 and ":" in names[0]:
            names = names[0].split(":")  # NeXus's old "energy:sample_y:sample_x"
        if len(names) != ndim:
            raise FormatError(path, f"{group.name} axes {names} do not match the signal's {ndim} dimensions")
        return names
    names = [""] * ndim
    for name in group:
        node = group.get(name)
        if isinstance(node, h5py.Dataset) and "axis" in node.attrs:
            try:
                index = int(np.atleast_1d(node.attrs["axis"]).ravel()[0]) - 1
            except (TypeError, ValueError, IndexError, OverflowError):
                raise FormatError(path, f"{node.name} has an axis attribute that is not a dimension number: "
                                  f"{node.attrs['axis']!r:.80}") from None
            if 0 <= index < ndim:
                names[index] = name
    if "" in names:
        raise FormatError(
            path, f"{group.name} has no axes attribute and its fields do not say the axis of each dimension"
        )
    return names


def _signal(path: Path, group: h5py.Group) -> h5py.Dataset:
    name = text(group.attrs["signal"]) if "signal" in group.attrs else "data"
    node = group.get(name)
    if not isinstance(node, h5py.Dataset):
        raise FormatError(path, f"{group.name} has no signal dataset {name!r}")
    if node.shape is None:
        raise FormatError(path, f"{name} ({node.name}) is empty")
    return node


def _scale(path: Path, node: h5py.Dataset, table: dict[str, float], default: str, what: str) -> float:
    # NFKC: the micro sign (U+00B5, "µm") and the Greek mu (U+03BC, "μm", as PolLux writes it) are one unit
    unit = unicodedata.normalize("NFKC", text(node.attrs.get("units", default)) or default)
    factor = table.get(unit, table.get(unit.lower()))
    if factor is None:
        raise FormatError(path, f"{what} unit {unit!r} is not one of {sorted(table)}")
    return factor


def _pick_data(path: Path, entry: h5py.Group, channel: str | None) -> tuple[h5py.Group, list[str]]:
    groups = _children(entry, "NXdata")
    if not groups:
        raise FormatError(path, f"entry {entry.name} has no NXdata group")
    if channel is None:
        default = text(entry.attrs["default"]) if "default" in entry.attrs else ""
        channel = default if default in groups else groups[0]
    elif channel not in groups:
        raise FormatError(path, f"no NXdata {channel!r} in {entry.name}; channels: {groups}")
    return entry[channel], groups


def _monitor(entry: h5py.Group) -> h5py.Dataset | None:
    candidates = [entry.get("control")] + [entry[name] for name in _children(entry, "NXmonitor")]
    instrument = entry.get("instrument")
    if isinstance(instrument, h5py.Group):
        candidates.append(instrument.get("control"))
    for group in candidates:
        node = group.get("data") if isinstance(group, h5py.Group) else None
        if isinstance(node, h5py.Dataset) and not is_empty(node):  # an empty monitor is none (it is optional)
            return node
    return None


def _first_name(group: h5py.Group, path: Sequence[str]) -> str | None:
    """``name`` of the first group of class ``path[-1]`` reached through classes ``path``."""
    nodes = [group]
    for nx_class in path:
        nodes = [node[name] for node in nodes for name in _children(node, nx_class)]
    for node in nodes:
        value = scalar(node.get("name"))
        if value is not None:
            return str(value)
    return None


def _step_um(path: Path, group: h5py.Group, name: str) -> float | None:
    node = group.get(name)
    if not isinstance(node, h5py.Dataset) or is_empty(node) or node.size < 2 or node.ndim != 1:
        return None
    values = read_array(path, node, np.float64, what=name) * _scale(path, node, _LENGTH_UNITS_UM, "um", name)
    step = float(np.median(np.abs(np.diff(values))))
    return step if np.isfinite(step) and step > 0 else None


def _metadata(path: Path, entry: h5py.Group, data: h5py.Group, scan_type: str, points: int) -> dict:
    """The entry's metadata; ``points`` is the signal's size, the most values a ``count_time`` has."""
    meta: dict = {"entry": entry.name.lstrip("/"), "channel": data.name.rsplit("/", 1)[-1], "stxm_scan_type": scan_type}
    for key in ("title", "start_time", "end_time"):
        value = scalar(entry.get(key))
        if value is not None:
            meta[key] = value
    sample = _first_name(entry, ["NXsample"])
    if sample is not None:
        meta["sample"] = sample
    beamline = _first_name(entry, ["NXinstrument", "NXsource"])
    if beamline is not None:
        meta["beamline"] = beamline
    count_time = data.get("count_time")
    if isinstance(count_time, h5py.Dataset) and not is_empty(count_time) and count_time.size <= points:
        values = read_array(path, count_time, np.float64, what="count_time", within_signal=True)
        values = values[np.isfinite(values)]
        if values.size:
            meta["dwell_ms"] = float(np.median(values)) * _scale(path, count_time, _TIME_UNITS_MS, "s", "count_time")
    for axis, key in (("sample_x", "pixel_size_x_um"), ("sample_y", "pixel_size_y_um")):
        step = _step_um(path, data, axis)
        if step is not None:
            meta[key] = step
    return meta


def read_nxstxm(
    path: str | Path,
    *,
    energies: Sequence[float] | np.ndarray | str | Path | None = None,
    entry: str | None = None,
    channel: str | None = None,
) -> ImportedStack:
    """Read an NXstxm image stack (see the module doc for the layout).

    Parameters
    ----------
    path : the NeXus HDF5 file
    energies : (E,) energies in eV or an energy file, replacing the file's (same count)
    entry : the NXentry to read; the first NXstxm entry by name when None
    channel : the NXdata group (detector channel) to read; the entry's ``default``, else the
        first by name, when None

    Returns
    -------
    ImportedStack, ``mode="stxm"``: images (E, Y, X) transmitted counts (integer counts stored
    energy first are left in the file, :class:`~phasestream.formats.stack.LazyImages`), energies (E,) eV,
    ``monitor`` (E, Y, X) or (E,) from ``control`` when present, ``i0`` None,
    ``hdf5`` pointing at the signal when its (Y, X) order needs no transpose; ``part`` the entry and
    channel read when the file holds several.

    Raises
    ------
    FormatError
        no NXstxm entry, a scan type that is not an image or stack, axes that do not resolve to
        (energy, sample_y, sample_x), sizes that disagree, bad energies, a truncated file.
    """
    path = Path(path)
    with open_hdf5(path) as handle:
        entries = nxstxm_entries(handle)
        if not entries:
            raise FormatError(path, "no NXentry with definition 'NXstxm'")
        if entry is None:
            entry = entries[0]
        elif entry not in entries:
            raise FormatError(path, f"no NXstxm entry {entry!r}; entries: {entries}")
        group = handle[entry]
        data, channels = _pick_data(path, group, channel)
        if not isinstance(data.get("stxm_scan_type"), h5py.Dataset):
            raise FormatError(path, f"{data.name} has no stxm_scan_type (required by NXstxm)")
        scan_type = read_text(path, data["stxm_scan_type"], "stxm_scan_type")
        if scan_type not in IMAGE_SCAN_TYPES:
            raise FormatError(path, f"stxm_scan_type {scan_type!r} is not an image stack (one of {IMAGE_SCAN_TYPES})")
        signal = _signal(path, data)
        if signal.ndim not in (2, 3):
            raise FormatError(path, f"{signal.name} has shape {signal.shape}; expected (energy, sample_y, sample_x)")
        names = _axis_names(path, data, signal.ndim)
        energy_name = next((n for n in _ENERGY_FIELDS if isinstance(data.get(n), h5py.Dataset)), None)
        if energy_name is None:
            raise FormatError(path, f"{data.name} has no energy field")
        if signal.ndim == 2:
            names = [energy_name, *names]
        missing = [n for n in (energy_name, "sample_y", "sample_x") if n not in names]
        if missing:
            raise FormatError(path, f"{data.name} axes {names} lack {missing}")
        order = (names.index(energy_name), names.index("sample_y"), names.index("sample_x"))
        shape = (1, *signal.shape) if signal.ndim == 2 else signal.shape
        for name, axis in (("sample_y", order[1]), ("sample_x", order[2])):
            node = data.get(name)
            if isinstance(node, h5py.Dataset) and not is_empty(node) and node.size not in (1, shape[axis]):
                raise FormatError(path, f"{name} has {node.size} positions for {shape[axis]} pixels")
        energy_node = data[energy_name]
        if energies is None:
            raw = read_array(path, energy_node, np.float64, what=energy_name, max_values=MAX_AXIS_VALUES).ravel()
            values = check_energies(path, raw * _scale(path, energy_node, _ENERGY_UNITS, "eV", energy_name))
        else:
            values = load_energies(energies, path)
        if values.size != shape[order[0]]:
            raise FormatError(path, f"{shape[order[0]]} images in {signal.name} for {values.size} energies")
        if signal.ndim == 3 and order == (0, 1, 2) and signal.dtype.kind in "ui":
            # integer counts in the stack's order (no NaN to look for but chunks never written): left in the
            # file, read when indexed
            images = lazy_frames(path, signal, intensity_dtype(path, signal.dtype), what="data")
        else:
            raw_images = read_array(path, signal, intensity_dtype(path, signal.dtype), what="data").reshape(shape)
            images = np.ascontiguousarray(np.transpose(raw_images, order))
        missing = unwritten(signal)  # after the reads above checked it stores what it declares
        monitor_node = _monitor(group)
        monitor = None
        if monitor_node is not None:
            if monitor_node.size not in (signal.size, values.size):  # refused by its shape, before it is read
                raise FormatError(
                    path, f"control data has shape {monitor_node.shape}; expected {signal.shape} or ({values.size},)"
                )
            raw_monitor = read_array(path, monitor_node, np.float64, what="control data", within_signal=True)
            if raw_monitor.size == signal.size:
                monitor = np.ascontiguousarray(np.transpose(raw_monitor.reshape(shape), order))
            else:
                monitor = raw_monitor.reshape(values.size)
        signal_name, signal_ndim = signal.name, signal.ndim
        metadata = _metadata(path, group, data, scan_type, signal.size)
        if len(entries) > 1:
            metadata["entries"] = entries
        if len(channels) > 1:
            metadata["channels"] = channels
    if isinstance(images, np.ndarray):
        empty = [int(i) for i in np.flatnonzero(np.all(np.isnan(images), axis=(1, 2)))]
    else:  # lazy integer counts, energy first: NaN only where never written
        empty = missing.unmeasured_planes() if missing is not None else []
    if empty:
        metadata["unmeasured_energy_indices"] = empty
    # the import can point at the file when moving energy to the front leaves (y, x) in order, and when the file
    # holds every value (what was never written reads there as the fill value, not NaN)
    in_order = (signal_ndim == 3 and [a for a in range(3) if a != order[0]] == [order[1], order[2]]
                and missing is None)
    return ImportedStack(
        source=path,
        format="nxstxm",
        energies=values,
        images=images,
        mode="stxm",
        metadata=metadata,
        files=(path, Path(energies)) if isinstance(energies, str | Path) else (path,),
        hdf5=HDF5Source(path, signal_name, order[0]) if in_order else None,
        monitor=monitor,
        # a file of several stacks: which one, so that each is its own import
        part={"entry": metadata["entry"], "channel": metadata["channel"]}
        if "entries" in metadata or "channels" in metadata else {},
    )
