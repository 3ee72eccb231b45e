"""The model server's connection limit, on a real ``serve-models`` process: connections beyond
``--max-connections`` are refused at their handshake, the client says so, and a place that frees up is taken."""

from __future__ import annotations

import time

import pytest
import zmq

from phasestream.app.process import ModelServerProcess
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.config import ModelServerConfig
from phasestream.modelserver.protocol import ModelServerUnavailable

LIMIT = 2


@pytest.fixture(scope="module")
def server():
    with ModelServerProcess(args=("--max-connections", str(LIMIT))) as proc:
        yield proc


def _health_when(client: ModelClient, check, seconds: float = 5.0) -> dict:
    """The client's health reply once ``check(reply["connections"])`` holds (the server counts disconnections
    as 0MQ reports them, a moment after the close)."""
    deadline = time.monotonic() + seconds
    while True:
        reply = client.health()
        if check(reply["connections"]) or time.monotonic() > deadline:
            return reply


def test_connections_beyond_the_limit_are_refused_and_the_client_says_so(server):
    first = ModelClient(server.address, timeout=10.0, retries=0)
    second = ModelClient(server.address, timeout=10.0, retries=0)
    third = ModelClient(server.address, timeout=10.0, retries=1)
    try:
        assert first.health()["connections"]["open"] == 1
        assert second.health()["connections"] == {"open": 2, "limit": LIMIT, "refused": 0}
        # told at the handshake (the client's monitor), not after its timeout ("no reply ... within 10 s")
        with pytest.raises(ModelServerUnavailable, match=r"refused the connection.*--max-connections"):
            third.health()
        # the two admitted clients are still served, and the server counted the refusals (one per attempt)
        assert _health_when(first, lambda c: c["refused"] >= 2)["connections"] == \
            {"open": 2, "limit": LIMIT, "refused": 2}
        second.close()
        _health_when(first, lambda c: c["open"] == 1)
        assert third.health()["connections"]["open"] == 2  # the freed place is taken
    finally:
        for client in (first, second, third):
            client.close()


def test_a_plain_socket_over_the_limit_gets_no_reply_and_the_server_goes_on(server):
    """A peer that is not a ModelClient (no monitor) is dropped at the handshake: its request never reaches
    the server, which answers the admitted clients meanwhile."""
    with ModelClient(server.address, timeout=10.0, retries=0) as first, \
            ModelClient(server.address, timeout=10.0, retries=0) as second:
        first.health(), second.health()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(server.address)
            sock.send(b"\x81\xa2op\xa6health")  # {"op": "health"} in msgpack
            assert not sock.poll(1500)
        finally:
            sock.close()
        assert first.health()["status"] == "serving"


@pytest.mark.parametrize("value", [0, -1, 4097])
def test_a_connection_limit_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match=r"max_connections must be in 1\.\.4096"):
        ModelServerConfig(max_connections=value).validate()


def test_a_server_that_exits_before_it_is_ready_is_reported_at_once():
    """``serve-models`` refusing its options exits at once; the caller hears so then (the end of its output), not
    after its timeout ("did not start within 60 s")."""
    with pytest.raises(RuntimeError, match="model server exited with status 2 before it was ready"):
        ModelServerProcess(args=("--max-connections", "many"), timeout=60.0).start()
