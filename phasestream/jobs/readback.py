"""Reading a job's arrays back from Tiled before its record says ``complete`` (docs/contract.md#status).

:func:`read_back` reads every array a job wrote back from the server, in blocks of at most ``block_bytes``
along the first axis (memory stays bounded whatever the array's size), and compares it bit for bit with what
was written, as the contract stores it (its dtype: a bool mask as uint8). It returns the SHA-256 of each
array's bytes (C order), which the job records (``array_sha256``) so that anyone can check them later.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from phasestream.contract import MAP_LAYOUT, OD_DTYPE
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import explained_refusal

__all__ = ["BLOCK_BYTES", "ReadBackError", "read_back"]

#: bytes read back from Tiled at a time, per array
BLOCK_BYTES = 64 << 20


class ReadBackError(ValueError):
    """Arrays written to Tiled did not read back as written (missing, another shape or dtype, other values)."""


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


def read_back(writer: ResultWriter, written: Mapping[str, np.ndarray], *,
              block_bytes: int = BLOCK_BYTES) -> dict[str, str]:
    """Read each array of ``written`` (name -> what was written) back from the result and compare it, bit for
    bit, with what was written; ``{name: SHA-256 hex of its bytes}``.

    Raises :class:`ReadBackError` naming every array that is missing or has another shape or dtype in Tiled
    (checked first, without reading data), or the first element that differs, with both values.
    """
    nodes, problems = {}, []
    for name, array in written.items():  # every array's structure first, without reading data
        want_shape, want_dtype = np.shape(array), _stored_dtype(name, array)
        try:
            with explained_refusal("read", f"{writer.path}/{name}"):
                node = writer.container[name]  # fetched again: the server's array, not this writer's
                shape, dtype = tuple(node.shape), np.dtype(node.dtype)
        except KeyError:
            problems.append(f"{name}: missing")
            continue
        except Exception as error:  # noqa: BLE001 - any read failure means: not read back
            problems.append(f"{name}: cannot be read back ({type(error).__name__}: {error})")
            continue
        if (shape, dtype) != (want_shape, want_dtype):
            problems.append(f"{name}: {shape} {dtype} in Tiled, expected {want_shape} {want_dtype}")
        nodes[name] = node
    if problems:
        raise ReadBackError(f"arrays did not read back from Tiled: {'; '.join(problems)}")
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
