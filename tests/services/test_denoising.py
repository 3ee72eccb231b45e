"""The model server's denoise operation, through a real model-server subprocess."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from phasestream.app.process import ModelServerProcess
from phasestream.models.registry import ModelRegistry
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import ModelServerError
from phasestream.references import load_references, select_energies
from phasestream.sim import LINE_CORRELATED, make_sample, simulate_stack

if importlib.util.find_spec("tensorflow") is None:  # the model server process runs it, not this one
    pytest.skip("TensorFlow is not installed", allow_module_level=True)

DENOISE = "denoise-stxm-synthetic"


@pytest.fixture(scope="module")
def models():
    with ModelServerProcess(args=("--preload", DENOISE)) as proc:
        yield proc


def test_denoise_op_equals_the_model_in_process(models):
    from phasestream.models.denoise import denoise_stack

    art, model = ModelRegistry().load(DENOISE)
    refs = load_references("nvpf-synthetic")
    sample = make_sample((64, 64), seed=8, n_particles=2)
    od = simulate_stack(sample, select_energies(refs, 6), dose=300.0, noise=LINE_CORRELATED, rng=2).od
    od[0, 3, 4] = np.nan
    with ModelClient(models.address, timeout=120) as client:
        reply = client.denoise(DENOISE, od)
        assert reply["array"].shape == od.shape and np.isfinite(reply["array"]).all()
        assert (reply["model"], reply["version"], reply["sha256"]) == (DENOISE, art.version, art.sha256)
        expected = denoise_stack(model, od.astype(np.float32))
        assert reply["components"] == expected.components
        np.testing.assert_allclose(reply["array"], expected.od, rtol=1e-4, atol=1e-4)
        tuned = client.denoise(DENOISE, od, fine_tune_steps=3)
        assert tuned["fine_tune_steps"] == 3 and tuned["array"].shape == od.shape
        with pytest.raises(ModelServerError, match="OD stack"):
            client.denoise(DENOISE, np.zeros((4, 16), np.float32))
        with pytest.raises(ModelServerError, match="fine_tune_steps must be"):
            client.request("denoise", model=DENOISE, array=od, options={"fine_tune_steps": -1})
        with pytest.raises(ModelServerError, match="is a denoise model"):
            client.request("enhance", model=DENOISE, array=od[0])
