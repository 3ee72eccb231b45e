"""Faults against the real processes: every run ends in a final status that is true.

A real Tiled server process (SQLite catalog on disk, so it can be killed and started again), a
real 0MQ proxy, real ``phasestream serve`` worker processes and a RunEngine whose raw runs
TiledWriter stores. The worker is stopped (SIGTERM) or killed (SIGKILL) mid-run and right
after the scan, and Tiled is killed while the worker writes a run's final result. Each run's
final status is checked against the raw data in Tiled and the simulator's truth.

Slow (processes start and stop): run with ``make test-faults``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from services_support import PORT_TAKEN, free_port, uvicorn_port
from support import recorded_scan

from phasestream.app.live import ServeProcess
from phasestream.callbacks import PhaseMapCallback
from phasestream.references import load_references, select_energies
from phasestream.store.tiled import connect
from phasestream.transport.proxy import start_proxy
from phasestream.transport.wire import DocumentPublisher

pytestmark = pytest.mark.faults

ENERGIES = select_energies(load_references("nvpf-synthetic"), 8)
SHAPE = (48, 48)


class TiledServer:
    """``tiled serve catalog`` on a folder that outlives the process (kill it, start it again)."""

    def __init__(self, folder: Path):
        self.folder, self.key = folder, secrets.token_hex(16)
        self.port = 0  # the first start binds a free port; later ones bind the same, the clients' URI
        self.proc: subprocess.Popen | None = None
        self._started = False

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TiledServer:
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        init = [] if self._started else ["--init"]
        cmd = [str(Path(sys.executable).parent / "tiled"), "serve", "catalog", str(self.folder / "catalog.db"),
               *init, "-w", str(self.folder / "data"), "-w", f"duckdb:///{self.folder / 'tables.duckdb'}",
               "--host", "127.0.0.1", "--port", str(self.port)]
        path = self.folder / "tiled.log"
        offset = path.stat().st_size if path.exists() else 0
        log = path.open("a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TILED_SINGLE_USER_API_KEY": self.key})
        self._started = True
        try:
            self.port = uvicorn_port(path, self.proc, offset=offset)
        except RuntimeError as exc:
            if self.port and PORT_TAKEN.search(str(exc)):
                raise RuntimeError(f"another process took port {self.port} while tiled was down: "
                                   f"it cannot come back at {self.uri}") from exc
            raise
        deadline = time.monotonic() + 60
        while True:
            try:
                connect(self.uri, api_key=self.key)
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.folder / "tiled.log").read_text()[-2000:]
                    raise RuntimeError(f"tiled did not start: {log}") from None
                time.sleep(0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def client(self):
        return connect(self.uri, api_key=self.key)


@pytest.fixture
def tiled(tmp_path) -> Iterator[TiledServer]:
    server = TiledServer(tmp_path / "tiled").start()
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.terminate()
            server.proc.wait(10)


@contextlib.contextmanager
def transport() -> Iterator[tuple]:
    """A real 0MQ proxy and a publisher into it."""
    with start_proxy() as proxy, DocumentPublisher(proxy.in_address) as publisher:
        yield proxy, publisher


@contextlib.contextmanager
def worker(wire: tuple, tiled: TiledServer, *args: str) -> Iterator[ServeProcess]:
    """``phasestream serve`` on the proxy of ``wire``, started once the publisher reaches it.

    Partial maps strictly every 2 images (``--partial-budget none``): with the default budget a
    worker that meets its first images during numba's first compilation (a fresh clone, a slow
    machine) takes them in a burst and rightly publishes no partial map, which these tests wait for.
    """
    proxy, publisher = wire
    process = ServeProcess(proxy.out_address, f"{tiled.uri}?api_key={tiled.key}",
                           args=("--backend", "numba", "--no-refine", "--update-every", "2", "--update-seconds", "0.2",
                                 "--partial-budget", "none", *args))
    process.start()
    try:
        assert publisher.wait_for_subscriber(10)
        yield process
    finally:
        process.stop()


def raw_scan(client, seed: int):
    """An honest scan whose raw run TiledWriter stores; its documents, for publishing, and its sample."""
    return recorded_scan(client, ENERGIES, shape=SHAPE, seed=seed)


def wait_md(client, uid: str, until, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    md: dict = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(KeyError):
            md = dict(client["phasestream"][uid].metadata)
            if until(md):
                return md
        time.sleep(0.1)
    raise AssertionError(f"result of {uid} never reached the expected state; last seen {md}")


def publish(wire: tuple, docs, *, pace: float = 0.0) -> None:
    """Send ``docs`` through the publisher of ``wire``, waiting ``pace`` seconds after each event.

    A burst of events may rightly publish no partial maps (at most one per ``min_update_seconds``
    after the start): tests that wait for partial maps pace the events with :data:`PACE`.
    """
    for name, doc in docs:
        wire[1](name, doc)
        if name == "event" and pace:
            time.sleep(pace)


# longer than the gap the partial-map policy keeps between updates: the second image is due
PACE = inspect.signature(PhaseMapCallback).parameters["min_update_seconds"].default + 0.1


def first_events(docs, n: int):
    """The documents up to and including the ``n``-th event (no stop)."""
    out, seen = [], 0
    for name, doc in docs:
        out.append((name, doc))
        seen += name == "event"
        if seen == n:
            return out
    raise ValueError(f"fewer than {n} events")


def assert_true_to_the_raw_run(client, uid: str, sample) -> None:
    res = client["phasestream"][uid]
    md = res.metadata
    assert md["status"] == "complete", md["errors"]
    assert md["n_energies_seen"] == len(ENERGIES)
    assert res["od"].read().shape == (len(ENERGIES), *SHAPE)
    assert sample.accuracy(res["phase"].read()) > 0.9


def test_sigterm_mid_run_ends_partial_and_sigkill_mid_run_is_recovered(tiled):
    client = tiled.client()
    (stopped, _), (killed, killed_sample) = raw_scan(client, 1), raw_scan(client, 2)
    with transport() as wire:
        # a stop timeout longer than the test: on a fresh clone the first images wait for numba's
        # compilation, and a run without documents for --stop-timeout is (rightly) recovered complete
        with worker(wire, tiled, "--stop-timeout", "600") as first:
            publish(wire, first_events(stopped, 4), pace=PACE)
            uid = stopped[0][1]["uid"]
            wait_md(client, uid, lambda md: md["n_energies_seen"] >= 2 and md["status"] == "running")
            first.stop()  # SIGTERM
            assert first.returncode == 0
        md = dict(client["phasestream"][uid].metadata)
        assert md["status"] == "partial" and "worker stopped" in md["errors"]

        with worker(wire, tiled, "--stop-timeout", "600") as second:
            publish(wire, first_events(killed, 4), pace=PACE)
            uid = killed[0][1]["uid"]
            wait_md(client, uid, lambda md: md["n_energies_seen"] >= 2)
            second.proc.send_signal(signal.SIGKILL)
            second.proc.wait(10)
        assert client["phasestream"][uid].metadata["status"] == "running"

        # a new worker finds the result no live worker touches, and recovers it from the raw run
        with worker(wire, tiled, "--stop-timeout", "2"):
            md = wait_md(client, uid, lambda md: "recovered" in md)
            assert md["recovered"]["reason"] == "worker restarted", md
            assert_true_to_the_raw_run(client, uid, killed_sample)
            # the partial result of the stopped run is final: left as it is
            assert client["phasestream"][stopped[0][1]["uid"]].metadata["status"] == "partial"


def test_sigkill_right_after_the_scan_ends_complete(tiled):
    client = tiled.client()
    docs, sample = raw_scan(client, 3)
    uid = docs[0][1]["uid"]
    with transport() as wire:
        with worker(wire, tiled, "--stop-timeout", "2") as first:
            publish(wire, docs)
            wait_md(client, uid, lambda md: True)  # the result exists; its final write may be under way
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
        with worker(wire, tiled, "--stop-timeout", "2"):
            # killed before or after its final write: complete as written, or recovered from the raw run
            md = wait_md(client, uid, lambda md: md["status"] == "complete" or "recovered" in md)
            if md["status"] != "complete" or "recovered" in md:
                md = wait_md(client, uid, lambda md: "recovered" in md)
                assert md["recovered"]["reason"] == "worker restarted", md
            assert_true_to_the_raw_run(client, uid, sample)


def test_tiled_killed_during_the_final_write_never_reads_complete_until_recovered(tiled, monkeypatch):
    # the worker's Tiled client gives up on a request after 2 s (default 45 s, which would hide the outage)
    monkeypatch.setenv("TILED_RETRY_TIMEOUT", "2")
    monkeypatch.setenv("TILED_RETRY_ATTEMPTS", "2")
    client = tiled.client()
    docs, sample = raw_scan(client, 4)
    uid = docs[0][1]["uid"]
    with transport() as wire:
        with worker(wire, tiled, "--stop-timeout", "3") as serving:
            publish(wire, first_events(docs, len(ENERGIES) - 1), pace=PACE)
            wait_md(client, uid, lambda md: md["n_energies_seen"] >= 2)
            tiled.kill()
            publish(wire, docs[len(first_events(docs, len(ENERGIES) - 1)):])  # last image and stop
            time.sleep(8)  # Tiled stays down longer than the worker's final writes and their retries
            tiled.start()
            client = tiled.client()
            md = wait_md(client, uid, lambda md: md["status"] != "running" and "recovered" in md)
            assert md["recovered"]["reason"] in ("writing the result to Tiled failed",
                                                 "the final status never reached Tiled"), md
            assert any("Tiled failed" in e for e in md["recovered"]["live_errors"]), md
            assert_true_to_the_raw_run(client, uid, sample)
            assert serving.proc.poll() is None  # the worker kept serving


def test_worker_started_before_tiled_waits_for_it_then_tells_systemd_it_is_ready(tmp_path):
    """Started with (or before) Tiled, as a Procfile runner or systemd does, the worker logs that it waits
    for Tiled, tries again with backoff, and once Tiled answers serves and sends READY=1 to NOTIFY_SOCKET."""
    tiled = TiledServer(tmp_path / "tiled")
    tiled.port = free_port()  # the worker's URI names the port before the server exists
    notify_path = tmp_path / "notify.sock"
    log_path = tmp_path / "worker.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket, start_proxy() as proxy, \
            log_path.open("w") as log:
        notify_socket.bind(str(notify_path))
        notify_socket.settimeout(120)
        env = {**os.environ, "TILED_API_KEY": tiled.key, "NOTIFY_SOCKET": str(notify_path), "PYTHONUNBUFFERED": "1"}
        worker = subprocess.Popen([sys.executable, "-m", "phasestream.app.cli", "serve", "--zmq", proxy.out_address,
                                   "--tiled", tiled.uri, "--backend", "numpy", "--no-refine"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while log_path.read_text().count(f"waiting for Tiled at {tiled.uri}") < 2:  # tried again: backoff
                assert worker.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            tiled.start()
            message = notify_socket.recv(4096).decode()
            assert "READY=1" in message.splitlines(), message
            assert '"ready": true' in log_path.read_text()
            assert worker.poll() is None
        finally:
            worker.terminate()
            worker.wait(60)
            if tiled.proc is not None and tiled.proc.poll() is None:
                tiled.proc.terminate()
                tiled.proc.wait(10)
    text = log_path.read_text()
    assert worker.returncode == 0, text
    assert tiled.key not in text
