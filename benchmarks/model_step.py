"""One Geodite-MP-size evaluation (energy + forces + stress) of Si64: fused CPU kernels vs eager.

    python benchmarks/model_step.py                 # torch's default thread count
    python benchmarks/model_step.py --threads 1 2   # one row per thread count

For each thread count, in one process: the float32 GEMM peak (before and after; the higher is
used), the eager model (``fused=False``) and the fused model, alternating, best of
``--repeats``; the fraction of the GEMM peak counting the reference's 191.3 MFLOP per atom
(issue #7's yardstick). Writes benchmarks/results/model_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchmarking import best_time, count_flops, gemm_peak_gflops, machine_info
from speed_protocol import REFERENCE_MFLOP_PER_ATOM, silicon

from geodite_sim.batch import Batch
from geodite_sim.model import load_model
from geodite_sim.neighbors import neighbor_list


def measure(threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    model = load_model("geodite-reference-random", dtype=torch.float32)
    atoms = silicon(2)
    batch = Batch.from_atoms([atoms], dtype=model.dtype)
    edges = neighbor_list(batch, model.cutoff)

    def step(fused):
        return model(batch, edges=edges, fused=fused)

    ref, got = step(False), step(True)
    max_df = float((ref["forces"] - got["forces"]).abs().max())
    flops = count_flops(lambda: step(True))
    peak = gemm_peak_gflops()
    t_eager = min(best_time(lambda: step(False), repeats=repeats) for _ in range(2))
    t_fused = min(best_time(lambda: step(True), repeats=repeats) for _ in range(2))
    peak = max(peak, gemm_peak_gflops())
    n = len(atoms)
    ref_gflop = REFERENCE_MFLOP_PER_ATOM * 1e6 * n / 1e9
    return {
        "threads": threads, "atoms": n, "edges": int(edges.sender.shape[0]),
        "gemm_peak_gflops": peak, "own_mflop_per_atom": flops / n / 1e6,
        "eager_ms": t_eager * 1e3, "fused_ms": t_fused * 1e3, "speedup": t_eager / t_fused,
        "fraction_of_peak_eager": ref_gflop / t_eager / peak, "fraction_of_peak_fused": ref_gflop / t_fused / peak,
        "max_force_difference_eV_per_A": max_df, "fused_available": bool(model.use_fused()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/model_step")
    args = p.parse_args(argv)
    rows = [measure(t, args.repeats) for t in args.threads]
    lines = ["| threads | GEMM peak GFLOP/s | eager ms | fused ms | speedup | fraction of peak (eager → fused) |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['gemm_peak_gflops']:.0f} | {r['eager_ms']:.0f} | {r['fused_ms']:.0f} | "
                     f"{r['speedup']:.2f} | {100 * r['fraction_of_peak_eager']:.0f} % → "
                     f"{100 * r['fraction_of_peak_fused']:.0f} % |")
    lines.append("")
    lines.append(f"Si64, Geodite-MP configuration (random weights), float32, energy + forces + stress; fraction "
                 f"counts {REFERENCE_MFLOP_PER_ATOM} MFLOP/atom (own count {rows[0]['own_mflop_per_atom']:.1f}).")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
