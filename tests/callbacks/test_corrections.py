"""A TXM run's dark and flat frames: the dark is the mean of every dark frame, in the memory of one."""

from __future__ import annotations

import numpy as np
import pytest

from phasestream.callbacks.corrections import TXMCorrections


def test_the_dark_is_the_mean_of_the_dark_frames_kept_as_one_frame():
    rng = np.random.default_rng(0)
    frames = rng.poisson(20.0, (400, 32, 48)).astype(np.uint16)
    txm = TXMCorrections(max_flats=10)
    assert txm.dark() == 0.0
    for frame in frames:
        txm.add_dark(frame)
    np.testing.assert_allclose(txm.dark(), frames.astype(np.float64).mean(axis=0), rtol=1e-12)
    # one frame's sum and its mean, however many arrived (before: every frame as float64, 400 x 12 KiB here)
    held = [v for v in vars(txm).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in held) <= 2 * 32 * 48 * 8
    txm.add_dark(frames[0])  # the mean follows a later frame
    np.testing.assert_allclose(txm.dark(), np.concatenate([frames, frames[:1]]).mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match=r"dark frame of shape \(8, 8\), the run's earlier ones \(32, 48\)"):
        txm.add_dark(np.zeros((8, 8)))


def test_the_flat_nearest_in_energy_and_at_most_max_flats():
    txm = TXMCorrections(max_flats=3)
    with pytest.raises(ValueError, match="before any flat-field image"):
        txm.flat(8340.0)
    flats = {8330.0: np.full((4, 4), 1.0), 8350.0: np.full((4, 4), 2.0), 8350.0 + 1e-9: np.full((4, 4), 3.0)}
    for energy, image in flats.items():
        txm.add_flat(energy, image)
    assert txm.flat(8000.0)[0, 0] == 1.0 and txm.flat(8345.0)[0, 0] == 2.0  # the first of equally near ones
    with pytest.raises(ValueError, match="more than 3 flat-field images"):
        txm.add_flat(8400.0, np.zeros((4, 4)))
    assert len(txm.flats) == 3
