"""What every post-scan job on a result does around its work: time it, turn expected failures into
a recorded outcome, and write that record into the result's metadata."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from phasestream.contract.metadata import json_ready, recorded_map
from phasestream.modelserver.client import ModelClient
from phasestream.store.results import ResultWriter

__all__ = ["earlier_records", "model_client", "recorded_job", "write_held", "write_record"]

logger = logging.getLogger(__name__)


def recorded_job(
    writer: ResultWriter,
    key: str,
    work: Callable[[], dict[str, Any]],
    *,
    skipped: tuple[type[BaseException], ...] = (),
    failed: tuple[type[BaseException], ...] = (ValueError,),
    retry: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``work`` (returning its record, ``status`` included) and write the record as metadata ``key``.

    An exception of a ``skipped`` type becomes ``{status: skipped, reason}`` (with its ``details``
    mapping, when it has one), one of a ``failed`` type ``{status: failed, reason}``; anything else
    (a bug, not bad input) is recorded as ``failed`` with ``internal error: ...`` and propagates.
    The record gets ``seconds``, the ``extra`` keys it lacks and, unless complete, the ``retry``
    command and a warning.
    """
    t0 = time.perf_counter()
    try:
        record = work()
    except skipped as exc:
        record = {"status": "skipped", "reason": str(exc), **getattr(exc, "details", {})}
    except failed as exc:
        record = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # a bug: raised on, but the record is final (never left `running`)
        with contextlib.suppress(Exception):
            writer.update_metadata(**{key: {"status": "failed", "reason": f"internal error: {type(exc).__name__}: "
                                                                           f"{exc}", "retry": retry,
                                            "seconds": round(time.perf_counter() - t0, 3)}})
        raise
    for name, value in (extra or {}).items():
        record.setdefault(name, value)  # what the work recorded wins (e.g. the strategy it chose)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    if record["status"] != "complete":
        record.setdefault("retry", retry)  # a skip may know a better one (its details)
        logger.warning("run %s: %s %s: %s", writer.run_uid, key, record["status"], record.get("reason"))
    write_record(writer, key, record)
    return record


def write_record(writer: ResultWriter, key: str, record: dict[str, Any], attempts: int = 3) -> None:
    """Write a job's final ``record`` as metadata ``key``, read back (:func:`write_held`). Taken back, such a record
    said ``running`` with no heartbeat, and the next run of the job recorded the completed job as interrupted."""
    write_held(writer, {key: record}, lambda md: [] if recorded_map(md, key).get("status") == record["status"]
               else [f"the {key} record {record['status']}"], attempts=attempts)


def write_held(writer: ResultWriter, fields: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]],
               taken_back: Callable[[Mapping[str, Any]], list[str]] | None = None, *, attempts: int = 3
               ) -> dict[str, Any]:
    """Write ``fields`` (or ``fields(the metadata in Tiled now)``) into the result's metadata and read it back:
    written again while ``taken_back(the metadata then)`` names what another process's update took back (Tiled
    rewrites a node's metadata whole: one that read before this write and wrote after it; docs/contract.md,
    Conflicts); without ``taken_back``, the fields Tiled does not hold as written. The fields last written."""
    for _ in range(attempts):
        written = dict(fields(writer.fresh_metadata()) if callable(fields) else fields)
        writer.update_metadata(**written)
        held = writer.fresh_metadata()
        lost = taken_back(held) if taken_back is not None else \
            [key for key, value in json_ready(written).items() if held.get(key) != value]
        if not lost:
            return written
        logger.warning("run %s: %s taken back by another update of the result; writing again", writer.run_uid,
                       ", ".join(lost))
    logger.error("run %s: %s did not hold after %d writes", writer.run_uid, ", ".join(lost), attempts)
    return written


@contextlib.contextmanager
def model_client(options: Any, client: ModelClient | None = None) -> Iterator[ModelClient]:
    """``client``, else a :class:`ModelClient` for ``options.address`` (its timeout and retries), closed on exit."""
    if client is not None:
        yield client
        return
    own = ModelClient(options.address, timeout=options.timeout, retries=options.retries)
    try:
        yield own
    finally:
        own.close()


def earlier_records(md: Mapping, name: str) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """``(record, kept, models)``: the result's job record ``name`` (``refinement``, ``denoising``), the complete
    record it keeps (a re-run at work or one that did not complete) and the result's ``models``, each a dict
    (None for no kept record): a value of another type (edited by hand) is none, not an AttributeError."""
    record = recorded_map(md, name)
    kept = dict(record["kept"]) if isinstance(record.get("kept"), Mapping) else None
    return record, kept, recorded_map(md, "models")
