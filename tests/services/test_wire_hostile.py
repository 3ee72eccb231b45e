"""Hostile and broken traffic against a real proxy and a real `phasestream serve` subprocess: a message over
--max-message-size, a pickled message, a run whose start document was lost.

The worker's log is its stderr, which it inherits from this process: ``capfd`` reads it, so each test starts
its worker inside the test body, after ``capfd`` has taken over file descriptor 2.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable

import numpy as np
import pytest
from bluesky import RunEngine
from event_model import compose_run
from services.test_wire import _Touch
from services.test_worker import Collector, DroppingPublisher, _raw_publisher, running_worker, wait_for

from phasestream.app.live import ServeProcess
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import wait_for_result
from phasestream.store.tiled import raw_run_writer
from phasestream.transport.proxy import start_proxy
from phasestream.transport.tracking import RunTracker
from phasestream.transport.wire import ENVELOPE_TAG, DocumentPublisher, pack_frame, pickle_protocol, serialize
from phasestream.transport.worker import DocumentWorker

ENERGIES = select_energies(load_references("nvpf-synthetic"), 6)
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def proxy():
    with start_proxy() as proxy:
        yield proxy


class WorkerLog:
    """The stderr of the worker started in this test, accumulated from ``capfd``."""

    def __init__(self, capfd: pytest.CaptureFixture) -> None:
        self.capfd, self.text = capfd, ""

    def read(self) -> str:
        self.text += self.capfd.readouterr().err
        return self.text

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        wait_for(lambda: predicate(self.read()), timeout)
        return self.text


def _serve(proxy, tiled_server, *args: str, verbose: bool = False) -> ServeProcess:
    worker = ServeProcess(proxy.out_address, tiled_server.uri, args=("--backend", "numpy", "--no-refine", *args))
    if verbose:  # -v belongs before the command: INFO logs, among them "connected to ADDRESS"
        worker.command.insert(worker.command.index("serve"), "-v")
    return worker


def _energy_scan(RE: RunEngine, seed: int) -> tuple[str, object]:
    sample = make_sample((48, 48), state_of_charge=2.0, seed=seed, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=8000.0, seed=seed)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
    return uid, sample


def _result_metadata(client, uid: str) -> dict:
    try:
        return dict(client["phasestream"][uid].metadata)
    except KeyError:  # not written yet
        return {}


@pytest.mark.slow  # make test-stack
def test_oversize_message_is_dropped_before_it_is_read_and_the_next_run_completes(
    proxy, tiled_server, tiled_client, capfd
):
    log = WorkerLog(capfd)
    connected = f"INFO: connected to {proxy.out_address}"
    with (
        _serve(proxy, tiled_server, "--max-message-size", "256K", verbose=True) as worker,
        DocumentPublisher(proxy.in_address) as publisher,
    ):
        assert publisher.wait_for_subscriber(TIMEOUT)
        RE = RunEngine({})
        RE.subscribe(raw_run_writer(tiled_client))
        RE.subscribe(publisher)
        before, _ = _energy_scan(RE, seed=1)
        assert wait_for_result(tiled_client, before, timeout=TIMEOUT).metadata["status"] == "complete"

        # 1 MiB: over 256 KiB + the frame allowance. libzmq drops it with the connection; the worker reconnects
        publisher("start", {"uid": "oversize", "time": time.time(), "blob": np.zeros(1 << 20, np.uint8)})
        text = log.wait_for(lambda text: connected in text.partition("larger than max_message_size=262144")[2])
        time.sleep(0.3)  # the subscription travels to the proxy after the handshake

        after, sample = _energy_scan(RE, seed=2)
        md = wait_for_result(tiled_client, after, timeout=TIMEOUT).metadata
        assert md["status"] == "complete", md["errors"]
        assert sample.accuracy(tiled_client["phasestream"][after]["phase"].read()) > 0.97
        stats = worker.stop()

    assert "0MQ closed the connection" in text
    assert stats["oversize"] == 1
    # the dropped message is the one sequence number missing; no run was open, so none is reported
    assert (stats["lost"], stats["undecodable"], stats["incomplete_runs"]) == (1, 0, 0)
    assert stats["runs_stopped"] == 2


def test_pickled_message_is_refused_unread_with_a_message_naming_msgpack(proxy, tiled_server, tmp_path, capfd):
    marker = tmp_path / "unpickled"
    # what bluesky's Publisher sends with its default serializer, carrying a pickle that would touch `marker`
    frame = pack_frame(b"", "start", pickle.dumps({"uid": "pickled", "time": 0.0, "payload": _Touch(marker)}))
    log = WorkerLog(capfd)
    with _serve(proxy, tiled_server) as worker:
        context, raw = _raw_publisher(proxy.in_address)
        sent = 0
        try:

            def refused() -> bool:
                nonlocal sent
                if "looks like a pickle" in log.read():
                    return True
                raw.send(frame)  # again: the worker's subscription may not have reached the proxy yet
                sent += 1
                time.sleep(0.2)
                return False

            wait_for(refused, TIMEOUT)
        finally:
            raw.close(linger=0)
            context.term()
        stats = worker.stop()

    assert f"looks like a pickle (protocol {pickle.DEFAULT_PROTOCOL})" in log.text
    assert "Publishers must send msgpack" in log.text and "pickle is never accepted" in log.text
    assert 1 <= stats["undecodable"] <= sent and stats["received"] == 0
    assert not marker.exists()  # neither the proxy nor the worker unpickled it


@pytest.mark.slow  # make test-stack
def test_run_whose_start_was_lost_is_logged_once_and_reprocessed_from_tiled(proxy, tiled_server, tiled_client, capfd):
    log = WorkerLog(capfd)
    emitted: list[str] = []
    with (
        _serve(proxy, tiled_server) as worker,
        DroppingPublisher(proxy.in_address, drop=1) as publisher,  # loses the start document
    ):
        assert publisher.wait_for_subscriber(TIMEOUT)
        RE = RunEngine({})
        RE.subscribe(raw_run_writer(tiled_client))
        RE.subscribe(publisher)
        RE.subscribe(lambda name, doc: emitted.append(name))
        uid, sample = _energy_scan(RE, seed=3)
        wait_for(lambda: "recovered" in _result_metadata(tiled_client, uid), 2 * TIMEOUT)
        stats = worker.stop()

    node = tiled_client["phasestream"][uid]
    assert node.metadata["status"] == "complete"
    assert sample.accuracy(node["phase"].read()) > 0.97
    lines = [line for line in log.read().splitlines() if uid in line]
    assert len(lines) == 1, lines
    assert "documents arrived without its start document" in lines[0]
    assert "rejected" not in log.text and "KeyError" not in log.text
    assert stats["withheld"] == len(emitted) - 1 and stats["runs_without_start"] == 1
    assert (stats["missed_at_join"], stats["lost"]) == (1, 0)


def test_pickle_is_recognised_by_its_header_only():
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert pickle_protocol(pickle.dumps({"uid": "x"}, protocol=protocol)) == protocol
    assert pickle_protocol(pickle.dumps({"uid": "x"}, protocol=1)) is None  # no header before protocol 2
    assert pickle_protocol(serialize({"uid": "x"})) is None
    assert pickle_protocol(b"\x80") is None and pickle_protocol(b"") is None


def test_proxy_restart_is_a_disconnection_not_an_oversize_message(caplog):
    """libzmq reconnects by itself when the proxy goes away: the receiver must not count that as oversize."""
    received = Collector()
    first = start_proxy()
    in_port, out_port = (int(address.rsplit(":", 1)[1]) for address in (first.in_address, first.out_address))
    try:
        with running_worker(first, received) as worker:
            first.stop()
            wait_for(lambda: not worker.connected.is_set())
            with start_proxy(in_port, out_port) as second, DocumentPublisher(second.in_address) as publisher:
                assert publisher.wait_for_subscriber(TIMEOUT)
                assert worker.connected.wait(TIMEOUT)
                deadline = time.monotonic() + TIMEOUT  # the worker's subscription follows its handshake
                while not received.docs and time.monotonic() < deadline:
                    publisher("start", {"uid": "after-restart", "time": 0.0})
                    time.sleep(0.1)
            stats = worker.stats
    finally:
        first.stop()
    assert received.docs and received.docs[0][1]["uid"] == "after-restart"
    assert stats["oversize"] == 0
    assert "disconnected from" in caplog.text and "0MQ closed the connection" not in caplog.text


def _run_documents() -> tuple[str, list[tuple[str, dict]]]:
    """The uid and documents of a run with a descriptor, a resource, a datum and an event."""
    bundle = compose_run()
    data_keys = {"x": {"source": "s", "dtype": "number", "shape": []}}
    descriptor = bundle.compose_descriptor(name="primary", data_keys=data_keys)
    resource = bundle.compose_resource(spec="S", root="/", resource_path="f", resource_kwargs={})
    return bundle.start_doc["uid"], [
        ("start", bundle.start_doc),
        ("descriptor", descriptor.descriptor_doc),
        ("resource", resource.resource_doc),
        ("datum", resource.compose_datum(datum_kwargs={})),
        ("event", descriptor.compose_event(data={"x": 1.0}, timestamps={"x": 0.0})),
        ("stop", bundle.compose_stop()),
    ]


def test_tracker_holds_back_every_document_of_a_run_without_start():
    tracker = RunTracker()
    (lost_uid, lost), (_, seen) = _run_documents(), _run_documents()

    def analysable(docs: list[tuple[str, dict]]) -> list[bool]:
        verdicts = []
        for name, doc in docs:
            tracker(name, doc)  # the worker's order: the tracker sees the document first
            verdicts.append(tracker.analysable(name, doc))
        return verdicts

    assert analysable(lost[1:]) == [False] * 5
    assert analysable(seen) == [True] * 6
    assert tracker.stats["runs_without_start"] == 1 and list(tracker.incomplete) == [lost_uid]
    orphan = {"descriptor": "never-seen", "seq_num": 1, "uid": "e", "data": {}, "timestamps": {}, "time": 0.0}
    assert analysable([("event", orphan)]) == [True]  # not placed in a run: the callback decides


def test_a_stray_sequence_number_does_not_silence_its_publisher():
    """A message numbered far ahead under a publisher's id (forged, or a publisher restarted under a
    fixed id) must not make the receiver drop everything that publisher sends afterwards."""
    received = Collector()
    worker = DocumentWorker(0, received)

    def send(seq: int, name: str, uid: str) -> None:
        worker.receiver.handle_message(pack_frame(b"", name, serialize([ENVELOPE_TAG, "beamline", seq, {"uid": uid}])))

    send(1, "start", "a")
    send(2**63, "start", "stray")
    send(2, "descriptor", "d")  # far behind: the sequence starts again, delivered
    send(3, "stop", "s")
    send(3, "stop", "s-again")  # a duplicate right behind the last one is still dropped
    send(1, "start", "b")  # a publisher restarted under the same id
    assert [doc["uid"] for _, doc in received.docs] == ["a", "stray", "d", "s", "b"]
    assert (worker.stats["restarts"], worker.stats["out_of_order"]) == (2, 1)


class _Reports:
    """A listener counting the runs reported incomplete, by kind."""

    def __init__(self):
        self.reports: list[tuple[str, str]] = []

    def run_incomplete(self, run_uid, reason, *, kind):
        self.reports.append((run_uid, kind))


def test_documents_whose_identifiers_are_not_uids_are_not_tracked(caplog):
    """An event naming a megabyte "descriptor uid" was logged in full once per open run (3 such events and 500
    open runs: 1.6 GB of log). The tracker keys only on uids; anything else is counted and logged sparsely."""
    reports = _Reports()
    worker = DocumentWorker(0, Collector(), listener=reports)
    for i in range(500):
        worker.receiver.handle_message(pack_frame(b"", "start", serialize({"uid": f"run-{i}", "time": 0.0})))
    caplog.clear()
    for j in range(3):
        event = {"descriptor": f"{j}" + "d" * (1 << 20), "seq_num": 1, "uid": "e", "time": 0.0, "data": {},
                 "timestamps": {}}
        worker.receiver.handle_message(pack_frame(b"", "event", serialize(event)))
    for uid in (["a list"], "x" * 129, "../up"):
        worker.receiver.handle_message(pack_frame(b"", "start", serialize({"uid": uid, "time": 0.0})))
    assert len(caplog.text) < 10_000, len(caplog.text)
    assert worker.tracker.stats["untracked"] == 6 and reports.reports == []
    assert len(worker.tracker.open_runs) == 500


def test_an_event_of_an_unknown_descriptor_is_logged_once_and_every_open_run_reported(caplog):
    reports = _Reports()
    tracker = RunTracker(reports)
    for i in range(500):
        tracker("start", {"uid": f"run-{i}", "time": 0.0})
    caplog.clear()
    tracker("event", {"descriptor": "never-seen", "seq_num": 1, "uid": "e", "time": 0.0, "data": {}})
    assert len([r for r in caplog.records if "never-seen" in r.getMessage()]) == 1
    assert len(reports.reports) == 500 and {kind for _, kind in reports.reports} == {"no descriptor document"}


def test_runs_that_never_stop_and_publishers_are_kept_to_a_bound():
    """Starts that never stop were kept for ever (and each publisher id the receiver heard of): a flood of
    them grew the worker's memory without end (0.64 GB for 300 messages of 2 MB)."""
    from phasestream.transport.tracking import MAX_TRACKED_RUNS
    from phasestream.transport.worker import MAX_PUBLISHERS

    now = [0.0]
    tracker = RunTracker(stop_timeout=1.0, clock=lambda: now[0])
    for i in range(MAX_TRACKED_RUNS + 500):
        now[0] += 0.001
        tracker("start", {"uid": f"run-{i}", "time": 0.0})
    now[0] += 10.0
    tracker("start", {"uid": "open", "time": 0.0})
    tracker.check_timeouts()
    assert tracker.stats["forgotten_runs"] == 501 and tracker.open_runs == ["open"]
    assert len(tracker.incomplete) <= MAX_TRACKED_RUNS and "run-1499" in tracker.incomplete
    tracker("stop", {"run_start": "run-1499", "uid": "s", "time": 0.0})  # a kept run is still tracked

    worker = DocumentWorker(0, Collector())
    for i in range(MAX_PUBLISHERS + 200):
        worker.receiver.handle_message(pack_frame(b"", "start", serialize([ENVELOPE_TAG, f"p{i}", 1, {"uid": "a"}])))
    assert len(worker.receiver._last_seq) == MAX_PUBLISHERS and worker.stats["publishers"] == MAX_PUBLISHERS + 200
    worker.receiver.handle_message(pack_frame(b"", "start", serialize([ENVELOPE_TAG, "p" * 300, 1, {"uid": "b"}])))
    assert worker.stats["undecodable"] == 1
