"""A post-scan job's record in the result is always final: skipped, failed or complete, never left
``running``, also when the job's own code raises (phasestream.jobs.record.recorded_job)."""

from __future__ import annotations

import pytest

from phasestream.jobs.record import recorded_job
from phasestream.store.results import ResultWriter


def _writer(tiled_client, uid: str) -> ResultWriter:
    return ResultWriter(tiled_client, uid, shape=(8, 8), phases=["a", "b"], n_energies=2)


def test_expected_failures_are_recorded_and_a_bug_still_ends_the_record(tiled_client):
    writer = _writer(tiled_client, "record-bug")
    writer.update_metadata(refinement={"status": "running"})

    def skip():
        raise LookupError("energies differ from the model's")

    def bad_input():
        raise ValueError("no particle pixels")

    def bug():
        raise KeyError("latent")

    record = recorded_job(writer, "refinement", skip, skipped=(LookupError,), retry="phasestream reprocess X")
    assert record["status"] == "skipped" and record["reason"] == "energies differ from the model's"
    record = recorded_job(writer, "refinement", bad_input, retry="phasestream reprocess X")
    assert record["status"] == "failed" and record["reason"] == "ValueError: no particle pixels"
    with pytest.raises(KeyError):
        recorded_job(writer, "refinement", bug, retry="phasestream reprocess X")
    stored = tiled_client["phasestream"]["record-bug"].metadata["refinement"]
    assert stored["status"] == "failed" and stored["reason"] == "internal error: KeyError: 'latent'", stored
    assert stored["retry"] == "phasestream reprocess X"
