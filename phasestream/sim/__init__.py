"""Simulated beamline: samples, STXM noise, ophyd sim devices, Bluesky plans.

The synthetic reference spectra they use are ``phasestream.references.synthetic``.

The devices and plans import ophyd and bluesky; they are loaded on first use so that
the simulated samples stay light to import.
"""

from __future__ import annotations

import importlib
from typing import Any

from phasestream.references.synthetic import nvpf_references
from phasestream.sim.noise import LINE_CORRELATED, SimulatedStack, STXMNoise, simulate_stack
from phasestream.sim.samples import SimulatedSample, flat_field, make_sample

_LAZY = {
    "TransmissionDetector": "phasestream.sim.devices",
    "HDF5TransmissionDetector": "phasestream.sim.devices",
    "MosaicDetector": "phasestream.sim.devices",
    "make_energy": "phasestream.sim.devices",
    "read_stream_frame": "phasestream.sim.devices",
    "read_stream_frames": "phasestream.sim.devices",
    "energy_stack_scan": "phasestream.sim.plans",
    "sample_metadata": "phasestream.sim.plans",
}

__all__ = ["LINE_CORRELATED", "STXMNoise", "SimulatedSample", "SimulatedStack", "flat_field", "make_sample",
           "nvpf_references", "simulate_stack", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
