"""FIRE vs L-BFGS vs BFGS through ``relax_many``, and torch-sim's ``lbfgs``, with the same model (issue 25).

256 structures of 2–16 atoms (18 prototypes as supercells of at most 16 atoms, 2 % random strain, 0.05 Å
rattle; fixed seed), the packaged default model (geodite-mini, float32, CPU, one thread), Fréchet cell filter,
fmax 0.05 and 0.01 eV/Å, at most 500 steps. For each method and fmax:

* force calls per structure: ``relax_many`` — optimiser steps + 1 (the initial evaluation), as ASE counts them;
  torch-sim — system evaluations counted at its model (it tests convergence every 5 steps, so a system may
  take up to 4 steps past convergence);
* structures per second, wall and CPU time (one thread: CPU time is the work, robust to other load on a
  shared machine; ratios use it);
* the same on the structures that both FIRE and the method converged (``relax_many`` methods: per-structure
  steps are known), which separates the methods' speed from the structures one of them does not converge;
* converged structures, and final energies against FIRE's (|ΔE| per atom within 1 meV/atom, and the others:
  different minima).

torch-sim runs ``ts.Optimizer.lbfgs`` in its ASE mode (``alpha`` = 70: fixed initial inverse Hessian, as ASE),
``max_history`` 100 and ``max_step`` 0.2 (ASE's ``memory`` and ``maxstep``), the Fréchet filter, force
convergence with cell forces, and its in-flight autobatcher at the same atom budget as ``relax_many``.

    OMP_NUM_THREADS=1 python benchmarks/relax_optimizers.py            # full run
    OMP_NUM_THREADS=1 python benchmarks/relax_optimizers.py --quick    # 64 structures (writes *_quick.*)

Writes ``benchmarks/results/relax_optimizers.json`` and ``.md`` (``relax_optimizers_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("fire", "lbfgs", "bfgs", "torchsim_lbfgs")
#: Target sizes (atoms), cycled; each prototype's supercell closest to the target with at most 16 atoms.
SIZES = (2, 4, 6, 8, 12, 16)
MAX_ATOMS_PER_STRUCTURE = 16


def make_structures(n: int, seed: int = 0) -> list:
    """``n`` rattled and strained crystals of 2–16 atoms (benchmarks/relax_throughput.py's prototypes)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from relax_throughput import _prototypes

    rng = np.random.default_rng(seed)
    protos = _prototypes()
    out = []
    for k in range(n):
        atoms = protos[k % len(protos)].copy()
        target = SIZES[k % len(SIZES)]
        reps = [(a, b, c) for a in range(1, 5) for b in range(1, a + 1) for c in range(1, b + 1)
                if 2 <= len(atoms) * a * b * c <= MAX_ATOMS_PER_STRUCTURE]
        a, b, c = min(reps, key=lambda r: (abs(np.log(len(atoms) * r[0] * r[1] * r[2] / target)), r))
        atoms = atoms * (a, b, c)
        strain = 0.02 * rng.standard_normal((3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def run_torchsim(structures, model, fmax: float, max_steps: int, max_atoms: int) -> dict:
    import torch_sim as ts
    from torch_sim.autobatching import InFlightAutoBatcher

    import geodite_sim as gs

    tsm = gs.TorchSimModel(model)
    calls = {"systems": 0}
    tsm_forward = tsm.forward

    def forward(state, **kw):  # count the systems torch-sim evaluates (its force calls)
        calls["systems"] += int(state.n_systems)
        return tsm_forward(state, **kw)

    tsm.forward = forward
    batcher = InFlightAutoBatcher(tsm, memory_scales_with="n_atoms", max_memory_scaler=float(max_atoms))
    conv_fn = ts.generate_force_convergence_fn(fmax, include_cell_forces=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = ts.optimize(system=list(structures), model=tsm, optimizer=ts.Optimizer.lbfgs, convergence_fn=conv_fn,
                            max_steps=max_steps, autobatcher=batcher,
                            init_kwargs={"cell_filter": ts.CellFilter.frechet, "alpha": 70.0},
                            max_history=100, max_step=0.2)
    n_atoms = final.n_atoms_per_system.cpu().numpy()
    energy = final.energy.detach().cpu().double().numpy()
    converged = [bool(c) for c in conv_fn(final, None).cpu().tolist()]
    return {"energy_per_atom": (energy / n_atoms).tolist(), "converged": converged,
            "force_calls": calls["systems"], "errors": 0}


def run_ours(structures, model, fmax: float, max_steps: int, max_atoms: int, optimizer: str) -> dict:
    import geodite_sim as gs

    res = gs.relax_many(structures, model, fmax=fmax, max_steps=max_steps, max_atoms=max_atoms, progress=False,
                        optimizer=optimizer)
    statuses: dict[str, int] = {}
    for r in res:
        if not r.converged:
            key = getattr(r.status, "value", str(r.status))
            statuses[key] = statuses.get(key, 0) + 1
    return {"energy_per_atom": [r.energy_per_atom for r in res], "converged": [bool(r.converged) for r in res],
            "not_converged_by_status": statuses,
            "force_calls": int(sum(r.n_steps + 1 for r in res if r.error is None)),
            "n_steps": [r.n_steps for r in res], "errors": sum(r.error is not None for r in res)}


def run(method: str, structures, model, fmax: float, max_steps: int, max_atoms: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "torchsim_lbfgs":
        out = run_torchsim(structures, model, fmax, max_steps, max_atoms)
    else:
        out = run_ours(structures, model, fmax, max_steps, max_atoms, method)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(structures)
    out.update(seconds=wall, cpu_seconds=cpu, structures_per_s=n / wall, structures_per_cpu_s=n / cpu,
               force_calls_per_structure=out["force_calls"] / n, n_converged=sum(out["converged"]))
    return out


def compare_energies(ref: list[float], other: list[float], structures, tol: float = 1e-3) -> dict:
    """|ΔE| per atom of ``other`` against ``ref`` (FIRE): how many within ``tol`` eV/atom, and the others."""
    d = np.abs(np.asarray(other) - np.asarray(ref))
    off = [{"index": int(k), "formula": structures[k].get_chemical_formula(), "n_atoms": len(structures[k]),
            "delta_eV_per_atom": float(np.asarray(other)[k] - np.asarray(ref)[k])}
           for k in np.flatnonzero(~(d <= tol))]
    return {"within_1meV": int(np.sum(d <= tol)), "fraction_within_1meV": float(np.mean(d <= tol)),
            "median_abs_delta_eV_per_atom": float(np.nanmedian(d)), "others": off}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 structures (writes relax_optimizers_quick.*)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--fmax", type=float, nargs="+", default=[0.05, 0.01])
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--max-atoms", type=int, default=None, help="atom budget per batch (default: relax_many's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default=None,
                   help="model name or checkpoint (default: the packaged default); results carry its name")
    args = p.parse_args(argv)
    if args.quick:
        args.n = 64
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import geodite_sim as gs
    from geodite_sim.relax import estimate_capacity

    model = gs.load_model(args.model)
    model_name = args.model or "packaged default (geodite-mini)"
    structures = make_structures(args.n)
    max_atoms = args.max_atoms or estimate_capacity(model, model.device).max_atoms
    methods = args.methods.split(",")
    for m in methods:  # warm-up (first-call costs: kernels, caches)
        run(m, structures[:4], model, 0.05, 5, max_atoms)
    results: dict = {}
    for fmax in args.fmax:
        for m in methods:
            out = run(m, structures, model, fmax, args.max_steps, max_atoms)
            results.setdefault(str(fmax), {})[m] = out
            print(f"fmax {fmax} {m}: {out['force_calls_per_structure']:.1f} force calls/structure, "
                  f"{out['structures_per_cpu_s']:.3f} structures/CPU-s ({out['seconds']:.0f} s wall), "
                  f"{out['n_converged']}/{args.n} converged", flush=True)
    summary = {}
    for fmax, res in results.items():
        fire = res.get("fire")
        row = {}
        for m, out in res.items():
            row[m] = {k: out[k] for k in ("force_calls_per_structure", "structures_per_s", "structures_per_cpu_s",
                                          "n_converged", "errors", "seconds", "cpu_seconds")}
            if "not_converged_by_status" in out:
                row[m]["not_converged_by_status"] = out["not_converged_by_status"]
            if "n_steps" in out:
                row[m]["median_force_calls"] = float(np.median(out["n_steps"])) + 1
            if fire is not None and m != "fire":
                row[m]["fewer_force_calls_than_fire"] = fire["force_calls_per_structure"] / out["force_calls_per_structure"]
                if "n_steps" in out:
                    both = np.asarray(fire["converged"]) & np.asarray(out["converged"])
                    calls_fire = np.asarray(fire["n_steps"])[both] + 1
                    calls = np.asarray(out["n_steps"])[both] + 1
                    row[m]["both_converged"] = int(both.sum())
                    row[m]["fewer_force_calls_than_fire_both_converged"] = float(calls_fire.mean() / calls.mean())
                    row[m]["fewer_force_calls_than_fire_median"] = float(
                        (np.median(fire["n_steps"]) + 1) / (np.median(out["n_steps"]) + 1))
                row[m]["speedup_vs_fire_cpu"] = out["structures_per_cpu_s"] / fire["structures_per_cpu_s"]
                row[m]["energies_vs_fire"] = compare_energies(fire["energy_per_atom"], out["energy_per_atom"],
                                                              structures)
        summary[fmax] = row
    sizes = [len(a) for a in structures]
    report = {
        "settings": {"n": args.n, "atoms": [min(sizes), max(sizes)], "mean_atoms": float(np.mean(sizes)),
                     "fmax": args.fmax, "max_steps": args.max_steps, "max_atoms": max_atoms,
                     "model": f"{model_name}, float32, CPU", "threads": torch.get_num_threads(),
                     "cell_filter": "Frechet", "torch_sim": "ts.Optimizer.lbfgs, alpha=70, max_history=100, "
                                                            "max_step=0.2, in-flight autobatcher",
                     "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine()},
        "summary": summary,
        "per_structure": {f: {m: {k: v for k, v in out.items() if k in ("energy_per_atom", "converged", "n_steps")}
                              for m, out in res.items()} for f, res in results.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "relax_optimizers_quick" if args.quick else "relax_optimizers"
    if args.model:
        name += "_" + Path(args.model).stem.replace("-", "_")
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    lines = [f"{args.n} structures of {min(sizes)}–{max(sizes)} atoms, {model_name} float32, 1 thread, Fréchet "
             f"cell filter, ≤ {args.max_steps} steps, atom budget {max_atoms}; load average at the end "
             f"{os.getloadavg()[0]:.1f}", "",
             "| fmax | method | force calls / structure (median) | structures / CPU-s | structures / s (wall) | converged "
             "| fewer force calls than FIRE (where both converged) | speed-up vs FIRE (CPU) | E within 1 meV/atom "
             "of FIRE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fmax, row in summary.items():
        for m, r in row.items():
            ev = r.get("energies_vs_fire")
            median = f" ({r['median_force_calls']:.0f})" if "median_force_calls" in r else ""
            both = (f" ({r['fewer_force_calls_than_fire_both_converged']:.2f}× on {r['both_converged']})"
                    if "both_converged" in r else "")
            lines.append(
                f"| {fmax} | {m} | {r['force_calls_per_structure']:.1f}{median} | {r['structures_per_cpu_s']:.3f} | "
                f"{r['structures_per_s']:.3f} | {r['n_converged']}/{args.n} | "
                + (f"{r['fewer_force_calls_than_fire']:.2f}×{both} | {r['speedup_vs_fire_cpu']:.2f}× | "
                   f"{ev['within_1meV']}/{args.n} |" if ev else "— | — | — |"))
    others = [f"- fmax {f}, {m}: " + ", ".join(f"#{o['index']} {o['formula']} ({o['delta_eV_per_atom'] * 1e3:+.1f} "
                                                 f"meV/atom)" for o in r["energies_vs_fire"]["others"])
              for f, row in summary.items() for m, r in row.items()
              if r.get("energies_vs_fire") and r["energies_vs_fire"]["others"]]
    stopped = [f"- fmax {f}, {m}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["not_converged_by_status"].items()))
               for f, row in summary.items() for m, r in row.items() if r.get("not_converged_by_status")]
    if stopped:
        lines += ["", "Not converged, by status (not_converged: the step limit; volume_change: the cell blew up):",
                  *stopped]
    if others:
        lines += ["", "Final energies more than 1 meV/atom from FIRE's (other minima, or not converged):", *others]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
