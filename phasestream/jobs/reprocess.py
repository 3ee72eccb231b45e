"""Post-scan (re)analysis of raw runs already in Tiled.

A raw run written by TiledWriter is read back the way users read it (``BlueskyRun``:
``run["primary"]["det_img"]``), turned back into the document stream it came from
(:mod:`phasestream.jobs.raw_documents`: start, one descriptor per stream with its original uid and data
keys, events merged across streams in time order, stop; table rows paired with image frames by
``seq_num`` and counted against the stop document's ``num_events``) and replayed through a fresh
:class:`PhaseMapCallback`. The arithmetic is the live path's, so a reprocessed result equals the live one.

A run imaged at several sample positions gets one result per field (``<root>/<uid>.f<index>``,
docs/contract.md), as live: :func:`reprocess_results` returns them all, and results of the run that
the new analysis did not write again (a ``skipped`` result of an earlier analysis, fields that are
gone) are removed, so that the run's results are always those of one analysis.

Post-scan jobs are plain functions of (tiled uri, run uid, options) so that they run the same
in-process, on a Dask worker or from the command line: :func:`reprocess`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tiled.queries import Key

from phasestream.callbacks.phase_map import PhaseMapCallback, RunResult
from phasestream.contract import RESULT_SPEC, DocumentBounds, JobOutcome, RunDefaults, Status, check_raw_path
from phasestream.contract.fields import parse_field_key
from phasestream.contract.metadata import shown, shown_metadata
from phasestream.jobs.context import JobContext
from phasestream.jobs.raw_documents import raw_run_documents
from phasestream.references import reference_folders_from_env
from phasestream.store.liveness import process_gone
from phasestream.store.odstore import external_od_path
from phasestream.store.results import ResultExistsError
from phasestream.store.tiled import open_raw_run

__all__ = [
    "NoPhasestreamBlockError",
    "ReprocessOptions",
    "ResultBusyError",
    "ResultCompleteError",
    "ResultNotBetterError",
    "reprocess_results",
    "reprocess_run",
    "run",
]

logger = logging.getLogger(__name__)



@dataclass
class ReprocessOptions:
    """Options of a reprocessing job (validated by :meth:`validate`)."""

    root: str = "phasestream"
    backend: str | None = None
    references: str | None = None
    require_complete: bool = True
    #: replace a ``complete`` result too (a person's explicit ``reprocess --replace``); results that
    #: are not complete are always recomputed
    replace: bool = False
    #: folders whose files the run's start document may name as references (default
    #: ``PHASESTREAM_REFERENCES``)
    reference_folders: tuple[str, ...] = ()
    #: how a run without a ``phasestream`` block is analysed (:class:`~phasestream.contract.RunDefaults`
    #: as a dict, so that the options travel to Dask); None: with ``references`` only, keys inferred
    defaults: dict | None = None
    #: Tiled path of the container of the raw runs (``bl/raw``); ``""``: the catalog root
    raw: str = ""
    #: a ``running`` result updated within this many seconds is being written by a live worker: refused (a
    #: reprocess replaced it, and the live writer went on writing into the new result); the live worker, which
    #: recovers only results it found stale or finalized itself, passes 0
    busy_seconds: float = 600.0
    #: what a start document may ask for (:class:`~phasestream.contract.DocumentBounds` keywords, so that they
    #: travel to Dask): the live worker's own, so that a recovered run meets the bounds it was refused by
    bounds: dict | None = None

    def validate(self) -> ReprocessOptions:
        if not self.root or "/" in self.root:
            raise ValueError(f"root must be a single container name, got {self.root!r}")
        self.raw = check_raw_path(self.raw)
        self.reference_folders = tuple(str(f) for f in self.reference_folders)
        if self.defaults is not None:
            self.defaults = asdict(RunDefaults(**self.defaults))
        if self.bounds is not None:
            self.bounds = DocumentBounds(**self.bounds).as_dict()
        return self

    def run_defaults(self) -> RunDefaults | None:
        return None if self.defaults is None else RunDefaults(**self.defaults)


class ResultCompleteError(ResultExistsError):
    """The run already has a ``complete`` result, and replacing it was not asked for."""


class ResultNotBetterError(ResultExistsError):
    """Reprocessing would replace a finished result by one of a worse status (or none): the earlier is kept."""


class ResultBusyError(ResultExistsError):
    """The run's result is ``running`` and was updated recently: a live worker is writing it."""


class NoPhasestreamBlockError(RuntimeError):
    """The run's start document has no ``phasestream`` block and no references were given to analyse it."""


#: how bad a result status is, to report one status for a run of several fields
_WORST = {Status.FAILED.value: 3, Status.SKIPPED.value: 2, Status.PARTIAL.value: 1}


def reprocess_run(client, run_uid: str, options: ReprocessOptions | None = None) -> RunResult:
    """Recompute the phase maps of one raw run in Tiled (:func:`reprocess_results`); the run's result, or for
    a run of several fields the one with the worst status (failed, skipped, partial, complete; the first
    field among equals)."""
    return _worst(reprocess_results(client, run_uid, options))


def _worst(results: dict[str, RunResult]) -> RunResult:
    return max(results.values(), key=lambda r: _WORST.get(r.status, 0))


def reprocess_results(client, run_uid: str, options: ReprocessOptions | None = None) -> dict[str, RunResult]:
    """Recompute the phase maps of one raw run in Tiled (``<raw>/<run_uid>``); results replace
    ``<root>/<run_uid>`` (``<root>/<run_uid>.f<index>`` per field) and link back to the raw run (``raw``
    metadata). Returns the run's results by key.

    Each stream's rows are paired with their image frames by ``seq_num``; when rows, frames and
    the stop document's ``num_events`` disagree, only correctly paired events are analysed and the
    result is ``partial`` with an error naming the stream and the counts.

    Raises
    ------
    KeyError
        when the run is not in Tiled.
    RuntimeError
        when the raw run has no stop document yet and ``require_complete`` is set.
    ResultCompleteError
        when the run's results are all ``complete`` and ``replace`` is not set.
    ResultBusyError
        when a result is ``running`` and was updated within ``busy_seconds`` (a live worker writes it).
    ResultNotBetterError
        when the run has finished (complete or partial) results and the analysis, made in memory first, would
        give one of a worse status: nothing is written.
    """
    opts = (options or ReprocessOptions()).validate()
    run = open_raw_run(client, run_uid, opts.raw)
    if opts.require_complete and run.metadata.get("stop") is None:
        raise RuntimeError(f"raw run {run_uid} is not complete in Tiled yet (no stop document); try again later")
    found = _results_of(client, opts.root, run_uid)
    before = {key: md["status"] for key, md in found.items()}
    busy = _busy_results(found, opts.busy_seconds)
    if busy:
        raise ResultBusyError(f"run {run_uid}: {busy}: a live worker (or another reprocess) is writing it; reprocess "
                              f"it once it has ended (or once nothing has updated it for {opts.busy_seconds:g} s, or "
                              "its writer's process is gone)")
    if not opts.replace and before and all(status == "complete" for status in before.values()):
        raise ResultCompleteError(f"run {run_uid} already has a complete result at {opts.root}/"
                                  f"{run_uid if run_uid in before else ', '.join(sorted(before))}: pass "
                                  "--replace (ReprocessOptions.replace) to recompute and replace it")
    folders = opts.reference_folders or tuple(str(f) for f in reference_folders_from_env())
    settings = {"root": opts.root, "backend": opts.backend, "references": opts.references,
                "defaults": opts.run_defaults(), "update_every": 10**9, "update_seconds": float("inf"),
                "reference_folders": folders, "raw": opts.raw,
                "bounds": None if opts.bounds is None else DocumentBounds(**opts.bounds)}
    finished = {key: status for key, status in before.items() if status in _FINISHED}
    if finished:  # analysed in memory first: a finished result is replaced only by one at least as good
        worse = _worse(_analysed(None, run, run_uid, settings), finished)
        if worse:
            raise ResultNotBetterError(f"run {run_uid}: reprocessing it gives {worse}; the earlier results are "
                                       "kept (remove them in Tiled first to replace them anyway)")
    results = _analysed(client, run, run_uid, {**settings, "replace": True})
    if not results:
        raise NoPhasestreamBlockError(
            f"run {run_uid} has no phasestream block in its start document: pass --references R (and --image-key, "
            "--energy-key, --i0-key, --mode where they cannot be inferred) to analyse it (docs/any-plan.md)")
    _remove_stale(client, opts.root, run_uid, set(before) - set(results))
    logger.info("reprocessed %s: %s", run_uid, {key: r.status for key, r in results.items()})
    return results


def _results_of(client, root: str, run_uid: str) -> dict[str, dict[str, Any]]:
    """The keys of the run's results (``<uid>``, ``<uid>.f<index>``) and their metadata (checked as shown)."""
    try:
        found = client[root].search(Key("run_uid") == run_uid)
        return {key: shown_metadata(node.metadata) for key, node in found.items()
                if key == run_uid or (parse_field_key(key) or ("",))[0] == run_uid}
    except KeyError:
        return {}


#: the statuses of a finished result, and what ranks below each (a reprocess never replaces one by worse)
_FINISHED = (Status.COMPLETE.value, Status.PARTIAL.value)


def _analysed(client, run, run_uid: str, settings: dict[str, Any]) -> dict[str, RunResult]:
    """The run's results by key, analysed from its raw run documents: written to Tiled under ``client``, or
    kept in memory only (``client`` None)."""
    cb = PhaseMapCallback(client, **settings)
    try:
        # rows that cannot be paired with their frames are left out and the run ends `partial`
        for name, doc in raw_run_documents(run, on_mismatch=lambda reason: cb.run_incomplete(run_uid, reason)):
            cb(name, doc)
        # a raw run that never got its stop document (require_complete=False) ends with what it holds
        cb.abort_active("the raw run has no stop document: analysed as far as it goes")
        cb.flush(None)
    finally:
        cb.close()
    return {key: result for key, result in cb.results.items() if result.uid == run_uid}


def _worse(results: dict[str, RunResult], finished: dict[str, str]) -> str:
    """How ``results`` fall short of the ``finished`` statuses of the same keys ("" when they do not)."""
    worse = []
    for key, old in sorted(finished.items()):
        new = results.get(key)
        if new is None or _WORST.get(new.status, 0) > _WORST.get(old, 0):
            reason = "" if new is None else f" ({'; '.join(new.errors)[:300]})"
            worse.append(f"{key} {'no result' if new is None else new.status}{reason} where it is {old}")
    return "; ".join(worse)


def _busy_results(found: Mapping[str, Mapping[str, Any]], seconds: float) -> str:
    """The results among ``found`` (key -> metadata) that are ``running`` and were updated within ``seconds``,
    described ("" if none). A result whose writer (``writer``: the process that created it) is gone from this
    host is not busy, however recently it was updated: a killed reprocess or worker will never finish it."""
    busy = []
    for key, md in sorted(found.items()):
        if md["status"] != Status.RUNNING.value or seconds <= 0 or process_gone(md.get("writer")):
            continue
        updated = md["updated_at"]
        if updated is not None and time.time() - updated < seconds:
            busy.append(f"result {key} is running, updated {time.time() - updated:.0f} s ago{_by(md.get('writer'))}")
    return "; ".join(busy)


def _by(writer: Any) -> str:
    """`` by pid P on host H`` of a result's ``writer`` record ("" when it names none)."""
    if not isinstance(writer, Mapping) or not isinstance(writer.get("host"), str):
        return ""
    return f" by pid {shown(writer.get('pid'))} on host {shown(writer['host'])}"


def _remove_stale(client, root: str, run_uid: str, keys: set[str]) -> None:
    """Remove the run's results ``keys`` that this analysis did not write again (checked: each key is the
    run uid or one of its field keys, and the node a PhaseMap result of this run). An external ``od``
    directory such a result names is left on disk: its path comes from Tiled, not from a configured folder."""
    for key in sorted(keys):
        node = client[root][key]
        if RESULT_SPEC not in [spec.name for spec in node.specs] or node.metadata.get("run_uid") != run_uid:
            continue
        logger.info("run %s: removing its result %s/%s, which the new analysis did not write", run_uid, root, key)
        stale = external_od_path(node["od"] if "od" in node else None)
        node.delete(recursive=True, external_only=False)
        if stale is not None:  # a path read from Tiled, and reprocess knows no OD store: never removed from here
            logger.warning("run %s: the external od of %s/%s is left in place at %s", run_uid, root, key, stale)


def run(context: JobContext, run_uid: str, options: dict) -> JobOutcome:
    """The ``reprocess`` job: recompute the result of ``run_uid`` from its raw run in Tiled."""
    opts = ReprocessOptions(**options).validate()
    where = f"--raw {opts.raw} " if opts.raw else ""
    t0 = time.perf_counter()
    try:
        results = reprocess_results(context.tiled(), run_uid, opts)
    except NoPhasestreamBlockError as exc:
        return JobOutcome(run_uid, "reprocess", "skipped", reason=str(exc), seconds=round(time.perf_counter() - t0, 3),
                          retry=f"phasestream reprocess {where}--references R {run_uid}")
    except (ResultBusyError, ResultNotBetterError) as exc:  # nothing was written: the earlier results stand
        status = "skipped" if isinstance(exc, ResultBusyError) else "failed"
        return JobOutcome(run_uid, "reprocess", status, reason=str(exc), seconds=round(time.perf_counter() - t0, 3),
                          retry=f"phasestream reprocess {where}{run_uid}" if status == "skipped" else "",
                          details={"kept": True})
    result = _worst(results)  # a run of several fields: the field with the worst status speaks for it
    retry = "" if result.status == "complete" else f"phasestream reprocess {where}--replace {run_uid}"
    if result.status == "skipped":
        retry = (f"phasestream reprocess {where}--references {opts.references or 'R'} --image-key K --energy-key E "
                 f"{run_uid}")
    # what went with the results replaced (their arrays and post-scan records), by result key
    replaced = {key: r.metadata["replaced"] for key, r in results.items() if r.metadata.get("replaced")}
    # a result status (complete, partial, failed) is also a job status
    return JobOutcome(run_uid, "reprocess", result.status, reason="; ".join(result.errors[:5]),
                      seconds=round(time.perf_counter() - t0, 3), retry=retry,
                      details={"status": result.status, "errors": list(result.errors),
                               "phase_fractions": result.metadata.get("phase_fractions", {}),
                               "options": asdict(opts), **({"replaced": replaced} if replaced else {}),
                               **({"fields": {key: r.status for key, r in results.items()}} if len(results) > 1
                                  or result.field is not None else {})})
