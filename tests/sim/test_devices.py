"""Simulated STXM / TXM detectors, run through a real RunEngine; oracle: SimulatedSample and flat_field."""

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import numpy as np
import pytest
from event_model import DocumentNames, schema_validators

from phasestream.callbacks.assets import AssetFolders
from phasestream.references import EnergyOutOfRangeError
from phasestream.sim.devices import (
    HDF5TransmissionDetector,
    TransmissionDetector,
    make_energy,
    read_stream_frame,
    read_stream_frames,
)
from phasestream.sim.noise import STXMNoise
from phasestream.sim.samples import flat_field, make_sample

SHAPE = (32, 32)
ENERGIES = [506.0, 517.5, 525.0, 530.3]


@pytest.fixture(scope="module")
def sample():
    return make_sample(SHAPE, state_of_charge=2.0, seed=4)




def events(docs, stream="primary"):
    uids = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream}
    return [d for n, d in docs if n == "event" and d["descriptor"] in uids]


def test_energy_positioner_reports_ev_under_its_name(RE):
    energy = make_energy()
    assert energy.position == 505.0 and energy.egu == "eV"
    RE(bps.mv(energy, 517.5))
    assert energy.read()["energy"]["value"] == 517.5


def test_noiseless_stxm_frames_are_the_rounded_transmitted_counts(RE, sample, run):
    energy = make_energy()
    det = TransmissionDetector(sample, energy, noise=False, i0=4000.0)
    docs = run(RE, bp.list_scan([det], energy, ENERGIES))
    (descriptor,) = [d for n, d in docs if n == "descriptor"]
    assert descriptor["data_keys"]["det_img"]["shape"] == list(SHAPE)
    assert descriptor["data_keys"]["det_img"]["dtype_numpy"] == "<u2"
    assert descriptor["configuration"]["det"]["data"]["det_dark_level"] == 0.0
    evs = events(docs)
    assert [e["data"]["energy"] for e in evs] == ENERGIES
    for ev in evs:
        img = ev["data"]["det_img"]
        assert img.dtype == np.uint16 and img.shape == SHAPE
        expected = np.rint(sample.transmitted(ev["data"]["energy"], i0=4000.0, noise=False))
        np.testing.assert_array_equal(img, expected.astype(np.uint16))
        assert ev["data"]["det_i0"] == 4000.0


def test_stxm_counts_are_poisson_around_the_transmitted_mean(RE, run):
    sample = make_sample((64, 64), seed=9)
    energy = make_energy(value=517.5)
    det = TransmissionDetector(sample, energy, i0=3000.0, seed=1)
    docs = run(RE, bp.count([det], num=3))
    mean = sample.transmitted(517.5, i0=3000.0, noise=False)
    z = np.stack([(e["data"]["det_img"] - mean) / np.sqrt(mean) for e in events(docs)])
    assert abs(z.mean()) < 0.05  # 12288 pixels: standard error 0.009
    assert z.std() == pytest.approx(1.0, abs=0.05)
    assert not np.array_equal(events(docs)[0]["data"]["det_img"], events(docs)[1]["data"]["det_img"])


def test_energy_dependent_i0_reaches_frames_and_monitor(RE, sample, run):
    energy = make_energy()
    det = TransmissionDetector(sample, energy, noise=False, i0=lambda e: 1000.0 + 100.0 * (e - 505.0))
    assert det.i0_key == "det_i0" and det.image_key == "det_img"
    docs = run(RE, bp.list_scan([det], energy, [505.0, 525.0]))
    for ev, i0 in zip(events(docs), [1000.0, 3000.0], strict=True):
        assert ev["data"]["det_i0"] == i0
        expected = np.rint(sample.transmitted(ev["data"]["energy"], i0=i0, noise=False))
        np.testing.assert_array_equal(ev["data"]["det_img"], expected)


def test_counts_clip_at_uint16_max(RE, sample, run):
    energy = make_energy()
    det = TransmissionDetector(sample, energy, noise=False, i0=1e6)
    (ev,) = events(run(RE, bp.count([det])))
    img = ev["data"]["det_img"]
    assert img.dtype == np.uint16
    assert img.max() == 65535
    inside = sample.transmitted(505.0, i0=1e6, noise=False) < 65535
    np.testing.assert_array_equal(img[inside], np.rint(sample.transmitted(505.0, i0=1e6, noise=False))[inside])


def test_txm_dark_flat_and_sample_frames(RE, sample, run):
    energy = make_energy(value=517.5)
    det = TransmissionDetector(sample, energy, mode="txm", noise=False, i0=2000.0, flat_seed=3)
    assert det.dark_level.get() == 100.0
    beam = flat_field(SHAPE, i0=2000.0, seed=3)
    assert beam.std() > 10  # a real illumination pattern, not a constant

    def conditions():
        yield from bps.mv(det.shutter, "closed")
        yield from bps.trigger_and_read([det], name="dark")
        yield from bps.mv(det.shutter, "open", det.sample_position, "out")
        yield from bps.trigger_and_read([det], name="flat")
        yield from bps.mv(det.sample_position, "in")
        yield from bps.trigger_and_read([det], name="primary")

    docs = run(RE, bpp.run_wrapper(conditions()))
    (dark,) = events(docs, "dark")
    (flat,) = events(docs, "flat")
    (image,) = events(docs, "primary")
    np.testing.assert_array_equal(dark["data"]["det_img"], np.full(SHAPE, 100, dtype=np.uint16))
    np.testing.assert_array_equal(flat["data"]["det_img"], np.rint(beam + 100.0))
    expected = np.rint(sample.transmitted(517.5, i0=beam, noise=False) + 100.0)
    np.testing.assert_array_equal(image["data"]["det_img"], expected)
    configs = {d["name"]: d["configuration"]["det"]["data"] for n, d in docs if n == "descriptor"}
    assert configs["dark"]["det_shutter"] == "closed"
    assert configs["flat"]["det_sample_position"] == "out"
    assert configs["primary"]["det_shutter"] == "open" and configs["primary"]["det_sample_position"] == "in"


def test_txm_dark_noise_is_poisson_around_the_dark_level(RE, run):
    sample = make_sample((64, 64), seed=2)
    det = TransmissionDetector(sample, make_energy(), mode="txm", seed=5)
    det.shutter.put("closed")
    (ev,) = events(run(RE, bp.count([det])))
    dark = ev["data"]["det_img"].astype(float)
    assert dark.mean() == pytest.approx(100.0, abs=0.8)  # standard error 0.16
    assert dark.var() == pytest.approx(100.0, rel=0.1)


def _empty_field(shape):
    """A sample of substrate only: every pixel's expected counts are ``i0 * exp(-substrate_od)``."""
    sample = make_sample(shape, n_particles=1, seed=0)
    sample.thickness[:] = 0.0
    return sample


def test_line_correlated_noise_in_live_frames_matches_its_parameters(RE, run):
    # oracle: the parameters of STXMNoise (as tests/sim/test_noise.py checks simulate_stack's beam)
    sample = _empty_field((200, 256))
    noise = STXMNoise(poisson=False, line_i0=0.02, along_line=0.01, along_line_px=8.0)
    energy = make_energy(value=517.5)
    det = TransmissionDetector(sample, energy, i0=20000.0, noise=noise, seed=3)
    docs = run(RE, bp.count([det], num=6))
    mean = sample.transmitted(517.5, i0=20000.0, noise=False)
    beam = np.concatenate([e["data"]["det_img"] / mean - 1.0 for e in events(docs)])  # 1200 scan lines
    assert all(e["data"]["det_i0"] == 20000.0 for e in events(docs))  # the monitor reports the nominal I0
    line_means = beam.mean(axis=1)
    # the along-line term adds (0.01^2 (1 + r) / (1 - r)) / 256 to the line means' variance: std 0.0202
    assert line_means.std() == pytest.approx(0.0202, rel=0.1)
    assert abs(np.corrcoef(line_means[:-1], line_means[1:])[0, 1]) < 0.1  # independent between lines
    within = beam - line_means[:, None]
    assert within.std() == pytest.approx(0.01 * np.sqrt(1 - 16 / 256), rel=0.1)
    lag1 = float((within[:, :-1] * within[:, 1:]).mean() / (within * within).mean())
    assert lag1 == pytest.approx(np.exp(-1 / 8), abs=0.04)


def test_live_frames_add_dark_and_read_noise_to_poisson_counts(RE, run):
    sample = _empty_field((100, 100))
    det = TransmissionDetector(sample, make_energy(), i0=2000.0, noise=STXMNoise(dark_counts=4.0, read_sigma=3.0),
                               seed=4)
    assert det.dark_level.get() == 4.0  # the noise model's dark counts are the detector's dark level
    docs = run(RE, bp.count([det], num=4))
    net = np.stack([e["data"]["det_img"] for e in events(docs)]).astype(float) - 4.0
    expected = 2000.0 * np.exp(-sample.substrate_od)
    assert net.mean() == pytest.approx(expected, rel=2e-3)
    assert net.var() == pytest.approx(expected + 4.0 + 9.0 + 1 / 12, rel=0.04)  # Poisson, dark, read, rounding


def test_default_stxm_noise_is_the_poisson_detector(sample):
    energy = make_energy(value=520.0)
    a = TransmissionDetector(sample, energy, seed=7, name="a")
    b = TransmissionDetector(sample, energy, seed=7, name="b", noise=STXMNoise())
    np.testing.assert_array_equal(a.acquire()[0], b.acquire()[0])
    with pytest.raises(ValueError, match="drift"):
        TransmissionDetector(sample, energy, noise=STXMNoise(drift_px=0.5))
    with pytest.raises(ValueError, match="dark_counts"):
        TransmissionDetector(sample, energy, dark_level=2.0, noise=STXMNoise(dark_counts=4.0))


def test_same_seed_gives_same_frames(sample):
    energy = make_energy(value=520.0)
    a, b, c = (TransmissionDetector(sample, energy, seed=s, name=n) for s, n in ((7, "a"), (7, "b"), (8, "c")))
    frames = [d.acquire()[0] for d in (a, b, c)]
    np.testing.assert_array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])


def test_bad_settings_raise(sample):
    energy = make_energy()
    with pytest.raises(ValueError, match="mode"):
        TransmissionDetector(sample, energy, mode="xrf")
    with pytest.raises(ValueError, match="dark_level"):
        TransmissionDetector(sample, energy, dark_level=-1.0)
    det = TransmissionDetector(sample, energy)
    with pytest.raises(ValueError, match="half"):
        det.shutter.put("half")
    with pytest.raises(ValueError, match="i0"):
        TransmissionDetector(sample, energy, i0=lambda e: float("nan")).acquire()


def test_energy_outside_the_references_fails_the_scan(RE, sample):
    energy = make_energy()
    det = TransmissionDetector(sample, energy)
    with pytest.raises(EnergyOutOfRangeError):
        RE(bp.list_scan([det], energy, [600.0]))


def test_hdf5_detector_frames_read_back_from_stream_documents_equal_inline_frames(RE, sample, tmp_path, run):
    folders = AssetFolders([tmp_path])  # where the documents' files may be read
    energy = make_energy()
    inline = TransmissionDetector(sample, energy, i0=3000.0, seed=11)
    external = HDF5TransmissionDetector(sample, energy, i0=3000.0, seed=11, write_path=tmp_path / "frames")
    inline_frames = [e["data"]["det_img"] for e in events(run(RE, bp.list_scan([inline], energy, ENERGIES)))]

    docs, live = [], []
    resources = {}

    def collect(name, doc):
        docs.append((name, doc))
        if name == "stream_resource":
            resources[doc["uid"]] = doc
        elif name == "stream_datum":  # read while the run goes on: the file is still open for writing
            live.append(read_stream_frame(resources[doc["stream_resource"]], doc, folders=folders))

    RE(bp.list_scan([external], energy, ENERGIES), collect)
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)

    (descriptor,) = [d for n, d in docs if n == "descriptor"]
    assert descriptor["data_keys"]["det_img"]["external"] == "STREAM:"
    assert descriptor["data_keys"]["det_img"]["dtype_numpy"] == "<u2"
    (sres,) = resources.values()
    assert sres["mimetype"] == "application/x-hdf5" and sres["data_key"] == "det_img"
    assert sres["uri"].startswith("file://localhost/") and sres["parameters"]["dataset"] == "/entry/data/data"
    assert sres["parameters"]["chunk_shape"] == [1, *SHAPE]
    datums = [d for n, d in docs if n == "stream_datum"]
    assert [d["indices"] for d in datums] == [{"start": i, "stop": i + 1} for i in range(len(ENERGIES))]
    evs = events(docs)
    assert [d["seq_nums"]["start"] for d in datums] == [e["seq_num"] for e in evs]
    assert all("det_img" not in e["data"] and e["data"]["det_i0"] == 3000.0 for e in evs)

    after = [read_stream_frame(sres, d, folders=folders) for d in datums]  # after the run: the file closed
    for frames in (live, after):
        assert all(f.dtype == np.uint16 for f in frames)
        np.testing.assert_array_equal(np.stack(frames), np.stack(inline_frames))
    assert external.path is None and len(list((tmp_path / "frames").glob("det_*.h5"))) == 1


def test_read_stream_frames_checks_its_documents(RE, sample, tmp_path, run):
    folders = AssetFolders([tmp_path])  # where the documents' files may be read
    energy = make_energy()
    det = HDF5TransmissionDetector(sample, energy, write_path=tmp_path)
    docs = run(RE, bp.list_scan([det], energy, ENERGIES[:2]))
    (sres,) = [d for n, d in docs if n == "stream_resource"]
    datum = next(d for n, d in docs if n == "stream_datum")
    both = {**datum, "indices": {"start": 0, "stop": 2}}
    assert read_stream_frames(sres, both, folders=folders).shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="covers 2 frames"):
        read_stream_frame(sres, both, folders=folders)
    with pytest.raises(ValueError, match="mimetype"):
        read_stream_frame({**sres, "mimetype": "image/tiff"}, datum, folders=folders)
    with pytest.raises(ValueError, match="refers to"):
        read_stream_frame({**sres, "uid": "other"}, datum, folders=folders)


def test_hdf5_detector_must_be_staged(sample, tmp_path):
    det = HDF5TransmissionDetector(sample, make_energy(), write_path=tmp_path)
    with pytest.raises(RuntimeError, match="stage"):
        det.trigger()


@pytest.mark.slow
def test_tiled_writer_ingests_the_hdf5_stream(RE, sample, tmp_path):
    from bluesky_tiled_plugins import TiledWriter
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    energy = make_energy()
    det = HDF5TransmissionDetector(sample, energy, mode="txm", seed=2, write_path=tmp_path)

    def plan():
        yield from bps.mv(det.shutter, "closed")
        yield from bps.trigger_and_read([det], name="dark")
        yield from bps.mv(det.shutter, "open")
        for e in ENERGIES[:2]:
            yield from bps.mv(energy, e, det.sample_position, "out")
            yield from bps.trigger_and_read([det, energy], name="flat")
            yield from bps.mv(det.sample_position, "in")
            yield from bps.trigger_and_read([det, energy], name="primary")

    folders = AssetFolders([tmp_path])
    with SimpleTiledServer(readable_storage=[tmp_path]) as server:
        client = from_uri(server.uri)
        docs = []
        RE.subscribe(TiledWriter(client, batch_size=1))
        (uid,) = RE(bpp.stage_wrapper(bpp.run_wrapper(plan()), [det]), lambda n, d: docs.append((n, d)))
        bluesky_run = client[uid]
        resources = {d["uid"]: d for n, d in docs if n == "stream_resource"}
        for stream, count in (("dark", 1), ("flat", 2), ("primary", 2)):
            stored = bluesky_run[stream]["det_img"].read()
            descriptor_uid = next(d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream)
            datums = [d for n, d in docs if n == "stream_datum" and d["descriptor"] == descriptor_uid]
            expected = np.stack([read_stream_frame(resources[d["stream_resource"]], d, folders=folders)
                                 for d in datums])
            assert stored.shape == (count, *SHAPE) and stored.dtype == np.uint16
            np.testing.assert_array_equal(stored, expected)
        np.testing.assert_array_equal(bluesky_run["primary"]["energy"].read(), ENERGIES[:2])
