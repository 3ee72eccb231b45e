"""Staged writes of a split job (``phasestream.jobs.split``): nothing complete is replaced by arrays that
were not all written and read back.

The tasks of one submission write their blocks into arrays of a staging container inside the result,
``_staging-<16 hex digits>`` (:data:`STAGING_KEY`; unique per submission, so two submissions never write
into the same arrays), and return a digest of every block they wrote (:func:`block_digest`). The
submitting process then

1. reads every staged block back and compares digests (:meth:`Staging.read_back`): until then the
   result's arrays and records are untouched;
2. copies the staged blocks into the final arrays (:meth:`Staging.copy`: Tiled has no rename), and reads
   every copied block back (:meth:`Staging.verify_copy`);
3. removes the staging container (:meth:`Staging.remove`, also on failure).

Reads and copies move whole blocks, at most :data:`BLOCK_BYTES` of an array at a time (memory stays bounded).

A staging container holds no result array: readers look arrays up by their contract names
(docs/contract.md), never by listing a result's keys. One left by a submitting process that was killed
names ``job`` and ``started`` in its metadata and may be removed by hand.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import DataSource

from phasestream.contract import InvalidIdentifierError

__all__ = ["BLOCK_BYTES", "STAGING_KEY", "STAGING_PREFIX", "ArrayLayout", "Digests", "Staging", "StagingError",
           "block_digest", "check_staging_key", "create_chunked", "merged_digests"]

logger = logging.getLogger(__name__)

STAGING_PREFIX = "_staging-"
#: the key of a staging container inside a result: the prefix and 16 hex digits, nothing else
STAGING_KEY = re.compile(r"_staging-[0-9a-f]{16}")

#: bytes of an array read back or copied at a time (whole blocks; one block at least)
BLOCK_BYTES = 64 << 20

Block = tuple[int, ...]
#: array name -> block index -> digest of the block written there
Digests = dict[str, dict[Block, str]]


class StagingError(RuntimeError):
    """Staged or copied blocks did not read back as they were written."""


def check_staging_key(key: str) -> str:
    """``key`` if it names a staging container (:data:`STAGING_KEY`), else an InvalidIdentifierError."""
    if not isinstance(key, str) or STAGING_KEY.fullmatch(key) is None:
        raise InvalidIdentifierError(f"{str(key)[:60]!r} is not a staging key ({STAGING_PREFIX} and 16 hex digits)")
    return key


def block_digest(block: np.ndarray) -> str:
    """SHA-256 of a block's dtype, shape and bytes (C order): equal digests, bit for bit equal blocks."""
    array = np.ascontiguousarray(block)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def merged_digests(parts: Iterable[Digests]) -> Digests:
    """The digests several tasks returned, as one map."""
    merged: Digests = {}
    for part in parts:
        for name, blocks in part.items():
            merged.setdefault(name, {}).update(blocks)
    return merged


@dataclass(frozen=True)
class ArrayLayout:
    """Shape, regular chunks (Zarr, behind Tiled, stores no other), dtype and dims of an array whose chunks
    cut one axis at most (a split job's: row bands, energy planes)."""

    shape: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    dtype: np.dtype
    dims: tuple[str, ...]

    def __post_init__(self) -> None:
        if sum(len(c) > 1 for c in self.chunks) > 1:
            raise ValueError(f"chunks {self.chunks} cut more than one axis")

    def blocks(self) -> Iterator[Block]:
        """Every block index, in C order."""
        return itertools.product(*(range(len(c)) for c in self.chunks))

    def spans(self, budget: int) -> Iterator[tuple[tuple[slice, ...], list[tuple[Block, tuple[slice, ...]]]]]:
        """Runs of consecutive blocks of at most ``budget`` bytes (one block at least), in order: the region of
        the array each covers and, for each of its blocks, the block index and where it lies in the region."""
        axis = next((a for a, c in enumerate(self.chunks) if len(c) > 1), 0)
        edges = np.cumsum((0, *self.chunks[axis])).tolist()
        slab = np.dtype(self.dtype).itemsize * math.prod(self.shape) // max(1, self.shape[axis])
        first = 0
        while first < len(edges) - 1:
            last = first + 1
            while last < len(edges) - 1 and (edges[last + 1] - edges[first]) * slab <= budget:
                last += 1
            region = tuple(slice(edges[first], edges[last]) if a == axis else slice(0, n)
                           for a, n in enumerate(self.shape))
            parts = [(tuple(b if a == axis else 0 for a in range(len(self.shape))),
                      tuple(slice(edges[b] - edges[first], edges[b + 1] - edges[first]) if a == axis else slice(None)
                            for a in range(len(self.shape)))) for b in range(first, last)]
            yield region, parts
            first = last


def create_chunked(container, key: str, layout: ArrayLayout):
    """A new array ``key`` (zeros until written) in ``container`` with ``layout``'s chunks."""
    structure = ArrayStructure(shape=layout.shape, chunks=layout.chunks, dims=layout.dims,
                               data_type=BuiltinDtype.from_numpy_dtype(np.dtype(layout.dtype)))
    return container.new(StructureFamily.array, [DataSource(structure=structure,
                                                            structure_family=StructureFamily.array)], key=key)


class Staging:
    """The staging container of one submission inside ``result`` (a Tiled container client).

    Parameters
    ----------
    result : the result container
    layouts : array name -> :class:`ArrayLayout` of the arrays the tasks write
    job : what the submission is, for a person who finds a staging container left behind
    block_bytes : bytes read (and copied) at a time, per array: memory stays bounded whatever the size
    """

    def __init__(self, result, layouts: Mapping[str, ArrayLayout], *, job: str, block_bytes: int = BLOCK_BYTES):
        self.result, self.layouts, self.job, self.block_bytes = result, dict(layouts), job, block_bytes
        self.key = STAGING_PREFIX + secrets.token_hex(8)
        self.node = None

    def create(self) -> None:
        """Create the staging container and its (zero) arrays."""
        self.node = self.result.create_container(self.key, metadata={"staging": {"job": self.job,
                                                                                  "started": time.time()}})
        for name, layout in self.layouts.items():
            create_chunked(self.node, name, layout)

    def read_back(self, digests: Digests) -> None:
        """Read every staged block back; a StagingError naming those missing or not as written."""
        problems = []
        for name in self.layouts:
            problems += [f"{name} {problem}" for problem in self._differences(name, self.node[name], digests)]
        if problems:
            raise StagingError(f"staged arrays in {self.key}: " + "; ".join(problems[:10]))

    def copy(self, name: str, container, key: str, digests: Digests) -> None:
        """Copy staged array ``name`` into a new array ``key`` of ``container`` (which must not hold one), at most
        :data:`BLOCK_BYTES` at a time, each block checked against its digest as it is read from staging."""
        layout = self.layouts[name]
        source, target = self.node[name], create_chunked(container, key, layout)
        for region, parts in layout.spans(self.block_bytes):
            data = np.ascontiguousarray(source[region])
            for block, where in parts:
                if block_digest(data[where]) != digests[name][block]:
                    raise StagingError(f"staged {name} block {block} changed before it was copied")
            if data.shape == layout.shape:  # one request; ArrayClient.patch of several blocks grew the array
                target.write(data)
                continue
            for block, where in parts:
                target.write_block(np.ascontiguousarray(data[where]), block=block)

    def verify_copy(self, name: str, node, digests: Digests) -> None:
        """Read every block of ``node`` (the copy of ``name``) back; a StagingError unless all are as staged."""
        layout = self.layouts[name]
        if tuple(node.shape) != layout.shape or np.dtype(node.dtype) != np.dtype(layout.dtype):
            raise StagingError(f"{name}: {tuple(node.shape)} {node.dtype} in Tiled, staged {layout.shape} "
                               f"{np.dtype(layout.dtype)}")
        problems = self._differences(name, node, digests)
        if problems:
            raise StagingError(f"{name} did not read back as staged: " + "; ".join(problems[:10]))

    def _differences(self, name: str, node, digests: Digests) -> list[str]:
        """The blocks of ``node`` that differ from the digests of ``name`` (or have none), described."""
        problems = []
        for region, parts in self.layouts[name].spans(self.block_bytes):
            data = np.asarray(node[region])
            for block, where in parts:
                expected = digests.get(name, {}).get(block)
                if expected is None:
                    problems.append(f"block {block}: no task wrote it")
                elif block_digest(data[where]) != expected:
                    problems.append(f"block {block}: read back other than written")
        return problems

    def remove(self) -> None:
        """Delete the staging container and its arrays (best effort: a failure is logged)."""
        try:
            if self.key in self.result:
                self.result.delete_contents(check_staging_key(self.key), recursive=True, external_only=False)
        except Exception as exc:  # noqa: BLE001 - the job's outcome stands; the container is named in the log
            logger.warning("could not remove the staging container %s of %s: %s", self.key, self.job, exc)
