"""The start document's ``denoise`` request, parsed once into ``RunSettings.denoise``."""

from __future__ import annotations

import pytest

from phasestream.contract import MAP_LAYOUT, RunSettings
from phasestream.contract.denoise import (
    AVERAGING_SETTINGS,
    DEFAULT_DENOISE_MODEL,
    DENOISING_ARRAYS,
    DenoiseRequest,
    averaging_settings,
    denoise_request,
)


def _settings(denoise) -> RunSettings:
    block = {"references": "nvpf-synthetic", "image_key": "det_image", "energy_key": "energy"}
    if denoise is not None:
        block["denoise"] = denoise
    return RunSettings.from_start({"uid": "run-1", "phasestream": block})


def test_requests_that_parse():
    assert _settings(None).denoise is None and _settings(False).denoise is None
    assert _settings(True).denoise == DenoiseRequest(DEFAULT_DENOISE_MODEL, None, 0)
    asked = _settings({"model": "denoise-mine", "version": "1.2.0", "fine_tune_steps": 200})
    assert asked.denoise == DenoiseRequest("denoise-mine", "1.2.0", 200)
    assert "denoise" not in asked.extra  # one home: the parsed request


@pytest.mark.parametrize(("value", "says"), [
    ("yes", "must be true or"),
    (1, "must be true or"),
    ({"fine_tune_steps": -1}, "fine_tune_steps must be an integer in 0..5000, got -1"),
    ({"fine_tune_steps": 5001}, "got 5001"),
    ({"fine_tune_steps": True}, "got True"),
    ({"fine_tune_steps": 2.5}, "got 2.5"),
    ({"model": ""}, "model must be a name"),
    ({"model": "x" * 200}, "model must be a name"),
    ({"version": 1}, "version must be a string"),
    ({"steps": 3}, "unknown keys ['steps']"),
])
def test_a_malformed_request_carries_its_error_and_never_refuses_the_run(value, says):
    settings = _settings(value)  # no RunSettingsError: the PCC analysis goes on
    assert settings.denoise is not None and says in settings.denoise.error
    assert settings.denoise.error.startswith("run run-1: phasestream.denoise")
    assert denoise_request(value, "run-1") == settings.denoise


def test_the_denoised_arrays_are_contract_arrays():
    assert set(DENOISING_ARRAYS) <= set(MAP_LAYOUT)
    assert MAP_LAYOUT["denoised"][1] == ("energy", "y", "x") and MAP_LAYOUT["phase_denoised"][1] == ("y", "x")


def test_the_averaging_settings_a_record_carries_are_checked():
    good = {"radius": 12, "tolerance": 0.4, "thickness_tolerance": 0.2, "rounds": 3}
    assert averaging_settings(good) == good and list(averaging_settings(good)) == list(AVERAGING_SETTINGS)
    assert averaging_settings(None) is None  # no component was averaged


@pytest.mark.parametrize(("value", "says"), [
    ([12, 0.4, 0.2, 3], "must map exactly radius, tolerance, thickness_tolerance, rounds, got list"),
    ({"radius": 12, "tolerance": 0.4, "rounds": 3}, "got ['radius', 'rounds', 'tolerance']"),
    ({"radius": 12, "tolerance": 0.4, "thickness_tolerance": 0.2, "rounds": 3, "path": "/etc"}, "'path'"),
    ({"radius": 12, "tolerance": float("nan"), "thickness_tolerance": 0.2, "rounds": 3}, "shape_averaging.tolerance"),
    ({"radius": True, "tolerance": 0.4, "thickness_tolerance": 0.2, "rounds": 3}, "shape_averaging.radius"),
    ({"radius": 12, "tolerance": 0.4, "thickness_tolerance": "0.2", "rounds": 3}, "thickness_tolerance must be"),
])
def test_malformed_averaging_settings_are_refused_naming_what_is_wrong(value, says):
    with pytest.raises(ValueError, match="shape_averaging") as error:
        averaging_settings(value)
    assert says in str(error.value)
