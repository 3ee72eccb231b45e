"""The view draws a running result's phase map from the arrays Tiled streams, without reading them back.

A real embedded Tiled (streaming cache in memory) and the worker's own ``ResultWriter``: partial
maps are written as the worker writes them (the three arrays overwritten in place, then the
metadata). Once the follower has subscribed to the arrays (announced when the first map created
them), it must hand the map cache the streamed arrays of each version, with no read of the
arrays, and the PNG must equal ``phase_rgb`` of the arrays in Tiled (the paper's display). A
version whose metadata update follows no map write (an error recorded) or only some of the three
(maps of mixed versions) falls back to reading.
"""

from __future__ import annotations

import io
import time
import uuid

import numpy as np
from PIL import Image
from support import wait

from phasestream.app.figures import phase_rgb
from phasestream.app.view.follow import CatalogFollower
from phasestream.app.view.render import png
from phasestream.app.view.server import MapCache
from phasestream.store.results import ResultWriter

PHASES = ["A", "B", "C"]
SHAPE = (64, 80)


def maps(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    phase = rng.integers(-1, len(PHASES), SHAPE).astype(np.int16)
    return {"phase": phase, "reliability": rng.random(SHAPE, dtype=np.float32),
            "ambiguous": (rng.random(SHAPE) < 0.1).astype(np.uint8),
            "pcc": rng.uniform(-1, 1, (len(PHASES), *SHAPE)).astype(np.float32)}



def decoded(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def test_running_phase_map_is_drawn_from_the_stream(tiled_client):
    uid = str(uuid.uuid4())
    root = f"live-maps-{uid[:8]}"
    writer = ResultWriter(tiled_client, uid, root=root, shape=SHAPE, phases=PHASES)
    follower = CatalogFollower(str(tiled_client.uri), root=root, client=tiled_client).start()
    reads: list[tuple[str, tuple]] = []
    read_arrays = follower.read_arrays

    def counted(run_uid, names):
        reads.append((run_uid, tuple(names)))
        return read_arrays(run_uid, names)

    follower.read_arrays = counted
    cache = MapCache(follower)
    try:
        wait(lambda: follower.state == "live" and uid in follower.runs, 30, "the follower to see the result")

        def write_partial(seed: int, n: int) -> int:
            """One partial map, written as the worker writes it; the view's version once it has it."""
            before = follower.runs[uid].version
            writer.write_maps(**maps(seed))
            writer.update_metadata(n_energies_seen=n, phase_fractions={"A": 0.2 + 0.01 * n, "B": 0.3, "C": 0.5})
            return wait(lambda: follower.runs[uid].version > before and follower.runs[uid].version, 30,
                        f"the partial map after {n} energies")

        first = write_partial(1, 3)  # creates the arrays: Tiled announces them, the view subscribes
        assert cache.image(uid, first, "phase") is not None  # streamed or read: a race with the subscriptions
        wait(lambda: uid in follower._live_maps and not follower._live_maps[uid].missing, 30,
             "the map subscriptions")
        time.sleep(0.5)  # their websockets connect
        for seed, n in ((2, 5), (3, 7)):
            version = write_partial(seed, n)
            reads.clear()
            body = cache.image(uid, version, "phase")
            assert reads == [], f"version {version} was read back from Tiled instead of taken from the stream"
            node = tiled_client[root][uid]
            expected = png(phase_rgb(node["phase"].read(), node["reliability"].read(), node["ambiguous"].read()))
            np.testing.assert_array_equal(decoded(body), decoded(expected))
            np.testing.assert_array_equal(node["phase"].read(), maps(seed)["phase"])
            assert cache.image(uid, version, "pcc0") is not None  # the PCC maps are read, as before
            assert reads == [(uid, ("pcc",))]

        # only the phase array written before the update: the streamed phase would go with older
        # reliability and ambiguous maps (mixed versions), so the three are read
        before = follower.runs[uid].version
        writer.write_maps(phase=maps(4)["phase"])
        writer.update_metadata(n_energies_seen=9)
        version = wait(lambda: follower.runs[uid].version > before and follower.runs[uid].version, 30,
                       "the phase-only update")
        reads.clear()
        assert cache.image(uid, version, "phase") is not None
        assert reads == [(uid, ("phase", "reliability", "ambiguous"))]

        # a metadata update after no map write (an error recorded): no arrays in its window, read
        before = follower.runs[uid].version
        writer.record_error("a test error")
        version = wait(lambda: follower.runs[uid].version > before and follower.runs[uid].version, 30,
                       "the error update")
        reads.clear()
        assert cache.image(uid, version, "phase") is not None
        assert reads == [(uid, ("phase", "reliability", "ambiguous"))]
    finally:
        follower.close()


def test_a_kept_refinement_is_said_beside_the_record_that_did_not_complete():
    """The refined fractions beside a skipped re-run are the earlier complete refinement's: the page says so."""
    from phasestream.app.view.summary import RunSummary

    kept = {"status": "complete", "strategy": "knn", "model": "gmvae", "version": "1", "seconds": 2.0}
    md = {"status": "complete", "refined_fractions": {"a": 0.5, "b": 0.5},
          "refinement": {"status": "skipped", "reason": "no model server", "kept": kept}}
    shown = RunSummary("u1", md).as_dict(tiled_base="http://127.0.0.1:1", root="phasestream")
    assert shown["refinement"] == {"status": "skipped", "reason": "no model server",
                                   "kept": {"strategy": "knn", "model": "gmvae", "version": "1"}}
    md["refinement"] = kept
    assert "kept" not in RunSummary("u1", md).as_dict(tiled_base="http://127.0.0.1:1", root="phasestream")["refinement"]
