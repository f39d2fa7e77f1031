"""One-shot GPU check of the runner (≤ 10 minutes on one GPU), writing one JSON.

Meant for an offline machine with torch and triton only (ase and h5py may be carried as small wheels;
torch-sim optional): nothing here needs nvalchemiops, pymatgen or torch-sim, and a comparison whose
package is absent is skipped with a printed reason.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json           # on the GPU machine
    python benchmarks/gpu_check.py --smoke --device cpu --out /tmp/gpu_check.json    # rehearsal on a CPU

Sections:
1. ``agreement``: CUDA vs CPU float64 on mixed systems (energies, forces, stress; max abs difference).
2. ``syncs``: host syncs per step with ``torch.cuda.set_sync_debug_mode("warn")`` counting warnings, and the
   dispatch-level count of :class:`geodite_sim.runner.counting.OpCounter` (ops, kernels, syncs per step).
3. ``relax`` / ``md``: throughput sweeps (systems × atoms per system) for the default model and the Geodite-MP
   configuration (random weights), in ``eager``, ``compile`` and ``cuda_graph`` modes: structures/s,
   atom-steps/s, ms per step.
4. ``torch_sim``: the same sweep points through torch-sim's ``ts.optimize`` / ``ts.integrate`` with the same model
   (via :class:`geodite_sim.TorchSimModel`) when torch-sim imports.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cells(n_systems: int, n_atoms: int, seed: int = 0):
    """``n_systems`` rattled cubic cells of about ``n_atoms`` atoms (rocksalt / diamond / fcc mix)."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    protos = [bulk("NaCl", "rocksalt", 5.64), bulk("Si", "diamond", 5.43), bulk("Cu", "fcc", 3.61),
              bulk("MgO", "rocksalt", 4.21)]
    out = []
    for i in range(n_systems):
        a = protos[i % len(protos)]
        reps = max(1, round((n_atoms / len(a)) ** (1 / 3)))
        a = a * (reps, reps, max(1, round(n_atoms / (len(a) * reps * reps))))
        a.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(a)
    return out


def _models(device: str, smoke: bool):
    import geodite_sim as gs

    out = {"default": gs.load_model(device=device)}
    if not smoke:
        out["geodite_mp_config"] = gs.load_model("geodite-reference-random", device=device)
    return out


def _sync_count(fn) -> int:
    """CUDA host syncs inside ``fn()`` counted from ``set_sync_debug_mode("warn")`` warnings (0 on the CPU)."""
    if not torch.cuda.is_available():
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def agreement(device: str) -> dict:
    import geodite_sim as gs

    if device == "cpu":
        return {"skipped": "no CUDA device"}
    structs = _cells(6, 8) + _cells(2, 64, seed=1)
    ref = gs.evaluate(structs, gs.load_model(device="cpu", dtype=torch.float64))
    out = gs.evaluate(structs, gs.load_model(device=device, dtype=torch.float64))
    de = max(abs(a["energy"] - b["energy"]) for a, b in zip(ref, out))
    df = max(float(np.abs(a["forces"] - b["forces"]).max()) for a, b in zip(ref, out))
    ds = max(float(np.abs(a["stress"] - b["stress"]).max()) for a, b in zip(ref, out))
    return {"max_abs_energy_eV": de, "max_abs_force_eV_A": df, "max_abs_stress_eV_A3": ds, "n_structures": len(structs)}


def sync_counts(device: str, model) -> dict:
    from geodite_sim.md import md_job
    from geodite_sim.runner import StepConfig
    from geodite_sim.runner.counting import OpCounter

    out = {}
    for ens in ("nve", "nvt_nhc", "nvt_langevin"):
        job = md_job(_cells(8, 8), model, ensemble=ens, temperature=300, steps=10_000,
                     config=StepConfig(accelerate="eager"))
        runner = job.prepare()
        runner.check()
        runner.advance(2)
        with OpCounter() as c1:
            runner.advance(2)
        with OpCounter() as c2:
            runner.advance(6)
        cuda_syncs = _sync_count(lambda r=runner: r.advance(4)) / 4
        out[ens] = {"dispatch_syncs_per_step": (c2.syncs - c1.syncs) / 4, "ops_per_step": (c2.ops - c1.ops) / 4,
                    "kernels_per_step": (c2.kernels - c1.kernels) / 4, "cuda_sync_warnings_per_step": cuda_syncs}
    return out


COMPILE_OPTIONS: dict = {}


def _config(mode: str, **kw):
    from geodite_sim.runner import StepConfig

    return StepConfig(accelerate=mode, compile_options=COMPILE_OPTIONS if mode == "compile" else {}, **kw)


def _time_relax(model, structs, mode: str, budget_s: float) -> dict:
    import geodite_sim as gs

    cfg = _config(mode, check_interval=10)
    gs.relax_many(structs[: max(1, len(structs) // 8)], model, fmax=0.05, max_steps=5, progress=False, config=cfg)
    t0 = time.perf_counter()
    res = gs.relax_many(structs, model, fmax=0.05, max_steps=100, progress=False, config=cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    steps = sum(r.n_steps for r in res)
    atoms = sum(len(r.structure) * r.n_steps for r in res)
    return {"seconds": dt, "structures_per_s": len(res) / dt, "atom_steps_per_s": atoms / dt, "system_steps": steps,
            "failed": sum(r.failed for r in res), "over_budget": dt > budget_s}


def _time_md(model, structs, mode: str, steps: int, budget_s: float) -> dict:
    import geodite_sim as gs

    gs.run_md(structs[: max(1, len(structs) // 8)], model, temperature=600, steps=5, progress=False,
              config=_config(mode), accelerate=mode)
    t0 = time.perf_counter()
    res = gs.run_md(structs, model, temperature=600, steps=steps, progress=False, config=_config(mode),
                    accelerate=mode)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    atoms = sum(len(s) for s in structs) * steps
    return {"seconds": dt, "atom_steps_per_s": atoms / dt, "ms_per_step": 1e3 * dt / steps,
            "failed": sum(r.error is not None for r in res), "over_budget": dt > budget_s}


def _torch_sim(model, structs, steps: int) -> dict:
    try:
        import torch_sim as ts
    except ImportError as exc:
        return {"skipped": f"torch-sim not importable ({exc})"}
    import geodite_sim as gs

    tsm = gs.TorchSimModel(model)
    out = {}
    t0 = time.perf_counter()
    state = ts.initialize_state(structs, device=model.device, dtype=model.dtype)
    ts.optimize(system=state, model=tsm, optimizer=ts.Optimizer.fire, max_steps=100,
                convergence_fn=ts.generate_force_convergence_fn(0.05, include_cell_forces=True),
                init_kwargs={"cell_filter": ts.CellFilter.frechet})
    out["optimize_structures_per_s"] = len(structs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    ts.integrate(system=state, model=gs.TorchSimModel(model, compute_stress=False),
                 integrator=ts.Integrator.nvt_nose_hoover, n_steps=steps, temperature=600, timestep=0.0015,
                 init_kwargs={"tau": 100 * 0.0015, "chain_length": 10, "chain_steps": 1, "sy_steps": 3})
    out["integrate_atom_steps_per_s"] = sum(len(s) for s in structs) * steps / (time.perf_counter() - t0)
    return out


def sweeps(device: str, models: dict, smoke: bool, deadline: float) -> dict:
    sizes = [(1, 8), (16, 8), (4, 64)] if smoke else [(1, 2), (64, 8), (1024, 8), (4096, 2), (256, 64), (64, 64)]
    modes = ["eager", "compile"] + (["cuda_graph"] if device == "cuda" else [])
    steps = 10 if smoke else 100
    out = {}
    for name, model in models.items():
        for n_sys, n_at in sizes:
            for mode in modes:
                key = f"{name}/{n_sys}x{n_at}/{mode}"
                if time.perf_counter() > deadline:
                    out[key] = {"skipped": "time budget spent"}
                    continue
                structs = _cells(n_sys, n_at)
                try:
                    out[key] = {"relax": _time_relax(model, structs, mode, 60), "md": _time_md(model, structs, mode,
                                                                                                steps, 60)}
                except Exception as exc:  # report and go on: one mode failing must not lose the rest
                    out[key] = {"error": f"{type(exc).__name__}: {exc}"}
                print(key, json.dumps(out[key])[:200], flush=True)
            if time.perf_counter() < deadline:
                out[f"{name}/{n_sys}x{n_at}/torch_sim"] = _torch_sim(model, _cells(n_sys, n_at), steps)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a rehearsal on the CPU)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the sweeps")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend of 'compile' mode "
                   "(default inductor; --smoke on a CPU uses aot_eager)")
    args = p.parse_args(argv)
    backend = args.compile_backend or ("aot_eager" if args.smoke and args.device == "cpu" else None)
    if backend:
        COMPILE_OPTIONS["backend"] = backend
    t_start = time.perf_counter()
    report = {"device": args.device, "torch": torch.__version__, "python": platform.python_version(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "smoke": args.smoke}
    models = _models(args.device, args.smoke)
    report["agreement"] = agreement(args.device)
    report["syncs"] = sync_counts(args.device, models["default"])
    report["sweeps"] = sweeps(args.device, models, args.smoke, t_start + args.budget_s)
    report["wall_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=lambda o: None if isinstance(o, float)
                                         and not math.isfinite(o) else str(o)))
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
