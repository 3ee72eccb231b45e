"""TensorFlow is the optional extra ``models``: everything a live worker, a model-server client and the
CLI load imports without it, and the networks say clearly that they need it.

Each check runs in a fresh interpreter whose import system refuses ``tensorflow`` and ``keras`` (a
``sys.meta_path`` finder raising ModuleNotFoundError), as in an installation without the extra. The
import-linter contract "no TensorFlow outside the models and the model server" (pyproject.toml)
checks the same statically; this test also catches imports hidden from it (``importlib``, plugins).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import importlib, json, sys

    BLOCKED = ("tensorflow", "keras")

    class RefuseTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: TensorFlow not installed)", name=name)
            return None

    sys.meta_path.insert(0, RefuseTensorFlow())
    outcome = {}
    for module in sys.argv[1:]:
        try:
            importlib.import_module(module)
        except BaseException as exc:
            outcome[module] = [type(exc).__name__, str(exc), getattr(exc, "name", None)]
        else:
            outcome[module] = None
    outcome["loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(json.dumps(outcome))
    """
)

WORKER_SIDE = (
    "phasestream.transport.worker",
    "phasestream.modelserver.client",
    "phasestream.kernels",
    "phasestream.callbacks",
    "phasestream.store.results",
    "phasestream.jobs.refine",
    "phasestream.app.cli",
)


def _import_without_tensorflow(*modules: str) -> dict:
    done = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, *modules], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_worker_side_imports_without_tensorflow():
    outcome = _import_without_tensorflow(*WORKER_SIDE)
    failed = {module: error for module, error in outcome.items() if module in WORKER_SIDE and error is not None}
    assert failed == {}, f"imports that need TensorFlow (run `python -X importtime -c 'import M'`): {failed}"
    assert outcome["loaded"] == []


def test_models_say_they_need_tensorflow():
    outcome = _import_without_tensorflow("phasestream.models.gmvae")
    kind, message, _ = outcome["phasestream.models.gmvae"]
    # at import, as an ImportError naming the missing package (not an AttributeError at the first use)
    assert kind in ("ImportError", "ModuleNotFoundError"), outcome
    assert "tensorflow" in message or "keras" in message, message
