"""What the live callback writes about runs it does not analyse, and about start documents that arrive again.

A refused start document (docs/security.md) still gets a ``failed`` result with the reason, and a run
whose keys cannot be inferred a ``skipped`` one (docs/any-plan.md), at ``<root>/<uid>``; the raw run
stays in Tiled. A start whose uid already has a result is noted on that result (at most
:data:`MAX_CONFLICT_NOTES` times: a replay flood must not grow its metadata) and ignored: nothing is
replaced on behalf of a document. Every write goes through the callback's sink, off the hot path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from phasestream.callbacks.result import RunResult
from phasestream.callbacks.sink import ResultSink
from phasestream.contract import (
    DocumentBounds,
    RunSettings,
    RunSettingsError,
    Status,
    checked_run_origin,
    checked_sample,
)
from phasestream.contract.fields import parse_field_key
from phasestream.store.results import ResultExistsError, ResultWriter

__all__ = ["CONFLICT_NOTE", "MAX_CONFLICT_NOTES", "UnanalysedRuns", "conflict_message"]

logger = logging.getLogger(__name__)

CONFLICT_NOTE = "a start document for this run arrived again"
#: conflicts noted on one result; later ones are only logged
MAX_CONFLICT_NOTES = 10


def conflict_message() -> str:
    """The note a start document for a uid that already has a result leaves on that result."""
    return (f"{CONFLICT_NOTE} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: ignored (a result is never replaced on "
            "behalf of a document; phasestream reprocess --replace does it on purpose)")


class UnanalysedRuns:
    """Writes the results of runs that are not analysed, and conflict notes, to ``client[root]`` through ``sink``.

    Parameters
    ----------
    client : the Tiled client (None: nothing is written, results are only kept in memory)
    root : the results container
    sink : the callback's writer thread
    replace : the callback's ``replace``: a result not analysed replaces only an unfinished one
    bounds : the worker's bounds, to check the ``sample`` block copied into the result
    origin : ``(uid, checked origin) -> the result's origin fields`` (the raw run's link)
    """

    def __init__(self, client, root: str, sink: ResultSink, *, replace: bool, bounds: DocumentBounds,
                 origin: Callable[[str, dict], dict]):
        self.client, self.root, self.sink = client, root, sink
        self.replace, self.bounds, self.origin = replace, bounds, origin

    def in_tiled(self, uid: str) -> bool:
        """A result of ``uid`` (or of its first field) is in Tiled (False when Tiled cannot be asked: the
        writer refuses to replace one anyway)."""
        if self.client is None:
            return False
        try:
            return self.root in self.client and any(key in self.client[self.root] for key in (uid, f"{uid}.f0"))
        except Exception:  # noqa: BLE001 - Tiled unreachable now: ResultWriter(replace=False) still refuses
            logger.warning("run %s: cannot ask Tiled whether a result exists; going on", uid)
            return False

    def note_conflict(self, uid: str, message: str) -> None:
        """Note ``message`` on the result of ``uid`` in Tiled (on its first field's for a run of several)."""
        if self.client is None:
            return

        def job() -> None:
            try:
                key = uid if parse_field_key(uid) or uid in self.client[self.root] else f"{uid}.f0"
                writer = ResultWriter.open(self.client, key, root=self.root)
                noted = sum(CONFLICT_NOTE in str(e) for e in writer.metadata.get("errors") or [])
                if noted < MAX_CONFLICT_NOTES:
                    writer.record_error(message)
            except Exception as exc:  # noqa: BLE001 - the result may not exist on this server
                logger.error("run %s: could not record the conflict on its result: %s", uid, exc)

        self.sink.submit(job)

    @staticmethod
    def result(uid: str, status: str, reason: str) -> RunResult:
        """The in-memory result of a run not analysed (``failed`` or ``skipped``), ``reason`` its error."""
        result = RunResult(RunSettings(uid, None, "", "", ""))
        result.status, result.errors = status, [reason]
        return result

    def record(self, result: RunResult, start: dict) -> None:
        """Write ``result`` (of :meth:`result`, its uid checked) to Tiled; ``result.done`` is set once written."""
        uid, status, reason = result.settings.run_uid, result.status, result.errors[0]
        if self.client is None:
            result.done.set()
            return
        metadata = {"run_uid": uid, "status": status, "errors": [reason], "sample": self._safe_sample(start),
                    **self.origin(uid, checked_run_origin(start))}
        if isinstance(start.get("scan_id"), int) and not isinstance(start.get("scan_id"), bool):
            metadata["scan_id"] = start["scan_id"]

        def job() -> None:
            try:  # an earlier result is replaced only while it is unfinished: a failed reprocess never wipes one
                ResultWriter(self.client, uid, root=self.root, shape=None, phases=[], metadata=metadata,
                             replace=self.replace and self._unfinished(uid))
            except ResultExistsError:
                result.errors.append("a result of this uid already exists; it was left as it is")
            except Exception as error:  # noqa: BLE001 - logged; the worker goes on
                logger.error("run %s: could not record why it was not analysed in Tiled: %s", uid, error)
            result.metadata = metadata

        self.sink.submit(job)
        self.sink.submit(result.done.set)

    def _unfinished(self, uid: str) -> bool:
        """Whether the result of ``uid`` is missing or still ``running`` (True when Tiled cannot tell)."""
        try:
            results = self.client[self.root]
            return uid not in results or results[uid].metadata.get("status") == Status.RUNNING.value
        except Exception:  # noqa: BLE001 - the writer then meets the same Tiled, and says so
            return True

    def _safe_sample(self, start: dict) -> dict:
        """The start document's ``sample`` if it passes the checks, else {} (a refused run still gets a result)."""
        try:
            return checked_sample(start, self.bounds)
        except RunSettingsError:
            return {}
