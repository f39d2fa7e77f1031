"""Peak memory of the streamed transport analysis on long trajectory files (issue 26: "analysis of a 1 GB
trajectory file stays within a fixed memory bound").

Writes synthetic engine-format HDF5 trajectories (512 atoms: 256 Brownian Li, 256 vibrating I, float32
positions as run_md writes them, gzip) of about 0.1 and 1 GB to a scratch folder, analyses each in a fresh
process (``analyse_transport`` + the sampled RDF, as ``geodite-sim md analyse`` does) and records the peak
RSS (``ru_maxrss``) of that process, then deletes the files.

    OMP_NUM_THREADS=1 python benchmarks/transport_memory.py --scratch /tmp/tm
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_LI, N_I = 256, 256
CELL = np.array([[20.0, 0.0, 0.0], [4.0, 19.0, 0.0], [2.0, 3.0, 18.0]])


def write(path: Path, n_frames: int, seed: int = 0, block: int = 4096) -> None:
    """A synthetic run_md-format file of ``n_frames`` frames, written in blocks (never all in memory)."""
    from geodite_sim.trajectory import TrajectoryWriter

    rng = np.random.default_rng(seed)
    numbers = np.array([3] * N_LI + [53] * N_I)
    w = TrajectoryWriter(path, {"timestep_fs": 1.0, "frame_every": 10}, block=block, compression="gzip",
                         compression_opts=1)  # the measured files were gzip (the writer's default then)
    w.add_system(0, numbers, np.where(numbers == 3, 6.94, 126.9), np.ones(3, bool), {"temperature_K": 800.0})
    g = w.file["systems/0"]
    li = rng.uniform(0, 1, (N_LI, 3)) @ CELL
    sites = rng.uniform(0, 1, (N_I, 3)) @ CELL
    inv = np.linalg.inv(CELL)
    for t0 in range(0, n_frames, block):
        k = min(block, n_frames - t0)
        steps = rng.normal(0, 0.1, (k, N_LI, 3))  # D = 0.1² / (2 × 10 fs) = 0.5 Å²/ps
        path_li = li + np.cumsum(steps, axis=0)
        li = path_li[-1]
        pos = np.concatenate([path_li, sites + rng.normal(0, 0.1, (k, N_I, 3))], axis=1)
        frac = pos @ inv
        pos = ((frac - np.floor(frac)) @ CELL).astype(np.float32)
        for key, value in (("positions", pos), ("cell", np.broadcast_to(CELL, (k, 3, 3))),
                           ("step", 10 * np.arange(t0, t0 + k)), ("energy", np.zeros(k)),
                           ("kinetic_energy", np.zeros(k)), ("temperature", np.full(k, 800.0)),
                           ("conserved", np.zeros(k))):
            ds = g[key]
            ds.resize(t0 + k, axis=0)
            ds[t0:t0 + k] = value
    w.file.flush()
    w.close()


def analyse(path: str) -> dict:
    """Run in a fresh process: the analysis of ``path``; returns timings, D and the peak RSS."""
    from geodite_sim.analysis import sample_frames
    from geodite_sim.analysis.transport import TransportSettings, analyse_transport

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    res = analyse_transport(path, 0, TransportSettings(mobile=("Li",), charges={"Li": 1, "I": -1}))
    sample_frames(path, 0, 0.0, 200).rdf()
    return {"seconds": time.perf_counter() - t, "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 1024, "rss_after_imports_MiB": rss0, "n_frames_kept": res.n_frames, "stride": res.stride,
            "D_Li_cm2_per_s": res.tracer["Li"].D_cm2_per_s, "D_Li_ci": res.tracer["Li"].ci_cm2_per_s,
            "D_true_cm2_per_s": 0.5e-4}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scratch", default="/tmp/transport_memory")
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--analyse", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.analyse:
        print(json.dumps(analyse(args.analyse)))
        return
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for gb in args.sizes_gb:
            n_frames = int(gb * 2**30 / ((N_LI + N_I) * 3 * 4))
            path = scratch / f"traj_{gb:g}GB.h5"
            t = time.perf_counter()
            write(path, n_frames)
            wrote = time.perf_counter() - t
            out = subprocess.run([sys.executable, __file__, "--analyse", str(path)], check=True, capture_output=True,
                                 text=True)
            row = {"target_GB": gb, "file_MiB": path.stat().st_size / 2**20, "frames": n_frames,
                   "positions_in_memory_float64_MiB": n_frames * (N_LI + N_I) * 3 * 8 / 2**20,
                   "write_seconds": wrote, **json.loads(out.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            rows.append(row)
            path.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = Path(__file__).parent / "results"
    (results / "transport_memory.json").write_text(json.dumps(rows, indent=1))
    lines = ["| file (MiB) | frames | all positions as float64 (MiB) | peak RSS (MiB) | after imports (MiB) | "
             "analysis (s) | frames kept (stride) | D Li (cm²/s) [95 %] (true 5.0e-05) |", "|---" * 8 + "|"]
    for r in rows:
        lo, hi = r["D_Li_ci"]
        lines.append(f"| {r['file_MiB']:.0f} | {r['frames']:,} | {r['positions_in_memory_float64_MiB']:.0f} | "
                     f"{r['peak_rss_MiB']:.0f} | {r['rss_after_imports_MiB']:.0f} | {r['seconds']:.0f} | "
                     f"{r['n_frames_kept']} ({r['stride']}) | {r['D_Li_cm2_per_s']:.2e} [{lo:.2e}, {hi:.2e}] |")
    (results / "transport_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
