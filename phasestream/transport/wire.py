"""Document transport between the RunEngine process and analysis workers: wire format and publisher.

The topology is the one of ``bluesky.callbacks.zmq``::

    RunEngine --DocumentPublisher--> Proxy (in) ... Proxy (out) --DocumentReceiver--> callbacks
                 XPUB, connects       SUB, binds      PUB, binds    SUB, connects

The proxy is in :mod:`phasestream.transport.proxy`, the receiver in :mod:`phasestream.transport.worker`.

Frame
    One 0MQ frame per document, unchanged from bluesky: ``prefix + b" " + name + b" " + payload``.
    The proxy forwards frames untouched, so a stock ``bluesky-zmq-proxy`` works as well.
Payload
    msgpack (``use_bin_type=True``), NumPy arrays and scalars in the ``msgpack_numpy`` layout
    (``{b"nd": True, b"type": dtype.str, b"kind": b"", b"shape": [...], b"data": <bin>}``), never pickle.
Envelope
    A :class:`DocumentPublisher` payload is the msgpack array
    ``["phasestream.doc/1", publisher_id: str, seq: int, document: map]``; ``seq`` starts at 1 and grows by
    one per document sent by that publisher, so a receiver sees lost messages as gaps. A document is always
    a map, so a bare map (what ``bluesky.callbacks.zmq.Publisher(serializer=serialize)`` sends) is accepted
    as an unsequenced document. A stock ``RemoteDispatcher`` reads envelopes with
    ``deserializer=deserialize_document`` (without gap detection).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from typing import Any, NamedTuple

import msgpack
import numpy as np
import zmq
from bluesky.callbacks.zmq import Publisher

logger = logging.getLogger(__name__)

ENVELOPE_TAG = "phasestream.doc/1"
DEFAULT_MAX_MESSAGE_SIZE = 1 << 30
DEFAULT_IN_ADDRESS = "tcp://127.0.0.1:5577"
DEFAULT_OUT_ADDRESS = "tcp://127.0.0.1:5578"
LOCALHOST = "127.0.0.1"


class WireFormatError(ValueError):
    """A message is not a valid phasestream/bluesky document message (not msgpack, refused type, ...)."""


class Envelope(NamedTuple):
    """A received document with its publisher id and sequence number (both None when unsequenced)."""

    publisher_id: str | None
    seq: int | None
    doc: dict[str, Any]


# -- serialization -----------------------------------------------------------------------------------------


def _encode_numpy(obj: Any) -> Any:
    """msgpack ``default`` hook: NumPy arrays and scalars in the msgpack_numpy layout, refusing objects."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"cannot serialize an array of dtype {obj.dtype}: object arrays would need pickle")
        if obj.dtype.kind == "V":
            kind, descr = b"V", obj.dtype.descr
        else:
            kind, descr = b"", obj.dtype.str
        data = obj.data if obj.flags.c_contiguous else obj.tobytes()
        return {b"nd": True, b"type": descr, b"kind": kind, b"shape": list(obj.shape), b"data": data}
    if isinstance(obj, np.bool_ | np.number):
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    if isinstance(obj, complex):
        return {b"complex": True, b"data": repr(obj)}
    raise TypeError(f"cannot serialize an object of type {type(obj).__name__}")


def serialize(obj: Any) -> bytes:
    """Encode a document (or any msgpack-able object holding NumPy arrays) as msgpack bytes.

    Parameters
    ----------
    obj : object
        Dicts, lists, tuples (sent as lists), str, bytes, int, float, bool, None, complex, NumPy arrays of
        any non-object dtype and NumPy scalars.

    Returns
    -------
    bytes
        msgpack, arrays in the ``msgpack_numpy`` layout (readable by ``msgpack_numpy.unpackb`` too).

    Raises
    ------
    TypeError
        For objects msgpack cannot represent without pickle (object arrays, arbitrary classes).
    """
    return msgpack.packb(obj, default=_encode_numpy, use_bin_type=True)


def _unpack_dtype(descr: Any) -> np.dtype:
    if isinstance(descr, list):  # structured dtype: [[name, subdescr, *shape], ...]
        descr = [
            (
                field[0].decode() if isinstance(field[0], bytes) else field[0],
                _unpack_dtype(field[1]),
                *(tuple(shape) if isinstance(shape, list) else shape for shape in field[2:]),
            )
            for field in descr
        ]
    elif isinstance(descr, bytes):
        descr = descr.decode("ascii")
    elif not isinstance(descr, str):
        raise WireFormatError(f"array type description must be a string or a field list, got {type(descr).__name__}")
    dtype = np.dtype(descr)
    if dtype.hasobject:
        raise WireFormatError(f"refusing dtype {dtype}: object arrays are never decoded (they would need pickle)")
    if dtype.itemsize == 0:  # any number of elements in no bytes: a 100-byte message made 10**9 objects
        raise WireFormatError(f"refusing dtype {dtype}: its elements have no size")
    return dtype


def _decode_numpy(obj: dict) -> Any:
    """msgpack ``object_hook``: rebuild NumPy arrays and scalars, without ever calling pickle.

    ``msgpack_numpy.decode`` unpickles arrays marked ``kind == b"O"``: that path is refused here.
    """
    if b"nd" in obj:
        data = obj[b"data"]
        if not isinstance(data, bytes):
            raise WireFormatError("array data must be msgpack bin")
        if obj[b"nd"] is True:
            if obj.get(b"kind", b"") == b"O":
                raise WireFormatError("refusing an object array: msgpack_numpy encodes it as pickle")
            dtype = _unpack_dtype(obj[b"type"])
            shape = obj[b"shape"]
            if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
                raise WireFormatError(f"array shape must be a list of non-negative ints, got {shape!r}")
            if math.prod(shape) * dtype.itemsize != len(data):
                raise WireFormatError(f"array of shape {shape} and dtype {dtype} does not match {len(data)} bytes")
            return np.ndarray(shape=shape, dtype=dtype, buffer=data)
        dtype = _unpack_dtype(obj[b"type"])
        if len(data) != dtype.itemsize or dtype.itemsize == 0:
            raise WireFormatError(f"scalar of dtype {dtype} does not match {len(data)} bytes")
        return np.frombuffer(data, dtype=dtype)[0]
    if b"complex" in obj:
        text = obj[b"data"]
        if not isinstance(text, str | bytes) or len(text) > 128:
            raise WireFormatError("complex number must be a short string")
        return complex(text.decode() if isinstance(text, bytes) else text)
    return obj


def deserialize(data: bytes | bytearray | memoryview, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Any:
    """Decode msgpack bytes made by :func:`serialize`; safe on hostile input.

    Parameters
    ----------
    data : bytes-like
        One complete msgpack object, nothing after it.
    max_message_size : int
        Larger inputs are refused before decoding (bytes). Inner lengths (strings, bins, arrays, maps) are
        bounded by the input length, extension types are refused.

    Returns
    -------
    object
        Arrays come back as read-only NumPy arrays backed by the message: copy before modifying in place.

    Raises
    ------
    WireFormatError
        For anything that is not one valid msgpack object of the supported types (pickle, garbage,
        truncated or trailing data, extension types, object arrays, inconsistent array sizes).
    """
    size = memoryview(data).nbytes
    if size > max_message_size:
        raise WireFormatError(f"message of {size} bytes exceeds max_message_size={max_message_size}")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, object_hook=_decode_numpy, max_ext_len=0, use_list=True
        )
    except WireFormatError:
        raise
    except Exception as exc:
        protocol = pickle_protocol(data)
        if protocol is not None:
            raise WireFormatError(
                f"not a valid msgpack message ({size} bytes): it looks like a pickle (protocol {protocol}). "
                "Publishers must send msgpack: phasestream's DocumentPublisher, or "
                "bluesky.callbacks.zmq.Publisher(serializer=phasestream.transport.wire.serialize); "
                "pickle is never accepted"
            ) from exc
        raise WireFormatError(f"not a valid msgpack message ({size} bytes): {type(exc).__name__}: {exc}") from exc


def pickle_protocol(data: bytes | bytearray | memoryview) -> int | None:
    """The pickle protocol announced by ``data``'s header (``b"\\x80"`` + protocol 2..5), else None.

    Only the first two bytes are looked at: nothing is unpickled. Pickles of protocols 0 and 1 have no
    header and are not recognised. (msgpack reads ``b"\\x80"`` as an empty map, so a valid msgpack message
    never continues after it: call this only for data that failed to decode.)
    """
    head = bytes(memoryview(data)[:2])
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return head[1]
    return None


#: the largest size :func:`parse_byte_size` accepts (1 TiB)
MAX_BYTE_SIZE = 1 << 40


def parse_byte_size(text: str | int) -> int:
    """A positive size in bytes from ``"1048576"``, ``"64K"``, ``"256M"`` or ``"1G"`` (binary units, case-insensitive).

    Raises ``ValueError`` for anything else (zero, negative, fractions, unknown units, other types, more
    than ``MAX_BYTE_SIZE``).
    """
    if isinstance(text, bool) or not isinstance(text, int | str):  # TOML true, 1.5 or [1]
        raise ValueError(f"not a size in bytes: {text!r:.80} (expected e.g. 1048576, 64K, 256M or 1G)")
    if isinstance(text, int):
        value = text
    else:
        stripped = text.strip().upper().removesuffix("IB").removesuffix("B")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(stripped[-1:], 1)
        digits = stripped[:-1] if scale > 1 else stripped
        if not digits.isdigit():
            raise ValueError(f"not a size in bytes: {text!r} (expected e.g. 1048576, 64K, 256M or 1G)")
        value = int(digits) * scale
    if value < 1:
        raise ValueError(f"a size in bytes must be positive, got {text!r}")
    if value > MAX_BYTE_SIZE:
        raise ValueError(f"a size in bytes of at most 1 TiB, got {text!r:.80}")
    return value


#: characters of a publisher id (its receiver keeps one entry per publisher)
MAX_PUBLISHER_ID = 256


def open_envelope(obj: Any) -> Envelope:
    """Split a deserialized payload into publisher id, sequence number and document.

    A map is an unsequenced document; a ``[ENVELOPE_TAG, publisher_id, seq, document]`` array is a
    sequenced one (a publisher id of at most ``MAX_PUBLISHER_ID`` characters). Anything else raises
    :class:`WireFormatError`.
    """
    if isinstance(obj, dict):
        return Envelope(None, None, obj)
    if (
        isinstance(obj, list)
        and len(obj) == 4
        and obj[0] == ENVELOPE_TAG
        and isinstance(obj[1], str)
        and len(obj[1]) <= MAX_PUBLISHER_ID
        and type(obj[2]) is int
        and obj[2] >= 1
        and isinstance(obj[3], dict)
    ):
        return Envelope(obj[1], obj[2], obj[3])
    raise WireFormatError(f"payload is neither a document (map) nor a {ENVELOPE_TAG!r} envelope")


def deserialize_document(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Deserializer for a stock ``bluesky.callbacks.zmq.RemoteDispatcher``: the document, envelope removed."""
    return open_envelope(deserialize(data)).doc


def pack_frame(prefix: bytes, name: str, payload: bytes) -> bytes:
    """Build the bluesky 0MQ frame ``prefix b" " name b" " payload``."""
    return b" ".join([prefix, name.encode(), payload])


def split_frame(message: bytes) -> tuple[bytes, str, memoryview]:
    """Split a bluesky 0MQ frame into (prefix, document name, payload view) without copying the payload."""
    first = message.find(b" ")
    second = message.find(b" ", first + 1) if first >= 0 else -1
    if second < 0:
        raise WireFormatError(f"frame of {len(message)} bytes is not 'prefix name payload' separated by spaces")
    try:
        name = message[first + 1 : second].decode("ascii")
    except UnicodeDecodeError as exc:
        raise WireFormatError("document name is not ASCII") from exc
    return message[:first], name, memoryview(message)[second + 1 :]


# -- addresses -------------------------------------------------------------------------------------------


def normalize_address(address: str | int | tuple[str, int], *, host: str = LOCALHOST) -> str:
    """A 0MQ address: ``5577`` -> ``tcp://127.0.0.1:5577``, ``"h:1"``/``("h", 1)`` -> ``tcp://h:1``.

    Unlike bluesky's own normalization, a bare port means ``host`` (127.0.0.1), never all interfaces.
    """
    if isinstance(address, int):
        return f"tcp://{host}:{address}"
    if isinstance(address, tuple):
        return f"tcp://{address[0]}:{address[1]}"
    return address if "://" in address else f"tcp://{address}"


# -- publisher -------------------------------------------------------------------------------------------


class DocumentPublisher(Publisher):
    """RunEngine callback that publishes documents to a 0MQ proxy, each with a sequence number.

    Parameters
    ----------
    address : str or int or tuple
        Input address of the proxy (the publisher connects). A bare port means 127.0.0.1.
    prefix : bytes
        bluesky prefix that receivers may filter on; may not contain ``b" "``.
    publisher_id : str, optional
        Identifies this publisher's sequence in the envelope; a random UUID by default.
    linger : float
        Seconds :meth:`close` waits for queued messages to leave.

    Notes
    -----
    ``Publisher.__init__`` is not called: it opens a PUB socket, this class opens an XPUB socket, which is
    the same on the wire and also reports the proxy's subscription (:meth:`wait_for_subscriber`). Messages
    sent before the proxy has subscribed are dropped by 0MQ. Documents are not deep-copied (bluesky's
    Publisher copies each one): they are serialized before the call returns. A document that cannot be
    serialized is logged and skipped but consumes its sequence number, so the worker reports the loss;
    it never raises into the RunEngine.
    """

    def __init__(
        self,
        address: str | int | tuple[str, int] = DEFAULT_IN_ADDRESS,
        *,
        prefix: bytes = b"",
        publisher_id: str | None = None,
        linger: float = 2.0,
    ):
        if not isinstance(prefix, bytes):
            raise ValueError(f"prefix must be bytes, not {type(prefix).__name__}")
        if b" " in prefix:
            raise ValueError(f"prefix {prefix!r} may not contain b' '")
        self.address = normalize_address(address)
        self.publisher_id = publisher_id or uuid.uuid4().hex
        self._prefix = prefix
        self._serializer = serialize
        self._linger_ms = int(linger * 1000)
        self._lock = threading.Lock()
        self._next_seq = 1
        self._subscribed = False
        self.stats = {"sent": 0, "unserializable": 0}
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.connect(self.address)

    def wait_for_subscriber(self, timeout: float = 5.0) -> bool:
        """Block until the proxy has subscribed (documents sent before are lost); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._subscribed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._socket.poll(int(remaining * 1000), zmq.POLLIN):
                    break
                message = self._socket.recv()
                self._subscribed = message[:1] == b"\x01"
        return self._subscribed

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            try:
                payload = serialize([ENVELOPE_TAG, self.publisher_id, seq, doc])
            except Exception:
                self.stats["unserializable"] += 1
                logger.exception(
                    "could not serialize %s document (uid %s, seq %d); not sent, receivers will see a gap",
                    name,
                    doc.get("uid"),
                    seq,
                )
                return
            self._send(pack_frame(self._prefix, name, payload))
            self.stats["sent"] += 1

    def _send(self, frame: bytes) -> None:
        self._socket.send(frame, copy=False)

    def close(self) -> None:
        """Close the socket, waiting up to ``linger`` seconds for queued documents to leave."""
        if not self._socket.closed:
            self._socket.close(linger=self._linger_ms)
            self._context.term()
            logger.info("publisher %s closed: %s", self.publisher_id, self.stats)

    def __enter__(self) -> DocumentPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
