"""Ray scaling on this machine: relax N small structures with the default model on 1 worker vs 2 workers.

    OMP_NUM_THREADS=1 python benchmarks/ray_scaling.py            # 256 structures (the issue's protocol)
    OMP_NUM_THREADS=1 python benchmarks/ray_scaling.py --n 64     # a quick look

Runs, each on the same 256 rattled small cells (2-8 atoms), default model (``geodite_sim.load_model()``,
float32, CPU), fixed work per structure (``max_steps`` FIRE steps, ``fmax`` small enough that few converge):

1. local: ``relax_many`` in this process, 1 torch thread (the single-process baseline);
2. ray 1 worker x 1 thread; 3. ray 2 workers x 1 thread (``RayExecutor``, shards of 16).

Reports structures/s of each, the ratios, the Ray start-up overhead (``ray.init`` of a local cluster, and
starting the actors with the model) and the machine load before/after (``os.getloadavg``), since the
2-core machine is shared. Writes ``benchmarks/results/ray_scaling.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def structures(n: int, seed: int = 0) -> list:
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    protos = [lambda: bulk("Cu", "fcc", 3.6), lambda: bulk("NaCl", "rocksalt", 5.6),
              lambda: bulk("Si", "diamond", 5.43), lambda: bulk("Al", "fcc", 4.05) * (1, 1, 2),
              lambda: bulk("MgO", "rocksalt", 4.2),
              lambda: bulk("Fe", "bcc", 2.87) * (2, 1, 1), lambda: bulk("LiF", "rocksalt", 4.0) * (1, 1, 2)]
    out = []
    for k in range(n):
        a = protos[k % len(protos)]()
        a.rattle(0.08, seed=int(rng.integers(1 << 30)))
        a.set_cell(a.cell[:] * (1 + 0.03 * rng.standard_normal()), scale_atoms=True)
        out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "ray_scaling"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import geodite_sim as gs
    from geodite_sim.executors import RayExecutor

    model = gs.load_model(device="cpu")
    structs = structures(args.n)
    kw = {"fmax": 1e-3, "max_steps": args.max_steps, "progress": False}
    load0 = os.getloadavg()
    report: dict = {"n_structures": args.n, "atoms": int(sum(len(a) for a in structs)), "max_steps": args.max_steps,
                    "fmax": kw["fmax"], "shard_size": args.shard_size, "model": getattr(model, "name", "default"),
                    "dtype": str(model.dtype), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "load_before": load0, "runs": {}}

    gs.relax_many(structs[:8], model, **kw)  # warm-up (kernels, capacity cache)
    t0 = time.perf_counter()
    local = gs.relax_many(structs, model, **kw)
    t_local = time.perf_counter() - t0
    report["runs"]["local_1x1"] = {"seconds": t_local, "structures_per_s": args.n / t_local}
    print(f"local 1 thread: {t_local:.1f} s, {args.n / t_local:.2f} structures/s", flush=True)

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    report["ray_init_s"] = time.perf_counter() - t0
    for workers in (1, 2):
        ex = RayExecutor(workers=workers, shard_size=args.shard_size)
        t0 = time.perf_counter()
        ex.start(model)
        start_s = time.perf_counter() - t0
        ex.relax_many(structs[: 4 * workers], model, **kw)  # warm-up inside the actors
        t0 = time.perf_counter()
        res = ex.relax_many(structs, model, **kw)
        t = time.perf_counter() - t0
        ex.shutdown()
        same = all(a.n_steps == b.n_steps and abs(a.energy - b.energy) <= 1e-4 * max(1.0, abs(a.energy))
                   for a, b in zip(local, res, strict=True))
        report["runs"][f"ray_{workers}x1"] = {"seconds": t, "structures_per_s": args.n / t, "actor_start_s": start_s,
                                              "results_match_local": bool(same)}
        print(f"ray {workers} worker(s): {t:.1f} s, {args.n / t:.2f} structures/s (actors up in {start_s:.1f} s, "
              f"results match local: {same})", flush=True)
    ray.shutdown()
    r = report["runs"]
    report["ratio_2w_over_1w"] = r["ray_2x1"]["structures_per_s"] / r["ray_1x1"]["structures_per_s"]
    report["ratio_2w_over_local"] = r["ray_2x1"]["structures_per_s"] / r["local_1x1"]["structures_per_s"]
    report["ray_overhead_1w_vs_local"] = r["ray_1x1"]["seconds"] / r["local_1x1"]["seconds"] - 1.0
    report["load_after"] = os.getloadavg()
    report["note"] = ("2-core machine shared with other jobs: load averages before/after are given; a ratio below 2 "
                      "on a loaded machine measures the share of the second core that was free, not Ray's overhead")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    md = [f"# Ray scaling ({args.n} structures, default model, CPU)", "",
          f"{report['atoms']} atoms in all, {args.max_steps} FIRE steps each (fmax {kw['fmax']}), shards of "
          f"{args.shard_size}; load average before {load0[0]:.1f}, after {report['load_after'][0]:.1f} "
          f"({os.cpu_count()} CPUs, shared).", "",
          "| run | seconds | structures/s |", "|---|---|---|"]
    md += [f"| {k} | {v['seconds']:.1f} | {v['structures_per_s']:.2f} |" for k, v in r.items()]
    md += ["", f"- 2 workers / 1 worker: **{report['ratio_2w_over_1w']:.2f}x**; 2 workers / local: "
               f"{report['ratio_2w_over_local']:.2f}x",
           f"- Ray start-up: `ray.init` of a local cluster {report['ray_init_s']:.1f} s; actors with the model: "
           f"{r['ray_1x1']['actor_start_s']:.1f} s (1), {r['ray_2x1']['actor_start_s']:.1f} s (2)",
           f"- 1 Ray worker vs local: {100 * report['ray_overhead_1w_vs_local']:+.0f} % time", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
