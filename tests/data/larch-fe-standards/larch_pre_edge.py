"""Oracle numbers for tests/methods/test_normalization.py: xraylarch ``pre_edge`` with its defaults.

Run with a separate environment that has xraylarch (it is not a phasestream dependency):

    python -m venv /tmp/larchenv && /tmp/larchenv/bin/pip install xraylarch   # 2026.3.1 here
    cd tests/data/larch-fe-standards && /tmp/larchenv/bin/python larch_pre_edge.py

It prints, per spectrum, larch's E0, edge step and the windows (relative to E0) and the
post-edge polynomial order it chose; the test copies these numbers (``LARCH`` there).
"""

import json
from pathlib import Path

import numpy as np
from larch.xafs.pre_edge import preedge  # what larch.xafs.pre_edge runs, returning a dict

HERE = Path(__file__).resolve().parent
SPECTRA = {
    "fe2o3_rt1": (HERE / "fe2o3_rt1.xmu", 1.0),
    "feo_rt1": (HERE / "feo_rt1.xmu", 1.0),
    "NiO": (HERE.parent / "ni-k-edge" / "ref_NiO.txt", 1000.0),  # keV
    "LiNiO2": (HERE.parent / "ni-k-edge" / "ref_LiNiO2.txt", 1000.0),
}

out = {}
for name, (path, scale) in SPECTRA.items():
    data = np.loadtxt(path, comments="#")
    energy, mu = data[:, 0] * scale, data[:, 1]
    r = preedge(energy, mu)  # all defaults
    keys = ("e0", "edge_step", "pre1", "pre2", "norm1", "norm2", "nnorm")
    out[name] = {k: round(float(r[k]), 6) for k in keys}
    fixed = preedge(energy, mu, e0=r["e0"], pre1=-150.0, pre2=-40.0, norm1=60.0, norm2=400.0, nnorm=2)
    out[name]["edge_step_fixed"] = round(float(fixed["edge_step"]), 6)
print(json.dumps(out, indent=1))
