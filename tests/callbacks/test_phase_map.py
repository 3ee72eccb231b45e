"""PhaseMapCallback fed by a real RunEngine (in memory; the Tiled path is in test_live_tiled.py)."""

import copy

import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.contract import IncompleteReason
from phasestream.kernels import assign_phases, optical_density_reference, particle_mask, pearson_maps
from phasestream.references import load_references, select_energies
from phasestream.sim import HDF5TransmissionDetector, TransmissionDetector, energy_stack_scan, make_energy, make_sample

REFS = load_references("nvpf-synthetic")
ENERGIES = select_energies(REFS, 8)
SHAPE = (48, 48)


def scan_documents(*, seed=0, soc=2.0, detector=TransmissionDetector, energies=ENERGIES, **det_kwargs):
    """Documents of one simulated STXM scan, and the sample."""
    sample = make_sample(SHAPE, state_of_charge=soc, seed=seed, n_particles=2)
    energy = make_energy()
    det = detector(sample, energy, i0=8000.0, seed=seed, **det_kwargs)
    docs = []
    RunEngine({})(energy_stack_scan([det], energy, energies, sample=sample, i0_key=det.i0_key),
                  lambda n, d: docs.append((n, copy.deepcopy(d))))
    return docs, sample


def feed(docs, **kwargs):
    cb = PhaseMapCallback(None, backend="numba", **kwargs)
    for name, doc in docs:
        cb(name, doc)
    assert cb.flush(30)
    cb.close()
    return cb


def test_final_maps_equal_batch_oracle_and_truth():
    docs, sample = scan_documents(seed=1)
    uid = docs[0][1]["uid"]
    result = feed(docs).results[uid]
    assert result.status == "complete" and result.errors == []
    events = [d["data"] for n, d in docs if n == "event"]
    ods = np.stack([optical_density_reference(e["det_img"], e["det_i0"])[0] for e in events])
    pcc = pearson_maps(ods, REFS.interpolate([e["energy"] for e in events]))
    np.testing.assert_allclose(result.arrays["pcc"], pcc, atol=1e-5, equal_nan=True)
    mask = particle_mask(ods)
    np.testing.assert_array_equal(result.arrays["mask"].astype(bool), mask)
    phase, _, amb = assign_phases(pcc, mask)
    agree = (result.arrays["phase"] == phase).mean()
    assert agree > 0.999  # ties within float32 rounding may flip a pixel
    assert sample.accuracy(result.arrays["phase"]) > 0.97
    md = result.metadata
    assert md["n_energies_seen"] == len(ENERGIES) and md["energies_eV"] == pytest.approx(list(ENERGIES))
    assert sum(md["phase_fractions"].values()) == pytest.approx(1.0, abs=1e-9)
    assert md["ambiguous_fraction"] == pytest.approx(amb[mask].mean(), abs=0.01)
    assert md["timings"]["last_image_to_result_s"] >= 0


def test_external_hdf5_images_give_the_same_result_as_inline(tmp_path):
    inline, _ = scan_documents(seed=3)
    external, _ = scan_documents(seed=3, detector=HDF5TransmissionDetector, write_path=tmp_path)
    assert any(n == "stream_datum" for n, _ in external)
    a = feed(inline).results[inline[0][1]["uid"]]
    b = feed(external, asset_folders=[tmp_path]).results[external[0][1]["uid"]]
    assert b.status == "complete", b.errors
    np.testing.assert_array_equal(a.arrays["phase"], b.arrays["phase"])
    np.testing.assert_allclose(a.arrays["pcc"], b.arrays["pcc"], equal_nan=True)


def test_runs_without_phasestream_block_are_ignored():
    from bluesky.plans import count
    from ophyd.sim import det

    docs = []
    RunEngine({})(count([det]), lambda n, d: docs.append((n, d)))
    cb = feed(docs)
    assert cb.results == {}


def _primary_events(docs):
    desc = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "primary"}
    return [d for n, d in docs if n == "event" and d["descriptor"] in desc]


def _with_next_run(docs, seed=9):
    """Append a good run: the callback must still analyse it after the bad one."""
    good, _ = scan_documents(seed=seed)
    return docs + good, good[0][1]["uid"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ev: ev[2]["data"].pop("energy"), "no energy under data key 'energy'"),
        (lambda ev: ev[2]["data"].__setitem__("det_img", np.zeros((10, 10), np.uint16)),
         "the descriptor declares (48, 48)"),
        (lambda ev: ev[3]["data"].__setitem__("energy", ev[2]["data"]["energy"]), "duplicate energy"),
        (lambda ev: ev[1]["data"].__setitem__("energy", 560.0), "outside the range of references"),
        (lambda ev: ev[1]["data"].__setitem__("det_img", np.zeros(5)), "must be 2D"),
    ],
)
def test_bad_event_is_recorded_and_other_runs_go_on(mutate, message):
    docs, _ = scan_documents(seed=4)
    mutate(_primary_events(docs))
    docs, good_uid = _with_next_run(docs)
    cb = feed(docs)
    bad = cb.results[docs[0][1]["uid"]]
    assert bad.status == "partial"
    assert any(message in e for e in bad.errors), bad.errors
    assert cb.results[good_uid].status == "complete"


def test_unknown_image_key_fails_the_run_with_a_clear_error():
    docs, _ = scan_documents(seed=5)
    docs[0][1]["phasestream"]["image_key"] = "camera_img"
    docs, good_uid = _with_next_run(docs)
    cb = feed(docs)
    bad = cb.results[docs[0][1]["uid"]]
    assert bad.status == "failed"
    assert any("no data key 'camera_img'" in e for e in bad.errors)
    assert cb.results[good_uid].status == "complete"


def test_event_before_descriptor_is_logged_and_the_stream_goes_on(caplog):
    docs, _ = scan_documents(seed=6)
    i_desc = next(i for i, (n, d) in enumerate(docs) if n == "descriptor" and d["name"] == "primary")
    i_event = next(i for i, (n, _) in enumerate(docs) if n == "event")
    docs.insert(i_desc, docs.pop(i_event))  # first event now precedes its descriptor
    docs, good_uid = _with_next_run(docs)
    cb = feed(docs)
    bad = cb.results[docs[0][1]["uid"]]
    assert bad.status == "partial" and bad.metadata["n_energies_seen"] == len(ENERGIES) - 1
    assert "event document refers to" in caplog.text and "skipped" in caplog.text
    assert cb.results[good_uid].status == "complete"


def test_run_without_stop_is_finalized_partial_when_reported_lost():
    docs, _ = scan_documents(seed=7)
    uid = docs[0][1]["uid"]
    cb = PhaseMapCallback(None, backend="numba")
    for name, doc in docs:
        if name != "stop":
            cb(name, doc)
    assert cb.results[uid].status == "running"
    cb.run_incomplete(uid, "no stop document within 60 s", kind=IncompleteReason.STOP_TIMEOUT)
    assert cb.flush(30)
    assert cb.results[uid].status == "partial"
    assert any("documents lost" in e for e in cb.results[uid].errors)
    cb.close()


def test_partial_maps_are_published_while_the_scan_runs():
    docs, _ = scan_documents(seed=8)
    uid = docs[0][1]["uid"]
    cb = PhaseMapCallback(None, backend="numba", update_every=2, update_seconds=1e9, min_update_seconds=0,
                          partial_budget=None)
    seen = []
    for name, doc in docs:
        cb(name, doc)
        if name == "event" and uid in cb.results and cb.results[uid].metadata:
            seen.append(cb.results[uid].metadata["n_energies_seen"])
    cb.flush(30)
    cb.close()
    # partial maps after every 2nd image while events still arrive; the final maps right after the
    # last expected image (num_points), before the stop; the status turns complete at stop
    assert set(seen) == {2, 4, 6, 8, 9} and seen == sorted(seen)
    assert cb.results[uid].metadata["n_energies_seen"] == len(ENERGIES) == 9
    assert cb.results[uid].status == "complete"


def test_partial_maps_wait_in_proportion_to_their_cost():
    docs, _ = scan_documents(seed=8)
    uid = docs[0][1]["uid"]
    # a budget so small that the first partial maps' cost postpones every later one past the scan
    cb = PhaseMapCallback(None, backend="numba", update_every=2, update_seconds=1e9, min_update_seconds=0,
                          partial_budget=1e-9)
    seen = []
    for name, doc in docs:
        cb(name, doc)
        cb.flush(30)  # the first partial maps are written (and their cost measured) before the next image
        if name == "event" and uid in cb.results and cb.results[uid].metadata:
            seen.append(cb.results[uid].metadata["n_energies_seen"])
    cb.close()
    assert set(seen) == {2, 9}
    assert cb.results[uid].status == "complete"
    with pytest.raises(ValueError, match="partial_budget"):
        PhaseMapCallback(None, partial_budget=0)


def test_resource_datum_images_are_filled_through_the_handler_registry(tmp_path):
    """Images saved as .npy files with Resource/Datum (spec NPY_SEQ) give the same maps as the images themselves."""
    from ophyd.sim import SynSignal, SynSignalWithRegistry

    sample = make_sample(SHAPE, state_of_charge=2.4, seed=12, n_particles=2)
    energy = make_energy()
    rng = np.random.default_rng(0)
    frames = []

    def acquire():
        frames.append(sample.transmitted(energy.position, i0=8000.0, rng=rng).astype(np.uint16))
        return frames[-1]

    img = SynSignalWithRegistry(acquire, name="det_img", save_path=str(tmp_path), labels={"detectors"})
    i0 = SynSignal(lambda: 8000.0, name="det_i0")
    docs = []
    RunEngine({})(
        energy_stack_scan([img, i0], energy, ENERGIES, sample={"name": "npy", "state_of_charge": 2.4},
                          image_key="det_img", i0_key="det_i0"),
        lambda n, d: docs.append((n, copy.deepcopy(d))),
    )
    assert any(n == "resource" and d["spec"] == "NPY_SEQ" for n, d in docs)
    assert all(isinstance(d["data"]["det_img"], str) for n, d in docs if n == "event")  # datum ids, not arrays
    result = feed(docs, asset_folders=[tmp_path]).results[docs[0][1]["uid"]]
    assert result.status == "complete", result.errors
    # oracle frames: the files the events' datum ids point to, loaded with np.load
    resources = {d["uid"]: d for n, d in docs if n == "resource"}
    datums = {d["datum_id"]: d for n, d in docs if n == "datum"}
    event_frames = []
    for ev in _primary_events(docs):
        datum = datums[ev["data"]["det_img"]]
        res = resources[datum["resource"]]
        path = f"{res['root']}/{res['resource_path']}_{datum['datum_kwargs']['index']}.npy".replace("//", "/")
        event_frames.append(np.load(path))
    assert any(np.array_equal(event_frames[-1], f) for f in frames)
    ods = np.stack([optical_density_reference(f, 8000.0)[0] for f in event_frames])
    np.testing.assert_allclose(result.arrays["pcc"], pearson_maps(ods, REFS.interpolate(ENERGIES)), atol=1e-5,
                               equal_nan=True)
    assert sample.accuracy(result.arrays["phase"]) > 0.97


def test_plane_pool_reuses_written_buffers_and_keeps_at_most_its_bytes():
    from phasestream.callbacks.planes import PlanePool

    rng = np.random.default_rng(0)
    pool = PlanePool(keep_bytes=2 * 16 * 16 * 4)  # two 16 x 16 float32 planes
    a, b = rng.random((2, 16, 16)).astype(np.float32)
    first = pool.copy(a)
    np.testing.assert_array_equal(first, a)
    assert first is not a and not np.shares_memory(first, a)
    pending = pool.copy(b)  # the first is still waiting: a new buffer
    assert pending is not first
    pool.release(first)
    again = pool.copy(b)  # written and handed back: reused, holding the new plane
    assert again is first
    np.testing.assert_array_equal(again, b)
    np.testing.assert_array_equal(pending, b)
    assert pool.copy(np.zeros((8, 8), np.float32)).shape == (8, 8)  # other shapes get their own
    third = pool.copy(a)
    for buffer in (again, pending, third):
        pool.release(buffer)
    # two buffers were kept (the third would exceed keep_bytes): the next two copies reuse them, the third is new
    reused = [pool.copy(a) for _ in range(3)]
    assert reused[0] is again and reused[1] is pending
    assert all(reused[2] is not buffer for buffer in (again, pending, third))


def _txm_documents(seed):
    sample = make_sample(SHAPE, state_of_charge=2.0, seed=seed, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, mode="txm", i0=8000.0, seed=seed)
    docs = []
    RunEngine({})(energy_stack_scan([det], energy, ENERGIES, sample=sample, mode="txm"),
                  lambda n, d: docs.append((n, copy.deepcopy(d))))
    return docs


def test_a_flat_stream_describing_the_image_otherwise_than_the_primary_is_noted():
    """TiledWriter keeps one description per data key name across a run's streams, so the raw run in Tiled holds
    a flat described as float32 beside 16-bit images in 16-bit (tests/jobs/test_importing.py shows the
    truncation): the live result, made from the frames as sent, says a reprocess from Tiled may differ."""
    docs = _txm_documents(5)
    uid = docs[0][1]["uid"]
    clean = feed(docs).results[uid]
    assert clean.status == "complete" and clean.errors == []
    primary = next(d for n, d in docs if n == "descriptor" and d["name"] == "primary")
    declared = primary["data_keys"]["det_img"].get("dtype_numpy")
    other = "<u2" if declared != "<u2" else "<f4"
    for name, doc in docs:
        if name == "descriptor" and doc["name"] == "flat":
            doc["data_keys"]["det_img"]["dtype_numpy"] = other
    result = feed(docs).results[uid]
    assert result.status == "complete"
    notes = [e for e in result.errors if "describes 'det_img'" in e]
    assert len(notes) == 1 and f"as {other}" in notes[0] and "a reprocess from Tiled may differ" in notes[0], \
        result.errors
    for key in ("phase", "pcc"):  # the analysis itself is the same
        np.testing.assert_array_equal(result.arrays[key], clean.arrays[key])
