"""Helpers shared by the test modules (importable: tests/ is on pytest's pythonpath)."""

import sys
import time

import numpy as np


def keep_absl_off_captured_streams() -> None:
    """Make absl's logging handler hold the process's own stderr, which it never closes.

    absl (imported by TensorFlow) creates its handler with the ``sys.stderr`` of the moment it is imported,
    and closes that stream when logging's handlers are shut down, unless it is the ``sys.stderr`` of that
    later moment. Every in-process Tiled server shuts all handlers down (uvicorn's
    ``logging.config.dictConfig``). Under pytest, absl first imported inside a test held pytest's capture
    file; a later test that captured with ``capsys`` and started a Tiled server closed it, and pytest died
    ("I/O operation on closed file", "lost sys.stderr"). tests/test_harness.py runs that sequence.
    """
    try:
        import absl.logging
    except ImportError:  # installed without the models extra: no TensorFlow, no absl
        return
    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


def normalize(obj: object) -> object:
    """Documents as comparable values: tuples as lists, arrays and NumPy scalars with their dtype."""
    if isinstance(obj, dict):
        return {key: normalize(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [normalize(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.generic):
        return ("scalar", obj.dtype.str, obj.item())
    return obj


def recorded_scan(client, energies, *, shape, seed: int, state_of_charge: float = 2.0, i0: float = 6000.0,
                  n_particles: int = 2):
    """A simulated energy scan whose raw run TiledWriter stores in ``client``; its documents (to publish
    later, e.g. paced) and its sample (the truth)."""
    from bluesky import RunEngine

    from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
    from phasestream.store.tiled import raw_run_writer

    sample = make_sample(shape, state_of_charge=state_of_charge, seed=seed, n_particles=n_particles)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=i0, seed=seed)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    docs: list[tuple[str, dict]] = []
    RE(energy_stack_scan([det], energy, energies, sample=sample, i0_key=det.i0_key),
       lambda name, doc: docs.append((name, doc)))
    return docs, sample


def analysed_scan(client, energies, *, shape, seed: int, state_of_charge: float = 2.0, i0: float = 2000.0,
                  raw: bool = False) -> str:
    """A simulated energy scan analysed live into its result in ``client`` (its raw run too with ``raw``); its
    uid."""
    from bluesky import RunEngine

    from phasestream.callbacks.phase_map import PhaseMapCallback
    from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
    from phasestream.store.tiled import raw_run_writer

    RE = RunEngine({})
    if raw:
        RE.subscribe(raw_run_writer(client))
    cb = PhaseMapCallback(client, backend="numba")
    RE.subscribe(cb)
    sample = make_sample(shape, state_of_charge=state_of_charge, seed=seed, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, name="det", i0=i0, seed=seed)
    (uid,) = RE(energy_stack_scan([det], energy, energies, sample=sample, i0_key=det.i0_key))
    assert cb.flush(60)
    cb.close()
    return uid


def frame_run(client, images, md: dict) -> str:
    """A raw run of ``images`` (one frame per event, data key ``cam_image``) that a RunEngine takes from an
    ophyd sim signal and TiledWriter stores in ``client``; ``md`` is added to its start document."""
    import bluesky.plan_stubs as bps
    from bluesky import RunEngine
    from bluesky.preprocessors import run_decorator
    from ophyd.sim import SynSignal

    from phasestream.store.tiled import raw_run_writer

    current = {"i": 0}
    det = SynSignal(func=lambda: images[current["i"]], name="cam_image")

    @run_decorator(md={**md, "phasestream": {"image_key": "cam_image"}})
    def scan():
        for i in range(len(images)):
            current["i"] = i
            yield from bps.trigger_and_read([det])

    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    (uid,) = RE(scan())
    return uid


def wait(predicate, timeout: float, what: str, interval: float = 0.05):
    """``predicate()``'s first truthy value, asked every ``interval`` s; AssertionError naming ``what`` after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def feed_losing_first_event(live, docs, uid: str) -> None:
    """Feed a run's documents to a ``LiveService`` as if 0MQ lost its first event (the gap reported as the
    worker reports it), then wait for the live result: ``partial``."""
    lost = next(i for i, (name, _) in enumerate(docs) if name == "event")
    for i, (name, doc) in enumerate(docs):
        if i == lost:
            live.run_incomplete(uid, "message gap: 1 document lost")
            continue
        live(name, doc)
    live.callback.flush(30)
    assert live.callback.results[uid].status == "partial"
