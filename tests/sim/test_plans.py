"""energy_stack_scan through a real RunEngine: start metadata, streams, frames against SimulatedSample."""

import numpy as np
import pytest
from ophyd.sim import DirectImage, SynGauss

from phasestream.callbacks.assets import AssetFolders
from phasestream.references import load_references
from phasestream.sim import (
    HDF5TransmissionDetector,
    TransmissionDetector,
    energy_stack_scan,
    make_energy,
    make_sample,
    read_stream_frame,
)
from phasestream.sim.samples import flat_field

SHAPE = (32, 32)
ENERGIES = [505.5, 516.6, 518.9, 530.3, 532.5]


@pytest.fixture(scope="module")
def sample():
    return make_sample(SHAPE, state_of_charge=2.4, seed=6)




def start_of(docs):
    (start,) = [d for n, d in docs if n == "start"]
    return start


def events(docs, stream="primary"):
    uids = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream}
    return [d for n, d in docs if n == "event" and d["descriptor"] in uids]


def test_stxm_start_document_carries_the_run_metadata(RE, sample, run):
    energy = make_energy()
    det = TransmissionDetector(sample, energy, noise=False)
    docs = run(RE, energy_stack_scan([det], energy, ENERGIES, md={"operator": "sim"}))
    start = start_of(docs)
    assert start["phasestream"] == {
        "references": "nvpf-synthetic",
        "image_key": "det_img",
        "energy_key": "energy",
        "mode": "stxm",
    }
    assert start["sample"]["name"] == "simulated" and start["sample"]["state_of_charge"] == 2.4
    assert start["sample"]["simulated"] is True and start["sample"]["shape"] == list(SHAPE)
    assert start["num_points"] == len(ENERGIES) and start["plan_name"] == "energy_stack_scan"
    assert start["plan_args"]["energies"] == ENERGIES and start["operator"] == "sim"
    assert {d["name"] for n, d in docs if n == "descriptor"} == {"primary"}
    (stop,) = [d for n, d in docs if n == "stop"]
    assert stop["exit_status"] == "success" and stop["num_events"] == {"primary": len(ENERGIES)}


def test_each_event_holds_the_transmitted_image_at_its_energy(RE, sample, run):
    energy = make_energy()
    det = TransmissionDetector(sample, energy, noise=False, i0=4000.0)
    evs = events(run(RE, energy_stack_scan([det], energy, ENERGIES, i0_key=det.i0_key)))
    assert [e["data"]["energy"] for e in evs] == ENERGIES
    for ev in evs:
        img = ev["data"]["det_img"]
        assert img.dtype == np.uint16
        expected = np.rint(sample.transmitted(ev["data"]["energy"], i0=ev["data"]["det_i0"], noise=False))
        np.testing.assert_array_equal(img, expected)
    # the spectrum of a particle pixel follows the reference-weighted OD: images differ between energies
    y, x = np.argwhere(sample.particle & ~sample.boundary)[0]
    od = [-np.log(e["data"]["det_img"][y, x] / 4000.0) for e in evs]
    np.testing.assert_allclose(od, [sample.optical_density(e)[y, x] for e in ENERGIES], atol=2e-3)


def test_noisy_images_are_poisson_around_the_transmitted_mean(RE, run):
    sample = make_sample((64, 64), seed=8)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=2000.0, seed=3)
    evs = events(run(RE, energy_stack_scan([det], energy, ENERGIES)))
    means = [sample.transmitted(e["data"]["energy"], i0=2000.0, noise=False) for e in evs]
    z = np.stack([(e["data"]["det_img"] - m) / np.sqrt(m) for e, m in zip(evs, means, strict=True)])
    assert abs(z.mean()) < 0.05  # 20480 pixels: standard error 0.007
    assert z.std() == pytest.approx(1.0, abs=0.05)


def test_txm_records_dark_then_flat_before_each_image(RE, sample, run):
    energy = make_energy()
    det = TransmissionDetector(sample, energy, mode="txm", noise=False, i0=3000.0, flat_seed=1)
    docs = run(RE, energy_stack_scan([det], energy, ENERGIES, mode="txm", i0_key="det_i0"))
    start = start_of(docs)
    assert start["phasestream"]["mode"] == "txm" and start["phasestream"]["i0_key"] == "det_i0"
    assert start["num_points"] == len(ENERGIES)

    streams = [d["name"] for n, d in docs if n == "descriptor"]
    assert streams == ["dark", "flat", "primary"]
    descriptor_names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    order = [descriptor_names[d["descriptor"]] for n, d in docs if n == "event"]
    assert order == ["dark"] + ["flat", "primary"] * len(ENERGIES)

    (dark,) = events(docs, "dark")
    assert dark["data"]["det_img"].shape == SHAPE
    np.testing.assert_array_equal(dark["data"]["det_img"], np.full(SHAPE, 100, dtype=np.uint16))
    beam = flat_field(SHAPE, i0=3000.0, seed=1)
    flats, images = events(docs, "flat"), events(docs, "primary")
    assert [f["data"]["energy"] for f in flats] == ENERGIES == [e["data"]["energy"] for e in images]
    for flat, image in zip(flats, images, strict=True):
        e = flat["data"]["energy"]
        assert flat["data"]["det_img"].dtype == np.uint16 == image["data"]["det_img"].dtype
        np.testing.assert_array_equal(flat["data"]["det_img"], np.rint(beam + 100.0))
        np.testing.assert_array_equal(
            image["data"]["det_img"], np.rint(sample.transmitted(e, i0=beam, noise=False) + 100.0)
        )
    # the beamline is left ready for the next scan
    assert det.shutter.get() == "open" and det.sample_position.get() == "in"


def test_txm_noisy_dark_and_flat_levels(RE, sample, run):
    energy = make_energy()
    det = TransmissionDetector(sample, energy, mode="txm", i0=3000.0, seed=4)
    docs = run(RE, energy_stack_scan([det], energy, ENERGIES[:2], mode="txm"))
    (dark,) = events(docs, "dark")
    assert dark["data"]["det_img"].mean() == pytest.approx(100.0, abs=1.5)
    flat = events(docs, "flat")[0]["data"]["det_img"].astype(float)
    expected = flat_field(SHAPE, i0=3000.0) + 100.0
    assert np.mean((flat - expected) / np.sqrt(expected)) == pytest.approx(0.0, abs=0.15)


def test_txm_hdf5_frames_from_documents_equal_inline_frames(RE, sample, tmp_path, run):
    energy = make_energy()
    inline = TransmissionDetector(sample, energy, mode="txm", seed=21)
    external = HDF5TransmissionDetector(sample, energy, mode="txm", seed=21, write_path=tmp_path)
    inline_docs = run(RE, energy_stack_scan([inline], energy, ENERGIES, mode="txm"))
    docs = run(RE, energy_stack_scan([external], energy, ENERGIES, mode="txm"))
    assert start_of(docs)["phasestream"]["image_key"] == "det_img"

    resources = {d["uid"]: d for n, d in docs if n == "stream_resource"}
    assert sorted(r["parameters"]["dataset"] for r in resources.values()) == [
        "/entry/dark/data",
        "/entry/data/data",
        "/entry/flat/data",
    ]
    descriptors = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    for stream in ("dark", "flat", "primary"):
        datums = [d for n, d in docs if n == "stream_datum" and descriptors[d["descriptor"]] == stream]
        assert len({d["stream_resource"] for d in datums}) == 1  # one StreamResource per stream
        folders = AssetFolders([tmp_path])
        frames = np.stack([read_stream_frame(resources[d["stream_resource"]], d, folders=folders) for d in datums])
        expected = np.stack([e["data"]["det_img"] for e in events(inline_docs, stream)])
        np.testing.assert_array_equal(frames, expected)
        assert all("det_img" not in e["data"] for e in events(docs, stream))


def test_explicit_sample_references_and_extra_phasestream_keys(RE, sample, run):
    energy = make_energy()
    det = TransmissionDetector(sample, energy)
    refs = load_references("nvpf-synthetic")
    docs = run(
        RE,
        energy_stack_scan(
            [det],
            energy,
            ENERGIES[:2],
            sample={"name": "NVPF-cathode-7", "state_of_charge": 2, "cycle": 3},
            references=refs,
            md={"phasestream": {"live": True}, "sample": {"name": "ignored"}},
        ),
    )
    start = start_of(docs)
    assert start["sample"] == {"name": "NVPF-cathode-7", "state_of_charge": 2.0, "cycle": 3}
    assert start["phasestream"]["references"] == "nvpf-synthetic" and start["phasestream"]["live"] is True


def test_sample_from_md_and_generic_image_detector(RE, run):
    energy = make_energy()
    cam = DirectImage(name="cam", func=lambda: np.ones((8, 8)))
    docs = run(
        RE,
        energy_stack_scan(
            [cam], energy, [510.0], references="/data/refs/nvpf.csv", md={"sample": {"name": "s", "state_of_charge": 1}}
        ),
    )
    start = start_of(docs)
    assert start["phasestream"]["image_key"] == "cam_img"
    assert start["phasestream"]["references"] == "/data/refs/nvpf.csv"
    assert start["sample"] == {"name": "s", "state_of_charge": 1.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"energies": []}, "non-empty"),
        ({"energies": [510.0, float("nan")]}, "finite"),
        ({"energies": [510.0, float("inf")]}, "finite"),
        ({"energies": [[510.0, 511.0]]}, "1D"),
        ({"energies": ["high"]}, "numbers"),
        ({"mode": "xrf"}, "mode"),
        ({"image_key": "nope_img"}, "image_key"),
        ({"i0_key": "nope_i0"}, "i0_key"),
        ({"sample": {"name": "x", "state_of_charge": float("nan")}}, "state_of_charge"),
        ({"sample": {"name": "x", "state_of_charge": "full"}}, "state_of_charge"),
        ({"sample": {"state_of_charge": 2.0}}, "name"),
        ({"references": ""}, "references"),
        ({"md": {"phasestream": {"mode": "txm"}}}, "contradicts"),
    ],
)
def test_bad_inputs_raise_when_the_plan_is_made(sample, kwargs, match):
    energy = make_energy()
    det = TransmissionDetector(sample, energy)
    args = {"detectors": [det], "energy": energy, "energies": ENERGIES, **kwargs}
    with pytest.raises(ValueError, match=match):
        energy_stack_scan(**args)


def test_detectors_must_be_given_and_txm_needs_shutter_and_sample_stage():
    energy = make_energy()
    with pytest.raises(ValueError, match="at least one detector"):
        energy_stack_scan([], energy, ENERGIES)
    cam = DirectImage(name="cam", func=lambda: np.ones((8, 8)))
    with pytest.raises(ValueError, match="sample metadata is required"):
        energy_stack_scan([cam], energy, ENERGIES)
    with pytest.raises(ValueError, match="shutter"):
        energy_stack_scan([cam], energy, ENERGIES, mode="txm", sample={"name": "s", "state_of_charge": 2.0})
    point = SynGauss("point", energy, "energy", center=517.0, Imax=1.0, sigma=2.0)
    with pytest.raises(ValueError, match="no image data key"):
        energy_stack_scan([point], energy, ENERGIES, sample={"name": "s", "state_of_charge": 2.0})


def test_a_sample_without_state_of_charge_is_scanned_and_not_found_by_soc(tiled_client, sample):
    """Issue 23: a plain imaging sample (no battery) scans; ``--soc`` queries simply do not find its result."""
    from bluesky import RunEngine

    from phasestream.callbacks.phase_map import PhaseMapCallback
    from phasestream.store.catalog import RunQuery, find, find_raw_runs
    from phasestream.store.tiled import raw_run_writer

    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled_client))
    callback = PhaseMapCallback(tiled_client, backend="numpy")
    RE.subscribe(callback)
    energy = make_energy()
    det = TransmissionDetector(sample, energy)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES[:3], sample={"name": "plain-imaging", "cycle": 1}))
    assert callback.flush(60)
    callback.close()
    result = tiled_client["phasestream"][uid].metadata
    assert result["sample"] == {"name": "plain-imaging", "cycle": 1} and result["state_of_charge"] is None
    assert result["status"] in ("complete", "partial")
    assert uid in find(tiled_client, RunQuery(sample="plain-imaging"))
    assert uid not in find(tiled_client, state_of_charge=2.4, tolerance=10.0)
    assert uid not in find_raw_runs(tiled_client, state_of_charge=2.4, tolerance=10.0)
