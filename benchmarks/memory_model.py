"""Benchmark: the step memory model — fit on small probes, check on held-out sizes and structures.

For the Geodite-MP configuration (``load_model("geodite-reference-random")``: 192 channels,
4 layers, 6 Å), one energy+forces+stress step's peak bytes are measured
(:func:`geodite_sim.memory.measure_step_peak`: inputs + everything the model call allocates;
on the CPU the TorchDispatchMode allocation probe) on the fit probes
(:func:`geodite_sim.memory.default_probes`, 8 to 48 atoms), the affine model
``fixed + a·atoms + b·edges`` is fitted, and its predictions are compared with measurements on
validation batches: diamond Si of 8 to 512 atoms, (Sr,Ba)(Ti,Zr)O3 perovskite supercells, and a
mixed multi-system batch.

Independent cross-check of the probe on every validation batch (CPU): the peak of the c10 CPU
allocator's running total, from ``torch.profiler`` memory events (sees every allocation, scratch
memory inside kernels included). The process's resident set is not used: allocator caching and
page reuse make it a loose lower bound (docs/memory-model.md).

    python benchmarks/memory_model.py                   # float32 (Si up to 512 atoms) + float64 (up to 216), ~1 min
    python benchmarks/memory_model.py --dtypes float32  # float32 only

Writes ``benchmarks/results/memory_model.json`` and ``benchmarks/results/memory_model.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from ase.build import bulk
from benchmarking import machine_info

from geodite_sim.batch import Batch
from geodite_sim.memory import (
    MemoryModel,
    default_probes,
    fit_samples,
    measure_samples,
    measure_step_peak,
    mixed_oxide,
    si_diamond,
    tensor_bytes,
)
from geodite_sim.model import load_model
from geodite_sim.neighbors import neighbor_list

MB = 1e6


def validation_batches(max_si: int) -> list[tuple[str, list]]:
    """(label, structures) of the validation batches (Si 1x1x1 is also a fit probe; the rest are not)."""
    rows = [(f"Si diamond {k}x{k}x{k}", [si_diamond((k, k, k))]) for k in (1, 2, 3, 4, 5) if 8 * k**3 <= max_si]
    return rows + [
        ("oxide 3x3x3", [mixed_oxide((3, 3, 3), seed=2)]),
        ("mixed: Si 64 + oxide 40 + Cu 32 + Si slab 32",
         [si_diamond((2, 2, 2)), mixed_oxide((2, 2, 2), seed=3), bulk("Cu", "fcc", 3.61, cubic=True) * (2, 2, 2),
          si_diamond((2, 2, 1), vacuum=12.0)]),
        ("oxide 4x4x4", [mixed_oxide((4, 4, 4), seed=4)]),
    ]


def allocator_peak(model, batch, edges) -> int | None:
    """Peak of the CPU allocator's running total during the step, from profiler memory events (+ inputs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(batch, edges=edges, compute_forces=True, compute_stress=True)
    del out
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    if not mem:
        return None
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return int(max(m["Total Allocated"] for m in mem) - start + tensor_bytes(batch, tuple(edges)))


def git_state() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "geodite_sim/model"], capture_output=True,
                               text=True, cwd=root).stdout.strip()
        return rev + (" (geodite_sim/model modified)" if dirty else "")
    except OSError:
        return "unknown"


def run(args, dtype_name: str, max_atoms: int | None = None) -> dict:
    """Fit and validate for one dtype; validation batches above ``max_atoms`` atoms are skipped."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, dtype_name)
    model = load_model(args.model, dtype=dtype)
    model(Batch.from_atoms([si_diamond()], dtype=dtype))  # warm-up: extension build, vacuum cache
    t0 = time.perf_counter()
    fit_rows = measure_samples(model, default_probes())
    fitted = fit_samples(fit_rows)
    fit_s = time.perf_counter() - t0
    probes = [
        {"atoms": s.atoms, "edges": s.edges, "measured_bytes": s.peak_bytes,
         "predicted_bytes": fitted.predict(s.atoms, s.edges),
         "rel_error": fitted.predict(s.atoms, s.edges) / s.peak_bytes - 1.0}
        for s in fit_rows
    ]
    in_fit = {(p["atoms"], p["edges"]) for p in probes}
    batches = []
    for label, structures in validation_batches(args.max_si):
        if max_atoms is not None and sum(len(a) for a in structures) > max_atoms:
            continue
        batch = Batch.from_atoms(structures, dtype=dtype)
        batches.append((label, len(structures), batch, neighbor_list(batch, model.cutoff)))
    batches.sort(key=lambda b: fitted.predict(b[2].n_atoms, b[3].sender.shape[0]))
    rows = []
    while batches:
        label, n_systems, batch, edges = batches.pop(0)
        n, e = batch.n_atoms, int(edges.sender.shape[0])
        t = time.perf_counter()
        measured = measure_step_peak(model, batch, edges)
        step_s = time.perf_counter() - t
        alloc = None if args.no_allocator else allocator_peak(model, batch, edges)
        predicted = fitted.predict(n, e)
        row = {"label": label, "systems": n_systems, "atoms": n, "edges": e, "edges_per_atom": e / n,
               "in_fit": (n, e) in in_fit, "measured_bytes": measured, "predicted_bytes": predicted,
               "rel_error": predicted / measured - 1.0, "allocator_bytes": alloc, "probe_step_s": step_s}
        rows.append(row)
        print(f"{dtype_name} {label:44s} {n:5d} atoms {e:6d} edges  measured {measured / MB:9.1f} MB  "
              f"predicted {predicted / MB:9.1f} MB  rel. error {row['rel_error']:+.1e}"
              + (f"  allocator - measured {alloc - measured:+d} B" if alloc else ""), flush=True)
        del batch, edges
    meta = {
        "model": args.model,
        "config": {k: getattr(model.config, k) for k in ("hidden_channels", "num_layers", "cutoff", "num_heads")},
        "dtype": dtype_name, "device": "cpu", "code": git_state(), "fit_seconds": fit_s,
        "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **machine_info(),
    }
    return {"meta": meta, "model": fitted.to_dict(), "fit_probes": probes, "validation": rows}


def markdown(report: dict) -> str:
    m, meta = report["model"], report["meta"]
    cfg = meta["config"]
    errs = [abs(r["rel_error"]) for r in report["validation"] if not r["in_fit"]]
    lines = [
        f"## {meta['dtype']}",
        "",
        f"Step memory model, {meta['model']} ({cfg['hidden_channels']} channels, {cfg['num_layers']} layers, "
        f"{cfg['cutoff']} Å), {meta['dtype']}, {meta['device']} (torch {meta['torch']}, code {meta['code']}, "
        f"{meta['date']}).",
        "",
        f"Fit (non-negative, relative least squares) on {len(report['fit_probes'])} probes of "
        f"{min(p['atoms'] for p in report['fit_probes'])}-{max(p['atoms'] for p in report['fit_probes'])} atoms "
        f"in {meta['fit_seconds']:.1f} s: **{m['fixed_bytes'] / MB:.2f} MB + {m['bytes_per_atom'] / 1e3:.2f} kB/atom "
        f"+ {m['bytes_per_edge'] / 1e3:.2f} kB/edge**.",
        "",
        f"Validation batches not in the fit: largest |relative error| {max(errs):.1e} (acceptance: 0.2). "
        "The row marked * is a fit probe's batch.",
        "",
        "| batch | atoms | edges | edges/atom | measured MB | predicted MB | rel. error | allocator − measured, B |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["validation"]:
        alloc = f"{r['allocator_bytes'] - r['measured_bytes']:+d}" if r["allocator_bytes"] else "–"
        lines.append(f"| {r['label']}{' *' if r['in_fit'] else ''} | {r['atoms']} | {r['edges']} | "
                     f"{r['edges_per_atom']:.1f} | {r['measured_bytes'] / MB:.1f} | {r['predicted_bytes'] / MB:.1f} | "
                     f"{r['rel_error']:+.1e} | {alloc} |")
    lines += ["", "Fit probes (in-sample):", "", "| atoms | edges | measured MB | predicted MB | rel. error |",
              "|---:|---:|---:|---:|---:|"]
    for p in report["fit_probes"]:
        lines.append(f"| {p['atoms']} | {p['edges']} | {p['measured_bytes'] / MB:.2f} | "
                     f"{p['predicted_bytes'] / MB:.2f} | {p['rel_error']:+.1e} |")
    mm = MemoryModel(**m)
    lines += ["", "Implied capacity (max_atoms, default 20 % margin) of this CPU model for a few budgets:", "",
              "| budget | Si (46 edges/atom) | oxide (73.5 edges/atom) |", "|---:|---:|---:|"]
    for gb in (1, 16, 80):
        lines.append(f"| {gb} GB | {mm.max_atoms(gb * 1e9, 46.0)} | {mm.max_atoms(gb * 1e9, 73.5)} |")
    lines += ["", "measured: inputs (batch + edge list) + peak of live tensor bytes during the model call "
              "(TorchDispatchMode probe). allocator − measured: the same step's peak of the c10 CPU allocator "
              "total (torch.profiler memory events, which include scratch allocations inside kernels) minus the "
              "probe's, in bytes."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="geodite-reference-random")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--max-si", type=int, default=512, help="largest Si validation batch, atoms")
    p.add_argument("--float64-max-atoms", type=int, default=216,
                   help="float64: skip validation batches above this many atoms (runtime)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-allocator", action="store_true", help="skip the profiler cross-check (halves the time)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="memory_model", help="output file stem")
    args = p.parse_args()
    reports = [run(args, d, args.float64_max_atoms if d == "float64" else None) for d in args.dtypes]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"runs": reports}, indent=2) + "\n")
    table = "\n".join(markdown(r) for r in reports)
    (args.out / f"{args.name}.md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
