import json

import numpy as np
import pytest

from phasestream.cli import main
from phasestream.demo import DemoConfig, run_demo


def test_demo_fractions_match_ground_truth(capsys):
    assert main(["demo", "--states", "3.0,2.0", "--size", "96", "--dose", "20000", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("[") :])
    assert [r["state_of_charge"] for r in rows] == [3.0, 2.0]
    for r in rows:
        measured = np.array(list(r["phase_fractions"].values()))
        truth = np.array(list(r["true_fractions"].values()))
        # mask edges and domain transitions differ from the truth by a few percent at most
        assert np.abs(measured - truth).max() < 0.06
        assert r["accuracy"] > 0.98
        assert np.argmax(measured) == np.argmax(truth)


def test_demo_runs_on_numpy_backend_with_same_numbers_as_numba():
    cfg = dict(states=(1.0,), shape=(64, 64), n_energies=6, seed=3)
    a = run_demo(DemoConfig(backend="numpy", **cfg))[0]
    b = run_demo(DemoConfig(backend="numba", **cfg))[0]
    np.testing.assert_allclose(a.fractions, b.fractions)
    assert a.ambiguous_fraction == pytest.approx(b.ambiguous_fraction)


def test_demo_bad_options_are_clear_errors(capsys):
    assert main(["demo", "--dose", "-1"]) == 2
    assert "dose" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--states", "two"])


def test_references_command_selects_energies(capsys):
    assert main(["references", "nvpf-synthetic", "--select", "12"]) == 0
    out = capsys.readouterr().out
    assert "5 phases" in out and "13 energies (eV): 505.00" in out
