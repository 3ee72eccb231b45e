"""The status a run ends with, by the rules of docs/contract.md ("Status"), and its timings."""

from __future__ import annotations

import numpy as np
import pytest

from phasestream.callbacks.ending import run_timings, status_at_stop, status_of_maps


@pytest.mark.parametrize(("n", "expected", "exit_status", "incomplete", "status", "errors"), [
    (13, 13, "success", False, "complete", []),
    (13, None, "success", False, "complete", []),  # num_points unknown: every energy that came
    (13, 13, "success", True, "partial", []),  # lost documents: the reason is recorded where they were lost
    (9, 13, "success", False, "partial", ["9 of 13 energies analysed"]),
    (13, 13, "abort", False, "partial", ["run ended with exit_status 'abort' stopped by the user"]),
    (1, 13, "success", False, "partial", ["1 of 13 energies analysed",
                                          "only 1 energy analysed: phase maps need at least 2"]),
    (0, 13, "abort", False, "failed", ["no usable image in the run (first problem: energy 1 eV out of range)"]),
])
def test_status_at_stop(n, expected, exit_status, incomplete, status, errors):
    got = status_at_stop(n, expected, exit_status, "stopped by the user", incomplete=incomplete,
                         first_error="energy 1 eV out of range")
    assert got == (status, errors)


def test_a_run_without_any_image_or_problem_says_so_alone():
    assert status_at_stop(0, None, "success", "", incomplete=False, first_error=None) == (
        "failed", ["no usable image in the run"])


@pytest.mark.parametrize(("status", "summary", "expected"), [
    ("complete", {"valid_pixels": 100, "particle_pixels": 40}, "complete"),
    ("partial", {"valid_pixels": 100, "particle_pixels": 40}, "partial"),
    ("complete", {"valid_pixels": 100, "particle_pixels": 0}, "partial"),  # fractions undefined
    ("partial", {"valid_pixels": 100, "particle_pixels": 0}, "partial"),
    ("complete", {"valid_pixels": 0, "particle_pixels": 0}, "failed"),  # every OD masked
])
def test_status_of_maps(status, summary, expected):
    got, errors = status_of_maps(status, 13, summary)
    assert got == expected and len(errors) == (expected != status or summary["particle_pixels"] == 0)


def test_timings_against_numpy():
    frames, latency = [0.01, 0.03, 0.02], [0.1, 0.2, 0.3, 0.4]
    t = run_timings(3, stop=20.0, first_image=10.0, last_image=14.0, frame_seconds=frames, event_latency=latency)
    assert t == {"first_image_to_stop_s": 10.0, "median_frame_ms": pytest.approx(1e3 * np.median(frames)),
                 "images_per_s": 0.5, "event_latency_ms": {"median": pytest.approx(250.0),
                                                           "p95": pytest.approx(1e3 * np.percentile(latency, 95))}}
    assert run_timings(0, 20.0, None, None, [], []) == {"first_image_to_stop_s": None, "median_frame_ms": None,
                                                       "images_per_s": None, "event_latency_ms": None}
