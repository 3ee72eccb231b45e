"""The sweep for job records left ``running`` by a job that stopped (docs/contract.md#post-scan-job-records).

:func:`finalize_interrupted_jobs` searches a results container for the job records that say ``running``
(:data:`RUNNING_RECORDS`: those of the jobs that write one: the refinement, the denoising, and the split LCF and
split enhancement while they copy their staged arrays in) and records ``failed`` (``interrupted``) each whose
heartbeat is older than ``stale_after`` (:func:`phasestream.jobs.heartbeat.finalize_interrupted`). The live
worker runs it with its search for results left ``running``.
"""

from __future__ import annotations

import logging

from tiled.queries import Key

from phasestream.contract.denoise import DENOISING_ARRAYS
from phasestream.jobs.enhance import enhancement_arrays
from phasestream.jobs.heartbeat import JobArrays, finalize_interrupted, job_record
from phasestream.jobs.methods_record import LCF_RECORD, METHOD_ARRAYS
from phasestream.jobs.refine import REFINEMENT_ARRAYS

__all__ = ["RUNNING_RECORDS", "finalize_interrupted_jobs"]

logger = logging.getLogger(__name__)

#: the job records that say ``running`` while their job works (dotted: inside a map), and the arrays each job writes
RUNNING_RECORDS: dict[str, JobArrays] = {"refinement": REFINEMENT_ARRAYS, "denoising": DENOISING_ARRAYS,
                                         LCF_RECORD: METHOD_ARRAYS["lcf"], "enhancement": enhancement_arrays}


def finalize_interrupted_jobs(client, root: str, *, stale_after: float) -> list[tuple[str, str]]:
    """Finalize as ``failed`` the job records under ``root`` left ``running`` by a job that stopped (no heartbeat
    for ``stale_after`` seconds, or its process gone from this host); ``(result key, record name)`` of each."""
    try:
        results = client[root]
    except KeyError:  # no results yet
        return []
    finalized = []
    for name, arrays in RUNNING_RECORDS.items():
        for key, node in list(results.search(Key(f"{name}.status") == "running").items()):
            seen = job_record(node.metadata, name)
            try:
                if finalize_interrupted(node, name, arrays, stale_after=stale_after, seen=seen) is not None:
                    finalized.append((key, name))
            except Exception as exc:  # noqa: BLE001 - one result that cannot be written never stops the others
                logger.warning("%s/%s: the %s record left running could not be finalized: %s", root, key, name, exc)
    return finalized
