"""The live analysis service: PhaseMapCallback, post-scan GMVAE refinement, recovery of lost runs.

After each run's final PCC result is written, the service refines it with the GMVAE through
the model server (:func:`~phasestream.jobs.refine.refine_result`) on its own thread, so
the document stream never waits for it; a model server that is down or a run whose energies do
not match the model only records why refinement was skipped.

When the transport reports lost documents for a run (sequence gap, run without stop), the run
is marked ``partial`` by the callback, and the run is queued here for reprocessing from the raw
run that TiledWriter stored independently: as soon as the raw run is complete in Tiled (its stop
document has arrived), :func:`~phasestream.jobs.reprocess.reprocess_run` recomputes the
result from the full data. Reprocessing runs on its own thread so the document stream goes on.

Every run reaches a final status: :meth:`LiveService.close` (SIGTERM) finalizes the runs still
open as ``partial`` ("worker stopped"); while it runs, the service touches each open result's
``updated_at`` every ``stale_after / 3`` seconds, and any result still ``running`` whose
``updated_at`` is older than ``stale_after`` belongs to no live worker (one killed, or one whose
final write never reached Tiled): it is recovered from the raw run like a run that lost
documents, and records ``recovered: {reason: "worker restarted"}``.

The service only builds jobs: the post-scan steps of each finished run (refine, enhance, methods,
denoise as requested) and the reprocessing of runs that lost documents become one
:class:`~phasestream.jobs.executors.Job` per run, handed to an executor: a thread of this process
(:class:`~phasestream.jobs.executors.InlineExecutor`), or with a Dask scheduler (``scheduler=``:
an address, ``"local"`` or a ``distributed.Client``) one task per run with retries
(:class:`~phasestream.jobs.executors.DaskExecutor`). Either way each step's
:class:`~phasestream.contract.JobOutcome` lands in :attr:`LiveService.outcomes`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from tiled.queries import Key

from phasestream.app.process import ServiceProcess
from phasestream.callbacks.phase_map import PhaseMapCallback, RunResult
from phasestream.contract import USABLE_STATUSES, IncompleteReason, JobOutcome, RunSettings, Status
from phasestream.contract.fields import parse_field_key
from phasestream.contract.metadata import finite_number, shown_metadata
from phasestream.jobs.denoise import DenoiseOptions
from phasestream.jobs.enhance import EnhanceOptions, enhance_options_from_start
from phasestream.jobs.executors import DaskExecutor, Executor, InlineExecutor, Job, JobContext
from phasestream.jobs.interrupted import finalize_interrupted_jobs
from phasestream.jobs.methods_options import MethodsOptions, methods_options_from_start
from phasestream.jobs.record import write_held
from phasestream.jobs.refine import RefineOptions
from phasestream.jobs.reprocess import ReprocessOptions
from phasestream.store.liveness import process_gone
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import open_raw_run, raw_run_complete, separate_api_key

__all__ = ["LiveService", "ServeProcess"]

logger = logging.getLogger(__name__)


class LiveService:
    """Owns the live callback and the reprocessing of runs that lost documents.

    Parameters
    ----------
    tiled_client : writable Tiled client (raw runs and results)
    recover_after : seconds to wait for a raw run to become complete in Tiled before giving up
    poll_seconds : how often to check whether a raw run is complete
    refine : options of the post-scan GMVAE refinement; None: no refinement
    enhance : base options of the InDI enhancement, run for runs whose start document asks for it
        (``phasestream: {enhance: true}``); None: never
    methods : base options of the classic methods (LCF, unmixing, ...), run for runs whose start
        document asks for them (``phasestream: {methods: [lcf, rum_tv]}``); None: never
    denoise : base options (model server, root) of the denoising, run for runs whose start document
        asks for it (``phasestream: {denoise: true}``, ``RunSettings.denoise``); None: never
    scheduler : where post-scan jobs and lost-run reprocessing run: None or ``"none"``, a thread of
        this process; a Dask scheduler address (``tcp://HOST:8786``), ``"local"`` (a LocalCluster of
        ``dask_workers`` processes) or a ``distributed.Client``: one Dask task per run
    tiled_uri : the Tiled URI the Dask workers use (default the client's, with its API key)
    retries : Dask retries of a failed post-scan task
    dask_workers : LocalCluster workers for ``scheduler="local"``
    stale_after : seconds after which a ``running`` result that no open run of this service
        touches is recovered from its raw run (None: never look for them)
    **callback_options : passed to :class:`PhaseMapCallback`; its ``raw`` (the container of the raw runs,
        default the catalog root) is also where lost runs are recovered from
    """

    def __init__(self, tiled_client, *, recover_after: float = 600.0, poll_seconds: float = 1.0,
                 refine: RefineOptions | None = None, enhance: EnhanceOptions | None = None,
                 methods: MethodsOptions | None = None, denoise: DenoiseOptions | None = None,
                 scheduler: Any = None, tiled_uri: str | None = None,
                 retries: int = 2, dask_workers: int | None = 1, stale_after: float | None = 600.0,
                 **callback_options):
        self.client = tiled_client
        self.refine_options = refine
        self.enhance_options = enhance
        self.methods_options = methods
        self.denoise_options = denoise
        #: run uid -> job name (refine, enhance, methods, denoise, reprocess) -> its outcome, whichever executor ran it
        self.outcomes: dict[str, dict[str, JobOutcome]] = {}
        self.post_scan = any(o is not None for o in (refine, enhance, methods, denoise))
        self.executor: Executor
        if scheduler is not None and not (isinstance(scheduler, str) and scheduler.lower() == "none"):
            self.executor = DaskExecutor(scheduler, tiled_uri or str(tiled_client.context.api_uri),
                                         api_key=None if tiled_uri else tiled_client.context.api_key,
                                         retries=retries, n_workers=dask_workers)
        else:
            self.executor = InlineExecutor(JobContext(client=tiled_client))
        callback_options.setdefault("on_run_complete", self._run_complete)
        self.callback = PhaseMapCallback(tiled_client, **callback_options)
        self.recover_after = float(recover_after)
        self.poll_seconds = float(poll_seconds)
        self.recovered: dict[str, str] = {}  # run uid -> status after reprocessing (or why it was not)
        self._pending: dict[str, float] = {}
        self._reasons: dict[str, str] = {}  # pending uid -> why it is recovered (default: documents lost)
        self._submitted: set[str] = set()  # uids whose reprocessing job is with the executor
        self._start_unseen: set[str] = set()  # pending uids whose start document this worker never saw
        self.stale_after = None if stale_after is None else float(stale_after)
        self._next_stale_check = 0.0  # at once: results an earlier worker left running
        self._next_heartbeat = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._recover_loop, name="reprocess-lost", daemon=True)
        self._thread.start()

    def __call__(self, name: str, doc: dict) -> None:
        self.callback(name, doc)

    def run_incomplete(self, run_uid: str, reason: str, *,
                       kind: IncompleteReason = IncompleteReason.MESSAGE_GAP) -> None:
        """Transport listener: documents of ``run_uid`` were lost; mark partial, reprocess later."""
        self.callback.run_incomplete(run_uid, reason, kind=kind)
        with self._lock:
            self._pending.setdefault(run_uid, time.monotonic())
            if kind is IncompleteReason.NO_START:
                self._start_unseen.add(run_uid)
        self._wake.set()

    def _run_complete(self, result: RunResult) -> None:
        # on the result-writer thread: hand over at once
        if result.write_failed:  # what Tiled holds is not the whole result: recompute it from the raw run
            logger.error("run %s: writing its result to Tiled failed; recovering it from the raw run", result.uid)
            with self._lock:
                self._pending.setdefault(result.uid, time.monotonic())
                self._reasons.setdefault(result.uid, "writing the result to Tiled failed")
            self._wake.set()
            return
        if self.post_scan and result.status in USABLE_STATUSES:
            with self._lock:
                lost = result.uid in self._pending  # post-scan steps follow its reprocessing instead
            if not lost:  # on the result: one field's (``<uid>.f<index>``) for a run of several fields
                self._submit(result.key, [], result.settings)

    def outcome(self, uid: str, job: str) -> JobOutcome | None:
        """The outcome of ``job`` (refine, enhance, methods, denoise, reprocess) on run ``uid``, once it ended."""
        with self._lock:
            return self.outcomes.get(uid, {}).get(job)

    def _record(self, uid: str, outcome: JobOutcome) -> None:
        with self._lock:
            self.outcomes.setdefault(uid, {})[outcome.job] = outcome

    def _post_scan_steps(self, uid: str, settings: RunSettings | None) -> list[tuple[str, dict]]:
        """The Job steps of the post-scan work ``uid`` asks for; a malformed request is recorded as failed
        (a malformed ``denoise`` request by the denoising job, on the result)."""
        extra = dict(settings.extra) if settings is not None else {}
        steps: list[tuple[str, dict]] = []
        if self.refine_options is not None:
            steps.append(("refine", asdict(self.refine_options)))
        requests = (("enhance", enhance_options_from_start, self.enhance_options),
                    ("methods", methods_options_from_start, self.methods_options))
        for name, from_start, base in requests:
            if base is None:
                continue
            try:
                options = from_start(extra, base)
            except (ValueError, TypeError) as exc:  # a malformed request fails its own step, never the others
                self._record(uid, JobOutcome(uid, name, "failed", reason=f"phasestream.{name}: {exc}"))
            else:
                if options is not None:
                    steps.append((name, asdict(options)))
        if self.denoise_options is not None and settings is not None and settings.denoise is not None:
            steps.append(("denoise", asdict(self.denoise_options.requested(settings.denoise))))
        return steps

    def _submit(self, uid: str, first: list[tuple[str, dict]], settings: RunSettings | None,
                live_errors: list | None = None) -> None:
        """Hand ``first`` (reprocessing) and the post-scan steps of ``uid`` to the executor as one job."""
        steps = [*first, *self._post_scan_steps(uid, settings)]
        if steps:
            job = Job(uid, tuple(steps))
            self.executor.submit(job, lambda outcome: self._job_done(job, outcome, live_errors))

    def _job_done(self, job: Job, outcome: JobOutcome, live_errors: list | None) -> None:
        """A job's outcome: each step's into :attr:`outcomes`; a reprocessed run's ``recovered`` note."""
        uid = job.run_uid
        steps = outcome.details.get("steps")
        if steps is None:  # the job raised (after its retries): every step failed with its error
            logger.error("run %s: post-scan job %s failed: %s", uid, job.names, outcome.reason)
            for name in job.names:
                self._record(uid, JobOutcome(uid, name, "failed", reason=outcome.reason))
            if "reprocess" in job.names:
                self._give_up(uid, f"recovery from the raw run failed: {outcome.reason}")
                self._done(uid, f"failed: {outcome.reason}")
            else:
                self._note_error(uid, f"post-scan job ({', '.join(job.names)}) failed: {outcome.reason}")
            return
        for record in steps.values():
            self._record(uid, JobOutcome.from_dict(record))
        if "reprocess" in steps:
            status = steps["reprocess"]["status"]
            kept = (steps["reprocess"].get("details") or {}).get("kept")  # nothing written: no recovery to note
            for key in [] if kept else (steps["reprocess"].get("details") or {}).get("fields") or [uid]:
                try:  # read back (as every update below)
                    write_held(ResultWriter.open(self.client, key, root=self.callback.root),
                               {"recovered": self._recovered_note(uid, live_errors or [])})
                except Exception:  # the reprocessed result stands without the note
                    logger.exception("run %s: could not record the recovery on %s", uid, key)
            if kept:  # the earlier result is better (or still being written): it stays, and so does its status
                logger.warning("run %s: its recovery from the raw run wrote nothing: %s", uid,
                               steps["reprocess"].get("reason"))
                self._done(uid, f"left as it is: {steps['reprocess'].get('reason')}")
                return
            logger.info("run %s reprocessed from the raw run after lost documents: %s", uid, status)
            self._done(uid, status)

    def _note_error(self, uid: str, message: str) -> None:
        try:
            ResultWriter.open(self.client, uid, root=self.callback.root).record_error(message)
        except Exception:  # no result to record it on
            logger.exception("run %s: could not record: %s", uid, message)

    def _heartbeat(self) -> None:
        """Touch ``updated_at`` of every open run's result: an open run is never taken for stale."""
        for analysis in list(self.callback.active.values()):
            analysis.heartbeat()

    def find_stale(self) -> list[str]:
        """Queue for recovery the results still ``running`` that no live worker has touched for
        ``stale_after`` seconds, or whose writer's process is gone from this host; their uids. Job records
        (refinement, denoising, a split LCF's or enhancement's) left ``running`` without a heartbeat for as long
        are recorded ``failed`` (interrupted), :mod:`phasestream.jobs.interrupted`."""
        root = self.callback.root
        try:
            if root not in self.client:
                return []
            running = list(self.client[root].search(Key("status") == "running").items())
        except Exception as exc:  # noqa: BLE001 - Tiled unreachable: look again later
            logger.warning("cannot look for results left running: %s", exc)
            return []
        try:
            finalize_interrupted_jobs(self.client, root, stale_after=self.stale_after)
        except Exception as exc:  # noqa: BLE001 - Tiled unreachable: look again later
            logger.warning("cannot look for job records left running: %s", exc)
        now, stale = time.time(), []
        for key, node in running:
            uid = (parse_field_key(key) or (key,))[0]  # a field's result is recovered with its whole run
            updated = node.metadata.get("updated_at")
            fresh = isinstance(updated, int | float) and now - updated < self.stale_after
            if uid in self.callback.active or (fresh and not process_gone(node.metadata.get("writer"))):
                continue  # a result whose writer is gone from this host is stale at once
            stale += [] if uid in stale else [uid]
        with self._lock:
            for uid in stale:
                if uid not in self._pending and uid not in self._submitted:
                    # analysed here: its final status never reached Tiled; else a worker that is gone left it
                    reason = "the final status never reached Tiled" if uid in self.callback.results else \
                        "worker restarted"
                    logger.warning("run %s: result left running (%s); recovering it from the raw run", uid, reason)
                    self._pending[uid] = time.monotonic()
                    self._reasons[uid] = reason
        return stale

    def _recover_loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            try:
                self._recover_pending()
            except Exception:
                logger.exception("recovering runs failed; trying again")

    def _recover_pending(self) -> None:
        if self.stale_after is not None and time.monotonic() >= self._next_heartbeat:
            self._heartbeat()
            self._next_heartbeat = time.monotonic() + self.stale_after / 3
        if self.stale_after is not None and time.monotonic() >= self._next_stale_check:
            self.find_stale()
            self._next_stale_check = time.monotonic() + self.stale_after / 2
        with self._lock:
            pending = dict(self._pending)
        for uid, since in pending.items():
            if uid in self.callback.active:
                continue  # the stop may still come; the callback finalizes first
            try:
                ready = raw_run_complete(self.client, uid, self.callback.raw)
            except Exception as exc:  # noqa: BLE001 - Tiled unreachable or run not there yet
                logger.debug("raw run %s not readable yet: %s", uid, exc)
                ready = False
            if ready and uid in self._start_unseen and (why := self._ended_after_its_stop(uid)):
                # a document naming an old run (replayed or forged) never replaces its result: a person does
                logger.warning("run %s: documents arrived without its start, but %s: left as it is", uid, why)
                self._done(uid, f"left as it is: {why}")
            elif ready:
                self._reprocess(uid)
            elif time.monotonic() - since > self.recover_after:
                logger.error("run %s: raw run still incomplete in Tiled after %.0f s; analysing what it holds",
                             uid, self.recover_after)
                self._reprocess(uid, complete=False)

    def _ended_after_its_stop(self, uid: str) -> str | None:
        """Why the results of ``uid`` must stay as they are, when each has a final status written after the raw
        run's stop document (or the stop's time cannot be read): a worker finished them with the whole run. None
        when one is missing, ``running``, or older than the stop (a worker stopped mid-run: the run went on)."""
        stop = open_raw_run(self.client, uid, self.callback.raw).metadata.get("stop")
        stop_time = finite_number(stop.get("time")) if isinstance(stop, Mapping) else None
        known = stop_time is not None
        results = self.client[self.callback.root]
        keys = [key for key in self._result_keys(uid) if key in results]
        if not keys:
            return None
        statuses = []
        for key in keys:
            md = shown_metadata(results[key].metadata)
            if md["status"] in (None, Status.RUNNING.value) or (known and (md["updated_at"] or 0) < stop_time):
                return None
            statuses.append(md["status"])
        return f"its result ended {', '.join(sorted(set(statuses)))} after the run's stop"

    def _recovered_note(self, uid: str, live_errors: list) -> dict:
        reason = self._reasons.get(uid, "documents lost")
        on = "dask" if isinstance(self.executor, DaskExecutor) else "worker"
        return {"reason": reason, "from": "raw run in Tiled", "on": on, "live_errors": live_errors}

    def _reprocess(self, uid: str, *, complete: bool = True) -> None:
        """Recompute ``uid`` from its raw run (``complete=False``: a raw run that never got its stop:
        what it holds, ending ``partial``); a raw run that is not there leaves the result ``failed``."""
        defaults = self.callback.defaults  # runs without a phasestream block are recovered as they were analysed
        options = ReprocessOptions(root=self.callback.root, backend=self.callback.backend,
                                   require_complete=complete, raw=self.callback.raw,
                                   reference_folders=tuple(str(f) for f in self.callback.reference_folders),
                                   defaults=None if defaults is None else asdict(defaults),
                                   bounds=self.callback.bounds.as_dict(), busy_seconds=0.0)
        try:
            self.callback.flush(60.0)  # the partial result is written before it is replaced
            live_errors = list(self.callback.results[uid].errors) if uid in self.callback.results else []
            start = open_raw_run(self.client, uid, self.callback.raw).metadata["start"]
            settings = RunSettings.from_start(start) if "phasestream" in start else None
        except Exception as exc:  # recorded; the service goes on
            logger.exception("run %s: reprocessing after lost documents failed", uid)
            self._give_up(uid, f"recovery from the raw run failed: {type(exc).__name__}: {exc}")
            self._done(uid, f"failed: {exc}")
            return
        with self._lock:
            self._pending.pop(uid, None)  # submitted: recovered[uid] is set when the job ends
            self._submitted.add(uid)
        self._submit(uid, [("reprocess", asdict(options))], settings, live_errors)

    def _give_up(self, uid: str, reason: str) -> None:
        """A result that could not be recovered ends with a final status and the reason, never ``running``
        (every field's result, for a run imaged at several positions)."""
        for key in self._result_keys(uid):
            try:
                writer = ResultWriter.open(self.client, key, root=self.callback.root)
                if writer.metadata.get("status") == "running":
                    writer.record_error(reason)
                    # read back: a status another process's update took back left the result running for good
                    write_held(writer, {"status": "failed" if writer.shape is None else "partial",
                                        "recovered": {**self._recovered_note(uid, []), "failed": reason}})
            except Exception:
                logger.exception("run %s: could not record why %s was not recovered", uid, key)

    def _result_keys(self, uid: str) -> list[str]:
        """The keys of the results of run ``uid``: its own, else its fields' (``<uid>.f<index>``)."""
        try:
            results = self.client[self.callback.root]
            if uid in results:
                return [uid]
            return [k for k in results.search(Key("run_uid") == uid) if (parse_field_key(k) or ("",))[0] == uid]
        except Exception:  # noqa: BLE001 - Tiled unreachable: recorded on the run uid's result, if any
            return [uid]

    def _done(self, uid: str, status: str) -> None:
        with self._lock:
            self._pending.pop(uid, None)
            self._reasons.pop(uid, None)
            self._submitted.discard(uid)
            self._start_unseen.discard(uid)
            self.recovered[uid] = status

    def wait_recovered(self, uid: str, timeout: float = 60.0) -> str | None:
        """Block until ``uid`` has been reprocessed (or given up); its status, None on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if uid in self.recovered:
                return self.recovered[uid]
            time.sleep(0.05)
        return None

    def close(self) -> None:
        """Stop: open runs end ``partial`` ("worker stopped"), queued writes and post-scan jobs finish."""
        self._closing.set()
        self._wake.set()
        self._thread.join(10.0)
        self.callback.abort_active("worker stopped")
        self.callback.flush(60.0)
        self.executor.close()
        self.callback.close()


class ServeProcess(ServiceProcess):
    """``phasestream serve`` in a subprocess, for demos, benchmarks and tests.

    The Tiled API key travels in the environment (``TILED_API_KEY``), not on the command line.
    Use as a context manager, or :meth:`start` / :meth:`stop`; :meth:`stop` returns the worker's
    final statistics (received, lost, undecodable, ...).

    Parameters
    ----------
    address : the proxy's output address
    tiled_uri : Tiled URI, possibly carrying ``?api_key=``
    args : extra ``phasestream serve`` arguments, e.g. ``("--backend", "numba")``
    timeout : seconds to wait for the worker to connect
    """

    def __init__(self, address: str, tiled_uri: str, *, args: tuple[str, ...] = (), timeout: float = 120.0):
        base, key = separate_api_key(tiled_uri)
        super().__init__(("serve", "--zmq", address, "--tiled", base, *args),
                         env={"TILED_API_KEY": key} if key else None, timeout=timeout, what="analysis worker")
