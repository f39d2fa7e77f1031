"""Relaxation throughput: ASE one at a time vs torch-sim ``ts.optimize`` vs ``geodite_sim.relax_many``.

The same structures (2-64 atoms, 18 prototypes, strained and rattled; fixed seed) are relaxed
with the same model, dtype, fmax and max_steps by

  (a) ASE ``FIRE`` + ``FrechetCellFilter``, one structure at a time, ``GeoditeCalculator``;
  (b) torch-sim ``ts.optimize`` (FIRE, ``ase_fire`` flavour, Fréchet cell filter, in-flight
      autobatcher with ``max_memory_scaler`` = the atom budget, widened to the largest structure since
      torch-sim refuses larger ones, force convergence incl. cell forces) through ``TorchSimModel``;
  (c) ``geodite_sim.relax_many`` (same atom budget).

Reported per model: structures/s of each method, the ratios (c)/(a) and (c)/(b), how many
converged, and the agreement of final energies (|ΔE| per atom, and step counts for (a) vs (c),
which follow the same algorithm). ``--profile`` adds a time split of (a) and (c): model,
neighbour list, integrator/filter, the rest (Python overhead). Results go to
``benchmarks/results/relax_throughput.json`` and ``.md``.

    python benchmarks/relax_throughput.py                     # full run (~10 min on a 2-core CPU)
    python benchmarks/relax_throughput.py --quick --profile   # ~2 min (writes relax_throughput_quick.*)
    python benchmarks/relax_throughput.py --model path/to/Geodite-MP.ckpt --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from ase.spacegroup import crystal

import geodite_sim as gs
from geodite_sim.model import Geodite, GeoditeConfig
from geodite_sim.model.checkpoint import prepare_for_inference

RESULTS = Path(__file__).parent / "results"


# ---------------------------------------------------------------------------------------------- structures
def _prototypes() -> list[Atoms]:
    def perovskite(a, b, x, lat):
        return crystal([a, b, x], basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221,
                       cellpar=[lat, lat, lat, 90, 90, 90])

    return [
        bulk("NaCl", "rocksalt", 5.64), bulk("MgO", "rocksalt", 4.21), bulk("LiF", "rocksalt", 4.03),
        bulk("ZnS", "zincblende", 5.41), bulk("ZnO", "wurtzite", a=3.25, c=5.21), bulk("Si", "diamond", 5.43),
        bulk("CaF2", "fluorite", 5.46), bulk("OLi2", "fluorite", 4.62), perovskite("Ca", "Ti", "O", 3.84),
        perovskite("K", "Ni", "F", 4.01),
        crystal(["Ti", "O"], basis=[(0, 0, 0), (0.305, 0.305, 0)], spacegroup=136, cellpar=[4.59, 4.59, 2.96, 90, 90, 90]),
        bulk("CsCl", "cesiumchloride", 4.12), bulk("Cu", "fcc", 3.61), bulk("Al", "fcc", 4.05),
        bulk("Fe", "bcc", 2.87), bulk("Li", "bcc", 3.49), bulk("Mg", "hcp", 3.21), bulk("Ti", "hcp", 2.95, 4.68),
    ]


#: Target sizes, cycled; skewed to small cells as in crystal databases (mean ~15 atoms).
SIZES = [2, 3, 4, 4, 6, 8, 8, 10, 12, 16, 16, 24, 32, 48, 64]


def _supercell(atoms: Atoms, target: int) -> Atoms:
    best, best_err = (1, 1, 1), None
    for a in range(1, 5):
        for b in range(1, a + 1):
            for c in range(1, b + 1):
                n = len(atoms) * a * b * c
                if n > 64:
                    continue
                err = abs(np.log(n / target))
                if best_err is None or err < best_err - 1e-9:
                    best, best_err = (a, b, c), err
    return atoms * best


def make_structures(n: int, seed: int = 0, sizes: list[int] | None = None) -> list[Atoms]:
    """``n`` structures of 2-64 atoms: prototypes × supercells, 2 % random strain, 0.05 Å rattle."""
    rng = np.random.default_rng(seed)
    protos = _prototypes()
    sizes = sizes or SIZES
    out = []
    for k in range(n):
        atoms = _supercell(protos[k % len(protos)].copy(), sizes[k % len(sizes)])
        strain = 0.02 * rng.standard_normal((3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


# ---------------------------------------------------------------------------------------------- models
def small_model(dtype: torch.dtype, device: str) -> Geodite:
    """The "default model"-sized case: random Geodite, 64 channels, 3 layers (tests' tiny config otherwise)."""
    torch.manual_seed(0)
    model = Geodite(GeoditeConfig(hidden_channels=64, num_layers=3, num_heads=2, cutoff=5.0))
    with torch.no_grad():
        model.decoder.e0.uniform_(-3.0, -1.0)
    model = prepare_for_inference(model, device, dtype)
    model.name = "small-random (64 ch, 3 layers, 5 Å)"
    return model


def load(name: str, dtype: torch.dtype, device: str) -> Geodite:
    if name == "small":
        return small_model(dtype, device)
    model = gs.load_model(name, device=device, dtype=dtype)
    if name == "geodite-reference-random":
        model.name = "Geodite-MP config, random reference checkpoint (192 ch, 4 layers, 6 Å)"
    return model


# ---------------------------------------------------------------------------------------------- methods
def run_ase(structures, model, fmax, max_steps):
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    calc = gs.GeoditeCalculator(model)
    energies, steps, converged = [], [], []
    for atoms in structures:
        a = atoms.copy()
        a.calc = calc
        opt = FIRE(FrechetCellFilter(a), logfile=None)
        with warnings.catch_warnings():  # scipy's "logm result may be inaccurate" (~1e-12) inside the filter
            warnings.simplefilter("ignore", RuntimeWarning)
            converged.append(bool(opt.run(fmax=fmax, steps=max_steps)))
        energies.append(a.get_potential_energy())
        steps.append(opt.nsteps)
    return {"energy": energies, "n_steps": steps, "converged": converged}


def run_torchsim(structures, model, fmax, max_steps, max_atoms):
    import torch_sim as ts
    from torch_sim.autobatching import InFlightAutoBatcher

    tsm = gs.TorchSimModel(model)
    # torch-sim refuses a system larger than the budget (relax_many runs it alone): widen the budget to it.
    budget = float(max(max_atoms, max(len(a) for a in structures)))
    batcher = InFlightAutoBatcher(tsm, memory_scales_with="n_atoms", max_memory_scaler=budget)
    conv_fn = ts.generate_force_convergence_fn(fmax, include_cell_forces=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = ts.optimize(system=list(structures), model=tsm, optimizer=ts.Optimizer.fire, convergence_fn=conv_fn,
                            max_steps=max_steps, autobatcher=batcher,
                            init_kwargs={"cell_filter": ts.CellFilter.frechet, "fire_flavor": "ase_fire"})
    energy = final.energy.detach().cpu().double().tolist()  # the last evaluation of each system
    try:
        converged = [bool(c) for c in conv_fn(final, None).tolist()]
    except Exception:
        converged = None
    return {"energy": energy, "n_steps": None, "converged": converged}


def run_relax_many(structures, model, fmax, max_steps, max_atoms):
    res = gs.relax_many(structures, model, fmax=fmax, max_steps=max_steps, max_atoms=max_atoms, progress=False)
    return {"energy": [r.energy for r in res], "n_steps": [r.n_steps for r in res],
            "converged": [r.converged for r in res], "errors": [r.error for r in res if r.error]}


# ---------------------------------------------------------------------------------------------- profiling
class _Timed:
    """Accumulate wall time of calls to a function (patched in place by :func:`time_split`)."""

    def __init__(self, fn, acc: dict, key: str):
        self.fn, self.acc, self.key = fn, acc, key

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.acc[self.key] = self.acc.get(self.key, 0.0) + time.perf_counter() - t0

    def __get__(self, obj, objtype=None):  # bind like a function when patched on a class
        return self if obj is None else (lambda *a, **kw: self(obj, *a, **kw))


def time_split(fn) -> dict:
    """Run ``fn`` with timers on the model, the neighbour list, the ASE calculator and the FIRE step.

    Returns seconds: total, model (excluding its neighbour list), neighbour list, integrator (ASE: FIRE +
    FrechetCellFilter + optimiser bookkeeping; relax_many: ``fire_step``), other (ASE: the calculator's
    own overhead, batch building and conversions; relax_many: failure checks, scheduler, results).
    """
    import geodite_sim.calculators as calcs
    import geodite_sim.neighbors as nbr
    import geodite_sim.relax as relax

    acc: dict[str, float] = {}
    patches = [(nbr, "neighbor_list", "nl"), (relax, "neighbor_list", "nl"), (Geodite, "forward", "model"),
               (calcs.GeoditeCalculator, "calculate", "calc"), (relax, "fire_step", "fire")]
    saved = [(obj, name, getattr(obj, name) if obj is not Geodite and obj is not calcs.GeoditeCalculator
              else obj.__dict__[name]) for obj, name, _ in patches]
    for (obj, name, key), (_, _, orig) in zip(patches, saved):
        setattr(obj, name, _Timed(orig, acc, key))
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        total = time.perf_counter() - t0
        for obj, name, orig in saved:
            setattr(obj, name, orig)
    nl, model, calc, fire = (acc.get(k, 0.0) for k in ("nl", "model", "calc", "fire"))
    model_only = model - (nl if calc else 0.0)  # the calculator path builds the list inside the model
    if calc:  # ASE: everything outside the calculator is optimiser + filter
        integ, other = total - calc, calc - model
    else:
        integ, other = fire, total - model - nl - fire
    return {"total_s": total, "model_s": model_only, "neighbour_list_s": nl, "integrator_s": integ,
            "other_s": other}


# ---------------------------------------------------------------------------------------------- driver
def compare(ref, other, structures):
    n = np.array([len(a) for a in structures])
    d = np.abs(np.array(ref["energy"]) - np.array(other["energy"])) / n
    out = {"dE_per_atom_median": float(np.median(d)), "dE_per_atom_max": float(d.max()),
           "frac_within_1meV_per_atom": float((d < 1e-3).mean())}
    if ref.get("n_steps") and other.get("n_steps"):
        out["frac_same_steps"] = float(np.mean(np.array(ref["n_steps"]) == np.array(other["n_steps"])))
    return out


def bench_model(name, structures, args, methods, max_steps) -> dict:
    from geodite_sim.relax import estimate_capacity

    dtype = getattr(torch, args.dtype)
    model = load(name, dtype, args.device)
    max_atoms = args.max_atoms or estimate_capacity(model, args.device, probe=structures[:8]).max_atoms
    # warm-up (vacuum-feature cache, neighbour-list kernels, allocator)
    gs.relax_many(structures[:2], model, max_steps=2, progress=False, max_atoms=max_atoms)
    n_atoms = sum(len(a) for a in structures)
    entry = {"model": getattr(model, "name", name), "n_structures": len(structures), "n_atoms": n_atoms,
             "max_steps": max_steps, "max_atoms": max_atoms, "sizes": [len(a) for a in structures], "methods": {}}
    runs = {}
    for key in methods:
        fn = {"a": lambda: run_ase(structures, model, args.fmax, max_steps),
              "b": lambda: run_torchsim(structures, model, args.fmax, max_steps, max_atoms),
              "c": lambda: run_relax_many(structures, model, args.fmax, max_steps, max_atoms)}[key]
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        runs[key] = out
        conv = out.get("converged")
        entry["methods"][key] = {
            "wall_s": wall, "structures_per_s": len(structures) / wall,
            "converged": int(sum(conv)) if conv is not None else None,
            "steps_total": int(sum(out["n_steps"])) if out.get("n_steps") else None,
        }
        print(f"  ({key}) {LABELS[key]:34s} {wall:8.1f} s  {len(structures) / wall:7.3f} structures/s  "
              f"converged {entry['methods'][key]['converged']}", flush=True)
    m = entry["methods"]
    if "a" in m and "c" in m:
        entry["ratio_c_over_a"] = m["c"]["structures_per_s"] / m["a"]["structures_per_s"]
        entry["agreement_c_vs_a"] = compare(runs["a"], runs["c"], structures)
    if "b" in m and "c" in m:
        entry["ratio_c_over_b"] = m["c"]["structures_per_s"] / m["b"]["structures_per_s"]
        entry["agreement_c_vs_b"] = compare(runs["b"], runs["c"], structures)
    if args.profile:
        k = min(len(structures), args.profile_n)
        sub = structures[:k]
        entry["profile"] = {"n_structures": k}
        if "a" in methods:
            entry["profile"]["a"] = time_split(lambda: run_ase(sub, model, args.fmax, max_steps))
        if "c" in methods:
            entry["profile"]["c"] = time_split(lambda: run_relax_many(sub, model, args.fmax, max_steps, max_atoms))
    return entry


LABELS = {"a": "ASE FIRE+FrechetCellFilter (1 by 1)", "b": "torch-sim ts.optimize (batched)",
          "c": "geodite_sim.relax_many"}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Relaxation throughput ({report['device']}, {s['dtype']}, {s['threads']} torch thread(s), "
             f"fmax {s['fmax']})", ""]
    lines.append("| model | structures (atoms) | max_steps | atom budget | (a) ASE 1-by-1 /s | (b) torch-sim /s | "
                 "(c) relax_many /s | (c)/(a) | (c)/(b) | converged a/b/c | median, max \\|ΔE\\| c-a (eV/atom) | "
                 "median, max \\|ΔE\\| c-b (eV/atom) | same steps c-a |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in report["models"]:
        m = e["methods"]

        def rate(k, m=m):
            return f"{m[k]['structures_per_s']:.3f}" if k in m else "-"

        def conv(k, m=m):
            return str(m[k]["converged"]) if k in m and m[k]["converged"] is not None else "-"

        ag = e.get("agreement_c_vs_a", {})
        bg = e.get("agreement_c_vs_b", {})
        nan = float("nan")
        lines.append(
            f"| {e['model']} | {e['n_structures']} ({e['n_atoms']}) | {e['max_steps']} | {e['max_atoms']} | "
            f"{rate('a')} | {rate('b')} | {rate('c')} | "
            f"{e.get('ratio_c_over_a', nan):.2f} | {e.get('ratio_c_over_b', nan):.2f} | "
            f"{conv('a')}/{conv('b')}/{conv('c')} | "
            f"{ag.get('dE_per_atom_median', nan):.1e}, {ag.get('dE_per_atom_max', nan):.1e} | "
            f"{bg.get('dE_per_atom_median', nan):.1e}, {bg.get('dE_per_atom_max', nan):.1e} | "
            f"{ag.get('frac_same_steps', nan):.2f} |")
    prof = [e for e in report["models"] if "profile" in e]
    if prof:
        lines += ["", "Where the time goes (seconds; timers on the model, neighbour list, calculator and FIRE step)", ""]
        lines.append("| model | method | total | model | neighbour list | integrator | other |")
        lines.append("|---|---|---|---|---|---|---|")
        for e in prof:
            for k in ("a", "c"):
                if k in e["profile"]:
                    p = e["profile"][k]
                    lines.append(f"| {e['model']} ({e['profile']['n_structures']} structures) | ({k}) | "
                                 f"{p['total_s']:.1f} | {p['model_s']:.1f} | {p['neighbour_list_s']:.1f} | "
                                 f"{p['integrator_s']:.1f} | {p['other_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~2 min version (fewer structures and steps)")
    p.add_argument("--model", default=None,
                   help="checkpoint path or packaged name; default: 'small' on all structures and "
                        "'geodite-reference-random' (Geodite-MP config) on a subset")
    p.add_argument("--n", type=int, default=None, help="structures (default 128; quick 24)")
    p.add_argument("--n-large-model", type=int, default=None,
                   help="structures for the Geodite-MP config (default 8; quick 4)")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=None,
                   help="default 15 (quick 10); Geodite-MP config: 2/3 of it; multiples of 5, torch-sim's "
                        "steps_between_swaps (it runs max_steps // 5 swap intervals)")
    p.add_argument("--max-atoms", type=int, default=None,
                   help="atom budget of (b) and (c) (default: relax_many's estimate_capacity for the model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and BLAS threads)")
    p.add_argument("--methods", default="abc")
    p.add_argument("--sizes", default=None, help="target sizes cycled over the structures, e.g. 2,4,8 "
                                                 f"(default {','.join(map(str, SIZES))})")
    p.add_argument("--profile", action="store_true", help="time split of (a) and (c) on a subset")
    p.add_argument("--profile-n", type=int, default=16)
    p.add_argument("--out", default=None,
                   help="JSON report (default benchmarks/results/relax_throughput.json; _quick.json with --quick)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS / ("relax_throughput_quick.json" if args.quick else "relax_throughput.json"))
    n = args.n or (24 if args.quick else 128)
    n_large = args.n_large_model if args.n_large_model is not None else (4 if args.quick else 8)
    args.max_steps = args.max_steps or (10 if args.quick else 15)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from threadpoolctl import threadpool_limits

    structures = make_structures(n, sizes=[int(x) for x in args.sizes.split(",")] if args.sizes else None)
    plan = [(args.model, structures, args.max_steps)] if args.model else [("small", structures, args.max_steps)]
    if not args.model and n_large > 0:
        # spread the subset over prototypes and sizes
        idx = np.linspace(0, n - 1, n_large).round().astype(int)
        steps_large = max(5, int(round(2 * args.max_steps / 3 / 5)) * 5)
        plan.append(("geodite-reference-random", [structures[i] for i in idx], steps_large))
    device = "cpu: " + (platform.processor() or platform.machine()) if args.device == "cpu" else \
        torch.cuda.get_device_name(args.device)
    report = {"device": device, "settings": {"fmax": args.fmax, "sizes": args.sizes or "default", "dtype": args.dtype, "threads": args.threads,
                                             "quick": args.quick, "torch": torch.__version__,
                                             "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
              "models": []}
    with threadpool_limits(args.threads):
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for name, structs, steps in plan:
            print(f"{name}: {len(structs)} structures, {sum(len(a) for a in structs)} atoms", flush=True)
            report["models"].append(bench_model(name, structs, args, args.methods, steps))
            report["settings"]["load_average_end"] = os.getloadavg()
            out.write_text(json.dumps(report, indent=1))  # after each model: a late failure keeps the rest
            out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
