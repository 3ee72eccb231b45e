"""RunEngine + TiledWriter + PhaseMapCallback against a real embedded Tiled server."""

import hashlib
import threading
import time

import numpy as np
import pytest
from bluesky import RunEngine
from tiled.queries import Key

from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.callbacks.unanalysed import CONFLICT_NOTE
from phasestream.kernels import optical_density_reference, pearson_maps
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import open_raw_run, raw_run_writer

REFS = load_references("nvpf-synthetic")
ENERGIES = select_energies(REFS, 8)
SHAPE = (40, 40)

CONTRACT_ARRAYS = {
    "od": ("float32", 3),
    "pcc": ("float32", 3),
    "phase": ("int16", 2),
    "reliability": ("float32", 2),
    "ambiguous": ("uint8", 2),
    "mask": ("uint8", 2),
}
CONTRACT_METADATA = {
    "run_uid", "scan_id", "sample", "state_of_charge", "energies_eV", "references", "status", "n_energies_seen",
    "errors", "phase_fractions", "ambiguous_fraction", "refined_fractions", "models", "timings",
}


@pytest.fixture
def tiled(tiled_client):
    return tiled_client


def scan(RE, soc, seed, **det_kwargs):
    sample = make_sample(SHAPE, state_of_charge=soc, seed=seed, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=8000.0, seed=seed, **det_kwargs)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
    return uid, sample


@pytest.mark.parametrize("external_od", [  # od-uploaded in make test-stack: every analysed scan uploads its od
    pytest.param(False, marks=pytest.mark.slow), True], ids=["od-uploaded", "od-store"])
def test_live_results_in_tiled_follow_the_contract(tiled, detector_files, external_od):
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled))
    od_store = detector_files / "od-store" if external_od else None  # a folder the server may read
    cb = PhaseMapCallback(tiled, backend="numba", update_every=2, update_seconds=1e9, min_update_seconds=0,
                          partial_budget=None, od_store=od_store)
    RE.subscribe(cb)
    seen, run = [], {}

    def poll(name, doc):  # observe the result container while the scan runs
        if name == "start":
            run["uid"] = doc["uid"]
        if name == "event" and doc["seq_num"] in (3, 5):
            cb.flush(30)
            md = tiled["phasestream"][run["uid"]].metadata
            seen.append((md["status"], md["n_energies_seen"]))

    RE.subscribe(poll)
    uid, sample = scan(RE, 2.0, seed=1)
    assert cb.flush(60)
    cb.close()
    assert seen and all(s == "running" for s, _ in seen) and 0 < seen[0][1] < len(ENERGIES)
    assert seen[-1][1] > seen[0][1]

    res = tiled["phasestream"][uid]
    assert res.specs[0].name == "PhaseMap"
    md = res.metadata
    assert CONTRACT_METADATA <= set(md)
    assert md["status"] == "complete" and md["errors"] == [] and md["run_uid"] == uid
    assert md["n_energies_seen"] == len(ENERGIES) and md["state_of_charge"] == 2.0
    assert md["references"] == {"name": "nvpf-synthetic", "phases": list(REFS.phases)}
    assert md["energies_eV"] == pytest.approx(list(ENERGIES))
    assert md["timings"]["last_image_to_result_s"] > md["timings"]["read_back_s"] > 0
    for name, (dtype, ndim) in CONTRACT_ARRAYS.items():
        arr = res[name].read()
        assert str(arr.dtype) == dtype and arr.ndim == ndim, name
    # oracle: OD and PCC recomputed with NumPy from the raw run as users read it
    raw = open_raw_run(tiled, uid)
    images = raw["primary"]["det_img"].read()
    i0 = raw["primary"]["det_i0"].read()
    ods = np.stack([optical_density_reference(im, c)[0] for im, c in zip(images, i0, strict=True)])
    np.testing.assert_allclose(res["od"].read(), ods, rtol=1e-6, equal_nan=True)
    (source,) = res["od"].data_sources()
    assert (source.management == "external") == external_od
    assert not external_od or (od_store / "phasestream" / uid / "od.zarr").is_dir()
    np.testing.assert_allclose(res["pcc"].read(), pearson_maps(ods, REFS.interpolate(ENERGIES)), atol=1e-5,
                               equal_nan=True)
    assert sample.accuracy(res["phase"].read()) > 0.97
    assert sum(md["phase_fractions"].values()) == pytest.approx(1.0)
    # complete: every array was read back bit for bit; its digest is what Tiled serves
    served = {name: hashlib.sha256(res[name].read().tobytes()).hexdigest() for name in res}
    assert md["array_sha256"] == served and set(served) == set(CONTRACT_ARRAYS)


def test_query_by_state_of_charge_returns_exactly_the_right_runs(tiled):
    RE = RunEngine({})
    cb = PhaseMapCallback(tiled, backend="numba")
    RE.subscribe(cb)
    uids = {soc: scan(RE, soc, seed=10 + i)[0] for i, soc in enumerate((3.0, 2.4, 1.0))}
    uid_b, _ = scan(RE, 2.4, seed=20)
    assert cb.flush(60)
    cb.close()
    found = set(tiled["phasestream"].search(Key("state_of_charge") == 2.4))
    assert {uids[2.4], uid_b} <= found
    assert not found & {uids[3.0], uids[1.0]}
    assert all(tiled["phasestream"][u].metadata["state_of_charge"] == 2.4 for u in found)


def test_od_planes_queued_behind_a_busy_writer_go_in_fewer_requests(tiled, monkeypatch):
    from phasestream.store.results import ResultWriter

    requests = []
    write_od_planes = ResultWriter.write_od_planes

    def counted(self, start, planes):
        requests.append(len(planes))
        write_od_planes(self, start, planes)

    monkeypatch.setattr(ResultWriter, "write_od_planes", counted)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled))
    cb = PhaseMapCallback(tiled, backend="numba")
    RE.subscribe(cb)
    gate = threading.Event()
    cb.sink.submit(lambda: gate.wait(60))  # Tiled is slow: every write queues up behind this one
    uid, _ = scan(RE, 2.4, seed=3)
    gate.set()
    assert cb.flush(60)
    cb.close()
    assert sum(requests) == len(ENERGIES) and len(requests) < len(ENERGIES)
    res = tiled["phasestream"][uid]
    assert res.metadata["status"] == "complete" and res.metadata["n_energies_seen"] == len(ENERGIES)
    raw = open_raw_run(tiled, uid)
    images, i0 = raw["primary"]["det_img"].read(), raw["primary"]["det_i0"].read()
    ods = np.stack([optical_density_reference(im, c)[0] for im, c in zip(images, i0, strict=True)])
    np.testing.assert_allclose(res["od"].read(), ods, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("bad_time", ["noon", None])
def test_an_event_time_that_is_not_a_number_costs_no_od_plane(tiled, bad_time):
    """The event's ``time`` only gives a latency: a malformed one must not leave its OD plane unwritten
    under a ``complete`` status (it did: the plane was queued after parsing the time)."""
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled))
    cb = PhaseMapCallback(tiled, backend="numba")

    def forward(name, doc):
        if name == "event" and doc["seq_num"] == 2:
            doc = {**doc, "time": bad_time}
        cb(name, doc)

    RE.subscribe(forward)
    uid, _ = scan(RE, 2.0, seed=5)
    assert cb.flush(60)
    cb.close()
    res = tiled["phasestream"][uid]
    assert res.metadata["status"] == "complete" and res.metadata["errors"] == []
    raw = open_raw_run(tiled, uid)
    images, i0 = raw["primary"]["det_img"].read(), raw["primary"]["det_i0"].read()
    ods = np.stack([optical_density_reference(im, c)[0] for im, c in zip(images, i0, strict=True)])
    np.testing.assert_allclose(res["od"].read(), ods, rtol=1e-6, equal_nan=True)


def test_arrays_not_as_written_in_tiled_make_the_result_partial(tiled, monkeypatch):
    """``complete`` means read back bit for bit: an OD plane that reached Tiled other than the worker wrote it
    (corrupted on its way into storage, here), or a final map another writer changed before the run ended,
    makes the result ``partial``, naming them. The check read only shapes and dtypes, and called such a result
    complete."""
    from tiled.client.array import ArrayClient

    def corrupting(write):
        def wrapper(self, array, *args, **kwargs):
            block, offset = kwargs.get("block"), kwargs.get("offset")
            start = block[0] if block is not None else (offset or (0,))[0]
            if self.item["id"] == "od" and start <= 2 < start + len(array):
                array = np.array(array, copy=True)
                array[2 - start, 5, 5] += 1.0  # one value of plane 2 differs in Tiled from what was sent
            return write(self, array, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(ArrayClient, "write_block", corrupting(ArrayClient.write_block))
    monkeypatch.setattr(ArrayClient, "patch", corrupting(ArrayClient.patch))
    RE = RunEngine({})
    cb = PhaseMapCallback(tiled, backend="numba")

    def tamper_at_stop(name, doc):
        if name == "stop":  # the final maps are in Tiled: another writer changes one
            assert cb.flush(60)
            res = tiled["phasestream"][doc["run_start"]]
            res["phase"].write(np.where(res["phase"].read() == 0, 1, 0).astype(np.int16))
        cb(name, doc)

    RE.subscribe(tamper_at_stop)
    uid, _ = scan(RE, 2.0, seed=7)
    _partial_naming(tiled, cb, uid, "od: plane 2 read back from Tiled is not what was written",
                    "phase: read back from Tiled, it is not what was written: at (0, 0)")


def test_an_od_plane_not_on_disk_as_written_makes_an_od_store_result_partial(tiled, detector_files, monkeypatch):
    """With the OD store the planes are read back from their zarr files (dropped from the page cache as written)
    and what Tiled serves from them is checked when the run ends: a plane whose file does not hold what the
    worker wrote (a byte changed on its way to the disk, here) makes the result ``partial``, naming it."""
    from phasestream.store import odcube

    flush = odcube.flush_and_drop

    def corrupting(path):
        if path.parts[-3:] == ("2", "0", "0"):  # the chunk of plane 2 (zarr v3 key c/2/0/0)
            data = bytearray(path.read_bytes())
            data[4 * (5 * SHAPE[1] + 5)] ^= 0x40  # one byte of pixel (5, 5)
            path.write_bytes(bytes(data))
        flush(path)

    monkeypatch.setattr(odcube, "flush_and_drop", corrupting)
    RE = RunEngine({})
    cb = PhaseMapCallback(tiled, backend="numba", od_store=detector_files / "od-store-corrupt")
    RE.subscribe(cb)
    uid, _ = scan(RE, 2.0, seed=8)
    _partial_naming(tiled, cb, uid, "od: plane 2 read back from Tiled is not what was written")


class _SecondWorker:
    """The Tiled client of a second worker on the same stream (the first worker's, under another name)."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def __contains__(self, key):
        return key in self._client

    def __getitem__(self, key):
        return self._client[key]


class _LookedAtTheSameInstant:
    """The results container as the second worker's writer sees it: asked whether the run's result is there, it
    hears no, just as the first worker creates it."""

    def __init__(self, node):
        self._node = node

    def __getattr__(self, name):
        return getattr(self._node, name)

    def __contains__(self, key):
        deadline = time.monotonic() + 30
        while key not in self._node and time.monotonic() < deadline:
            time.sleep(0.02)  # until the first worker has created it
        return False


def test_two_workers_creating_one_result_at_once_leave_the_first_as_it_is(tiled, monkeypatch):
    """Two live workers on one stream create the run's result at the same instant: Tiled refuses the second
    (409). That is the conflict of a replayed start: the first worker's result is left as it is, the second's
    note is kept on it, and the second worker's own run ends ``skipped`` (nothing of it in Tiled), so no
    recovery from the raw run starts there. The refusal was a failed write: the second run ended ``failed``,
    which a live service recovers by reprocessing the run over the first worker's result."""
    from phasestream.store import results

    second_client = _SecondWorker(tiled)
    ensure = results.ensure_container
    monkeypatch.setattr(results, "ensure_container", lambda client, path: (
        _LookedAtTheSameInstant(ensure(tiled, path)) if client is second_client else ensure(client, path)))
    RE = RunEngine({})
    first = PhaseMapCallback(tiled, backend="numba", partial_budget=None)
    second = PhaseMapCallback(second_client, backend="numba", partial_budget=None)
    RE.subscribe(first)
    RE.subscribe(second)
    uid, _ = scan(RE, 2.0, seed=9)
    assert first.flush(60) and second.flush(60)
    first.close()
    second.close()
    md = tiled["phasestream"][uid].metadata
    assert md["status"] == "complete" and md["n_energies_seen"] == len(ENERGIES)
    assert len(md["errors"]) == 1 and CONFLICT_NOTE in md["errors"][0], md["errors"]
    for name, digest in md["array_sha256"].items():  # the first worker's arrays, as it wrote them
        assert hashlib.sha256(tiled["phasestream"][uid][name].read().tobytes()).hexdigest() == digest, name
    lost = second.results[uid]
    assert lost.status == "skipped" and not lost.write_failed, (lost.status, lost.errors)
    assert len(lost.errors) == 1 and CONFLICT_NOTE in lost.errors[0]


def _partial_naming(tiled, cb, uid: str, *problems: str) -> None:
    """Once ``cb`` has finished: the run's result is ``partial``, its errors name each of ``problems`` as a
    result array that did not read back, and it records no digests."""
    assert cb.flush(60)
    cb.close()
    md = tiled["phasestream"][uid].metadata
    assert md["status"] == "partial", md
    errors = "; ".join(md["errors"])
    for problem in problems:
        assert f"result array {problem}" in errors, errors
    assert "array_sha256" not in md


@pytest.mark.parametrize("lost_event", [False, True], ids=["complete", "partial-with-its-reason"])
def test_a_final_status_another_update_took_back_is_written_again(tiled, monkeypatch, lost_event):
    """Tiled applies a metadata patch by reading the node's metadata and writing it whole. A process that read
    before the worker's final update and wrote after it (a sweep, a conflict note, an edit by hand) took the
    update back without an error: the result said ``running`` in Tiled while the worker called it complete. The
    worker now reads the final update back and writes it again, with the errors it appended (a ``partial`` run's
    reason, first sent in that update)."""
    from phasestream.store.results import ResultWriter

    update = ResultWriter.update_metadata
    taken_back = []

    def raced(self, **fields):
        if fields.get("status") in (None, "running") or taken_back:
            return update(self, **fields)
        node = tiled["phasestream"][self.key]
        stale = dict(node.metadata)  # another process reads the metadata ...
        update(self, **fields)
        node.replace_metadata(stale)  # ... and writes it whole after the worker's update
        taken_back.append(stale["status"])

    monkeypatch.setattr(ResultWriter, "update_metadata", raced)
    RE = RunEngine({})
    cb = PhaseMapCallback(tiled, backend="numba")
    n = len(ENERGIES) - 1 if lost_event else len(ENERGIES)

    def forward(name, doc):
        if not (lost_event and name == "event" and doc["seq_num"] == len(ENERGIES)):  # the last event is lost
            cb(name, doc)

    RE.subscribe(forward)
    uid, _ = scan(RE, 2.0, seed=8)
    assert cb.flush(60)
    cb.close()
    md = tiled["phasestream"][uid].metadata
    status = "partial" if lost_event else "complete"
    assert taken_back == ["running"]
    assert md["status"] == status == cb.results[uid].status, md["errors"]
    assert md["n_energies_seen"] == n and set(md["array_sha256"]) == set(CONTRACT_ARRAYS)
    assert md["errors"] == cb.results[uid].errors and bool(md["errors"]) == lost_event
