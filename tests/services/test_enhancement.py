"""Post-scan InDI enhancement through a model-server subprocess, and the server's enhance operation."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.app.cli import main as cli_main
from phasestream.app.live import LiveService
from phasestream.app.process import ModelServerProcess
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.jobs.enhance import EnhanceOptions, enhance_options_from_start, enhance_result
from phasestream.models.registry import ModelRegistry
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import ModelRefused, ModelServerError
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import raw_run_writer

if importlib.util.find_spec("tensorflow") is None:  # the model server process runs it, not this one
    pytest.skip("TensorFlow is not installed", allow_module_level=True)

INDI = "indi-particles-synthetic"
ENERGIES = select_energies(load_references("nvpf-synthetic"), 4)


TRANSMISSION_MODEL = "indi-transmission"
LOW_GAIN_MODEL = "indi-low-gain"


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    """A folder with a (tiny, untrained) InDI artifact declared as trained on transmission images."""
    from phasestream.models.indi import InDINet
    from phasestream.models.registry import save_artifact

    folder = tmp_path_factory.mktemp("models")
    net = InDINet(base_filters=4, depth=1, dilations=(1,)).build_for_inference()
    domain = {"image": "transmission", "normalization": {"mode": "open_beam", "lq": {"i0": 120.0, "from": "test"},
                                                          "hq": {"i0": 3000.0, "from": "test"}}}
    save_artifact(net, folder, name=TRANSMISSION_MODEL, version="1.0.0", kind="indi",
                  metrics={"gain_over_bicubic_db": 5.0}, extra={"scale": 2, "steps": 1, "domain": domain})
    od = {"image": "od", "normalization": {"mode": "open_beam"}}
    save_artifact(net, folder, name=LOW_GAIN_MODEL, version="1.0.0", kind="indi",
                  metrics={"validation": {"gain_over_bicubic_db": 0.4}}, extra={"scale": 2, "steps": 1, "domain": od})
    return folder


@pytest.fixture(scope="module")
def models(user_models):
    with ModelServerProcess(args=("--preload", INDI, "--models-dir", str(user_models))) as proc:
        yield proc


def _scan(client, callback=None, md=None):
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    cb = callback or PhaseMapCallback(client, backend="numba")
    RE.subscribe(cb)
    sample = make_sample((48, 48), state_of_charge=2.0, seed=4, n_particles=1)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, name="det", i0=5000.0, seed=4)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key, md=md))
    if callback is None:
        assert cb.flush(60)
        cb.close()
    return uid


def test_enhance_op_equals_the_model_in_process(models):
    from phasestream.models.indi import enhance_image

    art, model = ModelRegistry().load(INDI)
    image = np.random.default_rng(0).uniform(0, 1, (40, 48)).astype(np.float32)
    with ModelClient(models.address, timeout=120) as client:
        reply = client.enhance(INDI, image, domain="od", steps=3)
        assert reply["array"].shape == (80, 96) and reply["steps"] == 3
        assert (reply["model"], reply["version"], reply["sha256"]) == (INDI, art.version, art.sha256)
        np.testing.assert_allclose(reply["array"], enhance_image(model, image, steps=3), rtol=1e-4, atol=1e-4)
        stack = client.enhance(INDI, np.stack([image, image[::-1]]), domain="od")["array"]
        assert stack.shape == (2, 80, 96)
        with pytest.raises(ModelServerError, match="at least 8 x 8"):
            client.enhance(INDI, np.zeros((4, 4), np.float32), domain="od")
        with pytest.raises(ModelServerError, match="steps must be an integer"):
            client.request("enhance", model=INDI, array=image, options={"steps": 0, "domain": "od"})
        with pytest.raises(ModelServerError, match=r"options\.domain must say what the image is"):
            client.request("enhance", model=INDI, array=image, options={"steps": 1})
        with pytest.raises(ModelServerError, match="is a indi model"):
            client.request("encode", model=INDI, array=np.zeros((2, 13), np.float32))
        assert client.health()["status"] == "serving"


def test_enhancement_job_writes_enhanced_od_images(tiled_client, models):
    uid = _scan(tiled_client)
    record = enhance_result(tiled_client, uid, EnhanceOptions(address=models.address, steps=2))
    assert record["status"] == "complete", record
    node = tiled_client["phasestream"][uid]
    version = ModelRegistry().get(INDI).version
    assert record["path"] == f"enhanced/{INDI}/{version}/2" and record["domain"] == "od"
    enhanced = node[record["path"]].read()
    assert enhanced.shape == (len(ENERGIES), 96, 96) and enhanced.dtype == np.float32
    assert node.metadata["enhancement"]["steps"] == 2
    assert node.metadata["models"][INDI]["sha256"] == ModelRegistry().get(INDI).sha256
    # enhancement preserves the image: strongly correlated with the bicubic-upscaled OD
    from phasestream.sim.phantoms import upscale

    od = np.nan_to_num(node["od"][0])
    assert np.corrcoef(enhanced[0].ravel(), upscale(od).ravel())[0, 1] > 0.9


def test_a_rerun_that_fails_to_write_leaves_no_record_of_the_array_it_replaced(tiled_client, models, monkeypatch):
    """A re-run of the same model, version and steps replaces the earlier array: when its write fails, the
    result's ``enhancements`` must not go on naming an array as complete that is gone (before: it did)."""
    from tiled.client.container import Container

    uid = _scan(tiled_client)
    first = enhance_result(tiled_client, uid, EnhanceOptions(address=models.address, steps=1))
    assert first["status"] == "complete", first
    node = tiled_client["phasestream"][uid]
    assert first["path"].removeprefix("enhanced/") in node.metadata["enhancements"]

    def full_disk(self, *args, **kwargs):
        raise ValueError("no space left on the storage")

    monkeypatch.setattr(Container, "write_array", full_disk)
    again = enhance_result(tiled_client, uid, EnhanceOptions(address=models.address, steps=1))
    monkeypatch.undo()
    assert again["status"] == "failed" and "no space left" in again["reason"], again
    node = tiled_client["phasestream"][uid]
    for path, record in node.metadata["enhancements"].items():  # every array the metadata names is there
        assert record["status"] != "complete" or f"enhanced/{path}" in _paths(node), path
    assert node.metadata["enhancement"]["status"] == "failed"


def test_a_complete_enhancement_read_its_array_back_and_one_that_does_not_is_removed(tiled_client, models,
                                                                                    monkeypatch):
    """``complete`` means the array read back from Tiled as written (``array_sha256``: the digest of the array
    as Tiled serves it). Storage that kept other values than were sent makes the record ``failed``, naming the
    array, and removes the array: no array stays beside a record that does not describe it."""
    import hashlib

    from tiled.client.container import Container

    uid = _scan(tiled_client)
    record = enhance_result(tiled_client, uid, EnhanceOptions(address=models.address, steps=1))
    assert record["status"] == "complete", record
    node = tiled_client["phasestream"][uid]
    served = hashlib.sha256(node[record["path"]].read().tobytes()).hexdigest()
    assert record["array_sha256"] == {record["path"]: served} == node.metadata["enhancement"]["array_sha256"]
    real = Container.write_array

    def corrupting(self, array, *args, **kwargs):
        changed = np.array(array, copy=True)
        changed[-1, 3, 4] += 1.0
        return real(self, changed, *args, **kwargs)

    monkeypatch.setattr(Container, "write_array", corrupting)
    again = enhance_result(tiled_client, uid, EnhanceOptions(address=models.address, steps=2))
    monkeypatch.undo()
    path = f"{record['path'].rpartition('/')[0]}/2"
    assert again["status"] == "failed", again
    assert re.search(rf"ReadBackError: {re.escape(path)}: .* at \({len(ENERGIES) - 1}, 3, 4\)", again["reason"]), again
    node = tiled_client["phasestream"][uid]
    assert path not in _paths(node) and record["path"] in _paths(node)


def test_no_enhancement_while_a_split_one_copies_its_array_in(tiled_client):
    """A split enhancement copying its staged array in (its ``enhancement`` record running, its heartbeat fresh):
    an unsplit one would replace the same array at the same time. Nothing is written; the record returned says
    why. No model server is asked."""
    import time

    from phasestream.store.liveness import process_identity
    from phasestream.store.results import ResultWriter

    uid = _scan(tiled_client)
    running = {"status": "running", "path": f"enhanced/{INDI}/1.0.0/2", "staging": "_staging-0123456789abcdef",
               **process_identity(), "heartbeat_at": time.time(), "heartbeat_seconds": 15.0}
    ResultWriter.open(tiled_client, uid).update_metadata(enhancement=running)
    record = enhance_result(tiled_client, uid, EnhanceOptions(address="tcp://127.0.0.1:1", timeout=0.5, retries=0))
    assert record["status"] == "skipped" and "a split enhancement of result" in record["reason"], record
    node = tiled_client["phasestream"][uid]
    assert node.metadata["enhancement"] == running and "enhanced" not in node


@pytest.mark.parametrize("hostile", [{"models": "indi", "enhancements": "all of them"},  # the 2nd in make test-stack
                                     pytest.param({"models": [INDI],
                                                   "enhancements": ["indi-particles-synthetic/1.0.0/1"]},
                                                  marks=pytest.mark.slow)])
def test_models_and_enhancements_of_the_wrong_type_are_taken_as_none(tiled_client, models, hostile):
    """A hand-edited ``models`` or ``enhancements`` (a string, a list) failed the enhancement with a ValueError
    from ``dict()``, the array written but not recorded; it is taken as none and the record is written."""
    uid = _scan(tiled_client)
    assert enhance_result(tiled_client, uid, EnhanceOptions(address=models.address, steps=1))["status"] == "complete"
    node = tiled_client["phasestream"][uid]
    node.replace_metadata(metadata={**dict(node.metadata), **hostile})
    record = enhance_result(tiled_client, uid, EnhanceOptions(address=models.address, steps=1))  # replaces it
    assert record["status"] == "complete", record
    md = tiled_client["phasestream"][uid].metadata
    assert md["models"][INDI]["sha256"] == ModelRegistry().get(INDI).sha256
    assert md["enhancements"][record["path"].removeprefix("enhanced/")]["status"] == "complete"
    assert record["path"] in _paths(tiled_client["phasestream"][uid])


def _paths(node, prefix="") -> set[str]:
    out = set()
    for key in node:
        child = node[key]
        out |= _paths(child, f"{prefix}{key}/") if child.structure_family == "container" else {f"{prefix}{key}"}
    return out


def test_enhancement_requested_in_the_start_document(tiled_client, models):
    service = LiveService(tiled_client, backend="numba", enhance=EnhanceOptions(address=models.address, steps=1))
    uid = _scan(tiled_client, callback=service, md={"phasestream": {"enhance": True}})
    other = _scan(tiled_client, callback=service)
    service.callback.flush(60)
    service.close()
    assert service.outcome(uid, "enhance").status == "complete"
    written = tiled_client["phasestream"][uid].metadata["enhancement"]
    assert service.outcome(uid, "enhance").details["sha256"] == written["sha256"]
    # enhance: true named no model: the shipped demo model ran, and the result says so
    assert "a demo model trained on simulated particle phantoms" in written["warning"]
    assert "enhanced" in tiled_client["phasestream"][uid]
    assert service.outcome(other, "enhance") is None and "enhanced" not in tiled_client["phasestream"][other]


def test_reprocess_enhance_command_and_server_down(tiled_server, tiled_client, models):
    uid = _scan(tiled_client)
    down = enhance_result(tiled_client, uid, EnhanceOptions(address="tcp://127.0.0.1:1", timeout=0.5))
    assert down["status"] == "skipped"
    assert down["retry"] == f"phasestream enhance --source od --model {INDI} {uid}"
    code = cli_main(["reprocess", "--refine-only", "--enhance", uid, "--steps", "1", "--tiled", tiled_server.uri,
                     "--models", models.address])
    assert code == 0
    assert tiled_client["phasestream"][uid].metadata["enhancement"]["status"] == "complete"


@pytest.mark.parametrize(("hostile", "said"), [  # the last three in make test-stack: keeps make test under 15 min
    ({"references": "nvpf-synthetic"}, "references 'nvpf-synthetic' is not a map naming the phases"),
    pytest.param({"references": {"phases": "AB"}}, "references.phases 'AB' is not a list of phase names",
                 marks=pytest.mark.slow),
    pytest.param({"image_shape": 24}, "image_shape 24 is not two pixel counts", marks=pytest.mark.slow),
    pytest.param({"n_energies_seen": "seven"}, "n_energies_seen 'seven' is not a count", marks=pytest.mark.slow),
])
def test_enhance_command_goes_on_past_a_result_of_the_wrong_types(tiled_server, tiled_client, models, capsys,
                                                                    hostile, said):
    """One result whose metadata was edited by hand fails alone, naming the field; the next run is enhanced
    (before: a TypeError or KeyError ended the command at the first)."""
    bad, good = _scan(tiled_client), _scan(tiled_client)
    node = tiled_client["phasestream"][bad]
    node.replace_metadata(metadata={**dict(node.metadata), **hostile})
    code = cli_main(["enhance", bad, good, "--steps", "1", "--tiled", tiled_server.uri, "--models", models.address])
    out = capsys.readouterr().out
    assert code != 0
    assert f"{bad}: failed: ValueError: result phasestream/{bad}: {said}" in out, out
    assert f"{good}: complete" in out, out


def test_a_transmission_model_is_refused_on_od_images(tiled_client, models):
    """Issue 23: a model trained on transmission never enhances OD, through the server nor the job."""
    image = np.random.default_rng(3).uniform(0.2, 1.0, (32, 32)).astype(np.float32)
    with ModelClient(models.address, timeout=120) as client:
        with pytest.raises(ModelRefused, match="trained on transmission images and these images are od"):
            client.enhance(TRANSMISSION_MODEL, image, domain="od")
        same = client.enhance(TRANSMISSION_MODEL, image, domain="transmission")  # its own domain: enhanced
        assert same["array"].shape == (64, 64)
        assert client.health()["stats"]["refused"] == 1
    uid = _scan(tiled_client)
    record = enhance_result(tiled_client, uid, EnhanceOptions(model=TRANSMISSION_MODEL, address=models.address))
    assert record["status"] == "skipped", record
    assert "trained on transmission images and these images are od" in record["reason"]
    node = tiled_client["phasestream"][uid]
    assert "enhanced" not in node and TRANSMISSION_MODEL not in (node.metadata.get("models") or {})


def test_enhance_command_side_by_side_and_the_python_api(tiled_server, tiled_client, models):
    """``phasestream enhance``: step counts side by side, nothing overwritten; the array API gives the same."""
    from phasestream.jobs.enhance import enhance_images

    uid = _scan(tiled_client)
    base = ["enhance", uid, "--tiled", tiled_server.uri, "--models", models.address]
    assert cli_main([*base, "--steps", "1"]) == 0
    assert cli_main([*base, "--steps", "2", "--source", "od"]) == 0
    node = tiled_client["phasestream"][uid]
    version = ModelRegistry().get(INDI).version
    one, two = node[f"enhanced/{INDI}/{version}/1"].read(), node[f"enhanced/{INDI}/{version}/2"].read()
    assert one.shape == two.shape == (len(ENERGIES), 96, 96) and not np.allclose(one, two)
    assert set(node.metadata["enhancements"]) == {f"{INDI}/{version}/1", f"{INDI}/{version}/2"}
    assert node.metadata["enhancement"]["steps"] == 2  # the latest
    assert "warning" not in node.metadata["enhancement"]  # a model named on the command line
    od = np.stack([np.nan_to_num(node["od"][i], nan=np.nanmedian(node["od"][i])) for i in range(len(ENERGIES))])
    api = enhance_images(od, domain="od", steps=2, address=models.address)
    np.testing.assert_allclose(api["array"], two, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelRefused, match="trained on transmission"):
        enhance_images(od[0], domain="od", model=TRANSMISSION_MODEL, address=models.address)


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_enhance_raw_frames_of_a_transmission_model(tiled_server, tiled_client, models):
    """``--source raw``: each frame divided by the run's own I0 column, enhanced by a transmission model."""
    from phasestream.jobs.enhance import enhance_images
    from phasestream.store.tiled import open_raw_run

    uid = _scan(tiled_client)
    code = cli_main(["enhance", uid, "--source", "raw", "--model", TRANSMISSION_MODEL, "--tiled", tiled_server.uri,
                     "--models", models.address])
    assert code == 0
    node = tiled_client["phasestream"][uid]
    record = node.metadata["enhancements"][f"{TRANSMISSION_MODEL}/1.0.0/1"]
    assert record["source"] == "raw" and record["domain"] == "transmission"
    assert record["normalization"]["from"].startswith("i0 data key")
    run = open_raw_run(tiled_client, uid)
    keys = run.metadata["start"]["phasestream"]
    det = run["primary"][keys["image_key"]].read()
    i0 = np.asarray(run["primary"][keys["i0_key"]].read(), np.float64)
    transmission = (np.asarray(det, np.float64) / i0.reshape(-1, 1, 1)).astype(np.float32)
    expected = enhance_images(transmission, domain="transmission", model=TRANSMISSION_MODEL,
                              address=models.address)["array"]
    np.testing.assert_allclose(node[record["path"]].read(), expected, rtol=1e-4, atol=1e-4)
    # the shipped model declares od: the frames become -ln(I / I0) with the same open beam, then enhanced
    od_record = enhance_result(tiled_client, uid, EnhanceOptions(address=models.address, source="raw"))
    assert od_record["status"] == "complete" and od_record["domain"] == "od", od_record
    assert od_record["normalization"] == record["normalization"]
    od = (-np.log(np.asarray(det, np.float64) / i0.reshape(-1, 1, 1))).astype(np.float32)
    assert np.isfinite(od).all()
    expected = enhance_images(od, domain="od", address=models.address)["array"]
    np.testing.assert_allclose(node[od_record["path"]].read(), expected, rtol=1e-4, atol=1e-4)
    assert node[record["path"]].shape == node[od_record["path"]].shape  # side by side, the first one kept


def test_a_model_with_too_little_validated_gain_is_refused_unless_allowed(tiled_server, tiled_client, models):
    uid = _scan(tiled_client)
    refused = enhance_result(tiled_client, uid, EnhanceOptions(model=LOW_GAIN_MODEL, address=models.address))
    assert refused["status"] == "skipped" and "gained 0.40 dB over bicubic" in refused["reason"]
    assert "--allow-low-gain" in refused["reason"] and "enhanced" not in tiled_client["phasestream"][uid]
    code = cli_main(["enhance", uid, "--model", LOW_GAIN_MODEL, "--allow-low-gain", "--tiled", tiled_server.uri,
                     "--models", models.address])
    assert code == 0
    record = tiled_client["phasestream"][uid].metadata["enhancement"]
    assert record["status"] == "complete"
    assert record["low_gain"] == {"gain_over_bicubic_db": 0.4, "min_db": 1.0, "allowed": True}


def test_raw_frames_of_a_run_never_analysed(tiled_server, tiled_client, models):
    """A plain ``count`` of one camera frame: ``enhance --source raw`` makes a ``skipped`` result to hold it."""
    import bluesky.plan_stubs as bps
    from bluesky.preprocessors import run_decorator
    from ophyd.sim import SynSignal

    frame = np.random.default_rng(8).poisson(900.0, (24, 32)).astype(np.float32)
    det = SynSignal(func=lambda: frame, name="cam_image")

    @run_decorator(md={"sample": {"name": "plain"}, "phasestream": {"image_key": "cam_image"}})
    def count():
        yield from bps.trigger_and_read([det])

    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled_client))
    (uid,) = RE(count())
    assert cli_main(["enhance", uid, "--source", "raw", "--model", TRANSMISSION_MODEL, "--tiled", tiled_server.uri,
                     "--models", models.address]) == 0
    node = tiled_client["phasestream"][uid]
    assert node.metadata["status"] == "skipped" and "not analysed" in node.metadata["errors"][0]
    record = node.metadata["enhancement"]
    assert record["normalization"]["from"] == "estimated from each frame's open-beam background"
    assert node[record["path"]].shape == (1, 48, 64)


@pytest.mark.parametrize("steps", [[5], "5", 2.5, True, 0, 101])
def test_enhance_steps_of_a_start_document_must_be_an_integer_in_range(steps):
    with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.100"):
        enhance_options_from_start({"enhance": {"steps": steps}}, EnhanceOptions())
    assert enhance_options_from_start({"enhance": {"steps": 5}}, EnhanceOptions()).steps == 5


@pytest.mark.parametrize(("block", "said"), [
    (["x"], "start document phasestream must be a map, got ['x']"),
    ("x", "start document phasestream must be a map, got 'x'"),
    ({"image_key": ["a"]}, "start document phasestream.image_key must be a data key (a string), got ['a']"),
    ({"image_key": "no_such_key"}, "phasestream.image_key 'no_such_key' is not a data key of the primary stream"),
    ({"image_key": "cam_image", "i0_key": {"k": 1}}, "start document phasestream.i0_key must be a data key (a string)"),
])
def test_raw_frames_of_a_start_document_of_the_wrong_types_fail_naming_the_field(tiled_client, models, block, said):
    """A raw run's ``phasestream`` block is stored as the start document had it: a list, a string or a list as
    the image key was an AttributeError or TypeError in ``raw_frames`` (``train indi``, ``enhance --source raw``),
    which neither job records; each is now a ValueError naming the field, recorded as the job's failure."""
    import bluesky.plan_stubs as bps
    from bluesky.preprocessors import run_decorator
    from ophyd.sim import SynSignal

    from phasestream.jobs.frames import raw_frames

    frame = np.random.default_rng(9).poisson(900.0, (24, 32)).astype(np.float32)
    det = SynSignal(func=lambda: frame, name="cam_image")

    @run_decorator(md={"phasestream": block})
    def count():
        yield from bps.trigger_and_read([det])

    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled_client))
    (uid,) = RE(count())
    with pytest.raises(ValueError, match=re.escape(said)):
        raw_frames(tiled_client, uid)
    record = enhance_result(tiled_client, uid, EnhanceOptions(model=TRANSMISSION_MODEL, address=models.address,
                                                              source="raw"))
    assert record["status"] == "failed" and said in record["reason"], record
    assert tiled_client["phasestream"][uid].metadata["enhancement"]["status"] == "failed"
