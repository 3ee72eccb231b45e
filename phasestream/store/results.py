"""Phase-map results in Tiled: the result container of docs/contract.md ("Results in Tiled") and its writer.

One container ``<root>/<run uid>`` (``<root>/<run uid>.f<index>`` per field of a run imaged at several
positions) with specs ``["PhaseMap"]`` holding the arrays of ``MAP_LAYOUT`` (``phasestream.contract``)
and ``od`` (E, Y, X), and the result metadata. Keys and the root are checked before they name a node
or a folder; an existing result is replaced only with ``replace=True`` (``phasestream reprocess``), and
:meth:`ResultWriter.read_back` reads the arrays back bit for bit before a result is complete (docs/contract.md).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tiled.client.container import Container
from tiled.client.utils import ClientError

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
from phasestream.contract.metadata import finite_number, json_ready, result_layout
from phasestream.store.liveness import process_identity
from phasestream.store.odcube import OdCube
from phasestream.store.odstore import external_od_path, remove_od_store
from phasestream.store.readback import ReadBackError, read_back, read_back_planes
from phasestream.store.tiled import ensure_container, explained_refusal

__all__ = ["POST_SCAN_RECORDS", "ResultExistsError", "ResultWriter", "replaced_record"]

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


#: the post-scan job records a result may hold (docs/contract.md#post-scan-job-records), in the order listed
POST_SCAN_RECORDS = ("refinement", "enhancement", "enhancements", "denoising", "methods")


def replaced_record(existing) -> dict[str, Any]:
    """What replacing the result node ``existing`` removes, for the new result's ``replaced``: the earlier
    result's ``status`` and ``updated_at``, its ``arrays`` (the keys in it, arrays and containers such as
    ``enhanced``; at most 100 of at most 200 characters) and the post-scan job ``records`` it held, and ``at``,
    when it was removed. Those arrays and records came from the earlier maps: they are not carried over."""
    md = existing.metadata
    return {"status": str(md.get("status"))[:40], "at": time.time(), "updated_at": finite_number(md.get("updated_at")),
            "arrays": sorted(str(key)[:200] for key in list(existing)[:100]),
            "records": [name for name in POST_SCAN_RECORDS if md.get(name)]}


class ResultWriter:
    """Writes one analysed run's results into Tiled, at ``<root>/<key>`` (specs ["PhaseMap"]); ``key`` is the
    run uid, or ``<run uid>.f<index>`` for one field of a run imaged at several positions (docs/contract.md).

    Synchronous and thread-safe (one lock per writer); meant for a writer thread off the hot path.

    OD planes (``write_od``) go into the ``od`` array (E, Y, X) float32, one energy plane per chunk,
    through :attr:`od` (:class:`~phasestream.store.odcube.OdCube`): created at ``n_energies`` planes up
    front, or grown; :meth:`finalize_od` trims a too-large one; readers slice ``od[:n_energies_seen]``.
    With ``od_store``, ``od`` is an uncompressed zarr array at ``<od_store>/<root>/<key>/od.zarr`` written
    directly and registered in Tiled as external data (the way to keep the live OD cube at high frame
    rates; the Tiled server must be allowed to read ``od_store``, on a filesystem both see); replacing a
    result through this writer also removes its files (Tiled never deletes external data).

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
    replace : delete an existing result for this run first (its arrays and post-scan records go with it: the new
        result says so in ``replaced``); otherwise it is an error
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
        md = self._initial_metadata(metadata or {})
        removed = None  # the status of an earlier result this one replaces
        #: what replacing an earlier result removed with it (:func:`replaced_record`); None when none was replaced
        self.replaced: dict[str, Any] | None = None
        with explained_refusal("create", self.path):
            results = ensure_container(client, root)
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
                self.replaced = md["replaced"] = replaced_record(existing)
                removed = self.replaced["status"]
                existing.delete(recursive=True, external_only=False)
                remove_od_store(stale, self.od_store)
            try:
                self.container = results.create_container(key, metadata=md, specs=[RESULT_SPEC])
            except Exception as exc:  # a replaced result: the error says it is gone (the raw run stays)
                if isinstance(exc, ClientError) and exc.response.status_code == 409:  # another writer was first
                    raise ResultExistsError(
                        f"a result for run {run_uid} was created at {self.path} by another writer meanwhile"
                        + ("" if removed is None else f", after the earlier one (status {removed}) was removed")
                        + ": it is left as it is") from exc
                if removed is None:
                    raise
                raise RuntimeError(f"the earlier result at {self.path} (status {removed}) was removed to be "
                                   f"replaced, and the new one could not be created: {exc}") from exc
        self._lock = threading.Lock()
        self._errors_sent: list | None = list(md["errors"])
        self._errors_lost: list = []  # entries sent and then taken back by another update (:meth:`lost`)
        self._arrays: dict[str, Any] = {}
        self.od = OdCube(self.container, self.path, run_uid, self.shape, self._arrays, od_store=self.od_store,
                         od_path=None if od_store is None else path_inside(self.od_store, root, key, "od.zarr"))
        if n_energies is not None:
            try:
                self.od.create(n_energies)
            except OSError as error:  # an OD store that cannot be written: the maps still can be
                log.error("%s; od is created again with the first plane", error)

    def _initial_metadata(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        md = {
            "run_uid": self.run_uid, "scan_id": None, "sample": {}, "state_of_charge": None,
            "energies_eV": [], "references": {"name": None, "phases": self.phases}, "status": "running",
            "n_energies_seen": 0, "errors": [], "image_shape": None if self.shape is None else list(self.shape),
            "updated_at": time.time(),
            **_normalized_fields(metadata),
            "writer": process_identity(),  # who writes it while it is running: never a caller's or document's
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
        self._errors_sent = None  # errors written whole (a list that is not one is replaced)
        self._errors_lost = []
        self.replaced = None
        if errors is not None:  # not a list, which record_error appends to (500s, retried for 25 s)
            self.update_metadata(errors=errors)
        self._arrays = {key: container[key] for key in container}
        self.od_store = None if od_store is None else Path(od_store).resolve()
        # an external od is opened only to write od: jobs that only add arrays may not see the OD store
        self.od = OdCube(container, path, run_uid, self.shape, self._arrays, od_store=self.od_store,
                         od_path=external_od_path(self._arrays.get("od")), planes=set(range(seen)))
        return self

    @property
    def metadata(self) -> dict[str, Any]:
        """The result metadata as this writer last wrote or read it."""
        return dict(self.container.metadata)

    @property
    def n_od_planes(self) -> int:
        """Extent of the written OD planes: highest energy index written + 1 (0 if none)."""
        return self.od.n_planes

    @property
    def od_external(self) -> bool:
        """``od`` is written directly as external zarr data (``od_store``), not uploaded."""
        return self.od.external

    def write_od(self, index: int, od: np.ndarray) -> None:
        """Write the (Y, X) OD plane of energy number ``index`` (0-based) into ``od[index]``."""
        plane = np.ascontiguousarray(od, dtype=OD_DTYPE)
        if plane.shape != self.shape:
            raise ValueError(f"OD plane {index} of run {self.run_uid} has shape {plane.shape}, expected {self.shape}")
        self.write_od_planes(index, plane[np.newaxis])

    def write_od_planes(self, start: int, planes: np.ndarray) -> None:
        """Write consecutive OD planes (n, Y, X) into ``od[start : start + n]`` with one request.

        Fewer, larger requests when planes queue up behind a busy server (each request costs tens
        of ms whatever its size); the chunks stay one plane each, as with :meth:`write_od`.
        """
        block = self.od.checked(start, planes)
        with self._lock:
            self.od.prepare(start + block.shape[0])
            self.od.write(start, block)

    def read_back_od_written(self) -> None:
        """Read the OD planes written since the last call back from Tiled, comparing their digests
        (``OdCube.read_back_written``): spread over a scan, the final :meth:`read_back` has less to read."""
        with self._lock:
            self.od.read_back_written()

    def finalize_od(self, n: int | None = None, *, update_metadata: bool = True) -> None:
        """Declare the final number of OD planes ``n`` (default :attr:`n_od_planes`).

        Sets ``n_energies_seen = n`` in the metadata (unless ``update_metadata`` is False: the caller
        writes it with its own final update). If ``od`` holds more planes (an aborted
        scan), it is rewritten with its first ``n`` planes, the one way to shrink it in Tiled;
        with ``n == 0`` it is removed.
        """
        n = self.n_od_planes if n is None else int(n)
        with self._lock:
            self.od.trim(n)
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
        od = None if od_planes is None else (od_planes[0], self.od.checked(*od_planes))

        def write(item: tuple[str, np.ndarray]) -> None:
            name, array = item
            if name is None:  # the OD planes
                self.od.write(*array)
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
                self.od.prepare(od[0] + od[1].shape[0])
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

    def read_back(self, maps: Mapping[str, np.ndarray], n_od: int | None = None) -> dict[str, str]:
        """Read ``maps`` (name -> the array written) and the first ``n_od`` planes of ``od`` (None: not
        written) back from Tiled, bit for bit, the condition for calling a result ``complete``; ``{name:
        SHA-256 of the array's bytes}``. ``od`` is compared plane by plane with the digests taken as this
        writer wrote it (:mod:`phasestream.store.readback`); when every plane was read back as written
        (:meth:`read_back_od_written`, while the sink was idle; the rest here), only its structure is read again.

        Raises :class:`~phasestream.store.readback.ReadBackError`, its ``problems`` naming each array that did
        not read back (the maps are all checked even when ``od`` fails, and the other way round).
        """
        digests, problems = {}, []
        try:
            digests.update(read_back(self, maps))
        except ReadBackError as error:
            problems += error.problems
        except Exception as error:  # noqa: BLE001 - any read failure means: not read back
            problems.append(f"maps: cannot be read back ({type(error).__name__}: {error})")
        if n_od:
            with self._lock:
                self.od.read_back_written()
                planes, verified, read = dict(self.od.digests), set(self.od.verified), self.od.read_back_digest(n_od)
            try:
                digests["od"] = read_back_planes(self, "od", (n_od, *self.shape), OD_DTYPE, planes, verified=verified,
                                                 read_back=read)
            except ReadBackError as error:
                problems += error.problems
            except Exception as error:  # noqa: BLE001 - any read failure means: not read back
                problems.append(f"od: cannot be read back ({type(error).__name__}: {error})")
            else:
                with self._lock:
                    served = self.od.served_problem(n_od)
                if served is not None:
                    digests.pop("od")
                    problems.append(served)
        if problems:
            raise ReadBackError(f"arrays did not read back from Tiled: {'; '.join(problems)}", problems)
        return digests

    def update_metadata(self, **fields: Any) -> None:
        """Merge ``fields`` into the result metadata: each top-level key is set whole (shallow merge), except
        ``errors`` of a writer that created the result, whose new entries are appended (:meth:`_errors_patch`).

        ``updated_at`` (seconds since the epoch) is set with every update: a result left ``running``
        whose ``updated_at`` is old belongs to no live run (see ``LiveService.find_stale``).
        """
        fields = _normalized_fields({**fields, "updated_at": time.time()})
        with self._lock, explained_refusal("update metadata of", self.path):
            patch = [{"op": "add", "path": _pointer(key), "value": value} for key, value in fields.items()
                     if key != "errors"]
            try:
                self.container.patch_metadata(metadata_patch=patch + self._errors_patch(fields.get("errors")),
                                              drop_revision=True)
            except Exception:  # errors no longer a list to append to (edited by hand): set whole, once
                if "errors" not in fields or self._errors_sent is None:
                    raise
                self.container.patch_metadata(metadata_patch=[*patch, {"op": "add", "path": "/errors",
                                                                       "value": fields["errors"]}],
                                              drop_revision=True)
            if "errors" in fields:
                self._errors_sent = list(fields["errors"]) if self._errors_sent is not None else None

    def lost(self, fields: Mapping[str, Any], keys: Sequence[str] = ("status", "n_energies_seen", "array_sha256")
             ) -> list[str]:
        """The ``keys`` of ``fields`` (an update this writer made) that the result in Tiled does not hold as written,
        read afresh, and ``errors`` when an entry of ``fields["errors"]`` is missing from Tiled's list (the next update
        appends those again): another process that read before this update and wrote after it (a sweep, a conflict
        note, an edit by hand) takes it back without an error (Tiled writes the patched metadata whole)."""
        held = self.fresh_metadata()
        wanted = _normalized_fields({key: fields[key] for key in keys if key in fields})
        lost = [key for key, value in wanted.items() if held.get(key) != value]
        errors = held.get("errors")
        if "errors" in fields and self._errors_sent is not None and isinstance(errors, list):
            self._errors_lost = [e for e in json_ready(list(fields["errors"])) if e not in errors]
            lost += ["errors"] if self._errors_lost else []
        return lost

    def fresh_metadata(self) -> Mapping[str, Any]:
        """The result's metadata as Tiled holds it now (read again, not the copy this client cached)."""
        with self._lock, explained_refusal("read metadata of", self.path):
            return self.container.refresh().metadata

    def update_entries(self, entries: Mapping[str, Mapping[str, Any]], *,
                       removed: Mapping[str, Iterable[str]] | None = None, **fields: Any) -> None:
        """Set ``entries`` (map key -> {name: value}) and remove ``removed`` (map key -> names) in the metadata maps
        (``models``, ``enhancements``) one entry at a time, with ``fields`` set whole in the same update (as
        :meth:`update_metadata`; not ``errors``). What other processes put into those maps meanwhile stays: a
        post-scan job that wrote the whole map from the copy it read when it began took back the model or the
        enhancement another job had added while it worked. A map missing from Tiled, or not a map, is set whole."""
        if "errors" in fields:
            raise ValueError("update_entries sets no errors: use update_metadata or record_error")
        removed = {key: set(names) for key, names in (removed or {}).items()}
        held = self.fresh_metadata()
        patch = [{"op": "add", "path": _pointer(key), "value": value}
                 for key, value in _normalized_fields({**fields, "updated_at": time.time()}).items()]
        for key in sorted(set(entries) | set(removed)):
            current, mine = held.get(key), json_ready(dict(entries.get(key, {})))
            if not isinstance(current, Mapping):  # set whole: nothing of another process's to keep
                patch.append({"op": "add", "path": _pointer(key), "value": mine})
                continue
            # added, then removed: a remove of an entry another process removed meanwhile failed (500, retried 25 s)
            gone = sorted(removed.get(key, set()) & set(current) - set(mine))
            patch += [{"op": op, "path": _pointer(key) + _pointer(name), **({"value": None} if op == "add" else {})}
                      for name in gone for op in ("add", "remove")]
            patch += [{"op": "add", "path": _pointer(key) + _pointer(name), "value": value}
                      for name, value in mine.items()]
        with self._lock, explained_refusal("update metadata of", self.path):
            self.container.patch_metadata(metadata_patch=patch, drop_revision=True)

    def _errors_patch(self, errors: list | None) -> list[dict]:
        """The patch that makes this writer's ``errors`` these: only the entries new since the list it last wrote are
        appended, so a note another process appended meanwhile (a conflict, a job's failure) stays; the list is set
        whole when it is not the last one grown (a reopened result's)."""
        if errors is None:
            return []
        sent, lost, self._errors_lost = self._errors_sent, self._errors_lost, []
        if sent is not None and errors[:len(sent)] == sent:
            return [{"op": "add", "path": "/errors/-", "value": error} for error in [*lost, *errors[len(sent):]]]
        return [{"op": "add", "path": "/errors", "value": errors}]

    def record_error(self, message: str, attempts: int = 3) -> None:
        """Append ``message`` to the ``errors`` list of the result (server-side append), read back and appended again
        (``attempts`` appends at most) while Tiled does not hold it: the notes of processes other than the writer (a
        conflict, a recovery's reason, a job's failure) are sent once, and another update could take one back."""
        log.warning("run %s: %s", self.run_uid, message)
        patch = [{"op": "add", "path": "/errors/-", "value": str(message)}]
        for _ in range(attempts):
            with self._lock, explained_refusal("update metadata of", self.path):
                self.container.patch_metadata(metadata_patch=patch, drop_revision=True)
            errors = self.fresh_metadata().get("errors")
            if not isinstance(errors, list) or str(message) in errors:
                return
        log.error("run %s: the note %r did not hold after %d appends", self.run_uid, str(message)[:200], attempts)

