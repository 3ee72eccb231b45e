"""Live phase mapping: a Bluesky callback that turns each energy image into OD and PCC maps.

:class:`PhaseMapCallback` is the entry point (``RE.subscribe(cb)`` or a dispatcher). It wraps an
``event_model.RunRouter`` whose factory makes one :class:`RunAnalysis` per run that carries a
``phasestream`` block in its start document (or every run, when references are given to the
callback). Per image: OD -> ``PearsonAccumulator.update``; every ``update_every`` images or
``update_seconds`` the partial maps are handed to a background :class:`ResultSink` that
writes them to Tiled (the hot path never waits on HTTP). At stop the final maps, fractions,
status and timings are written.

A bad document never raises out of the callback: the error is recorded on the run's result
(``errors``, ``status``) and logged, and other runs go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from event_model import DocumentRouter, RunRouter

from phasestream.callbacks.assets import default_handler_registry, read_stream_frames
from phasestream.callbacks.settings import RunSettings, RunSettingsError
from phasestream.callbacks.sink import ResultSink
from phasestream.kernels import (
    DEFAULT_AMBIGUITY,
    PearsonAccumulator,
    assign_phases,
    optical_density,
    particle_mask,
    phase_fractions,
    resolve_backend,
    to_numpy,
)
from phasestream.references import ReferenceSet, load_references

__all__ = ["PhaseMapCallback", "RunAnalysis", "RunResult"]

logger = logging.getLogger(__name__)

# energies closer than this (eV) are the same energy (duplicate images)
ENERGY_TOLERANCE_EV = 1e-3
MAX_ERRORS = 50


class RunResult:
    """The in-memory outcome of one analysed run (what was written to Tiled, for callers and tests)."""

    def __init__(self, settings: RunSettings):
        self.settings = settings
        self.status = "running"
        self.errors: list[str] = []
        self.energies: list[float] = []
        self.metadata: dict = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.done = threading.Event()

    @property
    def uid(self) -> str:
        return self.settings.run_uid


class RunAnalysis(DocumentRouter):
    """Per-run state: accumulator, dark/flat frames, asset documents, timings.

    Made by :class:`PhaseMapCallback` for each handled run; not meant to be built by hand.
    """

    def __init__(self, owner: PhaseMapCallback, settings: RunSettings, references: ReferenceSet):
        super().__init__()
        self.owner = owner
        self.settings = settings
        self.references = references
        self.result = RunResult(settings)
        self.streams: dict[str, str] = {}  # descriptor uid -> stream name
        self.acc: PearsonAccumulator | None = None
        self.darks: list[np.ndarray] = []
        self.flats: list[tuple[float, np.ndarray]] = []
        self.stream_resources: dict[str, dict] = {}
        self.stream_frames: dict[tuple[str, int], np.ndarray] = {}
        self.since_update = 0
        self.last_update = time.monotonic()
        self.t_start = time.time()
        self.t_first_image: float | None = None
        self.t_last_image: float | None = None
        self.frame_seconds: list[float] = []
        self.event_latency: list[float] = []  # event time -> image analysed (transport included)
        self.writer = None
        self.incomplete_reason: str | None = None
        self.closed = False
        self.opened = False

    # -- bookkeeping ---------------------------------------------------------------------

    def record_error(self, message: str) -> None:
        logger.warning("run %s: %s", self.settings.run_uid, message)
        if len(self.result.errors) < MAX_ERRORS:
            self.result.errors.append(message)
        elif len(self.result.errors) == MAX_ERRORS:
            self.result.errors.append("too many errors; further errors are only logged")

    def _base_metadata(self) -> dict:
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
        }

    # -- writer jobs (run on the sink thread) ---------------------------------------------

    def _open_result(self, shape: tuple[int, int] | None) -> None:
        """Queue the creation of the result container (once; arrays are sized by ``shape``)."""
        if self.opened:
            return
        self.opened = True

        def job() -> None:
            self.writer = self.owner.writer_factory(self, shape)

        self.owner.sink.submit(job, key=self.settings.run_uid)

    def _write(self, fn: Callable[[Any], None]) -> Callable[[], None]:
        def job() -> None:
            if self.writer is not None:
                fn(self.writer)

        return job

    # -- documents -----------------------------------------------------------------------

    def descriptor(self, doc: dict) -> None:
        name = doc.get("name", "primary")
        self.streams[doc["uid"]] = name
        if name == "primary":
            keys = doc.get("data_keys", {})
            for key in (self.settings.image_key, self.settings.energy_key):
                if key not in keys:
                    self.record_error(f"primary stream has no data key {key!r} (has {sorted(keys)})")

    def stream_resource(self, doc: dict) -> None:
        self.stream_resources[doc["uid"]] = doc

    def stream_datum(self, doc: dict) -> None:
        try:
            resource = self.stream_resources[doc["stream_resource"]]
            frames = read_stream_frames(resource, doc)
            if resource.get("data_key") not in (None, self.settings.image_key):
                return
            first = doc["seq_nums"]["start"]
            for i, frame in enumerate(frames):
                self.stream_frames[(doc["descriptor"], first + i)] = np.asarray(frame)
        except Exception as exc:  # noqa: BLE001 - recorded on the run
            self.record_error(f"cannot read frames of StreamDatum {doc.get('uid')}: {exc}")

    def event_page(self, doc: dict) -> None:
        # RunRouter delivers pages; handle them one event at a time
        from event_model import unpack_event_page

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
                self.darks.append(self._image(doc).astype(np.float64))
            elif stream == "flat":
                self.flats.append((float(doc["data"][self.settings.energy_key]), self._image(doc)))
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
                    raise KeyError(f"no image under data key {key!r} (event has {sorted(data)})")
                raise ValueError(f"image {key!r} is an unfilled external reference ({value!r})")
            return frame
        image = np.asarray(value)
        if image.ndim != 2:
            raise ValueError(f"image {key!r} must be 2D (Y, X), got shape {image.shape}")
        return image

    def _od(self, image: np.ndarray, energy: float, data: dict):
        s = self.settings
        backend = self.owner.backend
        if s.mode == "txm":
            if not self.flats:
                raise ValueError("TXM image before any flat-field image (stream 'flat')")
            flat = min(self.flats, key=lambda f: abs(f[0] - energy))
            dark = np.mean(self.darks, axis=0) if self.darks else 0.0
            return optical_density(image, flat=flat[1], dark=dark, backend=backend)
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
            raise KeyError(f"no energy under data key {s.energy_key!r} (event has {sorted(data)})")
        energy = float(data[s.energy_key])
        if any(abs(energy - e) <= ENERGY_TOLERANCE_EV for e in self.result.energies):
            raise ValueError(f"duplicate energy {energy:.3f} eV; image ignored")
        ref_values = self.references.interpolate(energy)[:, 0]  # EnergyOutOfRangeError names the range
        image = self._image(doc)
        t0 = time.perf_counter()
        if self.acc is None:
            self.acc = PearsonAccumulator(image.shape, len(self.references.phases), backend=self.owner.backend)
            self._open_result(image.shape)
        elif image.shape != self.acc.shape:
            raise ValueError(f"image shape changed from {self.acc.shape} to {image.shape}; image ignored")
        od, valid = self._od(image, energy, data)
        self.acc.update(od, ref_values, valid)
        od_host = to_numpy(od)
        index = len(self.result.energies)
        self.result.energies.append(energy)
        self.frame_seconds.append(time.perf_counter() - t0)
        now = time.time()
        self.t_first_image = self.t_first_image or now
        self.t_last_image = now
        if "time" in doc:
            self.event_latency.append(now - float(doc["time"]))
        if self.owner.write_od:
            self.owner.sink.submit(self._write(lambda w: w.write_od(index, od_host)), key=s.run_uid)
        self.since_update += 1
        elapsed = time.monotonic() - self.last_update
        due = (self.since_update >= self.owner.update_every or elapsed >= self.owner.update_seconds) and (
            elapsed >= self.owner.min_update_seconds
        )
        n = len(self.result.energies)
        # no partial maps when the final ones are due within half an update interval: a write
        # started now would only delay the final result
        ending = s.num_points is not None and s.num_points - n < max(1, self.owner.update_every // 2)
        if due and n >= 2 and not ending:
            self._publish(final=False)

    # -- results ---------------------------------------------------------------------------

    def _maps(self) -> dict[str, np.ndarray]:
        pcc = self.acc.maps()
        mask = particle_mask(self.acc.mean(), threshold=self.owner.mask_threshold)
        phase, reliability, ambiguous = assign_phases(pcc, mask, self.owner.ambiguity, backend=self.owner.backend)
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
            "phase_fractions": fr.as_dict(self.references.phases) if fr.n_particle else {},
            "ambiguous_fraction": float(fr.ambiguous) if fr.n_particle else None,
            "mean_reliability": float(rel.mean()) if rel.size else None,
            "particle_pixels": int(fr.n_particle),
        }

    def _publish(self, *, final: bool) -> dict | None:
        arrays = self._maps()
        md = self._summary(arrays)
        md["status"] = "running"
        md["errors"] = list(self.result.errors)
        self.since_update = 0
        self.last_update = time.monotonic()
        self.result.arrays, self.result.metadata = arrays, {**self.result.metadata, **md}

        def job(w) -> None:
            w.write_maps(**arrays)
            w.update_metadata(**md)

        if final:
            # superseded partial maps are dropped; the summary goes with the final status update
            self.owner.sink.cancel_latest(("maps", self.settings.run_uid))
            self.owner.sink.submit(self._write(lambda w: w.write_maps(**arrays)), key=self.settings.run_uid)
            return md
        else:
            self.owner.sink.submit_latest(("maps", self.settings.run_uid), self._write(job))

    def stop(self, doc: dict) -> None:
        self.finalize(exit_status=doc.get("exit_status", "success"), reason=doc.get("reason", ""))

    def finalize(self, *, exit_status: str = "success", reason: str = "") -> None:
        """Write final maps, fractions, status and timings (on stop, or when the run is given up)."""
        if self.closed:
            return
        self.closed = True
        s = self.settings
        n = len(self.result.energies)
        expected = s.num_points
        if n == 0:
            status = "failed"
            self.record_error("no usable image in the run")
        elif self.incomplete_reason or exit_status != "success" or (expected and n < expected) or n < 2:
            status = "partial"
            if expected and n < expected:
                self.record_error(f"{n} of {expected} energies analysed")
            if exit_status != "success":
                self.record_error(f"run ended with exit_status {exit_status!r} {reason}".strip())
        else:
            status = "complete"
        self._open_result(None if self.acc is None else self.acc.shape)
        summary = self._publish(final=True) if n > 0 else {}
        t_stop = time.time()
        timings = {
            "first_image_to_stop_s": (t_stop - self.t_first_image) if self.t_first_image else None,
            "median_frame_ms": 1e3 * float(np.median(self.frame_seconds)) if n else None,
            "images_per_s": (n - 1) / (self.t_last_image - self.t_first_image)
            if n > 1 and self.t_last_image > self.t_first_image else None,
            "event_latency_ms": {"median": 1e3 * float(np.median(self.event_latency)),
                                 "p95": 1e3 * float(np.percentile(self.event_latency, 95))}
            if self.event_latency else None,
        }
        md = {**summary, "status": status, "errors": list(self.result.errors), "n_energies_seen": n}
        self.result.status = status
        t_last = self.t_last_image

        def final_job() -> None:
            if self.writer is not None and n and self.owner.write_od:
                self.writer.finalize_od(n, update_metadata=False)
            # last image -> final maps and OD in Tiled; status and timings follow in one update
            timings["last_image_to_result_s"] = (time.time() - t_last) if t_last else None
            if self.writer is not None:
                self.writer.update_metadata(**md, timings=timings)
            self.result.metadata.update(md, timings=timings)

        self.owner.sink.submit(final_job, key=s.run_uid)
        self.owner.sink.submit(self.result.done.set)
        self.owner._finished(self)


class PhaseMapCallback:
    """Live phase maps for every run that asks for them, written to Tiled as the scan goes.

    Parameters
    ----------
    tiled_client : a writable Tiled client (the root of the catalog); results go to
        ``<root>/<run uid>``. ``None`` keeps results in memory only (``results``).
    references : reference spectra for every run (path, registered name or ReferenceSet);
        default: each run's ``phasestream.references``. With explicit references, runs without a
        ``phasestream`` block are handled when they still name ``image_key``/``energy_key``.
    root : container name of the results
    update_every, update_seconds : write partial maps every this many images or seconds
    min_update_seconds : never compute partial maps more often than this (a fast stream
        spends its time on images, not on maps nobody can look at that fast)
    backend : kernel backend (``auto``, ``numba``, ``cupy``, ``numpy``)
    ambiguity : reliability below which a pixel is ambiguous
    mask_threshold : mean-OD threshold of the particle mask (None: Otsu)
    write_od : write the OD cube ``od`` (E, Y, X) plane by plane (default). Off for very high
        frame rates: the maps are still written, and ``phasestream reprocess`` can add ``od``
        from the raw run later
    handler_registry : Resource/Datum handlers (default: NPY_SEQ)
    on_run_complete : called with the :class:`RunResult` after a run's final result is written
    """

    def __init__(
        self,
        tiled_client=None,
        *,
        references: str | ReferenceSet | None = None,
        root: str = "phasestream",
        update_every: int = 4,
        update_seconds: float = 2.0,
        min_update_seconds: float = 0.5,
        backend: str | None = "auto",
        ambiguity: float = DEFAULT_AMBIGUITY,
        mask_threshold: float | None = None,
        handler_registry: dict | None = None,
        write_od: bool = True,
        on_run_complete: Callable[[RunResult], None] | None = None,
    ):
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.client = tiled_client
        self.root = root
        self.update_every = int(update_every)
        self.update_seconds = float(update_seconds)
        self.min_update_seconds = float(min_update_seconds)
        self.backend = resolve_backend(backend)
        self.ambiguity = float(ambiguity)
        self.mask_threshold = mask_threshold
        self.references = None if references is None else load_references(references)
        self.on_run_complete = on_run_complete
        self.write_od = bool(write_od)
        self._reference_cache: dict[str, ReferenceSet] = {}
        self.results: dict[str, RunResult] = {}
        self.active: dict[str, RunAnalysis] = {}
        self.sink = ResultSink(on_error=self._write_failed)
        registry = default_handler_registry() if handler_registry is None else handler_registry
        self.router = RunRouter([self._factory], handler_registry=registry)
        self._lock = threading.RLock()

    # -- Tiled -----------------------------------------------------------------------------

    def writer_factory(self, analysis: RunAnalysis, shape: tuple[int, int] | None):
        """Create the run's result container (on the sink thread). None without a Tiled client."""
        if self.client is None:
            return None
        from phasestream.services.tiled import ResultWriter

        return ResultWriter(
            self.client,
            analysis.settings.run_uid,
            root=self.root,
            shape=shape,
            phases=list(analysis.references.phases),
            n_energies=analysis.settings.num_points,
            metadata=analysis._base_metadata(),
            replace=True,
        )

    def _write_failed(self, key, exc: BaseException) -> None:
        analysis = self.active.get(key) if isinstance(key, str) else None
        if analysis is not None:
            analysis.record_error(f"writing results to Tiled failed: {exc}")

    # -- routing -----------------------------------------------------------------------------

    def _load_references(self, name: str) -> ReferenceSet:
        if name not in self._reference_cache:
            self._reference_cache[name] = load_references(name)
        return self._reference_cache[name]

    def _factory(self, name: str, start: dict):
        if "phasestream" not in start and self.references is None:
            return [], []
        try:
            settings = RunSettings.from_start(
                start, references=None if self.references is None else self.references.name
            )
            refs = self.references or self._load_references(settings.references)
        except (RunSettingsError, FileNotFoundError, ValueError) as exc:
            logger.error("run %s not analysed: %s", start.get("uid"), exc)
            failed = RunResult(RunSettings(start.get("uid", "?"), start.get("scan_id"), "", "", ""))
            failed.status, failed.errors = "failed", [str(exc)]
            failed.done.set()
            self.results[failed.uid] = failed
            return [], []
        analysis = RunAnalysis(self, settings, refs)
        with self._lock:
            self.active[settings.run_uid] = analysis
            self.results[settings.run_uid] = analysis.result
        return [analysis], []

    def __call__(self, name: str, doc: dict) -> None:
        try:
            self.router(name, doc)
        except Exception as exc:  # noqa: BLE001 - a bad document never kills the stream
            run = self._run_of(name, doc)
            if run is not None:
                run.record_error(f"{name} document rejected: {exc}")
            else:
                logger.error("%s document rejected: %s", name, exc)

    def _run_of(self, name: str, doc: dict) -> RunAnalysis | None:
        uid = doc.get("run_start") or (doc.get("uid") if name == "start" else None)
        return self.active.get(uid) if uid else None

    def _finished(self, analysis: RunAnalysis) -> None:
        with self._lock:
            self.active.pop(analysis.settings.run_uid, None)
        if self.on_run_complete is not None:
            result = analysis.result
            self.sink.submit(lambda: self.on_run_complete(result))

    # -- lost documents --------------------------------------------------------------------

    def run_incomplete(self, run_uid: str, reason: str) -> None:
        """Documents of ``run_uid`` were lost: record why; finalize it as ``partial`` if it is still open."""
        analysis = self.active.get(run_uid)
        if analysis is None:
            return
        analysis.incomplete_reason = reason
        analysis.record_error(f"documents lost: {reason}")
        if "stop" in reason.lower() or "timeout" in reason.lower():
            analysis.finalize(exit_status="incomplete", reason=reason)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every queued result write has happened."""
        return self.sink.flush(timeout)

    def close(self) -> None:
        """Finish writing and stop the writer thread."""
        self.sink.close()


def analyse_documents(docs, tiled_client=None, **kwargs) -> dict[str, RunResult]:
    """Run a finished document stream through a fresh :class:`PhaseMapCallback` (reprocessing)."""
    cb = PhaseMapCallback(tiled_client, **kwargs)
    try:
        for name, doc in docs:
            cb(name, doc)
        cb.flush()
    finally:
        cb.close()
    return cb.results

