"""Lost documents: the run is marked partial, then reprocessed from the raw run in Tiled."""

import time
import uuid

import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.app.live import LiveService
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import raw_run_writer

ENERGIES = select_energies(load_references("nvpf-synthetic"), 6)


@pytest.fixture
def client(tiled_client):
    return tiled_client


def test_run_with_lost_event_is_partial_then_recovered_from_raw(client):
    sample = make_sample((40, 40), state_of_charge=2.4, seed=4, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=6000.0, seed=4)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))  # the raw run is complete in Tiled
    docs = []
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key),
                lambda n, d: docs.append((n, d)))
    live = LiveService(client, backend="numba", poll_seconds=0.1)
    lost = next(i for i, (n, _) in enumerate(docs) if n == "event")
    for i, (name, doc) in enumerate(docs):
        if i == lost:
            live.run_incomplete(uid, "message gap: 1 document lost")  # what the transport reports
            continue
        live(name, doc)
    live.callback.flush(30)
    assert live.callback.results[uid].status == "partial"
    assert live.wait_recovered(uid, 60) == "complete"
    live.close()
    res = client["phasestream"][uid]
    assert res.metadata["status"] == "complete" and res.metadata["n_energies_seen"] == len(ENERGIES)
    assert any("documents lost" in e for e in res.metadata["recovered"]["live_errors"])
    assert res["od"].read().shape[0] == len(ENERGIES)
    assert sample.accuracy(res["phase"].read()) > 0.95
    assert np.isfinite(res["pcc"].read()[:, sample.particle]).all()


def test_a_run_that_cannot_be_recovered_ends_with_its_status_though_another_update_took_it_back(client, monkeypatch):
    """A result left ``running`` whose raw run is not in Tiled ends ``partial`` with the reason. Tiled applies a
    metadata patch by reading the node's metadata and writing it whole: a process that read the result before that
    final status went in and wrote after it took the status back, and the result said ``running`` again, with
    nobody left to end it. The status is now read back and written again, and so is the reason."""
    uid = f"no-raw-run-{uuid.uuid4().hex[:8]}"
    ResultWriter(client, uid, shape=(8, 8), phases=["a", "b"], metadata={"updated_at": time.time() - 3600})
    node, update, taken_back = client["phasestream"][uid], ResultWriter.update_metadata, []

    def raced(self, **fields):
        if fields.get("status") != "partial" or taken_back:
            return update(self, **fields)
        stale = dict(node.refresh().metadata)  # another process reads the metadata ...
        update(self, **fields)
        node.replace_metadata(metadata=stale)  # ... and writes it whole after the final status
        taken_back.append(stale["status"])

    monkeypatch.setattr(ResultWriter, "update_metadata", raced)
    live = LiveService(client, backend="numba", poll_seconds=0.1, stale_after=60, recover_after=0)
    try:
        assert uid in live.find_stale()
        assert live.wait_recovered(uid, 60).startswith("failed")
    finally:
        live.close()
    md = node.refresh().metadata
    assert taken_back == ["running"]
    assert md["status"] == "partial" and md["recovered"]["failed"].startswith("recovery from the raw run failed")
    assert md["errors"] == [md["recovered"]["failed"]]
