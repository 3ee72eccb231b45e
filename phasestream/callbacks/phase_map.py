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
from collections.abc import Callable
from pathlib import Path

from event_model import RunRouter

from phasestream.callbacks.analysis import RunAnalysis, RunResult
from phasestream.callbacks.assets import default_handler_registry
from phasestream.callbacks.settings import RunSettings, RunSettingsError
from phasestream.callbacks.sink import ResultSink
from phasestream.kernels import (
    DEFAULT_AMBIGUITY,
    limit_kernel_threads,
    resolve_backend,
)
from phasestream.references import ReferenceSet, load_references

__all__ = ["PhaseMapCallback"]

logger = logging.getLogger(__name__)

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
    partial_budget : fraction of the time partial maps may take: after each one, the next waits
        at least its measured cost (compute + write) divided by this, and none is computed while
        the previous one is still being written (large frames get fewer partial maps, so the
        images keep their pace). None: partial maps strictly every ``update_every`` images /
        ``update_seconds``, whatever they cost
    backend : kernel backend (``auto``, ``numba``, ``cupy``, ``numpy``)
    ambiguity : reliability below which a pixel is ambiguous
    mask_threshold : mean-OD threshold of the particle mask (None: Otsu)
    write_od : write the OD cube ``od`` (E, Y, X) plane by plane (default). Off for very high
        frame rates: the maps are still written, and ``phasestream reprocess`` can add ``od``
        from the raw run later
    od_store : write the OD cube as external zarr data in this directory instead of uploading it
        (``ResultWriter`` ``od_store``; the Tiled server must be able to read it): planes cost a
        file write instead of an HTTP upload, which keeps the live OD cube at 2048^2 and 20 frames/s
    kernel_threads : numba threads of the kernels run on the document thread (default 1: the
        live worker shares its cores with the proxy, the publisher and Tiled, and a parallel
        kernel would wait for descheduled threads); None: numba's default (every core)
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
        partial_budget: float | None = 0.125,
        backend: str | None = "auto",
        ambiguity: float = DEFAULT_AMBIGUITY,
        mask_threshold: float | None = None,
        handler_registry: dict | None = None,
        write_od: bool = True,
        od_store: str | Path | None = None,
        kernel_threads: int | None = 1,
        on_run_complete: Callable[[RunResult], None] | None = None,
    ):
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.client = tiled_client
        self.root = root
        self.update_every = int(update_every)
        self.update_seconds = float(update_seconds)
        self.min_update_seconds = float(min_update_seconds)
        if partial_budget is not None and not 0 < partial_budget <= 1:
            raise ValueError(f"partial_budget must be in (0, 1] or None, got {partial_budget}")
        self.partial_budget = None if partial_budget is None else float(partial_budget)
        self.backend = resolve_backend(backend)
        self.ambiguity = float(ambiguity)
        self.mask_threshold = mask_threshold
        self.references = None if references is None else load_references(references)
        self.on_run_complete = on_run_complete
        self.write_od = bool(write_od)
        self.od_store = None if od_store is None else Path(od_store)
        self.kernel_threads = kernel_threads
        self._threads_limited: set[int] = set()  # ids of the threads whose kernel threads are set
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
        from phasestream.services.results import ResultWriter

        return ResultWriter(
            self.client,
            analysis.settings.run_uid,
            root=self.root,
            shape=shape,
            phases=list(analysis.references.phases),
            # without OD writing no `od` array is created (it would read as zeros)
            n_energies=analysis.settings.num_points if self.write_od else None,
            metadata=analysis._base_metadata(),
            replace=True,
            od_store=self.od_store,
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
        if self.backend == "numba" and threading.get_ident() not in self._threads_limited:
            limit_kernel_threads(self.kernel_threads)
            self._threads_limited.add(threading.get_ident())
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
