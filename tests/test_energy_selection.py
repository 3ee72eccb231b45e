"""Energy selection for PCC (phasestream.references.selection) on measured standards.

Oracles: PCC phase-identification accuracy of seeded noisy pixel spectra (Poisson counts) for
the selection against the best of random energy subsets of the edge region; an independent
flatness check; the pretrained GMVAE's manifest for the earlier ``score`` method.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phasestream.references import (
    ReferenceSet,
    edge_region,
    load_references,
    predicted_separation,
    select_energies,
)
from phasestream.sim.pixels import noisy_pixel_od, pcc_accuracy

DATA = Path(__file__).parent / "data"
SETS = ("fe-k-edge", "au-l3-edge", "ni-k-edge")
DOSE = 300.0
PIXELS_PER_PHASE = 400
RANDOM_SUBSETS = 200


def measured(name: str) -> ReferenceSet:
    files = sorted((DATA / name).glob("ref_*.txt"))
    assert files, f"measured references missing in {DATA / name}"
    return load_references(files)


def accuracy(refs: ReferenceSet, energies: np.ndarray, labels: np.ndarray) -> float:
    # the same noise draw (seed) for every energy set: the comparison is paired
    od = noisy_pixel_od(refs, energies, labels, dose=DOSE, rng=np.random.default_rng(7))
    return pcc_accuracy(refs, energies, od, labels)[0]


@pytest.fixture(scope="module", params=SETS)
def refs(request) -> ReferenceSet:
    return measured(request.param)


def test_selection_is_close_to_the_best_random_subset(refs):
    labels = np.repeat(np.arange(len(refs.phases)), PIXELS_PER_PHASE)
    chosen = select_energies(refs, 12, dose=DOSE)
    assert chosen.size == 13 and chosen[0] == refs.energies[0]
    ours = accuracy(refs, chosen, labels)
    low, high = edge_region(refs, dose=DOSE)
    e = refs.energies
    pool = e[(e >= low) & (e <= high)]
    rng = np.random.default_rng(11)
    best = max(
        accuracy(refs, np.concatenate([[e[0]], np.sort(rng.choice(pool, 12, replace=False))]), labels)
        for _ in range(RANDOM_SUBSETS)
    )
    assert ours >= 0.97 * best, (refs.name, ours, best)


def test_three_phase_fe_set_is_identified():
    refs = measured("fe-k-edge")
    assert len(refs.phases) == 3
    labels = np.repeat(np.arange(3), 1000)
    assert accuracy(refs, select_energies(refs, 12), labels) >= 0.88
    # the earlier whole-grid score wasted picks on the flat pre-edge: clearly worse here
    assert accuracy(refs, select_energies(refs, 12, method="score"), labels) < 0.95


@pytest.mark.parametrize("dose", [30.0, 300.0, 3000.0])
def test_no_energy_where_all_references_are_flat(refs, dose):
    chosen = select_energies(refs, 12, dose=dose)
    values = refs.interpolate(chosen)  # (K, 13); first column is the pre-edge energy
    span = (refs.spectra.max(axis=1) - refs.spectra.min(axis=1))[:, None]
    rise = np.abs(values[:, 1:] - values[:, :1]) / span  # OD above baseline for an OD range of 1
    sigma = np.sqrt(np.exp(rise) / dose)  # delta-method OD noise of Poisson counts
    assert np.all(np.any(rise >= sigma, axis=0)), chosen


def test_fe_picks_stay_near_the_edge():
    chosen = select_energies(measured("fe-k-edge"), 12)
    assert np.all(chosen[1:] > 7100.0) and np.all(chosen[1:] < 7300.0), chosen


def test_selection_is_blind_to_offset_and_scale(refs):
    changed = refs.spectra * np.array([3.0, 0.2, 7.5, 1.0, 0.5, 2.0])[: len(refs.phases), None]
    changed = changed + np.array([5.0, -1.0, 0.3, 0.0, 2.0, -4.0])[: len(refs.phases), None]
    other = ReferenceSet(refs.energies, refs.phases, changed, name="changed")
    for dose in (30.0, 3000.0):
        np.testing.assert_array_equal(select_energies(other, 8, dose=dose), select_energies(refs, 8, dose=dose))


def test_predicted_separation_orders_the_sets_like_the_simulation():
    fe, au = measured("fe-k-edge"), measured("au-l3-edge")
    sep_fe = predicted_separation(fe, select_energies(fe, 12), dose=DOSE)
    sep_au = predicted_separation(au, select_energies(au, 12), dose=DOSE)
    off_fe, off_au = ~np.eye(3, dtype=bool), ~np.eye(6, dtype=bool)
    assert sep_fe.snr[off_fe].min() > sep_au.snr[off_au].min()
    np.testing.assert_allclose(np.diag(sep_fe.pcc), 1.0)
    assert np.all(sep_fe.error[off_fe] < 0.5)


def test_options_are_kept():
    refs = measured("ni-k-edge")
    no_pre = select_energies(refs, 5, pre_edge=False)
    assert no_pre.size == 5 and refs.energies[0] not in no_pre
    spaced = select_energies(refs, 5, min_separation_eV=3.0)
    assert np.all(np.diff(spaced) >= 3.0)
    with_pre = select_energies(refs, 5, pre_edge_eV=8250.0)
    assert with_pre[0] == 8250.0
    with pytest.raises(ValueError, match="method"):
        select_energies(refs, 5, method="best")


def test_score_method_repeats_the_pretrained_models_energies():
    manifest = Path(__file__).parents[1] / "phasestream/models/pretrained/gmvae-nvpf-synthetic-1.0.0/manifest.json"
    expected = json.loads(manifest.read_text())["energies_eV"]
    chosen = select_energies(load_references("nvpf-synthetic"), len(expected) - 1, method="score")
    np.testing.assert_allclose(chosen, expected, atol=0.051)
