"""Same model, three engines: geodite_sim vs torch-sim vs ASE one by one (relaxation and NVT MD).

For each model (SevenNet-0 from the ``sevenn`` wheel, and the packaged default Geodite) and each set size
(default 64 and 512 structures of 2-64 atoms, ``relax_throughput.make_structures``), it times:

relaxation (FIRE, ASE's algorithm, Fréchet cell filter, same ``fmax`` on atoms and cell, same max steps):
  * ``geodite_sim.relax_many`` (batched, in-flight refill);
  * torch-sim ``ts.optimize`` (``ase_fire`` flavour, ``CellFilter.frechet``, force convergence
    ``ts.generate_force_convergence_fn(fmax, include_cell_forces=True)``, ``InFlightAutoBatcher`` with the
    same atom budget);
  * ASE ``FIRE(FrechetCellFilter(atoms))`` one structure after another (SevenNet-0: ``SevenNetCalculator``;
    Geodite: ``GeoditeCalculator``).

NVT MD (Nosé–Hoover chain, same T, time step, tdamp = tau and chain length, ``--md-steps`` steps):
  * ``geodite_sim.run_md(ensemble="nvt_nhc")``;
  * torch-sim ``ts.integrate(integrator=ts.Integrator.nvt_nose_hoover)`` with tau passed explicitly
    (torch-sim's default is 10 dt, not the 100 dt its docstring says);
  * ASE ``NoseHooverChainNVT`` one structure after another.

torch-sim drives the model's own torch-sim wrapper (SevenNet-0: ``sevenn.torchsim.SevenNetModel``; Geodite:
``geodite_sim.TorchSimModel``). Engines alternate order between repeats; each is warmed up on two small
structures first (kernel compilation, caches). Reported: wall seconds, structures/s, atom-steps/s (atoms x
model evaluations: geodite_sim and ASE from their step counts, torch-sim counted by a wrapper around its
model), and final-energy agreement with ASE (relaxation). JSON + markdown table in ``benchmarks/results/``.

    OMP_NUM_THREADS=1 python benchmarks/same_model_peers.py --quick          # ~1 min smoke run
    python benchmarks/same_model_peers.py                                   # 64 and 512 structures
    python benchmarks/same_model_peers.py --models geodite-mini --sizes 64 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from relax_throughput import make_structures  # noqa: E402

import geodite_sim as gs  # noqa: E402
from geodite_sim.model.contract import model_fingerprint, model_name  # noqa: E402

RESULTS = HERE / "results"
ENGINES = ("geodite_sim", "torch-sim", "ase")
QUICK_SIZES = [2, 3, 4, 6]


# ---------------------------------------------------------------------------------------------- models
def load(name: str):
    """(contract model for geodite_sim, torch-sim ModelInterface, ASE calculator factory)."""
    model = gs.load_model(name, dtype=torch.float32)
    if name.lower() in ("sevennet-0", "7net-0"):
        ts_model = model.model  # sevenn.torchsim.SevenNetModel: what a torch-sim user runs

        @functools.cache  # built once (loading the checkpoint takes seconds), outside the timings after warm-up
        def ase_calc():
            from sevenn.calculator import SevenNetCalculator

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return SevenNetCalculator("7net-0", device="cpu")
    else:
        ts_model = gs.TorchSimModel(model)

        @functools.cache
        def ase_calc():
            return gs.GeoditeCalculator(model)
    return model, ts_model, ase_calc


def counting(ts_model):
    """A torch-sim model that counts the atoms it evaluates (``.atom_evals``)."""
    from torch_sim.models.interface import ModelInterface

    class Counting(ModelInterface):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self._device, self._dtype = inner.device, inner.dtype
            self._compute_stress, self._compute_forces = inner.compute_stress, inner.compute_forces
            self._memory_scales_with = "n_atoms"
            self.atom_evals = 0

        def forward(self, state, **kw):
            self.atom_evals += int(state.n_atoms)
            return self.inner(state, **kw)

    return Counting(ts_model)


# ---------------------------------------------------------------------------------------------- relaxation
def relax_geodite(structs, model, ts_model, ase_calc, a):
    res = gs.relax_many(structs, model, fmax=a.fmax, max_steps=a.max_steps, max_atoms=a.max_atoms, progress=False)
    return {"energy": [r.energy for r in res], "n_steps": [r.n_steps for r in res],
            "converged": [bool(r.converged) for r in res], "errors": [r.error for r in res if r.error],
            "atom_evals": sum(len(s) * (r.n_steps + 1) for s, r in zip(structs, res, strict=True))}


def relax_torchsim(structs, model, ts_model, ase_calc, a):
    import torch_sim as ts
    from torch_sim.autobatching import InFlightAutoBatcher

    tsm = counting(ts_model)
    budget = float(max(a.max_atoms, max(len(s) for s in structs)))
    batcher = InFlightAutoBatcher(tsm, memory_scales_with="n_atoms", max_memory_scaler=budget)
    conv = ts.generate_force_convergence_fn(a.fmax, include_cell_forces=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = ts.optimize(system=[s.copy() for s in structs], model=tsm, optimizer=ts.Optimizer.fire,
                            convergence_fn=conv, max_steps=a.max_steps, autobatcher=batcher,
                            init_kwargs={"cell_filter": ts.CellFilter.frechet, "fire_flavor": "ase_fire"})
    return {"energy": final.energy.detach().double().cpu().tolist(), "n_steps": None,
            "converged": [bool(c) for c in conv(final, None).tolist()], "errors": [], "atom_evals": tsm.atom_evals}


def relax_ase(structs, model, ts_model, ase_calc, a):
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    calc = ase_calc()
    energies, steps, converged, evals = [], [], [], 0
    for s in structs:
        at = s.copy()
        at.calc = calc
        opt = FIRE(FrechetCellFilter(at), logfile=None)
        with warnings.catch_warnings():  # scipy's "logm result may be inaccurate" inside the filter
            warnings.simplefilter("ignore", RuntimeWarning)
            converged.append(bool(opt.run(fmax=a.fmax, steps=a.max_steps)))
        energies.append(float(at.get_potential_energy()))
        steps.append(int(opt.nsteps))
        evals += len(at) * (opt.nsteps + 1)
    return {"energy": energies, "n_steps": steps, "converged": converged, "errors": [], "atom_evals": evals}


# ---------------------------------------------------------------------------------------------- MD
def md_geodite(structs, model, ts_model, ase_calc, a):
    res = gs.run_md(structs, model, ensemble="nvt_nhc", temperature=a.temperature, timestep=a.timestep,
                    steps=a.md_steps, tdamp=a.tdamp, chain_length=a.chain, max_atoms=a.max_atoms, progress=False,
                    seed=1)
    return {"energy": [r.energy for r in res], "temperature": [r.temperature for r in res],
            "errors": [r.error for r in res if r.error],
            "atom_evals": sum(len(s) * r.n_steps for s, r in zip(structs, res, strict=True))}


def md_torchsim(structs, model, ts_model, ase_calc, a):
    import torch_sim as ts

    tsm = counting(ts_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = ts.integrate(system=[s.copy() for s in structs], model=tsm, integrator=ts.Integrator.nvt_nose_hoover,
                             n_steps=a.md_steps, temperature=a.temperature, timestep=a.timestep / 1000.0,
                             init_kwargs={"tau": a.tdamp / 1000.0, "chain_length": a.chain, "chain_steps": 1,
                                          "sy_steps": 3})
    temp = ts.calc_temperature(masses=final.masses, momenta=final.momenta, system_idx=final.system_idx)
    return {"energy": final.energy.detach().double().cpu().tolist(),
            "temperature": temp.detach().double().cpu().tolist(), "errors": [],
            "atom_evals": tsm.atom_evals}


def md_ase(structs, model, ts_model, ase_calc, a):
    from ase import units
    from ase.md.nose_hoover_chain import NoseHooverChainNVT
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    calc = ase_calc()
    energies, temps, evals = [], [], 0
    for k, s in enumerate(structs):
        at = s.copy()
        at.calc = calc
        with warnings.catch_warnings():  # ASE 3.29 deprecates the helper in favour of thermalize_momenta
            warnings.simplefilter("ignore", DeprecationWarning)
            MaxwellBoltzmannDistribution(at, temperature_K=a.temperature, rng=np.random.default_rng(k))
        Stationary(at)
        dyn = NoseHooverChainNVT(at, timestep=a.timestep * units.fs, temperature_K=a.temperature,
                                 tdamp=a.tdamp * units.fs, tchain=a.chain)
        dyn.run(a.md_steps)
        energies.append(float(at.get_potential_energy()))
        temps.append(float(at.get_temperature()))
        evals += len(at) * (a.md_steps + 1)
    return {"energy": energies, "temperature": temps, "errors": [], "atom_evals": evals}


RELAX = {"geodite_sim": relax_geodite, "torch-sim": relax_torchsim, "ase": relax_ase}
MD = {"geodite_sim": md_geodite, "torch-sim": md_torchsim, "ase": md_ase}


# ---------------------------------------------------------------------------------------------- driver
def timed(fn, *args) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def agreement(ref: dict, other: dict, structs) -> dict:
    """Final-energy differences (eV/atom) against the reference engine; equal step counts where both have them."""
    n = np.array([len(s) for s in structs], dtype=float)
    d = np.abs(np.array(other["energy"], dtype=float) - np.array(ref["energy"], dtype=float)) / n
    d = d[np.isfinite(d)]
    out = {"max_abs_dE_per_atom": float(d.max()) if d.size else None,
           "median_abs_dE_per_atom": float(np.median(d)) if d.size else None}
    if ref.get("n_steps") and other.get("n_steps"):
        out["same_step_count"] = float(np.mean(np.array(ref["n_steps"]) == np.array(other["n_steps"])))
    return out


def bench(kind: str, name: str, structs, loaded, args) -> dict:
    table = RELAX if kind == "relax" else MD
    n_atoms = sum(len(s) for s in structs)
    warm = structs[:2]
    warm_args = argparse.Namespace(**{**vars(args), "max_steps": 3, "md_steps": 2})
    for engine in ENGINES:  # warm-up: kernel compilation, caches, lazy imports
        table[engine](warm, *loaded, warm_args)
    runs = {e: [] for e in ENGINES}
    outputs = {}
    for r in range(args.repeats):
        order = ENGINES[r % 3:] + ENGINES[: r % 3]
        for engine in order:
            wall, out = timed(table[engine], structs, *loaded, args)
            runs[engine].append(wall)
            outputs[engine] = out
            print(f"  {kind:5s} {name:14s} {len(structs):4d} structures  {engine:11s} {wall:8.2f} s", flush=True)
    rows = {}
    for engine in ENGINES:
        wall = min(runs[engine])
        out = outputs[engine]
        rows[engine] = {
            "wall_s": wall, "wall_s_all": runs[engine], "structures_per_s": len(structs) / wall,
            "atom_steps_per_s": out["atom_evals"] / wall, "atom_evals": out["atom_evals"],
            "converged": (sum(out["converged"]) if "converged" in out else None),
            "errors": out["errors"][:3], "n_errors": len(out["errors"]),
            "mean_final_energy_per_atom": float(np.nanmean(np.array(out["energy"], float) /
                                                           np.array([len(s) for s in structs]))),
        }
        if "temperature" in out:
            rows[engine]["mean_final_temperature_K"] = float(np.nanmean(np.array(out["temperature"], float)))
        if kind == "relax" and engine != "ase":
            rows[engine]["vs_ase"] = agreement(outputs["ase"], out, structs)
    gs_rate = rows["geodite_sim"]["structures_per_s"]
    return {"kind": kind, "model": name, "n_structures": len(structs), "n_atoms": n_atoms, "engines": rows,
            "speedup_vs_torchsim": gs_rate / rows["torch-sim"]["structures_per_s"],
            "speedup_vs_ase": gs_rate / rows["ase"]["structures_per_s"]}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Same model, three engines ({'quick' if s['quick'] else 'full'} run)", "",
             f"{report['machine']}; torch {report['versions']['torch']}, torch-sim {report['versions']['torch_sim']}, "
             f"ASE {report['versions']['ase']}, sevenn {report['versions']['sevenn']}; float32; "
             f"{s['threads']} torch threads. Relax: FIRE + Fréchet cell filter, fmax {s['fmax']} eV/Å, "
             f"max {s['max_steps']} steps. MD: NHC, {s['temperature']} K, dt {s['timestep']} fs, "
             f"tdamp = tau {s['tdamp']} fs, chain {s['chain']}, {s['md_steps']} steps. Best of {s['repeats']}.", "",
             "| task | model | structures (atoms) | engine | wall s | structures/s | atom-steps/s | converged | "
             "max abs dE vs ASE (eV/atom) | same steps as ASE |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for b in report["benchmarks"]:
        for engine, r in b["engines"].items():
            agree = r.get("vs_ase", {})
            dE = agree.get("max_abs_dE_per_atom")
            same = agree.get("same_step_count")
            conv = "" if r["converged"] is None else f"{r['converged']}/{b['n_structures']}"
            lines.append(f"| {b['kind']} | {b['model']} | {b['n_structures']} ({b['n_atoms']}) | {engine} | "
                         f"{r['wall_s']:.2f} | {r['structures_per_s']:.2f} | {r['atom_steps_per_s']:.0f} | {conv} | "
                         f"{'' if dE is None else f'{dE:.1e}'} | {'' if same is None else f'{100 * same:.0f} %'} |")
    lines += ["", "Speed-ups of geodite_sim (structures/s):", ""]
    for b in report["benchmarks"]:
        lines.append(f"- {b['kind']} {b['model']} x{b['n_structures']}: {b['speedup_vs_torchsim']:.2f}x torch-sim, "
                     f"{b['speedup_vs_ase']:.2f}x ASE one by one")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (4 structures of 2-6 atoms, few steps)")
    p.add_argument("--models", default="sevennet-0,geodite-mini")
    p.add_argument("--sizes", default="64,512", help="numbers of structures")
    p.add_argument("--tasks", default="relax,md")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--max-steps", dest="max_steps", type=int, default=200)
    p.add_argument("--md-steps", dest="md_steps", type=int, default=50)
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--timestep", type=float, default=2.0, help="fs")
    p.add_argument("--tdamp", type=float, default=None, help="fs (default 100 time steps)")
    p.add_argument("--chain", type=int, default=3)
    p.add_argument("--max-atoms", dest="max_atoms", type=int, default=4096,
                   help="atoms per batch (both batched engines)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/same_model_peers[_quick])")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.tdamp is None:
        a.tdamp = 100 * a.timestep
    sizes = [int(x) for x in a.sizes.split(",")]
    if a.quick:
        sizes, a.max_steps, a.md_steps = [4], min(a.max_steps, 12), min(a.md_steps, 4)
    import ase
    import torch_sim

    try:
        import sevenn

        sevenn_version = sevenn.__version__
    except ImportError:
        sevenn_version = None
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "torch_sim": torch_sim.__version__, "ase": ase.__version__,
                     "sevenn": sevenn_version, "geodite_sim": gs.__version__},
        "settings": {"quick": a.quick, "fmax": a.fmax, "max_steps": a.max_steps, "md_steps": a.md_steps,
                     "temperature": a.temperature, "timestep": a.timestep, "tdamp": a.tdamp, "chain": a.chain,
                     "max_atoms": a.max_atoms, "repeats": a.repeats, "threads": torch.get_num_threads(),
                     "sizes": sizes},
        "models": {}, "benchmarks": [],
    }
    for name in a.models.split(","):
        loaded = load(name)
        report["models"][name] = {"name": model_name(loaded[0]), "fingerprint": model_fingerprint(loaded[0]),
                                  "cutoff": loaded[0].cutoff}
        for n in sizes:
            structs = make_structures(n, seed=0, sizes=QUICK_SIZES if a.quick else None)
            for kind in a.tasks.split(","):
                report["benchmarks"].append(bench(kind, name, structs, loaded, a))
    stem = Path(a.out) if a.out else RESULTS / ("same_model_peers_quick" if a.quick else "same_model_peers")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
