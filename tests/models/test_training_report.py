"""The training report of ``train gmvae`` (``phasestream/jobs/training_report.py``): per-phase purity in the
manifest, and a warning in words when the model cannot help refinement."""

from __future__ import annotations

import json

import numpy as np

from phasestream.jobs.training import train_artifact
from phasestream.jobs.training_report import LATENT_STRATEGIES
from phasestream.models.registry import ModelRegistry
from phasestream.references import ReferenceSet, load_references
from phasestream.sim.training import synthetic_training_set


def _blind_references() -> ReferenceSet:
    """NVPF with Na1.0's spectrum replaced by Na2.0's: no spectrum, latent or PCC, can tell them apart."""
    refs = load_references("nvpf-synthetic")
    spectra = refs.spectra.copy()
    spectra[refs.phases.index("Na1.0")] = spectra[refs.phases.index("Na2.0")]
    return ReferenceSet(refs.energies, refs.phases, spectra, "nvpf-blind", refs.metadata, dict(refs.attrs))


def test_report_has_per_phase_purity_and_warns_on_a_blind_set(tmp_path):
    data = synthetic_training_set(seed=5, n_samples=1, states=(2.4, 2.0, 1.0), doses=(1000.0,), shape=(64, 64),
                                  references=_blind_references(), max_spectra=None, n_validation=2)
    assert len(data.validation) == 2
    artifact, result = train_artifact(data, tmp_path, name="gmvae-blind", version="0.0.1", epochs=2,
                                      hidden=(32, 16), progress=False)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    report = manifest["report"]
    assert report == json.loads(json.dumps(result.report))
    # per-phase purity, against a NumPy crosstab of the model's own components (independent of the report code)
    _, model = ModelRegistry([tmp_path]).load("gmvae-blind")
    rng = np.random.default_rng(5)
    pick = rng.choice(len(data.spectra), min(20_000, len(data.spectra)), replace=False)
    component = model.encode(data.spectra[pick])[1].argmax(axis=1)
    labels = data.labels[pick]
    table = np.zeros((component.max() + 1, len(data.phases)), int)
    np.add.at(table, (component, labels), 1)
    for k in np.unique(labels):
        expected = table[:, k][table.argmax(axis=1) == k].sum() / (labels == k).sum()
        assert abs(report["per_phase_purity"][data.phases[k]] - expected) < 0.01
    assert "Na1.0" not in report["per_phase_purity"]  # PCC never labels the copy: ties go to the first
    # Na1.0 ties with Na2.0 everywhere (PCC argmax takes the first): named
    assert any("no training spectrum is labelled Na1.0 by PCC" in w for w in report["warnings"])
    # the held-out gain: confident pixels pushed into the Na2.0/Na1.0 tie are PCC errors, not ambiguities, so
    # (almost) nothing like the real ambiguous pixels can be held out, and the report says it cannot vouch
    runs = report["validation_runs"]
    assert [run["run"] for run in runs] == ["simulated-0", "simulated-1"]
    measured = [run for run in runs if "pixels" in run]
    for run in measured:
        assert set(run["gain"]) == {*LATENT_STRATEGIES, "spatial"}
    if measured:
        assert report["model_gain"] < report["min_gain"]
        assert any(f"gains {report['model_gain']:+.3f} over PCC" in w for w in report["warnings"])
    else:
        assert any("could not be measured" in w and "confident pixels became ambiguous" in w
                   for w in report["warnings"])
