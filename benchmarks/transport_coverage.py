"""Interval coverage of the tracer D and Arrhenius Ea on synthetic Brownian ions (issue 26), and the same
for pymatgen-analysis-diffusion's own ``diffusivity_std_dev`` on the same MSDs and window.

50 seeds × 4 temperatures of tests/analysis/transport_synth.py (32 Brownian Li + 32 vibrating I, triclinic cell,
2,000 frames 10 fs apart, D = 50 exp(-0.2 eV / kT) Å²/ps). The slow test
``tests/analysis/test_transport.py::test_interval_coverage_50_seeds`` asserts the same coverage (≥ 90 %).

    OMP_NUM_THREADS=1 python benchmarks/transport_coverage.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "analysis"))
from transport_synth import CELL, EA_EV, brownian, d_true  # noqa: E402

TEMPS = (600.0, 800.0, 1000.0, 1200.0)


def main() -> None:
    from pymatgen.analysis.diffusion.analyzer import get_diffusivity_from_msd

    from geodite_sim.analysis.arrhenius import fit_arrhenius
    from geodite_sim.analysis.transport import TransportSettings, analyse_unwrapped, per_atom_msd, unwrap_arrays

    s = TransportSettings(mobile=("Li",))
    hits, da_hits, ea_hits = np.zeros(4), np.zeros(4), 0
    d_all, se_all, da_all = [[] for _ in TEMPS], [[] for _ in TEMPS], [[] for _ in TEMPS]
    for seed in range(50):
        d, se = [], []
        for k, temperature in enumerate(TEMPS):
            wrapped, _, numbers, masses = brownian(d_true(temperature), seed=1000 * seed + k)
            frames = unwrap_arrays(wrapped, CELL, numbers, masses, 10.0, s)
            tr = analyse_unwrapped(frames, s).tracer["Li"]
            truth = d_true(temperature) * 1e-4
            hits[k] += tr.ci_cm2_per_s[0] < truth < tr.ci_cm2_per_s[1]
            # pymatgen-analysis-diffusion's estimate and std dev on the same mean MSD and window
            u = frames.positions[:, numbers == 3]
            t = np.arange(int(tr.window_fs[1] / 10.0) + 1) * 10.0
            sel = (t >= tr.window_fs[0] - 1e-9) & (t <= tr.window_fs[1] + 1e-9)
            msd = per_atom_msd(u, len(t)).mean(0)
            d_da, sd_da = get_diffusivity_from_msd(msd[sel], t[sel], "max")
            da_hits[k] += abs(d_da - truth) < 1.96 * sd_da
            d.append(tr.D_cm2_per_s)
            se.append(tr.se_cm2_per_s)
            d_all[k].append(tr.D_cm2_per_s)
            se_all[k].append(tr.se_cm2_per_s)
            da_all[k].append(sd_da)
        lo, hi = fit_arrhenius(TEMPS, d, se).Ea_ci_eV
        ea_hits += lo < EA_EV < hi
    rows = [{"T_K": t, "coverage_95": hits[k] / 50, "empirical_sd_cm2_per_s": float(np.std(d_all[k], ddof=1)),
             "mean_se_cm2_per_s": float(np.mean(se_all[k])), "pymatgen_std_dev_cm2_per_s": float(np.mean(da_all[k])),
             "pymatgen_coverage_95": da_hits[k] / 50} for k, t in enumerate(TEMPS)]
    out = {"tracer": rows, "Ea_coverage_95": ea_hits / 50}
    results = Path(__file__).parent / "results"
    (results / "transport_coverage.json").write_text(json.dumps(out, indent=1))
    lines = ["| T (K) | D interval holds true D (95 %) | sd of D over seeds (cm²/s) | mean reported SE | "
             "pymatgen diffusivity_std_dev | its ±1.96σ holds true D |", "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['T_K']:g} | {100 * r['coverage_95']:.0f} % | {r['empirical_sd_cm2_per_s']:.2e} | "
                     f"{r['mean_se_cm2_per_s']:.2e} | {r['pymatgen_std_dev_cm2_per_s']:.1e} | "
                     f"{100 * r['pymatgen_coverage_95']:.0f} % |")
    lines.append(f"\nEa = {EA_EV} eV inside the 95 % interval of the weighted Arrhenius fit: "
                 f"{100 * out['Ea_coverage_95']:.0f} % of 50 fits.")
    (results / "transport_coverage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
