"""The view's guards hold on every loopback address, its subscriptions take every update the worker can
write, and it counts OD planes however the worker writes them.

- On ``--host ::1`` (or any loopback address) the DNS-rebinding guard is on: a foreign ``Host`` gets 400.
- A result whose metadata is over Tiled's default 1 MB websocket message (reference values of many phases
  at many energies, within the worker's bounds) streams like any other: the view stays live.
- OD planes written with ``write_block`` (``num_points`` known: ``od`` pre-sized) are counted by their block
  index, as planes written by ``patch`` are by their offset.
"""

from __future__ import annotations

import json
import random
import socket
import time
import uuid

import httpx
import msgpack
import numpy as np
import pytest
from support import wait

from phasestream.app.view import ViewServer
from phasestream.app.view.server import allowed_hosts
from phasestream.contract import DEFAULT_MAX_NUM_POINTS
from phasestream.contract.metadata import DEFAULT_MAX_METADATA_BYTES, MAX_ERRORS, MAX_TEXT
from phasestream.references import MAX_PHASES
from phasestream.store.results import ResultWriter


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def result_metadata(uid: str, **md) -> dict:
    return {"run_uid": uid, "status": "running", "sample": {"name": "s"}, "state_of_charge": 1.0,
            "n_energies_seen": 3, "references": {"phases": ["A", "B"]}, "phase_fractions": {"A": 0.5, "B": 0.5},
            "errors": [], "updated_at": time.time(), **md}


# -- 1. loopback --------------------------------------------------------------------------------------------------

def test_every_loopback_address_keeps_the_host_guard():
    from phasestream.app.view.server import is_loopback

    assert allowed_hosts("::1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts("[::1]", ["view.example"]) == ["127.0.0.1", "localhost", "[::1]", "view.example"]
    assert allowed_hosts("127.0.0.2") == ["127.0.0.1", "localhost", "127.0.0.2"]
    for host in ("::1", "[::1]", "127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
        assert "*" not in allowed_hosts(host), host
    for host in ("0.0.0.0", "::", "[::]", "192.168.1.5", "fe80::1", "view.example", ""):
        assert not is_loopback(host), host
        assert allowed_hosts(host) == ["*"], host


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_the_view_on_ipv6_loopback_answers_only_loopback_names(tiled_client):
    root = f"view-trust-{uuid.uuid4().hex[:8]}"
    uid = str(uuid.uuid4())
    tiled_client.create_container(root).create_container(
        uid, specs=["PhaseMap"], metadata=result_metadata(uid, status="complete", sample={"name": "secret-sample"}))
    with ViewServer(tiled_client, host="::1", root=root) as view:
        assert view.url.startswith("http://[::1]:")
        wait(lambda: view.follower.state == "live" and uid in view.follower.runs, 30, "the view to go live")
        port = view.url.rsplit(":", 1)[1]
        with httpx.Client(base_url=view.url, timeout=30) as http:
            assert http.get("/api/state").status_code == 200  # Host [::1]:port, the URL's own
            assert http.get("/api/state", headers={"Host": f"localhost:{port}"}).status_code == 200
            for host in (f"attacker.example:{port}", "attacker.example", "[::2]"):
                reply = http.get("/api/state", headers={"Host": host})
                assert reply.status_code == 400, host
                assert "secret-sample" not in reply.text


# -- 2. metadata over 1 MB ----------------------------------------------------------------------------------------

def test_the_message_bound_holds_the_largest_metadata_the_worker_writes():
    """Independent measure: the msgpack envelope Tiled streams, of a result at the worker's bounds."""
    from phasestream.app.view.follow import MAX_METADATA_MESSAGE_BYTES

    rng = random.Random(0)
    k, e = MAX_PHASES, DEFAULT_MAX_NUM_POINTS
    md = result_metadata("x" * 128, references={"name": "r" * MAX_TEXT, "phases": ["p" * 64] * k},
                         reference_values=[[rng.uniform(-1e3, 1e3) for _ in range(e)] for _ in range(k)],
                         energies_eV=[rng.uniform(0, 1e5) for _ in range(e)],
                         sample={"blob": "s" * DEFAULT_MAX_METADATA_BYTES},
                         phasestream={"blob": "p" * DEFAULT_MAX_METADATA_BYTES},
                         errors=["e" * MAX_TEXT] * MAX_ERRORS,
                         phase_fractions={f"p{i}": 0.1 for i in range(k)})
    message = {"type": "container-child-metadata-updated", "key": "x" * 128, "sequence": 2**40,
               "timestamp": "2026-01-01T00:00:00.000000", "specs": [{"name": "PhaseMap", "version": None}],
               "metadata": md, "revision_number": 2**31}
    assert len(msgpack.packb(message)) <= MAX_METADATA_MESSAGE_BYTES


def test_metadata_over_one_megabyte_streams_without_reconnecting(tiled_client):
    root = f"view-trust-{uuid.uuid4().hex[:8]}"
    container = tiled_client.create_container(root)
    big, small = str(uuid.uuid4()), str(uuid.uuid4())
    rng = np.random.default_rng(1)
    k, e = 16, 8000  # 16 x 8000 x 9 bytes of msgpack floats: 1.15 MB, over Tiled's 1 MB default
    md = result_metadata(big, references={"phases": [f"P{i}" for i in range(k)]},
                         reference_values=rng.random((k, e)).round(6).tolist(),
                         energies_eV=(8300.0 + 0.1 * np.arange(e)).tolist(), n_energies_seen=e)
    assert len(json.dumps(md)) > 2**20
    big_node = container.create_container(big, specs=["PhaseMap"], metadata=md)
    small_node = container.create_container(small, specs=["PhaseMap"], metadata=result_metadata(small))
    states: list[str] = []
    with ViewServer(tiled_client, root=root) as view:
        view.follower.add_listener(lambda kind, payload: kind == "connection" and states.append(payload["state"]))
        wait(lambda: view.follower.state == "live" and {big, small} <= set(view.follower.runs), 60,
             "the view to go live")
        for i in range(2):
            big_node.update_metadata({"errors": [f"update {i}"], "updated_at": time.time()})
            small_node.update_metadata({"n_energies_seen": 4 + i, "updated_at": time.time()})
        wait(lambda: view.follower.runs[small].metadata["n_energies_seen"] == 5, 30, "the small result's update")
        wait(lambda: view.follower.runs[big].metadata["errors"] == ["update 1"], 30, "the big result's update")
        assert view.follower.runs[big].streamed_at is not None  # it came through the stream, not a catch-up read
        assert "reconnecting" not in states and view.follower.state == "live"
        with httpx.Client(base_url=view.url, timeout=30) as http:
            assert http.get("/healthz").status_code == 200


# -- 4. OD planes written by block ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_energies", [8, None])  # od pre-sized (write_block), or grown (patch)
def test_od_planes_are_counted_however_they_are_written(tiled_client, n_energies):
    root = f"view-trust-{uuid.uuid4().hex[:8]}"
    tiled_client.create_container(root)
    with ViewServer(tiled_client, root=root) as view:
        wait(lambda: view.follower.state == "live", 30, "the view to go live")
        uid = str(uuid.uuid4())
        writer = ResultWriter(tiled_client, uid, root=root, shape=(8, 8), n_energies=n_energies, phases=["A", "B"],
                              metadata=result_metadata(uid, n_energies_seen=0))
        wait(lambda: uid in view.follower.runs, 30, "the result to be seen")
        writer.write_od(0, np.zeros((8, 8)))
        writer.container.update_metadata({"errors": ["od exists"], "updated_at": time.time()})  # follow od now
        wait(lambda: uid in view.follower._od_subscriptions, 30, "the od subscription")
        time.sleep(0.5)  # the subscription starts from the next update
        for index in range(1, 5):  # one plane each: write_block into a pre-sized od, patch into a growing one
            writer.write_od(index, np.full((8, 8), index, dtype=np.float32))
        planes = writer.container["od"].read()
        assert [int(p.max()) for p in planes[:5]] == [0, 1, 2, 3, 4]  # the truth, read back
        wait(lambda: view.follower.runs[uid].od_planes == 5, 30,
             f"od_planes == 5 (is {view.follower.runs[uid].od_planes})")
        assert view.follower.summary(uid)["energies_seen"] == 5
        writer.write_od_planes(5, np.ones((2, 8, 8)))  # several planes at once: a patch
        wait(lambda: view.follower.runs[uid].od_planes == 7, 30,
             f"od_planes == 7 (is {view.follower.runs[uid].od_planes})")
