"""Operations per engine step of ``relax_many`` at a CUDA-like check interval: 1 cell vs 32 cells (issue 24).

The Verlet-list policy parks a system whose atoms moved past the skin and re-runs its step after the next check;
with many systems in a batch, more steps are redone. This counts every dispatched ATen operation of whole
relaxations (``geodite_sim.runner.counting.OpCounter``: checks, admission and parked systems' redone steps
included) of 10 and of 40 optimiser steps (fmax tiny, so no system stops early) and takes the difference per step,
which cancels set-up and the per-system retirement; for 1 and for 32 rattled small cells (NaCl, Si, Cu, 2-8 atoms),
``check_interval=10``, FIRE and L-BFGS with the cell, the packaged model. Target of issue 24: at most 5 % more
operations per step with 32 cells than with 1 (FIRE, the default two-level lists).

    OMP_NUM_THREADS=1 python benchmarks/verlet_ops.py        # writes benchmarks/results/verlet_ops.{json,md}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
STEPS = (10, 40)  # the difference of the two runs cancels set-up and retirement (results are built per system)


def cells(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = [bulk("NaCl", "rocksalt", 5.64), bulk("Si", "diamond", 5.43), bulk("Cu", "fcc", 3.61)][i % 3]
        a.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(a)
    return out


def count(n: int, model, optimizer: str) -> dict:
    import geodite_sim as gs
    from geodite_sim.runner.counting import OpCounter

    structures = cells(n)
    gs.relax_many(structures[:1], model, fmax=1e-9, max_steps=3, check_interval=10, progress=False,
                  optimizer=optimizer)  # warm-up
    runs = []
    for steps in STEPS:
        with OpCounter() as c:
            res = gs.relax_many(structures, model, fmax=1e-9, max_steps=steps, check_interval=10, progress=False,
                                optimizer=optimizer)
        runs.append((max(r.n_steps for r in res), c.ops, c.kernels, c.syncs))
    (s0, o0, k0, _), (s1, o1, k1, y1) = runs
    return {"n": n, "steps": [s0, s1], "ops": [o0, o1], "syncs_long_run": y1,
            "ops_per_step": (o1 - o0) / (s1 - s0), "kernels_per_step": (k1 - k0) / (s1 - s0)}


def main() -> int:
    torch.set_num_threads(1)
    import geodite_sim as gs

    model = gs.load_model()
    rows = {}
    for optimizer in ("fire", "lbfgs"):
        one, many = count(1, model, optimizer), count(32, model, optimizer)
        rows[optimizer] = {"one": one, "many": many, "extra": many["ops_per_step"] / one["ops_per_step"] - 1}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "verlet_ops.json").write_text(json.dumps(rows, indent=1))
    lines = ["relax_many, check_interval 10, FIRE/L-BFGS + Fréchet cell, packaged model; operations per step = "
             "(ops of 40 steps - ops of 10 steps) / 30: checks and parked systems' redone steps included, set-up "
             "and retirement cancelled", "",
             "| optimiser | 1 cell: ops/step | 32 cells: ops/step | extra | kernels/step 1 → 32 |", "|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['one']['ops_per_step']:.0f} | {r['many']['ops_per_step']:.0f} | {100 * r['extra']:+.1f} % "
                     f"| {r['one']['kernels_per_step']:.0f} → {r['many']['kernels_per_step']:.0f} |")
    (RESULTS / "verlet_ops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
