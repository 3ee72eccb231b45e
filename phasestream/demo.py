"""The demo job: simulated energy scans at several states of charge, through the kernels.

For each state of charge a simulated field of particles is scanned with a real bluesky
RunEngine, ophyd sim devices and :func:`~phasestream.sim.plans.energy_stack_scan` at the
energies :func:`~phasestream.references.select_energies` picks. A small in-process document
consumer turns each image into OD and updates a :class:`PearsonAccumulator`; at stop the phase
map, reliability and ambiguity are computed and compared with the simulation's ground truth.
(The live Tiled-writing callback replaces this consumer; this module keeps the demo's
orchestration and its report.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from bluesky import RunEngine

from phasestream.kernels import (
    PearsonAccumulator,
    assign_phases,
    optical_density,
    particle_mask,
    phase_fractions,
    resolve_backend,
)
from phasestream.references import ReferenceSet, load_references, select_energies
from phasestream.sim.devices import TransmissionDetector, make_energy
from phasestream.sim.plans import energy_stack_scan
from phasestream.sim.samples import make_sample

__all__ = ["DEMO_STATES", "DemoConfig", "RunSummary", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_STATES = (3.0, 2.4, 2.0, 1.0, 0.8)


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

    def validate(self) -> DemoConfig:
        if not self.states:
            raise ValueError("give at least one state of charge")
        if min(self.shape) < 32:
            raise ValueError(f"image shape {self.shape} too small: use at least 32 x 32 pixels")
        if self.dose <= 0:
            raise ValueError(f"dose (open-beam counts per pixel) must be positive, got {self.dose}")
        if self.n_energies < 2:
            raise ValueError(f"need at least 2 discriminating energies, got {self.n_energies}")
        self.backend = resolve_backend(self.backend)
        return self


@dataclass
class RunSummary:
    """What the demo reports for one scan."""

    state_of_charge: float
    uid: str
    phases: tuple[str, ...]
    fractions: np.ndarray
    true_fractions: np.ndarray
    ambiguous_fraction: float
    mean_reliability: float
    accuracy: float
    seconds: float
    extras: dict = field(default_factory=dict)


class _StackToPhases:
    """Minimal document consumer: inline images -> OD -> PearsonAccumulator (one run)."""

    def __init__(self, references: ReferenceSet, backend: str):
        self.references = references
        self.backend = backend
        self.acc: PearsonAccumulator | None = None
        self.ods: list[np.ndarray] = []
        self.primary: str | None = None
        self.md: dict = {}

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            self.md = doc["phasestream"]
        elif name == "descriptor" and doc.get("name") == "primary":
            self.primary = doc["uid"]
        elif name == "event" and doc["descriptor"] == self.primary:
            image = np.asarray(doc["data"][self.md["image_key"]])
            energy = float(doc["data"][self.md["energy_key"]])
            i0 = doc["data"].get(self.md.get("i0_key")) if self.md.get("i0_key") else None
            od, valid = optical_density(image, i0, backend=self.backend)
            if self.acc is None:
                self.acc = PearsonAccumulator(image.shape, len(self.references.phases), backend=self.backend)
            self.acc.update(od, self.references.interpolate(energy)[:, 0], valid)
            self.ods.append(np.asarray(od))


def run_demo(config: DemoConfig | None = None, *, progress=None) -> list[RunSummary]:
    """Scan one simulated sample per state of charge and map its phases.

    Parameters
    ----------
    config : DemoConfig; defaults give 5 states of charge, 256 x 256 pixels, 13 energies
    progress : optional callable receiving each :class:`RunSummary` as it completes

    Returns
    -------
    one :class:`RunSummary` per state of charge
    """
    cfg = (config or DemoConfig()).validate()
    refs = load_references(cfg.references)
    energies = select_energies(refs, cfg.n_energies)
    RE = RunEngine({}, call_returns_result=True)
    summaries = []
    for i, soc in enumerate(cfg.states):
        sample = make_sample(cfg.shape, state_of_charge=soc, references=refs, n_particles=cfg.n_particles,
                             seed=cfg.seed + i)
        energy = make_energy()
        det = TransmissionDetector(sample, energy, name="det", i0=cfg.dose, seed=cfg.seed + 100 + i)
        consumer = _StackToPhases(refs, cfg.backend)
        t0 = time.perf_counter()
        result = RE(energy_stack_scan([det], energy, energies, sample=sample,
                                      references=cfg.references, i0_key=det.i0_key), consumer)
        pcc = consumer.acc.maps()
        mask = particle_mask(np.stack(consumer.ods))
        phase, reliability, ambiguous = assign_phases(pcc, mask)
        fr = phase_fractions(phase, mask, ambiguous, len(refs.phases))
        summary = RunSummary(
            state_of_charge=soc,
            uid=result.run_start_uids[0],
            phases=refs.phases,
            fractions=fr.fractions,
            true_fractions=sample.true_fractions(),
            ambiguous_fraction=fr.ambiguous,
            mean_reliability=float(np.nanmean(reliability[mask])) if mask.any() else float("nan"),
            accuracy=sample.accuracy(phase),
            seconds=time.perf_counter() - t0,
            extras={"n_energies": len(energies), "mask_pixels": int(mask.sum())},
        )
        summaries.append(summary)
        if progress is not None:
            progress(summary)
    return summaries
