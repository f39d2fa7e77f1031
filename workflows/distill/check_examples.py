"""Is the demo's output physical? Relax examples/structures with a model (relax_many) and with CHGNet.

    OMP_NUM_THREADS=1 python workflows/distill/check_examples.py [--model geodite-mini]

Both relax positions and cell (geodite_sim's batched FIRE + Fréchet cell filter; CHGNet through
ASE's FIRE + FrechetCellFilter), fmax 0.05 eV/Å, ≤ 300 steps, from the same example files. Reports
per structure the volume per atom and energy per atom of both, their differences, and whether the
model's relaxation converged. Writes results/examples_vs_chgnet.{json,md} next to this script.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
warnings.filterwarnings("ignore")


def main(argv=None) -> int:
    from ase.filters import FrechetCellFilter
    from ase.io import read
    from ase.optimize import FIRE
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    import geodite_sim as gs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--fmax", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    files = sorted(p for p in (ROOT / "examples" / "structures").iterdir() if p.suffix in (".cif", ".extxyz"))
    structures = [read(p) for p in files]
    model = gs.load_model(args.model)
    ours = gs.relax_many(structures, model, fmax=args.fmax, max_steps=args.steps, relax_cell=True, progress=False)
    chg = CHGNetCalculator(model=CHGNet.load(verbose=False), use_device="cpu")
    rows = []
    for path, atoms, r in zip(files, structures, ours):
        a = atoms.copy()
        a.calc = chg
        FIRE(FrechetCellFilter(a), logfile=None).run(fmax=args.fmax, steps=args.steps)
        n = len(a)
        v_ref, e_ref = float(a.get_volume() / n), float(a.get_potential_energy() / n)
        row = {"structure": path.name, "atoms": n, "converged": bool(r.converged), "error": r.error,
               "chgnet_volume_per_atom": v_ref, "chgnet_energy_per_atom": e_ref}
        if r.structure is not None:
            v = float(r.structure.get_volume() / n)
            row.update(volume_per_atom=v, energy_per_atom=float(r.energy_per_atom),
                       volume_dev_pct=100 * (v / v_ref - 1), energy_dev_meV=1000 * (float(r.energy_per_atom) - e_ref),
                       steps=int(r.n_steps))
        rows.append(row)
        print(f"{path.name:34s} V/atom {row.get('volume_per_atom', float('nan')):7.2f} vs {v_ref:7.2f} Å3 "
              f"({row.get('volume_dev_pct', float('nan')):+6.1f} %)  E/atom {row.get('energy_per_atom', float('nan')):8.3f}"
              f" vs {e_ref:8.3f} eV  converged={row['converged']}", flush=True)
    dv = np.array([abs(r["volume_dev_pct"]) for r in rows if "volume_dev_pct" in r])
    de = np.array([abs(r["energy_dev_meV"]) for r in rows if "energy_dev_meV" in r])
    from geodite_sim.model.contract import model_name

    summary = {"model": model_name(model), "n": len(rows),
               "converged": sum(r["converged"] for r in rows), "failed": sum(1 for r in rows if r["error"]),
               "median_abs_volume_dev_pct": float(np.median(dv)), "max_abs_volume_dev_pct": float(dv.max()),
               "within_5pct_volume": int((dv <= 5).sum()), "median_abs_energy_dev_meV": float(np.median(de)),
               "max_abs_energy_dev_meV": float(de.max())}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "examples_vs_chgnet.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    lines = ["| structure | atoms | V/atom (Å³) model / CHGNet | ΔV % | E/atom (eV) model / CHGNet | ΔE meV/atom | converged |",
             "|---|---:|---|---:|---|---:|---|"]
    for r in rows:
        if "volume_per_atom" in r:
            lines.append(f"| {r['structure']} | {r['atoms']} | {r['volume_per_atom']:.2f} / {r['chgnet_volume_per_atom']:.2f} | "
                         f"{r['volume_dev_pct']:+.1f} | {r['energy_per_atom']:.3f} / {r['chgnet_energy_per_atom']:.3f} | "
                         f"{r['energy_dev_meV']:+.0f} | {r['converged']} |")
        else:
            lines.append(f"| {r['structure']} | {r['atoms']} | failed: {r['error']} | | | | |")
    lines += ["", json.dumps(summary)]
    (out / "examples_vs_chgnet.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
