"""Live phase mapping: a Bluesky callback that turns each energy image into OD and PCC maps.

:class:`PhaseMapCallback` is the entry point (``RE.subscribe(cb)`` or a dispatcher). It wraps an
``event_model.RunRouter`` whose factory makes one :class:`RunAnalysis` per run that carries a
``phasestream`` block in its start document. Runs from any other plan are analysed when the
callback has :class:`~phasestream.contract.RunDefaults` (or references): their keys are inferred
from the primary descriptor (:mod:`phasestream.callbacks.inference`), and a run whose keys cannot
be inferred gets a ``skipped`` result with the reason (docs/any-plan.md). A run imaged at several
sample positions (a grid scan over energy and position) is split into one result per field,
``<root>/<run uid>.f<index>`` (:mod:`phasestream.callbacks.fields`, docs/contract.md).
Per image: OD -> ``PearsonAccumulator.update``; every ``update_every`` images or
``update_seconds`` the partial maps are handed to a background :class:`ResultSink` that
writes them to Tiled (the hot path never waits on HTTP). At stop the final maps, fractions,
status and timings are written.

A bad document never raises out of the callback: the error is recorded on the run's result
(``errors``, ``status``) and logged, and other runs go on. A start document that is refused
(docs/security.md) still gets a ``failed`` result with the reason, unless its uid cannot name
one; a start whose uid already has a result is recorded as a conflict on that result and
ignored: nothing is replaced on behalf of a document (:mod:`phasestream.callbacks.unanalysed` writes both).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from event_model import RunRouter

from phasestream.callbacks.analysis import RunAnalysis
from phasestream.callbacks.assets import AssetFolders, default_handler_registry, guarded_registry
from phasestream.callbacks.fields import FieldRuns, may_have_fields
from phasestream.callbacks.inference import KeysNotInferred, infer_block
from phasestream.callbacks.pending import PendingRun
from phasestream.callbacks.result import RunResult
from phasestream.callbacks.settings import AnalysisConfig
from phasestream.callbacks.sink import ResultSink
from phasestream.callbacks.unanalysed import UnanalysedRuns, conflict_message
from phasestream.contract import (
    DocumentBounds,
    IncompleteReason,
    InvalidIdentifierError,
    RunDefaults,
    RunSettings,
    RunSettingsError,
    check_raw_path,
    check_run_uid,
)
from phasestream.contract.fields import parse_field_key
from phasestream.kernels import (
    DEFAULT_AMBIGUITY,
    limit_kernel_threads,
    resolve_backend,
)
from phasestream.references import ReferenceSet, load_document_references, load_references
from phasestream.store.results import ResultExistsError, ResultWriter
from phasestream.store.tiled import raw_run_link

__all__ = ["DEFAULT_MAX_OPEN_RUNS", "PhaseMapCallback"]

logger = logging.getLogger(__name__)

#: runs analysed at once (``serve --max-open-runs``): each holds its accumulators, a RunEngine runs one at a time
DEFAULT_MAX_OPEN_RUNS = 8

def _keys_note(settings: RunSettings) -> dict:
    """``keys``: the keys a run without a ``phasestream`` block was analysed with, and how each was chosen."""
    if not settings.keys_from:
        return {}
    return {"keys": {"image_key": settings.image_key, "energy_key": settings.energy_key,
                     "i0_key": settings.i0_key, "mode": settings.mode, "from": dict(settings.keys_from)}}


class PhaseMapCallback:
    """Live phase maps for every run that asks for them, written to Tiled as the scan goes.

    Parameters
    ----------
    tiled_client : a writable Tiled client (the root of the catalog); results go to
        ``<root>/<run uid>``. ``None`` keeps results in memory only (``results``).
    references : reference spectra for every run (path, registered name or ReferenceSet);
        default: each run's ``phasestream.references``. With explicit references, runs without a
        ``phasestream`` block are analysed too (as with ``defaults=RunDefaults(references)``)
    defaults : how runs without a ``phasestream`` block are analysed (references, keys, mode; a key
        left None is inferred from the run when unambiguous, else the run is ``skipped``). None
        (and no ``references``): such runs are not this callback's
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
    handler_registry : Resource/Datum handlers (default: NPY_SEQ), each used for resources inside ``asset_folders``
    asset_folders : folders whose files Resource and StreamResource documents may name (external images);
        none (default): no file a document names is read, and such images are errors of their run
    on_run_complete : called with the :class:`RunResult` after a run's final result is written
    reference_folders : folders whose files a start document may name as references (besides
        registered names); none: registered names only
    bounds : what a start document may ask for (``num_points``, image size, metadata size)
    replace : replace an existing result of a run (``phasestream reprocess``, a user's explicit
        command); False (the live worker): a start whose uid has a result is a conflict, recorded
        on that result and otherwise ignored
    keep_arrays : keep each run's final arrays in :attr:`results` (default: only without a Tiled
        client, where they are the only copy); with Tiled the worker keeps summaries only
    max_results : runs remembered in :attr:`results` (oldest dropped first)
    max_open_runs : runs analysed or waiting for their primary descriptor at once; the start of one more is
        refused (a ``failed`` result with the reason; its raw run stays for ``phasestream reprocess``)
    raw : Tiled path of the container where the raw runs are (TiledWriter's; ``""`` the catalog root,
        ``bl/raw``): each result links to its raw run there (``raw`` metadata)
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
        asset_folders: Sequence[str | Path] = (),
        write_od: bool = True,
        od_store: str | Path | None = None,
        kernel_threads: int | None = 1,
        on_run_complete: Callable[[RunResult], None] | None = None,
        reference_folders: Sequence[str | Path] = (),
        bounds: DocumentBounds | None = None,
        replace: bool = False,
        keep_arrays: bool | None = None,
        max_results: int = 1000,
        max_open_runs: int = DEFAULT_MAX_OPEN_RUNS,
        defaults: RunDefaults | None = None,
        raw: str = "",
    ):
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.client = tiled_client
        self.root = root
        self.raw = check_raw_path(raw)
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
        if defaults is None and self.references is not None:
            defaults = RunDefaults(self.references.name)
        self.defaults = defaults
        #: references of runs without a block: the override, else the defaults' (a trusted option)
        self.default_references = self.references or (
            None if defaults is None else load_references(defaults.references))
        self.pending: dict[str, PendingRun] = {}  # runs without a block, before their primary descriptor
        self.on_run_complete = on_run_complete
        self.write_od = bool(write_od)
        self.od_store = None if od_store is None else Path(od_store)
        self.kernel_threads = kernel_threads
        self._threads_limited: set[int] = set()  # ids of the threads whose kernel threads are set
        self._reference_cache: dict[str, ReferenceSet] = {}
        self.reference_folders = tuple(Path(f) for f in reference_folders)
        self.bounds = bounds or DocumentBounds()
        self.replace = bool(replace)
        self.keep_arrays = tiled_client is None if keep_arrays is None else bool(keep_arrays)
        self.max_results = int(max_results)
        if int(max_open_runs) < 1:
            raise ValueError(f"max_open_runs must be >= 1, got {max_open_runs}")
        self.max_open_runs = int(max_open_runs)
        self.results: OrderedDict[str, RunResult] = OrderedDict()
        self.active: dict[str, RunAnalysis] = {}
        self._unknown_seen: dict = {}  # runs/descriptors whose documents arrived unannounced (logged once)
        self.sink = ResultSink(on_error=self._write_failed)
        self.unanalysed = UnanalysedRuns(self.client, self.root, self.sink, replace=self.replace, bounds=self.bounds,
                                         origin=self._origin)
        self.assets = AssetFolders(asset_folders)
        registry = (default_handler_registry(self.assets) if handler_registry is None
                    else guarded_registry(handler_registry, self.assets))
        self.router = RunRouter([self._factory], handler_registry=registry)
        self._lock = threading.RLock()

    def analysis_config(self) -> AnalysisConfig:
        """This callback's options as the plain values each run's analysis takes."""
        return AnalysisConfig(backend=self.backend, ambiguity=self.ambiguity, mask_threshold=self.mask_threshold,
                              update_every=self.update_every, update_seconds=self.update_seconds,
                              min_update_seconds=self.min_update_seconds, partial_budget=self.partial_budget,
                              write_od=self.write_od, keep_arrays=self.keep_arrays,
                              writes_tiled=self.client is not None, bounds=self.bounds, assets=self.assets)

    # -- Tiled -----------------------------------------------------------------------------

    def writer_factory(self, analysis: RunAnalysis, shape: tuple[int, int] | None):
        """Create the run's result container (on the sink thread). None without a Tiled client."""
        if self.client is None:
            return None
        try:
            writer = ResultWriter(
                self.client,
                analysis.settings.run_uid,
                key=analysis.result.key,
                root=self.root,
                shape=shape,
                phases=list(analysis.references.phases),
                # without OD writing (or without an image) no `od` array is created (it would read as zeros)
                n_energies=analysis.settings.num_points if self.write_od and shape is not None else None,
                metadata={**analysis.base_metadata(), **_keys_note(analysis.settings),
                          **self._origin(analysis.settings.run_uid, analysis.settings.origin)},
                replace=self.replace,
                od_store=self.od_store,
            )
        except ResultExistsError:
            # created meanwhile (another worker, a replayed start): never replaced; noted there and on this run
            analysis.conflict = True
            self._record_conflict(analysis.result.key, losing=analysis)
            return None
        if writer.replaced is not None:  # what went with the earlier result (``reprocess --replace``), for the caller
            analysis.result.metadata["replaced"] = writer.replaced
        return writer

    def _origin(self, uid: str, origin: dict) -> dict:
        """Where a result comes from: the start document's ``time`` and ``plan_name``, and ``raw``, the raw
        run's Tiled path and URI (without the API key)."""
        return {**origin, "raw": raw_run_link(self.client, uid, self.raw)}

    def _write_failed(self, key, exc: BaseException) -> None:
        analysis = self._analysis_writing(key) if isinstance(key, str) else None
        if analysis is not None:
            analysis.record_error(f"writing results to Tiled failed: {exc}")

    # -- routing -----------------------------------------------------------------------------

    def _load_references(self, name: str) -> ReferenceSet:
        if name not in self._reference_cache:
            if len(self._reference_cache) >= 64:
                self._reference_cache.pop(next(iter(self._reference_cache)))
            self._reference_cache[name] = load_document_references(name, folders=self.reference_folders)
        return self._reference_cache[name]

    def _analysis_writing(self, key: str) -> RunAnalysis | None:
        """The open analysis writing result ``key`` (a run uid, or one field's key)."""
        run = self.active.get((parse_field_key(key) or (key,))[0])
        return run.by_key(key) if isinstance(run, FieldRuns) else run

    def _remember(self, result: RunResult, previous: str | None = None) -> None:
        """Keep ``result`` in :attr:`results` under its key (no longer under ``previous``: a run that turned
        out to have several fields), forgetting the oldest past ``max_results``."""
        with self._lock:
            if previous is not None and self.results.get(previous) is result:
                del self.results[previous]
            self.results[result.key] = result
            self.results.move_to_end(result.key)
            while len(self.results) > self.max_results:
                self.results.popitem(last=False)

    def _factory(self, name: str, start: dict):
        blockless = "phasestream" not in start
        if blockless and self.defaults is None:
            return [], []
        try:
            uid = check_run_uid(start.get("uid"))
        except InvalidIdentifierError as exc:
            logger.error("start document refused; nothing written: %s", exc)
            return [], []
        if uid in self.active or uid in self.pending or (not self.replace and self._result_exists(uid)):
            self._record_conflict(uid)
            return [], []
        with self._lock:
            open_runs = len(self.active) + len(self.pending)
        if open_runs >= self.max_open_runs:
            self._not_analysed(uid, start, "failed", f"not analysed: {open_runs} runs are open in this worker, at "
                                                     f"most {self.max_open_runs} (serve --max-open-runs); the raw run "
                                                     f"stays: phasestream reprocess {uid} analyses it")
            return [], []
        if blockless:  # keys from the primary descriptor, when it comes
            pending = PendingRun(start, resolve=self._resolve, give_up=lambda reason: self._give_up(uid, start, reason))
            with self._lock:
                self.pending[uid] = pending
            return [pending], []
        analysis = self._start_analysis(uid, start)
        return ([analysis] if analysis is not None else []), []

    def _resolve(self, start: dict, descriptor: dict) -> RunAnalysis | None:
        """A run without a block: its keys from the options and the primary descriptor, or ``skipped``."""
        uid = start["uid"]
        with self._lock:
            self.pending.pop(uid, None)
        try:
            block, keys_from = infer_block(start, descriptor, self.defaults)
        except KeysNotInferred as exc:
            self._not_analysed(uid, start, "skipped", f"not analysed (no phasestream block): {exc}")
            return None
        return self._start_analysis(uid, start, block=block, keys_from=keys_from)

    def _give_up(self, uid: str, start: dict, reason: str) -> None:
        with self._lock:
            self.pending.pop(uid, None)
        self._not_analysed(uid, start, "skipped", f"not analysed (no phasestream block): {reason}")

    def _start_analysis(self, uid: str, start: dict, *, block: dict | None = None,
                        keys_from: dict | None = None) -> RunAnalysis | None:
        """The run's analysis from its start document (``block``: the one built for a run without one)."""
        try:
            settings = RunSettings.from_start(
                start, references=None if self.references is None else self.references.name, bounds=self.bounds,
                block=block, keys_from=keys_from,
            )
            refs = self.default_references if block is not None else (
                self.references or self._load_references(settings.references))
        except (RunSettingsError, OSError, ValueError) as exc:
            self._reject(uid, start, exc)
            return None

        def analysis_of(settings: RunSettings) -> RunAnalysis:
            return RunAnalysis(self.analysis_config(), settings, refs, sink=self.sink, open_writer=self.writer_factory,
                               on_finished=self._finished)

        # a grid over energy and position: one analysis per field, as the fields appear
        analysis = FieldRuns(start, settings, analysis_of, on_field=self._remember) if may_have_fields(start) \
            else analysis_of(settings)
        with self._lock:
            self.active[settings.run_uid] = analysis
        self._remember(analysis.result)
        return analysis

    def _result_exists(self, uid: str) -> bool:
        """A result of ``uid`` is known here or in Tiled."""
        return uid in self.results or f"{uid}.f0" in self.results or self.unanalysed.in_tiled(uid)

    def _record_conflict(self, uid: str, losing: RunAnalysis | None = None) -> None:
        """A start document for a uid that already has a result: recorded there, never replacing it; ``losing``,
        an analysis of this worker whose result another writer created first, notes it too."""
        message = conflict_message()
        logger.error("run %s: %s", uid, message)
        analysis = losing or self.active.get(uid) or self._analysis_writing(uid)
        if analysis is not None:
            analysis.record_error(message)
        if analysis is None or losing is not None:  # the result in Tiled is not this worker's analysis's
            self.unanalysed.note_conflict(uid, message)

    def _reject(self, uid: str, start: dict, exc: BaseException) -> None:
        """A refused start document: a ``failed`` result with the reason (the raw run stays in Tiled)."""
        self._not_analysed(uid, start, "failed", f"start document refused: {exc}")

    def _not_analysed(self, uid: str, start: dict, status: str, reason: str) -> None:
        """A run that is not analysed: a ``failed`` (refused) or ``skipped`` (keys not inferred) result
        with the reason, at ``<root>/<uid>`` (``uid`` already checked); the raw run stays in Tiled."""
        logger.error("run %s: %s", uid, reason)
        result = self.unanalysed.result(uid, status, reason)
        self._remember(result)
        self.unanalysed.record(result, start)

    def __call__(self, name: str, doc: dict) -> None:
        if self.backend == "numba" and threading.get_ident() not in self._threads_limited:
            limit_kernel_threads(self.kernel_threads)
            self._threads_limited.add(threading.get_ident())
        if name == "start" and isinstance(doc, dict) and (doc.get("uid") in self.active
                                                          or doc.get("uid") in self.pending):
            self._record_conflict(doc["uid"])  # the open run goes on; the second start is ignored
            return
        try:
            self.router(name, doc)
        except Exception as exc:  # noqa: BLE001 - a bad document never kills the stream
            run = self._run_of(name, doc)
            if run is not None:
                run.record_error(f"{name} document rejected: {exc}")
            elif isinstance(exc, KeyError):  # RunRouter: a run or descriptor it never saw (start lost)
                self._unknown(name, doc)
            else:
                logger.error("%s document rejected: %s", name, exc)

    def _unknown(self, name: str, doc: dict) -> None:
        """A document of a run or descriptor never seen here: logged once per run/descriptor, then skipped."""
        ref = doc.get("run_start") or doc.get("descriptor") or doc.get("uid") if isinstance(doc, dict) else None
        if ref in self._unknown_seen:
            return
        self._unknown_seen[ref] = None
        if len(self._unknown_seen) > 1000:
            self._unknown_seen.pop(next(iter(self._unknown_seen)))
        logger.error("%s document refers to %s, which is not known here (its start or descriptor document was "
                     "lost or has not arrived): skipped; later documents that cannot be routed either are skipped "
                     "without another line", name, f"{ref!r:.80}")

    def _run_of(self, name: str, doc: dict) -> RunAnalysis | None:
        uid = doc.get("run_start") or (doc.get("uid") if name == "start" else None)
        if uid or not isinstance(doc.get("descriptor"), str):
            return self.active.get(uid) if uid else None
        # an event (page): the run of its descriptor, e.g. when filling its external image failed
        return next((run for run in self.active.values() if doc["descriptor"] in run.streams), None)

    def abort_active(self, reason: str) -> None:
        """Finalize every run still open as ``partial`` with ``reason`` (the worker is stopping); a run
        still waiting for its primary descriptor is ``skipped`` with it."""
        for pending in list(self.pending.values()):
            pending.close(f"{reason} before the primary stream's descriptor arrived")
        for analysis in list(self.active.values()):
            analysis.incomplete_reason = reason
            analysis.record_error(reason)
            analysis.finalize(exit_status="incomplete", reason=reason)

    def _finished(self, analysis: RunAnalysis) -> None:
        with self._lock:
            if getattr(self.active.get(analysis.settings.run_uid), "closed", True):  # every field of it finished
                self.active.pop(analysis.settings.run_uid, None)
        if self.on_run_complete is not None:
            result = analysis.result
            self.sink.submit(lambda: self.on_run_complete(result))

    # -- lost documents --------------------------------------------------------------------

    def run_incomplete(self, run_uid: str, reason: str, *,
                       kind: IncompleteReason = IncompleteReason.MESSAGE_GAP) -> None:
        """Documents of ``run_uid`` were lost: record why. A final ``kind`` (no stop within the
        timeout): none will come any more, so the run is finalized now as ``partial``; otherwise its
        stop does it."""
        analysis = self.active.get(run_uid)
        if analysis is None:
            if kind.final and run_uid in self.pending:
                self.pending[run_uid].close(f"documents lost ({reason}) before the primary stream's descriptor")
            return
        analysis.incomplete_reason = reason
        analysis.record_error(f"documents lost: {reason}")
        if kind.final:
            analysis.finalize(exit_status="incomplete", reason=reason)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every queued result write has happened."""
        return self.sink.flush(timeout)

    def close(self) -> None:
        """Finish writing and stop the writer thread."""
        self.sink.close()
