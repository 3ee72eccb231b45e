"""The heartbeat of a post-scan job record that says ``running``, and what becomes of one whose job stopped.

A job that writes ``status: running`` into its record (the refinement, the denoising; the split LCF's
``methods.lcf`` and the split enhancement's ``enhancement`` while they copy their staged arrays in) and is then
killed (SIGKILL, out of memory, a reboot) would leave that record ``running`` for good. A record is named by
its key in the result's metadata, dotted for one inside a map (``methods.lcf``). So while it works, its
record says who runs it (``host``, ``pid``, ``started_at``) and carries ``heartbeat_at`` (seconds since the
epoch), touched every ``heartbeat_seconds`` by a daemon thread (:class:`JobHeartbeat`). A ``running`` record
whose heartbeat is older than the staleness limit (at least :data:`MISSED_BEATS` of its own beats), or whose
process is gone from this host, was left by a job that stopped: :func:`finalize_interrupted` records it
``failed``, reason ``interrupted: no heartbeat since <UTC time> (the job's process stopped)``, keeping its
``kept`` record and every array as they are (docs/contract.md#post-scan-job-records). A record written before
records had a heartbeat counts from the result's ``updated_at``.

The next run of the job does this itself (:func:`ensure_not_running`), and refuses
(:class:`JobRunningError`) while the record's job is alive; the live worker sweeps the results container
periodically (:func:`phasestream.jobs.interrupted.finalize_interrupted_jobs`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from phasestream.contract.metadata import finite_number, recorded_map
from phasestream.store.liveness import process_gone, process_identity
from phasestream.store.results import ResultWriter

__all__ = ["CLAIM_SETTLE", "HEARTBEAT_SECONDS", "MISSED_BEATS", "STALE_AFTER", "JobArrays", "JobHeartbeat",
           "JobRunningError", "ensure_not_running", "finalize_interrupted", "interrupted_since", "job_record", "utc"]

logger = logging.getLogger(__name__)

#: seconds between two heartbeats of a running job record (the jobs' default)
HEARTBEAT_SECONDS = 15.0
#: seconds without a heartbeat after which the next run of a job takes a ``running`` record as interrupted
STALE_AFTER = 120.0
#: a record is never taken as interrupted before it has missed this many of its own heartbeats
MISSED_BEATS = 3
#: seconds a job waits after writing its ``running`` record before it reads it back (:meth:`JobHeartbeat.confirm`):
#: far longer than another run's step from its check to its write
CLAIM_SETTLE = 0.5

#: the arrays a job writes beside its record (paths in the result: fixed names of the contract), or a function
#: of its record that gives them (the split enhancement's array is the one its record's ``path`` names)
JobArrays = tuple[str, ...] | Callable[[Mapping[str, Any]], tuple[str, ...]]


class JobRunningError(RuntimeError):
    """The job's record on this result is ``running`` and its job is alive: the job is not run twice at once."""


def utc(seconds: float | None) -> str:
    """``seconds`` since the epoch as people read it: ``2026-12-08 14:03:05 UTC``."""
    if seconds is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def job_record(md: Any, name: str) -> dict[str, Any]:
    """The job record ``name`` of the result metadata ``md`` (``refinement``; dotted for one inside a map:
    ``methods.lcf``) as a dict; none, or a value of another type on the way, is an empty one."""
    record = md
    for key in name.split("."):
        record = recorded_map(record, key)
    return record


def _pointer(name: str) -> str:
    """The JSON pointer of the job record ``name`` (a fixed record name, never a document field)."""
    return "/" + name.replace(".", "/")


def _present(node, path: str) -> bool:
    """The result ``node`` holds something at ``path`` (``fit_error``, ``enhanced/<model>/<version>/<steps>``)."""
    try:
        node[path]
    except KeyError:
        return False
    return True


def _last_sign_of_life(record: Mapping[str, Any], updated_at: Any) -> float | None:
    """The record's ``heartbeat_at``; for a record written before records had one, the result's ``updated_at``."""
    beat = finite_number(record.get("heartbeat_at"))
    return float(beat) if beat is not None else (None if finite_number(updated_at) is None else float(updated_at))


def _limit(record: Mapping[str, Any], stale_after: float) -> float:
    """Seconds without a sign of life after which ``record`` counts as interrupted."""
    every = finite_number(record.get("heartbeat_seconds")) or 0.0
    return max(float(stale_after), MISSED_BEATS * max(float(every), 0.0))


def interrupted_since(record: Mapping[str, Any], updated_at: Any, *, stale_after: float,
                      now: float | None = None) -> tuple[bool, float | None]:
    """``(interrupted, since)``: whether the ``running`` job ``record`` stopped, and its last sign of life.

    Interrupted: its process is gone from this host, or its last sign of life (``heartbeat_at``; the result's
    ``updated_at`` for a record without one) is older than ``stale_after`` seconds and than
    :data:`MISSED_BEATS` of its own ``heartbeat_seconds``, or unknown. A record that is not ``running`` never is.
    """
    since = _last_sign_of_life(record, updated_at)
    if record.get("status") != "running":
        return False, since
    if process_gone(record):
        return True, since
    now = time.time() if now is None else now
    return since is None or now - since > _limit(record, stale_after), since


def finalize_interrupted(node, name: str, arrays: JobArrays, *, stale_after: float,
                         seen: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Record the job record ``name`` of the result ``node`` ``failed`` when its job stopped; the record written.

    The record is read again here and judged on what it says now, and only when it is still ``seen`` (the record
    the caller found): a job that beat again since, or another sweep that finalized it first, is left alone
    (None). The failed record keeps every field (``kept``, who ran it, its last heartbeat, its ``retry``); without
    ``kept`` it names ``unverified_arrays``, the job's ``arrays`` beside it that no complete record describes.
    Nothing is deleted (a split job's record keeps ``staging``, the staging container its process left).
    """
    node.refresh()
    md = node.metadata
    record = job_record(md, name)
    if seen is not None and record != dict(seen):
        return None
    stopped, since = interrupted_since(record, md.get("updated_at"), stale_after=stale_after)
    if not stopped:
        return None
    failed = {**record, "status": "failed",
              "reason": f"interrupted: no heartbeat since {utc(since)} (the job's process stopped)"}
    if not isinstance(record.get("kept"), Mapping):
        names = arrays(record) if callable(arrays) else arrays
        failed["unverified_arrays"] = sorted(a for a in names if _present(node, a))
    patch = [{"op": "add", "path": _pointer(name), "value": failed},
             {"op": "add", "path": "/updated_at", "value": time.time()}]
    node.patch_metadata(metadata_patch=patch, drop_revision=True)
    logger.warning("%s: %s record of a job on %s (pid %s) finalized: %s", node.item["id"], name,
                   record.get("host", "an unknown host"), record.get("pid", "?"), failed["reason"])
    return failed


def ensure_not_running(writer: ResultWriter, name: str, arrays: JobArrays, *, stale_after: float,
                       job: str | None = None) -> bool:
    """Before a job writes its record ``name``: refuse while another job's ``running`` record is alive
    (:class:`JobRunningError`, naming it as ``job``, by default ``name``), finalize one left by a job that
    stopped. True when it finalized one (the writer's metadata then holds the failed record)."""
    for _ in range(3):  # a record that changed while it was judged is judged again, on what it says now
        md = writer.metadata
        record = job_record(md, name)
        if record.get("status") != "running":
            return False
        stopped, since = interrupted_since(record, md.get("updated_at"), stale_after=stale_after)
        if not stopped:
            break
        if finalize_interrupted(writer.container, name, arrays, stale_after=stale_after, seen=record) is not None:
            return True
    age = "" if since is None else f", last heartbeat {time.time() - since:.0f} s ago"
    who = (f"host {record['host']}, pid {record.get('pid')}, started {utc(finite_number(record.get('started_at')))}"
           if "host" in record else "by an earlier version of phasestream, without a heartbeat")
    raise JobRunningError(
        f"a {job or name} of result {writer.path} is already running: {who}{age}; it is not run twice at once. Run "
        f"this again once it has ended, or once it has had no heartbeat for {_limit(record, stale_after):.0f} s (its "
        "process stopped): it is then recorded as failed (interrupted) and this one runs")


class JobHeartbeat:
    """The identity and heartbeat of one job's ``running`` record ``name`` in one result (dotted for a record
    inside a map: ``methods.lcf``).

    :meth:`running` builds the record to write (``status: running``, who runs it, ``heartbeat_at``); used as
    a context manager, a daemon thread touches its ``heartbeat_at`` every ``every`` seconds until exit, as
    long as the record in Tiled is still this job's ``running`` one. Tiled applies a metadata patch by
    rewriting the whole metadata, so the job's own metadata writes while it beats go through :meth:`paused`.
    """

    def __init__(self, tiled_client, path: str, name: str, *, every: float = HEARTBEAT_SECONDS):
        if not every > 0:
            raise ValueError(f"heartbeat seconds must be > 0, got {every}")
        self.path, self.name, self.every = path, name, float(every)
        self._client = tiled_client
        self.identity = {**process_identity(), "claim": secrets.token_hex(8)}  # this job's, among the process's
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def running(self, **fields: Any) -> dict[str, Any]:
        """The ``running`` record with ``fields`` (model, kept, retry; a ``status`` among them is replaced), who
        runs it and a heartbeat of now."""
        return {**fields, "status": "running", **self.identity, "heartbeat_at": round(time.time(), 3),
                "heartbeat_seconds": self.every}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No heartbeat is written meanwhile (around the job's own metadata writes to the result)."""
        with self._lock:
            yield

    def __enter__(self) -> JobHeartbeat:
        self._stop.clear()
        node = self._client[self.path]  # a node of its own: the job's writers keep their cached metadata
        self._thread = threading.Thread(target=self._beat, args=(node,), name=f"heartbeat-{self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # a beat in flight ends before the job writes its final record
            self._thread = None

    def _mine(self, record: Mapping[str, Any]) -> bool:
        return record.get("status") == "running" and all(record.get(k) == v for k, v in self.identity.items())

    def confirm(self, writer: ResultWriter, settle: float = CLAIM_SETTLE) -> None:
        """After this job wrote its ``running`` record, and before it changes anything else: wait ``settle``
        seconds and read the record again. Tiled has no lock: another run of the job that passed
        :func:`ensure_not_running` at the same moment writes its record too, and the last one written stands.
        When it is not this job's, this job does not run (:class:`JobRunningError`, naming the other)."""
        time.sleep(settle)
        writer.container.refresh()
        record = job_record(writer.metadata, self.name)
        if not self._mine(record):
            raise JobRunningError(
                f"another {self.name} of result {writer.path} began at the same moment (host {record.get('host')}, "
                f"pid {record.get('pid')}; its record is now {record.get('status')}): it runs, this one does not")

    def _beat(self, node) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    record = job_record(node.refresh().metadata, self.name)
                    if not self._mine(record):
                        logger.warning("%s: the %s record is no longer this job's running one (now %s: %s); "
                                       "heartbeat stopped", self.path, self.name, record.get("status"),
                                       record.get("reason"))
                        return
                    node.patch_metadata(metadata_patch=[{"op": "add", "path": f"{_pointer(self.name)}/heartbeat_at",
                                                         "value": round(time.time(), 3)}], drop_revision=True)
                except Exception as exc:  # noqa: BLE001 - Tiled unreachable for a while: beat again later
                    logger.warning("%s: heartbeat of the %s record not written: %s", self.path, self.name, exc)
