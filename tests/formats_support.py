"""Small HDF5 files laid out as the facilities' software writes them, for the format tests."""

from __future__ import annotations

import h5py
import numpy as np

ENERGIES = np.array([700.0, 706.5, 708.0, 709.2, 720.0])


def write_nxstxm(path, make_signal, *, monitor=None) -> None:
    """An NXstxm file as pyStxm lays it out, its signal made by ``make_signal(group)``."""
    with h5py.File(path, "w") as handle:
        entry = handle.create_group("entry0")
        entry.attrs["NX_class"] = "NXentry"
        entry["definition"] = b"NXstxm"
        data = entry.create_group("counter0")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        data.attrs["axes"] = ["energy", "sample_y", "sample_x"]
        make_signal(data)
        rows, cols = data["data"].shape[1:]
        data["energy"] = ENERGIES[: data["data"].shape[0]]
        data["sample_y"] = np.arange(rows) * 0.05
        data["sample_x"] = np.arange(cols) * 0.05
        data["stxm_scan_type"] = b"sample image stack"
        if monitor is not None:
            control = entry.create_group("control")
            control.attrs["NX_class"] = "NXmonitor"
            monitor(control)
