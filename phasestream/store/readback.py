"""Reading a result's arrays back from Tiled before a status or a record says ``complete`` (docs/contract.md#status).

:func:`read_back` reads every array a job (or a live run, for its maps) wrote back from the server, in blocks
of at most ``block_bytes`` along the first axis (memory stays bounded whatever the array's size), and compares
it bit for bit with what was written, as the contract stores it (its dtype: a bool mask as uint8). It returns
the SHA-256 of each array's bytes (C order), which the job records (``array_sha256``) so that anyone can
check them later. :func:`read_back_planes` does the same for an array written plane by plane whose planes
the writer did not keep (the live ``od``): it compares each plane's SHA-256 with the one taken as it was
written.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from tiled.client.constructors import from_context
from tiled.client.context import Context

from phasestream.contract import MAP_LAYOUT, OD_DTYPE
from phasestream.store.tiled import explained_refusal, public_uri, structure_clients

if TYPE_CHECKING:  # results imports this module (the OD cube's plane digests)
    from phasestream.store.results import ResultWriter

__all__ = ["BLOCK_BYTES", "ReadBackError", "plane_sha256", "read_back", "read_back_planes", "uncompressed"]

logger = logging.getLogger(__name__)

#: bytes read back from Tiled at a time, per array
BLOCK_BYTES = 64 << 20


class ReadBackError(ValueError):
    """Arrays written to Tiled did not read back as written (missing, another shape or dtype, other values).

    ``problems`` names each, one entry an array ("pcc: missing").
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


_UNCOMPRESSED_CONTEXTS: dict[tuple[str, str | None], Context] = {}
_UNCOMPRESSED_LOCK = threading.Lock()
_UNCOMPRESSED_MAX = 4


def uncompressed(node):
    """``node`` again, through a client of the same server and key that asks for uncompressed responses
    (``Accept-Encoding: identity``), for reading whole arrays back: Tiled otherwise compresses every array it
    sends, which halves the read rate of float data (54 MB: 0.72 s against 0.35 s, same host) and saves little
    on it. One such client per server and key, made on first use; ``node`` itself when none can be made (a
    server that wants another kind of login), so that a read goes on, only slower.
    """
    context = node.context
    key = (str(context.api_uri), context.api_key)
    try:
        with _UNCOMPRESSED_LOCK:
            reader = _UNCOMPRESSED_CONTEXTS.get(key)
            if reader is None:
                reader = Context(context.api_uri, headers={"accept-encoding": "identity"}, api_key=context.api_key)
                if context.api_key is None and reader.server_info.authentication.required:
                    return node  # never a login prompt from here
                if len(_UNCOMPRESSED_CONTEXTS) >= _UNCOMPRESSED_MAX:  # forgotten, not closed: a read may use it
                    del _UNCOMPRESSED_CONTEXTS[next(iter(_UNCOMPRESSED_CONTEXTS))]
                _UNCOMPRESSED_CONTEXTS[key] = reader
        return from_context(reader, structure_clients=structure_clients(), node_path_parts=list(node.path_parts))
    except Exception as error:  # noqa: BLE001 - an optimisation: the compressed client still reads
        logger.debug("no uncompressed client for %s (%s): reading through the compressed one", public_uri(
            str(context.api_uri)), type(error).__name__)
        return node


def _stored_dtype(name: str, array: np.ndarray) -> np.dtype:
    """The dtype the result stores ``array`` in: the contract's for a contract name (``ResultWriter.write_maps``)."""
    if name == "od":
        return np.dtype(OD_DTYPE)
    return np.dtype(MAP_LAYOUT[name][0]) if name in MAP_LAYOUT else np.asarray(array).dtype


def _stored(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` as the result stores it (:func:`_stored_dtype`), C-contiguous."""
    return np.ascontiguousarray(np.asarray(array).astype(_stored_dtype(name, array), copy=False))


def _first_difference(got: np.ndarray, want: np.ndarray) -> tuple[int, ...]:
    """Index of the first element whose bytes differ."""
    differs = got.reshape(-1).view(np.uint8) != want.reshape(-1).view(np.uint8)
    flat = int(np.flatnonzero(differs)[0]) // want.dtype.itemsize
    return tuple(int(i) for i in np.unravel_index(flat, want.shape))


def _nodes(writer: ResultWriter, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, Any]:
    """The result's array nodes ``expected`` (name -> (shape, dtype)), fetched again from the server (not this
    writer's; through an uncompressed client), each checked for its shape and dtype without reading data;
    :class:`ReadBackError` naming every array that is missing, cannot be read or has another shape or dtype."""
    nodes, problems = {}, []
    container = uncompressed(writer.container)
    for name, (want_shape, want_dtype) in expected.items():
        try:
            with explained_refusal("read", f"{writer.path}/{name}"):
                node = container[name]
                shape, dtype = tuple(node.shape), np.dtype(node.dtype)
        except KeyError:
            problems.append(f"{name}: missing")
            continue
        except Exception as error:  # noqa: BLE001 - any read failure means: not read back
            problems.append(f"{name}: cannot be read back ({type(error).__name__}: {error})")
            continue
        if (shape, dtype) != (tuple(want_shape), want_dtype):
            problems.append(f"{name}: {shape} {dtype} in Tiled, expected {tuple(want_shape)} {want_dtype}")
        nodes[name] = node
    if problems:
        raise ReadBackError(f"arrays did not read back from Tiled: {'; '.join(problems)}", problems)
    return nodes


def read_back(writer: ResultWriter, written: Mapping[str, np.ndarray], *,
              block_bytes: int = BLOCK_BYTES) -> dict[str, str]:
    """Read each array of ``written`` (name -> what was written) back from the result and compare it, bit for
    bit, with what was written; ``{name: SHA-256 hex of its bytes}``.

    Raises :class:`ReadBackError` naming every array that is missing or has another shape or dtype in Tiled
    (checked first, without reading data), or the first element that differs, with both values.
    """
    nodes = _nodes(writer, {name: (np.shape(array), _stored_dtype(name, array)) for name, array in written.items()})
    digests = {}
    for name, array in written.items():
        want, node = _stored(name, array), nodes[name]
        rows = max(1, int(block_bytes) // max(1, want.nbytes // len(want))) if want.ndim and len(want) else 1
        digest = hashlib.sha256()
        for start in range(0, max(len(want), 1) if want.ndim else 1, rows):
            expected = want[start:start + rows] if want.ndim else want
            got = np.ascontiguousarray(node[start:start + rows] if want.ndim else node.read())
            if got.shape != expected.shape or got.dtype != expected.dtype:
                raise ReadBackError(f"{name}: rows from {start} read back from Tiled as {got.shape} {got.dtype}, "
                                    f"written {expected.shape} {expected.dtype}")
            if not np.array_equal(got.reshape(-1).view(np.uint8), expected.reshape(-1).view(np.uint8)):
                at = _first_difference(got, expected)
                where = (at[0] + start, *at[1:]) if at else at
                raise ReadBackError(f"{name}: read back from Tiled, it is not what was written: at {where}, "
                                    f"{got[at].item()!r} in Tiled, {expected[at].item()!r} written")
            digest.update(expected)
        digests[name] = digest.hexdigest()
    return digests


def plane_sha256(plane: np.ndarray) -> str:
    """SHA-256 hex of one C-contiguous plane's bytes: what :func:`read_back_planes` compares."""
    return hashlib.sha256(np.ascontiguousarray(plane)).hexdigest()


def read_back_planes(writer: ResultWriter, name: str, shape: tuple[int, ...], dtype: Any,
                     digests: Mapping[int, str], *, verified: Collection[int] = (), read_back: str | None = None,
                     block_bytes: int = BLOCK_BYTES) -> str:
    """Read the (E, ...) array ``name`` of ``shape`` and ``dtype`` back from the result, in blocks of planes,
    and compare each plane's SHA-256 with ``digests`` (plane index -> :func:`plane_sha256` of the plane as it
    was written); the SHA-256 of the whole array's bytes (C order), as :func:`read_back` gives.

    ``verified``: planes already read back as written, which need no digest (they are read again for the
    array's digest). ``read_back``: the array's digest when every plane was already read back as written
    (the live OD cube, plane by plane as it was written): then only its structure is checked again, and that
    digest returned.

    Raises :class:`ReadBackError` when a plane was never written (no digest and not verified), when the array
    is missing or has another shape or dtype in Tiled, or naming the first plane whose bytes differ.
    """
    unwritten = [index for index in range(shape[0]) if index not in digests and index not in verified]
    if unwritten:
        raise ReadBackError(f"{name}: {len(unwritten)} of its {shape[0]} planes were never written "
                            f"(the first: {unwritten[0]})")
    node = _nodes(writer, {name: (tuple(shape), np.dtype(dtype))})[name]
    if read_back is not None:
        return read_back
    plane_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = max(1, int(block_bytes) // max(1, plane_bytes))
    digest = hashlib.sha256()
    for start in range(0, shape[0], rows):
        with explained_refusal("read", f"{writer.path}/{name}"):
            block = np.ascontiguousarray(node[start:start + rows])
        for offset, plane in enumerate(block):
            if start + offset in digests and plane_sha256(plane) != digests[start + offset]:
                raise ReadBackError(f"{name}: plane {start + offset} read back from Tiled is not what was written "
                                    "(its SHA-256 differs)")
        digest.update(block)
    return digest.hexdigest()
