"""Model artifacts: manifest, hashes, registry folders, refusal of corrupted or mismatched artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from phasestream.models.gmvae import GMVAE, fit_normalization
from phasestream.models.registry import (
    MANIFEST,
    MODEL_FILE,
    PRETRAINED_DIR,
    Artifact,
    ArtifactError,
    ModelNotFoundError,
    ModelRegistry,
    save_artifact,
    weights_sha256,
)

ENERGIES = np.linspace(505.0, 535.0, 13)


@pytest.fixture(scope="module")
def tiny_model():
    x = np.random.default_rng(0).uniform(0.1, 1.0, (100, 13)).astype(np.float32)
    return GMVAE(13, n_components=5, hidden=(16, 8, 8, 4), normalization=fit_normalization(x, "feature"))\
        .build_for_inference()


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    return save_artifact(tiny_model, folder, name="gmvae-test", version="1.0.0", kind="gmvae", energies_eV=ENERGIES,
                         phases=["a", "b", "c", "d", "e"], training={"source": "synthetic", "seed": 7},
                         metrics={"test_reconstruction_mse": 0.1})


def test_manifest_records_what_the_contract_lists(artifact, tiny_model):
    m = json.loads((artifact.path / MANIFEST).read_text())
    assert m["name"] == "gmvae-test" and m["version"] == "1.0.0" and m["kind"] == "gmvae"
    assert m["energies_eV"] == pytest.approx(ENERGIES.tolist())
    assert m["phases"] == ["a", "b", "c", "d", "e"]
    assert m["normalization"]["mode"] == "feature" and len(m["normalization"]["mean"]) == 13
    assert m["training"] == {"source": "synthetic", "seed": 7}
    assert m["files"][MODEL_FILE] == hashlib.sha256((artifact.path / MODEL_FILE).read_bytes()).hexdigest()
    # sha256 of the weights, recomputed independently with hashlib
    digest = hashlib.sha256()
    for w in tiny_model.get_weights():
        digest.update(f"{w.dtype.str}{w.shape}".encode())
        digest.update(np.ascontiguousarray(w).tobytes())
    assert m["sha256"] == digest.hexdigest() == weights_sha256(tiny_model.get_weights())
    assert m["created"].endswith("+00:00")


def test_load_round_trip_gives_the_same_latent(artifact, tiny_model):
    model = artifact.load()
    x = np.random.default_rng(1).uniform(0.1, 1.0, (50, 13)).astype(np.float32)
    np.testing.assert_allclose(model.encode(x)[0], tiny_model.encode(x)[0], rtol=1e-5, atol=1e-6)
    assert (artifact.path / MODEL_FILE).stat().st_size < 5e6  # no optimizer state


def test_registry_lists_user_folder_and_picks_highest_version(artifact, tiny_model, tmp_path, monkeypatch):
    save_artifact(tiny_model, tmp_path, name="gmvae-test", version="1.10.0", kind="gmvae", energies_eV=ENERGIES)
    save_artifact(tiny_model, tmp_path, name="gmvae-test", version="1.9.0", kind="gmvae", energies_eV=ENERGIES)
    monkeypatch.setenv("PHASESTREAM_MODELS", str(tmp_path))
    registry = ModelRegistry()
    names = {(a.name, a.version) for a in registry.artifacts()}
    assert {("gmvae-test", "1.9.0"), ("gmvae-test", "1.10.0")} <= names
    assert ("gmvae-nvpf-synthetic", "1.0.0") in names  # the packaged pretrained model
    assert registry.get("gmvae-test").version == "1.10.0"
    assert registry.get("gmvae-test", "1.9.0").version == "1.9.0"
    with pytest.raises(ModelNotFoundError, match=r"no model artifact 'gmvae-test 2\.0'"):
        registry.get("gmvae-test", "2.0")
    with pytest.raises(FileExistsError, match="another version"):
        save_artifact(tiny_model, tmp_path, name="gmvae-test", version="1.9.0", kind="gmvae")


def _copy(artifact, tmp_path):
    target = tmp_path / artifact.path.name
    shutil.copytree(artifact.path, target)
    return target


def test_corrupted_model_file_is_refused_before_loading(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    data = bytearray((path / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted or was replaced"):
        Artifact.read(path).load()


def test_weights_not_matching_the_manifest_are_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["sha256"] = "0" * 64
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="weights sha256"):
        Artifact.read(path).load()


def test_energies_not_matching_the_network_are_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["energies_eV"] = manifest["energies_eV"][:12]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="takes 13 energies but the manifest lists 12"):
        Artifact.read(path).load()


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / MANIFEST).unlink(), "manifest.json is missing"),
    (lambda p: (p / MANIFEST).write_text("{not json"), "not valid JSON"),
    (lambda p: (p / MANIFEST).write_text(json.dumps({"name": "x"})), "lacks"),
    (lambda p: (p / MODEL_FILE).unlink(), "missing"),
])
def test_broken_artifacts_are_refused_and_skipped_by_the_registry(artifact, tmp_path, breakage, message):
    path = _copy(artifact, tmp_path)
    breakage(path)
    with pytest.raises(ArtifactError, match=message):
        Artifact.read(path).load()
    registry = ModelRegistry([tmp_path])
    if "manifest" in message or "JSON" in message or "lacks" in message:
        assert registry.artifacts() == [] and str(path) in registry.problems()


def test_packaged_pretrained_artifact_is_valid_and_small():
    art = ModelRegistry().get("gmvae-nvpf-synthetic")
    assert art.manifest["training"]["source"] == "synthetic"
    assert isinstance(art.manifest["training"]["seed"], int)
    assert len(art.energies) == 13 and len(art.phases) == 5
    size = sum(f.stat().st_size for f in art.path.iterdir())
    assert size < 5e6
    model = art.load()
    assert isinstance(model, GMVAE) and model.latent_dim == 3


def _unreadable(kind):
    def make(manifest):
        manifest.unlink()
        if kind == "directory":
            manifest.mkdir()
        elif kind == "fifo":
            os.mkfifo(manifest)
        elif kind == "deep":
            manifest.write_text("[" * 100_000 + "]" * 100_000)
        else:  # over the size limit, though valid JSON
            manifest.write_text(json.dumps({"name": "x", "padding": "x" * (2 << 20)}))
    return make


def _in_thread(call, timeout=20.0):
    """call() in a thread: a registry that blocks fails the test instead of hanging it."""
    out = {}

    def run():
        try:
            out["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - raised again below, in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"blocked for {timeout} s"
    if "error" in out:
        raise out["error"]
    return out["result"]


@pytest.mark.parametrize("kind, reason", [
    ("directory", "not a regular file"),
    ("fifo", "not a regular file"),
    ("deep", "nested too deeply"),
    ("huge", "larger than 1048576 bytes"),
])
def test_an_unreadable_manifest_is_skipped_and_the_packaged_models_still_load(artifact, tmp_path, kind, reason,
                                                                              caplog):
    """Before: a manifest.json that is a directory, a FIFO or deeply nested JSON raised IsADirectoryError or
    RecursionError out of every listing (or blocked it forever), so no model, not even a packaged one, loaded."""
    broken = _copy(artifact, tmp_path)
    _unreadable(kind)(broken / MANIFEST)
    good = save_artifact(artifact.load(), tmp_path, name="gmvae-test", version="2.0.0", kind="gmvae",
                         energies_eV=ENERGIES)
    registry = ModelRegistry([PRETRAINED_DIR, tmp_path])
    try:
        with caplog.at_level(logging.WARNING, logger="phasestream"):
            problems = _in_thread(registry.problems)
            packaged = _in_thread(lambda: registry.get("gmvae-nvpf-synthetic"))
    finally:
        if kind == "fifo":
            _release(broken / MANIFEST)
    assert reason in problems[str(broken)]
    assert str(broken) in caplog.text and reason in caplog.text
    assert packaged.path.parent == PRETRAINED_DIR and packaged.load().latent_dim == 3
    assert registry.get("gmvae-test").path == good.path


def _release(fifo):
    """Let a reader still blocked in opening ``fifo`` go on (it reads end of file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody has it open for reading
        pass


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["files"].__setitem__(MODEL_FILE, 123), "files"),
    (lambda m: m.__setitem__("sha256", 5), "sha256"),
    (lambda m: m.__setitem__("energies_eV", 5), "energies_eV"),
    (lambda m: m.__setitem__("energies_eV", ["505", 510.0]), "energies_eV"),
    (lambda m: m.__setitem__("phases", 5), "phases"),
    (lambda m: m.__setitem__("training", [1, 2]), "training"),
    (lambda m: m.__setitem__("metrics", "good"), "metrics"),
], ids=["file-hash-int", "sha256-int", "energies-int", "energies-str", "phases-int", "training-list", "metrics-str"])
def test_manifest_fields_of_the_wrong_type_are_artifact_errors(artifact, tmp_path, edit, field):
    """Before: a number where a hash or a list belongs raised TypeError ("'int' object is not subscriptable",
    "has no len()") out of load(), and a list as training broke summary() (AttributeError)."""
    path = _copy(artifact, tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    registry = ModelRegistry([tmp_path])
    with pytest.raises(ArtifactError, match=rf"manifest field {field}\b"):
        registry.load("gmvae-test")
    summary = registry.get("gmvae-test").summary()  # listed, the field flagged and left out
    assert field in summary["problems"] and "must be" in summary["problems"][field]
    assert summary["name"] == "gmvae-test" and summary["kind"] == "gmvae"
    assert summary.get(field) in (None, {}, [])


def test_a_null_training_is_summarized_as_empty(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["training"] = None
    (path / MANIFEST).write_text(json.dumps(manifest))
    art = Artifact.read(path)
    assert art.summary()["training"] == {} and "problems" not in art.summary()
    assert art.load().latent_dim == 3
