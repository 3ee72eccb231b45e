"""`phasestream serve` in a subprocess behind the 0MQ proxy: external images, garbage on the socket,
the OD cube written as external data (--od-store)."""

import numpy as np
import pytest
import zmq
from bluesky import RunEngine

from phasestream.app.live import ServeProcess
from phasestream.references import load_references, select_energies
from phasestream.sim import HDF5TransmissionDetector, TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import wait_for_result
from phasestream.store.tiled import raw_run_writer
from phasestream.transport.proxy import start_proxy
from phasestream.transport.wire import DocumentPublisher

ENERGIES = select_energies(load_references("nvpf-synthetic"), 6)


@pytest.fixture
def topology(tiled_server, tiled_client, detector_files):
    # the OD cube as external zarr data (serve --od-store) in a folder the server may read
    od_store = detector_files / "od-store-serve"
    with start_proxy() as proxy, ServeProcess(proxy.out_address, tiled_server.uri,
                                              args=("--backend", "numba", "--od-store", str(od_store),
                                                    "--asset-dir", str(detector_files))) as worker:
        with DocumentPublisher(proxy.in_address) as publisher:
            assert publisher.wait_for_subscriber(10)
            yield proxy, worker, publisher, tiled_client


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_worker_process_survives_garbage_and_analyses_external_images(topology, detector_files):
    proxy, worker, publisher, client = topology
    context = zmq.Context()
    raw = context.socket(zmq.XPUB)
    raw.connect(proxy.in_address)
    assert raw.poll(10_000) and raw.recv() == b"\x01"  # the proxy subscribed
    for frame in (b"garbage", b" start \x80\x04\x95 pickle-ish", b" event \xc1\xc1"):
        raw.send(frame)
    raw.close(linger=1000)
    context.term()

    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    RE.subscribe(publisher)
    uids = []
    for i, (cls, kwargs) in enumerate([(HDF5TransmissionDetector, {"write_path": detector_files}),
                                       (TransmissionDetector, {})]):
        sample = make_sample((48, 48), state_of_charge=2.0, seed=20 + i, n_particles=2)
        energy = make_energy()
        det = cls(sample, energy, i0=8000.0, seed=i, **kwargs)
        (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
        md = wait_for_result(client, uid, timeout=60.0).metadata
        assert md["status"] == "complete", md["errors"]
        assert sample.accuracy(client["phasestream"][uid]["phase"].read()) > 0.97
        uids.append(uid)
    # the external run was read from the detector's HDF5 files by the worker process
    ext = client["phasestream"][uids[0]]
    assert np.isfinite(ext["od"].read()).any() and ext.metadata["n_energies_seen"] == len(ENERGIES)
    for uid in uids:
        (source,) = client["phasestream"][uid]["od"].data_sources()
        assert source.management == "external"
        assert (detector_files / "od-store-serve" / "phasestream" / uid / "od.zarr").is_dir()
    stats = worker.stop()
    assert stats["undecodable"] == 3 and stats["lost"] == 0
