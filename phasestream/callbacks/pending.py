"""A run from any plan, waiting for the descriptor that tells which of its keys are the image and the energy.

A start document without a ``phasestream`` block names no keys; they are inferred from the
``primary`` descriptor (:mod:`phasestream.callbacks.inference`). Until it arrives, a
:class:`PendingRun` keeps the run's documents (a TXM run's ``dark`` and ``flat`` streams come
first). When it arrives, the owner's ``resolve(start, descriptor)`` returns the run's analysis (or
None: the run is not analysed, and the owner has recorded why), which then gets every document
kept and every later one. A run that ends, or keeps more than ``max_documents`` documents or
``max_bytes`` of them (:func:`held_bytes`), before its primary descriptor is given up with the reason
through ``give_up``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["MAX_PENDING_BYTES", "MAX_PENDING_DOCUMENTS", "PendingRun", "held_bytes"]

#: documents kept before the primary descriptor (a TXM run has one dark and one flat event first)
MAX_PENDING_DOCUMENTS = 1000
#: bytes of documents kept before the primary descriptor: twenty 2048² float64 dark and flat frames are 640 MiB
MAX_PENDING_BYTES = 2 << 30


def held_bytes(doc: Any) -> int:
    """About how many bytes a decoded document holds: its arrays' ``nbytes``, its strings' and bytes' lengths,
    8 per other value; every container walked once, without recursion (a deep document cannot overflow)."""
    total, todo = 0, [doc]
    while todo:
        value = todo.pop()
        if isinstance(value, np.ndarray):
            total += value.nbytes if value.dtype != object else 8 * value.size
        elif isinstance(value, str | bytes | bytearray):
            total += len(value)
        elif isinstance(value, dict):
            total += 8 * len(value)
            todo.extend(value.keys())
            todo.extend(value.values())
        elif isinstance(value, list | tuple):
            total += 8 * len(value)
            todo.extend(value)
        else:
            total += 8
    return total

Target = Callable[[str, dict], Any]


class PendingRun:
    """The documents of one run, held until its ``primary`` descriptor names its keys.

    Parameters
    ----------
    start : the run's start document
    resolve : ``(start, descriptor) -> analysis or None``, called once with the primary descriptor
    give_up : called once with the reason when the run ends (or ``max_documents`` is passed)
        before a primary descriptor
    max_documents : documents kept while waiting
    max_bytes : bytes of documents kept while waiting (:func:`held_bytes`)
    """

    def __init__(self, start: dict, *, resolve: Callable[[dict, dict], Target | None],
                 give_up: Callable[[str], None], max_documents: int = MAX_PENDING_DOCUMENTS,
                 max_bytes: int = MAX_PENDING_BYTES):
        self.start = start
        self.resolve = resolve
        self.give_up = give_up
        self.max_documents = int(max_documents)
        self.max_bytes = int(max_bytes)
        self.kept: list[tuple[str, dict]] = []
        self.held = 0  # held_bytes of the documents kept
        self.target: Target | None = None
        self.closed = False

    def __call__(self, name: str, doc: dict) -> None:
        if self.target is not None:
            self.target(name, doc)
            return
        if self.closed or name == "start":
            return
        if name == "descriptor" and isinstance(doc, dict) and doc.get("name", "primary") == "primary":
            self.closed = True
            kept, self.kept, self.held = [("start", self.start), *self.kept, (name, doc)], [], 0
            self.target = self.resolve(self.start, doc)
            if self.target is not None:
                for item in kept:
                    self.target(*item)
            return
        if name == "stop":
            self.close("the run ended without a primary stream: there is no image to analyse")
            return
        self.kept.append((name, doc))
        self.held += held_bytes(doc)
        if len(self.kept) > self.max_documents:
            self.close(f"more than {self.max_documents} documents arrived before the primary stream's descriptor")
        elif self.held > self.max_bytes:
            self.close(f"documents of more than {self.max_bytes / 2**20:g} MiB arrived before the primary stream's "
                       f"descriptor")

    def close(self, reason: str) -> None:
        """Give the run up with ``reason`` (unless its primary descriptor has arrived)."""
        if self.closed:
            return
        self.closed = True
        self.kept, self.held = [], 0
        self.give_up(reason)
