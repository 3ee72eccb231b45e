"""Spatial context (``phasestream/models/spatial.py`` and the ``spatial`` strategies of ``refine.py``):
against a brute-force NumPy vote, against the simulator's truth, and the held-out check on a set
whose two phases have identical spectra."""

from __future__ import annotations

import numpy as np
import pytest

from phasestream.jobs.refine import RefinementSkipped, RefineOptions, held_out_check
from phasestream.kernels.pearson import pearson_maps
from phasestream.kernels.phases import assign_phases
from phasestream.models.refine import MODEL_FREE, refine_ambiguous
from phasestream.models.spatial import RADII, neighbour_prior, pcc_reliability
from phasestream.sim.samples import make_sample


def test_neighbour_prior_equals_a_brute_force_vote():
    rng = np.random.default_rng(0)
    phase = rng.integers(0, 3, (30, 40))
    evidence = rng.random((30, 40)) < 0.1
    weight = rng.random((30, 40))
    targets = rng.choice(30 * 40, 60, replace=False)
    allowed = rng.random((60, 3)) < 0.7
    prior, radius = neighbour_prior(phase, evidence, targets, 3, weight=weight, allowed=allowed)
    for i, t in enumerate(targets):
        y, x = divmod(int(t), 40)
        for r in RADII:  # the smallest window holding a vote for an allowed phase
            win = (slice(max(y - r, 0), y + r + 1), slice(max(x - r, 0), x + r + 1))
            votes = np.array([np.sum(weight[win] * evidence[win] * (phase[win] == k)) for k in range(3)]) * allowed[i]
            if votes.sum() > 0:
                np.testing.assert_allclose(prior[i], votes / votes.sum())
                assert radius[i] == r
                break
        else:
            assert radius[i] == 0 and not prior[i].any()


def test_pcc_reliability_is_best_minus_second_best():
    pcc = np.random.default_rng(1).random((4, 5, 6))
    s = np.sort(pcc, axis=0)
    np.testing.assert_allclose(pcc_reliability(pcc), s[-1] - s[-2])


def test_spatial_recovers_the_truth_of_artificially_ambiguous_patches_better_than_pcc():
    sample = make_sample((128, 128), state_of_charge=2.0, seed=3)
    truth, particle = sample.phase, sample.particle
    rng = np.random.default_rng(3)
    k = len(sample.references.phases)
    # PCC is sure of the true phase everywhere (gap 0.02-0.05) ...
    pcc = np.full((k, *truth.shape), 0.80)
    pcc[np.clip(truth, 0, None), *np.indices(truth.shape)] = 0.80 + rng.uniform(0.02, 0.05, truth.shape)
    # ... except in 40 patches of radius 2-5 px, where the true phase and a wrong one tie within 0.003
    ambiguous = np.zeros(truth.shape, bool)
    yy, xx = np.indices(truth.shape)
    centres = rng.choice(np.flatnonzero(particle & ~sample.boundary), 40, replace=False)
    for c in centres:
        y, x = divmod(int(c), truth.shape[1])
        ambiguous |= ((yy - y) ** 2 + (xx - x) ** 2 < rng.uniform(2, 5) ** 2) & particle
    wrong = (truth + rng.integers(1, k, truth.shape)) % k
    ties = rng.uniform(-0.003, 0.003, truth.shape)
    pcc[np.clip(truth, 0, None), yy, xx] = np.where(ambiguous, 0.9 + ties, pcc[np.clip(truth, 0, None), yy, xx])
    pcc[wrong, yy, xx] = np.where(ambiguous, 0.9 - ties, pcc[wrong, yy, xx])
    pcc_phase = np.where(particle, np.argmax(pcc, axis=0), -1)
    amb = ambiguous & particle
    result = refine_ambiguous(None, pcc_phase, amb, particle, "spatial", pcc=pcc, reliability=pcc_reliability(pcc))
    pcc_right = np.mean(pcc_phase[amb] == truth[amb])
    spatial_right = np.mean(result.refined_phase[amb] == truth[amb])
    assert 0.35 < pcc_right < 0.65  # a coin toss between the two phases in question
    assert spatial_right > pcc_right + 0.3, (spatial_right, pcc_right)
    assert (result.refined_phase[~amb] == pcc_phase[~amb]).all()  # confident pixels untouched
    assert "spatial" in MODEL_FREE and result.false_positive.sum() == 0


REFS = np.array([[0.10, 0.30, 0.90, 1.00, 0.80, 0.70, 0.60, 0.55],
                 [0.10, 0.30, 0.90, 1.00, 0.80, 0.70, 0.60, 0.55],  # identical to the first
                 [0.20, 0.20, 0.40, 0.90, 1.00, 1.00, 0.90, 0.80]])


def test_the_check_abstains_with_its_figures_on_two_identical_phases():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 3, (10, 10))
    truth = np.kron(blocks, np.ones((12, 12), int))  # domains of 12 x 12 px
    thickness = rng.uniform(0.6, 1.4, truth.shape)
    od = (REFS[truth] * thickness[..., None]).transpose(2, 0, 1) + rng.normal(0, 0.02, (8, *truth.shape))
    pcc = pearson_maps(od, REFS)
    mask = np.ones(truth.shape, bool)
    phase, _, ambiguous = assign_phases(pcc, mask, 0.005, backend="numpy")
    assert ambiguous[truth < 2].all()  # the identical pair ties everywhere
    full = od[:, mask].T
    with pytest.raises(RefinementSkipped) as skip:
        held_out_check(RefineOptions(strategy="spatial"), None, None, od, mask, phase, ambiguous, full,
                       np.ones(len(full), bool), None, np.arange(8), REFS, None, ["A", "B", "C"], pcc=pcc)
    record = skip.value.details["held_out"]
    assert record["pixels"] < 100 and f"only {record['pixels']} confident pixels" in str(skip.value)
    # and what it protects: the neighbour vote cannot tell A from B either (no confident pixel of either)
    refined = refine_ambiguous(None, phase, ambiguous, mask, "spatial", pcc=pcc).refined_phase
    assert (refined[truth < 2] == phase[truth < 2]).all()
