"""Benchmark: batched neighbour-list builds, ms per build, for our backends, vesin and ASE.

Inputs are rattled, strained bulk supercells of ~200 atoms (fcc Cu, rocksalt NaCl/MgO, diamond Si,
bcc Fe, hcp Ti; some atoms unwrapped by a lattice vector), fully periodic, cutoff 6 Å by default.
Every backend builds the same batch: ours in one call; vesin and ASE looped over systems (their
inputs pre-extracted, so only the neighbour search is timed). Warm-up calls (Warp / Triton
compilation included) are excluded; the median of the timed repeats is reported.

    python benchmarks/neighbors.py            # 64 systems x ~200 atoms, and a 1/8/64-system sweep
    python benchmarks/neighbors.py --quick    # fewer repeats, 1/8/64 sweep only up to the budget

Writes ``benchmarks/results/neighbors.json`` and ``benchmarks/results/neighbors.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list

from geodite_sim import neighbors as nb
from geodite_sim.batch import Batch

PROTOTYPES: list[Callable[[], Atoms]] = [
    lambda: bulk("Cu", "fcc", a=3.61, cubic=True),
    lambda: bulk("NaCl", "rocksalt", a=5.64, cubic=True),
    lambda: bulk("Si", "diamond", a=5.43, cubic=True),
    lambda: bulk("Fe", "bcc", a=2.87, cubic=True),
    lambda: bulk("MgO", "rocksalt", a=4.21, cubic=True),
    lambda: bulk("Ti", "hcp", a=2.95, c=4.68),
]


def structures(n_systems: int, target_atoms: int = 200, seed: int = 0) -> list[Atoms]:
    """``n_systems`` rattled, strained bulk supercells of about ``target_atoms`` atoms each."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_systems):
        unit = PROTOTYPES[s % len(PROTOTYPES)]()
        shapes = [r for r in itertools.product(range(1, 9), repeat=3) if max(r) - min(r) <= 1]
        best = min(shapes, key=lambda r: abs(len(unit) * r[0] * r[1] * r[2] - target_atoms))
        atoms = unit * best
        strain = np.eye(3) + 0.03 * (lambda m: (m + m.T) / 2)(rng.uniform(-1, 1, (3, 3)))
        atoms.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        jump = rng.random(len(atoms)) < 0.2  # MD-style unwrapped coordinates
        atoms.positions[jump] += rng.integers(-1, 2, (int(jump.sum()), 3)) @ atoms.cell[:]
        out.append(atoms)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], repeats: int, warmup: int, budget_s: float, device: torch.device) -> dict:
    """Median/min wall time of ``fn`` in ms after ``warmup`` calls; fewer repeats if a call is slow."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return {"ms_median": statistics.median(times), "ms_min": min(times), "repeats": len(times)}


def backend_calls(atoms_list: list[Atoms], cutoff: float, device: torch.device) -> dict[str, Callable[[], int]]:
    """name -> callable building the neighbour list of all systems and returning the edge count."""
    batch = Batch.from_atoms(atoms_list, dtype=torch.float64, device=device)
    calls: dict[str, Callable[[], int]] = {}

    def ours(name: str, method: str | None = None) -> Callable[[], int]:
        if method is None:
            return lambda: int(nb.neighbor_list(batch, cutoff, name).sender.numel())
        return lambda: int(nb._alchemiops_backend(nb.wrap_batch(batch, cutoff), cutoff, method).sender.numel())

    if device.type == "cuda" and nb.backend_available("triton", device):
        calls["triton"] = ours("triton")
    if nb.backend_available("alchemiops", device):
        calls["alchemiops (naive)"] = ours("alchemiops", "batch_naive")
        calls["alchemiops (cell list)"] = ours("alchemiops", "batch_cell_list")
    calls["torch"] = ours("torch")
    if device.type == "cpu":
        try:
            import vesin

            calc = vesin.NeighborList(cutoff=cutoff, full_list=True)
            inputs = [(a.positions.copy(), a.cell[:].copy(), a.pbc.copy()) for a in atoms_list]

            def run_vesin() -> int:
                return sum(len(calc.compute(p, c, pb, quantities="ijS")[0]) for p, c, pb in inputs)

            calls["vesin (looped)"] = run_vesin
        except ImportError:
            pass
        calls["ase (looped)"] = lambda: sum(len(ase_neighbor_list("i", a, cutoff)) for a in atoms_list)
    return calls


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for n_sys in args.systems:
        atoms_list = structures(n_sys, args.atoms, seed=n_sys)
        n_atoms = sum(len(a) for a in atoms_list)
        edges_ref = None
        for name, fn in backend_calls(atoms_list, args.cutoff, device).items():
            if args.skip_slow and name.startswith(("ase", "torch")) and n_sys > args.skip_slow:
                continue
            n_edges = fn()
            if edges_ref is None:
                edges_ref = n_edges
            if n_edges != edges_ref:
                raise RuntimeError(f"{name} found {n_edges} edges, expected {edges_ref}")
            timing = time_ms(fn, args.repeats, args.warmup, args.budget, device)
            row = {"backend": name, "n_systems": n_sys, "n_atoms": n_atoms, "n_edges": n_edges, **timing}
            results.append(row)
            print(f"{n_sys:4d} systems {n_atoms:6d} atoms {n_edges:8d} edges  {name:24s} "
                  f"{timing['ms_median']:10.2f} ms  (min {timing['ms_min']:.2f}, n={timing['repeats']})", flush=True)
    meta = {
        "cutoff_A": args.cutoff,
        "atoms_per_system": args.atoms,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "dtype": "float64",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for mod in ("nvalchemiops", "vesin", "ase", "triton", "warp"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:
            meta[mod] = None
    return {"meta": meta, "results": results}


def markdown(report: dict) -> str:
    """Backend x number-of-systems table of median ms per build."""
    res = report["results"]
    sizes = sorted({r["n_systems"] for r in res})
    names = list(dict.fromkeys(r["backend"] for r in res))
    cell = {(r["backend"], r["n_systems"]): r for r in res}
    atoms = {r["n_systems"]: r["n_atoms"] for r in res}
    meta = report["meta"]
    lines = [
        f"Neighbour-list build, ms (median), cutoff {meta['cutoff_A']} Å, float64, {meta['device']} "
        f"({meta['cpu_count']} cores, torch threads {meta['torch_threads']}, load avg {meta['load_average']}).",
        "",
        "| backend | " + " | ".join(f"{s} sys ({atoms[s]} atoms)" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for name in names:
        vals = [f"{cell[(name, s)]['ms_median']:.1f}" if (name, s) in cell else "–" for s in sizes]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", type=int, nargs="+", default=[1, 8, 64], help="batch sizes to sweep")
    p.add_argument("--atoms", type=int, default=200, help="target atoms per system")
    p.add_argument("--cutoff", type=float, default=6.0, help="cutoff, Å")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed repeats per entry, at most")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: Warp, vesin and ASE are single-threaded too; 0: torch's default)")
    p.add_argument("--skip-slow", type=int, default=0, help="skip torch/ASE above this many systems (0: never)")
    p.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up, 5 s budget per entry")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.budget = 3, 1, 5.0
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "neighbors.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "neighbors.md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
