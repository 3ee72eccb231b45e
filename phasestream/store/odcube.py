"""The ``od`` cube (E, Y, X) of one result, written plane by plane while a run goes on (``ResultWriter``).

``od`` is float32, chunked one energy plane per chunk, so a plane is one block write. With the number
of energies known it is created at that size up front; past its capacity, or with it unknown
(created at the first plane), it grows with ``patch(extend=True)``, which adds exactly the chunks of
the new planes. Tiled cannot shrink an array: :meth:`OdCube.trim` rewrites a too-large ``od`` at its
final size. Until then planes not yet written read as 0; readers slice ``od[:n_energies_seen]``.

With an OD store (``od_path`` inside ``od_store``), ``od`` is instead an uncompressed zarr array
written directly and registered in Tiled as external data (same key, shape, chunks and dtype): a
plane costs a file write instead of an HTTP upload that Tiled compresses (about 0.2 s of CPU for a
2048^2 plane). Growing and trimming resize the zarr array and register it again; every file operation
first checks that the path is this result's own in the store (``odstore.check_own_od``).

Not thread-safe by itself: the :class:`~phasestream.store.results.ResultWriter` that owns it calls it
holding its lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import DataSource

from phasestream.contract import OD_DTYPE
from phasestream.store.odstore import (
    OD_ZARR_CONFIG,
    PlaneReader,
    check_own_od,
    external_od_path,
    external_source,
    flush_and_drop,
    new_od_zarr,
    plane_structure,
    remove_od_store,
)
from phasestream.store.readback import BLOCK_BYTES, plane_sha256, uncompressed
from phasestream.store.tiled import explained_refusal

__all__ = ["OdCube"]

log = logging.getLogger(__name__)


def _same_bytes(got: np.ndarray, plane: np.ndarray) -> bool:
    """Whether ``got`` (uint8) is the bytes of ``plane`` as stored (little-endian float32, C order); compared 8
    bytes at a time where the size allows (about 2 ms for 16 MB against 5 ms a byte at a time)."""
    want = np.ascontiguousarray(plane, dtype="<f4").reshape(-1).view(np.uint8)
    if got.size != want.size:
        return False
    wide = np.uint64 if want.size % 8 == 0 else np.uint8
    return bool(np.array_equal(got.view(wide), want.view(wide)))


class OdCube:
    """The ``od`` array of the result ``container`` at ``path``.

    Parameters
    ----------
    container : the result's Tiled container
    path : its path (in messages), ``run_uid`` the run (in messages)
    shape : (Y, X) of a plane
    arrays : the writer's name -> Tiled array node map; ``arrays["od"]`` is kept current here
    od_path, od_store : the external zarr array and the OD store it must lie in (None: uploaded to Tiled)
    planes : the planes already written (a reopened result)
    """

    def __init__(self, container, path: str, run_uid: str, shape: tuple[int, int] | None, arrays: dict[str, Any], *,
                 od_path: Path | None = None, od_store: Path | None = None, planes: set[int] | None = None):
        self.container, self.path, self.run_uid, self.shape = container, path, run_uid, shape
        self.arrays = arrays
        self.od_path, self.od_store = od_path, od_store
        self._zarr: zarr.Array | None = None
        self.capacity = arrays["od"].shape[0] if "od" in arrays else 0
        self.planes: set[int] = set() if planes is None else {p for p in planes if p < self.capacity}
        #: plane index -> SHA-256 of the plane as this writer wrote it (``readback.read_back_planes``); none for
        #: the planes of a reopened result, which an earlier writer wrote, nor for those of an external od read
        #: back as written at once (:meth:`_read_back_file`)
        self.digests: dict[int, str] = {}
        #: planes read back as written (from Tiled, or an external od's files) while the sink was idle
        #: (:meth:`read_back_written`)
        self.verified: set[int] = set()
        #: SHA-256 of planes ``0 .. streamed - 1`` as written, while they were written once each, in order
        #: (the whole cube's digest without reading it again); None once planes came otherwise
        self.stream: Any | None = hashlib.sha256()
        self.streamed = 0
        self._reader: tuple[int, Any] | None = None
        self._disk: PlaneReader | bool | None = None  # reads an external od's planes from disk (False: via zarr)

    @property
    def n_planes(self) -> int:
        """Extent of the written planes: highest energy index written + 1 (0 if none)."""
        return max(self.planes) + 1 if self.planes else 0

    @property
    def external(self) -> bool:
        """``od`` is written directly as external zarr data, not uploaded."""
        return self.od_path is not None

    def create(self, n_planes: int) -> None:
        """A new ``od`` of ``n_planes`` planes: in Tiled's storage, or a new external zarr array."""
        if self.od_path is not None:
            with self._store_errors():
                self._zarr = new_od_zarr(self.od_path, (n_planes, *self.shape))
        self._register(n_planes)

    def _register(self, n_planes: int) -> None:
        structure = plane_structure(n_planes, self.shape)
        source = (DataSource(structure=structure, structure_family=StructureFamily.array) if self.od_path is None
                  else external_source(structure, self.od_path))
        with explained_refusal("create", f"{self.path}/od"):
            self.arrays["od"] = self.container.new(StructureFamily.array, [source], key="od")
        self.capacity = n_planes

    def _zarr_array(self) -> zarr.Array:
        """The external zarr array of ``od``, opened on first use."""
        if self._zarr is None:
            with self._store_errors():
                self._zarr = zarr.open_array(str(self.od_path), mode="r+", config=OD_ZARR_CONFIG)
        return self._zarr

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        """Around every file operation on an external ``od``, first checked to be this result's in the OD store."""
        check_own_od(self.od_path, self.od_store, self.path)
        try:
            yield
        except OSError as error:
            raise OSError(f"cannot write the OD cube of run {self.run_uid} at {self.od_path}: {error}") from error

    def _resize_external(self, n_planes: int) -> None:
        """External ``od`` at a new number of planes: Tiled's record is immutable, so register it again."""
        with self._store_errors():
            self._zarr_array().resize((n_planes, *self.shape))
        with explained_refusal("rewrite", f"{self.path}/od"):
            self.container.delete_contents("od", external_only=False)
        del self.arrays["od"]
        self._register(n_planes)

    def checked(self, start: int, planes: np.ndarray) -> np.ndarray:
        """``planes`` (n, Y, X) as the float32 block written at ``start``; ValueError for a wrong shape or start."""
        block = np.ascontiguousarray(planes, dtype=OD_DTYPE)
        if block.ndim != 3 or block.shape[1:] != self.shape or block.shape[0] < 1:
            raise ValueError(f"OD planes of run {self.run_uid} have shape {block.shape}, expected (n, *{self.shape})")
        if start < 0:
            raise ValueError(f"energy index must be >= 0, got {start}")
        return block

    def prepare(self, end: int) -> None:
        """Create ``od`` if missing, at ``end`` planes."""
        if "od" not in self.arrays:
            self.create(end)

    def write(self, start: int, block: np.ndarray) -> None:
        """One request for ``od[start : start + n]`` (``od`` exists: :meth:`prepare`)."""
        end = start + block.shape[0]
        if end > self.capacity:
            log.debug("growing %s/od from %d to %d planes", self.path, self.capacity, end)
        if self.od_path is not None:
            if end > self.capacity:  # unknown or exceeded number of energies: grow geometrically
                self._resize_external(max(end, 2 * self.capacity))
            array = self._zarr_array()
            with self._store_errors():
                array[start:end] = block
                for index in range(start, end):
                    flush_and_drop(self.od_path / array.metadata.encode_chunk_key((index, 0, 0)))
            self._written(start, block, digests=False)
            self._read_back_file(start, block)
            return
        with explained_refusal("write", f"{self.path}/od"):
            array = self.arrays["od"]
            if end == start + 1 and end <= self.capacity:
                array.write_block(block, block=(start, 0, 0))
            else:
                array.patch(block, offset=(start,), extend=end > self.capacity)
                self.capacity = max(self.capacity, end)
            self._written(start, block)

    def _written(self, start: int, block: np.ndarray, *, digests: bool = True) -> None:
        """``block`` is in ``od[start:]``: its planes are written, each with its digest (about 10 ms for 2048^2;
        not for an external ``od``, whose planes are read back at once, :meth:`_read_back_file`)."""
        end = start + block.shape[0]
        self.planes.update(range(start, end))
        if digests:
            self.digests.update((start + i, plane_sha256(plane)) for i, plane in enumerate(block))
        else:
            for index in range(start, end):
                self.digests.pop(index, None)
        self.verified.difference_update(range(start, end))
        if self.stream is not None and start == self.streamed:
            self.stream.update(block)
            self.streamed = end
        else:  # out of order, or written again: the final read-back reads the whole cube
            self.stream = None

    def _read_back_file(self, start: int, block: np.ndarray) -> None:
        """Read the planes of an external ``od`` just written (``block`` at ``start``) back from their zarr files,
        whose chunks were dropped from the page cache (the disk's bytes: :class:`PlaneReader`), and compare them
        byte for byte with ``block``, still in memory: a plane that matches is :attr:`verified`; one that does
        not, or a read that fails, gets its digest for the final read-back, which reads it again through Tiled
        and names it. Two SHA-256s of a plane fewer than reading it back later (about 20 ms of a 2048^2 plane)."""
        for i, plane in enumerate(block):
            try:
                with self._store_errors():
                    got = self._disk_plane(start + i)
            except Exception as error:  # noqa: BLE001 - read again, and reported, by the final read-back
                log.debug("%s/od: plane %d not read back from its file (%s)", self.path, start + i,
                          type(error).__name__)
                got = None
            if got is not None and _same_bytes(got, plane):
                self.verified.add(start + i)
            else:
                self.digests[start + i] = plane_sha256(plane)

    def _disk_plane(self, index: int) -> np.ndarray:
        """Plane ``index`` of the external ``od`` as its file holds it (uint8; valid until the next call)."""
        array = self._zarr_array()
        if self._disk is None:
            nbytes = int(np.prod(self.shape)) * np.dtype(OD_DTYPE).itemsize
            self._disk = PlaneReader(nbytes) if PlaneReader.stored_as_bytes(array) else False
        if self._disk is False:  # another layout: through zarr
            return np.ascontiguousarray(array[index]).reshape(-1).view(np.uint8)
        got = self._disk.read(self.od_path / array.metadata.encode_chunk_key((index, 0, 0)))
        if got is None:
            raise ValueError(f"the chunk file of plane {index} does not hold one plane")
        return got

    def read_back_written(self, block_bytes: int = BLOCK_BYTES) -> None:
        """Read the planes written and not yet read back (runs of consecutive planes, at most ``block_bytes`` a
        read) and count those whose bytes have their digest as :attr:`verified`: from Tiled (uncompressed), or,
        for an external ``od``, from its zarr files, whose chunks were dropped from the page cache when written
        (what Tiled serves from them is checked at the end, :meth:`served_problem`). A plane that differs, or a
        read that fails, is left to the final read-back (``ResultWriter.read_back``), which reads it again
        through Tiled and names it. Called while the sink has nothing else to write, this leaves the final
        read-back only the last planes when planes come at a detector's pace."""
        pending = sorted(set(self.digests) - self.verified)
        if not pending:
            return
        rows = max(1, int(block_bytes) // (int(np.prod(self.shape)) * np.dtype(OD_DTYPE).itemsize))
        try:
            if self.od_path is not None:
                with self._store_errors():
                    source = self._zarr_array()
            else:
                if self._reader is None or self._reader[0] != self.capacity:  # a grown od: its new shape
                    self._reader = (self.capacity, uncompressed(self.container)["od"])
                source = self._reader[1]
            start = 0
            while start < len(pending):
                end = start + 1
                while end < len(pending) and end - start < rows and pending[end] == pending[end - 1] + 1:
                    end += 1
                first = pending[start]
                got = np.ascontiguousarray(source[first:first + end - start])
                self.verified.update(first + i for i, plane in enumerate(got)
                                     if plane_sha256(plane) == self.digests.get(first + i))
                start = end
        except Exception as error:  # noqa: BLE001 - read again, and reported, by the final read-back
            log.debug("%s/od: planes not read back yet (%s)", self.path, type(error).__name__)

    def served_problem(self, n: int) -> str | None:
        """For an external ``od`` of ``n`` planes: how what Tiled serves is not its zarr files here (None when it
        is): Tiled's data source must be this file, and a corner of the last plane read through Tiled must equal
        the file's, byte for byte. (The planes themselves are read back from the file.)"""
        if self.od_path is None or not n:
            return None
        try:
            node = uncompressed(self.container)["od"]
            served = external_od_path(node)
            if served is None or served.resolve() != self.od_path.resolve():
                return f"od: Tiled serves it from {served}, not from the file written, {self.od_path}"
            corner = (n - 1, slice(0, 4), slice(0, 4))
            with self._store_errors():
                written = np.ascontiguousarray(self._zarr_array()[corner])
            if np.ascontiguousarray(node[corner]).tobytes() != written.tobytes():
                return f"od: Tiled serves other values than its file {self.od_path} holds (plane {n - 1})"
        except Exception as error:  # noqa: BLE001 - any failure means: not read back
            return f"od: cannot be read back through Tiled ({type(error).__name__}: {error})"
        return None

    def read_back_digest(self, n: int) -> str | None:
        """The SHA-256 of planes ``0 .. n - 1`` when each was written once, in order, and read back as written
        (:meth:`read_back_written`): nothing left to read; else None."""
        if self.stream is None or self.streamed != n or not self.verified.issuperset(range(n)):
            return None
        return self.stream.hexdigest()

    def trim(self, n: int) -> None:
        """Keep the first ``n`` planes of an ``od`` holding more (an aborted scan): the external zarr array
        resized, an uploaded one written again (the one way to shrink it in Tiled), removed for ``n == 0``."""
        if not 0 <= n <= self.capacity:
            raise ValueError(f"{self.path}/od holds {self.capacity} planes; cannot declare {n} of them")
        if n < self.capacity:
            log.info("trimming %s/od from %d to %d planes", self.path, self.capacity, n)
            if self.od_path is not None and n:
                self._resize_external(n)
            else:
                with explained_refusal("rewrite", f"{self.path}/od"):
                    kept = self.arrays["od"][:n] if n else None
                    self.container.delete_contents("od", external_only=False)
                    del self.arrays["od"]
                    self.capacity = 0
                    if n:
                        self.create(n)
                        for index in range(n):
                            self.arrays["od"].write_block(kept[index : index + 1], block=(index, 0, 0))
                if self.od_path is not None:  # external and removed: its files go too
                    self._zarr = None
                    remove_od_store(self.od_path, self.od_store)
            self.planes = {p for p in self.planes if p < n}
            self.digests = {p: d for p, d in self.digests.items() if p < n}
            self.stream = None  # the running digest holds the dropped planes too: the final read-back reads all
            if self.od_path is None:  # an uploaded od is written again from what Tiled served
                self.verified.clear()
            else:  # an external one keeps its files
                self.verified = {p for p in self.verified if p < n}
