"""Options the command line refuses or takes as the docs say (docs/cli.md), parsed by the real parser or run
up to the refusal: no Tiled, no model, nothing started."""

from __future__ import annotations

import pytest

from phasestream.app.cli import build_parser, main
from phasestream.app.settings import SETTINGS_BACKENDS, load_settings, problems
from phasestream.kernels.backend import BACKENDS


@pytest.mark.parametrize("argv", [
    ["import", "x.h5", "--references", "nvpf-synthetic", "--soc", "nan"],  # a state of charge that finds nothing
    ["import", "x.h5", "--references", "nvpf-synthetic", "--soc", "inf"],
    ["train", "gmvae", "--runs", "u", "--soc", "nan"],
    ["reprocess", "--split", "0", "--soc", "1"],  # acted as 1 before
    ["reprocess", "--split", "-2", "--soc", "1"],
    # options import never used: enhancement and denoising are not run by import
    ["import", "x.h5", "--references", "nvpf-synthetic", "--indi-model", "m"],
    ["import", "x.h5", "--references", "nvpf-synthetic", "--fine-tune-steps", "3"],
])
def test_values_and_options_a_command_does_not_take_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    assert argv[-2] in capsys.readouterr().err


def test_serve_and_reprocess_keep_the_enhance_and_denoise_options():
    for command in (["serve"], ["reprocess", "--soc", "1"]):
        args = build_parser().parse_args([*command, "--indi-model", "m", "--fine-tune-steps", "3", "--steps", "4"])
        assert (args.indi_model, args.fine_tune_steps, args.steps) == ("m", 3, 4)


def test_train_gmvae_synthetic_with_soc_is_refused_not_ignored(capsys):
    assert main(["train", "gmvae", "--synthetic", "--soc", "2", "--out", "/nonexistent"]) == 2
    assert "--soc selects results in Tiled" in capsys.readouterr().err


def test_every_kernel_backend_is_a_valid_setting():
    assert set(SETTINGS_BACKENDS) == {"auto", *BACKENDS}
    for backend in SETTINGS_BACKENDS:
        loaded = load_settings(environ={"PHASESTREAM_BACKEND": backend})
        assert not [p for p in problems(loaded.settings) if p.setting == "backend"], backend
    loaded = load_settings(environ={"PHASESTREAM_BACKEND": "opencl"})
    assert [p.level for p in problems(loaded.settings) if p.setting == "backend"] == ["error"]


def test_a_refused_selection_starts_no_tiled(tmp_path, capsys):
    catalog = tmp_path / "catalog"
    assert main(["query", "--catalog", str(catalog), "--since", "2026-12-02", "--until", "2026-12-01"]) == 2
    assert "since" in capsys.readouterr().err
    assert not catalog.exists()  # refused before an embedded server was started over it


def test_serve_refuses_options_that_cannot_run_together_before_tiled_starts(tmp_path, capsys):
    """``--no-check`` with the default strategy ``auto`` (the held-out check's winner) cannot run: refused before
    an embedded Tiled is started (before: after Tiled answered)."""
    catalog = tmp_path / "catalog"
    assert main(["serve", "--catalog", str(catalog), "--no-check"]) == 2
    assert "strategy 'auto' picks the winner of the held-out check" in capsys.readouterr().err
    assert not catalog.exists()
