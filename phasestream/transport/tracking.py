"""Watching a document stream for what PUB/SUB cannot tell: runs that lost documents.

:class:`RunTracker` sees every document the worker receives and reports, through a listener's
``run_incomplete(run_uid, reason)``, runs hit by a message gap, missing events (``seq_num`` gaps,
``num_events`` of the stop), missing stops (no document for ``stop_timeout`` seconds), and events
or stops whose descriptor or start never arrived. The listener marks the run partial and has it
reprocessed from the raw run in Tiled.

The documents of a run whose start never arrived cannot be analysed live (every run-level callback
builds its per-run state from the start document): :meth:`RunTracker.analysable` tells the worker to
hold them back, so such a run costs one log line, not one error per document.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from phasestream.contract import RUN_UID_PATTERN, IncompleteReason

__all__ = ["MAX_TRACKED_RUNS", "RunIncompleteListener", "RunTracker", "log_sparsely"]

logger = logging.getLogger(__name__)

#: runs kept by the tracker that never stopped (timed out): beyond this, the longest silent ones are forgotten
MAX_TRACKED_RUNS = 1000
#: reasons kept per run in :attr:`RunTracker.incomplete`, and runs kept there
MAX_REASONS = 50
#: the identifier fields the tracker keys on, per document name
_IDENTIFIERS = {"start": ("uid",), "descriptor": ("uid", "run_start"), "resource": ("uid",),
                "stream_resource": ("uid",), "event": ("descriptor",), "event_page": ("descriptor",),
                "stream_datum": ("descriptor", "stream_resource"), "datum": ("resource",),
                "datum_page": ("resource",), "stop": ("run_start",)}


def log_sparsely(count: int) -> bool:
    """Log the first 10 occurrences of a problem, then every 1000th, so a flood does not flood the log."""
    return count <= 10 or count % 1000 == 0


def _identifiers_ok(name: str, doc: Any) -> bool:
    """Whether the fields ``doc`` is tracked by are uids (a resource's ``run_start`` may be absent)."""
    if not isinstance(doc, dict):
        return False
    fields = _IDENTIFIERS.get(name, ())
    if name in ("resource", "stream_resource") and doc.get("run_start"):
        fields = (*fields, "run_start")
    return all(isinstance(doc.get(f), str) and RUN_UID_PATTERN.fullmatch(doc[f]) for f in fields)


class RunIncompleteListener(Protocol):
    """Told about runs that lost documents; may be called several times for one run.

    ``kind`` says why (:class:`~phasestream.contract.IncompleteReason`); when ``kind.final`` no
    more documents of the run are expected (no stop within the timeout) and the run is to be
    finalized now. Otherwise its stop may still come. ``reason`` is the text for people.
    """

    def run_incomplete(self, run_uid: str, reason: str, *,
                       kind: IncompleteReason = IncompleteReason.MESSAGE_GAP) -> None: ...


@dataclass
class _RunState:
    last_seen: float
    events_seen: dict[str, int] = field(default_factory=dict)  # stream name -> events received
    stream_datum_streams: set[str] = field(default_factory=set)
    timed_out: bool = False
    timeout_reported: bool = False


@dataclass
class _DescriptorState:
    run_uid: str
    stream: str
    next_seq_num: int = 1


class RunTracker:
    """Document callback that reports runs which lost documents to a :class:`RunIncompleteListener`.

    Reported (``listener.run_incomplete(run_uid, reason)``):

    - every run open when the receiver saw a message gap (:meth:`message_gap`);
    - a run with an event ``seq_num`` gap in one of its descriptors, or whose stop counts more events
      in a stream than arrived;
    - a run without a stop ``stop_timeout`` seconds after its last document (:meth:`check_timeouts`, to be
      called periodically); if documents resume it is tracked again but not reported twice for this;
    - every open run when an event of a never-seen descriptor arrives (the descriptor may belong to any
      of them; once per descriptor); with no run open, the run is reported when its stop arrives;
    - a run whose descriptor or stop arrives without its start: logged once, and :meth:`analysable` is False
      for all of the run's documents.

    Parameters
    ----------
    listener : RunIncompleteListener, optional
        Without one, reports are only logged and counted.
    stop_timeout : float
        Seconds without documents after which an unstopped run is reported.
    clock : callable
        Monotonic time source in seconds (tests pass a fake).
    """

    def __init__(
        self,
        listener: RunIncompleteListener | None = None,
        *,
        stop_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.listener = listener
        self.stop_timeout = stop_timeout
        self.clock = clock
        self._runs: dict[str, _RunState] = {}
        self._descriptors: dict[str, _DescriptorState] = {}
        self._resources: dict[str, str] = {}  # resource / stream_resource uid -> run uid
        self._stream_resource_next: dict[str, int] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # recently stopped runs, for late documents
        self._orphan_descriptors: OrderedDict[str, None] = OrderedDict()
        self._without_start: OrderedDict[str, None] = OrderedDict()  # runs whose start was not received
        self.stats = {
            "runs_started": 0,
            "runs_stopped": 0,
            "reports": 0,
            "missing_events": 0,
            "orphan_events": 0,
            "runs_without_start": 0,
            "untracked": 0,  # documents whose identifiers are not uids (the callback refuses them too)
            "forgotten_runs": 0,  # runs that timed out and were dropped to keep MAX_TRACKED_RUNS
        }
        self.incomplete: dict[str, list[str]] = {}  # run uid -> reasons reported

    @property
    def open_runs(self) -> list[str]:
        """Uids of runs started (or seen) and not yet stopped nor timed out."""
        return [uid for uid, run in self._runs.items() if not run.timed_out]

    def _report(self, run_uid: str, kind: IncompleteReason, reason: str, *, log: bool = True) -> None:
        self.stats["reports"] += 1
        reasons = self.incomplete.setdefault(run_uid, [])
        if len(reasons) < MAX_REASONS:
            reasons.append(reason)
        if len(self.incomplete) > MAX_TRACKED_RUNS:
            del self.incomplete[next(iter(self.incomplete))]
        if log:
            logger.warning("run %s incomplete: %s", run_uid, reason)
        if self.listener is not None:
            try:
                self.listener.run_incomplete(run_uid, reason, kind=kind)
            except Exception:
                logger.exception("listener %r raised on run_incomplete(%s); continuing", self.listener, run_uid)

    def _touch(self, run_uid: str, how: str) -> _RunState:
        """The state of ``run_uid``, created (and reported) when its start was never seen."""
        run = self._runs.get(run_uid)
        if run is None:
            if run_uid in self._finished:
                logger.warning("%s arrived for run %s after its stop; ignored by the tracker", how, run_uid)
                return _RunState(self.clock())
            run = self._runs[run_uid] = _RunState(self.clock())
            self.stats["runs_without_start"] += 1
            self._without_start[run_uid] = None
            if len(self._without_start) > 1000:
                self._without_start.popitem(last=False)
            logger.warning(
                "run %s: documents arrived without its start document (lost, or published before this worker "
                "subscribed), first %s; none of them is analysed live, the run is reported incomplete "
                "(the live service reprocesses it from the raw run in Tiled)",
                run_uid,
                how,
            )
            self._report(run_uid, IncompleteReason.NO_START,
                         f"{how} arrived for a run whose start document was not received", log=False)
        run.last_seen = self.clock()
        run.timed_out = False
        return run

    def message_gap(self, publisher_id: str, expected_seq: int, received_seq: int) -> None:
        """Mark every open run: messages ``expected_seq`` .. ``received_seq - 1`` of a publisher were lost."""
        for run_uid in self.open_runs:
            self._report(
                run_uid,
                IncompleteReason.MESSAGE_GAP,
                f"{received_seq - expected_seq} message(s) lost while the run was open "
                f"(publisher {publisher_id}, sequence {expected_seq}..{received_seq - 1})",
            )

    def check_timeouts(self) -> list[str]:
        """Report runs without a stop ``stop_timeout`` s after their last document; returns their uids."""
        now = self.clock()
        expired = [
            uid for uid, run in self._runs.items() if not run.timed_out and now - run.last_seen > self.stop_timeout
        ]
        for uid in expired:
            run = self._runs[uid]
            run.timed_out = True
            if not run.timeout_reported:
                run.timeout_reported = True
                self._report(uid, IncompleteReason.STOP_TIMEOUT,
                             f"no stop document within {self.stop_timeout:g} s of the run's last document")
        if len(self._runs) > MAX_TRACKED_RUNS:  # starts that never stop (a flood of them) are not kept for ever
            silent = sorted((run.last_seen, uid) for uid, run in self._runs.items() if run.timed_out)
            for _, uid in silent[:len(self._runs) - MAX_TRACKED_RUNS]:
                self._forget(uid)
                self.stats["forgotten_runs"] += 1
        return expired

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        handler = getattr(self, f"_{name}", None)
        if handler is None:
            return
        if not _identifiers_ok(name, doc):  # not kept, not logged in full: a megabyte "uid" was logged per run
            self.stats["untracked"] += 1
            if log_sparsely(self.stats["untracked"]):
                logger.warning("%s document whose identifiers are not uids: not tracked (%d so far)", name,
                               self.stats["untracked"])
            return
        handler(doc)

    def analysable(self, name: str, doc: dict[str, Any]) -> bool:
        """False for a document (already seen by this tracker) of a run whose start document was not received.

        Documents that cannot be placed in a run (an event of an unknown descriptor, a datum of an unknown
        resource) are analysable: whether they matter is the callback's decision.
        """
        if not self._without_start or name == "start" or not _identifiers_ok(name, doc):
            return True
        if name in ("event", "event_page", "stream_datum"):
            descriptor = self._descriptors.get(doc.get("descriptor"))
            run_uid = None if descriptor is None else descriptor.run_uid
        elif name in ("datum", "datum_page"):
            run_uid = self._resources.get(doc.get("resource"))
        else:  # descriptor, resource, stream_resource, stop
            run_uid = doc.get("run_start")
        return run_uid not in self._without_start

    def _start(self, doc: dict[str, Any]) -> None:
        self.stats["runs_started"] += 1
        self._runs[doc["uid"]] = _RunState(self.clock())

    def _descriptor(self, doc: dict[str, Any]) -> None:
        self._touch(doc["run_start"], f"descriptor {doc['uid']}")
        self._descriptors[doc["uid"]] = _DescriptorState(doc["run_start"], doc.get("name", "primary"))

    def _resource(self, doc: dict[str, Any]) -> None:
        if doc.get("run_start"):
            self._touch(doc["run_start"], f"resource {doc['uid']}")
            self._resources[doc["uid"]] = doc["run_start"]

    _stream_resource = _resource

    def _datum(self, doc: dict[str, Any]) -> None:
        run = self._runs.get(self._resources.get(doc["resource"], ""))
        if run is not None:
            run.last_seen = self.clock()

    _datum_page = _datum

    def _orphan(self, descriptor_uid: str, what: str) -> None:
        self.stats["orphan_events"] += 1
        if descriptor_uid in self._orphan_descriptors:
            return
        self._orphan_descriptors[descriptor_uid] = None
        if len(self._orphan_descriptors) > 1000:
            self._orphan_descriptors.popitem(last=False)
        reason = f"{what} of descriptor {descriptor_uid}, whose descriptor document was not received"
        open_runs = self.open_runs
        if not open_runs:
            logger.warning("%s, and no run is open; its run is reported when its stop arrives", reason)
        else:  # one line, not one per open run
            logger.warning("%s: each of the %d open runs is reported incomplete", reason, len(open_runs))
        for run_uid in open_runs:
            self._report(run_uid, IncompleteReason.NO_DESCRIPTOR, reason, log=False)

    def _seq_nums(self, doc: dict[str, Any], seq_nums: list[int]) -> None:
        descriptor = self._descriptors.get(doc["descriptor"])
        if descriptor is None:
            self._orphan(doc["descriptor"], "event")
            return
        run = self._touch(descriptor.run_uid, f"event of descriptor {doc['descriptor']}")
        for seq_num in seq_nums:
            if seq_num >= descriptor.next_seq_num:
                run.events_seen[descriptor.stream] = run.events_seen.get(descriptor.stream, 0) + 1
            if seq_num > descriptor.next_seq_num:
                missing = seq_num - descriptor.next_seq_num
                self.stats["missing_events"] += missing
                self._report(
                    descriptor.run_uid,
                    IncompleteReason.MISSING_EVENTS,
                    f"events {descriptor.next_seq_num}..{seq_num - 1} of stream {descriptor.stream!r} "
                    f"(descriptor {doc['descriptor']}) were not received",
                )
            descriptor.next_seq_num = max(descriptor.next_seq_num, seq_num + 1)

    def _event(self, doc: dict[str, Any]) -> None:
        self._seq_nums(doc, [doc["seq_num"]])

    def _event_page(self, doc: dict[str, Any]) -> None:
        self._seq_nums(doc, list(doc["seq_num"]))

    def _stream_datum(self, doc: dict[str, Any]) -> None:
        descriptor = self._descriptors.get(doc["descriptor"])
        if descriptor is None:
            self._orphan(doc["descriptor"], "stream datum")
            return
        run = self._touch(descriptor.run_uid, f"stream datum of descriptor {doc['descriptor']}")
        run.stream_datum_streams.add(descriptor.stream)
        start, stop = doc["seq_nums"]["start"], doc["seq_nums"]["stop"]
        expected = self._stream_resource_next.get(doc["stream_resource"])
        if expected is not None and start > expected:
            self.stats["missing_events"] += start - expected
            self._report(
                descriptor.run_uid,
                IncompleteReason.MISSING_EVENTS,
                f"stream data {expected}..{start - 1} of stream resource {doc['stream_resource']} were not received",
            )
        self._stream_resource_next[doc["stream_resource"]] = max(stop, expected or 0)

    def _stop(self, doc: dict[str, Any]) -> None:
        run_uid = doc["run_start"]
        if run_uid not in self._runs and run_uid in self._finished:
            logger.warning("second stop document for run %s ignored", run_uid)
            return
        self.stats["runs_stopped"] += 1
        run = self._touch(run_uid, "stop document")
        for stream, expected in (doc.get("num_events") or {}).items():
            seen = run.events_seen.get(stream, 0)
            if seen < expected and stream not in run.stream_datum_streams:
                self._report(run_uid, IncompleteReason.EVENT_COUNT,
                             f"stop counts {expected} events in stream {stream!r}, {seen} were received")
        self._forget(run_uid)
        self._finished[run_uid] = None
        if len(self._finished) > 1000:
            self._finished.popitem(last=False)

    def _forget(self, run_uid: str) -> None:
        """Drop what is kept of ``run_uid``: its state, descriptors and resources."""
        del self._runs[run_uid]
        for uid in [uid for uid, d in self._descriptors.items() if d.run_uid == run_uid]:
            del self._descriptors[uid]
        for uid in [uid for uid, r in self._resources.items() if r == run_uid]:
            del self._resources[uid]
            self._stream_resource_next.pop(uid, None)
