"""MD throughput: µs per atom per step of Nosé–Hoover chain NVT on one set of 8–32 crystals (64–384 atoms).

Three engines, same model, same structures, same settings (NHC, 10 thermostats, tdamp = 100 dt,
dt = 1.5 fs, 600 K):

(a) ASE ``NoseHooverChainNVT`` with ``GeoditeCalculator``, one system after another;
(b) torch-sim ``ts.integrate(..., integrator="nvt_nose_hoover")`` with ``TorchSimModel`` on the whole set
    (tau passed explicitly = 100 dt: torch-sim's code default is 10 dt);
(c) ``geodite_sim.run_md`` on the whole set.

Each timing includes the engine's initial force evaluation (so every engine pays steps + 1 model calls);
compilation and caches are warmed on a separate small run first. Both wall-clock and process CPU time
(user + system, all threads) are reported: on a shared machine the CPU time is the robust figure.
A batched model-only evaluation (forward + forces) is timed too, so that the engine overhead is
visible. ``--capacity N`` adds run_md with ``max_atoms=N`` (continuous batching in smaller batches).

    python benchmarks/md_throughput.py            # default model (Geodite 64 ch x 3 layers, random), 16 systems
    python benchmarks/md_throughput.py --quick    # 8 systems (~2-3 minutes of CPU)
    python benchmarks/md_throughput.py --full     # also the Geodite-MP architecture (geodite-reference-random)
    python benchmarks/md_throughput.py --model morse   # the Morse pair potential: engine overhead dominates

Writes ``benchmarks/results/md_throughput.json`` and ``.md`` (a markdown table).
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

import torch
from ase import Atoms, units
from ase.build import bulk

ROOT = Path(__file__).resolve().parent
TEMPERATURE = 600.0
TIMESTEP_FS = 1.5
CHAIN = 10

#: (prototype, repetitions) -> atoms: 64 .. 384
CATALOGUE = [
    (("Cu", "fcc", 3.61), (2, 2, 4)),  # 64
    (("NaCl", "rocksalt", 5.64), (2, 2, 3)),  # 96
    (("Si", "diamond", 5.43), (2, 2, 4)),  # 128
    (("CsCl", "cesiumchloride", 4.12), (4, 4, 4)),  # 128
    (("LiF", "rocksalt", 4.03), (3, 3, 2)),  # 144
    (("Al", "fcc", 4.05), (3, 4, 4)),  # 192
    (("MgO", "rocksalt", 4.21), (3, 3, 3)),  # 216
    (("Ni", "fcc", 3.52), (4, 4, 4)),  # 256
    (("Ge", "diamond", 5.66), (3, 3, 4)),  # 288
    (("KCl", "rocksalt", 6.29), (4, 4, 3)),  # 384
    (("Cu", "fcc", 3.61), (3, 3, 3)),  # 108
    (("NaCl", "rocksalt", 5.64), (2, 2, 2)),  # 64
    (("Si", "diamond", 5.43), (3, 3, 3)),  # 216
    (("Al", "fcc", 4.05), (4, 4, 6)),  # 384
    (("LiF", "rocksalt", 4.03), (2, 2, 4)),  # 128
    (("CsCl", "cesiumchloride", 4.12), (4, 4, 5)),  # 160
]


def structures(n: int, seed: int = 0) -> list[Atoms]:
    from geodite_sim.dynamics.velocities import maxwell_boltzmann

    out = []
    for i in range(n):
        (formula, kind, a), reps = CATALOGUE[i % len(CATALOGUE)]
        atoms = bulk(formula, kind, a, cubic=True) * reps
        atoms.rattle(0.05, seed=seed + i)
        atoms.set_momenta(maxwell_boltzmann(atoms, TEMPERATURE, seed, i))
        out.append(atoms)
    return out


def make_model(name: str, dtype: torch.dtype):
    from geodite_sim.model import Geodite, GeoditeConfig, load_model
    from geodite_sim.model.checkpoint import prepare_for_inference

    if name == "small":
        torch.manual_seed(0)
        model = Geodite(GeoditeConfig(hidden_channels=64, num_layers=3))
        model = prepare_for_inference(model, "cpu", dtype)
        model.name = "geodite-small-random (64 ch, 3 layers)"
        return model
    if name == "morse":
        from geodite_sim.pair_potential import MorsePotential

        model = MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2, dtype=dtype)
        model.name = "morse"
        return model
    model = load_model("geodite-reference-random" if name == "reference" else name, dtype=dtype)
    if name == "reference":
        model.name = "geodite-reference-random (Geodite-MP architecture)"
    return model


def n_atoms(structs) -> int:
    return sum(len(a) for a in structs)


class Timer:
    """Wall-clock and process CPU time (user + system, all threads) of a block."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def time_ase(structs, model, steps: int) -> Timer:
    from ase.md.nose_hoover_chain import NoseHooverChainNVT

    from geodite_sim import GeoditeCalculator

    warm = structs[0].copy()
    warm.calc = GeoditeCalculator(model)
    warm.get_forces()
    with Timer() as t:
        for atoms in structs:
            a = atoms.copy()
            a.calc = GeoditeCalculator(model)
            dyn = NoseHooverChainNVT(a, timestep=TIMESTEP_FS * units.fs, temperature_K=TEMPERATURE,
                                     tdamp=100 * TIMESTEP_FS * units.fs, tchain=CHAIN)
            dyn.run(steps)
    return t


def time_torchsim(structs, model, steps: int) -> Timer:
    import torch_sim as ts

    from geodite_sim import TorchSimModel

    tsm = TorchSimModel(model, compute_stress=False)
    kw = dict(integrator=ts.Integrator.nvt_nose_hoover, temperature=TEMPERATURE, timestep=TIMESTEP_FS / 1000,
              init_kwargs=dict(tau=100 * TIMESTEP_FS / 1000, chain_length=CHAIN, chain_steps=1, sy_steps=3))
    ts.integrate(system=[a.copy() for a in structs[:2]], model=tsm, n_steps=1, **kw)
    systems = [a.copy() for a in structs]
    with Timer() as t:
        ts.integrate(system=systems, model=tsm, n_steps=steps, **kw)
    return t


def time_run_md(structs, model, steps: int, max_atoms: int = 100_000) -> Timer:
    from geodite_sim import run_md

    kw = dict(ensemble="nvt_nhc", temperature=TEMPERATURE, timestep=TIMESTEP_FS, chain_length=CHAIN, progress=False,
              max_atoms=max_atoms)
    run_md(structs[:2], model, steps=1, **kw)
    with Timer() as t:
        res = run_md(structs, model, steps=steps, **kw)
    bad = [r.error for r in res if r.error]
    if bad:
        print(f"warning: {len(bad)} systems stopped early: {bad[0]}", file=sys.stderr)
    return t


def time_model(structs, model) -> Timer:
    from geodite_sim.batch import Batch
    from geodite_sim.neighbors import neighbor_list

    batch = Batch.from_atoms(structs, dtype=model.dtype, device=model.device)
    edges = neighbor_list(batch, model.cutoff)
    model(batch, edges=edges, compute_stress=False)
    with Timer() as t:
        model(batch, edges=edges, compute_stress=False)
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="small (default) | reference | morse | checkpoint path")
    p.add_argument("--full", action="store_true", help="also benchmark the Geodite-MP architecture")
    p.add_argument("--quick", action="store_true", help="8 systems instead of 16")
    p.add_argument("--systems", type=int, default=None, help="number of systems (8-32; default 16, quick 8)")
    p.add_argument("--steps", type=int, default=None, help="MD steps per engine (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--capacity", type=int, default=None,
                   help="also time run_md with this max_atoms (continuous batching in smaller batches)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--out", default=str(ROOT / "results" / "md_throughput.json"))
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    n_sys = args.systems or (8 if args.quick else 16)
    steps = args.steps or 2
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    structs = structures(n_sys)
    total = n_atoms(structs)
    models = [args.model] + (["reference"] if args.full and args.model != "reference" else [])
    print(f"{n_sys} systems, {total} atoms ({min(map(len, structs))}-{max(map(len, structs))} per system), "
          f"{steps} steps, {args.dtype}, {args.threads} thread(s)", flush=True)
    results = {}
    for name in models:
        model = make_model(name, dtype)
        row = {"model": model.name}
        per = 1e6 / (total * steps)
        t = time_model(structs, model)
        row["model_only_us_per_atom"] = t.wall * 1e6 / total
        row["model_only_cpu_us_per_atom"] = t.cpu * 1e6 / total
        print(f"  {name}: model only (batched forward + forces) {row['model_only_us_per_atom']:.1f} us/atom "
              f"(cpu {row['model_only_cpu_us_per_atom']:.1f})", flush=True)
        engines = [("ase", time_ase), ("torchsim", time_torchsim), ("run_md", time_run_md)]
        if args.capacity:
            engines.append(("run_md_cap", lambda st, m, k: time_run_md(st, m, k, max_atoms=args.capacity)))
        for key, fn in engines:
            t = fn(structs, model, steps)
            row[f"{key}_s"], row[f"{key}_cpu_s"] = t.wall, t.cpu
            row[f"{key}_us_per_atom_step"] = t.wall * per
            row[f"{key}_cpu_us_per_atom_step"] = t.cpu * per
            print(f"  {name}: {key:9s} {t.wall:8.2f} s wall {t.cpu:8.2f} s cpu  {t.wall * per:10.1f} us/atom/step "
                  f"(cpu {t.cpu * per:.1f})", flush=True)
        for kind in ("", "cpu_"):
            c = row[f"run_md_{kind}us_per_atom_step"]
            row[f"ratio_{kind}run_md_over_ase"] = c / row[f"ase_{kind}us_per_atom_step"]
            row[f"ratio_{kind}run_md_over_torchsim"] = c / row[f"torchsim_{kind}us_per_atom_step"]
            if args.capacity:
                c = row[f"run_md_cap_{kind}us_per_atom_step"]
                row[f"ratio_{kind}run_md_cap_over_ase"] = c / row[f"ase_{kind}us_per_atom_step"]
                row[f"ratio_{kind}run_md_cap_over_torchsim"] = c / row[f"torchsim_{kind}us_per_atom_step"]
        results[name] = row
    import torch_sim

    import geodite_sim

    payload = {
        "settings": {"systems": n_sys, "atoms": total, "atoms_per_system": [len(a) for a in structs], "steps": steps,
                     "dtype": args.dtype, "threads": args.threads, "ensemble": "NHC NVT", "chain_length": CHAIN,
                     "tdamp": "100 dt", "timestep_fs": TIMESTEP_FS, "temperature_K": TEMPERATURE,
                     "capacity": args.capacity,
                     "timing": "wall clock and process CPU time; each engine's initial force evaluation included "
                               "(steps + 1 model calls)"},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": "cpu",
                    "load_average": os.getloadavg(), "torch": torch.__version__, "torch_sim": torch_sim.__version__,
                    "geodite_sim": geodite_sim.__version__},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    cap = f" (c') run_md max_atoms={args.capacity} | (c')/(a) | (c')/(b) |" if args.capacity else ""
    table = ["| model | time | model only µs/atom | (a) ASE µs/atom/step | (b) torch-sim | (c) run_md "
             "| (c)/(a) | (c)/(b) |" + cap, "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.capacity else "")]
    for row in results.values():
        for kind, label in (("", "wall"), ("cpu_", "CPU")):
            line = (f"| {row['model']} | {label} | {row[f'model_only_{kind}us_per_atom']:.1f} | "
                    f"{row[f'ase_{kind}us_per_atom_step']:.1f} | {row[f'torchsim_{kind}us_per_atom_step']:.1f} | "
                    f"{row[f'run_md_{kind}us_per_atom_step']:.1f} | {row[f'ratio_{kind}run_md_over_ase']:.3f} | "
                    f"{row[f'ratio_{kind}run_md_over_torchsim']:.3f} |")
            if args.capacity:
                line += (f" {row[f'run_md_cap_{kind}us_per_atom_step']:.1f} | "
                         f"{row[f'ratio_{kind}run_md_cap_over_ase']:.3f} | "
                         f"{row[f'ratio_{kind}run_md_cap_over_torchsim']:.3f} |")
            table.append(line)
    header = (f"{n_sys} systems ({total} atoms), {steps} NHC steps, {args.dtype}, CPU, {args.threads} thread(s), "
              f"load average {os.getloadavg()[0]:.1f}\n\n")
    out.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    print(header + "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
