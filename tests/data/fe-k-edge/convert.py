"""Convert the raw Fe K-edge mu(E) scans in raw/ into normalized two-column references.

Run from this folder: ``python convert.py`` (NumPy only). It writes ``ref_<phase>.txt``
(energy in eV, normalized absorption) for each raw file, by the usual XANES normalization
(as Athena's defaults): E0 is the energy of the largest derivative of mu(E) (first 40 eV of
the rise, 7100-7140 eV); a straight line fitted over E0-150 ... E0-30 eV is the pre-edge line;
a quadratic fitted over E0+150 ... E0+400 eV is the post-edge curve; the edge step is
post(E0) - pre(E0) and the normalized spectrum is (mu - pre) / step. All energies of the raw
scan are kept (the full EXAFS range, to about E0+800 eV).
"""

from pathlib import Path

import numpy as np

RAW = {"FeO": "feo_rt1.xdi", "Fe2O3": "fe2o3_rt1.xmu", "Fe3C": "fe3c_rt.xdi"}


def normalize(energy: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, float]:
    window = (energy > 7100) & (energy < 7140)
    deriv = np.gradient(mu, energy)
    e0 = float(energy[window][np.argmax(deriv[window])])
    pre = (energy >= e0 - 150) & (energy <= e0 - 30)
    post = (energy >= e0 + 150) & (energy <= e0 + 400)
    pre_line = np.polyval(np.polyfit(energy[pre], mu[pre], 1), energy)
    post_curve = np.polyval(np.polyfit(energy[post], mu[post], 2), energy)
    step = float(np.interp(e0, energy, post_curve - pre_line))
    return (mu - pre_line) / step, e0


def main() -> None:
    here = Path(__file__).parent
    for phase, name in RAW.items():
        data = np.loadtxt(here / "raw" / name, comments="#")
        energy, mu = data[:, 0], data[:, 1]
        norm, e0 = normalize(energy, mu)
        header = (f"{phase}: Fe K-edge, normalized from raw/{name} by convert.py (E0 = {e0:.2f} eV)\n"
                  "energy_eV  normalized_mu")
        np.savetxt(here / f"ref_{phase}.txt", np.column_stack([energy, norm]), fmt="%.4f %.6f", header=header)
        print(f"{phase}: E0 {e0:.2f} eV, {energy.size} rows {energy[0]:.1f}-{energy[-1]:.1f} eV")


if __name__ == "__main__":
    main()
