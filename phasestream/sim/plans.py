"""Bluesky plans for simulated (and real) spectromicroscopy energy scans.

:func:`energy_stack_scan` is ``bluesky.plans.list_scan`` over X-ray energies with the run
metadata phasestream reads from the start document (docs/contract.md, "Start document"):

    sample:      {name, state_of_charge (optional), ...}
    phasestream: {references, image_key, energy_key, i0_key (when given), mode}
    num_points:  number of energies

In TXM mode the run also holds the ``dark`` stream (one event, shutter closed, before the
first energy) and the ``flat`` stream (one event per energy, sample out, with the energy),
each flat taken just before the ``primary`` image (sample in) at the same energy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.plans import list_scan
from bluesky.utils import MsgGenerator

from phasestream.references import ReferenceSet
from phasestream.sim.samples import SimulatedSample

__all__ = ["energy_stack_scan", "sample_metadata"]

log = logging.getLogger(__name__)

MODES = ("stxm", "txm")
_CONTRACT_KEYS = ("references", "image_key", "energy_key", "i0_key", "mode")


def sample_metadata(sample: SimulatedSample, *, name: str = "simulated") -> dict[str, Any]:
    """Start-document ``sample`` metadata for a simulated sample (name, state of charge, layouts).

    Phase names such as ``Na3.0`` cannot be keys here: the start-document schema forbids ``.``
    in nested keys.
    """
    return {
        "name": name,
        "state_of_charge": float(sample.state_of_charge),
        "simulated": True,
        "shape": list(sample.shape),
        "layouts": list(sample.layouts),
    }


def energy_stack_scan(
    detectors: Sequence[Any],
    energy: Any,
    energies: Iterable[float],
    *,
    md: Mapping[str, Any] | None = None,
    sample: Mapping[str, Any] | SimulatedSample | None = None,
    references: str | os.PathLike | ReferenceSet = "nvpf-synthetic",
    mode: str = "stxm",
    image_key: str | None = None,
    i0_key: str | None = None,
) -> MsgGenerator[str]:
    """One image per X-ray energy (a STXM or TXM-XANES stack), with phasestream's run metadata.

    Inputs are checked when the plan is made, so a bad argument raises before the RunEngine
    starts.

    Parameters
    ----------
    detectors : readable devices; the first one provides the default ``image_key``
    energy : movable energy positioner (eV); its readback data key becomes ``energy_key``
    energies : (E,) energies in eV, finite, in the order they are measured
    md : extra start-document metadata; ``md["sample"]`` is used when ``sample`` is None, and
        ``md["phasestream"]`` may add keys but not contradict the arguments
    sample : sample metadata ``{name, state_of_charge, ...}``, or a SimulatedSample (see
        :func:`sample_metadata`); None takes ``md["sample"]`` or the simulated sample of the
        first detector that has one. ``state_of_charge`` is optional (a sample that is not a
        battery has none; its results are then not found by ``--soc`` queries)
    references : reference spectra the run is analysed against: a path or registered name
    mode : ``"stxm"`` or ``"txm"``; TXM needs a detector with ``shutter`` and
        ``sample_position`` signals (see :class:`~phasestream.sim.devices.TransmissionDetector`)
    image_key : data key of the images; default: the first detector's ``image_key``
        attribute, else its first data key with 2D (or higher) shape, else ``<name>_img``
    i0_key : data key of an I0 monitor (counts per pixel in the open beam), recorded only when given

    Returns
    -------
    The plan (a bluesky message generator); it returns the run uid.
    """
    detectors = list(detectors)
    if not detectors:
        raise ValueError("energy_stack_scan needs at least one detector")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    points = _check_energies(energies)
    md = dict(md or {})
    data_keys = _data_keys(detectors)
    image_key = _image_key(detectors[0], data_keys) if image_key is None else image_key
    for label, key in (("image_key", image_key), ("i0_key", i0_key)):
        if key is not None and key not in data_keys:
            raise ValueError(f"{label} {key!r} is not a data key of the detectors; available: {sorted(data_keys)}")
    energy_key = _readback_key(energy)
    phasestream_md = {
        "references": _references_name(references),
        "image_key": image_key,
        "energy_key": energy_key,
        "mode": mode,
    }
    if i0_key is not None:
        phasestream_md["i0_key"] = i0_key
    extra = dict(md.pop("phasestream", None) or {})
    for key in _CONTRACT_KEYS:
        if key in extra and extra[key] != phasestream_md.get(key):
            raise ValueError(
                f"md['phasestream'][{key!r}] = {extra[key]!r} contradicts the plan arguments "
                f"({phasestream_md.get(key)!r}); pass it as the {key} argument"
            )
    sample_md = _sample_metadata(sample if sample is not None else md.pop("sample", None), detectors)
    md.pop("sample", None)

    txm_devices = _txm_devices(detectors) if mode == "txm" else []
    if mode == "txm" and not txm_devices:
        raise ValueError("mode 'txm' needs a detector with 'shutter' and 'sample_position' signals for darks and flats")

    _md = {
        "plan_name": "energy_stack_scan",
        "plan_args": {
            "detectors": [repr(d) for d in detectors],
            "energy": repr(energy),
            "energies": points,
            "mode": mode,
        },
        **md,
        "num_points": len(points),
        "sample": sample_md,
        "phasestream": {**extra, **phasestream_md},
    }
    log.debug("energy_stack_scan: %d energies, mode %s, image_key %s", len(points), mode, image_key)
    if mode == "stxm":
        return list_scan(detectors, energy, points, md=_md)
    return bpp.finalize_wrapper(
        list_scan(detectors, energy, points, per_step=_txm_step(detectors, energy, txm_devices), md=_md),
        _txm_restore(txm_devices),
    )


def _check_energies(energies: Iterable[float]) -> list[float]:
    try:
        values = np.asarray(list(energies), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"energies must be numbers in eV: {exc}") from exc
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"energies must be a non-empty 1D sequence of eV values, got shape {values.shape}")
    bad = values[~np.isfinite(values)]
    if bad.size:
        raise ValueError(f"energies must be finite; got {bad.tolist()}")
    return [float(e) for e in values]


def _data_keys(detectors: Sequence[Any]) -> dict[str, dict]:
    keys: dict[str, dict] = {}
    for det in detectors:
        keys.update(det.describe())
    return keys


def _image_key(detector: Any, data_keys: Mapping[str, dict]) -> str:
    key = getattr(detector, "image_key", None)
    if key:
        return str(key)
    described = detector.describe()
    for key, desc in described.items():
        if len(desc.get("shape") or []) >= 2:
            return key
    if f"{detector.name}_img" in described:  # ophyd.sim.DirectImage, which describes no shape before a trigger
        return f"{detector.name}_img"
    raise ValueError(
        f"detector {detector.name!r} has no image data key (2D shape) among {sorted(data_keys)}; pass image_key"
    )


def _readback_key(energy: Any) -> str:
    fields = (getattr(energy, "hints", None) or {}).get("fields") or list(energy.describe())
    if not fields:
        raise ValueError(f"energy positioner {energy.name!r} has no readback data key")
    return fields[0]


def _references_name(references: str | os.PathLike | ReferenceSet) -> str:
    if isinstance(references, ReferenceSet):
        return references.name
    if isinstance(references, str | os.PathLike) and str(references):
        return str(references)
    raise ValueError(f"references must be a path or a registered name, got {references!r}")


def _sample_metadata(sample: Mapping[str, Any] | SimulatedSample | None, detectors: Sequence[Any]) -> dict:
    if sample is None:
        sample = next((d.sample for d in detectors if isinstance(getattr(d, "sample", None), SimulatedSample)), None)
    if sample is None:
        raise ValueError("sample metadata is required: pass sample={'name': ..., 'state_of_charge': ...}")
    result = sample_metadata(sample) if isinstance(sample, SimulatedSample) else dict(sample)
    name = result.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"sample['name'] must be a non-empty string, got {name!r}")
    if result.get("state_of_charge") is None:  # a plain imaging sample, not a battery: no state of charge
        result.pop("state_of_charge", None)
        return result
    try:
        soc = float(result.get("state_of_charge"))
    except (TypeError, ValueError):
        soc = math.nan
    if not math.isfinite(soc):
        raise ValueError(
            f"sample['state_of_charge'] must be a finite number (Na content) or absent, got "
            f"{result.get('state_of_charge')!r}"
        )
    result["state_of_charge"] = soc
    return result


def _txm_devices(detectors: Sequence[Any]) -> list[Any]:
    return [d for d in detectors if hasattr(d, "shutter") and hasattr(d, "sample_position")]


def _set_all(signals: Sequence[Any], value: str) -> MsgGenerator[None]:
    args: list[Any] = []
    for signal in signals:
        args += [signal, value]
    yield from bps.mv(*args)


def _txm_step(detectors: Sequence[Any], energy: Any, txm_devices: Sequence[Any]):
    """per_step for list_scan: dark once, then per energy a flat (sample out) and the image (sample in)."""
    shutters = [d.shutter for d in txm_devices]
    stages = [d.sample_position for d in txm_devices]
    state = {"dark_done": False}

    def txm_step(detectors, step, pos_cache):
        if not state["dark_done"]:
            yield from _set_all(shutters, "closed")
            yield from bps.trigger_and_read(list(detectors), name="dark")
            yield from _set_all(shutters, "open")
            state["dark_done"] = True
        yield from bps.move_per_step(step, pos_cache)
        yield from _set_all(stages, "out")
        yield from bps.trigger_and_read([*detectors, energy], name="flat")
        yield from _set_all(stages, "in")
        yield from bps.trigger_and_read([*detectors, *step], name="primary")

    return txm_step


def _txm_restore(txm_devices: Sequence[Any]) -> MsgGenerator[None]:
    """Leave the beamline with the shutter open and the sample in, whatever happened."""
    yield from _set_all([d.shutter for d in txm_devices], "open")
    yield from _set_all([d.sample_position for d in txm_devices], "in")
