"""A raw run's document stream read back from Tiled, as the RunEngine emitted it (reprocess, and the import's
read-back of what it wrote).

:func:`raw_run_documents` turns a raw run that TiledWriter stored (start and stop documents in the run's
metadata, each stream a table of scalar data keys plus one array per array data key) back into start,
descriptors, events in time order and stop; each event's row and image frames paired by ``seq_num``, never by
position (Tiled on PostgreSQL may return table rows in another order), and checked against the stop
document's ``num_events``.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd

from phasestream.contract.metadata import is_count

__all__ = ["MAX_EVENTS", "RawRunMismatchError", "raw_run_documents"]

logger = logging.getLogger(__name__)

# event-level columns TiledWriter adds next to the data keys
_EVENT_COLUMNS = ("seq_num", "time")


class RawRunMismatchError(ValueError):
    """A raw run's table rows, image frames and the stop document's ``num_events`` disagree."""


def _value(value):
    """A table cell as an event data value: a Python scalar, or an array for list cells."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return np.asarray(value)
    return value.item() if isinstance(value, np.generic) else value


def _identical(rows: pd.DataFrame) -> bool:
    """Whether the rows of one duplicated ``seq_num`` carry the same values (a retried append)."""
    first = rows.iloc[0]
    return all(
        np.array_equal(np.asarray(first[c]), np.asarray(row[c]), equal_nan=np.asarray(first[c]).dtype.kind == "f")
        for _, row in rows.iloc[1:].iterrows() for c in rows.columns
    )


MAX_EVENTS = 1_000_000  # a stream's num_events beyond this is not believed (a bound on the pairing's memory)


def _event_counts(stop: Any) -> tuple[dict[str, int], list[str]]:
    """The stop document's ``num_events`` per stream, each an integer in 0..MAX_EVENTS; the problems with any
    that is not (that stream is then paired by its table's ``seq_num`` alone). Before: a count of 10**12
    built a set of that many integers, until the process was killed."""
    if stop is not None and not isinstance(stop, Mapping):
        return {}, [f"the stop document is not a map: {stop!r:.80}; not used"]
    counts = stop.get("num_events") if stop is not None else None
    if not isinstance(counts, Mapping):
        return {}, [] if counts is None else [f"the stop document's num_events is not a map: {counts!r:.80}"]
    good, problems = {}, []
    for stream, n in counts.items():
        if is_count(n, MAX_EVENTS):
            good[stream] = n
        else:
            problems.append(f"stream {stream!r}: the run's num_events {n!r:.80} is not a count of 0 to {MAX_EVENTS}; "
                            "not used")
    return good, problems


def _stream_events(run, stream: str, expected: int | None,
                   unread: frozenset[str] = frozenset()) -> tuple[list[tuple[float, int, dict]], list[str]]:
    """Events of ``stream``, each table row paired with its image frames by ``seq_num``; and the problems found.

    TiledWriter stores a stream as one table (``internal``: ``seq_num``, ``time`` and the scalar data
    keys, one row per event) and one array per array data key. An internal array grows by one frame
    per event, in the order the RunEngine emitted them, i.e. ``seq_num`` 1, 2, ...; an external one
    (StreamDatum, or a Datum converted by TiledWriter) places frame ``seq_num - 1`` at that index. So
    frame ``seq_num - 1`` belongs to the row of ``seq_num``, whatever order the table rows come back in.

    ``expected`` is the stream's count in the stop document's ``num_events`` (None without one). Frames
    can only be trusted when there is one per event: otherwise the stream yields no events. Rows that
    are missing, duplicated with other values, or without a frame are reported and left out; every
    event returned is correctly paired.
    """
    node = run[stream]
    md = node.metadata
    descriptor = md["uid"]
    data_keys = md.get("data_keys", {})
    parts = node.base  # the stream's own nodes: the table and one node per array data key
    names = set(parts)
    where = f"stream {stream!r}"
    if any(name.startswith("internal_") for name in names):
        return [], [f"{where}: its event table is split over several tables, whose rows cannot be paired; "
                    "stream not analysed"]
    if "internal" in names:
        table = parts["internal"].read()
    else:
        table = pd.DataFrame({column: [] for column in _EVENT_COLUMNS})
    table = table.sort_values("seq_num", kind="stable")
    seq = table["seq_num"].to_numpy(dtype=np.int64)
    n_rows, distinct = len(seq), np.unique(seq)
    frames = {key: parts[key].read() for key in data_keys if key in names and key not in ("internal", *unread)}
    columns = [key for key in data_keys if key in table.columns and key not in frames]

    n_events = len(distinct) if expected is None else int(expected)
    counted = "the run's num_events" if expected is not None else "the table's distinct seq_num"
    problems = [
        f"{where}: {len(array)} frames of {key!r} but {n_events} events by {counted}; frames cannot be "
        "matched to seq_num: stream not analysed"
        for key, array in frames.items() if len(array) != n_events
    ]
    if problems:
        return [], problems
    if expected is not None and len(distinct) != expected:  # a row appended twice (a retry) is harmless
        missing = np.setdiff1d(np.arange(1, expected + 1), distinct)[:11].tolist()
        problems.append(
            f"{where}: the run's num_events is {expected}, Tiled has {n_rows} rows with {len(distinct)} distinct "
            f"seq_num" + (f" (missing seq_num {missing[:10]}{' ...' if len(missing) > 10 else ''})" if missing else "")
            + "; only rows paired by seq_num are analysed"
        )
    rows = {}
    for s, group in table.groupby("seq_num", sort=True):
        s = int(s)
        if len(group) > 1 and not _identical(group):
            problems.append(f"{where}: seq_num {s} has {len(group)} rows with different values; left out")
        elif frames and not 1 <= s <= n_events:
            problems.append(f"{where}: seq_num {s} has no frame (frames 1 to {n_events}); left out")
        else:
            rows[s] = group.iloc[0]
    events = []
    for s, row in rows.items():
        t = float(row["time"])
        data = {key: _value(row[key]) for key in columns}
        data.update({key: np.asarray(array[s - 1]) for key, array in frames.items()})
        events.append((t, s, {
            "uid": f"{descriptor}-{s}",
            "descriptor": descriptor,
            "seq_num": s,
            "time": t,
            "data": data,
            "timestamps": dict.fromkeys(data, t),
            "filled": {},
        }))
    return events, problems


def raw_run_documents(run, *, on_mismatch: Callable[[str], None] | None = None,
                      unread: Mapping[str, frozenset[str]] | None = None) -> Iterator[tuple[str, dict]]:
    """The document stream of a raw run read from Tiled: start, descriptors, events in time order, stop.

    Each stream's rows are ordered by ``seq_num`` and paired with their image frames by ``seq_num``
    (not by row position: Tiled on PostgreSQL may return rows in another order), then the streams
    are merged by time. Image data arrive inline in the events (Tiled has resolved external files),
    so a reprocessed run needs no access to the detector's files.

    Parameters
    ----------
    run : a raw run (``BlueskyRun``, :func:`~phasestream.store.tiled.open_raw_run`)
    on_mismatch : called with a message for each disagreement between rows, frames and the stop
        document's ``num_events`` (stream, expected and found counts), after the last event and
        before the stop document; only correctly paired events are yielded. None: refuse the run.
    unread : stream -> array data keys left out of its events (not read): an import's images that stay in
        their file, when what it copied is read back

    Raises
    ------
    RawRunMismatchError
        when counts disagree and ``on_mismatch`` is None (raised before any document is yielded).
    """
    start = dict(run.metadata["start"])
    stop = run.metadata.get("stop")
    num_events, problems = _event_counts(stop)
    streams = list(run)
    paired = {s: _stream_events(run, s, num_events.get(s), (unread or {}).get(s, frozenset())) for s in streams}
    problems += [problem for _, found in paired.values() for problem in found]
    problems += [f"stream {s!r}: the run's num_events is {n}, Tiled has no such stream"
                 for s, n in num_events.items() if n and s not in paired]
    if problems and on_mismatch is None:
        raise RawRunMismatchError(f"raw run {start.get('uid')}: " + "; ".join(problems))
    yield "start", start
    for stream in streams:
        md = run[stream].metadata
        yield "descriptor", {
            "uid": md["uid"],
            "run_start": start["uid"],
            "name": stream,
            "time": md.get("time", start["time"]),
            "data_keys": md.get("data_keys", {}),
            "object_keys": {},
            "configuration": {},
            "hints": md.get("hints", {}),
        }
    merged = heapq.merge(*(events for events, _ in paired.values()), key=lambda item: (item[0], item[1]))
    for _, _, event in merged:
        yield "event", event
    for problem in problems:
        logger.warning("raw run %s: %s", start.get("uid"), problem)
        on_mismatch(problem)
    if isinstance(stop, Mapping) and stop:
        yield "stop", dict(stop)
