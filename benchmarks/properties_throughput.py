"""Property-workflow throughput: batched workflows vs the one-at-a-time ASE/phonopy route, same model.

For 20 small materials (1-5-atom primitive cells, fixed list) and the same model and dtype:

- **phonons**: (a) phonopy + ``GeoditeCalculator``, one displaced supercell at a time, then force
  constants, mesh and thermal properties at 300 K; (b) :func:`run_phonons` (every displaced
  supercell of all materials in one ``evaluate`` call, same phonopy post-processing). No relaxation,
  no plots, same supercell and mesh. The frequencies of (a) and (b) are compared.
- **eos**: (a) per material and volume, ASE ``FIRE`` on the ions (fixed cell) with the calculator;
  (b) :func:`run_eos` (all strained copies in one ``relax_many``).
- **elastic**: (a) per material, strain component and magnitude, ASE ``FIRE`` on the ions, stress,
  plus the clamped stress; (b) :func:`run_elastic`.
- **diatomics**: (a) the calculator on each dimer; (b) :func:`run_diatomics` (one ``evaluate``).

Each workflow runs ``--rounds`` times alternating (b), (a), (b), (a), …; the best time of each is
reported with the ratio (a)/(b). Results: ``benchmarks/results/properties_throughput.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/properties_throughput.py            # ~3-5 min on one thread
    python benchmarks/properties_throughput.py --workflows phonons --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from geodite_sim.workflows.properties import run_diatomics, run_elastic, run_eos, run_phonons

import geodite_sim as gs

RESULTS = Path(__file__).parent / "results"


def materials() -> list[Atoms]:
    """20 small crystals (primitive cells of 1-2 atoms, and 4-5-atom wurtzite / perovskites)."""
    from ase.spacegroup import crystal

    def perovskite(a, b, x, lat):
        return crystal([a, b, x], basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221,
                       cellpar=[lat, lat, lat, 90, 90, 90])

    return [
        bulk("Si", "diamond", 5.43), bulk("C", "diamond", 3.57), bulk("Ge", "diamond", 5.66),
        bulk("NaCl", "rocksalt", 5.64), bulk("MgO", "rocksalt", 4.21), bulk("LiF", "rocksalt", 4.03),
        bulk("KCl", "rocksalt", 6.29), bulk("ZnS", "zincblende", 5.41), bulk("GaP", "zincblende", 5.45),
        bulk("SiC", "zincblende", 4.36), bulk("CsCl", "cesiumchloride", 4.12), bulk("Cu", "fcc", 3.61),
        bulk("Al", "fcc", 4.05), bulk("Ni", "fcc", 3.52), bulk("Fe", "bcc", 2.87), bulk("Nb", "bcc", 3.30),
        bulk("Mg", "hcp", 3.21), bulk("ZnO", "wurtzite", a=3.25, c=5.21), perovskite("Ca", "Ti", "O", 3.84),
        perovskite("K", "Ni", "F", 4.01),
    ]


# ---------------------------------------------------------------------------------------------- references
def phonons_reference(structs, calc, supercell, mesh, temperature=300.0):
    """phonopy + ASE calculator, one supercell at a time (the usual route)."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    out, t_forces = [], 0.0
    for atoms in structs:
        unit = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell[:],
                            scaled_positions=atoms.get_scaled_positions(wrap=False), masses=atoms.get_masses())
        ph = Phonopy(unit, supercell_matrix=np.diag(supercell), primitive_matrix="P")
        ph.generate_displacements(distance=0.01)
        forces = []
        t0 = time.perf_counter()
        for sc in ph.supercells_with_displacements:
            a = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
            a.calc = calc
            forces.append(a.get_forces())
        t_forces += time.perf_counter() - t0
        ph.forces = np.array(forces)
        ph.produce_force_constants()
        ph.run_mesh(mesh, is_gamma_center=True)
        ph.run_total_dos()
        ph.run_thermal_properties(temperatures=[temperature])
        out.append(ph.mesh.frequencies.copy())
    return out, t_forces


def eos_reference(structs, calc, strains, fmax):
    from ase.optimize import FIRE

    for atoms in structs:
        for s in strains:
            a = atoms.copy()
            a.set_cell(atoms.cell[:] * (1 + s) ** (1 / 3), scale_atoms=True)
            a.calc = calc
            FIRE(a, logfile=None).run(fmax=fmax, steps=500)
            a.get_potential_energy()


def elastic_reference(structs, calc, mags, fmax):
    from ase.optimize import FIRE
    from geodite_sim.workflows.properties.elastic import strained_copy

    for atoms in structs:
        a0 = atoms.copy()
        a0.calc = calc
        a0.get_stress()
        for j in range(6):
            for e in mags:
                clamped = strained_copy(atoms, j, e)
                clamped.calc = calc
                clamped.get_stress()
                a = clamped.copy()
                a.calc = calc
                FIRE(a, logfile=None).run(fmax=fmax, steps=500)
                a.get_stress()


def diatomics_reference(zs, calc, n):
    from geodite_sim.workflows.properties.diatomics import dimer

    for z in zs:
        for r in np.linspace(0.01, 6.1, n):
            a = dimer(z, float(r))
            a.calc = calc
            a.get_forces()


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint or packaged name (default: packaged default)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--supercell", type=int, default=2)
    p.add_argument("--mesh", type=int, default=8)
    p.add_argument("--workflows", nargs="+", default=["phonons", "eos", "elastic", "diatomics"])
    p.add_argument("--diatomic-elements", type=int, default=10,
                   help="the first N elements the model supports (default 10)")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)

    model = gs.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    calc = gs.GeoditeCalculator(model)
    structs = materials()
    sc, mesh = (args.supercell,) * 3, [args.mesh] * 3
    strains_eos = np.linspace(-0.08, 0.08, 9)
    mags = [-0.01, -0.005, 0.005, 0.01]
    from geodite_sim.workflows.properties.diatomics import model_elements

    zs = model_elements(model)[: args.diatomic_elements]
    gs.relax_many([structs[0]], model, max_steps=2, progress=False)  # one-time imports / warm-up
    gs.evaluate([structs[0]], model)

    batched = {
        "phonons": lambda: run_phonons(structs, model, supercell=sc, mesh=mesh, relax=False, plots=False),
        "eos": lambda: run_eos(structs, model, strains=strains_eos, relax=False, relax_ions=True, fmax=0.01),
        "elastic": lambda: run_elastic(structs, model, strains=mags, relax=False, relax_ions=True, fmax=0.01),
        "diatomics": lambda: run_diatomics(model, elements=zs, n=200, plots=False),
    }
    reference = {
        "phonons": lambda: phonons_reference(structs, calc, sc, mesh),
        "eos": lambda: eos_reference(structs, calc, strains_eos, 0.01),
        "elastic": lambda: elastic_reference(structs, calc, mags, 0.01),
        "diatomics": lambda: diatomics_reference(zs, calc, 200),
    }
    rows, extra = [], {}
    for wf in args.workflows:
        tb, ta = [], []
        out_b = out_a = None
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            out_b = batched[wf]()
            tb.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out_a = reference[wf]()
            ta.append(time.perf_counter() - t0)
        row = {"workflow": wf, "batched_s": min(tb), "one_at_a_time_s": min(ta), "ratio": min(ta) / min(tb),
               "batched_all_s": tb, "one_at_a_time_all_s": ta}
        if wf == "phonons":
            freqs_a, t_forces = out_a
            diffs = [float(np.abs(r.phonopy.mesh.frequencies - f).max()) for r, f in zip(out_b, freqs_a, strict=True)
                     if r.status == "done"]
            n_cells = sum(r.n_displacements for r in out_b)
            n_atoms = sum(r.n_displacements * r.n_atoms * int(np.prod(r.supercell)) for r in out_b
                          if r.status == "done")
            for r in out_b:
                if r.status != "done":
                    print(f"phonons failed for {r.label}: {r.error}")
            t0 = time.perf_counter()  # the batched force stage alone (same cells as run_phonons)
            from geodite_sim.workflows.properties.phonons import make_phonopy, phonopy_to_ase

            cells = [phonopy_to_ase(c) for a in structs for c in make_phonopy(a, np.diag(sc), 0.01)
                     .supercells_with_displacements]
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            gs.evaluate(cells, model, compute_stress=False, min_distance_factor=None)
            t_eval = time.perf_counter() - t0
            row.update(n_supercells=n_cells, n_supercell_atoms=n_atoms, max_freq_diff_THz=max(diffs),
                       n_done=sum(r.status == "done" for r in out_b),
                       forces_one_at_a_time_s=t_forces, forces_batched_evaluate_s=t_eval,
                       forces_ratio=t_forces / t_eval, supercell_build_s=t_build)
        elif wf == "diatomics":
            row.update(n_dimers=200 * len(zs), n_done=sum(r.status == "done" for r in out_b.results))
        else:
            row.update(n_done=sum(r.status == "done" for r in out_b))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("all_s")}))

    RESULTS.mkdir(exist_ok=True)
    meta = {
        "model": args.model or "packaged default (geodite-mini)", "dtype": args.dtype, "device": args.device,
        "materials": [a.get_chemical_formula() for a in structs], "supercell": list(sc), "mesh": mesh,
        "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu": platform.processor() or platform.machine(),
        "note": "2-core VM shared with other jobs during the run: absolute times vary, ratios are taken in one run "
                "(alternating rounds, best of each).",
        "extra": extra,
    }
    stem = "properties_throughput" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Property workflows: batched vs one at a time ({meta['model']}, {args.dtype}, "
             f"{torch.get_num_threads()} thread(s))", "",
             "| workflow | work | one at a time (s) | batched (s) | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        work = {"phonons": f"{len(structs)} materials, {r.get('n_supercells')} displaced {sc[0]}x{sc[1]}x{sc[2]} "
                           f"supercells ({r.get('n_supercell_atoms')} atoms)",
                "eos": f"{len(structs)} materials x {len(strains_eos)} volumes, ions relaxed",
                "elastic": f"{len(structs)} materials x 24 strained cells, ions relaxed + clamped",
                "diatomics": f"{len(zs)} elements x 200 distances"}[r["workflow"]]
        lines.append(f"| {r['workflow']} | {work} | {r['one_at_a_time_s']:.2f} | {r['batched_s']:.2f} | "
                     f"**{r['ratio']:.1f}x** |")
    for r in rows:
        if r["workflow"] == "phonons":
            lines += ["", f"Phonon force stage alone: {r['forces_one_at_a_time_s']:.2f} s one supercell at a time vs "
                          f"{r['forces_batched_evaluate_s']:.2f} s in one `evaluate` call "
                          f"({r['forces_ratio']:.1f}x); max |Δω| batched vs one at a time "
                          f"{r['max_freq_diff_THz']:.2e} THz ({args.dtype})."]
    lines += ["", meta["note"]]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
