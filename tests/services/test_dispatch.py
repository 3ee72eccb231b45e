"""The live worker's post-scan jobs on Dask (a LocalCluster of 2 worker processes): same numbers as the thread."""

from __future__ import annotations

import numpy as np
import pytest
from bluesky import RunEngine
from support import feed_losing_first_event

from phasestream.app.live import LiveService
from phasestream.jobs.cluster import dask_client
from phasestream.jobs.executors import DaskExecutor
from phasestream.jobs.methods import run_methods
from phasestream.jobs.methods_options import MethodsOptions
from phasestream.jobs.reprocess import ReprocessOptions, reprocess_run
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import raw_run_writer

# a LocalCluster of 2 worker processes: make test-stack (keeps make test under 15 minutes on 2 cores)
pytestmark = pytest.mark.cluster

REFS = load_references("nvpf-synthetic")
ENERGIES = select_energies(REFS, 10)
MAPS = ("od", "pcc", "phase", "reliability", "ambiguous", "mask")


@pytest.fixture(scope="module")
def dask(tiled_server):
    with dask_client(n_workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        yield client


def _scan(*callbacks, md=None, seed=4):
    RE = RunEngine({})
    for cb in callbacks:
        RE.subscribe(cb)
    sample = make_sample((40, 40), state_of_charge=3.0, seed=seed, n_particles=1)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, name="det", i0=20000.0, seed=seed)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key, md=md))
    return uid, sample


def test_methods_a_run_asks_for_run_on_dask_as_on_the_thread(tiled_client, dask):
    service = LiveService(tiled_client, backend="numba", methods=MethodsOptions(), scheduler=dask)
    assert isinstance(service.executor, DaskExecutor)
    asked, _ = _scan(raw_run_writer(tiled_client), service, md={"phasestream": {"methods": ["lcf"]}})
    other, _ = _scan(raw_run_writer(tiled_client), service, seed=5)
    service.callback.flush(60)
    assert service.executor.wait(120)
    service.close()
    assert service.outcome(asked, "methods").details["lcf"]["status"] == "complete", service.outcomes
    assert service.outcome(other, "methods") is None
    node = tiled_client["phasestream"][asked]
    assert node.metadata["methods"]["lcf"]["status"] == "complete"
    on_dask = node["fractions_lcf"].read()
    # the thread path's function, here, on the same result: the same fractions
    record = run_methods(tiled_client, asked, MethodsOptions(methods=("lcf",)))
    assert record["lcf"]["status"] == "complete"
    np.testing.assert_array_equal(on_dask, node["fractions_lcf"].read())
    mask = node["mask"].read().astype(bool)
    assert mask.sum() > 100 and np.isfinite(on_dask[:, mask]).all()
    assert "fractions_lcf" not in tiled_client["phasestream"][other]


def test_lost_run_is_reprocessed_on_dask(tiled_client, dask):
    docs = []
    uid, sample = _scan(raw_run_writer(tiled_client), lambda n, d: docs.append((n, d)),
                        md={"phasestream": {"methods": ["lcf"]}})
    live = LiveService(tiled_client, backend="numba", poll_seconds=0.1, methods=MethodsOptions(), scheduler=dask)
    feed_losing_first_event(live, docs, uid)
    assert live.wait_recovered(uid, 120) == "complete"
    live.close()
    assert live.outcome(uid, "methods").details["lcf"]["status"] == "complete"
    assert live.outcome(uid, "reprocess").status == "complete"
    res = tiled_client["phasestream"][uid]
    assert res.metadata["recovered"]["on"] == "dask"
    assert any("documents lost" in e for e in res.metadata["recovered"]["live_errors"])
    assert sample.accuracy(res["phase"].read()) > 0.95
    on_dask = {k: res[k].read() for k in MAPS}
    # oracle: the same reprocessing here
    reprocess_run(tiled_client, uid, ReprocessOptions(backend="numba", replace=True))
    for k in MAPS:
        np.testing.assert_allclose(res[k].read(), on_dask[k], atol=1e-6, equal_nan=True, err_msg=k)
