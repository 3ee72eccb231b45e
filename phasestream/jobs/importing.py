"""The ``import`` job: a facility file (an :class:`~phasestream.formats.ImportedStack`) becomes a raw run in
Tiled, laid out as a live scan of the simulator writes it, so that ``reprocess`` and the worker analyse it
with no further options (docs/import.md).

All or nothing: the stack is checked (:func:`~phasestream.jobs.import_documents.checked_import`) before
anything is written; a write that fails half-way removes the run node this import created (checked to
hold this import's start document) and the job reports ``failed`` with the reason. Importing the same
bytes again (the SHA-256 of the files, under the same raw path) writes nothing and returns the uid of
the run already there.

The run's uid is made from the raw path and the SHA-256 (:func:`import_uid`), so two imports of the same
file started at the same moment write one run: Tiled refuses the second start (the key exists), and that
import reports the first one's run, writing nothing. An earlier import is looked up at that uid only, its
start document checked to be this import's: raw runs are written from documents anyone may publish
(docs/security.md), so a start document that names the file's SHA-256 elsewhere proves nothing, and a node
at the uid that is not this import's run is a conflict (:class:`ImportConflictError`), reported and left as
it is. The SHA-256 is computed in a thread while the references load and the raw path is looked up.

A file whose reader (or whose lazily read images) fails in a way no check foresaw is that file's ``failed``
outcome naming the file and the exception's type, never an exception out of :func:`run`: the CLI goes on
with the next file.

Images that lie in an HDF5 dataset or in TIFF files stay there (StreamResource / StreamDatum,
:mod:`phasestream.jobs.import_external`; the Tiled server reads the file, which must be in its readable
storage). If the server refuses the file, the partial run is removed and the images are written into Tiled
instead; the outcome says so (``details["images"]``).

Requests: the run is written by TiledWriter without its normalizer (the documents are composed here in
the current schema), as event pages that it stores with one table append per stream and batch, and one
StreamDatum covering every frame; what is read back to check that the server serves the file is a grid of
pixels of the first and the last frame, in one request. Whatever was copied into Tiled is read back whole
before the import says ``complete`` (the run as reprocess reads it, every event compared with the documents
written): the images when they were copied, and always the energies, I0, monitor, flats and dark.
"""

from __future__ import annotations

import logging
import shlex
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from phasestream import formats
from phasestream.contract import JobOutcome, JobStatus, check_raw_path, check_run_uid
from phasestream.formats import FormatError, ImportedStack
from phasestream.jobs.context import JobContext
from phasestream.jobs.import_documents import (
    IMAGE_KEY,
    PLAN_NAME,
    CheckedImport,
    ImportRefusedError,
    checked_import,
    run_documents,
)
from phasestream.jobs.import_external import ExternalImages
from phasestream.jobs.raw_documents import raw_run_documents
from phasestream.references import load_references
from phasestream.store.readback import uncompressed
from phasestream.store.tiled import raw_run_writer, raw_runs

__all__ = ["DEFAULT_REFERENCES", "ImportConflictError", "ImportOptions", "find_import", "import_stack", "import_uid",
           "run"]

logger = logging.getLogger(__name__)

JOB = "import"
DEFAULT_REFERENCES = "nvpf-synthetic"
#: images per TiledWriter batch: about this many bytes (one request per batch and stream)
BATCH_BYTES = 64 * 2**20
#: namespace of the uids of imported runs (:func:`import_uid`)
IMPORT_NAMESPACE = uuid.UUID("0e6f2b8a-3c1d-5f4e-9a7b-2d8c6e1f4a90")


@dataclass
class ImportOptions:
    """Options of an import (validated by :meth:`validate`); plain values, so that they travel to Dask.

    ``references`` is required: the reference spectra the run is analysed against, which no facility file
    names (:data:`DEFAULT_REFERENCES` is only the simulated demo set, named explicitly by the tests and
    benchmarks). ``format``, ``energies``, ``mode`` and ``select`` (which part of files holding several:
    :data:`phasestream.formats.SELECTIONS`) are handed to the reader; ``sample`` and ``soc`` override
    the file's; ``external`` keeps images that lie in an HDF5 dataset or TIFF files in their file;
    ``replace_incomplete`` removes an incomplete run of this very import (its uid and start document, no stop
    document: left by an import that was killed) and imports again, where it is otherwise refused (the user
    says no import of these files is running; a complete run and another's node are never removed).
    """

    raw: str = ""
    references: str = ""
    format: str | None = None
    energies: list[float] | str | None = None
    mode: str | None = None
    select: dict[str, str] = field(default_factory=dict)
    sample: str | None = None
    soc: float | None = None
    external: bool = True
    batch_bytes: int = BATCH_BYTES
    replace_incomplete: bool = False

    def validate(self) -> ImportOptions:
        self.raw = check_raw_path(self.raw)
        if not isinstance(self.references, str) or not self.references:
            raise ValueError(f"references must be given: a registered name or a file, got {self.references!r} (an "
                             f"import is analysed against them and files name none; {DEFAULT_REFERENCES!r} is the "
                             "simulated demo set)")
        if self.batch_bytes < 1:
            raise ValueError(f"batch_bytes must be >= 1, got {self.batch_bytes}")
        if not isinstance(self.select, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 64 and 0 < len(v) <= 1024
                for k, v in self.select.items()):
            raise ValueError(f"select must map names to values (strings), got {self.select!r:.120}")
        self.select = dict(self.select)
        return self

    def retry_command(self, path: str) -> str:
        """The command that imports ``path`` again with these references, raw path and choices (shell-quoted;
        the other options as they were given are in the outcome's ``options``)."""
        words = ["phasestream", "import", "--references", self.references, *(["--raw", self.raw] if self.raw else []),
                 *(w for k, v in self.select.items() for w in ("--select", f"{k}={v}")), str(path)]
        return shlex.join(words)


def import_uid(raw: str, sha256: str) -> str:
    """The uid of the run that imports files of this SHA-256 under the raw path ``raw``: a UUID (version 5)
    of the two, the same for every import of the same bytes to the same place."""
    return str(uuid.uuid5(IMPORT_NAMESPACE, f"{raw}\n{sha256}"))


class _StartRefusedError(Exception):
    """Tiled refused the run's start (its container): nothing of this import was written."""


class ImportConflictError(Exception):
    """The key of an import's run (:func:`import_uid`) holds a node that is not that import's run: another run's
    start document, or none. Nothing is reported from it, and it is neither replaced nor removed."""


def find_import(client, sha256: str, raw: str = "") -> tuple[str, bool] | None:
    """``(uid, has stop document)`` of the run under ``raw`` that imported files with this SHA-256, or None.

    Looked up at its uid (:func:`import_uid`) only, never by searching start documents (they come from documents
    anyone may publish); :class:`ImportConflictError` when the node there is not that import's run.
    """
    return _import_at(raw_runs(client, raw), import_uid(raw, sha256), sha256)


def _not_this_import(start: Any, uid: str, sha256: str) -> str:
    """Why ``start`` is not the start document of the run ``uid`` importing files with this SHA-256 (``""``
    when it is)."""
    if not isinstance(start, Mapping):
        return "it has no start document"
    if start.get("uid") != uid:
        return f"its start document is run {start.get('uid')!r:.80}'s"
    if start.get("plan_name") != PLAN_NAME:
        return f"its start document is of plan {start.get('plan_name')!r:.80}, not {PLAN_NAME!r}"
    imported = start.get("import")
    found = imported.get("sha256") if isinstance(imported, Mapping) else None
    if found != sha256:
        return f"its start document is of files with SHA-256 {found!r:.80}, not {sha256}"
    return ""


def _import_at(runs, uid: str, sha256: str) -> tuple[str, bool] | None:
    """``(uid, has stop document)`` when ``runs[uid]`` is the run importing files with this SHA-256, None when
    there is no node ``uid``; :class:`ImportConflictError` naming the node and why when it is another's."""
    check_run_uid(uid)
    try:
        metadata = runs[uid].metadata
    except KeyError:
        return None
    why = _not_this_import(metadata.get("start"), uid, sha256)
    if why:
        raise ImportConflictError(
            f"Tiled node {uid}, the key of the run importing these files (made from the raw path and the SHA-256), "
            f"is not this import's run: {why}. Nothing written and the node left as it is; raw runs come from "
            "documents anyone may publish: find out who wrote it and remove it, or import under another --raw path")
    return uid, metadata.get("stop") is not None


def _batch_size(checked: CheckedImport, batch_bytes: int) -> int:
    """Events per TiledWriter batch (and event page): about ``batch_bytes`` of images, or every event at once
    when none carries an image (STXM images left in their file)."""
    stack = checked.stack
    if checked.external and stack.mode == "stxm":
        return len(stack.energies)
    frame = 2 * stack.shape[0] * stack.shape[1]  # images are mostly written as 16-bit counts (counts_dtype)
    return max(1, min(len(stack.energies), batch_bytes // frame))


def _remove_own_run(runs, uid: str, sha256: str) -> tuple[bool, str]:
    """Remove the run node ``uid`` this import created (a fresh uid, checked to hold this import's start
    document; an original file it points at is not touched: Tiled deletes only data it wrote).
    ``(nothing of it is left, what happened)``."""
    check_run_uid(uid)
    try:
        node = runs[uid]
    except KeyError:
        return True, "nothing was written"
    if _not_this_import(node.metadata.get("start"), uid, sha256):
        return False, f"node {uid} is not this import's run; left as it is"
    try:
        runs.delete_contents(uid, recursive=True, external_only=False)
    except Exception as exc:  # noqa: BLE001 - reported: the caller's status says the run may remain
        return False, f"removing the partial run {uid} failed ({type(exc).__name__}: {exc}); remove it by hand"
    return True, f"the partial run {uid} was removed"


def _write(runs, checked: CheckedImport, batch_size: int, uid: str) -> None:
    """Write the run ``uid``. A refused start raises :class:`_StartRefusedError` (nothing written: the node, if
    there is one, is not this import's); a later failure removes the run and re-raises with the note of the
    clean-up in ``__notes__``."""
    _, documents = run_documents(checked, uid=uid, page_size=batch_size)
    writer = raw_run_writer(runs, batch_size=batch_size, normalize=False)
    try:
        writer(*next(documents))
    except Exception as exc:
        raise _StartRefusedError(f"{type(exc).__name__}: {exc}") from exc
    try:
        for name, doc in documents:
            writer(name, doc)
    except BaseException as exc:
        exc.add_note(_remove_own_run(runs, uid, checked.sha256)[1])
        raise


def _copy_mismatch(runs, uid: str, checked: CheckedImport, page_size: int) -> str | None:
    """How the run ``uid`` does not read back as this import wrote it (None when
    it does). The run is read as reprocess reads it (:func:`raw_run_documents`: rows and frames paired by
    ``seq_num``, counted against the stop document), and each event's data (images, energy, I0; flats and dark)
    is compared, value for value, with the documents written, made again from the stack (the file is read
    again). Images that stay in their file are neither read nor compared here (:func:`_external_refusal`
    samples them); all that was copied is. The whole run is held in memory meanwhile, as reprocess holds it."""
    stored: dict[tuple[str, int], Mapping[str, Any]] = {}
    streams: dict[str, str] = {}
    try:
        unread = {"primary": frozenset((IMAGE_KEY,))} if checked.external is not None else None
        for name, doc in raw_run_documents(uncompressed(runs[uid]), unread=unread):
            if name == "descriptor":
                streams[doc["uid"]] = doc.get("name", "")
            elif name == "event":
                stored[(streams.get(doc["descriptor"], ""), doc["seq_num"])] = doc["data"]
    except Exception as exc:  # noqa: BLE001 - whatever stops the read-back: not read back
        return f"it cannot be read back ({type(exc).__name__}: {exc})"
    streams = {}
    for name, doc in run_documents(checked, uid=uid, page_size=page_size)[1]:
        if name == "descriptor":
            streams[doc["uid"]] = doc["name"]
        if name != "event_page":
            continue
        stream = streams[doc["descriptor"]]
        for i, seq in enumerate(doc["seq_num"]):
            event = stored.pop((stream, seq), None)
            if event is None:
                return f"event {seq} of the {stream!r} stream is missing"
            for key, values in doc["data"].items():
                want, got = np.asarray(values[i]), np.asarray(event.get(key))
                if got.shape != want.shape or not np.array_equal(got, want, equal_nan=want.dtype.kind in "fc"):
                    return f"{key!r} of event {seq} of the {stream!r} stream is not what was written"
    if stored:
        return f"{len(stored)} events that were not written"
    return None


def _sample(n: int, shape: tuple[int, int]) -> tuple[slice, slice, slice]:
    """The pixels the read-back compares: the first and the last frame, on a 4 x 4 grid of rows and columns
    from corner to corner (32 values: a wrong file, offset, byte order, dtype or transposition shows)."""
    return (slice(0, n, max(n - 1, 1)), *(slice(0, size, max((size - 1) // 3, 1)) for size in shape))


def _served_sample(runs, uid: str, external: ExternalImages, sample: tuple[slice, slice, slice]) -> np.ndarray:
    """The ``sample`` pixels (:func:`_sample`) of the run's ``primary`` images as the server serves them, in one
    request to the array's address (no lookups on the way; the client's own read would retry a refusal, a 500,
    for half a minute). A sample, not whole frames: the server reads only the chunks it touches."""
    base = str(runs.uri).replace("/metadata/", "/array/full/", 1).rstrip("/")
    param = ",".join(f"{s.start}:{s.stop}:{s.step}" for s in sample)
    reply = runs.context.http_client.get(f"{base}/{uid}/primary/{IMAGE_KEY}", params={"slice": param},
                                         headers={"Accept": "application/octet-stream"})
    reply.raise_for_status()
    dtype = np.dtype(external.dtype)
    counts = [len(range(s.start, s.stop, s.step)) for s in sample]
    expected = counts[0] * counts[1] * counts[2] * dtype.itemsize
    if len(reply.content) != expected:
        raise ValueError(f"{len(reply.content)} bytes served for {counts} {dtype} pixels ({expected})")
    return np.frombuffer(reply.content, dtype=dtype).reshape(counts)


def _external_refusal(runs, uid: str, checked: CheckedImport) -> str | None:
    """Why the server cannot serve the images it registered from their file (None when it serves them: the
    :func:`_sample` pixels equal the stack's). Tiled registers any file; it refuses to read one outside its
    readable storage only when the data are read."""
    images = checked.stack.images
    n = len(images)
    frames, rows, cols = sample = _sample(n, checked.stack.shape)
    try:
        served = _served_sample(runs, uid, checked.external, sample)
    except Exception as exc:  # noqa: BLE001 - every refusal means the same: copy the images instead
        return f"{type(exc).__name__}: {exc}"
    read = np.stack([np.asarray(images[i])[rows, cols] for i in range(n)[frames]])
    if not np.array_equal(served, read, equal_nan=served.dtype.kind in "fc"):  # NaN: an unrecorded pixel
        return "the images Tiled serves from it differ from those read from the file"
    return None


def import_stack(client, stack: ImportedStack, options: ImportOptions) -> JobOutcome:
    """Import one stack into ``<raw>/<new uid>``; the outcome's ``run_uid`` is the run's (new or existing).

    ``details``: ``file``, ``sha256``, ``images`` (``"external"``: left in their file, ``"copied"``:
    written into Tiled), ``images_in`` (with ``"external"``: ``"the HDF5 file"``, ``"the TIFF file"``,
    ``"the TIFF files"``), ``already_imported`` and, when the images were copied although they lie in
    a file Tiled could point at, ``copy_reason``. A refused stack or a failed write is ``failed`` with the reason, and
    nothing of it is left in Tiled.
    """
    opts = options.validate()
    t0 = time.perf_counter()
    source = str(stack.source)

    def outcome(uid: str, status: str, reason: str = "", **details: Any) -> JobOutcome:
        retry = "" if status == JobStatus.COMPLETE else opts.retry_command(source)
        return JobOutcome(uid, JOB, status, reason=reason, seconds=round(time.perf_counter() - t0, 3),
                          retry=retry, details={"file": source, **details})

    def existing(uid: str, sha256: str) -> JobOutcome | None:
        """The outcome when the key ``uid`` is taken (this import's run, complete or not yet, or a conflict);
        None when it is free."""
        try:
            found = _import_at(runs, uid, sha256)
        except ImportConflictError as exc:
            return outcome("", JobStatus.FAILED, str(exc), sha256=sha256)
        if found is None:
            return None
        if found[1]:
            return outcome(uid, JobStatus.COMPLETE, sha256=sha256, already_imported=True)
        if opts.replace_incomplete:
            removed, note = _remove_own_run(runs, uid, sha256)
            if removed:
                logger.warning("%s: an incomplete import of these files (%s, no stop document) was replaced: %s",
                               source, uid, note)
                return None
            return outcome(uid, JobStatus.FAILED, f"an incomplete import of these files is in Tiled as {uid}: {note}",
                           sha256=sha256)
        return outcome(uid, JobStatus.FAILED, f"an incomplete import of these files is in Tiled as {uid} (no stop "
                       "document: being written by another import right now, or left by one that died): nothing "
                       "written; if no import of these files is running, import again with --replace-incomplete",
                       sha256=sha256)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-sha256") as pool:
        hashing = pool.submit(stack.sha256)  # reads every byte of the files while the rest is looked up
        try:  # Tiled's own errors (down, refusing the key) are not the file's: they go to the caller
            references = load_references(opts.references)
            # one client that fetches data sources (TiledWriter asks for it; a second one would fetch them again)
            runs = raw_runs(client.include_data_sources(), opts.raw)
        except KeyError as exc:
            return outcome("", JobStatus.FAILED, f"nothing written: {exc.args[0]}")
        except (ValueError, OSError) as exc:  # references that do not load
            return outcome("", JobStatus.FAILED, f"refused, nothing written: {exc}")
        try:
            checked = checked_import(stack, references=references, reference_name=opts.references,
                                     sample=opts.sample, soc=opts.soc, external=opts.external,
                                     sha256=hashing.result())
        except (ImportRefusedError, FormatError, ValueError, OSError) as exc:
            return outcome("", JobStatus.FAILED, f"refused, nothing written: {exc}")
        except Exception as exc:  # lazily read images or the hash failing unforeseen: this file's error
            logger.exception("checking %s failed", source)
            return outcome("", JobStatus.FAILED, f"refused, nothing written: {_failure(source, exc)}")
    uid = import_uid(opts.raw, checked.sha256)
    earlier = existing(uid, checked.sha256)
    if earlier is not None:
        return earlier
    details: dict[str, Any] = {"sha256": checked.sha256, "already_imported": False}
    try:
        _write(runs, checked, _batch_size(checked, opts.batch_bytes), uid)
        external = checked.external
        details["images"] = "external" if external is not None else "copied"
        refusal = _external_refusal(runs, uid, checked) if external is not None else None
        if refusal is not None:
            removed, note = _remove_own_run(runs, uid, checked.sha256)
            if not removed:
                return outcome("", JobStatus.FAILED, f"Tiled does not serve {external.what} ({refusal}); {note}",
                               **details)
            reason = f"Tiled does not serve {external.what} ({refusal}): {note}, and the images were written into Tiled"
            logger.warning("%s: %s", source, reason)
            checked = CheckedImport(checked.stack, checked.metadata, checked.sha256, None, reason)
            _write(runs, checked, _batch_size(checked, opts.batch_bytes), uid)
            details["images"] = "copied"
        elif external is not None:
            details["images_in"] = external.what
        # complete only once what was copied reads back as written (with images left in their file: the rest)
        mismatch = _copy_mismatch(runs, uid, checked, _batch_size(checked, opts.batch_bytes))
        if mismatch is not None:
            note = _remove_own_run(runs, uid, checked.sha256)[1]
            return outcome("", JobStatus.FAILED, f"writing failed: the run {uid} does not read back from Tiled "
                           f"as it was written: {mismatch}; {note}", **details)
    except _StartRefusedError as exc:
        earlier = existing(uid, checked.sha256)
        if earlier is not None:  # another import of the same files wrote the run first (or a conflict)
            return earlier
        return outcome("", JobStatus.FAILED, f"writing failed, nothing written: Tiled refused the run {uid}: {exc}",
                       **details)
    except Exception as exc:  # noqa: BLE001 - the outcome says what happened and what is left
        notes = "; ".join(getattr(exc, "__notes__", []))
        return outcome("", JobStatus.FAILED, f"writing failed: {type(exc).__name__}: {exc}"
                       + (f" ({notes})" if notes else ""), **details)
    if checked.copy_reason:
        details["copy_reason"] = checked.copy_reason
    logger.info("imported %s as %s (%s)", source, uid, details["images"])
    return outcome(uid, JobStatus.COMPLETE, **details)


def _failure(path: str, exc: Exception) -> str:
    """An exception no check foresaw, for a file's outcome: the file, the exception's type and message."""
    return f"reading {path} failed: {type(exc).__name__}: {exc}"


def run(context: JobContext, path: str, options: dict) -> JobOutcome:
    """The ``import`` job: read the file at ``path`` (:func:`phasestream.formats.read_stack`) and import it.

    Any exception of the reader or the import is this file's ``failed`` outcome naming the file and the
    exception's type (a caller importing several files goes on with the next); invalid ``options`` raise.
    """
    opts = ImportOptions(**options).validate()
    t0 = time.perf_counter()

    def failed(reason: str) -> JobOutcome:
        return JobOutcome("", JOB, JobStatus.FAILED, reason=reason, seconds=round(time.perf_counter() - t0, 3),
                          retry=opts.retry_command(path),
                          details={"file": str(path), "options": asdict(opts)})

    try:
        stack = formats.read_stack(path, format=opts.format, energies=opts.energies, mode=opts.mode,
                                   select=opts.select)
    except FormatError as exc:  # names the file
        return failed(f"refused, nothing written: {exc}")
    except Exception as exc:  # a reader failing unforeseen (MemoryError, h5py's TypeError, ...)
        logger.exception("reading %s failed", path)
        return failed(f"refused, nothing written: {_failure(path, exc)}")
    try:
        return import_stack(context.tiled(), stack, opts)
    except Exception as exc:  # import_stack reports what it foresees; this is what it did not
        logger.exception("importing %s failed", path)
        return failed(f"importing {path} failed: {type(exc).__name__}: {exc}")
