"""Worker: RunEngine -> DocumentPublisher -> proxy subprocess -> worker, over real sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq
from bluesky import RunEngine
from bluesky.plans import count, scan
from event_model import compose_run
from ophyd.sim import DirectImage, det, motor
from support import normalize

from phasestream.contract import IncompleteReason
from phasestream.transport.proxy import start_proxy
from phasestream.transport.tracking import RunTracker
from phasestream.transport.wire import DocumentPublisher, pack_frame, serialize
from phasestream.transport.worker import DocumentWorker, run_worker

TIMEOUT = 10.0


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


class Collector:
    """Document callback that keeps (name, doc) in arrival order; ``arrived`` is set by the first document."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict]] = []
        self.arrived = threading.Event()

    def __call__(self, name: str, doc: dict) -> None:
        self.docs.append((name, doc))
        self.arrived.set()

    def names(self) -> list[str]:
        return [name for name, _ in self.docs]


class Listener:
    """RunIncompleteListener that records its reports."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str]] = []

    def run_incomplete(self, run_uid: str, reason: str, *, kind: IncompleteReason) -> None:
        self.reports.append((run_uid, reason))


@pytest.fixture(scope="module")
def proxy():
    with start_proxy() as proxy:
        yield proxy


@pytest.fixture
def publisher(proxy) -> Iterator[DocumentPublisher]:
    with DocumentPublisher(proxy.in_address) as publisher:
        assert publisher.wait_for_subscriber(TIMEOUT)
        yield publisher


PROBE = "subscription-probe"


def probe_frame(n: int) -> bytes:
    """Subscription probe ``n``: an unsequenced datum of resource PROBE, as a plain bluesky publisher sends it."""
    datum = {"resource": PROBE, "datum_id": f"{PROBE}/{n}", "datum_kwargs": {"n": n}}
    return pack_frame(b"", "datum", serialize(datum))


def send_probes(in_address: str, arrived: Callable[[int], bool], timeout: float = TIMEOUT) -> None:
    """Publish probes 1, 2, ... into the proxy until ``arrived(n)`` (a short wait) says that the last one arrived."""
    context, raw = _raw_publisher(in_address)
    deadline = time.monotonic() + timeout
    try:
        for n in itertools.count(1):
            raw.send(probe_frame(n))
            if arrived(n):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker's subscription did not reach the proxy within {timeout} s")
    finally:
        raw.close(linger=0)
        context.term()


class SubscriptionProbes:
    """Finds out when a worker's subscription has reached the proxy, which nothing else tells (PUB/SUB).

    0MQ drops what the proxy publishes before the worker's subscription has arrived there. Probes are
    sent until the last one sent arrives: unsequenced ``datum`` documents of no resource, which the
    run tracker ignores and this callback wrapper keeps from the test's callback. Once the last probe
    sent has arrived no other one can follow (one path, in order), so :meth:`stats` can take exactly
    the probes that arrived out of the worker's counters.
    """

    def __init__(self, callback) -> None:
        self.callback = callback
        self.received = 0
        self.last = 0
        self._arrived = threading.Condition()

    def __call__(self, name: str, doc: dict) -> None:
        if name == "datum" and doc.get("resource") == PROBE:
            with self._arrived:
                self.received += 1
                self.last = doc["datum_kwargs"]["n"]
                self._arrived.notify_all()
        else:
            self.callback(name, doc)

    def until_subscribed(self, in_address: str, timeout: float = TIMEOUT) -> None:
        def arrived(n: int) -> bool:
            with self._arrived:
                return self._arrived.wait_for(lambda: self.last == n, timeout=0.05)

        send_probes(in_address, arrived, timeout)

    def stats(self, worker: DocumentWorker) -> dict:
        """The worker's counters without the probes (unsequenced documents received)."""
        stats = worker.stats
        for key in ("messages", "received", "unsequenced"):
            stats[key] -= self.received
        return stats


class ProbedWorker:
    """A running :class:`DocumentWorker` whose subscription is known to be in place; ``stats`` leave out the probes."""

    def __init__(self, worker: DocumentWorker, probes: SubscriptionProbes) -> None:
        self.worker, self.probes = worker, probes

    @property
    def stats(self) -> dict:
        return self.probes.stats(self.worker)

    @property
    def tracker(self) -> RunTracker:
        return self.worker.tracker

    @property
    def connected(self) -> threading.Event:
        return self.worker.connected


@contextlib.contextmanager
def running_worker(proxy, callback, **kwargs) -> Iterator[ProbedWorker]:
    """A DocumentWorker in a thread, subscribed through ``proxy`` (probed, see SubscriptionProbes); always joined."""
    probes = SubscriptionProbes(callback)
    worker = DocumentWorker(proxy.out_address, probes, **kwargs)
    thread = threading.Thread(target=worker.run, name="test-worker")
    thread.start()
    try:
        assert worker.connected.wait(TIMEOUT)
        probes.until_subscribed(proxy.in_address)
        yield ProbedWorker(worker, probes)
    finally:
        worker.stop()
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def _camera() -> DirectImage:
    rng = np.random.default_rng(1)
    return DirectImage(name="det", func=lambda: rng.integers(0, 65535, size=(128, 128), dtype=np.uint16))


def test_runengine_documents_arrive_in_order_and_intact(proxy, publisher):
    received, listener, emitted = Collector(), Listener(), Collector()
    with running_worker(proxy, received, listener=listener) as worker:
        RE = RunEngine({})
        RE.subscribe(publisher)
        RE.subscribe(emitted)
        RE(count([_camera(), det], 4))
        RE(scan([det], motor, -1, 1, 5))
        wait_for(lambda: received.names().count("stop") == 2)
        stats = worker.stats

    assert received.names() == emitted.names()
    assert [normalize(doc) for _, doc in received.docs] == [normalize(doc) for _, doc in emitted.docs]
    images = [
        (doc, sent)
        for (name, doc), (_, sent) in zip(received.docs, emitted.docs, strict=True)
        if "det_img" in doc.get("data", {})
    ]
    assert len(images) == 4
    for doc, sent in images:
        assert doc["data"]["det_img"].dtype == np.uint16 and doc["data"]["det_img"].shape == (128, 128)
        np.testing.assert_array_equal(doc["data"]["det_img"], sent["data"]["det_img"])
    assert stats["received"] == len(emitted.docs) == stats["messages"]
    assert (stats["lost"], stats["gaps"], stats["missed_at_join"], stats["undecodable"]) == (0, [], 0, 0)
    assert (stats["runs_started"], stats["runs_stopped"], stats["reports"]) == (2, 2, 0)
    assert listener.reports == []


class DroppingPublisher(DocumentPublisher):
    """Loses the n-th frame it sends, as a full 0MQ queue would."""

    def __init__(self, *args, drop: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop, self.frames = drop, 0

    def _send(self, frame: bytes) -> None:
        self.frames += 1
        if self.frames != self.drop:
            super()._send(frame)


def test_lost_message_marks_the_open_run(proxy):
    received, listener = Collector(), Listener()
    with (
        running_worker(proxy, received, listener=listener) as worker,
        DroppingPublisher(proxy.in_address, drop=5) as publisher,  # start, descriptor, event 1, 2, [3]
    ):
        assert publisher.wait_for_subscriber(TIMEOUT)
        RE = RunEngine({})
        RE.subscribe(publisher)
        (run_uid,) = RE(count([det], 5))
        wait_for(lambda: "stop" in received.names())
        stats = worker.stats

    assert [doc["seq_num"] for name, doc in received.docs if name == "event"] == [1, 2, 4, 5]
    assert (stats["lost"], stats["gaps"]) == (1, [1])
    assert {uid for uid, _ in listener.reports} == {run_uid}
    reasons = " | ".join(reason for _, reason in listener.reports)
    assert "1 message(s) lost while the run was open" in reasons
    assert "events 3..3 of stream 'primary'" in reasons
    assert "stop counts 5 events in stream 'primary', 4 were received" in reasons


def _raw_publisher(address: str) -> tuple[zmq.Context, zmq.Socket]:
    """A plain 0MQ XPUB socket connected to the proxy, returned once the proxy has subscribed."""
    context = zmq.Context()
    sock = context.socket(zmq.XPUB)
    sock.connect(address)
    assert sock.poll(int(TIMEOUT * 1000)) and sock.recv() == b"\x01"
    return context, sock


def test_undecodable_messages_are_counted_and_the_next_run_delivered(proxy, publisher, caplog):
    received, listener = Collector(), Listener()
    garbage = [
        b"no-spaces-at-all",
        b" start " + pickle.dumps({"uid": "pickled"}),
        b" not_a_document " + serialize({"uid": "x"}),
        b" event \xc1\xc1\xc1",
        b" start " + serialize([1, 2, 3]),  # neither a document nor an envelope
        b" event " + bytes(range(256)),
    ]
    context, raw = _raw_publisher(proxy.in_address)
    try:
        with running_worker(proxy, received, listener=listener) as worker:
            for frame in garbage:
                raw.send(frame)
            wait_for(lambda: worker.stats["undecodable"] == len(garbage))
            RE = RunEngine({})
            RE.subscribe(publisher)
            RE(count([_camera()], 2))
            wait_for(lambda: "stop" in received.names())
            stats = worker.stats
    finally:
        raw.close(linger=0)
        context.term()

    assert received.names() == ["start", "descriptor", "event", "event", "stop"]
    assert (stats["undecodable"], stats["received"], stats["lost"]) == (len(garbage), 5, 0)
    assert listener.reports == []
    assert "unknown document name 'not_a_document'" in caplog.text
    assert "not a valid msgpack message" in caplog.text


def test_unsequenced_documents_from_a_plain_bluesky_publisher_are_delivered(proxy):
    received = Collector()
    start, *_ = compose_run()
    context, raw = _raw_publisher(proxy.in_address)  # what bluesky's Publisher(serializer=serialize) sends
    try:
        with running_worker(proxy, received) as worker:
            raw.send(pack_frame(b"", "start", serialize(start)))
            wait_for(lambda: worker.stats["received"] == 1)
            stats = worker.stats
    finally:
        raw.close(linger=0)
        context.term()
    assert received.docs == [("start", start)]
    assert (stats["unsequenced"], stats["lost"]) == (1, 0)


def test_run_without_stop_is_reported_after_stop_timeout(proxy, publisher):
    received, listener = Collector(), Listener()
    bundle = compose_run()
    descriptor = bundle.compose_descriptor(
        name="primary", data_keys={"x": {"source": "sim", "dtype": "number", "shape": []}}
    )
    with running_worker(proxy, received, listener=listener, stop_timeout=0.5) as worker:
        publisher("start", bundle.start_doc)
        publisher("descriptor", descriptor.descriptor_doc)
        publisher("event", descriptor.compose_event(data={"x": 1.0}, timestamps={"x": time.time()}))
        wait_for(lambda: len(received.docs) == 3)
        last_doc = time.monotonic()
        wait_for(lambda: listener.reports)
        waited = time.monotonic() - last_doc
        publisher("stop", bundle.compose_stop())  # late: tracked, but not reported a second time
        wait_for(lambda: "stop" in received.names())
        # the tracker saw the stop before the callback did: the run is closed, no timeout can report it again
        assert worker.tracker.open_runs == []

    assert 0.4 < waited < 5.0
    assert listener.reports == [(bundle.start_doc["uid"], "no stop document within 0.5 s of the run's last document")]


def test_event_of_unseen_descriptor_is_reported(proxy, publisher):
    received, listener = Collector(), Listener()
    bundle = compose_run()
    data_keys = {"x": {"source": "sim", "dtype": "number", "shape": []}}
    seen = bundle.compose_descriptor(name="primary", data_keys=data_keys)
    unseen = bundle.compose_descriptor(name="baseline", data_keys=data_keys)
    with running_worker(proxy, received, listener=listener) as worker:
        publisher("start", bundle.start_doc)
        publisher("descriptor", seen.descriptor_doc)
        publisher("event", unseen.compose_event(data={"x": 1.0}, timestamps={"x": 0.0}))
        publisher("event", unseen.compose_event(data={"x": 2.0}, timestamps={"x": 0.0}))
        wait_for(lambda: len(received.docs) == 4)
        stats = worker.stats
    assert stats["lost"] == 0 and stats["orphan_events"] == 2
    assert listener.reports == [
        (
            bundle.start_doc["uid"],
            f"event of descriptor {unseen.descriptor_doc['uid']}, whose descriptor document was not received",
        )
    ]


def test_callback_exception_does_not_stop_delivery(proxy, publisher, caplog):
    received = Collector()

    def fragile(name: str, doc: dict) -> None:
        received(name, doc)
        if name == "event" and doc["seq_num"] == 1:
            raise RuntimeError("analysis failed on the first image")

    with running_worker(proxy, fragile) as worker:
        RE = RunEngine({})
        RE.subscribe(publisher)
        RE(count([_camera()], 3))
        wait_for(lambda: "stop" in received.names())
        stats = worker.stats
    assert received.names() == ["start", "descriptor", "event", "event", "event", "stop"]
    assert stats["callback_errors"] == 1
    assert "analysis failed on the first image" in caplog.text


def test_messages_before_the_worker_joined_are_counted_apart(proxy, publisher):
    for i in range(3):
        publisher("start", {"uid": f"before-{i}", "time": 0.0})
    received = Collector()
    with running_worker(proxy, received) as worker:
        publisher("start", {"uid": "after", "time": 0.0})
        wait_for(lambda: received.docs)
        stats = worker.stats
    assert received.names() == ["start"] and received.docs[0][1]["uid"] == "after"
    assert (stats["missed_at_join"], stats["lost"]) == (3, 0)


def test_run_worker_returns_when_stop_event_is_set(proxy, publisher):
    received, stop, result = Collector(), threading.Event(), {}
    thread = threading.Thread(
        target=lambda: result.update(run_worker(proxy.out_address, received, stop_timeout=5.0, stop_event=stop))
    )
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT  # no handle on the worker: publish until one document arrives
        while time.monotonic() < deadline:
            publisher("start", {"uid": "ping", "time": 0.0})
            if received.arrived.wait(0.1):
                break
    finally:
        stop.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert result["received"] == len(received.docs) >= 1


WORKER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from phasestream.transport.worker import DocumentWorker

    address, names_path, probes_path, stats_path, probe = sys.argv[1:]
    names, probes = open(names_path, "w"), open(probes_path, "w")
    received_probes = 0

    def record(name, doc):
        global received_probes
        if name == "datum" and doc.get("resource") == probe:
            received_probes += 1
            probes.write(f"{doc['datum_kwargs']['n']}\\n")
            probes.flush()
            return
        names.write(name + "\\n")
        names.flush()

    stats = DocumentWorker(address, record).run()
    json.dump({**stats, "probes": received_probes}, open(stats_path, "w"))
    """
)


def test_worker_subprocess_stops_cleanly_on_sigterm(proxy, publisher, tmp_path):
    names, probes, stats_path = tmp_path / "names", tmp_path / "probes", tmp_path / "stats.json"
    command = [sys.executable, "-c", WORKER_SCRIPT, proxy.out_address, str(names), str(probes), str(stats_path), PROBE]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def arrived(n: int) -> bool:  # the subprocess wrote probe n as its last line
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:
            if probes.exists() and probes.read_text().split()[-1:] == [str(n)]:
                return True
            time.sleep(0.005)
        return False

    try:
        send_probes(proxy.in_address, arrived, timeout=30.0)  # started, connected and subscribed
        RE = RunEngine({})
        RE.subscribe(publisher)
        RE(count([_camera()], 2))
        wait_for(lambda: names.exists() and "stop" in names.read_text().split())
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)
    stats = json.loads(stats_path.read_text())
    assert names.read_text().split() == ["start", "descriptor", "event", "event", "stop"]
    assert stats["probes"] == stats["unsequenced"] >= 1
    assert (stats["received"] - stats["probes"], stats["lost"], stats["runs_stopped"]) == (5, 0, 1)


# -- RunTracker alone, with a fake clock ----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run_with_events(n: int):
    bundle = compose_run()
    descriptor = bundle.compose_descriptor(
        name="primary", data_keys={"x": {"source": "s", "dtype": "number", "shape": []}}
    )
    events = [descriptor.compose_event(data={"x": float(i)}, timestamps={"x": 0.0}) for i in range(n)]
    return bundle, descriptor.descriptor_doc, events


def test_tracker_reports_event_gaps_pages_and_missing_starts():
    listener = Listener()
    tracker = RunTracker(listener, stop_timeout=10.0, clock=FakeClock())
    bundle, descriptor, events = _run_with_events(6)
    tracker("start", bundle.start_doc)
    tracker("descriptor", descriptor)
    tracker("event", events[0])
    tracker("event_page", {"descriptor": descriptor["uid"], "seq_num": [4, 5], "uid": ["a", "b"]})
    tracker("event", events[3])  # seq 4 again: a duplicate, not a gap
    tracker("stop", bundle.compose_stop())
    other, other_descriptor, _ = _run_with_events(1)
    tracker("descriptor", other_descriptor)  # its start never came
    uid, other_uid = bundle.start_doc["uid"], other.start_doc["uid"]
    assert listener.reports == [
        (uid, f"events 2..3 of stream 'primary' (descriptor {descriptor['uid']}) were not received"),
        (uid, "stop counts 6 events in stream 'primary', 3 were received"),
        (other_uid, f"descriptor {other_descriptor['uid']} arrived for a run whose start document was not received"),
    ]
    assert tracker.stats["missing_events"] == 2
    assert tracker.open_runs == [other_uid]


def test_tracker_timeouts_are_reported_once_and_runs_revive():
    listener, clock = Listener(), FakeClock()
    tracker = RunTracker(listener, stop_timeout=5.0, clock=clock)
    bundle, descriptor, events = _run_with_events(2)
    tracker("start", bundle.start_doc)
    tracker("descriptor", descriptor)
    clock.now = 4.0
    tracker("event", events[0])
    clock.now = 8.9
    assert tracker.check_timeouts() == []
    clock.now = 9.1
    assert tracker.check_timeouts() == [bundle.start_doc["uid"]]
    assert tracker.open_runs == []
    tracker.message_gap("pub", 10, 12)  # a timed-out run is not open any more
    tracker("event", events[1])  # documents resume: tracked again, not reported again
    assert tracker.open_runs == [bundle.start_doc["uid"]]
    clock.now = 30.0
    assert tracker.check_timeouts() == [bundle.start_doc["uid"]]
    stop = bundle.compose_stop()
    tracker("stop", stop)
    tracker("stop", stop)  # a duplicate stop is ignored
    assert len(listener.reports) == 1 and "no stop document within 5 s" in listener.reports[0][1]
    assert tracker.stats["runs_stopped"] == 1


def test_tracker_survives_a_failing_listener(caplog):
    class Broken:
        def run_incomplete(self, run_uid: str, reason: str, *, kind: IncompleteReason) -> None:
            raise RuntimeError("tiled is down")

    tracker = RunTracker(Broken(), stop_timeout=1.0, clock=FakeClock())
    bundle, _, _ = _run_with_events(0)
    tracker("stop", bundle.compose_stop())  # stop of a run whose start never came
    assert tracker.stats["reports"] == 1
    assert "tiled is down" in caplog.text


def test_tracker_checks_stream_datum_continuity_per_stream_resource():
    listener = Listener()
    tracker = RunTracker(listener, clock=FakeClock())
    bundle, descriptor, _ = _run_with_events(0)
    tracker("start", bundle.start_doc)
    tracker("descriptor", descriptor)
    tracker("stream_resource", {"uid": "sr1", "run_start": bundle.start_doc["uid"], "data_key": "x"})
    for start, stop in [(1, 3), (3, 5), (7, 8)]:
        doc = {"descriptor": descriptor["uid"], "stream_resource": "sr1", "seq_nums": {"start": start, "stop": stop}}
        tracker("stream_datum", doc)
    stop = bundle.compose_stop()
    stop["num_events"] = {"primary": 7}  # stream-datum streams are not compared with events
    tracker("stop", stop)
    assert listener.reports == [(bundle.start_doc["uid"], "stream data 5..6 of stream resource sr1 were not received")]
