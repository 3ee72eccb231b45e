"""How a methods re-run leaves the record of a method that does not complete (``phasestream.jobs.methods``).

As for the refinement and the denoising, a re-run never costs a complete result: when it does not
complete (``skipped``, ``failed``) and the method's earlier record is complete (or keeps a complete
one), the new record carries that record as ``kept`` and its arrays stay as they are. Without it, the
arrays the re-run wrote before it failed are removed: arrays always belong to a record beside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from phasestream.contract.metadata import recorded_map
from phasestream.jobs.record import write_held
from phasestream.store.results import ResultWriter

__all__ = ["LCF_RECORD", "METHOD_ARRAYS", "earlier_complete", "record_methods", "settled_entry"]

#: the arrays each method writes: fixed names of the contract, never a document field
METHOD_ARRAYS: dict[str, tuple[str, ...]] = {
    "normalize": ("normalized", "thickness"), "lcf": ("fractions_lcf", "fit_error", "reduced_chi2", "scale_lcf"),
    "edge50": ("edge50",), "peak": ("peak_position",), "masks": ("threshold_mask",),
    "kmeans": ("cluster_mask", "cluster_spectra"), "rum_tv": ("fractions_rum_tv", "scale_rum_tv"),
    "rum_pnp": ("fractions_rum_pnp", "scale_rum_pnp"),
}
#: the LCF's record, ``methods.lcf``, as the heartbeat names a record inside a map (the split LCF's says ``running``)
LCF_RECORD = "methods.lcf"


def earlier_complete(record: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The complete record of method ``name`` before this run: its record, or the one that record keeps."""
    earlier = record.get(name)
    if not isinstance(earlier, Mapping):
        return None
    if earlier.get("status") != "complete":
        earlier = earlier.get("kept")
    return dict(earlier) if isinstance(earlier, Mapping) and earlier.get("status") == "complete" else None


def settled_entry(writer: ResultWriter, name: str, entry: dict[str, Any], earlier: Mapping[str, Any] | None,
                  written: Iterable[str] = ()) -> dict[str, Any]:
    """The record of method ``name`` to write: a complete ``entry`` as it is; one that did not complete keeps
    ``earlier`` (the complete record before it) when its arrays are untouched, else the arrays of the method it
    may have ``written`` (a write that failed part way) are removed, and those of ``earlier`` with them."""
    if entry.get("status") == "complete":
        return entry
    own = set(METHOD_ARRAYS.get(name, ()))
    written = own & set(written)
    if earlier is not None and not written:
        return {**entry, "kept": dict(earlier)}
    stale = written | (own & set(earlier.get("arrays") or ()) if earlier is not None else set())
    present = set(writer.container)
    for array in sorted(stale & present):
        writer.container.delete_contents(array, external_only=False)
    return entry


def record_methods(writer: ResultWriter, entries: Mapping[str, Mapping[str, Any]], attempts: int = 3) -> dict[str, Any]:
    """Write ``entries`` (method name -> record) into the result's ``methods`` as it is in Tiled now (read again:
    another job, a split LCF, writes its own record meanwhile, and an old copy of it must not go back), and read
    them back: written again, over the ``methods`` then in Tiled, while another process's update took them back
    (Tiled rewrites a node's metadata whole, docs/contract.md#conflicts); the ``methods`` written."""
    mine = {name: dict(entry) for name, entry in entries.items()}

    def taken_back(md: Mapping[str, Any]) -> list[str]:
        held = recorded_map(md, "methods")
        return [f"the methods record {name}" for name, entry in sorted(mine.items())
                if recorded_map(held, name).get("status") != entry["status"]]

    return write_held(writer, lambda md: {"methods": {**recorded_map(md, "methods"), **mine}}, taken_back,
                      attempts=attempts)["methods"]
