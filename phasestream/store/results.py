"""Phase-map results in Tiled: the result container of docs/contract.md ("Results in Tiled") and its writer.

One container ``<root>/<run uid>`` (``<root>/<run uid>.f<index>`` per field of a run imaged at several
positions) with specs ``["PhaseMap"]`` holding the arrays of ``MAP_LAYOUT`` (``phasestream.contract``)
and ``od`` (E, Y, X), and the result metadata. Keys and the root are checked before they name a node
or a folder; an existing result is replaced only with ``replace=True`` (``phasestream reprocess``), and
:meth:`ResultWriter.verify` reads the arrays back before a result is complete (docs/security.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tiled.client.container import Container
from tiled.client.utils import ClientError
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import DataSource

from phasestream.contract import (
    MAP_LAYOUT,
    OD_DTYPE,
    RESULT_SPEC,
    STATUSES,
    check_result_root,
    check_run_uid,
    path_inside,
)
from phasestream.contract.fields import check_result_key
from phasestream.contract.metadata import json_ready, result_layout
from phasestream.store.odstore import (
    OD_ZARR_CONFIG,
    check_own_od,
    external_od_path,
    external_source,
    flush_and_drop,
    new_od_zarr,
    plane_structure,
    remove_od_store,
)
from phasestream.store.tiled import explained_refusal

__all__ = ["ResultExistsError", "ResultWriter"]

log = logging.getLogger(__name__)


class ResultExistsError(FileExistsError):
    """A result container for this run already exists."""


def _normalized_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    fields = json_ready(fields)
    if fields.get("state_of_charge") is not None:
        fields["state_of_charge"] = float(fields["state_of_charge"])
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {fields['status']!r}")
    return fields


def _pointer(key: str) -> str:
    """JSON pointer (RFC 6901) of a top-level metadata key."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


@functools.cache
def _map_pool() -> ThreadPoolExecutor:
    """Threads shared by all writers for concurrent in-place array writes."""
    return ThreadPoolExecutor(max_workers=6, thread_name_prefix="tiled-write")


def _ensure_container(client: Container, path: str) -> Container:
    """``client[path]``, creating the missing containers along ``path`` ("a" or "a/b")."""
    node = client
    for key in path.strip("/").split("/"):
        if key not in node:
            try:
                node.create_container(key)
            except ClientError as error:
                if error.response.status_code != 409:  # created meanwhile by someone else
                    raise
        node = node[key]
    return node


class ResultWriter:
    """Writes one analysed run's results into Tiled, at ``<root>/<key>`` (specs ["PhaseMap"]); ``key`` is the
    run uid, or ``<run uid>.f<index>`` for one field of a run imaged at several positions (docs/contract.md).

    Synchronous and thread-safe (one lock per writer); meant for a writer thread off the hot path.

    OD planes (``write_od``) go into the ``od`` array (E, Y, X) float32, chunked one energy
    plane per chunk, so a plane is one block write. With ``n_energies`` known, ``od`` is
    created at that size up front. Past its capacity, or with ``n_energies=None`` (created at
    the first plane), ``od`` grows with ``patch(extend=True)``, which adds exactly the chunks
    of the new planes (zarr chunks stay one plane). Tiled cannot shrink an array:
    :meth:`finalize_od` trims a too-large ``od`` by rewriting it at the final size. Until then
    planes not yet written read as 0; readers slice ``od[:n_energies_seen]``.

    With ``od_store``, ``od`` is instead an uncompressed zarr array that this writer writes
    directly, at ``<od_store>/<root>/<run uid>/od.zarr``, registered in Tiled as external data
    (same key, shape, chunks and dtype: readers see no difference). A plane then costs a file
    write instead of an HTTP upload that Tiled compresses (about 0.2 s of CPU for a 2048^2
    plane): the way to keep the live OD cube at high frame rates. The Tiled server must be
    allowed to read ``od_store`` (``readable_storage``), on a filesystem both see. Growing,
    trimming and replacing resize the zarr array and register it again; replacing or deleting
    through this writer also removes the files (Tiled never deletes external data).

    Parameters
    ----------
    client : Tiled client with write access
    run_uid : uid of the raw run the result belongs to
    key : the result's key (``phasestream.contract.fields.field_key``); default ``run_uid``
    root : key (or path) of the results container, created if missing
    shape : (Y, X) image shape, or None for a run without any usable image (metadata only)
    phases : the K reference phase names, in ``pcc`` order
    n_energies : number of energies E when known (start document ``num_points``)
    metadata : result metadata (docs/contract.md), merged over the defaults; ``state_of_charge`` is
        taken from ``sample`` when not given
    replace : delete an existing result for this run first; otherwise it is an error
    od_store : directory for ``od`` as external zarr data (see above); None: ``od`` is
        uploaded to Tiled's own storage
    """

    def __init__(
        self,
        client: Container,
        run_uid: str,
        *,
        root: str = "phasestream",
        shape: tuple[int, int] | None,
        phases: Sequence[str],
        n_energies: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        replace: bool = False,
        od_store: str | Path | None = None,
        key: str | None = None,
    ):
        if n_energies is not None and n_energies < 1:
            raise ValueError(f"n_energies must be >= 1 or None (unknown), got {n_energies}")
        # the uid names a Tiled key and a folder: checked before anything is written or deleted
        run_uid, root = check_run_uid(run_uid), check_result_root(root)
        self.key = key = run_uid if key is None else check_result_key(key)
        self.run_uid, self.phases = run_uid, list(phases)
        # None: no image arrived (a failed run records its status and errors, no arrays)
        self.shape = None if shape is None else (int(shape[0]), int(shape[1]))
        self.path = f"{root}/{key}"
        self.od_store = None if od_store is None else Path(od_store).resolve()
        self.od_path = None if od_store is None else path_inside(self.od_store, root, key, "od.zarr")
        self._od_zarr: zarr.Array | None = None
        md = self._initial_metadata(metadata or {})
        removed = None  # the status of an earlier result this one replaces
        with explained_refusal("create", self.path):
            results = _ensure_container(client, root)
            if key in results:
                if not replace:
                    raise ResultExistsError(
                        f"a result for run {run_uid} already exists at {self.path}: pass replace=True to "
                        "overwrite it, or use ResultWriter.open() to continue it"
                    )
                log.info("replacing result %s (asked for explicitly)", self.path)
                existing = results[key]
                if RESULT_SPEC not in [spec.name for spec in existing.specs]:
                    raise TypeError(f"{self.path} is not a {RESULT_SPEC} result; refusing to replace it")
                stale = external_od_path(existing["od"] if "od" in existing else None)
                removed = str(existing.metadata.get("status"))[:40]
                existing.delete(recursive=True, external_only=False)
                remove_od_store(stale, self.od_store)
            try:
                self.container = results.create_container(key, metadata=md, specs=[RESULT_SPEC])
            except Exception as exc:  # a replaced result: the error says it is gone (the raw run stays)
                if removed is None:
                    raise
                raise RuntimeError(f"the earlier result at {self.path} (status {removed}) was removed to be "
                                   f"replaced, and the new one could not be created: {exc}") from exc
        self._lock = threading.Lock()
        self._arrays: dict[str, Any] = {}
        self._planes: set[int] = set()
        self._od_capacity = 0
        if n_energies is not None:
            try:
                self._create_od(n_energies)
            except OSError as error:  # an OD store that cannot be written: the maps still can be
                log.error("%s; od is created again with the first plane", error)

    def _initial_metadata(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        md = {
            "run_uid": self.run_uid, "scan_id": None, "sample": {}, "state_of_charge": None,
            "energies_eV": [], "references": {"name": None, "phases": self.phases}, "status": "running",
            "n_energies_seen": 0, "errors": [], "image_shape": None if self.shape is None else list(self.shape),
            "updated_at": time.time(),
            **_normalized_fields(metadata),
        }
        if md["run_uid"] != self.run_uid:
            raise ValueError(f"metadata run_uid {md['run_uid']!r} differs from run_uid {self.run_uid!r}")
        references = dict(md["references"] or {})
        if references.setdefault("phases", self.phases) != self.phases:
            raise ValueError(f"metadata references.phases {references['phases']} differ from phases {self.phases}")
        md["references"] = references
        if md["state_of_charge"] is None and (md["sample"] or {}).get("state_of_charge") is not None:
            md["state_of_charge"] = float(md["sample"]["state_of_charge"])
        return md

    @classmethod
    def open(cls, client: Container, run_uid: str, root: str = "phasestream", *,
             od_store: str | Path | None = None) -> ResultWriter:
        """Reopen the existing result ``<root>/<run_uid>`` (a run uid, or a field's key) to go on writing it; its
        external ``od`` (a path from Tiled) only where ``od_store``, the OD store configured here, puts it."""
        path = f"{check_result_root(root)}/{check_result_key(run_uid)}"
        try:
            container = client[path]
        except KeyError as error:
            raise KeyError(f"no result at {path} in Tiled: create it with ResultWriter(...)") from error
        if RESULT_SPEC not in [spec.name for spec in container.specs]:
            raise TypeError(f"{path} is not a {RESULT_SPEC} result (specs {list(container.specs)})")
        self = cls.__new__(cls)
        self.run_uid = self.key = run_uid  # what names it again (a retry command): a field's key for a field
        self.path, self.container = path, container
        self.shape, self.phases, seen, errors = result_layout(path, container.metadata)
        self._lock = threading.Lock()
        if errors is not None:  # not a list, which record_error appends to (500s, retried for 25 s)
            self.update_metadata(errors=errors)
        self._arrays = {key: container[key] for key in container}
        self._od_capacity = self._arrays["od"].shape[0] if "od" in self._arrays else 0
        # an external od is opened only to write od: jobs that only add arrays may not see the OD store
        self.od_path = external_od_path(self._arrays.get("od"))
        self.od_store = None if od_store is None else Path(od_store).resolve()
        self._od_zarr = None
        self._planes = set(range(min(seen, self._od_capacity)))
        return self

    @property
    def metadata(self) -> dict[str, Any]:
        """The result metadata as this writer last wrote or read it."""
        return dict(self.container.metadata)

    @property
    def n_od_planes(self) -> int:
        """Extent of the written OD planes: highest energy index written + 1 (0 if none)."""
        return max(self._planes) + 1 if self._planes else 0

    @property
    def od_external(self) -> bool:
        """``od`` is written directly as external zarr data (``od_store``), not uploaded."""
        return self.od_path is not None

    def _create_od(self, n_planes: int) -> None:
        """A new ``od`` of ``n_planes`` planes: in Tiled's storage, or a new external zarr array."""
        if self.od_path is not None:
            with self._od_store_errors():
                self._od_zarr = new_od_zarr(self.od_path, (n_planes, *self.shape))
        self._register_od(n_planes)

    def _register_od(self, n_planes: int) -> None:
        structure = plane_structure(n_planes, self.shape)
        source = (DataSource(structure=structure, structure_family=StructureFamily.array) if self.od_path is None
                  else external_source(structure, self.od_path))
        with explained_refusal("create", f"{self.path}/od"):
            self._arrays["od"] = self.container.new(StructureFamily.array, [source], key="od")
        self._od_capacity = n_planes

    def _od_array(self) -> zarr.Array:
        """The external zarr array of ``od``, opened on first use."""
        if self._od_zarr is None:
            with self._od_store_errors():
                self._od_zarr = zarr.open_array(str(self.od_path), mode="r+", config=OD_ZARR_CONFIG)
        return self._od_zarr

    @contextlib.contextmanager
    def _od_store_errors(self) -> Iterator[None]:
        """Around every file operation on an external ``od``, first checked to be this result's in the OD store."""
        check_own_od(self.od_path, self.od_store, self.path)
        try:
            yield
        except OSError as error:
            raise OSError(f"cannot write the OD cube of run {self.run_uid} at {self.od_path}: {error}") from error

    def _resize_external_od(self, n_planes: int) -> None:
        """External ``od`` at a new number of planes: Tiled's record is immutable, so register it again."""
        with self._od_store_errors():
            self._od_array().resize((n_planes, *self.shape))
        with explained_refusal("rewrite", f"{self.path}/od"):
            self.container.delete_contents("od", external_only=False)
        del self._arrays["od"]
        self._register_od(n_planes)

    def write_od(self, index: int, od: np.ndarray) -> None:
        """Write the (Y, X) OD plane of energy number ``index`` (0-based) into ``od[index]``."""
        plane = np.ascontiguousarray(od, dtype=OD_DTYPE)
        if plane.shape != self.shape:
            raise ValueError(f"OD plane {index} of run {self.run_uid} has shape {plane.shape}, expected {self.shape}")
        if index < 0:
            raise ValueError(f"energy index must be >= 0, got {index}")
        with self._lock:
            self._prepare_od(index + 1)
            if index >= self._od_capacity:
                log.debug("growing %s/od from %d to %d planes", self.path, self._od_capacity, index + 1)
            self._write_od_block(index, plane[np.newaxis])

    def write_od_planes(self, start: int, planes: np.ndarray) -> None:
        """Write consecutive OD planes (n, Y, X) into ``od[start : start + n]`` with one request.

        Fewer, larger requests when planes queue up behind a busy server (each request costs tens
        of ms whatever its size); the chunks stay one plane each, as with :meth:`write_od`.
        """
        block = self._check_planes(start, planes)
        with self._lock:
            self._prepare_od(start + block.shape[0])
            self._write_od_block(start, block)

    def _check_planes(self, start: int, planes: np.ndarray) -> np.ndarray:
        block = np.ascontiguousarray(planes, dtype=OD_DTYPE)
        if block.ndim != 3 or block.shape[1:] != self.shape or block.shape[0] < 1:
            raise ValueError(f"OD planes of run {self.run_uid} have shape {block.shape}, expected (n, *{self.shape})")
        if start < 0:
            raise ValueError(f"energy index must be >= 0, got {start}")
        return block

    def _prepare_od(self, end: int) -> None:
        """Create ``od`` if missing (holding the lock)."""
        if "od" not in self._arrays:
            self._create_od(end)

    def _write_od_block(self, start: int, block: np.ndarray) -> None:
        """One request for ``od[start : start + n]`` (holding the lock; ``od`` exists)."""
        end = start + block.shape[0]
        if self.od_path is not None:
            if end > self._od_capacity:  # unknown or exceeded number of energies: grow geometrically
                self._resize_external_od(max(end, 2 * self._od_capacity))
            array = self._od_array()
            with self._od_store_errors():
                array[start:end] = block
                for index in range(start, end):
                    flush_and_drop(self.od_path / array.metadata.encode_chunk_key((index, 0, 0)))
            self._planes.update(range(start, end))
            return
        with explained_refusal("write", f"{self.path}/od"):
            array = self._arrays["od"]
            if end == start + 1 and end <= self._od_capacity:
                array.write_block(block, block=(start, 0, 0))
            else:
                array.patch(block, offset=(start,), extend=end > self._od_capacity)
                self._od_capacity = max(self._od_capacity, end)
            self._planes.update(range(start, end))

    def finalize_od(self, n: int | None = None, *, update_metadata: bool = True) -> None:
        """Declare the final number of OD planes ``n`` (default :attr:`n_od_planes`).

        Sets ``n_energies_seen = n`` in the metadata (unless ``update_metadata`` is False: the caller
        writes it with its own final update). If ``od`` holds more planes (an aborted
        scan), it is rewritten with its first ``n`` planes, the one way to shrink it in Tiled;
        with ``n == 0`` it is removed.
        """
        n = self.n_od_planes if n is None else int(n)
        if not 0 <= n <= self._od_capacity:
            raise ValueError(f"{self.path}/od holds {self._od_capacity} planes; cannot declare {n} of them")
        with self._lock:
            if n < self._od_capacity:
                log.info("trimming %s/od from %d to %d planes", self.path, self._od_capacity, n)
                if self.od_path is not None and n:
                    self._resize_external_od(n)
                else:  # uploaded (the one way to shrink it is to write it again), or removed (n == 0)
                    with explained_refusal("rewrite", f"{self.path}/od"):
                        kept = self._arrays["od"][:n] if n else None
                        self.container.delete_contents("od", external_only=False)
                        del self._arrays["od"]
                        self._od_capacity = 0
                        if n:
                            self._create_od(n)
                            for index in range(n):
                                self._arrays["od"].write_block(kept[index : index + 1], block=(index, 0, 0))
                    if self.od_path is not None:  # external and removed: its files go too
                        self._od_zarr = None
                        remove_od_store(self.od_path, self.od_store)
                self._planes = {p for p in self._planes if p < n}
        if update_metadata:
            self.update_metadata(n_energies_seen=n)

    def _check_map(self, name: str, value: Any) -> np.ndarray:
        array = np.asarray(value)
        if name not in MAP_LAYOUT:
            return np.ascontiguousarray(array)
        dtype, dims = MAP_LAYOUT[name]
        if self.shape is None:
            raise ValueError(f"result of run {self.run_uid} was opened without an image shape; cannot write {name!r}")
        expected = {"phase": len(self.phases), "y": self.shape[0], "x": self.shape[1]}
        if len(dims) != array.ndim or any(expected.get(d, n) != n for d, n in zip(dims, array.shape, strict=True)):
            shape = tuple(expected.get(d, "n") for d in dims)
            raise ValueError(f"result array {name!r} of run {self.run_uid} has shape {array.shape}, expected {shape}")
        try:
            return np.ascontiguousarray(array.astype(dtype, casting="same_kind", copy=False))
        except TypeError as error:
            raise TypeError(f"result array {name!r} must be {dtype}, got {array.dtype}: {error}") from error

    def write_maps(self, *, od_planes: tuple[int, np.ndarray] | None = None, **arrays: np.ndarray) -> None:
        """Write or overwrite result arrays by name, e.g. ``pcc`` (K, Y, X) float32, ``phase`` (Y, X) int16.

        Contract names (``MAP_LAYOUT``) are checked for shape and cast to their dtype (bool to
        uint8, int64 to int16; float to int is refused). Other names are stored as given. The
        first call creates an array; later calls with the same shape and dtype overwrite it in
        place (one PUT); a different shape or dtype replaces it. ``od_planes=(start, planes)``
        writes OD planes (:meth:`write_od_planes`) concurrently with the in-place map writes.
        """
        checked = {name: self._check_map(name, value) for name, value in arrays.items()}
        od = None if od_planes is None else (od_planes[0], self._check_planes(*od_planes))

        def write(item: tuple[str, np.ndarray]) -> None:
            name, array = item
            if name is None:  # the OD planes
                self._write_od_block(*array)
                return
            with explained_refusal("write", f"{self.path}/{name}"):
                self._write_map(name, array)

        with self._lock:
            # in-place overwrites are independent requests: send them concurrently (each costs a
            # round trip of tens of ms whatever its size); creations change the container, so
            # they go one at a time
            existing = [(n, a) for n, a in checked.items() if self._overwrites_in_place(n, a)]
            for item in checked.items():
                if item[0] not in dict(existing):
                    write(item)
            if od is not None:
                self._prepare_od(od[0] + od[1].shape[0])
                existing.append((None, od))
            if len(existing) > 1:
                list(_map_pool().map(write, existing))
            elif existing:
                write(existing[0])

    def _overwrites_in_place(self, name: str, array: np.ndarray) -> bool:
        node = self._arrays.get(name)
        return node is not None and node.shape == array.shape and node.dtype == array.dtype

    def _write_map(self, name: str, array: np.ndarray) -> None:
        node = self._arrays.get(name)
        if self._overwrites_in_place(name, array):
            node.write(array)
            return
        if node is not None:
            log.info("replacing %s/%s: now %s %s", self.path, name, array.shape, array.dtype)
            self.container.delete_contents(name, external_only=False)
        dims = MAP_LAYOUT[name][1] if name in MAP_LAYOUT else None
        self._arrays[name] = self.container.write_array(array, key=name, dims=dims)

    def verify(self, expected: Mapping[str, tuple[int, ...]]) -> list[str]:
        """Read the arrays ``expected`` (name -> shape) back from Tiled; the problems found.

        The dtype expected is the contract's (``MAP_LAYOUT``; float32 for ``od``); arrays outside
        the contract are checked for their shape only.

        Each array's structure is fetched from the server again (not from this writer's memory):
        an empty list means every array is there with its shape and dtype, the condition for
        calling a result ``complete``.
        """
        problems = []
        for name, shape in expected.items():
            dtype = OD_DTYPE if name == "od" else MAP_LAYOUT[name][0] if name in MAP_LAYOUT else None
            try:
                with explained_refusal("read", f"{self.path}/{name}"):
                    node = self.container[name]
                    got_shape, got_dtype = tuple(node.shape), np.dtype(node.dtype)
            except KeyError:
                problems.append(f"{name}: missing")
                continue
            except Exception as error:  # noqa: BLE001 - any read failure means: not verified
                problems.append(f"{name}: cannot be read back ({type(error).__name__}: {error})")
                continue
            if got_shape != tuple(shape) or (dtype is not None and got_dtype != dtype):
                problems.append(f"{name}: {got_shape} {got_dtype} in Tiled, expected {tuple(shape)} {dtype or ''}")
        return problems

    def update_metadata(self, **fields: Any) -> None:
        """Merge ``fields`` into the result metadata: each top-level key is set whole (shallow merge).

        ``updated_at`` (seconds since the epoch) is set with every update: a result left ``running``
        whose ``updated_at`` is old belongs to no live run (see ``LiveService.find_stale``).
        """
        fields = _normalized_fields({**fields, "updated_at": time.time()})
        patch = [{"op": "add", "path": _pointer(key), "value": value} for key, value in fields.items()]
        with self._lock, explained_refusal("update metadata of", self.path):
            self.container.patch_metadata(metadata_patch=patch, drop_revision=True)

    def record_error(self, message: str) -> None:
        """Append ``message`` to the ``errors`` list of the result (server-side append)."""
        log.warning("run %s: %s", self.run_uid, message)
        patch = [{"op": "add", "path": "/errors/-", "value": str(message)}]
        with self._lock, explained_refusal("update metadata of", self.path):
            self.container.patch_metadata(metadata_patch=patch, drop_revision=True)

