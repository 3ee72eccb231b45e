"""The view's energies expected for a field's result (docs/contract.md, "Fields"): the raw run's
``num_points`` shared among its fields, read from a real embedded Tiled."""

from __future__ import annotations

import uuid

import pytest
from bluesky import RunEngine
from bluesky.plans import list_grid_scan
from ophyd.sim import SynAxis
from support import wait

from phasestream.app.view.follow import CatalogFollower
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import raw_run_writer

ENERGIES = [700.0, 705.0, 710.0]
POSITIONS = [0.0, 1.0]



@pytest.fixture(scope="module")
def grid_run(tiled_client) -> str:
    """A raw grid run (2 positions x 3 energies) as TiledWriter stores it."""
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled_client))
    energy, sample_x = SynAxis(name="energy"), SynAxis(name="sample_x")
    (uid,) = RE(list_grid_scan([energy], sample_x, POSITIONS, energy, ENERGIES))
    assert tiled_client[uid].metadata["start"]["num_points"] == len(POSITIONS) * len(ENERGIES)
    return uid


@pytest.mark.parametrize("count, expected", [(2, 3), (4, None), ("two", None)])
def test_a_field_result_expects_its_share_of_the_run_points(tiled_client, grid_run, count, expected):
    uid = grid_run

    root = f"fields-{uuid.uuid4().hex[:8]}"
    key = f"{uid}.f1"
    ResultWriter(tiled_client, uid, key=key, root=root, shape=(4, 4), phases=["A", "B"],
                 metadata={"run_uid": uid, "field": {"index": 1, "count": count, "positions": {"sample_x": 1.0}}})
    follower = CatalogFollower(str(tiled_client.uri), root=root, client=tiled_client).start()
    try:
        summary = wait(lambda: follower.summary(key), 30, "the view to list the field's result")
        assert summary["status"] == "running"
        if expected is not None:
            summary = wait(lambda: (s := follower.summary(key)) and s["energies_expected"] and s, 30,
                           "the expected count")
        # 6 points over 2 fields: 3 energies each; 6 over 4 fields, or no count, is not a share: unknown
        assert summary["energies_expected"] == expected
    finally:
        follower.close()
