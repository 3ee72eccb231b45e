"""The model server as a real subprocess with real TensorFlow: protocol, errors, batching, shutdown."""

from __future__ import annotations

import threading

import msgpack
import numpy as np
import pytest
import zmq

pytest.importorskip("tensorflow")

from phasestream.app.process import ModelServerProcess
from phasestream.models.registry import ModelRegistry
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import ModelServerError, ModelServerUnavailable
from phasestream.transport.wire import deserialize, serialize

MODEL = "gmvae-nvpf-synthetic"
LIMIT_MB = 1.0


@pytest.fixture(scope="module")
def server():
    with ModelServerProcess(args=("--max-request-mb", str(LIMIT_MB), "--preload", MODEL)) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with ModelClient(server.address, timeout=60.0, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def local_model():
    art, model = ModelRegistry().load(MODEL)
    return art, model


def _spectra(art, n=500, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0.3, 1.2, len(art.energies))
    return (rng.uniform(0.5, 1.5, (n, 1)) * base + rng.normal(0, 0.02, (n, len(base)))).astype(np.float32)


def _raw(address: str, payload: bytes, timeout_ms: int = 60000) -> dict:
    """One request on a plain DEALER socket; the decoded reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(payload)
        assert sock.poll(timeout_ms), "no reply from the model server"
        return deserialize(sock.recv())
    finally:
        sock.close()


def test_health_and_list(client, local_model):
    art, _ = local_model
    health = client.health()
    assert health["ok"] and health["status"] == "serving"
    assert f"{MODEL}:{art.version}" in health["loaded"]
    models = {m["name"]: m for m in client.list_models()}
    assert models[MODEL]["sha256"] == art.sha256
    assert models[MODEL]["energies_eV"] == pytest.approx(art.energies.tolist())


def test_encode_round_trip_equals_the_model_in_process(client, local_model):
    art, model = local_model
    x = _spectra(art)
    result = client.encode(MODEL, x, components=True)
    latent, components = model.encode(x)
    np.testing.assert_allclose(result.latent, latent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.components, components, rtol=1e-4, atol=1e-5)
    assert (result.model, result.version, result.sha256) == (MODEL, art.version, art.sha256)
    decoded = client.decode(MODEL, result.latent[:10])
    np.testing.assert_allclose(decoded, model.decode(latent[:10]), rtol=1e-4, atol=1e-4)


def test_large_input_is_sent_in_chunks(server, local_model):
    art, model = local_model
    x = _spectra(art, n=5000, seed=1)
    with ModelClient(server.address, max_spectra=1500) as c:  # 4 requests of <= 1500 spectra
        result = c.encode(MODEL, x)
    np.testing.assert_allclose(result.latent, model.encode(x)[0], rtol=1e-4, atol=1e-5)


def test_concurrent_requests_are_answered_each_with_its_own_rows(server, local_model):
    art, model = local_model
    inputs = [_spectra(art, n=50 + 10 * i, seed=10 + i) for i in range(8)]
    outputs: dict[int, np.ndarray] = {}

    def ask(i):
        with ModelClient(server.address, timeout=60.0) as c:
            outputs[i] = c.encode(MODEL, inputs[i]).latent

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, x in enumerate(inputs):
        np.testing.assert_allclose(outputs[i], model.encode(x)[0], rtol=1e-4, atol=1e-5)


def _assert_still_serving(client):
    assert client.health()["status"] == "serving"


@pytest.mark.parametrize("request_kwargs, message", [
    ({"op": "encode", "model": "no-such-model", "array": np.zeros((2, 13), np.float32)}, "no model artifact"),
    ({"op": "encode", "model": MODEL, "version": "9.9.9", "array": np.zeros((2, 13), np.float32)},
     "no model artifact"),
    ({"op": "encode", "model": MODEL, "array": np.zeros((2, 12), np.float32)}, "takes spectra of 13 energies"),
    ({"op": "encode", "model": MODEL, "array": np.zeros(13, np.float32)}, "takes spectra of 13 energies"),
    ({"op": "decode", "model": MODEL, "array": np.zeros((2, 5), np.float32)}, r"\(N, 3\)"),
    ({"op": "encode", "model": MODEL, "array": np.full((2, 13), np.nan, np.float32)}, "NaN"),
    ({"op": "enhance", "model": MODEL, "array": np.zeros((8, 8), np.float32)}, "is a gmvae model"),
    ({"op": "encode", "model": MODEL}, "needs an array"),
    ({"op": "fly"}, "op must be one of"),
])
def test_error_replies_and_the_server_goes_on(client, request_kwargs, message):
    with pytest.raises(ModelServerError, match=message):
        client.request(**request_kwargs)
    _assert_still_serving(client)


@pytest.mark.parametrize("payload, message", [
    (b"\x00not msgpack at all\xff\xff", "malformed request"),
    (msgpack.packb([1, 2, 3]), "expected a map"),
    (msgpack.packb({"op": "encode", "model": MODEL, "array": {"nd": True, "type": "|O", "kind": "O",
                                                              "shape": [1], "data": b"cos\nsystem\n"}}),
     "malformed request"),
])
def test_undecodable_messages_get_an_error_reply(server, client, payload, message):
    reply = _raw(server.address, payload)
    assert reply["ok"] is False and message in reply["error"]
    _assert_still_serving(client)


def test_oversized_payload_gets_an_error_reply(server, client):
    big = np.zeros((int(LIMIT_MB * (1 << 20)) // 52 + 100, 13), np.float32)  # just over the 1 MB limit
    reply = _raw(server.address, serialize({"op": "encode", "model": MODEL, "array": big, "id": 1}))
    assert reply["ok"] is False and "exceeds the server's limit" in reply["error"]
    with pytest.raises(ModelServerError, match="exceeds the server's limit"):  # the client sees it too
        client.request("encode", model=MODEL, array=big)
    _assert_still_serving(client)


def test_client_without_server_raises_unavailable():
    with ModelClient("tcp://127.0.0.1:1", timeout=0.3, retries=1) as c, \
            pytest.raises(ModelServerUnavailable, match="no reply from the model server"):
        c.health()


def test_sigterm_shuts_down_cleanly():
    proc = ModelServerProcess().start()
    with ModelClient(proc.address, timeout=30.0) as c:
        assert c.health()["ok"]
    proc.stop(timeout=20)  # SIGTERM
    assert proc.returncode == 0 and proc.stopped is not None  # exited by itself, saying so
