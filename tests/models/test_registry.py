"""Model artifacts: manifest, hashes, registry folders, refusal of corrupted or mismatched artifacts."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from phasestream.models.gmvae import GMVAE, fit_normalization
from phasestream.models.registry import (
    MANIFEST,
    MODEL_FILE,
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
