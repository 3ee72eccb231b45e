"""Wire format, publisher and proxy: msgpack round trips against NumPy, hostile input, real sockets."""

from __future__ import annotations

import pathlib
import pickle
import socket
import time

import msgpack
import msgpack_numpy
import numpy as np
import psutil
import pytest
import zmq
from bluesky import RunEngine
from bluesky.plans import count, scan
from hypothesis import given, settings
from hypothesis import strategies as st
from ophyd.sim import DirectImage, det, motor
from support import normalize

from phasestream.transport.proxy import start_proxy
from phasestream.transport.wire import (
    ENVELOPE_TAG,
    DocumentPublisher,
    WireFormatError,
    deserialize,
    deserialize_document,
    normalize_address,
    open_envelope,
    pack_frame,
    serialize,
    split_frame,
)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image_u16": rng.integers(0, 65535, size=(96, 128), dtype=np.uint16),
        "spectrum_f32": rng.normal(size=57).astype(np.float32),
        "stack_f64_fortran": np.asfortranarray(rng.normal(size=(3, 4, 5))),
        "big_endian_i32": np.arange(12, dtype=">i4").reshape(3, 4),
        "strided_view": np.arange(100, dtype=np.int16)[::3],
        "mask_bool": rng.random((7, 9)) > 0.5,
        "zero_d": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.uint8),
        "complex64": (rng.normal(size=6) + 1j * rng.normal(size=6)).astype(np.complex64),
        "structured": np.array([(1.0, [1, 2]), (2.0, [3, 4])], dtype=[("energy", "<f8"), ("roi", "<u2", (2,))]),
    }


def _assert_same_array(actual: object, expected: np.ndarray) -> None:
    assert isinstance(actual, np.ndarray)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


def test_round_trip_of_arrays_and_numpy_scalars():
    arrays = _arrays()
    doc = {
        "uid": "e1",
        "data": dict(arrays),
        "nested": [arrays["image_u16"], {"deeper": arrays["spectrum_f32"]}],
        "count_i64": np.int64(-(2**40)),
        "gain_f32": np.float32(1.25),
        "flag": np.bool_(True),
        "energy_f64": np.float64(8333.5),
        "z": 1 + 2j,
        "seq_num": 3,
        "name": "primary",
        "nothing": None,
        "raw": b"\x00\xff",
    }
    out = deserialize(serialize(doc))
    for key, expected in arrays.items():
        _assert_same_array(out["data"][key], expected)
    _assert_same_array(out["nested"][0], arrays["image_u16"])
    _assert_same_array(out["nested"][1]["deeper"], arrays["spectrum_f32"])
    assert type(out["count_i64"]) is np.int64 and out["count_i64"] == -(2**40)
    assert type(out["gain_f32"]) is np.float32 and out["gain_f32"] == np.float32(1.25)
    assert type(out["flag"]) is np.bool_ and out["flag"]
    assert out["energy_f64"] == 8333.5  # np.float64 is a float: sent as a msgpack float
    assert out["z"] == 1 + 2j
    assert {k: out[k] for k in ("uid", "seq_num", "name", "nothing", "raw")} == {
        "uid": "e1",
        "seq_num": 3,
        "name": "primary",
        "nothing": None,
        "raw": b"\x00\xff",
    }
    assert not out["data"]["image_u16"].flags.writeable  # a view on the message, see deserialize's docstring


def test_wire_compatible_with_stock_msgpack_numpy():
    arrays = {k: v for k, v in _arrays().items() if k != "structured"}
    ours_read_by_them = msgpack_numpy.unpackb(serialize(arrays))
    theirs_read_by_us = deserialize(msgpack_numpy.packb(arrays))
    for key, expected in arrays.items():
        _assert_same_array(ours_read_by_them[key], expected)
        _assert_same_array(theirs_read_by_us[key], expected)


def test_round_trip_of_runengine_documents():
    RE = RunEngine({})
    camera = DirectImage(name="det", func=lambda: np.arange(64 * 48, dtype=np.uint16).reshape(48, 64))
    docs = []
    RE(count([camera, det], 2), lambda name, doc: docs.append((name, doc)))
    RE(scan([det], motor, -1, 1, 3), lambda name, doc: docs.append((name, doc)))
    assert [name for name, _ in docs].count("event") == 5
    for _, doc in docs:
        assert normalize(deserialize(serialize(doc))) == normalize(doc)
    image = deserialize(serialize(docs[2][1]))["data"]["det_img"]
    _assert_same_array(image, docs[2][1]["data"]["det_img"])


def test_serialize_refuses_what_would_need_pickle():
    with pytest.raises(TypeError, match="object"):
        serialize({"a": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(TypeError, match="set"):
        serialize({"a": {1, 2}})


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_deserialize_refuses_pickle(protocol):
    doc = {"uid": "abc", "data": {"x": 1.0}, "image": np.zeros((4, 4), np.uint16)}
    with pytest.raises(WireFormatError):
        deserialize(pickle.dumps(doc, protocol=protocol))


class _Touch:
    """Unpickling this creates a file: the proof that pickle ran."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


@pytest.mark.parametrize("kind", [b"O", b""])
def test_deserialize_never_unpickles_msgpack_numpy_object_arrays(tmp_path, kind):
    marker = tmp_path / "unpickled"
    # msgpack_numpy.decode calls pickle.loads on this (kind b"O")
    hostile = {b"nd": True, b"type": "|O", b"kind": kind, b"shape": [1], b"data": pickle.dumps(_Touch(marker))}
    with pytest.raises(WireFormatError, match="object"):
        deserialize(msgpack.packb({"data": hostile}, use_bin_type=True))
    assert not marker.exists()


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"hello world",  # fixint 104, then trailing bytes
        serialize({"uid": "x"}) + b"\x00",  # trailing data
        serialize({"image": np.zeros((64, 64), np.uint16)})[:-10],  # truncated
        b"\xdd\xff\xff\xff\xff",  # array32 announcing 4 G elements
        b"\xdb\xff\xff\xff\xf0abc",  # str32 announcing 4 GiB
        b"\x91" * 100_000 + b"\xc0",  # nesting deeper than the unpacker's stack
        msgpack.packb(msgpack.ExtType(7, b"payload")),
        msgpack.packb({1: "integer keys are not document keys"}),
        b"\xa2\xff\xfe",  # str with invalid UTF-8
    ],
)
def test_deserialize_refuses_garbage(garbage):
    with pytest.raises(WireFormatError):
        deserialize(garbage)


@pytest.mark.parametrize(
    "array",
    [
        {b"nd": True, b"type": "<u2", b"kind": b"", b"shape": [512, 512], b"data": b"\x00" * 10},
        {b"nd": True, b"type": "<u2", b"kind": b"", b"shape": [-1, 5], b"data": b"\x00" * 10},
        {b"nd": True, b"type": "<u2", b"kind": b"", b"shape": "5", b"data": b"\x00" * 10},
        {b"nd": True, b"type": "not a dtype", b"kind": b"", b"shape": [5], b"data": b"\x00" * 10},
        {b"nd": True, b"type": "<u2", b"kind": b"", b"shape": [5], b"data": "text, not bin"},
        {b"nd": False, b"type": "<i8", b"data": b"\x00" * 3},
        # elements of no size: any shape matches no data (a 132-byte message took 1.4 GB for 2*10**7 of them)
        {b"nd": True, b"type": "|V0", b"kind": b"", b"shape": [10**12], b"data": b""},
        {b"nd": True, b"type": "|S0", b"kind": b"", b"shape": [10**12], b"data": b""},
        {b"nd": True, b"type": [], b"kind": b"", b"shape": [10**12], b"data": b""},
        {b"complex": True, b"data": "1+" * 100},
    ],
)
def test_deserialize_refuses_inconsistent_arrays(array):
    with pytest.raises(WireFormatError):
        deserialize(msgpack.packb({"a": array}, use_bin_type=True))


def test_deserialize_limits_message_size():
    payload = serialize({"image": np.zeros((256, 256), np.uint16)})
    assert deserialize(payload, max_message_size=len(payload))["image"].shape == (256, 256)
    with pytest.raises(WireFormatError, match="max_message_size"):
        deserialize(payload, max_message_size=len(payload) - 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_deserialize_raises_only_wire_format_errors(data):
    try:
        deserialize(data)
    except WireFormatError:
        pass


def test_envelope_and_frames():
    doc = {"uid": "u1", "time": 1.0}
    assert open_envelope(deserialize(serialize([ENVELOPE_TAG, "pub", 7, doc]))) == ("pub", 7, doc)
    assert open_envelope(doc) == (None, None, doc)
    assert deserialize_document(serialize([ENVELOPE_TAG, "pub", 7, doc])) == doc
    for bad in ([ENVELOPE_TAG, "pub", 0, doc], ["other/1", "pub", 1, doc], [ENVELOPE_TAG, "pub", 1, [1]], 5, "s"):
        with pytest.raises(WireFormatError):
            open_envelope(bad)
    prefix, name, payload = split_frame(pack_frame(b"bl", "event", b"a b c"))
    assert (prefix, name, bytes(payload)) == (b"bl", "event", b"a b c")
    assert split_frame(pack_frame(b"", "start", b"x"))[:2] == (b"", "start")
    with pytest.raises(WireFormatError):
        split_frame(b"nospaces")


def test_bare_ports_mean_localhost():
    assert normalize_address(5577) == "tcp://127.0.0.1:5577"
    assert normalize_address(("10.0.0.2", 5577)) == "tcp://10.0.0.2:5577"
    assert normalize_address("localhost:5577") == "tcp://localhost:5577"
    assert normalize_address("ipc:///tmp/docs") == "ipc:///tmp/docs"


@pytest.fixture
def bound_sub():
    """A SUB socket bound on a free 127.0.0.1 port, standing in for the proxy's input."""
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    yield sub, f"tcp://127.0.0.1:{port}"
    sub.close(linger=0)
    context.term()


def _recv(sub: zmq.Socket, timeout: float = 5.0) -> bytes:
    assert sub.poll(int(timeout * 1000)), "no message within the timeout"
    return sub.recv()


def _wait_subscribed(publisher: DocumentPublisher, sub: zmq.Socket, timeout: float = 5.0) -> bool:
    """A bound SUB sends its subscription to a new peer only when its own thread calls into it: keep polling."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sub.poll(10)
        if publisher.wait_for_subscriber(0.05):
            return True
    return False


def test_publisher_numbers_every_document(bound_sub, caplog):
    sub, address = bound_sub
    with DocumentPublisher(address, prefix=b"bl7") as publisher:
        assert _wait_subscribed(publisher, sub)
        image = np.arange(20, dtype=np.uint16).reshape(4, 5)
        publisher("start", {"uid": "s"})
        publisher("event", {"uid": "e1", "data": {"det_img": image}})
        publisher("event", {"uid": "bad", "data": {"x": object()}})  # consumes seq 3, not sent
        publisher("stop", {"uid": "t"})
        frames = [split_frame(_recv(sub)) for _ in range(3)]
        assert publisher.stats == {"sent": 3, "unserializable": 1}
    assert "not sent" in caplog.text
    envelopes = [open_envelope(deserialize(payload)) for _, _, payload in frames]
    assert [(prefix, name) for prefix, name, _ in frames] == [(b"bl7", "start"), (b"bl7", "event"), (b"bl7", "stop")]
    assert [envelope.seq for envelope in envelopes] == [1, 2, 4]
    assert {envelope.publisher_id for envelope in envelopes} == {publisher.publisher_id}
    _assert_same_array(envelopes[1].doc["data"]["det_img"], image)


def test_wait_for_subscriber_times_out_without_proxy():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with DocumentPublisher(port, linger=0) as publisher:
        started = time.monotonic()
        assert not publisher.wait_for_subscriber(0.3)
        assert time.monotonic() - started < 2.0
        publisher("start", {"uid": "dropped, nobody subscribed"})  # must not block or raise


def test_proxy_subprocess_binds_localhost_and_forwards_frames_unchanged():
    with start_proxy() as proxy:
        assert proxy.in_address.startswith("tcp://127.0.0.1:") and proxy.out_address.startswith("tcp://127.0.0.1:")
        listening = {c.laddr for c in psutil.Process(proxy.process.pid).net_connections() if c.status == "LISTEN"}
        assert {address.ip for address in listening} == {"127.0.0.1"}
        assert {f"tcp://127.0.0.1:{address.port}" for address in listening} == {proxy.in_address, proxy.out_address}

        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(proxy.out_address)
        try:
            with DocumentPublisher(proxy.in_address) as publisher:
                assert publisher.wait_for_subscriber(5.0)
                doc = {"uid": "s1", "image": np.ones((8, 8), np.uint16)}
                # the proxy's PUB drops until our subscription reached it: publish until one arrives
                deadline = time.monotonic() + 5.0
                while not sub.poll(100) and time.monotonic() < deadline:
                    publisher("start", doc)
                _recv(sub)
                publisher("start", doc)
                message = _recv(sub)
            seq = open_envelope(deserialize(split_frame(message)[2])).seq
            assert seq >= 2
            assert message == pack_frame(b"", "start", serialize([ENVELOPE_TAG, publisher.publisher_id, seq, doc]))
        finally:
            sub.close(linger=0)
            context.term()
        assert proxy.stop() == 0  # SIGTERM ends it cleanly


def test_start_proxy_reports_a_taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="free"):
            start_proxy(taken.getsockname()[1], 0, timeout=10.0)
