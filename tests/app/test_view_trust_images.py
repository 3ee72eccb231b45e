"""The view's image and search routes over arrays and a Tiled it cannot trust.

- Map arrays are checked against the result's ``image_shape`` and the contract's layout (``MAP_LAYOUT``)
  before they are read: a wrong dtype or shape, or one too large to draw, is a 422 "no image: <why>",
  never a 500 or a read of whatever size the array declares.
- A Tiled that hangs or fails makes ``/api/search`` and the PNG routes answer a JSON error (503/502) in
  bounded time, without the API key, instead of a 500 after a minute.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image
from support import wait
from tiled.client.utils import ClientError
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import DataSource

from phasestream.app.figures import phase_rgb
from phasestream.app.view import ViewServer
from phasestream.app.view.render import od_png, png
from phasestream.store.tiled import separate_api_key

SHAPE = (4, 4)


def result(container, uid: str, **md):
    base = {"run_uid": uid, "status": "complete", "sample": {"name": "s"}, "state_of_charge": 1.0,
            "n_energies_seen": 3, "references": {"phases": ["A", "B"]}, "phase_fractions": {"A": 0.5, "B": 0.5},
            "errors": [], "updated_at": time.time(), "image_shape": list(SHAPE), **md}
    return container.create_container(uid, specs=["PhaseMap"], metadata=base)


def declare(node, key: str, shape: tuple[int, ...], dtype) -> None:
    """An array that declares ``shape`` without any data written."""
    structure = ArrayStructure(data_type=BuiltinDtype.from_numpy_dtype(np.dtype(dtype)),
                               chunks=tuple((n,) for n in shape), shape=shape)
    node.new(StructureFamily.array, [DataSource(structure=structure, structure_family=StructureFamily.array)],
             key=key)


def decoded(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


GOOD_PHASE = np.array([[-1, 0, 1, 1]] * 4, dtype=np.int16)
GOOD_RELIABILITY = np.linspace(0, 1, 16, dtype=np.float32).reshape(SHAPE)

BIG_PHASE = np.random.default_rng(3).integers(-1, 3, size=(64, 60)).astype(np.int16)
BIG_RELIABILITY = np.random.default_rng(4).random((64, 60), dtype=np.float32)

BAD = {  # label: (arrays written, arrays declared only, image, what the refusal names)
    "float phase with NaN": ({"phase": np.full(SHAPE, np.nan), "reliability": GOOD_RELIABILITY}, {}, "phase",
                             "phase"),
    "3-D phase": ({"phase": np.zeros((2, *SHAPE), np.int16), "reliability": GOOD_RELIABILITY}, {}, "phase", "phase"),
    "phase not the image shape": ({"phase": np.zeros((4, 5), np.int16), "reliability": GOOD_RELIABILITY}, {},
                                  "phase", "phase"),
    "text reliability": ({"phase": GOOD_PHASE, "reliability": np.array([["x"] * 4] * 4)}, {}, "phase",
                         "reliability"),
    "2-D pcc": ({"pcc": np.zeros(SHAPE, np.float32)}, {}, "pcc0", "pcc"),
    "huge declared maps": ({}, {"phase": ((3000, 3000), np.int16), "reliability": ((3000, 3000), np.float32)},
                           "phase", "phase"),
    "pcc of more phases than a result may have": ({}, {"pcc": ((300, *SHAPE), np.float32)}, "pcc0", "pcc"),
    "od planes not the image shape": ({"od": np.zeros((3, 5, 5), np.float32)}, {}, "od", "od"),
    "2-D od": ({"od": np.zeros(SHAPE, np.float32)}, {}, "od", "od"),
}


@pytest.fixture(scope="module")
def bad_results(tiled_client):
    root = f"view-arrays-{uuid.uuid4().hex[:8]}"
    container = tiled_client.create_container(root)
    uids = {}
    for label, (written, declared, _, _) in BAD.items():
        uid = uids[label] = str(uuid.uuid4())
        node = result(container, uid)
        for key, array in written.items():
            node.write_array(array, key=key)
        for key, (shape, dtype) in declared.items():
            declare(node, key, shape, dtype)
    good = uids["good"] = str(uuid.uuid4())
    node = result(container, good)
    # castable to the layout (int64 phase, float64 reliability, bool ambiguous): drawn as the contract's types
    node.write_array(GOOD_PHASE.astype(np.int64), key="phase")
    node.write_array(GOOD_RELIABILITY.astype(np.float64), key="reliability")
    node.write_array(np.eye(4, dtype=bool), key="ambiguous")
    node.write_array(np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, *SHAPE), key="pcc")
    node.write_array(np.arange(48, dtype=np.float32).reshape(3, *SHAPE), key="od")
    big = uids["big"] = str(uuid.uuid4())  # drawn at a stride when the cap is lowered below its 64²
    node = result(container, big, image_shape=list(BIG_PHASE.shape))
    node.write_array(BIG_PHASE, key="phase")
    node.write_array(BIG_RELIABILITY, key="reliability")
    node.write_array(BIG_PHASE == 2, key="ambiguous")
    node.write_array(np.stack([BIG_RELIABILITY, -BIG_RELIABILITY]), key="pcc")
    node.write_array(np.stack([BIG_RELIABILITY * i for i in range(3)]), key="od")
    with ViewServer(tiled_client, root=root) as view:
        wait(lambda: view.follower.state == "live" and len(view.follower.runs) == len(uids), 60, "the view")
        yield view, uids


@pytest.mark.parametrize("label", list(BAD))
def test_arrays_off_the_contract_are_no_image_not_an_error(bad_results, label):
    view, uids = bad_results
    _, _, kind, name = BAD[label]
    reply = httpx.get(f"{view.url}/api/runs/{uids[label]}/{kind}.png?v=1", timeout=60)
    assert reply.status_code == 422, (label, reply.status_code, reply.text[:200])
    assert reply.text.startswith("no image: ") and name in reply.text, reply.text
    assert "Traceback" not in reply.text


def test_arrays_castable_to_the_contract_are_drawn_as_it_says(bad_results):
    view, uids = bad_results
    with httpx.Client(base_url=f"{view.url}/api/runs/{uids['good']}", timeout=60) as http:
        phase = http.get("/phase.png?v=1")
        assert phase.status_code == 200
        expected = decoded(png(phase_rgb(GOOD_PHASE, GOOD_RELIABILITY, np.eye(4, dtype=bool))))
        assert np.array_equal(decoded(phase.content), expected)
        assert http.get("/pcc1.png?v=1").status_code == 200
        od = http.get("/od.png?v=1")  # the latest plane: energies seen - 1
        assert od.status_code == 200
        assert np.array_equal(decoded(od.content), decoded(od_png(np.arange(32, 48, dtype=np.float32).reshape(SHAPE))))


def test_the_caps_bound_what_one_image_reads():
    from phasestream.app.view.arrays import (
        MAX_DRAWN_PIXELS,
        MAX_IMAGE_PIXELS,
        MAX_READ_VALUES,
        Drawn,
        NoImageError,
        drawn_as,
    )

    side = int(MAX_DRAWN_PIXELS**0.5)
    assert drawn_as("phase", (side, side), np.dtype("int64"), None) == Drawn(np.dtype("int16"), 1)
    # one pixel more each way: every other row and column, (side / 2 + 1)² pixels drawn
    assert drawn_as("phase", (side + 1, side + 1), np.dtype("int16"), None) == Drawn(np.dtype("int16"), 2)
    assert drawn_as("phase", (8192, 8192), np.dtype("int16"), (8192, 8192)).stride == 2  # the worker's default
    big = int(MAX_IMAGE_PIXELS**0.5)
    assert drawn_as("od", (3, big, big), np.dtype("float32"), None, whole=False).stride == 4
    with pytest.raises(NoImageError, match="pixels"):  # no image_shape to compare with: the cap still holds
        drawn_as("phase", (big + 1, big + 1), np.dtype("int16"), None)
    k = MAX_READ_VALUES // (side * side) + 1
    with pytest.raises(NoImageError, match="values"):
        drawn_as("pcc", (k, side, side), np.dtype("float32"), (side, side))
    with pytest.raises(NoImageError, match="shape"):
        drawn_as("reliability", (64, 64), np.dtype("float32"), (64, 65))


def test_maps_larger_than_the_view_draws_are_drawn_at_a_stride(bad_results, monkeypatch):
    """Maps over ``MAX_DRAWN_PIXELS`` (a worker accepts 8192², the view draws 4096²) were "no image"; they are
    read from Tiled at every s-th row and column (a strided slice) and drawn."""
    from phasestream.app.view import arrays

    view, uids = bad_results
    monkeypatch.setattr(arrays, "MAX_DRAWN_PIXELS", 16 * 15)  # 64 x 60 drawn at stride 4: 16 x 15
    with httpx.Client(base_url=f"{view.url}/api/runs/{uids['big']}", timeout=60) as http:
        phase = http.get("/phase.png?v=1")
        assert phase.status_code == 200, phase.text[:200]
        step = (slice(None, None, 4),) * 2
        expected = png(phase_rgb(BIG_PHASE[step], BIG_RELIABILITY[step], (BIG_PHASE == 2)[step]))
        assert np.array_equal(decoded(phase.content), decoded(expected))
        od = http.get("/od.png?v=1")
        assert od.status_code == 200
        assert np.array_equal(decoded(od.content), decoded(od_png(BIG_RELIABILITY[step] * 2)))


# -- a Tiled that hangs or fails -------------------------------------------------------------------------------------

class StallingProxy:
    """A TCP forwarder to Tiled that can stop forwarding (a hung server: connections open, nothing answers)."""

    def __init__(self, port: int):
        self.target, self.flowing = ("127.0.0.1", port), threading.Event()
        self.flowing.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.flowing.set()
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_a_hung_tiled_is_a_json_error_in_bounded_time(tiled_server, tiled_client):
    root = f"view-hung-{uuid.uuid4().hex[:8]}"
    uid = str(uuid.uuid4())
    node = result(tiled_client.create_container(root), uid)
    node.write_array(GOOD_PHASE, key="phase")
    node.write_array(GOOD_RELIABILITY, key="reliability")
    uri, key = separate_api_key(tiled_server.uri)
    port = httpx.URL(uri).port
    proxy = StallingProxy(port)
    try:
        with ViewServer(tiled_server.uri.replace(f":{port}/", f":{proxy.port}/"), root=root,
                        tiled_timeout=2.0) as view, httpx.Client(base_url=view.url, timeout=60) as http:
            wait(lambda: view.follower.state == "live" and uid in view.follower.runs, 60, "the view to go live")
            assert http.get("/api/search?status=complete").json() == {"uids": [uid]}  # through the proxy, flowing
            proxy.flowing.clear()  # Tiled hangs
            for path in ("/api/search?status=complete", f"/api/runs/{uid}/phase.png?v=1",
                         f"/api/runs/{uid}/od.png?v=1"):
                reply = http.get(path)
                assert reply.status_code == 503, (path, reply.status_code, reply.text[:200])
                error = reply.json()["error"]
                assert "Tiled" in error and "2" in error, error
                assert key not in reply.text
    finally:
        proxy.close()


def test_tiled_errors_are_named_without_the_key():
    from phasestream.app.view.server import tiled_error_response

    key = "secretkey0123456789"
    request = httpx.Request("GET", f"http://tiled.example:8000/api/v1/search/x?api_key={key}",
                            headers={"Authorization": f"Apikey {key}"})
    cases = [
        (httpx.ConnectError(f"connection refused ({key})", request=request), 503, "cannot reach Tiled"),
        (httpx.ReadTimeout("timed out", request=request), 503, "did not answer"),
        (ClientError(f"500: boom {key}", request, httpx.Response(500, request=request)), 502, "500"),
        (httpx.HTTPStatusError("no", request=request, response=httpx.Response(503, request=request)), 502, "503"),
    ]
    for error, status, said in cases:
        reply = tiled_error_response(error)
        assert reply is not None and reply.status_code == status, error
        body = json.loads(reply.body)
        assert said in body["error"] and key not in reply.body.decode(), body
    assert tiled_error_response(ValueError("not a Tiled error")) is None
