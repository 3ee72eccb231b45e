"""Runs imaged at several positions (grid scans over energy and a sample motor): one result per field, each
equal to a single-position scan of that field, from a real RunEngine with ophyd sim devices."""

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.plans import grid_scan, list_grid_scan, list_scan
from ophyd.sim import SynAxis

from phasestream.callbacks.fields import FieldPlan, field_plan, may_have_fields
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.contract import InvalidIdentifierError, RunDefaults, check_run_uid
from phasestream.contract.fields import MAX_FIELDS, check_result_key, field_key, parse_field_key
from phasestream.references import load_references, select_energies
from phasestream.sim import MosaicDetector, TransmissionDetector, make_energy, make_sample

ENERGIES = select_energies(load_references("nvpf-synthetic"), 12)  # 13 energies
MAPS = ("pcc", "phase", "reliability", "ambiguous", "mask")
SAMPLES = [make_sample((32, 32), state_of_charge=soc, seed=seed, n_particles=2)
           for seed, soc in ((1, 1.2), (2, 2.6))]
POSITIONS = [0.0, 1.0]


def _run(plan, **options):
    RE = RunEngine({})
    cb = PhaseMapCallback(backend="numpy", **options)
    RE.subscribe(cb)
    (uid,) = RE(plan)
    cb.flush()
    return cb, uid


def _defaults():
    return {"defaults": RunDefaults("nvpf-synthetic", energy_key="energy")}


def _mosaic():
    energy, x = make_energy(), SynAxis(name="sample_x")
    return energy, x, MosaicDetector(SAMPLES, POSITIONS, x, energy, noise=False)


@pytest.fixture(scope="module")
def singles():
    """Each field scanned on its own: a stock list_scan of its sample (the oracle)."""
    found = []
    for sample in SAMPLES:
        energy = make_energy()
        cb, uid = _run(list_scan([TransmissionDetector(sample, energy, noise=False)], energy, ENERGIES), **_defaults())
        assert cb.results[uid].status == "complete", cb.results[uid].errors
        found.append(cb.results[uid])
    assert found[0].metadata["phase_fractions"] != found[1].metadata["phase_fractions"]
    return found


def _assert_fields(cb, uid, singles, *, exact=True):
    assert sorted(cb.results) == [field_key(uid, 0), field_key(uid, 1)]
    for index, single in enumerate(singles):
        result = cb.results[field_key(uid, index)]
        assert result.status == "complete", result.errors
        assert result.uid == uid and result.field == {"index": index, "count": 2,
                                                      "positions": {"sample_x": POSITIONS[index]}}
        assert sorted(result.energies) == pytest.approx(sorted(single.energies))
        assert result.metadata["phase_fractions"] == pytest.approx(single.metadata["phase_fractions"], abs=1e-12)
        for name in MAPS:
            if exact:
                np.testing.assert_array_equal(result.arrays[name], single.arrays[name], err_msg=name)
            else:  # energies in another order: the same sums in another order
                np.testing.assert_allclose(result.arrays[name], single.arrays[name], atol=1e-5, err_msg=name)


def test_a_list_grid_scan_over_two_positions_gives_one_complete_result_per_field(singles):
    energy, x, det = _mosaic()
    cb, uid = _run(list_grid_scan([det], energy, ENERGIES, x, POSITIONS), **_defaults())
    _assert_fields(cb, uid, singles)
    # the grid's shape sized each field: 13 energies each, not the run's 26
    assert all(r.settings.num_points == len(ENERGIES) for r in cb.results.values())
    assert not any("duplicate" in e for r in cb.results.values() for e in r.errors)


@pytest.mark.parametrize("snake", [False, True])
def test_position_outer_and_snaking_grids_split_the_same_way(singles, snake):
    energy, x, det = _mosaic()
    cb, uid = _run(list_grid_scan([det], x, POSITIONS, energy, ENERGIES, snake_axes=snake), **_defaults())
    _assert_fields(cb, uid, singles, exact=not snake)
    if snake:  # the second field measured the energies backwards, in the order kept
        assert cb.results[field_key(uid, 1)].energies == pytest.approx(list(reversed(ENERGIES)))


def test_a_grid_with_the_phasestream_block_and_jittering_readbacks_splits_too():
    energy = make_energy()
    jitter = iter(np.random.default_rng(0).uniform(-0.02, 0.02, 100))

    class Jitter(SynAxis):  # readbacks 2 % of the spacing off the setpoint
        def read(self):
            reading = super().read()
            reading[self.name]["value"] += next(jitter)
            return reading

    x = Jitter(name="sample_x")
    det = MosaicDetector(SAMPLES, POSITIONS, x, energy, noise=False)
    md = {"phasestream": {"references": "nvpf-synthetic", "image_key": "det_img", "energy_key": "energy"}}
    cb, uid = _run(grid_scan([det], energy, ENERGIES[0], ENERGIES[-1], 2, x, 0.0, 1.0, 2, md=md))
    assert sorted(cb.results) == [field_key(uid, 0), field_key(uid, 1)]
    # a grid_scan over 2 energies: each field complete with its 2 energies, positions as read (jittered)
    for index in (0, 1):
        result = cb.results[field_key(uid, index)]
        assert result.status == "complete" and len(result.energies) == 2, result.errors
        assert result.field["positions"]["sample_x"] == pytest.approx(POSITIONS[index], abs=0.05)


def test_a_repeated_energy_within_a_field_is_still_a_duplicate():
    energy, x, det = _mosaic()
    cb, uid = _run(list_grid_scan([det], energy, [*ENERGIES[:3], ENERGIES[0]], x, POSITIONS), **_defaults())
    for index in (0, 1):
        result = cb.results[field_key(uid, index)]
        assert result.status == "partial" and len(result.energies) == 3
        assert any("duplicate energy" in e for e in result.errors), result.errors


def test_a_list_scan_moving_a_second_motor_with_the_energy_is_one_field():
    """Motors moved together (a zone plate following the energy) are one dimension: no fields."""
    energy, x = make_energy(), SynAxis(name="zone_plate")
    det = TransmissionDetector(SAMPLES[0], energy, noise=False)
    cb, uid = _run(list_scan([det], energy, ENERGIES, x, np.linspace(0, 1, len(ENERGIES))), **_defaults())
    assert list(cb.results) == [uid]
    assert cb.results[uid].status == "complete" and cb.results[uid].field is None


def test_field_plan_reads_the_grid_from_the_start_document():
    start = {"motors": ("energy", "sample_x"), "shape": (13, 4), "num_points": 52,
             "extents": ([500, 520], [0.0, 3.0]),
             "hints": {"dimensions": [(["energy"], "primary"), (["sample_x"], "primary")]}}
    descriptor = {"data_keys": {"energy": {"dtype": "number", "shape": []},
                                "sample_x": {"dtype": "number", "shape": [], "precision": 3},
                                "det_img": {"dtype": "array", "shape": [8, 8]}}}
    assert may_have_fields(start)
    assert field_plan(start, descriptor, "energy") == FieldPlan(("sample_x",), (0.1,), 4, 13)
    # without the grid's shape: the motor's precision, the count unknown
    assert field_plan({**start, "shape": None}, descriptor, "energy") == FieldPlan(("sample_x",), (1e-3,), None, None)
    # a shape that disagrees with num_points is not trusted
    assert field_plan({**start, "num_points": 7}, descriptor, "energy").count is None
    # nor a shape without num_points: it would size each field's OD cube past the --max-num-points bound
    huge = {**start, "shape": (200000, 4)}
    del huge["num_points"]
    assert field_plan(huge, descriptor, "energy") == FieldPlan(("sample_x",), (1e-3,), None, None)
    # the energy in no dimension, or a single dimension: one field
    assert field_plan(start, descriptor, "mono") == FieldPlan()
    one = {"motors": ("energy", "zp"), "hints": {"dimensions": [(["energy", "zp"], "primary")]}}
    assert not may_have_fields(one) and field_plan(one, descriptor, "energy") == FieldPlan()
    # no hints: the motors are the dimensions when the shape has one length per motor
    bare = {"motors": ["sample_x", "energy"], "shape": [4, 13], "num_points": 52}
    assert may_have_fields(bare) and field_plan(bare, descriptor, "energy").position_keys == ("sample_x",)


def test_field_keys_follow_the_uid_rules():
    uid = "2b1f0c9e-77aa-4f51-9a53-7e0d3c1d2e4f"
    assert field_key(uid, 0) == f"{uid}.f0" and parse_field_key(f"{uid}.f12") == (uid, 12)
    assert check_result_key(f"{uid}.f3") == f"{uid}.f3" and check_result_key(uid) == uid
    assert parse_field_key(uid) is None and parse_field_key(f"{uid}.f01") is None
    for bad in ("..", ".f0", "a/b.f0", "../x.f1"):
        with pytest.raises(InvalidIdentifierError):
            check_result_key(bad)
    for index in (-1, MAX_FIELDS, True, 1.0):
        with pytest.raises(InvalidIdentifierError):
            field_key(uid, index)
    # a run whose uid ends like a field key could take another run's field result: refused as a run uid
    for posing in (f"{uid}.f0", "x.f12", "x.f01"):
        with pytest.raises(InvalidIdentifierError, match="field"):
            check_run_uid(posing)
        with pytest.raises(InvalidIdentifierError):
            field_key(posing, 0)


def _txm_grid(det, energy, x, positions):
    """A TXM grid: a dark, then per energy one flat (sample out) and one image per position (one position: a
    plain energy scan, the oracle)."""
    md = {"phasestream": {"references": "nvpf-synthetic", "image_key": det.image_key, "energy_key": "energy",
                          "mode": "txm"},
          "motors": ["energy", "sample_x"], "num_points": len(ENERGIES) * len(positions),
          "hints": {"dimensions": [(["energy"], "primary"), (["sample_x"], "primary")][:1 + (len(positions) > 1)]}}

    @bpp.stage_decorator([det])
    @bpp.run_decorator(md=md)
    def plan():
        yield from bps.mv(det.shutter, "closed")
        yield from bps.trigger_and_read([det], name="dark")
        yield from bps.mv(det.shutter, "open")
        for e in ENERGIES:
            yield from bps.mv(energy, e, det.sample_position, "out")
            yield from bps.trigger_and_read([det, energy], name="flat")
            yield from bps.mv(det.sample_position, "in")
            for p in positions:
                yield from bps.mv(x, p)
                yield from bps.trigger_and_read([det, energy, x])

    return plan()


def test_the_fields_of_a_txm_grid_share_its_darks_and_flats():
    energy, x = make_energy(), SynAxis(name="sample_x")
    det = MosaicDetector(SAMPLES, POSITIONS, x, energy, mode="txm", noise=False)
    cb, uid = _run(_txm_grid(det, energy, x, POSITIONS))
    for index, sample in enumerate(SAMPLES):
        energy, x = make_energy(), SynAxis(name="sample_x")
        single, one = _run(_txm_grid(MosaicDetector([sample], [POSITIONS[index]], x, energy, mode="txm", noise=False),
                                     energy, x, [POSITIONS[index]]))
        oracle, result = single.results[one], cb.results[field_key(uid, index)]
        assert result.status == oracle.status == "complete", (result.errors, oracle.errors)
        assert result.metadata["phase_fractions"] == oracle.metadata["phase_fractions"]
        for name in MAPS:
            np.testing.assert_array_equal(result.arrays[name], oracle.arrays[name], err_msg=name)
