"""LivePhaseMap: the live phase-map view for IPython / Jupyter, drawing into an Agg figure during real
RunEngine scans, in-process and following a real ``phasestream serve`` worker through Tiled."""

import time
import uuid

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import list_grid_scan
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ophyd.sim import SynAxis

from phasestream.app.figures import MAX_LABEL_CHARS, phase_rgb, save_result_figures
from phasestream.app.live import ServeProcess
from phasestream.app.notebook import LivePhaseMap
from phasestream.contract.fields import MAX_FIELDS, field_key
from phasestream.kernels import (
    DEFAULT_AMBIGUITY,
    assign_phases,
    optical_density_reference,
    particle_mask,
    pearson_maps,
    phase_fractions,
)
from phasestream.references import ReferenceSet, load_references, select_energies
from phasestream.sim import MosaicDetector, TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.follow import ResultFollower
from phasestream.store.results import ResultWriter
from phasestream.transport.proxy import start_proxy
from phasestream.transport.wire import DocumentPublisher

REFS = load_references("nvpf-synthetic")
ENERGIES = select_energies(REFS, 8)
SHAPE = (48, 48)


def agg_figure() -> Figure:
    figure = Figure(figsize=(8, 3.5))
    FigureCanvasAgg(figure)
    return figure


def scan(RE, soc: float, seed: int):
    sample = make_sample(SHAPE, state_of_charge=soc, seed=seed, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=8000.0, seed=seed)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
    return uid, sample


class Watcher:
    """Subscribed after the view: what the view's figure showed after each event, and the raw images."""

    def __init__(self, live: LivePhaseMap, image_key: str, i0_key: str):
        self.live, self.image_key, self.i0_key = live, image_key, i0_key
        self.seen: list[tuple[int, str]] = []  # (energies in the drawn state, its status) after each event
        self.images, self.i0 = [], []

    def __call__(self, name, doc):
        if name == "event":
            self.images.append(np.asarray(doc["data"][self.image_key], dtype=float))
            self.i0.append(float(doc["data"][self.i0_key]))
            s = self.live.snapshot
            self.seen.append((s.n_energies_seen, s.status) if s is not None else (0, ""))


def shown_rgb(live: LivePhaseMap) -> np.ndarray:
    image = live.figure.axes[0].get_images()[0]
    return np.asarray(image.get_array())


def last_points(live: LivePhaseMap) -> dict[str, float]:
    """The last point of every fraction line in the figure, by label."""
    return {line.get_label(): float(line.get_ydata()[-1]) for line in live.figure.axes[1].get_lines()}


def test_in_process_view_draws_the_workers_maps_as_the_scan_goes():
    RE = RunEngine({})
    live = LivePhaseMap(figure=agg_figure(), backend="numpy", display=False)
    RE.subscribe(live)
    sample = make_sample(SHAPE, state_of_charge=2.0, seed=3, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=8000.0, seed=3)
    watcher = Watcher(live, det.image_key, det.i0_key)
    RE.subscribe(watcher)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
    live.close()

    # redrawn during the scan, with more energies each time, before the final state
    during = [n for n, status in watcher.seen if status == "running" and n >= 2]
    assert len(set(during)) >= 2 and during == sorted(during)
    assert live.redraws == sorted(live.redraws) and len(live.redraws) >= len(ENERGIES) - 1

    snap = live.snapshot
    assert snap.run_uid == uid and snap.status == "complete" and snap.n_energies_seen == len(ENERGIES)
    # the figure shows exactly the paper's display of the drawn maps
    np.testing.assert_array_equal(shown_rgb(live),
                                  phase_rgb(snap.arrays["phase"], snap.arrays["reliability"], snap.arrays["ambiguous"]))
    # the maps are those of an independent batch computation from the raw images, and right
    ods = np.stack([optical_density_reference(im, c)[0] for im, c in zip(watcher.images, watcher.i0, strict=True)])
    pcc = pearson_maps(ods, REFS.interpolate(ENERGIES))
    mask = particle_mask(np.nanmean(ods, axis=0))
    phase, _, _ = assign_phases(pcc, mask, DEFAULT_AMBIGUITY, backend="numpy")
    assert np.mean(phase == snap.arrays["phase"]) > 0.99
    assert sample.accuracy(snap.arrays["phase"]) > 0.9
    # the fraction lines end at the final fractions
    fr = phase_fractions(snap.arrays["phase"], snap.arrays["mask"].astype(bool),
                         snap.arrays["ambiguous"].astype(bool), len(REFS.phases))
    expected = {**fr.as_dict(REFS.phases), "ambiguous": fr.ambiguous}
    assert last_points(live) == pytest.approx(expected)
    assert [n for n, _, _ in live.fractions] == list(range(2, len(ENERGIES) + 1))
    title = live.figure.get_suptitle()
    assert "SOC 2" in title and "complete" in title and f"{len(ENERGIES)}/{len(ENERGIES)}" in title
    assert live.figure.canvas.buffer_rgba().shape[2] == 4  # rendered by Agg


@pytest.fixture(scope="module")
def worker(tiled_server, tiled_client):
    with start_proxy() as proxy, ServeProcess(proxy.out_address, tiled_server.uri,
                                              args=("--backend", "numpy", "--no-refine", "--update-every", "2",
                                                    "--partial-budget", "none")):
        with DocumentPublisher(proxy.in_address) as publisher:
            assert publisher.wait_for_subscriber(10)
            yield publisher, tiled_client


@pytest.mark.parametrize("streaming", [True, False], ids=["subscription", "polling"])
def test_remote_view_follows_the_workers_result_in_tiled(worker, streaming):
    publisher, client = worker
    RE = RunEngine({})
    RE.subscribe(publisher)
    live = LivePhaseMap(client, figure=agg_figure(), streaming=streaming, poll_seconds=0.2, display=False)
    RE.subscribe(live)
    uid, sample = scan(RE, 1.0, seed=11)
    modes = live.mode
    live.close()

    res = client["phasestream"][uid]
    md = res.metadata
    assert md["status"] == "complete", md["errors"]
    snap = live.snapshot
    assert snap.final and snap.status == "complete" and snap.n_energies_seen == len(ENERGIES)
    assert modes == ("streaming" if streaming else "polling")
    # the figure's final data is the paper's display of the arrays in Tiled, its lines the metadata
    np.testing.assert_array_equal(shown_rgb(live), phase_rgb(res["phase"].read(), res["reliability"].read(),
                                                             res["ambiguous"].read()))
    assert last_points(live) == pytest.approx({**md["phase_fractions"], "ambiguous": md["ambiguous_fraction"]})
    assert sample.accuracy(res["phase"].read()) > 0.9
    assert "complete" in live.figure.get_suptitle()


def test_a_start_uid_that_is_no_run_uid_never_names_a_tiled_key(tiled_client):
    live = LivePhaseMap(tiled_client, figure=agg_figure(), display=False)
    for bad in ("..", ".", "a/b", "", None):
        live("start", {"uid": bad, "time": 0.0, "num_points": 3})
        assert live.mode == "waiting" and live._follower is None
        assert "refused" in live.figure.get_suptitle()
    live("start", {"uid": "plain-run", "time": 0.0})  # no phasestream block: no worker result to follow
    assert live._follower is None and "not a phasestream run" in live.figure.get_suptitle()
    local = LivePhaseMap(figure=agg_figure(), display=False)
    local("start", {"uid": "plain-run", "time": 0.0})  # in-process: refused like the worker refuses it
    local.close()
    assert "not analysed" in local.figure.get_suptitle()
    with pytest.raises(ValueError, match="run uid"):
        ResultFollower(tiled_client, "..", lambda s: None)


@pytest.mark.parametrize("field", [None, 1])
def test_in_process_view_of_a_grid_scan_shows_the_chosen_field(field):
    """A run imaged at several positions has one result per field (docs/contract.md, "Fields"): the first is drawn,
    or the one asked for."""
    RE = RunEngine({})
    live = LivePhaseMap(figure=agg_figure(), backend="numpy", display=False, **({} if field is None else
                                                                              {"field": field}))
    RE.subscribe(live)
    energy, x = make_energy(), SynAxis(name="sample_x")
    samples = [make_sample(SHAPE, state_of_charge=soc, seed=seed, n_particles=2) for seed, soc in ((4, 1.2), (5, 2.6))]
    det = MosaicDetector(samples, [0.0, 1.0], x, energy, i0=8000.0, noise=False)
    md = {"phasestream": {"references": "nvpf-synthetic", "image_key": det.image_key, "energy_key": "energy"}}
    (uid,) = RE(list_grid_scan([det], energy, ENERGIES, x, [0.0, 1.0], md=md))
    live.close()
    snap = live.snapshot
    assert snap.run_uid == uid and snap.status == "complete" and snap.n_energies_seen == len(ENERGIES)
    index = field or 0
    assert snap.metadata["field"] == {"index": index, "count": 2, "positions": {"sample_x": float(index)}}
    assert samples[index].accuracy(snap.arrays["phase"]) > 0.9
    with pytest.raises(ValueError, match="field index"):
        LivePhaseMap(figure=agg_figure(), backend="numpy", display=False, field=-1)


def test_follower_follows_the_chosen_field_of_a_run(tiled_client):
    uid = str(uuid.uuid4())
    for index in (0, 1):
        ResultWriter(tiled_client, uid, key=field_key(uid, index), shape=(4, 4), phases=["A", "B"],
                     metadata={"run_uid": uid, "field": {"index": index, "count": 2, "positions": {"x": index}}})
    seen: list = []
    follower = ResultFollower(tiled_client, uid, seen.append, streaming=False, poll_seconds=0.05, field=1).start()
    try:
        deadline = time.monotonic() + 30
        while not seen:
            assert time.monotonic() < deadline, "the follower never read the field's result"
            time.sleep(0.05)
    finally:
        follower.stop()
    assert seen[0].run_uid == uid and seen[0].metadata["field"]["index"] == 1
    with pytest.raises(ValueError, match="field index"):
        ResultFollower(tiled_client, uid, seen.append, field=MAX_FIELDS)


def test_a_final_result_with_a_count_that_is_no_number_ends_the_follower(tiled_client):
    """``n_energies_seen: "seven"`` (hand-edited) raised in every read, which the follower retried for good: it
    never saw the final status and ``join()`` never returned."""
    uid = str(uuid.uuid4())
    writer = ResultWriter(tiled_client, uid, shape=(4, 4), phases=["A", "B"])
    writer.update_metadata(status="complete", n_energies_seen="seven")
    seen: list = []
    follower = ResultFollower(tiled_client, uid, seen.append, streaming=False, poll_seconds=0.05).start()
    try:
        assert follower.join(30), "the follower never ended"
    finally:
        follower.stop()
    assert seen[-1].status == "complete" and seen[-1].n_energies_seen == 0 and seen[-1].arrays == {}


HOSTILE_NAMES = ["Na$_x$V2(PO4)2F3", "cell 3 ($\\bad cost$)", "price $5 vs $6 ^_^", "$\\frac{1}{$"]


def hostile_references() -> ReferenceSet:
    """nvpf-synthetic with phase names matplotlib would parse as mathtext (the last one it cannot parse)."""
    names = ("Na$_3$", "$\\bad$", "2$", "_hidden", "x" * 300)
    return ReferenceSet(energies=REFS.energies, phases=names, spectra=REFS.spectra, name="hostile-names")


def scan_named(live: LivePhaseMap, name: str, *, references=REFS) -> str:
    """A real scan of a sample called ``name``, the view subscribed; the scan's uid (the RunEngine raises when a
    callback does)."""
    RE = RunEngine({})
    RE.subscribe(live)
    sample = make_sample(SHAPE, state_of_charge=2.0, seed=3, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=8000.0, seed=3)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample={"name": name, "state_of_charge": 2.0},
                                  references=references, i0_key=det.i0_key))
    live.close()
    return uid


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_sample_name_with_dollars_is_drawn_literally_and_the_scan_completes(name):
    """A name with ``$`` was parsed as mathtext: rendered as math, or (one matplotlib cannot parse) raised in the
    callback, which aborted the user's scan."""
    live = LivePhaseMap(figure=agg_figure(), backend="numpy", display=False)
    uid = scan_named(live, name)
    assert live.snapshot.run_uid == uid and live.snapshot.status == "complete"
    title = live.figure._suptitle
    assert title.get_text().startswith(name + "  |  SOC 2  |  complete")
    assert not title.get_parse_math() and not title.get_usetex()
    live.figure.canvas.draw()  # renders


def test_phase_names_in_the_legends_are_drawn_literally_and_capped():
    refs = hostile_references()
    live = LivePhaseMap(figure=agg_figure(), backend="numpy", display=False, references=refs)
    scan_named(live, "x" * 5000, references=refs)
    assert live.snapshot.status == "complete"
    title = live.figure.get_suptitle().split("  |  ")[0]
    assert len(title) <= MAX_LABEL_CHARS and title.startswith("x" * (MAX_LABEL_CHARS - 1))
    capped = [p if len(p) <= MAX_LABEL_CHARS else p[:MAX_LABEL_CHARS - 1] + "…" for p in refs.phases]
    for ax, extra in ((live.figure.axes[0], "ambiguous"), (live.figure.axes[1], "ambiguous")):
        texts = ax.get_legend().get_texts()
        assert [t.get_text() for t in texts] == [*capped, extra]
        assert not any(t.get_parse_math() or t.get_usetex() for t in texts)
    live.figure.canvas.draw()


def test_a_drawing_failure_is_logged_and_never_aborts_the_scan(caplog):
    figure = agg_figure()

    def broken_draw(*args, **kwargs):
        raise RuntimeError("the display went away")

    figure.canvas.draw = broken_draw
    live = LivePhaseMap(figure=figure, backend="numpy", display=False)
    uid = scan_named(live, "P1")
    assert live.snapshot.run_uid == uid and live.snapshot.status == "complete"
    assert live.snapshot.n_energies_seen == len(ENERGIES)
    failures = [r for r in caplog.records if r.name == "phasestream.app.notebook" and r.levelname == "ERROR"]
    assert failures and "the display went away" in failures[0].exc_text


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_result_figures_of_hostile_names_are_written(tmp_path, name):
    refs = hostile_references()
    k, shape = len(refs.phases), (8, 8)
    rng = np.random.default_rng(0)
    phase = rng.integers(0, k, shape)
    paths = save_result_figures(tmp_path, name="run", phases=list(refs.phases), pcc=rng.uniform(0.9, 1.0, (k, *shape)),
                                phase=phase, reliability=rng.uniform(0, 0.1, shape), ambiguous=np.zeros(shape, bool),
                                fractions={p: 1 / k for p in refs.phases}, title=name)
    assert [p.name for p in paths] == ["run_phase.png", "run_pcc.png", "run_fractions.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
