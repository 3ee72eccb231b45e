"""How each service process is launched, written once.

``phasestream up`` (:mod:`phasestream.app.stack`), ``deploy/Procfile`` and the systemd units in
``deploy/systemd`` start the same seven processes with the same arguments: ``up`` builds its
commands from :data:`SERVICES`, and ``tests/test_launch.py`` reads the Procfile and every unit's
``ExecStart`` and checks each against it.

A command is a template: ``{name}`` fields are filled from the deployment's values. ``up``
fills them from its :class:`~phasestream.app.stack.StackConfig`; the deploy files with the
variables of ``deploy/env/phasestream.env`` (:data:`DEPLOY_VARIABLES`, e.g. ``{zmq_in}`` is
``$PHASESTREAM_ZMQ_IN``; every address the deploy files use has its variable there).
``{python}`` is the installation's Python; ``{phasestream}`` the
``phasestream`` command (for ``up``, ``python -m phasestream.app.cli``); ``{tiled_config}``
Tiled's configuration file (``deploy/tiled/config.yml`` in the deploy files).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from phasestream.jobs.refine import DEFAULT_MODEL

__all__ = ["DEPLOY_VARIABLES", "SERVICES", "Service"]

PYTHON = "{python}"
PHASESTREAM = "{phasestream}"
_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Service:
    """One long-running process of phasestream and the command that launches it.

    Attributes
    ----------
    name : the component's name (``phasestream up --only``, ``status``, its log file)
    argv : the command line, ``{placeholder}`` fields filled by :meth:`command`
    needs : services whose addresses ``argv`` names: started before it
    uses : ``(service, arguments)`` pairs: arguments given only when that service is part of the
        same deployment (the worker sends post-scan jobs to the stack's Dask scheduler if it has one)
    run_dir_args : arguments naming files ``phasestream up`` writes in its run folder (a Tiled
        logging configuration that masks secrets, the Dask workers' scratch folder); the deploy
        files do without
    """

    name: str
    argv: tuple[str, ...]
    needs: tuple[str, ...] = ()
    uses: tuple[tuple[str, tuple[str, ...]], ...] = ()
    run_dir_args: tuple[str, ...] = ()

    def command(self, values: Mapping[str, str | Sequence[str]], *, running: Collection[str] = (),
                extra: Sequence[str] = (), run_dir: bool = False) -> list[str]:
        """The command line: ``argv``, then ``extra`` (as given), the ``uses`` arguments of the services
        in ``running``, and ``run_dir_args`` when ``run_dir``.

        A value that is a sequence replaces a word that is only its placeholder by several words
        (``{phasestream}`` -> ``python -m phasestream.app.cli``). Raises ``ValueError`` naming a
        placeholder that ``values`` lacks.
        """
        used = [arg for other, args in self.uses if other in running for arg in args]
        return [*self._fill(self.argv, values), *extra, *self._fill(used, values),
                *(self._fill(self.run_dir_args, values) if run_dir else ())]

    def _fill(self, words: Sequence[str], values: Mapping[str, str | Sequence[str]]) -> list[str]:
        filled: list[str] = []
        for word in words:
            missing = [name for name in _FIELD.findall(word) if name not in values]
            if missing:
                raise ValueError(f"service {self.name}: no value for {{{missing[0]}}} in {word!r}")
            whole = _FIELD.fullmatch(word)
            if whole and isinstance(values[whole.group(1)], list | tuple):
                filled.extend(str(v) for v in values[whole.group(1)])
            else:
                filled.append(_FIELD.sub(lambda m: str(values[m.group(1)]), word))
        return filled


SERVICES = (
    Service("tiled", (PYTHON, "-m", "tiled", "serve", "config", "{tiled_config}", "--host", "{tiled_host}",
                      "--port", "{tiled_port}"),
            run_dir_args=("--log-config", "{tiled_log_config}")),
    Service("proxy", (PHASESTREAM, "proxy", "--in", "{zmq_in}", "--out", "{zmq_out}")),
    # the worker refines every run with the default GMVAE: loaded before the first run needs it
    Service("models", (PHASESTREAM, "serve-models", "--bind", "{models}", "--preload", DEFAULT_MODEL)),
    # without --dashboard-address, Dask's HTTP servers listen on every interface even with --no-dashboard
    Service("scheduler", (PYTHON, "-m", "dask", "scheduler", "--host", "{scheduler}", "--no-dashboard",
                          "--dashboard-address", "{scheduler_http}", "--no-show")),
    Service("dask-workers", (PYTHON, "-m", "dask", "worker", "{scheduler}", "--nworkers", "{dask_workers}",
                             "--nthreads", "1", "--host", "{host}", "--no-dashboard", "--dashboard-address",
                             "{host}:0", "--name", "phasestream"),
            needs=("scheduler",), run_dir_args=("--local-directory", "{dask_directory}")),
    Service("worker", (PHASESTREAM, "serve", "--zmq", "{zmq_out}", "--tiled", "{tiled}"),
            needs=("tiled", "proxy"), uses=(("models", ("--models", "{models}")),
                                            ("scheduler", ("--scheduler", "{scheduler}")))),
    # the live view in a browser: reads Tiled (its streaming), serves pages on {host}:{view_port}
    Service("view", (PHASESTREAM, "view", "--tiled", "{tiled}", "--host", "{host}", "--port", "{view_port}"),
            needs=("tiled",)),
)

# placeholder -> the variable of deploy/env/phasestream.env the Procfile and the systemd units fill it from
DEPLOY_VARIABLES = {
    "tiled_host": "PHASESTREAM_TILED_HOST",
    "tiled_port": "PHASESTREAM_TILED_PORT",
    "tiled": "TILED_URI",
    "zmq_in": "PHASESTREAM_ZMQ_IN",
    "zmq_out": "PHASESTREAM_ZMQ_OUT",
    "models": "PHASESTREAM_MODEL_SERVER",
    "scheduler": "PHASESTREAM_DASK_SCHEDULER",
    "dask_workers": "PHASESTREAM_DASK_WORKERS",
    "host": "PHASESTREAM_HOST",
    "scheduler_http": "PHASESTREAM_DASK_HTTP",
    "view_port": "PHASESTREAM_VIEW_PORT",
}

