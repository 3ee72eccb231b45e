"""The demo job: simulated energy scans at five states of charge through the whole live stack.

Topology (``topology="zmq"``, the default), as at a beamline:

    RunEngine (this process) --DocumentPublisher--> 0MQ proxy (subprocess)
        --> ``phasestream serve`` worker (subprocess: PhaseMapCallback) --> Tiled
    RunEngine --TiledWriter--> Tiled (raw runs)

Tiled is an embedded server over ``<out_dir>/tiled`` (or ``--tiled URI``), so the results can be
queried after the demo with ``phasestream query --catalog <out_dir>/tiled --soc 2.0``. For each
state of charge a simulated field of particles is scanned with ophyd sim devices at the energies
:func:`~phasestream.references.select_energies` picks; the demo waits for the worker's final
result in Tiled, compares the phase map with the simulation's ground truth and writes PNG figures.
``topology="inprocess"`` subscribes the callback to the RunEngine directly (no 0MQ).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bluesky import RunEngine

from phasestream.kernels import resolve_backend
from phasestream.references import load_references, select_energies
from phasestream.sim.devices import TransmissionDetector, make_energy
from phasestream.sim.plans import energy_stack_scan
from phasestream.sim.samples import make_sample
from phasestream.store.catalog import wait_for_refinement, wait_for_result

__all__ = ["DEMO_STATES", "DemoConfig", "RunSummary", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_STATES = (3.0, 2.4, 2.0, 1.0, 0.8)
TOPOLOGIES = ("zmq", "inprocess")


@dataclass
class DemoConfig:
    """Demo parameters (validated once, in :meth:`validate`)."""

    states: tuple[float, ...] = DEMO_STATES
    shape: tuple[int, int] = (256, 256)
    n_energies: int = 12
    dose: float = 5000.0
    n_particles: int = 3
    seed: int = 0
    backend: str | None = None
    references: str = "nvpf-synthetic"
    topology: str = "zmq"
    out_dir: str | Path = "demo-output"
    tiled: str | None = None
    figures: bool = True
    refine: bool = True
    strategy: str = "auto"
    result_timeout: float = 120.0
    view_port: int | None = 8010  # the live view (phasestream view) while the demo runs; None: none, 0: any port
    tiled_uri: str | None = field(default=None, init=False, repr=False)  # set while the demo runs

    def validate(self) -> DemoConfig:
        if not self.states:
            raise ValueError("give at least one state of charge")
        if min(self.shape) < 32:
            raise ValueError(f"image shape {self.shape} too small: use at least 32 x 32 pixels")
        if self.dose <= 0:
            raise ValueError(f"dose (open-beam counts per pixel) must be positive, got {self.dose}")
        if self.n_energies < 2:
            raise ValueError(f"need at least 2 discriminating energies, got {self.n_energies}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        self.backend = resolve_backend(self.backend)
        self.out_dir = Path(self.out_dir)
        return self

    @property
    def catalog(self) -> Path:
        return Path(self.out_dir) / "tiled"


@dataclass
class RunSummary:
    """What the demo reports for one scan (read back from Tiled)."""

    state_of_charge: float
    uid: str
    status: str
    phases: tuple[str, ...]
    fractions: np.ndarray
    true_fractions: np.ndarray
    ambiguous_fraction: float
    mean_reliability: float
    accuracy: float
    latency_s: float | None
    seconds: float
    figures: list[Path] = field(default_factory=list)
    refined_fractions: np.ndarray | None = None
    refined_accuracy: float | None = None
    refinement: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-able summary (fractions as ``{phase: fraction}``)."""
        return {
            "state_of_charge": self.state_of_charge,
            "uid": self.uid,
            "status": self.status,
            "phase_fractions": dict(zip(self.phases, map(float, self.fractions), strict=True)),
            "true_fractions": dict(zip(self.phases, map(float, self.true_fractions), strict=True)),
            "ambiguous_fraction": self.ambiguous_fraction,
            "mean_reliability": self.mean_reliability,
            "accuracy": self.accuracy,
            "latency_s": self.latency_s,
            "seconds": self.seconds,
            "refined_fractions": None if self.refined_fractions is None
            else dict(zip(self.phases, map(float, self.refined_fractions), strict=True)),
            "refined_accuracy": self.refined_accuracy,
            "refinement": self.refinement,
            "figures": [str(p) for p in self.figures],
        }


def run_demo(config: DemoConfig | None = None, *, progress=None, on_view=None, hold=None) -> list[RunSummary]:
    """Scan one simulated sample per state of charge through the live stack; summaries read from Tiled.

    Parameters
    ----------
    config : DemoConfig; defaults give 5 states of charge, 256 x 256 pixels, 13 energies,
        0MQ topology and an embedded Tiled over ``demo-output/tiled``
    progress : optional callable receiving each :class:`RunSummary` as it completes
    on_view : optional callable receiving the live view's URL once it serves (``view_port`` not None)
    hold : optional callable called after the scans, before the view and Tiled stop (``demo --view``:
        it returns on Ctrl-C)
    """
    from phasestream.app.figures import save_result_figures
    from phasestream.store.tiled import raw_run_writer, tiled_session

    cfg = (config or DemoConfig()).validate()
    refs = load_references(cfg.references)
    energies = select_energies(refs, cfg.n_energies, method="score")  # the pretrained GMVAE's energies
    summaries = []
    with contextlib.ExitStack() as stack:
        if not cfg.tiled:
            shutil.rmtree(cfg.catalog, ignore_errors=True)  # the demo's own catalog: start clean
        client, uri = stack.enter_context(tiled_session(cfg.tiled, directory=cfg.catalog))
        cfg.tiled_uri = uri
        if cfg.view_port is not None:
            view = stack.enter_context(_start_view(client, cfg.view_port))
            if on_view is not None:
                on_view(view.url)
        RE = RunEngine({})
        RE.subscribe(raw_run_writer(client))
        refine_options = None
        if cfg.refine:
            from phasestream.app.process import ModelServerProcess
            from phasestream.jobs.refine import DEFAULT_MODEL, RefineOptions

            models = stack.enter_context(ModelServerProcess(args=("--preload", DEFAULT_MODEL)))
            refine_options = RefineOptions(address=models.address, strategy=cfg.strategy).validate()
        if cfg.topology == "zmq":
            from phasestream.app.live import ServeProcess
            from phasestream.transport.proxy import start_proxy
            from phasestream.transport.wire import DocumentPublisher

            proxy = stack.enter_context(start_proxy())
            refine_args = ("--models", refine_options.address, "--strategy", cfg.strategy) if cfg.refine \
                else ("--no-refine",)
            stack.enter_context(ServeProcess(proxy.out_address, uri,
                                             args=("--backend", cfg.backend, "--update-every", "4", *refine_args)))
            publisher = stack.enter_context(DocumentPublisher(proxy.in_address))
            if not publisher.wait_for_subscriber(10):
                raise RuntimeError("the 0MQ proxy did not subscribe to the RunEngine's publisher")
            RE.subscribe(publisher)
        else:
            from phasestream.callbacks.phase_map import PhaseMapCallback

            callback = PhaseMapCallback(client, backend=cfg.backend)
            stack.callback(callback.close)
            RE.subscribe(callback)
        for i, soc in enumerate(cfg.states):
            sample = make_sample(cfg.shape, state_of_charge=soc, references=refs, n_particles=cfg.n_particles,
                                 seed=cfg.seed + i)
            energy = make_energy()
            det = TransmissionDetector(sample, energy, name="det", i0=cfg.dose, seed=cfg.seed + 100 + i)
            t0 = time.perf_counter()
            (uid,) = RE(energy_stack_scan([det], energy, energies, sample=sample, references=cfg.references,
                                          i0_key=det.i0_key))
            node = wait_for_result(client, uid, timeout=cfg.result_timeout)
            if refine_options is not None:
                if cfg.topology == "inprocess":  # the post-scan job, here in process; the worker does it itself
                    from phasestream.jobs.refine import refine_result

                    callback.flush(60.0)
                    refine_result(client, uid, refine_options)
                node = wait_for_refinement(client, uid, timeout=cfg.result_timeout)
            md = node.metadata
            arrays = {k: node[k].read() for k in ("pcc", "phase", "reliability", "ambiguous", "mask")}
            mask = arrays["mask"].astype(bool)
            rel = arrays["reliability"][mask]
            fractions = np.array([md["phase_fractions"].get(p, 0.0) for p in refs.phases])
            summary = RunSummary(
                state_of_charge=soc,
                uid=uid,
                status=md["status"],
                phases=refs.phases,
                fractions=fractions,
                true_fractions=sample.true_fractions(),
                ambiguous_fraction=md.get("ambiguous_fraction") or 0.0,
                mean_reliability=float(np.nanmean(rel)) if rel.size else float("nan"),
                accuracy=sample.accuracy(arrays["phase"]),
                latency_s=(md.get("timings") or {}).get("last_image_to_result_s"),
                seconds=time.perf_counter() - t0,
                refinement=dict(md.get("refinement") or {}),
            )
            if summary.refinement.get("status") == "complete":
                summary.refined_fractions = np.array([md["refined_fractions"].get(p, 0.0) for p in refs.phases])
                summary.refined_accuracy = sample.accuracy(node["refined_phase"].read())
            if cfg.figures:
                summary.figures = save_result_figures(
                    cfg.out_dir, name=f"soc{soc:.1f}_{uid[:8]}", phases=refs.phases, pcc=arrays["pcc"],
                    phase=arrays["phase"], reliability=arrays["reliability"], ambiguous=arrays["ambiguous"],
                    fractions=md["phase_fractions"], mask=mask,
                    title=f"Na{soc:g} (simulated), scan {md.get('scan_id')}")
            summaries.append(summary)
            if progress is not None:
                progress(summary)
        (Path(cfg.out_dir) / "summary.json").write_text(json.dumps([s.as_dict() for s in summaries], indent=2))
        if hold is not None:
            hold()
    return summaries


def _start_view(client, port: int):
    """The live view on 127.0.0.1:``port``, or on a free port when that one is taken."""
    from phasestream.app.view import ViewServer

    try:
        return ViewServer(client, port=port)
    except RuntimeError:
        if port == 0:
            raise
        logger.warning("port %d is taken: the live view listens on a free port instead", port)
        return ViewServer(client, port=0)
