"""A live phase-map view for IPython and Jupyter: :class:`LivePhaseMap`, a bluesky callback.

``RE.subscribe(LivePhaseMap())`` shows, in a matplotlib figure that updates during the scan, the
phase map in the paper's display (phase colour, reliability as brightness, ambiguous pixels
grey; :func:`phasestream.app.figures.phase_rgb`) and the phase fractions against the number of
energies seen, as they converge. The title names the sample, its state of charge, the result's
status and the energies seen of those expected.

Two sources of the maps:

- in-process (default): the documents go to a :class:`~phasestream.callbacks.phase_map.PhaseMapCallback`
  without a Tiled client, the worker's own analysis (same validation, OD, Pearson accumulator,
  mask, phase assignment and fractions), with partial maps after every image;
- remote, ``LivePhaseMap(tiled=client)``: the maps come from the result a ``phasestream serve``
  worker elsewhere writes to ``<root>/<run uid>`` in Tiled, followed by a
  :class:`~phasestream.store.follow.ResultFollower` (Tiled's streaming subscription when the
  server has a streaming cache, else polling the metadata).

Where drawing happens. Matplotlib figures are not thread-safe, and GUI canvases must be drawn on
their GUI thread. The figure is drawn only (a) on the thread that delivers the documents, (b) in
:meth:`LivePhaseMap.refresh` / :meth:`LivePhaseMap.wait`, called by the user, always under one
lock. The follower thread of the remote mode only reads Tiled and leaves the newest state for the
next document (or the stop) to draw; at the stop the callback waits up to ``final_timeout`` s for
the worker's final result. With a Qt backend the class, a bluesky ``QtAwareCallback``, moves the
documents to the Qt thread itself; with Agg, inline and ipympl figures the RunEngine's thread
draws. A plain figure in a Jupyter kernel (no pyplot manager) is shown through an
``IPython.display`` handle, updated in place.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.callbacks.mpl_plotting import QtAwareCallback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from phasestream.app.figures import AMBIGUOUS_GREY, PHASE_COLORS, label_text, phase_rgb, show_literally
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.contract import InvalidIdentifierError, Status, check_run_uid
from phasestream.contract.fields import check_field_index, field_key
from phasestream.kernels import DEFAULT_AMBIGUITY
from phasestream.references import ReferenceSet
from phasestream.store.follow import ResultFollower, ResultSnapshot

__all__ = ["LivePhaseMap"]

logger = logging.getLogger(__name__)


class LivePhaseMap(QtAwareCallback):
    """Live phase map and phase fractions of the current run, in a matplotlib figure.

    Parameters
    ----------
    tiled : a Tiled client: follow the result a worker elsewhere writes (remote mode). None:
        compute the maps here from the documents (in-process mode)
    figure : the figure to draw into (``plt.figure()`` for an interactive backend); default a new
        ``matplotlib.figure.Figure`` on an Agg canvas
    root : results container in Tiled (remote mode; ``serve --root``)
    references, reference_folders, asset_folders, backend, ambiguity, mask_threshold : the analysis options of
        :class:`~phasestream.callbacks.phase_map.PhaseMapCallback` (in-process mode)
    update_every : in-process, new maps after this many images (each costs a full phase
        assignment of the image)
    poll_seconds, streaming : remote, how the result is followed (:class:`ResultFollower`)
    final_timeout : remote, seconds the stop document waits for the worker's final result before
        the RunEngine goes on (0: do not wait; :meth:`wait` or :meth:`refresh` draw it later)
    display : show the figure through an ``IPython.display`` handle updated in place; default:
        when running in an IPython kernel and the figure has no pyplot manager (a plain
        ``Figure``, which nothing else would show)
    use_teleporter : bluesky's Qt teleporter (default: when the matplotlib backend is Qt)
    field : for a run imaged at several positions (one result per field, docs/contract.md, "Fields"),
        the field drawn (0-based index; default the first); a run at one position ignores it

    Attributes
    ----------
    snapshot : the :class:`ResultSnapshot` drawn last
    fractions : ``[(n energies, {phase: fraction}, ambiguous fraction)]`` drawn so far in this run
    redraws : the number of energies seen at each redraw of this run
    """

    def __init__(self, tiled=None, *, figure: Figure | None = None, root: str = "phasestream",
                 references: str | ReferenceSet | None = None, reference_folders: Sequence[str | Path] = (),
                 asset_folders: Sequence[str | Path] = (), backend: str | None = "auto",
                 ambiguity: float = DEFAULT_AMBIGUITY,
                 mask_threshold: float | None = None, update_every: int = 1, poll_seconds: float = 1.0,
                 streaming: bool = True, final_timeout: float = 10.0, display: bool | None = None,
                 use_teleporter: bool | None = None, field: int = 0):
        super().__init__(use_teleporter=use_teleporter)
        self.field = check_field_index(field)  # checked here, not at the first scan
        self.tiled = tiled
        self.root = root
        self.poll_seconds = float(poll_seconds)
        self.streaming = bool(streaming)
        self.final_timeout = float(final_timeout)
        if figure is None:
            figure = Figure(figsize=(10, 4.2), layout="constrained")
            FigureCanvasAgg(figure)
        self.figure = figure
        self.analysis = None
        if tiled is None:
            # the worker's analysis, results kept in memory: partial maps after every update_every images
            self.analysis = PhaseMapCallback(
                None, references=references, reference_folders=reference_folders, asset_folders=asset_folders,
                backend=backend,
                ambiguity=ambiguity, mask_threshold=mask_threshold, update_every=update_every,
                update_seconds=float("inf"), min_update_seconds=0.0, partial_budget=None, write_od=False,
                kernel_threads=None, keep_arrays=True, max_results=4)
        self._display = _in_kernel() and figure.canvas.manager is None if display is None else bool(display)
        self._handle = None
        self._lock = threading.RLock()
        self._follower: ResultFollower | None = None
        self._pending: ResultSnapshot | None = None
        self._start: dict = {}
        self._uid: str | None = None
        self.snapshot: ResultSnapshot | None = None
        self.fractions: list[tuple[int, dict[str, float], float | None]] = []
        self.redraws: list[int] = []
        self._map_ax = self.figure.add_subplot(1, 2, 1)
        self._fraction_ax = self.figure.add_subplot(1, 2, 2)
        self._image = None
        self._lines: dict[str, Any] = {}
        self._phase_names: list[str] = []

    @property
    def mode(self) -> str:
        """``in-process``, or how the remote result is followed (``waiting``, ``streaming``, ``polling``)."""
        if self.tiled is None:
            return "in-process"
        return self._follower.mode if self._follower is not None else "waiting"

    # -- documents -----------------------------------------------------------------------

    def start(self, doc: dict) -> None:
        self._stop_following()
        with self._lock:
            self._start, self._pending, self.snapshot = doc, None, None
            self.fractions, self.redraws, self._uid, self._phase_names = [], [], None, []
            self._reset_axes()
        try:
            self._uid = check_run_uid(doc.get("uid"))
        except InvalidIdentifierError as exc:
            logger.error("live phase map: start document refused: %s", exc)
            self._draw_title("start document refused")
            return
        if self.analysis is None and "phasestream" not in doc:
            self._uid = None  # a worker analyses only runs that ask for it: nothing will come to follow
            self._draw_title("not a phasestream run")
            return
        if self.analysis is not None:
            self.analysis("start", doc)
            analysis = self.analysis.active.get(self._uid)
            if analysis is None:  # refused (see the log) or not asking for phase maps
                self._uid = None
                self._draw_title("not analysed")
                return
            self._phase_names = list(analysis.references.phases)
        else:
            self._follower = ResultFollower(self.tiled, self._uid, self._received, root=self.root,
                                            poll_seconds=self.poll_seconds, streaming=self.streaming,
                                            field=self.field).start()
        self._draw_title(Status.RUNNING.value)

    def descriptor(self, doc: dict) -> None:
        self._forward("descriptor", doc)

    def event(self, doc: dict) -> None:
        self._forward("event", doc)

    def event_page(self, doc: dict) -> None:
        self._forward("event_page", doc)

    def resource(self, doc: dict) -> None:
        self._forward("resource", doc)

    def datum(self, doc: dict) -> None:
        self._forward("datum", doc)

    def datum_page(self, doc: dict) -> None:
        self._forward("datum_page", doc)

    def stream_resource(self, doc: dict) -> None:
        self._forward("stream_resource", doc)

    def stream_datum(self, doc: dict) -> None:
        self._forward("stream_datum", doc)

    def stop(self, doc: dict) -> None:
        if self._uid is None or doc.get("run_start") != self._uid:
            return
        if self.analysis is not None:
            self.analysis("stop", doc)
            self.analysis.flush(60.0)  # the final status is set on the analysis' sink thread
            self._draw_in_process()
        elif self._follower is not None and self.final_timeout > 0:
            self._follower.join(self.final_timeout)
            self.refresh()

    def _forward(self, name: str, doc: dict) -> None:
        if self._uid is None:
            return
        if self.analysis is not None:
            self.analysis(name, doc)
            if name in ("event", "event_page"):
                self._draw_in_process()
        else:
            self.refresh()

    # -- the two sources --------------------------------------------------------------------

    def _draw_in_process(self) -> None:
        # a run imaged at several positions: the chosen field (docs/contract.md, "Fields")
        result = self.analysis.results.get(self._uid) or self.analysis.results.get(field_key(self._uid, self.field))
        if result is None:
            return
        n = int(result.metadata.get("n_energies_seen") or 0)
        status = result.status if result.done.is_set() else Status.RUNNING.value
        drawn = self.snapshot
        if drawn is not None and (drawn.n_energies_seen, drawn.status) == (n, status):
            return
        arrays = {k: result.arrays[k] for k in ("phase", "reliability", "ambiguous", "mask") if k in result.arrays}
        self._draw(ResultSnapshot(self._uid, status, n, dict(result.metadata, errors=list(result.errors)), arrays))

    def _received(self, snapshot: ResultSnapshot) -> None:
        """On the follower thread: keep the newest state for the document thread to draw."""
        with self._lock:
            self._pending = snapshot

    def refresh(self) -> None:
        """Draw the newest state of the remote result now, if it is new (the user's thread)."""
        with self._lock:
            snapshot, self._pending = self._pending, None
        if snapshot is not None:
            self._draw(snapshot)

    def wait(self, timeout: float | None = None) -> ResultSnapshot | None:
        """Wait until the remote result is final (at most ``timeout`` s), draw it and return it."""
        if self._follower is not None:
            self._follower.join(timeout)
        self.refresh()
        return self.snapshot

    def close(self) -> None:
        """Stop following and stop the in-process analysis' writer thread."""
        self._stop_following()
        if self.analysis is not None:
            self.analysis.close()

    def _stop_following(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None

    # -- drawing (under the lock) ------------------------------------------------------------

    def _reset_axes(self) -> None:
        for ax in (self._map_ax, self._fraction_ax):
            ax.clear()
        self._image, self._lines = None, {}
        self._map_ax.set_axis_off()
        self._map_ax.set_title("phase (colour), reliability (brightness)", fontsize=9)
        self._fraction_ax.set_xlabel("energies seen")
        self._fraction_ax.set_ylabel("fraction of particle pixels")
        self._fraction_ax.set_ylim(0, 1)

    def _phases(self, snapshot: ResultSnapshot) -> list[str]:
        """The run's phase names in reference order (fixed at the first that names them)."""
        if not self._phase_names:
            refs = snapshot.metadata.get("references")
            if isinstance(refs, dict) and refs.get("phases"):
                self._phase_names = [str(p) for p in refs["phases"]]
            elif snapshot.metadata.get("phase_fractions"):
                self._phase_names = list(snapshot.metadata["phase_fractions"])
        return self._phase_names

    @contextlib.contextmanager
    def _drawing(self, what: str) -> Iterator[None]:
        """Log a failure to draw ``what`` and go on: raised into the RunEngine, it would abort the user's scan."""
        try:
            yield
        except Exception:
            logger.exception("live phase map: drawing the %s of run %s failed; the scan goes on", what, self._uid)

    def _draw(self, snapshot: ResultSnapshot) -> None:
        with self._lock:
            if snapshot.run_uid != self._uid:
                return  # a late state of the previous run
            phases = self._phases(snapshot)
            fractions = snapshot.metadata.get("phase_fractions") or {}
            n = snapshot.n_energies_seen
            if fractions:
                point = (n, dict(fractions), snapshot.metadata.get("ambiguous_fraction"))
                if self.fractions and self.fractions[-1][0] == n:
                    self.fractions[-1] = point  # the final maps of the last energy, or a re-read
                else:
                    self.fractions.append(point)
            self.snapshot = snapshot
            self.redraws.append(n)
            with self._drawing("maps"):
                self._draw_map(phases, snapshot.arrays)
                if fractions:
                    self._draw_fractions(phases)
            self._draw_title(snapshot.status)

    def _draw_map(self, phases: list[str], maps: dict) -> None:
        if not {"phase", "reliability"} <= set(maps):
            return
        rgb = phase_rgb(maps["phase"], maps["reliability"], maps.get("ambiguous"))
        if self._image is not None:
            self._image.set_data(rgb)
            return
        self._image = self._map_ax.imshow(rgb, interpolation="nearest")
        handles = [Patch(color=PHASE_COLORS[i % len(PHASE_COLORS)], label=label_text(p)) for i, p in enumerate(phases)]
        handles.append(Patch(color=AMBIGUOUS_GREY, label="ambiguous"))
        legend = self._map_ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
                                     fontsize=8)
        show_literally(*legend.get_texts())  # phase names as spelled, never mathtext

    def _draw_fractions(self, phases: list[str]) -> None:
        ns = [n for n, _, _ in self.fractions]
        series = {p: [f.get(p, np.nan) for _, f, _ in self.fractions] for p in phases}
        series["ambiguous"] = [np.nan if a is None else a for _, _, a in self.fractions]
        for i, (name, values) in enumerate(series.items()):
            line = self._lines.get(name)
            if line is None:
                ambiguous = name == "ambiguous"
                color = AMBIGUOUS_GREY if ambiguous else PHASE_COLORS[i % len(PHASE_COLORS)]
                (line,) = self._fraction_ax.plot(ns, values, marker=".", color=color, label=label_text(name),
                                                 linestyle="--" if ambiguous else "-")
                self._lines[name] = line
            else:
                line.set_data(ns, values)
        self._fraction_ax.set_xlim(0, max(self._expected() or 0, max(ns)) + 0.5)
        if len(self._lines) == len(series) and self._fraction_ax.get_legend() is None:
            # the lines as handles: a name starting with "_" is still shown
            legend = self._fraction_ax.legend(handles=list(self._lines.values()), fontsize=8, loc="upper right")
            show_literally(*legend.get_texts())

    def _expected(self) -> int | None:
        n = self._start.get("num_points")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def _draw_title(self, status: str) -> None:
        with self._lock:
            sample = self._start.get("sample") if isinstance(self._start.get("sample"), dict) else {}
            soc = sample.get("state_of_charge")
            seen = self.snapshot.n_energies_seen if self.snapshot is not None else 0
            expected = self._expected()
            uid = self._start.get("uid")
            parts = [label_text(sample.get("name") or (uid[:8] if isinstance(uid, str) and uid else "run"))]
            if isinstance(soc, int | float):
                parts.append(f"SOC {soc:g}")
            parts += [label_text(status), f"{seen}/{expected or '?'} energies"]
            with self._drawing("title"):  # the sample name as spelled: "$...$" is no mathtext
                self.figure.suptitle("  |  ".join(parts), parse_math=False, usetex=False)
                self._show()

    def _show(self) -> None:
        self.figure.canvas.draw_idle()
        if not self._display:
            return
        from IPython.display import display  # optional: only inside an IPython kernel

        if self._handle is None:
            self._handle = display(self.figure, display_id=True)
        else:
            self._handle.update(self.figure)


def _in_kernel() -> bool:
    """Running inside an IPython kernel (Jupyter), where a plain figure needs a display handle."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")
