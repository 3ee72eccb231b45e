"""Simulated STXM / TXM beamline devices (ophyd sim): an energy positioner and area detectors.

A :class:`TransmissionDetector` images a :class:`~phasestream.sim.samples.SimulatedSample`
at the energy of a positioner. Each trigger draws one frame (Y, X) uint16 counts,

    frame = clip(Poisson(beam(E) * transmission(E) + dark_level), 0, 65535)

with ``beam(E) = i0(E)`` per pixel in STXM and ``i0(E) * flat_field`` (the TXM illumination
pattern, :func:`~phasestream.sim.samples.flat_field`) in TXM, ``transmission = exp(-OD)`` with
the sample in and 1 with the sample out, and no beam with the shutter closed. Noise comes from
``numpy.random.default_rng(seed)``: two detectors with the same seed, triggered in the same
order, give the same frames. With ``noise=False`` the frame is the rounded expected value.

``noise`` may instead be a :class:`~phasestream.sim.noise.STXMNoise`: each frame then has the
noise of :func:`~phasestream.sim.noise.simulate_stack` (the model in ``phasestream.sim.noise``),
so that a live simulated scan can carry line-correlated noise. The beam of every sample-in or
flat frame is multiplied by its own draw of
:func:`~phasestream.sim.noise.beam_fluctuation` (a per-scan-line I0 factor and an AR(1)
fluctuation along each line; scan lines are the rows, X the fast axis); Gaussian read noise
(``read_sigma``) is added after the Poisson draw (``poisson=False``: expected counts) and the frame
rounded; ``dark_counts`` sets the dark level when ``dark_level`` is not given. The sample drift
between energies (``drift_px``) is not simulated by the detector (it would have to know which
frames start a new energy image): use :func:`~phasestream.sim.noise.simulate_stack` for it.

The detector reads (data keys for ``name="det"``):

* ``det_img`` (Y, X) uint16, the frame (inline in events);
* ``det_i0``, the nominal open-beam counts per pixel ``i0(E)`` at the current energy (an I0
  monitor for ``i0_key``; it does not depend on the shutter or the sample position);

and carries as configuration (recorded once per stream in the descriptor) ``det_shutter``
(``"open"`` / ``"closed"``), ``det_sample_position`` (``"in"`` / ``"out"``) and
``det_dark_level`` (counts). A plan takes darks with ``bps.mv(det.shutter, "closed")`` and
flats with ``bps.mv(det.sample_position, "out")``.

:class:`HDF5TransmissionDetector` draws the same frames but writes them to an HDF5 file, one
file per staging (one per run), and describes ``det_img`` with ``external="STREAM:"``. Its
``collect_asset_docs`` yields, as bluesky 1.15's RunEngine expects from a readable device in
``trigger_and_read``, one ``("stream_resource", doc)`` per acquisition condition (sample in,
flat, dark: each its own dataset, so that each event stream gets its own StreamResource, as
TiledWriter files data by stream and data key) and one ``("stream_datum", doc)`` per frame with
``indices`` ``{start: n, stop: n + 1}``; the RunEngine fills in ``run_start``, ``descriptor``
and ``seq_nums``. The StreamResource follows what bluesky-tiled-plugins' ``HDF5Consolidator``
reads: ``mimetype="application/x-hdf5"``, ``uri`` a ``file://localhost/...`` URI, parameters
``dataset`` (``/entry/data/data``, ``/entry/flat/data`` or ``/entry/dark/data``),
``chunk_shape`` ``[1, Y, X]`` and ``swmr`` (the file is written in SWMR mode and flushed after
every frame, so that frames can be read while the run goes on). event-model's ``Filler`` does
not fill StreamDatum: :func:`read_stream_frame` reads a frame back from the two documents.

Limitation: a StreamResource belongs to the acquisition condition, not to the event stream. A
plan that records the same condition into two event streams of one run (for example sample-in
frames into both ``primary`` and ``baseline``) would have the second stream refer to the first
stream's StreamResource; :func:`~phasestream.sim.plans.energy_stack_scan` never does this.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlunparse

import h5py
import numpy as np
from event_model import ComposeStreamResource, ComposeStreamResourceBundle, StreamRange
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis
from ophyd.status import DeviceStatus

from phasestream.callbacks.assets import HDF5_MIMETYPE, AssetFolders, read_stream_frames
from phasestream.sim.noise import STXMNoise, beam_fluctuation
from phasestream.sim.samples import SimulatedSample, flat_field

__all__ = [
    "DEFAULT_DARK_LEVEL",
    "MODES",
    "ChoiceSignal",
    "HDF5TransmissionDetector",
    "MosaicDetector",
    "TransmissionDetector",
    "make_energy",
    "read_stream_frame",
    "read_stream_frames",
]

log = logging.getLogger(__name__)

MODES = ("stxm", "txm")
DEFAULT_DARK_LEVEL = {"stxm": 0.0, "txm": 100.0}
SHUTTER_STATES = ("open", "closed")
SAMPLE_POSITIONS = ("in", "out")
#: HDF5 dataset per acquisition condition (sample in: the areaDetector default path)
DATASETS = {"data": "/entry/data/data", "flat": "/entry/flat/data", "dark": "/entry/dark/data"}
_UINT16_MAX = np.iinfo(np.uint16).max


def make_energy(name: str = "energy", value: float = 505.0, *, delay: float = 0.0) -> SynAxis:
    """A simulated monochromator energy positioner (eV); its readback data key is ``name``."""
    return SynAxis(name=name, value=float(value), delay=delay, egu="eV")


class ChoiceSignal(Signal):
    """A soft signal that holds one of a fixed set of strings (e.g. shutter ``open`` / ``closed``)."""

    def __init__(self, *, choices: tuple[str, ...], value: str, **kwargs: Any):
        self.choices = tuple(choices)
        super().__init__(value=value, dtype="string", **kwargs)

    def put(self, value: str, **kwargs: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"{self.name}: {value!r} is not one of {self.choices}")
        super().put(value, **kwargs)


class TransmissionDetector(Device):
    """Simulated STXM / TXM area detector imaging a simulated sample at the current energy.

    Parameters
    ----------
    sample : the sample in the beam; the frame shape (Y, X) is ``sample.shape``
    energy : positioner (``.position``) or signal (``.get()``) giving the energy in eV
    name : device name; data keys are ``<name>_img`` and ``<name>_i0``
    mode : ``"stxm"`` (uniform beam) or ``"txm"`` (flat-field illumination pattern)
    i0 : open-beam counts per pixel (scalar), or a callable ``i0(energy_eV) -> counts``
    dark_level : detector offset in counts (Poisson); default 0 for STXM, 100 for TXM
    flat_variation, flat_seed : relative amplitude and seed of the TXM illumination pattern
        (:func:`~phasestream.sim.samples.flat_field`); unused in STXM
    noise : draw Poisson counts (True), return the rounded expected counts (False), or an
        :class:`~phasestream.sim.noise.STXMNoise` (module docstring; ``drift_px`` must be 0)
    seed : ``numpy.random.default_rng`` seed of the counting noise
    """

    img = Cpt(Signal, value=0, kind="normal")  # not hinted: live tables and plots want scalars
    i0 = Cpt(Signal, value=0.0, kind="hinted")
    shutter = Cpt(ChoiceSignal, choices=SHUTTER_STATES, value="open", kind="config")
    sample_position = Cpt(ChoiceSignal, choices=SAMPLE_POSITIONS, value="in", kind="config")
    dark_level = Cpt(Signal, value=0.0, kind="config")

    def __init__(
        self,
        sample: SimulatedSample,
        energy: Any,
        *,
        name: str = "det",
        mode: str = "stxm",
        i0: float | Callable[[float], float] = 5000.0,
        dark_level: float | None = None,
        flat_variation: float = 0.2,
        flat_seed: int = 0,
        noise: bool | STXMNoise = True,
        seed: int | None = 0,
        **kwargs: Any,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        model = noise if isinstance(noise, STXMNoise) else STXMNoise(poisson=bool(noise))
        if model.drift_px > 0:
            raise ValueError("the detector does not simulate sample drift (STXMNoise.drift_px > 0): "
                             "use phasestream.sim.simulate_stack for a drifting stack")
        if model.dark_counts > 0:
            if dark_level is not None and float(dark_level) != model.dark_counts:
                raise ValueError(f"dark_level {dark_level!r} and noise.dark_counts {model.dark_counts!r} differ: "
                                 "give one of them")
            dark_level = model.dark_counts
        super().__init__(name=name, **kwargs)
        self.sample = sample
        self.energy_source = energy
        self.mode = mode
        self.noise_model = model
        self.noise = model.poisson
        self.seed = seed
        self._i0_source = i0
        self._rng = np.random.default_rng(seed)
        level = DEFAULT_DARK_LEVEL[mode] if dark_level is None else float(dark_level)
        if not np.isfinite(level) or level < 0:
            raise ValueError(f"dark_level must be a finite number of counts >= 0, got {dark_level!r}")
        self.dark_level.put(level)
        # relative illumination (Y, X): flat_field is linear in i0, so i0(E) * pattern is the beam
        self.illumination = (
            flat_field(sample.shape, i0=1.0, variation=flat_variation, seed=flat_seed)
            if mode == "txm"
            else np.ones(sample.shape)
        )
        self.img.put(np.zeros(sample.shape, dtype=np.uint16))

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape (Y, X) in pixels."""
        return tuple(self.sample.shape)

    @property
    def image_key(self) -> str:
        """Data key of the frame, ``<name>_img``."""
        return self.img.name

    @property
    def i0_key(self) -> str:
        """Data key of the I0 monitor, ``<name>_i0``."""
        return self.i0.name

    @property
    def condition(self) -> str:
        """Acquisition condition set by the shutter and the sample position: ``data``, ``flat`` or ``dark``."""
        if self.shutter.get() == "closed":
            return "dark"
        return "flat" if self.sample_position.get() == "out" else "data"

    def current_energy(self) -> float:
        """Energy (eV) read from the positioner (``.position``) or signal (``.get()``)."""
        source = self.energy_source
        value = source.position if hasattr(source, "position") else source.get()
        return float(value)

    def i0_at(self, energy: float) -> float:
        """Open-beam counts per pixel at ``energy`` (eV)."""
        source = self._i0_source
        value = float(source(energy)) if callable(source) else float(source)
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{self.name}: i0 at {energy:.3f} eV must be finite counts >= 0, got {value!r}")
        return value

    def expected_frame(self, energy: float, condition: str = "data") -> np.ndarray:
        """Expected counts (Y, X) float64 at ``energy`` (eV) for ``condition`` (``data``, ``flat``, ``dark``)."""
        dark = float(self.dark_level.get())
        if condition == "dark":
            return np.full(self.shape, dark)
        beam = self.i0_at(energy) * self.illumination
        if condition == "flat":
            return beam + dark
        if condition != "data":
            raise ValueError(f"condition must be 'data', 'flat' or 'dark', got {condition!r}")
        return self.sample.transmitted(energy, i0=beam, noise=False) + dark

    def acquire(self) -> tuple[np.ndarray, float]:
        """Draw one frame at the current energy and condition: ((Y, X) uint16 counts, i0 counts per pixel)."""
        energy = self.current_energy()
        condition = self.condition
        expected = self.expected_frame(energy, condition)
        model = self.noise_model
        if model.line_correlated and condition != "dark":  # the beam fluctuates; the dark level does not
            dark = float(self.dark_level.get())
            expected = dark + (expected - dark) * beam_fluctuation(self.shape, model, self._rng)
        counts = self._rng.poisson(expected).astype(np.float64) if model.poisson else expected
        if model.read_sigma > 0:
            counts = counts + self._rng.normal(0.0, model.read_sigma, self.shape)
        return np.clip(np.rint(counts), 0, _UINT16_MAX).astype(np.uint16), self.i0_at(energy)

    def trigger(self) -> DeviceStatus:
        frame, i0 = self.acquire()
        self.img.put(frame)
        self.i0.put(i0)
        self._frame_acquired(frame)
        status = DeviceStatus(self)
        status.set_finished()
        return status

    def _frame_acquired(self, frame: np.ndarray) -> None:
        """Hook for subclasses that store frames; the inline detector keeps them in ``img`` only."""

    def describe(self) -> dict[str, dict]:
        desc = super().describe()
        if self.image_key in desc:
            desc[self.image_key].update(dtype="array", shape=list(self.shape), dtype_numpy=np.dtype(np.uint16).str)
        return desc


class MosaicDetector(TransmissionDetector):
    """:class:`TransmissionDetector` over several fields of view: the sample in the beam is the one at the
    position nearest to a sample positioner's (a grid scan over energy and position, a mosaic).

    Parameters
    ----------
    samples : one sample per field, all of one shape
    positions : the position (positioner units) of each field
    position : the sample positioner (``.position``) or signal (``.get()``)
    energy, **kwargs : as for :class:`TransmissionDetector`; with ``noise=False`` a field's frames are
        those of a ``TransmissionDetector`` of that field's sample, whatever the order of the scan
    """

    def __init__(self, samples: Sequence[SimulatedSample], positions: Sequence[float], position: Any, energy: Any,
                 **kwargs: Any):
        if len(samples) != len(positions) or not samples:
            raise ValueError(f"one position per sample: {len(samples)} samples, {len(positions)} positions")
        if len({tuple(sample.shape) for sample in samples}) != 1:
            raise ValueError("every field's sample must have the same shape")
        super().__init__(samples[0], energy, **kwargs)
        self.samples, self.positions, self.position_source = list(samples), [float(p) for p in positions], position

    def expected_frame(self, energy: float, condition: str = "data") -> np.ndarray:
        source = self.position_source
        at = float(source.position if hasattr(source, "position") else source.get())
        self.sample = self.samples[int(np.argmin([abs(at - p) for p in self.positions]))]
        return super().expected_frame(energy, condition)


class _HDF5FrameWriter:
    """One SWMR HDF5 file with a growable (N, Y, X) uint16 dataset per acquisition condition."""

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path = path
        self._file = h5py.File(path, "w", libver="latest")
        for dataset in DATASETS.values():
            self._file.create_dataset(
                dataset, shape=(0, *shape), maxshape=(None, *shape), chunks=(1, *shape), dtype=np.uint16
            )
            self._file[dataset].attrs["units"] = "counts"
        self._file.swmr_mode = True  # every dataset must exist before SWMR starts

    def append(self, condition: str, frame: np.ndarray) -> int:
        """Append ``frame`` to the dataset of ``condition``; return its index in that dataset."""
        dataset = self._file[DATASETS[condition]]
        index = dataset.shape[0]
        dataset.resize(index + 1, axis=0)
        dataset[index] = frame
        dataset.flush()
        return index

    def close(self) -> None:
        self._file.close()


class HDF5TransmissionDetector(TransmissionDetector):
    """:class:`TransmissionDetector` that writes frames to HDF5 and emits StreamResource / StreamDatum.

    Parameters
    ----------
    sample, energy : as for :class:`TransmissionDetector`
    write_path : directory for the HDF5 files (created if missing); one file ``<name>_<uuid>.h5``
        per staging
    **kwargs : as for :class:`TransmissionDetector` (``name``, ``mode``, ``i0``, ``seed``, ...)

    The frame key ``<name>_img`` is not in ``read()``: it is described with
    ``external="STREAM:"`` and delivered by the documents of :meth:`collect_asset_docs`.
    The detector must be staged (bluesky plans stage their detectors) before it is triggered.
    """

    def __init__(self, sample: SimulatedSample, energy: Any, *, write_path: str | Path, **kwargs: Any):
        super().__init__(sample, energy, **kwargs)
        self.write_path = Path(write_path)
        self._writer: _HDF5FrameWriter | None = None
        self._resources: dict[str, ComposeStreamResourceBundle] = {}
        self._pending: list[tuple[str, dict]] = []
        self._frames_written = 0

    @property
    def path(self) -> Path | None:
        """The HDF5 file of the current staging (None when unstaged)."""
        return None if self._writer is None else self._writer.path

    def stage(self) -> list[object]:
        staged = super().stage()
        self.write_path.mkdir(parents=True, exist_ok=True)
        path = (self.write_path / f"{self.name}_{uuid.uuid4()}.h5").absolute()
        self._writer = _HDF5FrameWriter(path, self.shape)
        self._resources.clear()
        self._pending.clear()
        self._frames_written = 0
        log.debug("%s: writing frames to %s", self.name, path)
        return staged

    def unstage(self) -> list[object]:
        if self._writer is not None:
            self._writer.close()
            log.debug("%s: closed %s after %d frames", self.name, self._writer.path, self._frames_written)
            self._writer = None
        return super().unstage()

    def _frame_acquired(self, frame: np.ndarray) -> None:
        if self._writer is None:
            raise RuntimeError(f"{self.name}: stage the detector (bluesky plans do) before triggering it")
        condition = self.condition
        index = self._writer.append(condition, frame)
        self._frames_written += 1
        bundle = self._resources.get(condition)
        if bundle is None:
            bundle = ComposeStreamResource()(
                mimetype=HDF5_MIMETYPE,
                uri=urlunparse(("file", "localhost", str(self._writer.path), "", "", "")),
                data_key=self.image_key,
                parameters={"dataset": DATASETS[condition], "chunk_shape": [1, *self.shape], "swmr": True},
            )
            self._resources[condition] = bundle
            self._pending.append(("stream_resource", bundle.stream_resource_doc))
        datum = bundle.compose_stream_datum(indices=StreamRange(start=index, stop=index + 1))
        self._pending.append(("stream_datum", datum))

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict]]:
        """Yield the StreamResource / StreamDatum documents of the frames taken since the last call.

        ``index`` (bluesky's ``WritesStreamAssets`` protocol) is accepted and ignored: every
        trigger writes exactly one frame and its datum is emitted with the next read.
        """
        pending, self._pending = self._pending, []
        yield from pending

    def get_index(self) -> int:
        """Number of frames written since staging."""
        return self._frames_written

    def read(self) -> dict[str, dict]:
        readings = super().read()
        readings.pop(self.image_key, None)
        return readings

    def describe(self) -> dict[str, dict]:
        desc = super().describe()
        desc[self.image_key]["external"] = "STREAM:"
        return desc


def read_stream_frame(stream_resource: dict, stream_datum: dict, *, folders: AssetFolders) -> np.ndarray:
    """The one frame (Y, X) referenced by a single-index StreamDatum, in one of ``folders`` (see
    :func:`read_stream_frames`)."""
    frames = read_stream_frames(stream_resource, stream_datum, folders=folders)
    if len(frames) != 1:
        raise ValueError(f"StreamDatum {stream_datum['uid']!r} covers {len(frames)} frames; use read_stream_frames")
    return frames[0]
