"""Per-run analysis state of the live callback: one :class:`RunAnalysis` per handled run.

A :class:`RunAnalysis` is an ``event_model.DocumentRouter`` made by
:class:`~phasestream.callbacks.phase_map.PhaseMapCallback`'s RunRouter factory. It holds the
run's accumulator, dark/flat frames and asset documents, turns each primary image into OD and a
PearsonAccumulator update, publishes partial maps through the owner's result sink, and writes the
final maps, fractions, status and timings at stop. Bad events are recorded on the run
(:class:`RunResult` ``errors``) and never raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from event_model import DocumentRouter, unpack_event_page

from phasestream.callbacks.assets import read_stream_frames
from phasestream.callbacks.corrections import TXMCorrections
from phasestream.callbacks.descriptions import ImageDescriptions
from phasestream.callbacks.ending import run_timings, status_at_stop, status_of_maps
from phasestream.callbacks.planes import PartialMapPolicy, PlaneQueue
from phasestream.callbacks.result import RunResult
from phasestream.callbacks.settings import AnalysisConfig
from phasestream.callbacks.sink import ResultSink
from phasestream.contract import RunSettings
from phasestream.kernels import (
    PearsonAccumulator,
    assign_phases,
    kernel_threads,
    optical_density,
    particle_mask,
    phase_fractions,
    to_numpy,
)
from phasestream.references import ReferenceSet
from phasestream.store.readback import ReadBackError

__all__ = ["ENERGY_TOLERANCE_EV", "RunAnalysis", "RunResult"]

logger = logging.getLogger(__name__)

# energies closer than this (eV) are the same energy (duplicate images)
ENERGY_TOLERANCE_EV = 1e-3
MAX_ERRORS = 50
MAX_ERROR_CHARS = 500
#: write kinds that the final write supersedes (not held against the final status)
PARTIAL_MAPS = "partial maps"
HEARTBEAT = "the result's heartbeat"
_SUPERSEDED = (PARTIAL_MAPS, HEARTBEAT)
class RunAnalysis(DocumentRouter):
    """Per-run state: accumulator, dark/flat frames, asset documents, timings.

    Made by :class:`PhaseMapCallback` for each handled run; not meant to be built by hand.
    """

    def __init__(self, config: AnalysisConfig, settings: RunSettings, references: ReferenceSet, *,
                 sink: ResultSink, open_writer: Callable[[RunAnalysis, tuple[int, int] | None], Any],
                 on_finished: Callable[[RunAnalysis], None]):
        super().__init__()
        self.config, self.sink = config, sink
        self.open_writer = open_writer  # (analysis, image shape) -> ResultWriter or None, on the sink thread
        self.on_finished = on_finished
        self.settings = settings
        self.references = references
        self.result = RunResult(settings)
        self.streams: dict[str, str] = {}  # descriptor uid -> stream name
        self.acc: PearsonAccumulator | None = None
        self.corrections = TXMCorrections(max_flats=config.bounds.max_num_points)
        self.stream_resources: dict[str, dict] = {}
        self.stream_frames: dict[tuple[str, int], np.ndarray] = {}
        self.t_start = time.time()
        self.t_first_image: float | None = None
        self.t_last_image: float | None = None
        self.frame_seconds: list[float] = []
        self.event_latency: list[float] = []  # event time -> image analysed (transport included)
        self.writer = None
        self.incomplete_reason: str | None = None
        self._final: tuple[int, dict] | None = None  # (images, summary) of maps written before the stop
        # OD planes waiting for the sink: one job writes all that queued up, in one request
        self.planes = PlaneQueue(lambda: self.sink.submit(self._write(self.planes.write, "OD planes"),
                                                          key=self.result.key))
        self.partials = PartialMapPolicy(config)
        self.valid_pixels = 0
        self.closed = False
        self.opened = False
        self.conflict = False  # a result of this uid already existed: nothing is written
        # kind of write ("OD planes", "partial maps", ...) -> [failures, first error]: recorded once
        self.write_failures: dict[str, list] = {}
        self.image_shape: tuple[int, ...] | None = None  # from the primary descriptor, when it says
        self.image_descriptions = ImageDescriptions(settings.image_key)

    # -- bookkeeping ---------------------------------------------------------------------

    def record_error(self, message: str) -> None:
        message = message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "..."
        logger.warning("run %s: %s", self.result.key, message)
        if len(self.result.errors) < MAX_ERRORS:
            self.result.errors.append(message)
        elif len(self.result.errors) == MAX_ERRORS:
            self.result.errors.append("too many errors; further errors are only logged")

    def write_failed(self, what: str, exc: BaseException) -> None:
        """A write to Tiled failed: the first failure of each kind is an error on the run, later ones a count."""
        entry = self.write_failures.setdefault(what, [0, f"{type(exc).__name__}: {exc}"])
        entry[0] += 1
        if entry[0] == 1:
            self.record_error(f"writing {what} to Tiled failed: {entry[1]}")
        else:
            logger.debug("run %s: writing %s failed again (%d): %s", self.result.key, what, entry[0], exc)

    def heartbeat(self) -> None:
        """Queue a touch of the result's ``updated_at``: this run is alive (see ``LiveService``)."""
        if not self.closed:
            self.sink.submit(self._write(lambda writer: writer.update_metadata(), HEARTBEAT), key=self.result.key)

    def base_metadata(self) -> dict:
        s = self.settings
        return {
            "run_uid": s.run_uid,
            "scan_id": s.scan_id,
            "sample": s.sample,
            "state_of_charge": s.state_of_charge,
            "energies_eV": [],
            "references": {"name": self.references.name, "phases": list(self.references.phases)},
            "mode": s.mode,
            "status": "running",
            "n_energies_seen": 0,
            "errors": [],
            "phase_fractions": {},
            "ambiguous_fraction": None,
            "refined_fractions": {},
            "models": {},
            "timings": {},
            **self.field_metadata(),
        }

    def field_metadata(self) -> dict:
        """``field``: which field of a run imaged at several positions this result is (none for one position)."""
        return {} if self.result.field is None else {"field": self.result.field}

    # -- writer jobs (run on the sink thread) ---------------------------------------------

    def _open_result(self, shape: tuple[int, int] | None) -> None:
        """Queue the creation of the result container (once; arrays are sized by ``shape``)."""
        if self.opened:
            return
        self.opened = True

        def job() -> None:
            try:
                self.writer = self.open_writer(self, shape)
            except Exception as exc:  # noqa: BLE001 - recorded on the run; it ends failed
                self.write_failed("the result container", exc)

        self.sink.submit(job, key=self.result.key)

    def _write(self, fn: Callable[[Any], None], what: str) -> Callable[[], None]:
        def job() -> None:
            if self.writer is None:
                return
            try:
                fn(self.writer)
            except Exception as exc:  # noqa: BLE001 - counted on the run; the status says so
                self.write_failed(what, exc)

        return job

    # -- documents -----------------------------------------------------------------------

    def descriptor(self, doc: dict) -> None:
        name = doc.get("name", "primary")
        self.streams[doc["uid"]] = name
        if (note := self.image_descriptions.conflict(name, doc.get("data_keys"))) is not None:
            self.record_error(note)
        if name == "primary":
            keys = doc.get("data_keys", {})
            for key in (self.settings.image_key, self.settings.energy_key):
                if key not in keys:
                    self.record_error(f"primary stream has no data key {key!r:.80} (has {sorted(keys)[:20]})")
            shape = (keys.get(self.settings.image_key) or {}).get("shape") if isinstance(keys, dict) else None
            if isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
                self.image_shape = tuple(shape)

    def stream_resource(self, doc: dict) -> None:
        self.stream_resources[doc["uid"]] = doc

    def stream_datum(self, doc: dict) -> None:
        try:
            resource = self.stream_resources[doc["stream_resource"]]
            frames = read_stream_frames(resource, doc, folders=self.config.assets, bounds=self.config.bounds)
            if resource.get("data_key") not in (None, self.settings.image_key):
                return
            first = doc["seq_nums"]["start"]
            for i, frame in enumerate(frames):
                self.stream_frames[(doc["descriptor"], first + i)] = np.asarray(frame)
        except Exception as exc:  # noqa: BLE001 - recorded on the run
            self.record_error(f"cannot read frames of StreamDatum {doc.get('uid')}: {exc}")

    def event_page(self, doc: dict) -> None:
        # RunRouter delivers pages; handle them one event at a time
        for event in unpack_event_page(doc):
            self.event(event)

    def event(self, doc: dict) -> None:
        if self.closed:
            self.record_error(f"event {doc.get('seq_num')} arrived after the run was finalized; ignored")
            return
        stream = self.streams.get(doc["descriptor"])
        if stream is None:
            self.record_error(f"event {doc.get('seq_num')} refers to unknown descriptor {doc['descriptor']}")
            return
        try:
            if stream == "primary":
                self._image_event(doc)
            elif stream == "dark":
                self.corrections.add_dark(self._image(doc))
            elif stream == "flat":
                self.corrections.add_flat(float(doc["data"][self.settings.energy_key]), self._image(doc))
        except Exception as exc:  # noqa: BLE001 - recorded on the run, the stream goes on
            self.record_error(f"{stream} event {doc.get('seq_num')}: {exc}")

    def _image(self, doc: dict) -> np.ndarray:
        key = self.settings.image_key
        data = doc.get("data", {})
        value = data.get(key)
        if value is None or isinstance(value, str):
            frame = self.stream_frames.pop((doc["descriptor"], doc["seq_num"]), None)
            if frame is None:
                if key not in data and not self.stream_resources:
                    raise KeyError(f"no image under data key {key!r:.80} (event has {sorted(data)[:20]})")
                raise ValueError(f"image {key!r:.80} is an unfilled external reference ({value!r:.80})")
            return self._checked_image(frame)
        return self._checked_image(np.asarray(value))

    def _checked_image(self, image: np.ndarray) -> np.ndarray:
        """The image if it is a numeric 2-D array within the bounds and of the descriptor's shape."""
        key = self.settings.image_key
        if image.dtype.kind not in "biuf":
            raise ValueError(f"image {key!r:.80} must be numeric, got dtype {image.dtype}")
        if image.ndim != 2:
            raise ValueError(f"image {key!r:.80} must be 2D (Y, X), got shape {image.shape}")
        if image.size > self.config.bounds.max_image_pixels:
            raise ValueError(f"image {key!r:.80} has {image.size} pixels, more than the "
                             f"{self.config.bounds.max_image_pixels} allowed (--max-image-pixels)")
        declared = self.image_shape
        if declared is not None and len(declared) == 2 and tuple(image.shape) != declared:
            raise ValueError(f"image {key!r:.80} has shape {image.shape}, the descriptor declares {declared}")
        return image

    def _od(self, image: np.ndarray, energy: float, data: dict):
        s, backend = self.settings, self.config.backend
        if s.mode == "txm":
            txm = self.corrections
            return optical_density(image, flat=txm.flat(energy), dark=txm.dark(), backend=backend)
        i0 = None
        if s.i0_key:
            if s.i0_key not in data:
                raise KeyError(f"no I0 under data key {s.i0_key!r}")
            i0 = np.asarray(data[s.i0_key], dtype=np.float64)
            i0 = float(i0) if i0.ndim == 0 else i0
        return optical_density(image, i0, backend=backend)

    def _image_event(self, doc: dict) -> None:
        s = self.settings
        data = doc["data"]
        if s.energy_key not in data:
            raise KeyError(f"no energy under data key {s.energy_key!r:.80} (event has {sorted(data)[:20]})")
        energy = float(data[s.energy_key])
        if any(abs(energy - e) <= ENERGY_TOLERANCE_EV for e in self.result.energies):
            raise ValueError(f"duplicate energy {energy:.3f} eV; image ignored")
        ref_values = self.references.interpolate(energy)[:, 0]  # EnergyOutOfRangeError names the range
        image = self._image(doc)
        t0 = time.perf_counter()
        if self.acc is None:
            self.acc = PearsonAccumulator(image.shape, len(self.references.phases), backend=self.config.backend)
            self._open_result(image.shape)
        elif image.shape != self.acc.shape:
            raise ValueError(f"image shape changed from {self.acc.shape} to {image.shape}; image ignored")
        od, valid = self._od(image, energy, data)
        self.acc.update(od, ref_values, valid)
        od_host = to_numpy(od)
        index = len(self.result.energies)
        self.result.energies.append(energy)
        self.frame_seconds.append(time.perf_counter() - t0)
        self.t_last_image = now = time.time()
        self.t_first_image = self.t_first_image or now
        sent = doc.get("time")  # a latency only from a real timestamp; a bad one must not cost the OD plane
        if isinstance(sent, (int, float)) and not isinstance(sent, bool) and np.isfinite(sent):
            self.event_latency.append(now - float(sent))
        if self.config.write_od:
            self.planes.put(index, self.planes.pool.copy(od_host))
        self.partials.since_update += 1
        n = len(self.result.energies)
        if s.num_points is not None and n == s.num_points:
            # every expected energy is in: write the final maps now, not when the stop arrives
            self._final = (n, self._publish(final=True))
            return
        interval = (self.t_last_image - self.t_first_image) / (n - 1) if n >= 2 else 0.0
        k = len(self.references.phases)
        map_bytes = self.acc.shape[0] * self.acc.shape[1] * (4 * k + 8)  # pcc, phase, reliability, 2 masks
        if self.partials.due(n, s.num_points, interval, map_bytes, self.planes.write_s_per_byte):
            self._publish(final=False)

    # -- results ---------------------------------------------------------------------------

    def _maps(self) -> dict[str, np.ndarray]:
        pcc = self.acc.maps()
        mean = self.acc.mean()
        self.valid_pixels = int(np.isfinite(mean).sum())  # pixels with a usable OD at every energy
        mask = particle_mask(mean, threshold=self.config.mask_threshold)
        phase, reliability, ambiguous = assign_phases(pcc, mask, self.config.ambiguity, backend=self.config.backend)
        return {
            "pcc": pcc,
            "phase": phase,
            "reliability": reliability,
            "ambiguous": ambiguous.astype(np.uint8),
            "mask": mask.astype(np.uint8),
        }

    def _summary(self, arrays: dict[str, np.ndarray]) -> dict:
        mask = arrays["mask"].astype(bool)
        fr = phase_fractions(arrays["phase"], mask, arrays["ambiguous"].astype(bool), len(self.references.phases))
        rel = arrays["reliability"][mask]
        rel = rel[np.isfinite(rel)]
        return {
            "energies_eV": list(self.result.energies),
            "n_energies_seen": len(self.result.energies),
            "reference_values": self.references.interpolate(self.result.energies).round(6).tolist(),  # (K, E)
            "phase_fractions": fr.as_dict(self.references.phases) if fr.n_particle else {},
            "ambiguous_fraction": float(fr.ambiguous) if fr.n_particle else None,
            "mean_reliability": float(rel.mean()) if rel.size else None,
            "particle_pixels": int(fr.n_particle),
            "valid_pixels": self.valid_pixels,
        }

    def _publish(self, *, final: bool) -> dict | None:
        t0 = time.perf_counter()
        if final and self.config.backend == "numba":
            with kernel_threads(None):  # the stream is over: every core for the final maps
                arrays = self._maps()
        else:
            arrays = self._maps()
        md = self._summary(arrays)
        md["status"] = "running"
        md["errors"] = list(self.result.errors)
        self.partials.started()
        self.result.arrays, self.result.metadata = arrays, {**self.result.metadata, **md}
        compute_s = time.perf_counter() - t0

        if final:
            # superseded partial maps are dropped; the summary goes with the final status update
            if self.sink.cancel_latest(("maps", self.result.key)):
                self.partials.busy = False

            def final_maps(w) -> None:
                # OD planes still queued go concurrently with the maps (one round trip less)
                *earlier, last = self.planes.take() or [None]
                for start, block in earlier:
                    w.write_od_planes(start, block)
                w.write_maps(od_planes=last, **arrays)

            self.sink.submit(self._write(final_maps, "final maps"), key=self.result.key)
            return md

        def partial_job() -> None:
            t = time.perf_counter()
            try:
                if self.writer is not None:
                    self.writer.write_maps(**arrays)
                    self.planes.measured(sum(a.nbytes for a in arrays.values()), time.perf_counter() - t)
                    self.writer.update_metadata(**md)
                    self.partials.n_written += 1
            except Exception as exc:  # noqa: BLE001 - superseded by the final maps; recorded
                self.write_failed(PARTIAL_MAPS, exc)
            finally:
                self.partials.cost_s = compute_s + time.perf_counter() - t
                self.partials.busy = False

        self.partials.busy = True
        self.sink.submit_latest(("maps", self.result.key), partial_job)
        return None

    def stop(self, doc: dict) -> None:
        exit_status, reason = doc.get("exit_status", "success"), doc.get("reason", "")
        if not isinstance(exit_status, str):  # an array here raised after the run was closed: left running
            self.record_error(f"the stop document's exit_status {exit_status!r:.80} is not text")
        self.finalize(exit_status=exit_status[:40] if isinstance(exit_status, str) else "unknown",
                      reason=reason if isinstance(reason, str) else repr(reason))

    def finalize(self, *, exit_status: str = "success", reason: str = "") -> None:
        """Write final maps, fractions, status and timings (on stop, or when the run is given up).

        The status given here is provisional: the final write job makes it ``partial`` or
        ``failed`` when a write failed or an array does not read back from Tiled as written.
        """
        if self.closed:
            return
        self.closed = True
        n = len(self.result.energies)
        status, errors = status_at_stop(n, self.settings.num_points, exit_status, reason,
                                        incomplete=bool(self.incomplete_reason),
                                        first_error=self.result.errors[0] if self.result.errors else None)
        for error in errors:
            self.record_error(error)
        self._open_result(None if self.acc is None else self.acc.shape)
        if self._final is not None and self._final[0] == n:
            summary = self._final[1]  # final maps already written after the last expected image
        else:
            summary = self._publish(final=True) if n > 0 else {}
        status, errors = status_of_maps(status, n, summary)
        for error in errors:
            self.record_error(error)
        self.result.status = status
        timings = run_timings(n, time.time(), self.t_first_image, self.t_last_image, self.frame_seconds,
                              self.event_latency)
        t_last = self.t_last_image
        final_arrays = dict(self.result.arrays) if n else {}

        def final_job() -> None:
            final_status = status
            failed_write = False
            if self.writer is not None and n and self.config.write_od:
                try:
                    self.writer.finalize_od(n, update_metadata=False)
                except Exception as exc:  # noqa: BLE001 - counted; the status says so
                    self.write_failed("the OD cube", exc)
            digests = {}
            if self.writer is not None and final_arrays:
                t_read = time.perf_counter()
                try:  # complete only once every array reads back as written
                    digests = self.writer.read_back(final_arrays, n if self.config.write_od else None)
                except ReadBackError as error:
                    for problem in error.problems:
                        self.record_error(f"result array {problem}")
                    failed_write = True
                    final_status = "partial" if final_status == "complete" else final_status
                timings["read_back_s"] = round(time.perf_counter() - t_read, 3)
            for what, (count, _) in self.write_failures.items():
                if count > 1:
                    self.record_error(f"writing {what} to Tiled failed {count} times in all")
                if what not in _SUPERSEDED:  # superseded by the final maps, which are verified
                    failed_write = True
                    final_status = "partial" if final_status == "complete" else final_status
            if self.conflict:  # the result is another writer's (a second worker, a replayed start): none written here
                final_status = "skipped"
            elif self.writer is None and self.config.writes_tiled:
                final_status = "failed"  # the result container could not be created: nothing is in Tiled
            # last image -> final maps and OD in Tiled; status and timings follow in one update
            timings["last_image_to_result_s"] = (time.time() - t_last) if t_last else None
            timings["partial_maps"] = {"written": self.partials.n_written, "last_cost_s": self.partials.cost_s}
            md = {**summary, "status": final_status, "errors": list(self.result.errors), "n_energies_seen": n,
                  **({"array_sha256": digests} if digests else {}), **self.field_metadata()}
            if self.writer is not None and not self._write_final_metadata(md, timings):
                final_status = md["status"] = "failed"
                failed_write = True
            self.result.status = final_status
            self.result.write_failed = failed_write
            self.result.metadata.update(md, timings=timings)
            if not self.config.keep_arrays:
                self.result.arrays = {}  # they are in Tiled; the worker keeps summaries only

        self.sink.submit(final_job, key=self.result.key)
        self.sink.submit(self.result.done.set)
        self.on_finished(self)

    def _write_final_metadata(self, md: dict, timings: dict, attempts: int = 4) -> bool:
        """The final status update, tried again with backoff (a restarting Tiled) and read back: an update another
        process's took back (:meth:`ResultWriter.lost`) is written again. False if it never held."""
        for attempt in range(attempts):
            try:
                self.writer.update_metadata(**md, timings=timings)
                lost = self.writer.lost(md)
                if not lost:
                    return True
                problem = (f"another update of the result took back its {', '.join(lost)} "
                           "(Tiled rewrites a node's metadata whole)")
                logger.warning("run %s: the final status %r: %s; writing it again", self.settings.run_uid,
                               md["status"], problem)
            except Exception as exc:  # noqa: BLE001 - tried again, then recorded
                problem = f"{type(exc).__name__}: {exc}"
            if attempt == attempts - 1:
                logger.error("run %s: the final status %r could not be written to Tiled (%s); the result "
                             "there still says running and is recovered when a worker starts",
                             self.settings.run_uid, md["status"], problem)
                self.record_error(f"writing the final status to Tiled failed: {problem}")
                return False
            time.sleep(0.5 * 2**attempt)
        return False
