"""Hostile model-server requests: values that only become non-finite as float32, requests that fail
inside the model, huge reprs. A bad request fails alone; the other clients in its batch get their
results, and the server keeps serving."""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest
import zmq

pytest.importorskip("tensorflow")

from phasestream.app.process import ModelServerProcess
from phasestream.models.registry import PRETRAINED_DIR
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import MAX_ERROR_CHARS, ModelServerError
from phasestream.modelserver.server import ModelServer, ModelServerConfig, _Request
from phasestream.transport.wire import deserialize, serialize

MODEL = "gmvae-nvpf-synthetic"
INDI = "indi-particles-synthetic"
LIMIT_MB = 4.0
# a decode (0.6 s here; its 3.6 MB stay under LIMIT_MB) that keeps the server busy while the others queue up
BLOCKER_POINTS = 300_000


@pytest.fixture(scope="module")
def server():
    with ModelServerProcess(args=("--max-request-mb", str(LIMIT_MB), "--preload", MODEL)) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with ModelClient(server.address, timeout=120.0, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def in_process():
    """A ModelServer in this process (never bound) with the real model loaded."""
    server = ModelServer(ModelServerConfig(bind="inproc://phasestream-hostile"))
    return server, server._model(MODEL, None)


def _spectra(n_energies, n, seed):
    rng = np.random.default_rng(seed)
    base = np.linspace(0.3, 1.2, n_energies)
    return (rng.uniform(0.5, 1.5, (n, 1)) * base + rng.normal(0, 0.02, (n, n_energies))).astype(np.float32)


def _dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def _reply(sock: zmq.Socket, timeout_ms: int = 120_000) -> dict:
    assert sock.poll(timeout_ms), "no reply from the model server"
    return deserialize(sock.recv())


def _overflowing(x: np.ndarray, value: float = 1e308) -> np.ndarray:
    """``x`` as float64, finite there, with one value beyond float32's range."""
    x = x.astype(np.float64)
    x[len(x) // 2, 3] = value
    return x


@pytest.mark.parametrize("trial", range(3))
def test_overflowing_float64_fails_alone_in_a_shared_batch(server, client, trial):
    n_energies = 13
    goods = [_spectra(n_energies, 40 + 7 * i, seed=100 * trial + i) for i in range(3)]
    alone = [client.encode(MODEL, x, components=True) for x in goods]  # the same requests, each sent alone
    hostile = _overflowing(_spectra(n_energies, 20, seed=100 * trial + 9), 1e308 if trial != 1 else -1e308)
    with np.errstate(over="ignore"):
        assert np.isfinite(hostile).all() and not np.isfinite(hostile.astype(np.float32)).all()

    socks = [_dealer(server.address) for _ in range(5)]  # a blocker, the hostile client, three good clients
    try:
        for sock in socks:  # connected before the burst
            sock.send(serialize({"op": "health"}))
            assert _reply(sock)["ok"]
        before = client.health()["stats"]
        blocker = np.random.default_rng(trial).normal(size=(BLOCKER_POINTS, 3)).astype(np.float32)
        payloads = [serialize({"op": "encode", "model": MODEL, "array": hostile, "id": "hostile"}),
                    *[serialize({"op": "encode", "model": MODEL, "array": x, "options": {"components": True},
                                 "id": f"good-{i}"}) for i, x in enumerate(goods)]]
        socks[0].send(serialize({"op": "decode", "model": MODEL, "array": blocker, "id": "blocker"}))
        time.sleep(0.2)  # the server is decoding: the burst queues up and is taken as one batch
        order = [1, 2, 3, 4] if trial != 2 else [2, 3, 1, 4]  # the hostile one first or in the middle
        for i in order:
            socks[i].send(payloads[i - 1])
        replies = [_reply(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    after = client.health()["stats"]

    assert replies[0]["ok"] and replies[0]["array"].shape == (BLOCKER_POINTS, 13)
    # the hostile request and the good ones arrived in one batch: the blocker's batch plus one more
    assert after["batches"] - before["batches"] == 2
    assert after["items"] - before["items"] == BLOCKER_POINTS + sum(len(x) for x in goods)
    hostile_reply = replies[1]
    assert hostile_reply["ok"] is False and hostile_reply["id"] == "hostile"
    assert "non-finite values after conversion to float32" in hostile_reply["error"]
    assert "float64 values beyond float32 range" in hostile_reply["error"]
    for i, (reply, ref) in enumerate(zip(replies[2:], alone, strict=True)):
        assert reply["ok"] is True and reply["id"] == f"good-{i}", reply.get("error")
        np.testing.assert_allclose(reply["array"], ref.latent, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(reply["components"], ref.components, rtol=1e-5, atol=1e-6)
    # and the server goes on serving
    again = client.encode(MODEL, goods[0], components=True)
    np.testing.assert_array_equal(again.latent, alone[0].latent)


def test_a_batch_takes_no_more_requests_once_they_hold_the_request_limit(server, client):
    """Before: a batch took up to 64 queued requests whatever their size (64 x 256 MB by default, decoded and
    run at once); now it stops taking them once they hold the request limit (LIMIT_MB here), and the rest wait
    for the next batch. Four requests of 1.6 MB queued behind a blocker: three in one batch, then one."""
    spectra = [_spectra(13, 30_000, seed=40 + i) for i in range(4)]  # 1.56 MB each as float32
    alone = [client.encode(MODEL, x).latent for x in spectra]
    socks = [_dealer(server.address) for _ in range(5)]  # a blocker, four clients
    try:
        for sock in socks:
            sock.send(serialize({"op": "health"}))
            assert _reply(sock)["ok"]
        before = client.health()["stats"]
        blocker = np.random.default_rng(7).normal(size=(BLOCKER_POINTS, 3)).astype(np.float32)
        socks[0].send(serialize({"op": "decode", "model": MODEL, "array": blocker, "id": "blocker"}))
        time.sleep(0.2)  # the server is decoding: the four requests queue up behind it
        for i, (sock, x) in enumerate(zip(socks[1:], spectra, strict=True)):
            sock.send(serialize({"op": "encode", "model": MODEL, "array": x, "id": i}))
        replies = [_reply(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    after = client.health()["stats"]
    assert replies[0]["ok"], replies[0].get("error")
    for i, (reply, latent) in enumerate(zip(replies[1:], alone, strict=True)):
        assert reply["ok"] is True and reply["id"] == i, reply.get("error")
        np.testing.assert_allclose(reply["array"], latent, rtol=1e-5, atol=1e-6)
    # the blocker's batch, three requests (4.7 MB, the third one past the 4 MB), then the fourth
    assert after["batches"] - before["batches"] == 3
    assert after["items"] - before["items"] == BLOCKER_POINTS + sum(len(x) for x in spectra)


@pytest.mark.parametrize("op, model, array, message", [
    ("decode", MODEL, np.array([[0.1, 1e300, 0.2]]), "non-finite values after conversion to float32"),
    ("encode", MODEL, np.full((2, 13), np.inf), "NaN or infinite"),
    ("enhance", INDI, np.pad(np.array([[3e38 * 10.0]]), ((4, 4), (4, 4)), constant_values=0.5),
     "non-finite values after conversion to float32"),
    ("enhance", INDI, np.zeros((0, 16, 16), np.float32), "at least 8 x 8 pixels"),
    # 1.3 MB as uint8 but 5.2 MB as float32, over the 4 MB limit
    ("encode", MODEL, np.ones((100_000, 13), np.uint8), "as float32, over the server's limit"),
])
def test_input_is_checked_as_float32(server, client, op, model, array, message):
    sock = _dealer(server.address)
    try:
        sock.send(serialize({"op": op, "model": model, "array": array, "id": 7}))
        reply = _reply(sock)
    finally:
        sock.close()
    assert reply["ok"] is False and reply["id"] == 7
    assert message in reply["error"]
    _assert_serving(client)


@pytest.mark.parametrize("message", [
    {"op": "x" * 200_000},
    {"op": "enhance", "model": INDI, "array": np.ones((16, 16), np.float32), "options": {"steps": [7] * 100_000}},
])
def test_error_replies_are_short(server, client, message):
    sock = _dealer(server.address)
    try:
        sock.send(serialize(message))
        reply = _reply(sock)
    finally:
        sock.close()
    assert reply["ok"] is False
    assert len(reply["error"]) < MAX_ERROR_CHARS + 100 and "more characters" in reply["error"]
    _assert_serving(client)


@pytest.mark.parametrize("message, said", [
    ({"op": np.array(["encode", "decode"])}, "op must be one of"),
    ({"op": ["encode"]}, "op must be one of"),
    ({"op": "encode", "model": MODEL, "array": np.ones((2, 13), np.float32),
      "options": {"components": np.array([1, 1])}}, "options.components must be true or false"),
    ({"op": "enhance", "model": INDI, "array": np.ones((16, 16), np.float32),
      "options": {"domain": "od", "allow_low_gain": np.array([True, False])}}, "options.allow_low_gain must be"),
    ({"op": "encode", "model": MODEL, "array": np.ones((2, 13), np.float32), "options": {"components": 1}},
     "options.components must be true or false"),
    ({"op": "enhance", "model": INDI, "array": np.ones((16, 16), np.float32),  # True was taken as 1 step
      "options": {"domain": "od", "steps": True}}, "options.steps must be an integer in 1..100, got True"),
])
def test_fields_of_the_wrong_type_fail_alone(server, client, message, said):
    """Before: an array where a string or flag belongs raised outside the request checks (NumPy's ambiguous
    truth value) and ended the server."""
    sock = _dealer(server.address)
    try:
        sock.send(serialize({**message, "id": "typed"}))
        reply = _reply(sock)
    finally:
        sock.close()
    assert reply["ok"] is False and reply["id"] == "typed"
    assert said in reply["error"]
    _assert_serving(client)


def test_a_failure_outside_the_checks_is_answered_and_the_server_goes_on(in_process, monkeypatch, caplog):
    """A request that breaks the server somewhere no check foresaw still gets its answer, the other requests
    of the batch theirs."""
    server, loaded = in_process
    sent = []

    class Socket:
        def send_multipart(self, frames, copy=True):
            sent.append((frames[0], deserialize(frames[-1])))

    def broken_parse(payload):
        message = deserialize(payload)
        if message.get("id") == "breaks":
            raise RuntimeError("nobody foresaw this")
        return message

    monkeypatch.setattr(server, "socket", Socket())
    monkeypatch.setattr(server, "_parse", broken_parse)
    x = _spectra(13, 4, seed=1)
    frames = [[zmq.Frame(b"c" + i.encode()), zmq.Frame(serialize({"op": "encode", "model": MODEL, "array": x,
                                                                   "id": i}))] for i in ("breaks", "fine")]
    with caplog.at_level(logging.WARNING, logger="phasestream"):
        server._handle_batch(frames)
    replies = dict(sent)
    assert replies[b"cbreaks"]["ok"] is False and "RuntimeError" in replies[b"cbreaks"]["error"]
    assert replies[b"cfine"]["ok"] is True
    np.testing.assert_allclose(replies[b"cfine"]["array"], loaded.model.encode(x)[0], rtol=1e-5, atol=1e-6)


def _assert_serving(client):
    assert client.health()["status"] == "serving"
    x = _spectra(13, 5, seed=0)
    assert client.encode(MODEL, x).latent.shape == (5, 3)


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_a_request_failing_in_the_model_fails_alone(in_process, op, caplog):
    """No request that passes the server's checks makes the model raise, so the batch is run in process:
    one array skips the checks (an inf, a wrong width) and the real model raises on it."""
    server, loaded = in_process
    model = loaded.model
    width = model.n_energies if op == "encode" else model.latent_dim
    rng = np.random.default_rng(3)
    goods = [_spectra(width, 30 + 5 * i, seed=i) if op == "encode" else
             rng.normal(size=(30 + 5 * i, width)).astype(np.float32) for i in range(3)]
    bad = goods[1].copy()
    bad[:, 0] = 4242.4242
    if op == "encode":
        bad[2, 1] = np.inf  # GMVAE.encode refuses non-finite spectra
    else:
        bad = np.hstack([bad, bad])  # GMVAE.decode refuses a latent width it does not have
    arrays = [goods[0], bad, goods[1], goods[2]]
    requests = [_Request([b"client-%d" % i], {"op": op, "model": MODEL, "array": a, "api_key": "SECRETKEY42",
                                              "options": {"components": True}})
                for i, a in enumerate(arrays)]
    batches = server.stats["batches"]
    with caplog.at_level(logging.DEBUG, logger="phasestream"):
        server._run_batch(op, loaded, list(zip(requests, arrays, strict=True)))

    failed = requests[1].reply
    assert failed["ok"] is False and f"{op} failed in model" in failed["error"] and "ValueError" in failed["error"]
    assert failed["model"] == MODEL and failed["sha256"] == loaded.artifact.sha256
    for req, x in zip([requests[0], *requests[2:]], goods, strict=True):
        assert req.reply["ok"] is True
        if op == "encode":
            latent, components = model.encode(x)
            np.testing.assert_allclose(req.reply["array"], latent, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(req.reply["components"], components, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(req.reply["array"], model.decode(x), rtol=1e-5, atol=1e-6)
    assert server.stats["batches"] - batches == 3  # the failed batch is not counted, the three good ones are
    # the failure is logged, neither the request's values nor its other fields
    assert f"{op} failed in model" in caplog.text
    assert "4242" not in caplog.text and "SECRETKEY42" not in caplog.text


def _user_artifact(folder, version, **changes):
    """A copy of the packaged GMVAE artifact named ``gmvae-odd`` with ``changes`` made to its manifest."""
    target = folder / f"gmvae-odd-{version}"
    shutil.copytree(PRETRAINED_DIR / f"{MODEL}-1.0.0", target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(name="gmvae-odd", version=version, **changes)
    (target / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def odd_server(tmp_path_factory):
    """A model server whose user folder holds artifacts with manifest fields of the wrong type."""
    folder = tmp_path_factory.mktemp("odd-models")
    _user_artifact(folder, "9.9.1", training=None)
    _user_artifact(folder, "9.9.2", training=[1, 2])
    _user_artifact(folder, "9.9.3", metrics={"spectra": 10**30})  # msgpack has no integer that large
    with ModelServerProcess(args=("--models-dir", str(folder), "--preload", MODEL), timeout=90) as proc:
        yield proc


def test_health_and_list_in_one_batch_are_both_answered(odd_server):
    """Before: a manifest whose training is null or a list made ``list`` raise outside the per-request checks:
    no request of its batch was answered (a ``health`` from another client neither), nor any later ``list``."""
    socks = [_dealer(odd_server.address) for _ in range(3)]  # a blocker, health, list
    try:
        for sock in socks:
            sock.send(serialize({"op": "health"}))
            assert _reply(sock)["ok"]
        blocker = np.random.default_rng(0).normal(size=(BLOCKER_POINTS, 3)).astype(np.float32)
        socks[0].send(serialize({"op": "decode", "model": MODEL, "array": blocker, "id": "blocker"}))
        time.sleep(0.2)  # the server is decoding: health and list queue up and are taken as one batch
        socks[1].send(serialize({"op": "health", "id": "health"}))
        socks[2].send(serialize({"op": "list", "id": "list"}))
        replies = [_reply(sock, 30_000) for sock in socks]
        socks[2].send(serialize({"op": "list", "id": "again"}))
        again = _reply(socks[2], 30_000)
    finally:
        for sock in socks:
            sock.close()
    assert replies[0]["ok"] and replies[1]["ok"] and replies[1]["id"] == "health"
    for reply, rid in ((replies[2], "list"), (again, "again")):
        assert reply["ok"] is True and reply["id"] == rid, reply.get("error")
        listed = {(m["name"], m["version"]): m for m in reply["models"]}
        assert {(MODEL, "1.0.0"), (INDI, "1.0.0")} <= set(listed)
        assert listed["gmvae-odd", "9.9.1"]["training"] == {}  # null: no training recorded
        odd = listed["gmvae-odd", "9.9.2"]
        assert odd["training"] == {} and "training" in odd["problems"] and "must be" in odd["problems"]["training"]
        huge = listed["gmvae-odd", "9.9.3"]  # listed, its summary not sendable: said so
        assert huge["kind"] == "gmvae" and "cannot be sent" in huge["problems"]["summary"]
    with ModelClient(odd_server.address, timeout=120.0, retries=0) as c:
        with pytest.raises(ModelServerError, match="manifest field training"):
            c.encode("gmvae-odd", _spectra(13, 5, seed=0), version="9.9.2")
        _assert_serving(c)


def test_a_broken_artifact_folder_does_not_stop_the_server(tmp_path):
    """Before: a user folder whose manifest.json is a directory (or nested too deeply) raised out of every
    registry listing: the server could not start, even for its packaged models."""
    (tmp_path / "as-directory" / "manifest.json").mkdir(parents=True)
    (tmp_path / "too-deep").mkdir()
    (tmp_path / "too-deep" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with ModelServerProcess(args=("--models-dir", str(tmp_path)), timeout=90) as proc:
        assert {f"{MODEL}:1.0.0", f"{INDI}:1.0.0"} <= set(proc.ready["models"])
        with ModelClient(proc.address, timeout=120.0, retries=0) as c:
            assert {m["name"] for m in c.list_models()} >= {MODEL, INDI}
            _assert_serving(c)
